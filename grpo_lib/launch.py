"""Training on several processes from a notebook: ``accelerate launch -m <module> <params.yaml>``.

Notebooks 01 and 02 run in one Jupyter kernel, but the tiny UNet is compute-bound, so the second CPU
core is worth most as a second process (one torch thread each). :func:`launch_module` writes the
stage's params to a YAML, runs the module's CLI on ``num_processes`` processes and streams its progress
lines back, and the stage reads the result (checkpoints, metrics) from disk. On GPUs the processes are
one per device; on a machine without CUDA they are gloo CPU processes.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Sequence

import torch


def launch_module(module: str, params, params_yaml: str | Path, *, extra_args: Sequence[str] = (),
                  echo_prefix: str = "", port: int | None = None) -> None:
    """Write ``params`` (a params dataclass with ``num_processes`` and ``mixed_precision``) to ``params_yaml``,
    run ``python -m module params_yaml *extra_args`` on ``params.num_processes`` processes and wait.

    Lines that start with ``echo_prefix`` are printed here as they come (every line when it is "").
    Raises ``RuntimeError`` with the last 40 lines of output if the launch exits non-zero.
    """
    import yaml

    from .params import to_dict

    Path(params_yaml).parent.mkdir(parents=True, exist_ok=True)
    Path(params_yaml).write_text(yaml.safe_dump(to_dict(params), sort_keys=False))
    env = dict(os.environ)
    if not torch.cuda.is_available():
        env.update(ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    port = port or 29500 + os.getpid() % 2000
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
           str(params.num_processes), "--num_machines", "1", "--mixed_precision", params.mixed_precision,
           "--dynamo_backend", "no", "--main_process_port", str(port), "-m", module, str(params_yaml),
           *extra_args]
    tail: list[str] = []
    with subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        for line in proc.stdout:
            tail = (tail + [line])[-40:]
            if line.startswith(echo_prefix):
                print(line, end="", flush=True)
    if proc.returncode != 0:
        raise RuntimeError(f"accelerate launch of {module} {params_yaml} exited with {proc.returncode}:\n"
                           + "".join(tail))


def end_training(acc) -> None:
    """``acc.end_training()`` on every accelerate this package supports: 1.x finishes the trackers and
    destroys the process group; 0.23 (Show-o2's pin) has no ``trackers`` before ``init_trackers`` and
    leaves the group alive. Call it last in a launched CLI, after freeing what holds the group
    (otherwise about 1 run in 15 aborted at exit, see ``bench/launch_exit.py``)."""
    if not hasattr(acc, "trackers"):
        acc.trackers = []
    acc.end_training()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
