"""The counting reward server and its client on loopback (127.0.0.1 only, bounded loops).

Real server processes (``python -m grpo_lib.server``) on free ports, started and stopped by fixtures;
images are 32x32 scenes from ``grpo_lib.scenes.render_scene``, so every count is known.
"""
from __future__ import annotations

import base64
import contextlib
import http.server
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from grpo_lib.prompts import counting_row
from grpo_lib.scenes import render_scene
from grpo_lib.server import (Detection, RemoteCountingReward, RequestError, RewardServerError, ServerConfig,
                             encode_png, geneval_judge, parse_request)

REPO = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"


# --- helpers ------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def http_json(url: str, body: bytes | None = None, headers: dict | None = None, timeout: float = 10.0):
    """(status, parsed JSON) for a GET (body None) or POST; HTTP errors are returned, not raised."""
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@contextlib.contextmanager
def running_server(*args: str, workers: int = 2, ready_timeout: float = 45.0, port: int | None = None,
                   env: dict | None = None, token: str | None = None):
    """Start ``python -m grpo_lib.server`` on a (free) loopback port; yield (proc, url); stop it."""
    port = port or free_port()
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1",
               PYTHONUNBUFFERED="1", **(env or {}))
    auth = {"Authorization": f"Bearer {token}"} if token else {}
    errf = tempfile.TemporaryFile()          # stderr to a file: a pipe nobody reads could block the server
    proc = subprocess.Popen([sys.executable, "-m", "grpo_lib.server", "--host", HOST, "--port", str(port),
                             "--workers", str(workers), "--log-level", "warning", *args],
                            cwd=REPO, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=errf)
    url = f"http://{HOST}:{port}"
    try:
        deadline, ready_pids = time.monotonic() + ready_timeout, set()
        while len(ready_pids) < workers:
            if proc.poll() is not None:
                errf.seek(0)
                raise RuntimeError(f"server exited with {proc.returncode}: {errf.read().decode()[-3000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"server on {url} not ready within {ready_timeout} s")
            try:
                status, h = http_json(url + "/health", headers=auth, timeout=2.0)
                if status == 200 and h["ready"]:
                    ready_pids.add(h["pid"])
                    if len(ready_pids) < workers and time.monotonic() > deadline - ready_timeout / 2:
                        break      # workers share one socket; a lucky scheduler may keep hitting one
            except (urllib.error.URLError, ConnectionError, socket.timeout):
                pass
            time.sleep(0.05)
        yield proc, url
    finally:
        try:                     # our own session: the supervisor and its workers (even if it is gone)
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(10)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
        with contextlib.suppress(ProcessLookupError):    # nothing of the group may outlive the test
            for _ in range(50):
                os.killpg(proc.pid, 0)
                time.sleep(0.1)
            os.killpg(proc.pid, signal.SIGKILL)
        errf.close()


def scene_batch(n: int, seed: int, size: int = 32, wrong_every: int = 3):
    """n scenes with known counts; every ``wrong_every``-th row asks for one object more than drawn.

    Returns images uint8 (n, size, size, 3), rows, true counts (n,), expected strict (n,),
    expected partial (n,) = max(0, 1 - |N - n| / N).
    """
    rng = np.random.default_rng(seed)
    colors, shapes = ["red", "green", "blue", "yellow", "purple", "cyan"], ["circle", "square", "triangle"]
    images, rows, truth, asked = [], [], [], []
    for i in range(n):
        count = int(rng.integers(1, 11))
        color, shape = colors[rng.integers(6)], shapes[rng.integers(3)]
        scene = render_scene(count, shape, color, size=size, seed=int(rng.integers(2**31)))
        ask = count + 1 if i % wrong_every == wrong_every - 1 else count
        images.append(scene.image)
        rows.append(counting_row(f"{color} {shape}", ask))
        truth.append(count)
        asked.append(ask)
    truth, asked = np.array(truth), np.array(asked)
    return (np.stack(images), rows, truth, (truth == asked).astype(np.float32),
            np.maximum(0.0, 1.0 - np.abs(asked - truth) / asked).astype(np.float32))


# --- the judge: GenEval semantics, exact ---------------------------------------------------------

def _dets(cls: str, scores) -> list[Detection]:
    return [Detection(cls, (0.0, 0.0, 1.0, 1.0), float(s)) for s in scores]


def test_judge_partial_is_upstream_unclipped_and_strict_is_exact():
    row = counting_row("red circle", 2)
    j = geneval_judge(_dets("red circle", [0.95] * 5), row, only_strict=True)
    assert j.score == -0.5 and not j.strict and not j.correct and j.counts == {"red circle": 5}
    # N=1 with 17 found: 1 - 16 = -15 (upstream's MAX_OBJECTS=16 would have cut n to 16, score -14)
    assert geneval_judge(_dets("red circle", [1.0] * 17), counting_row("red circle", 1),
                         only_strict=True).score == -15.0
    j = geneval_judge(_dets("red circle", [0.95, 0.91]), row, only_strict=False)
    assert (j.score, j.strict, j.correct) == (1.0, True, True)


def test_judge_threshold_is_strict_above_0_9_and_other_classes_ignored():
    row = counting_row("red circle", 3)
    dets = _dets("red circle", [0.9, 0.9000001, 0.99, 0.5]) + _dets("blue square", [1.0] * 4)
    j = geneval_judge(dets, row, only_strict=False)
    assert j.counts == {"red circle": 2}                     # 0.9 itself is not > 0.9
    assert j.score == pytest.approx(1 - 1 / 3, abs=0) and not j.strict and not j.correct
    # the non-counting threshold 0.3 applies to other tags
    j = geneval_judge(_dets("red circle", [0.31, 0.29]), {**row, "tag": "single_object",
                                                          "include": [{"class": "red circle", "count": 1}],
                                                          "exclude": []}, only_strict=False)
    assert j.counts == {"red circle": 1} and j.strict and j.correct


def test_judge_count_zero_uses_the_in_process_rule():
    row = counting_row("red circle", 0)
    assert geneval_judge([], row, only_strict=True).score == 1.0
    j = geneval_judge(_dets("red circle", [0.99]), row, only_strict=True)
    assert (j.score, j.strict) == (0.0, False)


def test_judge_max_objects_50_and_exclude_rule():
    row = counting_row("red circle", 20)
    j = geneval_judge(_dets("red circle", [0.99] * 60), row, only_strict=False)
    assert j.counts == {"red circle": 50} and j.score == 1 - 30 / 20
    j16 = geneval_judge(_dets("red circle", [0.99] * 60), row, only_strict=False, max_objects=16)
    assert j16.counts == {"red circle": 16}
    # GenEval's `correct`: include n >= N and exclude n < K (K = N + 1 for counting) -> exact, like strict
    row2 = {"tag": "counting", "include": [{"class": "red circle", "count": 2}],
            "exclude": [{"class": "red circle", "count": 4}]}
    j = geneval_judge(_dets("red circle", [0.99] * 3), row2, only_strict=False)
    assert (j.strict, j.correct) == (False, True)
    assert not geneval_judge(_dets("red circle", [0.99] * 3), row2, only_strict=True).correct


# --- request parsing (no HTTP) --------------------------------------------------------------------

def _body(images, rows, only_strict=True, **extra) -> bytes:
    return json.dumps({"images": images, "meta_datas": rows, "only_strict": only_strict, **extra}).encode()


def _png_b64(arr: np.ndarray, mode: str | None = None) -> str:
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(arr).convert(mode or "RGB").save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _png_raw(w: int, h: int, depth: int, colour: int) -> str:
    """A base64 PNG written by hand (PIL cannot write 16-bit RGB): grey pixels, any bit depth / colour type."""
    import struct
    import zlib
    channels = {0: 1, 2: 3, 4: 2, 6: 4}[colour]
    row = b"\x00" + b"\x80" * (w * channels * depth // 8)
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, depth, colour, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(row * h)) + chunk(b"IEND", b""))
    return base64.b64encode(png).decode()


