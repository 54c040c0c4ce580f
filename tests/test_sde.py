"""grpo_lib.sde: schedule vs diffusers, the SDE/CPS/ODE step, its log-prob, conventions, step KL."""
from __future__ import annotations

import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from grpo_lib.sde import convention_times, sd3_sigmas, sde_step_with_logprob, step_kl

SHAPE = (3, 4, 5, 6)  # (B, C, H, W)


def _inputs(seed=0, shape=SHAPE, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g).to(dtype)
    v = torch.randn(shape, generator=g).to(dtype)
    return x, v


def _normal_logprob(x, mean, std):
    lp = torch.distributions.Normal(mean, std.expand_as(mean)).log_prob(x)
    return lp.mean(dim=tuple(range(1, x.dim())))


# ---------------------------------------------------------------- schedules
@pytest.mark.parametrize("num_steps", [1, 2, 10, 20, 40])
@pytest.mark.parametrize("shift", [1.0, 3.0, 5.0])
def test_sd3_sigmas_equal_diffusers(num_steps, shift):
    sched = FlowMatchEulerDiscreteScheduler(shift=shift)
    sched.set_timesteps(num_steps)
    sig = sd3_sigmas(num_steps, shift)
    assert sig.dtype == torch.float32 and sig.shape == (num_steps + 1,)
    assert torch.equal(sig, sched.sigmas)
    assert sig[0] == 1.0 and sig[-1] == 0.0


def test_sd3_sigmas_match_notes_values():
    # flow_grpo_notes §1.2: SD3.5-M, shift 3, N=10
    expected = [1.0, .9601, .9133, .8577, .7904, .7073, .6022, .4649, .2780, .0089, 0.0]
    assert torch.allclose(sd3_sigmas(10, 3.0), torch.tensor(expected), atol=6e-5)


def test_convention_times():
    sig = sd3_sigmas(7, 3.0)
    assert torch.equal(convention_times(7, 3.0, "noise_at_one"), sig)
    assert torch.equal(convention_times(7, 3.0, "noise_at_zero"), 1.0 - sig)
    t = convention_times(7, 3.0, "noise_at_zero")
    assert t[0] == 0.0 and t[-1] == 1.0 and bool((t[1:] > t[:-1]).all())
    with pytest.raises(ValueError, match="'sd4'"):
        convention_times(7, 3.0, "sd4")
    with pytest.raises(ValueError, match="num_steps=0"):
        sd3_sigmas(0)
    with pytest.raises(ValueError, match="shift=-1"):
        sd3_sigmas(4, -1.0)


# ---------------------------------------------------------------- the step: log-prob
@pytest.mark.parametrize("sde_type", ["sde", "cps"])
@pytest.mark.parametrize("convention", ["noise_at_one", "noise_at_zero"])
def test_log_prob_is_mean_gaussian_log_density(sde_type, convention):
    x, v = _inputs()
    sig = sd3_sigmas(10, 3.0)
    t = torch.tensor([sig[0], sig[3], sig[7]])          # per-sample times, incl. the pure-noise end
    tn = torch.tensor([sig[1], sig[4], sig[8]])
    if convention == "noise_at_zero":
        t, tn = 1 - t, 1 - tn
    g = torch.Generator().manual_seed(1)
    prev, lp, mean, std = sde_step_with_logprob(v, t, tn, x, noise_level=0.7, generator=g,
                                                sde_type=sde_type, convention=convention)
    assert lp.shape == (3,) and std.shape == (3, 1, 1, 1)
    torch.testing.assert_close(lp, _normal_logprob(prev, mean, std), rtol=1e-6, atol=1e-6)
    # and for a transition that was not sampled from this Gaussian
    other = prev + 0.1 * torch.randn(SHAPE, generator=g)
    _, lp2, mean2, std2 = sde_step_with_logprob(v, t, tn, x, noise_level=0.7, prev_sample=other,
                                                sde_type=sde_type, convention=convention)
    torch.testing.assert_close(mean2, mean, rtol=0, atol=0)
    torch.testing.assert_close(lp2, _normal_logprob(other, mean, std), rtol=1e-6, atol=1e-6)


