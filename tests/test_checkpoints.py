"""grpo_lib.checkpoints and issue 14's defects 2-4: the preview and infer draw the evaluated (EMA) weights,
resume says what it does with missing / corrupt checkpoints and killed writes, and no checkpoint is unpickled."""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from train_fixtures import brightness_reward, small_params, tiny_base, tiny_policy  # noqa: E402

from grpo_lib import checkpoints  # noqa: E402
from grpo_lib.train import GRPOTrainer, run  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
REPO = Path(__file__).parents[1]


def _flat(policy):
    return torch.cat([q.detach().reshape(-1) for q in policy.trainable_parameters()])


# -- defect 2: the widget and infer evaluate the weights the experiment's grpo stage evaluates ---------------

@pytest.fixture(scope="module")
def ema_run(tmp_path_factory):
    """A GRPO run through the params path (no policy passed in): a small random base, a cold-start LoRA
    merged first, a GRPO LoRA with an EMA (decay 0.5, updated every optimizer step) saved at epoch 2."""
    from grpo_lib.grpo import EMA

    root = tmp_path_factory.mktemp("ema_run")
    tiny_base().save_pretrained(root / "base")
    cs = tiny_policy(seed=3)
    with torch.no_grad():
        for n, q in cs.unet.named_parameters():
            if "lora_B" in n:
                q.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(n)))
    cs.save_lora(root / "run" / "cold_start" / "lora")
    p = small_params(root / "run", model=str(root / "base"), cold_start_lora=str(root / "run" / "cold_start" / "lora"),
                     lora_rank=4, lora_alpha=4, num_epochs=2, lr=3e-2, clip_range=1e-2, beta=0.0, ema_decay=0.5,
                     eval_prompts="", save_every=2)
    orig = EMA.__init__

    def every_step(self, params, decay=0.9, update_step_interval=8, **kw):   # 2 updates: let the EMA move
        orig(self, params, decay, 1, **kw)
    EMA.__init__ = every_step
    try:
        run(p, reward_fn=brightness_reward)
    finally:
        EMA.__init__ = orig
    return root, p


def test_widget_and_infer_draw_the_experiments_grpo_stage(ema_run, tmp_path):
    from grpo_lib import infer, widgets
    from grpo_lib.experiment import CountingExperiment

    root, p = ema_run
    ck = root / "run" / "checkpoints" / "epoch_0002"
    state = checkpoints.load_state(ck / checkpoints.TRAINER_STATE)
    assert state["ema"]["optimization_step"] == 2                 # the EMA moved, and differs from the raw LoRA
    prompt, n, steps, seed, g = "a photo of three red circles", 2, 4, 5, 3.0

    stage = CountingExperiment(p).stage_policy("grpo")
    expected = widgets.sample(stage, prompt, seed=seed, num_images=n, num_steps=steps, noise_level=0.0,
                              guidance_scale=g, shift=1.0)

    preview = widgets.InferencePreview(widgets.PreviewParams(run_dir=str(tmp_path / "pv"), runs_root=str(tmp_path),
                                                             checkpoint=str(ck), prompt=prompt, seed=seed,
                                                             num_images=n, num_steps=steps, guidance_scale=g))
    assert preview.generate(), preview.messages
    np.testing.assert_array_equal(preview.last_images[str(ck)], expected)

    rc = infer.main(["--lora_path", str(ck), "--model_name", str(root / "base"), "--custom_prompt", prompt,
                     "--num_images", str(n), "--num_steps", str(steps), "--guidance_scale", str(g), "--seed",
                     str(seed), "--output_dir", str(tmp_path / "demo")])
    assert rc == 0
    from PIL import Image
    drawn = np.stack([np.asarray(Image.open(tmp_path / "demo" / f"image_{k:02d}.png")) for k in range(n)])
    np.testing.assert_array_equal(drawn, expected)

    # and those are the EMA weights, not the raw LoRA's
    raw = checkpoints.load_policy(checkpoints.Recipe(root / "base", (root / "run" / "cold_start" / "lora",),
                                                     ck / "lora"), ema=False)
    torch.testing.assert_close(_flat(stage), torch.cat([s.reshape(-1) for s in state["ema"]["shadow"]]))
    assert (_flat(raw) - _flat(stage)).abs().max() > 1e-4


# -- defect 3: resume edge cases ----------------------------------------------------------------------------

def test_resume_without_a_checkpoint_says_so(tmp_path, capsys):
    p = small_params(tmp_path / "r", num_epochs=1, resume=True, eval_prompts="", progress=True)
    run(p, policy=tiny_policy(), reward_fn=brightness_reward)
    msg = "resume: true but no checkpoint under"
    assert msg in (tmp_path / "r" / "events.log").read_text()
    assert msg in capsys.readouterr().out            # the notebook's output shows what the kernel prints