def _row_asking(n_classes: int) -> dict:
    """A counting row whose image is asked about ``n_classes`` classes (include + excluded others)."""
    others = ["blue square", "green triangle", "yellow circle", "purple square", "cyan triangle"]
    return {**counting_row("red circle", 2),
            "exclude": [{"class": "red circle", "count": 3}] + [{"class": c, "count": 1} for c in others[:n_classes - 1]]}


def _bad_requests():
    """(name, body bytes, expected status, substring of the message) for each malformed input."""
    img = np.full((32, 32, 3), 160, np.uint8)
    good, row = encode_png(img), counting_row("red circle", 2)
    tall = encode_png(np.full((48, 32, 3), 160, np.uint8))               # 1,536 pixels
    jpeg = io.BytesIO()
    from PIL import Image
    Image.fromarray(img).save(jpeg, format="JPEG")
    return [
        ("not json", b"{images: nope", 400, "not JSON"),
        ("json list", b"[1, 2]", 400, "JSON object"),
        ("missing meta_datas", json.dumps({"images": [good]}).encode(), 400, "meta_datas"),
        ("bad base64", _body(["@@not base64@@"], [row]), 400, "images[0] is not valid base64"),
        ("not an image", _body([base64.b64encode(b"hello world!").decode()], [row]), 400, "images[0] is not a PNG"),
        ("jpeg not png", _body([good, base64.b64encode(jpeg.getvalue()).decode()], [row, row]), 400,
         "images[1] is not a PNG"),
        ("grey png", _body([_png_b64(img, "L")], [row]), 400, "mode 'L'"),
        ("truncated png", _body([base64.b64encode(base64.b64decode(good)[:60]).decode()], [row]), 400,
         "images[0] is a corrupt PNG"),
        ("lengths differ", _body([good, good], [row]), 400, "len(images)=2 != len(meta_datas)=1"),
        ("empty batch", _body([], []), 400, "empty batch"),
        ("row not object", _body([good], ["a photo of two red circles"]), 400, "meta_datas[0]"),
        ("unknown tag", _body([good], [{**row, "tag": "numbers"}]), 400, "tag='numbers'"),
        ("no include", _body([good], [{**row, "include": []}]), 400, "'include'"),
        ("count negative", _body([good], [{**row, "include": [{"class": "red circle", "count": -1}]}]), 400,
         "include[0].count=-1 must be an integer >= 0"),
        ("exclude count zero", _body([good], [{**row, "exclude": [{"class": "red circle", "count": 0}]}]), 400,
         "exclude[0].count=0 must be an integer >= 1"),
        ("count str", _body([good], [{**row, "include": [{"class": "red circle", "count": "2"}]}]), 400,
         "count='2'"),
        ("colour clause", _body([good], [{**row, "include": [{"class": "red circle", "count": 2,
                                                              "color": "red"}]}]), 400, "not supported"),
        ("unknown class", _body([good], [counting_row("red circle", 2) | {
            "include": [{"class": "pink cat", "count": 2}]}]), 400, "cannot answer ('pink cat', 2)"),
        ("count above world", _body([good], [counting_row("red circle", 2) | {
            "include": [{"class": "red circle", "count": 21}]}]), 400, "outside the embedded world"),
        ("only_strict str", _body([good], [row], only_strict="yes"), 400, "only_strict"),
        ("sizes differ", _body([good, encode_png(np.full((48, 48, 3), 160, np.uint8))], [row, row]), 400,
         "different sizes"),
        ("batch too large", _body([good] * 17, [row] * 17), 413, "max_batch=16"),
        ("image too large", _body([encode_png(np.full((64, 64, 3), 160, np.uint8))], [row]), 413,
         "max_image_pixels=3000"),
        # issue 15 §1: the work a request causes, checked from the PNG headers before any pixel is decoded
        ("too many pixels", _body([tall] * 11, [row] * 11), 413, "max_total_pixels=16384"),
        ("too much work", _body([good] * 7, [_row_asking(3)] * 7), 413, "max_pixel_queries=20480"),
        ("budget before pixels", _body([good] * 6 + [good[:60] + "AAAA" * 20], [_row_asking(4)] * 7), 413,
         "max_pixel_queries=20480"),
        # §2 / §5: JSON whose parse would hold the GIL, or that the parser cannot take, is a 400
        ("many JSON values", b'{"images": [' + b"[]," * 3000 + b'[]], "meta_datas": []}', 400,
         "max_json_values=2048"),
        ("deep nesting", b"[" * 1500 + b"]" * 1500, 400, "nested too deeply"),
        ("huge int", b'{"images": [], "meta_datas": [], "n": ' + b"7" * 5000 + b"}", 400, "integer literal of 5000"),
        # §6: echoed values are cut short
        ("huge tag", _body([good], [{**row, "tag": "x" * 50_000}]), 400, "(50000 chars)"),
        # §9: 8-bit RGB only, as the message says
        ("16-bit png", _body([_png_raw(32, 32, 16, 2)], [row]), 400, "'RGB' with 16-bit channels"),
        ("grey 16-bit png", _body([_png_raw(32, 32, 16, 0)], [row]), 400, "mode 'L'"),
    ]


SMALL_LIMITS = dict(max_batch=16, max_image_pixels=3000, max_request_bytes=60_000, max_total_pixels=16 * 1024,
                    max_pixel_queries=20 * 1024)


@pytest.mark.parametrize("name,body,status,needle", _bad_requests(), ids=[b[0] for b in _bad_requests()])
def test_parse_request_rejects_malformed_input(name, body, status, needle):
    from grpo_lib.server import ShapesDetector
    with pytest.raises(RequestError) as e:
        parse_request(body, ServerConfig(**SMALL_LIMITS), ShapesDetector())
    assert e.value.status == status and needle in e.value.message, e.value.message
    _assert_short_and_clean(e.value.message)


def _assert_short_and_clean(message: str):
    """§6: no unbounded echo of client input, no object reprs."""
    assert len(message) < 400 and " at 0x" not in message and "BytesIO" not in message, message


def test_parse_request_roundtrips_pixels_exactly():
    images, rows, *_ = scene_batch(5, seed=1)
    body = _body([encode_png(im) for im in images], rows, only_strict=False)
    got, got_rows, only_strict = parse_request(body, ServerConfig(), None)
    assert got.dtype == np.uint8 and np.array_equal(got, images) and got_rows == rows and only_strict is False


# --- the client against a stub HTTP server (retries, backoff, 4xx, garbage) ------------------------

