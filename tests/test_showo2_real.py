"""The Show-o2 adapter against Show-o2's OWN modeling code (vendored ``show-o2/models``), in Show-o2's env.

These tests need Show-o2's environment (``make showo2-env``: torch 2.5.1, transformers 4.47, diffusers
0.31, ...); the real code does not import next to the main venv's transformers 5 / diffusers 0.42. They carry
the ``showo2_env`` marker: ``make test`` runs them with ``.venv-showo2/bin/python`` and deselects them in
the main venv (conftest.py). The model is the real ``Showo2Qwen2_5`` built from tiny configs
(tests/showo2_real.py): a 2-layer Qwen2, a small SigLIP, the real flow head (one block at Show-o2's fixed
width 2048) and the real Wan2.1 VAE with random weights. No hub access, no weights.
"""
import sys
import warnings
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from showo2_real import MAX_SEQ_LEN, RESOLUTION, make_tiny_showo2, showo2_checkout  # noqa: E402
from train_fixtures import brightness_reward, check_head_only_epoch  # noqa: E402

from grpo_lib.derivation import writeup_euler_step  # noqa: E402
from grpo_lib.policies.showo2 import (ShowO2Params, ShowO2Policy, ShowO2SettingsWarning,  # noqa: E402
                                      load_showo2_modules)
from grpo_lib.rollout import sample_images  # noqa: E402
from grpo_lib.sde import convention_times, sde_step_with_logprob  # noqa: E402

pytestmark = [
    pytest.mark.showo2_env, pytest.mark.usefixtures("one_thread"),
    # Show-o2's own code on a CPU: SigLIP loaded inside from_pretrained's meta-device init (its weights then come
    # from the checkpoint), torch.load of the VAE without weights_only, the VAE's CUDA-only autocast
    pytest.mark.filterwarnings("ignore:for .*copying from a non-meta parameter:UserWarning"),
    pytest.mark.filterwarnings("ignore:You are using `torch.load` with `weights_only=False`:FutureWarning"),
    pytest.mark.filterwarnings("ignore:`torch.cuda.amp.autocast:FutureWarning"),
    pytest.mark.filterwarnings("ignore:User provided device_type of 'cuda', but CUDA is not available:UserWarning"),
]

PROMPTS = ["a photo of two red circles", "three blue squares"]


@pytest.fixture(scope="module")
def mods():
    return load_showo2_modules(showo2_checkout())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, mods):
    import shutil

    root = tmp_path_factory.mktemp("showo2_real")
    yield make_tiny_showo2(root, mods)
    shutil.rmtree(root)   # ~0.9 GB (the 2048-wide head and the full-size VAE); pytest keeps 3 runs' temp dirs


def _sp(tiny, **kw) -> ShowO2Params:
    kw = {"repo": str(tiny.repo), "vae_path": str(tiny.vae_path), "checkpoint": str(tiny.checkpoint),
          "llm_path": str(tiny.llm_path), "resolution": RESOLUTION, "max_seq_len": MAX_SEQ_LEN,
          "weight_dtype": "float32", **kw}
    return ShowO2Params(**kw)


@pytest.fixture(scope="module")
def policy(tiny):
    return ShowO2Policy.from_showo2_params(_sp(tiny))


