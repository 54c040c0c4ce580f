"""Learning-rate schedules shared by the cold start (per optimizer step) and the RL trainer (per epoch):
:func:`learning_rate` gives the equations.

A decaying lr is the usual answer to a run that peaks and then drifts (the AWM long run, results/long_run/):
the last epochs move the weights less, so the end of a time budget is not its most aggressive part.
"""
from __future__ import annotations

import math

LR_SCHEDULES = ("constant", "cosine")


def learning_rate(step: int, lr: float, warmup_steps: int, total_steps: int, schedule: str = "constant") -> float:
    r"""The lr of step ``step`` (0-based) of ``total_steps`` (S), after ``warmup_steps`` (W) of linear warmup.

        warmup (k < W):  lr (k + 1) / W
        constant:        lr
        cosine:          lr (1 + cos(pi (k - W) / (S - W))) / 2      (lr at k = W, 0 at k >= S)
    """
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"schedule={schedule!r} is not one of {LR_SCHEDULES}")
    if warmup_steps and step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "constant" or total_steps <= warmup_steps:
        return lr
    return lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))))