@contextlib.contextmanager
def stub_server(responses, health: dict | None = None):
    """Loopback HTTP stub answering POSTs with ``responses`` in turn: (status, bytes), or a function
    body -> (status, bytes); records POST times (``calls``) and bodies (``calls.bodies``).
    ``GET /health`` answers ``{"status": "ready", "limits": health}``, or 404 when ``health`` is None."""
    class Calls(list):
        bodies: list[bytes] = []
    calls = Calls()
    calls.bodies = []

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _answer(self, status, body):
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            if self.path == "/health" and health is not None:
                self._answer(200, json.dumps({"status": "ready", "ready": True, "limits": health}).encode())
            else:
                self._answer(404, b'{"error": "no such path"}')

        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            calls.append(time.monotonic())
            calls.bodies.append(body)
            self._answer(*(responses(body) if callable(responses)
                           else responses[min(len(calls), len(responses)) - 1]))

        def log_message(self, *a):
            pass

    srv = http.server.ThreadingHTTPServer((HOST, 0), Handler)
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    t.start()
    try:
        yield f"http://{HOST}:{srv.server_address[1]}", calls
    finally:
        srv.shutdown()
        srv.server_close()


def _ok_answer(n: int, count: int = 2) -> bytes:
    return json.dumps({"scores": [1.0] * n, "rewards": [0.0] * n, "strict_rewards": [1.0] * n,
                       "counts": [{"red circle": count}] * n}).encode()


def test_client_retries_5xx_with_exponential_backoff_then_succeeds():
    images, rows = np.zeros((2, 32, 32, 3), np.uint8), [counting_row("red circle", 2)] * 2
    err = json.dumps({"error": "detector shapes is loading"}).encode()
    with stub_server([(503, err), (500, err), (200, _ok_answer(2))]) as (url, calls):
        fn = RemoteCountingReward(url, retries=3, backoff=0.1, timeout=5)
        rewards, info = fn(images, [r["prompt"] for r in rows], rows)
    assert rewards.dtype == np.float32 and rewards.tolist() == [1.0, 1.0] and info["count"].tolist() == [2, 2]
    assert len(calls) == 3
    gaps = np.diff(calls)
    # waits 0.1 then 0.2 s (lower bounds are exact; upper bounds leave room for a loaded machine)
    assert 0.1 <= gaps[0] < 0.2 + 0.5 and 0.2 <= gaps[1] < 0.4 + 0.5


def test_client_gives_up_on_persistent_5xx_naming_url_and_cause():
    images, rows = np.zeros((1, 32, 32, 3), np.uint8), [counting_row("red circle", 2)]
    with stub_server([(500, b'{"error": "internal error: boom"}')]) as (url, calls):
        fn = RemoteCountingReward(url, retries=2, backoff=0.05, timeout=5)
        with pytest.raises(RewardServerError, match=r"failed after 3 attempts.*HTTP 500: internal error: boom") as e:
            fn(images, [r["prompt"] for r in rows], rows)
    assert url in str(e.value) and len(calls) == 3


def test_client_does_not_retry_4xx_and_rejects_garbage_answers():
    images, rows = np.zeros((2, 32, 32, 3), np.uint8), [counting_row("red circle", 2)] * 2
    with stub_server([(400, b'{"error": "meta_datas[1]: tag=None"}')]) as (url, calls):
        with pytest.raises(RewardServerError, match=r"rejected the request \(HTTP 400\): meta_datas\[1\]"):
            RemoteCountingReward(url, retries=5, backoff=0.05)(images, [r["prompt"] for r in rows], rows)
    assert len(calls) == 1
    for garbage, needle in [(b"<html>oops</html>", "non-JSON"), (_ok_answer(1), "2-long 'scores'"),
                            (json.dumps({"scores": [1, 1], "rewards": [0, 0], "strict_rewards": [1, 1],
                                         "counts": [{"blue square": 1}] * 2}).encode(), "no count for class"),
                            (json.dumps({"scores": [float("nan")] * 2, "rewards": [0, 0],
                                         "strict_rewards": [1, 1], "counts": [{"red circle": 1}] * 2}).encode(),
                             "non-finite")]:
        with stub_server([(200, garbage)]) as (url, _):
            with pytest.raises(RewardServerError, match=needle):
                RemoteCountingReward(url, retries=0)(images, [r["prompt"] for r in rows], rows)


def test_client_raises_after_retry_budget_when_nothing_listens():
    url = f"http://{HOST}:{free_port()}"            # bound then released: nothing listens there
    fn = RemoteCountingReward(url, retries=3, backoff=0.05, timeout=2)
    t0 = time.monotonic()
    with pytest.raises(RewardServerError, match="failed after 4 attempts.*(Connection refused|Errno 111)") as e:
        fn(np.zeros((1, 32, 32, 3), np.uint8), ["a photo of one red circle"], [counting_row("red circle", 1)])
    assert url in str(e.value) and time.monotonic() - t0 < 0.05 + 0.1 + 0.2 + 1.0


def test_client_validates_its_arguments():
    with pytest.raises(ValueError, match="reward='count'"):
        RemoteCountingReward("http://127.0.0.1:1", reward="count")
    fn = RemoteCountingReward("http://127.0.0.1:1")
    with pytest.raises(ValueError, match="uint8"):
        fn(np.zeros((1, 32, 32, 3), np.float32), ["p"], [counting_row("red circle", 1)])
    with pytest.raises(ValueError, match="must agree"):
        fn(np.zeros((2, 32, 32, 3), np.uint8), ["p"], [counting_row("red circle", 1)])
    with pytest.raises(ValueError, match=r"prompts\[0\]='two red circles' differs"):
        fn(np.zeros((1, 32, 32, 3), np.uint8), ["two red circles"], [counting_row("red circle", 1)])
    with pytest.raises(ValueError, match="exactly one 'include' clause"):
        fn(np.zeros((1, 32, 32, 3), np.uint8), ["p"], [{"tag": "counting", "include": []}])


# --- the OWLv2 backend: a tiny random model saved offline, loaded only from its directory ----------

def build_tiny_owlv2(out_dir: Path, size: int = 32, seed: int = 0) -> Path:
    """A randomly initialised OWLv2 (+ processor with an in-memory byte-level vocabulary) in ``out_dir``.

    The class head's shift/scale are set so the median (patch, query) score on scenes is 0.9, so the
    counts the judge sees vary (by query and image; it is a random network).
    """
    import torch
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer, Owlv2Config, Owlv2ForObjectDetection, Owlv2ImageProcessorPil, Owlv2Processor
    vocab = {}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    # special tokens last: OWLv2 treats a query whose first token id is 0 as padding and masks it
    bos, eos = vocab.setdefault("<|startoftext|>", len(vocab)), vocab.setdefault("<|endoftext|>", len(vocab))
    tok = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=40)
    proc = Owlv2Processor(image_processor=Owlv2ImageProcessorPil(size={"height": size, "width": size}), tokenizer=tok)
    cfg = Owlv2Config(
        text_config=dict(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=40, bos_token_id=bos, eos_token_id=eos,
                         pad_token_id=eos),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=size, patch_size=8),
        projection_dim=16)
    torch.manual_seed(seed)
    model = Owlv2ForObjectDetection(cfg).eval()
    head = model.class_head
    with torch.no_grad():
        for lin in (head.logit_shift, head.logit_scale):
            lin.weight.zero_()
        head.logit_scale.bias.fill_(3.0)                     # scale elu(3) + 1 = 4
        head.logit_shift.bias.fill_(0.0)
        images, rows, *_ = scene_batch(8, seed=seed + 100, size=size)
        texts = [[f"a photo of a {r['include'][0]['class']}"] for r in rows]
        inputs = proc(text=texts, images=list(images), return_tensors="pt", padding="max_length")
        cos = model(**inputs).logits / 4.0                   # (B, Q, 1) cosine similarities
        # logit(0.9) = 2.197 at the median cosine: half the scores above 0.9
        head.logit_shift.bias.fill_(2.1972 / 4.0 - float(cos.median()))
    model.save_pretrained(out_dir)
    proc.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="module")
