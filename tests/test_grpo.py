"""Tests for grpo_lib.grpo: batch arithmetic, group sampler, advantages, loss, timesteps, EMA."""
from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
import torch

from grpo_lib.grpo import (EMA, GroupSampler, batches_per_epoch_from_groups, check_batch_arithmetic,
                           compute_advantages, gradient_accumulation_steps, grpo_loss, guard_log_ratio,
                           select_timesteps)


# ------------------------------------------------------------------ batch arithmetic

def test_batch_arithmetic_upstream_and_fork_configs():
    # paper / geneval_sd3: 32 GPUs x 9, G=24, 48 groups -> 4 batches per epoch, 1152 images
    a = check_batch_arithmetic(32, 9, 24, groups_per_epoch=48)
    assert (a.batches_per_epoch, a.samples_per_epoch, a.samples_per_batch) == (4, 1152, 288)
    assert a.groups_per_batch == 12.0
    # counting fork: 4 GPUs x 6, G=12, 24 batches -> 48 groups (576 images), grad accum 12
    f = check_batch_arithmetic(4, 6, 12, batches_per_epoch=24)
    assert (f.groups_per_epoch, f.samples_per_epoch) == (48, 576)
    assert gradient_accumulation_steps(f.batches_per_epoch) == 12
    # both given and consistent is fine
    assert check_batch_arithmetic(4, 6, 12, groups_per_epoch=48, batches_per_epoch=24) == f
    # groups may straddle batches: P*B=4 < G=8 (upstream's old sampler rejected this, issue #79)
    s = check_batch_arithmetic(1, 4, 8, groups_per_epoch=3)
    assert (s.batches_per_epoch, s.groups_per_batch) == (6, 0.5)


def test_batch_arithmetic_errors_name_the_fix():
    with pytest.raises(ValueError) as e:
        check_batch_arithmetic(1, 5, 12, batches_per_epoch=6)
    msg = str(e.value)
    assert "= 30 is not a multiple of group_size=12" in msg
    assert "batch_size 6" in msg and "group_size 10" in msg and "batches_per_epoch 12" in msg
    with pytest.raises(ValueError, match=r"7\*12 = 84 is not a multiple of num_processes\*batch_size = 4\*6 = 24"
                                         r".*groups_per_epoch 8"):
        check_batch_arithmetic(4, 6, 12, groups_per_epoch=7)
    with pytest.raises(ValueError, match="disagrees"):
        check_batch_arithmetic(4, 6, 12, groups_per_epoch=40, batches_per_epoch=24)
    with pytest.raises(ValueError, match="neither"):
        check_batch_arithmetic(4, 6, 12)
    with pytest.raises(ValueError, match="group_size=1"):
        check_batch_arithmetic(4, 6, 1, groups_per_epoch=24)
    with pytest.raises(ValueError, match="batch_size=0"):
        check_batch_arithmetic(4, 0, 12, groups_per_epoch=24)


def test_showo2_rule_and_grad_accum():
    # Show-o2 seed: num_batches = 16 / (gpus * bs / G); 4 GPUs, bs 4, G 8 -> 8
    assert batches_per_epoch_from_groups(16, 4, 4, 8) == 8
    assert gradient_accumulation_steps(4) == 2 and gradient_accumulation_steps(9, updates_per_epoch=3) == 3
    with pytest.raises(ValueError, match="batches_per_epoch=5 is not a multiple of updates_per_epoch=2; "
                                         "use batches_per_epoch 4 or 6"):
        gradient_accumulation_steps(5)


# ------------------------------------------------------------------ group sampler

