"""Throughput of the embedded TinyPolicy on this CPU: pretraining (images/s) and ODE sampling (images/s, 20 steps).

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/tiny_speed.py [--model data/checkpoints/tiny-base] [--threads 2] \
        [--memory-format channels_last|contiguous]

Prints one line per figure. Numbers depend heavily on what else runs on the machine (the cores are
shared); the CPU-seconds column is the less noisy one.
"""
from __future__ import annotations

import argparse
import time

import torch

from grpo_lib.base_card import sample_images
from grpo_lib.policies.tiny import TinyPolicy
from grpo_lib.flow_matching import flow_matching_loss, sample_timesteps


def _timed(fn, repeats: int) -> tuple[float, float]:
    fn()                                                   # warm-up
    w, c = time.perf_counter(), time.process_time()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - w) / repeats, (time.process_time() - c) / repeats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="a saved TinyPolicy (default: a fresh default-config one)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--memory-format", choices=("channels_last", "contiguous"), default="channels_last",
                    help="layout of the UNet's weights (TinyPolicy's own: channels_last)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    policy = TinyPolicy.from_pretrained(args.model, train_text_encoder=True) if args.model else TinyPolicy()
    policy.unet.to(memory_format={"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}[
        args.memory_format])
    n_params = sum(p.numel() for p in policy.unet.parameters())
    print(f"TinyPolicy UNet {n_params / 1e6:.2f}M params, blocks {policy.config.block_out_channels}, "
          f"threads {args.threads}, batch {args.batch}, {args.memory_format} weights")

    B = args.batch
    policy.train()
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-4)
    x0 = torch.rand(B, 3, 32, 32) * 2 - 1
    caps = ["a photo of three red circles", "several blue squares"] * (B // 2) + ["one green triangle"] * (B % 2)

    def train_step():
        loss = flow_matching_loss(policy, x0, policy.encode(caps), t=sample_timesteps(B), noise=torch.randn_like(x0))
        opt.zero_grad()
        loss.backward()
        opt.step()

    wall, cpu = _timed(train_step, args.repeats)
    print(f"pretrain step: {wall * 1e3:.0f} ms wall ({cpu * 1e3:.0f} ms CPU)  ->  {B / wall:.0f} images/s")

    policy.eval()
    policy.add_lora({"r": 16, "lora_alpha": 16})             # the cold start's and RL's trainable weights
    opt = torch.optim.AdamW(policy.trainable_parameters(), lr=1e-4)
    wall, cpu = _timed(train_step, args.repeats)
    print(f"LoRA r16 step: {wall * 1e3:.0f} ms wall ({cpu * 1e3:.0f} ms CPU)  ->  {B / wall:.0f} images/s")

    for g in (1.0, 3.0):
        wall, cpu = _timed(lambda: sample_images(policy, caps, steps=20, guidance_scale=g, batch_size=B), 2)
        print(f"sampling, 20 Euler steps, CFG {g:g}: {wall:.2f} s per {B} images wall ({cpu:.2f} s CPU)  ->  "
              f"{B / wall:.0f} images/s")


if __name__ == "__main__":
    main()
