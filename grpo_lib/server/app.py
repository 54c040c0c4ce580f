"""The reward server's HTTP side: the ASGI app (``create_app``) and ``serve`` (uvicorn, N workers).

Per request, in order (each refusal is ``{"error": message}`` with its status):

| check                                                        | status |
|--------------------------------------------------------------|--------|
| Host header is one of ``allowed_hosts`` (loopback names when bound to loopback) | 421 |
| ``Authorization: Bearer <token>`` when a token is set        | 401    |
| ``POST /``: ``Content-Type: application/json``               | 415    |
| Content-Length <= ``max_request_bytes`` (before any byte of the body is read) | 413 |
| wait for one of ``max_inflight`` slots, then the body within ``request_timeout_s`` | 408 / 413 |
| parse + score in a worker thread (``request.parse_request``, ``score_batch``) | 400 / 413 / 503 |

The event loop only moves bytes: parsing and scoring run in a thread, at most ``max_inflight`` per
worker, so the loop keeps answering ``/health`` and uvicorn's worker health check. Workers end
with their supervisor (``die_with_parent``), so a ``kill -9`` of it frees the port.
"""
from __future__ import annotations

import asyncio
import ctypes
import hmac
import ipaddress
import json
import logging
import os
import signal
import threading
import time

from .detectors import build_detector
from .request import CONFIG_ENV, RequestError, ServerConfig, cause, parse_request, score_batch

log = logging.getLogger("grpo_lib.server")

DEFAULT_PORT = 18085
PARENT_ENV = "GRPO_REWARD_SERVER_PARENT"     # the supervisor's pid, for its workers
LOOPBACK_NAMES = ["127.0.0.1", "localhost", "::1"]


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# --- workers end with their supervisor -----------------------------------------------------------

def die_with_parent(parent_pid: int, grace_s: float = 8.0, poll_s: float = 0.25) -> None:
    """Make this worker process end when ``parent_pid`` (uvicorn's supervisor) does.

    Linux: ``prctl(PR_SET_PDEATHSIG, SIGTERM)`` (uvicorn spawns workers from its main thread, so the
    signal fires on the supervisor's death, not a thread's). Everywhere: a thread that polls
    ``getppid()`` and sends the same SIGTERM (uvicorn's graceful shutdown), then ``_exit`` if the
    shutdown has not ended ``grace_s`` later.
    """
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)     # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass                                                           # not Linux: the thread does it

    def watch():
        while os.getppid() == parent_pid:
            time.sleep(poll_s)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(grace_s)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


# --- the detector, loaded in the background ------------------------------------------------------

class _DetectorState:
    """The worker's detector, loaded in a background thread so /health can say "loading"."""

    def __init__(self, cfg: ServerConfig):
        self.cfg, self.detector, self.error, self.status = cfg, None, None, "loading"
        self.lock = threading.Lock()      # serialise detector calls within one worker process

    def load(self) -> None:
        t0 = time.perf_counter()
        try:
            self.detector = build_detector(self.cfg.detector, self.cfg.detector_path, self.cfg.device,
                                           chunk_pixels=self.cfg.max_image_pixels)
            self.status = "ready"
            log.info("detector %s ready in %.2f s (pid %d)", self.cfg.detector, time.perf_counter() - t0, os.getpid())
        except Exception as e:  # reported by /health and every scoring request, server stays up
            self.error, self.status = f"{type(e).__name__}: {e}", "error"
            log.exception("detector %s failed to load", self.cfg.detector)


# --- the guard: Host and token, before any route -------------------------------------------------

async def _send_json(send, status: int, payload: dict, headers: list | None = None) -> None:
    body = json.dumps(payload).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


class Guard:
    """ASGI middleware: refuse a request whose Host is not allowed (421; a web page reaching the
    port through DNS rebinding names its own host) or that lacks the bearer token (401)."""

    def __init__(self, app, cfg: ServerConfig):
        self.app = app
        self.hosts = None if cfg.allowed_hosts is None else {h.lower() for h in cfg.allowed_hosts}
        self.token = None if cfg.token is None else f"Bearer {cfg.token}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            headers = dict(scope["headers"])
            if self.hosts is not None:
                host = headers.get(b"host", b"").decode("latin-1").lower()
                name = host[1:host.index("]")] if host.startswith("[") and "]" in host else host.rsplit(":", 1)[0]
                if name not in self.hosts:
                    return await _send_json(send, 421, {"error": f"Host header {host[:80]!r} is not one of "
                                                                 f"{sorted(self.hosts)}"})
            if self.token is not None and not hmac.compare_digest(headers.get(b"authorization", b""), self.token):
                return await _send_json(send, 401, {"error": "missing or wrong bearer token (Authorization: "
                                                             "Bearer <token>, see --token / GRPO_REWARD_TOKEN)"},
                                        [(b"www-authenticate", b"Bearer")])
        await self.app(scope, receive, send)