def tiny_owlv2(tmp_path_factory):
    return build_tiny_owlv2(tmp_path_factory.mktemp("owlv2"))


def test_owlv2_detector_matches_transformers_post_processing(tiny_owlv2):
    import torch
    from transformers import Owlv2ForObjectDetection, Owlv2Processor
    from grpo_lib.server import Owlv2Detector
    images, rows, *_ = scene_batch(4, seed=3)
    det = Owlv2Detector(tiny_owlv2, min_score=0.5)
    classes = [[r["include"][0]["class"]] for r in rows]
    got = det.detect(images, [[(c[0], r["include"][0]["count"])] for c, r in zip(classes, rows)])
    # reference: transformers' own post-processing (one query per image, so its max over queries is ours)
    model = Owlv2ForObjectDetection.from_pretrained(tiny_owlv2, local_files_only=True).eval()
    proc = Owlv2Processor.from_pretrained(tiny_owlv2, local_files_only=True)
    texts = [[f"a photo of a {c[0]}"] for c in classes]
    with torch.no_grad():
        out = model(**proc(text=texts, images=list(images), return_tensors="pt", padding="max_length",
                             truncation=True))
    ref = proc.post_process_grounded_object_detection(out, threshold=0.5, target_sizes=[(32, 32)] * 4)
    assert sum(len(g) for g in got) > 8                   # the head was tuned to fire; not a vacuous check
    for g, r, c in zip(got, ref, classes):
        assert len(g) == len(r["scores"]) and all(d.cls == c[0] for d in g)
        np.testing.assert_allclose([d.score for d in g], r["scores"].numpy(), rtol=1e-6)
        np.testing.assert_allclose([d.box for d in g], r["boxes"].numpy(), rtol=1e-5, atol=1e-4)


def test_owlv2_backend_served_end_to_end(tiny_owlv2, monkeypatch):
    """``--detector owlv2 --detector-path DIR``: the served counts == the model's scores > 0.9."""
    from grpo_lib.server import Owlv2Detector
    images, rows, *_ = scene_batch(6, seed=4)
    rows[1] = {**rows[1], "include": rows[1]["include"] + [{"class": "blue square", "count": 3}]}  # 2 queries
    dets = Owlv2Detector(tiny_owlv2).detect(images, [[(c["class"], c["count"]) for c in r["include"]]
                                                     for r in rows])
    expected = [{c["class"]: sum(d.cls == c["class"] and d.score > 0.9 for d in ds) for c in r["include"]}
                for ds, r in zip(dets, rows)]
    # the counts vary (the head was tuned so that scores straddle 0.9): not a vacuous comparison
    assert len({v for e in expected for v in e.values()}) >= 3, expected
    # the command line -> config (serve() stubbed: a second torch-importing process costs ~10 s here)
    import grpo_lib.server as server_mod
    import grpo_lib.server.app as app_mod
    seen = {}
    monkeypatch.setattr(app_mod, "serve", lambda cfg, **kw: seen.update(cfg=cfg, **kw))
    server_mod.main(["--detector", "owlv2", "--detector-path", str(tiny_owlv2), "--workers", "3"])
    assert seen["cfg"].detector_path == str(tiny_owlv2) and seen["workers"] == 3 and seen["host"] == HOST
    # ... and the app that config builds, over HTTP (in-process ASGI client)
    from fastapi.testclient import TestClient
    with TestClient(server_mod.create_app(seen["cfg"]), base_url=f"http://{HOST}") as client:
        for _ in range(400):                                      # bounded wait for the loader thread
            h = client.get("/health")
            if h.status_code == 200:
                break
            time.sleep(0.02)
        assert h.json()["detector"] == "owlv2" and h.json()["detector_path"] == str(tiny_owlv2)
        r = client.post("/", content=_body([encode_png(im) for im in images], rows, only_strict=False),
                        headers={"Content-Type": "application/json"})
    assert r.status_code == 200, r.text
    out = r.json()
    got_counts = [{c["class"]: cnt[c["class"]] for c in row["include"]} for cnt, row in zip(out["counts"], rows)]
    assert got_counts == expected
    exp_scores = [np.mean([1 - abs(c["count"] - e[c["class"]]) / c["count"] for c in r["include"]])
                  for e, r in zip(expected, rows)]
    np.testing.assert_allclose(out["scores"], exp_scores, rtol=0, atol=1e-12)
    assert out["group_rewards"]["position"] == [-10.0] * 6


def test_health_says_loading_then_ready(tiny_owlv2):
    """The detector loads in a background thread: /health answers 503 "loading", then 200 "ready"."""
    from fastapi.testclient import TestClient
    from grpo_lib.server import create_app
    app = create_app(ServerConfig(detector="owlv2", detector_path=str(tiny_owlv2)))
    seen = []
    with TestClient(app) as client:
        for _ in range(400):                                      # bounded wait for the loader thread
            h = client.get("/health")
            seen.append((h.status_code, h.json()["status"]))
            if h.status_code == 200:
                break
            time.sleep(0.01)
        assert seen[-1] == (200, "ready") and set(seen[:-1]) <= {(503, "loading")}
    bad = create_app(ServerConfig(detector="owlv2", detector_path="/nonexistent/owlv2"))
    with TestClient(bad) as client:
        for _ in range(200):
            h = client.get("/health")
            if h.json()["status"] != "loading":
                break
            time.sleep(0.01)
        assert h.status_code == 503 and h.json()["status"] == "error" and "/nonexistent/owlv2" in h.json()["error"]
        r = client.post("/", content=_body([encode_png(np.zeros((32, 32, 3), np.uint8))],
                                           [counting_row("red circle", 1)]),
                        headers={"Content-Type": "application/json"})
        assert r.status_code == 503 and "is error" in r.json()["error"]


def test_owlv2_needs_a_local_directory(tmp_path):
    from grpo_lib.server import build_detector
    with pytest.raises(ValueError, match="needs --detector-path"):
        build_detector("owlv2", None)
    with pytest.raises(ValueError, match="never downloaded"):
        build_detector("owlv2", "google/owlv2-base-patch16-ensemble")
    with pytest.raises(ValueError, match="not a directory holding an OWLv2"):
        build_detector("owlv2", str(tmp_path))
    with pytest.raises(ValueError, match="detector='mask2former'"):
        build_detector("mask2former")


# --- a real server process on loopback ------------------------------------------------------------

LIMIT_ARGS = tuple(a for k, v in SMALL_LIMITS.items() for a in ("--" + k.replace("_", "-"), str(v)))


@pytest.fixture(scope="module")
def shapes_server():
    with running_server("--detector", "shapes", *LIMIT_ARGS, workers=2) as (proc, url):
        yield url