def test_cps_upstream_logprob_drops_constants_and_scale():
    x, v = _inputs()
    prev, lp, mean, std = sde_step_with_logprob(v, 0.8, 0.6, x, noise_level=0.8, sde_type="cps",
                                                generator=torch.Generator().manual_seed(0))
    _, lp_up, _, _ = sde_step_with_logprob(v, 0.8, 0.6, x, noise_level=0.8, sde_type="cps",
                                           prev_sample=prev, cps_logprob="upstream")
    torch.testing.assert_close(lp_up, -((prev - mean) ** 2).mean(dim=(1, 2, 3)))
    # std = sigma' sin(a pi/2)
    torch.testing.assert_close(std.flatten(), torch.full((3,), 0.6 * math.sin(0.8 * math.pi / 2)))
    assert not torch.allclose(lp_up, lp)


def test_scoring_a_sampled_transition_reproduces_its_log_prob():
    x, v = _inputs(3)
    for sde_type in ("sde", "cps"):
        prev, lp, mean, std = sde_step_with_logprob(v, 0.9133, 0.8577, x, noise_level=0.7, sde_type=sde_type,
                                                    generator=torch.Generator().manual_seed(5))
        prev2, lp2, mean2, std2 = sde_step_with_logprob(v, 0.9133, 0.8577, x, noise_level=0.7,
                                                        sde_type=sde_type, prev_sample=prev)
        assert torch.equal(prev2, prev) and torch.equal(mean2, mean) and torch.equal(std2, std)
        assert torch.equal(lp2, lp)


