"""Parameter counts of the GPU world's models, from their configs, with no weights: every model is built on
the ``meta`` device (shapes only, no memory) and its parameters are counted.

    params(part) = sum over the module's parameters of numel,   built with ``torch.device("meta")``

| part (``count_parameters`` key) | built from                                                             |
|---------------------------------|------------------------------------------------------------------------|
| ``sd3_transformer``             | diffusers ``SD3Transformer2DModel(**SD35M_TRANSFORMER_CONFIG)``        |
| ``sd3_lora``                    | the same + peft LoRA (r, the 8 attention projections of ``policies/sd3.py``), LoRA tensors only |
| ``clip_l`` / ``clip_g``         | transformers ``CLIPTextModelWithProjection`` (SD3's ``text_encoder`` / ``text_encoder_2``) |
| ``t5_xxl``                      | transformers ``T5EncoderModel`` (SD3's ``text_encoder_3``)             |
| ``sd3_vae``                     | diffusers ``AutoencoderKL(**SD3_VAE_CONFIG)``                          |
| ``showo2_llm``                  | transformers ``Qwen2ForCausalLM`` (Qwen2.5-1.5B, tied embeddings)      |
| ``showo2_siglip``               | transformers ``SiglipVisionModel`` encoder minus its last layer + position embedding (Show-o2 ``und_trans``) |
| ``showo2_head``                 | Show-o2's flow head: 10 ``ModulatedAttentionBlock`` (``diffusion_head_a``) + ``FinalLayer`` (``_b``), rebuilt here from its layer shapes |
| ``showo2_glue``                 | Show-o2's patch embedders, fusion projector, time embedder, ``diff_proj``, ``time_embed_proj`` |

The config values are those of the hub checkpoints' ``config.json`` files (stabilityai/stable-diffusion-3.5-medium,
Qwen/Qwen2.5-1.5B-Instruct, google/siglip-so400m-patch14-384) and of Show-o2's ``Showo2Qwen2_5.__init__`` for the
1.5B model (showlab/Show-o ``show-o2/models/modeling_showo2_qwen2_5.py``, ``modules.DiffusionHeadConfig``),
written down here because no hub is reachable. Wan2.1's VAE (Show-o2's codec) has no config class in
diffusers or transformers; its count is the published 127 M and is marked as such.
"""
from __future__ import annotations

import functools

import torch

# stabilityai/stable-diffusion-3.5-medium transformer/config.json
SD35M_TRANSFORMER_CONFIG = {
    "sample_size": 128, "patch_size": 2, "in_channels": 16, "num_layers": 24, "attention_head_dim": 64,
    "num_attention_heads": 24, "joint_attention_dim": 4096, "caption_projection_dim": 1536,
    "pooled_projection_dim": 2048, "out_channels": 16, "pos_embed_max_size": 384,
    "dual_attention_layers": tuple(range(13)), "qk_norm": "rms_norm",
}
# vae/config.json: 16 latent channels, no quant convs
SD3_VAE_CONFIG = {
    "in_channels": 3, "out_channels": 3, "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4, "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2, "act_fn": "silu", "latent_channels": 16, "norm_num_groups": 32, "sample_size": 1024,
    "scaling_factor": 1.5305, "shift_factor": 0.0609, "use_quant_conv": False, "use_post_quant_conv": False,
}
# text_encoder (CLIP ViT-L/14 text), text_encoder_2 (OpenCLIP bigG/14 text), text_encoder_3 (T5 v1.1 XXL encoder)
CLIP_L_CONFIG = {"vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "projection_dim": 768,
                 "num_hidden_layers": 12, "num_attention_heads": 12, "max_position_embeddings": 77,
                 "hidden_act": "quick_gelu"}
CLIP_G_CONFIG = {"vocab_size": 49408, "hidden_size": 1280, "intermediate_size": 5120, "projection_dim": 1280,
                 "num_hidden_layers": 32, "num_attention_heads": 20, "max_position_embeddings": 77,
                 "hidden_act": "gelu"}
T5_XXL_CONFIG = {"vocab_size": 32128, "d_model": 4096, "d_kv": 64, "d_ff": 10240, "num_layers": 24,
                 "num_heads": 64, "feed_forward_proj": "gated-gelu", "relative_attention_num_buckets": 32}
# Show-o2 1.5B: Qwen2.5-1.5B LLM, SigLIP so400m semantic layers, flow head of width 2048
QWEN25_15B_CONFIG = {"vocab_size": 151936, "hidden_size": 1536, "intermediate_size": 8960,
                     "num_hidden_layers": 28, "num_attention_heads": 12, "num_key_value_heads": 2,
                     "max_position_embeddings": 32768, "tie_word_embeddings": True}
SIGLIP_SO400M_VISION_CONFIG = {"hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27,
                               "num_attention_heads": 16, "image_size": 384, "patch_size": 14}
SHOWO2_15B_CONFIG = {"hidden_size": 1536, "clip_latent_dim": 1152, "image_latent_dim": 16, "patch_size": 2,
                     "num_diffusion_layers": 10, "image_latent_side": 27,
                     # models/modules.py DiffusionHeadConfig (the head's own width, whatever the LLM's)
                     "head_hidden_size": 2048, "head_heads": 32, "head_kv_heads": 8, "head_dim": 64,
                     "head_intermediate_size": 8192}
