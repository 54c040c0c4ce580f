"""The study's cold-start curve: one row per checkpoint, step 0 is the base, paired seeds, cost from the log."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_cold_start import _params, tiny_base  # noqa: E402,F401  (fixture)

from grpo_lib.cold_start import ColdStart  # noqa: E402
from grpo_lib.evaluate import per_image_table  # noqa: E402
from grpo_lib.policies.tiny import TinyPolicy  # noqa: E402
from grpo_lib.prompts import load_rows  # noqa: E402
from grpo_lib.rollout import sample_for_rows  # noqa: E402
from grpo_lib.study import cold_start_curve  # noqa: E402
from grpo_lib.train import selection_seed  # noqa: E402


def test_cold_start_curve_rows_and_base_point(tiny_base, tmp_path, repo):
    torch.set_num_threads(1)
    run = tmp_path / "run"
    ColdStart(_params(tiny_base, run)).train()
    rows = load_rows(repo / "data" / "counting" / "val.jsonl")[::21]          # one prompt per count
    prompts = tmp_path / "rows.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    df = cold_start_curve(run, base=tiny_base, prompts=str(prompts), images_per_prompt=2, num_steps=3,
                          progress=False)
    assert list(df["step"]) == [0, 2, 4] and (df["n_images"] == 20).all()
    assert df["minutes"].iloc[0] == 0 and df["minutes"].is_monotonic_increasing
    assert ((df["ci_low"] <= df["accuracy"]) & (df["accuracy"] <= df["ci_high"])).all()
    # step 0 is the base on the val seeds
    base = TinyPolicy.from_pretrained(tiny_base).eval()
    images, flat = sample_for_rows(base, rows, images_per_prompt=2, num_steps=3, seed=selection_seed(0))
    assert df["accuracy"].iloc[0] == per_image_table(images, flat)["correct"].mean()
    # every 2nd checkpoint still reads the last one (step 4 is the 2nd of 2)
    sparse = cold_start_curve(run, base=tiny_base, prompts=str(prompts), images_per_prompt=2, num_steps=3,
                              every=2, progress=False)
    assert list(sparse["step"]) == [0, 2, 4]
    cols = ["step", "accuracy", "ci_low", "ci_high", "n_images"]
    assert sparse[cols].equals(df[cols])


def test_compare_paired_pairs_every_stage_with_the_first(tiny_base, tmp_path, repo):
    from grpo_lib.checkpoints import Recipe
    from grpo_lib.study import compare_paired

    torch.set_num_threads(1)
    run = tmp_path / "run"
    ColdStart(_params(tiny_base, run, lr=5e-2)).train()
    rows = load_rows(repo / "data" / "counting" / "val.jsonl")[::21]
    prompts = tmp_path / "rows.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    lora = run / "cold_start" / "checkpoints" / "step_000004" / "lora"
    df = compare_paired({"base": Recipe(base=tiny_base), "same": Recipe(base=tiny_base),
                         "tuned": Recipe(base=tiny_base, lora=lora)}, prompts=str(prompts), num_steps=3)
    assert list(df["stage"]) == ["base", "same", "tuned"] and (df["n_images"] == 20).all()
    same = df.iloc[1]
    assert same["vs_base_diff"] == 0 and same["vs_base_gained"] == same["vs_base_lost"] == 0
    tuned = df.iloc[2]
    assert tuned["vs_base_diff"] == tuned["accuracy"] - df.iloc[0]["accuracy"]
    assert tuned["vs_base_gained"] - tuned["vs_base_lost"] == round(20 * tuned["vs_base_diff"])


def test_compare_paired_on_test_uses_the_test_seeds_and_pairs_versus(tiny_base, tmp_path, repo):
    """split="test" draws the final evaluation's noise (train.test_seed), so its figures are the ones notebook
    02's final table gives the same checkpoint; ``versus`` adds a second reference to every row."""
    from grpo_lib.checkpoints import Recipe
    from grpo_lib.study import compare_paired
    from grpo_lib.train import test_seed

    torch.set_num_threads(1)
    run = tmp_path / "run"
    ColdStart(_params(tiny_base, run, lr=5e-2)).train()
    rows = load_rows(repo / "data" / "counting" / "test.jsonl")[::53]           # one prompt per count
    prompts = tmp_path / "rows.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    lora = run / "cold_start" / "checkpoints" / "step_000004" / "lora"
    df = compare_paired({"base": Recipe(base=tiny_base), "tuned": Recipe(base=tiny_base, lora=lora)},
                        prompts=str(prompts), split="test", num_steps=3, versus=("tuned",))
    base = TinyPolicy.from_pretrained(tiny_base).eval()
    images, flat = sample_for_rows(base, rows, images_per_prompt=2, num_steps=3, seed=test_seed(0))
    assert df["accuracy"].iloc[0] == per_image_table(images, flat)["correct"].mean()
    assert df.iloc[0]["vs_tuned_diff"] == -df.iloc[1]["vs_base_diff"]
    assert df.iloc[0]["vs_tuned_gained"] == df.iloc[1]["vs_base_lost"]
    with pytest.raises(ValueError, match="split='train' is not one of"):
        compare_paired({"base": Recipe(base=tiny_base)}, split="train")
    with pytest.raises(ValueError, match=r"versus / guard_vs \['nope'\] names no stage"):
        compare_paired({"base": Recipe(base=tiny_base)}, versus=("nope",))
    with pytest.raises(ValueError, match=r"versus / guard_vs \['base2'\] names no stage"):
        compare_paired({"base": Recipe(base=tiny_base)}, guard_vs="base2")


