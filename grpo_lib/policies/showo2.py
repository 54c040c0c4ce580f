r"""Show-o2 as a Flow-GRPO policy: the reversed-time (``noise_at_zero``) adapter, head-only training.

Show-o2 (github.com/showlab/Show-o, folder ``show-o2``) is a Qwen2.5 LLM whose last hidden states go
through a flow head (``diffusion_head_a``: modulated attention blocks, ``diffusion_head_b``: final
layer) that predicts a velocity over Wan2.1-VAE latents. Its flow runs the other way round from SD3
(``transport/path.py``, ``ICPlan``: alpha_t = t on the data, sigma_t = 1 - t on the noise)::

    x_t = (1 - t) x_0 + t x_1,   x_0 ~ N(0, I) (noise),  x_1 ~ p_data,   v_theta(x_t, t) ~ dx_t/dt = x_1 - x_0

so sampling runs t: 0 -> 1 and the network is fed t itself (``TimestepEmbedder`` of t in [0, 1], no
factor 1000). That is exactly ``grpo_lib``'s ``noise_at_zero`` convention, so ``velocity`` returns the
network's output unchanged (no t -> 1 - t, no sign flip); ``grpo_lib.sde.sde_step_with_logprob(...,
convention="noise_at_zero")`` maps it onto the one SDE implementation. In this convention the step is
the Show-o2 write-up's (shared/seeds/003), with the noise level a:

    sigma_t = a sqrt((1 - t) / t)
    x_{t+dt} = (1 - sigma_t^2 dt / (2 (1 - t))) x_t + (1 + sigma_t^2 t / (2 (1 - t))) v dt + sigma_t sqrt(dt) eps

| code name                      | symbol / Show-o2 name                                                    |
|--------------------------------|--------------------------------------------------------------------------|
| ``t``                          | t in [0, 1], 0 = noise, 1 = data (Show-o2's own time, fed as is)          |
| ``x_t``                        | Wan2.1 latent x_t (B, 16, R/8, R/8); R = ``resolution`` (432 -> 54x54)   |
| ``velocity(...)``              | v = v_u + g (v_c - v_u); Show-o2 ``forward(...)[1]`` for [cond; uncond]   |
| ``guidance_scale``             | g; our 1 means "no CFG" (Show-o2's own code uses 0 for that)             |
| ``Cond.tensors["text_tokens"]``| ``prepare_gen_input`` token ids (B, L = ``max_seq_len``), image pads inside |
| ``Cond.tensors["modality_positions"]`` | (B, 1, 2) (offset, length) of the image block (time token + patches) |
| ``Cond.uncond``                | the same for the empty prompt (Show-o2's ``batch_text_tokens_null``)     |
| ``trainable``                  | ``pattern:diffusion`` = ``diffusion_head_a/b`` (the write-up's 0.8B head) |
| ``reference()``                | the frozen initial head swapped in (KL reference; no adapter to switch off) |
| ``decode``                     | ``WanVAE.batch_decode`` of (B, 16, 1, h, w) -> [-1, 1] -> uint8           |

What is VERIFIED and what is ASSUMED (no Show-o2 weights can be downloaded here):

* Verified by reading Show-o2's source (showlab/Show-o, show-o2/): the path / time convention above
  (``transport/path.py``, ``transport/transport.py``), the names ``models.Showo2Qwen2_5``
  (``from_pretrained(path, use_safetensors=False)``, ``forward(text_tokens, image_latents=, t=,
  attention_mask=, modality_positions=, ..., max_seq_len=) -> (logits, v)``, config fields
  ``image_latent_dim``, ``patch_size``, ``add_time_embeds``), ``models.omni_attn_mask_naive(B, L,
  modality_positions, device)``, ``models.WanVAE(vae_pth=, dtype=, device=)`` with ``batch_decode``,
  ``models.misc.get_text_tokenizer`` / ``prepare_gen_input``, the sequence layout
  ``max_text_len = max_seq_len - num_image_tokens - 4`` (``utils.get_hyper_params``), the parameter
  names ``diffusion_head_a`` / ``diffusion_head_b``, and the write-up's sampling call (its
  ``showo2_pipeline_with_logprob``: ``t = 1 - timestep / 1000`` on diffusers' flow-match grid = our
  ``convention_times(N, shift, "noise_at_zero")``; CFG batch [cond; null], ``v_u + g (v_c - v_u)``).
* Run against Show-o2's REAL modeling code (tests/test_showo2_real.py, in Show-o2's own environment,
  ``make showo2-env``: torch 2.5.1, transformers 4.47.0, diffusers 0.31.0, accelerate 0.23.0), with the real
  ``Showo2Qwen2_5`` built from tiny configs (2-layer Qwen2, small SigLIP, the real flow head, the real
  WanVAE with random weights) and loaded through ``from_pretrained(path, use_safetensors=False)``: the
  velocity equals Show-o2's own ``t2i_generate`` for its [cond; null] CFG batch; the attention mask is
  ``omni_attn_mask_naive`` in the weights' dtype (Show-o2 hands it to SDPA as is, so a long mask fails and
  no mask would be causal); bf16 frozen weights with a float32 head run under CPU autocast; decode is
  ``WanVAE.batch_decode``; one GRPO epoch with ``world='showo2'`` changes only ``diffusion_head_a/b``; and
  notebook 00's reversed-time check holds through the real velocity. The real code needed no change to
  the calls below. A fake checkout with the same names (tests/fake_showo2) keeps the adapter tested in
  the main venv, where Show-o2's code does not import.
* Assumed, never run: the real 1.5B model loading (``from_pretrained`` also fetches the Qwen2.5 config
  and SigLIP weights from the hub), the real weights' numerics, bf16 on a GPU, memory and speed on a GPU.

Deliberate differences from the write-up's code: (1) its sampling loop iterates over
``scheduler.timesteps[1:-1]``, i.e. it starts the chain from pure noise at t = 1 - timesteps[1]/1000 > 0
and stops before t = 1; here all ``num_steps`` steps are sampled (noise at t = 0, data at t = 1) and only
the LOSS skips the first and last step (``timestep_strategy="drop_ends"``, 12 -> 10 trained). (2) The
trained head is kept in float32 even when the rest runs in bf16: AdamW steps of lr 5e-6 on weights of
size ~1e-2 are relative changes of ~5e-4, below bf16's resolution 2^-8 ~ 4e-3, so bf16 weights would
simply not move. (3) Paths come from parameters, never hard-coded ``sys.path`` entries.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import math
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Sequence

import numpy as np
import torch

from .base import Cond, FrozenReference, apply_cfg, check_velocity_args, images_to_uint8, select_trainable

# ------------------------------------------------------------------------------------------------
# Constants
# ------------------------------------------------------------------------------------------------
SHOWO2_REPO_URL = "https://github.com/showlab/Show-o"
DEFAULT_CHECKPOINT = "showlab/show-o2-1.5B"            # configs/showo2_1.5b_demo_432x432.yaml
DEFAULT_LLM_PATH = "Qwen/Qwen2.5-1.5B-Instruct"        # its tokenizer (and the LLM config)
DEFAULT_TRAINABLE = "pattern:diffusion"                # the write-up: requires_grad iff "diffusion" in name
VAE_DOWNSAMPLE = 8                                     # Wan2.1 VAE: 8x spatial compression, 16 channels
WEIGHT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

INSTALL_HINT = (f"clone {SHOWO2_REPO_URL} (git clone {SHOWO2_REPO_URL}) and point showo2_repo at its "
                "'show-o2' folder (or at the clone itself); install that folder's requirements.txt on the "
                "GPU node (transformers, einops, timm, ...)")
# show-o2/build_env.sh; envs/showo2-constraints.txt holds them (+ torchvision, peft) for `make showo2-env`
SHOWO2_PINS = ("torch==2.5.1", "transformers==4.47.0", "diffusers==0.31.0", "accelerate==0.23.0", "timm==1.0.12",
               "einops==0.8.0")
SHOWO2_ENV_HINT = ("use Show-o2's own environment, e.g. pip install -c envs/showo2-constraints.txt -e '.[showo2]' "
                   "from grpo_lib's checkout (make showo2-env builds it as .venv-showo2)")
VAE_HINT = ("download Wan2.1_VAE.pth (shipped with the Wan-AI/Wan2.1-T2V-1.3B hub repository) and set "
            "showo2_vae_path to the file")

# The fields that GRPOParams needs for world='showo2' (proposed to the lead; ``from_params`` reads them).
# name -> (default, comment). The checkpoint is GRPOParams.model, the resolution GRPOParams.resolution
# (432 for Show-o2: 27x27 tokens of 2x2 latent patches) and the weight dtype follows mixed_precision.
GRPO_PARAM_FIELDS: dict[str, tuple[Any, str]] = {
    "showo2_repo": ("", "Show-o checkout: its show-o2 folder (or the clone holding it); world showo2"),
    "showo2_vae_path": ("", "Wan2.1_VAE.pth for Show-o2's decoder; world showo2"),
    "showo2_llm_path": (DEFAULT_LLM_PATH, "tokenizer / LLM config Show-o2 was built on; world showo2"),
    "showo2_max_seq_len": (1024, "Show-o2 sequence length: text + image tokens + 4 specials"),
}


class ShowO2SettingsWarning(UserWarning):
    """A Show-o2 setting outside the range the write-up found to work (images degrade / training diverges)."""


# ------------------------------------------------------------------------------------------------
# Parameters of the adapter (plain values; GRPOParams maps onto them in ShowO2Policy.from_params)
# ------------------------------------------------------------------------------------------------
@dataclass
class ShowO2Params:
    """Where Show-o2 lives and how to run it. Checks values on construction; paths in ``check_paths``.

    | field          | meaning                                                                   |
    |----------------|---------------------------------------------------------------------------|
    | ``repo``       | the Show-o checkout: its ``show-o2`` folder (holding ``models/``) or the clone |
    | ``vae_path``   | ``Wan2.1_VAE.pth``                                                         |
    | ``checkpoint`` | ``Showo2Qwen2_5.from_pretrained`` dir or hub id (``showlab/show-o2-1.5B``) |
    | ``llm_path``   | the tokenizer Show-o2 extends (``Qwen/Qwen2.5-1.5B-Instruct``)              |
    | ``resolution`` | image side R in pixels; latent R/8, tokens (R/16)^2 (+1 time token)         |
    | ``max_seq_len``| L = text + image tokens + 4 specials (``<|im_start|> <vision_start> ... <vision_end> eos``) |
    | ``weight_dtype``| frozen weights' dtype; the trained head is float32 (module docstring, point 2) |
    | ``trainable``  | ``pattern:<regex>`` (default ``pattern:diffusion``) or ``all``              |
    """

    repo: str
    vae_path: str
    checkpoint: str = DEFAULT_CHECKPOINT
    llm_path: str = DEFAULT_LLM_PATH
    resolution: int = 432
    max_seq_len: int = 1024
    weight_dtype: str = "bfloat16"
    trainable: str = DEFAULT_TRAINABLE

    def __post_init__(self):
        for name in ("repo", "vae_path", "checkpoint", "llm_path"):
            value = getattr(self, name)
            if not isinstance(value, (str, Path)) or not str(value):
                hint = INSTALL_HINT if name == "repo" else VAE_HINT if name == "vae_path" else \
                    f"e.g. {DEFAULT_CHECKPOINT if name == 'checkpoint' else DEFAULT_LLM_PATH}"
                raise ValueError(f"showo2 {name}={value!r} is empty: {hint}")
        unit = VAE_DOWNSAMPLE * 2                    # VAE factor x Show-o2's 2x2 patches
        if isinstance(self.resolution, bool) or not isinstance(self.resolution, int) or self.resolution < unit \
                or self.resolution % unit:
            raise ValueError(f"resolution={self.resolution!r} must be a positive multiple of {unit} "
                             f"(Wan2.1 VAE x{VAE_DOWNSAMPLE}, 2x2 patches); Show-o2 1.5B was trained at 432")
        if isinstance(self.max_seq_len, bool) or not isinstance(self.max_seq_len, int) or self.max_seq_len < 1:
            raise ValueError(f"max_seq_len={self.max_seq_len!r} must be a positive int (Show-o2 432px: 1024)")
        if self.weight_dtype not in WEIGHT_DTYPES:
            raise ValueError(f"weight_dtype={self.weight_dtype!r} is not one of {sorted(WEIGHT_DTYPES)}")
        if not isinstance(self.trainable, str) or not (self.trainable == "all" or self.trainable.startswith("pattern:")):
            raise ValueError(f"trainable={self.trainable!r} must be 'all' or 'pattern:<regex>' for Show-o2 "
                             f"(the head's own weights train; the write-up uses {DEFAULT_TRAINABLE!r}); "
                             "there is no LoRA path for Show-o2")

    def check_paths(self) -> Path:
        """The checkout's ``show-o2`` directory; ValueError naming what is missing and what to do."""
        if not Path(self.vae_path).is_file():
            raise ValueError(f"showo2 vae_path={str(self.vae_path)!r} is not a file: {VAE_HINT}")
        return checkout_dir(self.repo)


