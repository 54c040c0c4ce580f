"""Show-o2 adapter (grpo_lib.policies.showo2) on a FAKE Show-o2 checkout, and the Show-o2 recipe on the
embedded world (params/02_counting_grpo__showo2_convention.yaml).

The fake (tests/fake_showo2/show-o2/models) has Show-o2's module, class and function names and call
signatures with tiny random networks; it runs in the main venv, where Show-o2's own code does not import.
tests/test_showo2_real.py runs the same adapter against Show-o2's real modeling code in Show-o2's env.
"""
import math
import sys
import warnings
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from showo2_fake import (FAKE_MAX_SEQ_LEN, FAKE_RESOLUTION,  # noqa: E402
                         make_fake_showo2)
from train_fixtures import brightness_reward, check_head_only_epoch  # noqa: E402

from grpo_lib.policies.showo2 import (ShowO2Params, ShowO2Policy, ShowO2SettingsWarning,  # noqa: E402
                                      load_showo2_modules, validate_showo2_settings)
from grpo_lib.rollout import sample_images  # noqa: E402
from grpo_lib.sde import convention_times, sde_step_with_logprob  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHOWO2_CONVENTION_PARAMS = REPO / "params" / "02_counting_grpo__showo2_convention.yaml"


pytestmark = pytest.mark.usefixtures("one_thread")   # 2 shared cores: see conftest


@pytest.fixture(scope="module")
def fake(tmp_path_factory):
    return make_fake_showo2(tmp_path_factory.mktemp("showo2"))


def _sp(fake, **kw) -> ShowO2Params:
    kw = {"repo": str(fake.repo), "vae_path": str(fake.vae_path), "checkpoint": str(fake.checkpoint),
          "llm_path": str(fake.llm_path), "resolution": FAKE_RESOLUTION, "max_seq_len": FAKE_MAX_SEQ_LEN,
          "weight_dtype": "float32", **kw}
    return ShowO2Params(**kw)


def _policy(fake, **kw) -> ShowO2Policy:
    return ShowO2Policy.from_showo2_params(_sp(fake, **kw))


# ------------------------------------------------------------------------------------------------
# 1. Lazy import from the given path, and the errors when something is missing
# ------------------------------------------------------------------------------------------------
def test_checkout_is_imported_lazily_from_the_given_path_only(tmp_path):
    other = make_fake_showo2(tmp_path / "a")                 # a fresh copy: nothing of it imported yet
    path_before, mods_before = list(sys.path), set(sys.modules)
    mods = load_showo2_modules(other.repo)                   # the clone; its show-o2/ folder is found
    assert Path(mods.models.IMPORTED_FROM).resolve() == (other.repo / "show-o2" / "models" / "__init__.py").resolve()
    assert mods.root == (other.repo / "show-o2").resolve()
    assert sys.path == path_before                           # prepended only while importing
    new = set(sys.modules) - mods_before
    assert new and all(n.startswith("_showo2_models_") for n in new), sorted(new)
    assert "models" not in sys.modules                       # no generic top-level 'models' package
    # the same checkout named by its show-o2 folder: the already-imported package, not a second copy
    assert load_showo2_modules(other.repo / "show-o2").models is mods.models
    # another checkout elsewhere is another package
    second = make_fake_showo2(tmp_path / "b")
    assert load_showo2_modules(second.repo).models is not mods.models


