"""Inference demo (seed 000's ``inference_demo.py``): draw a counting prompt with a trained LoRA and count.

    python -m grpo_lib.infer --lora_path runs/embedded-default/checkpoints/epoch_0010
    python -m grpo_lib.infer --lora_path runs/x/cold_start/lora --custom_prompt "a photo of five red circles"
    python -m grpo_lib.infer --lora_path /ckpt/lora --model_name stabilityai/stable-diffusion-3.5-medium \\
        --height 512 --width 512 --device cuda:0                       # GPU node

Weights (tiny world) come from :func:`grpo_lib.checkpoints.load_policy`, as in the widget and the experiment's
``grpo`` stage: a GRPO checkpoint's LoRA sits on the run's cold start (merged first) and carries the EMA weights
when training kept an EMA, so the demo draws the model that was evaluated.

Sampling is the deterministic ODE (``grpo_lib.rollout.sample_images``) on the SD3 schedule with
classifier-free guidance v = v_u + g (v_c - v_u); image k starts from the noise of
``torch.Generator().manual_seed(seed + k)``.

| option              | meaning                                                                    |
|---------------------|----------------------------------------------------------------------------|
| ``--lora_path``     | a GRPO / cold-start checkpoint dir holding ``lora/``, a run's ``checkpoints/`` dir (its ``latest``), a LoRA dir (``lora.safetensors`` + ``lora_config.json`` from ``TinyPolicy.save_lora``, or ``pytorch_lora_weights.safetensors`` from ``SD3Policy.save_lora``), or ``none`` for the base alone |
| ``--model_name``    | the base: a tiny base dir, an SD3 pipeline dir or hub id (``model_index.json``); default: the base a GRPO checkpoint records (``params.json``), else the shipped tiny base |
| ``--custom_prompt`` | the prompt; default: a random row of ``data/counting/test.jsonl`` (SD3: ``data/counting_coco/test.jsonl``) |
| ``--reward_server_url`` | SD3: a counting server (``python -m grpo_lib.server``) for the found counts |

Writes ``image_XX.png`` (native size), ``grid.png`` (all images side by side, enlarged for the tiny
world) and ``results.json``: prompt, target {class, count} (null when the prompt names none), found
counts per image (ShapeCounter in the embedded world; SD3: null unless a server is given), paths and
settings. A missing or malformed LoRA path is a one-line error with exit code 2.
"""
from __future__ import annotations

import argparse
import json
import re
import struct
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = REPO / "data" / "checkpoints" / "tiny-base"
TEST_PROMPTS = {"embedded": REPO / "data" / "counting" / "test.jsonl",
                "sd3": REPO / "data" / "counting_coco" / "test.jsonl"}

TINY_LORA_FILES = ("lora.safetensors", "lora_config.json")       # TinyPolicy.save_lora
SD3_LORA_FILE = "pytorch_lora_weights.safetensors"               # SD3Policy.save_lora / diffusers


class InferError(ValueError):
    """A user-facing problem with the arguments: reported as one line, exit code 2."""


