"""An adaptive count curriculum: draw prompts where a group of G rollouts is likely to disagree.

A group carries GRPO signal only if its rewards differ (a zero-spread group has all advantages zero).
With the strict 0/1 counting reward and a per-count success rate p_N, a group of G independent
rollouts has spread with probability 1 - p_N^G - (1 - p_N)^G. The curriculum keeps p_N live and draws
each epoch's prompts in proportion to

    w(row) = floor + 1 - p_N^G - (1 - p_N)^G,          N = the count the row asks for

    p_N <- (1 - ema) p_N + ema acc_N                     each epoch in which count N is rolled out,
                                                         starting from p_N = 1/2

| code      | symbol  | meaning                                                                  |
|-----------|---------|--------------------------------------------------------------------------|
| ``floor`` | floor   | weight every row keeps (> 0: a count that is always right or always wrong |
|           |         | stays drawable, so its p_N can still change)                             |
| ``ema``   | ema     | weight of the newest epoch in the moving average                         |
| ``p``     | p_N     | strict accuracy of count N on the training rollouts (all processes)      |
| ``acc_N`` | acc_N   | this epoch's mean strict correctness over the rollouts asking for N      |
|           | G       | ``group_size``                                                           |

A count never rolled out yet has p_N = 1/2 (``PRIOR``), so before any statistics every row weighs the
same and the first epoch's draw is uniform in weight. The average starts from that prior rather than
from the first observation: with M groups an epoch spread over ~10 counts a count's first acc_N often
rests on one group, and one unlucky group must not push its weight down to the floor. The trainer observes each epoch's gathered
rollouts (in the epochs' global sample order, so 1 and 2 processes compute the same floats) and hands
:meth:`CountCurriculum.row_weights` to :class:`grpo_lib.grpo.GroupSampler`, which draws the next
epoch's M prompts without replacement from a generator seeded by (seed, epoch): every rank draws the
same plan from the same statistics. ``state_dict`` / ``load_state_dict`` carry p_N for ``resume``.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from grpo_lib.params import check_knob

__all__ = ["CURRICULA", "row_count", "spread_probability", "CountCurriculum"]

CURRICULA = ("none", "spread")
PRIOR = 0.5


def row_count(row: dict) -> int:
    """The count a GenEval counting row asks for (its first ``include`` clause), for either world.

    (``grpo_lib.scenes.row_target`` reads the same field and also checks the embedded world's class;
    COCO rows of the GPU world name classes that world does not draw.)"""
    try:
        count = row["include"][0]["count"]
    except (KeyError, IndexError, TypeError):
        raise ValueError(f"metadata row {row!r} has no include[0]['count'] to take a count from") from None
    if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 0:
        raise ValueError(f"metadata row count={count!r} must be a non-negative int")
    return int(count)


def spread_probability(p, group_size: int):
    """P(a group of G Bernoulli(p) rewards is not all equal) = 1 - p^G - (1 - p)^G (elementwise)."""
    p = np.asarray(p, dtype=np.float64)
    return 1.0 - p ** group_size - (1.0 - p) ** group_size


class CountCurriculum:
    """Live per-count strict accuracy p_N and the row weights it implies (see the module docstring)."""

    def __init__(self, counts: Sequence[int], group_size: int, *, floor: float, ema: float):
        self.counts = np.asarray(counts, dtype=np.int64)                                 # (num_prompts,)
        if self.counts.ndim != 1 or self.counts.size == 0:
            raise ValueError(f"counts must be a non-empty 1-D sequence, got shape {self.counts.shape}")
        check_knob("group_size", group_size)
        if not floor > 0:
            raise ValueError(f"curriculum floor={floor} must be > 0: a count with p_N in {{0, 1}} would get "
                             "weight 0, never be drawn again, and so never update")
        if not 0 < ema <= 1:
            raise ValueError(f"curriculum ema={ema} must be in (0, 1] (the newest epoch's weight)")
        self.group_size, self.floor, self.ema = int(group_size), float(floor), float(ema)
        self.p: dict[int, float] = {}                       # count -> EMA of strict accuracy (seen counts only)

    def count_p(self, count: int) -> float:
        return self.p.get(int(count), PRIOR)

    def count_weight(self, count: int) -> float:
        """w_N = floor + 1 - p_N^G - (1 - p_N)^G."""
        return self.floor + float(spread_probability(self.count_p(count), self.group_size))

    def row_weights(self) -> torch.Tensor:
        """float64 (num_prompts,): every row's weight, for ``GroupSampler.epoch_plan(..., weights=)``."""
        w = {int(n): self.count_weight(n) for n in np.unique(self.counts)}
        return torch.tensor([w[int(n)] for n in self.counts], dtype=torch.float64)

    def observe(self, counts, correct) -> dict[int, float]:
        """Fold one epoch's rollouts into p_N: ``counts`` (n,) requested counts, ``correct`` (n,) strict
        correctness in [0, 1]. Returns this epoch's acc_N per count seen."""
        counts = np.asarray(counts, dtype=np.int64)
        correct = np.asarray(correct, dtype=np.float64)
        if counts.ndim != 1 or correct.shape != counts.shape:
            raise ValueError(f"counts {counts.shape} and correct {correct.shape} must both have shape (n,)")
        if correct.size and not (np.isfinite(correct).all() and correct.min() >= 0 and correct.max() <= 1):
            raise ValueError(f"strict correctness must lie in [0, 1], got min {correct.min()}, max {correct.max()}")
        acc = {}
        for n in np.unique(counts):
            a = float(correct[counts == n].mean())
            acc[int(n)] = a
            self.p[int(n)] = (1 - self.ema) * self.count_p(n) + self.ema * a
        return acc

    def log_row(self, prefix: str = "curriculum") -> dict[str, float]:
        """{'<prefix>_p<N>': p_N, '<prefix>_w<N>': w_N} for every count of the prompt set."""
        out = {}
        for n in np.unique(self.counts):
            out[f"{prefix}_p{n}"] = self.count_p(n)
            out[f"{prefix}_w{n}"] = self.count_weight(n)
        return out

    def state_dict(self) -> dict:
        return {"p": {int(k): float(v) for k, v in self.p.items()}, "floor": self.floor, "ema": self.ema,
                "group_size": self.group_size}

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict) or "p" not in state:
            raise ValueError(f"curriculum state must be a dict with key 'p', got {state!r}")
        self.p = {int(k): float(v) for k, v in state["p"].items()}