def test_sampler_groups_are_whole_and_identical_across_ranks():
    kw = dict(group_size=12, batch_size=6, num_processes=4, groups_per_epoch=8, seed=3)
    samplers = [GroupSampler(100, rank=r, **kw) for r in range(4)]
    assert len(samplers[0]) == 4                                   # 8*12 / (4*6)
    prompts, gids = samplers[0].epoch_plan(5)
    assert prompts.shape == gids.shape == (4, 4, 6)
    # the plan does not depend on which rank computes it
    for s in samplers[1:]:
        p2, g2 = s.epoch_plan(5)
        assert torch.equal(p2, prompts) and torch.equal(g2, gids)
    # every group id of epoch 5 appears exactly G times, always with the same prompt
    assert Counter(gids.flatten().tolist()) == {5 * 8 + j: 12 for j in range(8)}
    for g in gids.unique():
        assert prompts[gids == g].unique().numel() == 1
    assert torch.equal(samplers[0].group_prompts(5), torch.stack([prompts[gids == 40 + j][0] for j in range(8)]))
    # M <= N: 8 distinct prompts
    assert samplers[0].group_prompts(5).unique().numel() == 8
    # each rank's batches are its slice of the plan; the union over ranks is the whole epoch
    union = []
    for r, s in enumerate(samplers):
        batches = list(s(5))
        assert len(batches) == 4 and all(len(b) == 6 for b in batches)
        for i, b in enumerate(batches):
            assert b == list(zip(prompts[i, r].tolist(), gids[i, r].tolist()))
        union += [pair for b in batches for pair in b]
    assert Counter(union) == Counter(zip(prompts.flatten().tolist(), gids.flatten().tolist()))
    # groups are spread over processes (shuffled, not blocked)
    ranks_per_group = [len(set(torch.nonzero(gids == g)[:, 1].tolist())) for g in gids.unique()]
    assert max(ranks_per_group) > 1


def test_sampler_epochs_and_seeds():
    s = GroupSampler(50, group_size=4, batch_size=4, groups_per_epoch=6, seed=0)
    assert torch.equal(s.epoch_plan(2)[0], GroupSampler(50, group_size=4, batch_size=4, groups_per_epoch=6,
                                                         seed=0).epoch_plan(2)[0])
    assert not torch.equal(s.epoch_plan(2)[0], s.epoch_plan(3)[0])
    assert s.epoch_plan(3)[1].min() == 18 and s.epoch_plan(3)[1].max() == 23   # ids unique run-wide
    # seeded seed+epoch, as upstream
    assert torch.equal(s.epoch_plan(3)[0], GroupSampler(50, group_size=4, batch_size=4, groups_per_epoch=6,
                                                         seed=1).epoch_plan(2)[0])


def test_sampler_more_groups_than_prompts():
    s = GroupSampler(3, group_size=2, batch_size=7, groups_per_epoch=7)
    prompts, gids = s.epoch_plan(0)
    counts = Counter(s.group_prompts(0).tolist())
    assert sorted(counts.values()) == [2, 2, 3]                    # ceil/floor of 7/3, every prompt used
    assert gids.unique().numel() == 7                              # a repeated prompt is two groups


def test_sampler_bad_rank_and_epoch():
    with pytest.raises(ValueError, match="rank=2"):
        GroupSampler(10, group_size=2, batch_size=2, num_processes=2, rank=2, groups_per_epoch=2)
    with pytest.raises(ValueError, match="epoch=-1"):
        GroupSampler(10, group_size=2, batch_size=2, groups_per_epoch=2).epoch_plan(-1)


# ------------------------------------------------------------------ advantages

def test_advantages_global_std_exact():
    rewards = np.array([1.0, 0.0, 1.0, 1.0])
    adv, keep, stats = compute_advantages(rewards, [0, 0, 1, 1])
    std = math.sqrt(0.1875)                                        # population std of [1, 0, 1, 1]
    expected = torch.tensor([0.5, -0.5, 0.0, 0.0]) / (std + 1e-4)
    assert adv.dtype == torch.float32
    torch.testing.assert_close(adv, expected, rtol=0, atol=1e-6)
    assert keep.tolist() == [True, True, False, False]
    assert stats["zero_std_ratio"] == 0.5 and stats["num_groups"] == 2 and stats["num_kept"] == 2
    assert stats["reward_mean"] == 0.75 and stats["reward_std"] == pytest.approx(std, abs=1e-12)
    assert stats["reward_std_mean"] == pytest.approx(0.25) and stats["adv_clipfrac"] == 0.0


