"""The GPU-world policy: Stable Diffusion 3 / 3.5 (MMDiT + CLIP-L, CLIP-G, T5 + AutoencoderKL) via diffusers.

Convention ``noise_at_one`` (rectified flow, sampling runs t: 1 -> 0)::

    x_t = (1 - t) x_0 + t eps,        v_theta(x_t, t) ~ d x_t / d t = eps - x_0
    v   = v_u + g (v_c - v_u)          (classifier-free guidance, CFG batch [uncond; cond])
    z   = (E(x) - shift) * scale,      x = D(z / scale + shift)        (VAE codec)

| code name                          | symbol (Flow-GRPO paper / SD3 paper)                           |
|------------------------------------|----------------------------------------------------------------|
| ``t``                              | sigma_t = t in [0, 1]; the MMDiT is fed ``timestep = 1000 t``  |
| ``x_t``                            | latent x_t (B, C, h, w), h = H / ``vae_scale_factor``          |
| ``v_cond`` / ``v_uncond``          | v_theta(x_t, t, c) / v_theta(x_t, t, "") (empty prompt)        |
| ``guidance_scale``                 | g (upstream Flow-GRPO 4.5, the counting fork 7.0)              |
| ``shift_factor``, ``scaling_factor`` | the VAE's latent shift and scale                             |
| LoRA ``r``, ``lora_alpha``         | rank r, scale alpha / r (upstream r=32, alpha=64)              |

``SD3Policy`` implements the policy contract of ``grpo_lib.policies.base`` through the same
``StableDiffusion3Pipeline.from_pretrained`` path a GPU user takes with the hub checkpoint
(``stabilityai/stable-diffusion-3.5-medium``); tests run it on a tiny random pipeline built
offline (``tests/sd3_tiny.py``). The trainable part is a peft LoRA on the MMDiT's attention
projections; ``reference()`` switches it off, so the KL reference is the base model, or the
cold-start model once a cold-start LoRA has been folded in with ``merge_lora()`` (as the
counting fork's ``merge_lora_path`` does).

The module also holds the GPU world's cold-start data helpers: ``SD3Policy.encode_images`` (VAE
encode of uint8 images to latents) and ``ImageFolderCountingDataset`` (a Hugging Face
``imagefolder`` directory with a ``metadata.jsonl`` of prompts and GenEval rows).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from .base import Cond, adapters_disabled, apply_cfg, check_velocity_args, images_to_uint8
from .base import lora_config as _base_lora_config

# The LoRA that GRPO trains always carries this peft adapter name, so saving, loading, merging and
# disabling never have to guess which adapter is meant.
ADAPTER_NAME = "default"

# Upstream Flow-GRPO's LoRA on the SD3 MMDiT (train_sd3.py): every attention projection of the
# image stream (to_*) and of the text stream (add_*), r=32, alpha=64, Gaussian init (lora_B = 0).
LORA_TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
DEFAULT_LORA = {"r": 32, "lora_alpha": 64, "init_lora_weights": "gaussian",
                "target_modules": list(LORA_TARGET_MODULES)}

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers' save_lora_weights file name




def lora_config(lora: Any = None):
    """This policy's LoRA config: ``base.lora_config`` with ``DEFAULT_LORA``."""
    return _base_lora_config(lora, DEFAULT_LORA)


def _check_prompts(prompts) -> list[str]:
    # a bare string is a Sequence of characters; encoding it letter by letter is never what was meant
    if isinstance(prompts, str) or not isinstance(prompts, Sequence) or len(prompts) == 0:
        raise ValueError(f"prompts must be a non-empty list of strings, got {prompts!r}")
    bad = [p for p in prompts if not isinstance(p, str)]
    if bad:
        raise ValueError(f"prompts must all be strings, got non-strings {bad[:3]!r}")
    return list(prompts)


