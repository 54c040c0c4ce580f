r"""Likelihood-free RL objectives for flow policies: DiffusionNFT, Advantage Weighted Matching and DGPO.

Flow-GRPO (``grpo_lib.grpo``) scores the SDE's Gaussian step and pushes its log-ratio. Its successors
drop the step likelihood and weight the *pretraining* flow-matching loss on clean samples x0 by how good
each sample was (``shared/reference/likelihood_free_objectives.md``). Both need only the rollout's clean
samples (ODE rollouts are fine), never stored log-probs:

    x_t = (1 - t) x0 + t eps,   v* = eps - x0,   t ~ the rollout grid,  eps ~ N(0, I) fresh per (sample, t)

All math here runs in the SD3 convention (``noise_at_one``, t = noise level); :func:`policy_velocity`
maps a policy of the other convention onto it (s = 1 - t, v -> -v), so every policy trains through the
same losses.

| code            | symbol                                                                    |
|-----------------|---------------------------------------------------------------------------|
| ``x0``          | x0, a rollout's clean sample (B, C, H, W)                                  |
| ``t``           | t in (0, 1], noise level per sample (B,)                                  |
| ``v``           | v_theta(x_t, t, c), the trained policy's velocity (with grad)             |
| ``v_old``       | v_old, the anchor policy (NFT's sampling policy / AWM's KL-EMA), no grad  |
| ``v_ref``       | v_ref, the reference policy (LoRA off = cold start), no grad              |
| ``adv``         | A_i = (R_i - mean_group R) / (std + 1e-4), clipped to +-A_max             |

DGPO weights the same per-sample loss by how far each *group* still is from preferring its good samples
(a DPO sigmoid over the group's advantage-weighted likelihood ratio to the reference), so the samples of a
group must share their draw of (t, eps) (``group_shared_noise``).

One more object: :class:`SoftAnchor`, the slowly moving copy of the trainable weights NFT and AWM keep
(theta_old <- eta theta_old + (1 - eta) theta after each update).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from .grpo import EMA
from .policies.base import Cond, check_convention

OBJECTIVES = ("grpo", "nft", "awm", "dgpo")
AWM_WEIGHTINGS = ("uniform", "ghuber")


# ---------------------------------------------------------------------------------------------
# What a likelihood-free update needs from a rollout: the clean samples
# ---------------------------------------------------------------------------------------------
@dataclass
class CleanSamples:
    """B rollout samples reduced to what NFT / AWM train on: x0, the conditioning and the images."""

    final_latents: torch.Tensor        # (B, C, H, W) float32, x0 = the sampler's output
    cond: Cond                         # conditioning of the B samples
    images: np.ndarray | None          # uint8 (B, H, W, 3), for the reward

    def __len__(self) -> int:
        return self.final_latents.shape[0]

    def __getitem__(self, idx) -> "CleanSamples":
        np_idx = idx.cpu().numpy() if isinstance(idx, torch.Tensor) else idx
        return replace(self, final_latents=self.final_latents[idx], cond=self.cond[idx],
                       images=None if self.images is None else self.images[np_idx])


def policy_velocity(policy, x_t: torch.Tensor, t: torch.Tensor, cond: Cond,
                    guidance_scale: float = 1.0) -> torch.Tensor:
    """v_theta(x_t, t | c) in the SD3 convention (t = noise level), whatever the policy's own convention.

    ``noise_at_zero`` policies (Show-o2) run at s = 1 - t and return dx/ds = -(eps - x0): the sign flips back.
    ``guidance_scale`` g > 1 returns the guided velocity v_u + g (v_c - v_u) (linear, so the flip commutes).
    """
    convention = check_convention(policy.convention)
    if convention == "noise_at_one":
        return policy.velocity(x_t, t, cond, guidance_scale).float()
    return -policy.velocity(x_t, 1.0 - t, cond, guidance_scale).float()


def noisy_sample(x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_t, v*) = ((1 - t) x0 + t eps, eps - x0) for per-sample t (B,)."""
    tb = t.reshape(-1, *([1] * (x0.ndim - 1)))
    return (1.0 - tb) * x0 + tb * eps, eps - x0


def _per_sample(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1).mean(1)


