r"""Time conventions, the SD3 sigma schedule, and the SDE / CPS / ODE step with its log-probability.

Flow-matching models interpolate data and Gaussian noise linearly. Two time conventions are in use:

| convention       | interpolation                          | sampling runs | models         |
|------------------|----------------------------------------|---------------|----------------|
| ``noise_at_one`` | x_t = (1 - t) x_data + t x_noise       | t: 1 -> 0     | SD3, FLUX      |
| ``noise_at_zero``| x_t = (1 - t) x_noise + t x_data       | t: 0 -> 1     | Show-o2        |

They describe the same process under t -> 1 - t, v -> -v (v = dx/dt flips sign with time). The math
below is written ONCE, in the ``noise_at_one`` form where the time is the noise level sigma (Flow-GRPO's
notation); ``noise_at_zero`` inputs are mapped onto it by :func:`_to_noise_at_one` (sigma = 1 - t,
v_sd3 = -v). The sample x itself is the same object in both conventions, so means, samples, stds and
log-probs need no mapping back.

Read top to bottom: schedule -> conventions -> the step -> the step KL. The numbered step comments in
:func:`sde_step_with_logprob` (1 score identity, 2 drift and Euler form, 3 sampling / marginals,
4 log-prob and conventions) match the section headings of ``notebooks/00_derivation_checks.ipynb``.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

CONVENTIONS = ("noise_at_one", "noise_at_zero")
SDE_TYPES = ("sde", "cps")
CPS_LOGPROBS = ("gaussian", "upstream")
KL_CONVENTIONS = ("upstream", "paper")

_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


# ------------------------------------------------------------------------------------------------
# Schedules
# ------------------------------------------------------------------------------------------------
def sd3_sigmas(num_steps: int, shift: float = 3.0, num_train_timesteps: int = 1000) -> torch.Tensor:
    r"""The SD3 sampling schedule: sigmas (= noise_at_one times) from 1 down to 0, float32 (num_steps+1,).

    sigma_i = shift * s_i / (1 + (shift - 1) s_i),   s_i = linspace(1, sigma_min, num_steps)_i,
    sigma_min = shift(1 / num_train_timesteps),     then a terminal 0 is appended.

    | code                  | symbol / diffusers name                              |
    |-----------------------|------------------------------------------------------|
    | ``num_steps``         | N, ``num_inference_steps``                           |
    | ``shift``             | ``FlowMatchEulerDiscreteScheduler(shift=...)``        |
    | ``num_train_timesteps``| 1000 (the model's timestep fed = 1000 * sigma)      |

    This repeats diffusers' ``FlowMatchEulerDiscreteScheduler(shift=shift).set_timesteps(num_steps)``
    arithmetic step by step (float32 training grid, float64 linspace and shift, float32 result), so the
    values are bit-identical to ``scheduler.sigmas`` (tests/test_sde.py checks this). Note that the shift
    is applied to an already-shifted sigma_min, exactly as diffusers does; SD3.5-M with N=10 gives
    1.0, .9601, .9133, ..., .0089, 0 (flow_grpo_notes §1.2).
    """
    if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
        raise ValueError(f"num_steps={num_steps!r} must be a positive int")
    if not (isinstance(shift, (int, float)) and math.isfinite(shift) and shift > 0):
        raise ValueError(f"shift={shift!r} must be a finite float > 0")
    n_train = int(num_train_timesteps)
    # 1. the scheduler's training grid (float32, as in its __init__): only its end points matter
    train_t = torch.tensor([float(n_train), 1.0], dtype=torch.float32)
    train_s = train_t / n_train
    train_s = shift * train_s / (1 + (shift - 1) * train_s)
    sigma_max, sigma_min = train_s[0].item(), train_s[1].item()
    # 2. set_timesteps: float64 linspace over "timesteps" (sigma * 1000), back to sigma, shift again
    timesteps = np.linspace(sigma_max * n_train, sigma_min * n_train, int(num_steps))
    s = timesteps / n_train
    s = shift * s / (1 + (shift - 1) * s)
    sigmas = torch.from_numpy(s).to(torch.float32)
    # 3. terminal sigma 0 (clean data)
    return torch.cat([sigmas, torch.zeros(1, dtype=torch.float32)])


def check_convention(convention: str) -> str:
    """``convention`` itself, or a ValueError naming it and the two valid ones."""
    if convention not in CONVENTIONS:
        raise ValueError(f"convention={convention!r} is not one of {CONVENTIONS}")
    return convention


def convention_times(num_steps: int, shift: float = 3.0, convention: str = "noise_at_one") -> torch.Tensor:
    """The sampling time grid (num_steps+1,) float32 in the convention's own time, in sampling order.

    ``noise_at_one``: the SD3 sigmas, 1 -> 0. ``noise_at_zero``: 1 - sigmas, 0 -> 1.
    Step i goes from ``times[i]`` to ``times[i+1]``.
    """
    check_convention(convention)
    sigmas = sd3_sigmas(num_steps, shift)
    return sigmas if convention == "noise_at_one" else 1.0 - sigmas


# ------------------------------------------------------------------------------------------------
# Conventions
# ------------------------------------------------------------------------------------------------
def _as_time(x, name: str, batch: int, ndim: int) -> torch.Tensor:
    """A float or (B,) / 0-d tensor time -> float32 tensor of shape (B, 1, ..., 1) broadcasting to (B, ...)."""
    if isinstance(x, torch.Tensor):
        tt = x.detach().to(torch.float32)
        if tt.dim() == 0:
            tt = tt.expand(batch)
        elif tt.dim() != 1 or tt.shape[0] != batch:
            raise ValueError(f"{name} has shape {tuple(x.shape)}; expected a float, a 0-d tensor or shape ({batch},)")
    elif isinstance(x, (int, float, np.floating, np.integer)) and not isinstance(x, bool):
        tt = torch.full((batch,), float(x), dtype=torch.float32)
    else:
        raise ValueError(f"{name}={x!r} must be a float or a tensor of shape ({batch},)")
    if not torch.isfinite(tt).all() or (tt < 0).any() or (tt > 1).any():
        raise ValueError(f"{name}={_show(tt)} must lie in [0, 1]")
    return tt.reshape(batch, *([1] * (ndim - 1)))


def _show(t: torch.Tensor) -> str:
    t = t.flatten()
    return f"{t.tolist()}" if t.numel() <= 8 else f"tensor of {t.numel()} values in [{t.min().item()}, {t.max().item()}]"


def _to_noise_at_one(t: torch.Tensor, t_next: torch.Tensor, v: torch.Tensor, convention: str):
    """Map the convention's (t, t_next, v) to noise_at_one's (sigma, sigma_next, v_sd3).

    noise_at_zero -> noise_at_one: sigma = 1 - t, v_sd3 = dx/dsigma = -dx/dt = -v.
    Validates the direction of time: sampling must move towards the data end.
    """
    if convention == "noise_at_one":
        if (t_next >= t).any():
            raise ValueError(f"t_next={_show(t_next)} must be < t={_show(t)} in convention 'noise_at_one' "
                             "(sampling runs t: 1 -> 0)")
        return t, t_next, v
    if (t_next <= t).any():
        raise ValueError(f"t_next={_show(t_next)} must be > t={_show(t)} in convention 'noise_at_zero' "
                         "(sampling runs t: 0 -> 1)")
    return 1.0 - t, 1.0 - t_next, -v


def draw_noise(shape, generator, device) -> torch.Tensor:
    """eps ~ N(0, I) in float32 on ``device``, drawn on the generator's device (CPU generators work for any device).

    ``generator`` may be None, one torch.Generator, or a list of B generators (one per sample, so a
    sample's noise does not depend on which batch it was drawn in).
    """
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}; expected one per sample")
        return torch.cat([draw_noise((1, *shape[1:]), g, device) for g in generator])
    gen_device = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=gen_device, dtype=torch.float32).to(device)


# ------------------------------------------------------------------------------------------------
# The step
# ------------------------------------------------------------------------------------------------
def sde_step_with_logprob(
    model_output: torch.Tensor,
    t,
    t_next,
    sample: torch.Tensor,
    *,
    noise_level: float,
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    sde_type: str = "sde",
    convention: str = "noise_at_one",
    sigma_max: float | None = None,
    cps_logprob: str = "gaussian",
):
    r"""One stochastic sampling step x_t -> x_{t+dt} and the Gaussian log-density of the transition.

    In the ``noise_at_one`` form (sigma = t, dt = sigma' - sigma < 0; ``noise_at_zero`` is mapped onto it):

    ``sde`` (Flow-GRPO, marginal-preserving reverse SDE  dx = [v - sigma_t^2/2 grad log p_t] dt + sigma_t dw,
    Euler–Maruyama, using grad log p_t(x) = -(x + (1 - sigma) v) / sigma):

        sigma_t = a * sqrt(sigma / (1 - sigma~)),   sigma~ = sigma, or sigma_max where sigma == 1
        mu      = x (1 + sigma_t^2 dt / (2 sigma)) + v (1 + sigma_t^2 (1 - sigma) / (2 sigma)) dt
        x'      = mu + sigma_t sqrt(-dt) eps,        std = sigma_t sqrt(-dt)

    ``cps`` (coefficients-preserving; flow_grpo_notes §1.3):

        sigma_t = sigma' sin(a pi / 2),   x0^ = x - sigma v,   x1^ = x + (1 - sigma) v
        mu      = (1 - sigma') x0^ + sqrt(sigma'^2 - sigma_t^2) x1^
        x'      = mu + sigma_t eps,       std = sigma_t

    log_prob = mean over all non-batch dims of  -(x' - mu)^2 / (2 std^2) - log std - log sqrt(2 pi).

    In Show-o2's convention (t = 1 - sigma, v -> -v) the ``sde`` step reads, as in the Show-o2 write-up,
    sigma_t = a sqrt((1 - t)/t),  mu = (1 - sigma_t^2 dt / (2 (1 - t))) x + (1 + sigma_t^2 t / (2 (1 - t))) v dt.

    | code                       | symbol                                                       |
    |----------------------------|--------------------------------------------------------------|
    | ``model_output``           | v = v_theta(x_t, t), CFG already applied, convention's sign   |
    | ``t``, ``t_next``          | t, t + dt in the convention's own time (sigma, sigma' for SD3) |
    | ``sample``                 | x_t                                                          |
    | ``noise_level``            | a (Flow-GRPO default 0.7; 0 = deterministic Euler / ODE)      |
    | ``std_dev_t`` (internal)   | sigma_t, the SDE's diffusion coefficient                     |
    | ``sigma_max``              | the next-to-first schedule value that stands in at sigma == 1 |
    | returned ``mean``          | mu                                                           |
    | returned ``std``           | per-step std: sigma_t sqrt(-dt) (``sde``), sigma_t (``cps``) |
    | returned ``prev_sample``   | x_{t+dt} (sampled, or the given one when scoring)            |
    | returned ``log_prob``      | log N(x'; mu, std^2 I), averaged over C, H, W  -> (B,)       |

    Args:
        t, t_next: floats, 0-d tensors or per-sample tensors (B,), in ``convention``'s time. Sampling must
            move towards the data end: t_next < t for ``noise_at_one``, t_next > t for ``noise_at_zero``.
        noise_level: a >= 0 (and <= 1 for ``cps``). ``0`` gives the deterministic Euler step
            x' = x + v dt (== diffusers' FlowMatchEulerDiscreteScheduler.step) for both sde types.
        prev_sample: if given, the transition x -> prev_sample is scored and returned unchanged (as float32);
            it is detached in the density, as upstream, so gradients flow only through ``mean``.
        generator: a torch.Generator (or a list of B of them) for the noise; only when sampling.
        sigma_max: the stand-in for sigma == 1 in the denominator of sigma_t, as a NOISE level (the noise
            coefficient of x_t: sigma itself for ``noise_at_one``, 1 - t for ``noise_at_zero``). Upstream
            uses the schedule's next-to-first value ``sigmas[1]``; in the first step that is exactly the
            step's own sigma', which is the default when ``sigma_max`` is None.
        cps_logprob: ``"gaussian"`` (default) makes ``cps`` return the proper Gaussian log-density, like
            ``sde``. ``"upstream"`` reproduces upstream's ``mean(-(x' - mu)^2)``, which drops the constants
            AND the 1/(2 std^2) factor, so its ratios live on a different scale (Fast configs use clip 1e-5).

    Returns:
        ``(prev_sample, log_prob, mean, std)``, all float32: (B, ...), (B,), (B, ...), (B, 1, ..., 1).

    Degenerate steps: where ``std == 0`` (``noise_level=0``, or ``cps`` stepping to t_next = data end)
    the transition is a point mass; ``log_prob`` is then defined as 0 for those samples (the step carries
    no policy-gradient signal; the rollout stores only steps with std > 0) and ``prev_sample`` is ``mean``
    when sampling.

    All math is float32 whatever the input dtype ("bf16 can overflow", flow_grpo_notes §1.2, issues #177/#204).
    """
    # Step numbers 1-4 are the sections of notebooks/00_derivation_checks.ipynb that check them.
    # 0. validate inputs; every bad value is named (no silent fixes)
    if sde_type not in SDE_TYPES:
        raise ValueError(f"sde_type={sde_type!r} is not one of {SDE_TYPES}")
    check_convention(convention)
    if cps_logprob not in CPS_LOGPROBS:
        raise ValueError(f"cps_logprob={cps_logprob!r} is not one of {CPS_LOGPROBS}")
    if not isinstance(noise_level, (int, float, np.floating)) or isinstance(noise_level, bool) \
            or not math.isfinite(noise_level) or noise_level < 0:
        raise ValueError(f"noise_level={noise_level!r} must be a finite float >= 0")
    if sde_type == "cps" and noise_level > 1:
        raise ValueError(f"noise_level={noise_level!r} must be <= 1 for sde_type='cps' "
                         "(std = sigma' sin(a pi/2) stops growing at a = 1)")
    if prev_sample is not None and generator is not None:
        raise ValueError("got both prev_sample and generator: pass prev_sample to score a transition, "
                         "or generator to sample one, not both")
    if not isinstance(model_output, torch.Tensor) or not isinstance(sample, torch.Tensor):
        raise ValueError("model_output and sample must be tensors")
    if sample.dim() < 2:
        raise ValueError(f"sample has shape {tuple(sample.shape)}; expected (B, ...) with at least one non-batch dim")
    if model_output.shape != sample.shape:
        raise ValueError(f"model_output has shape {tuple(model_output.shape)} but sample has shape "
                         f"{tuple(sample.shape)}; expected equal shapes")
    if prev_sample is not None and prev_sample.shape != sample.shape:
        raise ValueError(f"prev_sample has shape {tuple(prev_sample.shape)} but sample has shape "
                         f"{tuple(sample.shape)}; expected equal shapes")
    if sigma_max is not None and not (isinstance(sigma_max, (int, float)) and 0 < sigma_max < 1):
        raise ValueError(f"sigma_max={sigma_max!r} must be a float in (0, 1)")

    batch, ndim, device = sample.shape[0], sample.dim(), sample.device
    # 0. float32 everything; times as (B, 1, ..., 1) so per-sample times broadcast over (B, C, H, W)
    x = sample.to(torch.float32)                                   # (B, C, H, W)
    v = model_output.to(torch.float32)                             # (B, C, H, W)
    t_ = _as_time(t, "t", batch, ndim).to(device)                  # (B, 1, 1, 1)
    tn_ = _as_time(t_next, "t_next", batch, ndim).to(device)       # (B, 1, 1, 1)

    # 0. map to the noise_at_one form: sigma = noise level of x_t, v = dx/dsigma (the mirror t -> 1-t,
    #    v -> -v; notebook §4 checks that both conventions give the same chain)
    sigma, sigma_next, v = _to_noise_at_one(t_, tn_, v, convention)
    dt = sigma_next - sigma                                        # (B, 1, 1, 1), < 0

    # 1. score identity (notebook §1): grad log p_sigma(x) = -(x + (1 - sigma) v) / sigma, which turns the
    #    marginal-preserving SDE's score term into the x- and v-terms of the drift below
    # 2. SDE drift and its Euler form (notebook §2): mean mu and per-step std
    if sde_type == "sde":
        # sigma_t = a sqrt(sigma / (1 - sigma)) diverges at sigma == 1 (pure noise): the schedule's
        # next-to-first value stands in in the denominator (upstream: sigmas[1]); at the first step
        # that is this step's own sigma', so the per-step std there is exactly a.
        stand_in = sigma_next if sigma_max is None else torch.full_like(sigma, float(sigma_max))
        sigma_den = torch.where(sigma == 1, stand_in, sigma)
        std_dev_t = noise_level * torch.sqrt(sigma / (1 - sigma_den))          # (B, 1, 1, 1)
        # Euler–Maruyama of dx = [v + sigma_t^2/(2 sigma) (x + (1 - sigma) v)] dsigma + sigma_t dw;
        # per-sample coefficients first, so the (B, C, H, W) work is two multiplies and an add
        coef_x = 1 + std_dev_t ** 2 / (2 * sigma) * dt                         # (B, 1, 1, 1)
        coef_v = (1 + std_dev_t ** 2 * (1 - sigma) / (2 * sigma)) * dt         # (B, 1, 1, 1)
        std = std_dev_t * torch.sqrt(-dt)                                      # (B, 1, 1, 1)
    else:
        std_dev_t = sigma_next * math.sin(noise_level * math.pi / 2)           # (B, 1, 1, 1)
        # mu = (1 - sigma') x0^ + c x1^ with x0^ = x - sigma v (predicted data), x1^ = x + (1 - sigma) v
        # (predicted noise), c = sqrt(sigma'^2 - sigma_t^2) = sigma' |cos(a pi/2)|; the clamp only guards
        # float rounding at a = 1. Collected into per-sample coefficients of x and v.
        c = torch.sqrt((sigma_next ** 2 - std_dev_t ** 2).clamp_min(0))        # (B, 1, 1, 1)
        coef_x = (1 - sigma_next) + c
        coef_v = c * (1 - sigma) - (1 - sigma_next) * sigma
        std = std_dev_t
    # (for a = 0 and 'sde': coef_x == 1 and coef_v == dt exactly, so mu == x + dt v bit for bit)
    mean = x * coef_x + v * coef_v                                             # (B, C, H, W)

    # 3. sample x' = mu + std * eps, or take the given transition (notebook §3: the marginals match)
    if prev_sample is None:
        if noise_level == 0:
            prev = mean
        else:
            eps = draw_noise(x.shape, generator, device)                      # (B, C, H, W)
            prev = mean + std * eps
    else:
        prev = prev_sample.to(torch.float32)

    # 4. log-prob (notebook §4): log N(x'; mu, std^2), averaged over the non-batch dims (upstream: mean):
    #    mean_chw[-(x'-mu)^2/(2 s^2) - log s - log sqrt(2 pi)] = -mean_chw[(x'-mu)^2]/(2 s^2) - log s - ...
    #    (s is per sample, so only the squared residual is reduced over (C, H, W))
    if noise_level == 0:
        log_prob = torch.zeros(batch, dtype=torch.float32, device=device)
        return prev, log_prob, mean, std
    sq = ((prev.detach() - mean) ** 2).mean(dim=tuple(range(1, ndim)))       # (B,)
    s = std.reshape(batch)                                                     # (B,)
    positive = s > 0
    if sde_type == "cps" and cps_logprob == "upstream":
        log_prob = -sq
    else:
        safe_s = torch.where(positive, s, torch.ones_like(s))
        log_prob = -sq / (2 * safe_s ** 2) - torch.log(safe_s) - _HALF_LOG_2PI
    log_prob = torch.where(positive, log_prob, torch.zeros_like(log_prob))   # (B,)
    return prev, log_prob, mean, std


# ------------------------------------------------------------------------------------------------
# KL between two step Gaussians
# ------------------------------------------------------------------------------------------------
def _as_per_sample(x, name: str, batch: int, ndim: int, device) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        xt = x.to(device=device, dtype=torch.float32)
        if xt.dim() == 0:
            return xt.reshape([1] * ndim)
        if xt.dim() == 1 and xt.shape[0] == batch:
            return xt.reshape(batch, *([1] * (ndim - 1)))
        if xt.dim() == ndim and xt.shape[0] in (1, batch) and all(n == 1 for n in xt.shape[1:]):
            return xt                                              # already (B, 1, ..., 1), e.g. the step's std
        raise ValueError(f"{name} has shape {tuple(x.shape)}; expected a float, shape ({batch},) "
                         f"or ({batch}, 1, ..., 1)")
    if isinstance(x, (int, float, np.floating)) and not isinstance(x, bool):
        return torch.full([1] * ndim, float(x), dtype=torch.float32, device=device)
    raise ValueError(f"{name}={x!r} must be a float or a tensor")


def step_kl(mean: torch.Tensor, ref_mean: torch.Tensor, std, dt, convention: str = "upstream") -> torch.Tensor:
    r"""KL between the policy's and the reference's step Gaussians, which share their std (notes §1.7).

    KL( N(mu, s^2 I) || N(mu_ref, s^2 I) ) = ||mu - mu_ref||^2 / (2 s^2),  s = sigma_t sqrt(|dt|).

        "paper":    mean_{C,H,W} (mu - mu_ref)^2 / (2 sigma_t^2 |dt|)   (= the exact KL per element)
        "upstream": mean_{C,H,W} (mu - mu_ref)^2 / (2 sigma_t^2)        (= |dt| * "paper")

    | code        | symbol                                                                  |
    |-------------|-------------------------------------------------------------------------|
    | ``mean``    | mu_theta, from :func:`sde_step_with_logprob` (with grad)               |
    | ``ref_mean``| mu_ref, the same step under the frozen reference (LoRA disabled)        |
    | ``std``     | s = sigma_t sqrt(|dt|), the per-step std returned by the step           |
    | ``dt``      | the step's dt (either sign; |dt| is used), float or (B,)               |

    Upstream Flow-GRPO divides by sigma_t^2 only (the maintainer keeps it: dropping dt up-weights late
    steps, issue #22); the paper / counting fork divide by the per-step variance s^2. So ``beta`` is on
    different scales: with ``"upstream"`` use upstream's betas (0.04 for GenEval SD3, 10 steps); with
    ``"paper"`` the KL is ~1/|dt| (~10x at 10 steps) larger and beta must shrink accordingly
    (the fork used 0.01 at 20 steps). For ``cps`` steps, upstream's sigma_t already is the per-step std, so
    upstream's KL there equals the ``"paper"`` form: use ``"paper"`` for cps.

    Returns the per-sample KL, shape (B,), float32.
    """
    if convention not in KL_CONVENTIONS:
        raise ValueError(f"convention={convention!r} is not one of {KL_CONVENTIONS}")
    if mean.shape != ref_mean.shape:
        raise ValueError(f"mean has shape {tuple(mean.shape)} but ref_mean has {tuple(ref_mean.shape)}; "
                         "expected equal shapes")
    if mean.dim() < 2:
        raise ValueError(f"mean has shape {tuple(mean.shape)}; expected (B, ...) with at least one non-batch dim")
    batch, ndim, device = mean.shape[0], mean.dim(), mean.device
    s = _as_per_sample(std, "std", batch, ndim, device)            # (B, 1, 1, 1) or (1, 1, 1, 1)
    if (s <= 0).any():
        raise ValueError(f"std={_show(s)} must be > 0: the KL between point masses is undefined "
                         "(do not apply a KL to ODE steps)")
    step = _as_per_sample(dt, "dt", batch, ndim, device).abs()
    if (step <= 0).any():
        raise ValueError(f"dt={_show(step)} must be non-zero")
    sq = (mean.to(torch.float32) - ref_mean.to(torch.float32)) ** 2  # (B, C, H, W)
    var = s ** 2 if convention == "paper" else s ** 2 / step        # s^2 = sigma_t^2 |dt|
    return (sq / (2 * var)).mean(dim=tuple(range(1, ndim)))