def test_split_tables_sample_with_cfg_and_the_grid_shows_the_same_images(tiny_base, tmp_path, repo):
    """guidance_scale reaches the sampler (the table equals sample_for_rows at that CFG, and differs from CFG 1);
    images_out keeps each stage's images, and stage_grid draws those, one row per stage. Sampled on 2 processes,
    the images are this process's."""
    from PIL import Image

    from grpo_lib.checkpoints import Recipe
    from grpo_lib.study import split_tables, stage_grid

    torch.set_num_threads(1)
    rows = load_rows(repo / "data" / "counting" / "val.jsonl")[::21]
    prompts = tmp_path / "rows.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    images = {}
    tables = split_tables({"base": Recipe(base=tiny_base), "again": Recipe(base=tiny_base)}, prompts=str(prompts),
                          num_steps=3, guidance_scale=3.0, images_out=images, processes=2)
    base = TinyPolicy.from_pretrained(tiny_base).eval()
    cfg3, flat = sample_for_rows(base, rows, images_per_prompt=2, num_steps=3, seed=selection_seed(0),
                                 guidance_scale=3.0)
    cfg1, _ = sample_for_rows(base, rows, images_per_prompt=2, num_steps=3, seed=selection_seed(0))
    assert np.array_equal(images["base"], cfg3) and np.array_equal(images["again"], cfg3)
    assert not np.array_equal(cfg1, cfg3)
    assert tables["base"].equals(per_image_table(cfg3, flat))
    png = stage_grid(images, tables, tmp_path / "grid.png", per_count=1)
    w, h = Image.open(png).size
    assert w > h > 0                                    # 2 rows (stages) x 10 columns (one image per count)


def test_compare_tables_guards_quality_against_a_named_stage_and_splits_shape_match_by_shape():
    """A stage that keeps its counts but draws squares for circles: accuracy ties, circles' shape match drops
    0.9 -> 0.3, so its worst drop against the base is (0.9 - 0.6) / 0.9 overall and the guard fails."""
    import pandas as pd

    from grpo_lib.study import compare_tables

    def table(circle_shape):
        return pd.DataFrame({"prompt": ["p1", "p8", "q2", "q9"],
                             "class": ["red circle", "red circle", "blue square", "blue square"],
                             "target": [1, 8, 2, 9], "found": [1, 8, 2, 3], "correct": [True, True, True, False],
                             "shape_match": [circle_shape, circle_shape, 0.9, 0.9], "confidence": [0.9] * 4})

    df = compare_tables({"cold_start": table(0.3), "base": table(0.9)}, guard_vs="base").set_index("stage")
    assert df.loc["base", "shape_match_circle"] == 0.9 and df.loc["cold_start", "shape_match_circle"] == 0.3
    assert df.loc["cold_start", "shape_match_square"] == 0.9
    assert df.loc["cold_start", "shape_match"] == pytest.approx(0.6)
    assert df.loc["cold_start", "worst_drop_vs_base"] == pytest.approx(1 / 3)
    assert df["guard_pass_vs_base"].to_dict() == {"cold_start": False, "base": True}
    assert df.loc["base", "vs_cold_start_diff"] == 0 and df.loc["cold_start", "accuracy"] == 0.75
    assert df.loc["cold_start", "accuracy_counts_7_10"] == 0.5


