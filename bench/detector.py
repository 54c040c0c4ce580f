"""Benchmark of the embedded world's counting detector (grpo_lib.rewards.detector.ShapeCounter).

Prints the three figures issue 3 asks for, on a balanced grid (every one of the 18 classes x every
count 1..20 x ``--per-cell`` scenes; seeds from 1,000,000 on, disjoint from the calibration seeds
the split thresholds were read off):

1. exact-count accuracy on clean renders (target >= 99.5 %);
2. exact-count accuracy on renders degraded like generated images (grpo_lib.rewards.degrade: touching
   pairs + blur sigma 0.5-0.8 + noise std 2-6 + colour shift +-15; target >= 97 %), with a
   per-condition breakdown (each degradation alone) and a half-drawn-object condition scored
   against the documented rule (counted iff soft area > 40 % of the smallest renderable area);
3. throughput in images/s at 32x32, batch 64 (target >= 500).

    python bench/detector.py [--per-cell 10] [--threads 1]
"""
from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from grpo_lib.rewards.degrade import degrade  # noqa: E402
from grpo_lib.rewards.detector import ShapeCounter, area_reference  # noqa: E402
from grpo_lib.scenes import BACKGROUND, MAX_COUNT, all_classes  # noqa: E402

OFF = dict(touching_pairs=0, color_shift=0.0, blur_sigma=(0.0, 0.0), noise_std=(0.0, 0.0))
CONDITIONS = {
    "clean": OFF,
    "degraded (all)": {},
    "touching pairs only": dict(OFF, touching_pairs=None),
    "blur 0.5-0.8 only": dict(OFF, blur_sigma=(0.5, 0.8)),
    "noise 2-6 only": dict(OFF, noise_std=(2.0, 6.0)),
    "colour shift 15 only": dict(OFF, color_shift=15.0),
}


def grid(per_cell: int, seed0: int):
    """(class, count, seed) for every class x count 1..20 x per_cell."""
    cells = []
    for ci, cls in enumerate(all_classes()):
        for n in range(1, MAX_COUNT + 1):
            for k in range(per_cell):
                cells.append((cls, n, seed0 + (ci * 100 + n) * 1000 + k))
    return cells


def render(cells, kwargs):
    out = []
    for cls, n, seed in cells:
        color, shape = cls.split()
        kw = dict(kwargs)
        if "touching_pairs" in kw and kw["touching_pairs"] is None:
            kw.pop("touching_pairs")
        out.append(degrade(n, shape, color, seed=seed, **kw).image)
    return np.stack(out)


def count_all(det, images, cells, batch=64):
    found = []
    for i in range(0, len(images), batch):
        part = cells[i:i + batch]
        found.append(det.count(images[i:i + batch], [c for c, _, _ in part], [n for _, n, _ in part]))
    return np.concatenate(found)


def half_drawn(cells, det):
    """Cut one object of each clean scene in half (left/right/top/bottom of its box); expected count by
    the rule: N - 1 + [remaining object area > 0.4 A_ref]."""
    ok = 0
    for i, (cls, n, seed) in enumerate(cells):
        color, shape = cls.split()
        s = degrade(n, shape, color, seed=seed, **OFF)
        img = s.image.copy()
        m = s.masks[0].copy()
        ys, xs = np.nonzero(m)
        cut = np.zeros_like(m)
        side = i % 4
        if side == 0:
            cut[:, (xs.min() + xs.max() + 1) // 2:] = True
        elif side == 1:
            cut[:, :(xs.min() + xs.max() + 1) // 2] = True
        elif side == 2:
            cut[(ys.min() + ys.max() + 1) // 2:, :] = True
        else:
            cut[:(ys.min() + ys.max() + 1) // 2, :] = True
        img[m & cut] = BACKGROUND
        left = int((m & ~cut).sum())
        expected = n - 1 + int(left > 0.4 * area_reference(shape, n)[0])
        ok += int(det.count(img[None], [cls], [n])[0] == expected)
    return ok / len(cells)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per-cell", type=int, default=10, help="scenes per (class, count) cell")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (unused by numpy; kept for parity)")
    ap.add_argument("--seed0", type=int, default=1_000_000)
    args = ap.parse_args(argv)
    det = ShapeCounter()
    cells = grid(args.per_cell, args.seed0)
    print(f"grid: {len(all_classes())} classes x counts 1..{MAX_COUNT} x {args.per_cell} = {len(cells)} scenes "
          "per condition (32x32)", flush=True)
    sub = grid(max(1, args.per_cell // 3), args.seed0 + 7)
    images = {}
    for name, kw in CONDITIONS.items():
        cs = cells if name in ("clean", "degraded (all)") else sub
        t0 = time.perf_counter()
        X = render(cs, kw)
        t_render = time.perf_counter() - t0
        found = count_all(det, X, cs)
        N = np.array([n for _, n, _ in cs])
        acc = (found == N).mean()
        by_range = {r: (found[(N >= r[0]) & (N <= r[1])] == N[(N >= r[0]) & (N <= r[1])]).mean()
                    for r in ((1, 10), (11, 20))}
        by_shape = defaultdict(list)
        for (c, _, _), f, n in zip(cs, found, N):
            by_shape[c.split()[1]].append(f == n)
        err = found - N
        print(f"{name:22s} exact {acc:.4f} ({int((err == 0).sum())}/{len(cs)})  counts 1-10 {by_range[(1, 10)]:.4f}"
              f"  11-20 {by_range[(11, 20)]:.4f}  | " + "  ".join(f"{k} {np.mean(v):.4f}" for k, v in by_shape.items())
              + f"  | over {np.mean(err > 0):.4f} under {np.mean(err < 0):.4f}  (render {t_render:.0f} s)", flush=True)
        if name in ("clean", "degraded (all)"):
            images[name] = (X, cs)
    print(f"{'half-drawn object':22s} exact by the 40 % rule {half_drawn(sub, det):.4f} ({len(sub)} scenes)")
    # throughput: detection only (images pre-rendered), batches of 64, best of 3 passes
    for name, (X, cs) in images.items():
        best = 0.0
        for _ in range(3):
            t0 = time.perf_counter()
            count_all(det, X, cs, batch=64)
            best = max(best, len(X) / (time.perf_counter() - t0))
        print(f"throughput {name:16s} {best:7.0f} images/s (32x32, batch 64, 1 process)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
