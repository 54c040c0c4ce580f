r"""Rollouts: sample a batch of trajectories with per-step log-probs from any policy, and re-score them.

One rollout runs the policy's sampler over the time grid t_0, ..., t_N (``convention_times``):

    v_i  = v_theta(x_{t_i}, t_i | c)          (``policy.velocity``, classifier-free guidance inside)
    x_{t_{i+1}}, log p_i, mu_i, s_i = sde_step_with_logprob(v_i, t_i, t_{i+1}, x_{t_i}, noise_level=a_i)

with a_i = ``noise_level`` on the SDE steps and 0 (the exact Euler / ODE step) elsewhere. Flow-GRPO
(flow_grpo_notes §1.4) stores every step's (x_t, x_t', log p, t); Flow-GRPO-Fast runs the SDE only on a
window [start, end) of steps and stores only those (``window=``). Evaluation samples with the ODE
(a = 0) and more steps (:func:`sample_images`).

| code                          | symbol                                                           |
|-------------------------------|------------------------------------------------------------------|
| ``latents[:, j]``             | x_{t_i}, the state before stored step j (i = ``step_indices[:, j]``) |
| ``next_latents[:, j]``        | x_{t_{i+1}}, the sampled next state                              |
| ``log_probs[:, j]``           | log p_old(x_{t_{i+1}} | x_{t_i}), per-element mean (B,)           |
| ``timesteps``/``next_timesteps`` | t_i, t_{i+1} in the policy's convention                        |
| ``stds[:, j]``                | s_i = sigma_t sqrt(|dt|) (``sde``) or sigma_t (``cps``)          |
| ``means[:, j]`` (optional)    | mu_old, for GRPO-Guard's RatioNorm                               |
| ``noise_level``               | a                                                                |
| ``guidance_scale``            | g in v = v_u + g (v_c - v_u)                                     |

Everything stored is float32 and exactly what was scored, so :func:`recompute_log_prob` at unchanged
weights reproduces ``log_probs`` bit for bit (ratio exactly 1; bf16 round-trips of stored latents
break this, upstream issues #104/#204).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import NamedTuple, Sequence

import numpy as np
import torch

from .policies.base import Cond, check_convention
from .sde import SDE_TYPES, convention_times, draw_noise, sde_step_with_logprob
from .seeding import stable_seed


# ------------------------------------------------------------------------------------------------
# The stored batch
# ------------------------------------------------------------------------------------------------
@dataclass
class Trajectories:
    """B sampled trajectories with T stored steps each (see the module table). Batch-first everywhere.

    Slicing ``traj[idx]`` (int, slice, bool mask or index tensor over the batch) keeps every field
    aligned, including ``cond`` and ``prompts``; ``Trajectories.cat`` concatenates batches.
    """

    latents: torch.Tensor          # (B, T, C, H, W) float32, x_t before each stored step
    next_latents: torch.Tensor     # (B, T, C, H, W) float32
    log_probs: torch.Tensor        # (B, T) float32
    timesteps: torch.Tensor        # (B, T) float32, t of each stored step (policy's convention)
    next_timesteps: torch.Tensor   # (B, T) float32, t_next
    step_indices: torch.Tensor     # (B, T) int64, index i of the step in the N-step grid
    stds: torch.Tensor             # (B, T) float32, per-step std of the transition
    cond: Cond                     # conditioning of the B samples (with the CFG uncond branch)
    final_latents: torch.Tensor    # (B, C, H, W) float32, x at the end of sampling
    images: np.ndarray | None      # uint8 (B, H, W, 3), or None when not decoded
    means: torch.Tensor | None = None   # (B, T, C, H, W) float32, only with store_means=True
    prompts: list[str] | None = None    # the prompts, when sampled from prompts
    # how the batch was sampled (the trainer re-scores with the same settings)
    convention: str = "noise_at_one"
    noise_level: float = 0.7
    sde_type: str = "sde"
    guidance_scale: float = 1.0
    num_steps: int = 0
    window: tuple[int, int] | None = None

    @property
    def t(self) -> torch.Tensor:
        return self.timesteps

    @property
    def t_next(self) -> torch.Tensor:
        return self.next_timesteps

    @property
    def dt(self) -> torch.Tensor:
        """(B, T) step size t_next - t in the policy's convention (negative for noise_at_one)."""
        return self.next_timesteps - self.timesteps

    @property
    def num_stored(self) -> int:
        return self.latents.shape[1]

    def __len__(self) -> int:
        return self.latents.shape[0]

    _BATCHED = ("latents", "next_latents", "log_probs", "timesteps", "next_timesteps", "step_indices",
                "stds", "final_latents", "means")

    def __getitem__(self, idx) -> "Trajectories":
        if isinstance(idx, int):
            idx = slice(idx, idx + 1)
        new = {name: (getattr(self, name)[idx] if getattr(self, name) is not None else None)
               for name in self._BATCHED}
        if self.images is not None:
            new["images"] = self.images[idx.cpu().numpy() if isinstance(idx, torch.Tensor) else idx]
        if self.prompts is not None:
            keep = np.arange(len(self))[idx.cpu().numpy() if isinstance(idx, torch.Tensor) else idx]
            new["prompts"] = [self.prompts[i] for i in np.atleast_1d(keep)]
        return replace(self, cond=self.cond[idx], **new)

    def to(self, device) -> "Trajectories":
        new = {name: (getattr(self, name).to(device) if getattr(self, name) is not None else None)
               for name in self._BATCHED}
        return replace(self, cond=self.cond.to(device), **new)

    @staticmethod
    def cat(trajs: Sequence["Trajectories"]) -> "Trajectories":
        """Concatenate batches sampled with the same settings (same T, convention, noise, ...)."""
        if not trajs:
            raise ValueError("Trajectories.cat needs at least one Trajectories, got an empty sequence")
        first = trajs[0]
        settings = ("convention", "noise_level", "sde_type", "guidance_scale", "num_steps", "window")
        for tr in trajs[1:]:
            diff = [s for s in settings if getattr(tr, s) != getattr(first, s)]
            if diff or tr.num_stored != first.num_stored:
                raise ValueError(f"cannot concatenate trajectories sampled with different settings: {diff or 'T'}")
        new = {}
        for name in Trajectories._BATCHED:
            vals = [getattr(tr, name) for tr in trajs]
            new[name] = None if any(v is None for v in vals) else torch.cat(vals)
        images = [tr.images for tr in trajs]
        prompts = [tr.prompts for tr in trajs]
        return replace(first, cond=Cond.cat([tr.cond for tr in trajs]),
                       images=None if any(i is None for i in images) else np.concatenate(images),
                       prompts=None if any(p is None for p in prompts) else sum(prompts, []), **new)