# ---------------------------------------------------------------------------------------------
# DiffusionNFT (arXiv 2509.16117, Thm 3.2 / Alg. 1; NVlabs/DiffusionNFT train_nft_sd3.py L930-970)
# ---------------------------------------------------------------------------------------------
def nft_optimality(adv: torch.Tensor, adv_clip_max: float) -> torch.Tensor:
    """r = clamp(A / A_max / 2 + 1/2, 0, 1): the optimality probability of each sample (upstream code)."""
    return (adv.clamp(-adv_clip_max, adv_clip_max) / adv_clip_max / 2 + 0.5).clamp(0.0, 1.0)


def nft_loss(v: torch.Tensor, v_old: torch.Tensor, v_ref: torch.Tensor | None, x_t: torch.Tensor,
             x0: torch.Tensor, t: torch.Tensor, r: torch.Tensor, *, nft_beta: float, scale: float = 5.0,
             kl_beta: float = 0.0) -> tuple[torch.Tensor, dict]:
    r"""L = scale mean_i [ r_i L+_i + (1 - r_i) L-_i ] / beta  +  kl_beta mean_i ||v - v_ref||^2

        v+  = (1 - beta) v_old + beta v          (implicit positive policy)
        v-  = (1 + beta) v_old - beta v          (implicit negative policy)
        e+- = x_t - t v+- - x0                   (x0-space error; = t (v* - v+-))
        L+- = mean(e+-^2) / sg(mean |e+-|)       (adaptive weighting, paper §3.3)

    | code        | paper / upstream                                                  |
    |-------------|-------------------------------------------------------------------|
    | ``nft_beta``| beta (1.0 GenEval, 0.1 OCR); 1/beta = guidance strength          |
    | ``r``       | r in [0, 1], :func:`nft_optimality`                               |
    | ``scale``   | adv_clip_max (5) multiplying the loss upstream                    |
    | ``kl_beta`` | config.train.beta (1e-4), velocity MSE to the LoRA-off reference  |

    The optimum is v = v_old + (2 / beta) Delta (the reinforcement direction). At theta = theta_old the loss
    *value* no longer depends on r (v+ = v-) but its gradient, 2 beta (2 r - 1) t^2 (v_old - v*) / ..., does:
    never read the loss value as a learning signal. Returns (loss, stats).
    """
    tb = t.reshape(-1, *([1] * (x0.ndim - 1)))
    v_pos = (1.0 - nft_beta) * v_old + nft_beta * v
    v_neg = (1.0 + nft_beta) * v_old - nft_beta * v
    e_pos, e_neg = x_t - tb * v_pos - x0, x_t - tb * v_neg - x0
    l_pos = _per_sample(e_pos ** 2) / _per_sample(e_pos.abs()).detach().clamp_min(1e-8)       # (B,)
    l_neg = _per_sample(e_neg ** 2) / _per_sample(e_neg.abs()).detach().clamp_min(1e-8)       # (B,)
    policy_loss = scale * ((r * l_pos + (1.0 - r) * l_neg) / nft_beta).mean()
    kl = _per_sample((v - v_ref) ** 2).mean() if v_ref is not None else v.new_zeros(())
    loss = policy_loss + kl_beta * kl
    return loss, {"policy_loss": policy_loss.detach(), "kl": kl.detach(),
                  "old_deviation": _per_sample((v - v_old) ** 2).mean().detach(),
                  "x0_norm": _per_sample(x0 ** 2).mean().sqrt().detach()}


# ---------------------------------------------------------------------------------------------
# Advantage Weighted Matching (arXiv 2509.25050; scxue/advantage_weighted_matching train_sd3_awm.py)
# ---------------------------------------------------------------------------------------------
def awm_log_likelihood(fm: torch.Tensor, t: torch.Tensor, weighting: str = "ghuber",
                       p: float = 0.25) -> torch.Tensor:
    r"""The flow-matching surrogate of log pi(x0 | c) per sample:

        uniform:  log p = -FM
        ghuber:   log p = -(t / p) [ (FM + 1e-10)^p - (1e-10)^p ]     (upstream default, p = 0.25)

    with FM = mean_{C,H,W} (v_theta - v*)^2, computed in float64 as upstream does.
    """
    if weighting not in AWM_WEIGHTINGS:
        raise ValueError(f"awm_weighting={weighting!r} is not one of {AWM_WEIGHTINGS}")
    fm = fm.double()
    if weighting == "uniform":
        return -fm
    return -(t.double() / p) * ((fm + 1e-10) ** p - 1e-10 ** p)


