"""Counting rewards on images with known counts, degenerate images that game a plain count,
weighted sums from the registry, and input checks."""
import math

import numpy as np
import pytest

from grpo_lib.rewards import available_rewards, build_reward
from grpo_lib.rewards.counting import CountingShaped, measure_counting
from grpo_lib.rewards.degrade import degrade
from grpo_lib.prompts import counting_row
from grpo_lib.scenes import BACKGROUND, COLORS, render_scene

ALL = {"counting_strict": 1.0, "counting_partial": 1.0, "counting_shaped": 1.0}


def _score(images, rows, weights=None):
    images = np.stack(images) if isinstance(images, list) else images
    return build_reward(weights or ALL)(images, [r["prompt"] for r in rows], rows)


def test_rewards_on_renders_with_known_counts():
    # images with 4, 3, 5, 4 (degraded) red circles and one with 16 -- all prompts ask for 4, the last for 1
    imgs = [render_scene(4, "circle", "red", seed=1).image, render_scene(3, "circle", "red", seed=2).image,
            render_scene(5, "circle", "red", seed=3).image, degrade(4, "circle", "red", seed=4).image,
            render_scene(16, "circle", "red", seed=5).image]
    rows = [counting_row("red circle", 4)] * 4 + [counting_row("red circle", 1)]
    _, info = _score(imgs, rows)
    np.testing.assert_array_equal(info["count"], [4, 3, 5, 4, 16])
    np.testing.assert_array_equal(info["target"], [4, 4, 4, 4, 1])
    np.testing.assert_array_equal(info["error"], [0, -1, 1, 0, 15])
    np.testing.assert_array_equal(info["reward/counting_strict"], [1, 0, 0, 1, 0])
    np.testing.assert_array_equal(info["correct"], [1, 0, 0, 1, 0])
    # GenEval partial credit 1 - |N - n| / N; upstream would give 1 - 15/1 = -14 for the last, clipped to 0
    np.testing.assert_allclose(info["reward/counting_partial"], [1, 0.75, 0.75, 1, 0])
    # valid images pass the quality gate, so the shaped reward is the count credit exp(-|n - N|)
    assert np.all(info["quality"][:4] > 0.95)
    np.testing.assert_allclose(info["reward/counting_shaped"][:4] / info["quality"][:4],
                               [1, math.exp(-1), math.exp(-1), 1], rtol=1e-6)
    assert np.all(info["confidence"][:4] > 0.95)
    np.testing.assert_array_equal(info["background_fidelity"][[0, 1, 2, 4]], 1.0)
    assert info["background_fidelity"][3] > 0.99                       # blurred, noisy, colour-shifted


def test_reward_types_and_weighted_sum():
    imgs = [render_scene(n, "square", "cyan", seed=n).image for n in (2, 3)]
    rows = [counting_row("cyan square", 2), counting_row("cyan square", 2)]
    r, info = _score(imgs, rows, {"counting_strict": 1.0, "counting_shaped": 0.5})
    assert r.dtype == np.float32 and r.shape == (2,)
    np.testing.assert_allclose(r, info["reward/counting_strict"] + 0.5 * info["reward/counting_shaped"], rtol=1e-6)
    for k, v in info.items():
        assert isinstance(v, np.ndarray) and v.shape == (2,), k
    single, single_info = build_reward("counting_partial")(np.stack(imgs), [x["prompt"] for x in rows], rows)
    np.testing.assert_allclose(single, [1.0, 0.5])
    assert set(single_info) >= {"count", "correct", "confidence", "quality", "reward/counting_partial"}
    direct, direct_info = CountingShaped(tau=2.0)(np.stack(imgs), [x["prompt"] for x in rows], rows)
    np.testing.assert_allclose(direct, direct_info["quality"] * np.exp(-np.array([0, 1]) / 2.0), rtol=1e-6)
    via_options = build_reward({"counting_shaped": 1.0}, options={"counting_shaped": {"tau": 2.0}})
    np.testing.assert_allclose(via_options(np.stack(imgs), [x["prompt"] for x in rows], rows)[0], direct)