class RecomputedStep(NamedTuple):
    """One stored step re-scored by the current policy (:func:`recompute_log_prob`)."""

    log_prob: torch.Tensor   # (B,) float32, with grad through the policy when grad is enabled
    mean: torch.Tensor       # (B, C, H, W) float32, mu_theta(x_t)
    std: torch.Tensor        # (B,) float32, per-step std s (same as stored: it does not depend on theta)
    dt: torch.Tensor         # (B,) float32, t_next - t (for grpo_lib.sde.step_kl)


# ------------------------------------------------------------------------------------------------
# Sampling
# ------------------------------------------------------------------------------------------------
def _resolve_cond(policy, prompts, cond) -> tuple[Cond, list[str] | None]:
    if (prompts is None) == (cond is None):
        raise ValueError("pass exactly one of prompts (list[str]) or cond (a Cond from policy.encode)")
    if cond is None:
        if isinstance(prompts, str) or len(prompts) == 0:
            raise ValueError(f"prompts must be a non-empty list of strings, got {prompts!r}")
        prompts = list(prompts)
        cond = policy.encode(prompts)
    elif not isinstance(cond, Cond):
        raise ValueError(f"cond must be a grpo_lib.policies.base.Cond, got {type(cond).__name__}")
    return cond, prompts


def _check_window(window, num_steps: int):
    if window is None:
        return None
    if len(window) != 2:
        raise ValueError(f"window={window!r} must be (start, end), half-open")
    start, end = int(window[0]), int(window[1])
    if not 0 <= start < end <= num_steps:
        raise ValueError(f"window={window!r} must satisfy 0 <= start < end <= num_steps={num_steps}")
    return start, end


