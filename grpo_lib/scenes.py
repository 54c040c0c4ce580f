"""The embedded counting world's renderer: procedurally drawn scenes and the datasets built from them.

A scene is N non-overlapping objects of one class on a plain grey background; a class is a
(colour, shape) pair such as "red circle" (the words, colours and prompt rows are ``grpo_lib.prompts``).
Everything is deterministic given a seed, so a counting claim can be measured exactly: the renderer is
both the training data and the ground truth the detector is checked against.

| name                 | meaning                                                               |
|----------------------|-----------------------------------------------------------------------|
| ``BACKGROUND``       | the plain background colour (the reward's quality gate checks it)     |
| ``RADIUS_RANGE``     | object "radius" in px at 32x32 (circumradius-like size of each shape) |
| ``render_scene``     | one scene of N objects (image, boxes)                                  |
| ``render_rows``      | the ground-truth scene of each prompt row                              |
| ``ExactCountDataset``, ``WebCaptionDataset`` | cold-start data (exact counts), pretraining data (web captions) |
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

# the world's words (re-exported: the renderer draws the classes they name) and the row format
from grpo_lib.prompts import (COLORS, HELDOUT_CLASSES, HELDOUT_TEMPLATE, VAL_CLASSES, MAX_COUNT, NUMBER_WORDS,  # noqa: F401
                              SHAPES, TEMPLATES, all_classes, number_word, parse_class, plural, row_target,
                              scene_vocabulary, web_caption)
from grpo_lib.seeding import stable_seed

# --- the world's vocabulary -------------------------------------------------------------------

BACKGROUND: tuple[int, int, int] = (160, 160, 160)
RADIUS_RANGE: tuple[float, float] = (2.5, 3.5)   # px at size 32; scaled with the image size
MIN_GAP = 1.5                                     # px between object extents (scaled with size)
COLOR_JITTER = 12                                 # +/- per channel, per object


# --- rendering --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Scene:
    image: np.ndarray        # uint8 (H, W, 3)
    boxes: np.ndarray        # float32 (N, 4) x0, y0, x1, y1 in pixels (inclusive extents)
    count: int
    cls: str


def _shape_mask(shape: str, cx: float, cy: float, r: float, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """Boolean mask of one object on the pixel-centre grid (yy, xx)."""
    if shape == "circle":
        return (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
    if shape == "square":
        h = r * 0.85                         # area 2.9 r^2, close to the disc's 3.1 r^2
        return (np.abs(xx - cx) <= h) & (np.abs(yy - cy) <= h)
    if shape == "triangle":
        # upward equilateral triangle with circumradius R = 1.25 r (area 2.0 r^2)
        R = 1.25 * r
        top, base = cy - R, cy + R / 2
        half_w = R * math.sqrt(3) / 2
        frac = (yy - top) / (base - top)     # 0 at the apex, 1 at the base
        return (yy >= top) & (yy <= base) & (np.abs(xx - cx) <= frac * half_w)
    raise ValueError(f"shape={shape!r} is not one of {SHAPES}")


_EXTENT_FACTOR = {"circle": 1.0, "square": 0.85 * math.sqrt(2), "triangle": 1.25}


def _extent(shape: str, r: float) -> float:
    """Half-extent of the object's bounding circle (for placement without overlap)."""
    return _EXTENT_FACTOR[shape] * r


def check_scene_args(count, shape: str, color: str) -> None:
    """ValueError naming the bad value unless (count, shape, color) is a scene this world can draw."""
    if shape not in SHAPES:
        raise ValueError(f"shape={shape!r} is not one of {SHAPES}")
    if color not in COLORS:
        raise ValueError(f"color={color!r} is not one of {list(COLORS)}")
    if not isinstance(count, (int, np.integer)) or not 0 <= count <= MAX_COUNT:
        raise ValueError(f"count={count!r} must be an int in 0..{MAX_COUNT}")


