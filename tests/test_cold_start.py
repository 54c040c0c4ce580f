"""Cold start: accumulation/resume exactness, LoRA + merged outputs the GRPO stage loads, the SD3 path on a
tiny random SD3 with an imagefolder, and the notebook's smoke run."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from grpo_lib.cold_start import ColdStart, ColdStartParams, learning_rate, select_eval_rows
from grpo_lib.params import load_params

torch.set_num_threads(1)

SMALL = dict(block_out_channels=(8, 16, 16), cross_attn_levels=(False, False, True), norm_num_groups=4,
             attention_heads=2, text_dim=16, text_heads=2, text_layers=1)


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    """A randomly initialised small TinyPolicy saved like the shipped base."""
    from grpo_lib.policies.tiny import TinyConfig, TinyPolicy
    return TinyPolicy(TinyConfig(**SMALL), seed=0).save_pretrained(tmp_path_factory.mktemp("tiny") / "base")


def _params(tiny_base, run_dir, **kw) -> ColdStartParams:
    base = dict(run_dir=str(run_dir), model=str(tiny_base), steps=4, batch_size=4, grad_accum=1, lr=1e-2,
                lr_warmup_steps=2, checkpoint_every=2, eval_prompts="", progress=False)
    base.update(kw)
    return load_params(base, ColdStartParams)


def _lora(cs) -> list[torch.Tensor]:
    return [q.detach().clone() for q in cs.params_list]


def _probe_velocities(cs):
    """The cold start's probe (x, t), two prompts, and the CFG-2 velocity with the LoRA on and off."""
    x, t, _ = cs._probe()
    prompts = ["a photo of seven red circles", "two blue squares"]
    with torch.no_grad():
        v_trained = cs.policy.velocity(x, t, cs.policy.encode(prompts), 2.0)
        with cs.policy.reference():
            v_base = cs.policy.velocity(x, t, cs.policy.encode(prompts), 2.0)
    return x, t, prompts, v_trained, v_base


def test_grad_accumulation_and_resume_repeat_the_plain_run(tiny_base, tmp_path):
    # (a) batch 8 in one micro-batch == batch 4 accumulated twice: same samples, same noise, same update
    a = ColdStart(_params(tiny_base, tmp_path / "a", batch_size=8))
    a.train()
    b = ColdStart(_params(tiny_base, tmp_path / "b", batch_size=4, grad_accum=2))
    b.train()
    for qa, qb in zip(_lora(a), _lora(b)):
        torch.testing.assert_close(qa, qb, atol=1e-4, rtol=1e-3)
    # Adam hides a gradient scale error, the pre-clip gradient norm does not (accumulated grads are averaged)
    np.testing.assert_allclose([h["grad_norm"] for h in a.history], [h["grad_norm"] for h in b.history], rtol=1e-4)
    assert [h["step"] for h in a.history] == [1, 2, 3, 4]
    assert a.history[0]["lr"] == pytest.approx(5e-3) and a.history[2]["lr"] == pytest.approx(1e-2)  # warmup
    assert any(q.abs().sum() > 0 for n, q in a.policy.unet.named_parameters() if "lora_B" in n)   # it trained
    np.testing.assert_allclose([h["loss"] for h in a.history], [h["loss"] for h in b.history], rtol=1e-5)

    # (b) stop after 2 steps, resume to 4: bit-identical to the uninterrupted run (a)
    c = ColdStart(_params(tiny_base, tmp_path / "c", batch_size=8, steps=2))
    c.train()
    assert (tmp_path / "c/cold_start/checkpoints/latest").read_text() == "step_000002"
    d = ColdStart(_params(tiny_base, tmp_path / "c", batch_size=8, steps=4, resume=True))
    d.train()
    for qa, qd in zip(_lora(a), _lora(d)):
        assert torch.equal(qa, qd)
    assert [h["loss"] for h in d.history] == [h["loss"] for h in a.history]
    ckpts = sorted(p.name for p in (tmp_path / "c/cold_start/checkpoints").iterdir())
    assert ckpts == ["latest", "step_000002", "step_000004"]          # no temp dirs left behind
    loss_csv = (tmp_path / "c/cold_start/loss.csv").read_text().splitlines()
    assert loss_csv[0] == "step,loss,lr,grad_norm,elapsed_s" and len(loss_csv) == 5


