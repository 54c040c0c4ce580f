"""The embedded world's policy: a small diffusers ``UNet2DConditionModel`` on 32x32 pixels with a
tiny learned word-level text encoder (design.md §2).

Native convention ``noise_at_one`` (rectified flow, as SD3):

    x_t = (1 - t) x_0 + t eps,        v_theta(x_t, t) ~ eps - x_0,        timestep fed to the UNet = 1000 t

``convention="noise_at_zero"`` exposes the same network as a Show-o2 stand-in through
v'(x, t) = -v(x, 1 - t), so both conventions run the very same weights.

| code                        | symbol / meaning                                                     |
|-----------------------------|----------------------------------------------------------------------|
| ``x_t``                     | x_t, pixels in [-1, 1] (identity codec), (B, 3, 32, 32)               |
| ``t``                       | t in the policy's convention (sigma for ``noise_at_one``)             |
| ``velocity(...)``           | v_theta(x_t, t | c), CFG: v_u + g (v_c - v_u)                        |
| ``Cond.tensors["tokens"]``  | text token states h (B, L, D), ``["mask"]`` (B, L) 1 = real token     |
| ``Cond.tensors["pooled"]``  | masked mean of h (B, D); added to the UNet's time embedding          |
| ``Cond.uncond``             | the same for the empty prompt "" (the CFG unconditional branch)        |

Tokenizer: lower-cased whitespace words over ``scenes.scene_vocabulary()`` plus ``<pad>``, ``<unk>``
and ``<bos>``. Every prompt starts with ``<bos>`` so the empty prompt "" (the unconditional input)
still has one attendable token. Unknown words map to ``<unk>`` (a widget user may type "the" or
"dots"); a non-empty prompt with *no* known word raises ``ValueError`` because it can only be a
prompt from another world, and so does a prompt longer than ``max_tokens``.

LoRA (peft through diffusers' ``unet.add_adapter``): default targets are the attention projections
``to_q, to_k, to_v, to_out.0`` *and* the resnet convolutions ``conv1, conv2`` — counting is a
spatial layout decision that the conv stack makes, and the attention layers only live at 8x8.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from .base import Cond, adapters_disabled, apply_cfg, check_convention, check_velocity_args, images_to_uint8
from .base import lora_config as _base_lora_config

ADAPTER_NAME = "default"
LORA_TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2")
DEFAULT_LORA = {"r": 8, "lora_alpha": 8, "init_lora_weights": True, "target_modules": list(LORA_TARGET_MODULES)}
SPECIAL_TOKENS = ("<pad>", "<unk>", "<bos>")
PAD, UNK, BOS = 0, 1, 2

CONFIG_NAME = "tiny_policy.json"
TEXT_WEIGHTS = "text_encoder.safetensors"
LORA_WEIGHTS = "lora.safetensors"
LORA_CONFIG = "lora_config.json"


@dataclass
class TinyConfig:
    """Architecture of the tiny policy (saved as ``tiny_policy.json`` next to the weights)."""

    image_size: int = 32
    block_out_channels: tuple[int, ...] = (16, 32, 64)
    cross_attn_levels: tuple[bool, ...] = (False, False, True)   # which resolutions get cross-attention
    layers_per_block: int = 1
    attention_heads: int = 4          # diffusers' (mis-named) ``attention_head_dim`` = number of heads
    norm_num_groups: int = 8
    text_dim: int = 64                # D: token state width == UNet cross_attention_dim
    text_layers: int = 2
    text_heads: int = 4
    max_tokens: int = 16              # L, including <bos>
    vocab: tuple[str, ...] = ()       # filled from scenes.scene_vocabulary() when empty

    def __post_init__(self):
        self.block_out_channels = tuple(int(c) for c in self.block_out_channels)
        self.cross_attn_levels = tuple(bool(c) for c in self.cross_attn_levels)
        self.vocab = tuple(self.vocab)
        if len(self.block_out_channels) != len(self.cross_attn_levels):
            raise ValueError(f"cross_attn_levels={self.cross_attn_levels} must have one entry per level of "
                             f"block_out_channels={self.block_out_channels}")
        if self.image_size % (2 ** (len(self.block_out_channels) - 1)):
            raise ValueError(f"image_size={self.image_size} must be divisible by 2^(levels-1)")
        if any(c % self.norm_num_groups for c in self.block_out_channels):
            raise ValueError(f"every channel count in {self.block_out_channels} must be divisible by "
                             f"norm_num_groups={self.norm_num_groups}")
        if self.text_dim % self.text_heads:
            raise ValueError(f"text_dim={self.text_dim} must be divisible by text_heads={self.text_heads}")
        if self.max_tokens < 2:
            raise ValueError(f"max_tokens={self.max_tokens} must be >= 2 (<bos> plus one word)")


# ------------------------------------------------------------------------------------------ text
class WordTokenizer:
    """Word-level tokenizer: ``<bos>`` + lower-cased words, padded to ``max_tokens``."""

    def __init__(self, vocab: Sequence[str], max_tokens: int):
        words = [w for w in vocab if w not in SPECIAL_TOKENS]
        self.itos = list(SPECIAL_TOKENS) + words
        self.stoi = {w: i for i, w in enumerate(self.itos)}
        self.max_tokens = max_tokens

    def __len__(self) -> int:
        return len(self.itos)

    def words(self, prompt: str) -> list[str]:
        return re.findall(r"[a-z]+", prompt.lower())

    def __call__(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """prompts -> (ids (B, L) long, mask (B, L) long with 1 on <bos> and the words)."""
        prompts = _check_prompts(prompts)
        ids = torch.full((len(prompts), self.max_tokens), PAD, dtype=torch.long)
        mask = torch.zeros((len(prompts), self.max_tokens), dtype=torch.long)
        for b, p in enumerate(prompts):
            words = self.words(p)
            if len(words) + 1 > self.max_tokens:
                raise ValueError(f"prompt {p!r} has {len(words)} words; at most {self.max_tokens - 1} fit "
                                 f"(max_tokens={self.max_tokens} including <bos>)")
            toks = [self.stoi.get(w, UNK) for w in words]
            if words and all(t == UNK for t in toks):
                raise ValueError(f"prompt {p!r} has no word of the embedded world's vocabulary "
                                 f"(e.g. {self.itos[3:9]}); the tiny policy cannot condition on it")
            seq = [BOS] + toks
            ids[b, :len(seq)] = torch.tensor(seq)
            mask[b, :len(seq)] = 1
        return ids, mask


def _check_prompts(prompts) -> list[str]:
    # a bare string is a Sequence of characters; encoding it letter by letter is never what was meant
    if isinstance(prompts, str) or not isinstance(prompts, Sequence) or len(prompts) == 0:
        raise ValueError(f"prompts must be a non-empty list of strings, got {prompts!r}")
    bad = [p for p in prompts if not isinstance(p, str)]
    if bad:
        raise ValueError(f"prompts must all be strings, got non-strings {bad[:3]!r}")
    return list(prompts)


class _Block(nn.Module):
    """Pre-norm transformer block: h + Attn(LN(h)), then h + MLP(LN(h)).

    Hand-written rather than ``nn.TransformerEncoderLayer`` because torch's fused inference fast path
    (taken under ``no_grad`` in eval mode) differs in the last bits from the autograd path, and the
    policy must give bit-identical conditioning whether or not gradients are on.
    """

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.out = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, h: torch.Tensor, key_ok: torch.Tensor) -> torch.Tensor:
        B, L, D = h.shape
        q, k, v = self.qkv(self.ln1(h)).view(B, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        # (B, heads, L, D/heads); padded keys are masked out (every row has <bos>, so none is empty)
        a = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=key_ok[:, None, None, :])
        h = h + self.out(a.transpose(1, 2).reshape(B, L, D))
        return h + self.mlp(self.ln2(h))


class TinyTextEncoder(nn.Module):
    """Token + position embedding and a few pre-norm transformer blocks -> (states, pooled)."""

    def __init__(self, vocab_size: int, dim: int, layers: int, heads: int, max_tokens: int):
        super().__init__()
        self.tok = nn.Embedding(vocab_size, dim)
        self.pos = nn.Parameter(torch.randn(max_tokens, dim) * 0.02)
        self.blocks = nn.ModuleList(_Block(dim, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.tok(ids) + self.pos[: ids.shape[1]]                 # (B, L, D)
        key_ok = mask.bool()                                         # (B, L)
        for blk in self.blocks:
            h = blk(h, key_ok)
        h = self.norm(h)
        m = mask.unsqueeze(-1).to(h.dtype)                           # (B, L, 1)
        pooled = (h * m).sum(1) / m.sum(1)                           # (B, D) masked mean
        return h, pooled


# ------------------------------------------------------------------------------------------ policy
def lora_config(lora: Any = None):
    """This policy's LoRA config: ``base.lora_config`` with ``DEFAULT_LORA``."""
    return _base_lora_config(lora, DEFAULT_LORA)