def test_per_count_markdown_has_a_row_per_count_and_a_column_per_stage():
    import pandas as pd

    from grpo_lib.evaluate import compare_stages, wilson_interval
    from grpo_lib.study import per_count_markdown

    a = pd.DataFrame({"target": [1, 1, 2, 2], "found": [1, 2, 2, 2]})
    b = pd.DataFrame({"target": [1, 1, 2, 2], "found": [1, 1, 2, 3]})
    md = per_count_markdown(compare_stages({"cold_start": a, "nft": b})).splitlines()
    assert md[0] == "| N | images | cold_start | nft |"
    lo, hi = wilson_interval(1, 2)
    assert md[2] == f"| 1 | 2 | {0.5:.3f} [{lo:.3f}, {hi:.3f}] | 1.000 [{wilson_interval(2, 2)[0]:.3f}, 1.000] |"
    assert md[-1].startswith("| all | 4 | 0.750 [")


def test_per_image_tables_pair_on_image_and_confusions_share_their_columns():
    import pandas as pd

    from grpo_lib.study import confusion_markdown, per_image_long

    a = pd.DataFrame({"target": [1, 2, 2], "found": [1, 1, 9]})
    b = pd.DataFrame({"target": [1, 2, 2], "found": [1, 3, 2]})
    long = per_image_long({"cold_start": a, "nft": b})
    assert list(long.columns) == ["stage", "image", "target", "found"]
    assert long["stage"].tolist() == ["cold_start"] * 3 + ["nft"] * 3 and long["image"].tolist() == [0, 1, 2] * 2
    md = confusion_markdown({"cold_start": a, "nft": b}).splitlines()
    # columns 0..4 and a pooled "5+" (largest asked count 2, + 3): the 9 lands there
    assert md[:5] == ["### cold_start", "", "| asked, found: | 0 | 1 | 2 | 3 | 4 | 5+ |", "|---|---|---|---|---|---|---|",
                      "| 1 | 0 | 1 | 0 | 0 | 0 | 0 |"]
    assert md[5] == "| 2 | 0 | 1 | 0 | 0 | 0 | 1 |"
    assert md[6:] == ["", "### nft", "", md[2], md[3], "| 1 | 0 | 1 | 0 | 0 | 0 | 0 |", "| 2 | 0 | 0 | 1 | 1 | 0 | 0 |"]


# ------------------------------------------------------------------------------------------------
# notebooks/05_sample_efficiency: budgets, reach table, and the notebook at smoke size
# ------------------------------------------------------------------------------------------------
def _fake_run(run: Path, rows: list[dict], saved: list[int]) -> Path:
    """A run folder with ``metrics.csv`` rows and empty ``checkpoints/epoch_XXXX`` dirs for ``saved``."""
    import pandas as pd

    run.mkdir(parents=True)
    pd.DataFrame(rows).to_csv(run / "metrics.csv", index=False)
    for e in saved:
        (run / "checkpoints" / f"epoch_{e:04d}").mkdir(parents=True)
    return run


def _metrics(accuracies, calls_per_epoch=100, seconds_per_epoch=10.0, images=50):
    return [{"epoch": e, "reward_calls": e * calls_per_epoch, "seconds_total": e * seconds_per_epoch,
             "eval_correct": a, "eval_reward_calls": (e + 1) * images, "eval_shape_match": 0.9}
            for e, a in enumerate(accuracies)]


