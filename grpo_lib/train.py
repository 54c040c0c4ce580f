"""The Flow-GRPO training loop, one for every policy (embedded tiny, SD3, Show-o2).

Per epoch (flow_grpo_notes §1.4-1.9):

1. **sample**: the :class:`~grpo_lib.grpo.GroupSampler` plans M groups x G copies over P processes;
   each process rolls out its batches with the SDE step (log-probs stored) — the reward of batch i
   runs in a background thread while batch i+1 samples; ``dynamic_sampling`` adds refill rounds until
   M groups have reward spread, ``curriculum: spread`` weights the prompt draw by per-count accuracy
   (``grpo_lib.curriculum``);
2. **score and gather**: rewards and group ids are gathered over processes; advantages are
   (r - group mean) / (global std + eps), zero-spread groups are dropped (``zero_std_ratio``);
3. **train**: over the selected timesteps (``first_50`` = the noisiest half), recompute the step's
   log-prob with grad, PPO-clip it against the rollout's, add beta x step-KL to the reference
   (LoRA off = the cold-start model); gradients are averaged over processes by an explicit
   all-reduce at each update (no DDP wrapper, so any policy object works unchanged);
4. **log / evaluate / checkpoint**: metrics per epoch to CSV and TensorBoard (with the cumulative budget:
   ``reward_calls``, ``eval_reward_calls``, ``seconds_total``), ODE evaluation on
   held-out prompts with the quality guard, atomic checkpoints, ``resume: true`` continues exactly.

Randomness is keyed on (seed, epoch, global sample index), not on a global RNG stream, so a run
split over 2 processes samples the same images as 1 process with the same global batch, and a
resumed run continues exactly as an uninterrupted one.

Run: ``python -m grpo_lib.train params/02_counting_grpo__smoke.yaml`` or
``accelerate launch -m grpo_lib.train params/<x>.yaml`` (see README for the CPU multi-process form).
"""
from __future__ import annotations

import argparse
import gc
import hashlib
import json
import math
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from grpo_lib.params import check_knobs
from grpo_lib.rewards.counting import QUALITY_KEYS
from grpo_lib import checkpoints, progress
from grpo_lib.launch import end_training
from grpo_lib.checkpoints import atomic_save_dir, atomic_write_text  # noqa: F401  (re-exported)
from grpo_lib.policies.base import FrozenReference, select_trainable  # noqa: F401  (re-exported)
from grpo_lib.seeding import sample_seed

# ---------------------------------------------------------------------------------------------
# Parameters
# ---------------------------------------------------------------------------------------------


