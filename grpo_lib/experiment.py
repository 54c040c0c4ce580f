"""The counting experiment of notebook 02: GRPO from the cold-start model, then base -> cold start -> GRPO.

``CountingExperiment(params)`` trains with :class:`grpo_lib.train.GRPOTrainer`, then evaluates each stage
on the held-out prompts and on unseen counts (ODE, fixed seeds per (prompt, k), so every stage sees
identical initial noise), with a quality guard: the detector's confidence, shape match, background
fidelity and object-area quality of each stage's images against the renderer's own images of the same
prompts. A reward bought with degenerate pictures shows there, not only in the grids.

| stage        | weights                                                                       |
|--------------|-------------------------------------------------------------------------------|
| ``base``     | ``params.model`` (the shipped base)                                           |
| ``cold_start``| base + ``params.cold_start_lora`` merged (absent when it is "")              |
| ``grpo``     | cold start + the GRPO LoRA of the best checkpoint that passed the guard (EMA)  |
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from grpo_lib.prompts import spread_subset
from grpo_lib.rewards.counting import QUALITY_KEYS
from grpo_lib.train import GRPOParams, GRPOTrainer, test_seed


def quality_means(tables: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """One row per named per-image table: the mean of each quality measure it has."""
    return pd.DataFrame({s: {k: float(t[k].mean()) for k in QUALITY_KEYS if k in t} for s, t in tables.items()}).T


def quality_change(means: pd.DataFrame, ref: pd.Series) -> tuple[pd.DataFrame, pd.Series]:
    """Relative change of every measure against ``ref``, (m - ref) / |ref|, and each row's worst drop
    max(0, -min change): the quality guard passes while the worst drop is <= ``guard_max_drop``."""
    rel = (means - ref) / ref.abs().clip(lower=1e-8)
    return rel, (-rel).max(axis=1).clip(lower=0.0)


class CountingExperiment:
    def __init__(self, params: GRPOParams, *, reward_fn=None):
        if params.world != "embedded":
            raise ValueError(f"CountingExperiment evaluates the embedded world; world={params.world!r} "
                             "(GPU runs: python -m grpo_lib.train / accelerate launch)")
        self.p = params
        self.run_dir = Path(params.run_dir)
        self.out = self.run_dir / "grpo"
        self.out.mkdir(parents=True, exist_ok=True)
        self.reward_fn = reward_fn
        self.trainer: GRPOTrainer | None = None
        self.tables: dict[str, dict[str, pd.DataFrame]] = {}    # set -> stage -> per-image table
        self.images: dict[str, dict[str, np.ndarray]] = {}

    # -- training -----------------------------------------------------------------------------

    def train(self) -> pd.DataFrame:
        """GRPO in this process, or with ``num_processes > 1`` under ``accelerate launch`` (the same
        trainer from the same params, written to ``run_dir/grpo_params.yaml``); returns the metrics."""
        if self.p.num_processes > 1:
            if self.reward_fn is not None:
                raise ValueError("num_processes > 1 runs the trainer in new processes, which build the reward "
                                 "from params; a reward_fn passed in cannot cross over (use num_processes=1)")
            return launch_training(self.p)
        self.trainer = GRPOTrainer(self.p, reward_fn=self.reward_fn)
        try:
            self.trainer.fit()
        finally:
            self.trainer.close()
        return pd.DataFrame(self.trainer.history)

    def best_checkpoint(self) -> Path | None:
        """The checkpoint kept for evaluation: best held-out reward among those that passed the guard,
        else the last one."""
        ck = self.run_dir / "checkpoints"
        for name in ("best", "latest"):
            if (ck / name).is_file():
                return ck / (ck / name).read_text().strip()
        return None

    # -- stages -------------------------------------------------------------------------------

    def stage_policy(self, stage: str):
        """The policy of one stage, built by :mod:`grpo_lib.checkpoints` as the widget and ``infer`` build it:
        the GRPO LoRA is attached (not merged) with the checkpoint's EMA weights when it has them, which is
        exactly what the trainer's evaluation ran."""
        from grpo_lib import checkpoints
        from grpo_lib.policies.base import select_trainable

        p = self.p
        if stage not in ("base", "cold_start", "grpo"):
            raise ValueError(f"stage={stage!r} is not one of ('base', 'cold_start', 'grpo')")
        merges = (Path(p.cold_start_lora),) if p.cold_start_lora and stage != "base" else ()
        if stage != "grpo":
            return checkpoints.load_policy(checkpoints.Recipe(Path(p.model), merges), convention=p.convention)
        ck = self.best_checkpoint()
        if ck is None:
            raise ValueError(f"no GRPO checkpoint under {self.run_dir / 'checkpoints'}: run train() first")
        if p.trainable == "lora":
            return checkpoints.load_policy(checkpoints.Recipe(Path(p.model), merges, ck / checkpoints.LORA_DIR),
                                           convention=p.convention, ema=p.ema_decay > 0)
        policy = checkpoints.load_policy(checkpoints.Recipe(Path(p.model), merges), convention=p.convention)
        select_trainable(policy, p.trainable)
        checkpoints.load_trainable(policy, ck)
        if p.ema_decay > 0:      # evaluate the EMA weights, as the trainer's evaluation does
            checkpoints.apply_ema(policy, ck)
        return policy

    def stages(self) -> list[str]:
        return ["base"] + (["cold_start"] if self.p.cold_start_lora else []) + ["grpo"]

    def rows(self, which: str) -> list[dict]:
        from grpo_lib.prompts import load_rows
        path = {"test": self.p.test_prompts, "unseen": self.p.unseen_prompts}[which]
        return spread_subset(load_rows(path), self.p.final_max_prompts)

    def evaluate(self, which: str = "test", stages: list[str] | None = None, progress: bool = True
                 ) -> dict[str, pd.DataFrame]:
        """Per-image tables for every stage (and the renderer) on one prompt set, sampled on
        ``final_eval_processes`` processes (:class:`grpo_lib.sharded_sampling.ShardedSampler`)."""
        from functools import partial

        from grpo_lib.evaluate import per_image_table
        from grpo_lib.scenes import render_rows
        from grpo_lib.sharded_sampling import ShardedSampler

        p = self.p
        rows = self.rows(which)
        tables, images = {}, {}
        with ShardedSampler(p.final_eval_processes) as sampler:
            for stage in stages or self.stages():
                img, flat = sampler.sample(partial(experiment_stage_policy, p, stage), rows,
                                           images_per_prompt=p.final_images_per_prompt, num_steps=p.eval_num_steps,
                                           shift=p.shift, guidance_scale=p.eval_guidance_scale,
                                           seed=test_seed(p.seed), progress=progress)
                tables[stage], images[stage] = per_image_table(img, flat), img
        flat = [r for r in rows for _ in range(p.final_images_per_prompt)]
        ren, _ = render_rows(flat, seed=p.seed)
        tables["renderer"], images["renderer"] = per_image_table(ren, flat), ren
        self.tables[which], self.images[which] = tables, images
        for stage, t in tables.items():
            t.to_csv(self.out / f"per_image_{which}_{stage}.csv", index=False)
        return tables

    # -- reports ------------------------------------------------------------------------------

    def accuracy_table(self, which: str = "test") -> pd.DataFrame:
        from grpo_lib.evaluate import compare_stages
        tables = {k: v for k, v in self.tables[which].items() if k != "renderer"}
        return compare_stages(tables)

    def paired_changes(self, which: str = "test") -> pd.DataFrame:
        """Accuracy change of each stage over the one before it, paired image by image (same prompts and
        seeds): difference with a 95 % interval and McNemar's exact p-value (evaluate.paired_difference)."""
        from grpo_lib.evaluate import paired_difference
        t, stages = self.tables[which], [s for s in self.stages() if s in self.tables[which]]
        rows = [{"change": f"{a} -> {b}", **paired_difference(t[a], t[b])} for a, b in zip(stages, stages[1:])]
        return pd.DataFrame(rows)

    def quality_guard(self, which: str = "test") -> pd.DataFrame:
        """Mean quality measures per stage and their relative change against three references: the
        renderer's images, the base, and the stage GRPO started from (cold start, else base).

        Two guards, each "no measure drops by more than ``guard_max_drop`` (5 %)":
        ``guard_pass`` against GRPO's start (what RL did) and ``guard_pass_vs_base`` against the base (what
        the whole recipe did: a cold start that forgets a shape on unseen colour-shape pairs fails here,
        although GRPO, measured from that cold start, passes)."""
        means = quality_means(self.tables[which])
        out = means.copy()
        for tag, ref_name in (("renderer", "renderer"), ("base", "base"), ("start", self.stages()[-2])):
            if ref_name not in means.index:
                continue
            rel, worst = quality_change(means, means.loc[ref_name])
            out = out.join(rel.add_suffix(f"_vs_{tag}"))
            out[f"worst_drop_vs_{tag}"] = worst
        out["guard_pass"] = out["worst_drop_vs_start"] <= self.p.guard_max_drop
        if "worst_drop_vs_base" in out:
            out["guard_pass_vs_base"] = out["worst_drop_vs_base"] <= self.p.guard_max_drop
        return out

    def write_summary(self) -> Path:
        """summary.json: per-count accuracy with intervals per stage, on test and unseen counts, plus the guard."""
        summary = {"params": {k: v for k, v in vars(self.p).items()}, "best_checkpoint":
                   str(self.best_checkpoint()) if self.best_checkpoint() else None}
        for which in self.tables:
            acc = self.accuracy_table(which)
            summary[which] = json.loads(acc.to_json(orient="records"))
            summary[f"{which}_paired"] = json.loads(self.paired_changes(which).to_json(orient="records"))
            summary[f"{which}_quality_guard"] = json.loads(self.quality_guard(which).reset_index()
                                                          .rename(columns={"index": "stage"}).to_json(orient="records"))
        path = self.run_dir / "summary.json"
        path.write_text(json.dumps(summary, indent=1, default=str))
        return path


def experiment_stage_policy(params: GRPOParams, stage: str):
    """``CountingExperiment(params).stage_policy(stage)``: a module-level function, so that a
    ``functools.partial`` of it pickles into :class:`~grpo_lib.sharded_sampling.ShardedSampler`'s workers."""
    return CountingExperiment(params).stage_policy(stage)


def launch_training(p: GRPOParams, *, port: int | None = None) -> pd.DataFrame:
    """Train ``p`` on ``p.num_processes`` processes with ``accelerate launch -m grpo_lib.train``
    (:func:`grpo_lib.launch.launch_module`; the per-epoch lines stream here) and return its metrics."""
    from grpo_lib.launch import launch_module

    run_dir = Path(p.run_dir)
    launch_module("grpo_lib.train", p, run_dir / "grpo_params.yaml", echo_prefix="[grpo]", port=port)
    return pd.read_csv(run_dir / "metrics.csv")
