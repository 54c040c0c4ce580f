r"""The rectified-flow (flow-matching) training loss through the Policy protocol, in either time convention.

    noise_at_one  (SD3):     x_t = (1 - t) x_0 + t eps,     target v* = eps - x_0,    noise level sigma = t
    noise_at_zero (Show-o2): x_t = (1 - t) eps + t x_0,     target v* = x_0 - eps,    noise level sigma = 1 - t

    L(theta) = E_{x_0, c, eps, sigma} [ w(sigma) * mean_elements( (v_theta(x_t, t | c) - v*)^2 ) ]

with sigma drawn from SD3's logit-normal density (Esser et al. 2024, §3.1), optionally shifted as the
SD3 sampling schedule is (diffusers' training scripts index the shifted scheduler sigmas):

    u = sigmoid(m + s n),  n ~ N(0, 1);        sigma = shift u / (1 + (shift - 1) u)

| code name          | symbol / meaning                                                            |
|--------------------|-----------------------------------------------------------------------------|
| ``x0``             | x_0, clean latents (B, C, H, W) (pixels in [-1, 1] in the embedded world)   |
| ``noise``          | eps ~ N(0, I), same shape                                                   |
| ``t``              | t in the policy's convention (B,); ``sigma`` is the noise level             |
| ``target``         | v* = d x_t / d t, the conditional velocity                                  |
| ``cond``           | c, a :class:`~grpo_lib.policies.base.Cond` from ``policy.encode``           |
| ``logit_mean``/``logit_std`` | m, s of the logit-normal (SD3: 0, 1)                              |
| ``shift``          | the schedule shift applied to u (1 = none; SD3.5-Medium samples with 3)     |
| ``weighting``      | w(sigma): ``none`` 1, ``sigma_sqrt`` sigma^-2, ``cosmap`` 2 / (pi (1 - 2 sigma + 2 sigma^2)) |

The two conventions are the same process under t -> 1 - t, v -> -v (design.md §4), so one policy
exposed in both conventions gives the same loss at mirrored times: |v_theta - v*| is unchanged when
both flip sign. The velocity is taken without classifier-free guidance (g = 1); caption dropout
(training on the empty prompt) is the caller's choice of ``cond``.
"""
from __future__ import annotations

import math

import torch

from .policies.base import Cond, check_convention
from .sde import draw_noise

WEIGHTINGS = ("none", "sigma_sqrt", "cosmap")


