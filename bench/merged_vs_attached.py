"""How much does folding a LoRA into the base change the evaluated images? (issue 14, defect 2 / item 5)

The experiment's grpo stage used to merge the GRPO LoRA before sampling, while the trainer's per-epoch
evaluation, the widget and infer ran it attached. ``checkpoints.load_policy`` now attaches it everywhere. This
draws the same held-out prompts and seeds both ways and prints how many images differ and the exact-count
accuracy of each, so the change to the figures in results/README.md is measured, not assumed.

    python bench/merged_vs_attached.py --lora runs/<run>/cold_start/lora [--prompts 530] [--images 1]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from grpo_lib.checkpoints import Recipe, load_policy  # noqa: E402
from grpo_lib.evaluate import per_image_table  # noqa: E402
from grpo_lib.prompts import load_rows  # noqa: E402
from grpo_lib.rollout import sample_for_rows  # noqa: E402
from grpo_lib.train import spread_subset  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lora", required=True, help="a TinyPolicy LoRA dir (save_lora)")
    ap.add_argument("--base", default="data/checkpoints/tiny-base")
    ap.add_argument("--prompts", type=int, default=530, help="held-out prompts spread over the test set (0: all)")
    ap.add_argument("--images", type=int, default=1, help="images per prompt")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    rows = spread_subset(load_rows("data/counting/test.jsonl"), a.prompts)
    out = {}
    for name in ("attached", "merged"):
        policy = load_policy(Recipe(Path(a.base), lora=Path(a.lora)))
        if name == "merged":
            policy.merge_lora()
        images, flat = sample_for_rows(policy, rows, images_per_prompt=a.images, num_steps=20, seed=0)
        out[name] = (images, per_image_table(images, flat))
    ia, ta = out["attached"]
    im, tm = out["merged"]
    differ = np.any(ia != im, axis=(1, 2, 3))
    print(f"images: {len(ia)}; differing in any pixel: {int(differ.sum())} ({differ.mean():.1%}); "
          f"max pixel difference {int(np.abs(ia.astype(int) - im.astype(int)).max())}")
    print(f"exact-count accuracy: attached {ta['correct'].mean():.4f}, merged {tm['correct'].mean():.4f}; "
          f"images whose verdict differs: {int((ta['correct'].to_numpy() != tm['correct'].to_numpy()).sum())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
