"""Measure a tiny base checkpoint for its model card: exact-count accuracy per count and object quality.

Sampling is the deterministic Euler ODE of ``sde.sde_step_with_logprob`` (noise_level = 0) on the SD3
schedule ``sd3_sigmas(steps, shift)``, with classifier-free guidance v = v_u + g (v_c - v_u):

    x_{i+1} = x_i + (sigma_{i+1} - sigma_i) v_theta(x_i, sigma_i | c),    x_0 ~ N(0, I),  sigma_0 = 1

| code               | meaning                                                                       |
|--------------------|-------------------------------------------------------------------------------|
| ``steps``          | N Euler steps (20 for the card)                                               |
| ``guidance_scale`` | g, CFG scale                                                                  |
| ``shift``          | the SD3 schedule shift                                                         |
| figures            | ``shape_counter``: the reward's detector (the card's numbers); ``quick``: plain |
|                    | connected components of non-background pixels (``quick_detect``), a cross-check |

Figures: per-count exact accuracy (found == asked), the fraction of detected objects that are
well-formed (area and fill checks), the fraction of images whose background is clean, and the
fraction of images whose objects have the asked colour.

    python -m grpo_lib.base_card data/checkpoints/tiny-base --prompts data/counting/train.jsonl --n 4
"""
from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from . import scenes
from .sde import draw_noise
from .prompts import load_rows, row_target
from .sde import sd3_sigmas, sde_step_with_logprob

FG_THRESHOLD = 40      # max |pixel - background| over channels (0-255) above which a pixel is foreground
MIN_AREA = 4           # components smaller than this are speckle, not objects
AREA_RANGE = (5, 60)   # rendered objects at 32x32 cover 6-41 px (dense scenes shrink triangles to 6)
MIN_FILL = 0.4         # area / bounding-box area (a triangle is ~0.5, a disc ~0.78, a square 1)
MAX_STRAY = 3          # stray foreground pixels (outside objects) an image may have and still be "clean"


@torch.no_grad()
def sample_images(policy, prompts: Sequence[str], *, steps: int = 20, guidance_scale: float = 3.0,
                  shift: float = 1.0, seed: int = 0, batch_size: int = 64) -> np.ndarray:
    """ODE (Euler) samples for ``prompts``: uint8 (len(prompts), H, W, 3). Works in either convention."""
    sig = sd3_sigmas(steps, shift)                                   # (steps+1,) 1 -> 0
    times = sig if policy.convention == "noise_at_one" else 1.0 - sig
    gen = torch.Generator().manual_seed(seed)
    out = []
    for s in range(0, len(prompts), batch_size):
        chunk = list(prompts[s:s + batch_size])
        cond = policy.encode(chunk)
        x = draw_noise((len(chunk), *policy.latent_shape), gen, policy.device)   # (B, C, H, W)
        for i in range(steps):
            v = policy.velocity(x, float(times[i]), cond, guidance_scale)
            x, _, _, _ = sde_step_with_logprob(v, float(times[i]), float(times[i + 1]), x, noise_level=0.0,
                                               convention=policy.convention)
        out.append(policy.decode(x))
    return np.concatenate(out)


def quick_detect(image: np.ndarray) -> dict:
    """Connected components of pixels far from the background grey (4-connectivity).

    Returns ``count`` (components with area >= MIN_AREA), ``well_formed`` (of those, how many pass the
    area and fill checks), ``stray`` (foreground pixels in components smaller than MIN_AREA) and
    ``colors`` (mean RGB of each counted component).
    """
    from scipy import ndimage

    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be uint8 (H, W, 3), got {image.dtype} {image.shape}")
    diff = np.abs(image.astype(np.int16) - np.asarray(scenes.BACKGROUND, np.int16)).max(-1)   # (H, W)
    labels, n = ndimage.label(diff > FG_THRESHOLD)
    count = well = stray = 0
    colors = []
    for k, sl in enumerate(ndimage.find_objects(labels), start=1):
        comp = labels[sl] == k
        area = int(comp.sum())
        if area < MIN_AREA:
            stray += area
            continue
        count += 1
        fill = area / comp.size
        well += int(AREA_RANGE[0] <= area <= AREA_RANGE[1] and fill >= MIN_FILL)
        colors.append(image[sl][comp].mean(0))
    return {"count": count, "well_formed": well, "stray": stray, "colors": colors}


def _nearest_color(rgb) -> str:
    names = list(scenes.COLORS)
    d = [np.sum((np.asarray(scenes.COLORS[c], float) - rgb) ** 2) for c in names]
    return names[int(np.argmin(d))]


