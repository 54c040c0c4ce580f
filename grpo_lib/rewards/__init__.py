"""Rewards by name, and weighted sums of them (design.md section 4).

    reward = build_reward({"counting_strict": 1.0, "counting_shaped": 0.5})
    r, info = reward(images_uint8 (B, H, W, 3), prompts, metadata)     # r: float32 (B,)

r = sum_k w_k r_k. ``info`` of a sum holds

- every per-image measurement of the counting parts **unprefixed** (``count``, ``target``,
  ``correct``, ``error``, ``confidence``, ``background_fidelity``, ``area_quality``,
  ``shape_match``, ``quality``, ...): they are the same for all counting rewards, measured once
  by one detector pass and shared (:func:`grpo_lib.rewards.counting.measure_counting`);
- ``reward/<name>``: each part's own (unweighted) reward, so logs show what each term did;
- ``<name>/<key>`` for the info of any part that is not a counting reward (e.g. a future remote
  scorer), prefixed because such keys could collide.

Registered: ``counting_strict``, ``counting_partial``, ``counting_shaped`` (see counting.py). An
unknown name is a ValueError listing these. ``register`` adds a factory
``(detector=..., **options) -> reward``.
"""
from __future__ import annotations

import math
from typing import Callable, Mapping

import numpy as np

from grpo_lib.rewards.counting import (CountingPartial, CountingReward, CountingShaped, CountingStrict,
                                       measure_counting)
from grpo_lib.rewards.detector import ShapeCounter

RewardFn = Callable[..., tuple[np.ndarray, dict]]
REGISTRY: dict[str, Callable[..., RewardFn]] = {}


def register(name: str, factory: Callable[..., RewardFn]) -> None:
    if name in REGISTRY:
        raise ValueError(f"reward {name!r} is already registered")
    REGISTRY[name] = factory


def available_rewards() -> list[str]:
    return sorted(REGISTRY)


register("counting_strict", CountingStrict)
register("counting_partial", CountingPartial)
register("counting_shaped", CountingShaped)


class WeightedReward:
    """r = sum_k w_k r_k over named parts; counting parts share one measurement pass."""

    def __init__(self, parts: dict[str, RewardFn], weights: dict[str, float], detector: ShapeCounter):
        self.parts, self.weights, self.detector = parts, weights, detector

    def __call__(self, images, prompts, metadata) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        info: dict[str, np.ndarray] = {}
        total = None
        measures = None
        for name, fn in self.parts.items():
            if isinstance(fn, CountingReward):
                if measures is None:
                    measures = measure_counting(images, prompts, metadata, self.detector)
                    info.update(measures)
                r = fn.from_measures(measures).astype(np.float32)
            else:
                r, part_info = fn(images, prompts, metadata)
                r = np.asarray(r, np.float32)
                info.update({f"{name}/{k}": v for k, v in part_info.items()})
            info[f"reward/{name}"] = r
            total = self.weights[name] * r if total is None else total + self.weights[name] * r
        return total.astype(np.float32), info

    def __repr__(self) -> str:
        return "WeightedReward(" + ", ".join(f"{k}={w}" for k, w in self.weights.items()) + ")"


def build_reward(weights: Mapping[str, float] | str, *, detector: ShapeCounter | None = None,
                 options: Mapping[str, Mapping] | None = None) -> WeightedReward:
    """One callable for ``{name: weight}`` (or a single name, weight 1).

    ``options[name]`` are keyword arguments for that reward's factory (e.g.
    ``{"counting_shaped": {"tau": 2.0}}``); ``detector`` is shared by all counting parts.
    """
    if isinstance(weights, str):
        weights = {weights: 1.0}
    if not isinstance(weights, Mapping) or not weights:
        raise ValueError(f"reward weights must be a non-empty mapping name -> weight, got {weights!r}; "
                         f"registered rewards: {available_rewards()}")
    unknown = sorted(set(weights) - set(REGISTRY))
    if unknown:
        raise ValueError(f"unknown reward(s) {unknown}; registered rewards: {available_rewards()}")
    options = dict(options or {})
    bad_opts = sorted(set(options) - set(weights))
    if bad_opts:
        raise ValueError(f"options given for reward(s) {bad_opts} that are not in the weights {sorted(weights)}")
    clean: dict[str, float] = {}
    for k, w in weights.items():
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
            raise ValueError(f"weight for reward {k!r} is {w!r}; expected a finite number")
        clean[k] = float(w)
    detector = detector or ShapeCounter()
    parts = {}
    for name in clean:
        factory = REGISTRY[name]
        kwargs = dict(options.get(name, {}))
        try:
            parts[name] = factory(detector=detector, **kwargs)
        except TypeError as e:
            raise ValueError(f"bad options {kwargs} for reward {name!r}: {e}") from e
    return WeightedReward(parts, clean, detector)


__all__ = ["REGISTRY", "register", "available_rewards", "build_reward", "WeightedReward", "ShapeCounter",
           "measure_counting"]
