"""Peak memory of a process tree, sampled in a background thread (the pipeline's papermill kernels are
child processes, so ``resource.getrusage`` of the parent alone misses them).

    peak = max over samples s of  sum_{p in tree(s)} RSS_p(s)

The sum counts pages shared between processes (the torch libraries mapped by the pipeline and its
kernel) once per process, so it is an upper bound on the machine's real use; sampling every
``interval`` seconds may miss a spike shorter than that.
"""
from __future__ import annotations

import threading

import psutil

GIB = 1024 ** 3


def tree_rss(root: psutil.Process) -> int:
    """Summed resident set size in bytes of ``root`` and all its living descendants."""
    total = 0
    try:
        procs = [root] + root.children(recursive=True)
    except psutil.NoSuchProcess:
        return 0
    for proc in procs:
        try:
            total += proc.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):   # a child exited between listing and reading
            pass
    return total


class PeakMemory:
    """``with PeakMemory() as m: ...`` then ``m.peak_bytes`` / ``m.peak_gib``: the largest summed RSS of
    this process and its children seen while the block ran."""

    def __init__(self, pid: int | None = None, interval: float = 0.5):
        if not interval > 0:
            raise ValueError(f"interval={interval!r} must be a positive number of seconds")
        self.root = psutil.Process(pid)
        self.interval = float(interval)
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        self.peak_bytes = max(self.peak_bytes, tree_rss(self.root))

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> "PeakMemory":
        self._sample()
        self._thread = threading.Thread(target=self._loop, name="peak-memory", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample()

    @property
    def peak_gib(self) -> float:
        return self.peak_bytes / GIB
