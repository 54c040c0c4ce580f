"""Tiny, randomly initialised SD3 pipeline built offline from configs (a helper for tests, not a test).

Every part of ``StableDiffusion3Pipeline`` is built from a small config with a fixed seed, including
the tokenizers, which come from in-memory vocabularies (stack_notes.md §2):

| component        | tiny config                                                         |
|------------------|---------------------------------------------------------------------|
| CLIP-L, CLIP-G   | ``CLIPTextModelWithProjection`` hidden 32, projection 32, 2 layers  |
| CLIP tokenizers  | byte-level BPE over the 256 byte symbols (+ ``</w>`` forms), no merges |
| T5               | ``T5EncoderModel`` d_model 64, 1 layer; unigram tokenizer over a-z A-Z 0-9 |
| VAE              | ``AutoencoderKL`` 3 blocks (scale factor 4), 4 latent channels, SD3's shift/scale |
| MMDiT            | ``SD3Transformer2DModel`` 2 layers, 4 heads x 8, patch 2            |
| scheduler        | ``FlowMatchEulerDiscreteScheduler(shift=3.0)`` as SD3.5-Medium      |

The pipeline is saved with ``save_pretrained`` *before* any adapter is attached (a pipeline saved
with a peft adapter reloads with re-initialised attention weights, stack_notes §2 pitfall 3), so
tests load it through the same ``from_pretrained`` path a GPU user takes with the hub checkpoint.

Use ``build_tiny_sd3(dir)`` from a session-scoped fixture; it takes well under a second.
"""
from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

# 64x64 images -> 16x16 latents (VAE scale factor 4) -> 8x8 = 64 image tokens (patch 2)
TINY_HEIGHT = 64
TINY_WIDTH = 64
TINY_MAX_SEQUENCE_LENGTH = 16  # T5 tokens; CLIP always gives 77


def _clip_tokenizer():
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    # byte-level BPE: every byte symbol and its end-of-word form, no merges, so any text tokenises
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    # model_max_length is required: without it padding="max_length" in the pipeline breaks (pitfall 5)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77), len(vocab)


def _t5_tokenizer():
    from transformers import T5TokenizerFast

    chars = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?'-"
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)] + [(c, -3.0) for c in chars]
    return T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=512)


def build_tiny_sd3_pipeline(seed: int = 0):
    """A tiny random ``StableDiffusion3Pipeline`` (every module in eval mode, no adapter attached)."""
    from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                           StableDiffusion3Pipeline)
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    clip_tok, clip_vocab_size = _clip_tokenizer()
    t5_tok = _t5_tokenizer()
    torch.manual_seed(seed)
    clip_cfg = CLIPTextConfig(vocab_size=clip_vocab_size, hidden_size=32, intermediate_size=64, projection_dim=32,
                              num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
                              bos_token_id=0, eos_token_id=1, pad_token_id=1)
    te1 = CLIPTextModelWithProjection(clip_cfg)
    te2 = CLIPTextModelWithProjection(clip_cfg)
    te3 = T5EncoderModel(T5Config(vocab_size=len(t5_tok), d_model=64, d_kv=16, d_ff=64, num_layers=1,
                                  num_heads=4, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
                        up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(8, 16, 16),
                        layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=TINY_HEIGHT,
                        use_quant_conv=False, use_post_quant_conv=False,
                        shift_factor=0.0609, scaling_factor=1.5035)  # SD3's VAE shift and scale
    transformer = SD3Transformer2DModel(sample_size=TINY_HEIGHT // 4, patch_size=2, in_channels=4, out_channels=4,
                                        num_layers=2, attention_head_dim=8, num_attention_heads=4,
                                        joint_attention_dim=64,  # == T5 d_model (CLIP embeds are padded to it)
                                        caption_projection_dim=32,
                                        pooled_projection_dim=64,  # == 2 x CLIP projection_dim
                                        pos_embed_max_size=32)
    # modules built from configs start in train mode; T5 dropout would make every call differ (pitfall 1)
    for m in (te1, te2, te3, vae, transformer):
        m.eval()
    return StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                    vae=vae, text_encoder=te1, tokenizer=clip_tok, text_encoder_2=te2,
                                    tokenizer_2=clip_tok, text_encoder_3=te3, tokenizer_3=t5_tok)


def build_tiny_sd3(directory, seed: int = 0) -> Path:
    """Build the tiny pipeline and ``save_pretrained`` it to ``directory``; returns the directory."""
    directory = Path(directory)
    build_tiny_sd3_pipeline(seed).save_pretrained(directory)
    return directory
