r"""Activation memory of transformer blocks, measured on this CPU, for the run planner (``grpo_lib.plan``).

    python -m grpo_lib.plan_calibrate --showo2-repo ../shared/vendor/show-o2     # writes grpo_lib/plan_calibration.json

Method (one fresh subprocess per measurement, so nothing earlier in the process sets the high-water mark):

    build n blocks in bf16 (frozen) + trainable parts in float32, inputs, gradients pre-allocated
    reset the high-water mark (/proc/self/clear_refs "5"), rss_0 = resident set size now  (psutil)
    run forward + backward under CPU autocast(bf16)                  (or forward only under no_grad)
    peak   = VmHWM after  - rss_0                                     (kernel high-water mark, exact)

    peak(n blocks) = a + b n         fitted on n = 1, 2;  checked by predicting n = 4 and measuring it

``MALLOC_MMAP_THRESHOLD_=65536`` is set in the child, so every buffer of 64 KiB or more is its own mmap and
goes back to the kernel when freed: RSS then follows the live tensors instead of glibc's heap high-water
mark. Gradients of the trainable parameters are allocated (zeros) before ``rss_0``, as in gradient
accumulation, where they live across micro-batches; so ``peak`` holds the activations saved for backward, the
autocast weight-cast cache, backward's transient buffers and the gradient accumulation temporaries.

| measured piece                 | blocks                                                   | trainable             |
|--------------------------------|----------------------------------------------------------|-----------------------|
| ``sd3_dual`` / ``sd3_plain``   | diffusers ``JointTransformerBlock`` (SD3.5-M: blocks 0-12 use dual attention, 13-23 not), qk rms_norm | peft LoRA r32 on the 8 attention projections (``policies/sd3.py``) |
| ``showo2_head``                | Show-o2's ``ModulatedAttentionBlock`` (``diffusion_head_a``), from a Show-o checkout | the whole block, float32 |
| ``sd3_vae_decode``             | SD3's 16-channel ``AutoencoderKL`` decoder, float32, no_grad (the rollout's decode) | none |

Modes: ``train`` (autograd through every block), ``train_ckpt`` (each block under
``torch.utils.checkpoint``, non-reentrant, as diffusers' ``enable_gradient_checkpointing`` does), ``infer``
(no_grad forward, the rollout). Rows are transformer batch rows: a CFG forward has 2 rows per image.

What this does not measure: CUDA kernels' workspaces, the CUDA context and the caching allocator's
fragmentation; CPU flash attention stands in for the GPU's flash / memory-efficient attention (both keep
O(L) per head, not the L x L matrix).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

DEFAULT_OUT = Path(__file__).with_name("plan_calibration.json")
REGENERATE = "nice -n 10 .venv/bin/python -m grpo_lib.plan_calibrate --showo2-repo ../shared/vendor/show-o2"

# SD3.5-Medium's MMDiT width and the token count of a 512 px image (64x64 latent, patch 2 -> 32x32 = 1024)
# with the project's prompt length: 77 CLIP + 128 T5 tokens (SD3Policy.max_sequence_length, as upstream).
SD3_BLOCK = {"dim": 1536, "heads": 24, "head_dim": 64, "img_tokens": 1024, "txt_tokens": 77 + 128}
# Show-o2's flow head (models/modules.py DiffusionHeadConfig: hidden 2048, 32 heads x 64, 8 kv heads, MLP 8192)
# over the full sequence (max_seq_len 1024: text, time token and 27x27 image tokens of a 432 px image).
SHOWO2_HEAD = {"dim": 2048, "head_dim": 64, "intermediate": 8192, "seq_len": 1024, "image_tokens": 27 * 27 + 1}
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]


# --------------------------------------------------------------------------------------------- the child
def _stub_timm() -> dict:
    """Show-o2's models/modules.py imports timm for ``to_2tuple`` alone; stand in for it if timm is absent.
    Returns the stub modules it put in ``sys.modules`` (the caller removes them after the import, so no
    spec-less 'timm' is left behind for later ``find_spec`` calls)."""
    import collections.abc
    import importlib.util
    import types

    if importlib.util.find_spec("timm") is not None:
        return {}
    helpers = types.ModuleType("timm.layers.helpers")
    helpers.to_2tuple = lambda x: tuple(x) if isinstance(x, collections.abc.Iterable) else (x, x)
    stubs = {"timm": types.ModuleType("timm"), "timm.layers": types.ModuleType("timm.layers"),
             "timm.layers.helpers": helpers}
    sys.modules.update(stubs)
    return stubs


def showo2_modules(repo: str | Path):
    """Show-o2's ``models/modules.py`` loaded from a Show-o checkout's ``show-o2`` folder (no package import)."""
    import importlib.util

    path = Path(repo) / "models" / "modules.py"
    if not path.is_file():
        raise ValueError(f"showo2 repo {str(repo)!r} has no models/modules.py (give the show-o2 folder of a "
                         "github.com/showlab/Show-o checkout)")
    stubs = _stub_timm()
    try:
        spec = importlib.util.spec_from_file_location("_showo2_modules", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        for name in stubs:
            sys.modules.pop(name, None)
    return module


def _build(spec: dict):
    """(run(rows) -> loss or None, trainable params) for one measurement spec, weights in place."""
    import torch

    kind, n = spec["kind"], spec["n_blocks"]
    torch.manual_seed(0)
    if kind in ("sd3_dual", "sd3_plain"):
        from diffusers.models.attention import JointTransformerBlock
        from peft import LoraConfig, inject_adapter_in_model

        torch.set_default_dtype(torch.bfloat16)     # build straight in bf16: no float32 copy sets the peak
        blocks = torch.nn.ModuleList(
            JointTransformerBlock(spec["dim"], spec["heads"], spec["head_dim"], qk_norm="rms_norm",
                                  use_dual_attention=kind == "sd3_dual") for _ in range(n))
        torch.set_default_dtype(torch.float32)
        blocks.requires_grad_(False)
        if spec.get("lora_rank", 0):
            inject_adapter_in_model(LoraConfig(r=spec["lora_rank"], lora_alpha=2 * spec["lora_rank"],
                                               init_lora_weights="gaussian", target_modules=LORA_TARGETS), blocks)
        trainable = [p for name, p in blocks.named_parameters() if "lora_" in name]
        for p in trainable:      # LoRA in float32 (SD3Policy._make_lora_trainable)
            p.data = p.data.float()
            p.requires_grad_(True)
        rows, dim = spec["rows"], spec["dim"]
        hidden = torch.randn(rows, spec["img_tokens"], dim, dtype=torch.bfloat16)
        context = torch.randn(rows, spec["txt_tokens"], dim, dtype=torch.bfloat16)
        temb = torch.randn(rows, dim, dtype=torch.bfloat16)

        def forward(block, h, c):
            return block(h, c, temb)

        def run(checkpoint: bool):
            h, c = hidden, context
            for block in blocks:
                if checkpoint:
                    c, h = torch.utils.checkpoint.checkpoint(forward, block, h, c, use_reentrant=False)
                else:
                    c, h = forward(block, h, c)
            return h.float().square().mean() + c.float().square().mean()
        return run, trainable, blocks
    if kind == "showo2_head":
        mods = showo2_modules(spec["showo2_repo"])
        cfg = mods.DiffusionHeadConfig(hidden_size=spec["dim"], head_dim=spec["head_dim"],
                                       intermediate_size=spec["intermediate"])
        blocks = torch.nn.ModuleList(mods.ModulatedAttentionBlock(cfg, i) for i in range(n))
        for p in blocks.parameters():           # adaLN starts at zero in Show-o2; any values do for memory
            torch.nn.init.normal_(p, std=0.02)
        trainable = list(blocks.parameters())   # the head trains in float32 (ShowO2Policy)
        rows, dim, seq = spec["rows"], spec["dim"], spec["seq_len"]
        hidden = torch.randn(rows, seq, dim, dtype=torch.bfloat16)       # diff_proj's output under autocast
        adaln = torch.randn(rows, dim, dtype=torch.bfloat16)             # time embedding
        positions = torch.tensor([[[seq - spec["image_tokens"], spec["image_tokens"]]]] * rows)
        position_ids = torch.arange(seq).unsqueeze(0)

        def forward(block, h):
            return block(hidden_states=h, adaln_input=adaln, attention_mask=None, position_ids=position_ids,
                         modality_positions=positions)[0]

        def run(checkpoint: bool):
            h = hidden
            for block in blocks:
                h = torch.utils.checkpoint.checkpoint(forward, block, h, use_reentrant=False) if checkpoint \
                    else forward(block, h)
            return h.float().square().mean()
        return run, trainable, blocks
    if kind == "sd3_vae_decode":
        from diffusers import AutoencoderKL

        from grpo_lib.plan_models import SD3_VAE_CONFIG

        vae = AutoencoderKL(**SD3_VAE_CONFIG).eval().requires_grad_(False)   # float32, as SD3Policy keeps it
        latents = torch.randn(spec["rows"], SD3_VAE_CONFIG["latent_channels"], spec["latent_side"],
                              spec["latent_side"])

        def run(checkpoint: bool):
            return vae.decode(latents, return_dict=False)[0]
        return run, [], vae
    raise ValueError(f"kind={kind!r} is not one of sd3_dual, sd3_plain, showo2_head, sd3_vae_decode")


def _high_water(reset: bool) -> int:
    """This process's peak RSS in bytes: VmHWM after a reset, else ru_maxrss. (ru_maxrss alone is floored by the
    parent's peak: a vfork + exec child inherits it in signal->maxrss, so it can hide a small pass.)"""
    import resource

    if reset:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024      # Linux: KiB


