"""Counting evaluation: Wilson intervals, summaries on hand-made tables, folder source, notebook smoke run."""
import json

import numpy as np
import pandas as pd
import pytest

from grpo_lib.evaluate import (EvalParams, compare_stages, paired_difference, confusion_table, load_imagefolder, overall_summary,
                               per_count_accuracy, per_image_table, plot_accuracy_per_count, plot_confusion,
                               plot_image_grid, run_evaluation, save_image_grid, save_imagefolder, wilson_interval)
from grpo_lib.prompts import counting_row
from grpo_lib.scenes import render_rows


@pytest.mark.parametrize("k, n, expected", [
    (8, 10, (0.4902, 0.9433)),        # textbook example
    (0, 10, (0.0, 0.2775)),
    (10, 10, (0.7225, 1.0)),        # exactly 1 at k = n (the formula rounds to 1 - 2e-16)
    (50, 100, (0.4038, 0.5962)),
    (1, 1, (0.2065, 1.0)),
])
def test_wilson_interval_known_values(k, n, expected):
    lo, hi = wilson_interval(k, n)
    assert lo == pytest.approx(expected[0], abs=1e-4) and hi == pytest.approx(expected[1], abs=1e-4)
    assert lo <= k / n <= hi


def test_wilson_interval_vectorised_and_bad_input():
    lo, hi = wilson_interval(np.array([8, 0]), np.array([10, 0]))
    assert lo[0] == pytest.approx(0.4902, abs=1e-4) and np.isnan(lo[1]) and np.isnan(hi[1])
    with pytest.raises(ValueError, match="0 <= k <= n"):
        wilson_interval(11, 10)


def _hand_table():
    # N=2: found 2, 2, 3, 1 ; N=4: found 4, 5, 7 ; N=1: found 1
    target = [2, 2, 2, 2, 4, 4, 4, 1]
    found = [2, 2, 3, 1, 4, 5, 7, 1]
    return pd.DataFrame({"target": target, "found": found, "correct": np.equal(target, found),
                         "confidence": 1.0, "class": "red circle"})


def test_summary_on_hand_made_table():
    t = _hand_table()
    pc = per_count_accuracy(t["target"], t["found"]).set_index("count")
    assert list(pc.index) == [1, 2, 4]
    assert pc.loc[2, "n"] == 4 and pc.loc[2, "correct"] == 2 and pc.loc[2, "accuracy"] == 0.5
    assert pc.loc[2, "mae"] == pytest.approx(0.5) and pc.loc[2, "signed_error"] == pytest.approx(0.0)
    assert pc.loc[2, "over_rate"] == 0.25 and pc.loc[2, "under_rate"] == 0.25 and pc.loc[2, "off_by_one_rate"] == 0.5
    assert pc.loc[4, "accuracy"] == pytest.approx(1 / 3) and pc.loc[4, "mae"] == pytest.approx(4 / 3)
    assert pc.loc[4, "signed_error"] == pytest.approx(4 / 3) and pc.loc[4, "off_by_one_rate"] == pytest.approx(1 / 3)
    lo, hi = wilson_interval(2, 4)
    assert pc.loc[2, "ci_low"] == pytest.approx(lo) and pc.loc[2, "ci_high"] == pytest.approx(hi)
    o = overall_summary(t)
    assert o["n"] == 8 and o["correct"] == 4 and o["accuracy"] == 0.5
    assert o["mae"] == pytest.approx(6 / 8) and o["signed_error"] == pytest.approx(4 / 8)
    assert o["over_rate"] == pytest.approx(3 / 8) and o["under_rate"] == pytest.approx(1 / 8)
    assert o["off_by_one_rate"] == pytest.approx(3 / 8) and o["mean_confidence"] == 1.0
    ct = confusion_table(t)
    assert list(ct.columns) == ["0", "1", "2", "3", "4", "5", "6", "7+"]     # largest target 4 + 3
    assert ct.loc[2, "2"] == 2 and ct.loc[2, "3"] == 1 and ct.loc[2, "1"] == 1 and ct.loc[4, "7+"] == 1
    assert ct.to_numpy().sum() == 8
    cmp = compare_stages({"a": t, "b": t.assign(found=t["target"])})
    assert list(cmp["count"]) == [1, 2, 4, "all"]
    assert list(cmp["a_accuracy"]) == pytest.approx([1.0, 0.5, 1 / 3, 0.5])
    assert list(cmp["b_accuracy"]) == [1.0, 1.0, 1.0, 1.0] and list(cmp["b_n"]) == [1, 4, 3, 8]


