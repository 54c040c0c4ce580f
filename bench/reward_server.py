"""Reward server throughput and latency vs the in-process reward, batch 64 of 32x32 scenes.

Starts ``python -m grpo_lib.server --detector shapes`` on a free 127.0.0.1 port, then times:
  * remote, 1 client:  sequential ``RemoteCountingReward`` calls (PNG encode + HTTP + decode + count)
  * remote, C clients: C threads at once (what a trainer's reward thread pool does)
  * in-process:        the same reward called directly in this process
and checks that remote and in-process rewards and counts are identical. Prints requests/s,
images/s, p50/p99 latency in ms.

Usage: python bench/reward_server.py [--workers 2] [--requests 100] [--clients 4] [--batch 64]
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from grpo_lib.prompts import build_prompt_sets  # noqa: E402
from grpo_lib.scenes import render_rows  # noqa: E402
from grpo_lib.server import RemoteCountingReward  # noqa: E402


def in_process_reward(name: str):
    """The in-process reward of the same name (registry of grpo_lib.rewards)."""
    from grpo_lib.rewards import build_reward
    return build_reward(name)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(workers: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "grpo_lib.server", "--detector", "shapes", "--host", "127.0.0.1",
                             "--port", str(port), "--workers", str(workers)], cwd=REPO, env=env,
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=tempfile.TemporaryFile())
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if json.loads(r.read())["ready"]:
                    return proc, url
        except OSError:
            pass
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    raise RuntimeError("server not ready within 60 s")


def timed(fn, n: int) -> np.ndarray:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return np.array(out)


def row(label: str, lat: np.ndarray, wall: float, n_req: int, batch: int) -> str:
    return (f"{label:<28} {n_req / wall:8.1f} {n_req * batch / wall:9.0f} "
            f"{1e3 * np.percentile(lat, 50):8.2f} {1e3 * np.percentile(lat, 99):8.2f}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--requests", type=int, default=100)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--reward", default="counting_strict", choices=["counting_strict", "counting_partial"])
    a = ap.parse_args(argv)

    rows = build_prompt_sets()["test"]
    rng = np.random.default_rng(0)
    rows = [rows[i] for i in rng.choice(len(rows), a.batch, replace=False)]
    images, scenes = render_rows(rows, seed=1)                       # uint8 (B, 32, 32, 3)
    prompts = [r["prompt"] for r in rows]
    local = in_process_reward(a.reward)
    kind = "partial" if "partial" in a.reward else "strict"

    proc, url = start_server(a.workers)
    try:
        remote = RemoteCountingReward(url, reward=kind, timeout=30, retries=2, batch_size=a.batch)
        r_remote, i_remote = remote(images, prompts, rows)          # warm-up + equality check
        r_local, i_local = local(images, prompts, rows)
        same = (np.array_equal(r_remote, np.asarray(r_local, np.float32))
                and np.array_equal(i_remote["count"], np.asarray(i_local["count"])))
        truth = np.array([s.count for s in scenes])
        for _ in range(3):
            remote(images, prompts, rows)

        lat_seq = timed(lambda: remote(images, prompts, rows), a.requests)
        wall_seq = float(lat_seq.sum())

        per_client = max(1, a.requests // a.clients)
        lats: list[np.ndarray] = []
        lock = threading.Lock()

        def client(_):
            fn = RemoteCountingReward(url, reward=kind, timeout=30, retries=2, batch_size=a.batch)
            lt = timed(lambda: fn(images, prompts, rows), per_client)
            with lock:
                lats.append(lt)

        t0 = time.perf_counter()
        with ThreadPoolExecutor(a.clients) as pool:
            list(pool.map(client, range(a.clients)))
        wall_conc = time.perf_counter() - t0
        lat_conc = np.concatenate(lats)

        local(images, prompts, rows)
        lat_local = timed(lambda: local(images, prompts, rows), a.requests)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(15)

    print(f"reward={a.reward} batch={a.batch} images=32x32 workers={a.workers} cpu_count={os.cpu_count()} "
          f"requests={a.requests}")
    print(f"remote == in-process (rewards and counts): {same}; counts == rendered truth: "
          f"{np.array_equal(i_remote['count'], truth)}")
    print(f"{'':<28} {'req/s':>8} {'images/s':>9} {'p50 ms':>8} {'p99 ms':>8}")
    print(row("remote, 1 client", lat_seq, wall_seq, a.requests, a.batch))
    print(row(f"remote, {a.clients} clients", lat_conc, wall_conc, len(lat_conc), a.batch))
    print(row("in-process", lat_local, float(lat_local.sum()), a.requests, a.batch))
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