def awm_loss(v: torch.Tensor, v_ref: torch.Tensor | None, v_anchor: torch.Tensor | None, target: torch.Tensor,
             t: torch.Tensor, adv: torch.Tensor, *, adv_clip_max: float = 5.0, weighting: str = "ghuber",
             p: float = 0.25, kl_beta: float = 0.0, anchor_beta: float = 0.0) -> tuple[torch.Tensor, dict]:
    r"""L = -mean_i Â_i log p_theta(x0_i | c_i)  +  kl_beta mean ||v - v_ref||^2  +  anchor_beta mean ||v - v_anchor||^2

        Â_i = clip(A_i, -A_max, A_max) / A_max  in [-1, 1]
        log p_theta = :func:`awm_log_likelihood` (FM of the clean sample; the policy gradient's surrogate)

    | code          | paper / upstream                                                  |
    |---------------|-------------------------------------------------------------------|
    | ``adv``       | A (group mean, global std), clamped to +-5 then times 1/5          |
    | ``weighting`` | ``ghuber`` (default, p = 0.25) or ``uniform`` (w(t) = 1)            |
    | ``kl_beta``   | beta, KL to the base (0.001 GenEval)                               |
    | ``anchor_beta``| ema_beta (1.0), KL to the slowly moving "ema" adapter             |

    On-policy (one update per rollout) the PPO ratio is exactly 1, so the clipped surrogate reduces to
    -A log p, whose gradient is -A grad log p = A t FM^(p-1) grad FM (ghuber). Returns (loss, stats).
    """
    a_hat = adv.clamp(-adv_clip_max, adv_clip_max) / adv_clip_max                        # (B,)
    fm = _per_sample((v - target) ** 2)                                                     # (B,)
    logp = awm_log_likelihood(fm, t, weighting, p)                                          # (B,) float64
    policy_loss = -(a_hat.double() * logp).mean().float()
    kl = _per_sample((v - v_ref) ** 2).mean() if v_ref is not None else v.new_zeros(())
    anchor = _per_sample((v - v_anchor) ** 2).mean() if v_anchor is not None else v.new_zeros(())
    loss = policy_loss + kl_beta * kl + anchor_beta * anchor
    return loss, {"policy_loss": policy_loss.detach(), "kl": kl.detach(), "anchor_kl": anchor.detach(),
                  "fm_loss": fm.mean().detach()}


# ---------------------------------------------------------------------------------------------
# DGPO, Direct Group Preference Optimization (arXiv 2510.08425; Luo-Yihong/DGPO train_sd3_dgpo.py L162-192)
# ---------------------------------------------------------------------------------------------
def dgpo_group_sums(fm: torch.Tensor, fm_ref: torch.Tensor, adv: torch.Tensor, group_index: torch.Tensor,
                    num_groups: int) -> torch.Tensor:
    r"""S_g = sum_{i in g} A_i (FM_i - FM_ref,i) over this process's samples, (num_groups,) float64.

    The trainer sums S_g over processes (all of a group's samples share t and eps) before
    :func:`dgpo_group_weights`; ``group_index`` (B,) holds each sample's group in [0, num_groups).
    """
    contrib = adv.double() * (fm.double() - fm_ref.double())
    return torch.zeros(num_groups, dtype=torch.float64, device=fm.device).index_add_(0, group_index, contrib)


def dgpo_group_weights(group_sums: torch.Tensor, *, dgpo_beta: float, group_size: int) -> torch.Tensor:
    """sigma(z_g), z_g = dgpo_beta S_g / G: how much each group still pulls (1/2 at theta = ref; -> 0 once the
    group's good samples are already likelier under theta than under the reference, as in DPO)."""
    return torch.sigmoid(dgpo_beta * group_sums / group_size).float()


