"""How noisy is one epoch's likelihood-free gradient, with per-sample and with group-shared (t, eps)?

One epoch of rollouts (the study's 128: 8 prompts x 16) from a cold start, their rewards and group
advantages fixed; then the full-epoch gradient of the AWM (or NFT) loss is computed R times, each time
with fresh draws of the noise levels t and the noise eps (``objective_passes`` keyed on a different
epoch), once drawing per sample and once per group (``group_shared_noise``). Printed per mode:

    cos = mean over pairs (a, b) of <g_a, g_b> / (|g_a| |g_b|)       (R (R - 1) / 2 pairs)
    SNR = |mean_r g_r|^2 / mean_r |g_r - mean g|^2 x R / (R - 1) - 1/R     (signal over noise per draw)

Two independent draws agree (cos near 1) only when the rollouts' signal dominates the (t, eps) noise; an
optimizer step on an estimate with cos near 0 is mostly a random direction. The rollouts, rewards and
advantages are the same for both modes, so the difference is the estimator's alone.

    OMP_NUM_THREADS=1 .venv/bin/python bench/awm_gradient_noise.py --cold-start runs/long/cold_start/lora \
        [--objective awm] [--repeats 6]
"""
from __future__ import annotations

import argparse
import itertools
import tempfile

import torch

PARAMS = "params/02_counting_grpo__strict_first_50.yaml"


def epoch_gradients(t, batches, advs, keeps, kept, repeats: int) -> torch.Tensor:
    """(R, D): the epoch's summed gradient (every batch, every pass) for R noise draws."""
    grads = []
    for r in range(repeats):
        t.opt.zero_grad(set_to_none=True)
        for b, adv, keep in zip(batches, advs, keeps):
            sel = keep.nonzero().squeeze(1)
            if len(sel) == 0:
                continue
            passes = t.objective_passes(1000 + r, b, sel)
            for spec in passes:
                loss, _ = t.objective_step(b.traj[sel], adv[sel], spec)
                (loss * len(sel) / float(kept.sum()) / len(passes)).backward()
        grads.append(torch.cat([q.grad.reshape(-1) for q in t.params_list if q.grad is not None]).clone())
    return torch.stack(grads)


def agreement(g: torch.Tensor) -> tuple[float, float]:
    R = g.shape[0]
    unit = g / g.norm(dim=1, keepdim=True)
    cos = sum(float(unit[a] @ unit[b]) for a, b in itertools.combinations(range(R), 2)) / (R * (R - 1) / 2)
    mean = g.mean(0)
    noise = float(((g - mean) ** 2).sum(1).mean()) * R / (R - 1)
    snr = float(mean @ mean) / noise - 1.0 / R
    return cos, snr


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cold-start", required=True)
    ap.add_argument("--objective", default="awm", choices=["awm", "nft"])
    ap.add_argument("--repeats", type=int, default=6)
    ap.add_argument("--train-timesteps", type=int, default=4)
    args = ap.parse_args()

    from grpo_lib.params import load_params
    from grpo_lib.train import GRPOParams, GRPOTrainer

    with tempfile.TemporaryDirectory() as d:
        results = {}
        for shared in (False, True):
            p = load_params(PARAMS, GRPOParams, run_dir=d + f"/{shared}", cold_start_lora=args.cold_start,
                            objective=args.objective, awm_weighting="uniform", reward={"counting_partial": 1.0},
                            group_size=16, num_processes=1, batches_per_epoch=4, eval_prompts="", progress=False,
                            train_timesteps=args.train_timesteps, group_shared_noise=shared)
            t = GRPOTrainer(p)
            batches = t.sample_epoch(0)                     # the same rollouts for both modes (seeded)
            advs, keeps, stats = t.advantages(batches)
            kept = stats.pop("kept_per_batch")
            g = epoch_gradients(t, batches, advs, keeps, kept, args.repeats)
            t.close()
            results[shared] = agreement(g) + (float(g.norm(dim=1).mean()),)
        print(f"{args.objective}, 128 rollouts (8 groups of 16), {args.train_timesteps} noise levels per sample, "
              f"{args.repeats} draws of (t, eps):")
        print(f"{'noise drawn':<14} {'mean cos':>9} {'SNR':>8} {'|g|':>10}")
        for shared, (cos, snr, norm) in results.items():
            print(f"{'per group' if shared else 'per sample':<14} {cos:9.3f} {snr:8.3f} {norm:10.2e}")


if __name__ == "__main__":
    main()
