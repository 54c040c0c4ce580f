"""ShapeCounter: exact counts on clean and generated-like renders, the speck / half-object rule,
shape and background measures, and input checks. Figures at full scale: bench/detector.py."""
import numpy as np
import pytest

from grpo_lib.rewards.degrade import degrade
from grpo_lib.rewards.detector import (AREA_TABLE, ShapeCounter, area_quality, area_reference,
                                       completeness_score, measure_area_table)
from grpo_lib.scenes import BACKGROUND, COLORS, MAX_COUNT, SHAPES, all_classes, render_scene


def _sample(n_images, seed0, degraded):
    """Images spread over all 18 classes and counts 1..20 (deterministic)."""
    rng = np.random.default_rng(seed0)
    classes = all_classes()
    imgs, cls, counts = [], [], []
    for k in range(n_images):
        c = classes[k % len(classes)]
        n = int(rng.integers(1, MAX_COUNT + 1))
        color, shape = c.split()
        s = degrade(n, shape, color, seed=seed0 + k) if degraded else render_scene(n, shape, color, seed=seed0 + k)
        imgs.append(s.image); cls.append(c); counts.append(n)
    return np.stack(imgs), cls, counts


def _blank(size=32):
    img = np.empty((size, size, 3), np.uint8)
    img[:] = BACKGROUND
    return img


def _disc(img, cx, cy, r, color):
    yy, xx = np.mgrid[0:img.shape[0], 0:img.shape[1]] + 0.5
    img[(xx - cx) ** 2 + (yy - cy) ** 2 <= r * r] = COLORS[color]
    return img


def test_accuracy_clean_renders():
    imgs, cls, counts = _sample(300, 10_000, degraded=False)
    found = ShapeCounter().count(imgs, cls, counts)
    acc = float(np.mean(found == np.array(counts)))
    assert acc >= 0.995, f"clean exact-count accuracy {acc:.4f} < 0.995"


def test_accuracy_degraded_renders():
    imgs, cls, counts = _sample(300, 20_000, degraded=True)
    found = ShapeCounter().count(imgs, cls, counts)
    acc = float(np.mean(found == np.array(counts)))
    assert acc >= 0.97, f"degraded exact-count accuracy {acc:.4f} < 0.97"


def test_degrade_reproduces_renderer_and_makes_touching_pairs():
    # with every degradation off, degrade draws exactly render_scene's scene (same private helpers)
    for k, shape in enumerate(SHAPES):
        a = degrade(7, shape, "green", seed=k, touching_pairs=0, color_shift=0, blur_sigma=(0, 0), noise_std=(0, 0))
        b = render_scene(7, shape, "green", seed=k)
        assert np.array_equal(a.image, b.image) and np.array_equal(a.boxes, b.boxes)
    from scipy import ndimage
    s = degrade(6, "circle", "red", seed=3, touching_pairs=1, color_shift=0, blur_sigma=(0, 0), noise_std=(0, 0))
    assert s.touching == 1 and s.masks.shape == (6, 32, 32)
    assert s.masks.sum(0).max() == 1                                  # objects never share a pixel
    _, n_blobs = ndimage.label(s.masks.any(0))                        # 8-conn: the pair merges
    assert n_blobs == 5
    assert ShapeCounter().count(s.image[None], ["red circle"], [6])[0] == 6


def test_two_touching_discs_are_two_and_one_disc_is_one():
    det = ShapeCounter()
    img = _disc(_disc(_blank(), 10.0, 16.0, 3.0, "blue"), 16.0, 16.0, 3.0, "blue")   # centres 6 px apart
    assert det.count(img[None], ["blue circle"], [2])[0] == 2
    assert det.count(_disc(_blank(), 16, 16, 3.4, "blue")[None], ["blue circle"], [1])[0] == 1


def test_speck_and_half_object_rule():
    """Counted iff soft area > 40 % of A_ref (1st-percentile area for the shape at that count)."""
    det = ShapeCounter()
    a_ref = area_reference("circle", 1)[0]
    assert a_ref == AREA_TABLE["circle"][0][0] == 20
    def blob(n_px):                            # n_px exact-colour pixels: a 3x3 block, minus a corner for 8
        img = _blank()
        img[10:13, 10:13] = COLORS["red"]
        if n_px == 8:
            img[10, 10] = BACKGROUND
        return img
    d9 = det.detect(blob(9)[None], ["red circle"], [1])[0]          # 9 / 20 = 0.45 > 0.4
    d8 = det.detect(blob(8)[None], ["red circle"], [1])[0]          # 8 / 20 = 0.40, not above
    assert d9.count == 1 and d8.count == 0
    assert d9.areas[0] == pytest.approx(9.0, abs=1e-3)
    assert d8.scores[0] == pytest.approx(0.9, abs=1e-6) and d9.scores[0] > 0.9
    # a disc with a speck beside it; then the disc cut in half (half-drawn) still counts
    img = _disc(_blank(), 16, 16, 3.0, "red")
    img[3, 3] = COLORS["red"]
    assert det.count(img[None], ["red circle"], [1])[0] == 1
    img[:, 16:] = BACKGROUND
    assert det.count(img[None], ["red circle"], [1])[0] == 1
    # at count 20 the renderer draws 2-px triangles, so there a 2-px blob is an object
    tri = _blank()
    tri[5, 5:7] = COLORS["yellow"]
    assert det.count(tri[None], ["yellow triangle"], [20])[0] == 1
    assert det.count(tri[None], ["yellow triangle"], [3])[0] == 0