def _check_float(name: str, value, *, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or (positive and value <= 0):
        raise ValueError(f"{name}={value!r} must be a finite number{' > 0' if positive else ''}")
    return float(value)


def sample_timesteps(batch: int, generator: torch.Generator | None = None, mean: float = 0.0, std: float = 1.0,
                     *, shift: float = 1.0, convention: str = "noise_at_one",
                     device: torch.device | str | None = None) -> torch.Tensor:
    r"""SD3's logit-normal training times, float32 (batch,), in ``convention``'s own time.

        u = sigmoid(mean + std n), n ~ N(0, 1);   sigma = shift u / (1 + (shift - 1) u);
        t = sigma (noise_at_one)  or  t = 1 - sigma (noise_at_zero)

    The density is over the *noise level* sigma, so the same generator state gives mirrored times
    in the two conventions (t_zero = 1 - t_one). ``generator`` draws n on its own device; the result
    is moved to ``device`` (default: the generator's device, else CPU).
    """
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch={batch!r} must be a positive int")
    mean = _check_float("mean", mean)
    std = _check_float("std", std, positive=True)
    shift = _check_float("shift", shift, positive=True)
    check_convention(convention)
    gen_device = generator.device if generator is not None else torch.device("cpu")
    n = torch.randn(batch, generator=generator, device=gen_device, dtype=torch.float32)   # (B,)
    u = torch.sigmoid(mean + std * n)
    sigma = shift * u / (1.0 + (shift - 1.0) * u)          # identity for shift = 1
    t = sigma if convention == "noise_at_one" else 1.0 - sigma
    return t.to(device if device is not None else gen_device)


def loss_weight(sigma: torch.Tensor, weighting: str = "none") -> torch.Tensor:
    """w(sigma) of SD3's loss weightings (diffusers' ``compute_loss_weighting_for_sd3``), float32 like sigma."""
    if weighting == "none":
        return torch.ones_like(sigma)
    if weighting == "sigma_sqrt":
        return sigma ** -2.0
    if weighting == "cosmap":
        return 2.0 / (math.pi * (1.0 - 2.0 * sigma + 2.0 * sigma ** 2))
    raise ValueError(f"weighting={weighting!r} is not one of {WEIGHTINGS}")


def interpolate(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, convention: str
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_t, v*) for clean ``x0``, ``noise`` and per-sample times ``t`` (B,) in ``convention``."""
    check_convention(convention)
    tb = t.reshape(-1, *([1] * (x0.ndim - 1)))                 # (B, 1, 1, 1)
    if convention == "noise_at_one":
        return (1.0 - tb) * x0 + tb * noise, noise - x0
    return (1.0 - tb) * noise + tb * x0, x0 - noise


def flow_matching_loss(policy, x0: torch.Tensor, cond: Cond, *, t: torch.Tensor | None = None,
                       noise: torch.Tensor | None = None, generator: torch.Generator | None = None,
                       weighting: str = "none", logit_mean: float = 0.0, logit_std: float = 1.0,
                       shift: float = 1.0, reduction: str = "mean") -> torch.Tensor:
    r"""L = mean_b w(sigma_b) mean_elements (v_theta(x_t, t | c) - v*)^2 through ``policy.velocity`` (g = 1).

    Args:
        policy: any :class:`~grpo_lib.policies.base.Policy`; its ``convention`` fixes x_t and v* (module doc).
        x0: clean latents (B, *policy.latent_shape); cast to float32 for the interpolation.
        cond: ``policy.encode(prompts)`` for the B samples (caption dropout = some prompts "").
        t: (B,) times in the policy's convention, or None to draw them with :func:`sample_timesteps`
            (``logit_mean``, ``logit_std``, ``shift``) from ``generator``.
        noise: eps (B, C, H, W), or None to draw N(0, I) from ``generator`` (after t).
        weighting: ``none`` | ``sigma_sqrt`` | ``cosmap`` (see :func:`loss_weight`).
        reduction: ``mean`` -> scalar; ``none`` -> per-sample weighted losses (B,).
    Gradients flow into whatever ``policy.velocity`` differentiates (the LoRA). The squared error is
    taken in float32 whatever precision the network ran in.
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting={weighting!r} is not one of {WEIGHTINGS}")
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction={reduction!r} is not one of ('mean', 'none')")
    convention = check_convention(policy.convention)
    shape = tuple(policy.latent_shape)
    if not (isinstance(x0, torch.Tensor) and x0.is_floating_point() and x0.ndim == 1 + len(shape)
            and tuple(x0.shape[1:]) == shape):
        raise ValueError(f"x0 must be a float tensor (B, {', '.join(map(str, shape))}) (the policy's latent_shape), "
                         f"got {type(x0).__name__} {tuple(getattr(x0, 'shape', ()))}")
    batch, device = x0.shape[0], policy.device
    if not isinstance(cond, Cond) or len(cond) != batch:
        raise ValueError(f"cond must be a Cond with {batch} rows (one per x0 sample), got "
                         f"{len(cond) if isinstance(cond, Cond) else type(cond).__name__}")
    x0 = x0.to(device=device, dtype=torch.float32)
    if t is None:
        t = sample_timesteps(batch, generator, logit_mean, logit_std, shift=shift, convention=convention,
                             device=device)
    elif not (isinstance(t, torch.Tensor) and t.shape == (batch,)):
        raise ValueError(f"t must be a tensor of shape ({batch},) (one time per sample), got "
                         f"{type(t).__name__} {tuple(getattr(t, 'shape', ()))}")
    t = t.to(device=device, dtype=torch.float32)
    if not bool(torch.all((t >= 0) & (t <= 1))):
        raise ValueError(f"t must lie in [0, 1], got {t.tolist() if t.numel() <= 8 else 'values outside'}")
    if noise is None:
        noise = draw_noise(x0.shape, generator, device)
    elif not (isinstance(noise, torch.Tensor) and noise.shape == x0.shape):
        raise ValueError(f"noise must be a tensor of shape {tuple(x0.shape)} (as x0), got "
                         f"{tuple(getattr(noise, 'shape', ()))}")
    noise = noise.to(device=device, dtype=torch.float32)

    x_t, target = interpolate(x0, noise, t, convention)                    # (B, C, H, W) each
    v = policy.velocity(x_t, t, cond, 1.0).float()                          # (B, C, H, W)
    per_sample = (v - target).pow(2).reshape(batch, -1).mean(1)             # (B,)
    sigma = t if convention == "noise_at_one" else 1.0 - t                  # noise level (B,)
    per_sample = loss_weight(sigma, weighting) * per_sample
    return per_sample.mean() if reduction == "mean" else per_sample
