"""GenEval's judge on one image's detections (yifan123/reward-server ``gen_eval.py``, flow_grpo_notes §3).

Per image with metadata row ``{"tag", "include": [{"class": c, "count": N}], "exclude": [...]}``::

    n_c    = min(#{detections d of class c : s_d > tau}, M)             # confident objects, NMS off
    score  = (1/|I|) * sum_{(c, N) in I} (1 - |N - n_c| / N)           # partial, NOT clipped (upstream)
    strict = prod_{(c, N) in I} [n_c == N]                              # exact count
    correct = prod_{(c, N) in I} [n_c >= N] * prod_{(c, K) in E} [n_c < K]   # original GenEval rule

| code name              | symbol | meaning                                                          |
|------------------------|--------|------------------------------------------------------------------|
| ``counting_threshold`` | tau    | 0.9 for ``tag == "counting"`` (``threshold`` = 0.3 for other tags) |
| ``max_objects``        | M      | 50 (GenEval's 16, raised as the counting fork does, for N > 16)  |
| ``include``/``exclude``| I / E  | the row's clauses; exclude is ``count = N + 1`` for counting     |

A clause with N = 0 (which upstream would divide by) gets the in-process rule, term = 1[n_c == 0].
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from .detectors import Detection, Query

GENEVAL_TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
OTHER_TAG_VALUE = -10.0          # upstream's filler in group_rewards for images of another tag


@dataclass(frozen=True)
class Judgement:
    score: float                  # partial, unclipped (upstream's ``score``)
    strict: bool                  # every include clause exact
    correct: bool                 # original GenEval rule (False when only_strict, as upstream)
    counts: dict[str, int]        # n_c for every include/exclude class


def geneval_judge(detections: Sequence[Detection], row: dict, *, only_strict: bool,
                  counting_threshold: float = 0.9, threshold: float = 0.3,
                  max_objects: int = 50) -> Judgement:
    """GenEval's ``evaluate_reward`` (score, strict) and ``evaluate`` (correct) on one image.

    n_c = min(#{d : d.cls == c, d.score > tau}, M) with tau = ``counting_threshold`` for counting
    rows else ``threshold``; score = mean over include clauses of 1 - |N - n_c| / N (unclipped;
    1[n_c == 0] for N = 0);
    strict = all n_c == N; correct = all n_c >= N and, for excludes, n_c < K (False if only_strict).
    """
    tau = counting_threshold if row["tag"] == "counting" else threshold
    counts: dict[str, int] = {}
    for d in detections:
        if d.score > tau:
            counts[d.cls] = counts.get(d.cls, 0) + 1
    # the top-M cut of upstream (sorted by score) only matters through the number kept
    n = {c: min(counts.get(c, 0), max_objects) for c in _row_classes(row)}
    # N = 0: upstream divides by zero; the in-process rule 1[n == 0] (grpo_lib.rewards.counting)
    terms = [1.0 - abs(req["count"] - n[req["class"]]) / req["count"] if req["count"] > 0
             else float(n[req["class"]] == 0) for req in row["include"]]
    strict = all(n[req["class"]] == req["count"] for req in row["include"])
    if only_strict:
        correct = False
    else:
        correct = (all(n[r["class"]] >= r["count"] for r in row["include"])
                   and all(n[r["class"]] < r["count"] for r in row.get("exclude", [])))
    return Judgement(score=sum(terms) / len(terms), strict=strict, correct=correct, counts=n)


def _row_classes(row: dict) -> list[str]:
    return [c for c, _ in row_queries(row)]


def row_queries(row: dict) -> list[Query]:
    """(class, requested count) for every class of a row, in order: the include clause's count, or
    None for a class that only appears in exclude clauses."""
    q: dict[str, int | None] = {}
    for req in row["include"]:
        q.setdefault(req["class"], req["count"])
    for req in row.get("exclude", []):
        q.setdefault(req["class"], None)
    return list(q.items())

