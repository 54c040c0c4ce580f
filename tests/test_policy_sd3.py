"""SD3Policy on a tiny random SD3 pipeline built offline (tests/sd3_tiny.py), loaded through from_pretrained."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sd3_tiny import TINY_HEIGHT, TINY_WIDTH, build_tiny_sd3  # noqa: E402

from grpo_lib.policies.base import Cond, Policy  # noqa: E402
from grpo_lib.policies.sd3 import (LORA_TARGET_MODULES, ImageFolderCountingDataset,  # noqa: E402
                                   SD3Policy)

MAX_SEQ = 32  # T5 tokens (the tiny T5 tokenizer is character-level)
PROMPTS = ["three red cats", "two dogs"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # these calls are milliseconds each; on the shared 2-core machine two intra-op threads per
    # process oversubscribe the cores and make them 5-100x slower
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def load(directory, **kw) -> SD3Policy:
    kw = {"height": TINY_HEIGHT, "width": TINY_WIDTH, "max_sequence_length": MAX_SEQ, **kw}
    return SD3Policy.from_pretrained(directory, **kw)


def perturb(params, scale=0.2, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * scale)


def lora_B(policy):
    return [p for n, p in policy.transformer.named_parameters() if "lora_B" in n]


@pytest.fixture
def inputs():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, TINY_HEIGHT // 4, TINY_WIDTH // 4, generator=g)  # (B, C, h, w)
    t = torch.tensor([0.9, 0.3])
    return x, t


def test_from_pretrained_frozen_eval_lora_defaults(tiny_sd3_dir):
    p = load(tiny_sd3_dir)
    assert isinstance(p, Policy) and p.convention == "noise_at_one"
    assert p.latent_shape == (4, TINY_HEIGHT // 4, TINY_WIDTH // 4) and p.vae_scale_factor == 4
    assert p.shift == 3.0
    for name, m in p.pipe.components.items():
        if isinstance(m, torch.nn.Module):
            assert not m.training, name
    assert p.lora_config.r == 32 and p.lora_config.lora_alpha == 64
    assert set(p.lora_config.target_modules) == set(LORA_TARGET_MODULES)
    trainable = p.trainable_parameters()
    named = dict(p.transformer.named_parameters())
    lora_names = [n for n in named if "lora_" in n]
    # 2 blocks: 8 projections in the first, 7 in the last (context_pre_only has no to_add_out); A and B each
    assert len(trainable) == len(lora_names) == 30
    assert {id(q) for q in trainable} == {id(named[n]) for n in lora_names}
    assert all(q.dtype == torch.float32 for q in trainable)
    frozen = [n for n, q in p.pipe.transformer.named_parameters() if q.requires_grad and "lora_" not in n]
    assert frozen == []
    for m in (p.pipe.text_encoder, p.pipe.text_encoder_2, p.pipe.text_encoder_3, p.vae):
        assert not any(q.requires_grad for q in m.parameters())


def test_encode_shapes_and_empty_prompt_uncond(tiny_sd3_dir):
    p = load(tiny_sd3_dir, lora=False)
    cond = p.encode(PROMPTS)
    assert set(cond.tensors) == set(cond.uncond) == {"prompt_embeds", "pooled_prompt_embeds"}
    assert cond.tensors["prompt_embeds"].shape == (2, 77 + MAX_SEQ, 64)  # CLIP 77 tokens + T5 tokens, joint dim
    assert cond.tensors["pooled_prompt_embeds"].shape == (2, 64)  # CLIP-L + CLIP-G projections
    for k in cond.tensors:
        assert cond.uncond[k].shape == cond.tensors[k].shape
    # exactly diffusers' encode_prompt, with "" as the negative prompt (upstream Flow-GRPO)
    pe, npe, pooled, npooled = p.pipe.encode_prompt(PROMPTS, None, None, negative_prompt=["", ""],
                                                    max_sequence_length=MAX_SEQ)
    assert torch.equal(cond.tensors["prompt_embeds"], pe)
    assert torch.equal(cond.tensors["pooled_prompt_embeds"], pooled)
    # "" is encoded once at batch 1 and repeated: equal up to batch-size-dependent float rounding
    torch.testing.assert_close(cond.uncond["prompt_embeds"], npe, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(cond.uncond["pooled_prompt_embeds"], npooled, atol=1e-6, rtol=1e-6)
    assert not torch.allclose(cond.tensors["prompt_embeds"][0], cond.tensors["prompt_embeds"][1])
    assert not cond.tensors["prompt_embeds"].requires_grad
    # slicing keeps cond and uncond aligned (the rollout stores per-sample conditioning)
    assert len(cond[1]) == 1 and torch.equal(cond[1].tensors["prompt_embeds"][0], pe[1])


def test_cfg_velocity_equals_manual_combination(tiny_sd3_dir, inputs):
    p = load(tiny_sd3_dir)
    perturb(lora_B(p))
    x, t = inputs
    cond = p.encode(PROMPTS)
    g = 4.5
    with torch.no_grad():
        v = p.velocity(x, t, cond, g)
        v_c = p.velocity(x, t, cond, 1.0)
        v_u = p.velocity(x, t, Cond(dict(cond.uncond)), 1.0)
    assert v.shape == x.shape and v.dtype == torch.float32
    torch.testing.assert_close(v, v_u + g * (v_c - v_u), atol=1e-5, rtol=1e-5)
    assert (v - v_c).abs().max() > 1e-3  # guidance did something
    # a float t is the same as a constant per-sample t
    with torch.no_grad():
        torch.testing.assert_close(p.velocity(x, 0.3, cond, g), p.velocity(x, torch.full((2,), 0.3), cond, g),
                                   atol=0, rtol=0)


def test_euler_sampling_matches_diffusers_pipeline(tiny_sd3_dir):
    """One Euler ODE run through SD3Policy.velocity equals StableDiffusion3Pipeline from the same noise."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    p = load(tiny_sd3_dir, lora=False)
    steps, g, prompt = 4, 4.5, "four cats"
    noise = torch.randn(1, *p.latent_shape, generator=torch.Generator().manual_seed(7))
    ref = p.pipe(prompt, negative_prompt="", num_inference_steps=steps, guidance_scale=g, latents=noise.clone(),
                 height=TINY_HEIGHT, width=TINY_WIDTH, max_sequence_length=MAX_SEQ, output_type="latent").images
    sched = FlowMatchEulerDiscreteScheduler.from_config(p.pipe.scheduler.config)
    sched.set_timesteps(steps)
    sigmas = sched.sigmas  # (steps + 1,) from 1 to 0
    assert sigmas[0] == 1.0 and sigmas[-1] == 0.0
    cond = p.encode([prompt])
    x = noise.clone()
    with torch.no_grad():
        for s, s_next in zip(sigmas[:-1], sigmas[1:]):
            x = x + (s_next - s) * p.velocity(x, s, cond, g)  # x_{t'} = x_t + (t' - t) v
    torch.testing.assert_close(x, ref, atol=1e-5, rtol=1e-5)
    # decode = the pipeline's own VAE decode + postprocess (to within one uint8 level of rounding)
    img = p.decode(x)
    ref_img = p.pipe(prompt, negative_prompt="", num_inference_steps=steps, guidance_scale=g,
                     latents=noise.clone(), height=TINY_HEIGHT, width=TINY_WIDTH,
                     max_sequence_length=MAX_SEQ, output_type="np").images
    assert img.shape == (1, TINY_HEIGHT, TINY_WIDTH, 3) and img.dtype == np.uint8
    assert np.abs(img.astype(int) - (ref_img * 255).round().astype(int)).max() <= 1