def test_missing_or_broken_installation_gives_instructive_errors(tmp_path, fake):
    with pytest.raises(ValueError, match=r"showo2 repo='' is empty: clone https://github.com/showlab/Show-o"):
        ShowO2Params(repo="", vae_path=str(fake.vae_path))
    with pytest.raises(ValueError, match=r"showo2 vae_path='' is empty: download Wan2.1_VAE.pth"):
        ShowO2Params(repo=str(fake.repo), vae_path="")
    with pytest.raises(ValueError, match=r"showo2_repo='.*nowhere' is not a directory: clone https://github.com/showlab"):
        load_showo2_modules(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"holds neither models/__init__.py nor show-o2/models/__init__.py"):
        load_showo2_modules(tmp_path / "empty")
    with pytest.raises(ValueError, match=r"vae_path='.*missing.pth' is not a file: download Wan2.1_VAE.pth"):
        ShowO2Params(repo=str(fake.repo), vae_path=str(tmp_path / "missing.pth")).check_paths()
    # a checkout whose dependencies are not installed: ImportError naming the module and the requirements
    broken = tmp_path / "broken" / "show-o2"
    (broken / "models").mkdir(parents=True)
    (broken / "models" / "__init__.py").write_text("import definitely_not_installed_xyz\n")
    path_before = list(sys.path)
    with pytest.raises(ImportError, match=r"The module 'definitely_not_installed_xyz' is missing: install the "
                                          r"checkout's requirements \(.*requirements.txt\)"):
        load_showo2_modules(broken)
    assert sys.path == path_before
    # installed but too new (what Show-o2's modeling_utils.py hits beside diffusers >= 0.32): not "missing",
    # but the versions Show-o2 pins and how to install them
    too_new = tmp_path / "too_new" / "show-o2"
    (too_new / "models").mkdir(parents=True)
    (too_new / "models" / "__init__.py").write_text("from json import FLAX_WEIGHTS_NAME\n")
    with pytest.raises(ImportError, match=r"cannot import name 'FLAX_WEIGHTS_NAME' from 'json'.*\. 'json' is "
                                          r"installed but not at a version Show-o2's code works with; Show-o2 "
                                          r"pins torch==2.5.1, transformers==4.47.0, diffusers==0.31.0.*"
                                          r"pip install -c envs/showo2-constraints.txt -e '.\[showo2\]'") as err:
        load_showo2_modules(too_new)
    assert "is missing" not in str(err.value)
    assert not [n for n in sys.modules if n.startswith("_showo2_models_") and "broken" in str(
        getattr(sys.modules[n], "__file__", ""))]
    # checkpoint / tokenizer that cannot be loaded
    with pytest.raises(ValueError, match=r"could not load the Show-o2 checkpoint model='.*nope'.*showlab/show-o2-1.5B"):
        ShowO2Policy.from_showo2_params(_sp(fake, checkpoint=str(tmp_path / "nope")))
    with pytest.raises(ValueError, match=r"could not load Show-o2's tokenizer from llm_path='.*nope'"):
        ShowO2Policy.from_showo2_params(_sp(fake, llm_path=str(tmp_path / "nope")))
    # the wrong convention
    from grpo_lib.train import GRPOParams as P
    with pytest.raises(ValueError, match=r"convention='noise_at_one' but Show-o2 runs in 'noise_at_zero'"):
        ShowO2Policy.from_params(P(world="showo2", trainable="pattern:diffusion", showo2_repo=str(fake.repo)))
    # no LoRA path; a resolution the VAE and patches cannot tile
    with pytest.raises(ValueError, match=r"trainable='lora' must be 'all' or 'pattern:<regex>'"):
        _sp(fake, trainable="lora")
    with pytest.raises(ValueError, match=r"resolution=100 must be a positive multiple of 16"):
        _sp(fake, resolution=100)


def test_the_real_checkout_in_a_foreign_environment_says_which_environment_it_needs(monkeypatch):
    """The issue's user: Show-o2's real code (the vendored snapshot) imported next to this venv's packages."""
    from conftest import showo2_env_missing
    from showo2_real import showo2_checkout

    if showo2_env_missing() is None:
        # in Show-o2's env the real code imports: tests/test_showo2_real.py covers it
        assert load_showo2_modules(showo2_checkout()).Showo2Qwen2_5.__name__ == "Showo2Qwen2_5"
        return
    with pytest.raises(ImportError, match=r"importing Show-o2's models package from '.*show-o2' failed: .*"
                                          r"use Show-o2's own environment, e.g. pip install -c "
                                          r"envs/showo2-constraints.txt"):
        load_showo2_modules(showo2_checkout())


