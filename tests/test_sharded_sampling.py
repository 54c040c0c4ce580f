"""grpo_lib.sharded_sampling: evaluation images sampled on several processes are the one-process images."""
from __future__ import annotations

import sys
from dataclasses import replace
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_checkpoints import ema_run  # noqa: E402,F401  (fixture: a GRPO run with a cold start and a checkpoint)

from grpo_lib.policies.tiny import TinyConfig, TinyPolicy  # noqa: E402
from grpo_lib.prompts import counting_row  # noqa: E402
from grpo_lib.rollout import sample_for_rows  # noqa: E402
from grpo_lib.sharded_sampling import ShardedSampler  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")      # the workers run 1 thread each, as this process then
TINY = partial(TinyPolicy, TinyConfig(block_out_channels=(16, 32, 32), text_dim=32, text_layers=1), seed=0)
ROWS = [counting_row(obj, n) for obj, n in (("red circle", 1), ("blue square", 3), ("green triangle", 5))]
KW = dict(images_per_prompt=3, num_steps=3, guidance_scale=2.0, seed=11, batch_size=4)


def test_two_processes_return_the_one_process_images_in_order():
    """9 images in batches of 4, 4 and 1, spread over 2 workers: the same batches with the same noise, so the
    same pixels, concatenated in prompt-major order."""
    expected, flat = sample_for_rows(TINY(), ROWS, **KW)
    with ShardedSampler(processes=2) as sampler:
        images, rows = sampler.sample(TINY, ROWS, **KW)
        again, _ = sampler.sample(TINY, ROWS[1:], **KW)          # the pool is reused; a new call, a new policy
    assert rows == flat == [r for r in ROWS for _ in range(3)]
    np.testing.assert_array_equal(images, expected)
    np.testing.assert_array_equal(again, expected[3:])
    assert np.abs(expected[0].astype(int) - expected[1].astype(int)).max() > 10    # the images do differ


def test_one_process_starts_no_pool_and_bad_values_are_named():
    with ShardedSampler(processes=1) as sampler:
        assert sampler._pool is None
        images, _ = sampler.sample(TINY, ROWS[:1], **KW)
    np.testing.assert_array_equal(images, sample_for_rows(TINY(), ROWS[:1], **KW)[0])
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match=f"processes={bad!r} must be an integer >= 1"):
            ShardedSampler(processes=bad)
    with pytest.raises(ValueError, match="threads=0 must be an integer >= 1"):
        ShardedSampler(processes=2, threads=0)
    with pytest.raises(RuntimeError, match="inside `with ShardedSampler"):
        ShardedSampler(processes=2).sample(TINY, ROWS, **KW)
    with ShardedSampler(processes=2) as sampler, pytest.raises(ValueError, match="images_per_prompt=0"):
        sampler.sample(TINY, ROWS, **{**KW, "images_per_prompt": 0})


def test_experiment_final_evaluation_on_two_processes_matches_one(ema_run):
    """Notebook 02's final table with final_eval_processes=2: every stage's per-image table (found counts and
    quality measures) equals the one-process table."""
    from grpo_lib.experiment import CountingExperiment

    _, p = ema_run
    p = replace(p, final_max_prompts=4, final_images_per_prompt=2)
    one = CountingExperiment(p).evaluate("test", progress=False)
    two = CountingExperiment(replace(p, final_eval_processes=2)).evaluate("test", progress=False)
    assert list(two) == ["base", "cold_start", "grpo", "renderer"] and len(two["grpo"]) == 8
    for stage in one:
        pd.testing.assert_frame_equal(two[stage], one[stage])
    with pytest.raises(ValueError, match="final_eval_processes=0 must be >= 1"):
        replace(p, final_eval_processes=0)
