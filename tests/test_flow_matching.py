"""flow_matching: exact target -> zero loss, mirrored conventions agree, logit-normal times, weightings."""
from __future__ import annotations

import contextlib
import math

import pytest
import torch

from grpo_lib.flow_matching import flow_matching_loss, interpolate, loss_weight, sample_timesteps
from grpo_lib.policies.base import Cond

torch.set_num_threads(1)

SHAPE = (3, 8, 8)


class OraclePolicy:
    """Knows each sample's x0 (carried in cond) and returns the exact conditional velocity plus ``offset``:
    noise_at_one v = (x_t - x0) / t = eps - x0;  noise_at_zero v = (x0 - x_t) / (1 - t) = x0 - eps."""

    latent_shape = SHAPE
    device = torch.device("cpu")
    dtype = torch.float32

    def __init__(self, convention: str, offset: float = 0.0):
        self.convention, self.offset = convention, offset

    def encode(self, x0):  # the "prompt" is the clean sample itself
        return Cond({"x0": x0})

    def velocity(self, x_t, t, cond, guidance_scale=1.0):
        assert guidance_scale == 1.0
        x0, tb = cond.tensors["x0"], t.view(-1, 1, 1, 1)
        v = (x_t - x0) / tb if self.convention == "noise_at_one" else (x0 - x_t) / (1 - tb)
        return v + self.offset

    def decode(self, x):  # pragma: no cover - contract filler
        raise NotImplementedError

    def trainable_parameters(self):
        return []

    def reference(self):
        return contextlib.nullcontext()


def _data(b=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, *SHAPE, generator=g).clamp(-1, 1), torch.randn(b, *SHAPE, generator=g)


@pytest.mark.parametrize("convention", ["noise_at_one", "noise_at_zero"])
def test_exact_conditional_velocity_gives_zero_loss(convention):
    x0, eps = _data()
    pol = OraclePolicy(convention)
    t = torch.tensor([0.05, 0.2, 0.4, 0.6, 0.8, 0.95])
    loss = flow_matching_loss(pol, x0, pol.encode(x0), t=t, noise=eps)
    assert loss.item() < 1e-10
    # drawn t and eps too (generator path), and every weighting
    for w in ("none", "sigma_sqrt", "cosmap"):
        loss = flow_matching_loss(pol, x0, pol.encode(x0), generator=torch.Generator().manual_seed(3), weighting=w)
        assert loss.item() < 1e-9, w


@pytest.mark.parametrize("convention", ["noise_at_one", "noise_at_zero"])
def test_constant_error_gives_exactly_the_weight(convention):
    # v = v* + 0.5 everywhere -> per-sample loss = 0.25 w(sigma)
    x0, eps = _data(4)
    pol = OraclePolicy(convention, offset=0.5)
    t = torch.tensor([0.25, 0.5, 0.75, 0.125])
    sigma = t if convention == "noise_at_one" else 1 - t
    per = flow_matching_loss(pol, x0, pol.encode(x0), t=t, noise=eps, weighting="none", reduction="none")
    torch.testing.assert_close(per, torch.full((4,), 0.25), atol=1e-5, rtol=0)
    per = flow_matching_loss(pol, x0, pol.encode(x0), t=t, noise=eps, weighting="sigma_sqrt", reduction="none")
    torch.testing.assert_close(per, 0.25 / sigma ** 2, atol=1e-4, rtol=1e-5)
    per = flow_matching_loss(pol, x0, pol.encode(x0), t=t, noise=eps, weighting="cosmap", reduction="none")
    torch.testing.assert_close(per, 0.25 * 2 / (math.pi * (1 - 2 * sigma + 2 * sigma ** 2)), atol=1e-5, rtol=1e-5)
    assert loss_weight(torch.tensor([0.5]), "cosmap").item() == pytest.approx(4 / math.pi)


def test_zero_velocity_loss_is_the_target_energy():
    x0, eps = _data()
    pol = OraclePolicy("noise_at_one")
    pol.velocity = lambda x_t, t, cond, g=1.0: torch.zeros_like(x_t)
    loss = flow_matching_loss(pol, x0, pol.encode(x0), t=torch.full((6,), 0.3), noise=eps)
    torch.testing.assert_close(loss, ((eps - x0) ** 2).mean(), atol=1e-6, rtol=1e-6)


def test_interpolation_formulas_and_mirror():
    x0, eps = _data(2)
    t = torch.tensor([0.25, 0.75])
    xt1, v1 = interpolate(x0, eps, t, "noise_at_one")
    xt0, v0 = interpolate(x0, eps, 1 - t, "noise_at_zero")
    torch.testing.assert_close(xt1[0], 0.75 * x0[0] + 0.25 * eps[0])
    torch.testing.assert_close(xt1, xt0)          # same point of the path at mirrored times
    torch.testing.assert_close(v1, -v0)           # velocity flips with time


