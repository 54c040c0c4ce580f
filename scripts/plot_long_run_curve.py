"""A long run's learning curve on val, cold start then RL, against training minutes: one CSV and one PNG.

    python scripts/plot_long_run_curve.py results/long_run_s12/learning_curve \
        --cold-start-curve results/long_run_s12/cold_start_curve.csv --rl-run runs/s12-long --images 210

Reads the cold start's points (``python -m grpo_lib.study cold-start-curve``: step, minutes, accuracy, ci_low,
ci_high) and the RL stage's per-epoch val evaluation (``<rl-run>/metrics.csv``: eval_correct at
seconds_total). RL minutes continue from the cold start's last point, so the x axis is the whole run's training
time (evaluation excluded). The RL rows get Wilson intervals from ``--images`` (val images per evaluation).
"""
import argparse
from pathlib import Path

import matplotlib
import pandas as pd

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from grpo_lib.evaluate import wilson_interval  # noqa: E402


def learning_curve(cold: pd.DataFrame, rl_metrics: pd.DataFrame, images: int) -> pd.DataFrame:
    """Cold-start rows (phase ``cold_start``) then the RL epochs after epoch 0 (phase ``rl``)."""
    cold = cold.assign(phase="cold_start", epoch=pd.NA)[["phase", "step", "epoch", "minutes", "accuracy", "ci_low",
                                                          "ci_high"]]
    start = float(cold["minutes"].max())
    rows = []
    for _, r in rl_metrics.dropna(subset=["eval_correct"]).iterrows():
        if int(r.epoch) == 0:          # the RL stage's start is the cold start's last checkpoint
            continue
        lo, hi = wilson_interval(round(r.eval_correct * images), images)
        rows.append({"phase": "rl", "step": pd.NA, "epoch": int(r.epoch),
                     "minutes": start + float(r.seconds_total) / 60, "accuracy": float(r.eval_correct),
                     "ci_low": lo, "ci_high": hi})
    return pd.concat([cold, pd.DataFrame(rows)], ignore_index=True).assign(n_images=images)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", help="output path without suffix")
    ap.add_argument("--cold-start-curve", required=True, help="CSV of study cold-start-curve")
    ap.add_argument("--rl-run", required=True, help="the RL stage's run dir (its metrics.csv)")
    ap.add_argument("--images", type=int, default=210, help="val images per evaluation")
    ap.add_argument("--title", default="long run on val: cosine cold start, then NFT")
    args = ap.parse_args()
    df = learning_curve(pd.read_csv(args.cold_start_curve), pd.read_csv(Path(args.rl_run) / "metrics.csv"),
                        args.images)
    df.to_csv(f"{args.out}.csv", index=False)
    fig, ax = plt.subplots(figsize=(7, 3.8))
    for phase, g in df.groupby("phase", sort=False):
        ax.errorbar(g.minutes, g.accuracy, yerr=[g.accuracy - g.ci_low, g.ci_high - g.accuracy], marker="o",
                    capsize=2, label={"cold_start": "cold start (by step)", "rl": "RL (by epoch)"}[phase])
    ax.axvline(df[df.phase == "cold_start"].minutes.max(), color="grey", ls=":", lw=1)
    ax.set(xlabel="training minutes (evaluation excluded)",
           ylabel=f"val exact count ({args.images} images, 95 % Wilson)", title=args.title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(f"{args.out}.png", dpi=110)
    print(df.to_string(index=False))


if __name__ == "__main__":
    main()