def test_gradient_flows_through_mean_only():
    x, v = _inputs()
    v = v.clone().requires_grad_(True)
    prev = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2)).requires_grad_(True)
    _, lp, mean, std = sde_step_with_logprob(v, 0.7, 0.6, x, noise_level=0.7, prev_sample=prev)
    lp.sum().backward()
    assert v.grad is not None and v.grad.abs().sum() > 0
    assert prev.grad is None
    # d logp / d v = (x' - mu)/std^2 * d mu/d v / numel, with d mu / d v = (1 + sd^2 (1-s)/(2s)) dt
    s, sn, a = 0.7, 0.6, 0.7
    sd2 = a * a * s / (1 - s)
    coef = (1 + sd2 * (1 - s) / (2 * s)) * (sn - s)
    expected = (prev.detach() - mean.detach()) / std ** 2 * coef / (4 * 5 * 6)
    torch.testing.assert_close(v.grad, expected, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------- the step: ODE limit
@pytest.mark.parametrize("sde_type", ["sde", "cps"])
def test_noise_level_zero_equals_diffusers_euler(sde_type):
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(10)
    x, _ = _inputs(7)
    x_ours = x_zero = x.clone()
    g = torch.Generator().manual_seed(11)
    for i, timestep in enumerate(sched.timesteps):
        v = torch.randn(SHAPE, generator=g)
        ref = sched.step(v, timestep, x_ours, return_dict=False)[0]
        s, sn = sched.sigmas[i], sched.sigmas[i + 1]
        prev, lp, mean, std = sde_step_with_logprob(v, s, sn, x_ours, noise_level=0.0, sde_type=sde_type)
        prev_z, lp_z, _, _ = sde_step_with_logprob(-v, 1 - s, 1 - sn, x_zero, noise_level=0.0,
                                                   sde_type=sde_type, convention="noise_at_zero")
        if sde_type == "sde":   # x + 0 * (...) + v * 1 * dt: bit-identical to x + dt * v
            assert torch.equal(prev, ref)
        else:                   # (1-s')(x - s v) + s'(x + (1-s) v) == x + (s'-s) v up to float rounding
            torch.testing.assert_close(prev, ref, rtol=0, atol=2e-6)
        torch.testing.assert_close(prev_z, ref, rtol=0, atol=2e-6)
        assert torch.equal(prev, mean) and torch.equal(std, torch.zeros_like(std))
        assert torch.equal(lp, torch.zeros(3)) and torch.equal(lp_z, torch.zeros(3))
        x_ours, x_zero = ref, prev_z


# ---------------------------------------------------------------- the step: conventions
@pytest.mark.parametrize("sde_type", ["sde", "cps"])
def test_conventions_give_identical_transitions(sde_type):
    x, v = _inputs(4)
    sig = sd3_sigmas(10, 3.0)
    for i in range(10):
        t, tn = sig[i].item(), sig[i + 1].item()
        a = sde_step_with_logprob(v, t, tn, x, noise_level=0.7, sde_type=sde_type,
                                  generator=torch.Generator().manual_seed(i))
        b = sde_step_with_logprob(-v, 1 - t, 1 - tn, x, noise_level=0.7, sde_type=sde_type,
                                  convention="noise_at_zero", generator=torch.Generator().manual_seed(i))
        for ya, yb in zip(a, b):
            # 1 - (1 - t) is not always t in float32: agreement to a few ulps, not bit-identical
            torch.testing.assert_close(yb, ya, rtol=2e-5, atol=2e-5)
    # dyadic times map exactly, so there the transitions are bit-identical
    a = sde_step_with_logprob(v, 0.75, 0.5, x, noise_level=0.7, sde_type=sde_type,
                              generator=torch.Generator().manual_seed(0))
    b = sde_step_with_logprob(-v, 0.25, 0.5, x, noise_level=0.7, sde_type=sde_type,
                              convention="noise_at_zero", generator=torch.Generator().manual_seed(0))
    for ya, yb in zip(a, b):
        assert torch.equal(ya, yb)


def test_show_o2_writeup_form():
    # seed 003: x_{t+dt} = (1 - s^2 dt/(2(1-t))) x + (1 + s^2 t/(2(1-t))) v dt + sqrt(dt) s w, s = a sqrt((1-t)/t)
    x, v = _inputs(8)
    t, tn, a = 0.3, 0.45, 0.6
    dt = tn - t
    s2 = a * a * (1 - t) / t
    _, _, mean, std = sde_step_with_logprob(v, t, tn, x, noise_level=a, convention="noise_at_zero")
    expected = (1 - s2 * dt / (2 * (1 - t))) * x + (1 + s2 * t / (2 * (1 - t))) * v * dt
    torch.testing.assert_close(mean, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(std.flatten(), torch.full((3,), math.sqrt(s2 * dt)))


# ---------------------------------------------------------------- the step: precision, ends
@pytest.mark.parametrize("sde_type", ["sde", "cps"])
def test_bf16_inputs_give_float32_results(sde_type):
    x, v = _inputs(9, dtype=torch.bfloat16)
    prev_b, lp_b, mean_b, std_b = sde_step_with_logprob(v, 0.8577, 0.7904, x, noise_level=0.7, sde_type=sde_type,
                                                        generator=torch.Generator().manual_seed(0))
    prev_f, lp_f, mean_f, std_f = sde_step_with_logprob(v.float(), 0.8577, 0.7904, x.float(), noise_level=0.7,
                                                        sde_type=sde_type, generator=torch.Generator().manual_seed(0))
    for y in (prev_b, lp_b, mean_b, std_b):
        assert y.dtype == torch.float32
    # identical to the float32 computation on the same (bf16-representable) values
    for yb, yf in zip((prev_b, lp_b, mean_b, std_b), (prev_f, lp_f, mean_f, std_f)):
        assert torch.equal(yb, yf)
    # scoring a bf16-stored next latent: the ratio error is the bf16 rounding of x', not of the math
    _, lp_s, _, _ = sde_step_with_logprob(v, 0.8577, 0.7904, x, noise_level=0.7, sde_type=sde_type,
                                          prev_sample=prev_b.to(torch.bfloat16))
    assert torch.isfinite(lp_s).all()
    torch.testing.assert_close(lp_s, _normal_logprob(prev_b.to(torch.bfloat16).float(), mean_f, std_f),
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("sde_type", ["sde", "cps"])
def test_no_inf_nan_at_pure_noise_end(sde_type):
    x, v = _inputs(10)
    sig = sd3_sigmas(10, 3.0)
    for conv, (t, tn) in {"noise_at_one": (1.0, sig[1].item()), "noise_at_zero": (0.0, 1 - sig[1].item())}.items():
        out = sde_step_with_logprob(v, t, tn, x, noise_level=1.0, sde_type=sde_type, convention=conv,
                                    generator=torch.Generator().manual_seed(0))
        for y in out:
            assert torch.isfinite(y).all()
    # 'sde': sigma_t = a sqrt(1/(1 - sigma_1)), so the first per-step std is exactly a (notes §1.2)
    _, _, _, std = sde_step_with_logprob(v, 1.0, sig[1].item(), x, noise_level=0.7)
    torch.testing.assert_close(std.flatten(), torch.full((3,), 0.7))
    # an explicit sigma_max stands in instead of t_next
    _, _, _, std2 = sde_step_with_logprob(v, 1.0, 0.9, x, noise_level=0.7, sigma_max=0.96)
    torch.testing.assert_close(std2.flatten(), torch.full((3,), 0.7 * math.sqrt(1 / 0.04) * math.sqrt(0.1)))


def test_sde_std_matches_upstream_numbers():
    # notes §1.2: std_dev_t ~ 3.51, 3.44, 2.27, ... and per-step std ~ .70, .74, .54, ... at a = 0.7, N = 10
    sig = sd3_sigmas(10, 3.0)
    x, v = _inputs(shape=(1, 2))
    stds, sdts = [], []
    for i in range(10):
        _, _, _, std = sde_step_with_logprob(v, sig[i].item(), sig[i + 1].item(), x, noise_level=0.7,
                                             sigma_max=sig[1].item())
        stds.append(std.item())
        sdts.append(std.item() / math.sqrt(sig[i] - sig[i + 1]))
    assert stds == pytest.approx([.70, .74, .54, .45, .39, .35, .32, .28, .23, .0063], abs=0.006)
    assert sdts == pytest.approx([3.51, 3.44, 2.27, 1.72, 1.36, 1.09, .86, .65, .43, .066], abs=0.006)


def test_cps_to_data_end_is_a_point_mass():
    x, v = _inputs(11)
    prev, lp, mean, std = sde_step_with_logprob(v, 0.1, 0.0, x, noise_level=0.8, sde_type="cps",
                                                generator=torch.Generator().manual_seed(0))
    assert torch.equal(std, torch.zeros_like(std)) and torch.equal(prev, mean)
    assert torch.equal(lp, torch.zeros(3))
    torch.testing.assert_close(mean, x - 0.1 * v)  # predicted data x0^


def test_generator_lists_give_per_sample_noise():
    x, v = _inputs(12)
    gens = [torch.Generator().manual_seed(100 + i) for i in range(3)]
    prev, *_ = sde_step_with_logprob(v, 0.5, 0.4, x, noise_level=0.7, generator=gens)
    for i in range(3):
        single, *_ = sde_step_with_logprob(v[i:i + 1], 0.5, 0.4, x[i:i + 1], noise_level=0.7,
                                           generator=torch.Generator().manual_seed(100 + i))
        assert torch.equal(prev[i:i + 1], single)


# ---------------------------------------------------------------- the step: bad input
def test_bad_inputs_raise_value_errors_naming_the_value():
    x, v = _inputs()
    step = sde_step_with_logprob
    with pytest.raises(ValueError, match=r"t_next=\[0.6.*must be < t=\[0.5"):
        step(v, 0.5, 0.6, x, noise_level=0.7)
    with pytest.raises(ValueError, match=r"t_next=\[0.5.*must be < t"):
        step(v, 0.5, 0.5, x, noise_level=0.7)
    with pytest.raises(ValueError, match=r"t_next=\[0.4.*must be > t=\[0.5.*noise_at_zero"):
        step(v, 0.5, 0.4, x, noise_level=0.7, convention="noise_at_zero")
    with pytest.raises(ValueError, match="t_next"):
        step(v, torch.tensor([0.5, 0.5, 0.5]), torch.tensor([0.4, 0.6, 0.4]), x, noise_level=0.7)
    with pytest.raises(ValueError, match=r"noise_level=-0.1"):
        step(v, 0.5, 0.4, x, noise_level=-0.1)
    with pytest.raises(ValueError, match=r"noise_level=nan"):
        step(v, 0.5, 0.4, x, noise_level=float("nan"))
    with pytest.raises(ValueError, match=r"noise_level=1.5.*cps"):
        step(v, 0.5, 0.4, x, noise_level=1.5, sde_type="cps")
    with pytest.raises(ValueError, match=r"model_output has shape \(3, 4, 5, 5\)"):
        step(v[..., :5], 0.5, 0.4, x, noise_level=0.7)
    with pytest.raises(ValueError, match=r"prev_sample has shape \(2, 4, 5, 6\)"):
        step(v, 0.5, 0.4, x, noise_level=0.7, prev_sample=x[:2])
    with pytest.raises(ValueError, match=r"t has shape \(2,\)"):
        step(v, torch.tensor([0.5, 0.5]), 0.4, x, noise_level=0.7)
    with pytest.raises(ValueError, match=r"t=\[1.5"):
        step(v, 1.5, 0.4, x, noise_level=0.7)
    with pytest.raises(ValueError, match="both prev_sample and generator"):
        step(v, 0.5, 0.4, x, noise_level=0.7, prev_sample=x, generator=torch.Generator())
    with pytest.raises(ValueError, match="sde_type='ddim'"):
        step(v, 0.5, 0.4, x, noise_level=0.7, sde_type="ddim")
    with pytest.raises(ValueError, match="convention='sd3'"):
        step(v, 0.5, 0.4, x, noise_level=0.7, convention="sd3")
    with pytest.raises(ValueError, match="sigma_max=1.0"):
        step(v, 1.0, 0.9, x, noise_level=0.7, sigma_max=1.0)
    with pytest.raises(ValueError, match="cps_logprob='sum'"):
        step(v, 0.5, 0.4, x, noise_level=0.7, cps_logprob="sum")
    with pytest.raises(ValueError, match="2 generators for a batch of 3"):
        step(v, 0.5, 0.4, x, noise_level=0.7, generator=[torch.Generator(), torch.Generator()])


# ---------------------------------------------------------------- step KL
def test_step_kl_against_analytic_and_monte_carlo():
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(2, 3, 4, 4, generator=g)
    ref = mean + 0.3 * torch.randn(2, 3, 4, 4, generator=g)
    std = torch.tensor([0.5, 0.2]).reshape(2, 1, 1, 1)
    dt = torch.tensor([-0.04, -0.25])
    kl_paper = step_kl(mean, ref, std, dt, convention="paper")
    kl_up = step_kl(mean, ref, std, dt, convention="upstream")
    # analytic: torch's Normal-Normal KL, averaged over C, H, W
    p = torch.distributions.Normal(mean, std.expand_as(mean))
    q = torch.distributions.Normal(ref, std.expand_as(ref))
    analytic = torch.distributions.kl_divergence(p, q).mean(dim=(1, 2, 3))
    torch.testing.assert_close(kl_paper, analytic, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(kl_up, analytic * dt.abs(), rtol=1e-5, atol=1e-7)
    # Monte Carlo: E_p[log p - log q] with 20k draws; tolerance = 5 standard errors
    xs = p.sample((20000,))                                     # (S, B, C, H, W)
    llr = (p.log_prob(xs) - q.log_prob(xs)).mean(dim=(2, 3, 4))  # (S, B)
    mc, se = llr.mean(0), llr.std(0) / math.sqrt(xs.shape[0])
    assert ((mc - kl_paper).abs() < 5 * se).all(), (mc, kl_paper, se)
    # the step's own outputs plug in directly: policy vs reference velocity
    x, v = _inputs()
    v_ref = v + 0.1
    _, _, mu, s = sde_step_with_logprob(v, 0.6, 0.5, x, noise_level=0.7)
    _, _, mu_ref, s_ref = sde_step_with_logprob(v_ref, 0.6, 0.5, x, noise_level=0.7)
    assert torch.equal(s, s_ref)
    kl = step_kl(mu, mu_ref, s, -0.1, convention="paper")
    sd2 = 0.49 * 0.6 / 0.4
    coef = (1 + sd2 * 0.4 / 1.2) * 0.1
    torch.testing.assert_close(kl, torch.full((3,), (0.1 * coef) ** 2 / (2 * sd2 * 0.1)), rtol=1e-4, atol=0)


def test_step_kl_bad_inputs():
    m = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="convention='kl'"):
        step_kl(m, m, 0.1, 0.1, convention="kl")
    with pytest.raises(ValueError, match=r"ref_mean has \(2, 4\)"):
        step_kl(m, torch.zeros(2, 4), 0.1, 0.1)
    with pytest.raises(ValueError, match=r"std=\[0.0\]"):
        step_kl(m, m, 0.0, 0.1)
    with pytest.raises(ValueError, match=r"std has shape \(3,\)"):
        step_kl(m, m, torch.ones(3), 0.1)