def test_health_reports_detector_and_limits(shapes_server):
    status, h = http_json(shapes_server + "/health")
    assert status == 200 and h["status"] == "ready" and h["detector"] == "shapes"
    assert h["limits"] == {**SMALL_LIMITS, "max_json_values": 64 * 16 + 1024, "request_timeout_s": 30.0}
    assert h["token_required"] is False
    assert h["judge"] == {"counting_threshold": 0.9, "threshold": 0.3, "max_objects": 50}


def test_answer_has_geneval_fields(shapes_server):
    images, rows, truth, strict, partial = scene_batch(6, seed=11)
    rows[4] = {"tag": "single_object", "include": [{"class": rows[4]["include"][0]["class"], "count": 1}],
               "prompt": "a photo of a thing"}
    out = RemoteCountingReward(shapes_server, only_strict=False).score(images, rows)
    assert out["detector"] == "shapes"
    assert set(out["group_rewards"]) == set(out["group_strict_rewards"]) == {
        "single_object", "two_object", "counting", "colors", "position", "color_attr"}
    assert out["group_strict_rewards"]["counting"] == [strict[i] if i != 4 else -10.0 for i in range(6)]
    assert out["group_strict_rewards"]["single_object"] == [-10.0] * 4 + [float(truth[4] == 1), -10.0]
    assert out["group_strict_rewards"]["position"] == [-10.0] * 6
    # counting rows: exclude is N + 1, so GenEval's `correct` equals strict
    assert [out["rewards"][i] for i in (0, 1, 2, 3, 5)] == [strict[i] for i in (0, 1, 2, 3, 5)]
    assert [c[r["include"][0]["class"]] for c, r in zip(out["counts"], rows)] == truth.tolist()
    asked = np.array([r["include"][0]["count"] for r in rows])
    np.testing.assert_array_equal(out["scores"], 1 - np.abs(asked - truth) / asked)   # unclipped
    only = RemoteCountingReward(shapes_server, only_strict=True).score(images, rows)
    assert only["rewards"] == [0.0] * 6 and only["strict_rewards"] == out["strict_rewards"]


def test_eight_concurrent_clients_get_every_answer_right(shapes_server):
    """8 clients x 50 requests x 16 images of 32x32, all at once: every answer correct, none lost."""
    n_clients, n_requests, n_distinct = 8, 50, 5
    batches = [[scene_batch(16, seed=1000 * c + k) for k in range(n_distinct)] for c in range(n_clients)]

    def client(c: int):
        fn = RemoteCountingReward(shapes_server, reward="strict" if c % 2 else "partial", timeout=30,
                                  retries=2, backoff=0.2)
        answers = []
        for k in range(n_requests):
            images, rows, truth, strict, partial = batches[c][k % n_distinct]
            rewards, info = fn(images, [r["prompt"] for r in rows], rows)
            ok = (np.array_equal(info["count"], truth) and np.array_equal(info["correct"], strict)
                  and np.array_equal(info["partial"], partial)
                  and np.array_equal(rewards, strict if c % 2 else partial) and rewards.dtype == np.float32)
            answers.append((c, k, ok))
        return answers

    t0 = time.monotonic()
    with ThreadPoolExecutor(n_clients) as pool:
        results = [a for answers in pool.map(client, range(n_clients)) for a in answers]
    elapsed = time.monotonic() - t0
    assert len(results) == n_clients * n_requests                       # none lost
    assert sorted((c, k) for c, k, _ in results) == [(c, k) for c in range(n_clients) for k in range(n_requests)]
    wrong = [(c, k) for c, k, ok in results if not ok]
    assert not wrong, f"wrong answers for (client, request) {wrong[:10]}"
    assert elapsed < 40, elapsed


@pytest.mark.parametrize("name,body,status,needle", _bad_requests(), ids=[b[0] for b in _bad_requests()])
def test_malformed_requests_get_their_4xx_and_the_server_keeps_serving(shapes_server, name, body, status, needle):
    got, answer = http_json(shapes_server + "/", body)
    assert got == status and needle in answer["error"], answer
    _assert_short_and_clean(answer["error"])
    images, rows, truth, strict, _ = scene_batch(4, seed=5)
    rewards, info = RemoteCountingReward(shapes_server, retries=0)(images, [r["prompt"] for r in rows], rows)   # right after
    assert np.array_equal(info["count"], truth) and np.array_equal(rewards, strict)


def test_oversized_bodies_get_413(shapes_server):
    images, rows, *_ = scene_batch(1, seed=6)
    big = _body([encode_png(images[0])], [{**rows[0], "prompt": "x" * 70_000}])
    got, answer = http_json(shapes_server + "/", big)
    assert got == 413 and "max_request_bytes=60000" in answer["error"]
    # chunked transfer (no Content-Length): the limit is enforced while streaming
    host, port = shapes_server.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    conn.request("POST", "/", body=iter([big[i:i + 8192] for i in range(0, len(big), 8192)]),
                 headers={"Content-Type": "application/json"}, encode_chunked=True)
    resp = conn.getresponse()
    assert resp.status == 413 and "exceeds the limit max_request_bytes=60000" in json.loads(resp.read())["error"]
    conn.close()
    assert http_json(shapes_server + "/health")[0] == 200


def test_client_fails_clearly_when_the_server_is_killed_mid_run():
    images, rows, truth, strict, _ = scene_batch(16, seed=7)
    timeout, retries, backoff = 3.0, 3, 0.1
    budget = (retries + 1) * timeout + backoff * (1 + 2 + 4)        # the client's documented worst case
    with running_server("--detector", "shapes", workers=1) as (proc, url):
        fn = RemoteCountingReward(url, timeout=timeout, retries=retries, backoff=backoff)
        outcome, killed_at = {}, threading.Event()

        def loop():
            n_ok = 0
            try:
                for _ in range(10_000):                        # bounded; the kill ends it much sooner
                    rewards, info = fn(images, [r["prompt"] for r in rows], rows)
                    assert np.array_equal(info["count"], truth) and np.array_equal(rewards, strict)
                    n_ok += 1
                    if killed_at.is_set():
                        outcome["after_kill"] = outcome.get("after_kill", 0) + 1
                    if n_ok == 5:
                        outcome["five_ok"] = time.monotonic()
            except RewardServerError as e:
                outcome["error"], outcome["t_error"] = e, time.monotonic()
            outcome["n_ok"] = n_ok

        t = threading.Thread(target=loop)
        t.start()
        deadline = time.monotonic() + 20
        while "five_ok" not in outcome and time.monotonic() < deadline and t.is_alive():
            time.sleep(0.01)
        assert "five_ok" in outcome, outcome
        t_kill = time.monotonic()
        os.killpg(proc.pid, signal.SIGKILL)                  # supervisor and worker, no goodbye
        killed_at.set()
        proc.wait(5)
        t.join(budget + 5)
        assert not t.is_alive()
    err = outcome.get("error")
    assert isinstance(err, RewardServerError), outcome
    assert url in str(err) and f"failed after {retries + 1} attempts" in str(err)
    assert "Connection refused" in str(err) or "Errno 111" in str(err)
    assert outcome["t_error"] - t_kill < budget
    assert outcome.get("after_kill", 0) <= 1                 # at most the call already answered before the kill