def test_lora_changes_output_only_after_perturbing_B_and_reference_is_base(tiny_sd3_dir, inputs):
    x, t = inputs
    base = load(tiny_sd3_dir, lora=False)
    p = load(tiny_sd3_dir)
    cond = p.encode(PROMPTS)
    with torch.no_grad():
        v_base = base.velocity(x, t, cond, 4.5)
        assert torch.equal(p.velocity(x, t, cond, 4.5), v_base)  # fresh LoRA: lora_B = 0, a no-op
        perturb(lora_B(p))
        v_lora = p.velocity(x, t, cond, 4.5)
        assert (v_lora - v_base).abs().max() > 1e-2
        with p.reference():
            assert torch.equal(p.velocity(x, t, cond, 4.5), v_base)
        assert torch.equal(p.velocity(x, t, cond, 4.5), v_lora)  # adapter back on
        with pytest.raises(RuntimeError):
            with p.reference():
                raise RuntimeError("crash inside the reference pass")
        assert torch.equal(p.velocity(x, t, cond, 4.5), v_lora)
    with base.reference():  # no adapter: the policy is its own reference
        assert base.trainable_parameters() == []


def test_grads_flow_only_to_lora(tiny_sd3_dir, inputs):
    p = load(tiny_sd3_dir)
    perturb(lora_B(p))  # with lora_B = 0 the lora_A grads would be exactly zero
    x, t = inputs
    cond = p.encode(PROMPTS)
    p.velocity(x, t, cond, 4.5).square().mean().backward()
    trainable = {id(q) for q in p.trainable_parameters()}
    zero_grad = []
    for name, q in p.transformer.named_parameters():
        if id(q) in trainable:
            assert q.grad is not None, name
            if q.grad.abs().sum() == 0:
                zero_grad.append(name)
        else:
            assert q.grad is None, name
    # the only LoRA without a gradient: the text-stream query of the last block, whose text output
    # the MMDiT discards (context_pre_only), so it cannot change the velocity
    last = len(p.transformer.transformer_blocks) - 1
    assert sorted(zero_grad) == [f"transformer_blocks.{last}.attn.add_q_proj.lora_{ab}.default.weight"
                                 for ab in "AB"]
    for m in (p.pipe.text_encoder, p.pipe.text_encoder_2, p.pipe.text_encoder_3, p.vae):
        assert all(q.grad is None for q in m.parameters())
    with p.reference():
        assert not p.velocity(x, t, cond, 4.5).requires_grad


