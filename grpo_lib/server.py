"""The counting reward server (GenEval protocol over JSON) and its client, ``RemoteCountingReward``.

GenEval's judge (flow_grpo_notes §3, yifan123/reward-server ``gen_eval.py``), per image with
metadata row ``{"tag", "include": [{"class": c, "count": N}], "exclude": [...]}``::

    n_c    = min(#{detections d of class c : s_d > tau}, M)             # confident objects, NMS off
    score  = (1/|I|) * sum_{(c, N) in I} (1 - |N - n_c| / N)           # partial, NOT clipped (upstream)
    strict = prod_{(c, N) in I} [n_c == N]                              # exact count
    correct = prod_{(c, N) in I} [n_c >= N] * prod_{(c, K) in E} [n_c < K]   # original GenEval rule

| code name              | symbol | meaning                                                          |
|------------------------|--------|------------------------------------------------------------------|
| ``counting_threshold`` | tau    | 0.9 for ``tag == "counting"`` (``threshold`` = 0.3 for other tags) |
| ``max_objects``        | M      | 50 (GenEval's 16, raised as the counting fork does, for N > 16)  |
| ``include``/``exclude``| I / E  | the row's clauses; exclude is ``count = N + 1`` for counting     |
| ``scores``             | score  | the partial score, can be negative (N=2, n=5 -> -0.5)            |
| ``strict_rewards``     | strict | 1.0 / 0.0                                                        |
| ``rewards``            | correct| 1.0 / 0.0; all 0.0 when ``only_strict`` (upstream skips the check) |

For counting rows (one include clause, exclude = N + 1) ``strict == correct``. Mapping to the
in-process rewards (``grpo_lib.rewards``): ``counting_strict = strict_rewards`` and
``counting_partial = max(0, scores)`` (exact for one include clause, which is every row the
in-process rewards accept); ``RemoteCountingReward(reward="partial")`` applies that same clip to the
server's ``scores``, so remote and in-process rewards agree bit for bit. A clause with N = 0 (which
upstream would divide by) gets the in-process rule, term = 1[n_c == 0].

Wire format (no pickle anywhere):

* ``POST /`` body ``{"images": [base64 PNG, ...], "meta_datas": [row, ...], "only_strict": bool}``
* 200 answer ``{"scores", "rewards", "strict_rewards": [B floats], "group_rewards",
  "group_strict_rewards": {tag: [B floats], -10.0 where the image's tag differs} (as upstream),
  "counts": [{class: n_c} per image, for every include/exclude class], "detector": name}``
* 400 (malformed input), 413 (request or batch too large), 503 (detector not ready), 500 (bug):
  ``{"error": message}``; the server stays up.
* ``GET /health`` -> ``{"status": "ready" | "loading" | "error", "detector": name, ...}``

Run: ``python -m grpo_lib.server --detector shapes --host 127.0.0.1 --port 18085 --workers 2``.
Detector backends share the ``Detector`` protocol: ``shapes`` (the embedded world's colour/shape
counter) and ``owlv2`` (transformers' OWLv2, loaded only from ``--detector-path``, never downloaded).
"""
from __future__ import annotations

import argparse
import base64
import binascii
import http.client
import io
import json
import logging
import os
import socket
import threading
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple, Protocol, Sequence, runtime_checkable

import numpy as np

log = logging.getLogger("grpo_lib.server")

GENEVAL_TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
OTHER_TAG_VALUE = -10.0          # upstream's filler in group_rewards for images of another tag
CONFIG_ENV = "GRPO_REWARD_SERVER_CONFIG"
DEFAULT_PORT = 18085


