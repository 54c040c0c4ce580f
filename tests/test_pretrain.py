"""Pretraining of the tiny base: the loss, the schedules, checkpoint / resume, the params file."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from grpo_lib.params import load_params
from grpo_lib.pretrain import PretrainParams, flow_matching_loss, lr_factor, pretrain, sample_t

torch.set_num_threads(1)


class _Oracle:
    """A 'policy' whose velocity is the exact rectified-flow target for a known x0: (x_t - x0) / t."""

    def __init__(self, x0, exact=True):
        self.x0, self.exact = x0, exact

    def text_states(self, prompts):
        B = len(prompts)
        return torch.zeros(B, 2, 4), torch.ones(B, 2, dtype=torch.long), torch.zeros(B, 4)

    def _net(self, x_t, t, tensors):
        return (x_t - self.x0) / t.view(-1, 1, 1, 1) if self.exact else torch.zeros_like(x_t)


def test_flow_matching_loss_is_zero_for_the_true_velocity_and_mse_otherwise():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(4, 3, 8, 8, generator=g), torch.randn(4, 3, 8, 8, generator=g)
    t = torch.tensor([0.1, 0.4, 0.7, 0.95])
    caps = ["one red circle"] * 4
    assert flow_matching_loss(_Oracle(x0), x0, caps, t, eps).item() < 1e-10
    torch.testing.assert_close(flow_matching_loss(_Oracle(x0, exact=False), x0, caps, t, eps),
                               ((eps - x0) ** 2).mean())


def test_sample_t_is_logit_normal():
    t = sample_t(200_000, 0.5, 0.8, torch.Generator().manual_seed(0))
    z = torch.log(t / (1 - t))
    assert abs(z.mean().item() - 0.5) < 0.01 and abs(z.std().item() - 0.8) < 0.01
    assert 0 < t.min() and t.max() < 1


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
    assert torch.load(tmp_path / "b" / "ckpt.pt", weights_only=False)["step"] == 2
    b = pretrain(_tiny(tmp_path / "b"), progress=False)                      # resumes at step 2
    from safetensors.torch import load_file
    wa = load_file(str(a / "unet" / "diffusion_pytorch_model.safetensors"))
    wb = load_file(str(b / "unet" / "diffusion_pytorch_model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    log = (tmp_path / "b" / "log.csv").read_text().splitlines()
    assert log[0].startswith("step,") and [r.split(",")[0] for r in log[1:]] == ["1", "2", "3", "4"]
    # the pool is cached and reused
    assert len(list((tmp_path / "b").glob("pool_*.npz"))) == 1
