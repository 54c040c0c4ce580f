"""Notebook 02 end to end at smoke size: GRPO trains, every stage is evaluated, summary.json is written."""
import json
import time

import pytest

from grpo_lib import progress


@pytest.mark.slow
def test_counting_grpo_notebook_smoke(run_notebook, tmp_path):
    seen = []      # what make run's terminal shows while the kernel trains (the pipeline tails progress.log)
    with progress.Tail(tmp_path / "run" / progress.FILE, emit=lambda line: seen.append((time.monotonic(), line)),
                       interval=0.2):
        executed, run_dir = run_notebook("02_counting_grpo")
        t_done = time.monotonic()
    assert [line.split("  ")[0] for _, line in seen] == ["[grpo] eval", "[grpo] epoch 1/1", "[grpo] eval"]
    assert seen[0][0] < t_done and "elapsed, ETA" in seen[1][1]      # printed during the run, not after it
    summary = json.loads((run_dir / "summary.json").read_text())
    overall = next(r for r in summary["test"] if r["count"] == "all")
    assert overall["base_n"] == overall["grpo_n"] == 5             # final_max_prompts x 1 image
    assert 0.0 <= overall["grpo_accuracy"] <= 1.0
    assert {r["stage"] for r in summary["test_quality_guard"]} == {"base", "grpo", "renderer"}
    # the smoke run has no cold start: one paired change, base -> grpo, over the same 5 images
    (paired,) = summary["test_paired"]
    assert paired["change"] == "base -> grpo" and paired["n"] == 5
    assert paired["diff"] == pytest.approx(overall["grpo_accuracy"] - overall["base_accuracy"])
    renderer = next(r for r in summary["test_quality_guard"] if r["stage"] == "renderer")
    assert renderer["background_fidelity"] == 1.0
    assert (run_dir / "metrics.csv").is_file() and (run_dir / "grpo" / "grid_grpo.png").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["nft", "awm", "dgpo"])
def test_counting_grpo_notebook_smoke_with_each_likelihood_free_objective(run_notebook, objective):
    """Notebook 02 trains, evaluates and summarises with every objective (issue 13), logging the objective's own
    statistics: NFT its distance to the old policy, AWM and DGPO their flow-matching loss, DGPO its group weight."""
    import pandas as pd

    _, run_dir = run_notebook("02_counting_grpo", objective=objective, noise_level=0.0, train_timesteps=2,
                              group_shared_noise=objective == "dgpo", lr=1e-3)
    summary = json.loads((run_dir / "summary.json").read_text())
    overall = next(r for r in summary["test"] if r["count"] == "all")
    assert overall["base_n"] == overall["grpo_n"] == 5
    df = pd.read_csv(run_dir / "metrics.csv")
    own = {"nft": "old_deviation", "awm": "fm_loss", "dgpo": "dgpo_weight"}[objective]
    trained = df.dropna(subset=["loss"])
    assert len(trained) == 1 and trained[own].notna().all()
    assert "approx_kl" not in df.columns or df["approx_kl"].isna().all()     # no SDE ratio without log-probs
    if objective == "dgpo":      # the first pass starts at the reference: every group weighs 1/2
        assert float(trained["dgpo_weight"].iloc[0]) == pytest.approx(0.5, abs=1e-6)
