r"""Will it fit? Batch arithmetic, memory per GPU and passes per epoch of a GPU-world run, before renting a node.

    python -m grpo_lib.plan params/02_counting_grpo__sd35m_strict_first_50.yaml --gpus 4 --gpu-mem-gib 80
    python -m grpo_lib.plan params/02_counting_grpo__sd35m_strict_first_50.yaml --gpus 8 --gpu-mem-gib 40 \
        --groups-per-epoch 48 --seconds-per-pass 0.05
    python -m grpo_lib.plan --readme-table          # the README's "Planning a GPU run" table

In a notebook: ``plan(params, gpus=4, gpu_mem_gib=80)`` -> :class:`Plan` (``.memory`` and ``.frame()`` are
pandas DataFrames), or ``plan_frame(...)`` for the DataFrame alone.

Memory per GPU (bytes; P GPUs, B images per GPU per sampling batch, CFG doubles the transformer's rows)::

    static   = transformer (params x dtype) + text encoders (or precomputed embeddings) + VAE (float32)
             + trainable x (4 weight + 4 grad + 8 AdamW) + EMA (4 x trainable) [+ Show-o2: frozen head copy]
    rollouts = B x N_b x (2 x T x latent + prompt embeddings)      the epoch's stored trajectories (float32)
    peak     = static + rollouts + max(train activations(rows), rollout batch(rows)) + overhead

| figure                      | where it comes from                                                           |
|-----------------------------|-------------------------------------------------------------------------------|
| parameter counts            | the models' configs built on the meta device (``grpo_lib.plan_models``)        |
| train activations           | measured per block on this CPU (``plan_calibration.json``), extrapolated to the model's block count and rows |
| rollout batch               | measured: no-grad blocks and the VAE decode (SD3); Show-o2's LLM logits from shapes |
| stored rollouts, embeddings | computed from tensor shapes (``rollout.Trajectories``)                         |
| overhead                    | ASSUMED (CUDA context + allocator slack), ``--overhead-gib``, default 1.5      |

Error bound (see ``plan_calibration.json`` ``checks``): the block-count models of ``plan_calibrate.fit_blocks``,
fitted on 1-2 blocks, predicted the measured 4-block peaks within 1 % (SD3.5-M, both modes; Show-o2's head at 4
and 6 blocks); the method is held to |e| <= 15 %, which ``tests/test_plan.py`` checks on the committed figures and
by measuring at a small width. The micro-batch extrapolation is linear in rows, checked once at 4 rows
(``rows_check``); the planner extends it to 12+ rows, which is not checked. Nothing here ran on a GPU: CUDA
kernels' workspaces and the caching allocator's fragmentation (often 5-20 %) are not measured, which is what the
assumed overhead and the 10 % margin (``--margin``) stand for. So read a plan as +-15 % on activations plus
whatever the GPU allocator adds.

Passes: a "pass" is one transformer forward of one row (one image, one CFG branch); a backward is counted as 2
passes and gradient checkpointing adds one more forward. ``--seconds-per-pass`` (measured on the target GPU,
e.g. one 512 px SD3.5-M forward of a batch divided by its rows) turns them into time per epoch (the VAE
decode, the reward and communication not included).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

GIB = 2 ** 30
CALIBRATION = Path(__file__).with_name("plan_calibration.json")
REPO = Path(__file__).resolve().parent.parent
README_BEGIN = "<!-- plan-table:begin (python -m grpo_lib.plan --readme-table) -->"
README_END = "<!-- plan-table:end -->"
DTYPE_BYTES = {"no": 4, "fp16": 2, "bf16": 2}
MAX_GPUS = 64          # nearby GPU counts are searched in 1..MAX_GPUS
SOURCES = {"config": "count from the config (meta device)", "shapes": "computed from tensor shapes",
           "published": "published parameter count",
           "measured": "measured on CPU, extrapolated", "assumed": "assumed, not measured"}


def load_calibration(path: str | Path = CALIBRATION) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"calibration file {str(path)!r} does not exist; regenerate it with "
                         "python -m grpo_lib.plan_calibrate --showo2-repo <show-o2 folder>")
    return json.loads(path.read_text())


# ------------------------------------------------------------------------------------------ arithmetic
def _divisors_ok(M: int, G: int, P: int, B: int, U: int) -> int | None:
    """N_b for M groups of G on P GPUs x B, or None when the epoch is not whole batches / whole updates."""
    if (M * G) % (P * B):
        return None
    nb = M * G // (P * B)
    return nb if nb % U == 0 else None


def nearby_settings(gpus: int, batch_size: int, group_size: int, groups_per_epoch: int, updates_per_epoch: int,
                    *, k: int = 5) -> dict[str, list[dict]]:
    """Settings that keep ``groups_per_epoch`` (M) whole: for each knob, up to ``k`` values other than the current
    one, nearest first (ties -> smaller first), the other knobs fixed, each with its batches per epoch N_b.

        valid  <=>  M G % (P B) == 0  and  N_b = M G / (P B) is a multiple of updates_per_epoch

    Knobs: ``gpus`` in 1..MAX_GPUS, ``batch_size`` in 1..4B, ``group_size`` in 2..2G.
    """
    P, B, G, M, U = gpus, batch_size, group_size, groups_per_epoch, updates_per_epoch
    ranges = {"gpus": (P, range(1, MAX_GPUS + 1), lambda v: _divisors_ok(M, G, v, B, U)),
              "batch_size": (B, range(1, 4 * B + 1), lambda v: _divisors_ok(M, G, P, v, U)),
              "group_size": (G, range(2, 2 * G + 1), lambda v: _divisors_ok(M, v, P, B, U))}
    out = {}
    for name, (cur, values, nb_of) in ranges.items():
        ok = [(v, nb_of(v)) for v in values if v != cur and nb_of(v) is not None]
        ok.sort(key=lambda x: (abs(x[0] - cur), x[0]))
        out[name] = [{name: v, "batches_per_epoch": nb} for v, nb in ok[:k]]
    return out


@dataclass
class Arithmetic:
    """The epoch's batch arithmetic on ``gpus`` GPUs (``grpo.check_batch_arithmetic`` + updates per epoch)."""
    gpus: int
    batch_size: int
    group_size: int
    groups_per_epoch: int
    batches_per_epoch: int
    updates_per_epoch: int
    images_per_epoch: int
    images_per_gpu: int
    nearby: dict = field(default_factory=dict)