def _place(count, shape, lo, hi, gap, size, rng, max_tries):
    """Sequential rejection sampling of (cx, cy, r) with bounding circles at least ``gap`` apart.

    Each object draws a block of candidates at once and keeps the first that fits (vectorised:
    one numpy call per object instead of one Python loop turn per try); gives up after
    ``max_tries`` candidates for one object and returns the objects placed so far.
    """
    block = 32
    placed = np.empty((count, 3))                       # (cx, cy, extent)
    radii = np.empty(count)
    for k in range(count):
        for _ in range(max(1, max_tries // block)):
            r = rng.uniform(lo, hi, size=block)
            e = _EXTENT_FACTOR[shape] * r
            c = rng.uniform(0.0, 1.0, size=(block, 2)) * (size - 2 * e - 1)[:, None] + (e + 0.5)[:, None]
            if k:
                d2 = ((c[:, None, :] - placed[None, :k, :2]) ** 2).sum(-1)          # (block, k)
                ok = np.all(d2 >= (e[:, None] + placed[None, :k, 2] + gap) ** 2, axis=1)
            else:
                ok = np.ones(block, bool)
            if ok.any():
                j = int(np.argmax(ok))
                placed[k] = (c[j, 0], c[j, 1], e[j])
                radii[k] = r[j]
                break
        else:
            return [(placed[i, 0], placed[i, 1], radii[i]) for i in range(k)]
    return [(placed[i, 0], placed[i, 1], radii[i]) for i in range(count)]


def render_scene(count: int, shape: str, color: str, *, size: int = 32, seed: int,
                 background_noise: float = 0.0, radius_range: tuple[float, float] | None = None,
                 color_jitter: int = COLOR_JITTER, max_tries: int = 200) -> Scene:
    """Render ``count`` non-overlapping ``color`` ``shape`` objects on the plain background.

    Objects are placed by rejection sampling with a minimum gap between their bounding circles;
    if a dense scene does not fit after ``max_tries`` placements, the radius range shrinks by 10 %
    and placement restarts (so 20 objects fit at 32x32). Deterministic in ``seed``.
    ``background_noise`` is the std (in 0-255 units) of optional Gaussian pixel noise.
    """
    check_scene_args(count, shape, color)
    if size < 16:
        raise ValueError(f"size={size} too small; expected >= 16 pixels")
    rng = np.random.default_rng(seed)
    scale = size / 32.0
    lo, hi = radius_range or RADIUS_RANGE
    lo, hi = lo * scale, hi * scale
    gap = MIN_GAP * scale
    centres: list[tuple[float, float, float]] = []
    attempt = 0
    while True:
        # up to 4 fresh placements at full size before shrinking: keeps object size independent of
        # the count for N <= 10, so the model cannot read the count off the object size
        centres = _place(count, shape, lo, hi, gap, size, rng, max_tries)
        if len(centres) == count:
            break
        attempt += 1
        if attempt % 4 == 0:
            lo, hi = lo * 0.9, hi * 0.9
    img = np.empty((size, size, 3), dtype=np.float32)
    img[:] = BACKGROUND
    base = np.asarray(COLORS[color], dtype=np.float32)
    boxes = np.zeros((count, 4), dtype=np.float32)
    for i, (cx, cy, r) in enumerate(centres):
        e = int(math.ceil(_extent(shape, r))) + 1
        x0, x1 = max(int(cx) - e, 0), min(int(cx) + e + 1, size)
        y0, y1 = max(int(cy) - e, 0), min(int(cy) + e + 1, size)
        yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32) + 0.5   # pixel centres
        m = _shape_mask(shape, cx, cy, r, yy, xx)
        jitter = rng.integers(-color_jitter, color_jitter + 1, size=3) if color_jitter else 0
        img[y0:y1, x0:x1][m] = np.clip(base + jitter, 0, 255)
        ys, xs = np.nonzero(m)
        boxes[i] = (x0 + xs.min(), y0 + ys.min(), x0 + xs.max(), y0 + ys.max())
    if background_noise > 0:
        img += rng.normal(0.0, background_noise, size=img.shape).astype(np.float32)
    image = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    return Scene(image=image, boxes=boxes, count=int(count), cls=f"{color} {shape}")


# --- datasets ---------------------------------------------------------------------------------

def _stable_seed(*parts) -> int:
    """A seed from arbitrary parts that does not depend on Python's hash randomisation."""
    return stable_seed(repr(parts), bits=47)


class _SceneDataset:
    """Map-style dataset rendering scene ``idx`` on the fly (no storage, deterministic)."""

    def __init__(self, length: int, seed: int, size: int = 32, background_noise: float = 0.0):
        if length <= 0:
            raise ValueError(f"length={length} must be positive")
        self.length, self.seed, self.size, self.background_noise = length, seed, size, background_noise

    def __len__(self) -> int:
        return self.length

    def _spec(self, idx: int, rng: np.random.Generator) -> tuple[str, int, str]:  # cls, count, caption
        raise NotImplementedError

    def __getitem__(self, idx: int) -> dict:
        if not 0 <= idx < self.length:
            raise IndexError(idx)
        rng = np.random.default_rng(_stable_seed(self.seed, idx))
        cls, count, caption = self._spec(idx, rng)
        color, shape = parse_class(cls)
        scene = render_scene(count, shape, color, size=self.size, seed=int(rng.integers(2**62)),
                             background_noise=self.background_noise)
        # pixels in [-1, 1], channels first, as the identity codec of the tiny policy expects
        pixels = scene.image.astype(np.float32).transpose(2, 0, 1) / 127.5 - 1.0
        return {"pixels": pixels, "prompt": caption, "count": count, "cls": cls}


class ExactCountDataset(_SceneDataset):
    """Scenes with exact-count captions from prompt rows (the cold-start "custom counting dataset").

    Each scene picks a row; with ``count_weight_power`` = k the pick is weighted,

        P(row) = N_row^k / sum_rows N^k,

    so k = 1 draws a 10-object row ten times as often as a 1-object row (the high counts are the hard ones).
    k = 0 is the uniform pick, drawn exactly as before the knob existed (``rng.integers``).
    """

    def __init__(self, rows: Sequence[dict], length: int, seed: int = 0, size: int = 32,
                 background_noise: float = 0.0, count_weight_power: float = 0.0):
        super().__init__(length, seed, size, background_noise)
        if not rows:
            raise ValueError("ExactCountDataset needs at least one prompt row")
        if not (isinstance(count_weight_power, (int, float)) and math.isfinite(count_weight_power)):
            raise ValueError(f"count_weight_power={count_weight_power!r} must be a finite number")
        self.rows = list(rows)
        counts = np.array([row_target(r)[1] for r in self.rows], dtype=np.float64)
        self.row_probs = None
        if count_weight_power:
            w = counts ** float(count_weight_power)
            self.row_probs = w / w.sum()

    def _pick_row(self, rng: np.random.Generator) -> dict:
        if self.row_probs is None:
            return self.rows[int(rng.integers(len(self.rows)))]
        return self.rows[int(rng.choice(len(self.rows), p=self.row_probs))]

    def _spec(self, idx, rng):
        row = self._pick_row(rng)
        cls, count = row_target(row)
        return cls, count, row["prompt"]


class WebCaptionDataset(_SceneDataset):
    """Scenes of every class with counts 1..max_count and web-style captions (``web_caption``):
    exact numbers only up to three, so a model pretrained on it counts badly above three."""

    def __init__(self, length: int, seed: int = 0, size: int = 32, max_count: int = 10,
                 classes: Iterable[str] | None = None, background_noise: float = 0.0, min_count: int = 1):
        super().__init__(length, seed, size, background_noise)
        self.classes = list(classes) if classes is not None else all_classes()
        for c in self.classes:
            parse_class(c)
        if not 1 <= min_count <= max_count <= MAX_COUNT:
            raise ValueError(f"min_count={min_count}, max_count={max_count}: need 1 <= min_count <= max_count "
                             f"<= {MAX_COUNT}")
        self.min_count, self.max_count = min_count, max_count

    def _spec(self, idx, rng):
        cls = self.classes[int(rng.integers(len(self.classes)))]
        count = int(rng.integers(self.min_count, self.max_count + 1))
        return cls, count, web_caption(cls, count, rng)


def render_rows(rows: Sequence[dict], *, seed: int = 0, size: int = 32) -> tuple[np.ndarray, list[Scene]]:
    """Render one ground-truth scene per prompt row: uint8 (B, H, W, 3) and the Scene objects."""
    scenes = []
    for i, row in enumerate(rows):
        cls, count = row_target(row)
        color, shape = parse_class(cls)
        scenes.append(render_scene(count, shape, color, size=size, seed=_stable_seed(seed, i, row["prompt"])))
    return np.stack([s.image for s in scenes]) if scenes else np.zeros((0, size, size, 3), np.uint8), scenes
