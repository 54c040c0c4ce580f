"""The budget split of make run's trained minutes between cold start and RL (issue 12 item 3), on val.

Reads `study compare` tables (560 val images each, the same noise per image in every table):
  --curve  CSV  the cold start alone at several checkpoints (stage names cs<step>, first stage = step 500)
  --splits CSV  RL runs from those checkpoints, each trained for the minutes the cold start left (own-start)
and, for the minutes axis, either the cold start's loss.csv (elapsed seconds per step) or a fixed
--seconds-per-step (cold starts that are separate runs, each with its own lr schedule). Writes <out>.png and
<out>.csv: accuracy of the cold start alone against its minutes, and of each split's final model (at
--total-minutes in all) against the minutes its cold start had.

    python scripts/plot_budget_split.py --curve runs/cs_curve/val_compare.csv \
        --splits runs/splits/val_A.csv runs/splits/val_B.csv --loss runs/control/cold_start/loss.csv \
        --split-steps nft6cos_3.5=500 split5.8=1000 split8.3=1500 split11=2000 --out results/budget_split/val_split
    (results/budget_split_cosine/README.md has the --seconds-per-step form)
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path

import pandas as pd


def minutes_at(loss: pd.DataFrame | None, step: int, seconds_per_step: float | None) -> float:
    if loss is None:
        return step * seconds_per_step / 60.0
    return float(loss.loc[loss["step"] == step, "elapsed_s"].iloc[0]) / 60.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--curve", required=True)
    ap.add_argument("--first-step", type=int, default=500, help="the cold-start step of the curve's first stage")
    ap.add_argument("--curve-stages", nargs="*", help="keep only these stages of --curve (default: all)")
    ap.add_argument("--splits", nargs="+", required=True)
    minutes = ap.add_mutually_exclusive_group(required=True)
    minutes.add_argument("--loss", help="loss.csv of the one cold-start run the curve's checkpoints come from")
    minutes.add_argument("--seconds-per-step", type=float, help="measured seconds per cold-start step")
    ap.add_argument("--total-minutes", type=float, default=15.5, help="the budget every split fills")
    ap.add_argument("--control", default="control", help="the stage the vs_<control>_* columns pair against")
    ap.add_argument("--title", default="make run's budget split, chosen on val")
    ap.add_argument("--split-steps", nargs="+", required=True, metavar="STAGE=STEP")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    loss = pd.read_csv(args.loss) if args.loss else None
    split_kind = f"cold start + NFT ({args.total_minutes:g} min in all)"
    curve = pd.read_csv(args.curve)
    if args.curve_stages:
        curve = curve[curve["stage"].isin(args.curve_stages)].reset_index(drop=True)
    # a stage's step is the number in its name (cs1500, cscos3200); the compare's reference stage has none
    curve["step"] = [int(re.sub(r"\D", "", s)) if re.search(r"\d", s) else args.first_step for s in curve["stage"]]
    curve["kind"] = "cold start alone"
    steps = dict(item.split("=") for item in args.split_steps)
    splits = pd.concat([pd.read_csv(f) for f in args.splits])
    splits = splits[splits["stage"].isin(steps)].drop_duplicates("stage").copy()
    splits["step"] = [int(steps[s]) for s in splits["stage"]]
    splits["kind"] = split_kind
    cols = ["kind", "stage", "step", "accuracy", "ci_low", "ci_high", "accuracy_counts_7_10", "shape_match"]
    extra = [c for c in splits if c.startswith(f"vs_{args.control}_")]
    table = pd.concat([curve[cols], splits[cols + extra]], ignore_index=True)
    table.insert(3, "cold_start_minutes", [round(minutes_at(loss, s, args.seconds_per_step), 2) for s in table["step"]])

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for kind, marker in (("cold start alone", "o"), (split_kind, "s")):
        t = table[table["kind"] == kind].sort_values("cold_start_minutes")
        ax.errorbar(t["cold_start_minutes"], t["accuracy"], yerr=[t["accuracy"] - t["ci_low"], t["ci_high"] - t["accuracy"]],
                    marker=marker, capsize=3, label=kind)
    ax.set_xlabel(f"cold-start minutes (the rest of {args.total_minutes:g} goes to NFT)")
    ax.set_ylabel("exact-count accuracy, 560 val images")
    ax.set_title(args.title)
    ax.legend(loc="lower right")
    fig.tight_layout()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out.with_suffix(".png"), dpi=100)
    table.to_csv(out.with_suffix(".csv"), index=False)
    print(table.round(4).to_string(index=False))


if __name__ == "__main__":
    main()
