r"""One way from a directory to a policy, and back (issue 14, item 5).

Everything between files on disk and a :class:`~grpo_lib.policies.base.Policy` lives here, so the trainer,
the cold start, the experiment, the evaluation, the widget, ``python -m grpo_lib.infer`` and the pretraining
all build, load and save the same way:

| piece                    | function                                                                        |
|--------------------------|---------------------------------------------------------------------------------|
| atomic writers           | :func:`atomic_save_dir`, :func:`atomic_write_text`, :func:`save_state`           |
| killed writes            | :func:`clean_stale_tmp` removes ``<name>.tmp<PID>`` / ``.old`` left by dead PIDs |
| trainer state            | :func:`save_state` / :func:`load_state`: ``torch.load(weights_only=True)`` only  |
| run-folder layout        | :class:`RunLayout` (``checkpoints/epoch_XXXX/{lora,trainer_state.pt,params.json}``, ``latest``, ``best``) |
| resume                   | :func:`resumable_checkpoints`: ``latest`` first, then older ones, newest first  |
| seeded adapter init      | :func:`seeded_init`: peft's LoRA init under a generator keyed on (seed, stream)  |
| the policy of a recipe   | :class:`Recipe` (base, merged LoRAs, LoRA on top) -> :func:`load_policy`         |
| EMA weights              | :func:`apply_ema`: a GRPO checkpoint's EMA shadow copied into its LoRA           |
| the policy of params     | :func:`build_policy` (base + merged cold start + fresh seeded LoRA, any world)   |

Checkpoint state holds only tensors, plain containers, numbers and strings (RNG states as tensors or
plain dicts), so it loads with ``weights_only=True`` and never runs pickled code from whoever wrote it.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from .seeding import sample_seed

REPO = Path(__file__).resolve().parents[1]
TRAINER_STATE = "trainer_state.pt"       # GRPO checkpoint: optimizer, EMA, history, RNG
LORA_DIR = "lora"                        # the LoRA of a checkpoint (policy.save_lora)
PARAMS_JSON = "params.json"              # the params a checkpoint was trained with (its base and merges)
_TMP = re.compile(r"^(?P<name>.+)\.tmp(?P<pid>\d+)$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read (missing, truncated, or holding pickled objects)."""


