"""A cold start's loss.csv as a PNG: the loss (rolling mean) and the lr on a second axis.

    python scripts/plot_cold_start_loss.py runs/long10/cold_start/loss.csv results/long_cosine/cold_start_loss.png \
        --title "long cold start, cosine lr, 7,000 steps"
"""
from __future__ import annotations

import argparse

import pandas as pd


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("loss_csv")
    ap.add_argument("out_png")
    ap.add_argument("--window", type=int, default=200, help="rolling-mean window in steps")
    ap.add_argument("--title", default="cold start")
    args = ap.parse_args()

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d = pd.read_csv(args.loss_csv)
    fig, ax = plt.subplots(figsize=(6.5, 3.4))
    ax.plot(d["step"], d["loss"].rolling(args.window, min_periods=1).mean(), label=f"loss (mean of {args.window} steps)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("flow-matching loss")
    lr_ax = ax.twinx()
    lr_ax.plot(d["step"], d["lr"], color="gray", ls="--", label="lr")
    lr_ax.set_ylabel("lr")
    ax.set_title(args.title)
    fig.legend(loc="upper right", bbox_to_anchor=(0.88, 0.86))
    fig.tight_layout()
    fig.savefig(args.out_png, dpi=100)


if __name__ == "__main__":
    main()