def test_velocity_runs_through_forward_module(tiny_sd3_dir, inputs):
    """A DDP/accelerate wrapper set as forward_module is what velocity calls (so grads get synced)."""
    x, t = inputs
    p = load(tiny_sd3_dir)
    cond = p.encode(PROMPTS)
    calls = []

    class Wrapper(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, **kw):
            calls.append(kw["hidden_states"].shape[0])
            return self.module(**kw)

    with torch.no_grad():
        v = p.velocity(x, t, cond, 4.5)
        p.forward_module = Wrapper(p.transformer)
        assert torch.equal(p.velocity(x, t, cond, 4.5), v)
    assert calls == [4]  # one MMDiT call on the CFG batch [uncond; cond]


def test_lora_save_load_roundtrip(tiny_sd3_dir, inputs, tmp_path):
    x, t = inputs
    p = load(tiny_sd3_dir, lora={"r": 4, "lora_alpha": 12})  # alpha != r: the scale must survive the trip
    perturb(p.trainable_parameters())
    cond = p.encode(PROMPTS)
    p.save_lora(tmp_path / "lora")
    assert (tmp_path / "lora" / "pytorch_lora_weights.safetensors").is_file()
    q = load(tiny_sd3_dir, lora_path=tmp_path / "lora")
    assert q.lora_config.r == 4 and q.lora_config.lora_alpha == 12
    assert len(q.trainable_parameters()) == len(p.trainable_parameters())
    r = load(tiny_sd3_dir)  # load_lora replaces an attached fresh adapter
    r.load_lora(tmp_path / "lora")
    with torch.no_grad():
        v = p.velocity(x, t, cond, 4.5)
        assert torch.equal(q.velocity(x, t, cond, 4.5), v)
        assert torch.equal(r.velocity(x, t, cond, 4.5), v)
        with q.reference(), p.reference():
            assert torch.equal(q.velocity(x, t, cond, 4.5), p.velocity(x, t, cond, 4.5))


