"""python -m grpo_lib.infer: images + results.json from a checkpoint's LoRA, one-line errors for bad LoRA paths."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from grpo_lib import infer

torch.set_num_threads(1)

SMALL = dict(block_out_channels=(8, 16, 16), cross_attn_levels=(False, False, True), norm_num_groups=4,
             attention_heads=2, text_dim=16, text_heads=2, text_layers=1)
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def _perturb_lora(module, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in module.named_parameters():
            if "lora_B" in n:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random tiny base and a GRPO-style run dir: checkpoints/latest -> epoch_0002/lora (non-zero LoRA)."""
    from grpo_lib.policies.tiny import TinyConfig, TinyPolicy

    root = tmp_path_factory.mktemp("infer")
    policy = TinyPolicy(TinyConfig(**SMALL), seed=0)
    policy.save_pretrained(root / "base")
    policy.add_lora({"r": 4, "lora_alpha": 4})
    _perturb_lora(policy.unet)
    ckpts = root / "run" / "checkpoints"
    policy.save_lora(ckpts / "epoch_0002" / "lora")
    (ckpts / "latest").write_text("epoch_0002")
    return root


def _run(*args):
    return subprocess.run([sys.executable, "-m", "grpo_lib.infer", *map(str, args)], capture_output=True,
                          text=True, env=ENV, cwd=infer.REPO, timeout=120)


def test_cli_writes_images_and_results_json(tiny, tmp_path):
    from grpo_lib.policies.tiny import TinyPolicy
    from grpo_lib.rollout import sample_images

    out = tmp_path / "demo"
    r = _run("--lora_path", tiny / "run" / "checkpoints", "--model_name", tiny / "base", "--num_images", 2,
             "--num_steps", 3, "--guidance_scale", 3.0, "--seed", 7, "--output_dir", out,
             "--custom_prompt", "a photo of three red circles")
    assert r.returncode == 0, r.stderr
    res = json.loads((out / "results.json").read_text())
    assert res["prompt"] == "a photo of three red circles"
    assert res["target"] == {"class": "red circle", "count": 3}
    assert res["lora_path"] == str(tiny / "run" / "checkpoints" / "epoch_0002" / "lora")
    assert res["world"] == "embedded" and res["counter"] == "ShapeCounter"
    assert len(res["found_counts"]) == 2 and all(isinstance(f, int) and f >= 0 for f in res["found_counts"])
    assert res["correct"] == [int(f == 3) for f in res["found_counts"]]
    assert (res["num_steps"], res["guidance_scale"], res["seed"], res["height"], res["width"]) == (3, 3.0, 7, 32, 32)
    from PIL import Image
    got = np.stack([np.asarray(Image.open(out / n)) for n in res["images"]])
    assert got.shape == (2, 32, 32, 3) and (out / "grid.png").is_file()
    # the same images in-process: base + that LoRA, image k from seed + k
    pol = TinyPolicy.from_pretrained(tiny / "base")
    pol.load_lora(tiny / "run" / "checkpoints" / "epoch_0002" / "lora")
    gens = [torch.Generator().manual_seed(7 + k) for k in range(2)]
    _, want = sample_images(pol, ["a photo of three red circles"] * 2, num_steps=3, guidance_scale=3.0, shift=1.0,
                            generator=gens)
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1
    with pol.reference():                                              # and the LoRA mattered
        _, base = sample_images(pol, ["a photo of three red circles"] * 2, num_steps=3, guidance_scale=3.0, shift=1.0,
                                generator=[torch.Generator().manual_seed(7 + k) for k in range(2)])
    assert np.abs(base.astype(int) - want.astype(int)).max() > 5