def sde_window(size: int, num_steps: int, *, window_range: tuple[int, int] | None = None,
               generator: torch.Generator | None = None) -> tuple[int, int]:
    """Flow-GRPO-Fast's random SDE window: start ~ U{r0, ..., r1 - size}, window = (start, start + size).

    ``window_range`` = (r0, r1) defaults to (0, num_steps - 1): the last, very sharp step is never in a
    window (upstream). One window per sampling batch; draw it with a generator shared by the batch.
    """
    r0, r1 = window_range if window_range is not None else (0, num_steps - 1)
    if not (isinstance(size, int) and size >= 1):
        raise ValueError(f"size={size!r} must be an int >= 1")
    if not 0 <= r0 < r1 <= num_steps or r1 - r0 < size:
        raise ValueError(f"window_range={(r0, r1)!r} must satisfy 0 <= r0 < r1 <= num_steps={num_steps} "
                         f"and hold size={size} steps")
    start = int(torch.randint(r0, r1 - size + 1, (1,), generator=generator))
    return start, start + size


@torch.no_grad()
def sample_trajectories(policy, prompts: Sequence[str] | None = None, *, cond: Cond | None = None,
                        num_steps: int, shift: float = 3.0, guidance_scale: float = 1.0,
                        noise_level: float = 0.7, sde_type: str = "sde",
                        window: tuple[int, int] | None = None,
                        generator: torch.Generator | Sequence[torch.Generator] | None = None,
                        initial_latents: torch.Tensor | None = None, decode: bool = True,
                        store_means: bool = False, progress: bool = False) -> Trajectories:
    """Sample B trajectories with log-probs (runs under ``torch.no_grad``).

    Args:
        policy: any :class:`grpo_lib.policies.base.Policy`; its ``convention`` picks the time grid.
        prompts / cond: the B prompts (encoded with ``policy.encode``) or an already-encoded ``Cond``.
        num_steps, shift: the grid ``convention_times(num_steps, shift, policy.convention)``.
        guidance_scale: CFG scale g passed to ``policy.velocity`` (1 = no CFG).
        noise_level, sde_type: the SDE step (``grpo_lib.sde.sde_step_with_logprob``); 0 = ODE everywhere.
        window: (start, end) half-open: SDE on steps start..end-1, ODE elsewhere, and only window steps are
            stored (Flow-GRPO-Fast; see :func:`sde_window`). None: every step is SDE and stored.
        generator: one torch.Generator for the batch, or a list of B (one per sample: then a sample's
            trajectory does not depend on the rest of its batch), used for the initial noise and every
            step's noise. Same generator state -> identical trajectories.
        initial_latents: (B, C, H, W) starting noise instead of drawing it.
        decode: also return ``policy.decode(final_latents)`` as uint8 images.
        store_means: also keep each stored step's mean mu_old (GRPO-Guard needs it; memory = latents).
        progress: a tqdm bar over the steps.
    """
    # sde_type / noise_level: checked by sde_step_with_logprob at the first SDE step (window is never empty)
    convention = check_convention(policy.convention)
    window = _check_window(window, num_steps)
    cond, prompts = _resolve_cond(policy, prompts, cond)
    batch, device = len(cond), policy.device
    if initial_latents is None:
        x = draw_noise((batch, *policy.latent_shape), generator, device)      # (B, C, H, W)
    else:
        if tuple(initial_latents.shape) != (batch, *policy.latent_shape):
            raise ValueError(f"initial_latents has shape {tuple(initial_latents.shape)}; expected "
                             f"({batch}, {', '.join(map(str, policy.latent_shape))})")
        x = initial_latents.to(device=device, dtype=torch.float32)
    times = convention_times(num_steps, shift, convention).to(device)                 # (N+1,)

    steps = range(num_steps)
    if progress:
        from tqdm.auto import tqdm
        steps = tqdm(steps, desc="sampling", leave=False)
    start, end = window if window is not None else (0, num_steps)
    lat, nxt, lps, ts, tns, stds, means = [], [], [], [], [], [], []
    for i in steps:
        t = times[i].expand(batch)                                                     # (B,)
        t_next = times[i + 1].expand(batch)                                            # (B,)
        sde_step = start <= i < end
        a = noise_level if sde_step else 0.0
        v = policy.velocity(x, t, cond, guidance_scale)                               # (B, C, H, W)
        x_next, log_prob, mean, std = sde_step_with_logprob(
            v, t, t_next, x, noise_level=a, generator=generator if a > 0 else None,
            sde_type=sde_type, convention=convention)
        if sde_step:   # stored exactly as scored: float32, no dtype round trip
            lat.append(x)
            nxt.append(x_next)
            lps.append(log_prob)
            ts.append(t)
            tns.append(t_next)
            stds.append(std.reshape(batch))
            if store_means:
                means.append(mean)
        x = x_next

    idx = torch.arange(start, end, device=device).expand(batch, -1)                   # (B, T)
    return Trajectories(
        latents=torch.stack(lat, 1), next_latents=torch.stack(nxt, 1), log_probs=torch.stack(lps, 1),
        timesteps=torch.stack(ts, 1), next_timesteps=torch.stack(tns, 1), step_indices=idx.clone(),
        stds=torch.stack(stds, 1), cond=cond, final_latents=x,
        images=policy.decode(x) if decode else None,
        means=torch.stack(means, 1) if store_means else None, prompts=prompts,
        convention=convention, noise_level=float(noise_level), sde_type=sde_type,
        guidance_scale=float(guidance_scale), num_steps=int(num_steps), window=window)