WAN21_VAE_PARAMS = 126_892_531   # Wan2.1_VAE.pth (not buildable from a config class here): published size


def _numel(module: torch.nn.Module, *, only=None) -> int:
    return sum(p.numel() for name, p in module.named_parameters() if only is None or only(name))


class _HeadBlock(torch.nn.Module):
    """The parameter shapes of Show-o2's ``ModulatedAttentionBlock`` (GQA attention with q/k RMSNorm of the
    head dim, SwiGLU MLP without biases, two RMSNorms, adaLN Linear(h, 6h))."""

    def __init__(self, h: int, heads: int, kv_heads: int, head_dim: int, inter: int):
        super().__init__()
        lin = torch.nn.Linear
        self.q, self.k = lin(h, heads * head_dim, bias=False), lin(h, kv_heads * head_dim, bias=False)
        self.v, self.o = lin(h, kv_heads * head_dim, bias=False), lin(heads * head_dim, h, bias=False)
        self.q_norm, self.k_norm = torch.nn.Parameter(torch.ones(head_dim)), torch.nn.Parameter(torch.ones(head_dim))
        self.gate, self.up, self.down = lin(h, inter, bias=False), lin(h, inter, bias=False), lin(inter, h, bias=False)
        self.norm1, self.norm2 = torch.nn.Parameter(torch.ones(h)), torch.nn.Parameter(torch.ones(h))
        self.adaln = lin(h, 6 * h)


def showo2_head_block_params(cfg: dict = SHOWO2_15B_CONFIG) -> int:
    with torch.device("meta"):
        return _numel(_HeadBlock(cfg["head_hidden_size"], cfg["head_heads"], cfg["head_kv_heads"], cfg["head_dim"],
                                 cfg["head_intermediate_size"]))


def showo2_final_layer_params(cfg: dict = SHOWO2_15B_CONFIG) -> int:
    h, p, c = cfg["head_hidden_size"], cfg["patch_size"], cfg["image_latent_dim"]
    with torch.device("meta"):   # FinalLayer: RMSNorm(h), Linear(h, p*p*c), adaLN Linear(h, 2h)
        return h + _numel(torch.nn.Linear(h, p * p * c)) + _numel(torch.nn.Linear(h, 2 * h))


@functools.lru_cache(maxsize=None)
def count_parameters(lora_rank: int = 32) -> dict[str, int]:
    """Parameter counts of every part (see the module table), from configs on the meta device."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from peft import LoraConfig, inject_adapter_in_model
    from transformers import (CLIPTextConfig, CLIPTextModelWithProjection, Qwen2Config, Qwen2ForCausalLM,
                              SiglipVisionConfig, SiglipVisionModel, T5Config, T5EncoderModel)

    from grpo_lib.policies.sd3 import LORA_TARGET_MODULES

    out: dict[str, int] = {}
    s = SHOWO2_15B_CONFIG
    with torch.device("meta"):
        mmdit = SD3Transformer2DModel(**SD35M_TRANSFORMER_CONFIG)
        out["sd3_transformer"] = _numel(mmdit)
        inject_adapter_in_model(LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank,
                                           target_modules=list(LORA_TARGET_MODULES)), mmdit)
        out["sd3_lora"] = _numel(mmdit, only=lambda n: "lora_" in n)
        out["clip_l"] = _numel(CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_L_CONFIG)))
        out["clip_g"] = _numel(CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_G_CONFIG)))
        out["t5_xxl"] = _numel(T5EncoderModel(T5Config(**T5_XXL_CONFIG)))
        out["sd3_vae"] = _numel(AutoencoderKL(**SD3_VAE_CONFIG))
        out["showo2_llm"] = _numel(Qwen2ForCausalLM(Qwen2Config(**QWEN25_15B_CONFIG)))
        siglip = SiglipVisionModel(SiglipVisionConfig(**SIGLIP_SO400M_VISION_CONFIG))
        siglip = getattr(siglip, "vision_model", siglip)   # transformers 4 wraps it, 5 does not
        out["showo2_siglip"] = (_numel(siglip.encoder) - _numel(siglip.encoder.layers[-1])
                                + _numel(siglip.embeddings.position_embedding))
        h, c, hh = s["hidden_size"], s["clip_latent_dim"], s["head_hidden_size"]
        p2c = s["patch_size"] ** 2 * s["image_latent_dim"]
        lin = torch.nn.Linear
        out["showo2_glue"] = (p2c * c + c + p2c * h + h                           # image_embedder_und / _gen (convs)
                              + (c + h) + _numel(lin(c + h, h)) + _numel(lin(h, h))   # fusion_proj
                              + _numel(lin(256, hh)) + _numel(lin(hh, hh))            # time_embed
                              + (_numel(lin(h, hh)) + _numel(lin(hh, hh)) + _numel(lin(hh, h)) if h != hh else 0))
    out["showo2_head"] = s["num_diffusion_layers"] * showo2_head_block_params() + showo2_final_layer_params()
    out["showo2_vae"] = WAN21_VAE_PARAMS
    return out
