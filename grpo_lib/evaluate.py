"""Counting evaluation: per-image tables, accuracy with Wilson intervals, confusion tables, plots.

Given images and their GenEval metadata rows, :func:`per_image_table` counts with the reward's own
detector (:func:`grpo_lib.rewards.counting.measure_counting`, so evaluation and reward agree by
construction) and :func:`per_count_accuracy` / :func:`overall_summary` reduce the table:

| column / key        | meaning                                                                  |
|---------------------|--------------------------------------------------------------------------|
| ``target``  (N)     | requested count                                                          |
| ``found``   (n)     | detections with score > 0.9 (GenEval's rule)                             |
| ``correct``         | 1[n == N] -- GenEval's counting correctness (exact match)                |
| ``error``           | n - N: > 0 over-generation, < 0 under-generation                         |
| ``accuracy``        | k / m, exact-count accuracy over m images with k correct                 |
| ``ci_low/ci_high``  | Wilson 95 % score interval of k / m (below)                              |
| ``mae``             | mean abs(n - N);  ``signed_error``: mean (n - N)                         |
| ``over/under_rate`` | share of images with n > N / n < N; ``off_by_one_rate``: abs(n - N) == 1 |

Wilson interval (z = 1.96), for p = k / m::

    centre = (p + z^2 / 2m) / (1 + z^2 / m)
    half   = z / (1 + z^2 / m) * sqrt(p (1 - p) / m + z^2 / 4m^2)

e.g. 8 / 10 -> (0.490, 0.943). It stays inside [0, 1] and is sane at p = 0 or 1 (where the normal
interval collapses to zero width), which matters for per-count buckets of a few hundred images.

:func:`run_evaluation` drives notebooks/03_evaluate.ipynb from :class:`EvalParams`: images from the
renderer (a sanity run: accuracy must be 1.0), a folder (Hugging Face imagefolder: PNGs +
metadata.jsonl with a ``file_name`` column plus the GenEval row), or a checkpoint (TinyPolicy +
optional LoRA, ODE sampling with the same per-(prompt, k) seeds as every other stage).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from grpo_lib.params import check_knobs

Z95 = 1.959963984540054

# --- statistics -------------------------------------------------------------------------------


def wilson_interval(k, n, z: float = Z95):
    """Wilson score interval (low, high) for k successes in n trials (arrays broadcast; n = 0 -> nan)."""
    k = np.asarray(k, np.float64)
    n = np.asarray(n, np.float64)
    if np.any(k < 0) or np.any(k > n):
        raise ValueError(f"wilson_interval needs 0 <= k <= n, got k={k}, n={n}")
    with np.errstate(invalid="ignore", divide="ignore"):
        p = k / n
        denom = 1.0 + z * z / n
        centre = (p + z * z / (2 * n)) / denom
        half = z / denom * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
        lo, hi = np.clip(centre - half, 0.0, 1.0), np.clip(centre + half, 0.0, 1.0)
        # exact ends (the formula gives 1 - 2e-16 at k = n): an interval must contain p
        lo, hi = np.where(k == 0, 0.0, lo), np.where(k == n, 1.0, hi)
    lo, hi = np.where(n > 0, lo, np.nan), np.where(n > 0, hi, np.nan)
    return (float(lo), float(hi)) if lo.ndim == 0 else (lo, hi)


def _reduce(target: np.ndarray, found: np.ndarray) -> dict:
    err = found - target
    k, m = int((err == 0).sum()), len(err)
    lo, hi = wilson_interval(k, m)
    return {"n": m, "correct": k, "accuracy": k / m if m else np.nan, "ci_low": lo, "ci_high": hi,
            "mae": float(np.abs(err).mean()) if m else np.nan,
            "signed_error": float(err.mean()) if m else np.nan,
            "over_rate": float((err > 0).mean()) if m else np.nan,
            "under_rate": float((err < 0).mean()) if m else np.nan,
            "off_by_one_rate": float((np.abs(err) == 1).mean()) if m else np.nan}


def _target_found(target, found) -> tuple[np.ndarray, np.ndarray]:
    t = np.asarray(target)
    f = np.asarray(found)
    if t.shape != f.shape or t.ndim != 1:
        raise ValueError(f"target and found must be 1-D arrays of one length, got shapes {t.shape} and {f.shape}")
    if len(t) and (not np.all(np.isfinite(f.astype(np.float64))) or not np.all(np.isfinite(t.astype(np.float64)))):
        raise ValueError("target / found contain NaN or inf (no detector result for some image?)")
    return t.astype(np.int64), f.astype(np.int64)


def per_count_accuracy(target, found) -> pd.DataFrame:
    """One row per requested count: n, correct, accuracy, ci_low, ci_high, mae, signed_error,
    over_rate, under_rate, off_by_one_rate (column ``count`` = the requested count)."""
    t, f = _target_found(target, found)
    rows = [{"count": int(c), **_reduce(t[t == c], f[t == c])} for c in np.unique(t)]
    cols = ["count", "n", "correct", "accuracy", "ci_low", "ci_high", "mae", "signed_error", "over_rate",
            "under_rate", "off_by_one_rate"]
    return pd.DataFrame(rows, columns=cols)


def overall_summary(table: pd.DataFrame) -> dict:
    """Overall figures of a per-image table (same keys as a per-count row, plus quality means)."""
    _require(table, ("target", "found"))
    t, f = _target_found(table["target"], table["found"])
    out = _reduce(t, f)
    for k in ("confidence", "background_fidelity", "color_fidelity", "area_quality", "shape_match", "quality"):
        if k in table:
            out[f"mean_{k}"] = float(table[k].mean())
    return out


def confusion_table(table: pd.DataFrame, max_found: int | None = None) -> pd.DataFrame:
    """Target (rows) x found (columns) image counts; found values above ``max_found`` (default:
    largest target + 3) are pooled in the last column, so one wild image does not widen the table."""
    _require(table, ("target", "found"))
    t, f = _target_found(table["target"], table["found"])
    cap = int(t.max()) + 3 if max_found is None and len(t) else (max_found or 0)
    f = np.minimum(f, cap)
    cols = list(range(0, cap + 1))
    ct = pd.crosstab(pd.Series(t, name="target"), pd.Series(f, name="found")).reindex(columns=cols, fill_value=0)
    ct.columns = [str(c) for c in cols[:-1]] + [f"{cap}+"]
    return ct


def compare_stages(tables: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """Per-count accuracy with Wilson intervals for several per-image tables side by side.

    Columns: ``count`` and, per stage, ``<stage>_n``, ``<stage>_accuracy``, ``<stage>_ci_low``,
    ``<stage>_ci_high``; the last row (``count == "all"``) pools every image.
    Used for base -> cold start -> GRPO.
    """
    if not tables:
        raise ValueError("compare_stages needs at least one {name: per-image table}")
    out = None
    for name, table in tables.items():
        _require(table, ("target", "found"))
        pc = per_count_accuracy(table["target"], table["found"])
        allrow = {"count": "all", **overall_summary(table)}
        pc = pd.concat([pc.astype({"count": object}), pd.DataFrame([allrow])[pc.columns]], ignore_index=True)
        pc = pc[["count", "n", "accuracy", "ci_low", "ci_high"]].rename(
            columns={c: f"{name}_{c}" for c in ("n", "accuracy", "ci_low", "ci_high")})
        out = pc if out is None else out.merge(pc, on="count", how="outer", sort=False)
    key = out["count"].map(lambda c: math.inf if c == "all" else c)
    return out.iloc[np.argsort(key.to_numpy(dtype=float), kind="stable")].reset_index(drop=True)


def paired_difference(before: pd.DataFrame, after: pd.DataFrame, z: float = Z95) -> dict:
    """Accuracy change between two stages evaluated on the *same* images' prompts and seeds.

    Every stage samples image i from the same prompt and initial noise (rollout.sample_for_rows), so
    the outcomes pair up and the change is measured far more tightly than by comparing two Wilson
    intervals. With b = images wrong before and right after, c = right before and wrong after, m images:

        d = (b - c) / m,    Var(d) = (b + c - (b - c)^2 / m) / m^2,    d +- z sqrt(Var(d))

    and McNemar's exact test of "no change": p = two-sided binomial test of b in b + c at 1/2.

    That interval treats the m images as independent draws: it answers "on these prompts, with other noise".
    Images of one colour-shape class are not independent (a model that loses blue circles loses many of them),
    so with a ``class`` column in both tables there is also a class-clustered interval, answering "on other
    classes like these". With d_i = after_i - before_i, e_i = d_i - d, G classes, S_g = sum of e_i over class g:

        Var_G(d) = G / (G - 1) * sum_g S_g^2 / m^2,    d +- t_{G-1} sqrt(Var_G(d))

    (the cluster-robust sandwich variance; with one image per class it is Var(d) above times m / (m - 1)), and
    Student's t with G - 1 degrees of freedom since few classes estimate it (t_2 = 4.30 for val's 3 classes).
    Returns ``{"n", "before", "after", "diff", "ci_low", "ci_high", "gained", "lost", "p_value", "classes",
    "class_ci_low", "class_ci_high"}``; the class keys are NaN without a ``class`` column or with one class.
    """
    from scipy.stats import binomtest

    for t in (before, after):
        _require(t, ("prompt", "target", "correct"))
    if len(before) != len(after) or not (before["prompt"].to_numpy() == after["prompt"].to_numpy()).all():
        raise ValueError(f"paired_difference needs the same prompts in the same order (got {len(before)} "
                         f"and {len(after)} rows): evaluate both stages with the same rows and seeds")
    x = before["correct"].to_numpy().astype(bool)
    y = after["correct"].to_numpy().astype(bool)
    m = len(x)
    if m == 0:
        raise ValueError("paired_difference needs at least one image")
    b, c = int((~x & y).sum()), int((x & ~y).sum())
    d = (b - c) / m
    half = z * math.sqrt(max(b + c - (b - c) ** 2 / m, 0.0)) / m
    p = binomtest(b, b + c, 0.5).pvalue if b + c else 1.0
    classes, class_half = float("nan"), float("nan")
    if "class" in before and "class" in after:
        if not (before["class"].to_numpy() == after["class"].to_numpy()).all():
            raise ValueError("paired_difference: the two tables name different classes for the same images")
        classes, class_half = _class_clustered_half_width(y.astype(float) - x.astype(float),
                                                          before["class"].to_numpy(), z)
    return {"n": m, "before": float(x.mean()), "after": float(y.mean()), "diff": d, "ci_low": d - half,
            "ci_high": d + half, "gained": b, "lost": c, "p_value": float(p), "classes": classes,
            "class_ci_low": d - class_half, "class_ci_high": d + class_half}


def _class_clustered_half_width(d: np.ndarray, groups: np.ndarray, z: float) -> tuple[int, float]:
    """(G, t_{G-1} sqrt(G / (G - 1) sum_g S_g^2) / m): the half width of :func:`paired_difference`'s
    class-clustered interval at the level of the normal quantile z; NaN half width for G < 2."""
    from scipy.stats import norm, t

    codes = pd.factorize(pd.Series(groups))[0]
    g = int(codes.max()) + 1 if len(codes) else 0
    if g < 2:
        return g, float("nan")
    sums = np.bincount(codes, weights=d - d.mean(), minlength=g)
    var = g / (g - 1) * float((sums ** 2).sum()) / len(d) ** 2
    return g, float(t.ppf(norm.cdf(z), g - 1)) * math.sqrt(var)


def _require(table: pd.DataFrame, cols: Sequence[str]) -> None:
    if not isinstance(table, pd.DataFrame):
        raise ValueError(f"expected a per-image pandas DataFrame, got {type(table).__name__}")
    missing = [c for c in cols if c not in table.columns]
    if missing:
        raise ValueError(f"per-image table lacks column(s) {missing}; it has {list(table.columns)}")


# --- the per-image table ----------------------------------------------------------------------

TABLE_COLUMNS = ("prompt", "class", "target", "found", "correct", "error", "confidence", "n_specks",
                 "background_fidelity", "color_fidelity", "area_quality", "shape_match", "quality")


def per_image_table(images: np.ndarray, rows: Sequence[dict], *, detector=None, batch_size: int = 256
                    ) -> pd.DataFrame:
    """One row per image: prompt, class, target, found, correct, error, confidence and the quality
    measures of :func:`grpo_lib.rewards.counting.measure_counting` (bad input -> its ValueErrors)."""
    from grpo_lib.rewards.counting import measure_counting
    from grpo_lib.rewards.detector import ShapeCounter

    if not isinstance(images, np.ndarray) or images.ndim != 4:
        raise ValueError(f"images must be a uint8 array (N, H, W, 3), got {getattr(images, 'shape', type(images))}")
    if len(images) != len(rows):
        raise ValueError(f"{len(images)} images but {len(rows)} metadata rows")
    detector = detector or ShapeCounter()
    parts = []
    for i in range(0, len(rows), batch_size):
        chunk = list(rows[i:i + batch_size])
        m = measure_counting(images[i:i + batch_size], [r.get("prompt", "") for r in chunk], chunk, detector)
        parts.append(pd.DataFrame({
            "prompt": [r.get("prompt", "") for r in chunk],
            "class": [r["include"][0]["class"] for r in chunk],
            "target": m["target"], "found": m["count"], "correct": m["correct"].astype(bool),
            "error": m["error"], **{k: m[k] for k in TABLE_COLUMNS[6:]}}))
    if not parts:
        raise ValueError("per_image_table got no images")
    return pd.concat(parts, ignore_index=True)


# --- plots ------------------------------------------------------------------------------------

def _plt():
    import matplotlib
    import matplotlib.pyplot as plt
    return matplotlib, plt


def plot_accuracy_per_count(per_count: pd.DataFrame | Mapping[str, pd.DataFrame], title: str = ""):
    """Exact-count accuracy per requested count with Wilson 95 % bars; a dict of per-image tables
    draws one series per stage (offset so the bars do not overlap). Returns the Figure."""
    _, plt = _plt()
    series = per_count if isinstance(per_count, Mapping) else {"": per_count}
    fig, ax = plt.subplots(figsize=(7, 3.6))
    width = 0.7 / max(len(series), 1)
    for j, (name, df) in enumerate(series.items()):
        if "target" in df.columns:                       # a per-image table: reduce it
            df = per_count_accuracy(df["target"], df["found"])
        k, m = int(df["correct"].sum()), int(df["n"].sum())
        lo, hi = wilson_interval(k, m)
        label = f"{name + ': ' if name else ''}all {k / m:.3f} [{lo:.3f}, {hi:.3f}], {m} images"
        x = df["count"].to_numpy(float) + (j - (len(series) - 1) / 2) * width
        acc = df["accuracy"].to_numpy(float)
        yerr = np.maximum(np.stack([acc - df["ci_low"].to_numpy(float), df["ci_high"].to_numpy(float) - acc]), 0.0)
        ax.errorbar(x, acc, yerr=yerr, fmt="o", capsize=3, ms=4, label=label)
    ax.set_xlabel("requested count N")
    ax.set_ylabel("exact-count accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xticks(sorted({int(c) for df in series.values()
                          for c in (df["target"] if "target" in df.columns else df["count"])}))
    ax.grid(alpha=0.3)
    ax.set_title(title or "exact-count accuracy per count (Wilson 95 % intervals)")
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    return fig


def plot_confusion(table: pd.DataFrame, title: str = ""):
    """Heatmap of the target x found table, coloured by the row share, annotated with image counts."""
    _, plt = _plt()
    ct = confusion_table(table)
    share = ct.to_numpy(float) / np.maximum(ct.to_numpy(float).sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(0.45 * ct.shape[1] + 2.0, 0.4 * ct.shape[0] + 1.6))
    im = ax.imshow(share, cmap="Blues", vmin=0, vmax=1, aspect="auto")
    for i, t in enumerate(ct.index):                         # outline the exact-count cells
        if t < ct.shape[1] - 1:
            ax.add_patch(plt.Rectangle((t - 0.5, i - 0.5), 1, 1, fill=False, ec="darkorange", lw=1.2))
    for (i, j), v in np.ndenumerate(ct.to_numpy()):
        if v:
            ax.text(j, i, str(v), ha="center", va="center", fontsize=7,
                    color="white" if share[i, j] > 0.6 else "black")
    ax.set_xticks(range(ct.shape[1]), ct.columns, fontsize=8)
    ax.set_yticks(range(ct.shape[0]), ct.index, fontsize=8)
    ax.set_xlabel("found count n")
    ax.set_ylabel("requested count N")
    ax.set_title(title or "confusion: requested x found (colour = row share, orange = exact)")
    fig.colorbar(im, ax=ax, fraction=0.04)
    fig.tight_layout()
    return fig


def select_for_grid(table: pd.DataFrame, per_count: int = 4) -> np.ndarray:
    """Indices of up to ``per_count`` images per requested count, ordered by count, spread evenly over
    that count's rows (prompt files group classes, so the first rows would all show one class)."""
    _require(table, ("target",))
    idx = []
    for c in sorted(table["target"].unique()):
        rows = np.flatnonzero(table["target"].to_numpy() == c)
        take = np.unique(np.linspace(0, len(rows) - 1, min(per_count, len(rows))).round().astype(int))
        idx += list(rows[take])
    return np.array(idx, np.int64)


