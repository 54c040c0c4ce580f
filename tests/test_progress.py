"""make run shows progress (issue 14 item 11): the trainer's per-epoch / per-evaluation lines reach the terminal
while the notebook runs, and no stage's kernel warns about TCP without encryption."""
from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from train_fixtures import brightness_reward, small_params, tiny_policy  # noqa: E402

from grpo_lib import progress  # noqa: E402

REPO = Path(__file__).parents[1]


def test_trainer_writes_a_line_per_epoch_and_per_evaluation(tmp_path, one_thread):
    from grpo_lib.train import run

    run(small_params(tmp_path / "p", num_epochs=2, eval_every=2), policy=tiny_policy(), reward_fn=brightness_reward)
    lines = (tmp_path / "p" / progress.FILE).read_text().splitlines()
    clock = r"\| \d+s elapsed, ETA (\d+s|\?)"
    assert re.fullmatch(r"\[grpo\] eval  epoch 0  held-out reward 0\.\d{3}  accuracy 0\.\d{3}  guard pass " + clock,
                        lines[0]), lines[0]
    assert re.fullmatch(r"\[grpo\] epoch 1/2  reward 0\.\d{3}  strict 0\.\d{3}  " + clock, lines[1]), lines[1]
    assert lines[2].startswith("[grpo] epoch 2/2  reward") and lines[3].startswith("[grpo] eval  epoch 2  held-out")
    assert len(lines) == 4 and lines[3].endswith("ETA 0s")


def test_eta_and_duration():
    assert progress.eta(2, 10, 60.0) == pytest.approx(240.0)                 # 8 epochs left at 30 s each
    assert progress.eta(2, 10, 60.0, budget_seconds=120.0) == pytest.approx(60.0)   # the budget ends first
    assert progress.eta(0, 10, 5.0) != progress.eta(0, 10, 5.0)                # unknown before an epoch: nan
    assert [progress.duration(s) for s in (42, 185, 3720)] == ["42s", "3m05s", "1h02m"]


def test_tail_emits_lines_while_they_are_written(tmp_path):
    path = tmp_path / progress.FILE
    path.write_text("old line\n")
    seen: list[tuple[float, str]] = []
    with progress.Tail(path, emit=lambda line: seen.append((time.monotonic(), line)), interval=0.05):
        with open(path, "a") as f:
            f.write("first\nsecond, half")
            f.flush()
            time.sleep(0.3)
            during = [line for _, line in seen]
            f.write(" done\n")
        t_end = time.monotonic()
    assert during == ["first"]                                 # live, and never half a line
    assert [line for _, line in seen] == ["first", "second, half done"] and seen[0][0] < t_end


def test_notebook_kernel_runs_on_ipc_without_the_tcp_warning(tmp_path):
    """The 00 smoke notebook through pipeline.execute_notebook, in a child whose stderr we read: ipykernel
    warns 'Kernel is running over TCP without encryption' at every TCP start; the pipeline's kernels use IPC."""
    code = ("from grpo_lib.pipeline import execute_notebook\n"
            f"execute_notebook('00_derivation_checks', 'params/00_derivation_checks__smoke.yaml', {str(tmp_path)!r},"
            f" parameters={{'run_dir': {str(tmp_path / 'run')!r}}})\n"
            )
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "without encryption" not in res.stderr and "without encryption" not in res.stdout
    assert (tmp_path / "run" / "derivation_checks.csv").is_file()
    # and the manager class really selects IPC (so the warning is gone for its cause, not filtered)
    from grpo_lib.pipeline import _kernel_manager_class
    assert _kernel_manager_class()().transport == "ipc"