def build_unet(cfg: TinyConfig):
    from diffusers import UNet2DConditionModel

    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in cfg.cross_attn_levels)
    up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(cfg.cross_attn_levels))
    return UNet2DConditionModel(
        sample_size=cfg.image_size, in_channels=3, out_channels=3,
        block_out_channels=cfg.block_out_channels, down_block_types=down, up_block_types=up,
        layers_per_block=cfg.layers_per_block, cross_attention_dim=cfg.text_dim,
        attention_head_dim=cfg.attention_heads, norm_num_groups=cfg.norm_num_groups,
        # the pooled prompt vector joins the time embedding (global conditioning: the count is a
        # property of the whole image, not of any one 8x8 cell the cross-attention sees)
        class_embed_type="projection", projection_class_embeddings_input_dim=cfg.text_dim,
    )


def _atomic_dir(directory: Path):
    """Context: yields a temp dir next to ``directory``; on success it replaces ``directory``."""
    @contextlib.contextmanager
    def cm():
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp", dir=directory.parent))
        try:
            yield tmp
            if directory.exists():
                old = directory.parent / f".{directory.name}.old{os.getpid()}"
                os.replace(directory, old)
                os.replace(tmp, directory)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, directory)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return cm()


class TinyPolicy(nn.Module):
    """Text-conditioned pixel-space flow model of the embedded world (implements ``base.Policy``).

    ``train_text_encoder`` decides whether the text encoder is part of ``trainable_parameters()``
    when no LoRA is attached (pretraining: yes; GRPO trains a LoRA on the UNet only).
    """

    def __init__(self, config: TinyConfig | None = None, *, device: str | torch.device = "cpu",
                 convention: str = "noise_at_one", train_text_encoder: bool = True, seed: int | None = 0):
        super().__init__()
        from .. import scenes

        self.config = config or TinyConfig()
        if not self.config.vocab:
            self.config.vocab = tuple(scenes.scene_vocabulary())
        self.convention = check_convention(convention)
        self.latent_shape = (3, self.config.image_size, self.config.image_size)
        self.train_text_encoder = train_text_encoder
        self.tokenizer = WordTokenizer(self.config.vocab, self.config.max_tokens)
        if seed is not None:
            torch.manual_seed(seed)
        self.text_encoder = TinyTextEncoder(len(self.tokenizer), self.config.text_dim, self.config.text_layers,
                                            self.config.text_heads, self.config.max_tokens)
        self.unet = build_unet(self.config)
        self.lora_config = None
        self.to(device)
        self.eval()
        self._sync_memory_format()

    # -------------------------------------------------------------- basics
    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    def text_states(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """prompts -> (tokens (B, L, D), mask (B, L), pooled (B, D)); differentiable."""
        ids, mask = self.tokenizer(prompts)
        ids, mask = ids.to(self.device), mask.to(self.device)
        h, pooled = self.text_encoder(ids, mask)
        return h, mask, pooled

    def encode(self, prompts: Sequence[str]) -> Cond:
        """Prompt conditioning plus the empty-prompt twin. Gradients flow into the text encoder only
        when it is trainable (``train_text_encoder`` and no LoRA attached)."""
        prompts = _check_prompts(prompts)
        grad = torch.is_grad_enabled() and self.train_text_encoder and not self.has_lora
        with torch.set_grad_enabled(grad):
            h, mask, pooled = self.text_states(list(prompts) + [""])
        B = len(prompts)
        cond = {"tokens": h[:B], "mask": mask[:B], "pooled": pooled[:B]}
        # the unconditional branch is the same "" encoding for every sample (expanded, so slicing works)
        uncond = {k: v[B:].expand(B, *v.shape[1:]) for k, v in (("tokens", h), ("mask", mask), ("pooled", pooled))}
        return Cond(cond, uncond)

    def _memory_format(self) -> torch.memory_format:
        """The UNet's weight layout: channels-last, in which oneDNN's CPU kernels train a LoRA on this UNet
        ~15 % faster and sample it ~12 % faster (``bench/tiny_speed.py --memory-format``); the values are the
        same. Except when some GroupNorm trains while the UNet's first layers are frozen: then a GroupNorm's
        input can need no gradient, and torch 2.13's CPU GroupNorm backward segfaults on a channels-last input
        without one (head-only training, Show-o2's convention stand-in). The layout depends only on what
        trains, so a rollout and the update that re-scores it run the same kernels."""
        params = list(self.unet.parameters())
        norm_trains = any(q.requires_grad for m in self.unet.modules() if isinstance(m, nn.GroupNorm)
                          for q in m.parameters())
        if norm_trains and not all(q.requires_grad for q in params):
            return torch.contiguous_format
        return torch.channels_last

    def _sync_memory_format(self) -> None:
        """Lay the UNet's weights out as :meth:`_memory_format` says (a no-op unless what trains changed)."""
        fmt = self._memory_format()
        if getattr(self, "_unet_format", None) != fmt:
            self.unet.to(memory_format=fmt)
            self._unet_format = fmt

    def _net(self, x: torch.Tensor, sigma: torch.Tensor, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """v in noise_at_one for sigma (B,), the UNet reading timestep 1000 sigma."""
        self._sync_memory_format()        # trainability may have changed since (select_trainable, add_lora)
        return self.unet(x, 1000.0 * sigma, encoder_hidden_states=tensors["tokens"],
                         encoder_attention_mask=tensors["mask"], class_labels=tensors["pooled"]).sample

    def _time(self, t, batch: int) -> torch.Tensor:
        if isinstance(t, torch.Tensor):
            tt = t.to(device=self.device, dtype=torch.float32)
            if tt.dim() == 0:
                tt = tt.expand(batch)
            elif tt.shape != (batch,):
                raise ValueError(f"t has shape {tuple(t.shape)}; expected a float, a 0-d tensor or shape ({batch},)")
        elif isinstance(t, (int, float, np.floating, np.integer)) and not isinstance(t, bool):
            tt = torch.full((batch,), float(t), dtype=torch.float32, device=self.device)
        else:
            raise ValueError(f"t={t!r} must be a float or a tensor of shape ({batch},)")
        if not torch.isfinite(tt).all() or (tt < 0).any() or (tt > 1).any():
            raise ValueError(f"t={tt.tolist() if tt.numel() <= 8 else 'tensor'} must lie in [0, 1]")
        return tt

    def velocity(self, x_t: torch.Tensor, t: torch.Tensor | float, cond: Cond,
                 guidance_scale: float = 1.0) -> torch.Tensor:
        """v_theta(x_t, t | c) in the policy's convention, with CFG v_u + g (v_c - v_u) when g != 1.

        No ``no_grad`` here: GRPO differentiates through it. x_t: (B, 3, H, W) -> v: (B, 3, H, W).
        """
        B = check_velocity_args(x_t, cond, guidance_scale, self.latent_shape)
        tt = self._time(t, B)
        sigma = tt if self.convention == "noise_at_one" else 1.0 - tt    # native time of the network
        x = x_t.to(self.dtype)
        tensors = {k: v.to(self.device) for k, v in cond.tensors.items()}
        if guidance_scale == 1:
            v = self._net(x, sigma, tensors)
        else:
            if not cond.uncond:
                raise ValueError(f"guidance_scale={guidance_scale} needs cond.uncond (the empty-prompt branch)")
            unc = {k: v.to(self.device) for k, v in cond.uncond.items()}
            both = {k: torch.cat([unc[k], tensors[k]]) for k in tensors}             # (2B, ...)
            v_u, v_c = self._net(torch.cat([x, x]), torch.cat([sigma, sigma]), both).chunk(2)
            v = apply_cfg(v_u, v_c, guidance_scale)
        # Show-o2 stand-in: v'(x, t) = -v(x, 1 - t)
        return v if self.convention == "noise_at_one" else -v

    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """Identity codec: pixels in [-1, 1] (B, 3, H, W) -> uint8 (B, H, W, 3)."""
        return images_to_uint8(latents)

    # -------------------------------------------------------------- LoRA
    @property
    def has_lora(self) -> bool:
        return ADAPTER_NAME in (getattr(self.unet, "peft_config", None) or {})

    def _lora_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.unet.named_parameters() if "lora_" in n and f".{ADAPTER_NAME}" in n]

    def add_lora(self, lora: Any = None) -> None:
        """Attach a fresh LoRA (lora_B = 0: the policy starts equal to the base); freezes everything else."""
        if self.has_lora:
            raise ValueError("a LoRA is already attached; merge_lora() it first, or load_lora() to replace it")
        self.requires_grad_(False)
        self.unet.add_adapter(lora_config(lora), adapter_name=ADAPTER_NAME)
        for p in self._lora_parameters():
            p.requires_grad_(True)
        self.lora_config = self.unet.peft_config[ADAPTER_NAME]

    def trainable_parameters(self) -> list[nn.Parameter]:
        """LoRA parameters when an adapter is attached; else the UNet (+ text encoder if ``train_text_encoder``)."""
        if self.has_lora:
            return [p for p in self._lora_parameters() if p.requires_grad]
        params = list(self.unet.parameters())
        if self.train_text_encoder:
            params += list(self.text_encoder.parameters())
        return params

    def reference(self) -> contextlib.AbstractContextManager:
        """Inside it the policy is the frozen reference: LoRA off. Without an adapter the policy is its own
        reference (as ``SD3Policy``)."""
        if not self.has_lora:
            return contextlib.nullcontext()
        return adapters_disabled(self.unet)

    @property
    def has_frozen_reference(self) -> bool:
        """False: ``reference()`` switches the LoRA off; a trainer training the weights themselves keeps its
        own frozen copy (``base.FrozenReference``)."""
        return False

    def train_mode(self, on: bool) -> None:
        """The UNet stays in eval mode whatever ``on`` says: it has no dropout, and the update must recompute
        exactly the rollout's log-probs."""
        self.eval()

    def merge_lora(self, *, new_adapter: bool = False, lora: Any = None) -> None:
        """W <- W + (alpha / r) B A in every LoRA layer, then drop the adapter: the merged model becomes
        the base, hence the KL reference. ``new_adapter`` attaches a fresh LoRA (config ``lora``) afterwards."""
        if not self.has_lora:
            raise ValueError("merge_lora: no LoRA is attached to merge")
        self.unet.fuse_lora(adapter_names=[ADAPTER_NAME])
        self.unet.unload_lora()        # replaces the peft layers by their (now merged) base layers
        # diffusers < 0.32 (Show-o2's pinned 0.31) deletes peft_config but leaves this flag set, so the
        # next add_adapter looks the adapter up in the deleted dict; newer diffusers resets it itself
        self.unet._hf_peft_config_loaded = None
        self.lora_config = None
        self.requires_grad_(True)
        if new_adapter:
            self.add_lora(lora)

    def save_lora(self, directory: str | Path) -> Path:
        """Write ``lora.safetensors`` + ``lora_config.json`` (atomically: temp dir then rename)."""
        from peft.utils import get_peft_model_state_dict
        from safetensors.torch import save_file

        if not self.has_lora:
            raise ValueError("save_lora: no LoRA is attached")
        directory = Path(directory)
        state = get_peft_model_state_dict(self.unet, adapter_name=ADAPTER_NAME)
        cfg = self.unet.peft_config[ADAPTER_NAME].to_dict()
        cfg = {k: (sorted(v) if isinstance(v, set) else v) for k, v in cfg.items()}
        with _atomic_dir(directory) as tmp:
            save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(tmp / LORA_WEIGHTS))
            (tmp / LORA_CONFIG).write_text(json.dumps(cfg, indent=1, default=str))
        return directory

    def load_lora(self, directory: str | Path) -> None:
        """Attach the LoRA written by ``save_lora`` (replacing an attached, unmerged one)."""
        from peft import LoraConfig
        from peft.utils import set_peft_model_state_dict
        from safetensors.torch import load_file

        directory = Path(directory)
        if not (directory / LORA_WEIGHTS).is_file() or not (directory / LORA_CONFIG).is_file():
            raise ValueError(f"load_lora: {str(directory)!r} must hold {LORA_WEIGHTS} and {LORA_CONFIG} "
                             "(written by TinyPolicy.save_lora)")
        cfg = json.loads((directory / LORA_CONFIG).read_text())
        valid = {f.name for f in dataclasses.fields(LoraConfig)}
        cfg = {k: v for k, v in cfg.items() if k in valid and k not in ("peft_type", "task_type", "revision")}
        if self.has_lora:
            self.unet.unload_lora()
            self.lora_config = None
        self.add_lora(LoraConfig(**cfg))
        state = load_file(str(directory / LORA_WEIGHTS), device=str(self.device))
        try:
            res = set_peft_model_state_dict(self.unet, state, adapter_name=ADAPTER_NAME)
        except RuntimeError as e:   # size mismatch: a LoRA saved from another architecture
            raise ValueError(f"load_lora: {str(directory)!r} does not fit this model ({str(e).splitlines()[0]}); "
                             "was it saved from another architecture?") from e
        unexpected = getattr(res, "unexpected_keys", [])
        if unexpected or len(state) != len(self._lora_parameters()):
            raise ValueError(f"load_lora: {str(directory)!r} holds {len(state)} tensors for "
                             f"{len(self._lora_parameters())} LoRA parameters (unexpected: {unexpected[:3]}); "
                             "was it saved from another architecture?")

    # -------------------------------------------------------------- save / load
    def save_pretrained(self, directory: str | Path) -> Path:
        """UNet (diffusers, safetensors) + text encoder safetensors + ``tiny_policy.json``, atomically."""
        from safetensors.torch import save_file

        if self.has_lora:
            raise ValueError("save_pretrained: a LoRA is attached and unmerged; diffusers would save peft-wrapped "
                             "keys that reload as re-initialised weights. Save it with save_lora(dir), or fold "
                             "it into the base with merge_lora() first")
        directory = Path(directory)
        with _atomic_dir(directory) as tmp:
            self.unet.save_pretrained(str(tmp / "unet"), safe_serialization=True)
            save_file({k: v.detach().contiguous().cpu() for k, v in self.text_encoder.state_dict().items()},
                      str(tmp / TEXT_WEIGHTS))
            (tmp / CONFIG_NAME).write_text(json.dumps(dataclasses.asdict(self.config), indent=1))
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path, *, device: str | torch.device = "cpu",
                        convention: str = "noise_at_one", train_text_encoder: bool = False) -> "TinyPolicy":
        from diffusers import UNet2DConditionModel
        from safetensors.torch import load_file

        directory = Path(directory)
        if not (directory / CONFIG_NAME).is_file():
            raise ValueError(f"from_pretrained: {str(directory)!r} holds no {CONFIG_NAME} "
                             "(written by TinyPolicy.save_pretrained)")
        cfg = TinyConfig(**json.loads((directory / CONFIG_NAME).read_text()))
        policy = cls(cfg, device="cpu", convention=convention, train_text_encoder=train_text_encoder, seed=None)
        policy.unet = UNet2DConditionModel.from_pretrained(str(directory / "unet"))
        policy._unet_format = None
        policy._sync_memory_format()
        policy.text_encoder.load_state_dict(load_file(str(directory / TEXT_WEIGHTS)))
        policy.to(device)
        policy.eval()
        return policy
