"""Sample-efficiency study helpers (issue 12): accuracy of saved checkpoints against the cost that bought them.

The first piece is the cold start's own curve: exact-count accuracy on the ``val`` prompts of every
``cold_start/checkpoints/step_XXXXXX`` LoRA of a run, against optimizer steps and training minutes. It is
the control any RL recipe must beat: the same minutes spent on more supervised steps.

    python -m grpo_lib.study cold-start-curve runs/study --out results/study --images-per-prompt 2

Every checkpoint is sampled from the same initial noise per (prompt, image) (``rollout.eval_seed`` with
``train.selection_seed``, the val seeds; never the test seeds), so neighbouring points pair image by image.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from grpo_lib.params import check_knobs
from .checkpoints import Recipe, RunLayout, check_recipe, cold_start_model, grpo_recipe, repo_path


SPLITS = {"val": "data/counting/val.jsonl", "test": "data/counting/test.jsonl"}


def _split_seed(split: str, seed: int) -> int:
    """Noise seed of a split's images: val uses the checkpoint-selection seeds, test the final evaluation's
    (``train.test_seed``), which nothing else draws from."""
    from .train import selection_seed, test_seed

    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not one of {sorted(SPLITS)}")
    return selection_seed(seed) if split == "val" else test_seed(seed)


def _split_table(recipe, rows, *, images_per_prompt: int, num_steps: int, shift: float = 1.0,
                 guidance_scale: float = 1.0, seed: int = 0, split: str = "val", progress: bool = False,
                 images_out: dict | None = None, name: str = "", sampler=None) -> pd.DataFrame:
    """Per-image table of ``recipe``'s policy on ``rows`` (ODE, the ``split``'s noise seeds); the images go
    to ``images_out[name]`` when a dict is given. ``sampler``: an open ``ShardedSampler`` (default: this
    process)."""
    from functools import partial

    from .checkpoints import load_policy
    from .evaluate import per_image_table
    from .sharded_sampling import ShardedSampler

    load = partial(load_policy, recipe)
    kwargs = dict(images_per_prompt=images_per_prompt, num_steps=num_steps, shift=shift,
                  guidance_scale=guidance_scale, seed=_split_seed(split, seed), progress=progress)
    images, flat = (sampler or ShardedSampler(processes=1)).sample(load, rows, **kwargs)   # 1: no pool to open
    if images_out is not None:
        images_out[name] = images
    return per_image_table(images, flat)


def _accuracy(table: pd.DataFrame) -> dict:
    """Exact-count accuracy with its 95 % Wilson interval, image count and counts 7-10's accuracy."""
    from .evaluate import wilson_interval

    k, n = int(table["correct"].sum()), len(table)
    lo, hi = wilson_interval(k, n)
    return {"accuracy": k / n, "ci_low": lo, "ci_high": hi, "n_images": n,
            "accuracy_counts_7_10": float(table[table["target"] >= 7]["correct"].mean())}


def cold_start_curve(run_dir: str | Path, *, base: str | Path | None = None, prompts: str = "data/counting/val.jsonl", images_per_prompt: int = 2,
                     num_steps: int = 20, shift: float = 1.0, guidance_scale: float = 1.0, seed: int = 0,
                     every: int = 1, progress: bool = True) -> pd.DataFrame:
    """One row per cold-start checkpoint: step, minutes trained, exact-count accuracy with its 95 % Wilson
    interval, and counts 7-10's accuracy, on ``images_per_prompt`` ODE images per val prompt. Step 0 is the
    base itself; with ``every`` = k every k-th checkpoint is read, and the last one always. ``base`` defaults
    to the cold start's own ``summary.json`` params."""
    from .prompts import load_rows

    run_dir = Path(run_dir)
    ck_dir = run_dir / "cold_start" / "checkpoints"
    every_step = sorted(ck_dir.glob("step_*"))
    last = [every_step[-1]] if every_step and (len(every_step) - 1) % every else []     # not on the k-grid
    steps = every_step[::every] + last
    if not steps:
        raise ValueError(f"no cold-start checkpoints under {str(ck_dir)!r} (expected step_XXXXXX dirs)")
    params = json.loads((run_dir / "cold_start" / "summary.json").read_text()).get("params", {}) \
        if (run_dir / "cold_start" / "summary.json").is_file() else {}
    base = repo_path(base or params.get("model", "data/checkpoints/tiny-base"))
    history = pd.read_csv(run_dir / "cold_start" / "loss.csv") if (run_dir / "cold_start" / "loss.csv").is_file() else None
    rows = load_rows(prompts)
    out = []
    for path in ([None] + steps):
        table = _split_table(Recipe(base=base, lora=None if path is None else path / "lora"), rows,
                             images_per_prompt=images_per_prompt, num_steps=num_steps, shift=shift,
                             guidance_scale=guidance_scale, seed=seed, progress=progress)
        step = 0 if path is None else int(path.name.split("_")[1])
        minutes = 0.0
        if history is not None and step:
            minutes = float(history.loc[history["step"] <= step, "elapsed_s"].max()) / 60
        acc = _accuracy(table)
        out.append({"step": step, "minutes": round(minutes, 2), **acc})
        print(f"[study] step {step}: {acc['accuracy']:.3f} [{acc['ci_low']:.3f}, {acc['ci_high']:.3f}] "
              f"({minutes:.1f} min)", flush=True)
    return pd.DataFrame(out)


