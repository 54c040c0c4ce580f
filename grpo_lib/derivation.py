r"""Helpers for notebooks/00_derivation_checks: the Show-o2 write-up's formulas, transcribed literally,
a sampler loop for analytic velocity fields, and two-sample statistics.

The write-up (seed 003) works in Show-o2's convention (noise_at_zero: x_t = (1-t) x_noise + t x_data):

    (score identity)  grad log p_t(x) = t/(1-t) v_t(x) - x/(1-t)
    (SDE)             dx = [v + sigma_t^2/2 grad log p_t] dt + sigma_t dw
    (drift)           f(x, t) = v + sigma_t^2 t / (2(1-t)) v - sigma_t^2 / (2(1-t)) x
    (Euler)           x_{t+dt} = (1 - sigma_t^2 dt / (2(1-t))) x + (1 + sigma_t^2 t / (2(1-t))) v dt + sqrt(dt) sigma_t w
    (noise)           sigma_t = a sqrt((1-t)/t)

(the write-up's Euler line has a typo "2(1=t)" for 2(1-t)). SD3's mirror (noise_at_one, t -> 1-t,
v -> -v): grad log p_t(x) = -(x + (1-t) v)/t, sigma_t = a sqrt(t/(1-t)).

These transcriptions are deliberately independent of :mod:`grpo_lib.sde` (which is written in the
SD3 form) so that the notebook can check one against the other. ``score_sign=-1`` flips the score
term of the drift: a deliberately wrong sampler the marginal check must reject.

| code           | symbol                        |
|----------------|-------------------------------|
| ``noise_level``| a                             |
| ``sigma_t``    | sigma_t (SDE diffusion coef.) |
| ``v``          | v_t(x) (Show-o2 sign)         |
| ``t``, ``dt``  | Show-o2 time and step (> 0)   |
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from grpo_lib.params import check_knobs
from .sde import check_convention, sde_step_with_logprob


# ------------------------------------------------------------------------------------------------
# params of notebooks/00_derivation_checks.ipynb (field names == its parameters cell)
# ------------------------------------------------------------------------------------------------
@dataclass
class DerivationParams:
    run_dir: str = "runs/dev"                 # where outputs go
    seed: int = 0                             # master seed for every random draw
    n_points: int = 256                       # random (x, t) points for the pointwise identities
    identity_atol: float = 1e-8               # float64 pointwise identities (score, drift)
    step_rtol: float = 1e-5                   # float32 project step vs float64 write-up transcription
    chain_rtol: float = 1e-3                  # float32 chains in the two conventions (rounding accumulates)
    n_samples: int = 1000                     # samples per distribution in the marginal check
    num_steps: int = 50                       # sampling steps (time grid = convention_times)
    shift: float = 3.0                        # schedule shift of the sampling grid (SD3 uses 3)
    noise_levels: list[float] = field(default_factory=lambda: [0.3, 0.7, 1.0])  # SDE noise levels a
    wrong_drift_noise_level: float = 0.7      # a for the flipped-score sampler that must be rejected
    null_repeats: int = 20                    # exact-vs-exact energy distances for calibration
    tol_sd: float = 5.0                       # tolerance = null mean + tol_sd * null std
    n_plot: int = 1000                        # points per panel in the samples plot

    def __post_init__(self):
        check_knobs(self)
        for name in ("n_points", "n_plot"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r} must be >= 1")
        if self.n_samples < 10:
            raise ValueError(f"n_samples={self.n_samples!r} is too few for a two-sample statistic; expected >= 10")
        if self.null_repeats < 3:
            raise ValueError(f"null_repeats={self.null_repeats!r} cannot give a null std; expected >= 3")
        for name in ("identity_atol", "step_rtol", "chain_rtol", "tol_sd"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}={getattr(self, name)!r} must be > 0")
        if not self.noise_levels or any(a < 0 for a in self.noise_levels):
            raise ValueError(f"noise_levels={self.noise_levels!r} must be a non-empty list of floats >= 0")
        if not self.wrong_drift_noise_level > 0:
            raise ValueError(f"wrong_drift_noise_level={self.wrong_drift_noise_level!r} must be > 0 "
                             "(at 0 the score term vanishes and there is nothing to get wrong)")


# ------------------------------------------------------------------------------------------------
# the write-up, transcribed (Show-o2 convention)
# ------------------------------------------------------------------------------------------------
def score_from_velocity(v: torch.Tensor, x: torch.Tensor, t, convention: str = "noise_at_zero") -> torch.Tensor:
    """grad log p_t(x) from the velocity: t/(1-t) v - x/(1-t) (noise_at_zero), -(x + (1-t) v)/t (noise_at_one)."""
    check_convention(convention)
    t = _col(t, x)
    if convention == "noise_at_zero":
        return t / (1 - t) * v - x / (1 - t)
    return -(x + (1 - t) * v) / t


def writeup_sigma(t, noise_level: float, t_stand_in=None) -> torch.Tensor:
    """sigma_t = a sqrt((1-t)/t); where t == 0 (pure noise) ``t_stand_in`` replaces t in the denominator."""
    t = torch.as_tensor(t, dtype=torch.float64)
    den = t if t_stand_in is None else torch.where(t == 0, torch.as_tensor(t_stand_in, dtype=torch.float64), t)
    return noise_level * torch.sqrt((1 - t) / den)


def writeup_drift(x: torch.Tensor, v: torch.Tensor, t, noise_level: float, score_sign: float = 1.0,
                  t_stand_in=None) -> torch.Tensor:
    """f = v + s*(sigma_t^2 t / (2(1-t)) v - sigma_t^2 / (2(1-t)) x), s = score_sign (+1 is the write-up)."""
    t_ = _col(t, x)
    s2 = _col(writeup_sigma(t, noise_level, t_stand_in), x) ** 2
    return v + score_sign * (s2 * t_ / (2 * (1 - t_)) * v - s2 / (2 * (1 - t_)) * x)


def writeup_euler_step(x: torch.Tensor, v: torch.Tensor, t, t_next, noise_level: float, *,
                       score_sign: float = 1.0, generator: torch.Generator | None = None):
    """One step of the write-up's Euler form; returns (x_next, mean, std). Pure noise end: t_next stands in."""
    t_, tn_ = _col(t, x), _col(t_next, x)
    dt = tn_ - t_
    if (dt <= 0).any():
        raise ValueError(f"t_next must be > t in the Show-o2 convention; got t={t}, t_next={t_next}")
    s2 = _col(writeup_sigma(t, noise_level, t_stand_in=t_next), x) ** 2
    mean = ((1 - score_sign * s2 * dt / (2 * (1 - t_))) * x
            + (1 + score_sign * s2 * t_ / (2 * (1 - t_))) * v * dt)
    std = torch.sqrt(s2 * dt)
    if noise_level == 0:
        return mean, mean, std
    w = torch.randn(x.shape, generator=generator, dtype=x.dtype)
    return mean + std * w, mean, std


