"""The inference preview driven headless: set widget values, click, read images / counts / messages."""
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from grpo_lib.widgets import (BASE_CHECKPOINT, REPO, InferencePreview, PreviewParams, Recipe, list_checkpoints,
                              resolve_checkpoint)

BASE = REPO / BASE_CHECKPOINT


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory):
    """A LoRA on the shipped base with non-zero lora_B (so it changes the images)."""
    from grpo_lib.policies.tiny import TinyPolicy

    torch.manual_seed(0)
    policy = TinyPolicy.from_pretrained(BASE)
    policy.add_lora({"r": 4, "lora_alpha": 4})
    with torch.no_grad():
        for n, p in policy.unet.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    return policy.save_lora(tmp_path_factory.mktemp("lora") / "lora")


@pytest.fixture(scope="module")
def preview(tmp_path_factory):
    torch.set_num_threads(1)
    run_dir = tmp_path_factory.mktemp("preview_run")
    return InferencePreview(PreviewParams(run_dir=str(run_dir), runs_root=str(run_dir / "runs"), num_images=3,
                                          num_steps=4, guidance_scale=3.0))


def _png_size(png: bytes) -> tuple[int, int]:
    from PIL import Image
    return Image.open(io.BytesIO(png)).size


def _base_images(prompt, n, steps, seed=0, g=3.0):
    """The same images straight from the rollout: image k from torch.Generator().manual_seed(seed + k)."""
    from grpo_lib.policies.tiny import TinyPolicy
    from grpo_lib.rollout import sample_images

    policy = TinyPolicy.from_pretrained(BASE)
    gens = [torch.Generator().manual_seed(seed + k) for k in range(n)]
    return sample_images(policy, [prompt] * n, num_steps=steps, shift=1.0, guidance_scale=g, generator=gens)[1]


def test_class_and_count_fill_the_prompt_and_generate_counts(preview):
    from grpo_lib.rewards.detector import ShapeCounter

    preview.cls.value = "blue square"
    preview.count.value = 2
    assert preview.prompt.value == "a photo of two blue squares"
    preview.compare.value = False
    preview.noise_level.value = 0.0
    preview.button.click()
    assert list(preview.last_images) == [BASE_CHECKPOINT]
    images = preview.last_images[BASE_CHECKPOINT]
    assert images.shape == (3, 32, 32, 3) and images.dtype == np.uint8
    np.testing.assert_array_equal(images, _base_images("a photo of two blue squares", 3, 4))
    table = preview.last_tables[BASE_CHECKPOINT]
    found = ShapeCounter().count(images, ["blue square"] * 3, [2] * 3)
    assert table["found"].tolist() == found.tolist() and table["target"].tolist() == [2, 2, 2]
    assert table["correct"].tolist() == [f == 2 for f in found]
    assert preview.progress.value == preview.progress.max == 4           # one tick per sampling step
    pngs = [o for o in preview.output.outputs if "image/png" in o.get("data", {})]
    assert len(pngs) == 1
    w, h = _png_size(preview.last_pngs[BASE_CHECKPOINT])
    assert w >= 3 * 128 and h >= 128                                      # 32 px cells shown at >= 128 px
    msg = preview.messages[-1]
    assert msg.startswith("target 2 blue square -> ") and f"found {found.tolist()}" in msg
    assert f"{int((found == 2).sum())}/3 exact" in msg
    saved = json.loads((Path(preview.params.run_dir) / "preview" / "results.json").read_text())
    assert saved["grids"][BASE_CHECKPOINT]["found"] == found.tolist()


def test_compare_mode_two_grids_on_the_same_seeds(preview, lora_dir):
    preview.cls.value = preview.CUSTOM
    preview.prompt.value = "a photo of three red circles"
    preview.checkpoint.value = BASE_CHECKPOINT
    preview.compare.value = True
    preview.compare_checkpoint.value = str(lora_dir)
    assert preview.generate() is True
    assert list(preview.last_images) == [BASE_CHECKPOINT, str(lora_dir)]
    a, b = preview.last_images.values()
    np.testing.assert_array_equal(a, _base_images("a photo of three red circles", 3, 4))
    assert a.shape == b.shape == (3, 32, 32, 3) and not np.array_equal(a, b)
    assert preview.progress.value == preview.progress.max == 8
    assert len([o for o in preview.output.outputs if "image/png" in o.get("data", {})]) == 2
    assert all(len(t) == 3 for t in preview.last_tables.values())
    assert "; " + str(lora_dir) + ": found " in preview.messages[-1]


def test_noise_level_samples_with_the_sde_step(preview):
    from grpo_lib.policies.tiny import TinyPolicy
    from grpo_lib.rollout import sample_trajectories

    preview.compare.value = False
    preview.prompt.value = "a photo of three red circles"
    preview.noise_level.value = 0.7
    assert preview.generate()
    sde = preview.last_images[BASE_CHECKPOINT]
    gens = [torch.Generator().manual_seed(k) for k in range(3)]
    want = sample_trajectories(TinyPolicy.from_pretrained(BASE), ["a photo of three red circles"] * 3, num_steps=4,
                               shift=1.0, guidance_scale=3.0, noise_level=0.7, generator=gens).images
    np.testing.assert_array_equal(sde, want)
    assert not np.array_equal(sde, _base_images("a photo of three red circles", 3, 4))
    preview.noise_level.value = 0.0