# ---------------------------------------------------------------------------------------------
# Paths (checked before torch / diffusers are imported, so a bad path fails in a fraction of a second)
# ---------------------------------------------------------------------------------------------
def _check_safetensors(path: Path) -> None:
    """Structural check of a .safetensors file: u64 header length, a JSON header of tensor entries, and
    a file long enough for every tensor's data offsets (the format's documented layout)."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise InferError(f"{path} is not a safetensors file (shorter than its 8-byte header length)")
            (n,) = struct.unpack("<Q", raw)
            if n > min(size - 8, 100_000_000):
                raise InferError(f"{path} is not a safetensors file (header length {n} exceeds the file)")
            header = json.loads(f.read(n))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise InferError(f"{path} is not a safetensors file (its header is not JSON)") from None
    tensors = {k: v for k, v in header.items() if k != "__metadata__"} if isinstance(header, dict) else None
    if not tensors:
        raise InferError(f"{path} holds no tensors")
    end = max(int(v["data_offsets"][1]) for v in tensors.values() if isinstance(v, dict) and "data_offsets" in v)
    if 8 + n + end > size:
        raise InferError(f"{path} is truncated ({size} bytes, its header needs {8 + n + end})")


def resolve_lora(path: str | None) -> tuple[Path | None, str | None]:
    """``(lora_dir, kind)`` with kind ``"tiny"`` or ``"sd3"``; ``(None, None)`` for ``none``.

    Accepts a LoRA dir, a checkpoint dir holding ``lora/`` (GRPO ``checkpoints/epoch_XXXX``, cold start
    ``cold_start/checkpoints/step_XXXXXX``), or a ``checkpoints/`` dir whose ``latest`` names one.
    """
    if path is None or str(path).lower() == "none":
        return None, None
    p = Path(path)
    if not p.exists():
        raise InferError(f"--lora_path {path!r} does not exist")
    if not p.is_dir():
        raise InferError(f"--lora_path {path!r} is a file; expected a LoRA or checkpoint directory")
    if (p / "latest").is_file() and not (p / "lora").exists():
        name = (p / "latest").read_text().strip()
        if not (p / name).is_dir():
            raise InferError(f"--lora_path {path!r}: its 'latest' names {name!r}, which is not a directory there")
        p = p / name
    if (p / "lora").is_dir():
        p = p / "lora"
    if all((p / f).is_file() for f in TINY_LORA_FILES):
        _check_safetensors(p / TINY_LORA_FILES[0])
        try:
            cfg = json.loads((p / TINY_LORA_FILES[1]).read_text())
        except json.JSONDecodeError as e:
            raise InferError(f"{p / TINY_LORA_FILES[1]} is not valid JSON ({e.msg})") from None
        if not (isinstance(cfg, dict) and isinstance(cfg.get("r"), int)):
            raise InferError(f"{p / TINY_LORA_FILES[1]} is not a LoRA config (no integer 'r')")
        return p, "tiny"
    if (p / SD3_LORA_FILE).is_file():
        _check_safetensors(p / SD3_LORA_FILE)
        return p, "sd3"
    raise InferError(f"--lora_path {path!r} holds no LoRA: expected {' + '.join(TINY_LORA_FILES)} (tiny), "
                     f"{SD3_LORA_FILE} (SD3), or a checkpoint dir with lora/")


def model_kind(model: str) -> str:
    """``"tiny"`` for a ``TinyPolicy.save_pretrained`` dir, ``"sd3"`` for a diffusers pipeline dir
    (``model_index.json``) or a hub id ("owner/name", not a local path)."""
    p = Path(model)
    if p.is_dir():
        if (p / "tiny_policy.json").is_file():
            return "tiny"
        if (p / "model_index.json").is_file():
            return "sd3"
        raise InferError(f"--model_name {model!r} is a directory with neither tiny_policy.json (tiny base) "
                         "nor model_index.json (SD3 pipeline)")
    if re.fullmatch(r"[\w.-]+/[\w.-]+", model) and not p.exists() and not model.startswith((".", "/")):
        return "sd3"                                                     # a hub id
    raise InferError(f"--model_name {model!r} does not exist (expected a tiny base dir, an SD3 pipeline dir "
                     "or a hub id like stabilityai/stable-diffusion-3.5-medium)")


# ---------------------------------------------------------------------------------------------
# Prompts
# ---------------------------------------------------------------------------------------------
def parse_target(prompt: str, world: str) -> dict | None:
    """The {class, count} a prompt asks for, or None when it names no count or no known class.

    Embedded world: a number word (or digits) and a "<colour> <shape>" pair of the world; SD3: a number
    and a COCO class name (longest match, plural forms included).
    """
    from .scenes import COLORS, NUMBER_WORDS, SHAPES

    words = re.findall(r"[a-z]+|\d+", prompt.lower())
    count = None
    for w in words:
        if w in NUMBER_WORDS[1:]:
            count = NUMBER_WORDS.index(w)
            break
        if w.isdigit() and int(w) >= 1:
            count = int(w)
            break
    if count is None:
        return None
    if world == "embedded":
        colour = next((w for w in words if w in COLORS), None)
        shape = next((w.rstrip("s") for w in words if w.rstrip("s") in SHAPES), None)
        if colour is None or shape is None or count > 20:
            return None
        return {"class": f"{colour} {shape}", "count": count}
    from .coco_prompts import COCO_CLASSES, plural
    text = " " + " ".join(words) + " "
    found = [c for c in COCO_CLASSES if f" {c} " in text or f" {plural(c)} " in text]
    if not found:
        return None
    return {"class": max(found, key=len), "count": count}


def pick_prompt(world: str, seed: int) -> dict:
    """A random row of the world's test prompts (``random.Random(seed)``)."""
    import random

    from .prompts import load_rows
    rows = load_rows(TEST_PROMPTS[world], embedded=world == "embedded")
    return random.Random(seed).choice(rows)