def _worker(spec: dict) -> dict:
    import gc
    import time

    import psutil
    import torch

    torch.set_num_threads(int(spec.get("threads", 2)))
    run, trainable, module = _build(spec)
    for p in trainable:     # as in gradient accumulation: the gradients exist before the micro-batch
        p.grad = torch.zeros_like(p)
    weight_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
    grad_bytes = sum(p.numel() * p.element_size() for p in trainable)
    gc.collect()
    # reset the kernel's high-water mark to the current RSS (Linux >= 4.0), so that a transient of the build
    # cannot hide a smaller pass; where that is not allowed, the check below catches a masked pass
    try:
        Path("/proc/self/clear_refs").write_text("5")
        reset = True
    except OSError:
        reset = False
    rss_0 = psutil.Process().memory_info().rss
    maxrss_0 = _high_water(reset)
    t0 = time.perf_counter()
    mode = spec["mode"]
    if mode == "infer":
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=spec["kind"] != "sd3_vae_decode"):
            out = run(False)
        del out
    elif mode in ("train", "train_ckpt"):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = run(mode == "train_ckpt")
        loss.backward()
        del loss
    else:
        raise ValueError(f"mode={mode!r} is not one of train, train_ckpt, infer")
    seconds = time.perf_counter() - t0
    maxrss_1 = _high_water(reset)
    if maxrss_1 <= maxrss_0 and maxrss_0 > rss_0 + (1 << 20):
        # the high-water mark was set while building, so it says nothing about the pass itself
        raise RuntimeError(f"peak RSS {maxrss_1} B did not rise above the build's {max(maxrss_0, rss_0)} B; "
                           "the measurement is invalid (build uses more memory than the pass)")
    return {"peak_bytes": maxrss_1 - rss_0, "rss_before": rss_0, "maxrss_before": maxrss_0,
            "weight_bytes": weight_bytes, "grad_bytes": grad_bytes, "seconds": round(seconds, 2)}


