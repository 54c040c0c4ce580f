"""Fake of show-o2/models/modeling_showo2_qwen2_5.py: a tiny model with Show-o2's parameter names and forward.

Parameter names mirror the real model's top level: ``showo`` (the LLM: ``showo.model.embed_tokens``,
``showo.model.layers.*``, ``showo.lm_head``), ``image_embedder_gen``, ``time_embed``, ``diff_proj.0/2`` (not trained by
``pattern:diffusion``), and the flow head ``diffusion_head_a`` (blocks) + ``diffusion_head_b`` (final layer).
"""
import json
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F


class _Config(dict):
    """Attribute access like Show-o2's ConfigMixin config."""

    def __getattr__(self, key):
        try:
            return self[key]
        except KeyError as e:
            raise AttributeError(key) from e


class _Block(nn.Module):
    def __init__(self, d, heads=2):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.out = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, h, mask, shift=None, scale=None):
        B, L, D = h.shape
        x = self.ln1(h)
        if shift is not None:
            x = x * (1 + scale[:, None]) + shift[:, None]
        q, k, v = self.qkv(x).view(B, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        # the mask goes to SDPA as given, as in Show-o2 (qwen2.py, modules.py): its dtype must be the query's
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        h = h + self.out(a.transpose(1, 2).reshape(B, L, D))
        return h + self.mlp(self.ln2(h))


class _LLMCore(nn.Module):
    def __init__(self, vocab, d, layers):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(_Block(d) for _ in range(layers))


class _LLM(nn.Module):
    def __init__(self, vocab, d, layers):
        super().__init__()
        self.model = _LLMCore(vocab, d, layers)
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def forward(self, inputs_embeds=None, attention_mask=None, output_hidden_states=True):
        h, hs = inputs_embeds, [inputs_embeds]
        for layer in self.model.layers:
            h = layer(h, attention_mask)
            hs.append(h)
        return {"logits": self.lm_head(h), "hidden_states": hs}


class _HeadBlock(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.block = _Block(d)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 2 * d))

    def forward(self, hidden_states, adaln_input, attention_mask=None, **kwargs):
        shift, scale = self.adaLN_modulation(adaln_input).chunk(2, dim=1)
        return (self.block(hidden_states, attention_mask, shift, scale),)


class _FinalLayer(nn.Module):
    def __init__(self, d, patch, channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(d)
        self.linear = nn.Linear(d, patch * patch * channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 2 * d))

    def forward(self, x, adaln_input, modality_positions=None):
        shift, scale = self.adaLN_modulation(adaln_input).chunk(2, dim=1)
        return self.linear(self.norm_final(x) * (1 + scale[:, None]) + shift[:, None])


class _TimestepEmbedder(nn.Module):
    def __init__(self, d, freq=32):
        super().__init__()
        self.freq = freq
        self.mlp = nn.Sequential(nn.Linear(freq, d), nn.SiLU(), nn.Linear(d, d))

    def forward(self, t, dtype):
        half = self.freq // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * freqs[None]
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1).to(dtype))


class Showo2Qwen2_5(nn.Module):
    def __init__(self, llm_vocab_size=64, image_latent_dim=4, patch_size=2, hidden_size=32, num_llm_layers=1,
                 num_diffusion_layers=2, add_time_embeds=True, seed=0, **kwargs):
        super().__init__()
        torch.manual_seed(seed)
        self.config = _Config(llm_vocab_size=llm_vocab_size, image_latent_dim=image_latent_dim, patch_size=patch_size,
                              hidden_size=hidden_size, num_llm_layers=num_llm_layers,
                              num_diffusion_layers=num_diffusion_layers, add_time_embeds=add_time_embeds, seed=seed)
        d = hidden_size
        self.showo = _LLM(llm_vocab_size, d, num_llm_layers)
        self.image_embedder_gen = nn.Conv2d(image_latent_dim, d, patch_size, stride=patch_size)
        self.time_embed = _TimestepEmbedder(d)
        self.diff_proj = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, d))   # Show-o2's shape and names
        self.diffusion_head_a = nn.ModuleList(_HeadBlock(d) for _ in range(num_diffusion_layers))
        self.diffusion_head_b = _FinalLayer(d, patch_size, image_latent_dim)

    @classmethod
    def from_pretrained(cls, path, use_safetensors=False, **kwargs):
        cfg_file = os.path.join(str(path), "config.json")
        if not os.path.isfile(cfg_file):
            raise OSError(f"{path} does not appear to have a file named config.json")
        model = cls(**json.load(open(cfg_file)))
        weights = os.path.join(str(path), "pytorch_model.bin")
        if os.path.isfile(weights):
            model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        return model

    def forward(self, text_tokens=None, image_latents=None, t=None, attention_mask=None, modality_positions=None,
                first_frame_as_cond=False, only_denoise_last_image=False, guidance_scale=0.0,
                output_hidden_states=True, max_seq_len=None, device="cuda:0", **kwargs):
        embeds = self.showo.model.embed_tokens(text_tokens)                       # (B, L, D)
        dtype = embeds.dtype
        b, c, h, w = image_latents.shape
        p = self.config.patch_size
        img = self.image_embedder_gen(image_latents.to(dtype)).flatten(2).transpose(1, 2)   # (B, N, D)
        temb = self.time_embed(t, dtype)                                          # (B, D)
        rows = []
        for i in range(b):   # the time token at the block's offset, then the patches
            offset, length = (int(v) for v in modality_positions[i, 0])
            rows.append(torch.cat([embeds[i, :offset], temb[i:i + 1].to(embeds.dtype),
                                   img[i, :length - 1].to(embeds.dtype), embeds[i, offset + length:]]))
        out = self.showo(inputs_embeds=torch.stack(rows), attention_mask=attention_mask, output_hidden_states=True)
        hs = self.diff_proj(out["hidden_states"][-1])
        for layer in self.diffusion_head_a:
            hs = layer(hidden_states=hs, adaln_input=temb, attention_mask=attention_mask,
                       modality_positions=modality_positions)[0]
        v = self.diffusion_head_b(hs, temb, modality_positions)                 # (B, L, p*p*C)
        v = torch.stack([v[i, int(modality_positions[i, 0, 0]) + 1:int(modality_positions[i, 0].sum())]
                         for i in range(b)])                                      # (B, N, p*p*C)
        v = v.reshape(b, h // p, w // p, p, p, c).permute(0, 5, 1, 3, 2, 4).reshape(b, c, h, w)
        return out["logits"], v
