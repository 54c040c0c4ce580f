"""The GPU world's configuration: the SD3.5-M params file runs one tiny epoch on tiny random SD3
components, the COCO prompt sets are current, and the accelerate configs are well-formed."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from grpo_lib import coco_prompts
from grpo_lib.params import load_params
from grpo_lib.train import GRPOParams, run


pytestmark = pytest.mark.usefixtures("one_thread")   # 2 shared cores: see conftest


def green_reward(images, prompts, rows):
    """Stand-in for the reward server on COCO prompts: the green share of the image."""
    x = images.astype(np.float32) / 255.0
    r = (x[..., 1] - 0.5 * (x[..., 0] + x[..., 2])).mean(axis=(1, 2))
    return r.astype(np.float32), {"green": r}


def test_sd35m_params_run_one_tiny_epoch_on_tiny_sd3(repo, tiny_sd3_dir, tmp_path):
    from sd3_tiny import TINY_HEIGHT
    p = load_params(repo / "params" / "02_counting_grpo__sd35m_strict_first_50.yaml", GRPOParams,
                    run_dir=str(tmp_path / "run"), model=str(tiny_sd3_dir), resolution=TINY_HEIGHT,
                    reward_server_url="", lora_rank=4, lora_alpha=8, mixed_precision="no",
                    num_epochs=1, group_size=2, batch_size=4, batches_per_epoch=2, num_steps=4,
                    eval_num_steps=4, eval_max_prompts=4, eval_every=1, save_every=1, progress=False)
    # what stays as in the seed's config
    assert (p.world, p.guidance_scale, p.timestep_strategy, p.beta, p.lr, p.clip_range) == \
        ("sd3", 7.0, "first_50", 0.01, 3e-4, 1e-4)
    hist = run(p, reward_fn=green_reward)
    assert [h["epoch"] for h in hist] == [0, 1]
    assert hist[1]["ratio_min"] == pytest.approx(1.0, abs=1e-5)
    assert np.isfinite(hist[1]["loss"]) and hist[1]["grad_norm"] > 0
    ck = tmp_path / "run" / "checkpoints" / "epoch_0001"
    assert (ck / "lora").is_dir() and (ck / "trainer_state.pt").is_file()


@pytest.mark.parametrize("objective", ["nft", "awm", "dgpo"])
def test_sd35m_likelihood_free_params_run_one_tiny_epoch_on_tiny_sd3(repo, tiny_sd3_dir, tmp_path, objective):
    """Each successor's SD3.5-M params file trains the tiny SD3 components through the same trainer."""
    from sd3_tiny import TINY_HEIGHT
    p = load_params(repo / "params" / f"02_counting_grpo__sd35m_{objective}.yaml", GRPOParams,
                    run_dir=str(tmp_path / "run"), model=str(tiny_sd3_dir), resolution=TINY_HEIGHT,
                    reward_server_url="", lora_rank=4, lora_alpha=8, mixed_precision="no", num_epochs=1,
                    group_size=2, batch_size=4, batches_per_epoch=2, num_steps=4, train_timesteps=2,
                    eval_num_steps=4, eval_max_prompts=4, eval_every=1, save_every=1, progress=False)
    assert p.objective == objective
    hist = run(p, reward_fn=green_reward)
    assert [h["epoch"] for h in hist] == [0, 1]
    assert np.isfinite(hist[1]["loss"]) and hist[1]["grad_norm"] > 0
    assert (tmp_path / "run" / "checkpoints" / "epoch_0001" / "lora").is_dir()


def test_sd35m_batch_rules_are_the_seeds(repo):
    from grpo_lib.grpo import check_batch_arithmetic, gradient_accumulation_steps
    p = load_params(repo / "params" / "02_counting_grpo__sd35m_strict_first_50.yaml")
    a = check_batch_arithmetic(4, p.batch_size, p.group_size, batches_per_epoch=p.batches_per_epoch)
    assert a.groups_per_epoch == 48                       # 6 x 4 / 12 x 24
    assert gradient_accumulation_steps(p.batches_per_epoch) == 12 == p.batches_per_epoch // p.updates_per_epoch


def test_coco_prompt_sets_are_current_and_disjoint(repo):
    built = coco_prompts.build()
    for name, rows in built.items():
        shipped = [json.loads(l) for l in (repo / "data" / "counting_coco" / f"{name}.jsonl").read_text().splitlines()]
        assert shipped == rows, f"rerun python -m grpo_lib.coco_prompts data/counting_coco"
    assert len(coco_prompts.COCO_CLASSES) == 80
    train = {r["include"][0]["class"] for r in built["train"]}
    test = {r["include"][0]["class"] for r in built["test"]}
    assert not train & test
    assert coco_prompts.plural("person") == "people" and coco_prompts.plural("bus") == "buses"
    assert built["test"][1]["prompt"].startswith("a photo of two ")


@pytest.mark.parametrize("name", ["multi_gpu.yaml", "multi_node.yaml"])
def test_accelerate_configs_parse(repo, name):
    from accelerate.commands.config.config_args import load_config_from_file
    cfg = load_config_from_file(str(repo / "scripts" / "accelerate_configs" / name))
    assert cfg.distributed_type == "MULTI_GPU" and cfg.num_processes >= 2 and cfg.mixed_precision == "bf16"
