"""Pretrain the embedded world's base model (``TinyPolicy``) on web-captioned scenes by flow matching.

Rectified-flow loss (SD3 / Esser et al. 2024) with logit-normal timestep sampling, both from
``grpo_lib.flow_matching`` (``flow_matching_loss`` through the policy's ``encode`` / ``velocity``, so the text
encoder trains too: without a LoRA, ``TinyPolicy.encode`` keeps gradients when ``train_text_encoder``):

    t = sigmoid(m + s n),  n ~ N(0, 1);    x_t = (1 - t) x_0 + t eps;    L = || v_theta(x_t, t | c) - (eps - x_0) ||^2

| code                     | symbol                                                           |
|--------------------------|------------------------------------------------------------------|
| ``x0``                   | x_0, a rendered scene in [-1, 1] (B, 3, 32, 32)                   |
| ``eps``                  | eps ~ N(0, I)                                                     |
| ``t``                    | t (= sigma, noise_at_one), logit-normal(m=``logit_mean``, s=``logit_std``) |
| ``target``               | eps - x_0, the rectified-flow velocity                            |
| ``caption_dropout``      | p(c = "") so classifier-free guidance works at sampling time     |
| ``ema_decay``            | EMA weights theta_ema <- d theta_ema + (1 - d) theta (shipped)   |

Data: ``scenes.WebCaptionDataset`` (all 18 classes, counts 1..``max_count``; captions carry the exact
number only for N <= 3), pre-rendered once into a uint8 pool (cached under ``run_dir``) so the two
CPU cores train instead of render; random horizontal flips (every shape is mirror-symmetric).

Schedule: AdamW, linear warmup then cosine decay to ``min_lr_ratio`` * lr over a progress
p = max(step / max_steps, elapsed / budget), so a run that is slower than planned still anneals
before the time budget stops it. Checkpoints (``run_dir/ckpt.pt``, plain state read with
``weights_only=True``, + an EMA export ``run_dir/ema``) are written atomically every ``checkpoint_every`` steps; ``resume`` continues from them.

    python -m grpo_lib.pretrain params/pretrain__tiny_base.yaml
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from grpo_lib.params import check_knobs


@dataclass
class PretrainParams:
    run_dir: str = "runs/pretrain_tiny"          # checkpoints, log.csv, pool cache, EMA export
    out_dir: str = ""                            # where the final EMA model is saved ("" = run_dir/final)
    seed: int = 0                                # torch / numpy seed
    pool_size: int = 50000                       # pre-rendered WebCaptionDataset scenes
    max_count: int = 10                          # counts 1..max_count in the pool
    batch_size: int = 32                         # images per step
    lr: float = 5e-4                             # peak AdamW learning rate
    weight_decay: float = 0.01                   # AdamW weight decay
    warmup_steps: int = 200                      # linear warmup steps
    max_steps: int = 20000                       # step cap (the time budget usually stops first)
    time_budget_minutes: float = 50.0            # training stops cleanly after this much wall time
    min_lr_ratio: float = 0.05                   # cosine floor as a fraction of lr
    ema_decay: float = 0.999                     # EMA decay (with the usual (1+n)/(10+n) warmup)
    caption_dropout: float = 0.1                 # p(caption -> "") for CFG
    logit_mean: float = 0.0                      # m of SD3's logit-normal t
    logit_std: float = 1.0                       # s of SD3's logit-normal t
    hflip: bool = True                           # random horizontal flips
    grad_clip: float = 1.0                       # max grad norm (0 = off)
    num_threads: int = 2                         # torch.set_num_threads
    log_every: int = 50                          # steps per log.csv row
    checkpoint_every: int = 500                  # steps per atomic checkpoint + EMA export
    resume: bool = True                          # continue from run_dir/ckpt.pt if present
    block_out_channels: list[int] = field(default_factory=lambda: [16, 32, 64])      # UNet widths
    cross_attn_levels: list[bool] = field(default_factory=lambda: [False, False, True])  # attention levels
    layers_per_block: int = 1                    # resnets per UNet level
    text_dim: int = 64                           # text token width == cross_attention_dim
    text_layers: int = 2                         # text transformer layers

    def __post_init__(self):
        check_knobs(self)
        for name in ("pool_size", "max_steps", "log_every", "checkpoint_every", "num_threads",
                     "layers_per_block", "text_dim", "text_layers", "max_count"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be positive")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps={self.warmup_steps} must be >= 0")
        for name in ("time_budget_minutes", "logit_std"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}={getattr(self, name)} must be > 0")
        for name in ("caption_dropout", "min_lr_ratio"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be in [0, 1)")
        if self.grad_clip < 0:
            raise ValueError(f"grad_clip={self.grad_clip} must be >= 0")

    def tiny_config(self):
        from .policies.tiny import TinyConfig

        return TinyConfig(block_out_channels=tuple(self.block_out_channels),
                          cross_attn_levels=tuple(self.cross_attn_levels), layers_per_block=self.layers_per_block,
                          text_dim=self.text_dim, text_layers=self.text_layers)


# ------------------------------------------------------------------------------------------ data
def render_pool(size: int, seed: int, max_count: int = 10, cache: Path | None = None, progress: bool = True):
    """``size`` WebCaptionDataset scenes as uint8 (N, 32, 32, 3) + captions + counts (cached in ``cache``)."""
    from tqdm.auto import tqdm

    from .scenes import WebCaptionDataset

    if cache is not None and cache.is_file():
        z = np.load(cache, allow_pickle=False)
        if z["images"].shape[0] == size:
            return z["images"], [str(c) for c in z["captions"]], z["counts"]
    ds = WebCaptionDataset(size, seed=seed, max_count=max_count)
    images = np.empty((size, 32, 32, 3), np.uint8)
    captions, counts = [], np.empty(size, np.int16)
    for i in tqdm(range(size), desc="render pool", disable=not progress, mininterval=5):
        item = ds[i]
        images[i] = np.rint((item["pixels"].transpose(1, 2, 0) + 1.0) * 127.5).astype(np.uint8)
        captions.append(item["prompt"])
        counts[i] = item["count"]
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp.npz")
        np.savez(tmp, images=images, captions=np.array(captions), counts=counts)
        os.replace(tmp, cache)
    return images, captions, counts


def lr_factor(step: int, elapsed: float, p: PretrainParams) -> float:
    warm = min(1.0, (step + 1) / p.warmup_steps) if p.warmup_steps else 1.0
    progress = min(1.0, max(step / p.max_steps, elapsed / (60.0 * p.time_budget_minutes)))
    return warm * (p.min_lr_ratio + (1 - p.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


# ------------------------------------------------------------------------------------------ loop
def pretrain(p: PretrainParams, progress: bool = True, stop_at: int | None = None) -> Path:
    """Run (or resume) pretraining; returns the directory of the exported EMA model.

    ``stop_at`` ends this session after that many total steps, as an interruption would (a checkpoint is
    written, nothing is exported); the tests use it to check that ``resume`` continues bit for bit.
    """
    from tqdm.auto import tqdm

    from .checkpoints import load_state, save_state
    from .flow_matching import flow_matching_loss, sample_timesteps
    from .sde import draw_noise
    from .params import to_dict
    from .policies.tiny import TinyPolicy

    torch.set_num_threads(p.num_threads)
    run = Path(p.run_dir)
    run.mkdir(parents=True, exist_ok=True)
    (run / "params.json").write_text(json.dumps(to_dict(p), indent=1))
    images, captions, _ = render_pool(p.pool_size, p.seed, p.max_count, run / f"pool_{p.pool_size}_{p.seed}.npz",
                                      progress)
    pool = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()   # (N, 3, 32, 32) uint8

    torch.manual_seed(p.seed)
    policy = TinyPolicy(p.tiny_config(), train_text_encoder=True, seed=p.seed)
    policy.train()
    params = [q for q in policy.parameters() if q.requires_grad]
    ema = [q.detach().clone() for q in params]
    opt = torch.optim.AdamW(params, lr=p.lr, weight_decay=p.weight_decay)
    rng = np.random.default_rng(p.seed)
    gen = torch.Generator().manual_seed(p.seed)
    step, elapsed = 0, 0.0
    ckpt = run / "ckpt.pt"
    if p.resume and ckpt.is_file():
        state = load_state(ckpt)                     # weights_only=True: plain data only
        policy.load_state_dict(state["model"])
        for e, s in zip(ema, state["ema"]):
            e.copy_(s)
        opt.load_state_dict(state["opt"])
        step, elapsed = state["step"], state["elapsed"]
        rng.bit_generator.state = state["np_rng"]
        gen.set_state(state["torch_rng"])
        print(f"resumed from {ckpt} at step {step} ({elapsed / 60:.1f} min)", flush=True)

    def export_ema(directory: Path) -> None:
        backup = [q.detach().clone() for q in params]
        with torch.no_grad():
            for q, e in zip(params, ema):
                q.copy_(e)
        policy.save_pretrained(directory)
        with torch.no_grad():
            for q, b in zip(params, backup):
                q.copy_(b)

    def checkpoint() -> None:
        save_state({"model": policy.state_dict(), "ema": ema, "opt": opt.state_dict(), "step": step,
                            "elapsed": elapsed, "np_rng": rng.bit_generator.state, "torch_rng": gen.get_state(),
                            "params": to_dict(p)}, ckpt)
        export_ema(run / "ema")

    log_path = run / "log.csv"
    new_log = not log_path.is_file() or step == 0
    log_f = open(log_path, "w" if new_log else "a", newline="")
    writer = csv.writer(log_f)
    if new_log:
        writer.writerow(["step", "elapsed_min", "loss", "lr", "img_per_s"])
    budget = 60.0 * p.time_budget_minutes
    bar = tqdm(total=p.max_steps, initial=step, desc="pretrain", disable=not progress, mininterval=10)
    t_start, losses, t_log = time.time() - elapsed, [], time.time()
    while step < p.max_steps and elapsed < budget:
        idx = torch.from_numpy(rng.integers(0, len(pool), size=p.batch_size))
        x0 = pool[idx].float() / 127.5 - 1.0                              # (B, 3, 32, 32)
        if p.hflip:
            flip = torch.from_numpy(rng.random(p.batch_size) < 0.5)
            x0[flip] = x0[flip].flip(-1)
        drop = rng.random(p.batch_size) < p.caption_dropout
        caps = ["" if d else captions[i] for d, i in zip(drop, idx.tolist())]
        t = sample_timesteps(p.batch_size, gen, p.logit_mean, p.logit_std)     # logit-normal, noise_at_one
        eps = draw_noise(x0.shape, gen, "cpu")
        for g in opt.param_groups:
            g["lr"] = p.lr * lr_factor(step, elapsed, p)
        loss = flow_matching_loss(policy, x0, policy.encode(caps), t=t, noise=eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if p.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, p.grad_clip)
        opt.step()
        d = min(p.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema, [q.detach() for q in params], 1 - d)
        step += 1
        elapsed = time.time() - t_start
        losses.append(loss.item())
        bar.update(1)
        if step % p.log_every == 0:
            now = time.time()
            writer.writerow([step, f"{elapsed / 60:.2f}", f"{np.mean(losses):.5f}",
                             f"{opt.param_groups[0]['lr']:.3e}", f"{len(losses) * p.batch_size / (now - t_log):.1f}"])
            log_f.flush()
            bar.set_postfix(loss=f"{np.mean(losses):.4f}")
            losses, t_log = [], now
        if step % p.checkpoint_every == 0:
            checkpoint()
        if stop_at is not None and step >= stop_at:
            break
    bar.close()
    checkpoint()
    log_f.close()
    if stop_at is not None and step >= stop_at and step < p.max_steps:
        return run / "ema"
    out = Path(p.out_dir) if p.out_dir else run / "final"
    export_ema(out)
    (out / "training.json").write_text(json.dumps({"steps": step, "train_minutes": round(elapsed / 60, 2),
                                                   "params": to_dict(p)}, indent=1))
    print(f"done: {step} steps in {elapsed / 60:.1f} min; EMA model -> {out}", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    from .params import load_params_with_set

    ap = argparse.ArgumentParser(description="Pretrain the embedded base model (TinyPolicy)")
    ap.add_argument("params", help="params/pretrain__<exp>.yaml")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override params (YAML values)")
    args = ap.parse_args(argv)
    p = load_params_with_set(args.params, None, args.set)
    pretrain(p, progress=sys.stderr.isatty() or True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
