"""``python -m grpo_lib.server``: the command line -> ``ServerConfig`` -> ``serve``."""
from __future__ import annotations

import argparse
import logging
import os

from . import app as _app
from .request import ServerConfig

TOKEN_ENV = "GRPO_REWARD_TOKEN"


def main(argv: list[str] | None = None) -> int:
    d = ServerConfig()
    ap = argparse.ArgumentParser(prog="python -m grpo_lib.server",
                                 description="Counting reward server (GenEval protocol over JSON)")
    ap.add_argument("--detector", default="shapes", choices=["shapes", "owlv2"])
    ap.add_argument("--detector-path", default=None, help="local directory of the detector (owlv2)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=_app.DEFAULT_PORT)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--max-request-bytes", type=int, default=d.max_request_bytes, help="JSON body size")
    ap.add_argument("--max-batch", type=int, default=d.max_batch, help="images per request")
    ap.add_argument("--max-image-pixels", type=int, default=d.max_image_pixels, help="W x H of one image")
    ap.add_argument("--max-total-pixels", type=int, default=d.max_total_pixels,
                    help="sum of W x H over a request's images")
    ap.add_argument("--max-pixel-queries", type=int, default=d.max_pixel_queries,
                    help="sum over images of W x H x classes asked about (the detector's work)")
    ap.add_argument("--max-inflight", type=int, default=d.max_inflight,
                    help="requests read, parsed and scored at once per worker")
    ap.add_argument("--max-connections", type=int, default=d.max_connections,
                    help="open connections per worker (more get 503)")
    ap.add_argument("--request-timeout", type=float, default=d.request_timeout_s,
                    help="seconds to receive a request's headers, and then its body (408)")
    ap.add_argument("--max-objects", type=int, default=d.max_objects)
    ap.add_argument("--token", default=os.environ.get(TOKEN_ENV) or None,
                    help=f"bearer token every request must carry (default ${TOKEN_ENV}); "
                         "required when --host is not loopback")
    ap.add_argument("--docs", action="store_true", help="serve /docs, /redoc and /openapi.json")
    ap.add_argument("--log-level", default="warning")
    a = ap.parse_args(argv)
    logging.basicConfig(level=a.log_level.upper())
    if a.detector == "owlv2" and not a.detector_path:
        ap.error("--detector owlv2 needs --detector-path DIR (models are loaded only from local files)")
    loopback = _app.is_loopback(a.host)
    if not loopback and not a.token:
        ap.error(f"--host {a.host} is not loopback: set a bearer token with --token or ${TOKEN_ENV}")
    try:
        cfg = ServerConfig(detector=a.detector, detector_path=a.detector_path, device=a.device,
                           max_request_bytes=a.max_request_bytes, max_batch=a.max_batch,
                           max_image_pixels=a.max_image_pixels, max_total_pixels=a.max_total_pixels,
                           max_pixel_queries=a.max_pixel_queries, max_inflight=a.max_inflight,
                           max_connections=a.max_connections, request_timeout_s=a.request_timeout,
                           max_objects=a.max_objects, token=a.token, docs=a.docs,
                           allowed_hosts=sorted({*_app.LOOPBACK_NAMES, a.host}) if loopback else None)
    except ValueError as e:
        ap.error(str(e))
    _app.serve(cfg, host=a.host, port=a.port, workers=a.workers, log_level=a.log_level)
    return 0
