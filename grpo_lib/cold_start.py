r"""Cold start: LoRA finetuning of the base on an exact-count dataset before RL (seed 000, improvement 1).

The counting fork first finetuned SD3.5-Medium on a custom counting dataset, then ran Flow-GRPO from
there. Here the supervised stage minimises the rectified-flow loss (``grpo_lib.flow_matching``) over a
LoRA on the base's denoiser:

    min_{A, B}  E_{(x_0, c), eps, sigma} [ w(sigma) || v_{W + (alpha/r) B A}(x_t, t | c~) - v* ||^2 ],
    c~ = ""  with probability ``caption_dropout`` (keeps classifier-free guidance working), else c

| code name                     | symbol / meaning                                                      |
|-------------------------------|-----------------------------------------------------------------------|
| ``lora_rank``, ``lora_alpha`` | r, alpha; the LoRA update is (alpha / r) B A (B = 0 at start)          |
| ``lora_target_modules``       | the layers W that get a B A (empty: the policy's ``DEFAULT_LORA``)     |
| ``x0``                        | x_0: a rendered exact-count scene (embedded, pixels in [-1, 1]) or the VAE latent of an image-folder image (sd3) |
| ``logit_mean``, ``logit_std``, ``timestep_shift`` | sigma's logit-normal density and shift (``flow_matching.sample_timesteps``) |
| ``weighting``                 | w(sigma) (``flow_matching.loss_weight``)                               |
| ``batch_size`` x ``grad_accum`` x processes | samples per optimizer step                              |
| ``prior_mix``                 | share of x_0 replayed from the base's pretraining scenes (prior preservation, embedded) |
| ``count_weight_power``        | k: a row asking for N objects is drawn with probability proportional to N^k (embedded; 0: uniform) |

Data. Embedded world: ``scenes.ExactCountDataset`` renders, for each sample, a scene with exactly the
count its prompt row asks for (``data/counting/train.jsonl``: counts 1-10, captions that always say the
number, unlike the base's web captions). GPU world: a Hugging Face ``imagefolder`` directory with a
``metadata.jsonl`` (``policies.sd3.ImageFolderCountingDataset``), VAE-encoded once up front.
Every sample has a global position (optimizer step, micro-batch, process, slot); its scene / image and
its caption dropout, noise level and noise all come from generators keyed on (seed, position)
(``train.sample_seed``). So batch 8 equals batch 4 accumulated twice, the same global batch split over
processes trains alike, and a resumed run repeats an uninterrupted one exactly.

Machinery: ``accelerate`` places the model (``Accelerator``), accumulates gradients
(``accelerator.accumulate``), runs mixed precision (``mixed_precision``); gradients of the LoRA are
averaged over processes by an explicit all-reduce (as the GRPO trainer does, so the policy object is
never wrapped). Outputs under ``run_dir/cold_start/``:

| path                                   | what                                                          |
|----------------------------------------|---------------------------------------------------------------|
| ``checkpoints/step_XXXXXX/``, ``latest`` | atomic checkpoints (``lora/`` + ``state.pt``); ``resume: true`` continues |
| ``loss.csv``, ``loss.png``             | the loss curve                                                 |
| ``eval_{before,after}.csv`` / ``_images.npz`` | per-image found counts and images (same seeds before and after) |
| ``accuracy_before_after.csv``          | exact-count accuracy per count with Wilson intervals, before and after |
| ``grid_before_after.png``              | the same seeds drawn by the base and by the finetuned model   |
| ``lora/``                              | the LoRA (GRPO: ``cold_start_lora: <run_dir>/cold_start/lora``) |
| ``merged/``                            | base with the LoRA folded in (GRPO: ``model: <run_dir>/cold_start/merged``) |
| ``summary.json``                       | steps, minutes, losses, accuracies, merge check               |

    python -m grpo_lib.cold_start params/01_cold_start__default.yaml
    accelerate launch -m grpo_lib.cold_start params/01_cold_start__sd35m.yaml      # GPU node
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import sys
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from grpo_lib.params import check_knobs
from . import checkpoints, progress
from .checkpoints import atomic_save_dir, atomic_write_text
from .flow_matching import WEIGHTINGS, flow_matching_loss, sample_timesteps
from .lr_schedule import LR_SCHEDULES, learning_rate
from .sde import draw_noise
from .seeding import sample_seed
from .train import _flat_allreduce_mean

WORLDS = ("embedded", "sd3")
MIXED_PRECISIONS = ("no", "fp16", "bf16")


# ---------------------------------------------------------------------------------------------
# Parameters
# ---------------------------------------------------------------------------------------------
@dataclass
class ColdStartParams:
    """Fields of notebooks/01_cold_start.ipynb's parameters cell (and of params/01_cold_start__*.yaml)."""
    run_dir: str = "runs/dev"                          # where outputs go (run_dir/cold_start/)
    world: str = "embedded"                            # embedded | sd3
    model: str = "data/checkpoints/tiny-base"          # base checkpoint dir (sd3: dir or hub id)
    convention: str = "noise_at_one"                   # embedded: time convention the policy runs in
    prompts: str = "data/counting/train.jsonl"         # embedded: rows whose exact-count scenes are rendered
    image_folder: str = ""                             # sd3: imagefolder dir with metadata.jsonl
    resolution: int = 0                                # image size; 0 means the default (embedded 32, sd3 512)
    lora_rank: int = 8                                 # LoRA r
    lora_alpha: int = 8                                # LoRA alpha (scale alpha / r)
    lora_target_modules: list[str] = field(default_factory=list)  # module names the LoRA wraps (empty: the policy's default)
    lr: float = 1e-3                                   # AdamW learning rate
    lr_warmup_steps: int = 20                          # linear warmup steps
    lr_schedule: str = "constant"                      # after warmup: constant | cosine (to 0 at ``steps``)
    weight_decay: float = 1e-4                         # AdamW weight decay
    steps: int = 400                                   # optimizer steps
    batch_size: int = 32                               # samples per micro-batch per process
    grad_accum: int = 1                                # micro-batches per optimizer step
    max_grad_norm: float = 1.0                         # gradient clipping (0 disables it)
    caption_dropout: float = 0.1                       # probability of training on the empty prompt (CFG)
    prior_mix: float = 0.0                             # embedded: share of samples replayed from the base's pretraining scenes
    count_weight_power: float = 0.0                    # embedded: draw a row asking for N objects with weight N^k (0: uniform)
    logit_mean: float = 0.0                            # m of the logit-normal noise level
    logit_std: float = 1.0                             # s of the logit-normal noise level
    timestep_shift: float = 1.0                        # shift of the training noise level (SD3.5: 3.0)
    weighting: str = "none"                            # loss weighting: none | sigma_sqrt | cosmap
    mixed_precision: str = "no"                        # no | fp16 | bf16
    seed: int = 0                                      # data, noise and eval seeds are keyed on it
    checkpoint_every: int = 100                        # optimizer steps between checkpoints
    resume: bool = False                               # continue from run_dir/cold_start/checkpoints/latest
    time_budget_minutes: float = 0.0                   # stop training after this many minutes (0: none)
    eval_prompts: str = "data/counting/val.jsonl"      # val rows for the before/after table (test: final figures only)
    eval_prompts_per_count: int = 4                    # eval prompts per requested count
    eval_images_per_prompt: int = 4                    # images per eval prompt (same seeds before/after)
    eval_num_steps: int = 20                           # ODE steps at evaluation
    eval_guidance_scale: float = 3.0                   # CFG scale at evaluation
    eval_shift: float = 1.0                            # sampling-schedule shift at evaluation (SD3.5: 3.0)
    eval_batch_size: int = 64                          # images per sampling batch at evaluation
    reward_server_url: str = ""                        # sd3: counting server for found counts (empty: none)
    save_merged: bool = True                           # also save the base with the LoRA merged in
    num_threads: int = 0                               # torch.set_num_threads (0 leaves it alone)
    num_processes: int = 1                             # >1: train() runs under accelerate launch (CPU: 1 thread each)
    progress: bool = True                              # tqdm bars

    def __post_init__(self):
        from .policies.base import check_convention

        if self.world not in WORLDS:
            raise ValueError(f"world={self.world!r} is not one of {WORLDS}")
        if self.mixed_precision not in MIXED_PRECISIONS:
            raise ValueError(f"mixed_precision={self.mixed_precision!r} is not one of {MIXED_PRECISIONS}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule={self.lr_schedule!r} is not one of {LR_SCHEDULES}")
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"weighting={self.weighting!r} is not one of {WEIGHTINGS}")
        check_convention(self.convention)
        check_knobs(self)
        for name in ("steps", "grad_accum", "checkpoint_every", "num_processes",
                     "eval_prompts_per_count", "eval_images_per_prompt", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        for name in ("lr_warmup_steps", "resolution", "num_threads"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0")
        for name in ("logit_std", "timestep_shift", "eval_shift"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}={getattr(self, name)} must be > 0")
        for name in ("max_grad_norm", "time_budget_minutes", "weight_decay", "eval_guidance_scale"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0")
        if not 0 <= self.caption_dropout < 1:
            raise ValueError(f"caption_dropout={self.caption_dropout} must be in [0, 1)")
        if not 0 <= self.prior_mix < 1:
            raise ValueError(f"prior_mix={self.prior_mix} must be in [0, 1)")
        if any(not isinstance(t, str) or not t for t in self.lora_target_modules):
            raise ValueError(f"lora_target_modules={self.lora_target_modules!r} must be module names (non-empty "
                             "strings such as 'to_q' or 'time_emb_proj'); [] keeps the policy's default")
        if not math.isfinite(self.count_weight_power):
            raise ValueError(f"count_weight_power={self.count_weight_power} must be a finite number")
        if self.world == "sd3" and self.count_weight_power:
            raise ValueError(f"count_weight_power={self.count_weight_power} weights the embedded world's prompt rows; "
                             "world='sd3' trains on its image folder as it is (0 here)")
        if self.world == "sd3" and self.prior_mix:
            raise ValueError(f"prior_mix={self.prior_mix} replays the embedded world's pretraining scenes; "
                             "world='sd3' has none here (put the base's own images in the image folder instead)")
        if self.world == "embedded" and not self.prompts:
            raise ValueError("world='embedded' renders its training scenes from prompts (a JSONL of counting rows); "
                             "prompts is empty")
        if self.world == "sd3" and not self.image_folder:
            raise ValueError("world='sd3' trains on an image folder (imagefolder layout with metadata.jsonl); "
                             "image_folder is empty")
        if self.world == "embedded" and self.image_folder:
            raise ValueError(f"image_folder={self.image_folder!r} is for world='sd3'; the embedded world renders "
                             "its scenes from prompts")
        if self.world == "embedded" and self.reward_server_url:
            raise ValueError("reward_server_url is for world='sd3'; the embedded world counts with ShapeCounter")

    @property
    def out_dir(self) -> Path:
        return Path(self.run_dir) / "cold_start"


# ---------------------------------------------------------------------------------------------
# Policy and data
# ---------------------------------------------------------------------------------------------
def build_policy(p: ColdStartParams, device) -> Any:
    """The base model of ``p.model`` with a fresh LoRA (r = ``lora_rank``, alpha = ``lora_alpha``, B = 0),
    initialised under a generator keyed on ``p.seed`` (:func:`grpo_lib.checkpoints.build_policy`)."""
    policy = checkpoints.build_policy(p, device, stream="cold_start_lora_init", merges=[], trainable="lora")
    if p.world == "embedded" and p.resolution and p.resolution != policy.config.image_size:
        raise ValueError(f"resolution={p.resolution} but the embedded checkpoint {p.model!r} draws "
                         f"{policy.config.image_size}x{policy.config.image_size}; use 0 (the model's own)")
    return policy


def denoiser(policy) -> torch.nn.Module:
    """The module that holds the LoRA (the tiny UNet or the SD3 MMDiT)."""
    for name in ("unet", "transformer"):
        if getattr(policy, name, None) is not None:
            return getattr(policy, name)
    raise ValueError(f"{type(policy).__name__} has neither .unet nor .transformer; cold start needs one")


class EmbeddedCountingData:
    """Exact-count scenes for the rows of ``prompts`` (``scenes.ExactCountDataset``), one fresh scene per position.

    With ``prior_mix`` = p > 0, each position is, with probability p (keyed on the seed and the position, so
    batch splits and resumes see the same data), a scene of the base's own pretraining distribution instead
    (``scenes.WebCaptionDataset``: every colour-shape pair, vague web captions). That is prior preservation:
    the counting rows lack some colour-shape pairs, and a cold start on them alone forgets how to draw those
    (circles in colours the rows only show as squares). Replay uses counts above ``WEB_EXACT_MAX`` only, whose
    captions carry no number word, so no replayed caption is a val or test prompt."""

    def __init__(self, rows: Sequence[dict], seed: int, size: int = 32, prior_mix: float = 0.0,
                 count_weight_power: float = 0.0):
        from .prompts import WEB_EXACT_MAX
        from .scenes import ExactCountDataset, WebCaptionDataset

        if not 0 <= prior_mix < 1:
            raise ValueError(f"prior_mix={prior_mix} must be in [0, 1)")
        self.seed, self.prior_mix = seed, prior_mix
        self.ds = ExactCountDataset(rows, length=2 ** 62, seed=seed, size=size,
                                    count_weight_power=count_weight_power)
        self.prior = (WebCaptionDataset(2 ** 62, seed=seed, size=size, min_count=WEB_EXACT_MAX + 1)
                      if prior_mix > 0 else None)

    def item(self, position: int) -> dict:
        if self.prior is not None and np.random.default_rng(
                sample_seed(self.seed, 0, position, "cold_start_prior")).random() < self.prior_mix:
            return self.prior[position]
        return self.ds[position]

    def __call__(self, positions: np.ndarray) -> tuple[torch.Tensor, list[str]]:
        items = [self.item(int(i)) for i in positions]
        x0 = torch.from_numpy(np.stack([it["pixels"] for it in items]))          # (B, 3, H, W) in [-1, 1]
        return x0, [it["prompt"] for it in items]


class ImageFolderData:
    """An imagefolder of counting images, VAE-encoded once (posterior mean); epochs are seeded permutations."""

    def __init__(self, policy, folder: str | Path, resolution: int, seed: int, batch_size: int = 8,
                 progress: bool = False):
        from tqdm.auto import tqdm

        from .policies.sd3 import ImageFolderCountingDataset

        ds = ImageFolderCountingDataset(folder, resolution=resolution)
        self.prompts = [r["prompt"] for r in ds.rows]
        self.seed = seed
        chunks = []
        for s in tqdm(range(0, len(ds), batch_size), desc="encode images", disable=not progress, leave=False):
            images = np.stack([ds[i]["image"] for i in range(s, min(s + batch_size, len(ds)))])   # (b, H, W, 3)
            chunks.append(policy.encode_images(images).cpu())                                   # (b, C, h, w)
        self.latents = torch.cat(chunks)                                                          # (N, C, h, w)
        self._perms: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.prompts)

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            # a batch can straddle two epochs: keep the latest two permutations
            self._perms = {e: v for e, v in self._perms.items() if e == epoch - 1}
            self._perms[epoch] = np.random.default_rng(sample_seed(self.seed, epoch, 0, "cold_start_epoch")
                                                       ).permutation(len(self))
        return self._perms[epoch]

    def __call__(self, positions: np.ndarray) -> tuple[torch.Tensor, list[str]]:
        n = len(self)
        idx = np.array([self._perm(int(q) // n)[int(q) % n] for q in positions])
        return self.latents[torch.from_numpy(idx)], [self.prompts[i] for i in idx]


def select_eval_rows(rows: Sequence[dict], per_count: int) -> list[dict]:
    """``per_count`` rows for every requested count, evenly spaced through that count's rows (so a
    test set ordered by class and template is sampled across both), in count order."""
    from collections import defaultdict

    by_count: dict[int, list[dict]] = defaultdict(list)
    for r in rows:
        by_count[int(r["include"][0]["count"])].append(r)
    out = []
    for n in sorted(by_count):
        group = by_count[n]
        k = min(per_count, len(group))
        out += [group[int(i)] for i in np.linspace(0, len(group) - 1, k).round().astype(int)]
    return out


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------
def plot_loss_curve(loss: "pd.DataFrame", path: str | Path, *, title: str, window: int = 0) -> Path:
    """PNG of a cold start's ``loss.csv`` columns: the loss per step (faint), its rolling mean over ``window``
    steps (0: a twentieth of the run) and, when the table has it, the lr on a second axis."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, ax = plt.subplots(figsize=(6.5, 3.4))
    if len(loss):
        w = window or max(1, len(loss) // 20)
        ax.plot(loss["step"], loss["loss"], lw=0.6, alpha=0.4, label="per step")
        ax.plot(loss["step"], loss["loss"].rolling(w, min_periods=1).mean(), lw=1.5, label=f"mean of {w}")
        if "lr" in loss:
            lr_ax = ax.twinx()
            lr_ax.plot(loss["step"], loss["lr"], color="gray", ls="--", label="lr")
            lr_ax.set_ylabel("lr")
        fig.legend(loc="upper right", bbox_to_anchor=(0.88, 0.86))
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("flow-matching loss")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


class ColdStart:
    """One cold-start run: ``evaluate("before")``, ``train()``, ``evaluate("after")``, ``finish()``.

    ``policy`` and ``accelerator`` may be passed in (tests); otherwise they are built from ``params``.
    """

    def __init__(self, params: ColdStartParams, *, policy=None, accelerator=None):
        from accelerate import Accelerator

        from .prompts import load_rows

        self.p = p = params
        if p.num_threads:
            torch.set_num_threads(p.num_threads)
        self.acc = accelerator or Accelerator(mixed_precision=p.mixed_precision,
                                              gradient_accumulation_steps=p.grad_accum,
                                              cpu=not torch.cuda.is_available())
        if self.acc.gradient_accumulation_steps != p.grad_accum:
            raise ValueError(f"the accelerator accumulates {self.acc.gradient_accumulation_steps} micro-batches "
                             f"but grad_accum={p.grad_accum}; build it with gradient_accumulation_steps={p.grad_accum}")
        self.out = p.out_dir
        self.ckpt_dir = self.out / "checkpoints"
        if self.acc.is_main_process:
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        embedded = p.world == "embedded"
        self.eval_rows = select_eval_rows(load_rows(p.eval_prompts, embedded=embedded),
                                          p.eval_prompts_per_count) if p.eval_prompts else []
        self.policy = policy if policy is not None else build_policy(p, self.acc.device)
        self.module = denoiser(self.policy)
        self.params_list = [q for q in self.policy.trainable_parameters() if q.requires_grad]
        if not self.params_list:
            raise ValueError("the policy has no trainable parameters; cold start trains a LoRA (add_lora first)")
        if embedded:
            self.data = EmbeddedCountingData(load_rows(p.prompts), p.seed, size=self.policy.latent_shape[-1],
                                             prior_mix=p.prior_mix, count_weight_power=p.count_weight_power)
        else:
            self.data = ImageFolderData(self.policy, p.image_folder, self.policy.height, p.seed,
                                        batch_size=p.eval_batch_size, progress=p.progress)
        self.opt = self.acc.prepare(torch.optim.AdamW(self.params_list, lr=p.lr, weight_decay=p.weight_decay))
        self.step = 0
        self.elapsed = 0.0
        self.history: list[dict] = []
        self.results: dict[str, Any] = {}
        # processes train() runs on: this run's own, or num_processes launched from a single process
        self.train_processes = p.num_processes if self.acc.num_processes == 1 else self.acc.num_processes

    # -- data ---------------------------------------------------------------------------------
    def batch(self, step: int, micro: int):
        """This process's micro-batch ``micro`` of optimizer step ``step``: (x0, prompts, t, noise).

        Sample positions are global (step, micro-batch, process, slot), and each sample's caption
        dropout, time t and noise come from its own generator keyed on (seed, position), so the same
        positions train the same way however they are split into micro-batches or processes, and a
        resumed run continues exactly.
        """
        p, acc = self.p, self.acc
        key = (step * p.grad_accum + micro) * acc.num_processes + acc.process_index     # global micro-batch id
        positions = key * p.batch_size + np.arange(p.batch_size)                          # (B,)
        x0, prompts = self.data(positions)
        ts, noises, out_prompts = [], [], []
        for pos, prompt in zip(positions, prompts):
            g = torch.Generator().manual_seed(sample_seed(p.seed, 0, int(pos), "cold_start_sample"))
            drop = bool(torch.rand(1, generator=g) < p.caption_dropout)
            out_prompts.append("" if drop else prompt)
            ts.append(sample_timesteps(1, g, p.logit_mean, p.logit_std, shift=p.timestep_shift,
                                       convention=self.policy.convention))
            noises.append(draw_noise((1, *self.policy.latent_shape), g, "cpu"))
        return x0, out_prompts, torch.cat(ts), torch.cat(noises)                           # (B,), (B, C, H, W)

    # -- checkpoints --------------------------------------------------------------------------
    def save_checkpoint(self) -> Path | None:
        if not all(torch.isfinite(q).all() for q in self.params_list):
            raise ValueError(f"step {self.step}: non-finite LoRA weights; not checkpointing (lower lr?)")
        if not self.acc.is_main_process:
            return None
        final = self.ckpt_dir / f"step_{self.step:06d}"

        def build(tmp: Path) -> None:
            checkpoints.save_state({"step": self.step, "elapsed": self.elapsed, "history": self.history,
                                    "trainable": [q.detach().cpu().clone() for q in self.params_list],
                                    "optimizer": self.opt.state_dict()}, tmp / "state.pt")
            self.policy.save_lora(tmp / "lora")

        atomic_save_dir(build, final)
        atomic_write_text(self.ckpt_dir / "latest", final.name)
        self.write_loss_csv()
        p = self.p
        done = self.step
        left = progress.eta(done, p.steps, self.elapsed, 60.0 * p.time_budget_minutes)
        loss = self.history[-1]["loss"] if self.history else float("nan")
        progress.write(p.run_dir, f"[cold start] step {done}/{p.steps}  loss {loss:.4f}  | "
                                  f"{progress.duration(self.elapsed)} elapsed, ETA "
                                  f"{'?' if left != left else progress.duration(left)}")
        return final

    def maybe_resume(self) -> bool:
        latest = self.ckpt_dir / "latest"
        if not self.p.resume:
            return False
        if self.acc.is_main_process:
            for stale in checkpoints.clean_stale_tmp(self.ckpt_dir):
                self._log(f"removed {stale.name}, left by a killed checkpoint write")
        if not latest.is_file():
            self._log(f"resume: true but no checkpoint under {self.ckpt_dir}: starting from scratch")
            return False
        path = self.load_checkpoint()
        self._log(f"resumed from {path.name} (step {self.step}, {self.elapsed / 60:.1f} min trained)")
        return True

    def load_checkpoint(self) -> Path:
        """Load ``checkpoints/latest`` (LoRA, optimizer, step, elapsed time, history) into this run."""
        path = self.ckpt_dir / (self.ckpt_dir / "latest").read_text().strip()
        state = checkpoints.load_state(path / "state.pt")
        if len(state["trainable"]) != len(self.params_list) or any(
                s.shape != q.shape for s, q in zip(state["trainable"], self.params_list)):
            raise ValueError(f"checkpoint {str(path)!r} holds LoRA tensors of other shapes than this run's "
                             f"(lora_rank={self.p.lora_rank}?); start a new run_dir or resume: false")
        with torch.no_grad():
            for q, v in zip(self.params_list, state["trainable"]):
                q.copy_(v.to(q.device))
        self.opt.load_state_dict(state["optimizer"])
        self.step, self.elapsed, self.history = state["step"], state["elapsed"], state["history"]
        return path

    # -- training -----------------------------------------------------------------------------
    def train(self) -> list[dict]:
        """Run (or resume) the LoRA finetuning up to ``steps`` optimizer steps or the time budget.

        With ``num_processes > 1`` in a single process (a notebook), the training runs under
        ``accelerate launch`` (:meth:`train_launched`) and its last checkpoint is loaded back here.
        """
        from tqdm.auto import tqdm

        p, acc = self.p, self.acc
        if p.num_processes > 1 and acc.num_processes == 1:
            return self.train_launched()
        self.maybe_resume()
        bar = tqdm(total=p.steps, initial=self.step, desc="cold start", leave=True,
                   disable=not (p.progress and acc.is_main_process))
        t_start = time.perf_counter() - self.elapsed
        last_saved = self.step
        while self.step < p.steps:
            lr = learning_rate(self.step, p.lr, p.lr_warmup_steps, p.steps, p.lr_schedule)
            if p.time_budget_minutes and self.elapsed > 60.0 * p.time_budget_minutes:
                self._log(f"time budget of {p.time_budget_minutes} min reached at step {self.step} of {p.steps}"
                          + (f": WARNING, the {p.lr_schedule} lr is still {lr:.2e}, so the model is not annealed; "
                             f"set time_budget_minutes: 0 to run every step" if p.lr_schedule != "constant" else ""))
                break
            for g in self.opt.param_groups:
                g["lr"] = lr
            losses, grad_norm = [], float("nan")
            for micro in range(p.grad_accum):
                x0, prompts, t, noise = self.batch(self.step, micro)
                with acc.accumulate(self.module):
                    with acc.autocast():
                        cond = self.policy.encode(prompts)
                        loss = flow_matching_loss(self.policy, x0, cond, t=t, noise=noise, weighting=p.weighting)
                    if not torch.isfinite(loss):
                        raise ValueError(f"non-finite flow-matching loss {loss.item()} at step {self.step} "
                                         f"(micro-batch {micro}); lower lr={p.lr} or check the data")
                    acc.backward(loss)
                    if acc.sync_gradients:
                        _flat_allreduce_mean(self.params_list, acc)
                        grad_norm = float(acc.clip_grad_norm_(self.params_list, p.max_grad_norm or float("inf")))
                    self.opt.step()
                    self.opt.zero_grad(set_to_none=True)
                losses.append(loss.detach().float())
            mean_loss = torch.stack(losses).mean()
            if acc.num_processes > 1:
                mean_loss = acc.reduce(mean_loss.to(acc.device), reduction="mean")
            self.step += 1
            self.elapsed = time.perf_counter() - t_start
            self.history.append({"step": self.step, "loss": float(mean_loss), "lr": lr, "grad_norm": grad_norm,
                                 "elapsed_s": round(self.elapsed, 3)})
            bar.update(1)
            bar.set_postfix(loss=f"{float(mean_loss):.4f}")
            if self.step % p.checkpoint_every == 0:
                self.save_checkpoint()
                last_saved = self.step
        bar.close()
        if self.step != last_saved or not (self.ckpt_dir / "latest").is_file():
            self.save_checkpoint()
        acc.wait_for_everyone()
        return self.history

    def train_launched(self) -> list[dict]:
        """:meth:`train` on ``num_processes`` processes: ``accelerate launch -m grpo_lib.cold_start
        <out>/cold_start_params.yaml --train-only``, then the last checkpoint loaded into this process.
        ``batch_size`` is per process, so the global batch is ``num_processes * batch_size * grad_accum``;
        each sample's data, noise and time are keyed on its global position, so 2 processes of batch 16
        train on the same samples as 1 process of batch 32."""
        from .launch import launch_module

        launch_module("grpo_lib.cold_start", self.p, self.out / "cold_start_params.yaml", extra_args=["--train-only"],
                      echo_prefix="[cold_start]")
        self.load_checkpoint()
        return self.history

    # -- evaluation ---------------------------------------------------------------------------
    def _image_hw(self) -> tuple[int, int]:
        if self.p.world == "embedded":
            return tuple(self.policy.latent_shape[1:])
        return (self.policy.height, self.policy.width)

    def _per_image_table(self, images: np.ndarray, rows: list[dict]):
        """The evaluation module's per-image table (target, found, correct, ...). Embedded: ShapeCounter via
        ``evaluate.per_image_table`` (the reward's own measurement); sd3: the counting server's counts, or
        ``found`` = None when no server is configured."""
        import pandas as pd

        if self.p.world == "embedded":
            from .evaluate import per_image_table
            return per_image_table(images, rows)
        targets = [int(r["include"][0]["count"]) for r in rows]
        found: list = [None] * len(rows)
        if self.p.reward_server_url:
            from .server import RemoteCountingReward
            info = RemoteCountingReward(self.p.reward_server_url)(images, [r["prompt"] for r in rows], list(rows))[1]
            found = [int(f) for f in np.asarray(info["count"])]
        return pd.DataFrame({"prompt": [r["prompt"] for r in rows], "class": [r["include"][0]["class"] for r in rows],
                             "target": targets, "found": found,
                             "correct": [None if f is None else f == n for f, n in zip(found, targets)]})

    @torch.no_grad()
    def evaluate(self, tag: str):
        """ODE samples of the eval prompts (seeds keyed on prompt and image index, so ``before`` and ``after``
        draw from the same noise), their found counts, and the per-image table (a pandas DataFrame).

        ``before`` runs inside ``policy.reference()`` (LoRA off: exactly the base); ``after`` with the LoRA.
        Written to ``eval_<tag>.csv`` and ``eval_<tag>_images.npz``; a resumed run reuses ``before``.
        """
        import pandas as pd

        from .rollout import sample_for_rows

        if tag not in ("before", "after"):
            raise ValueError(f"tag={tag!r} is not one of ('before', 'after')")
        p, acc = self.p, self.acc
        csv_path, npz_path = self.out / f"eval_{tag}.csv", self.out / f"eval_{tag}_images.npz"
        if tag == "before" and p.resume and csv_path.is_file() and npz_path.is_file():
            df = pd.read_csv(csv_path)
            self.results[tag] = (df, np.load(npz_path)["images"])
            self._log("reusing the 'before' evaluation of the interrupted run")
            return df
        # prompts are split over processes; image k of a prompt always starts from eval_seed(seed, prompt, k)
        mine = list(range(acc.process_index, len(self.eval_rows), acc.num_processes))
        records, images = [], np.zeros((0, *self._image_hw(), 3), np.uint8)
        t0 = time.perf_counter()
        if mine:
            rows = [self.eval_rows[i] for i in mine]
            with self.policy.reference() if tag == "before" else contextlib.nullcontext():
                images, flat = sample_for_rows(self.policy, rows, images_per_prompt=p.eval_images_per_prompt,
                                               num_steps=p.eval_num_steps, shift=p.eval_shift,
                                               guidance_scale=p.eval_guidance_scale, seed=p.seed,
                                               batch_size=p.eval_batch_size, progress=p.progress)
            table = self._per_image_table(images, flat)
            k = p.eval_images_per_prompt
            table.insert(0, "image_index", np.arange(len(flat)) % k)
            table.insert(0, "prompt_index", [mine[q // k] for q in range(len(flat))])
            records = table.to_dict("records")
        if acc.num_processes > 1:
            records = sum(acc.gather_for_metrics([records], use_gather_object=True), [])
            images = np.concatenate(acc.gather_for_metrics([images], use_gather_object=True))
        order = sorted(range(len(records)), key=lambda q: (records[q]["prompt_index"], records[q]["image_index"]))
        df = pd.DataFrame([records[q] for q in order])
        images = images[order]
        df.attrs["seconds"] = time.perf_counter() - t0
        if acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            df.to_csv(csv_path, index=False)
            np.savez_compressed(npz_path, images=images)
        self.results[tag] = (df, images)
        return df

    def accuracy_table(self):
        """Exact-count accuracy per requested count (and ``all``), before and after, with 95 % Wilson
        intervals (``evaluate.compare_stages``), plus ``delta`` = after - before; None without a detector."""
        from .evaluate import compare_stages

        for tag in ("before", "after"):
            if tag not in self.results:
                raise ValueError(f"accuracy_table: evaluate({tag!r}) has not run")
            if self.results[tag][0]["found"].isna().any():
                return None            # no detector (sd3 without reward_server_url): no accuracy
        table = compare_stages({tag: self.results[tag][0] for tag in ("before", "after")})
        table["delta"] = table["after_accuracy"] - table["before_accuracy"]
        if self.acc.is_main_process:
            table.to_csv(self.out / "accuracy_before_after.csv", index=False)
        return table

    def grid(self, path: str | Path | None = None) -> Path:
        """PNG: for one eval prompt per count (rows), its images before (left) and after (right), same seeds."""
        import pandas as pd

        from .evaluate import save_image_grid

        for tag in ("before", "after"):
            if tag not in self.results:
                raise ValueError(f"grid: evaluate({tag!r}) has not run")
        df_b, im_b = self.results["before"]
        _, im_a = self.results["after"]
        # one prompt per count; the r-th count takes its (r mod m)-th prompt, so the rows show several classes
        prompts_of = {n: sorted(g.unique()) for n, g in df_b.groupby("target")["prompt_index"]}
        first = pd.Series({n: idx[r % len(idx)] for r, (n, idx) in enumerate(sorted(prompts_of.items()))})
        sel = [np.flatnonzero(df_b["prompt_index"].to_numpy() == i) for i in first.to_numpy()]   # one row per count
        k = self.p.eval_images_per_prompt
        cells = np.stack([np.concatenate([im_b[s], im_a[s]]) for s in sel])         # (rows, 2k, H, W, 3)
        # wrapped: the grid leaves a fixed margin for row labels and the held-out template is long
        labels = [textwrap.fill(f"{n}: {df_b['prompt'].iloc[s[0]]}", 30) for n, s in zip(first.index, sel)]
        found_b = df_b["found"].to_numpy()
        found_a = self.results["after"][0]["found"].to_numpy()
        captions = [[f"before {_fmt_count(found_b[i])}" for i in s] + [f"after {_fmt_count(found_a[i])}" for i in s]
                    for s in sel]
        path = Path(path) if path is not None else self.out / "grid_before_after.png"
        save_image_grid(cells, path, row_labels=labels, captions=captions,
                        title=f"same seeds: base (left {k}) | after cold start (right {k}); caption = objects found")
        return path

    def detections_grid(self, tag: str = "after", path: str | Path | None = None) -> Path:
        """PNG of ``tag``'s images by requested count with ShapeCounter's detections boxed (embedded world)."""
        from .evaluate import save_grid_png

        if self.p.world != "embedded":
            raise ValueError("detections_grid draws ShapeCounter boxes: embedded world only")
        if tag not in self.results:
            raise ValueError(f"detections_grid: evaluate({tag!r}) has not run")
        df, images = self.results[tag]
        path = Path(path) if path is not None else self.out / f"grid_{tag}_detections.png"
        return save_grid_png(images, df, path, per_count=self.p.eval_images_per_prompt,
                             title=f"{tag} cold start: found n / N (white boxes: counted objects)")

    # -- the end ------------------------------------------------------------------------------
    def plot_loss(self, path: str | Path | None = None) -> Path:
        import pandas as pd
        path = Path(path) if path is not None else self.out / "loss.png"
        return plot_loss_curve(pd.DataFrame(self.history, columns=["step", "loss", "lr", "grad_norm", "elapsed_s"]),
                               path, title="cold start: LoRA flow matching on exact-count data")

    def write_loss_csv(self) -> Path:
        import pandas as pd
        path = self.out / "loss.csv"
        tmp = path.with_name("loss.csv.tmp")
        pd.DataFrame(self.history, columns=["step", "loss", "lr", "grad_norm", "elapsed_s"]).to_csv(tmp, index=False)
        tmp.replace(path)
        return path

    def finish(self) -> dict:
        """Save the LoRA to ``lora/`` and (``save_merged``) the merged base to ``merged/``; write ``summary.json``.

        The merge is checked: the merged model's velocity on a probe batch must equal the LoRA model's
        (max abs difference recorded; above 1e-3 relative to the velocity scale is an error).
        """
        p, acc = self.p, self.acc
        summary: dict[str, Any] = {"steps": self.step, "train_minutes": round(self.elapsed / 60, 2),
                                   "samples_seen": self.step * p.grad_accum * p.batch_size * self.train_processes}
        if self.history:
            tail = self.history[-max(1, len(self.history) // 10):]
            summary["first_loss"] = self.history[0]["loss"]
            summary["final_loss_mean_last_10pct"] = float(np.mean([h["loss"] for h in tail]))
        for tag in ("before", "after"):
            if tag in self.results and self.results[tag][0]["found"].notna().all() and len(self.results[tag][0]):
                summary[f"accuracy_{tag}"] = float(self.results[tag][0]["correct"].astype(float).mean())
        acc.wait_for_everyone()
        if acc.is_main_process:
            atomic_save_dir(lambda d: self.policy.save_lora(d), self.out / "lora")
            summary["lora"] = str(self.out / "lora")
            if p.save_merged:
                x, t, cond = self._probe()
                with torch.no_grad():
                    v_lora = self.policy.velocity(x, t, cond, 1.0).float()
                    self.policy.merge_lora(new_adapter=False)
                    v_merged = self.policy.velocity(x, t, cond, 1.0).float()
                diff = float((v_lora - v_merged).abs().max())
                scale = float(v_lora.abs().max())
                summary["merge_max_abs_diff"] = diff
                if not diff <= 1e-3 * max(scale, 1.0):
                    raise ValueError(f"merged model differs from the LoRA model by {diff:.3g} (velocity scale "
                                     f"{scale:.3g}); not saving merged/")
                atomic_save_dir(lambda d: self.policy.save_pretrained(d), self.out / "merged")
                summary["merged"] = str(self.out / "merged")
                self.params_list = []     # the adapter is gone; the policy is now the merged base
            self.write_loss_csv()
            self.plot_loss()
            summary["params"] = _params_dict(p)
            atomic_write_text(self.out / "summary.json", json.dumps(summary, indent=1))
        acc.wait_for_everyone()
        return summary

    def _probe(self):
        g = torch.Generator().manual_seed(sample_seed(self.p.seed, 0, 0, "cold_start_probe"))
        x = draw_noise((2, *self.policy.latent_shape), g, self.policy.device)
        prompts = [r["prompt"] for r in self.eval_rows[:2]] or ["a photo of two red circles"] * 2
        prompts = (prompts * 2)[:2]
        t = torch.tensor([0.3, 0.8], device=self.policy.device)
        return x, t, self.policy.encode(prompts)

    def _log(self, msg: str) -> None:
        if self.acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            with open(self.out / "events.log", "a") as f:
                f.write(f"{time.strftime('%H:%M:%S')} {msg}\n")
            print(f"[cold_start] {msg}", flush=True)


def _fmt_count(v) -> str:
    """A found count for a grid caption; "" when no detector counted (None / NaN)."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    return str(int(v))


def _params_dict(p: ColdStartParams) -> dict:
    from .params import to_dict
    return to_dict(p)


def run(params: ColdStartParams, **kwargs) -> dict:
    """The whole stage: before-eval, training, after-eval, table, grid, LoRA + merged save."""
    cs = ColdStart(params, **kwargs)
    if cs.eval_rows:
        cs.evaluate("before")
    cs.train()
    if cs.eval_rows:
        cs.evaluate("after")
        if cs.acc.is_main_process:
            cs.accuracy_table()
            cs.grid()
            if params.world == "embedded":
                cs.detections_grid("after")
    summary = cs.finish()
    return summary


def main(argv: list[str] | None = None) -> int:
    from .launch import end_training
    from .params import load_params_with_set

    ap = argparse.ArgumentParser(description="Cold start: LoRA flow-matching finetuning on exact-count data")
    ap.add_argument("params", help="params/01_cold_start__<experiment>.yaml")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=YAML",
                    help="override fields, e.g. --set steps=50 run_dir=runs/x")
    ap.add_argument("--train-only", action="store_true",
                    help="train (or resume) and checkpoint only: no evaluation, no lora/ or merged/ "
                         "(what notebook 01 launches on num_processes processes)")
    args = ap.parse_args(argv)
    params = load_params_with_set(args.params, ColdStartParams, args.set)
    if not args.train_only:
        summary = run(params)
        print(json.dumps({k: v for k, v in summary.items() if k != "params"}, indent=1))
        gc.collect()
        return 0
    cs = ColdStart(params)
    cs.train()
    acc = cs.acc
    del cs          # free what holds the process group before it is destroyed
    gc.collect()
    if acc.num_processes > 1:
        end_training(acc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