@dataclass
class GRPOParams:
    """Fields of notebooks/02_counting_grpo.ipynb's parameters cell (and of params/02_counting_grpo__*.yaml)."""
    run_dir: str = "runs/dev"                              # outputs: metrics, checkpoints, plots
    world: str = "embedded"                                # embedded | sd3 | showo2
    model: str = "data/checkpoints/tiny-base"              # base checkpoint (dir or hub id on GPU nodes)
    cold_start_lora: str = ""                              # LoRA merged into the base first ("" = none); KL reference
    convention: str = "noise_at_one"                       # time convention the policy runs in
    trainable: str = "lora"                                # lora | all | pattern:<regex> (Show-o2: pattern:diffusion)
    lora_rank: int = 16                                    # LoRA r
    lora_alpha: int = 16                                   # LoRA alpha
    train_prompts: str = "data/counting/train.jsonl"       # GenEval-format rows to train on
    eval_prompts: str = "data/counting/val.jsonl"          # val rows: per-epoch evaluation, checkpoint selection
    eval_images_per_prompt: int = 1                        # per-epoch evaluation: images per val prompt
    num_processes: int = 1                                 # notebook 02: >1 trains under accelerate launch (CPU: 1 thread each)
    test_prompts: str = "data/counting/test.jsonl"         # test rows: only the final evaluation reads them
    reward: dict[str, float] = field(default_factory=lambda: {"counting_strict": 1.0})  # name -> weight
    reward_server_url: str = ""                            # score remotely (grpo_lib.server) instead; "" local
    reward_server_retries: int = 12                        # retries of a failed server call (waits 0.5, 1, 2, 4, 8 s...: 71.5 s in all)
    reward_server_timeout_s: float = 120.0                 # seconds per reward server call attempt
    resolution: int = 512                                  # image size for sd3 / showo2 (embedded: checkpoint's)
    showo2_repo: str = ""                                  # Show-o checkout (its show-o2 folder) for world showo2
    showo2_vae_path: str = ""                              # Wan2.1_VAE.pth for Show-o2's decoder
    showo2_llm_path: str = "Qwen/Qwen2.5-1.5B-Instruct"    # tokenizer / LLM config Show-o2 extends
    showo2_max_seq_len: int = 1024                         # Show-o2 sequence: text + image tokens + specials
    num_steps: int = 10                                    # sampling steps of a rollout
    eval_num_steps: int = 20                               # ODE steps at evaluation
    shift: float = 1.0                                     # sigma-schedule shift (SD3.5: 3.0)
    guidance_scale: float = 1.0                            # CFG at rollout (1 = off)
    eval_guidance_scale: float = 1.0                       # CFG at evaluation
    noise_level: float = 0.7                               # a in sigma_t = a sqrt(t/(1-t))
    sde_type: str = "sde"                                  # sde | cps
    timestep_strategy: str = "first_50"                    # all | first_<p> | random_<p> | drop_ends | window
    sde_window_size: int = 0                               # >0: Flow-GRPO-Fast SDE window, ODE elsewhere
    sde_window_range: list[int] = field(default_factory=list)  # [r0, r1]: window inside steps r0..r1-1 (empty: [0, N-1])
    group_size: int = 8                                    # images per prompt (G)
    batch_size: int = 16                                   # images per process per sampling batch
    batches_per_epoch: int = 4                             # sampling batches per epoch
    updates_per_epoch: int = 2                             # optimizer steps per pass over the epoch's rollouts (upstream: 2)
    inner_epochs: int = 1                                  # passes over each epoch's rollouts (upstream num_inner_epochs: 1)
    num_epochs: int = 10                                   # GRPO epochs
    lr: float = 1e-4                                       # AdamW learning rate
    lr_schedule: str = "constant"                          # per epoch: constant | cosine (to 0 at lr_decay_epochs)
    lr_decay_epochs: int = 0                               # cosine: epochs to reach lr 0 (0 = num_epochs)
    weight_decay: float = 1e-4                             # AdamW weight decay
    beta: float = 0.01                                     # KL weight
    kl_convention: str = "paper"                           # paper | upstream (see grpo_lib.sde.step_kl)
    clip_range: float = 1e-4                               # PPO clip epsilon on the per-element-mean ratio
    adv_clip_max: float = 5.0                              # advantage clip
    global_std: bool = True                                # advantage std over the whole batch
    ratio_norm: bool = False                               # GRPO-Guard RatioNorm
    objective: str = "grpo"                                # grpo | nft (DiffusionNFT) | awm (Advantage Weighted Matching) | dgpo
    train_timesteps: int = 4                               # nft / awm / dgpo: noise levels per sample per epoch (rollout grid)
    group_shared_noise: bool = False                       # nft / awm: one draw of (t, eps) per group (dgpo: must be true)
    dgpo_beta: float = 100.0                               # dgpo: beta_dpo of the group sigmoid (upstream GenEval: 100)
    nft_beta: float = 1.0                                  # nft: beta of v+- (1/beta = guidance strength)
    train_guidance_scale: float = 1.0                      # nft / awm / dgpo: CFG of the velocity trained (1 = conditional)
    anchor_rate: float = 0.001                             # nft / awm anchor: eta_k = min(rate * k, anchor_max_decay)
    anchor_max_decay: float = 0.5                          # nft (old policy): 0.5; awm (KL-EMA): 0.3
    anchor_beta: float = 0.0                               # awm: KL weight to the anchor (upstream ema_beta 1.0)
    awm_weighting: str = "ghuber"                          # awm: ghuber (upstream, p = awm_p) | uniform
    awm_p: float = 0.25                                    # awm: ghuber exponent p
    max_grad_norm: float = 1.0                             # gradient clipping
    ema_decay: float = 0.0                                 # EMA of trainable weights for eval (0 = off)
    mixed_precision: str = "no"                            # no | fp16 | bf16 (fp32 on CPU)
    seed: int = 0                                          # everything random is keyed on it
    eval_every: int = 2                                    # evaluate every N epochs (and at the end)
    eval_max_prompts: int = 64                             # held-out prompts per evaluation
    save_every: int = 2                                    # checkpoint every N epochs
    resume: bool = False                                   # continue from run_dir/checkpoints/latest
    time_budget_minutes: float = 0.0                       # stop after this many minutes (0 = no limit)
    guard_max_drop: float = 0.05                           # quality guard: max relative drop vs the start
    guard_max_count_drop: float = 0.0                      # count guard: max drop of any count's exact accuracy vs the start (0: off)
    keep_start: bool = False                               # epoch 0 (the untrained start) competes in selection
    unseen_prompts: str = ""                               # extra final-eval rows, e.g. counts never trained on ("" = none)
    final_images_per_prompt: int = 4                       # final eval: images per held-out prompt
    final_max_prompts: int = 0                             # final eval: prompts per set (0 means all)
    final_eval_processes: int = 1                          # final eval: sampling processes (CPU: 1 thread each)
    progress: bool = True                                  # tqdm bars
    dynamic_sampling: bool = False                         # DAPO: refill rounds until M groups have reward spread
    dynamic_max_rounds: int = 3                            # most sampling rounds per epoch with dynamic_sampling
    curriculum: str = "none"                               # none | spread (prompts weighted by P(group has spread))
    curriculum_floor: float = 0.05                         # weight every row keeps under the curriculum (> 0)
    curriculum_ema: float = 0.5                            # weight of the newest epoch in the per-count accuracy EMA

    def __post_init__(self):
        # paths may name the run's own directory, so one params file serves every run name:
        # cold_start_lora: "{run_dir}/cold_start/lora"
        for name in ("model", "cold_start_lora"):
            setattr(self, name, getattr(self, name).replace("{run_dir}", self.run_dir))
        if self.world not in ("embedded", "sd3", "showo2"):
            raise ValueError(f"world={self.world!r} is not one of ('embedded', 'sd3', 'showo2')")
        if not (self.trainable in ("lora", "all") or self.trainable.startswith("pattern:")):
            raise ValueError(f"trainable={self.trainable!r} must be 'lora', 'all' or 'pattern:<regex>' "
                             "(parameters whose names match the regex, e.g. 'pattern:diffusion')")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise ValueError(f"mixed_precision={self.mixed_precision!r} is not one of ('no', 'fp16', 'bf16')")
        # noise_level > 0 only for objective grpo (stochastic steps); nft / awm train on ODE rollouts (0 allowed)
        check_knobs(self, noise_level=dict(low_open=True, why=" (objective grpo needs stochastic steps; nft / awm "
                                                           "train on ODE rollouts)")
                    if self.objective == "grpo" else {})
        for name in ("batches_per_epoch",
                     "updates_per_epoch", "inner_epochs", "num_epochs", "eval_every", "save_every", "eval_max_prompts",
                     "final_images_per_prompt", "eval_images_per_prompt", "num_processes", "final_eval_processes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.batches_per_epoch % self.updates_per_epoch:
            raise ValueError(f"batches_per_epoch={self.batches_per_epoch} is not a multiple of "
                             f"updates_per_epoch={self.updates_per_epoch}; each update must see whole batches")
        if isinstance(self.reward_server_retries, bool) or not isinstance(self.reward_server_retries, int) \
                or self.reward_server_retries < 0:
            raise ValueError(f"reward_server_retries={self.reward_server_retries!r} must be an integer >= 0")
        if not self.reward_server_timeout_s > 0:
            raise ValueError(f"reward_server_timeout_s={self.reward_server_timeout_s} must be > 0")
        from grpo_lib.objectives import AWM_WEIGHTINGS, OBJECTIVES
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective={self.objective!r} is not one of {OBJECTIVES}")
        if self.awm_weighting not in AWM_WEIGHTINGS:
            raise ValueError(f"awm_weighting={self.awm_weighting!r} is not one of {AWM_WEIGHTINGS}")
        if not 1 <= self.train_timesteps <= self.num_steps:
            raise ValueError(f"train_timesteps={self.train_timesteps} must be in [1, num_steps={self.num_steps}]")
        if self.objective == "dgpo" and not self.group_shared_noise:
            raise ValueError("objective='dgpo' needs group_shared_noise=true: its group weight compares the group's "
                             "samples with the reference at one shared draw of (t, eps) (DGPO, Eq. 17)")
        if not self.dgpo_beta > 0:
            raise ValueError(f"dgpo_beta={self.dgpo_beta} must be > 0 (upstream: 100 GenEval / OCR, 10 PickScore)")
        if self.objective == "grpo" and self.train_guidance_scale != 1.0:
            raise ValueError(f"train_guidance_scale={self.train_guidance_scale} is for nft / awm / dgpo; objective "
                             "grpo re-scores its stored steps at the rollout's own CFG (guidance_scale)")
        if self.nft_beta <= 0:
            raise ValueError(f"nft_beta={self.nft_beta} must be > 0 (paper: 1.0 or 0.1)")
        if not 0 <= self.anchor_max_decay < 1 or self.anchor_rate < 0 or self.anchor_beta < 0:
            raise ValueError(f"anchor_rate={self.anchor_rate} must be >= 0, anchor_max_decay="
                             f"{self.anchor_max_decay} in [0, 1) and anchor_beta={self.anchor_beta} >= 0")
        if not 0 <= self.guard_max_count_drop < 1:
            raise ValueError(f"guard_max_count_drop={self.guard_max_count_drop} must be in [0, 1) (an absolute drop "
                             "of one count's exact-count accuracy; 0 turns the count guard off)")
        if not 0 < self.awm_p <= 1:
            raise ValueError(f"awm_p={self.awm_p} must be in (0, 1]")
        from grpo_lib.lr_schedule import LR_SCHEDULES
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule={self.lr_schedule!r} is not one of {LR_SCHEDULES}")
        if self.lr_decay_epochs < 0:
            raise ValueError(f"lr_decay_epochs={self.lr_decay_epochs} must be >= 0 (0 means num_epochs)")
        if self.dynamic_max_rounds < 1:
            raise ValueError(f"dynamic_max_rounds={self.dynamic_max_rounds} must be >= 1")
        if self.curriculum not in ("none", "spread"):
            raise ValueError(f"curriculum={self.curriculum!r} is not one of ('none', 'spread')")
        if not self.curriculum_floor > 0:
            raise ValueError(f"curriculum_floor={self.curriculum_floor} must be > 0 (a zero weight starves a count)")
        if not 0 < self.curriculum_ema <= 1:
            raise ValueError(f"curriculum_ema={self.curriculum_ema} must be in (0, 1]")
        if self.sde_window_range:
            r = list(self.sde_window_range)
            if self.sde_window_size < 1:
                raise ValueError(f"sde_window_range={r} needs sde_window_size >= 1 (it is {self.sde_window_size})")
            if len(r) != 2 or not 0 <= r[0] < r[1] <= self.num_steps - 1 or r[1] - r[0] < self.sde_window_size:
                raise ValueError(f"sde_window_range={r} must be [r0, r1] with 0 <= r0 < r1 <= num_steps - 1 = "
                                 f"{self.num_steps - 1} holding sde_window_size={self.sde_window_size} steps "
                                 "(upstream geneval_sd3_fast: [0, 5] with size 3)")


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def test_seed(seed: int) -> int:
    """Seed of the final test evaluation's noise: used by nothing else (training keys its noise on
    ``sample_seed`` streams, selection on :func:`selection_seed`)."""
    return seed + 7_000_003


# info keys a reward may use for per-image strict (exact count) correctness
STRICT_KEYS = ("strict", "correct", "count_correct")


def selection_seed(seed: int) -> int:
    """Seed of the per-epoch evaluation that picks the best checkpoint. It differs from the final
    evaluation's ``seed`` so that no image used to *select* a checkpoint is one of the images that then
    *report* its accuracy (rollout.eval_seed hashes the seed: every image's noise differs)."""
    return seed + 1_000_003


def _flat_allreduce_mean(params: list[torch.nn.Parameter], accelerator) -> None:
    """Average the gradients of ``params`` over processes in one collective (gloo / NCCL)."""
    if accelerator.num_processes == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    flat = accelerator.reduce(flat, reduction="mean")
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset:offset + n].view_as(p).clone()
        offset += n


