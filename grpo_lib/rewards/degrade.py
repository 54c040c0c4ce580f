"""Scenes degraded like a generative model's samples, to test the counting detector honestly.

A trained flow model does not draw the renderer's crisp scenes: edges are soft, pixels carry noise,
colours drift, and objects are often drawn touching each other. :func:`degrade` renders a scene of
the embedded world (same geometry and colours as :func:`grpo_lib.scenes.render_scene`) and applies,
in this order:

| step            | what                                                                         | default         |
|-----------------|------------------------------------------------------------------------------|-----------------|
| touching pairs  | move ``touching_pairs`` objects onto a neighbour until their masks share an    | 1 if N >= 2     |
|                 | edge (4-adjacent), half of them pushed 0.3 px further (slight overlap)        |                 |
| colour shift    | one offset per channel for the whole image, uniform in +-``color_shift``      | 15 (0-255 units)|
| blur            | Gaussian blur of each channel with sigma uniform in ``blur_sigma``            | (0.5, 0.8) px   |
| noise           | i.i.d. Gaussian pixel noise with std uniform in ``noise_std``                 | (2, 6)          |

The ground truth stays N: touching objects are still two objects to a person looking at the image.
Geometry comes from the renderer's own private helpers (``scenes._place``, ``scenes._shape_mask``)
so the shapes are exactly the world's; if the lead changes them, ``tests/test_detector.py`` notices.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from grpo_lib import scenes
from grpo_lib.scenes import BACKGROUND, COLORS, MIN_GAP, RADIUS_RANGE, Scene

@dataclass(frozen=True)
class DegradedScene(Scene):
    masks: np.ndarray = None          # bool (N, H, W): each object's pixels before blur and noise
    touching: int = 0                 # number of touching pairs actually made


_FOUR = ndimage.generate_binary_structure(2, 1)     # 4-connectivity: "share an edge"


def _placements(count: int, shape: str, size: int, rng: np.random.Generator,
                max_tries: int = 200) -> list[tuple[float, float, float]]:
    """(cx, cy, r) per object, with the renderer's placement and shrink-on-failure rule."""
    scale = size / 32.0
    lo, hi = RADIUS_RANGE[0] * scale, RADIUS_RANGE[1] * scale
    attempt = 0
    while True:
        centres = scenes._place(count, shape, lo, hi, MIN_GAP * scale, size, rng, max_tries)
        if len(centres) == count:
            return [tuple(map(float, c)) for c in centres]
        attempt += 1
        if attempt % 4 == 0:
            lo, hi = lo * 0.9, hi * 0.9


def _mask(shape: str, cx: float, cy: float, r: float, size: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5          # pixel centres, (H, W)
    return scenes._shape_mask(shape, cx, cy, r, yy, xx)


def _touch(objs: list[list[float]], masks: list[np.ndarray], i: int, j: int, shape: str, size: int,
           overlap: float) -> bool:
    """Slide object j toward object i until their masks share an edge (then ``overlap`` px more).

    Keeps j inside the image and away from every third object (not even 8-adjacent), so exactly
    one merged pair is made. Updates ``objs[j]``/``masks[j]`` in place; returns False (and leaves
    them unchanged) when no such move exists.
    """
    (xi, yi, _), (xj, yj, rj) = objs[i], objs[j]
    d = math.hypot(xj - xi, yj - yi)
    if d == 0:
        return False
    ux, uy = (xi - xj) / d, (yi - yj) / d                                   # unit step j -> i
    grown_i = ndimage.binary_dilation(masks[i], _FOUR)
    others = np.zeros((size, size), bool)
    for k, m in enumerate(masks):
        if k not in (i, j):
            others |= m
    others = ndimage.binary_dilation(others, np.ones((3, 3), bool))        # no contact with a third
    step = 0.1
    for n in range(1, int(d / step)):
        cx, cy = xj + ux * n * step, yj + uy * n * step
        m = _mask(shape, cx, cy, rj, size)
        if (m & masks[i]).any():                                           # overlapped before touching
            return False
        if (m & grown_i).any():
            cx, cy = cx + ux * overlap, cy + uy * overlap
            m = _mask(shape, cx, cy, rj, size)
            e = scenes._extent(shape, rj)
            if (m & others).any() or not (e <= cx <= size - e and e <= cy <= size - e):
                return False
            objs[j] = [cx, cy, rj]
            masks[j] = m
            return True
    return False


def degrade(count: int, shape: str, color: str, *, seed: int, size: int = 32,
            touching_pairs: int | None = None, color_shift: float = 15.0,
            blur_sigma: tuple[float, float] = (0.5, 0.8), noise_std: tuple[float, float] = (2.0, 6.0),
            color_jitter: int = scenes.COLOR_JITTER) -> DegradedScene:
    """Render ``count`` ``color`` ``shape`` objects degraded like a generated image (module docstring).

    Returns a :class:`DegradedScene` (a :class:`grpo_lib.scenes.Scene` plus the objects' masks) whose
    ``count`` is the true number of objects and whose ``boxes`` are the objects' final boxes. ``touching_pairs=None`` means 1 pair when count >= 2 and
    2 pairs when count >= 8; pairs that cannot be made without touching a third object are skipped
    (rare; the scene then has fewer touching pairs, never a wrong count). Deterministic in ``seed``.
    """
    scenes.check_scene_args(count, shape, color)
    for name, (lo, hi) in (("blur_sigma", blur_sigma), ("noise_std", noise_std)):
        if not 0 <= lo <= hi:
            raise ValueError(f"{name}={(lo, hi)} must be a (low, high) range with 0 <= low <= high")
    rng = np.random.default_rng(seed)
    objs = [list(o) for o in _placements(count, shape, size, rng)]
    masks = [_mask(shape, cx, cy, r, size) for cx, cy, r in objs]
    if touching_pairs is None:
        touching_pairs = 0 if count < 2 else (1 if count < 8 else 2)
    used: set[int] = set()
    made = 0
    for _ in range(touching_pairs):
        free = [k for k in range(count) if k not in used]
        rng.shuffle(free)
        for i in free:
            # nearest free neighbour of i: the shortest move, least likely to hit a third object
            cand = sorted((math.hypot(objs[k][0] - objs[i][0], objs[k][1] - objs[i][1]), k)
                          for k in free if k != i)
            if cand and _touch(objs, masks, i, cand[0][1], shape, size,
                               overlap=0.3 if rng.random() < 0.5 else 0.0):
                used.update((i, cand[0][1]))
                made += 1
                break
    img = np.empty((size, size, 3), np.float32)
    img[:] = BACKGROUND
    base = np.asarray(COLORS[color], np.float32)
    boxes = np.zeros((count, 4), np.float32)
    for k, m in enumerate(masks):
        jitter = rng.integers(-color_jitter, color_jitter + 1, size=3) if color_jitter else 0
        img[m] = np.clip(base + jitter, 0, 255)
        ys, xs = np.nonzero(m)
        boxes[k] = (xs.min(), ys.min(), xs.max(), ys.max())
    img += rng.uniform(-color_shift, color_shift, size=3).astype(np.float32)   # (3,) global drift
    sigma = float(rng.uniform(*blur_sigma))
    if sigma > 0:
        img = ndimage.gaussian_filter(img, sigma=(sigma, sigma, 0), mode="nearest")
    img += rng.normal(0.0, float(rng.uniform(*noise_std)), size=img.shape).astype(np.float32)
    image = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    return DegradedScene(image=image, boxes=boxes, count=int(count), cls=f"{color} {shape}",
                         masks=np.stack(masks) if masks else np.zeros((0, size, size), bool), touching=made)
