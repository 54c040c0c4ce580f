"""Detectors behind the reward server: the ``Detector`` protocol and its two backends.

``shapes`` is the embedded world's colour/shape counter; ``owlv2`` is transformers' OWLv2, loaded
only from a local directory (never downloaded).
"""
from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import NamedTuple, Protocol, Sequence, runtime_checkable

import numpy as np


class Detection(NamedTuple):
    """One detected object: class name, box (x0, y0, x1, y1) in pixels, confidence in [0, 1]."""
    cls: str
    box: tuple[float, float, float, float]
    score: float


Query = tuple[str, "int | None"]     # (class name, count the prompt asks for, or None)


@runtime_checkable
class Detector(Protocol):
    """``detect(images uint8 (B, H, W, 3), queries per image) -> per image list of Detection``.

    ``queries[b]`` lists (class, requested count or None) image ``b`` is asked about. The count is a
    prior some detectors use (the shapes counter's completeness rule depends on the size range the
    renderer draws at that count); open-vocabulary detectors ignore it. A detector may return
    objects of other classes too (the judge ignores them). ``check(cls, count)`` raises ValueError
    for a query the detector cannot answer; the server turns that into a 400 before detecting.
    """
    name: str

    def check(self, cls: str, count: int | None) -> None: ...

    def detect(self, images: np.ndarray, queries: Sequence[Sequence[Query]]) -> list[list[Detection]]: ...


class ShapesDetector:
    """The embedded world's counter (``grpo_lib.rewards.detector.ShapeCounter``) as a ``Detector``.

    ``ShapeCounter.detect(images, classes, counts)`` answers one class per image. Query slot k
    (the k-th class each image is asked about) is one pass over the images that have a k-th
    query; each pass is cut into runs of at most ``chunk_pixels`` pixel-queries::

        counter call on images[s:e] (a view)        if every image in s..e has a k-th query
                        images[[b, ...]] (a copy)   else, at most chunk_pixels pixels

    so no image is copied once per class, and the counter's float32 working set (about 100 bytes
    per pixel-query) is bounded by the chunk, not by the request. A query without a count (an
    exclude-only class) is passed as count 0, which the counter treats as "any count".
    """

    name = "shapes"

    def __init__(self, chunk_pixels: int = 2048 * 2048) -> None:
        from grpo_lib.rewards.detector import ShapeCounter
        if chunk_pixels < 1:
            raise ValueError(f"chunk_pixels={chunk_pixels} must be >= 1")
        self.counter = ShapeCounter()
        self.chunk_pixels = int(chunk_pixels)

    def check(self, cls: str, count: int | None) -> None:
        from grpo_lib.scenes import MAX_COUNT, parse_class
        parse_class(cls)                               # ValueError naming the class and the world's
        if count is not None and not 0 <= count <= MAX_COUNT:
            raise ValueError(f"count={count} is outside the embedded world's range 0..{MAX_COUNT}")

    def detect(self, images: np.ndarray, queries: Sequence[Sequence[Query]]) -> list[list[Detection]]:
        out: list[list[Detection]] = [[] for _ in queries]
        per_chunk = max(1, self.chunk_pixels // max(1, images.shape[1] * images.shape[2]))  # images per call
        for k in range(max((len(qs) for qs in queries), default=0)):
            members = [b for b, qs in enumerate(queries) if len(qs) > k]
            for s in range(0, len(members), per_chunk):
                idx = members[s:s + per_chunk]
                contiguous = idx[-1] - idx[0] + 1 == len(idx)
                batch = images[idx[0]:idx[-1] + 1] if contiguous else images[idx]
                found = self.counter.detect(batch, [queries[b][k][0] for b in idx],
                                            [queries[b][k][1] or 0 for b in idx])
                for b, d in zip(idx, found):
                    out[b] += [Detection(d.cls, tuple(float(v) for v in box), float(sc))
                               for box, sc in zip(d.boxes, d.scores)]
        return out


class Owlv2Detector:
    """transformers' OWLv2 (``Owlv2ForObjectDetection`` + ``Owlv2Processor``) from a local directory.

    Each class becomes the text query ``query_template.format(class)``; every (box, query) pair with
    sigmoid score > ``min_score`` is a detection of that class (per-class scores, so one box may count
    for two classes, as Mask2Former's per-class outputs can). Boxes come back in pixels of the
    original image: OWLv2 pads to a square at the bottom/right, so the scale is max(H, W).
    """

    name = "owlv2"

    def __init__(self, path: str | os.PathLike, *, device: str = "cpu", min_score: float = 0.1,
                 query_template: str = "a photo of a {}") -> None:
        path = Path(path)
        if not path.is_dir() or not (path / "config.json").is_file():
            raise ValueError(f"--detector-path {str(path)!r} is not a directory holding an OWLv2 "
                             "config.json (save_pretrained output); models are never downloaded")
        import torch
        from transformers import Owlv2ForObjectDetection, Owlv2Processor
        self.torch = torch
        self.device = torch.device(device)
        self.model = Owlv2ForObjectDetection.from_pretrained(path, local_files_only=True).to(self.device).eval()
        self.processor = Owlv2Processor.from_pretrained(path, local_files_only=True)
        self.min_score = float(min_score)
        self.query_template = query_template
        self._lock = threading.Lock()   # one forward at a time per worker process (CPU threads are shared)

    def check(self, cls: str, count: int | None) -> None:
        pass                                         # open vocabulary: any class name is a query

    def detect(self, images: np.ndarray, queries: Sequence[Sequence[Query]]) -> list[list[Detection]]:
        torch = self.torch
        classes = [[c for c, _ in qs] for qs in queries]
        texts = [[self.query_template.format(c) for c in cls] for cls in classes]
        # padding="max_length": the processor concatenates per-image token tensors, so they must agree
        inputs = self.processor(text=texts, images=list(images), return_tensors="pt",
                                padding="max_length", truncation=True)
        with self._lock, torch.inference_mode():
            out = self.model(**{k: v.to(self.device) for k, v in inputs.items()})
        probs = torch.sigmoid(out.logits.float()).cpu().numpy()            # (B, Q, C_max)
        cx, cy, w, h = out.pred_boxes.float().cpu().numpy().transpose(2, 0, 1)  # each (B, Q), in [0, 1]
        scale = float(max(images.shape[1], images.shape[2]))               # padded square side
        boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1) * scale  # (B, Q, 4)
        result = []
        for b, cls in enumerate(classes):
            dets = []
            for j, c in enumerate(cls):                                  # padded queries j >= len(cls) ignored
                for q in np.nonzero(probs[b, :, j] > self.min_score)[0]:
                    dets.append(Detection(c, tuple(float(v) for v in boxes[b, q]), float(probs[b, q, j])))
            result.append(dets)
        return result


def build_detector(name: str, path: str | None = None, device: str = "cpu",
                   chunk_pixels: int = 2048 * 2048) -> Detector:
    """The named backend; ``chunk_pixels`` bounds the pixel-queries of one ``shapes`` counter call."""
    if name == "shapes":
        if path:
            raise ValueError(f"--detector shapes takes no --detector-path (got {path!r})")
        return ShapesDetector(chunk_pixels)
    if name == "owlv2":
        if not path:
            raise ValueError("--detector owlv2 needs --detector-path DIR (a local save_pretrained directory)")
        return Owlv2Detector(path, device=device)
    raise ValueError(f"detector={name!r} is not one of ['shapes', 'owlv2']")