def split_tables(stages: dict[str, "Recipe"], *, prompts: str | None = None, split: str = "val",
                 images_per_prompt: int = 2, num_steps: int = 20, seed: int = 0,
                 guidance_scale: float = 1.0, images_out: dict | None = None,
                 processes: int = 1) -> dict[str, pd.DataFrame]:
    """Per-image tables of each named policy recipe on one split, the same noise per image for all.
    ``split="val"`` is for choosing; ``split="test"`` (test prompts, the final evaluation's noise seeds) is for
    the final figure only. ``prompts`` overrides the split's file (the noise seeds stay the split's).
    ``guidance_scale`` is the CFG scale w of every stage (1 = off); ``images_out`` receives each stage's images;
    ``processes`` sample in parallel (1 thread each; the same images as one process)."""
    from .prompts import load_rows
    from .sharded_sampling import ShardedSampler

    _split_seed(split, seed)                                   # names a bad split before any sampling
    for name, recipe in stages.items():                        # and a missing checkpoint
        check_recipe(recipe, name)
    rows = load_rows(prompts or SPLITS[split])
    with ShardedSampler(processes) as sampler:
        return {name: _split_table(recipe, rows, images_per_prompt=images_per_prompt, num_steps=num_steps,
                                   seed=seed, split=split, guidance_scale=guidance_scale, images_out=images_out,
                                   name=name, sampler=sampler)
                for name, recipe in stages.items()}


def stage_grid(images: dict[str, "np.ndarray"], tables: dict[str, pd.DataFrame], path: str | Path, *,
               per_count: int = 1, title: str = "") -> Path:
    """One row per stage, the same images (same prompt and noise) in every column: ``per_count`` per requested
    count (``evaluate.select_for_grid``); each caption is found / asked."""
    import numpy as np

    from .evaluate import save_image_grid, select_for_grid

    idx = select_for_grid(next(iter(tables.values())), per_count=per_count)
    captions = [[f"{f}/{n}" for f, n in zip(t["found"].to_numpy()[idx], t["target"].to_numpy()[idx])]
                for t in tables.values()]
    return save_image_grid(np.stack([images[name][idx] for name in tables]), path, row_labels=list(tables),
                           captions=captions, title=title or "same prompt and noise per column; caption: found / asked")


def shape_match_by_shape(table: pd.DataFrame) -> dict:
    """Mean shape match per requested shape (``shape_match_circle`` ...): a model that draws squares when
    asked for circles keeps its count (the detector counts by colour) but loses here."""
    shape = table["class"].str.split().str[-1]
    return {f"shape_match_{k}": float(v) for k, v in table.groupby(shape)["shape_match"].mean().items()}


# paired_difference's keys a comparison table keeps: the image-level interval (these prompts, other noise) and the
# class-clustered one (other colour-shape classes like these)
PAIRED_KEYS = ("diff", "ci_low", "ci_high", "class_ci_low", "class_ci_high", "gained", "lost", "p_value")


def _check_references(stages, versus: tuple[str, ...], guard_vs: str | None) -> None:
    missing = [v for v in (*versus, *([guard_vs] if guard_vs else [])) if v not in stages]
    if missing:
        raise ValueError(f"versus / guard_vs {missing} names no stage; stages are {list(stages)}")