def test_bad_input_gives_messages_not_tracebacks(preview, tmp_path):
    preview.compare.value = False
    preview.checkpoint.value = BASE_CHECKPOINT
    preview.prompt.value = "   "
    assert preview.generate() is False
    assert preview.messages[-1] == "error: the prompt is empty: type one, or pick a class and a count"
    assert preview.last_images == {} and preview.output.outputs[-1]["text"] == preview.messages[-1] + "\n"

    preview.prompt.value = "a photo of two red circles"
    preview.checkpoint.value = str(tmp_path / "missing")
    assert preview.generate() is False
    assert preview.messages[-1] == f"error: checkpoint: {str(tmp_path / 'missing')!r} does not exist"

    bad = tmp_path / "bad_lora"
    bad.mkdir()
    (bad / "lora.safetensors").write_bytes(b"not a tensor file")
    (bad / "lora_config.json").write_text('{"r": 4}')
    preview.checkpoint.value = str(bad)
    assert preview.generate() is False
    assert "is not a safetensors file" in preview.messages[-1] and preview.last_images == {}

    preview.checkpoint.value = BASE_CHECKPOINT
    preview.compare.value = True
    preview.compare_checkpoint.value = ""
    assert preview.generate() is False
    assert preview.messages[-1] == "error: compare is on but no second checkpoint is given"
    preview.compare.value = False

    preview.prompt.value = "zebra giraffe"
    assert preview.generate() is False
    assert "no word of the embedded world's vocabulary" in preview.messages[-1]
    assert "<span style=\"color:crimson\">" in preview.status.value


def test_checkpoint_listing_and_grpo_recipe_on_top_of_the_cold_start(tmp_path, lora_dir):
    runs = tmp_path / "runs"
    cs, ep = runs / "r1" / "cold_start" / "lora", runs / "r1" / "checkpoints" / "epoch_0002" / "lora"
    for d in (cs, ep):
        shutil.copytree(lora_dir, d)
    (runs / "r1" / "checkpoints" / "epoch_0003").mkdir()             # no lora/: not listed
    assert list_checkpoints(runs) == [BASE_CHECKPOINT, str(cs.parent.parent / "cold_start" / "lora"),
                                      str(ep.parent)]
    assert resolve_checkpoint(str(cs)) == Recipe(base=BASE, lora=cs)
    # the GRPO LoRA was trained on the cold start: fold that in first
    assert resolve_checkpoint(str(ep.parent)) == Recipe(base=BASE, merges=(cs,), lora=ep)
    # summary.json params (what the run really started from) win over the folder layout
    (runs / "r1" / "summary.json").write_text(json.dumps({"params": {"model": str(BASE), "cold_start_lora": ""}}))
    assert resolve_checkpoint(str(ep.parent)) == Recipe(base=BASE, lora=ep)
    assert resolve_checkpoint(BASE_CHECKPOINT) == Recipe(base=BASE)
    assert resolve_checkpoint("none") == Recipe(base=BASE)


def test_notebook_smoke_stores_widget_state_with_the_images(run_notebook):
    executed, run_dir = run_notebook("04_inference_preview")
    nb = json.loads(executed.read_text())
    state = nb["metadata"]["widgets"]["application/vnd.jupyter.widget-state+json"]["state"]
    outputs = [m["state"].get("outputs", []) for m in state.values() if m["model_name"] == "OutputModel"]
    pngs = [o for outs in outputs for o in outs if "image/png" in o.get("data", {})]
    assert len(pngs) == 1                                        # the grid inside the saved widget
    # the widget view is an output of the cell, so the HTML export renders it from the stored state
    views = [o for c in nb["cells"] for o in c.get("outputs", [])
             if "application/vnd.jupyter.widget-view+json" in o.get("data", {})]
    assert len(views) == 1 and views[0]["data"]["application/vnd.jupyter.widget-view+json"]["model_id"] in state
    res = json.loads((run_dir / "preview" / "results.json").read_text())
    assert res["target"] == {"class": "blue square", "count": 3} and len(res["grids"][BASE_CHECKPOINT]["found"]) == 2


def test_recipe_merges_before_attaching(lora_dir):
    """A GRPO recipe folds the cold-start LoRA in first: merged == attached (same velocity), and the LoRA on
    top of it is a second, separate adapter."""
    from grpo_lib.widgets import load_policy

    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.7, 0.3])

    def v(policy):
        with torch.no_grad():
            return policy.velocity(x, t, policy.encode(["two red circles", "five blue squares"]), 1.0)

    merged, attached = load_policy(Recipe(base=BASE, merges=(lora_dir,))), load_policy(Recipe(base=BASE, lora=lora_dir))
    base = load_policy(Recipe(base=BASE))
    assert not merged.has_lora and attached.has_lora
    torch.testing.assert_close(v(merged), v(attached), atol=1e-4, rtol=1e-4)
    assert (v(merged) - v(base)).abs().max() > 1e-2
    both = load_policy(Recipe(base=BASE, merges=(lora_dir,), lora=lora_dir))
    assert both.has_lora and (v(both) - v(merged)).abs().max() > 1e-2
