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