def dgpo_loss(v: torch.Tensor, v_ref: torch.Tensor | None, target: torch.Tensor, adv: torch.Tensor,
              weight: torch.Tensor, *, kl_beta: float = 0.0) -> tuple[torch.Tensor, dict]:
    r"""L = mean_i [ sg(sigma(z_g(i))) A_i FM_i ]  +  kl_beta mean_i ||v - v_ref||^2

    the gradient-equivalent form (upstream's, "gradient-equivalent" in its docstring) of the group DPO loss

        L_DPO = -log sigma(-beta_dpo / G sum_{i in g} A_i (FM_theta,i - FM_ref,i)),    FM_i = mean (v_i - v*_i)^2

    whose gradient is sigma(z_g) beta_dpo / G sum_i A_i grad FM_i with z_g = beta_dpo S_g / G
    (:func:`dgpo_group_weights`); the constant beta_dpo / G is left to the lr, as upstream does.

    | code        | paper / upstream                                                   |
    |-------------|--------------------------------------------------------------------|
    | ``adv``     | A_i = w_i with sign (|A| = the weight in G+ / G-), clipped to +-5  |
    | ``weight``  | sg(sigma(z_g)), one per sample (its group's)                        |
    | ``fm``      | FM_i in velocity space (x0-space is t^2 FM, absorbed in lambda_t)  |
    | ``kl_beta`` | beta_KL (0.02 GenEval), velocity MSE to the LoRA-off reference     |

    Good samples (A > 0) are pulled toward their own flow-matching target, bad ones pushed away, while
    sigma(z_g) fades a group out once theta already prefers its good samples over the reference's
    preference. Returns (loss, stats).
    """
    fm = _per_sample((v - target) ** 2)                                                     # (B,)
    policy_loss = (weight.detach() * adv * fm).mean()
    kl = _per_sample((v - v_ref) ** 2).mean() if v_ref is not None else v.new_zeros(())
    loss = policy_loss + kl_beta * kl
    return loss, {"policy_loss": policy_loss.detach(), "kl": kl.detach(), "fm_loss": fm.mean().detach(),
                  "dgpo_weight": weight.float().mean().detach()}


# ---------------------------------------------------------------------------------------------
# The slowly moving copy both methods keep
# ---------------------------------------------------------------------------------------------
class SoftAnchor(EMA):
    """theta_anchor <- eta_k theta_anchor + (1 - eta_k) theta after each optimizer step, eta_k = min(rate k, eta_max).

    DiffusionNFT's ``old`` policy (``return_decay`` type 1: rate 0.001, max 0.5; it samples the rollouts and
    defines v+ / v-) and AWM's "ema" adapter (rate 0.001, max 0.3; a trust region on the velocity). With
    rate 0 it is a hard copy every step (on-policy). ``with anchor.swapped_in(): ...`` runs the anchor.
    """

    def __init__(self, parameters, *, rate: float, max_decay: float):
        if not 0.0 <= max_decay < 1.0:
            raise ValueError(f"anchor max decay={max_decay} must be in [0, 1)")
        if rate < 0:
            raise ValueError(f"anchor decay rate={rate} must be >= 0")
        super().__init__(parameters, decay=max_decay, update_step_interval=1)
        self.rate = float(rate)

    def current_decay(self, step: int | None = None) -> float:
        k = self.optimization_step if step is None else step
        return min(self.rate * k, self.decay)


# ---------------------------------------------------------------------------------------------
# One backward pass of each objective: the forwards it needs, then its loss
# ---------------------------------------------------------------------------------------------
def grpo_step(policy, reference, traj, columns: torch.Tensor, adv: torch.Tensor, p, autocast) -> tuple[torch.Tensor, dict]:
    """Flow-GRPO on one stored SDE step per sample: re-score it (with grad), the reference's step mean
    for beta x KL, then the clipped ratio loss (``grpo.grpo_loss``; RatioNorm with ``p.ratio_norm``).

    ``reference()`` is a context in which the policy acts as the frozen reference; ``autocast()`` the
    run's precision context. ``columns`` (B,) indexes the stored steps of ``traj``.
    """
    from .grpo import grpo_loss
    from .rollout import recompute_log_prob
    from .sde import step_kl

    ref = None
    if p.beta > 0:   # reference first: a weight swap must not touch a graph in use
        with torch.no_grad(), reference(), autocast():
            ref = recompute_log_prob(policy, traj, columns)
    with autocast():
        new = recompute_log_prob(policy, traj, columns)
    rows = torch.arange(len(traj), device=columns.device)
    kl = None if ref is None else step_kl(new.mean, ref.mean, new.std, new.dt, convention=p.kl_convention)
    extra = {}
    if p.ratio_norm:
        extra = dict(mean=new.mean, old_mean=traj.means[rows, columns], step_std=new.std, dt=new.dt)
    return grpo_loss(new.log_prob, traj.log_probs[rows, columns], adv, clip_range=p.clip_range,
                     beta=p.beta, kl=kl, ratio_norm=p.ratio_norm, **extra)


