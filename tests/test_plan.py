"""The run planner (grpo_lib.plan): exact batch arithmetic and nearby settings, refusals that name what to
change, parameter counts from configs, the block-count memory model checked by measurement at a small width,
and the README table being the one the planner generates now."""
from __future__ import annotations

import math
from pathlib import Path

import pytest

from grpo_lib import plan as planner
from grpo_lib.plan_calibrate import block_check, predict
from grpo_lib.plan_models import SD35M_TRANSFORMER_CONFIG, count_parameters

REPO = Path(__file__).resolve().parent.parent
COUNTING = REPO / "params" / "02_counting_grpo__sd35m_strict_first_50.yaml"
COLD = REPO / "params" / "01_cold_start__sd35m.yaml"
SHOWO2_VENDOR = REPO.parent / "shared" / "vendor" / "show-o2"


# ---------------------------------------------------------------------------------------------- arithmetic
def test_counting_config_on_4_gpus_is_the_forks_epoch():
    a = planner.arithmetic(4, 6, 12, updates_per_epoch=2, batches_per_epoch=24)
    assert (a.groups_per_epoch, a.batches_per_epoch, a.images_per_epoch, a.images_per_gpu) == (48, 24, 576, 144)


def test_nearby_settings_are_exact():
    # M G = 576 images; P B must divide it and N_b = 576 / (P B) must be even (2 updates per epoch)
    near = planner.nearby_settings(4, 6, 12, 48, 2)
    assert near["gpus"] == [{"gpus": 3, "batches_per_epoch": 32}, {"gpus": 2, "batches_per_epoch": 48},
                            {"gpus": 6, "batches_per_epoch": 16}, {"gpus": 1, "batches_per_epoch": 96},
                            {"gpus": 8, "batches_per_epoch": 12}]
    # B = 16 would give N_b = 9 (odd), so it is not offered
    assert [d["batch_size"] for d in near["batch_size"]] == [4, 8, 3, 9, 2]
    assert [d["batches_per_epoch"] for d in near["batch_size"]] == [36, 18, 48, 16, 72]
    assert near["group_size"] == [{"group_size": g, "batches_per_epoch": 2 * g} for g in (11, 13, 10, 14, 9)]


def test_keeping_48_groups_on_each_gpu_count():
    for gpus, nb in ((1, 96), (4, 24), (8, 12)):
        a = planner.arithmetic(gpus, 6, 12, updates_per_epoch=2, groups_per_epoch=48)
        assert (a.groups_per_epoch, a.batches_per_epoch) == (48, nb)
    with pytest.raises(ValueError, match=r"on 5 GPUs: .*use gpus 4, 6, 3, 2, 8"):
        planner.arithmetic(5, 6, 12, updates_per_epoch=2, groups_per_epoch=48)


