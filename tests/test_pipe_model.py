"""fastgpt.pipe_model: MUFU / FP32 / tensor-core counts per attention tile, checked against hand counts."""

import collections

import pytest

from fastgpt import pipe_model as pm


def test_forward_d64_128x128_on_sm90_by_hand():
    # one 128 x 128 tile at d = 64: QK^T and PV are 2 * 128 * 128 * 64 FLOPs each
    w = pm.tile_work("fwd", 128, 128, 64, 64)
    assert w.mma_flops == 2 * (2 * 128 * 128 * 64) == 4_194_304
    assert w.mufu == 128 * 128 + 128  # one exp2 per score, one alpha per row
    # 4.5 per score (scale, max, subtract, sum, half a pack), 3 per row, acc *= alpha: 128 x 64
    assert w.fp32 == 128 * 128 * 4.5 + 128 * 3 + 128 * 64 == 82_304
    b = pm.launch_bound("fwd", 128, 128, 64, 64, tiles=1, arch=90)
    clk = 132 * 1.83e9
    # clocks on one SM: 4194304 / 4096 = 1024 tensor, 16512 / 16 = 1032 MUFU, 82304 / 128 = 643 FP32
    assert b["tensor_s"] * clk == pytest.approx(1024)
    assert b["mufu_s"] * clk == pytest.approx(1032)
    assert b["fp32_s"] * clk == pytest.approx(643)
    # at d = 64 the exps alone take as long as the matmuls: MUFU sets the overlapped bound
    assert b["bound"] == "mufu" and b["overlapped_s"] == b["mufu_s"]
    assert b["serialised_s"] * clk == pytest.approx(1024 + 1032 + 643)


def test_forward_d64_on_sm80_is_tensor_bound_and_fp32_is_half_rate():
    b = pm.launch_bound("fwd", 128, 128, 64, 64, tiles=1, arch=80)
    clk = 108 * 1.41e9
    assert b["tensor_s"] * clk == pytest.approx(4_194_304 / 2048)  # 2048 clocks
    assert b["mufu_s"] * clk == pytest.approx(1032)
    assert b["fp32_s"] * clk == pytest.approx(82_304 / 64)  # 1286 clocks: half sm_90's FP32 rate
    assert b["bound"] == "tensor"


def test_backward_d128_by_hand():
    # dK/dV tile 32 (queries) x 128 (keys) at d = 128: four matmuls of 2 * 32 * 128 * 128
    w = pm.tile_work("bwd_dkdv", 32, 128, 128, 128)
    assert (w.mma_flops, w.mufu, w.fp32) == (4 * 2 * 32 * 128 * 128, 32 * 128, 32 * 128 * 4.0)
    # dQ tile 64 x 128 at d = 128: three matmuls
    w = pm.tile_work("bwd_dq", 64, 128, 128, 128)
    assert (w.mma_flops, w.mufu, w.fp32) == (3 * 2 * 64 * 128 * 128, 64 * 128, 64 * 128 * 3.5)
    b = pm.launch_bound("bwd_dq", 64, 128, 128, 128, tiles=1, arch=90)
    clk = 132 * 1.83e9
    assert b["tensor_s"] * clk == pytest.approx(1536) and b["mufu_s"] * clk == pytest.approx(512)
    assert b["bound"] == "tensor" and b["serialised_s"] * clk == pytest.approx(1536 + 512 + 224)


def test_whole_launch_scales_with_tiles_sm_fill_and_hbm():
    one = pm.launch_bound("fwd", 128, 64, 128, 128, tiles=1, arch=90)
    many = pm.launch_bound("fwd", 128, 64, 128, 128, tiles=1000, arch=90, sm_fill=0.5)
    assert many["tensor_s"] == pytest.approx(2000 * one["tensor_s"])
    # HBM-bound launch: 3.35e12 bytes take one second on an H100
    hbm = pm.launch_bound("fwd", 128, 64, 128, 128, tiles=1, arch=90, hbm_bytes=3.35e12)
    assert hbm["hbm_s"] == pytest.approx(1.0) and hbm["bound"] == "hbm"
    assert hbm["overlapped_s"] == hbm["serialised_s"] == pytest.approx(1.0)


def test_bad_arguments():
    with pytest.raises(ValueError, match="kernel"):
        pm.tile_work("bwd_preprocess", 64, 64, 64, 64)
    with pytest.raises(ValueError, match="arch"):
        pm.launch_bound("fwd", 64, 64, 64, 64, tiles=1, arch=75)
    with pytest.raises(ValueError, match="sm_fill"):
        pm.launch_bound("fwd", 64, 64, 64, 64, tiles=1, arch=90, sm_fill=0)


def test_check_sass_counts_per_thread_and_loop_body():
    # 128 x 64 tile, 4 warps: 8192 scores / 128 threads = 64 exp2 per thread per tile, + 1 alpha row
    ops = collections.Counter({"MUFU.EX2": 2 * 65, "FADD": 2 * 100, "FMUL.FTZ": 2 * 80, "FFMA": 2 * 40,
                               "FMNMX": 2 * 64, "F2FP.BF16.F32.PACK_AB": 2 * 32, "MUFU.RCP": 1, "IMAD": 500})
    c = pm.check_sass("fwd", 128, 64, 64, 64, 4, ops)
    assert c["model_ex2"] == pytest.approx((8192 + 128) / 128)
    assert c["code_ex2"] == 65 and c["ex2_ratio"] == pytest.approx(65 / 65)
    assert c["code_fp32"] == 100 + 80 + 40 + 64 + 32
    assert c["model_fp32"] == pytest.approx((8192 * 4.5 + 128 * 3 + 128 * 64) / 128)


def test_report_covers_both_archs_and_head_dims():
    pytest.importorskip("triton")
    r = pm.report()
    assert set(r) == {"d64", "d128"} and set(r["d64"]) == {"sm_80", "sm_90"}
    fwd = r["d64"]["sm_90"]["fwd"]
    assert fwd["bound"] == "mufu" and fwd["overlapped_x"] > 1 and fwd["serialised_x"] > 2
    lines = pm.report_lines(r)
    assert any("d128" in line and "sm_90" in line and "bwd_dkdv" in line for line in lines)
    defaults = pm.default_configs()
    assert defaults["sm_90"]["fwd"][128] != defaults["sm_80"]["fwd"][128]  # Hopper gets its own tiles