def _x(policy, n=2, seed=0):
    return torch.randn(n, *policy.latent_shape, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------
# 1. The real classes load through the adapter; layout of the generation sequence
# ------------------------------------------------------------------------------------------------
def test_real_checkout_loads_with_the_names_the_adapter_uses(mods, policy, tiny):
    assert type(policy.model) is mods.Showo2Qwen2_5 and type(policy.vae) is mods.WanVAE
    assert mods.root == showo2_checkout().resolve() == tiny.repo
    assert policy.latent_shape == (16, 8, 8) and policy.num_image_tokens == 17        # 4x4 patches + time token
    assert policy.max_text_len == MAX_SEQ_LEN - 17 - 4
    named = dict(policy.model.named_parameters())
    assert policy.trainable_names == [n for n in named if "diffusion" in n]           # the write-up's loop
    assert {n.split(".")[0] for n in policy.trainable_names} == {"diffusion_head_a", "diffusion_head_b"}
    assert {n for n, q in named.items() if q.requires_grad} == set(policy.trainable_names)
    # the frozen rest includes the parts next to the head whose names lack 'diffusion'
    for frozen in ("time_embed.mlp.0.weight", "diff_proj.0.weight", "fusion_proj.1.weight",
                   "showo.model.embed_tokens.weight", "und_trans.layers.0.self_attn.q_proj.weight"):
        assert not named[frozen].requires_grad, frozen


def test_encode_builds_show_o2_generation_sequences(policy):
    ids = policy.token_ids
    cond = policy.encode(PROMPTS)
    tok, pos = cond.tensors["text_tokens"], cond.tensors["modality_positions"]
    assert tok.shape == (2, MAX_SEQ_LEN) and pos.shape == (2, 1, 2)
    for row, prompt, (offset, length) in zip(tok.tolist(), PROMPTS, pos[:, 0].tolist()):
        words = policy.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        assert len(words) == len(prompt.split())                  # word-level tokenizer: one id per word
        # [<|im_start|>] text [<|vision_start|>] image pads [<|vision_end|>] [eos] [PAD]...
        assert row[0] == ids["bos_id"] and row[1:1 + len(words)] == words
        assert (offset, length) == (len(words) + 2, 17)
        assert row[offset - 1] == ids["boi_id"] and row[offset:offset + length] == [ids["img_pad_id"]] * 17
        assert row[offset + length:offset + length + 2] == [ids["eoi_id"], ids["eos_id"]]
        assert set(row[offset + length + 2:]) == {policy.tokenizer.pad_token_id}
    null = cond.uncond["text_tokens"]
    assert null.shape == tok.shape and cond.uncond["modality_positions"][:, 0].tolist() == [[2, 17], [2, 17]]
    with pytest.raises(ValueError, match=r"has 12 tokens; at most max_text_len=11 fit"):
        policy.encode(["one two three four five six seven eight nine ten red blue"])


# ------------------------------------------------------------------------------------------------
# 2. encode -> velocity -> decode through the real model
# ------------------------------------------------------------------------------------------------
def test_velocity_equals_show_o2s_own_t2i_generate_with_its_cfg_batch(policy, mods):
    """Our velocity with CFG g is what Show-o2's ``t2i_generate`` returns for its [cond; null] batch
    (same mask builder, same t, same tokens); g = 1 here is the conditional branch alone."""
    cond, x = policy.encode(PROMPTS), _x(policy)
    t = torch.tensor([0.3, 0.7])
    tok = torch.cat([cond.tensors["text_tokens"], cond.uncond["text_tokens"]])
    pos = torch.cat([cond.tensors["modality_positions"], cond.uncond["modality_positions"]])
    mask = mods.omni_attn_mask_naive(4, MAX_SEQ_LEN, pos, "cpu").to(torch.float32)
    with torch.no_grad():
        theirs = policy.model.t2i_generate(image_latents=torch.cat([x, x]), t=torch.cat([t, t]), text_tokens=tok,
                                           attention_mask=mask, modality_positions=pos, guidance_scale=4.0,
                                           max_seq_len=MAX_SEQ_LEN)
        ours = policy.velocity(x, t, cond, 4.0)
        v_c = policy.velocity(x, t, cond, 1.0)
    torch.testing.assert_close(ours, theirs[:2], rtol=1e-5, atol=1e-5)
    assert ours.dtype == torch.float32 and ours.shape == x.shape
    assert v_c.abs().mean() > 1e-3 and (ours - v_c).abs().max() > 1e-4           # the prompt matters


def test_attention_mask_is_show_o2s_omni_mask_in_the_weights_dtype(policy, mods):
    """The adapter hands the model Show-o2's omni mask (causal over text, full inside the image block),
    additive and in the weights' dtype, which Show-o2 passes straight to SDPA (a long mask would fail there,
    no mask would make it causal: the t2i_generate test above then fails). A token after the image block
    changes nothing, and each row of a batch is computed as it would be alone."""
    cond, x = policy.encode(PROMPTS), _x(policy)
    seen = {}
    forward = policy.model.forward

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return forward(*args, **kwargs)

    policy.model.forward = spy                                     # instance attribute: nn.Module calls it
    try:
        with torch.no_grad():
            v = policy.velocity(x, 0.5, cond)
    finally:
        del policy.model.forward
    mask, pos = seen["attention_mask"], cond.tensors["modality_positions"]
    assert mask.dtype == torch.float32 and mask.shape == (2, 1, MAX_SEQ_LEN, MAX_SEQ_LEN)
    torch.testing.assert_close(mask, mods.omni_attn_mask_naive(2, MAX_SEQ_LEN, pos, "cpu").float(), rtol=0, atol=0)
    allowed = mask[:, 0] == 0
    causal = torch.ones(MAX_SEQ_LEN, MAX_SEQ_LEN).tril().bool()
    for b, (offset, length) in enumerate(pos[:, 0].tolist()):
        block = torch.zeros_like(causal)
        block[offset:offset + length, offset:offset + length] = True
        assert torch.equal(allowed[b], causal | block)
        assert (mask[b, 0][~(causal | block)] < -1e18).all()
    with torch.no_grad():
        one = policy.velocity(x[1:], 0.5, policy.encode(PROMPTS[1:]))
        torch.testing.assert_close(v[1:], one, rtol=1e-4, atol=1e-5)
        cond.tensors["text_tokens"][0, -1] = policy.token_ids["vid_pad_id"]   # last pad of row 0 -> other id
        torch.testing.assert_close(policy.velocity(x, 0.5, cond), v, rtol=0, atol=0)


def test_decode_is_wan_vae_batch_decode_to_uint8(policy):
    x = _x(policy, seed=3)
    images = policy.decode(x)
    assert images.shape == (2, RESOLUTION, RESOLUTION, 3) and images.dtype.name == "uint8"
    ref = policy.vae.batch_decode(x.unsqueeze(2))[:, :, 0]                    # (B, 3, H, W) in [-1, 1]
    expected = ((ref.permute(0, 2, 3, 1) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
    assert abs(images.astype(int) - expected.astype(int)).max() <= 1
    assert images.std() > 1                                                   # not a constant image


def test_bf16_frozen_weights_with_a_float32_head_run_and_train_only_the_head(tiny):
    policy = ShowO2Policy.from_showo2_params(_sp(tiny, weight_dtype="bfloat16"))
    dtypes = {n: q.dtype for n, q in policy.model.named_parameters()}
    assert {dtypes[n] for n in policy.trainable_names} == {torch.float32}
    assert {d for n, d in dtypes.items() if n not in policy.trainable_names} == {torch.bfloat16}
    cond, x = policy.encode(PROMPTS), _x(policy)
    v = policy.velocity(x, torch.tensor([0.2, 0.6]), cond, guidance_scale=3.0)
    assert v.dtype == torch.float32 and v.shape == x.shape and torch.isfinite(v).all() and v.abs().mean() > 1e-3
    v.square().mean().backward()
    assert all(q.grad is not None and torch.isfinite(q.grad).all() for q in policy.trainable_parameters())
    assert all(q.grad is None for n, q in policy.model.named_parameters() if n not in policy.trainable_names)
    # the bf16 model follows the float32 one to bf16 precision
    ref = ShowO2Policy.from_showo2_params(_sp(tiny))
    with torch.no_grad():
        v32 = ref.velocity(x, torch.tensor([0.2, 0.6]), ref.encode(PROMPTS), guidance_scale=3.0)
    assert (v.detach() - v32).abs().max() <= 0.1 * v32.abs().max()


# ------------------------------------------------------------------------------------------------
# 3. Notebook 00's reversed-time step check through the real model's velocity
# ------------------------------------------------------------------------------------------------
def test_both_conventions_give_the_same_transition_with_the_real_velocity(policy):
    """A whole 12-step SDE chain with the real v: Show-o2's time (t: 0 -> 1, v) and SD3's mirror
    (s = 1 - t: 1 -> 0, -v) with the same noise give the same samples and log-probs, and each step's mean
    and std are the write-up's Euler form (grpo_lib.derivation, float64 transcription)."""
    cond, a = policy.encode(PROMPTS), 0.3
    times_z, times_o = convention_times(12, 3.0, "noise_at_zero"), convention_times(12, 3.0, "noise_at_one")
    torch.testing.assert_close(times_o, 1 - times_z, rtol=0, atol=1e-6)
    x_z = x_o = _x(policy, seed=5)
    worst = {"x": 0.0, "lp": 0.0, "mean": 0.0, "std": 0.0}
    with torch.no_grad():
        for i in range(12):
            t, tn, s, sn = times_z[i].item(), times_z[i + 1].item(), times_o[i].item(), times_o[i + 1].item()
            v_z = policy.velocity(x_z, t, cond)
            v_o = -policy.velocity(x_o, 1 - s, cond)                       # SD3's velocity of the same flow
            seed = 100 + i
            x_z2, lp_z, mu_z, sd_z = sde_step_with_logprob(v_z, t, tn, x_z, noise_level=a, convention="noise_at_zero",
                                                           generator=torch.Generator().manual_seed(seed))
            x_o2, lp_o, _, _ = sde_step_with_logprob(v_o, s, sn, x_o, noise_level=a, convention="noise_at_one",
                                                     generator=torch.Generator().manual_seed(seed))
            if i > 0:   # t = 0 uses the schedule's stand-in (sde.py); the write-up's sigma diverges there
                _, mu_w, sd_w = writeup_euler_step(x_z.double(), v_z.double(), t, tn, a)
                worst["mean"] = max(worst["mean"], ((mu_z - mu_w).abs() / (1 + mu_w.abs())).max().item())
                worst["std"] = max(worst["std"], abs(sd_z.flatten()[0].item() - sd_w.flatten()[0].item()) / sd_w.max().item())
            worst["x"] = max(worst["x"], ((x_o2 - x_z2).abs() / (1 + x_z2.abs())).max().item())
            worst["lp"] = max(worst["lp"], ((lp_o - lp_z).abs() / (1 + lp_z.abs())).max().item())
            x_z, x_o = x_z2, x_o2
    assert worst["x"] < 1e-3 and worst["lp"] < 1e-3, worst                    # notebook 00's chain_rtol
    assert worst["mean"] < 1e-5 and worst["std"] < 1e-5, worst               # notebook 00's step_rtol
    assert torch.isfinite(x_z).all() and not torch.equal(x_z, _x(policy, seed=5))


def test_ode_sampling_runs_t_from_noise_to_data_and_decodes(policy):
    cond = policy.encode(PROMPTS)
    x0 = _x(policy, seed=7)
    final, images = sample_images(policy, cond=cond, num_steps=4, shift=3.0, guidance_scale=2.0, initial_latents=x0)
    assert final.shape == x0.shape and torch.isfinite(final).all() and not torch.equal(final, x0)
    assert images.shape == (2, RESOLUTION, RESOLUTION, 3) and images.dtype.name == "uint8"


# ------------------------------------------------------------------------------------------------
# 4. A GRPO smoke epoch: world='showo2', head-only, frozen-head KL reference
# ------------------------------------------------------------------------------------------------
def test_one_grpo_epoch_on_the_real_model_trains_only_the_flow_head(tmp_path, tiny):
    from grpo_lib.train import GRPOParams, GRPOTrainer

    p = GRPOParams(run_dir=str(tmp_path / "run"), world="showo2", model=str(tiny.checkpoint),
                   convention="noise_at_zero", trainable="pattern:diffusion", showo2_repo=str(tiny.repo),
                   showo2_vae_path=str(tiny.vae_path), showo2_llm_path=str(tiny.llm_path),
                   showo2_max_seq_len=MAX_SEQ_LEN, resolution=RESOLUTION, num_steps=12, eval_num_steps=2,
                   shift=3.0, noise_level=0.3, timestep_strategy="drop_ends", group_size=2, batch_size=2,
                   batches_per_epoch=1, updates_per_epoch=1, num_epochs=1, lr=5e-6, beta=0.01, clip_range=1e-4,
                   eval_max_prompts=2, eval_every=1, save_every=1, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ShowO2SettingsWarning)   # the write-up's own settings: no warning
        trainer = GRPOTrainer(p, reward_fn=brightness_reward)
    policy = trainer.policy
    assert isinstance(policy, ShowO2Policy) and type(policy.model).__name__ == "Showo2Qwen2_5"
    check_head_only_epoch(trainer, tmp_path / "run", ratio_tol=1e-5)
