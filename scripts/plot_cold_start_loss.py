"""A cold start's loss.csv as a PNG: the loss (rolling mean) and the lr on a second axis.

    python scripts/plot_cold_start_loss.py runs/long10/cold_start/loss.csv results/long_cosine/cold_start_loss.png \
        --title "long cold start, cosine lr, 7,000 steps"

The same figure as the cold start's own ``loss.png`` (``grpo_lib.cold_start.plot_loss_curve``), with a chosen
window and title.
"""
from __future__ import annotations

import argparse

import pandas as pd

from grpo_lib.cold_start import plot_loss_curve


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("loss_csv")
    ap.add_argument("out_png")
    ap.add_argument("--window", type=int, default=200, help="rolling-mean window in steps")
    ap.add_argument("--title", default="cold start")
    args = ap.parse_args()
    print(plot_loss_curve(pd.read_csv(args.loss_csv), args.out_png, title=args.title, window=args.window))


if __name__ == "__main__":
    main()