def _tiny(convention):
    from grpo_lib.policies.tiny import TinyConfig, TinyPolicy
    cfg = TinyConfig(block_out_channels=(8, 16, 16), cross_attn_levels=(False, False, True), norm_num_groups=4,
                     attention_heads=2, text_dim=16, text_heads=2, text_layers=1)
    return TinyPolicy(cfg, convention=convention, seed=0)


def test_both_conventions_give_identical_loss_for_mirrored_t():
    one, zero = _tiny("noise_at_one"), _tiny("noise_at_zero")
    one.add_lora({"r": 2, "lora_alpha": 2})
    zero.add_lora({"r": 2, "lora_alpha": 2})
    prompts = ["a photo of four red circles", "two blue squares", "", "seven green triangles"]
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(4, 3, 32, 32, generator=g) * 2 - 1
    eps = torch.randn(4, 3, 32, 32, generator=g)
    s = torch.tensor([0.125, 0.375, 0.5, 0.875])      # dyadic: 1 - (1 - s) == s exactly
    l1 = flow_matching_loss(one, x0, one.encode(prompts), t=s, noise=eps)
    l0 = flow_matching_loss(zero, x0, zero.encode(prompts), t=1 - s, noise=eps)
    assert l1.item() == l0.item() and l1.item() > 0.1
    # drawn times: the same generator state draws mirrored times, hence the same loss
    l1 = flow_matching_loss(one, x0, one.encode(prompts), generator=torch.Generator().manual_seed(5),
                            weighting="cosmap")
    l0 = flow_matching_loss(zero, x0, zero.encode(prompts), generator=torch.Generator().manual_seed(5),
                            weighting="cosmap")
    assert l1.item() == pytest.approx(l0.item(), rel=1e-5)
    # gradients reach the LoRA only (the base is frozen)
    l1.backward()
    grads = [p.grad for p in one.trainable_parameters()]
    assert grads and all(gr is not None for gr in grads) and any(gr.abs().sum() > 0 for gr in grads)
    assert all(p.grad is None for n, p in one.unet.named_parameters() if "lora_" not in n)


def test_sample_timesteps_is_logit_normal_in_the_convention():
    t = sample_timesteps(40000, torch.Generator().manual_seed(0), mean=0.5, std=0.8)
    z = torch.log(t / (1 - t))
    assert abs(z.mean().item() - 0.5) < 0.02 and abs(z.std().item() - 0.8) < 0.02
    assert t.dtype == torch.float32 and t.shape == (40000,)
    a = sample_timesteps(5, torch.Generator().manual_seed(1), 0.3, 1.0)
    b = sample_timesteps(5, torch.Generator().manual_seed(1), 0.3, 1.0, convention="noise_at_zero")
    torch.testing.assert_close(b, 1 - a)
    c = sample_timesteps(5, torch.Generator().manual_seed(1), 0.3, 1.0, shift=3.0)
    torch.testing.assert_close(c, 3 * a / (1 + 2 * a))   # SD3 schedule shift on the noise level


def test_bad_inputs_name_the_value():
    x0, eps = _data(2)
    pol = OraclePolicy("noise_at_one")
    c = pol.encode(x0)
    with pytest.raises(ValueError, match="weighting='lognorm'"):
        flow_matching_loss(pol, x0, c, weighting="lognorm")
    with pytest.raises(ValueError, match=r"x0 must be a float tensor \(B, 3, 8, 8\)"):
        flow_matching_loss(pol, x0[:, :2], c)
    with pytest.raises(ValueError, match="t must be a tensor of shape \\(2,\\)"):
        flow_matching_loss(pol, x0, c, t=torch.tensor(0.5))
    with pytest.raises(ValueError, match=r"t must lie in \[0, 1\]"):
        flow_matching_loss(pol, x0, c, t=torch.tensor([0.5, 1.5]))
    with pytest.raises(ValueError, match="cond must be a Cond with 2 rows"):
        flow_matching_loss(pol, x0, pol.encode(x0[:1]))
    with pytest.raises(ValueError, match="noise must be a tensor of shape"):
        flow_matching_loss(pol, x0, c, noise=eps[:1])
    with pytest.raises(ValueError, match="std=0"):
        sample_timesteps(3, None, 0.0, 0)
    with pytest.raises(ValueError, match="batch=0"):
        sample_timesteps(0)
