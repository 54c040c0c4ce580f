"""Seeds that do not depend on Python's hash randomisation, on batching or on the process split.

One hash serves every keyed stream of the package:

    stable_seed(key, bits) = int(blake2b_64(key), little endian) mod 2^bits

| caller                       | key                                   | bits | stream                                   |
|------------------------------|---------------------------------------|------|------------------------------------------|
| :func:`sample_seed`          | ``"{seed}/{epoch}/{index}/{stream}"`` | 63   | training samples (rollouts, timesteps, ...)|
| ``rollout.eval_seed``        | ``"{seed}/{k}/{prompt}"``             | 63   | evaluation image k of a prompt            |
| ``scenes._SceneDataset``     | ``repr((seed, idx))``                 | 47   | rendered scene ``idx``                    |

The keys are those each caller has always used, so every seed (and every figure built on one) is unchanged.
"""
from __future__ import annotations

import hashlib


def stable_seed(key: str, bits: int = 63) -> int:
    """A non-negative seed < 2**bits from the 8-byte blake2b digest of ``key``."""
    if not 1 <= bits <= 63:
        raise ValueError(f"bits={bits} must be in [1, 63] (torch seeds are signed 64-bit)")
    h = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << bits) - 1)


def sample_seed(seed: int, epoch: int, index: int, stream: str) -> int:
    """Seed of one sample's randomness, independent of how samples are split over processes."""
    return stable_seed(f"{seed}/{epoch}/{index}/{stream}")