def _clean_forwards(policy, reference, anchor, samples: CleanSamples, t, eps, *, want_ref: bool,
                    want_anchor: bool, autocast, guidance_scale: float = 1.0):
    """x_t, v* and the three velocities (anchor and reference without grad, first; then theta with grad),
    all at CFG ``guidance_scale`` (``train_guidance_scale``: 1 trains the conditional velocity)."""
    x0 = samples.final_latents
    x_t, target = noisy_sample(x0, eps, t)
    v_old = v_ref = None
    with torch.no_grad():
        if want_anchor:
            with anchor.swapped_in(), autocast():
                v_old = policy_velocity(policy, x_t, t, samples.cond, guidance_scale)
        if want_ref:
            with reference(), autocast():
                v_ref = policy_velocity(policy, x_t, t, samples.cond, guidance_scale)
    with autocast():
        v = policy_velocity(policy, x_t, t, samples.cond, guidance_scale)
    return x0, x_t, target, v, v_old, v_ref


def nft_step(policy, reference, anchor, samples: CleanSamples, adv, t, eps, p, autocast):
    """DiffusionNFT on one noise level per sample: :func:`nft_loss` with v_old from the anchor (the
    sampling policy) and the optional velocity KL (``p.beta``) to the reference."""
    x0, x_t, _, v, v_old, v_ref = _clean_forwards(policy, reference, anchor, samples, t, eps,
                                                  want_ref=p.beta > 0, want_anchor=True, autocast=autocast,
                                                  guidance_scale=p.train_guidance_scale)
    r = nft_optimality(adv, p.adv_clip_max)
    loss, stats = nft_loss(v, v_old, v_ref, x_t, x0, t, r, nft_beta=p.nft_beta, scale=p.adv_clip_max,
                           kl_beta=p.beta)
    return loss, {"loss": loss.detach(), **stats}


def awm_step(policy, reference, anchor, samples: CleanSamples, adv, t, eps, p, autocast):
    """AWM on one noise level per sample: :func:`awm_loss` with the KL to the reference (``p.beta``)
    and, with ``p.anchor_beta > 0``, to the slowly moving anchor."""
    _, _, target, v, v_anchor, v_ref = _clean_forwards(
        policy, reference, anchor, samples, t, eps, want_ref=p.beta > 0,
        want_anchor=anchor is not None and p.anchor_beta > 0, autocast=autocast,
        guidance_scale=p.train_guidance_scale)
    loss, stats = awm_loss(v, v_ref, v_anchor, target, t, adv, adv_clip_max=p.adv_clip_max,
                           weighting=p.awm_weighting, p=p.awm_p, kl_beta=p.beta, anchor_beta=p.anchor_beta)
    return loss, {"loss": loss.detach(), **stats}


@torch.no_grad()
def dgpo_scores(policy, reference, samples: CleanSamples, t, eps, autocast, guidance_scale: float = 1.0
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(FM_theta, FM_ref) per sample at (t, eps), no grad: what :func:`dgpo_group_sums` needs."""
    x_t, target = noisy_sample(samples.final_latents, eps, t)
    with reference(), autocast():
        fm_ref = _per_sample((policy_velocity(policy, x_t, t, samples.cond, guidance_scale) - target) ** 2)
    with autocast():
        fm = _per_sample((policy_velocity(policy, x_t, t, samples.cond, guidance_scale) - target) ** 2)
    return fm, fm_ref


def dgpo_step(policy, reference, samples: CleanSamples, adv, t, eps, weight, p, autocast):
    """DGPO on one noise level per sample (shared by its group): :func:`dgpo_loss` with the group weights
    ``weight`` (B,) and the optional velocity KL (``p.beta``) to the reference."""
    _, _, target, v, _, v_ref = _clean_forwards(policy, reference, None, samples, t, eps, want_ref=p.beta > 0,
                                                want_anchor=False, autocast=autocast,
                                                guidance_scale=p.train_guidance_scale)
    loss, stats = dgpo_loss(v, v_ref, target, adv, weight, kl_beta=p.beta)
    return loss, {"loss": loss.detach(), **stats}


def draw_noise_levels(num_steps: int, shift: float, count: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` distinct noise levels t of the rollout's own grid (t_0 = 1 ... t_{N-1}; never the final
    t = 0), drawn without replacement (NFT: a per-sample permutation of the rollout timesteps)."""
    from .sde import convention_times

    grid = convention_times(num_steps, shift, "noise_at_one")[:-1]                    # (N,)
    if not 1 <= count <= len(grid):
        raise ValueError(f"train_timesteps={count} must be in [1, num_steps={len(grid)}]")
    return grid[torch.randperm(len(grid), generator=generator)[:count]]
