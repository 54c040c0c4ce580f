"""The budget split of make run's 15.5 trained minutes between cold start and RL (issue 12 item 3), on val.

Reads `study compare` tables (560 val images each, the same noise per image in every table):
  --curve  CSV  the cold start alone at several checkpoints (stage names cs<step>, first stage = step 500)
  --splits CSV  RL runs from those checkpoints, each trained for the minutes the cold start left (own-start)
and the cold start's loss.csv (elapsed seconds per step) for the minutes axis. Writes <out>.png and <out>.csv:
accuracy of the cold start alone against its minutes, and of each split's final model (at 15.5 min in all)
against the minutes its cold start had.

    python scripts/plot_budget_split.py --curve runs/cs_curve/val_compare.csv \
        --splits runs/splits/val_A.csv runs/splits/val_B.csv --loss runs/control/cold_start/loss.csv \
        --split-steps nft6cos_3.5=500 split5.8=1000 split8.3=1500 split11=2000 --out results/budget_split/val_split
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path

import pandas as pd


def minutes_at(loss: pd.DataFrame, step: int) -> float:
    return float(loss.loc[loss["step"] == step, "elapsed_s"].iloc[0]) / 60.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--curve", required=True)
    ap.add_argument("--first-step", type=int, default=500, help="the cold-start step of the curve's first stage")
    ap.add_argument("--splits", nargs="+", required=True)
    ap.add_argument("--loss", required=True)
    ap.add_argument("--split-steps", nargs="+", required=True, metavar="STAGE=STEP")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    loss = pd.read_csv(args.loss)
    curve = pd.read_csv(args.curve)
    curve["step"] = [args.first_step if i == 0 else int(re.sub(r"\D", "", s)) for i, s in enumerate(curve["stage"])]
    curve["kind"] = "cold start alone"
    steps = dict(item.split("=") for item in args.split_steps)
    splits = pd.concat([pd.read_csv(f) for f in args.splits])
    splits = splits[splits["stage"].isin(steps)].drop_duplicates("stage").copy()
    splits["step"] = [int(steps[s]) for s in splits["stage"]]
    splits["kind"] = "cold start + NFT (15.5 min in all)"
    cols = ["kind", "stage", "step", "accuracy", "ci_low", "ci_high", "accuracy_counts_7_10", "shape_match"]
    extra = [c for c in splits if c.startswith("vs_control_")]
    table = pd.concat([curve[cols], splits[cols + extra]], ignore_index=True)
    table.insert(3, "cold_start_minutes", [round(minutes_at(loss, s), 2) for s in table["step"]])

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for kind, marker in (("cold start alone", "o"), ("cold start + NFT (15.5 min in all)", "s")):
        t = table[table["kind"] == kind].sort_values("cold_start_minutes")
        ax.errorbar(t["cold_start_minutes"], t["accuracy"], yerr=[t["accuracy"] - t["ci_low"], t["ci_high"] - t["accuracy"]],
                    marker=marker, capsize=3, label=kind)
    ax.set_xlabel("cold-start minutes, as the control trained them (the rest of 15.5 goes to NFT)")
    ax.set_ylabel("exact-count accuracy, 560 val images")
    ax.set_title("make run's budget split, chosen on val")
    ax.legend(loc="lower right")
    fig.tight_layout()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out.with_suffix(".png"), dpi=100)
    table.to_csv(out.with_suffix(".csv"), index=False)
    print(table.round(4).to_string(index=False))


if __name__ == "__main__":
    main()
