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
    req = urllib.request.Request(url, data=body, headers=headers or {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@contextlib.contextmanager
def running_server(*args: str, workers: int = 2, ready_timeout: float = 45.0):
    """Start ``python -m grpo_lib.server`` on a free loopback port; yield (proc, url); stop it."""
    port = free_port()
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1",
               PYTHONUNBUFFERED="1")
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
                status, h = http_json(url + "/health", timeout=2.0)
                if status == 200 and h["ready"]:
                    ready_pids.add(h["pid"])
                    if len(ready_pids) < workers and time.monotonic() > deadline - ready_timeout / 2:
                        break      # workers share one socket; a lucky scheduler may keep hitting one
            except (urllib.error.URLError, ConnectionError, socket.timeout):
                pass
            time.sleep(0.05)
        yield proc, url
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)          # our own session: the supervisor and its workers
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
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


def _bad_requests():
    """(name, body bytes, expected status, substring of the message) for each malformed input."""
    img = np.full((32, 32, 3), 160, np.uint8)
    good, row = encode_png(img), counting_row("red circle", 2)
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
    ]


SMALL_LIMITS = dict(max_batch=16, max_image_pixels=3000, max_request_bytes=60_000)


@pytest.mark.parametrize("name,body,status,needle", _bad_requests(), ids=[b[0] for b in _bad_requests()])
def test_parse_request_rejects_malformed_input(name, body, status, needle):
    from grpo_lib.server import ShapesDetector
    with pytest.raises(RequestError) as e:
        parse_request(body, ServerConfig(**SMALL_LIMITS), ShapesDetector())
    assert e.value.status == status and needle in e.value.message, e.value.message


def test_parse_request_roundtrips_pixels_exactly():
    images, rows, *_ = scene_batch(5, seed=1)
    body = _body([encode_png(im) for im in images], rows, only_strict=False)
    got, got_rows, only_strict = parse_request(body, ServerConfig(), None)
    assert got.dtype == np.uint8 and np.array_equal(got, images) and got_rows == rows and only_strict is False


# --- the client against a stub HTTP server (retries, backoff, 4xx, garbage) ------------------------

@contextlib.contextmanager
def stub_server(responses):
    """Loopback HTTP stub answering POSTs with ``responses`` in turn: (status, bytes); records times."""
    calls = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            calls.append(time.monotonic())
            status, body = responses[min(len(calls), len(responses)) - 1]
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

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
    seen = {}
    monkeypatch.setattr(server_mod, "serve", lambda cfg, **kw: seen.update(cfg=cfg, **kw))
    server_mod.main(["--detector", "owlv2", "--detector-path", str(tiny_owlv2), "--workers", "3"])
    assert seen["cfg"].detector_path == str(tiny_owlv2) and seen["workers"] == 3 and seen["host"] == HOST
    # ... and the app that config builds, over HTTP (in-process ASGI client)
    from fastapi.testclient import TestClient
    with TestClient(server_mod.create_app(seen["cfg"])) as client:
        for _ in range(400):                                      # bounded wait for the loader thread
            h = client.get("/health")
            if h.status_code == 200:
                break
            time.sleep(0.02)
        assert h.json()["detector"] == "owlv2" and h.json()["detector_path"] == str(tiny_owlv2)
        r = client.post("/", content=_body([encode_png(im) for im in images], rows, only_strict=False))
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
                                           [counting_row("red circle", 1)]))
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

LIMIT_ARGS = ("--max-batch", str(SMALL_LIMITS["max_batch"]), "--max-image-pixels", str(SMALL_LIMITS["max_image_pixels"]),
              "--max-request-bytes", str(SMALL_LIMITS["max_request_bytes"]))


@pytest.fixture(scope="module")
def shapes_server():
    with running_server("--detector", "shapes", *LIMIT_ARGS, workers=2) as (proc, url):
        yield url


def test_health_reports_detector_and_limits(shapes_server):
    status, h = http_json(shapes_server + "/health")
    assert status == 200 and h["status"] == "ready" and h["detector"] == "shapes"
    assert h["limits"] == SMALL_LIMITS
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