def plot_image_grid(images: np.ndarray, table: pd.DataFrame, *, per_count: int = 4, detector=None,
                    cell_inches: float = 1.25, title: str = ""):
    """Images ordered by requested count (one row per count), detected objects boxed (solid: counted,
    dashed red: below the score threshold) and ``found n / N`` captioned (green if exact).

    The 32x32 images are drawn with nearest-neighbour upscaling at ``cell_inches`` per image so
    single pixels stay visible.
    """
    from grpo_lib.rewards.detector import ShapeCounter

    _, plt = _plt()
    _require(table, ("target", "found", "class"))
    if len(images) != len(table):
        raise ValueError(f"{len(images)} images but {len(table)} table rows")
    sel = select_for_grid(table, per_count)
    counts = sorted(table["target"].unique())
    detector = detector or ShapeCounter()
    dets = detector.detect(images[sel], list(table["class"].iloc[sel]), [int(x) for x in table["target"].iloc[sel]])
    ncol = max(1, min(per_count, max(int((table["target"] == c).sum()) for c in counts)))
    fig, axes = plt.subplots(len(counts), ncol, figsize=(cell_inches * ncol + 0.9, cell_inches * len(counts) + 0.5),
                             squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    pos = {c: 0 for c in counts}
    for i, d in zip(sel, dets):
        c = int(table["target"].iloc[i])
        r, k = counts.index(c), pos[c]
        pos[c] += 1
        ax = axes[r, k]
        ax.imshow(images[i], interpolation="nearest")
        for (x0, y0, x1, y1), keep in zip(d.boxes, d.kept):
            ax.add_patch(plt.Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0 + 1, y1 - y0 + 1, fill=False, lw=0.8,
                                       ec="white" if keep else "red", ls="-" if keep else "--"))
        n = int(table["found"].iloc[i])
        ax.set_title(f"found {n} / {c}", fontsize=7, color="green" if n == c else "crimson", pad=2)
        if k == 0:
            ax.text(-2, images.shape[1] / 2, f"N={c}", ha="right", va="center", fontsize=8)
    fig.suptitle(title or "images by requested count (boxes: detections; white = counted)", fontsize=9)
    fig.tight_layout()
    return fig