def test_shaped_reward_is_not_fooled_by_degenerate_images():
    """The hacks a plain count reward allowed: teal background, specks, squares drawn for circles."""
    row = counting_row("red circle", 4)
    good = render_scene(4, "circle", "red", seed=1).image
    bg = np.all(good == np.array(BACKGROUND, np.uint8), -1)
    teal = good.copy()
    teal[bg] = (40, 140, 140)
    specks = good.copy()
    free = np.argwhere(bg)                                             # background pixels
    rng = np.random.default_rng(0)
    placed = 0
    for y, x in free[rng.permutation(len(free))]:
        if 1 <= y < 31 and 1 <= x < 31 and bg[y - 1:y + 2, x - 1:x + 2].all() and placed < 10:
            specks[y, x] = COLORS["red"]
            bg[y - 1:y + 2, x - 1:x + 2] = False                       # keep specks apart
            placed += 1
    squares = render_scene(4, "square", "red", seed=1).image
    patterned = squares.copy()
    yy, xx = np.mgrid[0:32, 0:32]
    fg = ~np.all(squares == np.array(BACKGROUND, np.uint8), -1)
    patterned[fg & ((yy + xx) % 2 == 0)] = (250, 250, 250)
    imgs = [good, teal, specks, squares, patterned]
    _, info = _score(imgs, [row] * 5)
    # a plain count is fooled by all of them ...
    np.testing.assert_array_equal(info["count"], [4, 4, 4, 4, 4])
    np.testing.assert_array_equal(info["reward/counting_strict"], [1, 1, 1, 1, 1])
    # ... the shaped reward is not, and info says why
    shaped = info["reward/counting_shaped"]
    assert shaped[0] > 0.95
    assert shaped[1] < 0.05 and info["background_fidelity"][1] < 0.2
    assert shaped[2] < 0.35 and info["n_specks"][2] == 10 and info["area_quality"][2] < 0.35
    assert shaped[3] < 0.05 and info["shape_match"][3] < 0.1
    assert shaped[4] < 0.05
    assert np.all(shaped[1:] < shaped[0] / 3)


def test_measure_counting_zero_target_and_noise():
    noise = np.random.default_rng(0).integers(0, 256, (1, 32, 32, 3)).astype(np.uint8)
    empty = np.empty((1, 32, 32, 3), np.uint8)
    empty[:] = BACKGROUND
    row0 = {"tag": "counting", "include": [{"class": "red circle", "count": 0}], "prompt": "no red circles"}
    r, info = build_reward(ALL)(np.concatenate([empty, noise]), ["no red circles"] * 2, [row0, row0])
    np.testing.assert_array_equal(info["count"], [0, 0])
    np.testing.assert_allclose(info["reward/counting_partial"], [1, 1])      # N = 0: credit 1[n == 0]
    assert info["reward/counting_shaped"][0] == pytest.approx(1.0)
    assert info["reward/counting_shaped"][1] < 0.05                           # noise fails the gate


def test_registry_errors():
    with pytest.raises(ValueError, match=r"unknown reward\(s\) \['counting_fuzzy'\].*counting_partial"):
        build_reward({"counting_fuzzy": 1.0})
    with pytest.raises(ValueError, match="non-empty"):
        build_reward({})
    with pytest.raises(ValueError, match="finite"):
        build_reward({"counting_strict": float("nan")})
    with pytest.raises(ValueError, match="not in the weights"):
        build_reward({"counting_strict": 1.0}, options={"counting_shaped": {"tau": 2.0}})
    with pytest.raises(ValueError, match="bad options"):
        build_reward({"counting_shaped": 1.0}, options={"counting_shaped": {"sigma": 2.0}})
    with pytest.raises(ValueError, match="tau"):
        build_reward({"counting_shaped": 1.0}, options={"counting_shaped": {"tau": 0.0}})
    assert available_rewards() == ["counting_partial", "counting_shaped", "counting_strict"]


_IMG = render_scene(2, "circle", "red", seed=0).image[None]
_ROW = counting_row("red circle", 2)


@pytest.mark.parametrize("images, prompts, metadata, match", [
    (_IMG.astype(np.float32), [_ROW["prompt"]], [_ROW], "dtype"),
    (_IMG[0], [_ROW["prompt"]], [_ROW], "shape"),
    (_IMG, [_ROW["prompt"]], [{"tag": "counting", "prompt": _ROW["prompt"]}], "include"),
    (_IMG, [_ROW["prompt"]], [{"include": [{"class": "pink circle", "count": 2}]}], "pink"),
    (_IMG, [_ROW["prompt"]], [{"include": [{"class": "red circle", "count": 2.5}]}], "count=2.5"),
    (_IMG[:0], [], [], "empty batch"),
    (_IMG, [_ROW["prompt"], "x"], [_ROW], "length mismatch"),
    (np.concatenate([_IMG, _IMG]), [_ROW["prompt"]] * 2, [_ROW], "length mismatch"),
    (_IMG, ["a photo of three red circles"], [_ROW], "differs"),
    (_IMG, _ROW["prompt"], [_ROW], "list of 1 strings"),
    (_IMG, [_ROW["prompt"]], _ROW, "list of 1 GenEval rows"),
])
def test_bad_input(images, prompts, metadata, match):
    for fn in (build_reward(ALL), lambda *a: measure_counting(*a)):
        with pytest.raises(ValueError, match=match):
            fn(images, prompts, metadata)
