"""One scoring request, without HTTP: limits, parsing (JSON -> images + rows), scoring -> the JSON answer.

Every limit is checked before the work it bounds, and a request over one gets 413 naming it:

| limit (``ServerConfig``) | bounds                                   | checked from                      |
|--------------------------|------------------------------------------|-----------------------------------|
| ``max_request_bytes``    | the body                                 | Content-Length, then while reading |
| ``max_json_values``      | JSON parse time: ``,`` ``:`` ``[`` ``{`` in the body (400) | the raw body, before parsing |
| ``max_batch``            | images per request                       | the parsed lists                  |
| ``max_image_pixels``     | W x H of one image                       | each PNG header, before decoding  |
| ``max_total_pixels``     | sum_i W_i H_i (images x pixels): decoded bytes = 3 x this | the PNG headers |
| ``max_pixel_queries``    | sum_i W_i H_i q_i, q_i = classes image i is asked about (pixels x classes): detector time | headers + rows |

Malformed input gets 400 naming the field; values echoed back from the request are cut to
``ECHO_CHARS`` characters (``show``), and library messages lose object reprs (``cause``).
"""
from __future__ import annotations

import base64
import binascii
import io
import json
import os
import re
import reprlib
import struct
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from .detectors import Detector
from .judge import GENEVAL_TAGS, OTHER_TAG_VALUE, geneval_judge, row_queries

CONFIG_ENV = "GRPO_REWARD_SERVER_CONFIG"
ECHO_CHARS = 80                 # longest echo of a client value in an error message
MAX_INT_DIGITS = 32             # longest integer literal parsed (CPython's int() is quadratic in digits)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_COLOUR_TYPES = {0: "L", 2: "RGB", 3: "P", 4: "LA", 6: "RGBA"}


class RequestError(Exception):
    """A bad request: ``status`` (400 / 401 / 408 / 413 / 415 / 503) and a message naming the problem."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


_repr = reprlib.Repr()
_repr.maxstring = _repr.maxother = ECHO_CHARS
_repr.maxlist = _repr.maxdict = 4
_repr.maxlevel = 2


def show(value: Any) -> str:
    """A short repr of a client value for an error message (at most about ``ECHO_CHARS`` characters)."""
    text = _repr.repr(value)
    if isinstance(value, str) and len(value) > ECHO_CHARS:
        text += f" ({len(value)} chars)"
    return text[:2 * ECHO_CHARS]


_OBJECT_REPR = re.compile(r"<[^<>]* at 0x[0-9a-fA-F]+>")


def cause(e: BaseException) -> str:
    """A library exception's message without object reprs (``<_io.BytesIO object at 0x...>``), cut short."""
    text = _OBJECT_REPR.sub("<object>", str(e))
    return text if len(text) <= 2 * ECHO_CHARS else text[:2 * ECHO_CHARS] + "..."