def arithmetic(gpus: int, batch_size: int, group_size: int, *, updates_per_epoch: int,
               batches_per_epoch: int | None = None, groups_per_epoch: int | None = None) -> Arithmetic:
    """Check the epoch on ``gpus`` GPUs; ``ValueError`` naming what to change when it does not divide.

    With ``groups_per_epoch`` (M) the epoch is kept and N_b follows (N_b = M G / (P B)); otherwise the params'
    ``batches_per_epoch`` is kept and M follows (M = P B N_b / G).
    """
    from grpo_lib.grpo import check_batch_arithmetic, gradient_accumulation_steps

    if groups_per_epoch is not None:
        M = groups_per_epoch
        if not any(_divisors_ok(M, group_size, p, batch_size, updates_per_epoch) for p in range(1, MAX_GPUS + 1)):
            near = nearby_settings(gpus, batch_size, group_size, M, updates_per_epoch)
            alt = [f"{k} {', '.join(str(d[k]) for d in v)}" for k, v in near.items() if v and k != "gpus"]
            raise ValueError(
                f"group_size={group_size}: no GPU count from 1 to {MAX_GPUS} splits {M} groups x {group_size} images "
                f"= {M * group_size} into whole batches of batch_size={batch_size} per GPU with batches_per_epoch a "
                f"multiple of updates_per_epoch={updates_per_epoch}; change " + ("; or ".join(alt) or
                                                                                  "groups_per_epoch"))
    try:
        if groups_per_epoch is not None:
            a = check_batch_arithmetic(gpus, batch_size, group_size, groups_per_epoch=groups_per_epoch)
        else:
            a = check_batch_arithmetic(gpus, batch_size, group_size, batches_per_epoch=batches_per_epoch)
        gradient_accumulation_steps(a.batches_per_epoch, updates_per_epoch)
    except ValueError as e:
        msg = f"on {gpus} GPUs: {e}"
        if groups_per_epoch is not None:   # the epoch is fixed: which GPU counts keep it whole
            ok = nearby_settings(gpus, batch_size, group_size, groups_per_epoch, updates_per_epoch)["gpus"]
            msg += "; or keep the epoch and use gpus " + ", ".join(str(d["gpus"]) for d in ok)
        raise ValueError(msg) from None
    return Arithmetic(a.num_processes, a.batch_size, a.group_size, a.groups_per_epoch, a.batches_per_epoch,
                      updates_per_epoch, a.samples_per_epoch, a.batch_size * a.batches_per_epoch,
                      nearby_settings(gpus, batch_size, group_size, a.groups_per_epoch, updates_per_epoch))


# ------------------------------------------------------------------------------------------ memory model
def _lin_rows(v1: float, v2: float, rows: float) -> float:
    """A figure measured at 1 and 2 rows, extended linearly in rows (checked at 4: ``rows_check``)."""
    return v1 + (rows - 1) * (v2 - v1)


def _fit(cal_kind: dict, mode: str, rows: float) -> dict:
    f1, f2 = cal_kind["fits"][f"{mode}/1"], cal_kind["fits"][f"{mode}/2"]
    return {k: (_lin_rows(f1[k], f2[k], rows) if isinstance(f1[k], (int, float)) else f1[k]) for k in f1}