def test_advantages_per_group_std_and_arbitrary_ids():
    rewards = torch.tensor([1.0, 0.0, 2.0, 4.0])
    adv, keep, _ = compute_advantages(rewards, torch.tensor([7, 7, 3, 3]), global_std=False)
    torch.testing.assert_close(adv, torch.tensor([0.5 / 0.5001, -0.5 / 0.5001, -1 / 1.0001, 1 / 1.0001]),
                               rtol=0, atol=1e-6)
    assert keep.all()


def test_advantages_match_loop_reference_and_permutation():
    rng = np.random.default_rng(0)
    r = rng.integers(0, 2, size=48).astype(np.float32)             # strict 0/1 reward
    g = np.repeat(np.arange(8), 6)
    r[:6] = 1.0                                                    # one all-correct group
    for global_std in (True, False):
        adv, keep, stats = compute_advantages(r, g, global_std=global_std, eps=1e-4, adv_clip_max=100.0)
        ref = np.zeros_like(r, dtype=np.float64)
        flat = 0
        for k in range(8):
            m = g == k
            std = r.std() if global_std else r[m].std()
            ref[m] = (r[m] - r[m].mean()) / (std + 1e-4)
            flat += r[m].max() == r[m].min()
            assert keep[m].all().item() == (r[m].max() != r[m].min())
        np.testing.assert_allclose(adv.numpy(), ref, atol=1e-5)
        assert stats["zero_std_ratio"] == flat / 8 and flat >= 1
        perm = rng.permutation(48)                                 # order of samples is irrelevant
        adv_p, keep_p, _ = compute_advantages(r[perm], g[perm], global_std=global_std, adv_clip_max=100.0)
        torch.testing.assert_close(adv_p, adv[perm], rtol=0, atol=0)
        assert torch.equal(keep_p, keep[perm])


def test_advantages_clipped():
    # one success in a group of 37: per-group A = sqrt(36) = 6 (before eps) -> clipped to 5
    r = np.zeros(37)
    r[0] = 1.0
    adv, _, stats = compute_advantages(r, np.zeros(37, dtype=int), global_std=False)
    assert adv[0].item() == 5.0
    torch.testing.assert_close(adv[1], torch.tensor(-(1 / 37) / (math.sqrt(36) / 37 + 1e-4)), rtol=1e-6, atol=0)
    assert stats["adv_clipfrac"] == pytest.approx(1 / 37)


def test_advantages_bad_input():
    with pytest.raises(ValueError, match="group_ids shape"):
        compute_advantages(np.zeros(4), [0, 0, 1])
    with pytest.raises(ValueError, match="non-finite values at positions \\[1\\]"):
        compute_advantages(np.array([0.0, np.nan]), [0, 0])
    with pytest.raises(ValueError, match="shape \\(N,\\)"):
        compute_advantages(np.zeros((2, 3)), np.zeros((2, 3), dtype=int))
    with pytest.raises(ValueError, match="integers"):
        compute_advantages(np.zeros(2), np.array([0.0, 1.0]))


# ------------------------------------------------------------------ loss

def test_loss_on_policy_is_reinforce():
    A = torch.tensor([1.0, -2.0, 0.5])
    logp = torch.tensor([-1.0, -2.0, -3.0], requires_grad=True)
    loss, st = grpo_loss(logp, logp.detach(), A, clip_range=1e-4)
    assert loss.item() == pytest.approx(-A.mean().item())
    loss.backward()
    torch.testing.assert_close(logp.grad, -A / 3)                 # d/dlogp of -A*exp(logp-old) at ratio 1
    assert st["clipfrac"].item() == 0 and st["approx_kl"].item() == 0 and st["ratio_mean"].item() == 1
    assert st["kl"].item() == 0 and not st["loss"].requires_grad