# ------------------------------------------------------------------------------------------------
# Lazy import of a Show-o2 checkout
# ------------------------------------------------------------------------------------------------
@dataclass
class ShowO2Modules:
    """What the adapter takes from a Show-o2 checkout (its ``models`` package, imported under a private name)."""

    root: Path                       # the show-o2 folder
    models: ModuleType               # show-o2/models (imported as ``_showo2_models_<hash>``)
    misc: ModuleType                 # show-o2/models/misc.py
    Showo2Qwen2_5: Any
    WanVAE: Any
    omni_attn_mask_naive: Any
    get_text_tokenizer: Any
    prepare_gen_input: Any


def checkout_dir(repo: str | Path) -> Path:
    """``repo`` itself if it holds ``models/__init__.py`` (the show-o2 folder), else ``repo/show-o2``."""
    if not isinstance(repo, (str, Path)) or not str(repo):
        raise ValueError(f"showo2_repo={repo!r} is empty: {INSTALL_HINT}")
    root = Path(repo).expanduser().resolve()
    if not root.is_dir():
        raise ValueError(f"showo2_repo={str(repo)!r} is not a directory: {INSTALL_HINT}")
    for candidate in (root, root / "show-o2"):
        if (candidate / "models" / "__init__.py").is_file():
            return candidate
    raise ValueError(f"showo2_repo={str(repo)!r} holds neither models/__init__.py nor show-o2/models/__init__.py, "
                     f"so it is not a Show-o2 checkout: {INSTALL_HINT}")