def test_cli_refuses_owlv2_without_a_local_path():
    r = subprocess.run([sys.executable, "-m", "grpo_lib.server", "--detector", "owlv2"], cwd=REPO,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--detector owlv2 needs --detector-path DIR" in r.stderr


def _hard_batch(seed: int):
    """48 images where the counter is often wrong: degraded renders (blur, noise, colour drift,
    touching objects), the wrong colour, pure noise, blank; rows ask for counts 0..20."""
    from grpo_lib.rewards.degrade import degrade
    rng = np.random.default_rng(seed)
    colors, shapes = ["red", "green", "blue", "yellow", "purple", "cyan"], ["circle", "square", "triangle"]
    images, rows = [], []
    for i in range(48):
        color, shape = colors[rng.integers(6)], shapes[rng.integers(3)]
        n = int(rng.integers(1, 16))
        kind = i % 4
        if kind == 0:
            img = degrade(n, shape, color, seed=int(rng.integers(2**31)), blur_sigma=(0.8, 1.3),
                          noise_std=(6.0, 12.0)).image
        elif kind == 1:
            img = render_scene(n, shape, colors[(colors.index(color) + 1) % 6], seed=int(rng.integers(2**31))).image
        elif kind == 2:
            img = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
        else:
            img = render_scene(n, shape, color, seed=int(rng.integers(2**31)), background_noise=25.0).image
        images.append(img)
        rows.append(counting_row(f"{color} {shape}", int(rng.choice([0, n, n + 1, max(n - 2, 1), 20]))))
    return np.stack(images), rows


def test_remote_reward_equals_in_process_reward(shapes_server):
    from grpo_lib.rewards import build_reward
    images, rows = _hard_batch(seed=21)
    prompts = [r["prompt"] for r in rows]
    for name, kind in (("counting_strict", "strict"), ("counting_partial", "partial")):
        r_local, i_local = build_reward(name)(images, prompts, rows)
        r_remote, i_remote = RemoteCountingReward(shapes_server, reward=kind, batch_size=16)(images, prompts, rows)
        assert r_remote.dtype == r_local.dtype == np.float32
        np.testing.assert_array_equal(r_remote, r_local)
        for k in ("target", "count", "error", "correct"):
            assert i_remote[k].dtype == i_local[k].dtype, k
            np.testing.assert_array_equal(i_remote[k], i_local[k], err_msg=k)
    # not a vacuous comparison: the counter misses on this batch and rewards take many values
    assert 0.1 < i_local["correct"].mean() < 0.9
    assert len(np.unique(r_local)) >= 5 and (i_local["target"] == 0).any()


# --- issue 15: bounded work, live workers, a client that sees what the server said ----------------

def test_work_budget_counts_pixels_times_classes_exactly():
    """§1: sum_i W_i H_i q_i <= max_pixel_queries and sum_i W_i H_i <= max_total_pixels, boundaries included."""
    good = encode_png(np.full((32, 32, 3), 160, np.uint8))
    cfg = ServerConfig(max_image_pixels=1024, max_total_pixels=4 * 1024, max_pixel_queries=8 * 1024)
    images, rows, _ = parse_request(_body([good] * 2, [_row_asking(4)] * 2), cfg)       # 8,192: at the limit
    assert images.shape == (2, 32, 32, 3)
    with pytest.raises(RequestError, match=r"9 classes in all are 9216 pixel-queries.*max_pixel_queries=8192"):
        parse_request(_body([good] * 2, [_row_asking(4), _row_asking(5)]), cfg)
    parse_request(_body([good] * 4, [counting_row("red circle", 2)] * 4), cfg)            # 4,096: at the limit
    with pytest.raises(RequestError, match=r"5 images of 32x32 are 5120 pixels.*max_total_pixels=4096") as e:
        parse_request(_body([good] * 5, [counting_row("red circle", 2)] * 5), cfg)
    assert e.value.status == 413
    with pytest.raises(ValueError, match="max_image_pixels=5000 is above max_total_pixels=4096"):
        ServerConfig(max_image_pixels=5000, max_total_pixels=4096)


class _SpyCounter:
    """Wraps ShapeCounter.detect and records each call's batch and whether it is a view of the request."""

    def __init__(self, counter, source: np.ndarray):
        self.counter, self.source, self.calls = counter, source, []

    def detect(self, images, classes, counts):
        self.calls.append((images.shape[0], bool(np.shares_memory(images, self.source)), list(classes)))
        return self.counter.detect(images, classes, counts)


def test_shapes_detector_makes_no_per_class_copies_and_bounds_each_call():
    """§1: an image asked about 6 classes is counted 6 times from the request's own array (a view),
    and no counter call holds more than ``chunk_pixels`` pixel-queries; counts equal the old flat call."""
    from grpo_lib.rewards.detector import ShapeCounter
    from grpo_lib.server import ShapesDetector, row_queries
    images, rows, *_ = scene_batch(10, seed=31)
    queries = [row_queries(_row_asking(6))] + [row_queries(r) for r in rows[1:]]
    det = ShapesDetector(chunk_pixels=4 * 32 * 32)
    det.counter = spy = _SpyCounter(det.counter, images)
    got = det.detect(images, queries)
    assert [n for n, _, _ in spy.calls] == [4, 4, 2, 1, 1, 1, 1, 1]     # slot 0 in chunks of 4; slots 1-5: image 0
    assert all(view for _, view, _ in spy.calls)
    # the flat reference: one call with each image repeated once per class (the old per-class copies)
    idx = [b for b, qs in enumerate(queries) for _ in qs]
    flat = [q for qs in queries for q in qs]
    ref = ShapeCounter().detect(images[idx], [c for c, _ in flat], [n or 0 for _, n in flat])
    for b in range(len(images)):
        mine = sorted((d.cls, d.score, d.box) for d in got[b])
        theirs = sorted((d.cls, float(s), tuple(float(v) for v in box))
                        for i, d in zip(idx, ref) if i == b for box, s in zip(d.boxes, d.scores))
        assert mine == theirs, b
    assert sum(len(g) for g in got) > 20                                   # scenes of 1-10 objects: not vacuous
    # images with different numbers of classes: slot 1 takes images 0 and 2, a bounded gather
    queries2 = [queries[0], queries[1], queries[0][:2]] + queries[3:]
    det.counter = spy = _SpyCounter(spy.counter, images)
    det.detect(images, queries2)
    assert [c[:2] for c in spy.calls[:4]] == [(4, True), (4, True), (2, True), (2, False)]


def test_default_config_parses_100k_deep_nesting_and_huge_ints_as_400():
    """§5: the probes of the issue against the default limits: 400, never an exception (a 500)."""
    for body, needle in [(b"[" * 100_000 + b"]" * 100_000, "max_json_values="),
                         (b'{"a":' * 2000 + b"1" + b"}" * 2000, "nested too deeply"),
                         (b'{"images": [], "meta_datas": [], "n": ' + b"9" * 5000 + b"}", "integer literal")]:
        with pytest.raises(RequestError, match=needle) as e:
            parse_request(body, ServerConfig())
        assert e.value.status == 400


def test_requests_are_parsed_off_the_loop_and_at_most_max_inflight_at_once(monkeypatch):
    """§2: 6 requests at once against max_inflight=2: parse+score never runs more than 2 at a time, and
    /health answers while both slots are busy (the event loop is not blocked)."""
    import asyncio

    import httpx

    import grpo_lib.server.app as app_mod
    active, peak, lock = [0], [0], threading.Lock()
    real = app_mod.parse_request

    def slow_parse(body, cfg, det):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.3)
        with lock:
            active[0] -= 1
        return real(body, cfg, det)

    monkeypatch.setattr(app_mod, "parse_request", slow_parse)
    app = app_mod.create_app(ServerConfig(max_inflight=2))
    app.app.state.detector_state.load()                       # ASGITransport runs no lifespan
    images, rows, truth, *_ = scene_batch(3, seed=8)
    body = _body([encode_png(im) for im in images], rows)

    async def run():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=f"http://{HOST}") as c:
            posts = [asyncio.create_task(c.post("/", content=body, headers={"Content-Type": "application/json"}))
                     for _ in range(6)]
            await asyncio.sleep(0.1)
            t0 = time.monotonic()
            h = await c.get("/health")
            t_health = time.monotonic() - t0
            return await asyncio.gather(*posts), h, t_health

    answers, h, t_health = asyncio.run(run())
    assert [r.status_code for r in answers] == [200] * 6
    assert all([c["red circle" if False else r["include"][0]["class"]] for c, r in zip(a.json()["counts"], rows)]
               == truth.tolist() for a in answers)
    assert peak[0] == 2
    assert h.status_code == 200 and t_health < 0.25, t_health