@torch.no_grad()
def sample_images(policy, prompts: Sequence[str] | None = None, *, cond: Cond | None = None,
                  num_steps: int = 40, shift: float = 3.0, guidance_scale: float = 1.0,
                  generator: torch.Generator | Sequence[torch.Generator] | None = None,
                  initial_latents: torch.Tensor | None = None, decode: bool = True,
                  progress: bool = False) -> tuple[torch.Tensor, np.ndarray | None]:
    """Evaluation sampling: the deterministic ODE (Euler, noise_level 0) with more steps (upstream: 40).

    Nothing per step is stored. Returns ``(final_latents (B, C, H, W) float32, uint8 images or None)``.
    The generator only draws the initial noise.
    """
    convention = check_convention(policy.convention)
    cond, _ = _resolve_cond(policy, prompts, cond)
    batch, device = len(cond), policy.device
    if initial_latents is None:
        x = draw_noise((batch, *policy.latent_shape), generator, device)
    else:
        if tuple(initial_latents.shape) != (batch, *policy.latent_shape):
            raise ValueError(f"initial_latents has shape {tuple(initial_latents.shape)}; expected "
                             f"({batch}, {', '.join(map(str, policy.latent_shape))})")
        x = initial_latents.to(device=device, dtype=torch.float32)
    times = convention_times(num_steps, shift, convention).to(device)
    steps = range(num_steps)
    if progress:
        from tqdm.auto import tqdm
        steps = tqdm(steps, desc="sampling (ODE)", leave=False)
    for i in steps:
        t, t_next = times[i].expand(batch), times[i + 1].expand(batch)
        v = policy.velocity(x, t, cond, guidance_scale)
        x, _, _, _ = sde_step_with_logprob(v, t, t_next, x, noise_level=0.0, convention=convention)
    return x, (policy.decode(x) if decode else None)


