"""The two epoch samplers of issue 12: DAPO dynamic sampling (refill rounds, keep the first M groups with
reward spread) and the adaptive count curriculum (prompts weighted by P(a group of G has spread)); plus
the reward-call / wall-time accounting every method is compared by.

Unit tests pin the sampler arithmetic exactly; trainer tests use the tiny random policy and a fake reward
whose spread is known in advance (brightness for odd counts, 0 for even counts)."""
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from train_fixtures import brightness_reward, odd_count_reward, small_params, tiny_policy  # noqa: E402

from grpo_lib.curriculum import CountCurriculum, row_count, spread_probability  # noqa: E402
from grpo_lib.grpo import GroupSampler, compute_advantages, group_spread, select_spread_groups  # noqa: E402
from grpo_lib.train import GRPOParams, GRPOTrainer, run  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")   # 2 shared cores: see conftest


def _assert_plan_structure(samplers, prompts, gids, first_id, M, G, epoch, round_index=0, weights=None):
    """Every group id first_id..first_id+M-1 appears G times with one prompt; each rank's batches are its
    slice of the plan, the ranks' slices are disjoint and their union is the plan."""
    assert Counter(gids.flatten().tolist()) == {first_id + j: G for j in range(M)}
    for g in gids.unique():
        assert prompts[gids == g].unique().numel() == 1
    union = []
    for r, s in enumerate(samplers):
        for i, b in enumerate(s.epoch_batches(epoch, round_index, weights)):
            assert b == list(zip(prompts[i, r].tolist(), gids[i, r].tolist()))
            union += [(i, r, k) for k in range(len(b))]
    assert len(union) == len(set(union)) == gids.numel()


# ------------------------------------------------------------------ GroupSampler: refill rounds

def test_refill_rounds_keep_groups_and_rank_partition():
    kw = dict(group_size=4, batch_size=3, num_processes=4, groups_per_epoch=6, seed=5, rounds_per_epoch=3)
    samplers = [GroupSampler(40, rank=r, **kw) for r in range(4)]
    plain = GroupSampler(40, **{**kw, "rounds_per_epoch": 1})
    plans = []
    for k in range(3):
        prompts, gids = samplers[0].epoch_plan(7, k)
        for s in samplers[1:]:                                       # every rank computes the same round
            p2, g2 = s.epoch_plan(7, k)
            assert torch.equal(p2, prompts) and torch.equal(g2, gids)
        # group ids (e * R + k) * M + j: run-unique, and a refill's ids follow the previous round's
        assert samplers[0].group_id_base(7, k) == (7 * 3 + k) * 6
        _assert_plan_structure(samplers, prompts, gids, (7 * 3 + k) * 6, 6, 4, 7, k)
        plans.append(prompts)
    # round 0 is the plain sampler's plan, prompt for prompt; refills are fresh draws
    assert torch.equal(plans[0], plain.epoch_plan(7)[0])
    assert not torch.equal(plans[1], plans[0]) and not torch.equal(plans[2], plans[1])
    assert plain.epoch_plan(7)[1].min() == 7 * 6                    # R = 1 keeps the old ids e * M + j
    with pytest.raises(ValueError, match=r"round_index=3 must be an integer in \[0, rounds_per_epoch=3\)"):
        samplers[0].epoch_plan(0, 3)


# ------------------------------------------------------------------ GroupSampler: weighted draws

def test_weighted_plan_is_identical_on_every_rank_and_keeps_groups_whole():
    kw = dict(group_size=4, batch_size=4, num_processes=2, groups_per_epoch=8, seed=1)
    samplers = [GroupSampler(30, rank=r, **kw) for r in range(2)]
    w = torch.linspace(0.05, 3.0, 30, dtype=torch.float64)
    prompts, gids = samplers[0].epoch_plan(4, weights=w)
    p1, g1 = samplers[1].epoch_plan(4, weights=w.clone())
    assert torch.equal(prompts, p1) and torch.equal(gids, g1)
    _assert_plan_structure(samplers, prompts, gids, 4 * 8, 8, 4, 4, weights=w)
    assert samplers[0].group_prompts(4, weights=w).unique().numel() == 8   # without replacement (M <= N)
    # the weights change the draw; weights=None is the uniform sampler, bit for bit
    assert not torch.equal(prompts, samplers[0].epoch_plan(4)[0])
    assert torch.equal(samplers[0].epoch_plan(4, weights=None)[0], GroupSampler(30, **kw).epoch_plan(4)[0])


