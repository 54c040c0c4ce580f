"""The main job: run the numbered notebooks headless with papermill and collect the run record.

``python -m grpo_lib.pipeline --name embedded-default`` (what ``make run`` calls) executes each
stage's notebook with its ``params/<notebook>__<experiment>.yaml`` file, writes the executed copy
and an HTML export under ``runs/<name>/``, and stops at the first failing stage (papermill keeps
the traceback in the executed notebook). Every notebook takes a ``run_dir`` parameter, pointed here
at ``runs/<name>``, so later stages find earlier stages' checkpoints and tables.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from grpo_lib import progress
from grpo_lib.memory import PeakMemory
from grpo_lib.progress import Tail

REPO = Path(__file__).resolve().parents[1]

# (notebook, params experiment) in execution order; None runs the notebook's own defaults (its parameters
# cell): 03 evaluates the renderer on the full held-out set (the detector's sanity check, accuracy 1.0),
# 04 previews the shipped base. 01 and 02 are make run's (results/make_run_s15/): 2,000 cold-start steps with a
# cosine lr, then 9 epochs of DiffusionNFT at lr 3e-4, the final table on 2 images per test prompt sampled on 2
# processes, so that the whole run fits 30 minutes here. Session 10's recipe (3,200 steps, chosen on val in
# results/budget_split_cosine/) is --use 01_cold_start=cosine 02_counting_grpo=nft_cosine_short. Flow-GRPO, the
# seeds' method, is --use 01_cold_start=default 02_counting_grpo=strict_first_50 (make run's stages until session 7).
STAGES: list[tuple[str, str | None]] = [
    ("00_derivation_checks", "default"),
    ("01_cold_start", "make_run"),
    ("02_counting_grpo", "make_run"),
    ("03_evaluate", None),
    ("04_inference_preview", None),
]


def _kernel_manager_class():
    """jupyter_client's async kernel manager on IPC transport (Unix sockets in the Jupyter runtime dir).

    Over TCP, ipykernel warns at every start that "Kernel is running over TCP without encryption" (the
    channels listen on 127.0.0.1 in plain text). Unix sockets are reachable only through the file system
    (mode 0700 runtime dir), so the kernel's channels are not exposed at all and the warning has no cause.
    """
    from jupyter_client.manager import AsyncKernelManager
    from traitlets import default

    class IPCKernelManager(AsyncKernelManager):
        @default("transport")
        def _transport_default(self) -> str:
            return "ipc"

    return IPCKernelManager


def execute_notebook(notebook: str, params_file: str | Path | None, out_dir: str | Path,
                     parameters: dict | None = None, kernel: str = "python3",
                     log_output: bool = False) -> Path:
    """Run ``notebooks/<notebook>.ipynb`` with papermill (cwd = repo root); return the executed copy's path.

    ``parameters`` override the YAML values (papermill injects both, dict last).
    """
    import papermill as pm

    from grpo_lib.params import read_yaml

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    merged: dict = {}
    if params_file is not None:          # its base: chain resolved, as load_params does for scripts
        merged.update(read_yaml(params_file))
    merged.update(parameters or {})
    out = out_dir / f"{notebook}.ipynb"
    pm.execute_notebook(str(REPO / "notebooks" / f"{notebook}.ipynb"), str(out), parameters=merged,
                        kernel_name=kernel, cwd=str(REPO), progress_bar=False, log_output=log_output,
                        kernel_manager_class=_kernel_manager_class())
    return out


def export_html(executed: Path) -> Path:
    """nbconvert the executed notebook to a self-contained HTML file beside it."""
    subprocess.run([sys.executable, "-m", "jupyter", "nbconvert", "--to", "html", str(executed),
                    "--output", executed.with_suffix(".html").name], check=True,
                   capture_output=True)
    return executed.with_suffix(".html")


def stages_with(use: list[str]) -> list[tuple[str, str | None]]:
    """``STAGES`` with ``NOTEBOOK=EXPERIMENT`` substitutions; raises ``ValueError`` naming an unknown
    notebook or a params file that does not exist."""
    chosen = dict(STAGES)
    for item in use:
        notebook, sep, experiment = item.partition("=")
        if not sep or notebook not in chosen:
            raise ValueError(f"--use {item!r}: expected NOTEBOOK=EXPERIMENT with NOTEBOOK one of {list(chosen)}")
        if not (REPO / "params" / f"{notebook}__{experiment}.yaml").is_file():
            raise ValueError(f"--use {item!r}: params/{notebook}__{experiment}.yaml does not exist")
        chosen[notebook] = experiment
    return list(chosen.items())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--name", default="embedded-default", help="run name: outputs go to runs/<name>/")
    ap.add_argument("--kernel", default="python3", help="Jupyter kernel for papermill")
    ap.add_argument("--only", nargs="*", default=None, help="run only these notebooks (names)")
    ap.add_argument("--use", nargs="*", default=[], metavar="NOTEBOOK=EXPERIMENT",
                    help="run NOTEBOOK with params/NOTEBOOK__EXPERIMENT.yaml instead of its default, "
                         "e.g. --use 01_cold_start=counts_1_7 02_counting_grpo=counts_1_7")
    args = ap.parse_args(argv)
    stages = stages_with(args.use)
    # kernels inherit this: idle OpenMP threads sleep instead of spinning (2 shared cores)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    run_dir = REPO / "runs" / args.name
    run_dir.mkdir(parents=True, exist_ok=True)
    timings, peaks = {}, {}
    for notebook, experiment in stages:
        if args.only and notebook not in args.only:
            continue
        params_file = REPO / "params" / f"{notebook}__{experiment}.yaml" if experiment else None
        used = params_file.relative_to(REPO) if params_file else "its defaults"
        print(f"[pipeline] {notebook} with {used} -> runs/{args.name}/", flush=True)
        t0 = time.perf_counter()
        # the kernel's own output lands in the executed notebook; its progress lines (epochs, evaluations,
        # elapsed, ETA) reach the terminal through progress.log while it runs
        with PeakMemory() as mem, Tail(run_dir / progress.FILE, emit=lambda line: print(line, flush=True)):
            executed = execute_notebook(notebook, params_file, run_dir,
                                        parameters={"run_dir": str(run_dir.relative_to(REPO))},
                                        kernel=args.kernel)
            export_html(executed)
        timings[notebook] = round(time.perf_counter() - t0, 1)
        peaks[notebook] = round(mem.peak_gib, 2)
        print(f"[pipeline] {notebook} done in {timings[notebook]} s, peak memory {peaks[notebook]} GiB", flush=True)
    # --only reruns keep the other stages' timings
    previous = json.loads((run_dir / "timings.json").read_text()) if (run_dir / "timings.json").is_file() else {}
    previous_peaks = previous.pop("peak_memory_gib", {})
    record = {**previous, **timings, "peak_memory_gib": {**previous_peaks, **peaks}}
    (run_dir / "timings.json").write_text(json.dumps(record, indent=2))
    from grpo_lib.report import write_report
    print(f"[pipeline] report: {write_report(run_dir)}")
    print(f"[pipeline] all stages done: {json.dumps(timings)}; see runs/{args.name}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
