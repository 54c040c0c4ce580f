"""Where a GRPO epoch's time goes, and what first_50 saves against all.

Prints, per timestep strategy, the wall time of an epoch and the share spent inside the model
(policy.velocity forward passes, sampling included, and the backward passes) versus everything else
(SDE step math, advantages, optimizer, reward waits, bookkeeping); then the epoch split into its
sampling phase (the full N-step rollout, the same for every strategy) and its training phase (what
the strategy selects), with the arithmetic bound for the training phase:

    train(first_50) / train(all) >= T(first_50) / T(all) = floor(N / 2) / (N - 1)   (5 / 9 at N = 10)

since ``all`` trains every step but the last (grpo.select_timesteps).

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/grpo_epoch.py [--epochs 3] [--threads 2]
"""
from __future__ import annotations

import argparse
import tempfile
import time

import torch

DEFAULT_PARAMS = "params/02_counting_grpo__strict_first_50.yaml"


def measure(strategy: str, epochs: int, base: str) -> dict:
    from grpo_lib.params import load_params
    from grpo_lib.train import GRPOParams, GRPOTrainer

    with tempfile.TemporaryDirectory() as d:
        # the make-run default (group 8, 128 rollouts per epoch, 10 steps), from the base, no evaluation
        p = load_params(DEFAULT_PARAMS, GRPOParams, run_dir=d, model=base, cold_start_lora="",
                        timestep_strategy=strategy, num_epochs=epochs, time_budget_minutes=0.0, eval_prompts="",
                        save_every=1000, eval_every=1000, progress=False)
        t = GRPOTrainer(p)
        inside = {"forward": 0.0, "backward": 0.0, "sampling_phase": 0.0}
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

        sample_epoch = t.sample_epoch

        def timed_sample_epoch(*a, **k):
            t0 = time.perf_counter()
            out = sample_epoch(*a, **k)
            inside["sampling_phase"] += time.perf_counter() - t0
            return out

        t.policy.velocity, t.acc.backward, t.sample_epoch = timed_velocity, timed_backward, timed_sample_epoch
        t0 = time.perf_counter()
        t.fit()
        wall = time.perf_counter() - t0
        t.close()
    model = inside["forward"] + inside["backward"]
    return {"strategy": strategy, "seconds_per_epoch": wall / epochs, "model_share": model / wall,
            "outside_share": 1 - model / wall, "training_phase": (wall - inside["sampling_phase"]) / epochs,
            **{k: v / epochs for k, v in inside.items()}}


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
    for r in rows:
        print(f"{r['strategy']:>9}: sampling phase {r['sampling_phase']:.2f} s/epoch, "
              f"training phase {r['training_phase']:.2f} s/epoch")
    print(f"first_50 / all epoch time: {rows[0]['seconds_per_epoch'] / rows[1]['seconds_per_epoch']:.3f}")
    print(f"first_50 / all training-phase time: {rows[0]['training_phase'] / rows[1]['training_phase']:.3f} "
          f"(arithmetic bound 5/9 = {5 / 9:.3f}: trained steps 5 of 10 against 9 of 10)")


if __name__ == "__main__":
    main()