def test_completeness_score_and_area_quality_values():
    np.testing.assert_allclose(completeness_score(np.array([0.0, 0.2, 0.4, 0.7, 1.0, 3.0])),
                               [0.0, 0.45, 0.9, 0.95, 1.0, 1.0])
    lo, _, hi = area_reference("circle", 3)                            # (19, 28, 41)
    q = area_quality(np.array([0.4 * lo, 0.8 * lo, 30.0, 1.25 * hi, 2 * hi]), "circle", 3)
    np.testing.assert_allclose(q, [0.0, 1.0, 1.0, 1.0, 0.0], atol=1e-9)


def test_area_table_matches_renderer():
    """A fresh sample of the renderer (other seeds) falls inside the shipped AREA_TABLE's range."""
    from grpo_lib.rewards.degrade import degrade as render
    for shape in SHAPES:
        for n in (1, 10, 20):
            areas = np.concatenate([render(n, shape, "red", seed=777 + s, touching_pairs=0, color_shift=0,
                                           blur_sigma=(0, 0), noise_std=(0, 0)).masks.sum((1, 2))
                                    for s in range(8)])
            p1, med, mx = AREA_TABLE[shape][n - 1]
            inside = np.mean((areas >= p1) & (areas <= mx))
            assert inside >= 0.95 and p1 <= np.median(areas) <= mx, (shape, n, inside, np.median(areas))
    small = measure_area_table(n_scenes=3, counts=(1,), seed0=5)       # the re-measuring tool runs
    assert set(small) == set(SHAPES) and all(len(v) == 1 and v[0][0] <= v[0][1] <= v[0][2] for v in small.values())


def test_shape_and_background_measures():
    det = ShapeCounter()
    sq = render_scene(5, "square", "green", seed=4).image
    ci = render_scene(5, "circle", "green", seed=4).image
    right = det.detect(np.stack([sq, ci]), ["green square", "green circle"], [5, 5])
    wrong = det.detect(np.stack([sq, ci]), ["green circle", "green square"], [5, 5])
    for d in right:
        assert d.count == 5 and d.shape_match.mean() > 0.8 and d.background_fidelity == 1.0
    for d in wrong:
        assert d.count == 5 and d.shape_match.mean() < 0.2          # counted, but flagged
    assert right[0].fill.mean() == pytest.approx(1.0) and 0.7 < right[1].fill.mean() < 0.9
    teal = ci.copy()
    teal[np.all(ci == np.array(BACKGROUND, np.uint8), -1)] = (40, 140, 140)
    d = det.detect(teal[None], ["green circle"], [5])[0]
    assert d.count == 5 and d.background_fidelity < 0.2


def test_other_colours_are_not_counted():
    img = render_scene(3, "circle", "blue", seed=1).image
    assert ShapeCounter().count(img[None], ["purple circle"], [3])[0] == 0   # purple is blue's nearest colour


@pytest.mark.parametrize("images, classes, counts, match", [
    (np.zeros((1, 32, 32, 3), np.float32), ["red circle"], None, "dtype"),
    (np.zeros((1, 32, 32), np.uint8), ["red circle"], None, "shape"),
    (np.zeros((2, 32, 32, 3), np.uint8), ["red circle"], None, "2 images but 1 classes"),
    (np.zeros((1, 32, 32, 3), np.uint8), ["pink circle"], None, "pink"),
    (np.zeros((1, 32, 32, 3), np.uint8), ["red circle"], [21], "count=21"),
    ([[0]], ["red circle"], None, "numpy uint8"),
])
def test_bad_input(images, classes, counts, match):
    with pytest.raises(ValueError, match=match):
        ShapeCounter().detect(images, classes, counts)


def test_empty_batch_and_bad_settings():
    assert ShapeCounter().detect(np.zeros((0, 32, 32, 3), np.uint8), [], None) == []
    with pytest.raises(ValueError, match="threshold"):
        ShapeCounter(threshold=1.5)


def test_color_fidelity_sees_one_object_in_the_wrong_colour():
    """One purple square of five drawn red: the detector no longer counts it, background_fidelity
    (over all pixels) barely moves, color_fidelity (over the drawn pixels) drops by exactly that
    object's share of the drawn pixels."""
    purple = render_scene(5, "square", "purple", seed=3)
    red = render_scene(5, "square", "red", seed=3)            # same seed: same boxes, other colour
    np.testing.assert_array_equal(purple.boxes, red.boxes)
    img = purple.image.copy()
    x0, y0, x1, y1 = (int(v) for v in purple.boxes[0])
    img[y0:y1 + 1, x0:x1 + 1] = red.image[y0:y1 + 1, x0:x1 + 1]
    drawn = np.linalg.norm(purple.image.astype(np.float32) - np.array(BACKGROUND, np.float32), axis=-1) > 45
    in_box = np.zeros_like(drawn)
    in_box[y0:y1 + 1, x0:x1 + 1] = True
    clean, drifted = ShapeCounter().detect(np.stack([purple.image, img]), ["purple square"] * 2, [5, 5])
    assert clean.count == 5 and clean.color_fidelity == 1.0 and clean.background_fidelity == 1.0
    assert drifted.count == 4
    assert drifted.color_fidelity == pytest.approx((drawn & ~in_box).sum() / drawn.sum(), abs=1e-9)
    assert drifted.color_fidelity < 0.9 and drifted.background_fidelity > 0.97
    blank = np.full((1, 32, 32, 3), BACKGROUND, np.uint8)     # nothing drawn: nothing in a wrong colour
    assert ShapeCounter().detect(blank, ["purple square"], [5])[0].color_fidelity == 1.0
