"""How often a 2-process CPU `accelerate launch` of GRPO training exits 0 (stack_notes §3: without freeing
the DDP state before end_training(), about 1 run in 15 aborted at interpreter exit).

Each run: ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 -m grpo_lib.train
params/02_counting_grpo__smoke.yaml with one tiny epoch.

    .venv/bin/python bench/launch_exit.py [--runs 20]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=20)
    args = ap.parse_args()
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE")
    codes, times = [], []
    for i in range(args.runs):
        with tempfile.TemporaryDirectory() as d:
            cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                   "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                   "--main_process_port", str(29600 + i), "-m", "grpo_lib.train",
                   str(REPO / "params" / "02_counting_grpo__smoke.yaml"), "--set", f"run_dir={d}",
                   "batch_size=4", "eval_prompts=''", "progress=false"]
            t0 = time.perf_counter()
            res = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
            times.append(time.perf_counter() - t0)
            codes.append(res.returncode)
            if res.returncode:
                print(f"run {i}: exit {res.returncode}\n{res.stderr[-1500:]}")
        print(f"run {i + 1}/{args.runs}: exit {codes[-1]} in {times[-1]:.1f} s", flush=True)
    print(f"{sum(c == 0 for c in codes)} of {len(codes)} launches exited 0 "
          f"(median {sorted(times)[len(times) // 2]:.1f} s per launch)")


if __name__ == "__main__":
    main()
