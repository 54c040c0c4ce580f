"""Cost of grpo_lib.sde.sde_step_with_logprob relative to a bare Euler update, in the same run.

    .venv/bin/python bench/sde_step.py [--shape 64 16 64 64] [--repeats 15] [--threads 1]

Prints the median wall time of each variant and its ratio to the bare Euler update x + dt * v on the
same float32 tensors. The step does strictly more work (noise draw, mean, Gaussian log-density and a
mean-reduction), so the ratio says how much of a rollout's non-network time the step adds.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from grpo_lib.sde import sde_step_with_logprob


def median_time(fn, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", type=int, nargs="+", default=[64, 16, 64, 64])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*args.shape, generator=g)
    v = torch.randn(*args.shape, generator=g)
    t, t_next = 0.7904, 0.7073          # an SD3.5 10-step schedule step (shift 3)
    dt = t_next - t
    gen = torch.Generator().manual_seed(1)
    prev = x + dt * v

    variants = {
        "bare Euler x + dt*v": lambda: x + dt * v,
        "sde step, noise_level=0 (ODE)": lambda: sde_step_with_logprob(v, t, t_next, x, noise_level=0.0),
        "sde step, sample (a=0.7)": lambda: sde_step_with_logprob(v, t, t_next, x, noise_level=0.7, generator=gen),
        "sde step, score given x'": lambda: sde_step_with_logprob(v, t, t_next, x, noise_level=0.7, prev_sample=prev),
        "cps step, sample (a=0.7)": lambda: sde_step_with_logprob(v, t, t_next, x, noise_level=0.7, generator=gen,
                                                                   sde_type="cps"),
        "randn alone (noise draw)": lambda: torch.randn(*args.shape, generator=gen),
    }
    with torch.no_grad():
        times = {name: median_time(fn, args.repeats) for name, fn in variants.items()}
    base = times["bare Euler x + dt*v"]
    print(f"shape {tuple(args.shape)} float32, {torch.get_num_threads()} thread(s), median of {args.repeats}:")
    for name, sec in times.items():
        print(f"  {name:<32} {sec * 1e3:8.1f} ms   {sec / base:5.1f}x Euler")


if __name__ == "__main__":
    main()