def _paired(before_correct, after_correct):
    n = len(before_correct)
    base = {"prompt": [f"p{i}" for i in range(n)], "target": [1] * n}
    return (pd.DataFrame({**base, "correct": before_correct}), pd.DataFrame({**base, "correct": after_correct}))


def test_paired_difference_exact_values():
    # 100 images: 10 gained (wrong -> right), 2 lost, 40 right both times, 48 wrong both times
    before = [0] * 10 + [1] * 2 + [1] * 40 + [0] * 48
    after = [1] * 10 + [0] * 2 + [1] * 40 + [0] * 48
    r = paired_difference(*_paired(before, after))
    assert (r["n"], r["gained"], r["lost"]) == (100, 10, 2)
    assert r["before"] == pytest.approx(0.42) and r["after"] == pytest.approx(0.50)
    assert r["diff"] == pytest.approx(0.08)
    half = 1.959963984540054 * np.sqrt(12 - 64 / 100) / 100           # sqrt(b + c - (b - c)^2 / m) / m
    assert (r["ci_low"], r["ci_high"]) == (pytest.approx(0.08 - half), pytest.approx(0.08 + half))
    # McNemar exact: P(X <= 2 or X >= 10), X ~ Bin(12, 1/2) = 2 * (1 + 12 + 66) / 4096
    assert r["p_value"] == pytest.approx(2 * 79 / 4096)


def test_paired_difference_class_clustered_interval():
    # 3 classes x 4 images; d = after - before: A = [1, 1, 0, 0], B = [0, 0, 0, 0], C = [-1, 0, 0, 0]
    before = [0, 0, 1, 0] + [1, 1, 0, 0] + [1, 0, 1, 0]
    after = [1, 1, 1, 0] + [1, 1, 0, 0] + [0, 0, 1, 0]
    b, a = _paired(before, after)
    classes = ["A"] * 4 + ["B"] * 4 + ["C"] * 4
    r = paired_difference(b.assign(**{"class": classes}), a.assign(**{"class": classes}))
    assert r["diff"] == pytest.approx(1 / 12) and r["classes"] == 3
    # S_g = class sums of d_i - 1/12: 5/3, -1/3, -4/3; Var = 3/2 * (25 + 1 + 16) / 9 / 144 = 7 / 144; t_2 = 4.3027
    half = 4.302652729749462 * np.sqrt(7) / 12
    assert (r["class_ci_low"], r["class_ci_high"]) == (pytest.approx(1 / 12 - half), pytest.approx(1 / 12 + half))
    # one image per class: the image interval's variance times m / (m - 1), with t_{m-1} for z
    before = [0] * 10 + [1] * 2 + [1] * 40 + [0] * 48
    after = [1] * 10 + [0] * 2 + [1] * 40 + [0] * 48
    b, a = _paired(before, after)
    own = [f"c{i}" for i in range(100)]
    r = paired_difference(b.assign(**{"class": own}), a.assign(**{"class": own}))
    half = 1.9842169515864174 * np.sqrt(100 / 99 * (12 - 64 / 100)) / 100           # t_99 at 0.975
    assert r["classes"] == 100 and r["class_ci_high"] - 0.08 == pytest.approx(half)
    # one class, or no class column: no class interval
    r = paired_difference(b.assign(**{"class": "x"}), a.assign(**{"class": "x"}))
    assert r["classes"] == 1 and np.isnan(r["class_ci_low"]) and np.isnan(paired_difference(b, a)["classes"])
    with pytest.raises(ValueError, match="different classes"):
        paired_difference(b.assign(**{"class": own}), a.assign(**{"class": own[::-1]}))


def test_paired_difference_no_change_and_bad_input():
    same = _paired([1, 0, 1], [1, 0, 1])
    r = paired_difference(*same)
    assert (r["diff"], r["ci_low"], r["ci_high"], r["p_value"]) == (0.0, 0.0, 0.0, 1.0)
    a, b = _paired([1, 0], [1, 0])
    with pytest.raises(ValueError, match="same prompts"):
        paired_difference(a, b.iloc[::-1].reset_index(drop=True).assign(prompt=["x", "y"]))
    with pytest.raises(ValueError, match="lacks column"):
        paired_difference(a.drop(columns="correct"), b)


