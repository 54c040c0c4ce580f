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
from pathlib import Path

import pandas as pd


def _val_table(recipe, rows, *, images_per_prompt: int, num_steps: int, shift: float = 1.0,
               guidance_scale: float = 1.0, seed: int = 0, progress: bool = False) -> pd.DataFrame:
    """Per-image table of ``recipe``'s policy on ``rows`` (ODE, the val noise seeds ``train.selection_seed``)."""
    from .checkpoints import load_policy
    from .evaluate import per_image_table
    from .rollout import sample_for_rows
    from .train import selection_seed

    images, flat = sample_for_rows(load_policy(recipe), rows, images_per_prompt=images_per_prompt,
                                   num_steps=num_steps, shift=shift, guidance_scale=guidance_scale,
                                   seed=selection_seed(seed), progress=progress)
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
    base itself. ``base`` defaults to the cold start's own ``summary.json`` params."""
    from .checkpoints import Recipe, repo_path
    from .prompts import load_rows

    run_dir = Path(run_dir)
    ck_dir = run_dir / "cold_start" / "checkpoints"
    steps = sorted(ck_dir.glob("step_*"))[::every]
    if not steps:
        raise ValueError(f"no cold-start checkpoints under {str(ck_dir)!r} (expected step_XXXXXX dirs)")
    params = json.loads((run_dir / "cold_start" / "summary.json").read_text()).get("params", {}) \
        if (run_dir / "cold_start" / "summary.json").is_file() else {}
    base = repo_path(base or params.get("model", "data/checkpoints/tiny-base"))
    history = pd.read_csv(run_dir / "cold_start" / "loss.csv") if (run_dir / "cold_start" / "loss.csv").is_file() else None
    rows = load_rows(prompts)
    out = []
    for path in ([None] + steps):
        table = _val_table(Recipe(base=base, lora=None if path is None else path / "lora"), rows,
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


def compare_on_val(stages: dict[str, "Recipe"], *, prompts: str = "data/counting/val.jsonl",
                   images_per_prompt: int = 2, num_steps: int = 20, seed: int = 0) -> pd.DataFrame:
    """Exact-count accuracy of each named policy recipe on the val prompts (same noise per image for all),
    and each one's paired change against the first (``evaluate.paired_difference``: difference, 95 %
    interval, images gained / lost, McNemar p)."""
    from .evaluate import paired_difference
    from .prompts import load_rows

    rows = load_rows(prompts)
    tables = {name: _val_table(recipe, rows, images_per_prompt=images_per_prompt, num_steps=num_steps, seed=seed)
              for name, recipe in stages.items()}
    first = next(iter(tables))
    out = []
    for name, t in tables.items():
        acc = _accuracy(t)
        row = {"stage": name, **acc,
               "shape_match": float(t["shape_match"].mean()) if "shape_match" in t else float("nan")}
        if name != first:
            d = paired_difference(tables[first], t)
            row.update({f"vs_{first}_{k}": v for k, v in d.items() if k in ("diff", "ci_low", "ci_high", "gained",
                                                                           "lost", "p_value")})
        out.append(row)
        print(f"[study] {name}: {acc['accuracy']:.3f} [{acc['ci_low']:.3f}, {acc['ci_high']:.3f}]", flush=True)
    return pd.DataFrame(out)


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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Sample-efficiency study helpers")
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("cold-start-curve", help="val accuracy of every cold-start checkpoint of a run")
    c.add_argument("run_dir")
    c.add_argument("--out", default="results/study")
    c.add_argument("--images-per-prompt", type=int, default=2)
    c.add_argument("--every", type=int, default=1, help="evaluate every k-th checkpoint")
    m = sub.add_parser("compare", help="paired val accuracy of a cold start and GRPO/NFT/AWM checkpoints on it")
    m.add_argument("--base", default="data/checkpoints/tiny-base")
    m.add_argument("--cold-start", required=True, help="the cold-start LoRA every checkpoint sits on")
    m.add_argument("checkpoints", nargs="+", metavar="NAME=CHECKPOINT_DIR")
    m.add_argument("--out", default="results/study/compare.csv")
    m.add_argument("--images-per-prompt", type=int, default=2)
    args = ap.parse_args(argv)
    if args.cmd == "compare":
        from .checkpoints import Recipe, repo_path
        base, cs = repo_path(args.base), repo_path(args.cold_start)
        stages = {"cold_start": Recipe(base=base, merges=(cs,))}
        for item in args.checkpoints:
            name, _, path = item.partition("=")
            stages[name] = Recipe(base=base, merges=(cs,), lora=Path(path) / "lora")
        df = compare_on_val(stages, images_per_prompt=args.images_per_prompt)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        df.to_csv(args.out, index=False)
        print(df.round(4).to_string(index=False))
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    df = cold_start_curve(args.run_dir, images_per_prompt=args.images_per_prompt, every=args.every, progress=False)
    df.to_csv(out / "cold_start_curve.csv", index=False)
    plot_curve(df, out / "cold_start_curve.png", "cold start alone: val accuracy vs minutes")
    print(df.to_string(index=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
