"""Probe: does the evaluation sampler (ODE steps, schedule shift) change a cold start's val accuracy?

    python results/cold_start_probes_s16/sampler_probe.py <steps> <shift> [lora dir]

840 val images (4 per prompt) at CFG 2 on the val noise seeds, as study compare samples them; the per-image table
goes to runs/s16/sampler/steps<steps>_shift<shift>.csv.
"""
import sys
from pathlib import Path

import torch

from grpo_lib.checkpoints import Recipe
from grpo_lib.prompts import load_rows
from grpo_lib.study import _split_table

torch.set_num_threads(1)
steps, shift = int(sys.argv[1]), float(sys.argv[2])
lora = sys.argv[3] if len(sys.argv) > 3 else "runs/s16/cs_base/cold_start/lora"
table = _split_table(Recipe(base="data/checkpoints/tiny-base", lora=lora), load_rows("data/counting/val.jsonl"),
                     images_per_prompt=4, num_steps=steps, shift=shift, guidance_scale=2.0, split="val")
out = Path("runs/s16/sampler"); out.mkdir(parents=True, exist_ok=True)
table.to_csv(out / f"steps{steps}_shift{shift}.csv", index=False)
print(steps, shift, table["correct"].mean())
