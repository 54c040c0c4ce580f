"""Pretraining of the tiny base: the loss, the schedules, checkpoint / resume, the params file."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from grpo_lib.params import load_params
from grpo_lib.checkpoints import load_state
from grpo_lib.pretrain import PretrainParams, lr_factor, pretrain

torch.set_num_threads(1)


def test_lr_schedule_warmup_cosine_and_time_budget():
    p = PretrainParams(warmup_steps=10, max_steps=100, min_lr_ratio=0.1, time_budget_minutes=10.0)
    assert lr_factor(0, 0.0, p) == pytest.approx(0.1)                       # (0+1)/10 of the peak
    assert lr_factor(9, 0.0, p) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.09)))  # warm
    assert lr_factor(50, 0.0, p) == pytest.approx(0.1 + 0.9 * 0.5)          # cosine half way
    assert lr_factor(100, 0.0, p) == pytest.approx(0.1)                     # floor at the end
    # the time budget drives the decay when it is the further along of the two
    assert lr_factor(10, 300.0, p) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))


def test_params_file_and_validation(repo):
    p = load_params(repo / "params" / "pretrain__tiny_base.yaml")
    assert isinstance(p, PretrainParams) and p.out_dir == "data/checkpoints/tiny-base"
    assert p.time_budget_minutes <= 60
    with pytest.raises(ValueError, match="bogus"):
        load_params({"bogus": 1}, PretrainParams)
    with pytest.raises(ValueError, match="caption_dropout"):
        PretrainParams(caption_dropout=1.0)
    with pytest.raises(ValueError, match="batch_size"):
        PretrainParams(batch_size=0)


def _tiny(run_dir, **kw):
    return PretrainParams(run_dir=str(run_dir), pool_size=48, batch_size=4, max_steps=4, checkpoint_every=2,
                          log_every=1, warmup_steps=2, time_budget_minutes=1e6, num_threads=1,
                          block_out_channels=[8, 16, 16], text_dim=16, text_layers=1, **kw)


def test_resume_continues_bit_for_bit(tmp_path):
    a = pretrain(_tiny(tmp_path / "a"), progress=False)
    pretrain(_tiny(tmp_path / "b"), progress=False, stop_at=2)               # "interrupted" after 2 steps
    assert load_state(tmp_path / "b" / "ckpt.pt")["step"] == 2
    b = pretrain(_tiny(tmp_path / "b"), progress=False)                      # resumes at step 2
    from safetensors.torch import load_file
    wa = load_file(str(a / "unet" / "diffusion_pytorch_model.safetensors"))
    wb = load_file(str(b / "unet" / "diffusion_pytorch_model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    log = (tmp_path / "b" / "log.csv").read_text().splitlines()
    assert log[0].startswith("step,") and [r.split(",")[0] for r in log[1:]] == ["1", "2", "3", "4"]
    # the pool is cached and reused
    assert len(list((tmp_path / "b").glob("pool_*.npz"))) == 1