def save_grid_png(images: np.ndarray, table: pd.DataFrame, path: str | Path, **kwargs) -> Path:
    """:func:`plot_image_grid` written to ``path`` (PNG, 150 dpi); returns the path."""
    _, plt = _plt()
    fig = plot_image_grid(images, table, **kwargs)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return path


def save_image_grid(cells: np.ndarray, path: str | Path, *, row_labels: Sequence[str] | None = None,
                    captions: Sequence[Sequence[str]] | None = None, title: str = "",
                    cell_inches: float = 1.0) -> Path:
    """Save a (rows, cols, H, W, 3) uint8 array of images as a PNG grid (nearest-neighbour upscaled),
    with optional row labels and per-cell captions; returns the path."""
    _, plt = _plt()
    cells = np.asarray(cells)
    if cells.ndim != 5 or cells.shape[-1] != 3:
        raise ValueError(f"cells must be (rows, cols, H, W, 3), got shape {cells.shape}")
    R, C = cells.shape[:2]
    fig, axes = plt.subplots(R, C, figsize=(cell_inches * C + (2.2 if row_labels else 0.2), cell_inches * R + 0.5),
                             squeeze=False)
    for r in range(R):
        for c in range(C):
            ax = axes[r, c]
            ax.imshow(cells[r, c], interpolation="nearest")
            ax.set_xticks([]); ax.set_yticks([])
            if captions is not None:
                ax.set_title(str(captions[r][c]), fontsize=7, pad=2)
        if row_labels is not None:
            axes[r, 0].set_ylabel(str(row_labels[r]), fontsize=6, rotation=0, ha="right", va="center")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return path