def test_checkpoint_at_picks_the_last_saved_epoch_within_the_budget(tmp_path):
    from grpo_lib.study import checkpoint_at

    run = _fake_run(tmp_path / "r", _metrics([0.1, 0.2, 0.3, 0.4, 0.5]), saved=[2, 4])
    path, info = checkpoint_at(run, "reward_calls", 399)
    assert path.name == "epoch_0002" and info == {"epoch": 2, "reward_calls": 200, "seconds_total": 20.0}
    assert checkpoint_at(run, "seconds_total", 40.0)[1]["epoch"] == 4
    with pytest.raises(ValueError, match=r"no saved checkpoint with reward_calls <= 150 \(saved epochs \[2, 4\]\)"):
        checkpoint_at(run, "reward_calls", 150)


def test_load_curves_and_reach_table(tmp_path):
    from grpo_lib.evaluate import wilson_interval
    from grpo_lib.study import load_curves, reach_table

    run = _fake_run(tmp_path / "r", _metrics([0.50, 0.70, 0.68, 0.92, 0.96]), saved=[4])
    curves = load_curves({"a": run})
    assert list(curves["reward_calls"]) == [0, 100, 200, 300, 400] and (curves["n_images"] == 50).all()
    lo, hi = wilson_interval(35, 50)
    assert (curves.loc[1, "ci_low"], curves.loc[1, "ci_high"]) == (lo, hi)
    reach = reach_table(curves, [0.7, 0.9]).set_index("threshold")
    assert reach.loc[0.7, "reward_calls"] == 100 and reach.loc[0.9, "reward_calls"] == 300
    # the soonest it may have reached 0.7: the first point whose upper bound does (0.50 of 50: hi 0.63 < 0.7)
    assert reach.loc[0.7, "calls_low"] == 100
    # by when it surely had: the first point whose lower bound reaches it (0.96 of 50: lo 0.865 < 0.9: never)
    assert reach.loc[0.7, "calls_high"] == 300 and str(reach.loc[0.9, "calls_high"]) == "nan"


def test_study_params_name_bad_values():
    from grpo_lib.study import StudyParams

    assert StudyParams().runs == {"grpo": {}}          # one run: the train params as they are
    with pytest.raises(ValueError, match="runs is empty"):
        StudyParams(runs={})
    with pytest.raises(ValueError, match=r"runs\['a'\]='grpo' must be a mapping"):
        StudyParams(runs={"a": "grpo"})
    with pytest.raises(ValueError, match=r"thresholds=\[0.7, 1.5\] must lie in \(0, 1\]"):
        StudyParams(runs={"a": {}}, thresholds=[0.7, 1.5])


@pytest.mark.slow
def test_sample_efficiency_notebook_smoke(run_notebook):
    import pandas as pd

    executed, run_dir = run_notebook("05_sample_efficiency")
    curves = pd.read_csv(run_dir / "curves.csv")
    assert set(curves["run"]) == {"grpo", "awm"}
    for _, df in curves.groupby("run"):    # epochs 0, 1, 2 of 16 reward calls each, 5 val images each
        assert list(df["reward_calls"]) == [0, 16, 32] and (df["n_images"] == 5).all()
        assert df["seconds_total"].is_monotonic_increasing
    table = pd.read_csv(run_dir / "compare.csv")
    assert list(table["budget"]) == ["start", "reward_calls", "reward_calls", "seconds_total", "seconds_total"]
    assert (table["n_images"] == 10).all()                     # max_prompts x images_per_prompt, every stage
    at_calls = table[table["budget"] == "reward_calls"]
    assert (at_calls["reward_calls"] == 32).all() and (at_calls["budget_value"] == 32).all()
    at_time = table[table["budget"] == "seconds_total"]
    assert (at_time["seconds_total"] <= at_time["budget_value"] + 1e-9).all()
    # paired against the cold start: the difference is the accuracy difference on the same 10 images
    start = table.iloc[0]["accuracy"]
    for _, r in table.iloc[1:].iterrows():
        assert r["vs_cold_start_diff"] == pytest.approx(r["accuracy"] - start)
        assert r["vs_cold_start_gained"] - r["vs_cold_start_lost"] == round(10 * r["vs_cold_start_diff"])
    assert len(pd.read_csv(run_dir / "reach.csv")) == 4        # 2 runs x 2 thresholds
    for name in ("grpo", "awm"):
        assert (run_dir / f"{name}.done").is_file() and "objective" in (run_dir / f"{name}.cmd").read_text()
    assert (run_dir / "grid.png").stat().st_size > 0 and "| reward calls |" in (run_dir / "compare.md").read_text()
    # a second execution reads the finished runs instead of training them again
    before = (run_dir / "grpo" / "metrics.csv").stat().st_mtime_ns
    executed, _ = run_notebook("05_sample_efficiency")
    assert (run_dir / "grpo" / "metrics.csv").stat().st_mtime_ns == before
    assert "grpo: finished earlier" in executed.read_text()