def test_corrupt_latest_falls_back_to_the_previous_checkpoint(tmp_path, capsys):
    full = tiny_policy()
    run(small_params(tmp_path / "full", num_epochs=3, eval_prompts=""), policy=full, reward_fn=brightness_reward)
    run(small_params(tmp_path / "part", num_epochs=2, eval_prompts=""), policy=tiny_policy(), reward_fn=brightness_reward)
    bad = tmp_path / "part" / "checkpoints" / "epoch_0002" / checkpoints.TRAINER_STATE
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])          # a write cut short
    resumed = tiny_policy()
    run(small_params(tmp_path / "part", num_epochs=3, resume=True, eval_prompts="", progress=True),
        policy=resumed, reward_fn=brightness_reward)
    events = (tmp_path / "part" / "events.log").read_text()
    assert "WARNING: checkpoint epoch_0002 is unreadable" in events and "resumed from epoch_0001 (epoch 1)" in events
    assert "epoch_0002 is unreadable" in capsys.readouterr().out
    assert torch.equal(_flat(full), _flat(resumed))                     # epochs 2 and 3 redone exactly
    a = pd.read_csv(tmp_path / "full" / "metrics.csv").filter(regex="^(?!seconds)")
    b = pd.read_csv(tmp_path / "part" / "metrics.csv").filter(regex="^(?!seconds)")
    pd.testing.assert_frame_equal(a, b)


def test_killed_writes_are_cleaned_up_on_resume(tmp_path):
    run(small_params(tmp_path / "k", num_epochs=1, eval_prompts=""), policy=tiny_policy(), reward_fn=brightness_reward)
    ck = tmp_path / "k" / "checkpoints"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()          # a PID that has exited
    (ck / f"epoch_0002.tmp{dead}").mkdir()
    (ck / f"epoch_0002.tmp{dead}" / checkpoints.TRAINER_STATE).write_bytes(b"half")
    (ck / f"latest.tmp{dead}").write_text("epoch_00")
    import os
    live = ck / f"epoch_0009.tmp{os.getppid()}"                 # a writer still running: left alone
    live.mkdir()
    run(small_params(tmp_path / "k", num_epochs=2, resume=True, eval_prompts=""), policy=tiny_policy(),
        reward_fn=brightness_reward)
    assert not (ck / f"epoch_0002.tmp{dead}").exists() and not (ck / f"latest.tmp{dead}").exists()
    assert live.is_dir()
    events = (tmp_path / "k" / "events.log").read_text()
    assert f"removed epoch_0002.tmp{dead}, left by a killed checkpoint write" in events
    assert (ck / "latest").read_text() == "epoch_0002"


# -- defect 4: nothing is unpickled ---------------------------------------------------------------------------