# --- image sources ----------------------------------------------------------------------------

def save_imagefolder(images: np.ndarray, rows: Sequence[dict], folder: str | Path) -> Path:
    """Write images as ``00000.png ...`` plus ``metadata.jsonl`` (``file_name`` + the GenEval row):
    the Hugging Face imagefolder layout :func:`load_imagefolder` reads."""
    from PIL import Image

    if len(images) != len(rows):
        raise ValueError(f"{len(images)} images but {len(rows)} rows")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, (img, row) in enumerate(zip(images, rows)):
        name = f"{i:05d}.png"
        Image.fromarray(np.asarray(img, np.uint8)).save(folder / name)
        lines.append(json.dumps({"file_name": name, **row}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def load_imagefolder(folder: str | Path) -> tuple[np.ndarray, list[dict]]:
    """Images uint8 (N, H, W, 3) and GenEval rows from an imagefolder (PNGs + metadata.jsonl whose
    lines hold ``file_name`` and the row's ``tag`` / ``include`` / ``exclude`` / ``prompt``)."""
    from PIL import Image

    from grpo_lib.prompts import row_target

    folder = Path(folder)
    meta = folder / "metadata.jsonl"
    if not meta.is_file():
        raise ValueError(f"image folder {str(folder)!r} has no metadata.jsonl (Hugging Face imagefolder layout: "
                         "PNG files + metadata.jsonl with a file_name column and the GenEval row)")
    images, rows = [], []
    for ln, line in enumerate(meta.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        rec = json.loads(line)
        name = rec.pop("file_name", None)
        if not name:
            raise ValueError(f"{meta}:{ln} has no file_name")
        if not (folder / name).is_file():
            raise ValueError(f"{meta}:{ln} names {name!r}, which is not in {str(folder)!r}")
        row_target(rec)
        images.append(np.asarray(Image.open(folder / name).convert("RGB"), np.uint8))
        rows.append(rec)
    if not images:
        raise ValueError(f"{meta} lists no images")
    shapes = {im.shape for im in images}
    if len(shapes) > 1:
        raise ValueError(f"images in {str(folder)!r} have different sizes {sorted(shapes)}; expected one size")
    return np.stack(images), rows


# --- the notebook's driver --------------------------------------------------------------------

SOURCES = ("renderer", "folder", "checkpoint")


@dataclass
class EvalParams:
    """Fields of notebooks/03_evaluate.ipynb's parameters cell (and of params/03_evaluate__*.yaml)."""
    run_dir: str = "runs/dev"                          # where outputs go (run_dir/evaluate/<name>/)
    source: str = "renderer"                           # renderer | folder | checkpoint
    prompts: str = "data/counting/test.jsonl"          # rows to evaluate (renderer, checkpoint)
    images_per_prompt: int = 4                         # images per prompt row (renderer, checkpoint)
    max_prompts: int = 0                               # evaluate this many rows spread over the file (0: all)
    folder: str = ""                                   # imagefolder dir: PNGs + metadata.jsonl (source folder)
    checkpoint: str = "data/checkpoints/tiny-base"     # TinyPolicy dir (source checkpoint)
    lora: str = ""                                     # optional LoRA dir on top of the checkpoint
    convention: str = "noise_at_one"                   # time convention the policy samples in
    num_steps: int = 20                                # ODE steps (checkpoint)
    shift: float = 1.0                                 # sigma-schedule shift (checkpoint)
    guidance_scale: float = 3.0                        # CFG scale (checkpoint)
    batch_size: int = 64                               # images per sampling batch (checkpoint)
    seed: int = 0                                      # image seeds are keyed on (seed, prompt, k)
    renderer_sanity: bool = True                       # also evaluate the renderer on the same rows
    grid_per_count: int = 4                            # images per requested count in the grid
    name: str = ""                                     # output subfolder name (empty: the source)
    num_threads: int = 0                               # torch.set_num_threads (0 leaves it alone)

    def __post_init__(self):
        if self.source not in SOURCES:
            raise ValueError(f"source={self.source!r} is not one of {SOURCES}")
        check_knobs(self)
        for k in ("images_per_prompt", "grid_per_count"):
            if getattr(self, k) < 1:
                raise ValueError(f"{k}={getattr(self, k)} must be >= 1")
        if self.max_prompts < 0:
            raise ValueError(f"max_prompts={self.max_prompts} must be >= 0 (0 means all)")
        if self.source == "folder" and not self.folder:
            raise ValueError("source='folder' needs folder=<imagefolder dir with metadata.jsonl>")
        if self.source == "checkpoint" and not self.checkpoint:
            raise ValueError("source='checkpoint' needs checkpoint=<TinyPolicy dir>")

    @property
    def out_dir(self) -> Path:
        return Path(self.run_dir) / "evaluate" / (self.name or self.source)


def _rows(p: EvalParams) -> list[dict]:
    from grpo_lib.prompts import load_rows, spread_subset
    rows = load_rows(p.prompts)
    rows = spread_subset(rows, p.max_prompts)
    return rows


def images_from_source(p: EvalParams, progress: bool = False) -> tuple[np.ndarray, list[dict]]:
    """(images uint8 (N, H, W, 3), N metadata rows) for ``p.source``."""
    if p.source == "folder":
        return load_imagefolder(p.folder)
    rows = _rows(p)
    flat = [r for r in rows for _ in range(p.images_per_prompt)]
    if p.source == "renderer":
        from grpo_lib.scenes import render_rows
        return render_rows(flat, seed=p.seed)[0], flat
    import torch

    from grpo_lib.checkpoints import Recipe, load_policy
    from grpo_lib.rollout import sample_for_rows
    if p.num_threads:
        torch.set_num_threads(p.num_threads)
    # a GRPO checkpoint's LoRA carries its EMA weights when it has them (as the widget and the experiment)
    policy = load_policy(Recipe(Path(p.checkpoint), lora=Path(p.lora) if p.lora else None), convention=p.convention)
    return sample_for_rows(policy, rows, images_per_prompt=p.images_per_prompt, num_steps=p.num_steps,
                           shift=p.shift, guidance_scale=p.guidance_scale, seed=p.seed,
                           batch_size=p.batch_size, progress=progress)


@dataclass
class Evaluation:
    """One evaluated image set: its per-image table, images, summaries and written files."""
    name: str
    table: pd.DataFrame
    images: np.ndarray
    per_count: pd.DataFrame
    overall: dict
    confusion: pd.DataFrame
    files: dict


def evaluate_images(images: np.ndarray, rows: Sequence[dict], out_dir: str | Path, name: str, *,
                    grid_per_count: int = 4, detector=None) -> Evaluation:
    """Table, summaries and plots for one image set, written into ``out_dir``:
    per_image.csv, per_count.csv, confusion.csv, summary.json, accuracy.png, confusion.png, grid.png."""
    _, plt = _plt()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = per_image_table(images, rows, detector=detector)
    pc = per_count_accuracy(table["target"], table["found"])
    overall = overall_summary(table)
    conf = confusion_table(table)
    files = {"per_image": out / "per_image.csv", "per_count": out / "per_count.csv",
             "confusion": out / "confusion.csv", "summary": out / "summary.json",
             "accuracy_png": out / "accuracy.png", "confusion_png": out / "confusion.png", "grid_png": out / "grid.png"}
    table.to_csv(files["per_image"], index=False)
    pc.to_csv(files["per_count"], index=False)
    conf.to_csv(files["confusion"])
    files["summary"].write_text(json.dumps({"name": name, "overall": overall,
                                            "per_count": json.loads(pc.to_json(orient="records"))}, indent=1))
    for key, fig in (("accuracy_png", plot_accuracy_per_count(pc, f"{name}: exact-count accuracy per count "
                                                                  "(Wilson 95 %)")),
                     ("confusion_png", plot_confusion(table, f"{name}: requested x found (orange = exact)"))):
        fig.savefig(files[key], dpi=150)
        plt.close(fig)
    save_grid_png(images, table, files["grid_png"], per_count=grid_per_count, detector=detector,
                  title=f"{name}: images by requested count (white boxes counted)")
    return Evaluation(name, table, images, pc, overall, conf, {k: str(v) for k, v in files.items()})


def run_evaluation(p: EvalParams, progress: bool = False) -> dict[str, Evaluation]:
    """Evaluate ``p.source`` (and the renderer on the same rows when ``p.renderer_sanity``).

    Writes each evaluation under ``run_dir/evaluate/<name>/`` and, with more than one, a side-by-side
    ``run_dir/evaluate/compare.csv`` and ``compare.png``. Returns {name: Evaluation}.
    """
    _, plt = _plt()
    results: dict[str, Evaluation] = {}
    images, rows = images_from_source(p, progress=progress)
    name = p.name or p.source
    results[name] = evaluate_images(images, rows, p.out_dir, name, grid_per_count=p.grid_per_count)
    if p.renderer_sanity and p.source != "renderer":
        from grpo_lib.scenes import render_rows
        ren = render_rows(rows, seed=p.seed)[0]
        results["renderer"] = evaluate_images(ren, rows, Path(p.run_dir) / "evaluate" / "renderer", "renderer",
                                              grid_per_count=p.grid_per_count)
    if len(results) > 1:
        base = Path(p.run_dir) / "evaluate"
        compare_stages({k: v.table for k, v in results.items()}).to_csv(base / "compare.csv", index=False)
        fig = plot_accuracy_per_count({k: v.table for k, v in results.items()}, "exact-count accuracy per count")
        fig.savefig(base / "compare.png", dpi=150)
        plt.close(fig)
    return results