# ------------------------------------------------------------------------------------------------
# 2. Head-only selection
# ------------------------------------------------------------------------------------------------
def test_head_only_selection_picks_exactly_the_diffusion_parameters(fake):
    from grpo_lib.policies.base import Policy

    policy = _policy(fake)                                   # trainable defaults to 'pattern:diffusion'
    assert isinstance(policy, Policy) and policy.has_frozen_reference
    named = dict(policy.model.named_parameters())
    expected = [n for n in named if "diffusion" in n]        # the write-up's loop, literally
    assert 0 < len(expected) < len(named)
    assert policy.trainable_names == expected
    assert {n.split(".")[0] for n in expected} == {"diffusion_head_a", "diffusion_head_b"}
    assert {n for n, q in named.items() if q.requires_grad} == set(expected)
    assert [id(q) for q in policy.trainable_parameters()] == [id(named[n]) for n in expected]
    # the LLM, the time embedding and diff_proj stay frozen (names without 'diffusion')
    assert not named["showo.model.embed_tokens.weight"].requires_grad
    assert not named["time_embed.mlp.0.weight"].requires_grad and not named["diff_proj.0.weight"].requires_grad
    full = _policy(fake, trainable="all")
    assert full.trainable_names == list(dict(full.model.named_parameters()))
    with pytest.raises(ValueError, match=r"trainable='pattern:nothing_here' matches no parameter"):
        _policy(fake, trainable="pattern:nothing_here")


def test_bf16_weights_keep_a_float32_head_and_train_only_it(fake):
    policy = _policy(fake, weight_dtype="bfloat16")
    dtypes = {n: q.dtype for n, q in policy.model.named_parameters()}
    assert all(dtypes[n] == torch.float32 for n in policy.trainable_names)
    assert {d for n, d in dtypes.items() if n not in policy.trainable_names} == {torch.bfloat16}
    cond = policy.encode(["a photo of two red circles", "three blue squares"])
    x = torch.randn(2, *policy.latent_shape, generator=torch.Generator().manual_seed(0))
    v = policy.velocity(x, 0.4, cond, guidance_scale=3.0)
    assert v.dtype == torch.float32 and v.shape == x.shape and torch.isfinite(v).all()
    v.square().mean().backward()
    assert all(q.grad is not None and torch.isfinite(q.grad).all() for q in policy.trainable_parameters())
    assert all(q.grad is None for n, q in policy.model.named_parameters() if n not in policy.trainable_names)