def test_weighted_draw_probabilities():
    # M = 1: P(row i) = w_i / sum w exactly (Efraimidis-Spirakis); 6000 epochs -> binomial sd <= 0.0065
    s = GroupSampler(3, group_size=2, batch_size=2, groups_per_epoch=1, seed=0)
    w = torch.tensor([1.0, 2.0, 5.0], dtype=torch.float64)
    first = Counter(int(s.group_prompts(e, weights=w)[0]) for e in range(6000))
    np.testing.assert_allclose([first[i] / 6000 for i in range(3)], (w / w.sum()).numpy(), atol=0.025)
    # M = 2 without replacement: P(row 0 left out) = P(1, then 2 of {0, 2}) + P(2, then 1 of {0, 1})
    s2 = GroupSampler(3, group_size=2, batch_size=2, groups_per_epoch=2, seed=0)
    left_out = np.mean([0 not in s2.group_prompts(e, weights=w).tolist() for e in range(6000)])
    assert left_out == pytest.approx(2 / 8 * 5 / 6 + 5 / 8 * 2 / 3, abs=0.025)     # = 0.625


def test_bad_weights_are_named():
    s = GroupSampler(3, group_size=2, batch_size=2, groups_per_epoch=1)
    with pytest.raises(ValueError, match=r"weights shape \(2,\) != \(num_prompts,\) = \(3,\)"):
        s.epoch_plan(0, weights=[1.0, 1.0])
    with pytest.raises(ValueError, match="must be finite and > 0"):
        s.epoch_plan(0, weights=[1.0, 0.0, 1.0])


# ------------------------------------------------------------------ spread filter

def test_select_spread_groups_exact():
    r = [1, 1, 0, 1, 0, 1, 3, 3, 0.5, 0.7, 2, 2.5]
    g = [10, 10, 11, 11, 12, 12, 13, 13, 20, 20, 21, 21]
    ids, spread = group_spread(r, g)
    assert ids.tolist() == [10, 11, 12, 13, 20, 21] and spread.tolist() == [False, True, True, False, True, True]
    kept, found = select_spread_groups(r, g, 3)
    assert kept.tolist() == [11, 12, 20] and found == 4              # the first M by id; 21 is surplus
    kept, found = select_spread_groups(r, g, 5)
    assert kept.tolist() == [11, 12, 20, 21] and found == 4          # shortfall of one group
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(0))   # order of samples is irrelevant
    assert select_spread_groups(torch.tensor(r)[perm], torch.tensor(g)[perm], 3)[0].tolist() == [11, 12, 20]


# ------------------------------------------------------------------ the curriculum's weights

def test_curriculum_weights_follow_the_formula():
    c = CountCurriculum([1, 1, 2, 3, 3, 3], group_size=4, floor=0.1, ema=0.5)
    # no statistics yet: p = 1/2 for every count, so every row weighs the same
    assert c.row_weights().tolist() == pytest.approx([0.1 + 1 - 2 * 0.5 ** 4] * 6, abs=1e-15)
    acc = c.observe([1, 1, 1, 1, 2, 2, 2, 2], [1, 1, 1, 0, 0, 0, 0, 0])
    assert acc == {1: 0.75, 2: 0.0}
    assert c.p == {1: 0.5 * 0.5 + 0.5 * 0.75, 2: 0.5 * 0.5}           # the EMA starts from the 1/2 prior
    w1 = 0.1 + 1 - 0.625 ** 4 - 0.375 ** 4
    w2 = 0.1 + 1 - 0.25 ** 4 - 0.75 ** 4
    assert c.row_weights().tolist() == pytest.approx([w1, w1, w2, 0.975, 0.975, 0.975], abs=1e-15)
    c.observe([1, 1, 2], [0, 0, 0])                                    # 0.5 * 0.625 + 0.5 * 0; 0.5 * 0.25
    assert c.p == {1: 0.3125, 2: 0.125}
    assert c.count_weight(1) == pytest.approx(0.1 + 1 - 0.3125 ** 4 - 0.6875 ** 4, abs=1e-15)
    for _ in range(60):                                                # always wrong: the weight sinks to the floor
        c.observe([2], [0])
    assert c.count_weight(2) == pytest.approx(0.1, abs=1e-12)
    assert c.log_row() == pytest.approx({"curriculum_p1": 0.3125, "curriculum_w1": c.count_weight(1),
                                         "curriculum_p2": c.p[2], "curriculum_w2": c.count_weight(2),
                                         "curriculum_p3": 0.5, "curriculum_w3": 0.975})
    assert spread_probability([0.0, 1.0, 0.5], 8).tolist() == [0.0, 0.0, 1 - 2 / 256]
    d = CountCurriculum([1, 2, 3], group_size=4, floor=0.1, ema=0.5)
    d.load_state_dict(c.state_dict())
    assert d.p == c.p and d.row_weights()[0] == c.row_weights()[0]


