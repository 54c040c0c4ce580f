r"""The ipywidget inference preview (notebooks/04_inference_preview.ipynb): draw a counting prompt with any
checkpoint of a run, count the objects with the reward's detector, and compare two checkpoints on the same seeds.

Sampling is the policy's own sampler from ``grpo_lib.rollout``:

    noise_level a = 0 :  x_{t_{i+1}} = x_{t_i} + (t_{i+1} - t_i) v_theta(x_{t_i}, t_i | c)    (ODE, ``sample_images``)
    noise_level a > 0 :  the SDE step of Flow-GRPO with sigma_t = a sqrt(t / (1 - t))     (``sample_trajectories``)

with classifier-free guidance v = v_u + g (v_c - v_u); image k starts from the noise of
``torch.Generator().manual_seed(seed + k)`` (as ``python -m grpo_lib.infer``), so the two sides of a comparison
see identical initial noise.

| code / widget            | symbol / meaning                                                                |
|--------------------------|---------------------------------------------------------------------------------|
| ``num_steps``            | N, steps of the time grid ``convention_times(N, shift)``                        |
| ``noise_level``          | a (0 = ODE)                                                                     |
| ``guidance_scale``       | g                                                                               |
| ``checkpoint``           | the weights: a tiny base dir, a cold-start ``lora``/``merged`` dir, a GRPO ``checkpoints/epoch_XXXX`` or any LoRA dir |
| ``found n / N``          | ShapeCounter count n against the prompt's count N (green when n == N)           |

A checkpoint string resolves (:func:`resolve_checkpoint`) to a :class:`grpo_lib.checkpoints.Recipe`: base weights,
LoRAs folded in first, and the LoRA attached on top, with its checkpoint's EMA weights when training kept an EMA
(the weights the trainer evaluated and the experiment reports). A GRPO LoRA was trained on top of the cold-start
model, so its recipe merges the run's cold-start LoRA first (read from the checkpoint's ``params.json``, else the
run's ``summary.json`` params, else ``<run>/cold_start``). :func:`grpo_lib.checkpoints.load_policy` builds it.
LoRA paths are checked by :func:`grpo_lib.infer.resolve_lora` before anything loads.

Everything the widget shows is also kept on the object (``last_images``, ``last_tables``, ``last_pngs``,
``messages``) and written through ``Output.append_display_data`` / ``append_stdout``, so it can be driven and
checked headless (tests, papermill) where a ``with output:`` block would capture nothing.
"""
from __future__ import annotations

import io
import json
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from grpo_lib.params import check_knobs
from .checkpoints import REPO, Recipe, grpo_recipe, load_policy, repo_path as _path  # noqa: F401  (load_policy: the widget's loader)

BASE_CHECKPOINT = "data/checkpoints/tiny-base"


