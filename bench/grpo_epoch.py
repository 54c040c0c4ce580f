"""Where a GRPO epoch's time goes, and what first_50 saves against all.

Prints, per timestep strategy, the wall time of an epoch and the share spent inside the model
(policy.velocity forward passes, sampling included, and the backward passes) versus everything else
(SDE step math, advantages, optimizer, reward waits, bookkeeping).

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/grpo_epoch.py [--epochs 3] [--threads 2]
"""
from __future__ import annotations

import argparse
import tempfile
import time

import torch


def measure(strategy: str, epochs: int, base: str) -> dict:
    from grpo_lib.train import GRPOParams, GRPOTrainer

    with tempfile.TemporaryDirectory() as d:
        p = GRPOParams(run_dir=d, model=base, timestep_strategy=strategy, num_epochs=epochs, group_size=8,
                       batch_size=32, batches_per_epoch=2, updates_per_epoch=2, num_steps=10,
                       eval_prompts="", save_every=1000, eval_every=1000, progress=False)
        t = GRPOTrainer(p)
        inside = {"forward": 0.0, "backward": 0.0}
        velocity, backward = t.policy.velocity, t.acc.backward

        def timed_velocity(*a, **k):
            t0 = time.perf_counter()
            out = velocity(*a, **k)
            inside["forward"] += time.perf_counter() - t0
            return out

        def timed_backward(*a, **k):
            t0 = time.perf_counter()
            out = backward(*a, **k)
            inside["backward"] += time.perf_counter() - t0
            return out

        t.policy.velocity, t.acc.backward = timed_velocity, timed_backward
        t0 = time.perf_counter()
        t.fit()
        wall = time.perf_counter() - t0
        t.close()
    model = inside["forward"] + inside["backward"]
    return {"strategy": strategy, "seconds_per_epoch": wall / epochs, "model_share": model / wall,
            "outside_share": 1 - model / wall, **{k: v / epochs for k, v in inside.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--base", default="data/checkpoints/tiny-base")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = [measure(s, args.epochs, args.base) for s in ("first_50", "all")]
    for r in rows:
        print(f"{r['strategy']:>9}: {r['seconds_per_epoch']:.2f} s/epoch; inside the model "
              f"{100 * r['model_share']:.1f} % (forward {r['forward']:.2f} s, backward {r['backward']:.2f} s); "
              f"outside {100 * r['outside_share']:.1f} %")
    print(f"first_50 / all epoch time: {rows[0]['seconds_per_epoch'] / rows[1]['seconds_per_epoch']:.3f}")


if __name__ == "__main__":
    main()