def load_showo2_modules(repo: str | Path) -> ShowO2Modules:
    """Import Show-o2's ``models`` package from the checkout at ``repo``, lazily and without side effects.

    The package is imported under a private name derived from its path (``_showo2_models_<hash>``), so it
    cannot collide with any other top-level ``models`` package, and two checkouts can be loaded side by
    side. The checkout directory is put at the front of ``sys.path`` only while the package executes (its
    files import relative siblings; a top-level import of the checkout's ``transport`` / ``utils`` would
    resolve too) and removed afterwards. A second call returns the already-imported package.

    Raises ValueError when the path is not a checkout, ImportError (naming the missing module) when
    the checkout's own dependencies are not installed.
    """
    root = checkout_dir(repo)
    alias = "_showo2_models_" + hashlib.sha1(str(root).encode()).hexdigest()[:12]
    pkg = sys.modules.get(alias)
    if pkg is None:
        spec = importlib.util.spec_from_file_location(alias, root / "models" / "__init__.py",
                                                      submodule_search_locations=[str(root / "models")])
        pkg = importlib.util.module_from_spec(spec)
        sys.modules[alias] = pkg
        entry = str(root)
        sys.path.insert(0, entry)
        try:
            spec.loader.exec_module(pkg)
        except ImportError as e:
            for name in [n for n in sys.modules if n == alias or n.startswith(alias + ".")]:
                del sys.modules[name]
            module = getattr(e, "name", None)
            if isinstance(e, ModuleNotFoundError):
                what = (f"The module {module!r} is missing: install the checkout's requirements "
                        f"({root / 'requirements.txt'}) in this environment or {SHOWO2_ENV_HINT}; ")
            else:   # the module is there but lacks a name: a version Show-o2's code does not work with
                what = (f"{module!r} is installed but not at a version Show-o2's code works with; "
                        f"Show-o2 pins {', '.join(SHOWO2_PINS)}: {SHOWO2_ENV_HINT}; ")
            raise ImportError(f"importing Show-o2's models package from {str(root)!r} failed: {e}. {what}"
                              f"{INSTALL_HINT}") from e
        finally:
            if entry in sys.path:
                sys.path.remove(entry)
    misc = importlib.import_module(alias + ".misc")
    wanted = {"Showo2Qwen2_5": pkg, "WanVAE": pkg, "omni_attn_mask_naive": pkg,
              "get_text_tokenizer": misc, "prepare_gen_input": misc}
    missing = [n for n, mod in wanted.items() if not hasattr(mod, n)]
    if missing:
        raise ValueError(f"the checkout at {str(root)!r} lacks {missing}: it is not the Show-o2 code this "
                         f"adapter was written against ({SHOWO2_REPO_URL}, show-o2/models)")
    return ShowO2Modules(root=root, models=pkg, misc=misc, **{n: getattr(mod, n) for n, mod in wanted.items()})


