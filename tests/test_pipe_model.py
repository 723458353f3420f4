"""fastgpt.pipe_model: MUFU / FP32 / tensor-core counts per attention tile, checked against hand counts."""

import collections
import json

import pytest

from fastgpt.tools.inspect import pipe_model as pm


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
    assert (w.mma_flops, w.mufu, w.fp32) == (4 * 2 * 32 * 128 * 128, 32 * 128, 32 * 128 * 5.0)
    # dQ tile 64 x 128 at d = 128: three matmuls
    w = pm.tile_work("bwd_dq", 64, 128, 128, 128)
    assert (w.mma_flops, w.mufu, w.fp32) == (3 * 2 * 64 * 128 * 128, 64 * 128, 64 * 128 * 4.5)
    b = pm.launch_bound("bwd_dq", 64, 128, 128, 128, tiles=1, arch=90)
    clk = 132 * 1.83e9
    assert b["tensor_s"] * clk == pytest.approx(1536) and b["mufu_s"] * clk == pytest.approx(512)
    assert b["bound"] == "tensor" and b["serialised_s"] * clk == pytest.approx(1536 + 512 + 288)


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


def test_check_sass_against_the_dkdv_kernel_compiled_for_sm90():
    # the instruction mix of the dK/dV kernel, 32 x 128 tile, 8 warps, d = 64, compiled by triton 3.8 for
    # sm_90: per thread and loop copy 16 exp2, 16 FFMA (s * scale - lse), 16 FMNMX (its clamp at 0), 16 FADD
    # (dp - delta), 16 FMUL (p * (...)), 8 + 8 F2FP (p and ds); the epilogue adds 32 FMUL (dK * scale) and
    # 32 F2FP (dK, dV)
    ops = collections.Counter({"MUFU.EX2": 32, "MUFU.RCP": 2, "FFMA": 32, "FMNMX.NAN": 32, "FADD": 32, "FMUL": 64,
                               "F2FP.BF16.F32.PACK_AB": 64, "FSEL": 32, "HGMMA.64x64x16.F32.BF16": 24, "IMAD": 300})
    c = pm.check_sass("bwd_dkdv", 32, 128, 64, 64, 8, ops)
    assert c["model_ex2_per_tile"] == 32 * 128 / 256 == 16
    assert c["copies"] == 2  # the unmasked and the masked loop
    assert pm.epilogue_fp32("bwd_dkdv", 32, 128, 64, 64) / 256 == 32 + 32
    assert c["code_fp32_in_loops"] == 32 + 32 + 32 + 64 + 64 - 64
    assert c["model_fp32_per_tile"] == 16 * 5.0
    assert c["fp32_ratio"] == 1.0


def test_check_sass_sees_duplicated_loops():
    # the dQ kernel 64 x 128, 8 warps, d = 64 on sm_90: the code holds four copies of the loop body (the
    # clamp of s * scale - lse at 0 is one FP32 min per score in the model, FMNMX here; the real sm_90
    # build selects it with FSETP + FSEL in three of its four copies)
    ops = collections.Counter({"MUFU.EX2": 128, "FFMA": 128, "FMNMX.NAN": 128, "FADD": 128, "FMUL": 144,
                               "F2FP.BF16.F32.PACK_AB": 72})
    c = pm.check_sass("bwd_dq", 64, 128, 64, 64, 8, ops)
    assert c["copies"] == 4 and c["fp32_ratio"] == 1.0


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


_COMPILE_AND_CHECK = """
import json, sys, tempfile, torch
from fastgpt.tools.inspect import pipe_model as pm
from fastgpt.kernels import flash_attention as fa
from fastgpt.tools.inspect.compiling import compile_plan, read_machine_code
q = torch.empty(8, 12, 1024, 64, dtype=torch.bfloat16, device="meta")
out = {}
for plan in fa.example_plans(q, q, q, True, arch=90):
    if plan.name in ("fwd", "bwd_dkdv"):
        c = plan.configs[0]
        compiled = compile_plan(plan, c, 90)
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(compiled.asm["cubin"])
            f.flush()
            (_, info), = read_machine_code(f.name).items()
        out[plan.name] = pm.check_sass(plan.name, c.block_m, c.block_n, 64, 64, c.num_warps, info["opcodes"])
print(json.dumps(out))
"""


def test_model_matches_the_compiled_kernels_instruction_mix():
    """The forward and dK/dV kernels at d = 64 compiled for sm_90 (default tiles): their exp2 and FP32
    instruction counts are what the model counts per tile, times the loop copies in the code."""
    import os
    import subprocess
    import sys

    triton = pytest.importorskip("triton")
    if not os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")):
        pytest.skip("the triton wheel's cuobjdump is missing (triton/backends/nvidia/bin)")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # a real compile
    found = json.loads(subprocess.run([sys.executable, "-c", _COMPILE_AND_CHECK], env=env, capture_output=True,
                                      text=True, check=True).stdout.splitlines()[-1])
    dkdv, fwd = found["bwd_dkdv"], found["fwd"]
    assert dkdv["copies"] == 2 and dkdv["fp32_ratio"] == pytest.approx(1.0, abs=0.05)
    # the forward's two loops differ (the masked one adds -inf handling); the alpha rows make copies ~2
    assert 2 <= fwd["copies"] <= 2.1 and 1.0 <= fwd["fp32_ratio"] <= 1.3