# ---------------------------------------------------------------------------------------------
# The demo
# ---------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m grpo_lib.infer",
                                 description="Generate counting images with a trained LoRA and count the objects")
    ap.add_argument("--lora_path", required=True,
                    help="checkpoint dir (with lora/), checkpoints/ dir (latest), LoRA dir, or 'none' (base only)")
    ap.add_argument("--model_name", default=None,
                    help="base model: tiny base dir, SD3 pipeline dir or hub id (default: the base a GRPO checkpoint "
                         "records, else the shipped tiny base)")
    ap.add_argument("--custom_prompt", default=None, help="prompt (default: a random test prompt)")
    ap.add_argument("--num_images", type=int, default=4, help="images to generate (default 4)")
    ap.add_argument("--height", type=int, default=None, help="image height (default: the model's own; SD3 512)")
    ap.add_argument("--width", type=int, default=None, help="image width (default: the model's own; SD3 512)")
    ap.add_argument("--num_steps", type=int, default=20, help="ODE sampling steps (default 20)")
    ap.add_argument("--guidance_scale", type=float, default=7.5, help="classifier-free guidance (default 7.5)")
    ap.add_argument("--shift", type=float, default=None,
                    help="sigma-schedule shift (default: tiny 1.0, SD3 the checkpoint scheduler's)")
    ap.add_argument("--seed", type=int, default=42, help="image k uses seed + k (default 42)")
    ap.add_argument("--output_dir", default="./demo_outputs", help="where PNGs and results.json go")
    ap.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    ap.add_argument("--reward_server_url", default="", help="SD3: counting server for the found counts")
    return ap


def _check_args(a) -> None:
    for name in ("num_images", "num_steps"):
        if getattr(a, name) < 1:
            raise InferError(f"--{name} {getattr(a, name)} must be >= 1")
    for name in ("height", "width"):
        v = getattr(a, name)
        if v is not None and v < 1:
            raise InferError(f"--{name} {v} must be a positive number of pixels")
    if a.guidance_scale < 0:
        raise InferError(f"--guidance_scale {a.guidance_scale} must be >= 0")
    if a.shift is not None and not a.shift > 0:
        raise InferError(f"--shift {a.shift} must be > 0")


def _load_policy(kind: str, lora_dir: Path | None, a, device):
    import torch

    if kind == "tiny":
        from dataclasses import replace

        from .checkpoints import Recipe, grpo_recipe, load_policy
        recipe = grpo_recipe(lora_dir, DEFAULT_MODEL) if lora_dir is not None else Recipe(base=DEFAULT_MODEL)
        if a.model_name is not None:          # the user's base wins over the recorded one
            recipe = replace(recipe, base=Path(a.model_name))
        policy = load_policy(recipe, device=device)
        size = policy.config.image_size
        if (a.height or size) != size or (a.width or size) != size:
            raise InferError(f"--height/--width {a.height}x{a.width}: the tiny base draws {size}x{size} only")
        return policy, (a.shift if a.shift is not None else 1.0)
    from .policies.sd3 import SD3Policy
    dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    policy = SD3Policy.from_pretrained(a.model_name, device=device, dtype=dtype, height=a.height or 512,
                                       width=a.width or 512, lora=False if lora_dir is None else None,
                                       lora_path=lora_dir)
    return policy, (a.shift if a.shift is not None else policy.shift)