def test_loss_ppo_clip_exact():
    A = torch.tensor([1.0, -1.0, 1.0, -1.0])
    old = torch.zeros(4)
    logp = torch.tensor([0.2, 0.2, -0.2, -0.2], requires_grad=True)
    loss, st = grpo_loss(logp, old, A, clip_range=0.1)
    up, dn = math.exp(0.2), math.exp(-0.2)
    # A>0, rho>1+eps: clipped (-1.1);  A<0, rho>1: unclipped (+rho)
    # A>0, rho<1: unclipped (-rho);     A<0, rho<1-eps: clipped (0.9)
    assert loss.item() == pytest.approx((-1.1 + up - dn + 0.9) / 4, abs=1e-6)
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([0.0, up / 4, -dn / 4, 0.0]))
    assert st["clipfrac"].item() == 1.0 and st["clipfrac_gt_one"].item() == 0.5 and st["clipfrac_lt_one"].item() == 0.5
    assert st["approx_kl"].item() == pytest.approx(0.02, abs=1e-7)
    assert st["ratio_max"].item() == pytest.approx(up) and st["ratio_min"].item() == pytest.approx(dn)
    assert st["ratio_std"].item() == pytest.approx((up - dn) / 2, rel=1e-5)
    assert st["policy_loss"].item() == pytest.approx(loss.item())


def test_loss_kl_term():
    A, lp = torch.tensor([1.0, -1.0]), torch.zeros(2)
    kl = torch.tensor([0.1, 0.3])
    loss, st = grpo_loss(lp, lp, A, clip_range=1e-4, beta=0.04, kl=kl)
    assert loss.item() == pytest.approx(0.0 + 0.04 * 0.2) and st["kl"].item() == pytest.approx(0.2)
    with pytest.raises(ValueError, match="beta=0.04 > 0 needs"):
        grpo_loss(lp, lp, A, clip_range=1e-4, beta=0.04)
    with pytest.raises(ValueError, match="kl shape"):
        grpo_loss(lp, lp, A, clip_range=1e-4, beta=0.04, kl=torch.zeros(3))
    with pytest.raises(ValueError, match="must all have shape"):
        grpo_loss(lp, lp, torch.zeros(3), clip_range=1e-4)
    with pytest.raises(ValueError, match="clip_range=0"):
        grpo_loss(lp, lp, A, clip_range=0)


def _mean_gauss_logp(x, mu, s):
    """Per-element mean Gaussian log-density, as the 'sde' step's log_prob (B,)."""
    s = s.view(-1, 1, 1, 1)
    return (-(x - mu) ** 2 / (2 * s ** 2) - torch.log(s) - 0.5 * math.log(2 * math.pi)).flatten(1).mean(1)


