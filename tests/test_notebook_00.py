"""Runs notebooks/00_derivation_checks with its smoke params and checks the run record."""
from __future__ import annotations

import json

import pandas as pd
import pytest


@pytest.mark.slow
def test_derivation_checks_notebook_smoke(run_notebook):
    executed, run_dir = run_notebook("00_derivation_checks")
    table = pd.read_csv(run_dir / "derivation_checks.csv")
    assert len(table) >= 30 and table["passed"].all(), table[~table["passed"]]
    assert set(table["section"].astype(str)) == {"1", "2", "3", "4"}
    marg = table[table["check"].str.startswith("marginals: project")]
    assert len(marg) == 4                                       # ODE + noise levels 0.3, 0.7, 1.0
    assert (marg["value"] <= marg["tolerance"]).all()
    flipped = table[table["check"].str.contains("score sign flipped")]
    assert len(flipped) == 1 and flipped["expect"].item() == "above"
    assert flipped["value"].item() > 10 * flipped["tolerance"].item()   # rejected by a wide margin
    png = run_dir / "derivation_samples.png"
    assert png.is_file() and png.stat().st_size > 10_000
    nb = json.loads(executed.read_text())
    assert nb["metadata"]["papermill"]["parameters"]["run_dir"] == str(run_dir)