def sd3_train_activations(cal: dict, rows: float, *, checkpointing: bool, num_layers: int = 24,
                          dual_layers: int = 13, token_scale: float = 1.0) -> float:
    """Peak bytes of one forward + backward through SD3.5-M's blocks at ``rows`` transformer rows.

        no checkpointing:  a + 13 b_dual + 11 b_plain      (a, b fitted on 1-2 blocks, linear in rows)
        checkpointing:     plan_calibrate.predict(dual-block fit, 24)   (2 dual blocks' peak + 22 blocks' inputs)

    The last block (context_pre_only) is counted as a plain one (a slight overestimate).
    """
    from grpo_lib.plan_calibrate import predict

    sd3 = cal["sd3"]
    if checkpointing:
        return token_scale * predict(_fit(sd3["sd3_dual"], "train_ckpt", rows), num_layers)
    d, p = _fit(sd3["sd3_dual"], "train", rows), _fit(sd3["sd3_plain"], "train", rows)
    return token_scale * (d["a"] + dual_layers * d["b"] + (num_layers - dual_layers) * p["b"])


def _showo2_head(cal: dict) -> dict:
    head = cal.get("showo2_head")
    if not head:
        raise ValueError("plan_calibration.json has no showo2_head measurements; regenerate it with "
                         "python -m grpo_lib.plan_calibrate --showo2-repo <show-o2 folder>")
    return head


def head_train_activations(cal: dict, rows: float, *, checkpointing: bool, num_layers: int = 10) -> float:
    """Show-o2's flow head (``num_layers`` ModulatedAttentionBlocks), the models of ``plan_calibrate.fit_blocks``."""
    from grpo_lib.plan_calibrate import predict

    return predict(_fit(_showo2_head(cal), "train_ckpt" if checkpointing else "train", rows), num_layers)


def infer_peak(cal_kind: dict, rows: float, num_layers: int) -> float:
    """No-grad forward through ``num_layers`` blocks: f(2) (measured, linear in rows) + (n - 2) cached casts."""
    f2 = _lin_rows(cal_kind["infer"]["1"], cal_kind["infer"]["2"], rows)
    return f2 + (num_layers - 2) * cal_kind["cast_bytes_per_block"]


@dataclass
class Plan:
    """One planned run: its arithmetic, memory rows (a DataFrame), passes and verdicts."""
    config: str
    world: str
    gpus: int
    gpu_mem_gib: float
    arith: Arithmetic | None
    memory: Any                       # pandas DataFrame: part, GiB, source
    peak_gib: dict                    # {"no checkpointing": x, "gradient checkpointing": y}
    fits: dict                        # same keys -> bool
    largest_batch: dict               # same keys -> (largest B that fits, largest that also keeps the epoch whole)
    passes: dict                      # per GPU per epoch
    seconds_per_epoch: float | None
    notes: list = field(default_factory=list)
    budget_gib: float = 0.0           # gpu_mem_gib x (1 - margin)
    peak_for_batch: Any = None        # (B, checkpointing: bool) -> peak GiB per GPU, the epoch's images per GPU kept
    batch_size: int = 0               # B, images (cold start: samples) per GPU per micro-batch

    def frame(self):
        """Everything as one DataFrame (quantity, value, unit, source) for notebooks."""
        import pandas as pd

        rows = []
        if self.arith is not None:
            a = self.arith
            rows += [("GPUs", a.gpus, "", "params"), ("images per GPU per batch (B)", a.batch_size, "", "params"),
                     ("group size (G)", a.group_size, "", "params"),
                     ("groups per epoch (M)", a.groups_per_epoch, "", "arithmetic"),
                     ("batches per epoch (N_b)", a.batches_per_epoch, "", "arithmetic"),
                     ("images per epoch", a.images_per_epoch, "", "arithmetic")]
        rows += [(r.part, round(r.GiB, 2), "GiB", r.source) for r in self.memory.itertuples()]
        for mode in self.peak_gib:
            rows += [(f"peak per GPU, {mode}", round(self.peak_gib[mode], 2), "GiB", "sum"),
                     (f"fits in {self.gpu_mem_gib:g} GiB, {mode}", self.fits[mode], "", "sum"),
                     (f"largest B that fits, {mode}", self.largest_batch[mode][0], "", "sum"),
                     (f"largest B that fits with a whole epoch, {mode}", self.largest_batch[mode][1], "", "sum")]
        rows += [(k, v, "per GPU per epoch", "arithmetic") for k, v in self.passes.items()]
        if self.seconds_per_epoch is not None:
            rows.append(("time per epoch", round(self.seconds_per_epoch, 1), "s", "--seconds-per-pass"))
        return pd.DataFrame(rows, columns=["quantity", "value", "unit", "source"])


def _load(params, overrides: dict | None):
    from grpo_lib.params import load_params

    if isinstance(params, (str, Path)):
        path = Path(params)
        return load_params(path, **(overrides or {})), path.name
    if overrides:
        params = dataclasses.replace(params, **overrides)
    return params, type(params).__name__