def _save_grid(images, path: Path) -> None:
    import numpy as np
    from PIL import Image

    scale = max(1, 128 // images.shape[1])                      # 32 px tiny images -> 128 px cells
    pad = np.full((images.shape[1], 2, 3), 255, np.uint8)
    row = np.concatenate([c for im in images for c in (im, pad)][:-1], axis=1)
    Image.fromarray(row).resize((row.shape[1] * scale, row.shape[0] * scale), Image.NEAREST).save(path)


def run(a) -> dict:
    """Generate, save and count; returns the results dict (also written to ``results.json``)."""
    _check_args(a)
    lora_dir, lora_kind = resolve_lora(a.lora_path)
    kind = model_kind(a.model_name if a.model_name is not None else str(DEFAULT_MODEL))
    if lora_kind is not None and lora_kind != kind:
        raise InferError(f"--lora_path {a.lora_path!r} is a {lora_kind} LoRA but --model_name {a.model_name!r} "
                         f"is a {kind} model")
    world = "embedded" if kind == "tiny" else "sd3"
    if a.custom_prompt is not None:
        if not a.custom_prompt.strip():
            raise InferError("--custom_prompt is empty")
        prompt, target = a.custom_prompt, parse_target(a.custom_prompt, world)
    else:
        row = pick_prompt(world, a.seed)
        prompt, target = row["prompt"], dict(row["include"][0])

    import numpy as np
    import torch
    from PIL import Image

    from .rollout import sample_images

    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    t0 = time.perf_counter()
    try:
        policy, shift = _load_policy(kind, lora_dir, a, device)
    except InferError:
        raise
    except (ValueError, OSError, RuntimeError) as e:
        # a LoRA saved from another architecture (peft / torch report a state-dict size mismatch as a
        # RuntimeError), a hub id that is not there: one line, the cause's first lines joined
        cause = "; ".join(line.strip() for line in str(e).splitlines() if line.strip())
        raise InferError(f"loading {a.model_name!r} with --lora_path {a.lora_path!r} failed: "
                         f"{cause[:400]}") from None
    gens = [torch.Generator().manual_seed(a.seed + k) for k in range(a.num_images)]
    try:
        cond = policy.encode([prompt] * a.num_images)
    except ValueError as e:
        raise InferError(f"--custom_prompt {prompt!r}: {e}") from None
    _, images = sample_images(policy, cond=cond, num_steps=a.num_steps, shift=shift,
                              guidance_scale=a.guidance_scale, generator=gens)
    seconds = time.perf_counter() - t0

    found = None
    if target is not None and world == "embedded":
        from .rewards.detector import ShapeCounter
        found = ShapeCounter().count(images, [target["class"]] * len(images),
                                     [target["count"]] * len(images)).tolist()
    elif target is not None and a.reward_server_url:
        from .server import RemoteCountingReward
        row = {"tag": "counting", "include": [target], "prompt": prompt}
        info = RemoteCountingReward(a.reward_server_url)(images, [prompt] * len(images), [row] * len(images))[1]
        found = np.asarray(info["count"]).astype(int).tolist()

    out = Path(a.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = []
    for k, im in enumerate(images):
        names.append(f"image_{k:02d}.png")
        Image.fromarray(im).save(out / names[-1])
    _save_grid(images, out / "grid.png")
    results = {
        "prompt": prompt, "target": target,
        "found_counts": found,
        "correct": None if found is None else [int(f == target["count"]) for f in found],
        "counter": ("ShapeCounter" if world == "embedded" else (a.reward_server_url or None)) if found is not None
        else None,
        "images": names, "grid": "grid.png", "world": world, "model_name": str(a.model_name if a.model_name is not None else DEFAULT_MODEL),
        "lora_path": None if lora_dir is None else str(lora_dir), "num_images": a.num_images,
        "height": int(images.shape[1]), "width": int(images.shape[2]), "num_steps": a.num_steps,
        "guidance_scale": a.guidance_scale, "shift": shift, "seed": a.seed, "device": str(device),
        "seconds": round(seconds, 3),
    }
    (out / "results.json").write_text(json.dumps(results, indent=1))
    return results


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    try:
        results = run(a)
    except InferError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    found = results["found_counts"]
    target = results["target"]
    print(f"prompt: {results['prompt']!r}  target: {target['count'] if target else 'unknown'}  "
          f"found: {found if found is not None else 'n/a (no detector)'}  -> {a.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