@dataclass
class ServerConfig:
    """What one server process needs; the CLI builds it, workers read it from $GRPO_REWARD_SERVER_CONFIG."""
    detector: str = "shapes"
    detector_path: str | None = None
    device: str = "cpu"
    max_request_bytes: int = 64 * 2**20     # whole JSON body
    max_batch: int = 256                    # images per request
    max_image_pixels: int = 2048 * 2048     # per image
    max_total_pixels: int = 64 * 512 * 512  # images x pixels (upstream's batch: 64 images of 512^2)
    max_pixel_queries: int = 2 * 64 * 512 * 512   # pixels x classes asked about
    max_inflight: int = 4                   # requests read + parsed + scored at once, per worker (scoring: one at a time)
    max_connections: int = 64               # open connections per worker (more get 503)
    request_timeout_s: float = 30.0         # to receive a request's headers, and then its body
    counting_threshold: float = 0.9
    threshold: float = 0.3
    max_objects: int = 50
    token: str | None = None                # bearer token every request must carry (None: none)
    docs: bool = False                      # serve /docs, /redoc, /openapi.json
    allowed_hosts: list[str] | None = field(default=None)   # Host header names accepted (None: any)

    def __post_init__(self):
        for name in ("max_request_bytes", "max_batch", "max_image_pixels", "max_total_pixels",
                     "max_pixel_queries", "max_inflight", "max_connections", "max_objects"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}={v!r} must be an integer >= 1")
        if not self.request_timeout_s > 0:
            raise ValueError(f"request_timeout_s={self.request_timeout_s} must be > 0")
        if self.max_image_pixels > self.max_total_pixels:
            raise ValueError(f"max_image_pixels={self.max_image_pixels} is above max_total_pixels="
                             f"{self.max_total_pixels}: a single largest image would be refused")
        if self.token == "":
            self.token = None

    @property
    def max_json_values(self) -> int:
        """Separators and containers a body may hold: a GenEval row needs about 25, so 64 per image."""
        return 64 * self.max_batch + 1024

    def limits(self) -> dict[str, int | float]:
        """The limits a client needs to size its requests (``GET /health``)."""
        return {"max_request_bytes": self.max_request_bytes, "max_batch": self.max_batch,
                "max_image_pixels": self.max_image_pixels, "max_total_pixels": self.max_total_pixels,
                "max_pixel_queries": self.max_pixel_queries, "max_json_values": self.max_json_values,
                "request_timeout_s": self.request_timeout_s}

    def to_env(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_env(cls) -> "ServerConfig":
        raw = os.environ.get(CONFIG_ENV)
        return cls(**json.loads(raw)) if raw else cls()


# --- JSON ----------------------------------------------------------------------------------------

def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise ValueError(f"integer literal of {len(text)} digits; at most {MAX_INT_DIGITS} are accepted")
    return int(text)


def parse_json(body: bytes, cfg: ServerConfig) -> Any:
    """The body's JSON, or RequestError(400). Parse time is bounded before parsing: json.loads holds
    the GIL throughout (a 60 MiB body of ``[],`` holds it for 10 s, longer than uvicorn's worker
    health check), so bodies with more than ``max_json_values`` values or integers longer than
    ``MAX_INT_DIGITS`` digits are refused; nesting too deep for the parser is a 400 too."""
    n = body.count(b",") + body.count(b":") + body.count(b"[") + body.count(b"{")
    if n > cfg.max_json_values:
        raise RequestError(400, f"body holds {n} JSON separators and containers, above the limit "
                                f"max_json_values={cfg.max_json_values} (a request of max_batch={cfg.max_batch} "
                                "GenEval rows needs far fewer)")
    try:
        return json.loads(body, parse_int=_bounded_int)
    except RecursionError:
        raise RequestError(400, "body is not JSON this server parses: nested too deeply") from None
    except ValueError as e:         # JSONDecodeError, UnicodeDecodeError, a too long integer
        raise RequestError(400, f"body is not JSON ({cause(e)}); expected "
                                '{"images": [...], "meta_datas": [...], "only_strict": bool}') from None


# --- rows ----------------------------------------------------------------------------------------

def validate_row(i: int, row: Any) -> dict:
    """A GenEval metadata row the judge can score, or RequestError(400) naming the problem."""
    def bad(msg):
        return RequestError(400, f"meta_datas[{i}]: {msg}")
    if not isinstance(row, dict):
        raise bad(f"expected a JSON object (GenEval row), got {type(row).__name__}")
    if row.get("tag") not in GENEVAL_TAGS:
        raise bad(f"tag={show(row.get('tag'))} is not one of {list(GENEVAL_TAGS)}")
    inc = row.get("include")
    if not isinstance(inc, list) or not inc:
        raise bad(f"'include' must be a non-empty list of {{'class', 'count'}} clauses, got {show(inc)}")
    exc = row.get("exclude", [])
    if not isinstance(exc, list):
        raise bad(f"'exclude' must be a list, got {show(exc)}")
    for kind, clauses in (("include", inc), ("exclude", exc)):
        for j, req in enumerate(clauses):
            if not isinstance(req, dict):
                raise bad(f"{kind}[{j}] must be an object, got {show(req)}")
            extra = sorted(set(req) - {"class", "count"})
            if extra:
                raise bad(f"{kind}[{j}] has keys {show(extra)}: colour/position clauses are not supported by "
                          "this counting server (only 'class' and 'count')")
            c, k = req.get("class"), req.get("count")
            if not isinstance(c, str) or not c.strip():
                raise bad(f"{kind}[{j}].class={show(c)} must be a non-empty string")
            lo = 0 if kind == "include" else 1       # "fewer than 0" could never hold
            if isinstance(k, bool) or not isinstance(k, int) or k < lo:
                raise bad(f"{kind}[{j}].count={show(k)} must be an integer >= {lo}")
    return row


# --- images --------------------------------------------------------------------------------------

def png_size(i: int, s: Any, max_pixels: int) -> tuple[int, int]:
    """(W, H) of image ``i`` from the first 33 bytes of its PNG (signature + IHDR), without decoding it.

    Refuses anything but 8-bit RGB (colour type 2, bit depth 8): PIL would reduce a 16-bit RGB PNG
    to 8 bits without a word.
    """
    if not isinstance(s, str):
        raise RequestError(400, f"images[{i}] must be a base64 string, got {type(s).__name__}")
    try:
        head = base64.b64decode(s[:44], validate=True)        # 44 base64 chars = 33 bytes
    except (binascii.Error, ValueError) as e:
        raise RequestError(400, f"images[{i}] is not valid base64 ({cause(e)})") from None
    if head[:8] != PNG_SIGNATURE:
        raise RequestError(400, f"images[{i}] is not a PNG image (no PNG signature in its first 8 bytes)")
    if len(head) < 33 or head[12:16] != b"IHDR":
        raise RequestError(400, f"images[{i}] is a corrupt PNG (no IHDR chunk at its start)")
    w, h, depth, colour = struct.unpack(">IIBB", head[16:26])
    if w * h > max_pixels:
        raise RequestError(413, f"images[{i}] is {w}x{h} = {w * h} pixels, above the limit "
                                f"max_image_pixels={max_pixels}")
    if colour != 2 or depth != 8:
        mode = PNG_COLOUR_TYPES.get(colour, f"colour type {colour}")
        raise RequestError(400, f"images[{i}] has PNG mode {mode!r} with {depth}-bit channels; expected "
                                "'RGB' with 8-bit channels (colour type 2, bit depth 8)")
    return w, h


def decode_image(i: int, s: str, out: np.ndarray) -> None:
    """Decode image ``i`` (base64 PNG, header already checked by ``png_size``) into ``out`` (H, W, 3)."""
    from PIL import Image
    try:
        raw = base64.b64decode(s, validate=True)
    except (binascii.Error, ValueError) as e:
        raise RequestError(400, f"images[{i}] is not valid base64 ({cause(e)})") from None
    try:
        im = Image.open(io.BytesIO(raw), formats=["PNG"])
        if im.mode != "RGB" or im.size != (out.shape[1], out.shape[0]):
            raise RequestError(400, f"images[{i}] decodes to mode {im.mode!r} size {im.size}, "
                                    f"not its header's 8-bit RGB {out.shape[1]}x{out.shape[0]}")
        im.load()
    except Image.DecompressionBombError as e:
        raise RequestError(413, f"images[{i}] is too large ({cause(e)})") from None
    except (OSError, SyntaxError, ValueError) as e:   # UnidentifiedImageError is an OSError
        raise RequestError(400, f"images[{i}] is a corrupt PNG ({cause(e)})") from None
    out[...] = np.asarray(im, dtype=np.uint8)


# --- the request ---------------------------------------------------------------------------------

def parse_request(body: bytes, cfg: ServerConfig, detector: Detector | None = None
                  ) -> tuple[np.ndarray, list[dict], bool]:
    """JSON body -> (images uint8 (B, H, W, 3), rows, only_strict); RequestError on any problem.

    Order: JSON (bounded parse), fields, rows (and the detector's ``check``), PNG headers with the
    pixel budgets, and only then the pixels, decoded into one preallocated array.
    """
    payload = parse_json(body, cfg)
    if not isinstance(payload, dict):
        raise RequestError(400, f"body must be a JSON object, got {type(payload).__name__}")
    missing = [k for k in ("images", "meta_datas") if k not in payload]
    if missing:
        raise RequestError(400, f"body lacks {missing}; expected keys 'images', 'meta_datas', 'only_strict'")
    images, rows = payload["images"], payload["meta_datas"]
    only_strict = payload.get("only_strict", False)
    if not isinstance(only_strict, bool):
        raise RequestError(400, f"only_strict={show(only_strict)} must be true or false")
    if not isinstance(images, list) or not isinstance(rows, list):
        raise RequestError(400, "'images' and 'meta_datas' must be lists")
    if len(images) != len(rows):
        raise RequestError(400, f"len(images)={len(images)} != len(meta_datas)={len(rows)}")
    if not images:
        raise RequestError(400, "empty batch: 'images' has no entries")
    if len(images) > cfg.max_batch:
        raise RequestError(413, f"batch of {len(images)} images is above the limit max_batch={cfg.max_batch}")
    rows = [validate_row(i, r) for i, r in enumerate(rows)]
    queries = [row_queries(r) for r in rows]
    if detector is not None:
        for i, qs in enumerate(queries):
            for cls, count in qs:
                try:
                    detector.check(cls, count)
                except ValueError as e:
                    raise RequestError(400, f"meta_datas[{i}]: detector {detector.name} cannot answer "
                                            f"({show(cls)}, {count}): {cause(e)}") from None
    sizes = [png_size(i, s, cfg.max_image_pixels) for i, s in enumerate(images)]
    if len(set(sizes)) > 1:
        raise RequestError(400, f"images have different sizes {sorted(set(sizes))[:4]} (W, H); "
                                "send one size per request")
    w, h = sizes[0]
    total = w * h * len(images)
    if total > cfg.max_total_pixels:
        raise RequestError(413, f"{len(images)} images of {w}x{h} are {total} pixels, above the limit "
                                f"max_total_pixels={cfg.max_total_pixels} (images x pixels); send fewer per request")
    work = w * h * sum(len(qs) for qs in queries)
    if work > cfg.max_pixel_queries:
        raise RequestError(413, f"{len(images)} images of {w}x{h} asked about {sum(len(qs) for qs in queries)} "
                                f"classes in all are {work} pixel-queries, above the limit "
                                f"max_pixel_queries={cfg.max_pixel_queries} (pixels x classes)")
    out = np.empty((len(images), h, w, 3), np.uint8)
    for i in range(len(images)):
        decode_image(i, images[i], out[i])
        images[i] = None                      # drop the base64 text as soon as its pixels exist
    return out, rows, only_strict


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
