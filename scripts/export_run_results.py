"""Copy a pipeline run's final figures into results/<name>/ so a reader sees them without running anything.

    python scripts/export_run_results.py runs/nft6 results/nft_make_run_s6 --label "NFT, epoch 50"

Writes test_per_count.csv/.md (accuracy with 95 % Wilson intervals per count and stage), test_paired.csv (each
stage against the one before, image by image), test_quality_guard.csv, metrics.csv (the training curve), and
copies curves.png, accuracy_test.png and the grids (drop grid_cold_start.png when another results folder already
holds the same cold start's).
"""
import argparse
import json
import shutil
from pathlib import Path

import pandas as pd


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir")
    ap.add_argument("out")
    ap.add_argument("--label", default="grpo", help="column title of the RL stage in the markdown table")
    args = ap.parse_args()
    run, out = Path(args.run_dir), Path(args.out)
    summary = json.loads((run / "summary.json").read_text())
    out.mkdir(parents=True, exist_ok=True)
    per_count = pd.DataFrame(summary["test"])
    per_count.to_csv(out / "test_per_count.csv", index=False)
    pd.DataFrame(summary["test_paired"]).to_csv(out / "test_paired.csv", index=False)
    pd.DataFrame(summary["test_quality_guard"]).to_csv(out / "test_quality_guard.csv", index=False)
    stages = [s for s in ("base", "cold_start", "grpo") if f"{s}_accuracy" in per_count]
    titles = {"base": "base", "cold_start": "cold start", "grpo": args.label}
    lines = ["| count | " + " | ".join(titles[s] for s in stages) + " |", "|---" * (len(stages) + 1) + "|"]
    for _, r in per_count.iterrows():
        cells = [f"{r[f'{s}_accuracy']:.3f} [{r[f'{s}_ci_low']:.3f}, {r[f'{s}_ci_high']:.3f}]" for s in stages]
        lines.append(f"| {r['count']} | " + " | ".join(cells) + " |")
    (out / "test_per_count.md").write_text("\n".join(lines) + "\n")
    shutil.copy(run / "metrics.csv", out / "metrics.csv")
    for png in ("curves.png", "accuracy_test.png", "grid_grpo.png", "grid_cold_start.png"):
        if (run / "grpo" / png).is_file():
            shutil.copy(run / "grpo" / png, out / png)
    print((out / "test_per_count.md").read_text())


if __name__ == "__main__":
    main()
