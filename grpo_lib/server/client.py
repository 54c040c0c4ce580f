"""``RemoteCountingReward``: the reward contract over HTTP, against ``python -m grpo_lib.server``.

Requests are sized from the server's own limits (``GET /health`` -> ``limits``, read once): a call's
images are packed in order into requests that each stay within

    max_request_bytes (the JSON body), max_batch and batch_size (images),
    max_total_pixels (images x pixels), max_pixel_queries (pixels x classes asked about),

so a large batch never meets a 413. A 4xx is never retried and raises with the server's message;
connection errors, timeouts and 5xx are retried with doubling waits. The body goes out over
``http.client`` on a keep-alive connection, so an answer the server sends before the upload ends
(a 413 from Content-Length) is read, not lost in a connection reset.
"""
from __future__ import annotations

import base64
import http.client
import io
import json
import os
import time
import urllib.parse
from typing import Sequence

import numpy as np

from .judge import row_queries

TOKEN_ENV = "GRPO_REWARD_TOKEN"
_BODY_KEYS = '{"images": [], "meta_datas": [], "only_strict": false}'   # the body without its items


class RewardServerError(RuntimeError):
    """The reward server could not give rewards (unreachable, rejected the request, or answered garbage).

    ``status`` is the HTTP status of the last answer (None when no answer came)."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


def encode_png(image: np.ndarray) -> str:
    """uint8 (H, W, 3) -> base64 PNG (lossless, so the server counts exactly the pixels we have)."""
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(image, mode=None).save(buf, format="PNG", compress_level=1)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _server_message(raw: bytes) -> str:
    try:
        msg = json.loads(raw).get("error", raw[:300])
    except (ValueError, AttributeError):
        msg = raw[:300].decode("utf-8", "replace")
    msg = str(msg)
    return msg if len(msg) <= 500 else msg[:500] + "..."


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
    | ``batch_size``| most images per request (upstream sends 64); the server's limits may cut it |
    | ``token``    | bearer token (default ``$GRPO_REWARD_TOKEN``; None: none)                 |

    Worst case before it raises: (retries + 1) * timeout + ``retry_window_s`` (the sum of the
    waits; a server down for less than that is ridden out). It never makes up a reward: any failure
    raises ``RewardServerError`` naming the URL and the cause.
    ``info`` (arrays (B,), keys and dtypes as the in-process ``measure_counting``): ``target`` N,
    ``count`` n (int64), ``error`` n - N, ``correct`` 1[n == N]; plus ``partial`` (clipped),
    ``score`` (upstream's unclipped partial) and ``geneval_correct`` (GenEval's rule; 0 when
    ``only_strict``, as upstream). Metadata rows must be counting rows (one include clause).
    """

    def __init__(self, url: str = "http://127.0.0.1:18085", *, reward: str = "strict",
                 timeout: float = 120.0, retries: int = 3, backoff: float = 0.5, max_backoff: float = 8.0,
                 batch_size: int = 64, only_strict: bool = True, token: str | None = None):
        if reward not in ("strict", "partial"):
            raise ValueError(f"reward={reward!r} is not one of ['strict', 'partial']")
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"url={url!r} must start with http:// or https://")
        if timeout <= 0 or retries < 0 or backoff < 0 or batch_size < 1:
            raise ValueError(f"need timeout > 0, retries >= 0, backoff >= 0, batch_size >= 1; got "
                             f"timeout={timeout}, retries={retries}, backoff={backoff}, batch_size={batch_size}")
        self.url = url.rstrip("/")
        parts = urllib.parse.urlsplit(self.url)
        self._conn_cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        self._netloc, self._prefix = parts.netloc, parts.path
        self.reward, self.timeout, self.retries = reward, float(timeout), int(retries)
        self.backoff, self.max_backoff, self.batch_size = float(backoff), float(max_backoff), int(batch_size)
        self.only_strict = bool(only_strict)
        self.token = token if token is not None else (os.environ.get(TOKEN_ENV) or None)
        self._limits: dict | None = None

    @property
    def retry_window_s(self) -> float:
        """Sum of the waits between attempts: how long a server may stay down without failing a call."""
        return sum(min(self.backoff * 2**i, self.max_backoff) for i in range(self.retries))

    # -- HTTP --
    def _once(self, method: str, path: str, body: bytes | None) -> tuple[int, bytes]:
        """One attempt -> (status, body). A reset while uploading may follow the server's early
        answer (a 413 from Content-Length): that answer is read before the error counts."""
        headers = {"Content-Type": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        conn = self._conn_cls(self._netloc, timeout=self.timeout)
        try:
            upload_error = None
            try:
                conn.request(method, self._prefix + path, body=body, headers=headers)
            except (BrokenPipeError, ConnectionResetError) as e:
                upload_error = e
            try:
                resp = conn.getresponse()
                return resp.status, resp.read()
            except (OSError, http.client.HTTPException):
                if upload_error is not None:
                    raise upload_error from None
                raise
        finally:
            conn.close()

    def _request(self, path: str, data: bytes | None) -> dict:
        url = self.url + path
        t0, wait, cause = time.monotonic(), self.backoff, "no attempt made"
        for attempt in range(self.retries + 1):
            try:
                status, raw = self._once("POST" if data is not None else "GET", path, data)
            except (OSError, http.client.HTTPException) as e:    # refused, reset, timeout, garbled
                cause = f"{type(e).__name__}: {e}"
            else:
                if status < 400:
                    break
                msg = _server_message(raw)
                if status < 500:          # our request is wrong: retrying cannot help
                    raise RewardServerError(f"reward server {url} rejected the request (HTTP {status}): {msg}",
                                            status)
                cause = f"HTTP {status}: {msg}"
            if attempt < self.retries:
                time.sleep(wait)
                wait = min(wait * 2, self.max_backoff)
        else:
            raise RewardServerError(f"reward server {url} failed after {self.retries + 1} attempts "
                                    f"in {time.monotonic() - t0:.1f} s; last cause: {cause}")
        try:
            out = json.loads(raw)
        except ValueError as e:
            raise RewardServerError(f"reward server {url} answered non-JSON ({e}): {raw[:200]!r}") from None
        if not isinstance(out, dict):
            raise RewardServerError(f"reward server {url} answered {type(out).__name__}, expected an object")
        return out

    def health(self) -> dict:
        """GET /health (a 503 'loading' answer is retried like any 5xx)."""
        return self._request("/health", None)

    def limits(self) -> dict:
        """The server's request limits (from /health, read once); {} for a server without /health."""
        if self._limits is None:
            try:
                lim = self.health().get("limits")
            except RewardServerError as e:
                if e.status != 404:
                    raise
                lim = None              # a plain GenEval server: only batch_size cuts requests
            self._limits = {k: v for k, v in (lim or {}).items() if isinstance(v, (int, float))}
        return self._limits

    def _body(self, pngs: Sequence[str], rows: Sequence[dict], only_strict: bool) -> bytes:
        return json.dumps({"images": list(pngs), "meta_datas": list(rows), "only_strict": only_strict}).encode()

    def _post(self, body: bytes, n: int) -> dict:
        out = self._request("/", body)
        for k in ("scores", "rewards", "strict_rewards", "counts"):
            if not isinstance(out.get(k), list) or len(out[k]) != n:
                raise RewardServerError(f"reward server {self.url} answered without a {n}-long {k!r}: "
                                        f"{str(out)[:200]}")
        return out

    def score(self, images: np.ndarray, metadata: Sequence[dict], only_strict: bool | None = None) -> dict:
        """One request: the server's raw answer for a batch (no splitting, no check against its limits)."""
        strict = self.only_strict if only_strict is None else bool(only_strict)
        return self._post(self._body([encode_png(im) for im in images], metadata, strict), len(images))

    def plan(self, pngs: Sequence[str], rows: Sequence[dict], pixels: int) -> list[tuple[int, int]]:
        """[(start, stop)]: consecutive requests, each within ``batch_size`` and the server's limits.

        ``pixels`` = H x W of every image. Body bytes are counted as ``json.dumps`` writes them.
        """
        lim = self.limits()
        max_bytes = lim.get("max_request_bytes", float("inf"))
        max_n = min(self.batch_size, lim.get("max_batch", self.batch_size))
        max_pix, max_work = lim.get("max_total_pixels", float("inf")), lim.get("max_pixel_queries", float("inf"))
        cuts, start, size, n_pix, work = [], 0, len(_BODY_KEYS), 0, 0
        for i, (s, row) in enumerate(zip(pngs, rows)):
            item = len(json.dumps(s)) + len(json.dumps(row)) + 4          # two ", " separators
            q = pixels * len(row_queries(row))
            if len(_BODY_KEYS) + item > max_bytes or pixels > max_pix or q > max_work:
                raise RewardServerError(
                    f"reward server {self.url}: image {i} alone ({item} bytes as JSON, {pixels} pixels, "
                    f"{q} pixel-queries) is above the server's limits {lim}")
            if i > start and (i - start >= max_n or size + item > max_bytes or n_pix + pixels > max_pix
                              or work + q > max_work):
                cuts.append((start, i))
                start, size, n_pix, work = i, len(_BODY_KEYS), 0, 0
            size, n_pix, work = size + item, n_pix + pixels, work + q
        if pngs:
            cuts.append((start, len(pngs)))
        return cuts

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
        pngs = [encode_png(im) for im in images]
        scores, strict, geneval_correct, count = [], [], [], []
        for s, e in self.plan(pngs, metadata, images.shape[1] * images.shape[2]):
            rows = list(metadata[s:e])
            out = self._post(self._body(pngs[s:e], rows, self.only_strict), e - s)
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
