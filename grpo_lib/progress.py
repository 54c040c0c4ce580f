"""Progress lines from a running notebook to the terminal (``make run``).

A papermill kernel's stdout reaches the terminal only as the executed notebook, after the stage ends; the
GRPO stage used to be silent for 20 minutes. So long-running code appends one line per event to
``<run_dir>/progress.log`` (:func:`write`), and the pipeline prints every new line of that file while the
stage runs (:class:`Tail`). Plain appends of whole lines: a reader never sees half a line it cannot retry.

Line format of the trainer (:func:`epoch_line`)::

    [grpo] epoch 12/200  reward 0.412  strict 0.386  | 3m05s elapsed, ETA 8m55s
    [grpo] eval  epoch 10  held-out reward 0.447  accuracy 0.447  guard pass | 2m40s elapsed, ETA 9m20s
"""
from __future__ import annotations

import threading
from pathlib import Path

FILE = "progress.log"
ACCURACY_KEYS = ("strict", "correct", "count_correct")     # the reward info key that holds exact-count hits


def write(run_dir: str | Path, line: str) -> None:
    """Append one line to ``<run_dir>/progress.log`` (created if missing)."""
    path = Path(run_dir) / FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(line.rstrip("\n") + "\n")


def duration(seconds: float) -> str:
    """1h02m, 3m05s, 42s."""
    s = int(round(max(seconds, 0.0)))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


def eta(done: int, total: int, elapsed: float, budget_seconds: float = 0.0) -> float:
    """Seconds left: the remaining epochs at this session's mean epoch time, capped by the time budget left."""
    if done <= 0:
        return float("nan")
    left = (total - done) * elapsed / done
    if budget_seconds > 0:
        left = min(left, max(budget_seconds - elapsed, 0.0))
    return left


def epoch_line(row: dict, num_epochs: int, elapsed: float, eta_seconds: float) -> list[str]:
    """The terminal lines of one metrics row: the epoch's rollouts, and the held-out evaluation if it ran."""
    clock = f"| {duration(elapsed)} elapsed, ETA {'?' if eta_seconds != eta_seconds else duration(eta_seconds)}"
    out = []
    if "reward_mean" in row:
        strict = f"  strict {row['strict_accuracy']:.3f}" if "strict_accuracy" in row else ""
        out.append(f"[grpo] epoch {row['epoch']}/{num_epochs}  reward {row['reward_mean']:.3f}{strict}  {clock}")
    if "eval_reward" in row:
        acc = next((row[f"eval_{k}"] for k in ACCURACY_KEYS if f"eval_{k}" in row), None)
        acc_s = f"  accuracy {acc:.3f}" if acc is not None else ""
        guard = "pass" if row.get("guard_pass", 1.0) else "FAIL"
        out.append(f"[grpo] eval  epoch {row['epoch']}  held-out reward {row['eval_reward']:.3f}{acc_s}  "
                   f"guard {guard} {clock}")
    return out


class Tail:
    """``with Tail(path, emit=print): ...`` calls ``emit`` with every line appended to ``path`` inside the
    block (lines already there are skipped), polling every ``interval`` s; the rest is flushed on exit."""

    def __init__(self, path: str | Path, emit=print, interval: float = 1.0):
        self.path, self.emit, self.interval = Path(path), emit, interval
        self._stop = threading.Event()
        self._pos = 0
        self._buf = ""

    def _read(self) -> None:
        if not self.path.is_file():
            return
        with open(self.path) as f:
            f.seek(self._pos)
            chunk = f.read()
            self._pos = f.tell()
        self._buf += chunk
        *lines, self._buf = self._buf.split("\n")       # a line still being written stays in the buffer
        for line in lines:
            self.emit(line)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._read()

    def __enter__(self) -> "Tail":
        self._pos = self.path.stat().st_size if self.path.is_file() else 0
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._read()
        if self._buf:
            self.emit(self._buf)
            self._buf = ""
