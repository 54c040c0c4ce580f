"""The counting reward server (GenEval protocol over JSON) and its client, ``RemoteCountingReward``.

| module        | what                                                                            |
|---------------|---------------------------------------------------------------------------------|
| ``detectors`` | the ``Detector`` protocol; ``shapes`` (embedded world) and ``owlv2`` backends    |
| ``judge``     | GenEval's rules on one image's detections: score, strict, correct, counts        |
| ``request``   | ``ServerConfig`` and its limits; JSON body -> images + rows; scoring -> answer   |
| ``app``       | the ASGI app (guard, admission, body limits) and ``serve`` (uvicorn, workers)    |
| ``protocol``  | uvicorn's h11 protocol with a deadline for request headers                       |
| ``client``    | ``RemoteCountingReward``: the reward contract over HTTP, sized to the server's limits |
| ``cli``       | ``python -m grpo_lib.server``                                                    |

For counting rows (one include clause, exclude = N + 1) GenEval's ``strict == correct``. Mapping to
the in-process rewards (``grpo_lib.rewards``): ``counting_strict = strict_rewards`` and
``counting_partial = max(0, scores)``; ``RemoteCountingReward(reward="partial")`` applies that same
clip to the server's ``scores``, so remote and in-process rewards agree bit for bit.

Wire format (no pickle anywhere):

* ``POST /`` with ``Content-Type: application/json`` (and ``Authorization: Bearer <token>`` when the
  server has one), body ``{"images": [base64 8-bit RGB PNG, ...], "meta_datas": [row, ...], "only_strict": bool}``
* 200 answer ``{"scores", "rewards", "strict_rewards": [B floats], "group_rewards",
  "group_strict_rewards": {tag: [B floats], -10.0 where the image's tag differs} (as upstream),
  "counts": [{class: n_c} per image, for every include/exclude class], "detector": name}``
* 400 malformed input, 401 token, 408 body too slow, 413 over a limit (named), 415 not JSON,
  421 foreign Host, 503 detector not ready or too many connections, 500 a bug: ``{"error": message}``;
  the server stays up.
* ``GET /health`` -> ``{"status": "ready" | "loading" | "error", "detector", "limits": {...}, ...}``

Run: ``python -m grpo_lib.server --detector shapes --host 127.0.0.1 --port 18085 --workers 2``.
"""
from .app import DEFAULT_PORT, create_app, serve
from .cli import main
from .client import RemoteCountingReward, RewardServerError, encode_png
from .detectors import Detection, Detector, Owlv2Detector, Query, ShapesDetector, build_detector
from .judge import GENEVAL_TAGS, OTHER_TAG_VALUE, Judgement, geneval_judge, row_queries
from .request import CONFIG_ENV, RequestError, ServerConfig, parse_request, score_batch, validate_row

__all__ = ["CONFIG_ENV", "DEFAULT_PORT", "Detection", "Detector", "GENEVAL_TAGS", "Judgement", "OTHER_TAG_VALUE",
           "Owlv2Detector", "Query", "RemoteCountingReward", "RequestError", "RewardServerError", "ServerConfig",
           "ShapesDetector", "build_detector", "create_app", "encode_png", "geneval_judge", "main",
           "parse_request", "row_queries", "score_batch", "serve", "validate_row"]