class SD3Policy:
    """Stable Diffusion 3 as a Flow-GRPO policy (convention ``noise_at_one``).

    Build it with ``SD3Policy.from_pretrained(path_or_id, ...)``; ``__init__`` takes a loaded
    ``StableDiffusion3Pipeline``. Every module is in eval mode and frozen; only the LoRA
    parameters (kept in float32 whatever ``dtype`` is, as upstream's mixed-precision training does)
    require grad. The VAE always runs in float32.

    Attributes: ``pipe`` (the diffusers pipeline), ``transformer``, ``vae``, ``height``, ``width``,
    ``latent_shape`` (C, h, w), ``max_sequence_length`` (T5 tokens), ``lora_config`` (the
    ``LoraConfig`` of the attached adapter, or None), ``forward_module`` (None, or the
    ``accelerator.prepare``-wrapped transformer that ``velocity`` should call instead).
    """

    convention = "noise_at_one"

    def __init__(self, pipe, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 height: int = 512, width: int = 512, lora: Any = None, lora_path: str | Path | None = None,
                 merge_lora_path: str | Path | None = None, max_sequence_length: int = 128):
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"dtype={dtype} is not one of torch.float32, torch.bfloat16, torch.float16")
        if not (isinstance(max_sequence_length, int) and 1 <= max_sequence_length <= 512):
            raise ValueError(f"max_sequence_length={max_sequence_length!r} must be an int in [1, 512] "
                             "(T5 tokens; upstream Flow-GRPO uses 128)")
        if lora_path is not None and lora is not None:
            raise ValueError(f"pass either lora={lora!r} (a fresh adapter) or lora_path={str(lora_path)!r} (an adapter "
                             "saved with save_lora, which carries its own config), not both")
        if lora_path is not None and merge_lora_path is not None:
            raise ValueError(f"merge_lora_path={str(merge_lora_path)!r} folds a cold-start LoRA into the base and then "
                             f"adds a fresh adapter; lora_path={str(lora_path)!r} cannot be combined with it")
        self.pipe = pipe
        self._device = torch.device(device)
        self._dtype = dtype
        self.max_sequence_length = max_sequence_length
        self._uncond_cache: dict[str, torch.Tensor] | None = None
        # set to the accelerate/DDP-wrapped transformer so that ``velocity`` runs through the wrapper
        # (gradient all-reduce); None -> the bare ``pipe.transformer``
        self.forward_module: torch.nn.Module | None = None

        pipe.to(self._device)
        # from_pretrained already loads these dtypes; a pipeline built by hand may need the cast
        if self.transformer.dtype != dtype:
            self.transformer.to(dtype=dtype)
        # VAE in float32, as upstream: decoding is a small part of the cost and fp16 VAEs overflow
        if self.vae.dtype != torch.float32:
            self.vae.to(dtype=torch.float32)
        for name, module in pipe.components.items():
            if isinstance(module, torch.nn.Module):
                module.eval()
                module.requires_grad_(False)

        scale = self.vae_scale_factor * self.transformer.config.patch_size
        for name, value in (("height", height), ("width", width)):
            if not (isinstance(value, int) and value > 0 and value % scale == 0):
                raise ValueError(f"{name}={value!r} must be a positive multiple of vae_scale_factor * patch_size = "
                                 f"{self.vae_scale_factor} * {self.transformer.config.patch_size} = {scale}")
        self.height, self.width = height, width
        self.latent_shape = (self.transformer.config.in_channels, height // self.vae_scale_factor,
                             width // self.vae_scale_factor)

        self.lora_config = None
        if merge_lora_path is not None:
            # the counting fork's cold start: base + SFT LoRA fused -> the reference is the SFT model
            self.load_lora(merge_lora_path)
            self.merge_lora(new_adapter=lora is not False, lora=None if lora is False else lora)
        elif lora_path is not None:
            self.load_lora(lora_path)
        elif lora is not False:
            self.add_lora(lora)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(cls, path_or_id: str | Path, *, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32, height: int = 512, width: int = 512,
                        lora: Any = None, lora_path: str | Path | None = None,
                        merge_lora_path: str | Path | None = None, max_sequence_length: int = 128,
                        **pipeline_kwargs) -> "SD3Policy":
        """Load ``StableDiffusion3Pipeline.from_pretrained(path_or_id, dtype=dtype, **pipeline_kwargs)``.

        ``lora``: None -> a fresh adapter with upstream's config (r=32, alpha=64, Gaussian init, the
        eight attention projections); a dict -> those defaults updated by the dict; a peft
        ``LoraConfig``; False -> no adapter (inference only: no trainable parameters, and
        ``reference()`` is the policy itself).
        ``lora_path``: resume / evaluate an adapter saved by ``save_lora`` (its config comes with it).
        ``merge_lora_path``: fold that saved cold-start LoRA into the base weights, then add a fresh
        adapter per ``lora`` (the counting fork's ``merge_lora_path``).
        ``pipeline_kwargs`` go to diffusers, e.g. ``text_encoder_3=None, tokenizer_3=None`` to drop T5,
        ``variant="fp16"``, ``revision=...``.
        """
        from diffusers import StableDiffusion3Pipeline

        # the VAE is loaded in float32 whatever ``dtype`` is (see __init__)
        pipe = StableDiffusion3Pipeline.from_pretrained(path_or_id, dtype={"default": dtype, "vae": torch.float32},
                                                        **pipeline_kwargs)
        return cls(pipe, device=device, dtype=dtype, height=height, width=width, lora=lora, lora_path=lora_path,
                   merge_lora_path=merge_lora_path, max_sequence_length=max_sequence_length)

    @property
    def transformer(self):
        return self.pipe.transformer

    @property
    def vae(self):
        return self.pipe.vae

    @property
    def vae_scale_factor(self) -> int:
        return self.pipe.vae_scale_factor

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def shift(self) -> float:
        """The checkpoint's sigma-schedule shift (SD3.5-Medium: 3.0), for ``grpo_lib.sde.sd3_sigmas``."""
        config = self.pipe.scheduler.config
        if config.get("use_dynamic_shifting", False):
            raise ValueError("this checkpoint's scheduler uses resolution-dependent (dynamic) shifting; "
                             "a single shift value does not describe its schedule")
        return float(config.shift)

    def _autocast(self):
        # mixed precision as upstream's accelerate fp16/bf16 training: on CUDA the fp32 LoRA matmuls
        # run in the half dtype too; on CPU (tests) the half-precision weights simply run as they are
        if self._dtype != torch.float32 and self._device.type == "cuda":
            return torch.autocast(device_type=self._device.type, dtype=self._dtype)
        return contextlib.nullcontext()

    # ------------------------------------------------------------------ prompts
    @torch.no_grad()
    def _encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        # no_grad: encode_prompt keeps the graph otherwise, and a later second backward fails (pitfall 4)
        prompt_embeds, _, pooled, _ = self.pipe.encode_prompt(
            prompt=prompts, prompt_2=None, prompt_3=None, device=self._device,
            do_classifier_free_guidance=False, max_sequence_length=self.max_sequence_length)
        return prompt_embeds, pooled  # (B, 77 + L_t5, D_joint), (B, D_pooled)

    def encode(self, prompts: Sequence[str]) -> Cond:
        """CLIP-L + CLIP-G + T5 embeddings of ``prompts`` via the pipeline's ``encode_prompt``.

        ``Cond.tensors``: ``prompt_embeds`` (B, 77 + max_sequence_length, joint_dim) and
        ``pooled_prompt_embeds`` (B, pooled_dim); ``Cond.uncond``: the same for the empty prompt ""
        (upstream Flow-GRPO's negative prompt), repeated B times.
        """
        prompts = _check_prompts(prompts)
        prompt_embeds, pooled = self._encode(prompts)
        if self._uncond_cache is None:
            # the text encoders are frozen, so "" always encodes the same; encode it once
            u_embeds, u_pooled = self._encode([""])
            self._uncond_cache = {"prompt_embeds": u_embeds, "pooled_prompt_embeds": u_pooled}
        b = len(prompts)
        uncond = {k: v.repeat(b, *([1] * (v.ndim - 1))) for k, v in self._uncond_cache.items()}
        return Cond({"prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled}, uncond)

    # ------------------------------------------------------------------ the velocity field
    def _time_vector(self, t, batch: int) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=torch.float32, device=self._device)
        if t.ndim == 0:
            t = t.expand(batch)
        if t.shape != (batch,):
            raise ValueError(f"t must be a float or a tensor of shape ({batch},) (one time per sample), "
                             f"got shape {tuple(t.shape)}")
        if not bool(torch.all((t >= 0) & (t <= 1))):
            raise ValueError(f"t must lie in [0, 1] (sigma, noise_at_one), got {t.tolist()}")
        return t  # (B,)

    def _mmdit(self, x: torch.Tensor, timestep: torch.Tensor, embeds: torch.Tensor,
               pooled: torch.Tensor) -> torch.Tensor:
        module = self.transformer if self.forward_module is None else self.forward_module
        return module(hidden_states=x.to(self._dtype), timestep=timestep,
                                encoder_hidden_states=embeds.to(self._device, self._dtype),
                                pooled_projections=pooled.to(self._device, self._dtype),
                                return_dict=False)[0]

    def velocity(self, x_t: torch.Tensor, t: torch.Tensor | float, cond: Cond,
                 guidance_scale: float = 1.0) -> torch.Tensor:
        """v = v_u + g (v_c - v_u), the MMDiT's velocity at (x_t, t) with classifier-free guidance.

        x_t (B, C, h, w); t a float or (B,) in [0, 1] (sigma); the MMDiT sees ``timestep = 1000 t``
        (diffusers' ``FlowMatchEulerDiscreteScheduler.timesteps = sigmas * num_train_timesteps``).
        With ``guidance_scale == 1`` the unconditional pass is skipped (v = v_c). Gradients flow to
        the LoRA parameters (no ``no_grad`` here). Returns float32 (B, C, h, w), the SDE step's precision.
        """
        b = check_velocity_args(x_t, cond, guidance_scale)       # any h, w: checked against the patch below
        c = self.transformer.config.in_channels
        p = self.transformer.config.patch_size
        if x_t.shape[1] != c or x_t.shape[2] % p or x_t.shape[3] % p:
            raise ValueError(f"x_t has shape {tuple(x_t.shape)}; expected (B, {c}, h, w) with h, w multiples of "
                             f"patch_size {p} (this policy's latent_shape is {self.latent_shape})")
        missing = {"prompt_embeds", "pooled_prompt_embeds"} - set(cond.tensors)
        if missing:
            raise ValueError(f"cond.tensors lacks {sorted(missing)}; build cond with SD3Policy.encode")
        cfg = float(guidance_scale) != 1.0
        if cfg and set(cond.uncond) != {"prompt_embeds", "pooled_prompt_embeds"}:
            raise ValueError(f"guidance_scale={guidance_scale} needs cond.uncond with prompt_embeds and "
                             f"pooled_prompt_embeds (got {sorted(cond.uncond)}); build cond with SD3Policy.encode")
        t = self._time_vector(t, b)
        timestep = t * self.pipe.scheduler.config.num_train_timesteps  # (B,) 1000 * sigma, float32
        x = x_t.to(self._device)

        with self._autocast():
            if not cfg:
                v = self._mmdit(x, timestep, cond.tensors["prompt_embeds"], cond.tensors["pooled_prompt_embeds"])
                return v.float()
            # one MMDiT call on the CFG batch [uncond; cond], as the SD3 pipeline and upstream's rollout do
            embeds = torch.cat([cond.uncond["prompt_embeds"], cond.tensors["prompt_embeds"]])  # (2B, L, D)
            pooled = torch.cat([cond.uncond["pooled_prompt_embeds"], cond.tensors["pooled_prompt_embeds"]])
            v_both = self._mmdit(torch.cat([x, x]), torch.cat([timestep, timestep]), embeds, pooled)
        v_uncond, v_cond = v_both.float().chunk(2)  # (B, C, h, w) each
        return apply_cfg(v_uncond, v_cond, float(guidance_scale))

    # ------------------------------------------------------------------ codec
    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """x = D(z / scaling_factor + shift_factor) -> uint8 (B, H, W, 3), as the SD3 pipeline decodes."""
        c = self.vae.config.latent_channels
        if not (isinstance(latents, torch.Tensor) and latents.ndim == 4 and latents.shape[1] == c):
            raise ValueError(f"latents must be a tensor (B, {c}, h, w), got "
                             f"{type(latents).__name__} {tuple(getattr(latents, 'shape', ()))}")
        z = latents.to(self._device, torch.float32) / self.vae.config.scaling_factor + self.vae.config.shift_factor
        x = self.vae.decode(z, return_dict=False)[0]  # (B, 3, H, W), about [-1, 1]
        return images_to_uint8(x)

    @torch.no_grad()
    def encode_images(self, images: np.ndarray, *, sample: bool = False,
                      generator: torch.Generator | None = None) -> torch.Tensor:
        """z = (E(x) - shift_factor) * scaling_factor for uint8 images (B, H, W, 3) -> (B, C, H/f, W/f) float32.

        ``sample=False`` takes the posterior mean (the same latent every epoch, for precomputed
        cold-start data); ``sample=True`` draws from the VAE posterior with ``generator``, as the
        diffusers SD3 training scripts do.
        """
        f = self.vae_scale_factor
        if not (isinstance(images, np.ndarray) and images.dtype == np.uint8 and images.ndim == 4
                and images.shape[-1] == 3):
            raise ValueError(f"images must be a uint8 array (B, H, W, 3), got "
                             f"{type(images).__name__} {getattr(images, 'dtype', '')} "
                             f"{tuple(getattr(images, 'shape', ()))}")
        if images.shape[1] % f or images.shape[2] % f:
            raise ValueError(f"image size {images.shape[1]}x{images.shape[2]} must be a multiple of the VAE scale "
                             f"factor {f}")
        x = torch.from_numpy(images).to(self._device).permute(0, 3, 1, 2).float() / 127.5 - 1.0  # (B, 3, H, W)
        dist = self.vae.encode(x).latent_dist
        z = dist.sample(generator=generator) if sample else dist.mode()  # (B, C, h, w)
        return (z - self.vae.config.shift_factor) * self.vae.config.scaling_factor

    # ------------------------------------------------------------------ LoRA
    @property
    def has_lora(self) -> bool:
        return ADAPTER_NAME in (getattr(self.transformer, "peft_config", None) or {})

    def _lora_parameters(self) -> list[torch.nn.Parameter]:
        return [p for n, p in self.transformer.named_parameters() if f".{ADAPTER_NAME}." in n and "lora_" in n]

    def _make_lora_trainable(self) -> None:
        # LoRA weights in float32 whatever the base dtype (upstream casts trainable params to fp32)
        for p in self._lora_parameters():
            p.data = p.data.float()
            p.requires_grad_(True)
        self.lora_config = self.transformer.peft_config[ADAPTER_NAME]

    def add_lora(self, lora: Any = None) -> None:
        """Attach a fresh LoRA (lora_B = 0, so the policy starts equal to the base). See ``lora_config``."""
        if self.has_lora:
            raise ValueError("a LoRA is already attached; merge_lora() it into the base first, "
                             "or load_lora() to replace it")
        self.transformer.add_adapter(lora_config(lora), adapter_name=ADAPTER_NAME)
        self._make_lora_trainable()

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """The LoRA parameters (empty for a policy built with ``lora=False``)."""
        return [p for p in self._lora_parameters() if p.requires_grad]

    def reference(self) -> contextlib.AbstractContextManager:
        """Inside it the policy is the frozen reference: the LoRA switched off (base / merged cold start)."""
        if not self.has_lora:
            return contextlib.nullcontext()  # no adapter: the policy is its own reference
        return adapters_disabled(self.transformer)

    @property
    def has_frozen_reference(self) -> bool:
        """False: ``reference()`` switches the LoRA off."""
        return False

    def train_mode(self, on: bool) -> None:
        """The transformer stays in eval mode (SD3's MMDiT has no active dropout in Flow-GRPO, and the update
        must recompute exactly the rollout's log-probs)."""
        self.transformer.train(False)

    def merge_lora(self, *, new_adapter: bool = True, lora: Any = None) -> None:
        """W <- W + (alpha / r) B A for every LoRA layer; then the adapter is removed and, with
        ``new_adapter``, a fresh one (config ``lora``) is added for GRPO. Afterwards ``reference()``
        is the merged (cold-start) model, as in the counting fork."""
        if not self.has_lora:
            raise ValueError("merge_lora: no LoRA is attached to merge")
        self.transformer.fuse_lora(adapter_names=[ADAPTER_NAME])
        self.transformer.unload_lora()  # replaces the peft layers by their (now merged) base layers
        self.transformer.requires_grad_(False)
        self.lora_config = None
        if new_adapter:
            self.add_lora(lora)

    def save_lora(self, directory: str | Path) -> Path:
        """Write the LoRA alone (``pytorch_lora_weights.safetensors`` with its LoraConfig as metadata)."""
        from diffusers import StableDiffusion3Pipeline
        from peft.utils import get_peft_model_state_dict

        if not self.has_lora:
            raise ValueError("save_lora: no LoRA is attached")
        directory = Path(directory)
        state = get_peft_model_state_dict(self.transformer, adapter_name=ADAPTER_NAME)
        StableDiffusion3Pipeline.save_lora_weights(
            directory, transformer_lora_layers=state,
            # without the metadata diffusers would infer alpha = r on load and change the LoRA's scale
            transformer_lora_adapter_metadata=self.transformer.peft_config[ADAPTER_NAME].to_dict())
        return directory

    def load_lora(self, directory: str | Path) -> None:
        """Attach the LoRA saved by ``save_lora`` in ``directory`` (replacing an attached one), trainable."""
        from safetensors import safe_open

        path = Path(directory) / LORA_WEIGHT_NAME
        if not path.is_file():
            raise ValueError(f"load_lora: {str(directory)!r} holds no {LORA_WEIGHT_NAME} (written by save_lora / "
                             "StableDiffusion3Pipeline.save_lora_weights)")
        with safe_open(str(path), framework="pt") as f:
            n_saved = sum(1 for k in f.keys() if k.startswith("transformer."))
        if n_saved == 0:
            raise ValueError(f"load_lora: {str(path)!r} holds no transformer LoRA weights")
        if self.has_lora:
            self.transformer.unload_lora()  # drop the current adapter (unmerged, so the base is untouched)
        self.pipe.load_lora_weights(str(directory), adapter_name=ADAPTER_NAME)
        if not self.has_lora or len(self._lora_parameters()) != n_saved:
            raise ValueError(f"load_lora: {str(path)!r} holds {n_saved} transformer LoRA tensors but "
                             f"{len(self._lora_parameters())} were attached; was it saved from another base model?")
        self._make_lora_trainable()

    def save_pretrained(self, directory: str | Path) -> Path:
        """Save the whole pipeline (base weights). Refused while a LoRA is attached: the keys would be
        saved peft-wrapped and ``from_pretrained`` would silently re-initialise the attention weights."""
        if self.has_lora:
            raise ValueError("save_pretrained: a LoRA is attached. Save it apart with save_lora(dir) "
                             "(reload with from_pretrained(base, lora_path=dir)), or fold it into the base "
                             "with merge_lora(new_adapter=False) and then save_pretrained")
        self.pipe.save_pretrained(directory)
        return Path(directory)


# ---------------------------------------------------------------------- cold-start data (GPU world)
class ImageFolderCountingDataset(torch.utils.data.Dataset):
    """A Hugging Face ``imagefolder`` directory of counting images for cold-start finetuning.

    Layout: ``folder/metadata.jsonl``, one JSON object per line with ``file_name`` (an image path
    relative to ``folder``), the caption in ``prompt`` (or ``text``), and optionally GenEval fields
    (``tag``, ``include`` = [{"class": str, "count": int}], ``exclude``, ...). Item ``i`` is
    ``{"image": uint8 (H, W, 3), "prompt": str, "metadata": the row without file_name}``.
    ``resolution``: if given, images are resized (shorter side, bicubic) and centre-cropped to
    ``resolution`` x ``resolution``, as diffusers' training scripts do; otherwise returned as stored.
    """

    def __init__(self, folder: str | Path, *, resolution: int | None = None):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise ValueError(f"image folder {str(self.folder)!r} does not exist or is not a directory")
        meta = self.folder / "metadata.jsonl"
        if not meta.is_file():
            raise ValueError(f"image folder {str(self.folder)!r} has no metadata.jsonl (imagefolder layout: images "
                             "plus metadata.jsonl rows with file_name and prompt)")
        if resolution is not None and not (isinstance(resolution, int) and resolution > 0):
            raise ValueError(f"resolution={resolution!r} must be a positive int or None")
        self.resolution = resolution
        self.rows: list[dict] = []
        for lineno, line in enumerate(meta.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            where = f"{meta}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
            self.rows.append(self._check_row(row, where))
        if not self.rows:
            raise ValueError(f"{meta} has no rows")

    def _check_row(self, row: dict, where: str) -> dict:
        name = row.get("file_name")
        if not isinstance(name, str) or not name:
            raise ValueError(f"{where}: file_name must be a non-empty string, got {name!r}")
        if not (self.folder / name).is_file():
            raise ValueError(f"{where}: image file {name!r} not found in {str(self.folder)!r}")
        prompt, text = row.get("prompt"), row.get("text")
        if prompt is not None and text is not None and prompt != text:
            raise ValueError(f"{where}: prompt {prompt!r} and text {text!r} disagree; give one caption")
        caption = prompt if prompt is not None else text
        if not isinstance(caption, str) or not caption:
            raise ValueError(f"{where}: needs a non-empty caption in 'prompt' or 'text', got {caption!r}")
        include = row.get("include")
        if include is not None:
            ok = isinstance(include, list) and all(
                isinstance(c, dict) and isinstance(c.get("class"), str)
                and isinstance(c.get("count"), int) and not isinstance(c.get("count"), bool) and c["count"] >= 1
                for c in include)
            if not ok:
                raise ValueError(f"{where}: include must be a list of {{'class': str, 'count': int >= 1}}, "
                                 f"got {include!r}")
        meta = {k: v for k, v in row.items() if k not in ("file_name", "text")}
        meta["prompt"] = caption
        return {"file_name": name, "prompt": caption, "metadata": meta}

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        from PIL import Image

        row = self.rows[i]
        with Image.open(self.folder / row["file_name"]) as im:
            im = im.convert("RGB")
            if self.resolution is not None:
                r = self.resolution
                w, h = im.size
                s = r / min(w, h)
                im = im.resize((max(r, round(w * s)), max(r, round(h * s))), Image.BICUBIC)
                left, top = (im.width - r) // 2, (im.height - r) // 2
                im = im.crop((left, top, left + r, top + r))
            image = np.asarray(im, dtype=np.uint8).copy()  # (H, W, 3)
        return {"image": image, "prompt": row["prompt"], "metadata": dict(row["metadata"])}