def test_merge_lora_makes_cold_start_the_reference(tiny_sd3_dir, inputs, tmp_path):
    x, t = inputs
    p = load(tiny_sd3_dir)
    perturb(p.trainable_parameters())
    cond = p.encode(PROMPTS)
    p.save_lora(tmp_path / "cold")
    with torch.no_grad():
        v_cold = p.velocity(x, t, cond, 4.5)
        with p.reference():
            v_base = p.velocity(x, t, cond, 4.5)
        p.merge_lora()  # W <- W + (alpha/r) B A, then a fresh adapter
        assert p.has_lora and all(q.abs().sum() == 0 for q in lora_B(p))
        # W x + s B (A x) vs (W + s B A) x: equal up to float32 rounding through the layers
        torch.testing.assert_close(p.velocity(x, t, cond, 4.5), v_cold, atol=1e-4, rtol=1e-4)
        perturb(lora_B(p), seed=3)
        assert (p.velocity(x, t, cond, 4.5) - v_cold).abs().max() > 1e-2
        with p.reference():
            v_ref = p.velocity(x, t, cond, 4.5)
        torch.testing.assert_close(v_ref, v_cold, atol=1e-4, rtol=1e-4)
        assert (v_ref - v_base).abs().max() > 1e-2
        # the counting fork's flow in one call: base + cold-start LoRA fused, fresh adapter on top
        q = load(tiny_sd3_dir, merge_lora_path=tmp_path / "cold")
        with q.reference():
            torch.testing.assert_close(q.velocity(x, t, cond, 4.5), v_cold, atol=1e-4, rtol=1e-4)
    assert len(q.trainable_parameters()) == 30


def test_save_pretrained_refuses_attached_lora(tiny_sd3_dir, inputs, tmp_path):
    x, t = inputs
    p = load(tiny_sd3_dir)
    perturb(lora_B(p))
    with pytest.raises(ValueError, match="save_lora"):
        p.save_pretrained(tmp_path / "bad")
    assert not (tmp_path / "bad").exists()
    p.merge_lora(new_adapter=False)
    assert not p.has_lora and p.trainable_parameters() == []
    p.save_pretrained(tmp_path / "merged")
    q = load(tmp_path / "merged", lora=False)
    cond = p.encode(PROMPTS)
    with torch.no_grad():
        assert torch.equal(q.velocity(x, t, cond, 4.5), p.velocity(x, t, cond, 4.5))


