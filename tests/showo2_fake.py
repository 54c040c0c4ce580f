"""Builds a FAKE Show-o2 installation in a temp dir: checkout (tests/fake_showo2), tokenizer dir, checkpoint, VAE file."""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

FAKE_CHECKOUT = Path(__file__).parent / "fake_showo2"

# latent 4 x 8 x 8 (resolution 64 / VAE 8), patches 2x2 -> 16 tokens + 1 time token; text <= 11 tokens
FAKE_RESOLUTION = 64
FAKE_MAX_SEQ_LEN = 32


@dataclass
class FakeShowO2:
    repo: Path          # the clone (holding show-o2/)
    checkpoint: Path
    llm_path: Path
    vae_path: Path


def make_fake_showo2(root: Path, *, seed: int = 0, latent_channels: int = 4) -> FakeShowO2:
    root = Path(root)
    repo = root / "Show-o"
    shutil.copytree(FAKE_CHECKOUT, repo, ignore=shutil.ignore_patterns("__pycache__"))
    llm = root / "qwen"
    llm.mkdir()
    (llm / "fake_tokenizer.json").write_text(json.dumps({"vocab_size": 64}))
    ckpt = root / "show-o2-fake"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps({"llm_vocab_size": 64, "image_latent_dim": latent_channels,
                                                  "patch_size": 2, "hidden_size": 32, "seed": seed}))
    vae = root / "Wan2.1_VAE.pth"
    g = torch.Generator().manual_seed(seed + 1)
    torch.save({"proj": torch.randn(3, latent_channels, generator=g)}, vae)
    return FakeShowO2(repo, ckpt, llm, vae)
