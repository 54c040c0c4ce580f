"""The embedded counting world: procedurally rendered scenes, GenEval-style prompt rows, datasets.

A scene is N non-overlapping objects of one class on a plain grey background; a class is a
(colour, shape) pair such as "red circle". Everything is deterministic given a seed, so a
counting claim can be measured exactly: the renderer is both the training data and the
ground truth the detector is checked against.

| name                 | meaning                                                               |
|----------------------|-----------------------------------------------------------------------|
| ``COLORS``           | 6 well-separated RGB colours (the detector segments by colour)         |
| ``SHAPES``           | circle, square, triangle (told apart by fill ratio / corners)           |
| ``BACKGROUND``       | the plain background colour (the reward's quality gate checks it)     |
| ``RADIUS_RANGE``     | object "radius" in px at 32x32 (circumradius-like size of each shape) |
| ``TEMPLATES``        | prompt templates; ``HELDOUT_TEMPLATE`` appears only in the test set    |
| ``HELDOUT_CLASSES``  | (colour, shape) pairs that appear only in the test set                |

Prompt rows follow GenEval's metadata format (flow_grpo_notes §4)::

    {"tag": "counting", "include": [{"class": "red circle", "count": 4}],
     "exclude": [{"class": "red circle", "count": 5}], "prompt": "a photo of four red circles"}

``python -m grpo_lib.scenes --write-prompts data/counting`` rebuilds the shipped prompt sets exactly.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

# --- the world's vocabulary -------------------------------------------------------------------

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "green": (40, 165, 60),
    "blue": (40, 80, 215),
    "yellow": (235, 205, 30),
    "purple": (140, 50, 180),
    "cyan": (40, 200, 210),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
BACKGROUND: tuple[int, int, int] = (160, 160, 160)
RADIUS_RANGE: tuple[float, float] = (2.5, 3.5)   # px at size 32; scaled with the image size
MIN_GAP = 1.5                                     # px between object extents (scaled with size)
COLOR_JITTER = 12                                 # +/- per channel, per object
MAX_COUNT = 20

NUMBER_WORDS = ("zero one two three four five six seven eight nine ten eleven twelve thirteen "
                "fourteen fifteen sixteen seventeen eighteen nineteen twenty").split()

TEMPLATES: tuple[str, ...] = (
    "a photo of {n} {cls}",
    "{n} {cls}",
    "an image of {n} {cls}",
    "a picture with {n} {cls}",
    "{n} {cls} on a grey background",
    "a drawing of {n} {cls}",
    "there are {n} {cls} in the image",
)
HELDOUT_TEMPLATE = "a composition of {n} {cls} scattered across a grey background"
# one held-out class per colour-ish, covering every shape, so the test set probes composition
HELDOUT_CLASSES: tuple[str, ...] = ("red triangle", "green square", "blue circle",
                                    "yellow triangle", "cyan circle")
# validation classes: seen by the base's pretraining captions like every class, but in no train or test prompt
# of the fine-tuning sets; checkpoint selection and tuning read them, so the test set stays untouched
VAL_CLASSES: tuple[str, ...] = ("purple square", "blue triangle")
# web captions: the count is only said for N <= WEB_EXACT_MAX, as in real alt-text
WEB_EXACT_MAX = 3
WEB_VAGUE = ("several", "many", "a group of", "some", "")


def all_classes() -> list[str]:
    return [f"{c} {s}" for c in COLORS for s in SHAPES]


def parse_class(name: str) -> tuple[str, str]:
    """'red circle' -> ('red', 'circle'); ValueError for anything outside the world."""
    parts = name.split()
    if len(parts) != 2 or parts[0] not in COLORS or parts[1] not in SHAPES:
        raise ValueError(f"class {name!r} is not '<colour> <shape>' with colour in {list(COLORS)} "
                         f"and shape in {list(SHAPES)}")
    return parts[0], parts[1]


def plural(cls: str, count: int) -> str:
    return cls if count == 1 else cls + "s"


def number_word(count: int) -> str:
    if not 0 <= count <= MAX_COUNT:
        raise ValueError(f"count={count} outside the world's range 0..{MAX_COUNT}")
    return NUMBER_WORDS[count]


def scene_vocabulary() -> list[str]:
    """Every word any prompt of this world can use (the tiny text encoder's vocabulary)."""
    words: set[str] = set()
    for tpl in TEMPLATES + (HELDOUT_TEMPLATE,):
        words.update(w for w in tpl.replace("{n}", "").replace("{cls}", "").split())
    words.update(NUMBER_WORDS)
    words.update(COLORS)
    words.update(SHAPES)
    words.update(s + "s" for s in SHAPES)
    for v in WEB_VAGUE:
        words.update(v.split())
    return sorted(words)


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


# --- prompt rows (GenEval metadata format) ---------------------------------------------------

def counting_row(cls: str, count: int, template: str = TEMPLATES[0]) -> dict:
    """One GenEval counting row; exclude = count + 1 as GenEval's create_prompts does."""
    parse_class(cls)
    prompt = template.format(n=number_word(count), cls=plural(cls, count))
    return {"tag": "counting", "include": [{"class": cls, "count": int(count)}],
            "exclude": [{"class": cls, "count": int(count) + 1}], "prompt": prompt}


def row_target(row: dict) -> tuple[str, int]:
    """(class, count) a counting row asks for; ValueError for a row the world can't draw."""
    if not isinstance(row, dict) or not row.get("include"):
        raise ValueError(f"metadata row {row!r} has no 'include' clause")
    inc = row["include"][0]
    cls, count = inc.get("class"), inc.get("count")
    parse_class(cls)
    if not isinstance(count, int) or not 0 <= count <= MAX_COUNT:
        raise ValueError(f"metadata row count={count!r} must be an int in 0..{MAX_COUNT}")
    return cls, count


def web_caption(cls: str, count: int, rng: np.random.Generator) -> str:
    """A caption as the web would write it: the number only for N <= 3, else vague or absent."""
    if count <= WEB_EXACT_MAX:
        tpl = TEMPLATES[rng.integers(len(TEMPLATES))]
        return tpl.format(n=number_word(count), cls=plural(cls, count))
    vague = WEB_VAGUE[rng.integers(len(WEB_VAGUE))]
    tpl = TEMPLATES[rng.integers(len(TEMPLATES))]
    return " ".join(tpl.format(n=vague, cls=plural(cls, count)).split())


def build_prompt_sets(seed: int = 0) -> dict[str, list[dict]]:
    """The shipped prompt sets: train (counts 1-10, seen classes and templates), val (counts 1-10, the
    ``VAL_CLASSES`` with the train templates: checkpoint selection and tuning), test (counts 1-10, every
    row has a held-out class or the held-out template, so no test prompt is a train or val prompt), and
    test_unseen_counts (counts 11-15). Deterministic in ``seed``."""
    rng = np.random.default_rng(seed)
    seen = [c for c in all_classes() if c not in HELDOUT_CLASSES]
    train = [counting_row(c, n, t) for n in range(1, 11) for c in seen if c not in VAL_CLASSES for t in TEMPLATES]
    val = [counting_row(c, n, t) for n in range(1, 11) for c in VAL_CLASSES for t in TEMPLATES]
    test = []
    for n in range(1, 11):
        test += [counting_row(c, n, t) for c in HELDOUT_CLASSES for t in TEMPLATES + (HELDOUT_TEMPLATE,)]
        test += [counting_row(c, n, HELDOUT_TEMPLATE) for c in seen]
    unseen = []
    for n in range(11, 16):
        rows = [counting_row(c, n, t) for c in all_classes() for t in (TEMPLATES[0], HELDOUT_TEMPLATE)]
        pick = rng.choice(len(rows), size=20, replace=False)
        unseen += [rows[i] for i in sorted(pick)]
    return {"train": train, "val": val, "test": test, "test_unseen_counts": unseen}


def write_prompt_sets(out_dir: str | Path, seed: int = 0) -> dict[str, int]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sizes = {}
    for name, rows in build_prompt_sets(seed).items():
        (out_dir / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        sizes[name] = len(rows)
    return sizes


def load_rows(path: str | Path, *, embedded: bool = True) -> list[dict]:
    """GenEval metadata rows from a JSONL file. ``embedded=True`` also checks that every class is one
    this world can draw; the GPU world's COCO rows (``data/counting_coco``) only need the format."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"prompt file {str(path)!r} does not exist")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not rows:
        raise ValueError(f"prompt file {str(path)!r} holds no rows")
    for i, r in enumerate(rows):
        if embedded:
            row_target(r)
        elif not (isinstance(r, dict) and isinstance(r.get("prompt"), str) and r.get("include")):
            raise ValueError(f"{path}:{i + 1}: row {r!r} needs a 'prompt' and an 'include' clause")
    return rows


# --- datasets ---------------------------------------------------------------------------------

def _stable_seed(*parts) -> int:
    """A seed from arbitrary parts that does not depend on Python's hash randomisation."""
    h = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & 0x7FFF_FFFF_FFFF


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
    """Scenes with exact-count captions from prompt rows (the cold-start "custom counting dataset")."""

    def __init__(self, rows: Sequence[dict], length: int, seed: int = 0, size: int = 32,
                 background_noise: float = 0.0):
        super().__init__(length, seed, size, background_noise)
        if not rows:
            raise ValueError("ExactCountDataset needs at least one prompt row")
        self.rows = list(rows)
        for r in self.rows:
            row_target(r)

    def _spec(self, idx, rng):
        row = self.rows[int(rng.integers(len(self.rows)))]
        cls, count = row_target(row)
        return cls, count, row["prompt"]


class WebCaptionDataset(_SceneDataset):
    """Scenes of every class with counts 1..max_count and web-style captions (``web_caption``):
    exact numbers only up to three, so a model pretrained on it counts badly above three."""

    def __init__(self, length: int, seed: int = 0, size: int = 32, max_count: int = 10,
                 classes: Iterable[str] | None = None, background_noise: float = 0.0):
        super().__init__(length, seed, size, background_noise)
        self.classes = list(classes) if classes is not None else all_classes()
        for c in self.classes:
            parse_class(c)
        if not 1 <= max_count <= MAX_COUNT:
            raise ValueError(f"max_count={max_count} must be in 1..{MAX_COUNT}")
        self.max_count = max_count

    def _spec(self, idx, rng):
        cls = self.classes[int(rng.integers(len(self.classes)))]
        count = int(rng.integers(1, self.max_count + 1))
        return cls, count, web_caption(cls, count, rng)


def render_rows(rows: Sequence[dict], *, seed: int = 0, size: int = 32) -> tuple[np.ndarray, list[Scene]]:
    """Render one ground-truth scene per prompt row: uint8 (B, H, W, 3) and the Scene objects."""
    scenes = []
    for i, row in enumerate(rows):
        cls, count = row_target(row)
        color, shape = parse_class(cls)
        scenes.append(render_scene(count, shape, color, size=size, seed=_stable_seed(seed, i, row["prompt"])))
    return np.stack([s.image for s in scenes]) if scenes else np.zeros((0, size, size, 3), np.uint8), scenes


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Embedded counting world utilities")
    ap.add_argument("--write-prompts", metavar="DIR", help="rebuild the shipped prompt sets into DIR")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.write_prompts:
        print(json.dumps(write_prompt_sets(args.write_prompts, args.seed)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
