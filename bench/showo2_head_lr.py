"""Which learning rate makes head-only training of the tiny stand-in move the policy as much as LoRA does?

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/showo2_head_lr.py [--model data/checkpoints/tiny-base]

The Show-o2 write-up trains its 0.8B flow head's own weights at lr 5e-6. For the embedded stand-in
(params/02_counting_grpo__showo2_convention.yaml: the tiny UNet's up path as the "head", the text
encoder and down path frozen) a learning rate is needed that is neither a no-op nor a blow-up. The
criterion here: one real AdamW step on the GRPO policy gradient (on-policy, ratio = 1, random
advantages) should change the SDE step means mu by the same amount, in units of the step's std s,
as one step of the default experiment's LoRA (r 16, alpha 16, lr 1e-4) does. Then the ratios
rho = exp(log p_new - log p_old) deviate from 1 by similar amounts and ``clip_range`` / ``beta``
tuned on the LoRA run keep their meaning. Adam's first step moves every weight by about lr
(m/sqrt(v) = +-1), so the change is linear in lr; the script checks that at two rates.

Prints, per trainable set: trainable parameter count, RMS weight, RMS(delta mu)/s over the trained
steps (drop_ends of 12), mean |delta log p| (compare with clip_range 1e-4), and the head lr that
matches the LoRA run. Without --model (the shipped base is still training) it uses a random tiny
policy with the base's architecture, which is only indicative: rerun on the base checkpoint.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from grpo_lib.grpo import select_timesteps
from grpo_lib.policies.tiny import TinyConfig, TinyPolicy
from grpo_lib.rollout import recompute_log_prob, sample_trajectories
from grpo_lib.policies.base import select_trainable

HEAD_PATTERN = r"pattern:^unet\.(up_blocks|conv_norm_out|conv_out)\."


def make_policy(model: str | None) -> TinyPolicy:
    if model:
        return TinyPolicy.from_pretrained(model, convention="noise_at_zero")
    return TinyPolicy(TinyConfig(), convention="noise_at_zero", train_text_encoder=False, seed=0)


def step_effect(model, mode: str, lr: float, traj, cols: list[int], adv: torch.Tensor) -> dict:
    policy = make_policy(model)
    if mode == "lora":
        policy.add_lora({"r": 16, "lora_alpha": 16})
    else:
        select_trainable(policy, HEAD_PATTERN)
    params = [q for q in policy.trainable_parameters() if q.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    with torch.no_grad():
        before = [recompute_log_prob(policy, traj, c) for c in cols]
    loss = 0.0
    for c in cols:   # GRPO's on-policy loss: -A * rho with rho = 1, i.e. the gradient of -A log p
        loss = loss + -(adv * recompute_log_prob(policy, traj, c).log_prob).mean() / len(cols)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    with torch.no_grad():
        after = [recompute_log_prob(policy, traj, c) for c in cols]
    dmu = torch.stack([((a.mean - b.mean) / b.std[:, None, None, None]).pow(2).mean() for a, b in zip(after, before)])
    dlp = torch.stack([(a.log_prob - b.log_prob).abs().mean() for a, b in zip(after, before)])
    n = sum(q.numel() for q in params)
    rms_w = torch.sqrt(sum((q.detach() ** 2).sum() for q in params) / n)
    return {"params": n, "rms_weight": float(rms_w), "dmu_over_s": float(dmu.mean().sqrt()),
            "dlogp": float(dlp.mean())}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="tiny base checkpoint dir (default: random tiny policy)")
    ap.add_argument("--prompts", default="data/counting/train.jsonl")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lora-lr", type=float, default=1e-4)
    ap.add_argument("--head-lrs", type=float, nargs="+", default=[1e-5, 3e-5])
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.model and not Path(args.model).is_dir():
        raise SystemExit(f"--model {args.model!r} is not a directory")
    rows = [json.loads(line) for line in Path(args.prompts).read_text().splitlines()[: args.batch]]
    base = make_policy(args.model)
    gens = [torch.Generator().manual_seed(i) for i in range(args.batch)]
    traj = sample_trajectories(base, [r["prompt"] for r in rows], num_steps=12, shift=1.0, noise_level=0.5,
                               generator=gens, decode=False)
    cols = select_timesteps("drop_ends", traj.num_stored, 1)[0].tolist()
    adv = torch.randn(args.batch, generator=torch.Generator().manual_seed(1))
    adv = (adv - adv.mean()) / adv.std()
    print(f"policy: {args.model or 'random tiny (base architecture)'}; batch {args.batch}, 12 steps, a=0.5, "
          f"trained steps {cols[0]}..{cols[-1]}")
    lora = step_effect(args.model, "lora", args.lora_lr, traj, cols, adv)
    print(f"LoRA r16  lr {args.lora_lr:g}: params {lora['params']}, RMS(dmu)/s {lora['dmu_over_s']:.3e}, "
          f"|dlogp| {lora['dlogp']:.3e}")
    for lr in args.head_lrs:
        head = step_effect(args.model, "head", lr, traj, cols, adv)
        match = lr * lora["dmu_over_s"] / head["dmu_over_s"]
        print(f"head (up path) lr {lr:g}: params {head['params']}, RMS weight {head['rms_weight']:.3g} "
              f"(relative step lr/RMS {lr / head['rms_weight']:.2e}), RMS(dmu)/s {head['dmu_over_s']:.3e}, "
              f"|dlogp| {head['dlogp']:.3e} -> lr matching the LoRA step: {match:.2e}")
    print("Show-o2 write-up for comparison: lr 5e-6 on a head with weights of RMS ~2e-2 -> relative step ~2.5e-4")


if __name__ == "__main__":
    main()