def test_summary_bad_input():
    with pytest.raises(ValueError, match="lacks column"):
        overall_summary(pd.DataFrame({"target": [1]}))
    with pytest.raises(ValueError, match="one length"):
        per_count_accuracy([1, 2], [1])
    with pytest.raises(ValueError, match="NaN"):
        per_count_accuracy([1, 2], [1, np.nan])
    with pytest.raises(ValueError, match="at least one"):
        compare_stages({})
    with pytest.raises(ValueError, match="source="):
        EvalParams(source="camera")
    with pytest.raises(ValueError, match="folder"):
        EvalParams(source="folder")


def test_per_image_table_folder_roundtrip_and_plots(tmp_path):
    import matplotlib.pyplot as plt

    rows = [counting_row("green square", n) for n in (1, 2, 3)] * 2
    images, _ = render_rows(rows, seed=3)
    images[5] = images[4]                                 # the 6th image now has 2 squares for a "three" prompt
    table = per_image_table(images, rows)
    assert list(table["target"]) == [1, 2, 3, 1, 2, 3] and list(table["found"]) == [1, 2, 3, 1, 2, 2]
    assert list(table["correct"]) == [True] * 5 + [False] and list(table["error"]) == [0] * 5 + [-1]
    assert {"prompt", "class", "confidence", "background_fidelity", "area_quality", "shape_match"} <= set(table)
    folder = save_imagefolder(images, rows, tmp_path / "imgs")
    back, back_rows = load_imagefolder(folder)
    assert np.array_equal(back, images) and back_rows == rows
    res = run_evaluation(EvalParams(run_dir=str(tmp_path / "run"), source="folder", folder=str(folder),
                                    grid_per_count=2))
    assert set(res) == {"folder", "renderer"}               # the renderer sanity run on the same rows
    assert res["folder"].overall["accuracy"] == pytest.approx(5 / 6) and res["renderer"].overall["accuracy"] == 1.0
    summary = json.loads((tmp_path / "run" / "evaluate" / "folder" / "summary.json").read_text())
    assert summary["overall"]["correct"] == 5 and len(summary["per_count"]) == 3
    for key in ("per_image", "per_count", "confusion", "accuracy_png", "confusion_png", "grid_png"):
        assert (tmp_path / "run" / "evaluate" / "folder").joinpath(res["folder"].files[key].split("/")[-1]).is_file()
    assert (tmp_path / "run" / "evaluate" / "compare.csv").is_file()
    for fig in (plot_accuracy_per_count({"a": table, "b": table}), plot_confusion(table),
                plot_image_grid(images, table, per_count=2)):
        assert len(fig.axes) >= 1
        plt.close(fig)
    out = save_image_grid(np.stack([images[:3], images[3:]]), tmp_path / "g.png", row_labels=["a", "b"],
                          captions=[["1", "2", "3"]] * 2, title="t")
    assert out.is_file()
    (folder / "metadata.jsonl").write_text('{"file_name": "missing.png", "include": []}\n')
    with pytest.raises(ValueError, match="missing.png"):
        load_imagefolder(folder)
    with pytest.raises(ValueError, match="metadata.jsonl"):
        load_imagefolder(tmp_path)


@pytest.mark.slow
def test_notebook_smoke(run_notebook):
    executed, run_dir = run_notebook("03_evaluate")
    summary = json.loads((run_dir / "evaluate" / "renderer" / "summary.json").read_text())
    assert summary["overall"]["accuracy"] == 1.0 and summary["overall"]["n"] == 20
    model = json.loads((run_dir / "evaluate" / "checkpoint" / "summary.json").read_text())
    assert model["overall"]["n"] == 20 and 0.0 <= model["overall"]["accuracy"] <= 1.0
    for name in ("per_image.csv", "per_count.csv", "accuracy.png", "confusion.png", "grid.png"):
        assert (run_dir / "evaluate" / "checkpoint" / name).is_file()
    assert (run_dir / "evaluate" / "compare.png").is_file()