def _prompt_count(path: str) -> int:
    p = Path(path) if Path(path).is_absolute() else REPO / path
    return sum(1 for line in p.read_text().splitlines() if line.strip()) if p.is_file() else 0


def plan(params, *, gpus: int, gpu_mem_gib: float, groups_per_epoch: int | None = None,
         seconds_per_pass: float | None = None, text_encoders: str = "gpu", overhead_gib: float = 1.5,
         margin: float = 0.10, overrides: dict | None = None, calibration: dict | None = None) -> Plan:
    """Plan a GRPO (``02_counting_grpo``) or cold-start (``01_cold_start``) run of world ``sd3`` or ``showo2``.

    ``params``: a params YAML path or a params dataclass. Raises ``ValueError`` naming what to change when the
    arithmetic does not divide or the weights alone exceed ``gpu_mem_gib`` (less ``margin`` and overhead).
    ``text_encoders``: ``gpu`` (the trainer keeps CLIP-L, CLIP-G, T5 on every GPU) or ``precomputed`` (prompt
    embeddings of every train prompt instead).
    """
    import pandas as pd

    from grpo_lib.plan_models import SHOWO2_15B_CONFIG, count_parameters

    p, name = _load(params, overrides)
    if not (isinstance(gpus, int) and gpus >= 1):
        raise ValueError(f"gpus={gpus!r} must be a positive integer")
    if not gpu_mem_gib > 0:
        raise ValueError(f"gpu_mem_gib={gpu_mem_gib!r} must be positive")
    if text_encoders not in ("gpu", "precomputed"):
        raise ValueError(f"text_encoders={text_encoders!r} is not one of ('gpu', 'precomputed')")
    if p.world not in ("sd3", "showo2"):
        raise ValueError(f"{name}: world={p.world!r}; the planner is for the GPU world (sd3 or showo2)")
    cal = calibration or load_calibration()
    cold = not hasattr(p, "group_size")        # ColdStartParams: supervised LoRA steps, no rollouts
    if cold and p.world != "sd3":
        raise ValueError(f"{name}: the cold start exists for world 'sd3' only")
    counts = count_parameters(p.lora_rank)
    wbytes = DTYPE_BYTES[p.mixed_precision]
    res = p.resolution or 512
    lat_side = res // 8
    notes: list[str] = []

    arith = None
    if not cold:
        arith = arithmetic(gpus, p.batch_size, p.group_size, updates_per_epoch=p.updates_per_epoch,
                           batches_per_epoch=None if groups_per_epoch else p.batches_per_epoch,
                           groups_per_epoch=groups_per_epoch)

    parts: list[tuple[str, float, str]] = []      # (part, bytes, source)
    if p.world == "sd3":
        txt_tokens = 77 + 128                      # SD3Policy.max_sequence_length = 128 (upstream)
        img_tokens = (lat_side // 2) ** 2
        cal_tokens = cal["sd3_block"]["img_tokens"] + cal["sd3_block"]["txt_tokens"]
        token_scale = (img_tokens + txt_tokens) / cal_tokens
        if token_scale != 1.0:
            notes.append(f"resolution {res}: activations scaled from {cal_tokens} to {img_tokens + txt_tokens} "
                         "tokens (linear in tokens; extrapolated)")
        parts.append((f"SD3.5-M transformer, {counts['sd3_transformer'] / 1e9:.2f} B params ({p.mixed_precision})",
                      counts["sd3_transformer"] * wbytes, "config"))
        enc = counts["clip_l"] + counts["clip_g"] + counts["t5_xxl"]
        n_prompts = _prompt_count(getattr(p, "train_prompts", "")) if not cold else 0
        emb_bytes = n_prompts * (txt_tokens * 4096 + 2048) * wbytes
        if text_encoders == "gpu":
            parts.append((f"text encoders CLIP-L + CLIP-G + T5-XXL, {enc / 1e9:.2f} B params", enc * wbytes, "config"))
        else:
            parts.append((f"precomputed prompt embeddings ({n_prompts} train prompts)", emb_bytes, "shapes"))
        parts.append((f"VAE, {counts['sd3_vae'] / 1e6:.1f} M params (float32)", counts["sd3_vae"] * 4, "config"))
        trainable = counts["sd3_lora"]
        parts.append((f"LoRA r{p.lora_rank}, {trainable / 1e6:.1f} M params: weights + grads + AdamW (float32)",
                      trainable * 16, "config"))
        if getattr(p, "ema_decay", 0) > 0:
            parts.append(("EMA copy of the LoRA (float32)", trainable * 4, "config"))
        cfg_rows = 2 if (not cold and p.guidance_scale != 1.0) else 1
        emb_per_sample = (txt_tokens * 4096 + 2048) * wbytes * (2 if cfg_rows == 2 else 1)

        def vae_decode(images):
            return _lin_rows(cal["sd3_vae_decode"]["1"], cal["sd3_vae_decode"]["2"], images)

        def train_act(B, ckpt):
            return sd3_train_activations(cal, B * cfg_rows, checkpointing=ckpt, token_scale=token_scale)

        def rollout(B):
            if cold:   # the evaluation's sampling batch (CFG) and its decode
                eb = p.eval_batch_size
                return max(token_scale * infer_peak(cal["sd3"]["sd3_dual"], 2 * eb, 24),
                           (res / 512) ** 2 * vae_decode(eb))
            return max(token_scale * infer_peak(cal["sd3"]["sd3_dual"], B * cfg_rows, 24),
                       (res / 512) ** 2 * vae_decode(B))
        rollout_name = ("evaluation sampling batch (eval_batch_size, CFG): no-grad MMDiT / VAE decode (the larger)"
                        if cold else "rollout batch: no-grad MMDiT forward / VAE decode (the larger)")
    else:
        s = SHOWO2_15B_CONFIG
        frozen = counts["showo2_llm"] + counts["showo2_siglip"] + counts["showo2_glue"]
        parts.append((f"Show-o2 frozen LLM + SigLIP layers + projectors, {frozen / 1e9:.2f} B params "
                      f"({p.mixed_precision})", frozen * wbytes, "config"))
        parts.append((f"Wan2.1 VAE, {counts['showo2_vae'] / 1e6:.0f} M params ({p.mixed_precision}; published "
                      "count)", counts["showo2_vae"] * wbytes, "published"))
        trainable = counts["showo2_head"]
        parts.append((f"flow head, {trainable / 1e6:.0f} M params: weights + grads + AdamW (float32)",
                      trainable * 16, "config"))
        parts.append(("frozen copy of the initial head, KL reference (float32)", trainable * 4, "config"))
        if getattr(p, "ema_decay", 0) > 0:
            parts.append(("EMA copy of the head (float32)", trainable * 4, "config"))
        cfg_rows = 2 if p.guidance_scale != 1.0 else 1
        seq = p.showo2_max_seq_len
        emb_per_sample = seq * 8 * cfg_rows           # int64 token ids, both CFG branches
        # the LLM's forward returns logits over the whole sequence and every hidden state: alive while the head runs
        llm_out_per_row = seq * (151936 + 29 * s["hidden_size"]) * wbytes

        def train_act(B, ckpt):
            return (head_train_activations(cal, B * cfg_rows, checkpointing=ckpt, num_layers=s["num_diffusion_layers"])
                    + B * cfg_rows * llm_out_per_row)

        def rollout(B):
            return infer_peak(_showo2_head(cal), B * cfg_rows, s["num_diffusion_layers"]) + B * cfg_rows * llm_out_per_row
        rollout_name = "rollout batch: no-grad head forward + LLM logits and hidden states"
        notes.append("Show-o2: the LLM's logits and hidden states are computed from shapes; the Wan2.1 decode's "
                     "activations are not measured")
        lat_side = res // 8

    static = sum(b for _, b, _ in parts)
    if cold:
        stored = lambda B: 0.0      # noqa: E731  (latents are precomputed on the CPU side)
        cur_B = p.batch_size
    else:
        T = p.sde_window_size if p.sde_window_size > 0 else p.num_steps
        lat = 16 * lat_side * lat_side * 4
        per_sample = 2 * T * lat + 4 * T * 4 + 2 * lat + emb_per_sample
        images_per_gpu = arith.images_per_gpu
        stored = lambda B: images_per_gpu * per_sample   # noqa: E731  (B x N_b images per GPU, fixed)
        cur_B = p.batch_size
    overhead = overhead_gib * GIB
    if static + overhead > gpu_mem_gib * GIB * (1 - margin):
        need = (static + overhead) / GIB / (1 - margin)
        hint = ""
        if p.world == "sd3" and text_encoders == "gpu":
            enc_b = (counts["clip_l"] + counts["clip_g"] + counts["t5_xxl"]) * wbytes
            hint = (f", or precompute the prompt embeddings (--text-encoders precomputed frees "
                    f"{enc_b / GIB:.1f} GiB of text encoders)")
        raise ValueError(f"{name}: the weights and optimizer state alone need {static / GIB:.1f} GiB per GPU "
                         f"(+ {overhead_gib:g} GiB overhead, {100 * margin:g} % margin = {need:.1f} GiB) but "
                         f"--gpu-mem-gib is {gpu_mem_gib:g}; use GPUs with at least {math.ceil(need)} GiB{hint}")

    modes = {"no checkpointing": False, "gradient checkpointing": True}
    act_rows = [(f"training activations, B={cur_B} ({cur_B * cfg_rows} rows), {m}", train_act(cur_B, c), "measured")
                for m, c in modes.items()]
    rows = parts + ([("stored rollouts of one epoch", stored(cur_B), "shapes")] if not cold else []) + act_rows + [
        (rollout_name, rollout(cur_B), "measured"),
        ("CUDA context + allocator slack", overhead, "assumed")]
    memory = pd.DataFrame([(n, b / GIB, SOURCES[s]) for n, b, s in rows], columns=["part", "GiB", "source"])

    def peak(B, ckpt):
        return static + stored(B) + max(train_act(B, ckpt), rollout(B)) + overhead

    budget = gpu_mem_gib * GIB * (1 - margin)
    peak_gib, fits, largest = {}, {}, {}
    for m, c in modes.items():
        peak_gib[m] = peak(cur_B, c) / GIB
        fits[m] = peak(cur_B, c) <= budget
        ok = [B for B in range(1, 257) if peak(B, c) <= budget]
        best = max(ok) if ok else 0
        whole = [B for B in ok if cold or (arith.images_per_gpu % B == 0
                                           and (arith.images_per_gpu // B) % p.updates_per_epoch == 0)]
        largest[m] = (best, max(whole) if whole else 0)

    if cold:
        samples = p.steps * p.grad_accum * p.batch_size
        passes = {"optimizer steps (whole run)": p.steps,
                  "forward passes (rows, whole run)": samples,
                  "backward passes (rows, whole run)": samples}
        fwd, bwd = samples, samples
    else:
        from grpo_lib.grpo import select_timesteps

        T_stored = p.sde_window_size if p.sde_window_size > 0 else p.num_steps
        T_train = T_stored if p.sde_window_size > 0 else select_timesteps(p.timestep_strategy, T_stored, 1).shape[1]
        n = arith.images_per_gpu
        rollout_rows = n * p.num_steps * cfg_rows
        train_rows = n * T_train * cfg_rows
        ref_rows = train_rows if p.beta > 0 else 0
        passes = {"images per epoch, all GPUs": arith.images_per_epoch, "images on this GPU": n,
                  "rollout forward passes (rows)": rollout_rows,
                  "KL-reference forward passes (rows)": ref_rows, "training forward passes (rows)": train_rows,
                  "training backward passes (rows)": train_rows, "trained steps per image": T_train}
        fwd, bwd = rollout_rows + ref_rows + train_rows, train_rows
    secs = None if seconds_per_pass is None else seconds_per_pass * (fwd + 2 * bwd)
    return Plan(name, p.world, gpus, gpu_mem_gib, arith, memory, peak_gib, fits, largest, passes, secs, notes,
                budget / GIB, lambda B, ckpt: peak(B, ckpt) / GIB, cur_B)


def plan_frame(params, **kwargs):
    """:func:`plan`'s result as one pandas DataFrame (quantity, value, unit, source)."""
    return plan(params, **kwargs).frame()


# ------------------------------------------------------------------------------------------ printing
def format_plan(pl: Plan, *, seconds_per_pass: float | None = None) -> str:
    out = [f"# {pl.config} on {pl.gpus} GPU(s) of {pl.gpu_mem_gib:g} GiB (world {pl.world})", ""]
    if pl.arith is not None:
        a = pl.arith
        out += ["## Batch arithmetic",
                f"  {a.gpus} GPUs x B={a.batch_size} x N_b={a.batches_per_epoch} = {a.images_per_epoch} images = "
                f"M={a.groups_per_epoch} groups x G={a.group_size}: divides; "
                f"{a.batches_per_epoch // a.updates_per_epoch} batches per update, {a.updates_per_epoch} updates "
                "per epoch",
                f"  nearby settings keeping M={a.groups_per_epoch} groups per epoch:"]
        for knob, vals in a.nearby.items():
            out.append(f"    {knob:10s}: " + ", ".join(f"{d[knob]} (N_b {d['batches_per_epoch']})" for d in vals))
        out.append("")
    out.append("## Memory per GPU")
    width = max(len(r.part) for r in pl.memory.itertuples())
    for r in pl.memory.itertuples():
        out.append(f"  {r.part:<{width}}  {r.GiB:8.2f} GiB   [{r.source}]")
    for m in pl.peak_gib:
        verdict = "fits" if pl.fits[m] else "DOES NOT FIT"
        B, Bw = pl.largest_batch[m]
        out.append(f"  peak, {m}: {pl.peak_gib[m]:.1f} GiB -> {verdict}; largest micro-batch B that fits: {B} "
                   f"({Bw} keeping the epoch whole)")
    out += ["", "## Passes per GPU per epoch" if pl.arith is not None else "## Passes per GPU"]
    out += [f"  {k}: {v:,}" for k, v in pl.passes.items()]
    if pl.seconds_per_epoch is not None:
        out.append(f"  time: {pl.seconds_per_epoch:,.0f} s at {seconds_per_pass:g} s per pass "
                   "(backward = 2 passes; decode, reward and communication not included)")
    out += [f"  note: {n}" for n in pl.notes]
    out.append("  (nothing was run on a GPU: see grpo_lib/plan.py for what is measured, computed and assumed)")
    return "\n".join(out)


def calibration_table(cal: dict | None = None) -> str:
    """Markdown table of the measured constants (``plan_calibration.json``) and their checks."""
    cal = cal or load_calibration()
    mib = 2 ** 20
    lines = ["| measured on this CPU (bf16 blocks, CPU autocast, peak RSS) | rows | per block, no ckpt | "
             "2-block peak, ckpt | 4 blocks predicted / measured, no ckpt | same, ckpt |", "|---|---|---|---|---|---|"]
    names = {"sd3_dual": "SD3.5-M block with dual attention (blocks 0-12), LoRA r32",
             "sd3_plain": "SD3.5-M block (blocks 13-23), LoRA r32", "showo2_head": "Show-o2 head block, float32, trained"}
    kinds = [(k, cal["sd3"][k]) for k in ("sd3_dual", "sd3_plain")] + \
        ([("showo2_head", cal["showo2_head"])] if cal.get("showo2_head") else [])
    for kind, d in kinds:
        for r in (1, 2):
            chk = {c["mode"]: c for c in d["checks"] if c["rows"] == r and c["n_blocks"] == 4}
            cells = [f"{chk[m]['predicted_bytes'] / mib:.0f} / {chk[m]['measured_bytes'] / mib:.0f} MiB "
                     f"({100 * chk[m]['relative_error']:+.1f} %)" if m in chk else "-" for m in ("train", "train_ckpt")]
            lines.append(f"| {names[kind]} | {r} | {d['fits'][f'train/{r}']['b'] / mib:.0f} MiB | "
                         f"{d['fits'][f'train_ckpt/{r}']['p2'] / mib:.0f} MiB | " + " | ".join(cells) + " |")
    six = [c for c in (cal.get("showo2_head") or {}).get("checks", []) if c["n_blocks"] == 6]
    if six:
        lines += ["", "Show-o2 head, 6 blocks (a check the checkpointing model was not shaped on): " + "; ".join(
            f"{c['mode']} rows {c['rows']}: predicted {c['predicted_bytes'] / mib:.0f} / measured "
            f"{c['measured_bytes'] / mib:.0f} MiB ({100 * c['relative_error']:+.1f} %)" for c in six) + "."]
    rc = cal["sd3"]["rows_check"]
    vae = cal["sd3_vae_decode"]
    lines += ["", f"Rows check (2 dual blocks, no ckpt): 4 rows predicted from 1-2 rows {rc['predicted_bytes'] / mib:.0f} "
              f"MiB, measured {rc['measured_bytes'] / mib:.0f} MiB ({100 * rc['relative_error']:+.1f} %). "
              f"VAE decode of 512 px images (float32, no grad): {vae['1'] / mib:.0f} MiB for 1, {vae['2'] / mib:.0f} "
              f"MiB for 2. Tokens: {cal['sd3_block']['img_tokens']} image + {cal['sd3_block']['txt_tokens']} text "
              f"(SD3); {cal['showo2_head_block']['seq_len']} (Show-o2). Measured {cal['measured_on']['date']}, "
              f"torch {cal['measured_on']['torch']}, `{cal['command']}`."]
    return "\n".join(lines)


# Show-o2 has no GPU params file; the README plans the embedded Show-o2 recipe's settings on the real model
SHOWO2_EXAMPLE = ("02_counting_grpo__showo2_convention.yaml",
                  {"world": "showo2", "resolution": 432, "mixed_precision": "bf16", "trainable": "pattern:diffusion"})


def readme_table(configs=None, gpus=(1, 4, 8), mems=(24, 40, 80), groups_per_epoch: int = 48) -> str:
    """The README's generated block: the calibration table, then every shipped SD3.5-M config (and the Show-o2
    head-only example) on 1, 4, 8 GPUs of 24, 40, 80 GiB. GRPO configs keep ``groups_per_epoch`` = 48 (the
    fork's epoch) for SD3.5-M, the params' own epoch for Show-o2."""
    entries = [(c.name, c, {}, groups_per_epoch) for c in
               (configs or sorted((REPO / "params").glob("*sd35m*.yaml")))]
    if configs is None:
        name, over = SHOWO2_EXAMPLE
        label = f"{name} + " + " ".join(f"{k}={v}" for k, v in over.items())
        entries.append((label, REPO / "params" / name, over, None))
    head = ("| config | GPUs | epoch (M groups x G, N_b batches, B per GPU) | peak GiB per GPU, no ckpt / ckpt | "
            + " | ".join(f"{m} GiB: fits? largest B, no ckpt / ckpt" for m in mems) + " |")
    lines = [head, "|" + "---|" * (4 + len(mems))]
    for label, cfg, over, m_epoch in entries:
        for g in gpus:
            cells, peak_txt, epoch = [], "-", "-"
            for m in mems:
                try:
                    pl = plan(cfg, gpus=g, gpu_mem_gib=m, overrides=over,
                              groups_per_epoch=None if "01_cold" in cfg.name else m_epoch)
                except ValueError as e:
                    cells.append("no: the weights alone exceed it" if "alone need" in str(e) else f"no: {e}")
                    continue
                nc, ck = pl.peak_gib["no checkpointing"], pl.peak_gib["gradient checkpointing"]
                peak_txt = f"{nc:.1f} / {ck:.1f}"
                if pl.arith is not None:
                    a = pl.arith
                    epoch = f"{a.groups_per_epoch} x {a.group_size}, N_b {a.batches_per_epoch}, B {a.batch_size}"
                else:
                    epoch = f"cold start, B {pl.batch_size}"
                f1 = "yes" if pl.fits["no checkpointing"] else ("ckpt only" if pl.fits["gradient checkpointing"]
                                                                else "no")
                cells.append(f"{f1}; {pl.largest_batch['no checkpointing'][1]} / "
                             f"{pl.largest_batch['gradient checkpointing'][1]}")
            lines.append(f"| `{label}` | {g} | {epoch} | {peak_txt} | " + " | ".join(cells) + " |")
    legend = ("Peak = weights and optimizer state (counted from configs) + stored rollouts (shapes) + the larger of "
              "training activations and the rollout batch (measured on CPU per block, extrapolated to the whole "
              "model and the micro-batch's rows) + 1.5 GiB assumed CUDA overhead; \"fits\" leaves a 10 % margin. "
              "\"largest B\" is the largest images-per-GPU batch that fits and keeps the epoch whole (GRPO trains on "
              "the sampling batch, so B is also the training micro-batch; CFG makes it 2B transformer rows). "
              "Measured: activations, rollout batch. Extrapolated: everything beyond 2 blocks and 2 rows. "
              "Nothing was run on a GPU.")
    return calibration_table() + "\n\n" + "\n".join(lines) + "\n\n" + legend


def readme_section_current(readme: str | Path = REPO / "README.md") -> tuple[str, str]:
    """(table in the README between the markers, table generated now)."""
    text = Path(readme).read_text()
    if README_BEGIN not in text or README_END not in text:
        raise ValueError(f"{readme} has no plan-table markers ({README_BEGIN!r} ... {README_END!r})")
    inside = text.split(README_BEGIN, 1)[1].split(README_END, 1)[0].strip()
    return inside, readme_table().strip()


def write_readme_table(readme: str | Path = REPO / "README.md") -> None:
    import os

    readme = Path(readme)
    text = readme.read_text()
    before, rest = text.split(README_BEGIN, 1)
    _, after = rest.split(README_END, 1)
    new = before + README_BEGIN + "\n" + readme_table() + "\n" + README_END + after
    tmp = readme.with_name(readme.name + f".tmp{os.getpid()}")
    tmp.write_text(new)
    os.replace(tmp, readme)


def main(argv=None) -> int:
    from grpo_lib.params import parse_overrides

    ap = argparse.ArgumentParser(prog="python -m grpo_lib.plan", description=__doc__.split("\n")[0])
    ap.add_argument("params", nargs="?", help="params/<notebook>__<experiment>.yaml (world sd3 or showo2)")
    ap.add_argument("--gpus", type=int, help="number of GPUs (processes)")
    ap.add_argument("--gpu-mem-gib", type=float, help="memory of one GPU, GiB")
    ap.add_argument("--groups-per-epoch", type=int, default=None,
                    help="keep M groups per epoch (N_b follows); default: keep the params' batches_per_epoch")
    ap.add_argument("--seconds-per-pass", type=float, default=None, help="seconds of one transformer forward row")
    ap.add_argument("--text-encoders", choices=("gpu", "precomputed"), default="gpu")
    ap.add_argument("--overhead-gib", type=float, default=1.5, help="assumed CUDA context + allocator slack")
    ap.add_argument("--margin", type=float, default=0.10, help="share of GPU memory kept free")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override params fields")
    ap.add_argument("--readme-table", action="store_true", help="print the README table")
    ap.add_argument("--write-readme", action="store_true", help="write the table between README.md's markers")
    args = ap.parse_args(argv)
    if args.readme_table or args.write_readme:
        if args.write_readme:
            write_readme_table()
            print("README.md: plan table written")
        else:
            print(readme_table())
        return 0
    if not args.params or args.gpus is None or args.gpu_mem_gib is None:
        ap.error("give a params file, --gpus and --gpu-mem-gib (or --readme-table)")
    try:
        pl = plan(args.params, gpus=args.gpus, gpu_mem_gib=args.gpu_mem_gib, groups_per_epoch=args.groups_per_epoch,
                  seconds_per_pass=args.seconds_per_pass, text_encoders=args.text_encoders,
                  overhead_gib=args.overhead_gib, margin=args.margin, overrides=parse_overrides(args.set))
    except ValueError as e:
        print(f"refused: {e}", file=sys.stderr)
        return 2
    print(format_plan(pl, seconds_per_pass=args.seconds_per_pass))
    return 0 if any(pl.fits.values()) else 1   # 1: fits in neither mode at this batch size


if __name__ == "__main__":
    sys.exit(main())