# ---------------------------------------------------------------------------------------------
# Atomic writers
# ---------------------------------------------------------------------------------------------
def atomic_save_dir(build: Callable[[Path], None], final: Path) -> Path:
    """Write a directory atomically: ``build(tmp)`` fills ``<final>.tmp<PID>``, which then replaces ``final``."""
    final = Path(final)
    tmp = final.with_name(final.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        build(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = final.with_name(final.name + f".old{os.getpid()}")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def atomic_write_text(path: Path, text: str) -> Path:
    path = Path(path)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:      # someone else's live process
        return True
    return True


def clean_stale_tmp(directory: Path) -> list[Path]:
    """Remove ``<name>.tmp<PID>`` and ``<name>.old<PID>`` entries of ``directory`` whose writer is no longer
    running (a write killed half-way); returns what was removed. A live writer's temp is left alone."""
    directory = Path(directory)
    removed = []
    if not directory.is_dir():
        return removed
    for entry in sorted(directory.iterdir()):
        m = _TMP.match(entry.name) or re.match(r"^(?P<name>.+)\.old(?P<pid>\d+)$", entry.name)
        if m is None or _pid_alive(int(m["pid"])):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


# ---------------------------------------------------------------------------------------------
# Plain state: what weights_only=True loads
# ---------------------------------------------------------------------------------------------
def to_plain(obj: Any, where: str = "state") -> Any:
    """``obj`` with numpy arrays as tensors and numpy scalars as Python numbers; anything else that
    ``torch.load(weights_only=True)`` could not read is a ``ValueError`` naming where it sits."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(obj))
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, dict):
        return {k: to_plain(v, f"{where}[{k!r}]") for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_plain(v, f"{where}[{i}]") for i, v in enumerate(obj))
    raise ValueError(f"{where} is a {type(obj).__name__}; a checkpoint holds only tensors, numbers, strings "
                     "and lists / dicts of them (so that torch.load(weights_only=True) reads it)")


def numpy_rng_state() -> dict:
    """numpy's legacy global RNG state as plain data (the MT19937 key as a tensor)."""
    name, key, pos, has_gauss, cached = np.random.get_state()
    return {"name": str(name), "key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}


def set_numpy_rng_state(state: dict) -> None:
    np.random.set_state((state["name"], state["key"].numpy().astype(np.uint32), state["pos"],
                         state["has_gauss"], state["cached_gaussian"]))


def save_state(state: dict, path: Path) -> Path:
    """``torch.save`` of plain state (see :func:`to_plain`), atomically (temp file, then rename)."""
    path = Path(path)
    plain = to_plain(state)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    torch.save(plain, tmp)
    os.replace(tmp, path)
    return path


def load_state(path: Path) -> dict:
    """Read a :func:`save_state` file with ``weights_only=True``; ``CheckpointError`` names the file and why."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist")
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except Exception as e:       # truncated zip, pickled classes, ...: the cause in one line
        cause = " ".join(str(e).split())[:300]
        raise CheckpointError(f"{path} cannot be read with weights_only=True ({type(e).__name__}: {cause})") from None


# ---------------------------------------------------------------------------------------------
# Run-folder layout
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RunLayout:
    """Where a run keeps its outputs::

        <run_dir>/metrics.csv, events.log, summary.json
        <run_dir>/cold_start/{lora,merged}/              notebook 01
        <run_dir>/checkpoints/epoch_XXXX/{lora/, trainer_state.pt, params.json, metrics.json}
        <run_dir>/checkpoints/latest, best               text files naming an epoch_XXXX
    """
    run_dir: Path

    @property
    def checkpoints(self) -> Path:
        return Path(self.run_dir) / "checkpoints"

    @property
    def cold_start(self) -> Path:
        return Path(self.run_dir) / "cold_start"

    def epoch_dir(self, epoch: int) -> Path:
        return self.checkpoints / f"epoch_{epoch:04d}"

    def pointer(self, name: str) -> Path | None:
        """The checkpoint ``latest`` / ``best`` names, or None."""
        f = self.checkpoints / name
        return self.checkpoints / f.read_text().strip() if f.is_file() else None

    def epochs(self) -> list[Path]:
        """Every complete-looking ``epoch_XXXX`` directory, newest first."""
        return sorted((d for d in self.checkpoints.glob("epoch_*") if d.is_dir() and re.fullmatch(r"epoch_\d+", d.name)),
                      reverse=True)


def resumable_checkpoints(layout: RunLayout) -> Iterator[Path]:
    """Candidates to resume from: the one ``latest`` names, then every other epoch, newest first."""
    latest = layout.pointer("latest")
    if latest is not None:
        yield latest
    for d in layout.epochs():
        if d != latest:
            yield d


# ---------------------------------------------------------------------------------------------
# Seeded adapter initialisation
# ---------------------------------------------------------------------------------------------
@contextlib.contextmanager
def seeded_init(seed: int, stream: str) -> Iterator[None]:
    """Inside: torch's global generator is seeded from (seed, stream); outside it is untouched.

    peft draws a new LoRA's A matrices from the global generator, so a LoRA added in here is the same on
    every process of a launch and in every run with the same seed (issue 14, defect 1).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(sample_seed(seed, 0, 0, stream))
        yield


# ---------------------------------------------------------------------------------------------
# Recipes: base + merged LoRAs + a LoRA on top (with its EMA weights)
# ---------------------------------------------------------------------------------------------
def repo_path(p: str | Path) -> Path:
    """A path as given when absolute, else relative to the repo (params name repo paths: data/..., runs/...)."""
    p = Path(p)
    return p if p.is_absolute() else REPO / p


@dataclass(frozen=True)
class Recipe:
    """How to build a policy: ``from_pretrained(base)``, then each of ``merges`` loaded and merged, then
    ``lora`` attached (None: none) with its checkpoint's EMA weights when it has them."""
    base: Path
    merges: tuple[Path, ...] = ()
    lora: Path | None = None

    def __post_init__(self):
        # str paths are what a notebook or a shell passes; every consumer wants Path (``.name``, ``/``)
        if isinstance(self.merges, (str, Path)):
            raise ValueError(f"merges={str(self.merges)!r} must be a sequence of LoRA dirs, e.g. (path,)")
        object.__setattr__(self, "base", Path(self.base))
        object.__setattr__(self, "merges", tuple(Path(m) for m in self.merges))
        if self.lora is not None:
            object.__setattr__(self, "lora", Path(self.lora))


def check_recipe(recipe: Recipe, name: str = "recipe") -> None:
    """Raise ValueError naming ``name`` and the path when ``recipe``'s base, a merge or its LoRA is missing:
    file checks only, so a comparison of many recipes fails before it samples anything, not at its last stage."""
    from .policies.tiny import CONFIG_NAME, LORA_CONFIG, LORA_WEIGHTS

    if not (Path(recipe.base) / CONFIG_NAME).is_file():
        raise ValueError(f"{name}: base {str(recipe.base)!r} holds no {CONFIG_NAME}")
    for lora in (*recipe.merges, *([recipe.lora] if recipe.lora is not None else [])):
        missing = [f for f in (LORA_WEIGHTS, LORA_CONFIG) if not (Path(lora) / f).is_file()]
        if missing:
            raise ValueError(f"{name}: LoRA {str(lora)!r} holds no {' / '.join(missing)}")


def run_start(run: Path, default_base: str | Path) -> tuple[Path, tuple[Path, ...]]:
    """(base, merges) a GRPO run started from: its summary.json params, else its cold_start outputs."""
    summary = run / "summary.json"
    if summary.is_file():
        try:
            params = json.loads(summary.read_text()).get("params", {})
        except json.JSONDecodeError:
            params = {}
        if params.get("model"):
            cs = params.get("cold_start_lora") or ""
            return repo_path(params["model"]), ((repo_path(cs),) if cs else ())
    if (run / "cold_start" / "merged" / "tiny_policy.json").is_file():
        return run / "cold_start" / "merged", ()
    if (run / "cold_start" / LORA_DIR).is_dir():
        return repo_path(default_base), (run / "cold_start" / LORA_DIR,)
    return repo_path(default_base), ()


def cold_start_model(cold_start_dir: Path) -> Path | None:
    """The model a cold start's LoRA was trained on: ``model`` in its ``summary.json`` params, else None."""
    summary = Path(cold_start_dir) / "summary.json"
    if not summary.is_file():
        return None
    try:
        model = json.loads(summary.read_text()).get("params", {}).get("model")
    except json.JSONDecodeError:
        return None
    return repo_path(model) if model else None


def grpo_recipe(lora: Path, default_base: str | Path) -> Recipe:
    """The recipe of a LoRA dir: a GRPO checkpoint's ``<run>/checkpoints/epoch_XXXX/lora`` sits on top of the
    run's start (its own ``params.json``, else :func:`run_start`); a cold start's ``<cold_start>/lora`` on the
    model it was trained on (its ``summary.json``; a cold start of a cold start's merged model, say); any other
    LoRA on ``default_base``."""
    lora = Path(lora)
    parts = lora.parts
    if len(parts) >= 4 and parts[-3] == "checkpoints" and parts[-1] == LORA_DIR and parts[-4] != "cold_start":
        own = lora.parent / PARAMS_JSON
        if own.is_file():
            params = json.loads(own.read_text())
            cs = params.get("cold_start_lora") or ""
            return Recipe(base=repo_path(params["model"]), merges=(repo_path(cs),) if cs else (), lora=lora)
        base, merges = run_start(lora.parents[2], default_base)
        return Recipe(base=base, merges=merges, lora=lora)
    own_model = cold_start_model(lora.parent) if lora.name == LORA_DIR else None
    return Recipe(base=own_model or repo_path(default_base), lora=lora)


def apply_ema(policy, checkpoint: Path) -> bool:
    """Copy the EMA weights of a GRPO checkpoint dir into ``policy``'s trainable parameters (what the
    trainer evaluates and the experiment reports); False when the checkpoint has none."""
    path = Path(checkpoint) / TRAINER_STATE
    if not path.is_file():
        return False
    state = load_state(path)
    ema = state.get("ema")
    if not ema:
        return False
    params = [q for q in policy.trainable_parameters() if q.requires_grad]
    shadow = ema["shadow"]
    if len(shadow) != len(params) or any(s.shape != q.shape for s, q in zip(shadow, params)):
        raise CheckpointError(f"{path}: its EMA holds {len(shadow)} tensors that do not fit the policy's "
                              f"{len(params)} trainable parameters")
    with torch.no_grad():
        for q, s in zip(params, shadow):
            q.copy_(s.to(q.device, q.dtype))
    return True


def load_trainable(policy, checkpoint: Path) -> None:
    """Copy a GRPO checkpoint's ``trainable`` tensors (full / pattern training: no LoRA dir) into the policy."""
    state = load_state(Path(checkpoint) / TRAINER_STATE)
    params = [q for q in policy.trainable_parameters() if q.requires_grad]
    with torch.no_grad():
        for q, v in zip(params, state["trainable"]):
            q.copy_(v.to(q.device, q.dtype))


def load_policy(recipe: Recipe, *, device: str | torch.device = "cpu", convention: str = "noise_at_one",
                ema: bool = True):
    """The tiny policy of ``recipe``: base, merges folded in, the LoRA attached (not merged, as the trainer
    evaluates it) with its checkpoint's EMA weights when ``ema`` and it has them. In eval mode."""
    from .policies.tiny import TinyPolicy

    policy = TinyPolicy.from_pretrained(recipe.base, device=device, convention=convention)
    for m in recipe.merges:
        policy.load_lora(m)
        policy.merge_lora()
    if recipe.lora is not None:
        policy.load_lora(recipe.lora)
        if ema and recipe.lora.name == LORA_DIR:
            apply_ema(policy, recipe.lora.parent)
    return policy.eval()


# ---------------------------------------------------------------------------------------------
# The policy a params file asks for (GRPO and cold start, every world)
# ---------------------------------------------------------------------------------------------
_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _check_dir(path: str, name: str) -> None:
    if not Path(path).is_dir():
        raise ValueError(f"{name}={path!r} is not a directory")


def _check_lora_targets(module: torch.nn.Module, targets: Sequence[str], model: str) -> None:
    """Each LoRA target must name a layer of ``module`` (peft matches a name or a dotted suffix, and only
    complains when no target matches at all, so a typo would silently train fewer layers)."""
    names = [n for n, _ in module.named_modules()]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        raise ValueError(f"lora_target_modules={list(targets)} do not all name layers of {model!r}: "
                         f"{missing} match none (names look like {names[-3:]})")


def build_policy(p, device, *, stream: str = "grpo_lora_init", merges: Sequence[str] | None = None,
                 trainable: str | None = None):
    """Base checkpoint ``p.model``, the cold-start LoRA merged in, a fresh LoRA (r = ``p.lora_rank``,
    alpha = ``p.lora_alpha``) initialised under :func:`seeded_init` (``p.seed``, ``stream``) on top.

    ``p`` is a ``GRPOParams`` or a ``ColdStartParams`` (fields ``world``, ``model``, ``convention``,
    ``lora_rank``, ``lora_alpha``, ``seed``, ``mixed_precision``, ``resolution``; optional
    ``lora_target_modules``); ``merges`` defaults
    to ``p.cold_start_lora`` when it has one; ``trainable`` to ``p.trainable`` (else ``"lora"``).
    """
    if merges is None:
        cs = getattr(p, "cold_start_lora", "")
        merges = [cs] if cs else []
    trainable = trainable or getattr(p, "trainable", "lora")
    lora = {"r": p.lora_rank, "lora_alpha": p.lora_alpha}
    if getattr(p, "lora_target_modules", None):     # empty: the policy's own DEFAULT_LORA targets
        lora["target_modules"] = list(p.lora_target_modules)
    with seeded_init(p.seed, stream):
        if p.world == "embedded":
            from .policies.base import select_trainable
            from .policies.tiny import TinyPolicy
            policy = TinyPolicy.from_pretrained(p.model, device=device, convention=p.convention)
            for m in merges:
                _check_dir(m, "cold_start_lora")
                policy.load_lora(m)
                policy.merge_lora()
            if trainable == "lora":
                _check_lora_targets(policy.unet, lora.get("target_modules", []), p.model)
                policy.add_lora(lora)
            else:
                select_trainable(policy, trainable)
            return policy
        if p.world == "sd3":
            from .policies.sd3 import SD3Policy
            if len(merges) > 1:
                raise ValueError(f"the SD3 path merges one cold-start LoRA, got {list(merges)}")
            kwargs = {"merge_lora_path": merges[0]} if merges else {}
            size = p.resolution or 512          # SD3.5-Medium's Flow-GRPO resolution
            return SD3Policy.from_pretrained(p.model, device=device, dtype=_DTYPES[p.mixed_precision], lora=lora,
                                             height=size, width=size, **kwargs)
        from .policies.showo2 import ShowO2Policy
        return ShowO2Policy.from_params(p, device=device)
