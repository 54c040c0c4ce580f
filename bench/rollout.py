"""Cost of a rollout with log-probs (grpo_lib.rollout.sample_trajectories) against plain Euler sampling.

    .venv/bin/python bench/rollout.py [--batch 16] [--steps 10] [--repeats 7] [--threads 1] [--no-tiny]

Same model, same steps, same batch, same initial noise, both under no_grad, runs interleaved, median
of `--repeats`, measured in one process. The clock is the process CPU time (``time.process_time``):
with one torch thread it is what the work costs, and it does not count the time other processes take
the core away, which on a shared machine swings wall time by +-30 %. Wall time is printed too.
A third line isolates the overhead itself: the same two loops with a zero-cost 'network' (a cached
velocity), giving the rollout's extra milliseconds per step. Target: ratio <= 1.05 (the SDE step,
its noise draw, the log-density and the stored float32 copies must be small next to the network). Models:

* ``conv``: a small conv-net velocity (3 conv layers, 64 channels, 32x32x3, prompt embedding + time FiLM);
* ``tiny``: the embedded world's policy (grpo_lib.policies.tiny.TinyPolicy, a diffusers UNet), if importable.
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch
from torch import nn

from grpo_lib.policies.base import Cond, apply_cfg, images_to_uint8
from grpo_lib.rollout import sample_trajectories
from grpo_lib.sde import convention_times


class ConvPolicy(nn.Module):
    """Small conv-net velocity on 32x32x3 'latents' (implements grpo_lib.policies.base.Policy)."""

    convention = "noise_at_one"
    latent_shape = (3, 32, 32)

    def __init__(self, width: int = 64, vocab_size: int = 16):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, 32)
        self.film = nn.Linear(33, width)
        self.inp = nn.Conv2d(3, width, 3, padding=1)
        self.mid = nn.Conv2d(width, width, 3, padding=1)
        self.out = nn.Conv2d(width, 3, 3, padding=1)
        self.eval()

    device = property(lambda self: self.inp.weight.device)
    dtype = property(lambda self: self.inp.weight.dtype)

    def encode(self, prompts):
        ids = torch.tensor([hash(p) % (self.embed.num_embeddings - 1) + 1 for p in prompts])
        return Cond({"emb": self.embed(ids)}, {"emb": self.embed(torch.zeros_like(ids))})

    def _net(self, x, t, emb):
        h = torch.nn.functional.silu(self.inp(x) + self.film(torch.cat([emb, t[:, None]], 1))[:, :, None, None])
        return self.out(torch.nn.functional.silu(self.mid(h)))

    def velocity(self, x_t, t, cond, guidance_scale=1.0):
        t = torch.as_tensor(t, dtype=torch.float32).expand(x_t.shape[0])
        v = self._net(x_t, t, cond.tensors["emb"])
        if guidance_scale != 1.0:
            v = apply_cfg(self._net(x_t, t, cond.uncond["emb"]), v, guidance_scale)
        return v

    def decode(self, latents):
        return images_to_uint8(latents)

    def trainable_parameters(self):
        return list(self.parameters())

    def reference(self):
        return contextlib.nullcontext()


def plain_euler(policy, cond, x, num_steps, shift, guidance_scale):
    times = convention_times(num_steps, shift, policy.convention)
    b = x.shape[0]
    for i in range(num_steps):
        v = policy.velocity(x, times[i].expand(b), cond, guidance_scale)
        x = x + (times[i + 1] - times[i]) * v
    return x


class CachedVelocity:
    """A zero-cost 'network': returns one precomputed velocity (isolates the sampler's own overhead)."""

    def __init__(self, policy, cond, x0, guidance):
        self.convention, self.latent_shape = policy.convention, policy.latent_shape
        self.device, self.dtype = policy.device, torch.float32
        with torch.no_grad():
            self.v = policy.velocity(x0, 0.5, cond, guidance)

    def velocity(self, x_t, t, cond, guidance_scale=1.0):
        return self.v

    def decode(self, latents):
        return images_to_uint8(latents)


def timed(fn):
    w0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w0, time.process_time() - c0


def compare(policy, cond, x0, args):
    """Interleaved (plain Euler, rollout) timings -> medians of (wall, cpu) for each."""
    gen = torch.Generator().manual_seed(1)
    euler = lambda: plain_euler(policy, cond, x0, args.steps, args.shift, args.guidance)
    roll = lambda: sample_trajectories(policy, cond=cond, num_steps=args.steps, shift=args.shift,
                                       guidance_scale=args.guidance, noise_level=0.7, generator=gen,
                                       initial_latents=x0, decode=False)
    euler(), roll()                                       # warm-up
    te, tr = [], []
    for _ in range(args.repeats):
        te.append(timed(euler))
        tr.append(timed(roll))
    med = lambda xs, k: statistics.median(x[k] for x in xs)
    return (med(te, 0), med(te, 1)), (med(tr, 0), med(tr, 1))


def bench(name, policy, prompts, args):
    with torch.no_grad():
        cond = policy.encode(prompts)
        x0 = torch.randn(len(prompts), *policy.latent_shape, generator=torch.Generator().manual_seed(0))
        (ew, ec), (rw, rc) = compare(policy, cond, x0, args)
        (_, oe), (_, orr) = compare(CachedVelocity(policy, cond, x0, args.guidance), cond, x0, args)
    ratio = rc / ec
    print(f"{name:>5}: batch {len(prompts)} x {tuple(policy.latent_shape)}, {args.steps} steps, cfg {args.guidance}")
    print(f"       CPU time: plain Euler {ec * 1e3:8.1f} ms | rollout with log-probs {rc * 1e3:8.1f} ms | "
          f"ratio {ratio:.3f} ({'OK' if ratio <= 1.05 else 'ABOVE'} target 1.05)")
    print(f"       wall    : plain Euler {ew * 1e3:8.1f} ms | rollout with log-probs {rw * 1e3:8.1f} ms | "
          f"ratio {rw / ew:.3f}")
    per_step = (orr - oe) / args.steps
    print(f"       overhead with a zero-cost network: {per_step * 1e3:.3f} ms/step extra "
          f"= {per_step * args.steps / ec:.4f} of the plain Euler run")
    return ratio


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--shift", type=float, default=3.0)
    ap.add_argument("--guidance", type=float, default=4.5)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-tiny", action="store_true", help="skip the embedded TinyPolicy")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    prompts = [f"prompt {i % 4}" for i in range(args.batch)]
    print(f"median of {args.repeats} interleaved runs, {torch.get_num_threads()} thread(s)")
    bench("conv", ConvPolicy(), prompts, args)
    if not args.no_tiny:
        try:
            from grpo_lib.policies.tiny import TinyPolicy
            tiny = TinyPolicy()
        except Exception as e:  # the embedded policy is another module's; the conv figure stands alone
            print(f" tiny: skipped ({type(e).__name__}: {e})")
            return
        bench("tiny", tiny, ["a photo of three red circles"] * args.batch, args)


if __name__ == "__main__":
    main()