# ------------------------------------------------------------------------------------------------
# The write-up's sampling / training settings, validated
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ShowO2Settings:
    """Validated Show-o2 GRPO settings (see :func:`validate_showo2_settings`)."""

    noise_level: float
    num_steps: int
    timestep_strategy: str
    lr: float
    trained_steps: tuple[int, ...]   # step indices j the loss uses (drop_ends, N=12: 1..10)
    batches_per_epoch: int           # N_b = M / (P * B / G)
    arith: Any = field(repr=False)   # grpo_lib.grpo.BatchArithmetic


NOISE_LEVEL_RANGE = (0.1, 0.5)       # the write-up: images do not degrade much inside it
WRITEUP_NUM_STEPS = 12               # 12 sampled, first and last dropped -> the paper's 10 trained
WRITEUP_LR = 5e-6                    # head-only; 5e-5 diverged
LR_WARN_ABOVE = 1e-5


def validate_showo2_settings(noise_level: float, num_steps: int, timestep_strategy: str, lr: float,
                             num_processes: int, batch_size: int, group_size: int,
                             groups_per_epoch: int) -> ShowO2Settings:
    r"""Check the Show-o2 write-up's sampling / optimisation settings; warn where it found trouble.

    | argument            | write-up (shared/seeds/003)                   | rule here                          |
    |---------------------|-----------------------------------------------|------------------------------------|
    | ``noise_level``     | a in sigma_t = a sqrt((1-t)/t): 0.1 ~ 0.5     | > 0 (else ValueError); outside [0.1, 0.5] warns |
    | ``num_steps``       | 12 (first and last dropped -> 10, the paper's T) | >= 3 with drop_ends; != 12 warns |
    | ``timestep_strategy``| drop the first and last step                 | a valid strategy; not ``drop_ends`` warns |
    | ``lr``              | 5e-6 (5e-5 diverged)                          | > 0; above 1e-5 warns              |
    | batch arithmetic    | N_b = M / (gpus * B / G) (``int(16/(...))`` truncated) | must divide exactly (ValueError) |

    Why the ends: sigma_t = a sqrt((1-t)/t) diverges at t = 0 (the first step runs on the schedule's
    stand-in, ``grpo_lib.sde``), and the last step's Gaussian is so sharp (std -> 0 as t -> 1) that its
    log-prob ratios explode while it barely changes the image. Warnings are
    :class:`ShowO2SettingsWarning` and name the value; bad values raise ValueError.

    Returns a :class:`ShowO2Settings` with the trained step indices and N_b.
    """
    from grpo_lib.grpo import batches_per_epoch_from_groups, check_batch_arithmetic, select_timesteps

    from grpo_lib.params import check_knob
    # the shared params rules (GRPOParams applies the same ones): one message per knob
    check_knob("noise_level", noise_level, low_open=True, why=" (GRPO needs stochastic steps)")
    lo, hi = NOISE_LEVEL_RANGE
    if not lo <= noise_level <= hi:
        warnings.warn(f"noise_level={noise_level} is outside [{lo}, {hi}], the range in which the Show-o2 write-up "
                      "found its SDE samples still clean; expect degraded images", ShowO2SettingsWarning, stacklevel=2)
    check_knob("num_steps", num_steps)
    check_knob("lr", lr)
    # select_timesteps validates the strategy name and that steps remain (drop_ends needs N >= 3)
    try:
        steps = select_timesteps(timestep_strategy, int(num_steps), 1)[0]
    except ValueError as e:
        raise ValueError(f"timestep_strategy={timestep_strategy!r} with num_steps={num_steps}: {e}") from e
    if timestep_strategy != "drop_ends":
        warnings.warn(f"timestep_strategy={timestep_strategy!r}: the Show-o2 write-up drops the first step "
                      "(sigma_t = a sqrt((1-t)/t) diverges at t=0) and the last (too sharp) from training; "
                      "use 'drop_ends'", ShowO2SettingsWarning, stacklevel=2)
    if num_steps != WRITEUP_NUM_STEPS:
        warnings.warn(f"num_steps={num_steps}: the Show-o2 write-up samples {WRITEUP_NUM_STEPS} steps and trains the "
                      f"{WRITEUP_NUM_STEPS - 2} inner ones (the paper's T=10)", ShowO2SettingsWarning, stacklevel=2)
    if lr > LR_WARN_ABOVE:
        warnings.warn(f"lr={lr:g} is above {LR_WARN_ABOVE:g}: the Show-o2 write-up's head-only training diverged at "
                      f"5e-5 and uses {WRITEUP_LR:g}", ShowO2SettingsWarning, stacklevel=2)
    nb = batches_per_epoch_from_groups(groups_per_epoch, num_processes, batch_size, group_size)
    arith = check_batch_arithmetic(num_processes, batch_size, group_size, batches_per_epoch=nb)
    return ShowO2Settings(float(noise_level), int(num_steps), timestep_strategy, float(lr),
                          tuple(int(j) for j in steps), nb, arith)