def test_curriculum_bad_input_is_named():
    with pytest.raises(ValueError, match=r"floor=0.0 must be > 0"):
        CountCurriculum([1], group_size=4, floor=0.0, ema=0.5)
    with pytest.raises(ValueError, match=r"ema=0.0 must be in \(0, 1\]"):
        CountCurriculum([1], group_size=4, floor=0.1, ema=0.0)
    with pytest.raises(ValueError, match="strict correctness must lie in"):
        CountCurriculum([1], group_size=4, floor=0.1, ema=0.5).observe([1], [2.0])
    with pytest.raises(ValueError, match="no include"):
        row_count({"prompt": "x"})
    assert row_count({"include": [{"class": "cat", "count": 6}]}) == 6    # COCO rows of the GPU world too
    with pytest.raises(ValueError, match="curriculum='easy'"):
        GRPOParams(curriculum="easy")
    with pytest.raises(ValueError, match="curriculum_floor=0"):
        GRPOParams(curriculum_floor=0)
    with pytest.raises(ValueError, match="dynamic_max_rounds=0"):
        GRPOParams(dynamic_max_rounds=0)


# ------------------------------------------------------------------ trainer: dynamic sampling


def _odd(trainer, prompt_index) -> bool:
    return row_count(trainer.train_rows[int(prompt_index)]) % 2 == 1


def _expected_dynamic(trainer, epoch):
    """From the plan alone: the rounds dynamic sampling must run and the groups it must keep, when a group
    has spread exactly if its prompt asks for an odd count (odd_count_reward)."""
    s, M = trainer.sampler, trainer.arith.groups_per_epoch
    spread_ids, first_zero = [], None
    for k in range(s.rounds_per_epoch):
        gp = s.group_prompts(epoch, k)
        odd = [_odd(trainer, i) for i in gp]
        if k == 0:
            first_zero = 1 - sum(odd) / M
        spread_ids += [s.group_id_base(epoch, k) + j for j in range(M) if odd[j]]
        if len(spread_ids) >= M:
            return k + 1, spread_ids[:M], first_zero
    return s.rounds_per_epoch, spread_ids, first_zero


def test_dynamic_sampling_keeps_exactly_the_first_spread_groups(tmp_path):
    p = small_params(tmp_path / "dyn", dynamic_sampling=True, dynamic_max_rounds=4, eval_prompts="")
    t = GRPOTrainer(p, policy=tiny_policy(), reward_fn=odd_count_reward)
    try:
        M, G, N_b = t.arith.groups_per_epoch, t.arith.group_size, t.arith.batches_per_epoch
        calls, rounds_seen = 0, []
        for epoch in (0, 1):
            rounds, kept_ids, zero0 = _expected_dynamic(t, epoch)
            batches = t.sample_epoch(epoch)
            advs, keeps, stats = t.advantages(batches)
            assert len(batches) == rounds * N_b
            gids = torch.cat([b.group_ids for b in batches])
            rows = [r for b in batches for r in b.rows]
            keep, adv = torch.cat(keeps), torch.cat(advs)
            # the kept set is exactly the first M spread groups by id, each whole (G samples, one prompt)
            assert sorted(set(gids[keep].tolist())) == kept_ids
            assert Counter(gids[keep].tolist()) == {g: G for g in kept_ids}
            for g in kept_ids:
                assert len({rows[i]["prompt"] for i in torch.nonzero(gids == g).flatten().tolist()}) == 1
            assert (adv[~keep] == 0).all()
            # advantages over the kept groups only: global std of what is kept
            r = torch.cat([torch.as_tensor(b.rewards[0]) for b in batches])
            ref, _, _ = compute_advantages(r[keep], gids[keep], global_std=True, adv_clip_max=p.adv_clip_max)
            torch.testing.assert_close(adv[keep], ref, atol=0, rtol=0)
            assert stats["dynamic_rounds"] == rounds and stats["zero_std_ratio"] == zero0
            assert stats["dynamic_shortfall"] == M - len(kept_ids)
            # the update's normaliser adds up to the kept samples: every kept sample weighs 1/K
            assert float(stats["kept_per_batch"].sum()) == pytest.approx(len(kept_ids) * G)
            calls += rounds * M * G                                    # every round's images were scored
            assert t.budget["reward_calls"] == calls
            rounds_seen.append(rounds)
        assert max(rounds_seen) >= 2                                   # the fixture does exercise refills
    finally:
        t.close()


