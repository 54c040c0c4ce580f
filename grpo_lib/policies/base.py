"""The policy contract shared by every world (design.md §4).

A policy is everything the Flow-GRPO machinery needs from a text-to-image flow model:

| method / attribute                         | meaning                                                        |
|--------------------------------------------|----------------------------------------------------------------|
| ``convention``                             | ``"noise_at_one"`` (SD3: x_t=(1-t)x_0+t eps) or ``"noise_at_zero"`` (Show-o2) |
| ``latent_shape``                           | (C, H, W) of one latent                                        |
| ``device``, ``dtype``                      | where / in which precision the network runs                   |
| ``encode(prompts) -> Cond``                | prompt conditioning; also holds the empty-prompt (CFG) branch |
| ``velocity(x_t, t, cond, guidance_scale)`` | v_theta(x_t, t) in the policy's own convention, CFG applied   |
| ``decode(latents) -> uint8 (B, H, W, 3)``  | latents to images (identity codec in the embedded world)      |
| ``trainable_parameters()``                 | the parameters GRPO updates (LoRA, or the Show-o2 head)       |
| ``reference()``                            | context manager: inside it the policy is the frozen reference |
| ``has_frozen_reference``                   | True when ``reference()`` swaps in a frozen copy of the trained weights it keeps itself (Show-o2); False when it switches a LoRA off, so a trainer training the weights themselves keeps its own :class:`FrozenReference` |
| ``save_lora(directory)``                   | write the trained adapter (``ValueError`` when the policy trains no LoRA) |
| ``train_mode(on)``                         | set the networks' train / eval mode for the update (every shipped policy stays in eval: no dropout, so the recomputed log-prob equals the rollout's) |

``t`` is always the convention's own time in [0, 1], a float or a per-sample tensor of shape (B,).
The rollout and GRPO code only ever talk to this interface, so a test can swap in an analytic
velocity field and the tiny, SD3 and Show-o2 policies share one training loop.
"""
from __future__ import annotations

import contextlib
import math
import re
from dataclasses import dataclass, field
from typing import Iterator, Protocol, Sequence, runtime_checkable

import numpy as np
import torch

from grpo_lib.sde import CONVENTIONS, check_convention  # noqa: F401  (one definition, re-exported for policies)



@dataclass
class Cond:
    """Batch-first conditioning tensors for B prompts, plus their unconditional (empty prompt) twins.

    ``tensors`` and ``uncond`` map names to tensors whose first dimension is the batch (B, ...).
    ``uncond`` may be empty for a policy that does no classifier-free guidance.
    Slicing (``cond[idx]``) and ``Cond.cat`` keep cond and uncond aligned, so the rollout can
    store conditioning per sample and the trainer can re-batch it.
    """

    tensors: dict[str, torch.Tensor]
    uncond: dict[str, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return next(iter(self.tensors.values())).shape[0]

    def __getitem__(self, idx) -> "Cond":
        if isinstance(idx, int):
            idx = slice(idx, idx + 1)
        return Cond({k: v[idx] for k, v in self.tensors.items()},
                    {k: v[idx] for k, v in self.uncond.items()})

    def to(self, device=None, dtype=None) -> "Cond":
        def move(v: torch.Tensor) -> torch.Tensor:
            # integer tensors (token ids, masks) keep their dtype
            return v.to(device=device, dtype=dtype if (dtype is not None and v.is_floating_point()) else None)
        return Cond({k: move(v) for k, v in self.tensors.items()},
                    {k: move(v) for k, v in self.uncond.items()})

    @staticmethod
    def cat(conds: Sequence["Cond"]) -> "Cond":
        if not conds:
            raise ValueError("Cond.cat needs at least one Cond, got an empty sequence")
        keys, ukeys = conds[0].tensors.keys(), conds[0].uncond.keys()
        return Cond({k: torch.cat([c.tensors[k] for c in conds]) for k in keys},
                    {k: torch.cat([c.uncond[k] for c in conds]) for k in ukeys})


@runtime_checkable
class Policy(Protocol):
    convention: str
    latent_shape: tuple[int, int, int]

    @property
    def device(self) -> torch.device: ...

    @property
    def dtype(self) -> torch.dtype: ...

    def encode(self, prompts: Sequence[str]) -> Cond: ...

    def velocity(self, x_t: torch.Tensor, t: torch.Tensor | float, cond: Cond,
                 guidance_scale: float = 1.0) -> torch.Tensor: ...

    def decode(self, latents: torch.Tensor) -> np.ndarray: ...

    def trainable_parameters(self) -> list[torch.nn.Parameter]: ...

    def reference(self) -> contextlib.AbstractContextManager: ...

    @property
    def has_frozen_reference(self) -> bool: ...

    def save_lora(self, directory) -> object: ...

    def train_mode(self, on: bool) -> None: ...


def check_velocity_args(x_t, cond: "Cond", guidance_scale, latent_shape: Sequence[int] | None = None) -> int:
    """The ``velocity(x_t, t, cond, guidance_scale)`` contract's argument checks; returns the batch size B.

    x_t: a tensor (B, C, H, W) (of shape (B, *latent_shape) when given); cond: a :class:`Cond` of B rows;
    guidance_scale: a finite number >= 0 (1 = no CFG). Each failure is a ValueError naming the value.
    """
    if latent_shape is not None:
        if not isinstance(x_t, torch.Tensor) or x_t.dim() != 4 or tuple(x_t.shape[1:]) != tuple(latent_shape):
            raise ValueError(f"x_t must be a tensor of shape (B, {', '.join(map(str, latent_shape))}), got "
                             f"{tuple(x_t.shape) if isinstance(x_t, torch.Tensor) else type(x_t).__name__}")
    elif not (isinstance(x_t, torch.Tensor) and x_t.is_floating_point() and x_t.ndim == 4):
        raise ValueError(f"x_t must be a float tensor (B, C, h, w), got "
                         f"{type(x_t).__name__} {tuple(getattr(x_t, 'shape', ()))}")
    B = x_t.shape[0]
    if not isinstance(cond, Cond) or len(cond) != B:
        raise ValueError(f"cond holds {len(cond) if isinstance(cond, Cond) else type(cond).__name__} prompts "
                         f"but x_t holds {B} samples: cond must be a Cond with {B} rows (one per sample)")
    if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)) \
            or not math.isfinite(guidance_scale) or guidance_scale < 0:
        raise ValueError(f"guidance_scale={guidance_scale!r} must be a finite number >= 0 (1 = no CFG)")
    return B


