"""The embedded world's renderer and prompt sets: determinism, geometry, GenEval rows."""
import json

import numpy as np
import pytest

from grpo_lib import scenes
from grpo_lib.prompts import build_prompt_sets, counting_row, row_target
from grpo_lib.scenes import BACKGROUND, COLORS, SHAPES, ExactCountDataset, WebCaptionDataset, render_scene


@pytest.mark.parametrize("count", [1, 5, 10, 15, 20])
@pytest.mark.parametrize("shape", SHAPES)
def test_render_counts_and_no_overlap(count, shape):
    s = render_scene(count, shape, "red", seed=count * 7)
    assert s.image.shape == (32, 32, 3) and s.image.dtype == np.uint8
    assert s.boxes.shape == (count, 4)
    assert np.all(s.boxes[:, 2] >= s.boxes[:, 0]) and np.all(s.boxes[:, :2] >= 0) and np.all(s.boxes[:, 2:] <= 31)


def test_objects_are_separated_by_background():
    from scipy import ndimage
    for seed in range(30):
        count = 1 + seed % 10
        s = render_scene(count, SHAPES[seed % 3], "blue", seed=seed)
        fg = np.any(s.image != np.array(BACKGROUND, np.uint8), axis=-1)
        _, n = ndimage.label(fg, structure=np.ones((3, 3)))   # 8-connectivity: touching counts as one
        assert n == count


def test_deterministic_and_seed_dependent():
    a = render_scene(4, "circle", "green", seed=3)
    b = render_scene(4, "circle", "green", seed=3)
    c = render_scene(4, "circle", "green", seed=4)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.boxes, b.boxes)
    assert not np.array_equal(a.image, c.image)


def test_colour_jitter_is_mild_and_background_noise_optional():
    s = render_scene(3, "square", "yellow", seed=1)
    fg = np.any(s.image != np.array(BACKGROUND, np.uint8), axis=-1)
    assert np.abs(s.image[fg].astype(int) - np.array(COLORS["yellow"])).max() <= scenes.COLOR_JITTER
    assert np.all(s.image[~fg] == np.array(BACKGROUND, np.uint8))
    n = render_scene(3, "square", "yellow", seed=1, background_noise=3.0)
    assert 0.5 < np.abs(n.image[~fg].astype(float) - BACKGROUND).mean() < 5


@pytest.mark.parametrize("kwargs, match", [
    (dict(count=3, shape="hexagon", color="red"), "hexagon"),
    (dict(count=3, shape="circle", color="pink"), "pink"),
    (dict(count=21, shape="circle", color="red"), "21"),
    (dict(count=-1, shape="circle", color="red"), "-1"),
])
def test_render_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        render_scene(**kwargs, seed=0)


def test_prompt_sets_shipped_match_generator(repo):
    built = build_prompt_sets()
    for name, rows in built.items():
        shipped = [json.loads(l) for l in (repo / "data" / "counting" / f"{name}.jsonl").read_text().splitlines()]
        assert shipped == rows, f"data/counting/{name}.jsonl is stale: rerun python -m grpo_lib.prompts --write-prompts data/counting"


def test_prompt_sets_split_and_format():
    sets = build_prompt_sets()
    train_prompts = {r["prompt"] for r in sets["train"]}
    test_prompts = {r["prompt"] for r in sets["test"]}
    val_prompts = {r["prompt"] for r in sets["val"]}
    assert not train_prompts & test_prompts
    assert not val_prompts & (train_prompts | test_prompts)          # val: prompts of its own
    assert len(sets["val"]) == 210 and {row_target(r)[0] for r in sets["val"]} == set(scenes.VAL_CLASSES)
    assert {n: sum(row_target(r)[1] == n for r in sets["val"]) for n in range(1, 11)} == {n: 21 for n in range(1, 11)}
    # every shape is validated, so a choice made on val sees a shape the model forgets
    assert {row_target(r)[0].split()[1] for r in sets["val"]} == set(scenes.SHAPES)
    train_classes = {row_target(r)[0] for r in sets["train"]}
    assert not train_classes & (set(scenes.HELDOUT_CLASSES) | set(scenes.VAL_CLASSES))
    assert not any(scenes.HELDOUT_TEMPLATE.split("{n}")[0] in p for p in train_prompts)
    per_count = {n: sum(row_target(r)[1] == n for r in sets["test"]) for n in range(1, 11)}
    assert min(per_count.values()) * 4 >= 200, per_count     # 4 images/prompt -> >= 200 per bucket
    assert sets["train_counts_1_7"] == [r for r in sets["train"] if row_target(r)[1] <= 7]
    assert len(sets["train_counts_1_7"]) == 7 * len(sets["train"]) // 10
    r = sets["train"][0]
    assert r["tag"] == "counting" and r["exclude"][0]["count"] == r["include"][0]["count"] + 1
    assert counting_row("red circle", 4)["prompt"] == "a photo of four red circles"
    assert counting_row("red circle", 1)["prompt"] == "a photo of one red circle"


def test_web_captions_hide_counts_above_three():
    ds = WebCaptionDataset(400, seed=0)
    words = set(scenes.NUMBER_WORDS)
    for i in range(400):
        item = ds[i]
        said = words & set(item["prompt"].split())
        if item["count"] <= 3:
            assert said == {scenes.number_word(item["count"])}
        else:
            assert not said, item
        assert set(item["prompt"].split()) <= set(scenes.scene_vocabulary())
    assert item["pixels"].shape == (3, 32, 32) and -1 <= item["pixels"].min() and item["pixels"].max() <= 1


def test_exact_count_dataset_matches_its_rows():
    rows = build_prompt_sets()["train"][:50]
    ds = ExactCountDataset(rows, length=20, seed=1)
    by_prompt = {r["prompt"]: row_target(r) for r in rows}
    for i in range(20):
        it = ds[i]
        assert by_prompt[it["prompt"]] == (it["cls"], it["count"])
    with pytest.raises(ValueError, match="include"):
        ExactCountDataset([{"prompt": "x"}], length=1)