def quick_figures(images: np.ndarray, rows: Sequence[dict]) -> dict:
    """Per-image detections -> card figures (see module docstring)."""
    per_count = defaultdict(lambda: [0, 0])
    n_obj = n_well = n_clean = n_color = 0
    found = []
    for img, row in zip(images, rows):
        cls, count = row_target(row)
        d = quick_detect(img)
        found.append(d["count"])
        per_count[count][0] += int(d["count"] == count)
        per_count[count][1] += 1
        n_obj += d["count"]
        n_well += d["well_formed"]
        n_clean += int(d["stray"] <= MAX_STRAY)
        want = cls.split()[0]
        n_color += int(bool(d["colors"]) and all(_nearest_color(c) == want for c in d["colors"]))
    acc = {int(k): {"accuracy": round(v[0] / v[1], 4), "n": v[1]} for k, v in sorted(per_count.items())}

    def pooled(ks):
        c = sum(per_count[k][0] for k in ks if k in per_count)
        n = sum(per_count[k][1] for k in ks if k in per_count)
        return round(c / n, 4) if n else None

    return {"per_count": acc, "acc_1_3": pooled(range(1, 4)), "acc_4_10": pooled(range(4, 11)),
            "acc_all": pooled(per_count), "well_formed_objects": round(n_well / max(n_obj, 1), 4),
            "objects": n_obj, "clean_background": round(n_clean / len(images), 4),
            "right_color": round(n_color / len(images), 4), "images": len(images), "found": found}


# ShapeCounter's own quality measures (the shaped reward's gate uses the same two): an object is
# well-formed when both are past their midpoint. On renders of the train prompts this passes 99 %
# of objects (circles 96.8 %: the moment-based shape model is strictest on small discs).
AREA_QUALITY_MIN = 0.5     # detector.area_quality: 1 inside the renderer's size range, 0 for specks / merged blobs
SHAPE_MATCH_MIN = 0.5      # Detections.shape_match: probability of the requested shape
CLEAN_FIDELITY = 0.98      # ShapeCounter: share of pixels that are background / class colour / blend


def shape_counter_figures(images: np.ndarray, rows: Sequence[dict]) -> dict:
    """Card figures from the reward's detector ``ShapeCounter`` (GenEval rule: score > 0.9 counts).

    A counted object is *well-formed* if ``area_quality > AREA_QUALITY_MIN`` (its soft area is in the
    renderer's size range for that shape and count: no speck, no merged blob) and
    ``shape_match > SHAPE_MATCH_MIN`` (it is most likely the requested shape). An image's background is *clean* if ``background_fidelity >= CLEAN_FIDELITY``.
    """
    from .rewards.detector import ShapeCounter, area_quality

    targets = [row_target(r) for r in rows]
    classes, counts = [c for c, _ in targets], [n for _, n in targets]
    dets = ShapeCounter().detect(images, classes, counts)
    per_count = defaultdict(lambda: [0, 0])
    n_obj = n_well = n_clean = 0
    for d, (cls, n) in zip(dets, targets):
        per_count[n][0] += int(d.count == n)
        per_count[n][1] += 1
        keep = d.kept
        aq = area_quality(d.areas[keep], cls.split()[1], n)
        ok = (aq > AREA_QUALITY_MIN) & (d.shape_match[keep] > SHAPE_MATCH_MIN)
        n_obj += int(keep.sum())
        n_well += int(ok.sum())
        n_clean += int(d.background_fidelity >= CLEAN_FIDELITY)

    def pooled(ks):
        c = sum(per_count[k][0] for k in ks if k in per_count)
        m = sum(per_count[k][1] for k in ks if k in per_count)
        return round(c / m, 4) if m else None

    return {"per_count": {int(k): {"accuracy": round(v[0] / v[1], 4), "n": v[1]} for k, v in sorted(per_count.items())},
            "acc_1_3": pooled(range(1, 4)), "acc_4_10": pooled(range(4, 11)), "acc_all": pooled(per_count),
            "well_formed_objects": round(n_well / max(n_obj, 1), 4), "objects": n_obj,
            "clean_background": round(n_clean / len(images), 4), "images": len(images),
            "found": [d.count for d in dets]}