def test_content_length_over_the_limit_is_refused_before_the_body_arrives(shapes_server):
    """§2: headers alone (Content-Length 1 GB, no body sent) get the 413 at once."""
    host, port = shapes_server.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall(b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 1000000000\r\n\r\n")
        head = b""
        while b"max_request_bytes" not in head:   # head and body may arrive in separate segments
            chunk = s.recv(4096)
            if not chunk:
                break
            head += chunk
    assert head.startswith(b"HTTP/1.1 413") and b"max_request_bytes=60000" in head


def test_workers_survive_concurrent_pathological_bodies(shapes_server):
    """§2: bodies at the size limit built to be slow to parse get their 400s; no worker is replaced."""
    import psutil
    supervisor = next(p for p in psutil.process_iter(["cmdline"])
                      if shapes_server.rsplit(":", 1)[1] in " ".join(p.info["cmdline"] or []) and "--port" in
                      (p.info["cmdline"] or []) and p.children())
    workers = sorted(p.pid for p in supervisor.children())
    body = b'{"images": [' + b"[]," * 19_990 + b'[]]}'                     # 60 KB of empty lists
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda _: http_json(shapes_server + "/", body), range(6)))
    assert all(status == 400 and "max_json_values" in a["error"] for status, a in answers), answers
    assert sorted(p.pid for p in supervisor.children()) == workers


def test_workers_exit_when_the_supervisor_is_killed():
    """§3: kill -9 of uvicorn's supervisor: its workers end within seconds and the port is free again."""
    import psutil
    port = free_port()
    with running_server("--detector", "shapes", workers=2, port=port) as (proc, url):
        workers = psutil.Process(proc.pid).children(recursive=True)
        assert len(workers) >= 2
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(5)
        t0 = time.monotonic()
        gone, alive = psutil.wait_procs(workers, timeout=12)
        assert not alive, f"workers {[p.pid for p in alive]} outlived their supervisor"
        assert time.monotonic() - t0 < 12
        with socket.socket() as s:                         # what a restart does first
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((HOST, port))


def test_client_splits_batches_to_the_servers_limits():
    """§4: limits read from /health: every request within max_request_bytes and max_batch, answers in order."""
    images, rows, truth, *_ = scene_batch(13, seed=12)
    limits = {"max_request_bytes": 6000, "max_batch": 5, "max_total_pixels": 10**9, "max_pixel_queries": 10**9}

    def answer(body):
        got = json.loads(body)["meta_datas"]
        return 200, json.dumps({"scores": [1.0] * len(got), "rewards": [0.0] * len(got),
                                "strict_rewards": [1.0] * len(got),
                                "counts": [{r["include"][0]["class"]: r["include"][0]["count"]} for r in got]}).encode()

    with stub_server(answer, health=limits) as (url, calls):
        fn = RemoteCountingReward(url, batch_size=64, retries=0)
        _, info = fn(images, [r["prompt"] for r in rows], rows)
    sizes = [len(b) for b in calls.bodies]
    counts = [len(json.loads(b)["images"]) for b in calls.bodies]
    assert sum(counts) == 13 and max(counts) <= 5 and max(sizes) <= 6000 and len(sizes) >= 3, (sizes, counts)
    assert min(sizes) < 6000 - 2500 or len(sizes) > 3                  # packed greedily, not one image each
    assert info["target"].tolist() == info["count"].tolist()            # rows came back in order
    # pixels and pixel-queries split too: 32x32 images, 2 classes each, at most 4,096 pixel-queries
    with stub_server(answer, health={"max_total_pixels": 3 * 1024, "max_pixel_queries": 4 * 1024}) as (url, calls):
        RemoteCountingReward(url, retries=0)(images[:5], [r["prompt"] for r in rows[:5]],
                                             [{**r, "exclude": [{"class": "blue square", "count": 1}]} for r in rows[:5]])
    assert [len(json.loads(b)["images"]) for b in calls.bodies] == [2, 2, 1]
    # one image alone over the limit: a clear error, nothing sent
    with stub_server(answer, health={"max_request_bytes": 500}) as (url, calls):
        with pytest.raises(RewardServerError, match=r"image 0 alone .* is above the server's limits"):
            RemoteCountingReward(url, retries=0)(images[:1], [rows[0]["prompt"]], rows[:1])
    assert calls == []


def test_client_sees_the_413_of_a_body_the_server_refuses_mid_upload(shapes_server):
    """§4: a 40 MB body against a 60 KB limit: the client reports the server's 413 message, once,
    instead of a connection reset retried as a network error."""
    images, rows, *_ = scene_batch(1, seed=6)
    fn = RemoteCountingReward(shapes_server, retries=3, backoff=1.0)
    t0 = time.monotonic()
    with pytest.raises(RewardServerError, match=r"rejected the request \(HTTP 413\).*max_request_bytes=60000") as e:
        fn.score(images, [{**rows[0], "prompt": "x" * 40_000_000}])
    assert e.value.status == 413 and time.monotonic() - t0 < 1.0       # no retry (the first wait is 1 s)


def test_non_json_posts_docs_and_foreign_hosts_are_refused(shapes_server):
    """§7: text/plain -> 415; /docs, /redoc, /openapi.json off; a Host that is not loopback -> 421."""
    images, rows, *_ = scene_batch(1, seed=6)
    body = _body([encode_png(images[0])], rows)
    for ctype in ("text/plain", "application/x-www-form-urlencoded", ""):
        status, a = http_json(shapes_server + "/", body, headers={"Content-Type": ctype})
        assert status == 415 and "is not 'application/json'" in a["error"], (ctype, a)
    assert http_json(shapes_server + "/", body, headers={"Content-Type": "application/json; charset=utf-8"})[0] == 200
    for path in ("/docs", "/redoc", "/openapi.json"):
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(shapes_server + path, timeout=5)
        assert e.value.code == 404
    port = shapes_server.rsplit(":", 1)[1]
    status, a = http_json(shapes_server + "/", body, headers={"Host": f"evil.example:{port}"})
    assert status == 421 and "evil.example" in a["error"]
    assert http_json(shapes_server + "/health", headers={"Host": f"localhost:{port}"})[0] == 200


