"""The study's cold-start curve: one row per checkpoint, step 0 is the base, paired seeds, cost from the log."""
import json
import sys
from pathlib import Path

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
    rows = load_rows(repo / "data" / "counting" / "val.jsonl")[::14]          # one prompt per count
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


def test_compare_on_val_pairs_every_stage_with_the_first(tiny_base, tmp_path, repo):
    from grpo_lib.checkpoints import Recipe
    from grpo_lib.study import compare_on_val

    torch.set_num_threads(1)
    run = tmp_path / "run"
    ColdStart(_params(tiny_base, run, lr=5e-2)).train()
    rows = load_rows(repo / "data" / "counting" / "val.jsonl")[::14]
    prompts = tmp_path / "rows.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    lora = run / "cold_start" / "checkpoints" / "step_000004" / "lora"
    df = compare_on_val({"base": Recipe(base=tiny_base), "same": Recipe(base=tiny_base),
                         "tuned": Recipe(base=tiny_base, lora=lora)}, prompts=str(prompts), num_steps=3)
    assert list(df["stage"]) == ["base", "same", "tuned"] and (df["n_images"] == 20).all()
    same = df.iloc[1]
    assert same["vs_base_diff"] == 0 and same["vs_base_gained"] == same["vs_base_lost"] == 0
    tuned = df.iloc[2]
    assert tuned["vs_base_diff"] == tuned["accuracy"] - df.iloc[0]["accuracy"]
    assert tuned["vs_base_gained"] - tuned["vs_base_lost"] == round(20 * tuned["vs_base_diff"])