# -------------------------------------------------------------------------------------------- the parent
def measure(spec: dict, *, timeout: float = 1800) -> dict:
    """Run one measurement in a fresh ``python -m grpo_lib.plan_calibrate --worker`` subprocess; the spec
    plus ``peak_bytes`` (the pass's peak above the RSS before it) and the child's bookkeeping."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS=str(spec.get("threads", 2)))
    proc = subprocess.run([sys.executable, "-m", "grpo_lib.plan_calibrate", "--worker", json.dumps(spec)],
                          capture_output=True, text=True, env=env, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"measurement {spec} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return {**spec, **json.loads(proc.stdout.strip().splitlines()[-1])}


def boundary_bytes(spec: dict) -> int:
    """Bytes a checkpointed block keeps for backward: its inputs (bf16), i.e. the stream(s) of hidden states
    it was called with (SD3: image + text tokens; Show-o2's head: the sequence), exact from the shapes."""
    tokens = spec["img_tokens"] + spec["txt_tokens"] if spec["kind"].startswith("sd3") else spec["seq_len"]
    return spec["rows"] * tokens * spec["dim"] * 2


def fit_blocks(one: dict, two: dict, infer_two: dict | None = None) -> dict:
    """The block-count model from the 1- and 2-block measurements (same kind, rows, mode):

        train:       peak(n) = a + b n,  b = peak(2) - peak(1), a = peak(1) - b
        train_ckpt:  peak(n) = max(peak(2) + (n - 2) s,  f(2) + (n - 2)(c + s))      (n >= 2)
        infer:       f(n)    = f(2) + (n - 2) c

    s = boundary_bytes (a checkpointed block's saved inputs), c = the bf16 copy of a block's float32 trainable
    weights that autocast caches (leaf tensors that require grad) until the autocast region ends; f(2) = the
    2-block no-grad forward (``infer_two``). Both s and c are exact from shapes.

    Without checkpointing every block adds its saved activations (and its cast weights), so the peak is
    linear in n. With it there are two candidate peaks: backward, one block's recomputed forward + backward
    plus every block's saved inputs; and the end of the forward, where every block's cached cast weights are
    still held (Show-o2's float32 head: 164 MiB a block; SD3's LoRA: < 1 MiB). The 1-block ckpt figure is lower
    than the line because the first block needs no gradient for its inputs.
    """
    if one["mode"] == "train_ckpt":
        if infer_two is None:
            raise ValueError("fit_blocks: the train_ckpt model needs the 2-block infer measurement (infer_two)")
        return {"mode": "train_ckpt", "p1": one["peak_bytes"], "p2": two["peak_bytes"], "s": boundary_bytes(two),
                "c": cast_bytes_per_block(two), "f2": infer_two["peak_bytes"]}
    b = two["peak_bytes"] - one["peak_bytes"]
    return {"mode": one["mode"], "a": one["peak_bytes"] - b, "b": b}


def cast_bytes_per_block(m: dict) -> float:
    """bf16 copy of one block's float32 trainable weights (the worker reports their float32 grads' bytes)."""
    return m["grad_bytes"] / m["n_blocks"] / 2


def predict(fit: dict, n_blocks: int) -> float:
    """Peak bytes of ``n_blocks`` blocks from :func:`fit_blocks`'s model."""
    if fit["mode"] == "train_ckpt":
        if n_blocks == 1:
            return fit["p1"]
        return max(fit["p2"] + (n_blocks - 2) * fit["s"], fit["f2"] + (n_blocks - 2) * (fit["c"] + fit["s"]))
    return fit["a"] + fit["b"] * n_blocks


def block_check(base: dict, *, modes=("train", "train_ckpt"), rows=(1, 2), check_blocks=(4,), log=print) -> dict:
    """Measure 1 and 2 blocks for each (mode, rows) (and the 2-block no-grad forward), fit :func:`fit_blocks`, and
    measure each of ``check_blocks`` to check the prediction.
    Returns {"measurements": [...], "fits": {"mode/rows": fit}, "infer": {rows: bytes}, "checks": [...]}."""
    out = {"measurements": [], "fits": {}, "infer": {}, "checks": []}
    for r in rows:
        inf = measure({**base, "mode": "infer", "rows": r, "n_blocks": 2})
        out["infer"][r] = inf["peak_bytes"]
        out["cast_bytes_per_block"] = cast_bytes_per_block(inf)
        log(f"  {base['kind']} infer rows={r} blocks=2: {inf['peak_bytes'] / 2**20:.1f} MiB ({inf['seconds']} s)")
        for mode in modes:
            m = {n: measure({**base, "mode": mode, "rows": r, "n_blocks": n}) for n in (1, 2)}
            for n in (1, 2):
                log(f"  {base['kind']} {mode} rows={r} blocks={n}: {m[n]['peak_bytes'] / 2**20:.1f} MiB "
                    f"({m[n]['seconds']} s)")
            out["measurements"] += [m[1], m[2]]
            fit = fit_blocks(m[1], m[2], inf)
            out["fits"][f"{mode}/{r}"] = fit
            for nb in check_blocks:
                c = measure({**base, "mode": mode, "rows": r, "n_blocks": nb})
                pred = predict(fit, nb)
                err = pred / c["peak_bytes"] - 1
                log(f"  {base['kind']} {mode} rows={r} blocks={nb}: measured "
                    f"{c['peak_bytes'] / 2**20:.1f} MiB, predicted {pred / 2**20:.1f} MiB ({100 * err:+.1f} %)")
                out["checks"].append({"mode": mode, "rows": r, "n_blocks": nb,
                                      "measured_bytes": c["peak_bytes"], "predicted_bytes": pred,
                                      "relative_error": err, "seconds": c["seconds"]})
    return out


def calibrate(showo2_repo: str | None, *, threads: int = 2, log=print) -> dict:
    """All measurements of ``plan_calibration.json`` (SD3.5-M width; Show-o2's head if a repo is given)."""
    sd3 = {**SD3_BLOCK, "lora_rank": 32, "threads": threads}
    result = {"sd3": {}, "showo2_head": None}
    for kind in ("sd3_dual", "sd3_plain"):
        log(f"{kind} at width {SD3_BLOCK['dim']}, {SD3_BLOCK['img_tokens']} + {SD3_BLOCK['txt_tokens']} tokens")
        result["sd3"][kind] = block_check({**sd3, "kind": kind},
                                          check_blocks=(4,) if kind == "sd3_dual" else (), log=log)
    # micro-batch extrapolation check: rows 4 predicted from rows 1, 2 (linear in rows)
    m4 = measure({**sd3, "kind": "sd3_dual", "mode": "train", "rows": 4, "n_blocks": 2})
    f = result["sd3"]["sd3_dual"]["fits"]
    p1, p2 = predict(f["train/1"], 2), predict(f["train/2"], 2)
    result["sd3"]["rows_check"] = {"kind": "sd3_dual", "mode": "train", "n_blocks": 2, "rows": 4,
                                   "measured_bytes": m4["peak_bytes"], "predicted_bytes": p2 + 2 * (p2 - p1),
                                   "relative_error": (p2 + 2 * (p2 - p1)) / m4["peak_bytes"] - 1}
    log(f"  rows check: {result['sd3']['rows_check']}")
    result["sd3_vae_decode"] = {r: measure({"kind": "sd3_vae_decode", "mode": "infer", "rows": r, "n_blocks": 0,
                                            "latent_side": 64, "threads": threads})["peak_bytes"]
                                for r in (1, 2)}
    log(f"  VAE decode 512 px: {result['sd3_vae_decode']}")
    if showo2_repo:
        head = {**SHOWO2_HEAD, "kind": "showo2_head", "showo2_repo": str(Path(showo2_repo).resolve()),
                "threads": threads}
        log(f"showo2_head at width {SHOWO2_HEAD['dim']}, {SHOWO2_HEAD['seq_len']} tokens")
        # 6 blocks too: the ckpt model's forward-end term (cached casts) was added after a first run of this
        # calibration missed the 4-block ckpt peak by -41 %; 6 blocks is a check it was not shaped on
        result["showo2_head"] = block_check(head, check_blocks=(4, 6), log=log)
    return result


def write_json(data: dict, path: Path) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=False) + "\n")
    os.replace(tmp, path)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    ap.add_argument("--showo2-repo", default="", help="show-o2 folder of a Show-o checkout (for the head)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(_worker(json.loads(args.worker))))
        return
    import torch

    data = {"command": REGENERATE,
            "measured_on": {"date": datetime.date.today().isoformat(), "machine": platform.processor() or
                            platform.machine(), "torch": torch.__version__, "threads": args.threads,
                            "note": "CPU only; peak RSS deltas in fresh subprocesses (see grpo_lib/plan_calibrate.py)"},
            "sd3_block": SD3_BLOCK, "showo2_head_block": SHOWO2_HEAD}
    data.update(calibrate(args.showo2_repo or None, threads=args.threads))
    write_json(data, Path(args.out))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