def test_docs_are_served_only_with_the_flag():
    from fastapi.testclient import TestClient
    from grpo_lib.server import create_app
    with TestClient(create_app(ServerConfig(docs=True))) as c:
        assert c.get("/openapi.json").status_code == 200 and c.get("/docs").status_code == 200
    with TestClient(create_app(ServerConfig())) as c:
        assert c.get("/openapi.json").status_code == 404


TOKEN = "s3cret-token-for-tests"


@pytest.fixture(scope="module")
def guarded_server():
    """One worker, a token from $GRPO_REWARD_TOKEN, 1 s request deadline, 4 connections."""
    with running_server("--detector", "shapes", "--request-timeout", "1", "--max-connections", "4", workers=1,
                        env={"GRPO_REWARD_TOKEN": TOKEN}, token=TOKEN) as (proc, url):
        yield url


def test_token_is_required_when_set(guarded_server, monkeypatch):
    """§7: no or a wrong bearer token -> 401 on every path; the client sends it (argument or env)."""
    images, rows, truth, strict, _ = scene_batch(4, seed=9)
    body = _body([encode_png(im) for im in images], rows)
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
        assert http_json(guarded_server + "/", body, headers=headers)[0] == 401
        status, a = http_json(guarded_server + "/health", headers=headers)
        assert status == 401 and "bearer token" in a["error"]
    with pytest.raises(RewardServerError, match=r"HTTP 401"):
        RemoteCountingReward(guarded_server, token="wrong", retries=0)(images, [r["prompt"] for r in rows], rows)
    rewards, info = RemoteCountingReward(guarded_server, token=TOKEN)(images, [r["prompt"] for r in rows], rows)
    assert np.array_equal(info["count"], truth) and np.array_equal(rewards, strict)
    monkeypatch.setenv("GRPO_REWARD_TOKEN", TOKEN)
    rewards, info = RemoteCountingReward(guarded_server)(images, [r["prompt"] for r in rows], rows)
    assert np.array_equal(info["count"], truth)


def test_slow_headers_and_bodies_time_out_and_connections_are_limited(guarded_server):
    """§7: request_timeout_s=1: a stalled body gets 408, stalled headers get the connection closed;
    max_connections=4: with 4 sockets open, a fifth request gets 503 until they close."""
    host, port = guarded_server.removeprefix("http://").split(":")
    auth = f"Authorization: Bearer {TOKEN}\r\n".encode()
    with socket.create_connection((host, int(port)), timeout=6) as s:
        t0 = time.monotonic()
        s.sendall(b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n" + auth
                  + b"Content-Length: 1000\r\n\r\n{\"images\"")
        head = _recv_until(s, b"}")
        assert head.startswith(b"HTTP/1.1 408") and b"request_timeout_s=1.0" in head
        assert 0.9 < time.monotonic() - t0 < 4
    with socket.create_connection((host, int(port)), timeout=6) as s:
        t0 = time.monotonic()
        s.sendall(b"GET /hea")                                   # headers never finished
        assert s.recv(4096) == b"" and 0.9 < time.monotonic() - t0 < 4
    idle = [socket.create_connection((host, int(port)), timeout=5) for _ in range(4)]
    try:
        status, _ = _raw_status(guarded_server)
        assert status == 503
    finally:
        for s in idle:
            s.close()
    time.sleep(0.2)
    assert http_json(guarded_server + "/health", headers={"Authorization": f"Bearer {TOKEN}"})[0] == 200


def _recv_until(s: socket.socket, end: bytes, limit: int = 65536) -> bytes:
    data = b""
    while not data.endswith(end) and len(data) < limit:
        chunk = s.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def _raw_status(url: str) -> tuple[int, bytes]:
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=5)
    conn.request("GET", "/health", headers={"Authorization": f"Bearer {TOKEN}"})
    r = conn.getresponse()
    out = r.status, r.read()
    conn.close()
    return out


def test_a_host_beyond_loopback_needs_a_token(monkeypatch, capsys):
    """§7: --host 0.0.0.0 without a token is refused at start; with one, every Host is allowed."""
    import grpo_lib.server.app as app_mod
    from grpo_lib.server import main, serve
    monkeypatch.delenv("GRPO_REWARD_TOKEN", raising=False)
    seen = {}
    monkeypatch.setattr(app_mod, "serve", lambda cfg, **kw: seen.update(cfg=cfg, **kw))
    with pytest.raises(SystemExit) as e:
        main(["--host", "0.0.0.0"])
    assert e.value.code == 2 and "not loopback: set a bearer token" in capsys.readouterr().err and not seen
    main(["--host", "0.0.0.0", "--token", "t"])
    assert seen["cfg"].token == "t" and seen["cfg"].allowed_hosts is None
    main(["--host", "127.0.0.1"])
    assert seen["cfg"].token is None and set(seen["cfg"].allowed_hosts) == {"127.0.0.1", "localhost", "::1"}
    with pytest.raises(ValueError, match="not loopback"):
        serve(ServerConfig(), host="10.1.2.3")


def test_training_params_ride_out_a_minute_long_restart_and_fail_clearly_after():
    """§8: GRPOParams.reward_server_retries / reward_server_timeout_s reach the client; the defaults wait
    over 60 s for a server that is down; small values fail with a clear error once the window is over."""
    from grpo_lib.train import GRPOParams, build_reward_for
    p = GRPOParams(reward_server_url="http://127.0.0.1:18085")
    fn = build_reward_for(p)
    assert (fn.retries, fn.timeout) == (p.reward_server_retries, p.reward_server_timeout_s)
    assert 60 <= fn.retry_window_s <= 120, fn.retry_window_s
    for bad in (dict(reward_server_retries=-1), dict(reward_server_timeout_s=0.0)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            GRPOParams(**bad)
    url = f"http://{HOST}:{free_port()}"                      # nothing listens there
    fn = build_reward_for(GRPOParams(reward_server_url=url, reward_server_retries=2, reward_server_timeout_s=1.0))
    t0 = time.monotonic()
    with pytest.raises(RewardServerError, match=r"failed after 3 attempts.*(Connection refused|Errno 111)") as e:
        fn(np.zeros((1, 32, 32, 3), np.uint8), ["a photo of one red circle"], [counting_row("red circle", 1)])
    assert url in str(e.value) and 1.5 <= time.monotonic() - t0 < 1.5 + 1.0     # waits 0.5 + 1.0 s


def test_client_rides_out_a_server_restart_on_the_same_port():
    """§3 + §8: the server is killed and restarted on its port 1 s later; a call made meanwhile succeeds."""
    images, rows, truth, strict, _ = scene_batch(8, seed=13)
    port = free_port()
    with running_server("--detector", "shapes", workers=2, port=port) as (proc, url):
        fn = RemoteCountingReward(url, retries=40, backoff=0.25, max_backoff=0.25, timeout=10)
        assert np.array_equal(fn(images, [r["prompt"] for r in rows], rows)[1]["count"], truth)
        os.kill(proc.pid, signal.SIGKILL)                     # the supervisor only: workers must follow it
        proc.wait(5)
    result = {}

    def call():
        try:
            result["out"] = fn(images, [r["prompt"] for r in rows], rows)
        except RewardServerError as e:
            result["error"] = e

    t = threading.Thread(target=call)
    t.start()
    time.sleep(1.0)
    with running_server("--detector", "shapes", workers=2, port=port):
        t.join(30)
    assert "out" in result, result
    assert np.array_equal(result["out"][1]["count"], truth) and np.array_equal(result["out"][0], strict)
