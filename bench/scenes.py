"""Renderer throughput: scenes per second at 32x32 on one core, by count range.

    .venv/bin/python bench/scenes.py [--n 2000]
"""
from __future__ import annotations

import argparse
import time

from grpo_lib.scenes import COLORS, SHAPES, render_scene


def rate(lo: int, hi: int, n: int) -> float:
    colors = list(COLORS)
    t0 = time.perf_counter()
    for i in range(n):
        render_scene(lo + i % (hi - lo + 1), SHAPES[i % 3], colors[i % 6], seed=i)
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000)
    args = ap.parse_args()
    for lo, hi in ((1, 10), (11, 15), (16, 20)):
        print(f"counts {lo:>2}-{hi:<2}: {rate(lo, hi, args.n if hi <= 10 else args.n // 4):,.0f} scenes/s")


if __name__ == "__main__":
    main()
