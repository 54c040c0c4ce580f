"""Counting rewards: strict (exact count), partial (GenEval's credit, clipped), shaped (gated credit).

Every reward follows the package contract (design.md section 4)::

    reward(images uint8 (B, H, W, 3), prompts list[str], metadata list[GenEval row]) -> (r, info)

with ``r`` float32 (B,) and ``info`` a dict of per-image arrays (B,). The requested class and count
come from the row's single ``include`` clause (``{"class": "red circle", "count": 4}``); the
found count n comes from :class:`grpo_lib.rewards.detector.ShapeCounter` with GenEval's rule
(detections with score > 0.9). All three rewards share one measurement pass,
:func:`measure_counting`, whose per-image table is also what evaluation reports.

| code name               | symbol  | meaning                                                        |
|-------------------------|---------|----------------------------------------------------------------|
| ``target``              | N       | count the prompt asks for                                      |
| ``count``               | n       | count found (detections with score > threshold)                |
| ``counting_strict``     | r_s     | 1[n == N] (GenEval ``strict_correct``; the fork's reward_strict) |
| ``counting_partial``    | r_p     | max(0, 1 - abs(N - n) / N) (GenEval ``score``, clipped at 0)    |
| ``counting_shaped``     | r_q     | exp(-abs(n - N) / tau) * g_bg * g_area * g_shape               |

**Why partial is clipped at 0.** Upstream's ``1 - |N - n| / N`` is unbounded below: for N = 1 an
image with n = 16 scores -14 while every other image of the batch sits in [0, 1]. Flow-GRPO
normalises advantages by a *global* std, so that one image inflates the std and flattens every
other group's advantages (and itself gets a huge negative advantage). Beyond "wrong", how wrong
carries no useful signal there; clipping keeps r_p in [0, 1]. For N = 0 the credit is 1[n == 0].

**Shaped reward: design and rationale.** Two problems with a plain count reward:

1. *Little signal.* r_s is 0 for every member of a group until one sample is exactly right (a
   zero-variance group gets no gradient); r_p is linear and rewards n = 2N - 1 as much as n = 1.
   The count credit ``exp(-|n - N| / tau)`` (tau = 1 by default) is 1 at the target, 0.37 one off,
   0.14 two off: graded near the target, where GRPO's group comparisons happen, and small far away.
2. *Hacking.* A trial in this world showed GRPO turning the grey background teal, scattering specks
   too small to count, and drawing discs as patterned squares while the counted number still
   improved. A count says nothing about those; so the credit is multiplied by a quality gate in
   [0, 1], each factor 1 on the renderer's own scenes (also blurred / noisy / colour-shifted ones,
   tests/test_rewards.py) and falling to 0 on the degenerate images:

   - ``g_bg = clip((fidelity - 0.80) / (0.95 - 0.80), 0, 1)``: background fidelity, the share of
     pixels that are grey background, the class colour or a blend (detector); a teal background
     has ~0.
   - ``g_area``: mean :func:`~grpo_lib.rewards.detector.area_quality` over every blob of the
     class colour (soft area >= 0.5 px), counted or not, so uncounted specks and giant blobs pull
     it down (a speck's quality is 0; 4 discs + 10 specks give 4/14).
   - ``g_shape = clip((m - 0.1) / (0.5 - 0.1), 0, 1)`` with m the mean ``shape_match`` of the
     counted objects (probability of the requested shape from blur-invariant moments): correct
     shapes measure 0.85-0.99 at N <= 10, a wrong shape < 0.15. (At N > 10 objects shrink to a few
     pixels and squares and discs become indistinguishable; m ~ 0.5 there, g_shape stays ~1.)

   The gate multiplies rather than adds so no amount of counting can buy back a degenerate image,
   and a product of factors that are 1 on valid images leaves the count credit untouched there.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from grpo_lib.rewards.detector import ShapeCounter, area_quality, check_images
from grpo_lib.scenes import MAX_COUNT, parse_class

# the quality guard's measures (relative drop against the start; grpo_lib.experiment, GRPOTrainer.evaluate)
QUALITY_KEYS = ("confidence", "shape_match", "background_fidelity", "color_fidelity", "area_quality")
MEASURE_KEYS = ("target", "count", "correct", "error", "confidence", "n_detections", "n_specks",
                "background_fidelity", "color_fidelity", "area_quality", "shape_match", "quality")


def check_batch(images, prompts, metadata) -> tuple[np.ndarray, list[str], list[int]]:
    """Validate a reward call; return (images, classes, targets). ValueError names what is wrong."""
    B = check_images(images).shape[0]
    if B == 0:
        raise ValueError("empty batch: images has B = 0; a reward needs at least one image")
    if isinstance(prompts, str) or not isinstance(prompts, Sequence):
        raise ValueError(f"prompts must be a list of {B} strings, got {type(prompts).__name__}")
    if not isinstance(metadata, Sequence) or isinstance(metadata, (str, Mapping)):
        raise ValueError(f"metadata must be a list of {B} GenEval rows (dicts), got {type(metadata).__name__}")
    if len(prompts) != B or len(metadata) != B:
        raise ValueError(f"batch length mismatch: {B} images, {len(prompts)} prompts, {len(metadata)} metadata rows")
    classes, targets = [], []
    for i, (p, row) in enumerate(zip(prompts, metadata)):
        if not isinstance(p, str):
            raise ValueError(f"prompts[{i}] is {type(p).__name__}, expected str")
        if not isinstance(row, Mapping):
            raise ValueError(f"metadata[{i}] is {type(row).__name__}, expected a GenEval row dict")
        inc = row.get("include")
        if not isinstance(inc, Sequence) or len(inc) != 1 or not isinstance(inc[0], Mapping):
            raise ValueError(f"metadata[{i}] needs exactly one 'include' clause "
                             f"{{'class': ..., 'count': ...}}, got include={inc!r}")
        cls, count = inc[0].get("class"), inc[0].get("count")
        if not isinstance(cls, str):
            raise ValueError(f"metadata[{i}] include class={cls!r} is not a string like 'red circle'")
        parse_class(cls)                                        # ValueError for a class outside the world
        if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or not 0 <= count <= MAX_COUNT:
            raise ValueError(f"metadata[{i}] include count={count!r} must be an int in 0..{MAX_COUNT}")
        if "prompt" in row and row["prompt"] != p:
            # a misaligned batch (prompts shuffled against rows) would silently reward the wrong target
            raise ValueError(f"prompts[{i}]={p!r} differs from metadata[{i}]['prompt']={row['prompt']!r}")
        classes.append(cls)
        targets.append(int(count))
    return images, classes, targets


def measure_counting(images, prompts, metadata, detector: ShapeCounter | None = None
                     ) -> dict[str, np.ndarray]:
    """Per-image counting measurements (the ``info`` every counting reward returns), arrays (B,).

    | key                   | meaning                                                            |
    |-----------------------|--------------------------------------------------------------------|
    | target, count, error  | N, n found, n - N (int64)                                          |
    | correct               | 1.0 if n == N else 0.0                                             |
    | confidence            | mean score of the counted detections (0 if none)                   |
    | n_detections, n_specks| blobs of the class colour (soft area >= 0.5 px); of them uncounted |
    | background_fidelity   | share of background / class-colour pixels (detector)                |
    | color_fidelity        | share of the drawn pixels in the class colour (detector)           |
    | area_quality          | mean area_quality over those blobs (1 if there are none)           |
    | shape_match           | mean probability of the requested shape over counted objects (1 if none) |
    | quality               | g_bg * g_area * g_shape (module docstring)                         |
    """
    images, classes, targets = check_batch(images, prompts, metadata)
    detector = detector or ShapeCounter()
    dets = detector.detect(images, classes, targets)
    B, H, W, _ = images.shape
    out = {k: np.zeros(B, np.float32) for k in MEASURE_KEYS}
    for k in ("target", "count", "error", "n_detections", "n_specks"):
        out[k] = np.zeros(B, np.int64)
    for i, d in enumerate(dets):
        kept = d.kept
        blobs = d.areas >= 0.5                  # every blob with a core pixel (noise never makes one)
        n = int(kept.sum())
        out["target"][i] = targets[i]
        out["count"][i] = n
        out["error"][i] = n - targets[i]
        out["correct"][i] = float(n == targets[i])
        out["confidence"][i] = float(d.scores[kept].mean()) if n else 0.0
        out["n_detections"][i] = int(blobs.sum())
        out["n_specks"][i] = int((blobs & ~kept).sum())
        out["background_fidelity"][i] = d.background_fidelity
        out["color_fidelity"][i] = d.color_fidelity
        shape = parse_class(classes[i])[1]
        out["area_quality"][i] = (float(area_quality(d.areas[blobs], shape, targets[i] or None, (H, W)).mean())
                                  if blobs.any() else 1.0)
        out["shape_match"][i] = float(d.shape_match[kept].mean()) if n else 1.0
    out["quality"] = quality_gate(out["background_fidelity"], out["area_quality"], out["shape_match"])
    return out


def quality_gate(fidelity, area_q, shape_match) -> np.ndarray:
    """g_bg * g_area * g_shape in [0, 1] (module docstring), float32 (B,)."""
    g_bg = np.clip((np.asarray(fidelity) - 0.80) / (0.95 - 0.80), 0.0, 1.0)
    g_shape = np.clip((np.asarray(shape_match) - 0.1) / (0.5 - 0.1), 0.0, 1.0)
    return (g_bg * np.clip(area_q, 0.0, 1.0) * g_shape).astype(np.float32)


# --- the rewards ------------------------------------------------------------------------------

class CountingReward:
    """Base: a reward computed from :func:`measure_counting`'s table (so sums measure once)."""
    name = "counting"

    def __init__(self, detector: ShapeCounter | None = None):
        self.detector = detector or ShapeCounter()

    def from_measures(self, m: Mapping[str, np.ndarray]) -> np.ndarray:
        raise NotImplementedError

    def __call__(self, images, prompts, metadata) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        m = measure_counting(images, prompts, metadata, self.detector)
        return self.from_measures(m).astype(np.float32), m

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class CountingStrict(CountingReward):
    """r_s = 1[n == N]: GenEval's strict_correct for a counting row, the fork's reward_strict."""
    name = "counting_strict"

    def from_measures(self, m):
        return (m["count"] == m["target"]).astype(np.float32)


class CountingPartial(CountingReward):
    """r_p = max(0, 1 - |N - n| / N); 1[n == 0] for N = 0 (clipping: module docstring)."""
    name = "counting_partial"

    def from_measures(self, m):
        N = m["target"].astype(np.float64)
        n = m["count"].astype(np.float64)
        credit = np.where(N > 0, 1.0 - np.abs(N - n) / np.maximum(N, 1.0), (n == 0).astype(np.float64))
        return np.clip(credit, 0.0, 1.0).astype(np.float32)


class CountingShaped(CountingReward):
    """r_q = exp(-|n - N| / tau) * quality gate (design and rationale: module docstring)."""
    name = "counting_shaped"

    def __init__(self, detector: ShapeCounter | None = None, tau: float = 1.0):
        super().__init__(detector)
        if not tau > 0:
            raise ValueError(f"tau={tau} must be > 0 (count-credit length scale in objects)")
        self.tau = float(tau)

    def from_measures(self, m):
        credit = np.exp(-np.abs(m["count"] - m["target"]) / self.tau)
        return (credit * m["quality"]).astype(np.float32)

    def __repr__(self) -> str:
        return f"CountingShaped(tau={self.tau})"
