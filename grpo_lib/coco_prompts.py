"""GenEval-style counting prompts over the 80 COCO classes, for the GPU world (SD3.5 / Show-o2).

GenEval's counting rows are ``"a photo of {two|three|four} {plural}"`` with include ``{class, count}`` and
exclude ``{class, count + 1}`` (flow_grpo_notes §4). The counting fork trains on counts 1-10
(``counting_10``); this module writes such sets with a disjoint test split (held-out classes), scored by
a detector behind the reward server (``python -m grpo_lib.server --detector owlv2 ...``), which
understands COCO class names. ``python -m grpo_lib.coco_prompts data/counting_coco`` rebuilds them.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from grpo_lib.scenes import NUMBER_WORDS

# the 80 COCO detection classes, in COCO's order (GenEval's object_names.txt)
COCO_CLASSES: tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant",
    "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush",
)

_IRREGULAR = {"person": "people", "mouse": "mice", "sheep": "sheep", "skis": "skis", "scissors": "scissors",
              "knife": "knives", "bus": "buses", "wine glass": "wine glasses", "couch": "couches",
              "sandwich": "sandwiches", "bench": "benches", "toothbrush": "toothbrushes"}
TEMPLATE = "a photo of {n} {cls}"


def plural(name: str) -> str:
    if name in _IRREGULAR:
        return _IRREGULAR[name]
    if name.endswith(("s", "x", "ch", "sh")):
        return name + "es"
    return name + "s"


def counting_rows(classes, counts, template: str = TEMPLATE) -> list[dict]:
    rows = []
    for c in classes:
        for n in counts:
            rows.append({"tag": "counting", "include": [{"class": c, "count": n}],
                         "exclude": [{"class": c, "count": n + 1}],
                         "prompt": template.format(n=NUMBER_WORDS[n], cls=c if n == 1 else plural(c))})
    return rows


def build(seed: int = 0, n_test_classes: int = 16) -> dict[str, list[dict]]:
    rng = np.random.default_rng(seed)
    test_classes = sorted(rng.choice(COCO_CLASSES, size=n_test_classes, replace=False).tolist())
    train_classes = [c for c in COCO_CLASSES if c not in test_classes]
    return {"train": counting_rows(train_classes, range(1, 11)),
            "test": counting_rows(test_classes, range(1, 11)),
            "test_unseen_counts": counting_rows(test_classes, range(11, 16))}


def main(argv=None) -> int:
    out = Path((argv or sys.argv[1:] or ["data/counting_coco"])[0])
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in build().items():
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        print(name, len(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