# ------------------------------------------------------------------------------------------------
# 3. The time / sign convention through sde_step_with_logprob
# ------------------------------------------------------------------------------------------------
def _oracle(data: torch.Tensor):
    """Show-o2's native semantics for one data point x_1: x_t = t x_1 + (1 - t) x_0, v = x_1 - x_0 = (x_1 - x_t)/(1 - t),
    t fed as is. Conditional rows (text present: image block offset > 2) get +1, so CFG order shows."""
    def forward(text_tokens, image_latents=None, t=None, modality_positions=None, **kwargs):
        n = image_latents.shape[0]
        target = data.repeat(n // data.shape[0], 1, 1, 1)
        tt = t.float().view(n, 1, 1, 1)
        is_cond = (modality_positions[:, 0, 0] > 2).float().view(n, 1, 1, 1)
        return None, (target - image_latents.float()) / (1 - tt) + is_cond
    return forward


def test_velocity_is_show_o2_native_and_noise_at_zero_sampling_reaches_the_data(fake):
    policy = _policy(fake)
    g = torch.Generator().manual_seed(0)
    x1 = torch.randn(2, *policy.latent_shape, generator=g)                  # the "data"
    cond = policy.encode(["a photo of four red circles", "two cats"])
    policy.model.forward = _oracle(x1)                                      # instance attribute: nn.Module calls it
    x_t = torch.randn(2, *policy.latent_shape, generator=g)
    base = (x1 - x_t) / (1 - 0.25)
    # no flip, no 1 - t, no 1000 t: the network's output in its own time; cond-only at g = 1
    torch.testing.assert_close(policy.velocity(x_t, 0.25, cond), base + 1, rtol=1e-6, atol=1e-6)
    # CFG with the write-up's [cond; null] batch: v_u + g (v_c - v_u) = base + g
    torch.testing.assert_close(policy.velocity(x_t, torch.tensor([0.25, 0.25]), cond, 4.0), base + 4,
                               rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(policy.velocity(x_t, 0.25, cond, 0.0), base, rtol=1e-6, atol=1e-6)

    # the write-up's SDE step in Show-o2 time equals grpo_lib's noise_at_zero step (t: 0.25 -> 0.4, a = 0.3)
    a, t, tn = 0.3, 0.25, 0.4
    v = policy.velocity(x_t, t, cond, 0.0)
    _, _, mean, std = sde_step_with_logprob(v, t, tn, x_t, noise_level=a, convention="noise_at_zero")
    sigma, dt = a * math.sqrt((1 - t) / t), tn - t
    expected = (1 - sigma ** 2 * dt / (2 * (1 - t))) * x_t + (1 + sigma ** 2 * t / (2 * (1 - t))) * v * dt
    torch.testing.assert_close(mean, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(std.reshape(-1), torch.full((2,), sigma * math.sqrt(dt)), rtol=1e-6, atol=0)

    # the whole chain: ODE sampling in noise_at_zero from noise at t = 0 lands on the data at t = 1
    # (Euler is exact on the straight path of one data point; a flipped sign or 1 - t would not be)
    times = convention_times(12, 3.0, "noise_at_zero")
    assert times[0] == 0 and times[-1] == 1
    x0 = torch.randn(2, *policy.latent_shape, generator=g)
    final, images = sample_images(policy, cond=cond, num_steps=12, shift=3.0, guidance_scale=0.0, initial_latents=x0)
    torch.testing.assert_close(final, x1, rtol=0, atol=1e-4)
    assert images.shape == (2, FAKE_RESOLUTION, FAKE_RESOLUTION, 3) and images.dtype.name == "uint8"


# ------------------------------------------------------------------------------------------------
# 4. One GRPO step through GRPOTrainer with world='showo2'
# ------------------------------------------------------------------------------------------------
def test_one_grpo_epoch_with_world_showo2_trains_only_the_head(tmp_path, fake):
    from grpo_lib.train import GRPOTrainer

    from grpo_lib.train import GRPOParams as P
    p = P(run_dir=str(tmp_path / "run"), world="showo2", model=str(fake.checkpoint), convention="noise_at_zero",
          trainable="pattern:diffusion", showo2_repo=str(fake.repo), showo2_vae_path=str(fake.vae_path),
          showo2_llm_path=str(fake.llm_path), showo2_max_seq_len=FAKE_MAX_SEQ_LEN, resolution=FAKE_RESOLUTION,
          num_steps=12, eval_num_steps=4, shift=3.0, noise_level=0.3, timestep_strategy="drop_ends",
          group_size=2, batch_size=4, batches_per_epoch=2, updates_per_epoch=1, num_epochs=1, lr=5e-6, beta=0.01,
          clip_range=1e-4, eval_max_prompts=4, eval_every=1, save_every=1, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ShowO2SettingsWarning)   # the write-up's own settings: no warning
        trainer = GRPOTrainer(p, reward_fn=brightness_reward)
    policy = trainer.policy
    assert isinstance(policy, ShowO2Policy) and policy.convention == "noise_at_zero"
    check_head_only_epoch(trainer, tmp_path / "run", ratio_tol=1e-6)


# ------------------------------------------------------------------------------------------------
# 5. The write-up's settings, validated
# ------------------------------------------------------------------------------------------------
def test_validate_showo2_settings_accepts_the_write_up_and_warns_or_raises_outside_it():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s = validate_showo2_settings(0.3, 12, "drop_ends", 5e-6, num_processes=4, batch_size=8, group_size=16,
                                     groups_per_epoch=16)
    assert s.trained_steps == tuple(range(1, 11))           # 12 sampled, 10 trained
    assert s.batches_per_epoch == 8                          # 16 / (4 * 8 / 16)
    assert s.arith.samples_per_epoch == 16 * 16
    for a in (0.05, 0.7):
        with pytest.warns(ShowO2SettingsWarning, match=rf"noise_level={a} is outside \[0.1, 0.5\]"):
            validate_showo2_settings(a, 12, "drop_ends", 5e-6, 1, 8, 8, 4)
    with pytest.warns(ShowO2SettingsWarning, match=r"lr=5e-05 is above 1e-05: .*diverged at 5e-5"):
        validate_showo2_settings(0.3, 12, "drop_ends", 5e-5, 1, 8, 8, 4)
    with pytest.warns(ShowO2SettingsWarning, match=r"num_steps=10: the Show-o2 write-up samples 12"):
        validate_showo2_settings(0.3, 10, "drop_ends", 5e-6, 1, 8, 8, 4)
    with pytest.warns(ShowO2SettingsWarning, match=r"timestep_strategy='first_50'.*use 'drop_ends'"):
        validate_showo2_settings(0.3, 12, "first_50", 5e-6, 1, 8, 8, 4)
    with pytest.raises(ValueError, match=r"noise_level=0 must be a finite float > 0"):
        validate_showo2_settings(0, 12, "drop_ends", 5e-6, 1, 8, 8, 4)
    with pytest.raises(ValueError, match=r"lr=0.0 must be a finite float > 0"):
        validate_showo2_settings(0.3, 12, "drop_ends", 0.0, 1, 8, 8, 4)
    with pytest.raises(ValueError, match=r"timestep_strategy='drop_ends' with num_steps=2: no trainable steps"):
        validate_showo2_settings(0.3, 2, "drop_ends", 5e-6, 1, 8, 8, 4)
    with pytest.raises(ValueError, match=r"unknown timestep strategy 'bogus'"):
        validate_showo2_settings(0.3, 12, "bogus", 5e-6, 1, 8, 8, 4)
    # the seed's int(16 / (gpus * bs / G)) would silently truncate 16 / (4 * 6 / 16) = 10.67 to 10
    with pytest.raises(ValueError, match=r"groups_per_epoch\*group_size = 16\*16 = 256 is not a multiple of "
                                         r"num_processes\*batch_size = 4\*6 = 24"):
        validate_showo2_settings(0.3, 12, "drop_ends", 5e-6, 4, 6, 16, 16)


# ------------------------------------------------------------------------------------------------
# 6. The Show-o2 recipe on the embedded world: one tiny epoch of the showo2_convention params
# ------------------------------------------------------------------------------------------------
def test_showo2_convention_params_run_one_tiny_epoch_on_a_random_tiny_policy(tmp_path, monkeypatch):
    import grpo_lib.grpo as grpo
    from grpo_lib.params import load_params
    from grpo_lib.policies.tiny import TinyConfig, TinyPolicy
    from grpo_lib.train import GRPOTrainer, select_trainable

    full = load_params(SHOWO2_CONVENTION_PARAMS)
    assert (full.world, full.convention, full.timestep_strategy, full.num_steps) == \
           ("embedded", "noise_at_zero", "drop_ends", 12)
    with warnings.catch_warnings():   # the file itself sits inside the write-up's ranges
        warnings.simplefilter("error", ShowO2SettingsWarning)
        validate_showo2_settings(full.noise_level, full.num_steps, full.timestep_strategy, full.lr, 1,
                                 full.batch_size, full.group_size,
                                 full.batch_size * full.batches_per_epoch // full.group_size)
    p = load_params(SHOWO2_CONVENTION_PARAMS, run_dir=str(tmp_path / "run"), num_epochs=1, group_size=2,
                    batch_size=4, batches_per_epoch=2, updates_per_epoch=1, eval_max_prompts=4, eval_num_steps=4,
                    eval_every=1, save_every=1, ema_decay=0.0, progress=False)
    cfg = TinyConfig(block_out_channels=(16, 32, 32), norm_num_groups=8, text_dim=32, text_layers=1)
    policy = TinyPolicy(cfg, convention="noise_at_zero", train_text_encoder=False, seed=0)
    head = select_trainable(policy, p.trainable)
    named = dict(policy.named_parameters())
    assert head and all(n.startswith(("unet.up_blocks.", "unet.conv_norm_out.", "unet.conv_out.")) for n in head)
    assert any(n.startswith("unet.down_blocks.") for n in named) and not any("text_encoder" in n for n in head)
    before = {n: q.detach().clone() for n, q in named.items()}
    chosen = []
    orig = grpo.select_timesteps

    def spy(*args, **kwargs):
        out = orig(*args, **kwargs)
        chosen.append(out)
        return out

    monkeypatch.setattr(grpo, "select_timesteps", spy)
    trainer = GRPOTrainer(p, policy=policy, reward_fn=brightness_reward)
    try:
        hist = trainer.fit()
    finally:
        trainer.close()
    assert chosen and all(torch.equal(c, torch.arange(1, 11).unsqueeze(0)) for c in chosen)   # drop_ends of 12
    changed = {n for n, q in policy.named_parameters() if not torch.equal(q, before[n])}
    assert changed and changed <= set(head)                    # text encoder ('LLM') and down path frozen
    assert hist[-1]["ratio_min"] == pytest.approx(1.0, abs=1e-6)
    assert math.isfinite(hist[-1]["loss"]) and (tmp_path / "run" / "metrics.csv").is_file()


@pytest.mark.parametrize("objective", ["nft", "awm", "dgpo"])
def test_likelihood_free_objectives_train_only_the_head_of_a_noise_at_zero_policy(tmp_path, objective):
    """NFT, AWM and DGPO reach a Show-o2-convention policy through ``policy_velocity`` (s = 1 - t, v -> -v):
    one tiny epoch of the showo2_convention params with each objective moves the head and nothing else."""
    from grpo_lib.params import load_params
    from grpo_lib.policies.tiny import TinyConfig, TinyPolicy
    from grpo_lib.train import GRPOTrainer, select_trainable

    p = load_params(SHOWO2_CONVENTION_PARAMS, run_dir=str(tmp_path / "run"), num_epochs=1, group_size=2,
                    batch_size=4, batches_per_epoch=2, updates_per_epoch=1, eval_max_prompts=4, eval_num_steps=4,
                    eval_every=1, save_every=1, ema_decay=0.0, progress=False, objective=objective,
                    train_timesteps=2, group_shared_noise=objective == "dgpo", lr=1e-3)
    cfg = TinyConfig(block_out_channels=(16, 32, 32), norm_num_groups=8, text_dim=32, text_layers=1)
    policy = TinyPolicy(cfg, convention="noise_at_zero", train_text_encoder=False, seed=0)
    head = set(select_trainable(policy, p.trainable))
    before = {n: q.detach().clone() for n, q in policy.named_parameters()}
    trainer = GRPOTrainer(p, policy=policy, reward_fn=brightness_reward)
    try:
        hist = trainer.fit()
    finally:
        trainer.close()
    changed = {n for n, q in policy.named_parameters() if not torch.equal(q, before[n])}
    assert changed and changed <= head
    assert math.isfinite(hist[-1]["loss"]) and hist[-1]["grad_norm"] > 0