# ---------------------------------------------------------------------------------------------
# The trainer
# ---------------------------------------------------------------------------------------------


@dataclass
class EpochBatch:
    """One process's rollouts of one sampling batch, plus what the update needs."""
    rows: list[dict]                 # GenEval metadata rows (B,)
    group_ids: torch.Tensor          # (B,) long
    global_index: torch.Tensor       # (B,) long: position in the epoch's global sample order
    traj: Any                        # grpo_lib.rollout.Trajectories
    rewards: Any = None              # future -> (rewards (B,), info)


class GRPOTrainer:
    """Holds the policy, optimizer, reward, sampler and logs of one GRPO run.

    ``GRPOTrainer(params).fit()`` runs it; the notebook drives it the same way. ``policy`` and
    ``reward_fn`` may be passed in (tests feed tiny random components or an analytic reward).
    """

    def __init__(self, params: GRPOParams, *, policy=None, reward_fn=None, accelerator=None):
        from accelerate import Accelerator

        from grpo_lib import grpo
        from grpo_lib.prompts import load_rows, spread_subset

        self.p = params
        self.acc = accelerator or Accelerator(mixed_precision=params.mixed_precision,
                                              cpu=not torch.cuda.is_available())
        self.run_dir = Path(params.run_dir)
        self.layout = checkpoints.RunLayout(self.run_dir)
        self.ckpt_dir = self.layout.checkpoints
        if self.acc.is_main_process:
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        embedded = params.world == "embedded"
        self.train_rows = load_rows(params.train_prompts, embedded=embedded)
        self.eval_rows = spread_subset(load_rows(params.eval_prompts, embedded=embedded),
                                       params.eval_max_prompts) if params.eval_prompts else []
        self.policy = policy if policy is not None else load_policy_for(params, self.acc.device)
        if reward_fn is None:
            reward_fn = build_reward_for(params)
        self.reward_fn = reward_fn
        self.params_list = [q for q in self.policy.trainable_parameters() if q.requires_grad]
        if not self.params_list:
            raise ValueError("the policy has no trainable parameters: attach a LoRA or choose trainable='all'")
        # the KL reference: LoRA off (the policy's own context), or, when the weights themselves train,
        # a frozen copy of their initial values swapped in (Show-o2: the frozen initial head)
        # (a policy that keeps its own frozen copy, as ShowO2Policy does, is not copied a second time)
        own = self.policy.has_frozen_reference
        self.reference = self.policy.reference if (params.trainable == "lora" or own) else \
            FrozenReference(self.params_list).swapped_in
        self.opt = torch.optim.AdamW(self.params_list, lr=params.lr, weight_decay=params.weight_decay)
        self.ema = grpo.EMA(self.params_list, decay=params.ema_decay) if params.ema_decay > 0 else None
        # the slowly moving copy: NFT samples with it and anchors v+-; AWM's optional trust region
        from grpo_lib.objectives import SoftAnchor
        wants_anchor = params.objective == "nft" or (params.objective == "awm" and params.anchor_beta > 0)
        self.anchor = SoftAnchor(self.params_list, rate=params.anchor_rate,
                                 max_decay=params.anchor_max_decay) if wants_anchor else None
        self.sampler = grpo.GroupSampler(
            len(self.train_rows), group_size=params.group_size, batch_size=params.batch_size,
            num_processes=self.acc.num_processes, rank=self.acc.process_index,
            batches_per_epoch=params.batches_per_epoch, seed=params.seed,
            rounds_per_epoch=params.dynamic_max_rounds if params.dynamic_sampling else 1)
        self.arith = self.sampler.arith
        self.curriculum = None
        if params.curriculum == "spread":
            from grpo_lib.curriculum import CountCurriculum, row_count
            self.curriculum = CountCurriculum([row_count(r) for r in self.train_rows], params.group_size,
                                              floor=params.curriculum_floor, ema=params.curriculum_ema)
        # what a method costs, compared at equal budgets: images scored on training rollouts (all processes),
        # images scored by held-out evaluations, wall seconds of training epochs (evaluation excluded)
        self.budget = {"reward_calls": 0, "eval_reward_calls": 0, "seconds_total": 0.0}
        self.epoch = 0
        self.history: list[dict] = []
        self.best: dict | None = None
        self.guard_reference: dict | None = None
        self._tb = None
        self._pool = ThreadPoolExecutor(max_workers=1)   # the reward runs beside the next rollout
        self._t_progress, self._epoch_progress = time.perf_counter(), 0   # for progress.log's elapsed / ETA

    # -- checkpoints --------------------------------------------------------------------------

    def state(self) -> dict:
        """Everything ``resume`` needs, as plain data (``checkpoints.save_state``: weights_only=True loads it)."""
        return {"epoch": self.epoch,
                "trainable": [p.detach().cpu().clone() for p in self.params_list],
                "optimizer": self.opt.state_dict(),
                "ema": self.ema.state_dict() if self.ema else None,
                "anchor": self.anchor.state_dict() if self.anchor else None,
                "history": self.history, "best": self.best, "guard_reference": self.guard_reference,
                "torch_rng": torch.get_rng_state(), "numpy_rng": checkpoints.numpy_rng_state(),
                "budget": dict(self.budget),
                "curriculum": self.curriculum.state_dict() if self.curriculum else None}

    def save_checkpoint(self) -> Path | None:
        """Atomic checkpoint of everything ``resume`` needs; refuses non-finite weights."""
        if not all(torch.isfinite(p).all() for p in self.params_list):
            self._log_event(f"epoch {self.epoch}: non-finite weights, checkpoint NOT written")
            return None
        if not self.acc.is_main_process:
            return None
        final = self.layout.epoch_dir(self.epoch)

        def build(tmp: Path) -> None:
            checkpoints.save_state(self.state(), tmp / checkpoints.TRAINER_STATE)
            if self.p.trainable == "lora":
                self.policy.save_lora(tmp / checkpoints.LORA_DIR)
            (tmp / "metrics.json").write_text(json.dumps(self.history[-1] if self.history else {}, indent=1))
            # what the LoRA sits on (base + merged cold start), so a checkpoint alone rebuilds its policy
            (tmp / checkpoints.PARAMS_JSON).write_text(json.dumps(
                {"model": self.p.model, "cold_start_lora": self.p.cold_start_lora, "convention": self.p.convention,
                 "trainable": self.p.trainable, "ema_decay": self.p.ema_decay, "seed": self.p.seed}, indent=1))

        atomic_save_dir(build, final)
        atomic_write_text(self.ckpt_dir / "latest", final.name)
        return final

    def load_checkpoint(self, path: Path) -> None:
        """Restore a :meth:`save_checkpoint` directory (``CheckpointError`` if it cannot be read)."""
        state = checkpoints.load_state(Path(path) / checkpoints.TRAINER_STATE)
        trainable = state["trainable"]
        if len(trainable) != len(self.params_list) or any(v.shape != q.shape for v, q in zip(trainable, self.params_list)):
            raise checkpoints.CheckpointError(f"{path} holds {len(trainable)} trainable tensors that do not fit this "
                                              f"run's {len(self.params_list)} (another lora_rank or trainable?)")
        with torch.no_grad():
            for p, v in zip(self.params_list, trainable):
                p.copy_(v.to(p.device))
        self.opt.load_state_dict(state["optimizer"])
        if self.ema and state["ema"]:
            self.ema.load_state_dict(state["ema"])
        if self.anchor and state.get("anchor"):
            self.anchor.load_state_dict(state["anchor"])
        self.epoch, self.history = state["epoch"], state["history"]
        self.best, self.guard_reference = state["best"], state["guard_reference"]
        torch.set_rng_state(state["torch_rng"])
        checkpoints.set_numpy_rng_state(state["numpy_rng"])
        self.budget.update(state.get("budget", {}))
        if self.curriculum:
            if not state.get("curriculum"):
                raise ValueError(f"{path} holds no curriculum state: it was written by a run with curriculum "
                                 f"'none', so resuming it with curriculum={self.p.curriculum!r} would start "
                                 "the curriculum from scratch mid-run")
            self.curriculum.load_state_dict(state["curriculum"])

    def weights_digest(self) -> str:
        """A short hash of the trainable weights (float32 bytes, in parameter order)."""
        h = hashlib.blake2b(digest_size=6)
        for q in self.params_list:
            h.update(q.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        return h.hexdigest()

    def check_ranks_agree(self, when: str) -> str:
        """Raise unless every process holds the same trainable weights; log the digest.

        Gradients are averaged over processes, so ranks that start from different weights stay different
        and only rank 0's are saved (issue 14, defect 1). This turns such a run into an error naming the ranks.
        """
        from accelerate.utils import gather_object

        digest = self.weights_digest()
        digests = gather_object([digest]) if self.acc.num_processes > 1 else [digest]
        if len(set(digests)) > 1:
            raise RuntimeError(f"trainable weights differ between processes {when}: digests by rank {digests}")
        self._log_event(f"trainable weights {when}: digest {digest} on all {len(digests)} process(es)")
        return digest

    def maybe_resume(self) -> bool:
        """With ``resume: true``, continue from the newest readable checkpoint: ``latest``, else (a corrupt
        one is skipped with a warning naming it) the one before. No checkpoint at all is said, not silent."""
        self._t_progress, self._epoch_progress = time.perf_counter(), self.epoch
        if not self.p.resume:
            return False
        if self.acc.is_main_process:
            for stale in checkpoints.clean_stale_tmp(self.ckpt_dir):
                self._log_event(f"removed {stale.name}, left by a killed checkpoint write")
        self.acc.wait_for_everyone()
        for path in checkpoints.resumable_checkpoints(self.layout):
            try:
                self.load_checkpoint(path)
            except checkpoints.CheckpointError as e:
                self._log_event(f"WARNING: checkpoint {path.name} is unreadable, trying the one before it: {e}")
                continue
            self._log_event(f"resumed from {path.name} (epoch {self.epoch})")
            self._epoch_progress = self.epoch
            return True
        self._log_event(f"resume: true but no checkpoint under {self.ckpt_dir}: starting from scratch")
        return False

    # -- one epoch ----------------------------------------------------------------------------

    def _generators(self, epoch: int, global_index: torch.Tensor, stream: str) -> list[torch.Generator]:
        return [torch.Generator().manual_seed(sample_seed(self.p.seed, epoch, int(i), stream))
                for i in global_index]

    def sample_epoch(self, epoch: int) -> list[EpochBatch]:
        """Roll out this process's batches of ``epoch``; rewards are computed in the background.

        One *round* is the plan's N_b batches (M groups x G images over P processes). With
        ``dynamic_sampling`` (DAPO) rounds repeat, each a fresh plan with fresh group ids and noise keyed on
        (seed, epoch, round, global index), until the gathered rewards hold at least M groups with spread or
        ``dynamic_max_rounds`` rounds ran; the list holds every round's batches in order and
        :meth:`advantages` keeps the first M spread groups. With a curriculum, every round draws its prompts
        with the curriculum's row weights of this epoch (the statistics up to the previous epoch).
        """
        from grpo_lib.grpo import group_spread

        weights = self.curriculum.row_weights() if self.curriculum else None
        batches, spread = [], 0
        for k in range(self.sampler.rounds_per_epoch):
            new = self._sample_round(epoch, k, weights)
            batches += new
            if not self.p.dynamic_sampling:
                break
            r = torch.cat([torch.as_tensor(b.rewards[0], dtype=torch.float32) for b in new])
            g = torch.cat([b.group_ids for b in new])
            spread += int(group_spread(self._gather(r), self._gather(g))[1].sum())
            if spread >= self.arith.groups_per_epoch:
                break
        return batches

    def _sample_round(self, epoch: int, round_index: int, weights) -> list[EpochBatch]:
        """This process's N_b batches of one round, rewards resolved."""
        a = self.arith
        prompts_plan, gid_plan = self.sampler.epoch_plan(epoch, round_index, weights)   # (N_b, P, B)
        batches = []
        for i in self._bar(range(a.batches_per_epoch), desc=f"epoch {epoch} sampling"):
            idx = prompts_plan[i, self.acc.process_index]                           # (B,)
            gids = gid_plan[i, self.acc.process_index]                              # (B,)
            # position in the epoch's global order (a refill round's samples follow the previous round's):
            # identical whatever the process split, so the noise keyed on it is too
            gidx = round_index * a.samples_per_epoch + \
                (i * a.num_processes + self.acc.process_index) * a.batch_size + torch.arange(a.batch_size)
            rows = [self.train_rows[j] for j in idx.tolist()]
            traj = self.rollout_batch(epoch, round_index * a.batches_per_epoch + i, rows, gidx)
            fut = self._pool.submit(self.reward_fn, traj.images, [r["prompt"] for r in rows], rows)
            batches.append(EpochBatch(rows, gids, gidx, traj, fut))
        for b in batches:
            b.rewards = b.rewards.result()
        return batches

    def _gather(self, t: torch.Tensor) -> torch.Tensor:
        """Concatenate a per-process tensor over processes (rank order), on the CPU."""
        return self.acc.gather(t.to(self.acc.device)).cpu() if self.acc.num_processes > 1 else t

    def rollout_batch(self, epoch: int, batch_index: int, rows: list[dict], global_index: torch.Tensor):
        """One sampling batch's trajectories (noise keyed on each sample's global index).

        GRPO stores the SDE steps with their log-probs; NFT, AWM and DGPO keep only the ODE's clean samples,
        NFT sampling with its anchor (the old policy), AWM and DGPO with the current weights (DGPO upstream
        switches to an EMA after 200 steps; not done here)."""
        from grpo_lib.objectives import CleanSamples
        from grpo_lib.rollout import sample_images, sample_trajectories, sde_window

        p = self.p
        if p.objective != "grpo":
            import contextlib
            ctx = self.anchor.swapped_in() if p.objective == "nft" else contextlib.nullcontext()
            with torch.no_grad(), ctx, self.acc.autocast():
                cond = self.policy.encode([r["prompt"] for r in rows])
                x0, images = sample_images(self.policy, cond=cond, num_steps=p.num_steps, shift=p.shift,
                                           guidance_scale=p.guidance_scale,
                                           generator=self._generators(epoch, global_index, "rollout"))
            return CleanSamples(x0.float(), cond, images)
        window = None
        if p.sde_window_size > 0:   # one window per global batch (all processes agree)
            g = torch.Generator().manual_seed(sample_seed(p.seed, epoch, batch_index, "window"))
            window = sde_window(p.sde_window_size, p.num_steps, generator=g,
                                window_range=tuple(p.sde_window_range) or None)
        with self.acc.autocast():   # the same precision as the re-scoring, so the first ratio is 1
            return sample_trajectories(
                self.policy, [r["prompt"] for r in rows], num_steps=p.num_steps, shift=p.shift,
                guidance_scale=p.guidance_scale, noise_level=p.noise_level, sde_type=p.sde_type,
                window=window, generator=self._generators(epoch, global_index, "rollout"),
                store_means=p.ratio_norm)

    def advantages(self, batches: list[EpochBatch]) -> tuple[list[torch.Tensor], list[torch.Tensor], dict]:
        """Gather rewards and group ids over processes, compute advantages, split back per batch.

        Also counts the epoch's reward calls (every gathered reward is one scored image) and feeds the
        curriculum this epoch's per-count strict accuracy. With dynamic sampling only the first M groups
        with spread are kept (:meth:`_dynamic_advantages`)."""
        from grpo_lib.grpo import compute_advantages

        p = self.p
        local_r = torch.cat([torch.as_tensor(b.rewards[0], dtype=torch.float32) for b in batches])
        local_g = torch.cat([b.group_ids for b in batches])
        all_r = self.acc.gather(local_r.to(self.acc.device)).cpu()
        all_g = self.acc.gather(local_g.to(self.acc.device)).cpu()
        self.budget["reward_calls"] += all_r.numel()
        if p.dynamic_sampling:
            adv, keep, stats = self._dynamic_advantages(all_r, all_g, len(batches))
        else:
            adv, keep, stats = compute_advantages(all_r, all_g, global_std=p.global_std,
                                                  adv_clip_max=p.adv_clip_max)
        # the local samples' slice of the gathered (P * N_local) vector
        n = local_r.numel()
        sl = slice(self.acc.process_index * n, (self.acc.process_index + 1) * n)
        adv, keep = adv[sl], keep[sl]
        B = self.arith.batch_size
        stats.update(reward_mean=float(all_r.mean()), reward_std=float(all_r.std(correction=0)))
        infos = [b.rewards[1] for b in batches]
        # the quality guard's measures on this epoch's rollouts, logged every epoch (the held-out guard
        # only runs every eval_every epochs): a reward bought with degrading images shows at once
        for key in QUALITY_KEYS:
            if key in infos[0]:
                vals = torch.as_tensor(np.concatenate([np.asarray(inf[key], np.float32) for inf in infos]))
                stats[f"rollout_{key}"] = float(self.acc.gather(vals.to(self.acc.device)).mean())
        for key in STRICT_KEYS:
            if key in infos[0]:
                vals = torch.as_tensor(np.concatenate([np.asarray(inf[key], np.float32) for inf in infos]))
                stats["strict_accuracy"] = float(self.acc.gather(vals.to(self.acc.device)).mean())
                break
        if self.curriculum:
            stats.update(self._observe_curriculum(batches, infos))
        # the number of kept samples of each global batch, known to every process
        all_keep = self.acc.gather(keep.to(self.acc.device).float()).cpu().view(self.acc.num_processes, -1)
        kept_per_batch = all_keep.view(self.acc.num_processes, len(batches), B).sum(dim=(0, 2))   # (N_b,)
        if p.dynamic_sampling:
            # train_epoch weighs batch j's kept samples by 1 / (kept_per_batch[j] * batches per update).
            # K_u / (batches per update) for every batch of update u turns that into a plain mean over the
            # update's K_u kept samples (DAPO's filled batch); per-batch means would let a refill batch that
            # holds one kept sample weigh as much as a full one.
            per_update = len(batches) // p.updates_per_epoch
            K = kept_per_batch.view(p.updates_per_epoch, per_update).sum(dim=1)              # (U,)
            kept_per_batch = (K / per_update).repeat_interleave(per_update)
        stats["kept_per_batch"] = kept_per_batch
        return [adv[j * B:(j + 1) * B] for j in range(len(batches))], \
               [keep[j * B:(j + 1) * B] for j in range(len(batches))], stats

    def _dynamic_advantages(self, all_r: torch.Tensor, all_g: torch.Tensor, num_batches: int):
        """Dynamic sampling's update set: the first M groups (by id) with spread; every other sample
        (zero-spread groups, surplus spread groups) is dropped. Advantages over the kept groups only (the
        global std is the kept samples'). ``zero_std_ratio`` is the first round's, as without refills."""
        from grpo_lib.grpo import compute_advantages, group_spread, select_spread_groups

        a, p = self.arith, self.p
        M = a.groups_per_epoch
        kept_ids, found = select_spread_groups(all_r, all_g, M)
        keep = torch.isin(all_g, kept_ids)
        adv = torch.zeros_like(all_r)
        stats = {"num_groups": 0.0, "num_kept": 0.0, "reward_std_mean": float("nan"), "adv_clipfrac": 0.0}
        if keep.any():
            adv_kept, _, stats = compute_advantages(all_r[keep], all_g[keep], global_std=p.global_std,
                                                    adv_clip_max=p.adv_clip_max)
            adv[keep] = adv_kept
        first_round = (all_g // M) % self.sampler.rounds_per_epoch == 0   # group id = (e * R + k) * M + j
        _, spread = group_spread(all_r[first_round], all_g[first_round])
        stats.update(zero_std_ratio=float((~spread).double().mean()),
                     dynamic_rounds=float(num_batches // a.batches_per_epoch),
                     dynamic_spread_groups=float(found), dynamic_shortfall=float(M - kept_ids.numel()))
        return adv, keep, stats

    def _observe_curriculum(self, batches: list[EpochBatch], infos: list[dict]) -> dict:
        """Fold the epoch's gathered (count, strict correctness) into the curriculum; its log row.

        The samples are put in the epoch's global order before the update, so every process, and a run
        split over any number of processes, computes the same p_N and so draws the same next plan."""
        from grpo_lib.curriculum import row_count

        key = next((k for k in STRICT_KEYS if k in infos[0]), None)
        if key is None:
            raise ValueError(f"curriculum={self.p.curriculum!r} needs per-image strict correctness in the reward's "
                             f"info under one of {list(STRICT_KEYS)}; the reward gave {sorted(infos[0])}")
        counts = torch.tensor([row_count(r) for b in batches for r in b.rows], dtype=torch.long)
        correct = torch.as_tensor(np.concatenate([np.asarray(inf[key], np.float32) for inf in infos]))
        order = torch.cat([b.global_index for b in batches])
        counts, correct, order = self._gather(counts), self._gather(correct), self._gather(order)
        perm = torch.argsort(order)
        self.curriculum.observe(counts[perm].numpy(), correct[perm].double().numpy())
        return self.curriculum.log_row()

    def train_epoch(self, epoch: int, batches: list[EpochBatch], advs, keeps, kept_per_batch) -> dict:
        """The update: per batch, one backward pass per trained timestep (``objective_passes``) of the
        objective's loss (``objective_step``); an optimizer step every ``len(batches) / updates_per_epoch``
        batches, with gradients averaged over processes."""
        p = self.p
        per_update = len(batches) // p.updates_per_epoch
        logs: list[dict] = []
        grad_norms, skipped = [], 0
        lr = self.epoch_lr(epoch)
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.opt.zero_grad(set_to_none=True)
        work = [(inner, j, batch) for inner in range(p.inner_epochs) for j, batch in enumerate(zip(batches, advs, keeps))]
        group_weights = None
        for inner, j, (b, adv, keep) in self._bar(work, desc=f"epoch {epoch} training"):
            if p.objective == "dgpo" and j == 0:   # each pass over the rollouts scores its own draws first
                group_weights = self.dgpo_group_weights(epoch, batches, advs, keeps, inner)
            k_local = int(keep.sum())
            k_global = float(kept_per_batch[j])
            if k_local > 0:
                sel = keep.nonzero().squeeze(1)
                sub = b.traj[sel]
                A = adv[sel].to(self.acc.device)
                passes = self.objective_passes(epoch, b, sel, inner)
                if group_weights is not None:   # dgpo: each sample carries its group's sigma(z_g) of that pass
                    slot = (b.group_ids[sel.cpu()] - self.sampler.group_id_base(epoch)).to(self.acc.device)
                    passes = [(t, eps, group_weights[c, slot]) for c, (t, eps) in enumerate(passes)]
                # mean over the global batch's kept samples: sum_local / (K_global / P)
                scale = k_local * self.acc.num_processes / k_global / len(passes) / per_update
                for c, spec in enumerate(passes):
                    loss, stats = self.objective_step(sub, A, spec)
                    if not torch.isfinite(loss):
                        skipped += 1
                        self._log_event(f"epoch {epoch} batch {j} pass {c}: non-finite loss, skipped")
                        continue
                    self.acc.backward(loss * scale)
                    logs.append((k_local, {k: float(v) for k, v in stats.items()}))
            if (j + 1) % per_update == 0:   # an optimizer update: average grads over processes, clip, step
                _flat_allreduce_mean(self.params_list, self.acc)
                grads_ok = all(q.grad is None or torch.isfinite(q.grad).all() for q in self.params_list)
                if grads_ok:
                    gn = torch.nn.utils.clip_grad_norm_(self.params_list, p.max_grad_norm)
                    grad_norms.append(float(gn))
                    self.opt.step()
                    if self.ema:
                        self.ema.step()
                    if self.anchor:
                        self.anchor.step()
                else:
                    skipped += 1
                    self._log_event(f"epoch {epoch} pass {inner} update {j // per_update}: non-finite gradient, step skipped")
                self.opt.zero_grad(set_to_none=True)
        out = self._weighted_mean_over_processes(logs)
        out["grad_norm"] = float(np.mean(grad_norms)) if grad_norms else float("nan")
        out["skipped_steps"] = skipped
        out["lr"] = lr
        return out

    def epoch_lr(self, epoch: int) -> float:
        """The lr of every update of (0-based) ``epoch``: ``lr_schedule`` over ``lr_decay_epochs`` (or
        ``num_epochs``) epochs, no warmup (``grpo_lib.lr_schedule``). A function of the epoch alone, so a
        resumed run and every process use the same value."""
        from grpo_lib.lr_schedule import learning_rate

        p = self.p
        return learning_rate(epoch, p.lr, 0, p.lr_decay_epochs or p.num_epochs, p.lr_schedule)

    def objective_passes(self, epoch: int, b: EpochBatch, sel: torch.Tensor, inner: int = 0) -> list:
        """What each backward pass of a batch's kept samples ``sel`` trains on in inner epoch ``inner``.

        GRPO: one stored SDE step per sample per pass (``timestep_strategy``: ``first_50`` = the noisiest
        half); a window run trains every stored (window) step. NFT / AWM: ``train_timesteps`` noise levels
        per sample from the rollout grid, each with fresh noise eps; all keyed on the sample's global index
        (and, after the first, on the inner epoch: every pass over the rollouts draws its own t and eps).

        ``group_shared_noise``: the samples of a group share their draws of t and eps (common random numbers,
        keyed on the group id). The estimate stays unbiased (each sample's (t, eps) has the same law), but as
        the advantages of a group sum to 0, the part of grad FM_i that depends only on (t, eps, prompt)
        cancels inside the group instead of adding noise; what is left is the difference between the
        group's clean images, at high t roughly grad of (sum_i A_i x0_i)^T v_theta.
        """
        from grpo_lib.grpo import select_timesteps
        from grpo_lib.objectives import draw_noise_levels

        p, dev = self.p, self.acc.device
        tag = f"/inner{inner}" if inner else ""      # inner epoch 0 keeps the single-pass streams
        if p.objective == "grpo":
            gens = self._generators(epoch, b.global_index[sel.cpu()], "timesteps" + tag)
            traj = b.traj
            T_stored = traj.log_probs.shape[1]
            if traj.window is not None:   # the window never holds the sharp last step (rollout.sde_window)
                cols = select_timesteps("all", T_stored, len(sel), exclude_last=False)
            else:
                cols = torch.cat([select_timesteps(p.timestep_strategy, T_stored, 1, generator=g) for g in gens])
            return [cols[:, c].to(dev) for c in range(cols.shape[1])]                  # each (K,)
        keys, prefix = b.global_index[sel.cpu()], ""
        if p.group_shared_noise:
            keys, prefix = b.group_ids[sel.cpu()], "group/"
        gens = self._generators(epoch, keys, prefix + "timesteps" + tag)
        t = torch.stack([draw_noise_levels(p.num_steps, p.shift, p.train_timesteps, g) for g in gens])  # (K, T)
        shape = tuple(b.traj.final_latents.shape[1:])
        passes = []
        for c in range(p.train_timesteps):
            eps = torch.stack([torch.randn(shape, generator=g) for g in
                               self._generators(epoch, keys, f"{prefix}eps{c}{tag}")])
            passes.append((t[:, c].to(dev), eps.to(dev)))
        return passes

    def dgpo_group_weights(self, epoch: int, batches: list[EpochBatch], advs, keeps, inner: int = 0) -> torch.Tensor:
        """sigma(z_g) for every pass c and group slot g of the epoch, (train_timesteps, R * M), on every process.

        A no-grad pass over the epoch's kept samples at the draws ``objective_passes`` will train on:
        S_g = sum_i A_i (FM_theta,i - FM_ref,i) per process, summed over processes (a group may span
        processes and batches), then ``objectives.dgpo_group_weights``. theta is the weights at the start of
        the pass, which the gradient sees exactly when the pass makes one update (``updates_per_epoch: 1``, as
        upstream's one optimizer step per epoch); with more updates later batches see a slightly older z_g.
        """
        from grpo_lib import objectives

        p, dev = self.p, self.acc.device
        slots = self.sampler.rounds_per_epoch * self.arith.groups_per_epoch
        sums = torch.zeros(p.train_timesteps, slots, dtype=torch.float64, device=dev)
        base = self.sampler.group_id_base(epoch)
        for b, adv, keep in zip(batches, advs, keeps):
            if int(keep.sum()) == 0:
                continue
            sel = keep.nonzero().squeeze(1)
            sub, A = b.traj[sel], adv[sel].to(dev)
            slot = (b.group_ids[sel.cpu()] - base).to(dev)
            for c, (t, eps) in enumerate(self.objective_passes(epoch, b, sel, inner)):
                fm, fm_ref = objectives.dgpo_scores(self.policy, self.reference, sub, t, eps, self.acc.autocast,
                                                    p.train_guidance_scale)
                sums[c] += objectives.dgpo_group_sums(fm, fm_ref, A, slot, slots)
        if self.acc.num_processes > 1:
            sums = self.acc.reduce(sums, reduction="sum")
        return objectives.dgpo_group_weights(sums, dgpo_beta=p.dgpo_beta, group_size=p.group_size)

    def objective_step(self, sub, adv: torch.Tensor, spec) -> tuple[torch.Tensor, dict]:
        """The loss of one backward pass (``grpo_lib.objectives``)."""
        from grpo_lib import objectives

        p = self.p
        if p.objective == "grpo":
            return objectives.grpo_step(self.policy, self.reference, sub, spec, adv, p, self.acc.autocast)
        if p.objective == "dgpo":
            t, eps, weight = spec
            return objectives.dgpo_step(self.policy, self.reference, sub, adv, t, eps, weight, p, self.acc.autocast)
        t, eps = spec
        step = objectives.nft_step if p.objective == "nft" else objectives.awm_step
        return step(self.policy, self.reference, self.anchor, sub, adv, t, eps, p, self.acc.autocast)

    def _weighted_mean_over_processes(self, logs: list[tuple[int, dict]]) -> dict:
        """Per-step stats averaged over every process's kept samples (so 2 processes log exactly what
        1 process with the same global batch logs)."""
        from accelerate.utils import gather_object

        keys = sorted({k for _, st in logs for k in st})
        if self.acc.num_processes > 1:   # a process whose samples were all dropped logged nothing
            keys = sorted(set(gather_object(keys)))
        sums = torch.zeros(len(keys) + 1, dtype=torch.float64)
        for w, st in logs:
            for i, k in enumerate(keys):
                sums[i] += w * st.get(k, 0.0)
            sums[-1] += w
        if self.acc.num_processes > 1:
            sums = self.acc.reduce(sums.to(self.acc.device), reduction="sum").cpu()
        total = float(sums[-1])
        return {k: float(sums[i] / total) if total > 0 else float("nan") for i, k in enumerate(keys)}

    # -- evaluation and the quality guard -----------------------------------------------------

    @torch.no_grad()
    def evaluate(self, epoch: int) -> dict:
        """ODE evaluation on the held-out prompts (fixed seeds, EMA weights if any) + quality guard.

        The guard compares the mean detector confidence and shape / background / area measures of
        the images with those at the run's start; a relative drop above ``guard_max_drop`` fails it,
        so a reward bought with degenerate images shows (and that checkpoint is never the best).

        The count guard (``guard_max_count_drop`` = d > 0) fails an epoch whose exact-count accuracy at any
        requested count n falls more than d below the start's, acc_n(epoch) < acc_n(0) - d: a selection by the
        mean alone keeps an epoch that trades one count away for small gains at the others.
        """
        import contextlib

        from grpo_lib.rollout import sample_for_rows

        if not self.eval_rows:
            return {}
        p = self.p
        rows = self.eval_rows[self.acc.process_index::self.acc.num_processes]
        ctx = self.ema.swapped_in(self.params_list) if self.ema else contextlib.nullcontext()
        rewards, infos = [], []
        with ctx:   # fixed per-(prompt, k) seeds, apart from the final evaluation's (selection_seed)
            images, _ = sample_for_rows(self.policy, rows, images_per_prompt=p.eval_images_per_prompt,
                                        num_steps=p.eval_num_steps,
                                        shift=p.shift, guidance_scale=p.eval_guidance_scale,
                                        seed=selection_seed(p.seed), batch_size=p.batch_size)
            flat = [r for r in rows for _ in range(p.eval_images_per_prompt)]
            for k in range(0, len(flat), p.batch_size):
                chunk = flat[k:k + p.batch_size]
                r, info = self.reward_fn(images[k:k + p.batch_size], [r["prompt"] for r in chunk], chunk)
                rewards.append(np.asarray(r, np.float32))
                infos.append(info)
        out = {"eval_reward": self._gather_mean(np.concatenate(rewards))}
        for key in infos[0]:
            vals = np.concatenate([np.asarray(inf[key]) for inf in infos])
            if vals.dtype.kind in "fiub" and vals.ndim == 1:
                out[f"eval_{key}"] = self._gather_mean(vals.astype(np.float32))
        per_count = self._per_count_accuracy(infos)
        out.update({f"eval_acc_count_{n}": a for n, a in per_count.items()})
        guard = {k: out[f"eval_{k}"] for k in QUALITY_KEYS if f"eval_{k}" in out}
        if self.guard_reference is None:
            self.guard_reference = {**guard, **{f"acc_count_{n}": a for n, a in per_count.items()}}
        drops = {k: (self.guard_reference[k] - v) / max(abs(self.guard_reference[k]), 1e-8)
                 for k, v in guard.items() if k in self.guard_reference}
        out["guard_max_drop"] = max(drops.values()) if drops else 0.0
        out["guard_pass"] = float(out["guard_max_drop"] <= p.guard_max_drop)
        if p.guard_max_count_drop:
            count_drops = [self.guard_reference[f"acc_count_{n}"] - a for n, a in per_count.items()
                           if f"acc_count_{n}" in self.guard_reference]
            if not count_drops:
                raise ValueError(f"guard_max_count_drop={p.guard_max_count_drop} needs per-count accuracy at the start "
                                 "and now: a counting reward (info 'target' and 'correct') on counting eval rows")
            out["guard_max_count_drop"] = max(count_drops)
            out["guard_pass"] = float(out["guard_pass"] and out["guard_max_count_drop"] <= p.guard_max_count_drop)
        self.budget["eval_reward_calls"] += len(self.eval_rows) * p.eval_images_per_prompt   # all processes
        return out

    def _per_count_accuracy(self, infos: list[dict]) -> dict[int, float]:
        """{n: exact-count accuracy of the eval images asking for n objects}, over all processes (empty when
        the reward's info has no 'target' / 'correct'). Sums are all-reduced as fixed-length vectors, so
        processes holding different counts agree."""
        from grpo_lib.prompts import MAX_COUNT

        if not infos or not all("target" in i and "correct" in i for i in infos):
            return {}
        target = np.concatenate([np.asarray(i["target"]) for i in infos]).astype(np.int64)
        correct = np.concatenate([np.asarray(i["correct"]) for i in infos]).astype(np.float64)
        inside = (target >= 0) & (target <= MAX_COUNT)          # a row the world can't draw has no count to log
        target, correct = target[inside], correct[inside]
        sums = torch.zeros(2, MAX_COUNT + 1, dtype=torch.float64)
        sums[0].index_add_(0, torch.as_tensor(target), torch.as_tensor(correct))
        sums[1].index_add_(0, torch.as_tensor(target), torch.ones(len(target), dtype=torch.float64))
        if self.acc.num_processes > 1:
            sums = self.acc.reduce(sums.to(self.acc.device), reduction="sum").cpu()
        return {n: float(sums[0, n] / sums[1, n]) for n in range(MAX_COUNT + 1) if sums[1, n] > 0}

    def _gather_mean(self, values: np.ndarray) -> float:
        t = torch.as_tensor(values, dtype=torch.float32, device=self.acc.device)
        return float(self.acc.gather_for_metrics(t).mean()) if self.acc.num_processes > 1 else float(t.mean())

    # -- the loop -----------------------------------------------------------------------------

    def fit(self) -> list[dict]:
        """Run epochs until ``num_epochs`` or the time budget; returns the metrics history."""
        p = self.p
        self.maybe_resume()
        if p.num_processes > 1 and p.num_processes != self.acc.num_processes:   # `python -m grpo_lib.train` on a 2-process file
            a = self.acc.num_processes
            self._log_event(f"WARNING: params say num_processes={p.num_processes} but {a} process(es) run: each "
                            f"epoch samples {a * p.batch_size * p.batches_per_epoch} rollouts, not "
                            f"{p.num_processes * p.batch_size * p.batches_per_epoch}")
        self.check_ranks_agree(f"at start (epoch {self.epoch})")
        t_start = time.perf_counter()
        if self.epoch == 0 and self.eval_rows and not self.history:   # the start: guard reference + baseline row
            row = {"epoch": 0, **self.evaluate(0), **self.budget}
            self._record(row)
            if p.keep_start and "eval_reward" in row:   # the start competes: an epoch must beat it to be kept
                self.best = {"epoch": 0, "eval_reward": row["eval_reward"]}
                path = self.save_checkpoint()
                if path is not None and self.acc.is_main_process:
                    atomic_write_text(self.ckpt_dir / "best", path.name)
        while self.epoch < p.num_epochs:
            epoch = self.epoch
            t0 = time.perf_counter()
            self.policy_train_mode(True)
            batches = self.sample_epoch(epoch)
            t_sample = time.perf_counter() - t0
            advs, keeps, stats = self.advantages(batches)
            kept = stats.pop("kept_per_batch")
            train_stats = self.train_epoch(epoch, batches, advs, keeps, kept)
            self.epoch = epoch + 1
            row = {"epoch": self.epoch, **stats, **train_stats, "seconds_sampling": t_sample,
                   "seconds_epoch": time.perf_counter() - t0}
            self.budget["seconds_total"] += row["seconds_epoch"]   # training only: evaluation comes next
            # the last epoch (by count or by time budget) is always evaluated and saved, so the most
            # trained weights are a candidate for the best checkpoint too
            out_of_time = bool(p.time_budget_minutes) and (time.perf_counter() - t_start) / 60 > p.time_budget_minutes
            last_by_count = self.epoch == p.num_epochs
            last = last_by_count or out_of_time
            new_best = False
            if self.epoch % p.eval_every == 0 or last:
                self.policy_train_mode(False)
                row.update(self.evaluate(self.epoch))
                if "eval_reward" in row and row["guard_pass"] and \
                        (self.best is None or row["eval_reward"] > self.best["eval_reward"]):
                    self.best = {"epoch": self.epoch, "eval_reward": row["eval_reward"]}
                    new_best = True
            self._record({**row, **self.budget})
            # a new best is saved even off the save_every grid: otherwise selection would silently fall back
            # to an older best or to the last epoch
            save = self.epoch % p.save_every == 0 or last or new_best
            if save:
                path = self.save_checkpoint()
                if new_best and path is not None and self.acc.is_main_process:
                    atomic_write_text(self.ckpt_dir / "best", path.name)
            if self.acc.num_processes > 1 and save:
                self.check_ranks_agree(f"after epoch {self.epoch}")
            if out_of_time:
                lr_next = self.epoch_lr(self.epoch)
                self._log_event(f"time budget of {p.time_budget_minutes} min reached after epoch {self.epoch}"
                                + (f": WARNING, the {p.lr_schedule} lr is still {lr_next:.2e}, so the model is not "
                                   "annealed; set time_budget_minutes: 0 to run every epoch"
                                   if p.lr_schedule != "constant" and lr_next > 0 and not last_by_count else ""))
                break
        self.acc.wait_for_everyone()
        return self.history

    def policy_train_mode(self, on: bool) -> None:
        self.policy.train_mode(on)   # the Policy contract: every shipped policy stays in eval (no dropout)

    # -- logging ------------------------------------------------------------------------------

    def _record(self, row: dict) -> None:
        self.history.append(row)
        if not self.acc.is_main_process:
            return
        import pandas as pd
        pd.DataFrame(self.history).to_csv(self.run_dir / "metrics.csv", index=False)
        try:
            if self._tb is None:
                from torch.utils.tensorboard import SummaryWriter
                self._tb = SummaryWriter(str(self.run_dir / "tensorboard"))
            for k, v in row.items():
                if isinstance(v, (int, float)) and k != "epoch":
                    self._tb.add_scalar(k, v, row["epoch"])
            self._tb.flush()
        except ImportError:   # tensorboard is optional on GPU nodes; the CSV is the record
            pass
        # one terminal line per epoch and per evaluation: the pipeline tails progress.log while the notebook runs
        elapsed = time.perf_counter() - self._t_progress
        left = progress.eta(row["epoch"] - self._epoch_progress, self.p.num_epochs - self._epoch_progress, elapsed,
                            60.0 * self.p.time_budget_minutes)
        for line in progress.epoch_line(row, self.p.num_epochs, elapsed, left):
            progress.write(self.run_dir, line)
        if self.p.progress:
            keys = [k for k in ("reward_mean", "strict_accuracy", "zero_std_ratio", "approx_kl", "clipfrac",
                                "kl", "eval_reward", "guard_pass", "seconds_epoch") if k in row]
            print(f"[grpo] epoch {row['epoch']}: " + ", ".join(f"{k}={row[k]:.4g}" for k in keys), flush=True)

    def _log_event(self, msg: str) -> None:
        if self.acc.is_main_process:
            with open(self.run_dir / "events.log", "a") as f:
                f.write(f"{time.strftime('%H:%M:%S')} {msg}\n")
            print(f"[grpo] {msg}", flush=True)

    def _bar(self, it, desc: str):
        if not (self.p.progress and self.acc.is_main_process):
            return it
        from tqdm.auto import tqdm
        return tqdm(it, desc=desc, leave=False)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        if self._tb is not None:
            self._tb.close()


# ---------------------------------------------------------------------------------------------
# Policy construction from params
# ---------------------------------------------------------------------------------------------


def build_reward_for(p: GRPOParams):
    """The reward a params file asks for: the registry's weighted sum, or the remote server's
    strict / partial reward (GPU world: the detector runs as its own service)."""
    if p.reward_server_url:
        from grpo_lib.server import RemoteCountingReward
        names = set(p.reward)
        if names == {"counting_strict"}:
            kind = "strict"
        elif names == {"counting_partial"}:
            kind = "partial"
        else:
            raise ValueError(f"reward={p.reward} with reward_server_url: the server scores one of "
                             "{'counting_strict': 1.0} or {'counting_partial': 1.0}")
        return RemoteCountingReward(p.reward_server_url, reward=kind, retries=p.reward_server_retries,
                                    timeout=p.reward_server_timeout_s)
    from grpo_lib.rewards import build_reward
    return build_reward(p.reward)


def load_policy_for(p: GRPOParams, device) -> Any:
    """The policy a params file asks for: base checkpoint, cold-start LoRA merged in, fresh LoRA on top,
    initialised from ``p.seed`` (:func:`grpo_lib.checkpoints.build_policy`): every process of a launch, and
    every run with the same params, starts from the same adapter (issue 14, defect 1)."""
    return checkpoints.build_policy(p, device, stream="grpo_lora_init")


# ---------------------------------------------------------------------------------------------
# Command line: python -m grpo_lib.train params/x.yaml  |  accelerate launch -m grpo_lib.train ...
# ---------------------------------------------------------------------------------------------


def run(params: GRPOParams, **kwargs) -> list[dict]:
    trainer = GRPOTrainer(params, **kwargs)
    try:
        return trainer.fit()
    finally:
        trainer.close()


def main(argv: list[str] | None = None) -> int:
    from grpo_lib.params import load_params_with_set

    ap = argparse.ArgumentParser(description="Flow-GRPO training from a params YAML")
    ap.add_argument("params", help="params/02_counting_grpo__<experiment>.yaml")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=YAML",
                    help="override fields, e.g. --set num_epochs=2 run_dir=runs/x")
    args = ap.parse_args(argv)
    params = load_params_with_set(args.params, GRPOParams, args.set)
    trainer = GRPOTrainer(params)
    try:
        trainer.fit()
    finally:
        trainer.close()
    # free what holds process-group resources before the group is destroyed (stack_notes §3:
    # otherwise ~1 run in 15 aborts at exit with "terminate called without an active exception")
    acc = trainer.acc
    acc.wait_for_everyone()
    del trainer
    gc.collect()
    end_training(acc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