def save_grid(images: np.ndarray, path: str | Path, ncol: int = 16, scale: int = 3) -> Path:
    """Tile uint8 (B, H, W, 3) images into one PNG (nearest-neighbour upscaled by ``scale``)."""
    from PIL import Image

    B, H, W, _ = images.shape
    nrow = -(-B // ncol)
    grid = np.full((nrow * (H + 2), ncol * (W + 2), 3), 255, np.uint8)
    for i, im in enumerate(images):
        r, c = divmod(i, ncol)
        grid[r * (H + 2):r * (H + 2) + H, c * (W + 2):c * (W + 2) + W] = im
    img = Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return Path(path)


def evaluate_base(model_dir: str | Path, prompts_path: str | Path = "data/counting/train.jsonl", *,
                  n_per_prompt: int = 4, steps: int = 20, guidance_scale: float = 3.0, shift: float = 1.0,
                  seed: int = 0, out_dir: str | Path | None = None, limit: int | None = None,
                  batch_size: int = 64) -> dict:
    """Sample ``n_per_prompt`` images per row of ``prompts_path`` and compute the card figures."""
    from .policies.tiny import TinyPolicy

    policy = TinyPolicy.from_pretrained(model_dir)
    rows = load_rows(prompts_path)
    if limit:
        rng = np.random.default_rng(seed)
        rows = [rows[i] for i in sorted(rng.choice(len(rows), size=min(limit, len(rows)), replace=False))]
    rows = [r for r in rows for _ in range(n_per_prompt)]
    t0 = time.time()
    images = sample_images(policy, [r["prompt"] for r in rows], steps=steps, guidance_scale=guidance_scale,
                           shift=shift, seed=seed, batch_size=batch_size)
    figs = {"shape_counter": shape_counter_figures(images, rows), "quick": quick_figures(images, rows)}
    figs.update({"model": str(model_dir), "prompts": str(prompts_path), "n_per_prompt": n_per_prompt,
                 "steps": steps, "guidance_scale": guidance_scale, "shift": shift, "seed": seed,
                 "sampling_seconds": round(time.time() - t0, 1)})
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        # grid ordered by asked count (row k = count k) so merging / speckle is easy to spot
        order = np.argsort([row_target(r)[1] for r in rows], kind="stable")
        pick = np.concatenate([order[np.array([row_target(rows[i])[1] for i in order]) == k][:16]
                               for k in range(1, 11)])
        save_grid(images[pick], out / "grid_by_count.png")
        np.savez_compressed(out / "samples.npz", images=images, prompts=np.array([r["prompt"] for r in rows]),
                            counts=np.array([row_target(r)[1] for r in rows]))
        (out / "figures.json").write_text(json.dumps(_public(figs), indent=1))
        (out / "table.md").write_text(markdown_table(figs) + "\n")
    return figs


def markdown_table(figs: dict) -> str:
    """The card's per-count table (ShapeCounter and quick detector side by side) as Markdown."""
    sc, q = figs["shape_counter"], figs["quick"]
    lines = ["| asked count | images | exact acc (ShapeCounter) | exact acc (quick CC) |", "|---|---|---|---|"]
    for k, v in sc["per_count"].items():
        lines.append(f"| {k} | {v['n']} | {v['accuracy']:.3f} | {q['per_count'][k]['accuracy']:.3f} |")
    for name, key in (("counts 1-3", "acc_1_3"), ("counts 4-10", "acc_4_10"), ("all", "acc_all")):
        lines.append(f"| **{name}** | | **{sc[key]:.3f}** | {q[key]:.3f} |")
    lines += ["", "| quality | ShapeCounter | quick CC |", "|---|---|---|",
              f"| well-formed objects | {sc['well_formed_objects']:.3f} (of {sc['objects']}) | "
              f"{q['well_formed_objects']:.3f} (of {q['objects']}) |",
              f"| clean background (images) | {sc['clean_background']:.3f} | {q['clean_background']:.3f} |",
              f"| objects of the asked colour (images) | | {q['right_color']:.3f} |"]
    return "\n".join(lines)


def _public(figs: dict) -> dict:
    """Figures without the per-image lists (for JSON / printing)."""
    return {k: (_public(v) if isinstance(v, dict) else v) for k, v in figs.items() if k != "found"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Card figures of a tiny base checkpoint")
    ap.add_argument("model_dir")
    ap.add_argument("--prompts", default="data/counting/train.jsonl")
    ap.add_argument("--n", type=int, default=4, help="images per prompt")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--cfg", type=float, default=3.0)
    ap.add_argument("--shift", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--limit", type=int, default=None, help="random subset of prompts (quick checks)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    figs = evaluate_base(args.model_dir, args.prompts, n_per_prompt=args.n, steps=args.steps,
                         guidance_scale=args.cfg, shift=args.shift, seed=args.seed, out_dir=args.out,
                         limit=args.limit)
    print(json.dumps(_public(figs), indent=1))
    print(markdown_table(figs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