# ------------------------------------------------------------------------------------------------
# The policy
# ------------------------------------------------------------------------------------------------
def _batch_time(t, batch: int, device) -> torch.Tensor:
    """A float / 0-d / (B,) time in [0, 1] -> float32 (B,) on ``device``."""
    if isinstance(t, torch.Tensor):
        tt = t.detach().to(device=device, dtype=torch.float32)
        if tt.dim() == 0:
            tt = tt.expand(batch)
        elif tt.shape != (batch,):
            raise ValueError(f"t has shape {tuple(t.shape)}; expected a float, a 0-d tensor or shape ({batch},)")
    elif isinstance(t, (int, float, np.floating, np.integer)) and not isinstance(t, bool):
        tt = torch.full((batch,), float(t), dtype=torch.float32, device=device)
    else:
        raise ValueError(f"t={t!r} must be a float or a tensor of shape ({batch},)")
    if not torch.isfinite(tt).all() or (tt < 0).any() or (tt > 1).any():
        raise ValueError(f"t={tt.tolist() if tt.numel() <= 8 else 'tensor'} must lie in [0, 1]")
    return tt


class ShowO2Policy:
    """Show-o2 behind the ``grpo_lib.policies.base.Policy`` contract, convention ``noise_at_zero``.

    Build it with :meth:`from_params` (GRPOParams, what ``train.load_policy_for`` calls for
    ``world='showo2'``) or :meth:`from_showo2_params` (:class:`ShowO2Params`). The constructor takes
    already-loaded parts, so tests can hand it anything with Show-o2's interface.

    Trainable parameters are chosen by name (``trainable``: ``pattern:<regex>`` searched in the
    parameter name, or ``all``) through ``grpo_lib.policies.base.select_trainable``; everything else is frozen.
    ``reference()`` swaps a frozen copy of the initial trainable weights in (the KL reference).
    """

    convention = "noise_at_zero"

    def __init__(self, model: torch.nn.Module, tokenizer, token_ids: dict[str, int], vae, modules: ShowO2Modules,
                 *, resolution: int = 432, max_seq_len: int = 1024, trainable: str = DEFAULT_TRAINABLE,
                 weight_dtype: torch.dtype = torch.float32, frozen_reference: bool = True):
        if trainable == "lora":
            raise ValueError("trainable='lora' is not available for Show-o2: its head's own weights train; use "
                             f"{DEFAULT_TRAINABLE!r} (the write-up's head-only run) or 'all' (full finetuning)")
        self.model, self.tokenizer, self.vae, self.modules = model, tokenizer, vae, modules
        self.token_ids = dict(token_ids)
        self.weight_dtype = weight_dtype
        cfg = model.config
        self.patch_size = int(cfg.patch_size)
        self.latent_channels = int(cfg.image_latent_dim)
        side = resolution // VAE_DOWNSAMPLE
        if resolution % (VAE_DOWNSAMPLE * self.patch_size):
            raise ValueError(f"resolution={resolution} must be a multiple of {VAE_DOWNSAMPLE * self.patch_size} "
                             f"(VAE x{VAE_DOWNSAMPLE}, patch {self.patch_size})")
        self.latent_shape = (self.latent_channels, side, side)                  # (C, H/8, W/8)
        # the image block: one time token (add_time_embeds) + (side/p)^2 patch tokens
        self.num_image_tokens = (side // self.patch_size) ** 2 + int(bool(getattr(cfg, "add_time_embeds", True)))
        self.max_seq_len = int(max_seq_len)
        self.max_text_len = self.max_seq_len - self.num_image_tokens - 4       # utils.get_hyper_params
        if self.max_text_len < 1:
            raise ValueError(f"max_seq_len={max_seq_len} leaves no room for text: {self.num_image_tokens} image tokens "
                             f"(resolution {resolution}) + 4 special tokens; raise max_seq_len")
        # 1. freeze all but the selected parameters (the write-up: requires_grad iff "diffusion" in name)
        model.eval()
        self.trainable_names = select_trainable(model, trainable)
        self.trainable = trainable
        named = dict(model.named_parameters())
        self._trainable = [named[n] for n in self.trainable_names]
        # 2. the trained weights in float32 whatever the rest is (bf16 cannot hold lr-5e-6 updates)
        with torch.no_grad():
            for q in self._trainable:
                if q.dtype != torch.float32:
                    q.data = q.data.float()
        # 3. the KL reference: a frozen copy of the initial trainable weights
        self._frozen = FrozenReference(self._trainable) if frozen_reference else None

    # -------------------------------------------------------------- construction
    @classmethod
    def from_showo2_params(cls, sp: ShowO2Params, *, device: str | torch.device = "cpu",
                           frozen_reference: bool = True) -> "ShowO2Policy":
        """Import the checkout, load tokenizer, model and VAE as Show-o2's ``inference_t2i.py`` does."""
        root = sp.check_paths()
        mods = load_showo2_modules(root)
        dtype = WEIGHT_DTYPES[sp.weight_dtype]
        try:
            tokenizer, token_ids = mods.get_text_tokenizer(sp.llm_path, add_showo_tokens=True,
                                                           return_showo_token_ids=True, llm_name="qwen2_5")
        except (OSError, ValueError) as e:
            raise ValueError(f"could not load Show-o2's tokenizer from llm_path={sp.llm_path!r}: {e}; point "
                             f"showo2_llm_path at a local copy or a hub id such as {DEFAULT_LLM_PATH!r}") from e
        try:
            model = mods.Showo2Qwen2_5.from_pretrained(sp.checkpoint, use_safetensors=False)
        except (OSError, ValueError) as e:
            raise ValueError(f"could not load the Show-o2 checkpoint model={sp.checkpoint!r}: {e}; set model to a "
                             f"local directory or a hub id such as {DEFAULT_CHECKPOINT!r}") from e
        model.to(device=device, dtype=dtype)
        vae = mods.WanVAE(vae_pth=str(sp.vae_path), dtype=dtype, device=device)
        return cls(model, tokenizer, token_ids, vae, mods, resolution=sp.resolution, max_seq_len=sp.max_seq_len,
                   trainable=sp.trainable, weight_dtype=dtype, frozen_reference=frozen_reference)

    @classmethod
    def from_params(cls, p, device: str | torch.device = "cpu") -> "ShowO2Policy":
        """The policy a ``GRPOParams`` with ``world='showo2'`` asks for (``train.load_policy_for``).

        Reads ``GRPO_PARAM_FIELDS`` (showo2_repo, showo2_vae_path, showo2_llm_path, showo2_max_seq_len),
        ``model`` (the checkpoint), ``resolution``, ``trainable`` and ``mixed_precision`` (bf16 / fp16 ->
        the frozen weights' dtype), checks ``convention == 'noise_at_zero'`` and the write-up's settings
        (:func:`validate_showo2_settings`, with the process count from accelerate).
        """
        missing = [f for f in GRPO_PARAM_FIELDS if not hasattr(p, f)]
        if missing:
            raise ValueError(f"{type(p).__name__} has no field(s) {missing}, which world='showo2' needs; add them "
                             "(defaults and comments: grpo_lib.policies.showo2.GRPO_PARAM_FIELDS)")
        if p.convention != "noise_at_zero":
            raise ValueError(f"convention={p.convention!r} but Show-o2 runs in 'noise_at_zero' (noise at t=0, data "
                             "at t=1); set convention: noise_at_zero")
        from accelerate import PartialState

        from grpo_lib.grpo import check_batch_arithmetic

        nproc = PartialState().num_processes
        groups = check_batch_arithmetic(nproc, p.batch_size, p.group_size,
                                        batches_per_epoch=p.batches_per_epoch).groups_per_epoch
        validate_showo2_settings(p.noise_level, p.num_steps, p.timestep_strategy, p.lr, nproc, p.batch_size,
                                 p.group_size, groups)
        dtype = {"no": "float32", "bf16": "bfloat16", "fp16": "float16"}[p.mixed_precision]
        sp = ShowO2Params(repo=p.showo2_repo, vae_path=p.showo2_vae_path, checkpoint=p.model,
                          llm_path=p.showo2_llm_path, resolution=p.resolution, max_seq_len=p.showo2_max_seq_len,
                          weight_dtype=dtype, trainable=p.trainable)
        return cls.from_showo2_params(sp, device=device)

    # -------------------------------------------------------------- basics
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return self.weight_dtype

    def _autocast(self):
        """Frozen bf16/fp16 weights + a float32 head need autocast to meet in one matmul."""
        if self.weight_dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.weight_dtype)

    # -------------------------------------------------------------- conditioning
    def encode(self, prompts: Sequence[str]) -> Cond:
        """Prompts -> Show-o2's generation sequences (``prepare_gen_input``): text tokens with the image
        block's placeholders, (B, L); modality positions (B, 1, 2); and the empty-prompt twins for CFG."""
        if isinstance(prompts, str) or not isinstance(prompts, Sequence) or len(prompts) == 0 \
                or not all(isinstance(q, str) for q in prompts):
            raise ValueError(f"prompts must be a non-empty list of strings, got {prompts!r}")
        for q in prompts:   # prepare_gen_input would cut silently
            n = len(self.tokenizer(q, add_special_tokens=False)["input_ids"])
            if n > self.max_text_len:
                raise ValueError(f"prompt {q!r} has {n} tokens; at most max_text_len={self.max_text_len} fit "
                                 f"(max_seq_len={self.max_seq_len} - {self.num_image_tokens} image tokens - 4)")
        ids = self.token_ids
        tok, tok_null, pos, pos_null = self.modules.prepare_gen_input(
            list(prompts), self.tokenizer, self.num_image_tokens, ids["bos_id"], ids["eos_id"], ids["boi_id"],
            ids["eoi_id"], self.tokenizer.pad_token_id, ids["img_pad_id"], self.max_text_len, self.device)
        return Cond({"text_tokens": tok, "modality_positions": pos},                  # (B, L), (B, 1, 2)
                    {"text_tokens": tok_null, "modality_positions": pos_null})

    # -------------------------------------------------------------- the network
    def _forward(self, x: torch.Tensor, t: torch.Tensor, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """One Show-o2 forward (with grad if enabled): v (n, C, H, W) float32 for latents x (n, C, H, W), t (n,)."""
        mask = self.modules.omni_attn_mask_naive(tokens.size(0), self.max_seq_len, positions,
                                                 self.device).to(self.weight_dtype)    # (n, 1, L, L) additive
        with self._autocast():
            _, v = self.model(tokens, image_latents=x.to(self.weight_dtype), t=t, attention_mask=mask,
                              modality_positions=positions, first_frame_as_cond=False,
                              only_denoise_last_image=False, guidance_scale=0.0, output_hidden_states=True,
                              max_seq_len=self.max_seq_len)
        return v.float()

    def velocity(self, x_t: torch.Tensor, t: torch.Tensor | float, cond: Cond,
                 guidance_scale: float = 1.0) -> torch.Tensor:
        """v_theta(x_t, t | c) in Show-o2's own time (t: 0 noise -> 1 data), CFG v_u + g (v_c - v_u) when g != 1.

        x_t (B, C, H, W) -> v (B, C, H, W) float32. The network's output is returned as is: Show-o2 already
        predicts dx_t/dt = x_1 - x_0 in the ``noise_at_zero`` convention. No ``no_grad`` (GRPO
        differentiates through it); Show-o2's ``t2i_generate`` is decorated with ``no_grad``, so it is not used.
        """
        B = check_velocity_args(x_t, cond, guidance_scale, self.latent_shape)
        dev = self.device
        tt = _batch_time(t, B, dev)                                                    # (B,)
        x = x_t.to(dev)
        tok = cond.tensors["text_tokens"].to(dev)                                      # (B, L)
        pos = cond.tensors["modality_positions"].to(dev)                               # (B, 1, 2)
        if guidance_scale == 1:
            return self._forward(x, tt, tok, pos)
        if not cond.uncond:
            raise ValueError(f"guidance_scale={guidance_scale} needs cond.uncond (the empty-prompt branch)")
        # the write-up's CFG batch: [cond; null], v_cond, v_uncond = chunk(v, 2)
        tok2 = torch.cat([tok, cond.uncond["text_tokens"].to(dev)])                    # (2B, L)
        pos2 = torch.cat([pos, cond.uncond["modality_positions"].to(dev)])             # (2B, 1, 2)
        v_c, v_u = self._forward(torch.cat([x, x]), torch.cat([tt, tt]), tok2, pos2).chunk(2)
        return apply_cfg(v_u, v_c, guidance_scale)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """Wan2.1 latents (B, C, H/8, W/8) -> uint8 (B, H, W, 3): ``WanVAE.batch_decode`` of a 1-frame video."""
        if not isinstance(latents, torch.Tensor) or latents.dim() != 4 or tuple(latents.shape[1:]) != self.latent_shape:
            raise ValueError(f"latents must have shape (B, {', '.join(map(str, self.latent_shape))}), got "
                             f"{tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__}")
        video = self.vae.batch_decode(latents.to(self.device, torch.float32).unsqueeze(2))   # (B, 3, 1, H, W)
        return images_to_uint8(video.squeeze(2))

    # -------------------------------------------------------------- training
    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """The selected parameters (``diffusion_head_a/b`` by default), float32, requires_grad."""
        return list(self._trainable)

    @property
    def has_frozen_reference(self) -> bool:
        """True when ``reference()`` swaps in its own frozen copy, so a trainer need not keep a second one
        (for the 0.8B head a second float32 copy is 3.2 GB of GPU memory)."""
        return self._frozen is not None

    def save_lora(self, directory) -> Path:
        raise ValueError("ShowO2Policy trains its head's own weights, not a LoRA: its checkpoint is the trainer "
                         "state's 'trainable' tensors")

    def train_mode(self, on: bool) -> None:
        """The model stays in eval mode (rollout and update must compute the same log-probs)."""
        self.model.train(False)

    def reference(self) -> contextlib.AbstractContextManager:
        """Inside it the policy is the frozen reference: the initial trainable weights swapped in
        (restored on exit, also on error)."""
        if self._frozen is None:
            raise ValueError("this ShowO2Policy was built with frozen_reference=False, so it keeps no copy of its "
                             "initial weights; the trainer's FrozenReference must provide the KL reference")
        return self._frozen.swapped_in()