@pytest.mark.slow
def test_two_processes_launched_from_one_train_the_same_lora(tiny_base, tmp_path):
    # notebook 01 with num_processes=2: train() launches `accelerate launch -m grpo_lib.cold_start --train-only`
    # and loads its last checkpoint. 2 x batch 4 are the same global samples as 1 x batch 8.
    one = ColdStart(_params(tiny_base, tmp_path / "one", batch_size=8))
    one.train()
    two = ColdStart(_params(tiny_base, tmp_path / "two", batch_size=4, num_processes=2))
    assert two.train_processes == 2 and two.acc.num_processes == 1
    two.train()
    assert two.step == 4 and [h["step"] for h in two.history] == [1, 2, 3, 4]
    for q1, q2 in zip(_lora(one), _lora(two)):
        torch.testing.assert_close(q1, q2, atol=1e-4, rtol=1e-3)
    np.testing.assert_allclose([h["loss"] for h in one.history], [h["loss"] for h in two.history], rtol=1e-4)
    assert (tmp_path / "two/cold_start/cold_start_params.yaml").is_file()
    summary = two.finish()
    assert summary["samples_seen"] == 4 * 4 * 2 and summary["steps"] == 4


def test_finish_writes_lora_and_merged_that_the_grpo_stage_loads(tiny_base, tmp_path):
    from grpo_lib.policies.tiny import TinyPolicy
    from grpo_lib.train import GRPOParams, load_policy_for

    cs = ColdStart(_params(tiny_base, tmp_path, steps=3, checkpoint_every=10))
    cs.train()
    x, t, prompts, v_trained, v_base = _probe_velocities(cs)
    assert (v_trained - v_base).abs().max() > 1e-3                     # the LoRA changed the model
    summary = cs.finish()
    out = tmp_path / "cold_start"
    assert summary["steps"] == 3 and summary["merge_max_abs_diff"] < 1e-4
    assert json.loads((out / "summary.json").read_text())["lora"] == str(out / "lora")
    assert (out / "loss.png").stat().st_size > 5000

    merged = TinyPolicy.from_pretrained(out / "merged")
    # GRPO from the LoRA: base + cold_start_lora merged, fresh (zero) LoRA on top
    via_lora = load_policy_for(GRPOParams(model=str(tiny_base), cold_start_lora=str(out / "lora")), "cpu")
    via_merged = load_policy_for(GRPOParams(model=str(out / "merged")), "cpu")
    with torch.no_grad():
        for pol in (merged, via_lora, via_merged):
            v = pol.velocity(x, t, pol.encode(prompts), 2.0)
            torch.testing.assert_close(v, v_trained, atol=1e-5, rtol=1e-4)