def test_cli_refuses_a_group_size_no_gpu_count_divides(capsys):
    # 48 groups x 7 images = 336 is not a multiple of batch_size 5, whatever the GPU count
    rc = planner.main([str(COUNTING), "--gpus", "4", "--gpu-mem-gib", "80", "--groups-per-epoch", "48",
                       "--set", "group_size=7", "batch_size=5"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "group_size=7: no GPU count from 1 to 64 splits 48 groups x 7 images = 336" in err
    assert "change batch_size 6, 3, 7, 2, 1; or group_size 5, 10" in err


def test_cli_refuses_a_partial_group_with_the_nearest_fixes(capsys):
    rc = planner.main([str(COUNTING), "--gpus", "4", "--gpu-mem-gib", "80", "--set", "group_size=7"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "4*6*24 = 576 is not a multiple of group_size=7" in err
    assert "num_processes 7" in err


def test_cli_refuses_memory_too_small_for_the_weights(capsys):
    counts = count_parameters(32)
    static_gib = (2 * (counts["sd3_transformer"] + counts["clip_l"] + counts["clip_g"] + counts["t5_xxl"])
                  + 4 * counts["sd3_vae"] + (16 + 4) * counts["sd3_lora"]) / 2 ** 30
    rc = planner.main([str(COUNTING), "--gpus", "4", "--gpu-mem-gib", "16"])
    err = capsys.readouterr().err
    assert rc == 2
    assert f"alone need {static_gib:.1f} GiB per GPU" in err
    need = math.ceil((static_gib + 1.5) / 0.9)         # + assumed overhead, 10 % margin
    assert need == 19
    assert f"use GPUs with at least {need} GiB, or precompute the prompt embeddings (--text-encoders precomputed" in err
    # the same run with precomputed embeddings is planned, not refused
    assert planner.main([str(COUNTING), "--gpus", "4", "--gpu-mem-gib", "16", "--text-encoders", "precomputed"]) in (0, 1)


# ---------------------------------------------------------------------------------------------- counts
def test_lora_count_matches_the_attention_shapes():
    # r (in + out) per adapted Linear, all 1536 x 1536: 8 projections x 24 blocks, minus to_add_out of the last
    # (context_pre_only) block, plus attn2's 4 projections in the 13 dual-attention blocks
    n_linear = 8 * 24 - 1 + 4 * len(SD35M_TRANSFORMER_CONFIG["dual_attention_layers"])
    assert count_parameters(32)["sd3_lora"] == n_linear * 32 * (1536 + 1536)
    assert count_parameters(16)["sd3_lora"] == n_linear * 16 * (1536 + 1536)


def test_showo2_head_count_matches_showo2_source():
    if not (SHOWO2_VENDOR / "models" / "modules.py").is_file():
        pytest.skip(f"no Show-o2 source at {SHOWO2_VENDOR}")
    import torch

    from grpo_lib.plan_calibrate import showo2_modules
    from grpo_lib.plan_models import showo2_final_layer_params, showo2_head_block_params

    mods = showo2_modules(SHOWO2_VENDOR)
    with torch.device("meta"):
        block = mods.ModulatedAttentionBlock(mods.DiffusionHeadConfig(), 0)
    assert showo2_head_block_params() == sum(p.numel() for p in block.parameters())
    # FinalLayer lives in models/misc.py; its shapes: RMSNorm(2048), Linear(2048, 2*2*16), Linear(2048, 4096)
    assert showo2_final_layer_params() == 2048 + (2048 * 64 + 64) + (2048 * 4096 + 4096)


# ---------------------------------------------------------------------------------------------- memory model
def test_four_block_prediction_within_15_percent_at_small_width():
    """1- and 2-block peaks predict the 4-block peak, with and without checkpointing (fresh subprocesses)."""
    base = {"kind": "sd3_dual", "dim": 256, "heads": 4, "head_dim": 64, "img_tokens": 1024, "txt_tokens": 205,
            "lora_rank": 8, "threads": 1}
    out = block_check(base, rows=(1,), log=lambda *_: None)
    assert [c["mode"] for c in out["checks"]] == ["train", "train_ckpt"]
    for c in out["checks"]:
        assert abs(c["relative_error"]) <= 0.15, c
        assert c["predicted_bytes"] == pytest.approx(predict(out["fits"][f"{c['mode']}/1"], 4))
    # without checkpointing each block adds its activations; with it, only its inputs
    assert out["fits"]["train/1"]["b"] > 5 * out["fits"]["train_ckpt/1"]["s"]


def test_committed_calibration_checks_hold():
    cal = planner.load_calibration()
    checks = cal["sd3"]["sd3_dual"]["checks"] + cal["showo2_head"]["checks"] + [cal["sd3"]["rows_check"]]
    assert len(checks) == 13          # SD3 dual: 2 modes x 2 rows at 4 blocks; head: same at 4 and 6; rows
    for c in checks:
        assert abs(c["predicted_bytes"] / c["measured_bytes"] - 1) <= 0.15, c
    assert cal["sd3_block"] == {"dim": 1536, "heads": 24, "head_dim": 64, "img_tokens": 1024, "txt_tokens": 205}
    assert "python -m grpo_lib.plan_calibrate" in cal["command"]


def test_counting_plan_adds_up():
    pl = planner.plan(COUNTING, gpus=4, gpu_mem_gib=80, groups_per_epoch=48)
    mem = dict(zip(pl.memory.part, pl.memory.GiB))
    counts = count_parameters(32)
    assert mem["SD3.5-M transformer, 2.24 B params (bf16)"] == pytest.approx(2 * counts["sd3_transformer"] / 2 ** 30)
    # 144 images per GPU x (2 x 20 stored latents + final/initial + 80 scalars) + 2 CFG prompt embeddings
    lat = 16 * 64 * 64 * 4
    per_image = 2 * 20 * lat + 4 * 20 * 4 + 2 * lat + 2 * 2 * (205 * 4096 + 2048)
    assert mem["stored rollouts of one epoch"] == pytest.approx(144 * per_image / 2 ** 30)
    static = sum(v for k, v in mem.items() if not k.startswith(("training", "rollout batch", "stored")))
    for mode, ckpt in (("no checkpointing", False), ("gradient checkpointing", True)):
        act = mem[f"training activations, B=6 (12 rows), {mode}"]
        roll = mem["rollout batch: no-grad MMDiT forward / VAE decode (the larger)"]
        assert pl.peak_gib[mode] == pytest.approx(static + mem["stored rollouts of one epoch"] + max(act, roll))
    assert pl.peak_gib["gradient checkpointing"] < pl.peak_gib["no checkpointing"]
    # first_50 of 20 steps trains 10; CFG doubles rows; beta > 0 adds a reference forward
    assert pl.passes["rollout forward passes (rows)"] == 144 * 20 * 2
    assert pl.passes["training forward passes (rows)"] == 144 * 10 * 2
    assert pl.passes["KL-reference forward passes (rows)"] == 144 * 10 * 2
    timed = planner.plan(COUNTING, gpus=4, gpu_mem_gib=80, groups_per_epoch=48, seconds_per_pass=0.01)
    assert timed.seconds_per_epoch == pytest.approx(0.01 * (5760 + 2880 + 2880 + 2 * 2880))
    frame = planner.plan_frame(COUNTING, gpus=4, gpu_mem_gib=80)
    assert {"quantity", "value", "unit", "source"} <= set(frame.columns)


def test_largest_batch_is_the_edge_of_the_budget():
    pl = planner.plan(COUNTING, gpus=8, gpu_mem_gib=40, groups_per_epoch=48)
    for mode, ckpt in (("no checkpointing", False), ("gradient checkpointing", True)):
        best, whole = pl.largest_batch[mode]
        assert 0 < whole <= best
        assert pl.peak_for_batch(best, ckpt) <= pl.budget_gib < pl.peak_for_batch(best + 1, ckpt)
        assert 72 % whole == 0 and (72 // whole) % 2 == 0      # 72 images per GPU, 2 updates per epoch


def test_readme_table_is_current():
    inside, generated = planner.readme_section_current(REPO / "README.md")
    assert inside == generated, "README plan table is stale: run python -m grpo_lib.plan --write-readme"
