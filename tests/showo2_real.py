"""Builds a TINY, randomly initialised Show-o2 from the REAL modeling code (a vendored ``show-o2/models``).

Everything is written offline into a temp dir, in the layout ``ShowO2Policy.from_showo2_params`` loads:

| piece        | what is written                                                                  |
|--------------|----------------------------------------------------------------------------------|
| ``qwen/``    | a Qwen2 config (2 layers, width 64) and a word-level tokenizer with Qwen2.5's special tokens, built from an in-memory vocabulary (no hub) |
| ``siglip/``  | Show-o2's own ``SiglipModel`` at a small config (2 vision layers, width 32), ``save_pretrained`` |
| ``ckpt/``    | ``Showo2Qwen2_5(...).save_pretrained`` (config.json + pytorch_model.bin): the real class, whose flow head is built at Show-o2's fixed head width (``DiffusionHeadConfig()``: 2048, one block here) |
| ``Wan2.1_VAE.pth`` | a random state dict of the real ``WanVAE_`` at Show-o2's fixed size (z_dim 16) |

The checkout is the vendored snapshot beside the repository (``../shared/vendor/show-o2``, a test
fixture, not project code) or the directory named by ``GRPO_SHOWO2_CHECKOUT``.

Two deliberate choices, both as in a real checkpoint: (1) the LLM's embedding (64 rows) is longer than
the tokenizer (31 tokens), as Qwen2.5's 151,936 rows are longer than its tokenizer; with a tokenizer
longer than the embedding, ``from_pretrained`` grows the embedding under ``low_cpu_mem_usage`` (meta
tensors) and transformers' mean-resizing fails (``Tensor.item() cannot be called on meta tensors``).
(2) Show-o2 zero-initialises the flow head's output layers (``reset_parameters``), so a fresh model
predicts v = 0 everywhere; a trained head is not zero, so those layers get small random weights here.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
CHECKOUT_ENV = "GRPO_SHOWO2_CHECKOUT"
DEFAULT_CHECKOUT = REPO.parent / "shared" / "vendor" / "show-o2"

# latent 16 x 8 x 8 (resolution 64 / VAE 8), 2x2 patches -> 16 tokens + 1 time token; text <= 11 tokens
RESOLUTION = 64
MAX_SEQ_LEN = 32
LLM_WIDTH = 64
LLM_EMBEDDING_ROWS = 64
WORDS = ("a photo of one two three four five six seven eight nine ten red blue green yellow circles squares "
         "triangles cats dogs").split()
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                 "<|image_pad|>", "<|video_pad|>"]


def showo2_checkout() -> Path:
    """The Show-o2 checkout the real-code tests run against; ValueError saying how to provide one."""
    path = Path(os.environ.get(CHECKOUT_ENV) or DEFAULT_CHECKOUT)
    if not (path / "models" / "modeling_showo2_qwen2_5.py").is_file():
        raise ValueError(f"no Show-o2 checkout at {str(path)!r} (models/modeling_showo2_qwen2_5.py missing): "
                         f"put the vendored snapshot at {DEFAULT_CHECKOUT} or set {CHECKOUT_ENV}")
    return path


@dataclass
class TinyShowO2:
    repo: Path          # the show-o2 folder (holding models/)
    checkpoint: Path
    llm_path: Path
    vae_path: Path


def write_tokenizer_and_llm_config(directory: Path) -> None:
    """A Qwen2 config and a word-level fast tokenizer with Qwen2.5's special tokens, from memory."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config

    vocab = {w: i for i, w in enumerate(["[UNK]"] + QWEN_SPECIALS + list(WORDS))}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", eos_token="<|im_end|>",
                                  additional_special_tokens=QWEN_SPECIALS)
    tok.save_pretrained(directory)
    Qwen2Config(vocab_size=LLM_EMBEDDING_ROWS, hidden_size=LLM_WIDTH, intermediate_size=2 * LLM_WIDTH,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                tie_word_embeddings=True).save_pretrained(directory)


def make_tiny_showo2(root: Path, mods, *, seed: int = 0, head_init_std: float = 0.02) -> TinyShowO2:
    """Write the tiny Show-o2 installation under ``root``; ``mods`` = ``load_showo2_modules(checkout)``."""
    import importlib

    from transformers import SiglipConfig

    root = Path(root)
    siglip_mod = importlib.import_module(mods.models.__name__ + ".modeling_siglip")
    wan_mod = importlib.import_module(mods.models.__name__ + ".wan21_vae")
    torch.manual_seed(seed)
    llm = root / "qwen"
    write_tokenizer_and_llm_config(llm)
    tokenizer = mods.get_text_tokenizer(str(llm), add_showo_tokens=True, llm_name="qwen2_5")
    assert len(tokenizer) <= LLM_EMBEDDING_ROWS, "the embedding must hold the tokenizer (module docstring, 1)"
    # 16 SigLIP positions (image 16 / patch 4) = the 4x4 patch grid: Show-o2's fixed-resolution branch
    siglip = SiglipConfig(
        text_config=dict(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=16),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=16, patch_size=4))
    siglip_mod.SiglipModel(siglip).save_pretrained(root / "siglip")
    grid = RESOLUTION // 8 // 2
    model = mods.Showo2Qwen2_5(
        llm_vocab_size=LLM_EMBEDDING_ROWS, llm_model_path=str(llm), load_from_showo=True, image_latent_dim=16,
        image_latent_height=grid, image_latent_width=grid, video_latent_height=grid, video_latent_width=grid,
        patch_size=2, hidden_size=LLM_WIDTH, clip_latent_dim=32, num_diffusion_layers=1, add_time_embeds=True,
        clip_pretrained_model_path=str(root / "siglip"))
    with torch.no_grad():   # module docstring, 2: un-zero the head's output layers
        for name, q in model.named_parameters():
            if name.startswith(("diffusion_head_", "time_embed")) and not q.any():
                q.normal_(0.0, head_init_std)
    model.save_pretrained(root / "ckpt", safe_serialization=False)
    vae = wan_mod.WanVAE_(dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                          temperal_downsample=[False, True, True], dropout=0.0)
    torch.save(vae.state_dict(), root / "Wan2.1_VAE.pth")
    return TinyShowO2(mods.root, root / "ckpt", llm, root / "Wan2.1_VAE.pth")