def compare_tables(tables: dict[str, pd.DataFrame], *, versus: tuple[str, ...] = (), guard_vs: str | None = None,
                   guard_max_drop: float = 0.05) -> pd.DataFrame:
    """One row per stage: exact-count accuracy with its interval, shape match (overall and per shape), and the
    paired change against the first stage and every stage in ``versus`` (``evaluate.paired_difference``:
    difference, 95 % intervals over images and over classes, images gained / lost, McNemar p). With
    ``guard_vs``, also each stage's worst relative quality drop against that stage and the guard
    ``worst_drop_vs_<guard_vs> <= guard_max_drop``."""
    from .evaluate import paired_difference
    from .experiment import quality_change, quality_means

    _check_references(tables, versus, guard_vs)
    worst = None
    if guard_vs:
        means = quality_means(tables)
        worst = quality_change(means, means.loc[guard_vs])[1]
    first = next(iter(tables))
    out = []
    for name, t in tables.items():
        acc = _accuracy(t)
        row = {"stage": name, **acc,
               "shape_match": float(t["shape_match"].mean()) if "shape_match" in t else float("nan"),
               **(shape_match_by_shape(t) if {"shape_match", "class"} <= set(t) else {})}
        if worst is not None:
            row.update({f"worst_drop_vs_{guard_vs}": float(worst.loc[name]),
                        f"guard_pass_vs_{guard_vs}": bool(worst.loc[name] <= guard_max_drop)})
        for ref in dict.fromkeys((first, *versus)):
            if name != ref:
                d = paired_difference(tables[ref], t)
                row.update({f"vs_{ref}_{k}": d[k] for k in PAIRED_KEYS})
        out.append(row)
        print(f"[study] {name}: {acc['accuracy']:.3f} [{acc['ci_low']:.3f}, {acc['ci_high']:.3f}]", flush=True)
    return pd.DataFrame(out)


def compare_paired(stages: dict[str, "Recipe"], *, prompts: str | None = None, split: str = "val",
                   images_per_prompt: int = 2, num_steps: int = 20, seed: int = 0,
                   versus: tuple[str, ...] = (), guard_vs: str | None = None,
                   guidance_scale: float = 1.0) -> pd.DataFrame:
    """:func:`compare_tables` of :func:`split_tables`: every named recipe on one split, paired."""
    _check_references(stages, versus, guard_vs)                # before any sampling
    return compare_tables(split_tables(stages, prompts=prompts, split=split, images_per_prompt=images_per_prompt,
                                       num_steps=num_steps, seed=seed, guidance_scale=guidance_scale),
                          versus=versus, guard_vs=guard_vs)