def _col(t, x: torch.Tensor) -> torch.Tensor:
    """float or (N,) -> (N, 1, ...) broadcasting against x (N, ...), in x's dtype."""
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    if t.dim() == 0:
        return t
    return t.reshape(t.shape[0], *([1] * (x.dim() - 1)))


# ------------------------------------------------------------------------------------------------
# autograd references
# ------------------------------------------------------------------------------------------------
def autograd_score(log_density: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """grad_x log p(x) by autograd of an exact log-density ``log_density(x) -> (N,)``; x (N, D)."""
    x = x.detach().clone().requires_grad_(True)
    (g,) = torch.autograd.grad(log_density(x).sum(), x)
    return g


def continuity_residual(mixture, x: torch.Tensor, t: torch.Tensor, convention: str) -> torch.Tensor:
    r"""d/dt log p_t(x) + div v_t(x) + v_t(x) . grad log p_t(x), by autograd; (N,). Zero iff v transports p_t.

    The continuity equation dp/dt + div(p v) = 0, divided by p. ``mixture`` provides ``log_prob`` and
    ``velocity`` (:class:`grpo_lib.gaussian_mixture.GaussianMixture`); x (N, D), t (N,) float64.
    """
    x = x.detach().clone().requires_grad_(True)
    t = t.detach().clone().to(torch.float64).requires_grad_(True)
    logp = mixture.log_prob(x, t, convention)                                 # (N,)
    dlogp_dx, dlogp_dt = torch.autograd.grad(logp.sum(), (x, t))
    v = mixture.velocity(x, t.detach(), convention)                          # (N, D)
    div = sum(torch.autograd.grad(v[:, i].sum(), x, retain_graph=True)[0][:, i] for i in range(x.shape[1]))
    return (dlogp_dt + div + (v * dlogp_dx).sum(-1)).detach()


# ------------------------------------------------------------------------------------------------
# sampling with an analytic velocity field
# ------------------------------------------------------------------------------------------------
def integrate(velocity_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x_init: torch.Tensor,
              times: torch.Tensor, *, noise_level: float, convention: str = "noise_at_one",
              sde_type: str = "sde", generator: torch.Generator | None = None,
              sampler: str = "project", score_sign: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Run a sampling chain over ``times`` (convention's own, in sampling order) from ``x_init``.

    ``velocity_fn(x, t)`` is the 'model' (t a float). ``sampler="project"`` uses
    :func:`grpo_lib.sde.sde_step_with_logprob`; ``"writeup"`` uses :func:`writeup_euler_step`
    (Show-o2 convention only; ``score_sign=-1`` gives the wrong drift).
    Returns (final x (N, D) float32/float64, summed log-probs (N,)).
    """
    if sampler not in ("project", "writeup"):
        raise ValueError(f"sampler={sampler!r} is not one of ('project', 'writeup')")
    if sampler == "writeup" and convention != "noise_at_zero":
        raise ValueError(f"sampler='writeup' is written in Show-o2's convention; got convention={convention!r}")
    x = x_init
    total = torch.zeros(x.shape[0], dtype=torch.float64)
    for i in range(len(times) - 1):
        t, tn = float(times[i]), float(times[i + 1])
        v = velocity_fn(x, t)
        if sampler == "project":
            x, lp, _, _ = sde_step_with_logprob(v, t, tn, x, noise_level=noise_level, generator=generator,
                                                sde_type=sde_type, convention=convention)
            total += lp.to(torch.float64)
        else:
            x, _, _ = writeup_euler_step(x, v, t, tn, noise_level, score_sign=score_sign, generator=generator)
    return x, total


# ------------------------------------------------------------------------------------------------
# two-sample statistics
# ------------------------------------------------------------------------------------------------
def _mean_pairwise_distance(x: torch.Tensor, y: torch.Tensor, exclude_diagonal: bool, chunk: int = 2048) -> float:
    total, count = 0.0, 0
    for i in range(0, x.shape[0], chunk):
        d = torch.cdist(x[i:i + chunk], y)                       # (chunk, M)
        total += d.sum().item()
        count += d.numel()
    if exclude_diagonal:                                         # the diagonal of |X_i - X_i| is 0
        count -= x.shape[0]
    return total / count


def energy_distance(x: torch.Tensor, y: torch.Tensor) -> float:
    r"""Energy distance  2 E|X - Y| - E|X - X'| - E|Y - Y'|  (U-statistic form; Szekely & Rizzo).

    x (N, D), y (M, D); computed in float64. It is >= 0 in expectation, 0 iff the distributions are
    equal, and for equal distributions it shrinks like 1/N, so its null distribution at a given N
    (:func:`null_energy_distances`) calibrates the tolerance. The U-statistic is unbiased, so under
    the null it is centred on 0 and can come out slightly negative.
    """
    if x.dim() != 2 or y.dim() != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"x {tuple(x.shape)} and y {tuple(y.shape)} must be (N, D) and (M, D)")
    if x.shape[0] < 2 or y.shape[0] < 2:
        raise ValueError(f"need at least 2 samples each; got {x.shape[0]} and {y.shape[0]}")
    x, y = x.to(torch.float64), y.to(torch.float64)
    return (2 * _mean_pairwise_distance(x, y, False) - _mean_pairwise_distance(x, x, True)
            - _mean_pairwise_distance(y, y, True))


def null_energy_distances(sample_fn: Callable[[int, torch.Generator], torch.Tensor], n: int, repeats: int,
                          generator: torch.Generator) -> torch.Tensor:
    """Energy distances between ``repeats`` pairs of independent size-n samples of the same distribution."""
    return torch.tensor([energy_distance(sample_fn(n, generator), sample_fn(n, generator))
                         for _ in range(repeats)], dtype=torch.float64)


# ------------------------------------------------------------------------------------------------
# bookkeeping and plots for the notebook
# ------------------------------------------------------------------------------------------------
def record(rows: list[dict], section: str, check: str, value: float, tolerance: float,
           expect: str = "below") -> bool:
    """Append one results-table row and return whether it passed.

    ``expect="below"``: pass iff value <= tolerance (an error or a distance that must be small);
    ``expect="above"``: pass iff value > tolerance (a wrong sampler that must be rejected).
    """
    if expect not in ("below", "above"):
        raise ValueError(f"expect={expect!r} is not one of ('below', 'above')")
    value, tolerance = float(value), float(tolerance)
    passed = bool(value <= tolerance) if expect == "below" else bool(value > tolerance)
    rows.append({"section": section, "check": check, "value": value, "tolerance": tolerance,
                 "expect": expect, "passed": passed})
    return passed


def plot_samples(panels: dict, path=None, n_plot: int | None = None, lim: float = 4.5):
    """Scatter plots of 2-D sample sets side by side (one panel per name); saved to ``path`` if given."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.4), sharex=True, sharey=True)
    axes = [axes] if len(panels) == 1 else list(axes)
    for ax, (name, pts) in zip(axes, panels.items()):
        pts = torch.as_tensor(pts)[:n_plot].double().cpu().numpy()
        ax.scatter(pts[:, 0], pts[:, 1], s=2, alpha=0.4)
        ax.set_title(name, fontsize=9)
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_aspect("equal")
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=110)
    return fig