def test_dynamic_sampling_shortfall_when_no_group_ever_has_spread(tmp_path):
    def flat(images, prompts, rows):
        return np.zeros(len(images), np.float32), {"strict": np.zeros(len(images), np.float32)}

    p = small_params(tmp_path / "flat", dynamic_sampling=True, dynamic_max_rounds=3, eval_prompts="", num_epochs=1)
    policy = tiny_policy()
    before = torch.cat([q.detach().reshape(-1) for q in policy.trainable_parameters()])
    hist = run(p, policy=policy, reward_fn=flat)
    assert hist[-1]["dynamic_rounds"] == 3 and hist[-1]["dynamic_shortfall"] == 4
    assert hist[-1]["zero_std_ratio"] == 1.0 and hist[-1]["reward_calls"] == 3 * 16
    after = torch.cat([q.detach().reshape(-1) for q in policy.trainable_parameters()])
    assert torch.equal(before, after)                                  # nothing kept, nothing learnt


# ------------------------------------------------------------------ trainer: the curriculum

def test_curriculum_draws_the_next_epoch_with_the_live_weights(tmp_path):
    p = small_params(tmp_path / "cur", curriculum="spread", curriculum_floor=0.2, curriculum_ema=0.5,
                     eval_prompts="")
    t = GRPOTrainer(p, policy=tiny_policy(), reward_fn=odd_count_reward)
    try:
        G = p.group_size
        assert torch.equal(t.curriculum.row_weights(), torch.full((len(t.train_rows),), 0.2 + 1 - 2 * 0.5 ** G,
                                                                  dtype=torch.float64))
        b0 = t.sample_epoch(0)
        _, _, stats = t.advantages(b0)
        # p_N = 1/2 (prior) * 1/2 + 1/2 * the epoch's strict accuracy of count N, and the log shows it
        counts = np.array([row_count(r) for b in b0 for r in b.rows])
        strict = np.concatenate([b.rewards[1]["strict"] for b in b0])
        for n in np.unique(counts):
            assert t.curriculum.p[int(n)] == pytest.approx(0.25 + 0.5 * strict[counts == n].mean(), abs=1e-12)
            assert stats[f"curriculum_p{n}"] == t.curriculum.p[int(n)]
            pn = t.curriculum.p[int(n)]
            assert stats[f"curriculum_w{n}"] == pytest.approx(0.2 + 1 - pn ** G - (1 - pn) ** G, abs=1e-15)
        even = [n for n in np.unique(counts) if n % 2 == 0]                 # never right: p = 1/4
        assert even and all(stats[f"curriculum_p{n}"] == 0.25 for n in even)
        # epoch 1 is the sampler's weighted draw with exactly those per-row weights
        w = torch.tensor([stats.get(f"curriculum_w{row_count(r)}", 0.2 + 1 - 2 * 0.5 ** G) for r in t.train_rows],
                         dtype=torch.float64)
        prompts, gids = t.sampler.epoch_plan(1, weights=w)
        b1 = t.sample_epoch(1)
        assert [t.train_rows[i]["prompt"] for i in prompts[:, 0].flatten().tolist()] == \
            [r["prompt"] for b in b1 for r in b.rows]
        assert torch.equal(torch.cat([b.group_ids for b in b1]), gids[:, 0].flatten())
    finally:
        t.close()