def plot_curve(df: pd.DataFrame, path: str | Path, title: str) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(df["minutes"], df["accuracy"], marker="o", label="all counts")
    ax.fill_between(df["minutes"], df["ci_low"], df["ci_high"], alpha=0.2)
    ax.plot(df["minutes"], df["accuracy_counts_7_10"], marker=".", label="counts 7-10")
    ax.set_xlabel("cold-start training minutes (1 thread)")
    ax.set_ylabel("exact-count accuracy (val)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


# ------------------------------------------------------------------------------------------------
# notebooks/05_sample_efficiency.ipynb: train (or read) every lever's run from one cold start, then
# compare them at equal reward calls and at equal training seconds, paired image by image on val.
# ------------------------------------------------------------------------------------------------
@dataclass
class StudyParams:
    """Fields of notebooks/05_sample_efficiency.ipynb's parameters cell (params/05_sample_efficiency__*.yaml)."""
    run_dir: str = "runs/dev/study"                        # outputs: one sub-directory per run, tables, curves, grid
    train_params: str = "params/02_counting_grpo__strict_first_50.yaml"   # every run's GRPO params file
    common_set: dict[str, Any] = field(default_factory=dict)    # overrides every run gets (cold_start_lora, num_epochs...)
    runs: dict[str, dict[str, Any]] = field(default_factory=lambda: {"grpo": {}})  # name -> its own overrides (objective, reward...)
    parallel: int = 2                                      # runs trained at once (1 torch thread each on CPU)
    model: str = "data/checkpoints/tiny-base"              # base checkpoint every run sits on
    cold_start_lora: str = ""                              # the LoRA every run started from ("" = none)
    prompts: str = "data/counting/val.jsonl"               # val rows for the paired comparison
    images_per_prompt: int = 2                             # paired comparison: images per val prompt
    max_prompts: int = 0                                   # val rows used, spread over the file (0 = all)
    num_steps: int = 20                                    # ODE steps of the comparison
    budget_reward_calls: int = 0                           # equal-calls point (0 = smallest final count over runs)
    budget_seconds: float = 0.0                            # equal-wall-time point (0 = smallest over runs)
    thresholds: list[float] = field(default_factory=lambda: [0.7, 0.9])  # reward calls to reach these accuracies
    guard_max_drop: float = 0.05                           # quality guard: max relative drop vs the cold start
    grid_prompts: int = 10                                 # image grid: val prompts (columns) per run
    seed: int = 0                                          # val noise seeds (train.selection_seed(seed))

    def __post_init__(self):
        if not self.runs:
            raise ValueError("runs is empty: name at least one run (name -> overrides of train_params)")
        for name, over in self.runs.items():
            if not isinstance(over, dict):
                raise ValueError(f"runs[{name!r}]={over!r} must be a mapping of GRPO params overrides")
        check_knobs(self)
        for name in ("parallel", "images_per_prompt", "grid_prompts"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if not all(0 < t <= 1 for t in self.thresholds):
            raise ValueError(f"thresholds={self.thresholds} must lie in (0, 1]")


def run_command(p: StudyParams, name: str) -> list[str]:
    """``python -m grpo_lib.train`` for run ``name``: the study's params file, ``common_set``, then its own
    overrides (values as JSON, which is YAML), into ``<run_dir>/<name>``."""
    over = {**p.common_set, **p.runs[name], "run_dir": str(Path(p.run_dir) / name)}
    return [sys.executable, "-m", "grpo_lib.train", p.train_params, "--set",
            *(f"{k}={json.dumps(v)}" for k, v in over.items())]


def train_runs(p: StudyParams) -> dict[str, Path]:
    """Train every run not finished yet (no ``<run_dir>/<name>.done``), ``p.parallel`` at a time
    (1 torch thread each when there is no GPU); each one's output goes to ``<run_dir>/<name>.log`` and its
    command to ``<run_dir>/<name>.cmd``. A finished run is read, not retrained; a killed one resumes.
    Raises ``RuntimeError`` naming the failed runs with their log's tail."""
    import os
    import subprocess
    import time

    import torch

    out = {name: Path(p.run_dir) / name for name in p.runs}
    todo = [n for n in p.runs if not _finished(out[n])]
    for name in p.runs:
        if name not in todo:
            print(f"[study] {name}: finished earlier, read from {out[name]}", flush=True)
    env = dict(os.environ, **({} if torch.cuda.is_available() else {"OMP_NUM_THREADS": "1"}))
    running: dict[str, subprocess.Popen] = {}
    failed = []
    while todo or running:
        while todo and len(running) < p.parallel:
            name = todo.pop(0)
            cmd = run_command(p, name) + (["resume=true"] if (out[name] / "checkpoints").is_dir() else [])
            Path(p.run_dir).mkdir(parents=True, exist_ok=True)
            (Path(p.run_dir) / f"{name}.cmd").write_text(" ".join(cmd[1:]) + "\n")
            print(f"[study] training {name}", flush=True)
            running[name] = subprocess.Popen(cmd, env=env, stdout=open(Path(p.run_dir) / f"{name}.log", "w"),
                                             stderr=subprocess.STDOUT)
        time.sleep(1.0)
        for name, proc in list(running.items()):
            if proc.poll() is not None:
                del running[name]
                if proc.returncode:
                    failed.append(name)
                else:
                    out[name].with_suffix(".done").write_text(f"exit 0 {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
                print(f"[study] {name} {'FAILED' if proc.returncode else 'done'}", flush=True)
    if failed:
        tails = {n: (Path(p.run_dir) / f"{n}.log").read_text().splitlines()[-15:] for n in failed}
        raise RuntimeError("study runs failed: " + "; ".join(f"{n}:\n" + "\n".join(t) for n, t in tails.items()))
    return out


def _finished(run: Path) -> bool:
    """A run is finished when its training process exited cleanly (``train_runs`` then writes ``<run>.done``)."""
    return run.with_suffix(".done").is_file()


def load_curves(runs: dict[str, Path]) -> pd.DataFrame:
    """Every run's per-evaluation val accuracy against its cost: one row per (run, evaluated epoch) with
    ``reward_calls`` (training reward calls so far), ``seconds_total`` (training seconds so far, evaluation
    excluded), accuracy with its 95 % Wilson interval over the evaluation's images (the step in
    ``eval_reward_calls``), and shape match."""
    from .evaluate import wilson_interval

    parts = []
    for name, run in runs.items():
        m = pd.read_csv(Path(run) / "metrics.csv")
        m = m[m["eval_correct"].notna()]
        images = m["eval_reward_calls"].diff().fillna(m["eval_reward_calls"])   # each evaluation's images
        for (_, r), n in zip(m.iterrows(), images.astype(int)):
            k = round(float(r["eval_correct"]) * n)
            lo, hi = wilson_interval(k, n)
            parts.append({"run": name, "epoch": int(r["epoch"]), "reward_calls": int(r["reward_calls"]),
                          "seconds_total": float(r["seconds_total"]), "accuracy": float(r["eval_correct"]),
                          "ci_low": lo, "ci_high": hi, "n_images": n,
                          "shape_match": float(r.get("eval_shape_match", float("nan")))})
    return pd.DataFrame(parts)


def reach_table(curves: pd.DataFrame, thresholds: list[float]) -> pd.DataFrame:
    """Reward calls each run needed to reach each accuracy: the first evaluation at or above it, and the
    interval of that figure from the Wilson bounds (first where the upper bound reaches it: the soonest it
    may have; first where the lower bound does: by when it surely had). ``NaN`` = not within the run."""
    def first(df, col, t):
        hit = df[df[col] >= t]
        return float(hit["reward_calls"].iloc[0]) if len(hit) else float("nan")

    out = []
    for name, df in curves.sort_values("reward_calls").groupby("run", sort=False):
        for t in thresholds:
            out.append({"run": name, "threshold": t, "reward_calls": first(df, "accuracy", t),
                        "calls_low": first(df, "ci_high", t), "calls_high": first(df, "ci_low", t),
                        "max_reward_calls": int(df["reward_calls"].max())})
    return pd.DataFrame(out)


def checkpoint_at(run: Path, column: str, budget: float) -> tuple[Path, dict]:
    """The run's saved checkpoint with the largest ``column`` (``reward_calls`` / ``seconds_total``) at or
    below ``budget``, and that epoch's metrics row. Raises ``ValueError`` when none fits."""
    m = pd.read_csv(Path(run) / "metrics.csv").set_index("epoch")
    saved = sorted((int(d.name.split("_")[1]), d) for d in RunLayout(Path(run)).epochs())
    fits = [(e, d) for e, d in saved if e in m.index and m.loc[e, column] <= budget + 1e-9]
    if not fits:
        raise ValueError(f"{run}: no saved checkpoint with {column} <= {budget} (saved epochs "
                         f"{[e for e, _ in saved]}); lower save_every or raise the budget")
    epoch, path = max(fits)
    return path, {"epoch": epoch, "reward_calls": int(m.loc[epoch, "reward_calls"]),
                  "seconds_total": float(m.loc[epoch, "seconds_total"])}


def compare_at_budgets(p: StudyParams, runs: dict[str, Path], curves: pd.DataFrame) -> tuple[pd.DataFrame, dict]:
    """Each run's checkpoint at equal reward calls and at equal training seconds, sampled on the same val
    images as the cold start and paired against it and against the first run, with the quality guard.
    ``budget`` is ``reward_calls`` or ``seconds_total`` (``start`` for the cold start), ``budget_value`` its
    limit. Returns (table, per-image tables keyed by (run, budget), the cold start's under ``"start"``)."""
    from .evaluate import paired_difference
    from .experiment import quality_change, quality_means
    from .prompts import load_rows, spread_subset

    final = curves.sort_values("reward_calls").groupby("run").last()
    budgets = {"reward_calls": p.budget_reward_calls or int(final["reward_calls"].min()),
               "seconds_total": p.budget_seconds or float(final["seconds_total"].min())}
    rows = load_rows(repo_path(p.prompts))
    rows = spread_subset(rows, p.max_prompts)
    base = repo_path(p.model)
    merges = (repo_path(p.cold_start_lora),) if p.cold_start_lora else ()
    cache: dict[Path, pd.DataFrame] = {}

    def table_of(lora):
        if lora not in cache:
            cache[lora] = _split_table(Recipe(base=base, merges=merges, lora=lora), rows,
                                       images_per_prompt=p.images_per_prompt, num_steps=p.num_steps, seed=p.seed)
        return cache[lora]

    start = table_of(None)
    first = next(iter(runs))
    picks = {(name, col): checkpoint_at(run, col, b) for col, b in budgets.items() for name, run in runs.items()}
    tables = {key: table_of(path / "lora") for key, (path, _) in picks.items()}
    means = quality_means({"start": start, **{f"{n}@{c}": t for (n, c), t in tables.items()}})
    _, worst = quality_change(means, means.loc["start"])
    out = [{"budget": "start", "budget_value": float("nan"), "run": "cold_start", **_accuracy(start),
            **means.loc["start"].to_dict()}]
    for (name, col), t in tables.items():
        drop = float(worst.loc[f"{name}@{col}"])
        row = {"budget": col, "budget_value": budgets[col], "run": name, **picks[(name, col)][1], **_accuracy(t),
               **means.loc[f"{name}@{col}"].to_dict(), "worst_quality_drop": drop, "guard_pass": drop <= p.guard_max_drop}
        for ref_name, ref in (("cold_start", start), (first, tables[(first, col)])):
            if ref is t:
                continue
            d = paired_difference(ref, t)
            row.update({f"vs_{ref_name}_{k}": d[k] for k in PAIRED_KEYS})
        out.append(row)
    return pd.DataFrame(out), {"start": start, **tables}


def plot_curves(curves: pd.DataFrame, path: str | Path) -> Path:
    """Val accuracy (with its Wilson band) against reward calls and against training minutes, per run."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for name, df in curves.groupby("run", sort=False):
        for ax, x in zip(axes, (df["reward_calls"], df["seconds_total"] / 60)):
            line, = ax.plot(x, df["accuracy"], marker=".", label=name)
            ax.fill_between(x, df["ci_low"], df["ci_high"], alpha=0.12, color=line.get_color())
    axes[0].set_xlabel("training reward calls")
    axes[1].set_xlabel("training minutes (evaluation excluded)")
    axes[0].set_ylabel("exact-count accuracy (val)")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def summary_markdown(table: pd.DataFrame) -> str:
    """``compare_at_budgets``'s table as Markdown: accuracy and paired changes with their 95 % intervals."""
    def pm(r, pre):
        key = f"{pre}_diff"
        if key not in r or pd.isna(r[key]):
            return "-"
        return f"{100 * r[key]:+.1f} pp [{100 * r[pre + '_ci_low']:+.1f}, {100 * r[pre + '_ci_high']:+.1f}]"

    refs = [c[:-5] for c in table.columns if c.startswith("vs_") and c.endswith("_diff")]
    head = ["budget (at most)", "run", "epoch", "reward calls", "train s", "exact count [95 %]", "counts 7-10",
            "shape match", *(f"paired {r.replace('_', ' ')}" for r in refs), "guard"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for _, r in table.iterrows():
        budget = {"start": "-", "reward_calls": f"{r['budget_value']:,.0f} reward calls",
                  "seconds_total": f"{r['budget_value']:,.0f} train s"}[r["budget"]]
        cells = [budget, r["run"], "-" if pd.isna(r.get("epoch")) else f"{int(r['epoch'])}",
                 "-" if pd.isna(r.get("reward_calls")) else f"{int(r['reward_calls']):,}",
                 "-" if pd.isna(r.get("seconds_total")) else f"{r['seconds_total']:.0f}",
                 f"{r['accuracy']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}]", f"{r['accuracy_counts_7_10']:.3f}",
                 f"{r['shape_match']:.3f}", *(pm(r, ref) for ref in refs),
                 "-" if pd.isna(r.get("guard_pass")) else ("pass" if r["guard_pass"] else "FAIL")]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def per_count_markdown(per_count: pd.DataFrame) -> str:
    """``evaluate.compare_stages``'s table as Markdown: one row per requested count (and "all"), one column per
    stage, each cell ``accuracy [95 % Wilson interval]``; the image count of each row is in the second column."""
    stages = [c[:-len("_accuracy")] for c in per_count.columns if c.endswith("_accuracy")]
    lines = ["| N | images | " + " | ".join(stages) + " |", "|---|---|" + "---|" * len(stages)]
    for _, r in per_count.iterrows():
        cells = [f"{r[s + '_accuracy']:.3f} [{r[s + '_ci_low']:.3f}, {r[s + '_ci_high']:.3f}]" for s in stages]
        lines.append(f"| {r['count']} | {int(r[stages[0] + '_n'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def per_image_long(tables: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Every stage's per-image table stacked, with ``stage`` and ``image`` (the position in the split's sampling
    order, the same prompt and noise in every stage) in front, so any two stages pair on ``image``."""
    return pd.concat([t.assign(stage=name, image=range(len(t)))[["stage", "image", *t.columns]]
                      for name, t in tables.items()], ignore_index=True)


def confusion_markdown(tables: dict[str, pd.DataFrame]) -> str:
    """One ``evaluate.confusion_table`` per stage (requested count x found count) as Markdown, all on the same
    columns, so where a stage's errors go (one short, one over) reads across stages."""
    from .evaluate import confusion_table

    cap = max(int(t["target"].max()) for t in tables.values()) + 3
    out = []
    for name, t in tables.items():
        ct = confusion_table(t, max_found=cap)
        out += [f"### {name}", "", "| asked, found: | " + " | ".join(ct.columns) + " |",
                "|---|" + "---|" * len(ct.columns)]
        out += [f"| {n} | " + " | ".join(str(v) for v in row) + " |" for n, row in zip(ct.index, ct.values)]
        out.append("")
    return "\n".join(out)


def image_grid(p: StudyParams, picks: dict[str, Path], path: str | Path) -> Path:
    """One row per policy (``name -> LoRA dir``, ``None`` = the cold start), one val image per column:
    ``grid_prompts`` prompts spread over the counts, the same noise in every row; captions say found/asked."""
    import numpy as np

    from .checkpoints import load_policy
    from .evaluate import per_image_table, save_image_grid
    from .prompts import load_rows, spread_subset
    from .rollout import sample_for_rows
    from .train import selection_seed

    rows = spread_subset(load_rows(repo_path(p.prompts)), p.grid_prompts)
    merges = (repo_path(p.cold_start_lora),) if p.cold_start_lora else ()
    cells, captions = [], []
    for lora in picks.values():
        images, flat = sample_for_rows(load_policy(Recipe(base=repo_path(p.model), merges=merges, lora=lora)), rows,
                                       images_per_prompt=1, num_steps=p.num_steps, seed=selection_seed(p.seed))
        t = per_image_table(images, flat)
        cells.append(images)
        captions.append([f"{f}/{n}" for f, n in zip(t["found"], t["target"])])
    return save_image_grid(np.stack(cells), path, row_labels=list(picks), captions=captions,
                           title="val prompts, same noise per column; caption: found / asked")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Sample-efficiency study helpers")
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("cold-start-curve", help="val accuracy of every cold-start checkpoint of a run")
    c.add_argument("run_dir")
    c.add_argument("--out", default="results/study")
    c.add_argument("--images-per-prompt", type=int, default=2)
    c.add_argument("--every", type=int, default=1, help="evaluate every k-th checkpoint")
    c.add_argument("--guidance-scale", type=float, default=1.0, help="CFG scale of the sampling (1 = off)")
    m = sub.add_parser("compare", help="paired accuracy of a cold start, GRPO/NFT/AWM checkpoints on it, and "
                                       "other LoRAs on the base (a longer cold start: the control)")
    m.add_argument("--base", default="data/checkpoints/tiny-base")
    m.add_argument("--cold-start", required=True, help="the cold-start LoRA every checkpoint sits on")
    m.add_argument("checkpoints", nargs="*", metavar="NAME=CHECKPOINT_DIR")
    m.add_argument("--on-base", nargs="*", default=[], metavar="NAME=LORA_DIR",
                   help="LoRAs that sit on the base itself, e.g. the cold start trained for the same total minutes "
                        "(a cold start's lora/ sits on the model its summary.json names: a cold start continued "
                        "from another's merged model, say)")
    m.add_argument("--own-start", nargs="*", default=[], metavar="NAME=CHECKPOINT_DIR",
                   help="checkpoints that sit on the cold start their own run started from (its params.json), "
                        "e.g. RL runs from different cold starts (budget splits)")
    m.add_argument("--split", choices=sorted(SPLITS), default="val",
                   help="val (choosing) or test (the final figure only: test prompts, test noise seeds)")
    m.add_argument("--versus", nargs="*", default=[], metavar="NAME",
                   help="also pair every stage against these stages (the first stage is always a reference)")
    m.add_argument("--with-base", action="store_true",
                   help="also sample the base (stage 'base') and guard every stage's quality against it")
    m.add_argument("--guard-vs", default=None, metavar="NAME",
                   help="the stage each stage's quality guard compares with (default: base with --with-base)")
    m.add_argument("--per-count", default=None, metavar="CSV",
                   help="also write per-count accuracy with Wilson intervals, one column group per stage")
    m.add_argument("--grid", default=None, metavar="PNG",
                   help="also save one row of images per stage (2 per count, the same noise in every row)")
    m.add_argument("--images-csv", default=None, metavar="CSV",
                   help="also write every stage's per-image table (paired on the column 'image') and, next to it "
                        "as .md, each stage's confusion table: asked count x found count")
    m.add_argument("--guidance-scale", type=float, default=1.0,
                   help="CFG scale of every stage's sampling (1 = off, the pipeline's evaluation)")
    m.add_argument("--out", default="results/study/compare.csv")
    m.add_argument("--images-per-prompt", type=int, default=2)
    m.add_argument("--processes", type=int, default=1,
                   help="sampling processes, 1 thread each (2 on 2 cores: about 1.3x one process of 2 threads)")
    args = ap.parse_args(argv)
    if args.cmd == "compare":

        base, cs = repo_path(args.base), repo_path(args.cold_start)
        stages = {"cold_start": Recipe(base=base, merges=(cs,))}
        def on_cold_start(path):                  # a GRPO/NFT/AWM checkpoint dir: its LoRA sits on the cold start
            return Recipe(base=base, merges=(cs,), lora=Path(path) / "lora")

        def on_base(path):                        # a LoRA dir that sits on the base (a longer cold start)
            lora = repo_path(path)
            return Recipe(base=cold_start_model(lora.parent) or base, lora=lora)

        def on_own_start(path):                   # a checkpoint dir: its LoRA on the cold start its run started from
            return grpo_recipe(Path(path) / "lora", base)

        for items, recipe in ((args.checkpoints, on_cold_start), (args.on_base, on_base),
                              (args.own_start, on_own_start)):
            for item in items:
                name, sep, path = item.partition("=")
                if not sep or not name or name in stages:
                    raise SystemExit(f"{item!r}: expected NAME=PATH with a new NAME (taken: {list(stages)})")
                stages[name] = recipe(path)
        if args.with_base:
            if "base" in stages:
                raise SystemExit("--with-base adds a stage named 'base'; another stage has that name")
            stages["base"] = Recipe(base=base)
        guard_vs = args.guard_vs or ("base" if args.with_base else None)
        try:
            _check_references(stages, tuple(args.versus), guard_vs)
        except ValueError as e:
            raise SystemExit(str(e))
        images: dict = {}
        tables = split_tables(stages, split=args.split, images_per_prompt=args.images_per_prompt,
                              guidance_scale=args.guidance_scale, images_out=images, processes=args.processes)
        if args.grid:
            stage_grid(images, tables, args.grid, per_count=2,
                       title=f"{args.split}, CFG {args.guidance_scale:g}: same prompt and noise per column; "
                             "caption: found / asked")
        df = compare_tables(tables, versus=tuple(args.versus), guard_vs=guard_vs)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        df.to_csv(args.out, index=False)
        if args.per_count:
            from .evaluate import compare_stages
            Path(args.per_count).parent.mkdir(parents=True, exist_ok=True)
            per_count = compare_stages(tables)
            per_count.to_csv(args.per_count, index=False)
            Path(args.per_count).with_suffix(".md").write_text(per_count_markdown(per_count))
            print(per_count_markdown(per_count))
        if args.images_csv:
            Path(args.images_csv).parent.mkdir(parents=True, exist_ok=True)
            per_image_long(tables).to_csv(args.images_csv, index=False)
            Path(args.images_csv).with_suffix(".md").write_text(confusion_markdown(tables))
        print(df.round(4).to_string(index=False))
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    df = cold_start_curve(args.run_dir, images_per_prompt=args.images_per_prompt, every=args.every,
                          guidance_scale=args.guidance_scale, progress=False)
    df.to_csv(out / "cold_start_curve.csv", index=False)
    cfg = f", CFG {args.guidance_scale:g}" if args.guidance_scale != 1.0 else ""
    plot_curve(df, out / "cold_start_curve.png", f"cold start alone: val accuracy vs minutes{cfg}")
    print(df.to_string(index=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