def test_ratio_norm_recentres_and_rescales():
    g = torch.Generator().manual_seed(0)
    B, shape = 3, (4, 8, 8)
    D = 4 * 8 * 8
    s = torch.tensor([0.7, 0.3, 0.05])                              # per-step stds, noisy -> sharp
    old_mean = torch.randn(B, *shape, generator=g)
    eps = torch.randn(B, *shape, generator=g)
    x = old_mean + s.view(-1, 1, 1, 1) * eps                       # rollout sample
    delta = 0.01 * torch.randn(B, *shape, generator=g)
    mean = (old_mean + delta).requires_grad_(True)
    logp, old = _mean_gauss_logp(x, mean, s), _mean_gauss_logp(x, old_mean, s)
    raw = (logp - old).detach()
    # the raw log-ratio is left-shifted by mean(Delta^2)/(2 s^2) and scaled by 1/s
    ed, d2 = (eps * delta).flatten(1).mean(1), delta.pow(2).flatten(1).mean(1)
    torch.testing.assert_close(raw, ed / s - d2 / (2 * s ** 2), rtol=1e-3, atol=1e-5)
    lr = guard_log_ratio(logp, old, mean, old_mean, s)
    torch.testing.assert_close(lr.detach(), ed, rtol=1e-3, atol=1e-6)   # = mean(eps * Delta): centred, step-free
    (grad,) = torch.autograd.grad(lr.sum(), mean)
    torch.testing.assert_close(grad, eps / D, rtol=1e-3, atol=1e-7)      # same gradient scale at every step
    # in the loss: rho from the guarded log-ratio, PPO term of sample i divided by |dt_i|
    A, dt = torch.tensor([1.0, -1.0, 0.5]), torch.tensor([-0.1, -0.05, -0.02])
    loss, st = grpo_loss(logp, old, A, clip_range=2e-6, ratio_norm=True, mean=mean, old_mean=old_mean,
                         step_std=s, dt=dt)
    rho = torch.exp(ed)
    pg = torch.maximum(-A * rho, -A * rho.clamp(1 - 2e-6, 1 + 2e-6))
    assert loss.item() == pytest.approx((pg / dt.abs()).mean().item(), rel=1e-4)
    torch.testing.assert_close(st["ratio_mean"], rho.mean(), rtol=1e-6, atol=1e-7)
    assert st["approx_kl"].item() == pytest.approx(0.5 * raw.pow(2).mean().item(), rel=1e-5)
    with pytest.raises(ValueError, match="needs mean, old_mean, step_std and dt"):
        grpo_loss(logp, old, A, clip_range=2e-6, ratio_norm=True, mean=mean)
    with pytest.raises(ValueError, match="step_std must be > 0"):
        guard_log_ratio(logp, old, mean, old_mean, 0.0)


# ------------------------------------------------------------------ timesteps

def test_timesteps_deterministic_strategies():
    def rows(*a, **k):
        out = select_timesteps(*a, **k)
        assert out.dtype == torch.long
        assert all(torch.equal(r, out[0]) for r in out)
        return out[0].tolist()
    assert rows("all", 10, 2) == list(range(9))                    # upstream never trains the last step
    assert rows("all", 10, 2, exclude_last=False) == list(range(10))
    assert rows("first_50", 20, 3) == list(range(10))              # the fork's first_50
    assert rows("first_99", 10, 1) == list(range(9))               # upstream timestep_fraction 0.99
    assert rows("first_100", 10, 1) == list(range(9))
    assert rows("first_100", 10, 1, exclude_last=False) == list(range(10))
    assert rows("drop_ends", 12, 2) == list(range(1, 11))          # Show-o2: 12 steps, 10 trained
    assert rows("all", 12, 2, exclude_first=True) == list(range(1, 11))
    assert rows("window", 10, 4, window=(2, 5)) == [2, 3, 4]
    assert select_timesteps("first_50", 20, 3).shape == (3, 10)


def test_timesteps_random():
    out = select_timesteps("random_50", 20, 256, generator=torch.Generator().manual_seed(0))
    assert out.shape == (256, 10)
    assert (out[:, 1:] > out[:, :-1]).all()                        # sorted, distinct
    assert out.min() == 0 and out.max() == 18                      # every pool step reachable, never the last
    assert set(out.flatten().tolist()) == set(range(19))
    assert len({tuple(r) for r in out.tolist()}) > 200             # per-sample subsets
    again = select_timesteps("random_50", 20, 256, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, again)
    fork = select_timesteps("random_50", 20, 256, generator=torch.Generator().manual_seed(0), exclude_last=False)
    assert fork.max() == 19                                        # the fork may train the last step