# ---------------------------------------------------------------------------------------------
# Parameters (the notebook's parameters cell; SCHEMAS["04_inference_preview"])
# ---------------------------------------------------------------------------------------------
@dataclass
class PreviewParams:
    run_dir: str = "runs/dev"                          # where outputs go (preview PNGs + results.json)
    runs_root: str = "runs"                            # the checkpoint selector lists runs under it
    checkpoint: str = BASE_CHECKPOINT                  # base dir, cold-start lora/merged, GRPO epoch or LoRA dir
    compare_checkpoint: str = ""                       # second checkpoint for side-by-side ("" off)
    prompt: str = "a photo of four red circles"        # the prompt (class + count fill it too)
    seed: int = 0                                      # image k starts from seed + k
    num_images: int = 4                                # images per checkpoint
    num_steps: int = 20                                # sampling steps
    noise_level: float = 0.0                           # 0 ODE; > 0 the SDE step
    guidance_scale: float = 3.0                        # classifier-free guidance g
    shift: float = 1.0                                 # sigma-schedule shift (tiny world 1.0)
    cell_px: int = 128                                 # displayed size of one 32x32 image
    generate: bool = True                              # click Generate once when the notebook runs
    num_threads: int = 1                               # torch CPU threads

    def __post_init__(self):
        if not isinstance(self.prompt, str):
            raise ValueError(f"prompt={self.prompt!r} must be a string")
        check_knobs(self)   # noise_level 0 = ODE preview is allowed here (shared rule: >= 0)
        for name, lo in (("num_images", 1), ("cell_px", 32), ("num_threads", 1)):
            if getattr(self, name) < lo:
                raise ValueError(f"{name}={getattr(self, name)} must be >= {lo}")


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------
def resolve_checkpoint(spec: str) -> Recipe:
    """A checkpoint string -> :class:`Recipe`; ``ValueError`` (``InferError``) naming the path when it holds
    neither a tiny base (``tiny_policy.json``) nor a tiny LoRA."""
    from .infer import InferError, resolve_lora

    if not isinstance(spec, str) or not spec.strip():
        raise InferError("no checkpoint given: pick one from the list or type a base / LoRA directory")
    if spec.strip().lower() == "none":                  # infer's word for "the base alone"
        return Recipe(base=_path(BASE_CHECKPOINT))
    p = _path(spec.strip())
    if (p / "tiny_policy.json").is_file():
        return Recipe(base=p)
    try:
        lora, kind = resolve_lora(str(p))
    except InferError as e:          # infer words it for its CLI flag; here the field is the checkpoint
        raise InferError(f"checkpoint: {str(e).replace('--lora_path ', '')}") from None
    if kind != "tiny":
        raise InferError(f"checkpoint {spec!r} is an SD3 LoRA; the preview runs the embedded world's tiny policy")
    # <run>/checkpoints/epoch_XXXX/lora is a GRPO LoRA (on top of the run's cold start);
    # <run>/cold_start/checkpoints/step_XXXXXX/lora and <run>/cold_start/lora are cold-start LoRAs (on the base)
    return grpo_recipe(lora, BASE_CHECKPOINT)


def list_checkpoints(runs_root: str | Path = "runs") -> list[str]:
    """The shipped base, then per run under ``runs_root``: cold-start ``lora`` / ``merged`` and GRPO epochs."""
    root = _path(runs_root)
    found = [BASE_CHECKPOINT]
    if root.is_dir():
        for run in sorted(d for d in root.iterdir() if d.is_dir()):
            cs = run / "cold_start"
            if (cs / "lora" / "lora.safetensors").is_file():
                found.append(cs / "lora")
            if (cs / "merged" / "tiny_policy.json").is_file():
                found.append(cs / "merged")
            found += sorted(e for e in (run / "checkpoints").glob("epoch_*") if (e / "lora").is_dir())
    return [f if isinstance(f, str) else _display(f) for f in found]


def _display(p: Path) -> str:
    try:
        return str(p.relative_to(REPO))
    except ValueError:
        return str(p)


class _StepCounter:
    """Forwards to a policy, calling ``on_step()`` after every ``velocity`` (one per sampling step)."""

    def __init__(self, policy, on_step):
        self._policy, self._on_step = policy, on_step

    def velocity(self, *args, **kwargs):
        v = self._policy.velocity(*args, **kwargs)
        self._on_step()
        return v

    def __getattr__(self, name):
        return getattr(self._policy, name)


def sample(policy, prompt: str, *, seed: int, num_images: int, num_steps: int, noise_level: float,
           guidance_scale: float, shift: float, on_step=None) -> np.ndarray:
    """uint8 (num_images, H, W, 3): the ODE (a = 0) or the SDE step (a > 0); image k from seed + k."""
    import torch

    from .rollout import sample_images, sample_trajectories

    net = _StepCounter(policy, on_step) if on_step is not None else policy
    cond = policy.encode([prompt] * num_images)            # ValueError for a prompt of another world
    gens = [torch.Generator().manual_seed(seed + k) for k in range(num_images)]
    if noise_level > 0:
        traj = sample_trajectories(net, cond=cond, num_steps=num_steps, shift=shift, guidance_scale=guidance_scale,
                                   noise_level=noise_level, generator=gens)
        return traj.images
    _, images = sample_images(net, cond=cond, num_steps=num_steps, shift=shift, guidance_scale=guidance_scale,
                              generator=gens)
    return images


