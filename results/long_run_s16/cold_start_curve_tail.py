import pandas as pd, torch
torch.set_num_threads(1)
from pathlib import Path
from grpo_lib.study import _split_table, _accuracy
from grpo_lib.checkpoints import Recipe
from grpo_lib.prompts import load_rows
run = Path("runs/long-nft-s16/cold_start"); rows = load_rows("data/counting/val.jsonl")
hist = pd.read_csv(run / "loss.csv"); out = []
for step in (5500, 6500):
    t = _split_table(Recipe(base="data/checkpoints/tiny-base", lora=run / f"checkpoints/step_{step:06d}/lora"), rows,
                     images_per_prompt=1, num_steps=20, shift=1.0, guidance_scale=2.0, seed=0)
    m = float(hist.loc[hist["step"] <= step, "elapsed_s"].max()) / 60
    out.append({"step": step, "minutes": round(m, 2), **_accuracy(t)}); print(out[-1], flush=True)
pd.DataFrame(out).to_csv("runs/s16/long_cs_curve_b.csv", index=False)