def test_compare_cli_builds_each_stage_on_its_own_start(tmp_path, monkeypatch):
    import pandas as pd

    from grpo_lib import study
    from grpo_lib.checkpoints import Recipe

    # an RL checkpoint records the cold start its run started from in params.json
    ck = tmp_path / "split" / "checkpoints" / "epoch_0026"
    (ck / "lora").mkdir(parents=True)
    (ck / "params.json").write_text(json.dumps({"model": str(tmp_path / "base"),
                                                "cold_start_lora": str(tmp_path / "cs_step_2000")}))
    # a cold start continued from another cold start's merged model: its lora/ sits on that model
    cont = tmp_path / "continued" / "cold_start"
    (cont / "lora").mkdir(parents=True)
    (cont / "summary.json").write_text(json.dumps({"params": {"model": str(tmp_path / "cs_merged")}}))
    seen, options = {}, {}

    def fake_tables(stages, **kw):
        seen.clear()
        seen.update(stages)
        options.update(kw)
        return {name: None for name in stages}

    def fake_compare(tables, **kw):
        options.update(kw)
        return pd.DataFrame({"stage": list(tables)})

    monkeypatch.setattr(study, "split_tables", fake_tables)
    monkeypatch.setattr(study, "compare_tables", fake_compare)
    base = tmp_path / "base"
    assert study.main(["compare", "--base", str(base), "--cold-start", str(tmp_path / "cs_step_500"),
                       "rl=" + str(tmp_path / "rl_ck"), "--on-base", "control=" + str(tmp_path / "long_cs"),
                       "more=" + str(cont / "lora"),
                       "--own-start", "split=" + str(ck), "--out", str(tmp_path / "c.csv")]) == 0
    assert seen == {
        "cold_start": Recipe(base=base, merges=(tmp_path / "cs_step_500",)),
        "rl": Recipe(base=base, merges=(tmp_path / "cs_step_500",), lora=tmp_path / "rl_ck" / "lora"),
        "control": Recipe(base=base, lora=tmp_path / "long_cs"),
        "more": Recipe(base=tmp_path / "cs_merged", lora=cont / "lora"),
        "split": Recipe(base=base, merges=(tmp_path / "cs_step_2000",), lora=ck / "lora"),
    }
    assert options["guidance_scale"] == 1.0 and options["guard_vs"] is None
    # --with-base adds the base as a stage and guards every stage's quality against it; CFG reaches the sampler
    assert study.main(["compare", "--base", str(base), "--cold-start", str(tmp_path / "cs_step_500"), "--with-base",
                       "--guidance-scale", "2", "--out", str(tmp_path / "c.csv")]) == 0
    assert seen == {"cold_start": Recipe(base=base, merges=(tmp_path / "cs_step_500",)), "base": Recipe(base=base)}
    assert options["guidance_scale"] == 2.0 and options["guard_vs"] == "base"
    with pytest.raises(SystemExit, match=r"versus / guard_vs \['nope'\] names no stage"):
        study.main(["compare", "--cold-start", "x", "--guard-vs", "nope", "--out", str(tmp_path / "d.csv")])
    with pytest.raises(SystemExit, match="expected NAME=PATH with a new NAME"):
        study.main(["compare", "--cold-start", "x", "--own-start", "rl", "--out", str(tmp_path / "d.csv")])
