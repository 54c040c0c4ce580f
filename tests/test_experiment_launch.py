"""Notebook 02's training on 2 processes: CountingExperiment.train launches the same trainer under
``accelerate launch`` and reads back its metrics."""
from pathlib import Path

import pandas as pd
import pytest

from grpo_lib.experiment import CountingExperiment
from grpo_lib.params import load_params

SMOKE = Path(__file__).parents[1] / "params" / "02_counting_grpo__smoke.yaml"


@pytest.mark.slow
def test_two_process_training_from_the_experiment(tmp_path, monkeypatch):
    monkeypatch.chdir(Path(__file__).parents[1])
    p = load_params(SMOKE, run_dir=str(tmp_path / "run"), num_processes=2, num_epochs=2, batch_size=4)
    history = CountingExperiment(p).train()
    assert list(history["epoch"]) == [0, 1, 2]
    assert history.equals(pd.read_csv(tmp_path / "run" / "metrics.csv"))
    events = (tmp_path / "run" / "events.log").read_text()
    assert "on all 2 process(es)" in events and (tmp_path / "run" / "grpo_params.yaml").is_file()
    assert CountingExperiment(p).best_checkpoint() is not None


def test_a_reward_function_cannot_cross_into_launched_processes(tmp_path):
    p = load_params(SMOKE, run_dir=str(tmp_path / "run"), num_processes=2)
    with pytest.raises(ValueError, match="num_processes > 1 runs the trainer in new processes"):
        CountingExperiment(p, reward_fn=lambda *a: None).train()


def test_quality_guard_reads_each_stage_against_its_start_and_against_the_base(tmp_path):
    """A cold start that forgets a shape (shape match 0.94 -> 0.80, -14.9 %) and a GRPO stage that holds it from
    there (0.80 -> 0.79, -1.25 %): GRPO passes against its start and fails against the base."""
    p = load_params(SMOKE, run_dir=str(tmp_path / "run"), cold_start_lora="somewhere/lora")
    exp = CountingExperiment(p)

    def table(shape, conf=0.9):
        return pd.DataFrame({"shape_match": [shape, shape], "confidence": [conf, conf]})

    exp.tables["test"] = {"base": table(0.94), "cold_start": table(0.80), "grpo": table(0.79),
                          "renderer": table(1.0, 1.0)}
    g = exp.quality_guard("test")
    assert g.loc["cold_start", "worst_drop_vs_base"] == pytest.approx(0.14 / 0.94)
    assert g.loc["grpo", "worst_drop_vs_start"] == pytest.approx(0.01 / 0.80)
    assert g.loc["grpo", "worst_drop_vs_base"] == pytest.approx(0.15 / 0.94)
    assert g["guard_pass"].all()                     # nothing drops against the cold start
    assert g["guard_pass_vs_base"].to_dict() == {"base": True, "cold_start": False, "grpo": False, "renderer": True}
