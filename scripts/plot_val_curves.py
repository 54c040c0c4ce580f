"""Val accuracy (with 95 % Wilson intervals) and one quality measure against epoch, for runs side by side.

    python scripts/plot_val_curves.py results/nft_cosine_make_run/val_constant_vs_cosine \
        "constant lr 1e-3=runs/nft6" "cosine lr 1e-3 -> 0 at epoch 70=runs/nft6cos" --quality area_quality

``--x reward_calls`` or ``--x minutes`` (training seconds / 60) puts runs with different rollouts per epoch on
one axis.

Reads each run's metrics.csv (the per-epoch evaluation on the val prompts) and writes <out>.csv and <out>.png.
"""
import argparse
from pathlib import Path

import matplotlib
import pandas as pd

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from grpo_lib.evaluate import wilson_interval  # noqa: E402

# --x choice -> (metrics.csv column, scale, axis label)
X_AXES = {"epoch": ("epoch", 1.0, "epoch"), "reward_calls": ("reward_calls", 1.0, "reward calls (rollouts scored)"),
          "minutes": ("seconds_total", 1 / 60, "training minutes")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", help="output path without suffix")
    ap.add_argument("runs", nargs="+", metavar="LABEL=RUN_DIR")
    ap.add_argument("--quality", default="area_quality", help="eval_<name> column for the right-hand panel")
    ap.add_argument("--guard-max-drop", type=float, default=0.05)
    ap.add_argument("--images", type=int, default=140, help="val images per evaluation (eval_max_prompts x images)")
    ap.add_argument("--x", choices=sorted(X_AXES), default="epoch", help="the horizontal axis")
    args = ap.parse_args()
    column, scale, xlabel = X_AXES[args.x]
    rows = []
    for item in args.runs:
        label, _, run = item.rpartition("=")
        d = pd.read_csv(Path(run) / "metrics.csv").dropna(subset=["eval_correct"])
        for _, x in d.iterrows():
            lo, hi = wilson_interval(round(x.eval_correct * args.images), args.images)
            rows.append({"run": label, "epoch": int(x.epoch), "val_accuracy": x.eval_correct, "ci_low": lo,
                         "ci_high": hi, "n_images": args.images, args.quality: x[f"eval_{args.quality}"],
                         "guard_pass": bool(x.guard_pass)})
            if args.x != "epoch":
                rows[-1][args.x] = x[column] * scale
    df = pd.DataFrame(rows)
    df.to_csv(f"{args.out}.csv", index=False)
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.8))
    for label, g in df.groupby("run", sort=False):
        ax[0].errorbar(g[args.x], g.val_accuracy, yerr=[g.val_accuracy - g.ci_low, g.ci_high - g.val_accuracy],
                       marker="o", capsize=2, label=label)
        ax[1].plot(g[args.x], g[args.quality], marker="o", label=label)
    start = df[args.quality].iloc[0]
    ax[1].axhline(start * (1 - args.guard_max_drop), color="grey", ls="--",
                  label=f"guard: -{args.guard_max_drop:.0%} of the start")
    ax[0].set(xlabel=xlabel, ylabel=f"val exact count ({df.n_images.iloc[0]} images, 95 % Wilson)")
    ax[1].set(xlabel=xlabel, ylabel=f"val {args.quality.replace('_', ' ')}")
    for a in ax:
        a.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(f"{args.out}.png", dpi=110)
    print(df.to_string(index=False))


if __name__ == "__main__":
    main()
