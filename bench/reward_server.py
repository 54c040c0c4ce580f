"""Reward server: throughput and latency under concurrent clients, and one worker's peak memory on costly requests.

Starts ``python -m grpo_lib.server --detector shapes`` (default limits) on a free 127.0.0.1 port, from
this checkout or from ``--src DIR`` (another checkout's root, e.g. main's code, to compare before /
after with the same script), then:

  * ``--mode load``: C client threads x R requests each, every request a batch of B 32x32 scenes
    through that checkout's ``RemoteCountingReward`` (PNG encode + HTTP + decode + count); every
    answer is checked against the rendered counts. Prints requests/s, images/s, p50 / p99 latency.
  * ``--mode memory`` (``--workers 1``, so the server process is the worker): the worker's resident
    memory after a warm-up request, then its peak (VmHWM) and the wall time for each costly request:
      - ``issue probe``: one grey 2048x2048 image asked about 6 classes (issue 15 §1, 22 KB);
      - ``worst allowed``: the most the default limits admit at once: 4 grey 2048x2048 images
        (max_total_pixels), 2 classes each (max_pixel_queries), padded with a prompt to just under
        max_request_bytes (64 MiB).
    Each request runs in a fresh server so the peaks do not mask each other; ``--concurrent N`` sends
    N copies at once (the worker admits ``max_inflight`` of them at a time, detection one at a time).

Usage:
  python bench/reward_server.py --mode load --clients 8 --requests 50 --batch 8
  python bench/reward_server.py --mode memory --src /tmp/main_checkout
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(src: Path, workers: int, extra: list[str] = ()) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(src))
    proc = subprocess.Popen([sys.executable, "-m", "grpo_lib.server", "--detector", "shapes", "--host", "127.0.0.1",
                             "--port", str(port), "--workers", str(workers), *extra], cwd=src, env=env,
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
    stop(proc)
    raise RuntimeError("server not ready within 60 s")


def stop(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(15)
    except ProcessLookupError:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)          # anything of the group left over
    except ProcessLookupError:
        pass


def worker_memory_mb(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of a process in MiB."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return tuple(int(fields[k].split()[0]) / 1024 for k in ("VmRSS", "VmHWM"))


def server_cpu_s(pid: int) -> float:
    """User + system CPU seconds of the server: its supervisor and every worker (load-independent cost)."""
    import psutil
    procs = [psutil.Process(pid)]
    procs += procs[0].children(recursive=True)
    return sum(sum(p.cpu_times()[:2]) for p in procs)


def grey_png_b64(side: int) -> str:
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(np.full((side, side, 3), 128, np.uint8)).save(buf, format="PNG", compress_level=9)
    return base64.b64encode(buf.getvalue()).decode()


def costly_requests() -> dict[str, bytes]:
    from grpo_lib.prompts import counting_row
    img = grey_png_b64(2048)
    row = counting_row("red circle", 3)
    others = ["blue square", "green triangle", "yellow circle", "purple square", "cyan triangle"]
    six = {**row, "exclude": [{"class": "red circle", "count": 4}] + [{"class": c, "count": 1} for c in others]}
    two = {**row, "exclude": [{"class": "red circle", "count": 4}, {"class": "blue square", "count": 1}]}
    probe = json.dumps({"images": [img], "meta_datas": [six], "only_strict": True}).encode()
    worst = json.dumps({"images": [img] * 4, "meta_datas": [two] * 4, "only_strict": True})
    pad = 64 * 2**20 - len(worst) - 64                             # just under the 64 MiB body limit
    worst = json.dumps({"images": [img] * 4, "meta_datas": [{**two, "prompt": "x" * pad}] + [two] * 3,
                        "only_strict": True}).encode()
    return {"issue probe: 1 x 2048^2, 6 classes": probe, "worst allowed: 4 x 2048^2, 2 classes, 64 MiB body": worst}


def post(url: str, body: bytes, timeout: float = 600) -> tuple[int, str]:
    req = urllib.request.Request(url + "/", data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()[:120].decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read()[:160].decode()


def memory(a) -> None:
    from grpo_lib.prompts import counting_row, render_scene
    warm = render_scene(3, "circle", "red", seed=0).image
    from grpo_lib.server import encode_png
    warm_body = json.dumps({"images": [encode_png(warm)], "meta_datas": [counting_row("red circle", 3)],
                            "only_strict": True}).encode()
    print(f"server src={a.server_src} {a.server_args} workers=1 concurrent={a.concurrent} cpu_count={os.cpu_count()}")
    print(f"{'request':<52} {'body MiB':>8} {'status':>6} {'RSS before':>10} {'peak RSS':>9} {'seconds':>8}")
    for name, body in costly_requests().items():
        proc, url = start_server(a.server_src, 1, a.server_args.split())
        try:
            assert post(url, warm_body)[0] == 200
            rss0, _ = worker_memory_mb(proc.pid)
            t0 = time.perf_counter()
            with ThreadPoolExecutor(a.concurrent) as pool:        # the same request from N clients at once
                answers = list(pool.map(lambda _: post(url, body), range(a.concurrent)))
            dt = time.perf_counter() - t0
            status, text = next((s, t) for s, t in answers if s != 200) if any(s != 200 for s, _ in answers) \
                else answers[0]
            _, hwm = worker_memory_mb(proc.pid)
        finally:
            stop(proc)
        print(f"{name:<52} {len(body) / 2**20:8.2f} {status:>6} {rss0:8.0f} MiB {hwm:6.0f} MiB {dt:8.2f}")
        if status != 200:
            print(f"    {text}")


def load(a) -> None:
    from grpo_lib.prompts import counting_row, render_scene
    from grpo_lib.server import RemoteCountingReward
    rng = np.random.default_rng(0)
    batches = []
    for k in range(5):
        scenes = [render_scene(int(rng.integers(1, 11)), ["circle", "square", "triangle"][rng.integers(3)],
                               ["red", "green", "blue"][rng.integers(3)], seed=int(rng.integers(2**31)))
                  for _ in range(a.batch)]
        rows = [counting_row(s.cls, s.count) for s in scenes]
        batches.append((np.stack([s.image for s in scenes]), rows, np.array([s.count for s in scenes])))
    proc, url = start_server(a.server_src, a.workers, a.server_args.split())
    lats, wrong, lock = [], [0], threading.Lock()
    try:
        RemoteCountingReward(url)(*batches[0][:1], [r["prompt"] for r in batches[0][1]], batches[0][1])   # warm-up

        def client(c):
            fn = RemoteCountingReward(url, timeout=60, retries=2, batch_size=a.batch)
            out = []
            for k in range(a.requests):
                images, rows, truth = batches[(c + k) % len(batches)]
                t0 = time.perf_counter()
                _, info = fn(images, [r["prompt"] for r in rows], rows)
                out.append(time.perf_counter() - t0)
                if not np.array_equal(info["count"], truth):
                    with lock:
                        wrong[0] += 1
            with lock:
                lats.extend(out)

        cpu0, t0, c0 = server_cpu_s(proc.pid), time.perf_counter(), time.process_time()
        with ThreadPoolExecutor(a.clients) as pool:
            list(pool.map(client, range(a.clients)))
        wall, client_cpu = time.perf_counter() - t0, time.process_time() - c0
        cpu = server_cpu_s(proc.pid) - cpu0
    finally:
        stop(proc)
    lat = np.array(lats)
    n = len(lat)
    print(f"client src={a.src} server src={a.server_src} {a.server_args} workers={a.workers} clients={a.clients} requests/client={a.requests} batch={a.batch} "
          f"(32x32) cpu_count={os.cpu_count()} load_avg={os.getloadavg()[0]:.2f}")
    print(f"requests {n}, wrong counts {wrong[0]}: {n / wall:.1f} req/s, {n * a.batch / wall:.0f} images/s, "
          f"p50 {1e3 * np.percentile(lat, 50):.1f} ms, p99 {1e3 * np.percentile(lat, 99):.1f} ms; "
          f"CPU per request: server {1e3 * cpu / n:.2f} ms, client {1e3 * client_cpu / n:.2f} ms")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", choices=["load", "memory"], default="load")
    ap.add_argument("--src", type=Path, default=REPO, help="checkout root whose grpo_lib is served and used")
    ap.add_argument("--server-src", type=Path, default=None,
                    help="checkout whose server runs, if not --src's (to tell client from server costs)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--server-args", default="", help="extra server flags, e.g. '--max-inflight 8'")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=50, help="requests per client")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--concurrent", type=int, default=1, help="memory mode: copies of each costly request sent at once")
    a = ap.parse_args(argv)
    a.src = a.src.resolve()
    a.server_src = (a.server_src or a.src).resolve()
    sys.path.insert(0, str(a.src))                 # that checkout's client and scenes
    (memory if a.mode == "memory" else load)(a)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
