"""TinyPolicy: the Policy contract, CFG, the convention mirror, LoRA, save / load (all on a small config)."""
from __future__ import annotations

import pytest
import torch

from grpo_lib.prompts import load_rows
from grpo_lib.policies.base import Cond, Policy, apply_cfg
from grpo_lib.policies.tiny import BOS, PAD, UNK, TinyConfig, TinyPolicy

torch.set_num_threads(1)

SMALL = dict(block_out_channels=(8, 16, 16), cross_attn_levels=(False, False, True), norm_num_groups=4,
             attention_heads=2, text_dim=16, text_heads=2, text_layers=1)
PROMPTS = ["a photo of four red circles", "one blue square", "two cyan triangles on a grey background"]


def make(convention="noise_at_one", seed=0) -> TinyPolicy:
    return TinyPolicy(TinyConfig(**SMALL), convention=convention, seed=seed)


def perturb_lora(policy: TinyPolicy, seed=1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in policy.unet.named_parameters():
            if "lora_B" in n:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


@pytest.fixture
def x():
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def test_contract_and_shapes(x):
    p = make()
    assert isinstance(p, Policy)
    assert p.latent_shape == (3, 32, 32) and p.convention == "noise_at_one"
    c = p.encode(PROMPTS)
    L, D = p.config.max_tokens, p.config.text_dim
    assert c.tensors["tokens"].shape == (3, L, D) and c.uncond["tokens"].shape == (3, L, D)
    assert c.tensors["mask"].shape == (3, L) and c.tensors["pooled"].shape == (3, D)
    # mask counts <bos> + words; the empty prompt has only <bos>
    assert c.tensors["mask"].sum(1).tolist() == [7, 4, 8]
    assert c.uncond["mask"].sum(1).tolist() == [1, 1, 1]
    v = p.velocity(x, 0.3, c, 1.0)
    assert v.shape == x.shape and v.dtype == torch.float32
    v2 = p.velocity(x, torch.tensor([0.1, 0.5, 0.9]), c, 2.0)
    assert v2.shape == x.shape
    img = p.decode(x.clamp(-1, 1))
    assert img.shape == (3, 32, 32, 3) and img.dtype.name == "uint8"
    assert 0.9e6 < sum(q.numel() for q in TinyPolicy(seed=0).unet.parameters()) < 2.0e6   # shipped size


def test_tokenizer_covers_every_shipped_prompt(repo):
    tok = make().tokenizer
    for name in ("train", "val", "test", "train_counts_1_7"):
        rows = load_rows(repo / "data" / "counting" / f"{name}.jsonl")
        ids, mask = tok([r["prompt"] for r in rows])
        assert not (ids == UNK).any(), name
        assert (ids[:, 0] == BOS).all() and ((ids == PAD) == (mask == 0)).all()
    ids, _ = tok(["five red dots"])            # unknown word -> <unk>, known words kept
    assert ids[0, :4].tolist() == [BOS, tok.stoi["five"], tok.stoi["red"], UNK]


def test_cfg_formula(x):
    p = make()
    c = p.encode(PROMPTS)
    g = 4.5
    v_c = p.velocity(x, 0.6, c, 1.0)
    v_u = p.velocity(x, 0.6, Cond(c.uncond), 1.0)       # the uncond branch alone
    torch.testing.assert_close(p.velocity(x, 0.6, c, g), apply_cfg(v_u, v_c, g), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(p.velocity(x, 0.6, c, 0.0), v_u, atol=1e-5, rtol=1e-5)


def test_convention_mirror_is_exact(x):
    one, zero = make("noise_at_one"), make("noise_at_zero")
    zero.load_state_dict(one.state_dict())
    c = one.encode(PROMPTS)
    t = torch.tensor([0.1, 0.5, 0.875])
    for g in (1.0, 3.0):
        assert torch.equal(zero.velocity(x, t, c, g), -one.velocity(x, 1 - t, c, g))


def test_save_load_round_trip(tmp_path, x):
    p = make()
    with torch.no_grad():                               # move off the init so the test can fail
        for q in p.parameters():
            q.add_(0.01 * torch.randn_like(q))
    c = p.encode(PROMPTS)
    v = p.velocity(x, 0.25, c, 3.0)
    p.save_pretrained(tmp_path / "m")
    q = TinyPolicy.from_pretrained(tmp_path / "m")
    assert torch.equal(q.velocity(x, 0.25, q.encode(PROMPTS), 3.0), v)
    z = TinyPolicy.from_pretrained(tmp_path / "m", convention="noise_at_zero")
    assert torch.equal(z.velocity(x, 0.75, c, 3.0), -v)   # 1 - 0.75 is exact in float32
    assert not list(tmp_path.glob(".m.tmp*"))          # atomic write left no temp dir
    with pytest.raises(ValueError, match="tiny_policy.json"):
        TinyPolicy.from_pretrained(tmp_path)


def test_lora_reference_merge_and_grads(tmp_path, x):
    p = make()
    c = p.encode(PROMPTS)
    v_base = p.velocity(x, 0.5, c, 2.0)
    p.add_lora()
    assert p.has_lora
    assert torch.equal(p.velocity(x, 0.5, c, 2.0), v_base)            # lora_B = 0
    perturb_lora(p)
    v_lora = p.velocity(x, 0.5, c, 2.0)
    assert (v_lora - v_base).abs().max() > 1e-3
    with p.reference():
        assert torch.equal(p.velocity(x, 0.5, c, 2.0), v_base)
    assert torch.equal(p.velocity(x, 0.5, c, 2.0), v_lora)             # re-enabled after the context

    # gradients reach the LoRA parameters only, and every trainable parameter is a LoRA one
    trainable = p.trainable_parameters()
    names = {id(q): n for n, q in p.named_parameters()}
    assert trainable and all("lora_" in names[id(q)] for q in trainable)
    p.velocity(x, 0.5, p.encode(PROMPTS), 2.0).pow(2).mean().backward()
    for n, q in p.named_parameters():
        if "lora_" in n:
            assert q.grad is not None, n
        else:
            assert q.grad is None, n
    convs = [n for n in names.values() if "lora_A" in n and ("conv1" in n or "conv2" in n)]
    assert convs                                                        # resnet convs are LoRA targets

    # LoRA save / load round trip on a fresh copy of the base
    p.save_lora(tmp_path / "lora")
    with pytest.raises(ValueError, match="LoRA is attached"):
        p.save_pretrained(tmp_path / "nope")
    q = make()
    q.load_lora(tmp_path / "lora")
    assert torch.equal(q.velocity(x, 0.5, c, 2.0), v_lora)

    # merge: the merged model reproduces the LoRA output and becomes the reference of a new adapter
    p.merge_lora()
    assert not p.has_lora
    v_merged = p.velocity(x, 0.5, c, 2.0)
    torch.testing.assert_close(v_merged, v_lora, atol=1e-5, rtol=1e-4)
    p.add_lora()
    perturb_lora(p, seed=2)
    with p.reference():
        assert torch.equal(p.velocity(x, 0.5, c, 2.0), v_merged)
    with pytest.raises(ValueError, match="already attached"):
        p.add_lora()


def test_bad_inputs(x):
    p = make()
    c = p.encode(PROMPTS)
    with pytest.raises(ValueError, match="list of strings"):
        p.encode("a photo of one red circle")
    with pytest.raises(ValueError, match="no word"):
        p.encode(["a photo of a cat"[14:]])                             # "cat": nothing known
    with pytest.raises(ValueError, match="at most"):
        p.encode([" ".join(["red"] * 20)])
    with pytest.raises(ValueError, match="shape"):
        p.velocity(x[:, :, :16], 0.5, c)
    with pytest.raises(ValueError, match="3 prompts"):
        p.velocity(x[:2], 0.5, c)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        p.velocity(x, 1.5, c)
    with pytest.raises(ValueError, match="shape"):
        p.velocity(x, torch.tensor([0.5, 0.5]), c)
    with pytest.raises(ValueError, match="guidance_scale"):
        p.velocity(x, 0.5, c, -1.0)
    with pytest.raises(ValueError, match="uncond"):
        p.velocity(x, 0.5, Cond(c.tensors), 2.0)
    with pytest.raises(ValueError, match="convention"):
        TinyPolicy(TinyConfig(**SMALL), convention="noise_at_half")
    with pytest.raises(ValueError, match="unknown LoraConfig"):
        p.add_lora({"rank": 4})
    with pytest.raises(ValueError, match="no LoRA"):
        p.merge_lora()


def test_load_lora_from_another_architecture_is_a_value_error(tmp_path):
    import torch
    from grpo_lib.policies.tiny import TinyConfig, TinyPolicy

    small = TinyPolicy(TinyConfig(block_out_channels=(16, 32, 32), text_dim=32, text_layers=1), seed=0)
    small.add_lora({"r": 4, "lora_alpha": 4})
    small.save_lora(tmp_path / "lora")
    other = TinyPolicy(TinyConfig(block_out_channels=(16, 32, 64), text_dim=32, text_layers=1), seed=0)
    with pytest.raises(ValueError, match="does not fit this model"):
        other.load_lora(tmp_path / "lora")


def test_unet_weights_are_channels_last_unless_a_groupnorm_trains_behind_frozen_layers():
    """The UNet runs channels-last (faster CPU kernels, the same values to float tolerance), except when a
    GroupNorm trains while the first layers are frozen: torch 2.13's CPU GroupNorm backward segfaults on a
    channels-last input that needs no gradient, so that case (head-only training) runs contiguous."""
    from grpo_lib.policies.base import select_trainable

    cfg = TinyConfig(block_out_channels=(16, 32, 32), norm_num_groups=8, text_dim=32, text_layers=1)
    policy = TinyPolicy(cfg, seed=0)
    conv = policy.unet.conv_in.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    cond = policy.encode(["three red circles", "one blue square"])
    with torch.no_grad():
        v_last = policy.velocity(x, 0.4, cond, 2.0)
    policy.add_lora({"r": 4, "lora_alpha": 4})                     # LoRA: no GroupNorm trains
    policy.velocity(x, 0.4, cond).pow(2).mean().backward()
    assert policy.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)

    head = TinyPolicy(cfg, seed=0)
    select_trainable(head, "pattern:up_blocks")                     # GroupNorms of the head train, conv_in is frozen
    v = head.velocity(x, 0.4, head.encode(["three red circles", "one blue square"]))
    v.pow(2).mean().backward()                                      # segfaulted with channels-last weights
    assert head.unet.conv_in.weight.is_contiguous()
    assert any(q.grad is not None for n, q in head.unet.named_parameters() if "norm" in n)
    with torch.no_grad():
        torch.testing.assert_close(head.velocity(x, 0.4, cond, 2.0), v_last, atol=1e-5, rtol=1e-4)