def apply_cfg(v_uncond: torch.Tensor, v_cond: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """Classifier-free guidance: v = v_u + g (v_c - v_u)  (upstream Flow-GRPO / SD3 pipeline)."""
    return v_uncond + guidance_scale * (v_cond - v_uncond)


@contextlib.contextmanager
def adapters_disabled(model) -> Iterator[None]:
    """Run ``model`` (a diffusers model with a peft adapter) with its LoRA switched off.

    diffusers exposes ``disable_adapters()`` / ``enable_adapters()`` but no context manager; the
    ``finally`` re-enables the adapter even if the body raises, so a crash inside the reference
    pass cannot leave training running on the base weights.
    """
    model.disable_adapters()
    try:
        yield
    finally:
        model.enable_adapters()


def lora_config(lora, defaults: dict):
    """The peft ``LoraConfig`` for ``lora``: None -> ``defaults``; a dict -> ``defaults`` updated by the dict
    (keys must be ``LoraConfig`` fields); a ``LoraConfig`` -> itself. Each policy passes its own defaults."""
    import dataclasses

    from peft import LoraConfig

    if isinstance(lora, LoraConfig):
        return lora
    if lora is None:
        lora = {}
    if not isinstance(lora, dict):
        raise ValueError(f"lora={lora!r} must be None (defaults {defaults}), a dict of LoraConfig fields "
                         "or a peft LoraConfig")
    valid = {f.name for f in dataclasses.fields(LoraConfig)}
    unknown = sorted(set(lora) - valid)
    if unknown:
        raise ValueError(f"lora has unknown LoraConfig key(s) {unknown}; valid keys are {sorted(valid)}")
    return LoraConfig(**{**defaults, **lora})


def images_to_uint8(x: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] -> uint8 (B, H, W, 3), rounding like diffusers' image processor."""
    x = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


class FrozenReference:
    """Frozen copies of trainable weights, swapped in to evaluate the reference policy.

    Used when the network's own weights train (full or head-only finetuning), where there is no
    adapter to switch off: ``with ref.swapped_in(): ...`` runs the initial weights and restores the
    live ones afterwards, even if the body raises.
    """

    def __init__(self, params: list[torch.nn.Parameter]):
        self.params = params
        self.frozen = [q.detach().clone() for q in params]

    def swapped_in(self):
        @contextlib.contextmanager
        def cm():
            live = [q.detach().clone() for q in self.params]
            with torch.no_grad():
                for q, f in zip(self.params, self.frozen):
                    q.copy_(f)
            try:
                yield
            finally:
                with torch.no_grad():
                    for q, l in zip(self.params, live):
                        q.copy_(l)
        return cm()


def select_trainable(module: torch.nn.Module, trainable: str) -> list[str]:
    """Freeze ``module`` except the parameters ``trainable`` names ('all' or 'pattern:<regex>');
    returns the trainable names. A pattern that matches nothing is an error naming it."""
    names = [n for n, _ in module.named_parameters()]
    if trainable == "all":
        chosen = names
    else:
        rx = re.compile(trainable.split(":", 1)[1])
        chosen = [n for n in names if rx.search(n)]
        if not chosen:
            raise ValueError(f"trainable={trainable!r} matches no parameter; names look like {names[:3]}")
    keep = set(chosen)
    for n, q in module.named_parameters():
        q.requires_grad_(n in keep)
    return chosen