# --- detectors ----------------------------------------------------------------------------------

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

    ``ShapeCounter.detect(images, classes, counts)`` answers one class per image, so the queries
    are flattened to (image, class, count) triples, one counter call for all of them (an image
    asked about two classes appears twice). A query without a count (an exclude-only class) is
    passed as count 0, which the counter treats as "any count" (same as ``counts=None``).
    """

    name = "shapes"

    def __init__(self) -> None:
        from grpo_lib.rewards.detector import ShapeCounter
        self.counter = ShapeCounter()

    def check(self, cls: str, count: int | None) -> None:
        from grpo_lib.scenes import MAX_COUNT, parse_class
        parse_class(cls)                               # ValueError naming the class and the world's
        if count is not None and not 0 <= count <= MAX_COUNT:
            raise ValueError(f"count={count} for {cls!r} is outside the embedded world's range 0..{MAX_COUNT}")

    def detect(self, images: np.ndarray, queries: Sequence[Sequence[Query]]) -> list[list[Detection]]:
        idx = [b for b, qs in enumerate(queries) for _ in qs]                        # image of each query
        flat = [q for qs in queries for q in qs]
        found = self.counter.detect(images[idx], [c for c, _ in flat], [n or 0 for _, n in flat])
        out: list[list[Detection]] = [[] for _ in queries]
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


def build_detector(name: str, path: str | None = None, device: str = "cpu") -> Detector:
    if name == "shapes":
        if path:
            raise ValueError(f"--detector shapes takes no --detector-path (got {path!r})")
        return ShapesDetector()
    if name == "owlv2":
        if not path:
            raise ValueError("--detector owlv2 needs --detector-path DIR (a local save_pretrained directory)")
        return Owlv2Detector(path, device=device)
    raise ValueError(f"detector={name!r} is not one of ['shapes', 'owlv2']")


# --- the GenEval judge ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Judgement:
    score: float                  # partial, unclipped (upstream's ``score``)
    strict: bool                  # every include clause exact
    correct: bool                 # original GenEval rule (False when only_strict, as upstream)
    counts: dict[str, int]        # n_c for every include/exclude class


def geneval_judge(detections: Sequence[Detection], row: dict, *, only_strict: bool,
                  counting_threshold: float = 0.9, threshold: float = 0.3,
                  max_objects: int = 50) -> Judgement:
    """GenEval's ``evaluate_reward`` (score, strict) and ``evaluate`` (correct) on one image.

    n_c = min(#{d : d.cls == c, d.score > tau}, M) with tau = ``counting_threshold`` for counting
    rows else ``threshold``; score = mean over include clauses of 1 - |N - n_c| / N (unclipped;
    1[n_c == 0] for N = 0);
    strict = all n_c == N; correct = all n_c >= N and, for excludes, n_c < K (False if only_strict).
    """
    tau = counting_threshold if row["tag"] == "counting" else threshold
    counts: dict[str, int] = {}
    for d in detections:
        if d.score > tau:
            counts[d.cls] = counts.get(d.cls, 0) + 1
    # the top-M cut of upstream (sorted by score) only matters through the number kept
    n = {c: min(counts.get(c, 0), max_objects) for c in _row_classes(row)}
    # N = 0: upstream divides by zero; the in-process rule 1[n == 0] (grpo_lib.rewards.counting)
    terms = [1.0 - abs(req["count"] - n[req["class"]]) / req["count"] if req["count"] > 0
             else float(n[req["class"]] == 0) for req in row["include"]]
    strict = all(n[req["class"]] == req["count"] for req in row["include"])
    if only_strict:
        correct = False
    else:
        correct = (all(n[r["class"]] >= r["count"] for r in row["include"])
                   and all(n[r["class"]] < r["count"] for r in row.get("exclude", [])))
    return Judgement(score=sum(terms) / len(terms), strict=strict, correct=correct, counts=n)


def _row_classes(row: dict) -> list[str]:
    return [c for c, _ in row_queries(row)]


def row_queries(row: dict) -> list[Query]:
    """(class, requested count) for every class of a row, in order: the include clause's count, or
    None for a class that only appears in exclude clauses."""
    q: dict[str, int | None] = {}
    for req in row["include"]:
        q.setdefault(req["class"], req["count"])
    for req in row.get("exclude", []):
        q.setdefault(req["class"], None)
    return list(q.items())


# --- request handling (no HTTP here, so it is unit-testable) ---------------------------------------

class RequestError(Exception):
    """A bad request: ``status`` (400 / 413 / 503) and a message naming the problem."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


@dataclass
class ServerConfig:
    detector: str = "shapes"
    detector_path: str | None = None
    device: str = "cpu"
    max_request_bytes: int = 64 * 2**20     # whole JSON body
    max_batch: int = 256                    # images per request
    max_image_pixels: int = 2048 * 2048     # per image, checked from the PNG header before decoding
    counting_threshold: float = 0.9
    threshold: float = 0.3
    max_objects: int = 50

    def to_env(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_env(cls) -> "ServerConfig":
        raw = os.environ.get(CONFIG_ENV)
        return cls(**json.loads(raw)) if raw else cls()


def validate_row(i: int, row: Any) -> dict:
    """A GenEval metadata row the judge can score, or RequestError(400) naming the problem."""
    def bad(msg):
        return RequestError(400, f"meta_datas[{i}]: {msg}")
    if not isinstance(row, dict):
        raise bad(f"expected a JSON object (GenEval row), got {type(row).__name__}")
    if row.get("tag") not in GENEVAL_TAGS:
        raise bad(f"tag={row.get('tag')!r} is not one of {list(GENEVAL_TAGS)}")
    inc = row.get("include")
    if not isinstance(inc, list) or not inc:
        raise bad(f"'include' must be a non-empty list of {{'class', 'count'}} clauses, got {inc!r}")
    exc = row.get("exclude", [])
    if not isinstance(exc, list):
        raise bad(f"'exclude' must be a list, got {exc!r}")
    for kind, clauses in (("include", inc), ("exclude", exc)):
        for j, req in enumerate(clauses):
            if not isinstance(req, dict):
                raise bad(f"{kind}[{j}] must be an object, got {req!r}")
            extra = sorted(set(req) - {"class", "count"})
            if extra:
                raise bad(f"{kind}[{j}] has keys {extra}: colour/position clauses are not supported by "
                          "this counting server (only 'class' and 'count')")
            c, k = req.get("class"), req.get("count")
            if not isinstance(c, str) or not c.strip():
                raise bad(f"{kind}[{j}].class={c!r} must be a non-empty string")
            lo = 0 if kind == "include" else 1       # "fewer than 0" could never hold
            if isinstance(k, bool) or not isinstance(k, int) or k < lo:
                raise bad(f"{kind}[{j}].count={k!r} must be an integer >= {lo}")
    return row


def decode_image(i: int, s: Any, max_pixels: int) -> np.ndarray:
    """base64 PNG -> uint8 (H, W, 3); RequestError naming image ``i`` otherwise."""
    from PIL import Image, UnidentifiedImageError
    if not isinstance(s, str):
        raise RequestError(400, f"images[{i}] must be a base64 string, got {type(s).__name__}")
    try:
        raw = base64.b64decode(s, validate=True)
    except (binascii.Error, ValueError) as e:
        raise RequestError(400, f"images[{i}] is not valid base64 ({e})") from None
    try:
        im = Image.open(io.BytesIO(raw), formats=["PNG"])
    except Image.DecompressionBombError as e:     # PIL's own header check (far above ours)
        raise RequestError(413, f"images[{i}] is too large ({e})") from None
    except (UnidentifiedImageError, OSError) as e:
        raise RequestError(400, f"images[{i}] is not a PNG image ({len(raw)} bytes; {e})") from None
    w, h = im.size
    if w * h > max_pixels:   # checked from the header, before decoding (decompression bombs)
        raise RequestError(413, f"images[{i}] is {w}x{h} = {w * h} pixels, above the limit "
                                f"max_image_pixels={max_pixels}")
    if im.mode != "RGB":
        raise RequestError(400, f"images[{i}] has PNG mode {im.mode!r}; expected 'RGB' (8-bit, 3 channels)")
    try:
        im.load()
    except (OSError, SyntaxError, ValueError) as e:
        raise RequestError(400, f"images[{i}] is a corrupt PNG ({e})") from None
    return np.asarray(im, dtype=np.uint8)


def parse_request(body: bytes, cfg: ServerConfig, detector: Detector | None = None
                  ) -> tuple[np.ndarray, list[dict], bool]:
    """JSON body -> (images uint8 (B, H, W, 3), rows, only_strict); RequestError on any problem."""
    try:
        payload = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RequestError(400, f"body is not JSON ({e}); expected "
                                '{"images": [...], "meta_datas": [...], "only_strict": bool}') from None
    if not isinstance(payload, dict):
        raise RequestError(400, f"body must be a JSON object, got {type(payload).__name__}")
    missing = [k for k in ("images", "meta_datas") if k not in payload]
    if missing:
        raise RequestError(400, f"body lacks {missing}; expected keys 'images', 'meta_datas', 'only_strict'")
    images, rows = payload["images"], payload["meta_datas"]
    only_strict = payload.get("only_strict", False)
    if not isinstance(only_strict, bool):
        raise RequestError(400, f"only_strict={only_strict!r} must be true or false")
    if not isinstance(images, list) or not isinstance(rows, list):
        raise RequestError(400, "'images' and 'meta_datas' must be lists")
    if len(images) != len(rows):
        raise RequestError(400, f"len(images)={len(images)} != len(meta_datas)={len(rows)}")
    if not images:
        raise RequestError(400, "empty batch: 'images' has no entries")
    if len(images) > cfg.max_batch:
        raise RequestError(413, f"batch of {len(images)} images is above the limit max_batch={cfg.max_batch}")
    rows = [validate_row(i, r) for i, r in enumerate(rows)]
    if detector is not None:
        for i, r in enumerate(rows):
            for cls, count in row_queries(r):
                try:
                    detector.check(cls, count)
                except ValueError as e:
                    raise RequestError(400, f"meta_datas[{i}]: detector {detector.name} cannot answer "
                                            f"({cls!r}, {count}): {e}") from None
    arrays = [decode_image(i, s, cfg.max_image_pixels) for i, s in enumerate(images)]
    sizes = {a.shape for a in arrays}
    if len(sizes) > 1:
        raise RequestError(400, f"images have different sizes {sorted(sizes)}; send one size per request")
    return np.stack(arrays), rows, only_strict


def score_batch(detector: Detector, images: np.ndarray, rows: list[dict], only_strict: bool,
                cfg: ServerConfig) -> dict:
    """Detector + judge on a parsed batch -> the JSON answer (GenEval's five fields + counts)."""
    dets = detector.detect(images, [row_queries(r) for r in rows])
    if len(dets) != len(rows):
        raise RuntimeError(f"detector {detector.name} returned {len(dets)} results for {len(rows)} images")
    judged = [geneval_judge(d, r, only_strict=only_strict, counting_threshold=cfg.counting_threshold,
                            threshold=cfg.threshold, max_objects=cfg.max_objects) for d, r in zip(dets, rows)]
    group_rewards: dict[str, list[float]] = {t: [] for t in GENEVAL_TAGS}
    group_strict: dict[str, list[float]] = {t: [] for t in GENEVAL_TAGS}
    for j, r in zip(judged, rows):
        for t in GENEVAL_TAGS:
            group_rewards[t].append(float(j.correct) if t == r["tag"] else OTHER_TAG_VALUE)
            group_strict[t].append(float(j.strict) if t == r["tag"] else OTHER_TAG_VALUE)
    return {"scores": [j.score for j in judged],
            "rewards": [float(j.correct) for j in judged],
            "strict_rewards": [float(j.strict) for j in judged],
            "group_rewards": group_rewards,
            "group_strict_rewards": group_strict,
            "counts": [j.counts for j in judged],
            "detector": detector.name}


# --- the FastAPI app -------------------------------------------------------------------------------

class _DetectorState:
    """The worker's detector, loaded in a background thread so /health can say "loading"."""

    def __init__(self, cfg: ServerConfig):
        self.cfg, self.detector, self.error, self.status = cfg, None, None, "loading"
        self.lock = threading.Lock()      # serialise detector calls within one worker process

    def load(self) -> None:
        t0 = time.perf_counter()
        try:
            self.detector = build_detector(self.cfg.detector, self.cfg.detector_path, self.cfg.device)
            self.status = "ready"
            log.info("detector %s ready in %.2f s (pid %d)", self.cfg.detector, time.perf_counter() - t0, os.getpid())
        except Exception as e:  # reported by /health and every scoring request, server stays up
            self.error, self.status = f"{type(e).__name__}: {e}", "error"
            log.exception("detector %s failed to load", self.cfg.detector)


async def _read_limited(request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise RequestError(400, f"Content-Length={declared!r} is not a number")
        if int(declared) > limit:
            raise RequestError(413, f"request body of {declared} bytes is above the limit "
                                    f"max_request_bytes={limit}")
    chunks, total = [], 0
    async for chunk in request.stream():      # also bounds chunked bodies without Content-Length
        total += len(chunk)
        if total > limit:
            raise RequestError(413, f"request body exceeds the limit max_request_bytes={limit}")
        chunks.append(chunk)
    return b"".join(chunks)


def create_app(cfg: ServerConfig | None = None):
    """App factory (``uvicorn grpo_lib.server:create_app --factory``); config from $GRPO_REWARD_SERVER_CONFIG."""
    import contextlib

    from fastapi import FastAPI
    from fastapi.responses import JSONResponse
    from starlette.concurrency import run_in_threadpool

    cfg = cfg or ServerConfig.from_env()
    state = _DetectorState(cfg)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        threading.Thread(target=state.load, name="detector-load", daemon=True).start()
        yield

    app = FastAPI(title="grpo_lib counting reward server", lifespan=lifespan)
    app.state.detector_state = state

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    @app.get("/health")
    async def health():
        body = {"status": state.status, "ready": state.status == "ready", "detector": cfg.detector,
                "detector_path": cfg.detector_path, "pid": os.getpid(), "error": state.error,
                "limits": {"max_request_bytes": cfg.max_request_bytes, "max_batch": cfg.max_batch,
                           "max_image_pixels": cfg.max_image_pixels},
                "judge": {"counting_threshold": cfg.counting_threshold, "threshold": cfg.threshold,
                          "max_objects": cfg.max_objects}}
        return JSONResponse(body, status_code=200 if state.status == "ready" else 503)

    def work(body: bytes) -> dict:
        det = state.detector
        if det is None:
            raise RequestError(503, f"detector {cfg.detector} is {state.status}"
                                    + (f": {state.error}" if state.error else "; retry shortly"))
        images, rows, only_strict = parse_request(body, cfg, det)
        with state.lock:
            return score_batch(det, images, rows, only_strict, cfg)

    # a plain Starlette route: the raw request, so body limits and error messages stay ours
    async def score(request):
        try:
            body = await _read_limited(request, cfg.max_request_bytes)
            return JSONResponse(await run_in_threadpool(work, body))
        except RequestError as e:
            return error(e.status, e.message)
        except Exception as e:   # a bug: answer 500 with the cause, keep serving
            log.exception("scoring failed")
            return error(500, f"internal error: {type(e).__name__}: {e}")

    app.router.add_route("/", score, methods=["POST"])
    return app


def serve(cfg: ServerConfig, host: str = "127.0.0.1", port: int = DEFAULT_PORT, workers: int = 1,
          log_level: str = "warning") -> None:
    """Run uvicorn with ``workers`` processes, each building the app (and its detector) from the env."""
    import uvicorn
    if workers < 1:
        raise ValueError(f"workers={workers} must be >= 1")
    os.environ[CONFIG_ENV] = cfg.to_env()      # inherited by uvicorn's spawned worker processes
    uvicorn.run("grpo_lib.server:create_app", factory=True, host=host, port=port, workers=workers,
                log_level=log_level, timeout_keep_alive=30)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Counting reward server (GenEval protocol over JSON)")
    ap.add_argument("--detector", default="shapes", choices=["shapes", "owlv2"])
    ap.add_argument("--detector-path", default=None, help="local directory of the detector (owlv2)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=DEFAULT_PORT)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--max-request-bytes", type=int, default=ServerConfig.max_request_bytes)
    ap.add_argument("--max-batch", type=int, default=ServerConfig.max_batch)
    ap.add_argument("--max-image-pixels", type=int, default=ServerConfig.max_image_pixels)
    ap.add_argument("--max-objects", type=int, default=ServerConfig.max_objects)
    ap.add_argument("--log-level", default="warning")
    a = ap.parse_args(argv)
    logging.basicConfig(level=a.log_level.upper())
    if a.detector == "owlv2" and not a.detector_path:
        ap.error("--detector owlv2 needs --detector-path DIR (models are loaded only from local files)")
    cfg = ServerConfig(detector=a.detector, detector_path=a.detector_path, device=a.device,
                       max_request_bytes=a.max_request_bytes, max_batch=a.max_batch,
                       max_image_pixels=a.max_image_pixels, max_objects=a.max_objects)
    serve(cfg, host=a.host, port=a.port, workers=a.workers, log_level=a.log_level)
    return 0


# --- the client ----------------------------------------------------------------------------------

class RewardServerError(RuntimeError):
    """The reward server could not give rewards (unreachable, rejected the request, or answered garbage)."""


def encode_png(image: np.ndarray) -> str:
    """uint8 (H, W, 3) -> base64 PNG (lossless, so the server counts exactly the pixels we have)."""
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(image, mode=None).save(buf, format="PNG", compress_level=1)
    return base64.b64encode(buf.getvalue()).decode("ascii")


_RETRYABLE = (urllib.error.URLError, ConnectionError, TimeoutError, socket.timeout, http.client.HTTPException)


class RemoteCountingReward:
    """Reward contract over HTTP: ``fn(images uint8 (B, H, W, 3), prompts, metadata) -> (rewards (B,), info)``.

    rewards = strict_rewards                  (``reward="strict"``,  == counting_strict)
            = max(0, scores)                  (``reward="partial"``, == counting_partial)

    | arg          | meaning                                                                  |
    |--------------|--------------------------------------------------------------------------|
    | ``url``      | server root, e.g. ``http://127.0.0.1:18085``                              |
    | ``timeout``  | seconds per HTTP attempt                                                 |
    | ``retries``  | extra attempts after a connection error, timeout or 5xx; 4xx never retried |
    | ``backoff``  | first wait in s; doubles per retry, capped at ``max_backoff``             |
    | ``batch_size``| images per request (upstream sends 64)                                  |

    Worst case before it raises: (retries + 1) * timeout + sum of the waits. It never makes up
    a reward: any failure raises ``RewardServerError`` naming the URL and the cause.
    ``info`` (arrays (B,), keys and dtypes as the in-process ``measure_counting``): ``target`` N,
    ``count`` n (int64), ``error`` n - N, ``correct`` 1[n == N]; plus ``partial`` (clipped),
    ``score`` (upstream's unclipped partial) and ``geneval_correct`` (GenEval's rule; 0 when
    ``only_strict``, as upstream). Metadata rows must be counting rows (one include clause).
    """

    def __init__(self, url: str = f"http://127.0.0.1:{DEFAULT_PORT}", *, reward: str = "strict",
                 timeout: float = 120.0, retries: int = 3, backoff: float = 0.5, max_backoff: float = 8.0,
                 batch_size: int = 64, only_strict: bool = True):
        if reward not in ("strict", "partial"):
            raise ValueError(f"reward={reward!r} is not one of ['strict', 'partial']")
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"url={url!r} must start with http:// or https://")
        if timeout <= 0 or retries < 0 or backoff < 0 or batch_size < 1:
            raise ValueError(f"need timeout > 0, retries >= 0, backoff >= 0, batch_size >= 1; got "
                             f"timeout={timeout}, retries={retries}, backoff={backoff}, batch_size={batch_size}")
        self.url = url.rstrip("/")
        self.reward, self.timeout, self.retries = reward, float(timeout), int(retries)
        self.backoff, self.max_backoff, self.batch_size = float(backoff), float(max_backoff), int(batch_size)
        self.only_strict = bool(only_strict)

    # -- HTTP --
    def _request(self, path: str, data: bytes | None) -> dict:
        url = self.url + path
        req = urllib.request.Request(url, data=data, method="POST" if data is not None else "GET",
                                     headers={"Content-Type": "application/json"})
        t0, wait, cause = time.monotonic(), self.backoff, "no attempt made"
        for attempt in range(self.retries + 1):
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    raw = resp.read()
                break
            except urllib.error.HTTPError as e:
                msg = _error_message(e)
                if e.code < 500:          # our request is wrong: retrying cannot help
                    raise RewardServerError(f"reward server {url} rejected the request "
                                            f"(HTTP {e.code}): {msg}") from None
                cause = f"HTTP {e.code}: {msg}"
            except _RETRYABLE as e:
                cause = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
            if attempt < self.retries:
                time.sleep(wait)
                wait = min(wait * 2, self.max_backoff)
        else:
            raise RewardServerError(f"reward server {url} failed after {self.retries + 1} attempts "
                                    f"in {time.monotonic() - t0:.1f} s; last cause: {cause}")
        try:
            out = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RewardServerError(f"reward server {url} answered non-JSON ({e}): {raw[:200]!r}") from None
        if not isinstance(out, dict):
            raise RewardServerError(f"reward server {url} answered {type(out).__name__}, expected an object")
        return out

    def health(self) -> dict:
        """GET /health (a 503 'loading' answer is retried like any 5xx)."""
        return self._request("/health", None)

    def score(self, images: np.ndarray, metadata: Sequence[dict], only_strict: bool | None = None) -> dict:
        """One request: the server's raw answer for a batch (no splitting)."""
        body = json.dumps({"images": [encode_png(im) for im in images], "meta_datas": list(metadata),
                           "only_strict": self.only_strict if only_strict is None else bool(only_strict)})
        out = self._request("/", body.encode())
        n = len(images)
        for k in ("scores", "rewards", "strict_rewards", "counts"):
            if not isinstance(out.get(k), list) or len(out[k]) != n:
                raise RewardServerError(f"reward server {self.url} answered without a {n}-long {k!r}: "
                                        f"{str(out)[:200]}")
        return out

    # -- the reward contract --
    def __call__(self, images: np.ndarray, prompts: Sequence[str], metadata: Sequence[dict]
                 ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        from grpo_lib.rewards.detector import check_images
        images = check_images(np.asarray(images))
        if not len(prompts) == len(metadata) == len(images):
            raise ValueError(f"len(images)={len(images)}, len(prompts)={len(prompts)}, "
                             f"len(metadata)={len(metadata)} must agree")
        targets = []
        for i, (p, row) in enumerate(zip(prompts, metadata)):
            inc = row.get("include") if isinstance(row, dict) else None
            if not isinstance(inc, list) or len(inc) != 1 or not isinstance(inc[0], dict):
                raise ValueError(f"metadata[{i}] needs exactly one 'include' clause {{'class', 'count'}} "
                                 f"(a counting row), got {row!r}")
            if "prompt" in row and row["prompt"] != p:   # a shuffled batch would reward the wrong target
                raise ValueError(f"prompts[{i}]={p!r} differs from metadata[{i}]['prompt']={row['prompt']!r}")
            targets.append(inc[0].get("count"))
        scores, strict, geneval_correct, count = [], [], [], []
        for s in range(0, len(images), self.batch_size):
            rows = list(metadata[s:s + self.batch_size])
            out = self.score(images[s:s + self.batch_size], rows)
            scores += out["scores"]
            strict += out["strict_rewards"]
            geneval_correct += out["rewards"]
            for row, c in zip(rows, out["counts"]):
                cls = row["include"][0]["class"]
                if not isinstance(c, dict) or not isinstance(c.get(cls), int):
                    raise RewardServerError(f"reward server {self.url} gave no count for class {cls!r}: {c!r}")
                count.append(c[cls])
        score = np.asarray(scores, dtype=np.float64)
        if not np.all(np.isfinite(score)):
            raise RewardServerError(f"reward server {self.url} answered non-finite scores {scores}")
        target, n = np.asarray(targets, dtype=np.int64), np.asarray(count, dtype=np.int64)
        info = {"target": target,                                    # same keys/dtypes as in-process
                "count": n,
                "error": n - target,
                "correct": np.asarray(strict, dtype=np.float32),    # 1[n == N] (strict_rewards)
                "partial": np.maximum(score, 0.0).astype(np.float32),   # the in-process clip
                "score": score.astype(np.float32),                  # upstream's unclipped partial
                "geneval_correct": np.asarray(geneval_correct, dtype=np.float32)}  # 0 if only_strict
        rewards = info["correct"] if self.reward == "strict" else info["partial"]
        return rewards.copy(), info


def _error_message(e: urllib.error.HTTPError) -> str:
    try:
        raw = e.read()
    except Exception:
        return e.reason or ""
    try:
        return str(json.loads(raw).get("error", raw[:300]))
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return raw[:300].decode("utf-8", "replace")


if __name__ == "__main__":
    raise SystemExit(main())
