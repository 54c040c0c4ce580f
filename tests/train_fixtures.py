"""A small, fast GRPO setup for trainer tests: a random tiny policy with a LoRA and an analytic reward."""
from __future__ import annotations

import numpy as np
import torch


def brightness_reward(images, prompts, rows):
    """r = mean pixel value in [0, 1]: smooth, cheap, and any policy can move it."""
    r = images.astype(np.float32).mean(axis=(1, 2, 3)) / 255.0
    return r, {"brightness": r, "strict": (r > 0.5).astype(np.float32)}


def tiny_base(seed: int = 0):
    """A small random tiny policy without a LoRA."""
    from grpo_lib.policies.tiny import TinyConfig, TinyPolicy

    cfg = TinyConfig(block_out_channels=(16, 32, 32), norm_num_groups=8, text_dim=32, text_layers=1)
    return TinyPolicy(cfg, seed=seed)


def tiny_policy(seed: int = 0, rank: int = 4):
    policy = tiny_base(seed)
    torch.manual_seed(seed)
    policy.add_lora({"r": rank, "lora_alpha": rank})
    return policy


def small_params(run_dir, **overrides):
    from grpo_lib.train import GRPOParams

    kw = dict(run_dir=str(run_dir), num_epochs=2, group_size=4, batch_size=8, batches_per_epoch=2,
              updates_per_epoch=1, num_steps=4, eval_num_steps=4, eval_max_prompts=8, eval_every=1,
              save_every=1, lr=1e-2, beta=0.01, clip_range=1e-3, progress=False)
    kw.update(overrides)
    return GRPOParams(**kw)


def odd_count_reward(images, prompts, rows):
    """Brightness for rows asking for an odd count, 0 for even counts: every even-count group has zero spread
    (dynamic sampling must refill) and strict accuracy differs by count (the curriculum's weights move).
    strict = odd count and brightness > 0.49 (the tiny random policy's images sit at 0.48-0.50)."""
    from grpo_lib.curriculum import row_count

    b = images.astype(np.float32).mean(axis=(1, 2, 3)) / 255.0
    odd = np.array([row_count(r) % 2 == 1 for r in rows])
    return np.where(odd, b, 0.0).astype(np.float32), {"brightness": b, "strict": (odd & (b > 0.49)).astype(np.float32)}


def check_head_only_epoch(trainer, run_dir, *, ratio_tol: float) -> dict:
    """Fit ``trainer`` (a Show-o2 policy, head-only training) for its one epoch and check what the write-up
    asks of it: only diffusion-head weights change, the KL reference is the frozen initial head, the first
    update is on-policy (ratio 1 within ``ratio_tol``), and the checkpoint is written. Returns the last row."""
    import math

    import pytest
    import torch

    policy = trainer.policy
    before = {n: q.detach().clone() for n, q in policy.model.named_parameters()}
    try:
        hist = trainer.fit()
        after = {n: q.detach().clone() for n, q in policy.model.named_parameters()}
        changed = {n for n in before if not torch.equal(before[n], after[n])}
        assert changed and changed <= set(policy.trainable_names)
        assert len(changed) >= len(policy.trainable_names) // 2
        assert all(torch.equal(before[n], after[n]) for n in before if "diffusion" not in n)
        # the KL reference is the frozen initial head, both the trainer's and the policy's own
        for ref in (trainer.reference, policy.reference):
            with ref():
                assert all(torch.equal(q, before[n]) for n, q in policy.model.named_parameters())
            assert all(torch.equal(q, after[n]) for n, q in policy.model.named_parameters())
    finally:
        trainer.close()
    row = hist[-1]
    assert row["epoch"] == 1
    assert row["ratio_min"] == pytest.approx(1.0, abs=ratio_tol) and row["ratio_max"] == pytest.approx(1.0, abs=ratio_tol)
    assert math.isfinite(row["loss"]) and math.isfinite(row["eval_reward"])
    assert (run_dir / "checkpoints" / "latest").read_text() == "epoch_0001"
    return row
