"""PeakMemory sees memory held by a child process (the pipeline's kernels are children)."""
import subprocess
import sys

import pytest

from grpo_lib.memory import GIB, PeakMemory, tree_rss

CHILD = "import time, numpy as np; a = np.ones(300 * 2**20 // 8); print('ready', flush=True); time.sleep(1.5)"


def test_peak_includes_a_childs_allocation():
    import psutil

    with PeakMemory(interval=0.05) as m:
        before = tree_rss(psutil.Process())
        child = subprocess.Popen([sys.executable, "-c", CHILD], stdout=subprocess.PIPE, text=True)
        assert child.stdout.readline().strip() == "ready"
        during = tree_rss(psutil.Process())
        child.wait(timeout=30)
    # the child's 300 MiB array is resident (np.ones touches every page) and counted in the tree
    assert during - before > 300 * 2**20
    assert m.peak_bytes >= during - 50 * 2**20   # the sampler saw (nearly) the same peak
    assert m.peak_gib == pytest.approx(m.peak_bytes / GIB)
    assert m.peak_gib < 8                         # and nothing absurd


def test_bad_interval_is_named():
    with pytest.raises(ValueError, match="interval=0"):
        PeakMemory(interval=0)