# --- the app ---------------------------------------------------------------------------------------

def check_declared_length(headers, limit: int) -> None:
    """413 from Content-Length alone, before the body is read (the client still gets the answer:
    uvicorn reads and drops the rest of a keep-alive body after responding)."""
    declared = headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise RequestError(400, f"Content-Length={declared[:40]!r} is not a number")
        if int(declared) > limit:
            raise RequestError(413, f"request body of {declared} bytes is above the limit "
                                    f"max_request_bytes={limit}")


async def _read_body(request, limit: int) -> bytes:
    chunks, total = [], 0
    async for chunk in request.stream():      # also bounds chunked bodies without Content-Length
        total += len(chunk)
        if total > limit:
            raise RequestError(413, f"request body exceeds the limit max_request_bytes={limit}")
        chunks.append(chunk)
    return b"".join(chunks)


def create_app(cfg: ServerConfig | None = None):
    """App factory (``uvicorn grpo_lib.server.app:create_app --factory``); config from $GRPO_REWARD_SERVER_CONFIG."""
    import contextlib

    from fastapi import FastAPI
    from fastapi.responses import JSONResponse
    from starlette.concurrency import run_in_threadpool

    cfg = cfg or ServerConfig.from_env()
    parent = os.environ.get(PARENT_ENV)
    if parent and int(parent) != os.getpid():          # a uvicorn worker under a supervisor
        die_with_parent(int(parent))
    state = _DetectorState(cfg)
    slots = asyncio.Semaphore(cfg.max_inflight)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        threading.Thread(target=state.load, name="detector-load", daemon=True).start()
        yield

    docs = {} if cfg.docs else {"docs_url": None, "redoc_url": None, "openapi_url": None}
    app = FastAPI(title="grpo_lib counting reward server", lifespan=lifespan, **docs)
    app.state.detector_state = state

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    @app.get("/health")
    async def health():
        body = {"status": state.status, "ready": state.status == "ready", "detector": cfg.detector,
                "detector_path": cfg.detector_path, "pid": os.getpid(), "error": state.error,
                "limits": cfg.limits(), "token_required": cfg.token is not None,
                "judge": {"counting_threshold": cfg.counting_threshold, "threshold": cfg.threshold,
                          "max_objects": cfg.max_objects}}
        return JSONResponse(body, status_code=200 if state.status == "ready" else 503)

    def work(body: bytes) -> dict:
        det = state.detector
        if det is None:
            raise RequestError(503, f"detector {cfg.detector} is {state.status}"
                                    + (f": {state.error}" if state.error else "; retry shortly"))
        images, rows, only_strict = parse_request(body, cfg, det)
        del body
        with state.lock:
            return score_batch(det, images, rows, only_strict, cfg)

    # a plain Starlette route: the raw request, so body limits and error messages stay ours
    async def score(request):
        try:
            ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
            if ctype != "application/json":
                raise RequestError(415, f"Content-Type {ctype[:60]!r} is not 'application/json'")
            check_declared_length(request.headers, cfg.max_request_bytes)
            async with slots:
                try:
                    body = await asyncio.wait_for(_read_body(request, cfg.max_request_bytes), cfg.request_timeout_s)
                except asyncio.TimeoutError:
                    raise RequestError(408, f"request body not received within request_timeout_s="
                                            f"{cfg.request_timeout_s}") from None
                return JSONResponse(await run_in_threadpool(work, body))
        except RequestError as e:
            return error(e.status, e.message)
        except Exception as e:   # a bug: answer 500 with the cause, keep serving
            log.exception("scoring failed")
            return error(500, f"internal error: {type(e).__name__}: {cause(e)}")

    app.router.add_route("/", score, methods=["POST"])
    return Guard(app, cfg)


def serve(cfg: ServerConfig, host: str = "127.0.0.1", port: int = DEFAULT_PORT, workers: int = 1,
          log_level: str = "warning") -> None:
    """Run uvicorn with ``workers`` processes, each building the app (and its detector) from the env."""
    import uvicorn
    if workers < 1:
        raise ValueError(f"workers={workers} must be >= 1")
    if cfg.token is None and not is_loopback(host):
        raise ValueError(f"host={host!r} is not loopback: set a bearer token (--token or GRPO_REWARD_TOKEN)")
    os.environ[CONFIG_ENV] = cfg.to_env()      # inherited by uvicorn's spawned worker processes
    if workers > 1:
        os.environ[PARENT_ENV] = str(os.getpid())
    uvicorn.run("grpo_lib.server.app:create_app", factory=True, host=host, port=port, workers=workers,
                log_level=log_level, timeout_keep_alive=30, timeout_graceful_shutdown=5,
                limit_concurrency=cfg.max_connections, http="grpo_lib.server.protocol:GuardedH11Protocol")
