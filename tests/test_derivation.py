"""grpo_lib.gaussian_mixture closed forms and grpo_lib.derivation helpers / params (fast, no notebook)."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from grpo_lib.derivation import (DerivationParams, autograd_score, energy_distance, integrate, record,
                                 writeup_euler_step)
from grpo_lib.gaussian_mixture import GaussianMixture, default_mixture
from grpo_lib.params import load_params, notebook_parameters
from grpo_lib.sde import convention_times, sde_step_with_logprob


@pytest.fixture
def gm():
    return default_mixture()


def test_score_closed_form_matches_autograd(gm):
    g = torch.Generator().manual_seed(0)
    t = 0.05 + 0.9 * torch.rand(64, generator=g, dtype=torch.float64)
    for conv in ("noise_at_one", "noise_at_zero"):
        x = gm.sample_marginal(64, t, conv, generator=g)
        ad = autograd_score(lambda y: gm.log_prob(y, t, conv), x)
        torch.testing.assert_close(gm.score(x, t, conv), ad, rtol=1e-10, atol=1e-10)


def test_velocity_at_the_two_ends(gm):
    x = torch.randn(32, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    data_mean = (gm.weights[:, None] * gm.means).sum(0)
    # pure noise (sigma = 1): E[eps - x0 | x] = x - E[x0]; clean data (sigma = 0): E[eps - x0 | x0] = -x
    torch.testing.assert_close(gm.velocity(x, 1.0, "noise_at_one"), x - data_mean)
    torch.testing.assert_close(gm.velocity(x, 0.0, "noise_at_one"), -x)
    torch.testing.assert_close(gm.velocity(x, 0.0, "noise_at_zero"), -(x - data_mean))   # mirror: v -> -v


def test_log_prob_normalises(gm):
    # quadrature of p_t over a wide grid: integrates to 1 at several noise levels
    grid = torch.linspace(-9, 9, 361, dtype=torch.float64)
    xx, yy = torch.meshgrid(grid, grid, indexing="ij")
    pts = torch.stack([xx.flatten(), yy.flatten()], -1)
    cell = (grid[1] - grid[0]) ** 2
    for t in (0.0, 0.3, 0.8, 1.0):
        mass = (gm.log_prob(pts, t).exp().sum() * cell).item()
        assert mass == pytest.approx(1.0, abs=1e-6)


def test_mixture_bad_inputs():
    with pytest.raises(ValueError, match=r"weights=\[0.5, 0.6\]"):
        GaussianMixture([0.5, 0.6], [[0, 0], [1, 1]], [1, 1])
    with pytest.raises(ValueError, match=r"stds=\[1.0, 0.0\]"):
        GaussianMixture([0.5, 0.5], [[0, 0], [1, 1]], [1, 0])
    with pytest.raises(ValueError, match="convention='sd3'"):
        default_mixture().velocity(torch.zeros(2, 2), 0.5, "sd3")


def test_energy_distance_exact_and_discriminating(gm):
    a, b = torch.tensor([[0.0, 0.0], [0.0, 0.0]]), torch.tensor([[3.0, 4.0], [3.0, 4.0]])
    assert energy_distance(a, b) == pytest.approx(10.0)          # 2 * |a - b| = 2 * 5
    g = torch.Generator().manual_seed(2)
    same = energy_distance(gm.sample_data(500, g), gm.sample_data(500, g))
    shifted = energy_distance(gm.sample_data(500, g), gm.sample_data(500, g) + 0.5)
    assert abs(same) < 0.03 and shifted > 0.1
    with pytest.raises(ValueError, match=r"\(3, 2\) and y \(3, 3\)"):
        energy_distance(torch.zeros(3, 2), torch.zeros(3, 3))


def test_writeup_step_equals_project_step_and_flipped_differs(gm):
    x = torch.randn(16, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    v = gm.velocity(x, 0.25, "noise_at_zero")
    _, mean_w, std_w = writeup_euler_step(x, v, 0.25, 0.5, 0.7)
    _, _, mean_p, std_p = sde_step_with_logprob(v, 0.25, 0.5, x, noise_level=0.7, convention="noise_at_zero")
    torch.testing.assert_close(mean_p.double(), mean_w, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(std_p.flatten().double(), std_w.expand(16), rtol=1e-6, atol=1e-6)
    _, mean_f, _ = writeup_euler_step(x, v, 0.25, 0.5, 0.7, score_sign=-1.0)
    assert (mean_f - mean_w).abs().max() > 0.1


def test_sde_chain_preserves_mixture_moments(gm):
    # a cheap marginal check (the notebook does the full energy-distance version)
    g = torch.Generator().manual_seed(4)
    n = 4000
    exact = gm.sample_data(n, g)
    vf = lambda x, t: gm.velocity(x.double(), t, "noise_at_one").float()
    for a in (0.0, 0.7):
        x, lp = integrate(vf, torch.randn(n, 2, generator=g), convention_times(40, 3.0, "noise_at_one"),
                          noise_level=a, convention="noise_at_one", generator=g)
        # 4 standard errors of a difference of two sample means; std within 5 %
        se = (2.0 / n) ** 0.5 * exact.std(0)
        assert ((x.double().mean(0) - exact.mean(0)).abs() < 4 * se).all(), (x.mean(0), exact.mean(0), se)
        torch.testing.assert_close(x.double().std(0), exact.std(0), rtol=0.05, atol=0)
        assert torch.isfinite(lp).all() and (lp == 0).all() == (a == 0)


def test_record_rows():
    rows = []
    assert record(rows, "1", "small", 1e-9, 1e-8)
    assert not record(rows, "1", "big", 1.0, 1e-8)
    assert record(rows, "3", "rejected", 2.0, 0.1, expect="above")
    assert [r["passed"] for r in rows] == [True, False, True]
    with pytest.raises(ValueError, match="expect='maybe'"):
        record(rows, "3", "x", 1.0, 1.0, expect="maybe")


def test_params_schema_matches_notebook_and_yaml(repo):
    cell = notebook_parameters(repo / "notebooks" / "00_derivation_checks.ipynb")
    defaults = {f.name: (f.default if f.default is not dataclasses.MISSING else f.default_factory())
                for f in dataclasses.fields(DerivationParams)}
    assert cell == defaults
    for exp in ("smoke", "default"):
        p = load_params(repo / "params" / f"00_derivation_checks__{exp}.yaml")
        assert isinstance(p, DerivationParams)
    with pytest.raises(ValueError, match="n_sample"):
        load_params({"n_sample": 10}, DerivationParams)
    with pytest.raises(ValueError, match="null_repeats=2"):
        DerivationParams(null_repeats=2)