def test_timesteps_bad_input():
    for bad in ("first", "first_0", "first_150", "last_50", "random_x", "ALL"):
        with pytest.raises(ValueError, match="valid forms: all, first_<p>, random_<p>, window, drop_ends"):
            select_timesteps(bad, 10, 2)
    with pytest.raises(ValueError, match="selects 0 steps"):
        select_timesteps("first_5", 10, 2)
    with pytest.raises(ValueError, match="needs window"):
        select_timesteps("window", 10, 2)
    with pytest.raises(ValueError, match="excluded"):
        select_timesteps("window", 10, 2, window=(7, 10))
    with pytest.raises(ValueError, match="0 <= start < end"):
        select_timesteps("window", 10, 2, window=(5, 5))
    with pytest.raises(ValueError, match="no trainable steps"):
        select_timesteps("all", 1, 2)


# ------------------------------------------------------------------ EMA

def _params():
    torch.manual_seed(0)
    return [torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(4))]


def test_ema_schedule_exact():
    ps = _params()
    ema = EMA(ps, decay=0.9, update_step_interval=1)
    ref = [p.detach().clone() for p in ps]
    for k in range(12):
        with torch.no_grad():
            for p in ps:
                p.add_(1.0)
        assert ema.step()
        d = min(0.9, (1 + k) / (10 + k))
        ref = [d * r + (1 - d) * p.detach() for r, p in zip(ref, ps)]
        for s, r in zip(ema.shadow, ref):
            torch.testing.assert_close(s, r)
    assert ema.current_decay(0) == pytest.approx(0.1) and ema.current_decay(100) == 0.9


def test_ema_interval():
    ps = _params()
    start = [p.detach().clone() for p in ps]
    ema = EMA(ps, decay=0.9, update_step_interval=8)
    with torch.no_grad():
        ps[0].add_(1.0)
    assert [ema.step() for _ in range(7)] == [False] * 7
    torch.testing.assert_close(ema.shadow[0], start[0])
    assert ema.step()                                              # 8th optimizer step, k=7: d = 8/17
    torch.testing.assert_close(ema.shadow[0], start[0] + (1 - 8 / 17))


def test_ema_swap_and_checkpoint():
    ps = _params()
    ema = EMA(ps, decay=0.9, update_step_interval=1)
    with torch.no_grad():
        ps[0].mul_(3.0)
    ema.step()
    live = [p.detach().clone() for p in ps]
    with ema.swapped_in():
        for p, s in zip(ps, ema.shadow):
            assert torch.equal(p.detach(), s)
    for p, l in zip(ps, live):
        assert torch.equal(p.detach(), l)
    with pytest.raises(RuntimeError):                              # restored even when evaluation crashes
        with ema.swapped_in():
            raise RuntimeError("eval failed")
    assert all(torch.equal(p.detach(), l) for p, l in zip(ps, live))
    # checkpoint round trip
    other = EMA(_params(), decay=0.5, update_step_interval=3)
    other.load_state_dict(ema.state_dict())
    assert other.optimization_step == 1 and other.decay == 0.9 and other.update_step_interval == 1
    assert all(torch.equal(a, b) for a, b in zip(other.shadow, ema.shadow))
    with pytest.raises(ValueError, match="shapes"):
        EMA([torch.nn.Parameter(torch.zeros(5))]).load_state_dict(ema.state_dict())
    with pytest.raises(ValueError, match="without a previous store"):
        ema.restore()
    target = [torch.nn.Parameter(torch.zeros_like(p)) for p in ps]
    ema.copy_to(target)
    assert all(torch.equal(t.detach(), s) for t, s in zip(target, ema.shadow))


def test_ema_low_precision_weights_keep_float32_shadow():
    p = torch.nn.Parameter(torch.ones(8, dtype=torch.bfloat16))
    ema = EMA([p], decay=0.9, update_step_interval=1)
    assert ema.shadow[0].dtype == torch.float32
    with torch.no_grad():
        p.fill_(2.0)
    ema.step()                                                     # d = 0.1 at k=0
    torch.testing.assert_close(ema.shadow[0], torch.full((8,), 1.9))
    with ema.swapped_in():
        assert p.dtype == torch.bfloat16 and p[0].item() == 1.8984375   # 1.9 rounded to bf16 (spacing 2**-7)
    assert p[0].item() == 2.0