# ------------------------------------------------------------------------------------------------
# Re-scoring stored steps (the trainer's forward pass)
# ------------------------------------------------------------------------------------------------
def recompute_log_prob(policy, traj: Trajectories, columns, *, samples=None,
                       guidance_scale: float | None = None, noise_level: float | None = None,
                       sde_type: str | None = None) -> RecomputedStep:
    """Re-run the policy on stored (x_t, t) and score the stored x_t' under the step's Gaussian.

        log p_theta(x_t' | x_t) = sde_step_with_logprob(v_theta(x_t, t), t, t', x_t, prev_sample=x_t')

    Runs with whatever grad mode the caller has (the trainer: enabled; the KL reference: call it inside
    ``with policy.reference(), torch.no_grad():``). At unchanged weights, on the same batch, it
    reproduces ``traj.log_probs`` exactly (ratio == 1).

    Args:
        columns: which stored step to score, as an index into the T stored columns (not the schedule
            index; see ``traj.step_indices``): an int for every sample, or a LongTensor (B,) with one
            column per sample (per-sample timestep orders, as the counting fork's ``random`` strategy).
        samples: optional batch index (slice, index tensor) to score a minibatch of ``traj``.
        guidance_scale, noise_level, sde_type: default to the rollout's own settings.
    """
    if samples is not None:
        traj = traj[samples]
    batch, num_stored = len(traj), traj.num_stored
    device = traj.latents.device
    if isinstance(columns, (int, np.integer)) and not isinstance(columns, bool):
        if not 0 <= int(columns) < num_stored:
            raise ValueError(f"columns={columns} is out of range for {num_stored} stored steps")
        cols = torch.full((batch,), int(columns), dtype=torch.long, device=device)
    elif isinstance(columns, torch.Tensor) and columns.dtype in (torch.int64, torch.int32) and columns.shape == (batch,):
        cols = columns.to(device=device, dtype=torch.long)
        if (cols < 0).any() or (cols >= num_stored).any():
            raise ValueError(f"columns={cols.tolist()} has entries outside [0, {num_stored})")
    else:
        raise ValueError(f"columns must be an int or an integer tensor of shape ({batch},), got {columns!r}")
    rows = torch.arange(batch, device=device)
    x = traj.latents[rows, cols]                                                       # (B, C, H, W)
    x_next = traj.next_latents[rows, cols]                                             # (B, C, H, W)
    t, t_next = traj.timesteps[rows, cols], traj.next_timesteps[rows, cols]          # (B,)
    g = traj.guidance_scale if guidance_scale is None else guidance_scale
    a = traj.noise_level if noise_level is None else noise_level
    kind = traj.sde_type if sde_type is None else sde_type
    v = policy.velocity(x, t, traj.cond, g)
    _, log_prob, mean, std = sde_step_with_logprob(v, t, t_next, x, noise_level=a, prev_sample=x_next,
                                                   sde_type=kind, convention=traj.convention)
    return RecomputedStep(log_prob, mean, std.reshape(batch), t_next - t)


# ------------------------------------------------------------------------------------------------
# Evaluation images for prompt rows (fixed seeds: every stage sees the same initial noise)
# ------------------------------------------------------------------------------------------------
def eval_seed(seed: int, prompt: str, k: int) -> int:
    """Seed of the k-th evaluation image of ``prompt``: independent of batching and of the model,
    so base, cold start and GRPO are compared on identical initial noise."""
    return stable_seed(f"{seed}/{k}/{prompt}")


@torch.no_grad()
def sample_pairs(policy, pairs: Sequence[tuple[dict, int]], *, num_steps: int = 20, shift: float = 1.0,
                 guidance_scale: float = 1.0, seed: int = 0) -> np.ndarray:
    """ODE-sample one batch: image k of row r for every (r, k) in ``pairs``, from the noise of
    ``eval_seed(seed, r["prompt"], k)``; returns uint8 (len(pairs), H, W, 3)."""
    gens = [torch.Generator().manual_seed(eval_seed(seed, r["prompt"], k)) for r, k in pairs]
    _, img = sample_images(policy, [r["prompt"] for r, _ in pairs], num_steps=num_steps, shift=shift,
                           guidance_scale=guidance_scale, generator=gens)
    return img


def eval_pairs(rows: Sequence[dict], images_per_prompt: int) -> list[tuple[dict, int]]:
    """(row, k) for every evaluation image, prompt-major: the order of ``sample_for_rows``'s images."""
    if images_per_prompt < 1:
        raise ValueError(f"images_per_prompt={images_per_prompt} must be >= 1")
    if not rows:
        raise ValueError("sample_for_rows got no rows")
    return [(r, k) for r in rows for k in range(images_per_prompt)]


def sample_for_rows(policy, rows: Sequence[dict], *, images_per_prompt: int = 4, num_steps: int = 20,
                    shift: float = 1.0, guidance_scale: float = 1.0, seed: int = 0, batch_size: int = 64,
                    progress: bool = False) -> tuple[np.ndarray, list[dict]]:
    """ODE-sample ``images_per_prompt`` images for every row; returns uint8 (N, H, W, 3) and the N rows
    (each row repeated per image, in order). Image k of a prompt always starts from the same noise.
    ``grpo_lib.sharded_sampling`` runs the same batches on several processes."""
    flat = eval_pairs(rows, images_per_prompt)
    chunks = range(0, len(flat), batch_size)
    if progress:
        from tqdm.auto import tqdm
        chunks = tqdm(chunks, desc="evaluation images", leave=False)
    images = [sample_pairs(policy, flat[i:i + batch_size], num_steps=num_steps, shift=shift,
                           guidance_scale=guidance_scale, seed=seed) for i in chunks]
    return np.concatenate(images), [r for r, _ in flat]