def test_no_torch_load_without_weights_only_in_the_package():
    """Every torch.load call in grpo_lib passes weights_only=True (a literal), and only checkpoints.py calls it."""
    calls = []
    for path in sorted((REPO / "grpo_lib").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load" \
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch":
                kw = {k.arg: k.value for k in node.keywords}
                ok = isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True
                calls.append((path.name, node.lineno, ok))
    assert calls and all(ok for _, _, ok in calls), calls
    assert {name for name, _, _ in calls} == {"checkpoints.py"}


def test_trainer_state_loads_with_weights_only_and_pickles_are_refused(tmp_path):
    p = small_params(tmp_path / "s", num_epochs=1, eval_prompts="", ema_decay=0.9)
    run(p, policy=tiny_policy(), reward_fn=brightness_reward)
    state = torch.load(tmp_path / "s" / "checkpoints" / "epoch_0001" / checkpoints.TRAINER_STATE, weights_only=True)
    assert state["epoch"] == 1 and isinstance(state["numpy_rng"]["key"], torch.Tensor)
    assert isinstance(state["torch_rng"], torch.Tensor) and len(state["ema"]["shadow"]) == len(state["trainable"])
    # a file holding a pickled object is refused with the file's name, and nothing of it runs
    evil = tmp_path / "evil.pt"
    torch.save({"x": np.random.RandomState(0)}, evil)
    with pytest.raises(checkpoints.CheckpointError, match="evil.pt cannot be read with weights_only=True"):
        checkpoints.load_state(evil)
    with pytest.raises(ValueError, match=r"state\['x'\] is a RandomState"):
        checkpoints.save_state({"x": np.random.RandomState(0)}, tmp_path / "no.pt")


def test_shipped_base_is_safetensors_and_json_only():
    """data/checkpoints/tiny-base holds no pickle: weights in safetensors, config in JSON (its model card says so)."""
    from safetensors.torch import load_file

    from grpo_lib.policies.tiny import TinyPolicy

    base = REPO / "data" / "checkpoints" / "tiny-base"
    files = sorted(f.relative_to(base).as_posix() for f in base.rglob("*") if f.is_file())
    assert {Path(f).suffix for f in files} <= {".safetensors", ".json", ".md", ".png"}, files
    policy = TinyPolicy.from_pretrained(base)
    unet = load_file(str(base / "unet" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(policy.unet.state_dict()[k], v) for k, v in unet.items())
    assert "safetensors" in (base / "README.md").read_text()


# -- the module's own pieces ----------------------------------------------------------------------------------

def test_seeded_init_gives_every_caller_the_same_adapter_and_leaves_the_global_stream(tmp_path):
    from grpo_lib.cold_start import ColdStartParams, build_policy
    from grpo_lib.train import load_policy_for

    tiny_base().save_pretrained(tmp_path / "base")
    g = small_params(tmp_path / "g", model=str(tmp_path / "base"), lora_rank=4, lora_alpha=4)
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = load_policy_for(g, "cpu")
    assert torch.equal(torch.rand(1), before)                 # the caller's stream is untouched
    b = load_policy_for(g, "cpu")
    assert torch.equal(_flat(a), _flat(b))
    c = build_policy(ColdStartParams(run_dir=str(tmp_path / "c"), model=str(tmp_path / "base"), lora_rank=4,
                                     lora_alpha=4), "cpu")
    assert not torch.equal(_flat(a), _flat(c))                # its own stream: cold start and GRPO adapters differ


def test_atomic_save_dir_leaves_nothing_behind_on_error(tmp_path):
    final = tmp_path / "x"
    checkpoints.atomic_save_dir(lambda d: (d / "a").write_text("1"), final)

    def broken(d):
        (d / "a").write_text("2")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        checkpoints.atomic_save_dir(broken, final)
    assert (final / "a").read_text() == "1" and sorted(p.name for p in tmp_path.iterdir()) == ["x"]


def test_checkpoint_params_json_names_the_base_and_cold_start(ema_run):
    root, p = ema_run
    own = json.loads((root / "run" / "checkpoints" / "epoch_0002" / checkpoints.PARAMS_JSON).read_text())
    assert own["model"] == p.model and own["cold_start_lora"] == p.cold_start_lora
    assert checkpoints.grpo_recipe(root / "run" / "checkpoints" / "epoch_0002" / "lora", "unused") == \
        checkpoints.Recipe(Path(p.model), (Path(p.cold_start_lora),), root / "run" / "checkpoints" / "epoch_0002" / "lora")


def test_a_cold_start_lora_sits_on_the_model_it_was_trained_on(tmp_path):
    """grpo_recipe (widget, infer): a cold start's lora/ sits on its summary.json's model; without one, or for
    a LoRA outside a cold start, on the default base."""
    cs = tmp_path / "run" / "cold_start"
    (cs / "lora").mkdir(parents=True)
    assert checkpoints.grpo_recipe(cs / "lora", tmp_path / "base") == checkpoints.Recipe(tmp_path / "base", (), cs / "lora")
    (cs / "summary.json").write_text(json.dumps({"params": {"model": str(tmp_path / "other" / "merged")}}))
    assert checkpoints.grpo_recipe(cs / "lora", tmp_path / "base") == \
        checkpoints.Recipe(tmp_path / "other" / "merged", (), cs / "lora")
    (cs / "summary.json").write_text("{not json")
    assert checkpoints.grpo_recipe(cs / "lora", tmp_path / "base").base == tmp_path / "base"


def test_check_recipe_names_the_stage_and_the_missing_file_before_any_sampling(tmp_path):
    """study compare builds many recipes; a missing LoRA must stop it before the first image, not at its last stage."""
    from grpo_lib.study import split_tables

    tiny_base().save_pretrained(tmp_path / "base")
    tiny_policy().save_lora(tmp_path / "lora")
    (tmp_path / "empty").mkdir()
    checkpoints.check_recipe(checkpoints.Recipe(tmp_path / "base", (tmp_path / "lora",), tmp_path / "lora"))
    with pytest.raises(ValueError, match=r"^nope: base '.*nobase' holds no tiny_policy.json$"):
        checkpoints.check_recipe(checkpoints.Recipe(tmp_path / "nobase"), "nope")
    with pytest.raises(ValueError, match=r"^late: LoRA '.*empty' holds no lora.safetensors / lora_config.json$"):
        split_tables({"fine": checkpoints.Recipe(tmp_path / "base"),
                      "late": checkpoints.Recipe(tmp_path / "base", lora=tmp_path / "empty")}, split="val")


def test_recipe_takes_str_paths_and_refuses_a_bare_merge_path():
    """A notebook passes str paths: the recipe holds them as Path (load_policy reads ``lora.name``); a bare
    path as ``merges`` would be iterated letter by letter, so it is an error naming it."""
    from pathlib import Path

    from grpo_lib.checkpoints import Recipe

    r = Recipe(base="data/checkpoints/tiny-base", merges=["runs/a/lora"], lora="runs/b/lora")
    assert r == Recipe(base=Path("data/checkpoints/tiny-base"), merges=(Path("runs/a/lora"),),
                       lora=Path("runs/b/lora"))
    assert Recipe(base="x").lora is None
    with pytest.raises(ValueError, match=r"merges='runs/a/lora' must be a sequence of LoRA dirs"):
        Recipe(base="x", merges="runs/a/lora")