def test_lora_target_modules_wrap_exactly_the_named_layers_and_the_grpo_stage_loads_them(tiny_base, tmp_path):
    """lora_target_modules replaces the policy's default targets: every Linear / Conv2d whose name ends in a
    listed name gets r (in + out) LoRA weights, no other layer does; the saved LoRA carries its targets, so GRPO
    merges it into the same model; a name that matches no layer is an error naming the field."""
    from grpo_lib.policies.tiny import TinyPolicy
    from grpo_lib.train import GRPOParams, load_policy_for

    targets = ["time_emb_proj", "linear_1", "linear_2"]          # the time and pooled-prompt embeddings
    cs = ColdStart(_params(tiny_base, tmp_path, steps=2, lora_rank=4, lora_alpha=4, lora_target_modules=targets))
    base = TinyPolicy.from_pretrained(tiny_base)
    layers = {n: m for n, m in base.unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
    hit = [n for n in layers if n.split(".")[-1] in targets]
    resnets = [n for n, _ in base.unet.named_modules() if n.split(".")[-2:-1] == ["resnets"]]
    assert len(hit) == 4 + len(resnets) and len(resnets) > 0      # 2 linears in 2 embeddings, 1 per resnet
    expected = sum(4 * (m.in_features + m.out_features) for n, m in layers.items() if n in hit)
    assert sum(q.numel() for q in cs.params_list) == expected
    wrapped = {n.rsplit(".lora_", 1)[0] for n, _ in cs.policy.unet.named_parameters() if ".lora_A." in n}
    assert wrapped == set(hit)

    cs.train()
    x, t, prompts, v_trained, v_base = _probe_velocities(cs)
    assert (v_trained - v_base).abs().max() > 1e-4
    cs.finish()
    via_lora = load_policy_for(GRPOParams(model=str(tiny_base), cold_start_lora=str(tmp_path / "cold_start/lora")),
                               "cpu")
    with torch.no_grad():
        v_loaded = via_lora.velocity(x, t, via_lora.encode(prompts), 2.0)
    torch.testing.assert_close(v_loaded, v_trained, atol=1e-5, rtol=1e-4)

    with pytest.raises(ValueError, match=r"lora_target_modules=\['to_q', 'nope'\] do not all name layers"):
        ColdStart(_params(tiny_base, tmp_path / "bad", lora_target_modules=["to_q", "nope"]))
    with pytest.raises(ValueError, match=r"lora_target_modules=\['to_q', ''\] must be module names"):
        ColdStartParams(lora_target_modules=["to_q", ""])


def test_select_eval_rows_spreads_over_each_count(repo):
    from grpo_lib.prompts import load_rows
    rows = load_rows(repo / "data/counting/test.jsonl")
    sel = select_eval_rows(rows, 3)
    assert [r["include"][0]["count"] for r in sel] == [n for n in range(1, 11) for _ in range(3)]
    assert len({r["prompt"] for r in sel}) == 30
    first4 = [r for r in rows if r["include"][0]["count"] == 4]
    assert sel[9] == first4[0] and sel[11] == first4[-1]               # first, middle, last of the count's rows


def test_learning_rate_warmup_then_constant_or_cosine():
    assert [learning_rate(k, 1.0, 4, 12) for k in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    cosine = [learning_rate(k, 2.0, 4, 12, "cosine") for k in range(14)]
    assert cosine[:4] == [0.5, 1.0, 1.5, 2.0]                                 # the same warmup
    assert cosine[4:9] == pytest.approx([2.0, 2.0 * (1 + np.cos(np.pi / 8)) / 2, 1.0 + np.cos(np.pi / 4),
                                         2.0 * (1 + np.cos(3 * np.pi / 8)) / 2, 1.0])   # half way (k = 8): lr / 2
    assert cosine[12:] == pytest.approx([0.0, 0.0], abs=1e-12)                # 0 at steps and after
    assert learning_rate(3, 1.0, 0, 10, "cosine") == pytest.approx(0.5 * (1 + np.cos(np.pi * 0.3)))


def test_bad_params_name_the_value(tiny_base, tmp_path):
    with pytest.raises(ValueError, match="lr_schedule='linear' is not one of"):
        ColdStartParams(lr_schedule="linear")
    with pytest.raises(ValueError, match="world='flux'"):
        ColdStartParams(world="flux")
    with pytest.raises(ValueError, match="image_folder is empty"):
        ColdStartParams(world="sd3")
    with pytest.raises(ValueError, match="caption_dropout=1.0"):
        ColdStartParams(caption_dropout=1.0)
    with pytest.raises(ValueError, match=r"prior_mix=1.0 must be in \[0, 1\)"):
        ColdStartParams(prior_mix=1.0)
    with pytest.raises(ValueError, match="prior_mix=0.2 replays the embedded world's pretraining scenes"):
        ColdStartParams(world="sd3", image_folder="x", prior_mix=0.2)
    with pytest.raises(ValueError, match="num_processes=0 must be >= 1"):
        ColdStartParams(num_processes=0)
    with pytest.raises(ValueError, match="count_weight_power=nan must be a finite number"):
        ColdStartParams(count_weight_power=float("nan"))
    with pytest.raises(ValueError, match="count_weight_power=1.0 weights the embedded world's prompt rows"):
        ColdStartParams(world="sd3", image_folder="x", count_weight_power=1.0)
    with pytest.raises(ValueError, match="resolution=64 but the embedded checkpoint"):
        ColdStart(_params(tiny_base, tmp_path, resolution=64))


def test_prior_mix_replays_every_class_with_no_number_word_keyed_on_the_position(repo):
    """prior_mix 0.25: about a quarter of positions are pretraining scenes (all 18 colour-shape pairs, counts
    above 3, vague captions, so never a val or test prompt); the rest, and every position at prior_mix 0,
    are the exact-count scenes. The same position gives the same sample in any batch split."""
    from grpo_lib.cold_start import EmbeddedCountingData
    from grpo_lib.prompts import NUMBER_WORDS, all_classes, load_rows

    rows = load_rows(repo / "data" / "counting" / "train.jsonl")
    plain, mixed = EmbeddedCountingData(rows, seed=0), EmbeddedCountingData(rows, seed=0, prior_mix=0.25)
    train_prompts = {r["prompt"] for r in rows}
    held_out = {r["prompt"] for s in ("val", "test") for r in load_rows(repo / "data" / "counting" / f"{s}.jsonl")}
    items = [mixed.item(i) for i in range(2000)]
    replayed = [it for it in items if it["prompt"] not in train_prompts]
    assert 0.22 <= len(replayed) / 2000 <= 0.28
    assert {it["cls"] for it in replayed} == set(all_classes())
    assert min(it["count"] for it in replayed) == 4
    assert not {w for it in replayed for w in it["prompt"].split()} & set(NUMBER_WORDS)
    assert not {it["prompt"] for it in items} & held_out
    for i, it in enumerate(items[:200]):
        if it["prompt"] in train_prompts:              # an exact-count position is the plain data's sample
            assert it["prompt"] == plain.item(i)["prompt"]
            assert np.array_equal(it["pixels"], plain.item(i)["pixels"])
    x_all, p_all = mixed(np.arange(64))
    x_half, p_half = mixed(np.arange(32, 64))
    assert p_all[32:] == p_half and torch.equal(x_all[32:], x_half)


def test_count_weight_power_draws_rows_in_proportion_to_their_count(repo):
    """count_weight_power k: a row asking for N objects is drawn with probability N^k / sum N^k. On the train
    rows (70 per count 1-10), k = 1 gives count N the share N / 55 and k = 2 the share N^2 / 385; k = 0 keeps
    the uniform draw exactly (the same scenes as a dataset built without the knob)."""
    from grpo_lib.cold_start import EmbeddedCountingData
    from grpo_lib.prompts import load_rows
    from grpo_lib.scenes import ExactCountDataset

    rows = load_rows(repo / "data" / "counting" / "train.jsonl")
    n = 4000
    for k, denom in ((1.0, 55.0), (2.0, 385.0)):
        ds = ExactCountDataset(rows, length=n, seed=3, count_weight_power=k)
        share = np.bincount([ds._pick_row(np.random.default_rng(i))["include"][0]["count"] for i in range(n)],
                            minlength=11)[1:] / n
        expected = np.arange(1, 11) ** k / denom
        # binomial standard error at n = 4000 is at most 0.008; 4 of them bound every count
        assert np.all(np.abs(share - expected) < 4 * np.sqrt(expected * (1 - expected) / n))
    weighted = EmbeddedCountingData(rows, seed=0, count_weight_power=1.0)
    assert np.mean([weighted.item(i)["count"] for i in range(1000)]) > 6.3      # 385 / 55 = 7.0; uniform 5.5
    uniform = ExactCountDataset(rows, length=n, seed=3, count_weight_power=0.0)
    for i in range(50):                      # k = 0 is today's draw: one rng.integers over the rows
        assert uniform._pick_row(np.random.default_rng(i)) is rows[int(np.random.default_rng(i).integers(len(rows)))]
    plain, zero = EmbeddedCountingData(rows, seed=0), EmbeddedCountingData(rows, seed=0, count_weight_power=0.0)
    for i in range(50):
        assert plain.item(i)["prompt"] == zero.item(i)["prompt"]
        assert np.array_equal(plain.item(i)["pixels"], zero.item(i)["pixels"])
    with pytest.raises(ValueError, match="count_weight_power=inf must be a finite number"):
        ExactCountDataset(rows, length=1, count_weight_power=float("inf"))


def _imagefolder(folder, n=6, size=64):
    """A handful of rendered counting scenes written in the Hugging Face imagefolder layout."""
    from PIL import Image

    from grpo_lib.scenes import render_scene
    from grpo_lib.prompts import counting_row

    folder.mkdir(parents=True)
    lines = []
    for i in range(n):
        count, shape, color = 1 + i % 4, ("circle", "square")[i % 2], ("red", "blue", "green")[i % 3]
        Image.fromarray(render_scene(count, shape, color, size=size, seed=i).image).save(folder / f"img_{i}.png")
        row = counting_row(f"{color} {shape}", count)
        lines.append(json.dumps({"file_name": f"img_{i}.png", **row}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def test_sd3_path_on_tiny_random_sd3_with_an_imagefolder(tiny_sd3_dir, tmp_path):
    from grpo_lib.policies.sd3 import SD3Policy

    folder = _imagefolder(tmp_path / "images")
    p = load_params(dict(run_dir=str(tmp_path / "run"), world="sd3", model=str(tiny_sd3_dir), image_folder=str(folder),
                         resolution=64, lora_rank=2, lora_alpha=4, steps=3, batch_size=2, grad_accum=2, lr=1e-2,
                         timestep_shift=3.0, weighting="cosmap", checkpoint_every=2,
                         eval_prompts="data/counting_coco/test.jsonl", eval_prompts_per_count=1,
                         eval_images_per_prompt=1, eval_num_steps=2, eval_shift=3.0, progress=False),
                    ColdStartParams)
    cs = ColdStart(p)
    assert cs.data.latents.shape == (6, 4, 16, 16)                  # VAE-encoded once, 64 px -> 16x16 latents
    assert cs.policy.lora_config.r == 2 and cs.policy.lora_config.lora_alpha == 4
    # epoch permutations: every image once per epoch, in a seeded order
    for start in (0, 6, 3):                                         # epoch 0, epoch 1, straddling both
        lat, prompts = cs.data(np.arange(start, start + 6))
        assert lat.shape == (6, 4, 16, 16)
        if start % 6 == 0:
            assert sorted(prompts) == sorted(cs.data.prompts)
    before = cs.evaluate("before")
    assert len(before) == 10 and before["found"].isna().all()       # no detector configured: counts are null
    cs.train()
    assert len(cs.history) == 3 and all(np.isfinite(h["loss"]) for h in cs.history)
    cs.evaluate("after")
    assert cs.accuracy_table() is None
    x, t, cond = cs._probe()
    with torch.no_grad():
        v_trained = cs.policy.velocity(x, t, cond, 1.0)
        with cs.policy.reference():
            assert (cs.policy.velocity(x, t, cond, 1.0) - v_trained).abs().max() > 1e-4   # it trained
    summary = cs.finish()
    assert summary["merge_max_abs_diff"] < 1e-4 and "accuracy_before" not in summary
    out = tmp_path / "run" / "cold_start"
    for pol in (SD3Policy.from_pretrained(tiny_sd3_dir, height=64, width=64, lora_path=out / "lora"),
                SD3Policy.from_pretrained(out / "merged", height=64, width=64, lora=False)):
        with torch.no_grad():
            torch.testing.assert_close(pol.velocity(x, t, pol.encode([r["prompt"] for r in cs.eval_rows[:2]]), 1.0),
                                       v_trained, atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_notebook_smoke(run_notebook, repo):
    import pandas as pd

    from grpo_lib.policies.tiny import TinyPolicy

    base = repo / "data" / "checkpoints" / "tiny-base"
    executed, run_dir = run_notebook("01_cold_start")          # the shipped base, params/01_cold_start__smoke.yaml
    out = run_dir / "cold_start"
    nb = json.loads(executed.read_text())
    assert nb["metadata"]["papermill"]["parameters"]["run_dir"] == str(run_dir)
    loss = pd.read_csv(out / "loss.csv")
    assert loss["step"].tolist() == [1, 2, 3, 4] and np.isfinite(loss["loss"]).all()
    assert (out / "checkpoints" / "latest").read_text() == "step_000004"
    table = pd.read_csv(out / "accuracy_before_after.csv")
    assert table["count"].astype(str).tolist() == [str(n) for n in range(1, 11)] + ["all"]
    assert (table["before_n"].iloc[:10] == 2).all() and table["after_n"].iloc[-1] == 20
    for tag in ("before", "after"):
        acc, lo, hi = table[f"{tag}_accuracy"], table[f"{tag}_ci_low"], table[f"{tag}_ci_high"]
        assert ((lo <= acc) & (acc <= hi) & (0 <= lo) & (hi <= 1)).all()
    before = pd.read_csv(out / "eval_before.csv")
    assert table["before_accuracy"].iloc[-1] == pytest.approx(before["correct"].mean())
    for png in ("grid_before_after.png", "grid_after_detections.png", "loss.png"):
        assert (out / png).stat().st_size > 5000, png
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["merge_max_abs_diff"] < 1e-4
    merged = TinyPolicy.from_pretrained(out / "merged")
    assert merged.config == TinyPolicy.from_pretrained(base).config


def test_a_time_budget_that_cuts_a_cosine_run_says_the_model_is_not_annealed(tiny_base, tmp_path):
    # a budget of ~0 stops before step 1: with a cosine lr that leaves the model un-annealed, and the log says so
    cs = ColdStart(_params(tiny_base, tmp_path / "cut", steps=8, lr_schedule="cosine", time_budget_minutes=1e-9))
    cs.elapsed = 1.0                                   # past the budget before the first step
    cs.train()
    log = (tmp_path / "cut/cold_start/events.log").read_text()
    from grpo_lib.lr_schedule import learning_rate
    lr0 = learning_rate(0, 1e-2, 2, 8, "cosine")
    assert lr0 > 0
    assert (f"time budget of 1e-09 min reached at step 0 of 8: WARNING, the cosine lr is still {lr0:.2e}, so the "
            "model is not annealed; set time_budget_minutes: 0 to run every step") in log
    const = ColdStart(_params(tiny_base, tmp_path / "const", steps=8, time_budget_minutes=1e-9))
    const.elapsed = 1.0
    const.train()
    assert "reached at step 0 of 8\n" in (tmp_path / "const/cold_start/events.log").read_text()
