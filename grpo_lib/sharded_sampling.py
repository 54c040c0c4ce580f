"""Evaluation images sampled by several worker processes: ``sample_for_rows``, split by batch.

    with ShardedSampler(processes=2) as sampler:
        images, flat = sampler.sample(partial(load_policy, recipe), rows, images_per_prompt=4, seed=s)

The work is cut into exactly the batches ``rollout.sample_for_rows`` runs (``batch_size`` consecutive
(prompt, k) pairs), and each batch is sampled by whichever worker is free. Image k of a prompt starts
from the noise of ``eval_seed(seed, prompt, k)`` whoever samples it, and a batch holds the same images
as in one process, so the concatenated result is ``sample_for_rows``'s (exactly, at equal threads per
process; tests/test_sharded_sampling.py).

Why processes and not threads: the tiny UNet is compute-bound, and on 2 cores 2 processes of 1 thread
sample 1.3-1.4x faster than 1 process of 2 threads (results/make_run_s14/). ``processes=1`` samples in
the calling process and starts nothing.

The policy crosses to the workers as ``load``: a picklable zero-argument callable that builds it (a
``functools.partial`` of a module-level function, e.g. ``checkpoints.load_policy`` with a ``Recipe``).
Each worker builds it once per :meth:`ShardedSampler.sample` call, not once per batch.
"""
from __future__ import annotations

import multiprocessing
import uuid
from concurrent.futures import ProcessPoolExecutor
from typing import Callable, Sequence

import numpy as np

_worker_policy: tuple[str, object] | None = None      # (token of the sample() call, its policy), per worker


def _init_worker(threads: int) -> None:
    import torch
    torch.set_num_threads(threads)


def _sample_batch(token: str, load: Callable[[], object], pairs, kwargs: dict) -> np.ndarray:
    """Worker side: build the call's policy on first use, then sample one batch."""
    global _worker_policy
    from .rollout import sample_pairs

    if _worker_policy is None or _worker_policy[0] != token:
        _worker_policy = None                           # free the last call's policy before building this one
        _worker_policy = (token, load())
    return sample_pairs(_worker_policy[1], pairs, **kwargs)


class ShardedSampler:
    """A pool of ``processes`` spawned workers (``threads`` torch threads each) that sample evaluation
    images; a context manager (the pool starts on entry and stops on exit), reusable across stages."""

    def __init__(self, processes: int = 2, threads: int = 1):
        for name, value in (("processes", processes), ("threads", threads)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be an integer >= 1")
        self.processes, self.threads = processes, threads
        self._pool: ProcessPoolExecutor | None = None

    def __enter__(self) -> "ShardedSampler":
        if self.processes > 1:
            # spawn: a fork of a process that has run torch (threads, OpenMP state) is not safe
            self._pool = ProcessPoolExecutor(self.processes, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=_init_worker, initargs=(self.threads,))
        return self

    def __exit__(self, *exc) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None

    def sample(self, load: Callable[[], object], rows: Sequence[dict], *, images_per_prompt: int = 4,
               num_steps: int = 20, shift: float = 1.0, guidance_scale: float = 1.0, seed: int = 0,
               batch_size: int = 64, progress: bool = False) -> tuple[np.ndarray, list[dict]]:
        """``sample_for_rows(load(), rows, ...)``, its batches spread over the workers."""
        from .rollout import eval_pairs, sample_for_rows

        if self.processes == 1:
            return sample_for_rows(load(), rows, images_per_prompt=images_per_prompt, num_steps=num_steps,
                                   shift=shift, guidance_scale=guidance_scale, seed=seed,
                                   batch_size=batch_size, progress=progress)
        if self._pool is None:
            raise RuntimeError("ShardedSampler.sample runs inside `with ShardedSampler(...) as sampler:`")
        flat = eval_pairs(rows, images_per_prompt)
        kwargs = dict(num_steps=num_steps, shift=shift, guidance_scale=guidance_scale, seed=seed)
        token = uuid.uuid4().hex
        futures = [self._pool.submit(_sample_batch, token, load, flat[i:i + batch_size], kwargs)
                   for i in range(0, len(flat), batch_size)]
        if progress:
            from concurrent.futures import as_completed

            from tqdm.auto import tqdm
            for _ in tqdm(as_completed(futures), total=len(futures), desc="evaluation images", leave=False):
                pass
        return np.concatenate([f.result() for f in futures]), [r for r, _ in flat]
