"""Shared test fixtures: deterministic torch, and a papermill runner for the notebooks."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
# idle OpenMP threads sleep instead of spinning: on 2 shared cores spinning threads stall each other
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def one_thread():
    """Run a test with one torch thread (2 shared cores; oversubscribed threads stall each other)."""
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def repo() -> Path:
    return REPO


@pytest.fixture
def run_notebook(tmp_path):
    """run_notebook(name, experiment="smoke", **params) executes notebooks/<name>.ipynb with
    params/<name>__<experiment>.yaml into a temp run_dir and returns (executed_path, run_dir)."""
    from grpo_lib.pipeline import execute_notebook

    def _run(name: str, experiment: str = "smoke", **parameters):
        run_dir = tmp_path / "run"
        parameters.setdefault("run_dir", str(run_dir))
        executed = execute_notebook(name, REPO / "params" / f"{name}__{experiment}.yaml", tmp_path,
                                    parameters=parameters)
        return executed, run_dir

    return _run


@pytest.fixture(scope="session")
def tiny_sd3_dir(tmp_path_factory):
    """A tiny randomly initialised SD3 pipeline saved with save_pretrained (loaded like a hub checkpoint)."""
    import sys
    sys.path.insert(0, str(Path(__file__).parent))
    from sd3_tiny import build_tiny_sd3
    return build_tiny_sd3(tmp_path_factory.mktemp("tiny_sd3"))


# ------------------------------------------------------------------------------------------------
# tests/test_showo2_real.py runs Show-o2's own modeling code, which imports only in Show-o2's
# environment (`make showo2-env`); elsewhere those tests are deselected, and the run says why.
# ------------------------------------------------------------------------------------------------
def showo2_env_missing() -> str | None:
    """None when Show-o2's modeling code can import here, else what is missing."""
    import importlib.util

    for module in ("timm", "torchvision", "einops"):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed"
    try:
        from diffusers.utils import FLAX_WEIGHTS_NAME  # noqa: F401  (show-o2/models/modeling_utils.py needs it)
    except ImportError as e:
        return f"diffusers here lacks what Show-o2 imports ({e})"
    return None


def pytest_collection_modifyitems(config, items):
    real = [item for item in items if item.get_closest_marker("showo2_env")]
    if not real:
        return
    reason = showo2_env_missing()
    if reason is None:
        return
    config.hook.pytest_deselected(items=real)
    items[:] = [item for item in items if not item.get_closest_marker("showo2_env")]
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    note = (f"NOTE: deselected {len(real)} Show-o2 real-code test(s): not Show-o2's environment ({reason}); "
            "run them with `make showo2-env && make test` (or .venv-showo2/bin/python -m pytest tests/test_showo2_real.py)")
    if reporter is not None:
        reporter.write_line(note)
    else:
        print(note)
