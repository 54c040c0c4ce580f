"""The embedded world's words and its GenEval-format prompt rows (the renderer is ``grpo_lib.scenes``).

A class is a (colour, shape) pair such as "red circle"; a prompt row follows GenEval's metadata format
(flow_grpo_notes §4)::

    {"tag": "counting", "include": [{"class": "red circle", "count": 4}],
     "exclude": [{"class": "red circle", "count": 5}], "prompt": "a photo of four red circles"}

| name                 | meaning                                                               |
|----------------------|-----------------------------------------------------------------------|
| ``COLORS``           | 6 well-separated colours and their RGB (the detector segments by colour) |
| ``SHAPES``           | circle, square, triangle (told apart by fill ratio / corners)           |
| ``TEMPLATES``        | prompt templates; ``HELDOUT_TEMPLATE`` appears only in the test set    |
| ``HELDOUT_CLASSES``  | (colour, shape) pairs that appear only in the test set                |
| ``row_target(row)``  | the (class, count) a row asks for, checked against the world           |
| ``load_rows(path)``  | rows of a JSONL file (``embedded=False``: format only, GPU world's COCO rows) |

``python -m grpo_lib.prompts --write-prompts data/counting`` rebuilds the shipped prompt sets exactly.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

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
# of the fine-tuning sets; checkpoint selection and tuning read them, so the test set stays untouched. One per
# shape: without a circle, val could not see a cold start that forgets circles on unseen colour-shape pairs
# (test's blue / cyan circles fell from 0.89 to 0.65 shape match while val stayed at 0.93)
VAL_CLASSES: tuple[str, ...] = ("purple square", "blue triangle", "green circle")
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


def build_prompt_sets() -> dict[str, list[dict]]:
    """The shipped prompt sets: train (counts 1-10, seen classes and templates), val (counts 1-10, the
    ``VAL_CLASSES`` with the train templates: checkpoint selection and tuning), test (counts 1-10, every
    row has a held-out class or the held-out template, so no test prompt is a train or val prompt), and
    train_counts_1_7 (train's rows of counts 1-7: the generalisation run trains on it and reports counts
    8-10 of test, upstream's Table 4 design). Counts 11-15 are gone: the tiny base never saw those words
    in a caption, so every stage scored 0.0 on them."""
    seen = [c for c in all_classes() if c not in HELDOUT_CLASSES]
    train = [counting_row(c, n, t) for n in range(1, 11) for c in seen if c not in VAL_CLASSES for t in TEMPLATES]
    val = [counting_row(c, n, t) for n in range(1, 11) for c in VAL_CLASSES for t in TEMPLATES]
    test = []
    for n in range(1, 11):
        test += [counting_row(c, n, t) for c in HELDOUT_CLASSES for t in TEMPLATES + (HELDOUT_TEMPLATE,)]
        test += [counting_row(c, n, HELDOUT_TEMPLATE) for c in seen]
    return {"train": train, "val": val, "test": test,
            "train_counts_1_7": [r for r in train if row_target(r)[1] <= 7]}


def write_prompt_sets(out_dir: str | Path) -> dict[str, int]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sizes = {}
    for name, rows in build_prompt_sets().items():
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


def spread_subset(rows: list[dict], n: int) -> list[dict]:
    """``n`` rows spread evenly over the file (prompt files are sorted by count: a prefix would
    hold only the smallest counts); all rows when ``n`` is 0 or at least their number."""
    if n <= 0 or n >= len(rows):
        return list(rows)
    return [rows[i] for i in np.linspace(0, len(rows) - 1, n).round().astype(int)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Embedded counting world: prompt sets")
    ap.add_argument("--write-prompts", metavar="DIR", help="rebuild the shipped prompt sets into DIR")
    args = ap.parse_args(argv)
    if args.write_prompts:
        print(json.dumps(write_prompt_sets(args.write_prompts)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