def test_bad_lora_paths_are_one_line_errors(tiny, tmp_path):
    r = _run("--lora_path", tmp_path / "missing", "--model_name", tiny / "base")
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip().count("\n") == 0 and r.stderr.startswith("error: --lora_path") \
        and "does not exist" in r.stderr
    bad = tmp_path / "bad_lora"
    bad.mkdir()
    (bad / "lora.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    (bad / "lora_config.json").write_text('{"r": 4}')
    r = _run("--lora_path", bad, "--model_name", tiny / "base")
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "not a safetensors file" in r.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    r = _run("--lora_path", empty, "--model_name", tiny / "base")
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "holds no LoRA" in r.stderr


def test_lora_of_another_architecture_and_truncated_file(tiny, tmp_path, capsys):
    from grpo_lib.policies.tiny import TinyConfig, TinyPolicy

    other = TinyPolicy(TinyConfig(**{**SMALL, "block_out_channels": (16, 16, 16)}), seed=0)
    other.add_lora({"r": 4, "lora_alpha": 4})
    other.save_lora(tmp_path / "other")
    rc = infer.main(["--lora_path", str(tmp_path / "other"), "--model_name", str(tiny / "base"),
                     "--output_dir", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: loading") and err.strip().count("\n") == 0
    # a truncated copy of a good LoRA is caught before any model is loaded
    good = tiny / "run" / "checkpoints" / "epoch_0002" / "lora"
    cut = tmp_path / "cut"
    cut.mkdir()
    (cut / "lora_config.json").write_text((good / "lora_config.json").read_text())
    (cut / "lora.safetensors").write_bytes((good / "lora.safetensors").read_bytes()[:-100])
    with pytest.raises(infer.InferError, match="is truncated"):
        infer.resolve_lora(str(cut))


def test_default_prompt_is_a_test_row_and_base_only(tiny, tmp_path, capsys):
    from grpo_lib.prompts import load_rows

    rc = infer.main(["--lora_path", "none", "--model_name", str(tiny / "base"), "--num_images", "1",
                     "--num_steps", "1", "--seed", "3", "--output_dir", str(tmp_path)])
    assert rc == 0, capsys.readouterr().err
    res = json.loads((tmp_path / "results.json").read_text())
    rows = {r["prompt"]: r for r in load_rows(infer.TEST_PROMPTS["embedded"])}
    assert res["prompt"] in rows and res["target"] == rows[res["prompt"]]["include"][0]
    assert res["lora_path"] is None and len(res["found_counts"]) == 1


def test_sd3_model_is_detected_and_counts_are_null_without_a_detector(tiny_sd3_dir, tiny, tmp_path):
    from grpo_lib.policies.sd3 import SD3Policy

    pol = SD3Policy.from_pretrained(tiny_sd3_dir, height=64, width=64, lora={"r": 2, "lora_alpha": 2})
    _perturb_lora(pol.transformer)
    pol.save_lora(tmp_path / "ckpt" / "lora")
    assert infer.model_kind(str(tiny_sd3_dir)) == "sd3" and infer.model_kind("stabilityai/sd-3.5-m") == "sd3"
    assert infer.resolve_lora(str(tmp_path / "ckpt"))[1] == "sd3"
    res = infer.run(infer.build_parser().parse_args([
        "--lora_path", str(tmp_path / "ckpt"), "--model_name", str(tiny_sd3_dir), "--height", "64", "--width", "64",
        "--num_images", "2", "--num_steps", "2", "--custom_prompt", "a photo of four cats",
        "--output_dir", str(tmp_path / "out")]))
    assert res["world"] == "sd3" and res["target"] == {"class": "cat", "count": 4}
    assert res["found_counts"] is None and res["correct"] is None and res["shift"] == 3.0
    assert (tmp_path / "out" / "image_01.png").is_file()
    # a tiny LoRA on an SD3 base is refused before loading
    with pytest.raises(infer.InferError, match="is a tiny LoRA but --model_name"):
        infer.run(infer.build_parser().parse_args([
            "--lora_path", str(tiny / "run" / "checkpoints"), "--model_name", str(tiny_sd3_dir)]))


def test_parse_target():
    assert infer.parse_target("a photo of 12 cyan triangles", "embedded") == {"class": "cyan triangle", "count": 12}
    assert infer.parse_target("many red circles", "embedded") is None
    assert infer.parse_target("two hot dogs on a table", "sd3") == {"class": "hot dog", "count": 2}
    assert infer.parse_target("a photo of five people", "sd3") == {"class": "person", "count": 5}