def test_decode_and_encode_images(tiny_sd3_dir):
    p = load(tiny_sd3_dir, lora=False)
    z = torch.randn(3, *p.latent_shape, generator=torch.Generator().manual_seed(2))
    img = p.decode(z)
    assert img.shape == (3, TINY_HEIGHT, TINY_WIDTH, 3) and img.dtype == np.uint8
    z2 = p.encode_images(img)
    assert z2.shape == z.shape and z2.dtype == torch.float32 and not z2.requires_grad
    # the codec's shift and scale: encode_images undoes them exactly on the VAE's posterior mean
    x = torch.from_numpy(img).permute(0, 3, 1, 2).float() / 127.5 - 1
    mean = p.vae.encode(x).latent_dist.mode()
    cfg = p.vae.config
    torch.testing.assert_close(z2, (mean - cfg.shift_factor) * cfg.scaling_factor)
    a = p.encode_images(img, sample=True, generator=torch.Generator().manual_seed(0))
    b = p.encode_images(img, sample=True, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and not torch.equal(a, z2)


def test_bf16_policy_runs_with_fp32_lora_and_vae(tiny_sd3_dir, inputs):
    x, t = inputs
    p = load(tiny_sd3_dir, dtype=torch.bfloat16)
    assert p.dtype == torch.bfloat16
    assert all(q.dtype == torch.bfloat16 for n, q in p.transformer.named_parameters() if "lora_" not in n)
    assert p.vae.dtype == torch.float32
    assert all(q.dtype == torch.float32 for q in p.trainable_parameters())
    ref = load(tiny_sd3_dir, lora=False)
    cond = ref.encode(PROMPTS)
    with torch.no_grad():
        v16 = p.velocity(x, t, cond, 4.5)
        v32 = ref.velocity(x, t, cond, 4.5)
    assert v16.dtype == torch.float32
    assert (v16 - v32).norm() / v32.norm() < 0.05  # bf16 rounding only


def test_bad_inputs_raise_value_errors(tiny_sd3_dir, inputs, tmp_path):
    x, t = inputs
    p = load(tiny_sd3_dir)
    cond = p.encode(PROMPTS)
    with pytest.raises(ValueError, match="list of strings"):
        p.encode("three cats")
    with pytest.raises(ValueError, match="list of strings"):
        p.encode([])
    with pytest.raises(ValueError, match="strings"):
        p.encode(["a", 3])
    with pytest.raises(ValueError, match="x_t has shape"):
        p.velocity(torch.randn(2, 3, 16, 16), t, cond)
    with pytest.raises(ValueError, match="patch_size"):
        p.velocity(torch.randn(2, 4, 15, 16), t, cond)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        p.velocity(x, torch.tensor([0.5, 1.5]), cond)
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        p.velocity(x, torch.tensor([0.5, 0.5, 0.5]), cond)
    with pytest.raises(ValueError, match="2 rows"):
        p.velocity(x, t, cond[0])
    with pytest.raises(ValueError, match="uncond"):
        p.velocity(x, t, Cond(dict(cond.tensors)), 4.5)
    with pytest.raises(ValueError, match="latents must be"):
        p.decode(torch.randn(1, 3, 16, 16))
    with pytest.raises(ValueError, match="uint8"):
        p.encode_images(np.zeros((1, 64, 64, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="multiple of the VAE scale"):
        p.encode_images(np.zeros((1, 62, 64, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="already attached"):
        p.add_lora()
    with pytest.raises(ValueError, match="pytorch_lora_weights"):
        p.load_lora(tmp_path)
    with pytest.raises(ValueError, match="height=60"):
        SD3Policy(p.pipe, height=60, width=64, lora=False)
    with pytest.raises(ValueError, match="unknown LoraConfig key"):
        load(tiny_sd3_dir, lora={"rank": 8})
    with pytest.raises(ValueError, match="not both"):
        load(tiny_sd3_dir, lora={"r": 8}, lora_path=tmp_path)
    with pytest.raises(ValueError, match="max_sequence_length"):
        load(tiny_sd3_dir, max_sequence_length=0)
    with pytest.raises(ValueError, match="dtype"):
        load(tiny_sd3_dir, dtype=torch.float64)
    nolora = load(tiny_sd3_dir, lora=False)
    with pytest.raises(ValueError, match="no LoRA"):
        nolora.merge_lora()
    with pytest.raises(ValueError, match="no LoRA"):
        nolora.save_lora(tmp_path)


def _write_folder(folder: Path, rows: list, images: dict[str, tuple[int, int]]):
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for name, (w, h) in images.items():
        arr = np.zeros((h, w, 3), dtype=np.uint8)
        arr[:, : w // 2] = 255  # left half white: shows which part a centre crop keeps
        Image.fromarray(arr).save(folder / name)
    (folder / "metadata.jsonl").write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return folder


def test_image_folder_counting_dataset(tmp_path):
    include = [{"class": "cat", "count": 3}]
    rows = [{"file_name": "a.png", "prompt": "a photo of three cats", "tag": "counting", "include": include},
            {"file_name": "b.png", "text": "two dogs"}]
    ds = ImageFolderCountingDataset(_write_folder(tmp_path / "ok", rows, {"a.png": (8, 8), "b.png": (12, 8)}))
    assert len(ds) == 2
    item = ds[0]
    assert item["image"].shape == (8, 8, 3) and item["image"].dtype == np.uint8
    assert item["prompt"] == "a photo of three cats"
    assert item["metadata"] == {"prompt": "a photo of three cats", "tag": "counting", "include": include}
    assert ds[1]["prompt"] == "two dogs" and ds[1]["image"].shape == (8, 12, 3)
    cropped = ImageFolderCountingDataset(tmp_path / "ok", resolution=4)[1]["image"]  # 12x8 -> 6x4 -> crop 4x4
    assert cropped.shape == (4, 4, 3)
    assert cropped[:, 0].min() == 255 and cropped[:, -1].max() == 0

    bad = {
        "missing_meta": None,
        "bad_json": ["{not json"],
        "no_file": [{"file_name": "zzz.png", "prompt": "x"}],
        "no_caption": [{"file_name": "a.png"}],
        "disagree": [{"file_name": "a.png", "prompt": "x", "text": "y"}],
        "bad_include": [{"file_name": "a.png", "prompt": "x", "include": [{"class": "cat", "count": 0}]}],
        "empty": [""],
    }
    for name, rows in bad.items():
        folder = tmp_path / name
        if rows is None:
            folder.mkdir()
        else:
            _write_folder(folder, rows, {"a.png": (8, 8)})
        with pytest.raises(ValueError):
            ImageFolderCountingDataset(folder)
    with pytest.raises(ValueError, match="does not exist"):
        ImageFolderCountingDataset(tmp_path / "nowhere")