def grid_png(images: np.ndarray, prompt: str, target: dict | None, table, *, cell_px: int = 128,
             title: str = "") -> bytes:
    """PNG of one row of images: with a target, :func:`grpo_lib.evaluate.plot_image_grid` (detector boxes,
    ``found n / N`` green when exact); without, the bare images."""
    import matplotlib.pyplot as plt

    from .evaluate import plot_image_grid

    dpi = 100
    if target is not None:
        fig = plot_image_grid(images, table, per_count=len(images), cell_inches=cell_px / dpi, title=title)
    else:
        fig, axes = plt.subplots(1, len(images), figsize=(cell_px / dpi * len(images) + 0.4, cell_px / dpi + 0.6),
                                 squeeze=False)
        for ax, im in zip(axes[0], images):
            ax.imshow(im, interpolation="nearest")
            ax.axis("off")
        fig.suptitle((title + "\n" if title else "") + "no count / class in the prompt: not counted", fontsize=8)
        fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# The widget
# ---------------------------------------------------------------------------------------------
class InferencePreview:
    """The preview: ``InferencePreview(params).widget`` is the ipywidgets tree; ``generate()`` (or clicking
    the button) samples and fills ``last_images`` {checkpoint: uint8 (n, H, W, 3)}, ``last_tables``
    {checkpoint: per-image table or None}, ``last_pngs`` and ``messages``."""

    CUSTOM = "(type a prompt)"

    def __init__(self, params: PreviewParams | None = None, *, max_cached: int = 3):
        import ipywidgets as W

        from .scenes import MAX_COUNT, all_classes

        p = params or PreviewParams()
        self.params = p
        self._cache: OrderedDict[Recipe, object] = OrderedDict()
        self._max_cached = max_cached
        self.last_images: dict[str, np.ndarray] = {}
        self.last_tables: dict = {}
        self.last_pngs: dict[str, bytes] = {}
        self.last_target: dict | None = None
        self.messages: list[str] = []

        options = list_checkpoints(p.runs_root)
        style = {"description_width": "110px"}
        lay = W.Layout(width="560px")
        self.prompt = W.Text(value=p.prompt, description="prompt", style=style, layout=lay)
        self.cls = W.Dropdown(options=[self.CUSTOM] + all_classes(), value=self.CUSTOM, description="class",
                              style=style)
        self.count = W.IntSlider(value=4, min=1, max=MAX_COUNT, description="count", style=style)
        self.seed = W.IntText(value=p.seed, description="seed", style=style)
        self.num_images = W.BoundedIntText(value=p.num_images, min=1, max=64, description="images", style=style)
        self.num_steps = W.BoundedIntText(value=p.num_steps, min=1, max=1000, description="steps", style=style)
        self.noise_level = W.BoundedFloatText(value=p.noise_level, min=0.0, max=5.0, step=0.1,
                                              description="noise (0=ODE)", style=style)
        self.guidance_scale = W.BoundedFloatText(value=p.guidance_scale, min=0.0, max=50.0, step=0.5,
                                                 description="guidance", style=style)
        self.checkpoint = W.Combobox(value=p.checkpoint, options=options, ensure_option=False,
                                     description="checkpoint", placeholder="pick or type a base / LoRA dir",
                                     style=style, layout=lay)
        self.compare = W.Checkbox(value=bool(p.compare_checkpoint), description="compare with")
        self.compare_checkpoint = W.Combobox(value=p.compare_checkpoint, options=options, ensure_option=False,
                                             placeholder="second checkpoint (same seeds)", layout=W.Layout(width="450px"))
        self.button = W.Button(description="Generate", button_style="primary", icon="play")
        self.progress = W.IntProgress(value=0, min=0, max=1, description="sampling", style=style)
        self.status = W.HTML(value="")
        self.output = W.Output()                 # grids (append_display_data) and notes (append_stdout)

        self.cls.observe(self._fill_prompt, names="value")
        self.count.observe(self._fill_prompt, names="value")
        self.button.on_click(lambda _b: self.generate())
        self.widget = W.VBox([
            self.prompt, W.HBox([self.cls, self.count]),
            W.HBox([self.seed, self.num_images]), W.HBox([self.num_steps, self.noise_level]),
            self.guidance_scale, self.checkpoint, W.HBox([self.compare, self.compare_checkpoint]),
            W.HBox([self.button, self.progress]), self.status, self.output])

    # -- inputs -------------------------------------------------------------------------------
    def _fill_prompt(self, _change=None) -> None:
        from .prompts import counting_row

        if self.cls.value != self.CUSTOM:
            self.prompt.value = counting_row(self.cls.value, int(self.count.value))["prompt"]

    def _message(self, text: str, *, error: bool = False) -> None:
        import html

        self.messages.append(text)
        colour = "crimson" if error else "black"
        self.status.value = f'<span style="color:{colour}">{html.escape(text)}</span>'
        self.output.append_stdout(text + "\n")

    def _policy(self, spec: str):
        recipe = resolve_checkpoint(spec)
        if recipe not in self._cache:
            self._cache[recipe] = load_policy(recipe)
            while len(self._cache) > self._max_cached:
                self._cache.popitem(last=False)
        self._cache.move_to_end(recipe)
        return self._cache[recipe]

    # -- the action ---------------------------------------------------------------------------
    def generate(self) -> bool:
        """Sample, count, draw. Returns True on success; bad input leaves a message (never raises)."""
        self.output.outputs = ()        # (clear_output() would print ANSI codes when no frontend is attached)
        self.last_images, self.last_tables, self.last_pngs = {}, {}, {}
        try:
            self._generate()
            return True
        except Exception as e:        # a widget shows the problem; a traceback would be lost in the UI
            self._message(f"error: {e}", error=True)
            return False
        finally:
            self.button.disabled = False

    def _generate(self) -> None:
        from IPython.display import Image

        from .infer import parse_target

        prompt = self.prompt.value.strip()
        if not prompt:
            raise ValueError("the prompt is empty: type one, or pick a class and a count")
        specs = [self.checkpoint.value.strip()]
        if self.compare.value:
            if not self.compare_checkpoint.value.strip():
                raise ValueError("compare is on but no second checkpoint is given")
            specs.append(self.compare_checkpoint.value.strip())
        n, steps = int(self.num_images.value), int(self.num_steps.value)
        policies = [self._policy(s) for s in specs]       # resolve + load everything before sampling
        target = parse_target(prompt, "embedded")
        self.last_target = target
        self.button.disabled = True
        self.progress.max, self.progress.value = steps * len(specs), 0
        t0 = time.perf_counter()

        def tick():
            self.progress.value += 1

        for spec, policy in zip(specs, policies):
            images = sample(policy, prompt, seed=int(self.seed.value), num_images=n, num_steps=steps,
                            noise_level=float(self.noise_level.value), guidance_scale=float(self.guidance_scale.value),
                            shift=self.params.shift, on_step=tick)
            table = None
            if target is not None:
                from .evaluate import per_image_table
                row = {"tag": "counting", "include": [target], "prompt": prompt}
                table = per_image_table(images, [row] * len(images))
            label = spec if len(specs) == 1 else f"{'AB'[specs.index(spec)]}: {spec}"
            png = grid_png(images, prompt, target, table, cell_px=self.params.cell_px, title=f"{label}\n{prompt!r}")
            self.last_images[spec], self.last_tables[spec], self.last_pngs[spec] = images, table, png
            self.output.append_display_data(Image(data=png, format="png"))
        secs = time.perf_counter() - t0
        if target is None:
            note = f"{prompt!r} names no count and class of the world: images not counted"
        else:
            note = "; ".join(f"{s}: found {list(map(int, self.last_tables[s]['found']))}, "
                             f"{int(self.last_tables[s]['correct'].sum())}/{n} exact" for s in specs)
            note = f"target {target['count']} {target['class']} -> {note}"
        self._message(f"{note} ({secs:.1f} s)")
        self._save(prompt, target, specs)

    def _save(self, prompt: str, target: dict | None, specs: list[str]) -> None:
        out = _path(self.params.run_dir) / "preview"
        out.mkdir(parents=True, exist_ok=True)
        record = {"prompt": prompt, "target": target, "seed": int(self.seed.value),
                  "num_steps": int(self.num_steps.value), "noise_level": float(self.noise_level.value),
                  "guidance_scale": float(self.guidance_scale.value), "shift": self.params.shift, "grids": {}}
        for k, s in enumerate(specs):
            name = f"grid_{'AB'[k]}.png"
            (out / name).write_bytes(self.last_pngs[s])
            t = self.last_tables[s]
            record["grids"][s] = {"png": name, "found": None if t is None else [int(x) for x in t["found"]]}
        (out / "results.json").write_text(json.dumps(record, indent=1))
