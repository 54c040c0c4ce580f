"""The likelihood-free objectives (DiffusionNFT, AWM) and Flow-GRPO on the exact 2-D Gaussian mixture:
with the indicator of one mode as reward, a few updates move probability mass into that mode, and
the negated reward moves it out. Plus the losses' algebra and the convention mapping."""
import contextlib
from types import SimpleNamespace

import pytest
import torch

from grpo_lib.gaussian_mixture import default_mixture
from grpo_lib.grpo import compute_advantages, grpo_loss
from grpo_lib.objectives import (CleanSamples, SoftAnchor, awm_log_likelihood, awm_loss, awm_step,
                                 dgpo_group_sums, dgpo_group_weights, dgpo_loss, dgpo_scores, dgpo_step,
                                 draw_noise_levels, nft_loss, nft_optimality, nft_step, noisy_sample,
                                 policy_velocity)
from grpo_lib.policies.base import Cond, FrozenReference
from grpo_lib.sde import convention_times, sde_step_with_logprob


MIX = default_mixture()
GROUP = 8                            # DGPO: samples per group (they share t and eps)
TARGET_MODE = 2                      # the mode at (0, 2), weight 0.25


class MixturePolicy(torch.nn.Module):
    """v_theta(x, t) = exact mixture velocity + a small MLP (last layer zero: starts at the exact model)."""

    def __init__(self, convention="noise_at_one", seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.convention = convention
        self.net = torch.nn.Sequential(torch.nn.Linear(3, 32), torch.nn.SiLU(), torch.nn.Linear(32, 2))
        torch.nn.init.zeros_(self.net[2].weight)
        torch.nn.init.zeros_(self.net[2].bias)

    def velocity(self, x, t, cond, guidance_scale=1.0):
        sigma = t if self.convention == "noise_at_one" else 1 - t          # the net sees the noise level
        sign = 1.0 if self.convention == "noise_at_one" else -1.0
        return MIX.velocity(x, t, self.convention).float() + sign * self.net(torch.cat([x, sigma[:, None]], 1))


def _cond(n):
    return Cond({"dummy": torch.zeros(n, 1)})


@torch.no_grad()
def _ode(policy, x, steps=20):
    times = convention_times(steps, 1.0, policy.convention)
    for i in range(steps):
        t, tn = times[i].expand(len(x)), times[i + 1].expand(len(x))
        v = policy.velocity(x, t, None)
        x, _, _, _ = sde_step_with_logprob(v, t, tn, x, noise_level=0.0, convention=policy.convention)
    return x


def _in_target(x0):
    return (torch.cdist(x0.double(), MIX.means).argmin(1) == TARGET_MODE).float()


def _mass_after(objective, sign, updates=8, n=512, convention="noise_at_one", dgpo_beta=1.0):
    """Share of ODE samples in the target mode before and after ``updates`` updates of ``objective``
    with reward sign * indicator(target mode). Same initial noise for every measurement."""
    policy = MixturePolicy(convention)
    opt = torch.optim.Adam(policy.parameters(), lr=2e-2)
    anchor = SoftAnchor(list(policy.parameters()), rate=0.0, max_decay=0.5)
    p = SimpleNamespace(beta=0.0, adv_clip_max=5.0, nft_beta=1.0, awm_weighting="uniform", awm_p=0.25,
                        anchor_beta=0.0, clip_range=0.2, kl_convention="paper", ratio_norm=False,
                        train_guidance_scale=1.0)
    reference = FrozenReference(list(policy.parameters())).swapped_in     # DGPO's: the initial weights
    g = torch.Generator().manual_seed(1)
    x_eval = torch.randn(2048, 2, generator=g)
    before = float(_in_target(_ode(policy, x_eval)).mean())
    for k in range(updates):
        x1 = torch.randn(n, 2, generator=g)
        opt.zero_grad()
        if objective == "grpo":
            _grpo_update(policy, x1, sign, p, g).backward()
        else:
            with anchor.swapped_in():
                x0 = _ode(policy, x1)
            groups = torch.arange(n) // GROUP if objective == "dgpo" else torch.zeros(n, dtype=torch.long)
            adv, _, _ = compute_advantages(sign * _in_target(x0), groups)
            samples = CleanSamples(x0.float(), _cond(n), None)
            for _ in range(4):   # backward per pass, as the trainer does (the anchor swap writes in place)
                if objective == "dgpo":   # one (t, eps) per group of GROUP samples, as the trainer draws them
                    t = (torch.rand(n // GROUP, generator=g) * 0.9 + 0.1).repeat_interleave(GROUP)
                    eps = torch.randn(n // GROUP, 2, generator=g).repeat_interleave(GROUP, 0)
                    fm, fm_ref = dgpo_scores(policy, reference, samples, t, eps, contextlib.nullcontext)
                    w = dgpo_group_weights(dgpo_group_sums(fm, fm_ref, adv, groups, n // GROUP),
                                           dgpo_beta=dgpo_beta, group_size=GROUP)[groups]
                    loss, _ = dgpo_step(policy, reference, samples, adv, t, eps, w, p, contextlib.nullcontext)
                    (loss / 4).backward()
                    continue
                t = torch.rand(n, generator=g) * 0.9 + 0.1          # noise levels in [0.1, 1]
                eps = torch.randn(n, 2, generator=g)
                step = nft_step if objective == "nft" else awm_step
                loss, _ = step(policy, contextlib.nullcontext, anchor, samples, adv, t, eps, p,
                               contextlib.nullcontext)
                (loss / 4).backward()
        opt.step()
        anchor.step()
    after = float(_in_target(_ode(policy, x_eval)).mean())
    return before, after


def _grpo_update(policy, x1, sign, p, g):
    """One Flow-GRPO update on 10-step SDE rollouts (all steps trained, on-policy ratio = 1)."""
    times = convention_times(10, 1.0, policy.convention)
    x, steps = x1, []
    with torch.no_grad():
        for i in range(10):
            t, tn = times[i].expand(len(x)), times[i + 1].expand(len(x))
            a = 0.7 if i < 9 else 0.0
            xn, lp, _, _ = sde_step_with_logprob(policy.velocity(x, t, None), t, tn, x, noise_level=a,
                                                 generator=g if a else None, convention=policy.convention)
            steps.append((x, xn, lp, t, tn))
            x = xn
    adv, _, _ = compute_advantages(sign * _in_target(x), torch.zeros(len(x), dtype=torch.long))
    loss = 0
    for x, xn, lp, t, tn in steps[:9]:
        _, new_lp, _, _ = sde_step_with_logprob(policy.velocity(x, t, None), t, tn, x, noise_level=0.7,
                                                prev_sample=xn, convention=policy.convention)
        loss = loss + grpo_loss(new_lp, lp, adv, clip_range=p.clip_range, beta=0.0)[0] / 9
    return loss


@pytest.mark.parametrize("objective", ["nft", "awm", "dgpo", "grpo"])
def test_rewarded_mode_gains_mass_and_negated_reward_loses_it(objective):
    before, up = _mass_after(objective, +1.0)
    before2, down = _mass_after(objective, -1.0)
    assert before == before2 and 0.20 < before < 0.30          # the mode's weight is 0.25
    assert up > before + 0.30, (objective, before, up)       # measured: 0.27 -> 0.65-0.70
    assert down < before - 0.18, (objective, before, down)   # measured: 0.27 -> 0.03-0.05


@pytest.mark.parametrize("objective", ["nft", "awm", "dgpo"])
def test_both_conventions_give_the_same_update(objective):
    """A noise_at_zero policy (Show-o2) trains through the same losses: identical mass after training."""
    one = _mass_after(objective, +1.0, updates=3, n=256)
    zero = _mass_after(objective, +1.0, updates=3, n=256, convention="noise_at_zero")
    assert one == pytest.approx(zero, abs=2 / 2048)


def test_dgpo_beta_is_a_trust_region_around_the_reference():
    """The group sigmoid fades a group out once theta prefers its good samples more than the reference does:
    the larger beta_dpo, the sooner, so the same updates move less mass (measured 0.27 -> 0.69 at beta 1,
    0.42 at 10, 0.32 at 100; the negated reward 0.04 / 0.15 / 0.24)."""
    before, loose = _mass_after("dgpo", +1.0, dgpo_beta=1.0)
    _, tight = _mass_after("dgpo", +1.0, dgpo_beta=100.0)
    _, tight_down = _mass_after("dgpo", -1.0, dgpo_beta=100.0)
    assert loose > tight + 0.25 and before + 0.02 < tight < before + 0.10, (before, loose, tight)
    assert before - 0.08 < tight_down < before - 0.02, (before, tight_down)


def test_dgpo_loss_has_the_group_dpo_gradient():
    """mean_i sg(sigma(z_g)) A_i FM_i has the gradient of (G / beta) x mean_g -log sigma(-beta / G sum A (FM - FM_ref))
    (per group, then averaged over the groups' samples), the form upstream calls gradient-equivalent."""
    g = torch.Generator().manual_seed(3)
    n, G, beta = 6, 3, 7.0
    groups = torch.arange(n) // G
    target, v_ref = torch.randn(n, 4, generator=g), torch.randn(n, 4, generator=g)
    adv = torch.tensor([1.0, -0.5, -0.5, 2.0, 0.0, -2.0])
    v0 = torch.randn(n, 4, generator=g)
    fm_ref = ((v_ref - target) ** 2).mean(1)
    v = v0.clone().requires_grad_(True)
    fm = ((v.detach() - target) ** 2).mean(1)
    sums = dgpo_group_sums(fm, fm_ref, adv, groups, 2)
    torch.testing.assert_close(sums, torch.stack([(adv * (fm - fm_ref))[:3].sum(), (adv * (fm - fm_ref))[3:].sum()]).double())
    w = dgpo_group_weights(sums, dgpo_beta=beta, group_size=G)
    loss, stats = dgpo_loss(v, None, target, adv, w[groups])
    loss.backward()
    u = v0.clone().requires_grad_(True)
    fm_u = ((u - target) ** 2).mean(1)
    z = beta / G * torch.zeros(2).index_add(0, groups, adv * (fm_u - fm_ref))
    (-torch.nn.functional.logsigmoid(-z).sum() * G / beta / n).backward()
    torch.testing.assert_close(v.grad, u.grad, atol=1e-6, rtol=1e-5)
    assert float(stats["dgpo_weight"]) == pytest.approx(float(w[groups].mean()))
    # at theta = ref every group weighs 1/2
    torch.testing.assert_close(dgpo_group_weights(torch.zeros(2, dtype=torch.float64), dgpo_beta=beta, group_size=G),
                               torch.full((2,), 0.5))


def test_policy_velocity_maps_noise_at_zero_onto_sd3():
    x, t = torch.randn(5, 2), torch.rand(5)
    a, b = MixturePolicy("noise_at_one"), MixturePolicy("noise_at_zero")
    torch.testing.assert_close(policy_velocity(a, x, t, None), policy_velocity(b, x, t, None), atol=1e-6, rtol=0)


class GuidedMixturePolicy(MixturePolicy):
    """CFG as the shipped policies do it: v = v_u + g (v_c - v_u), with v_u the exact mixture velocity
    (the net is the condition's contribution)."""

    def velocity(self, x, t, cond, guidance_scale=1.0):
        v_u = MIX.velocity(x, t, self.convention).float()
        return v_u + guidance_scale * (super().velocity(x, t, cond) - v_u)


@pytest.mark.parametrize("convention", ["noise_at_one", "noise_at_zero"])
def test_train_guidance_scale_trains_the_guided_velocity(convention):
    """``train_guidance_scale`` g: NFT's v, v_old and the KL reference are all the CFG velocity
    v_u + g (v_c - v_u) in the SD3 convention, whichever convention the policy runs in."""
    policy = GuidedMixturePolicy(convention)
    torch.nn.init.normal_(policy.net[2].weight, std=0.5)      # a condition that moves the velocity
    anchor = SoftAnchor(list(policy.parameters()), rate=0.0, max_decay=0.5)
    g = torch.Generator().manual_seed(3)
    n, x0, eps = 16, torch.randn(16, 2, generator=g), torch.randn(16, 2, generator=g)
    t, adv = torch.rand(n, generator=g) * 0.9 + 0.1, torch.randn(n, generator=g)
    samples = CleanSamples(x0, _cond(n), None)
    sd3 = GuidedMixturePolicy("noise_at_one")
    sd3.load_state_dict(policy.state_dict())
    x_t, _ = noisy_sample(x0, eps, t)
    for gs in (1.0, 3.0):
        p = SimpleNamespace(beta=0.5, adv_clip_max=5.0, nft_beta=1.0, train_guidance_scale=gs)
        loss, _ = nft_step(policy, contextlib.nullcontext, anchor, samples, adv, t, eps, p, contextlib.nullcontext)
        v = sd3.velocity(x_t, t, None, gs)
        want, _ = nft_loss(v, v, v, x_t, x0, t, nft_optimality(adv, 5.0), nft_beta=1.0, kl_beta=0.5)
        torch.testing.assert_close(loss, want, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(policy_velocity(policy, x_t, t, None, gs), v, atol=1e-6, rtol=0)
    v1, v3 = sd3.velocity(x_t, t, None, 1.0), sd3.velocity(x_t, t, None, 3.0)
    assert float((v1 - v3).abs().max()) > 0.1                  # the two scales are different velocities


def test_nft_loss_algebra():
    """At theta = theta_old the value ignores r, the gradient is 2 beta (2r - 1) t e/|e| ...: sign set by r."""
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    t = torch.tensor([0.9, 0.5, 0.3, 0.7])
    x_t, target = noisy_sample(x0, eps, t)
    torch.testing.assert_close(x_t - t[:, None] * target, x0)
    v_old = torch.randn(4, 3, generator=g)
    losses, grads = [], []
    for r in (torch.ones(4), torch.zeros(4), torch.full((4,), 0.5)):
        v = v_old.clone().requires_grad_(True)
        loss, _ = nft_loss(v, v_old, None, x_t, x0, t, r, nft_beta=1.0)
        loss.backward()
        losses.append(float(loss.detach()))
        grads.append(v.grad.clone())
    assert losses[0] == pytest.approx(losses[1]) == pytest.approx(losses[2])
    torch.testing.assert_close(grads[0], -grads[1])
    torch.testing.assert_close(grads[2], torch.zeros(4, 3))
    # r = 1 pulls v towards v* (the positive policy fits the sample)
    assert float((grads[0] * (v_old - target)).sum()) > 0
    assert nft_optimality(torch.tensor([-10.0, -5.0, 0.0, 2.5, 7.0]), 5.0).tolist() == [0.0, 0.0, 0.5, 0.75, 1.0]


def test_awm_loss_exact_values():
    t = torch.tensor([0.5, 1.0])
    fm = torch.tensor([0.04, 1.0])
    torch.testing.assert_close(awm_log_likelihood(fm, t, "uniform"), -fm.double())
    expected = -(t.double() / 0.25) * ((fm.double() + 1e-10) ** 0.25 - 1e-10 ** 0.25)
    torch.testing.assert_close(awm_log_likelihood(fm, t, "ghuber", 0.25), expected)
    target = torch.zeros(2, 1)
    v = torch.tensor([[0.2], [1.0]])
    loss, stats = awm_loss(v, None, None, target, t, torch.tensor([5.0, -10.0]), weighting="uniform")
    # A_hat = [1, -1]; log p = -FM = [-0.04, -1]: L = -mean(A_hat log p) = -(-0.04 + 1) / 2
    assert float(loss) == pytest.approx(-0.48)
    with pytest.raises(ValueError, match="awm_weighting='l2' is not one of"):
        awm_log_likelihood(fm, t, "l2")


def test_soft_anchor_schedule():
    w = torch.nn.Parameter(torch.zeros(1))
    anchor = SoftAnchor([w], rate=0.25, max_decay=0.5)
    seen = []
    for k in range(4):
        with torch.no_grad():
            w.fill_(float(k + 1))
        anchor.step()                            # eta_k = min(0.25 k, 0.5)
        seen.append(float(anchor.shadow[0]))
    # k=0: hard copy 1; k=1: .25*1 + .75*2 = 1.75; k=2: .5*1.75 + .5*3 = 2.375; k=3: .5*2.375 + .5*4 = 3.1875
    assert seen == [1.0, 1.75, 2.375, 3.1875]
    with pytest.raises(ValueError, match="max decay=1.0 must be in"):
        SoftAnchor([w], rate=0.1, max_decay=1.0)


def test_noise_levels_come_from_the_rollout_grid():
    g = torch.Generator().manual_seed(0)
    t = draw_noise_levels(10, 1.0, 4, g)
    grid = convention_times(10, 1.0, "noise_at_one")[:-1]
    assert len(set(t.tolist())) == 4 and all(any(abs(v - u) < 1e-7 for u in grid.tolist()) for v in t.tolist())
    with pytest.raises(ValueError, match=r"train_timesteps=11 must be in \[1, num_steps=10\]"):
        draw_noise_levels(10, 1.0, 11, g)