def test_curriculum_needs_strict_correctness(tmp_path):
    def no_strict(images, prompts, rows):
        return brightness_reward(images, prompts, rows)[0], {}

    t = GRPOTrainer(small_params(tmp_path / "ns", curriculum="spread", eval_prompts=""), policy=tiny_policy(),
                    reward_fn=no_strict)
    try:
        with pytest.raises(ValueError, match=r"curriculum='spread' needs per-image strict correctness"):
            t.advantages(t.sample_epoch(0))
    finally:
        t.close()


# ------------------------------------------------------------------ accounting and resume

def test_reward_calls_and_seconds_are_cumulative_and_exclude_evaluation(tmp_path):
    p = small_params(tmp_path / "acc", num_epochs=3, eval_every=2, eval_max_prompts=4)
    run(p, policy=tiny_policy(), reward_fn=brightness_reward)
    df = pd.read_csv(tmp_path / "acc" / "metrics.csv")
    # 16 training images an epoch; 4 held-out images at epochs 0, 2 and 3 (the last epoch is always evaluated)
    assert df["reward_calls"].tolist() == [0, 16, 32, 48]
    assert df["eval_reward_calls"].tolist() == [4, 4, 8, 12]
    assert df["seconds_total"].iloc[0] == 0
    np.testing.assert_allclose(df["seconds_total"].iloc[1:], df["seconds_epoch"].iloc[1:].cumsum(), rtol=1e-12)


SAMPLERS = {"dynamic": dict(dynamic_sampling=True, dynamic_max_rounds=3),
            "curriculum": dict(curriculum="spread", curriculum_floor=0.1)}


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_resume_with_each_sampler_reproduces_the_uninterrupted_run(tmp_path, sampler):
    kw = dict(eval_prompts="", **SAMPLERS[sampler])
    full = tiny_policy()
    run(small_params(tmp_path / "full", num_epochs=2, **kw), policy=full, reward_fn=odd_count_reward)
    run(small_params(tmp_path / "part", num_epochs=1, **kw), policy=tiny_policy(), reward_fn=odd_count_reward)
    resumed = tiny_policy()   # a fresh process would rebuild the policy from scratch
    # epoch 1 is drawn from the curriculum state saved after epoch 0 (the prior would draw another plan)
    run(small_params(tmp_path / "part", num_epochs=2, resume=True, **kw), policy=resumed, reward_fn=odd_count_reward)
    assert torch.equal(torch.cat([q.detach().reshape(-1) for q in full.trainable_parameters()]),
                       torch.cat([q.detach().reshape(-1) for q in resumed.trainable_parameters()]))
    a = pd.read_csv(tmp_path / "full" / "metrics.csv")
    b = pd.read_csv(tmp_path / "part" / "metrics.csv")
    pd.testing.assert_frame_equal(a.filter(regex="^(?!seconds)"), b.filter(regex="^(?!seconds)"))
    # the sampler really acted: refills, or weights that left the uniform prior
    if sampler == "dynamic":
        assert a["dynamic_rounds"].max() >= 2 and a["reward_calls"].iloc[-1] == 16 * a["dynamic_rounds"].sum()
    else:
        assert a.filter(like="curriculum_w").iloc[-1].nunique() > 1
    # the resumed run's wall time continues the first part's
    assert b["seconds_total"].iloc[-1] == pytest.approx(b["seconds_total"].iloc[-2] + b["seconds_epoch"].iloc[-1])


def test_resuming_a_run_without_curriculum_state_with_the_curriculum_is_an_error(tmp_path):
    plain = GRPOTrainer(small_params(tmp_path / "r", eval_prompts=""), policy=tiny_policy(), reward_fn=odd_count_reward)
    try:
        path = plain.save_checkpoint()
    finally:
        plain.close()
    t = GRPOTrainer(small_params(tmp_path / "r", eval_prompts="", curriculum="spread"), policy=tiny_policy(),
                    reward_fn=odd_count_reward)
    try:
        with pytest.raises(ValueError, match=r"holds no curriculum state: .* with curriculum='spread'"):
            t.load_checkpoint(path)
    finally:
        t.close()
