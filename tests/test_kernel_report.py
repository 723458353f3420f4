"""The kernels' machine code for real GPUs, read without one (fastgpt/tools/inspect/report.py, `fastgpt inspect`).

Every Triton attention kernel, with every tuning candidate, is compiled for sm_80 and sm_90 (the
interpreter accepts code, e.g. a tl.dot with a dimension under 16, that the GPU compiler rejects),
with the specialisation a real launch gets; the CUDA kernels are read from the extension built for
sm_80 and sm_90, as the C++ launchers pick them (CPU emulator dry run). Then: no spills in default
configs, shared memory that fits, tensor-core MMA for 16-bit attention, 128-bit loads and stores on
the memory-bound kernels' vector paths, and a byte/FLOP model that agrees with fastgpt.tools.bench.timing.

Compiles run in worker processes without TRITON_INTERPRET (tests/conftest.py sets it for this one)
and are cached under $FASTGPT_CACHE_DIR/kernel_report; the `report` fixture is the same call as
`fastgpt bench`'s static report on a CPU machine, so in one CI run those compiles happen once.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton", reason="triton is not installed (it is a Linux-only dependency)")

from fastgpt.tools.inspect import report as kr  # noqa: E402


def _tool(name: str) -> bool:
    import triton

    return os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name))


pytestmark = pytest.mark.skipif(not _tool("cuobjdump"), reason="the triton wheel's cuobjdump is missing (triton/backends/nvidia/bin)")

KERNELS = ("fwd", "bwd_preprocess", "bwd_dkdv", "bwd_dq")
BUCKETS = (16, 32, 64, 128, 256)
H100, A100 = kr.GPUS


def _case(name: str, d: int, dtype: str, dv: int | None = None, **kw) -> dict:
    """A causal GQA case with ragged lengths (no argument divisible by 16 by accident)."""
    case = dict(name=name, b=2, hq=4, hk=2, sq=300, sk=300, d=d, causal=True, dtype=dtype, passes=("fwd", "bwd"))
    if dv is not None:
        case["dv"] = dv
    case.update(kw)
    return case


# Every tuning candidate of every head-dim bucket for 16-bit inputs (the fast path): buckets 64, 128
# and 256 at the quick report's shapes (so those compiles are shared with `fastgpt bench`'s static
# report through the cache), bucket 32 at an awkward head dim and ragged lengths (bucket 16 has
# bucket 32's candidate list). The exact-fp32 path: every candidate of bucket 32 with D < 16 and
# Dv != D (buckets 16 and 64 share its list); the candidates of buckets 128 and 256 compile slowly
# (unrolled FMA code, ~4 s each) and are left to `fastgpt inspect` (its d128-fp32 / d256-fp32 cases).
_QUICK = {c["name"]: c for c in kr.ATTENTION_CASES}
EVERY_CONFIG = [_QUICK["gpt2-small"], _QUICK["llama3-8b-gqa"], _QUICK["d256-causal"], _case("all-bf16-d24", 24, "bfloat16"),
                _case("all-fp32-d8-dv24", 8, "float32", dv=24)]


def _atomic(case: dict) -> dict:
    """The backward of ``case`` with deterministic=False (its forward and preprocess are the same launches)."""
    return dict(case, name=case["name"] + "-atomic", passes=("bwd",), deterministic=False, quick=False)


# the atomic dK/dV kernel's own candidate lists, every bucket (bucket 16 has bucket 32's), with GQA
EVERY_CONFIG += [_atomic(c) for c in EVERY_CONFIG[:4]]
# Default configs at head dims that are not a power of two (masked columns, rows 16-byte aligned
# only through ALIGN), D < 16, Dv != D, float16.
AWKWARD_DEFAULTS = [_case("bf16-d8", 8, "bfloat16"), _case("bf16-d40", 40, "bfloat16"), _case("fp16-d80-dv48", 80, "float16", dv=48)]
AWKWARD_DEFAULTS += [_atomic(AWKWARD_DEFAULTS[1]), _atomic(AWKWARD_DEFAULTS[2]),
                     # the packed-sequence (VARLEN) kernels: the quick report's case, and an awkward head dim
                     _QUICK["varlen-gqa"], _case("varlen-fp16-d40", 40, "float16", varlen=True)]
AWKWARD_DEFAULTS += [_atomic(AWKWARD_DEFAULTS[-1])]  # packed sequences with deterministic=False
FP32_LEFT_TO_THE_REPORT = (128, 256)


@pytest.fixture(scope="module")
def workers():
    with kr._Workers() as w:
        yield w


@pytest.fixture(scope="module")
def every_config(workers):
    records, stats = kr.compile_attention(EVERY_CONFIG, workers=workers)
    return records


@pytest.fixture(scope="module")
def awkward(workers):
    records, _ = kr.compile_attention(AWKWARD_DEFAULTS, default_only=True, workers=workers)
    return records


@pytest.fixture(scope="module")
def report():
    """The quick report: what `fastgpt bench` shows on a CPU machine (shared compile cache)."""
    return kr.build_report(quick=True)


def _case_bucket(case: dict) -> int:
    return max(16, 1 << (max(case["d"], case.get("dv", case["d"])) - 1).bit_length())


def _bucket(rec: dict, cases: list) -> int:
    return _case_bucket(next(c for c in cases if c["name"] == rec["case"]))


def _label(rec: dict, arch: str) -> str:
    c = rec["config"]
    return (f"{rec['kernel']} [BLOCK_M={c['block_m']} BLOCK_N={c['block_n']} warps={c['num_warps']} "
            f"stages={c['num_stages']}] of {rec['case']} on sm_{arch}")


# --------------------------------------------------------------------------------------------
# Triton attention: compiles, resources, instruction mix
# --------------------------------------------------------------------------------------------


def test_every_attention_config_compiles_for_sm80_and_sm90(every_config):
    from fastgpt.kernels import flash_attention as fa

    errors = [f"{_label(r, a)}: {msg}" for r in every_config for a, msg in r["error"].items()]
    assert not errors, "\n".join(errors)
    for r in every_config:
        assert set(r["resources"]) == {"80", "90"}, _label(r, "?")
    # every candidate of every kernel and bucket was compiled for both archs (or shares a compiled list)
    report_fp32 = {_case_bucket(c) for c in kr.ATTENTION_CASES if c["dtype"] == "float32"}
    for table, dtype in ((fa.CONFIGS, "bfloat16"), (fa.CONFIGS_FP32, "float32")):
        compiled = [r for r in every_config if next(c for c in EVERY_CONFIG if c["name"] == r["case"])["dtype"] == dtype]
        for kernel, buckets in table.items():
            for bucket, configs in buckets.items():
                if bucket in (16, 64) and dtype == "float32" or bucket == 16:
                    assert configs == table[kernel][32], f"{kernel} bucket {bucket} ({dtype}) differs from bucket 32's: compile it too"
                    continue
                if dtype == "float32" and bucket in FP32_LEFT_TO_THE_REPORT:
                    assert bucket in report_fp32, f"no fp32 case of bucket {bucket} in fastgpt inspect's ATTENTION_CASES"
                    continue
                got = {r["config_index"] for r in compiled if r["kernel"] == kernel and _bucket(r, EVERY_CONFIG) == bucket}
                assert got == set(range(len(configs))), f"{kernel} bucket {bucket} {dtype}: compiled configs {sorted(got)}"


def test_default_configs_do_not_spill(every_config, awkward):
    problems = []
    for r in every_config + awkward:
        if not r["default"] or r["case"].startswith("all-fp32"):
            continue  # the exact-fp32 path may spill a little (listed as notes by the report)
        for arch, res in r["resources"].items():
            if res["stack"] or res["local"] or res["stl"] or res["ldl"]:
                problems.append(f"{_label(r, arch)}: {res['stl']} STL / {res['ldl']} LDL instructions, {res['stack']} B stack "
                                f"at {res['registers']} registers")
    assert not problems, "default configs spill registers:\n" + "\n".join(problems)


def test_shared_memory_fits_sm90_always_and_sm86_for_some_config_of_each_bucket(every_config):
    too_big = [f"{_label(r, '90')}: {r['resources']['90']['shared']} B > {H100.smem_per_block} B"
               for r in every_config if r["resources"]["90"]["shared"] > H100.smem_per_block]
    assert not too_big, "configs over the sm_90 shared memory limit:\n" + "\n".join(too_big)
    for dtype in ("bfloat16", "float32"):
        for kernel in KERNELS + ("bwd_dkdv_atomic",):
            for bucket in BUCKETS:
                recs = [r for r in every_config if r["kernel"] == kernel and _bucket(r, EVERY_CONFIG) == bucket
                        and next(c for c in EVERY_CONFIG if c["name"] == r["case"])["dtype"] == dtype]
                if not recs:
                    continue
                # the largest of sm_80's and sm_90's figures: the sm_86 / sm_89 code is sm_80's
                smem = {_label(r, "80/90"): max(r["resources"]["80"]["shared"], r["resources"]["90"]["shared"]) for r in recs}
                assert min(smem.values()) <= kr.CONSUMER_SMEM_PER_BLOCK, (
                    f"no {kernel} config for head-dim bucket {bucket} ({dtype}) fits the 99 KiB of sm_86/sm_89: {smem}")


def test_attention_kernels_use_tensor_core_mma_for_16_bit_inputs(every_config, awkward):
    missing, hopper = [], []
    for r in every_config + awkward:
        if not r["default"] or r["kernel"] in ("bwd_preprocess", "bwd_dq_convert") or r["case"].startswith("all-fp32"):
            continue
        for arch, res in r["resources"].items():
            if res["hmma"] + res["hgmma"] == 0:
                missing.append(f"{_label(r, arch)}: 0 HMMA, 0 HGMMA ({res['ffma']} FFMA)")
            if arch == "90":
                hopper.append(res["hgmma"] > 0)
    assert not missing, "no tensor-core MMA:\n" + "\n".join(missing)
    assert sum(hopper) >= len(hopper) // 2, "Hopper's warpgroup MMA (HGMMA) is used by few sm_90 default kernels"


def test_compiled_specialisation_is_what_a_launch_gets(workers):
    """The offline compile uses triton's own JIT binder; its hand-written fallback agrees with it on
    every launch, and is sensitive to what matters: a q view at an odd offset loses the 16-byte
    divisibility hint, as a real launch would."""
    cases = EVERY_CONFIG[:3] + AWKWARD_DEFAULTS + [kr.ATTENTION_CASES[0], _case("misaligned-q", 64, "bfloat16", q_offset=1)]
    found = workers.run([("check_specialization", [cases])])[0]
    assert "ok" in found, found.get("error")
    result = found["ok"]
    if not result["available"]:
        pytest.skip("this triton's JIT internals differ: compile_plan uses the hand-written kernel_signature")
    assert result["checked"] > 100
    assert not result["mismatches"], "\n".join(result["mismatches"])
    aligned, misaligned = result["divisible"]["gpt2-small"], result["divisible"]["misaligned-q"]
    assert {"Q", "K", "V", "Out", "Lse", "sqh", "skh"} <= set(aligned), aligned
    assert "Q" not in misaligned and "K" in misaligned, misaligned


def test_planted_spill_is_flagged_with_kernel_config_and_figures(workers):
    """A register cap (maxnreg 128; it needs 186) makes the d=128 forward kernel spill on sm_90: the
    report's check names the kernel, its config and the figures."""
    case = dict(_QUICK["llama3-8b-gqa"], passes=("fwd",), name="planted-maxnreg-128")
    records, _ = kr.compile_attention([case], default_only=True, archs=(90,), options={"maxnreg": 128}, workers=workers, use_cache=False)
    (rec,) = records
    assert not rec["error"], rec["error"]
    res = rec["resources"]["90"]
    row = kr._row(H100, "triton", case["name"], "attention", "fwd", rec["kernel"], "M128 N64 w8 s3", True, "bfloat16",
                  256, rec["grid"], res, "mma", None)
    problems = kr.launch_problems(row)
    assert any("spills registers" in p and "fwd [M128 N64 w8 s3]" in p and "STL" in p and "128 registers" in p for p in problems), problems
    # and the same kernel without the cap is clean
    clean = kr._row(H100, "triton", case["name"], "attention", "fwd", rec["kernel"], "M128 N64 w8 s3", True, "bfloat16",
                    256, rec["grid"], dict(res, stack=0, local=0, stl=0, ldl=0, registers=186), "mma", None)
    assert kr.launch_problems(clean) == []


# --------------------------------------------------------------------------------------------
# CUDA kernels: launch plans from the C++ launchers, machine code from the build
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cuda_code():
    try:
        table, lib = kr.cuda_machine_code(build=True)
        kr._load_emulator()
    except kr.Unavailable as exc:
        pytest.skip(str(exc))
    return table


MEMORY_BOUND = [("layer_norm", p) for p in ("fwd", "bwd")] + [("add_layer_norm", p) for p in ("fwd", "bwd")] + [
    ("gelu", p) for p in ("fwd", "bwd")] + [("bias_gelu", p) for p in ("fwd", "bwd")]


def _vector_path_failures(op: str, pass_: str, dtype: str, cols: int, table: dict, misalign: bool = False) -> list:
    """What keeps `op` on 16-bit x of 8192 x cols from moving its rows with 128-bit accesses on both GPUs."""
    failures = []
    for gpu in kr.GPUS:
        launches, _ = kr.cuda_launches(op, pass_, 8192, cols, dtype, gpu, misalign=misalign)
        main = launches[0]  # the kernel that reads x (column_sums and the params kernel follow it)
        name = main["kernel"]
        if not kr._cuda_vector_path(name):
            failures.append(f"{op} {pass_} {dtype} x (8192, {cols}) on {gpu.key}: the launcher picked {name}, not the 16-byte path")
            continue
        res = table[(gpu.arch, name.replace(" ", ""))]
        for kind in ("ldg", "stg"):
            if not res[kind].get(128):
                failures.append(f"{name} on sm_{gpu.arch}: no 128-bit {kind.upper()} ({kr._widths(res[kind])})")
    return failures


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_layer_norm_and_gelu_use_128_bit_accesses_on_aligned_16_bit_inputs(cuda_code, dtype):
    failures = []
    for op, pass_ in MEMORY_BOUND:
        for cols in (768, 4096, 16384 if "gelu" in op else 8192):
            failures += _vector_path_failures(op, pass_, dtype, cols, cuda_code)
    assert not failures, "\n".join(failures)


def test_scalar_path_on_misaligned_input_is_flagged(cuda_code):
    """The check above fails where it should: a view one element off 16-byte alignment takes the
    scalar path (one 16-bit access per element)."""
    failures = _vector_path_failures("gelu", "fwd", "bfloat16", 3072, cuda_code, misalign=True)
    assert len(failures) == 2 and all("gelu_kernel<__nv_bfloat16, 1, false>" in f for f in failures), failures
    scalar = cuda_code[(90, "gelu_kernel<__nv_bfloat16,1,false>")]
    assert 128 not in scalar["ldg"] and scalar["ldg"].get(16), scalar["ldg"]
    # launch_problems flags a vector-path kernel whose code has no 128-bit loads (the scalar code planted)
    vec = cuda_code[(90, "gelu_kernel<__nv_bfloat16,8,false>")]
    planted = kr._row(H100, "cuda", "planted", "gelu", "fwd", "gelu_kernel<__nv_bfloat16, 8, false>", "block 256x1x1", True, "bfloat16",
                      256, [1056, 1, 1], {**vec, "shared": 0, "ldg": scalar["ldg"], "stg": scalar["stg"]}, "memory", True)
    problems = kr.launch_problems(planted)
    assert any("no 128-bit LDG on the 16-byte vector path" in p and "gelu_kernel<__nv_bfloat16, 8, false>" in p for p in problems), problems


def test_every_launched_cuda_kernel_is_in_the_build_and_spill_free(report):
    if "cuda" in report["unavailable"]:
        pytest.skip(report["unavailable"]["cuda"])
    rows = [r for r in report["rows"] if r["source"] == "cuda"]
    assert {r["gpu"] for r in rows} == {"H100", "A100"}
    assert {r["op"] for r in rows} == set(kr.CUDA_OPS)
    bad = [f"{r['kernel']} on sm_{r['arch']}: {r['stl']} STL / {r['ldl']} LDL, {r['stack']} B stack" for r in rows
           if r["stl"] or r["ldl"] or r["stack"]]
    assert not bad, "\n".join(bad)
    missing = [p for p in report["problems"] if "is not in" in p]
    assert not missing, "\n".join(missing)


# --------------------------------------------------------------------------------------------
# the report: default configs clean, the model, output
# --------------------------------------------------------------------------------------------


def test_quick_report_has_no_problems_in_default_configs(report):
    assert report["problems"] == [], "\n".join(report["problems"])
    assert "triton" not in report["unavailable"], report["unavailable"]
    cases = {(c["op"], c["pass"], c["case"]) for c in report["cases"]}
    assert ("attention", "fwd", "decode-gqa-b8") in cases and ("attention", "bwd", "llama3-8b-gqa") in cases
    for c in report["cases"]:
        for gpu, g in c["gpus"].items():
            assert 0 < g["fraction"] <= 1.0 + 1e-9, (c["op"], c["pass"], c["case"], gpu, g)
            assert g["model_us"] >= g["ideal_us"] * (1 - 1e-9)


def test_window_softcap_alibi_variant_is_reported_spill_free(report):
    """flash-attn's options (all three at once, head dim 256: the most registers of them) compile for
    sm_80 and sm_90 as their own constexpr variant, every kernel spill-free in its default config."""
    from fastgpt.tools.inspect.compile_jobs import _case_plans

    case = next(c for c in kr.ATTENTION_CASES if c["name"] == "d256-window-softcap-alibi")
    for _, plan in _case_plans(case):
        if plan.name != "bwd_preprocess":
            assert {k: plan.constexprs[k] for k in ("WINDOW", "SOFTCAP", "ALIBI")} == dict.fromkeys(("WINDOW", "SOFTCAP", "ALIBI"), True)
    rows = [r for r in report["rows"] if r["case"] == case["name"]]
    assert {(r["kernel"], r["arch"]) for r in rows} == {(k, a) for k in KERNELS for a in (80, 90)}
    assert all(r["stack"] == 0 and r["stl"] == 0 and r["ldl"] == 0 for r in rows), rows


def test_atomic_backward_rows_show_five_matmuls_for_seven(report):
    """The quick report's deterministic=False backward (llama3-8b-gqa: dQ added by atomics in the dK/dV
    kernel, then converted) beside the deterministic one: the atomics are in that kernel only, nothing
    spills (the report's problems are empty), and it executes 5/7 of the deterministic FLOPs (the
    same useful FLOPs) in less modelled time."""
    bwd = {c["case"]: c for c in report["cases"] if c["op"] == "attention" and c["pass"] == "bwd"}
    det, atomic = bwd["llama3-8b-gqa"], bwd["llama3-8b-gqa-atomic"]
    assert atomic["useful_flops"] == det["useful_flops"] and atomic["min_bytes"] == det["min_bytes"]
    for gpu in ("H100", "A100"):
        rows = [r for r in report["rows"] if r["case"] == "llama3-8b-gqa-atomic" and r["gpu"] == gpu]
        assert {r["kernel"] for r in rows} == {"bwd_preprocess", "bwd_dkdv_atomic", "bwd_dq_convert"}
        assert all((r["atomics"] > 0) == (r["kernel"] == "bwd_dkdv_atomic") for r in rows), rows
        assert all(r["stack"] == 0 and r["stl"] == 0 and r["ldl"] == 0 for r in rows)
        ratio = atomic["gpus"][gpu]["exec_flops"] / det["gpus"][gpu]["exec_flops"]
        assert abs(ratio - 5 / 7) < 0.02, (gpu, ratio)
        assert atomic["gpus"][gpu]["model_us"] < det["gpus"][gpu]["model_us"], gpu
    # and the report itself flags atomics anywhere else
    row = next(r for r in report["rows"] if r["case"] == "llama3-8b-gqa" and r["kernel"] == "bwd_dkdv")
    assert any("atomic instructions" in p for p in kr.launch_problems(dict(row, atomics=4)))


def test_occupancy_matches_the_cuda_calculator():
    # 128 threads x 32 registers: 16 blocks (both the thread and the register limit) -> 100 %
    occ = kr.occupancy(H100, 128, 32, 0)
    assert (occ["blocks_per_sm"], occ["warps_per_sm"], occ["occupancy"]) == (16, 64, 1.0)
    assert kr.occupancy(H100, 128, 24, 0)["limiter"] == "threads"
    # 256 threads x 64 registers: 2048 registers per warp -> 32 warps -> 4 blocks -> 50 %
    assert kr.occupancy(A100, 256, 64, 0)["blocks_per_sm"] == 4
    # registers are allocated per warp in units of 256: 33 registers cost as much as 40
    assert kr.occupancy(H100, 256, 33, 0)["blocks_per_sm"] == kr.occupancy(H100, 256, 40, 0)["blocks_per_sm"] == 6
    # the layer norm backward: 512 threads x 96 registers -> 21 warps -> one block, 25 %
    occ = kr.occupancy(H100, 512, 96, 33280)
    assert (occ["blocks_per_sm"], occ["occupancy"], occ["limiter"]) == (1, 0.25, "registers")
    # shared memory: 1 KiB reserved per block; 80 KiB blocks: 2 on an A100 (164 KiB), 2 on an H100 (228 KiB)
    assert kr.occupancy(A100, 128, 32, 80 * 1024)["blocks_per_sm"] == 2
    assert kr.occupancy(A100, 128, 32, 82 * 1024)["blocks_per_sm"] == 1
    assert kr.occupancy(H100, 128, 32, 112 * 1024)["blocks_per_sm"] == 2
    # a block over the per-block limit does not launch
    assert kr.occupancy(A100, 128, 32, 164 * 1024)["blocks_per_sm"] == 0
    assert kr.occupancy(H100, 128, 256, 0)["blocks_per_sm"] == 0


def test_byte_model_agrees_with_the_work_model_where_nothing_is_re_read():
    from fastgpt.tools.bench import timing as _timing
    import torch

    # one query tile, one key tile, non-causal: the forward moves exactly the minimum
    case = dict(name="tiny", b=2, hq=4, hk=4, sq=64, sk=64, d=64, causal=False, dtype="bfloat16", passes=("fwd",))
    rec = {"kernel": "fwd", "config": {"block_m": 64, "block_n": 64, "num_warps": 4, "num_stages": 2}, "block_d": 64, "block_dv": 64}
    model = kr._attention_model(rec, case, resident=132, gpu=H100)
    min_bytes, flops = kr._attention_work(case, "fwd")
    assert model["tiled_bytes"] == model["hbm_bytes"] == min_bytes
    assert model["exec_flops"] == flops == _timing.attention_flops(2, 4, 64, 64, 64, causal=False)
    # K/V are re-read once per query tile in the tiling, once from HBM when the programs are co-resident
    case.update(sq=1024, sk=1024)
    model = kr._attention_model(rec, case, resident=132, gpu=H100)
    kv = 2 * 4 * 1024 * 128 * 2
    assert model["tiled_bytes"] - model["hbm_bytes"] == 15 * kv
    assert kr._attention_model(rec, case, resident=4, gpu=H100)["hbm_bytes"] < model["tiled_bytes"]  # 2 MB of K/V fits L2
    # GELU and layer norm forward: the model is _timing's bytes plus the float32 mean/rstd
    gelu = {"kernel": "gelu_kernel<__nv_bfloat16, 8, false>", "grid": [1056, 1, 1], "block": [256, 1, 1]}
    g_case = dict(op="gelu", pass_="fwd", rows=8192, cols=3072, dtype="bfloat16")
    assert kr._cuda_model(gelu, g_case, 0, 1056, H100)["hbm_bytes"] == _timing.gelu_bytes(8192 * 3072, torch.bfloat16)
    ln = {"kernel": "layer_norm_fwd_kernel<__nv_bfloat16, __nv_bfloat16, 8, 4>", "grid": [2112, 1, 1], "block": [128, 1, 1]}
    l_case = dict(op="layer_norm", pass_="fwd", rows=8192, cols=4096, dtype="bfloat16")
    expected = _timing.layer_norm_bytes(8192, 4096, torch.bfloat16, torch.bfloat16, torch.bfloat16) + 8 * 8192
    assert kr._cuda_model(ln, l_case, 0, 2112, H100)["hbm_bytes"] == expected
    with pytest.raises(ValueError, match="no byte model"):
        kr._cuda_model({"kernel": "new_kernel<float>", "grid": [1, 1, 1], "block": [32, 1, 1]}, l_case, 0, 1, H100)


def test_cli_writes_table_json_and_png(report, tmp_path, capsys):
    from fastgpt import cli

    json_path, png_path = tmp_path / "r.json", tmp_path / "r.png"
    rc = cli.main(["inspect", "--quick", "--json", str(json_path), "--plot", str(png_path), "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "roofline model per op" in out and "not a timing" in out and "HGMMA" in out
    data = json.loads(json_path.read_text())
    for key in ("versions", "gpus", "work_model", "tiling_model", "disclaimer", "cases", "rows", "problems", "timing"):
        assert key in data, key
    assert data["timing"]["triton"]["compiles"] == 0, "a second quick report should come from the cache"
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_static_report_hook(report):
    from fastgpt.tools.bench.cli import static_report_hook

    static = static_report_hook(quick=True)
    assert static["available"], static
    assert any(r["op"] == "attention" and r["gpu"] == "H100" and r["fraction_of_roofline"] for r in static["rows"])
    assert any("not a timing" in line for line in static["text"])


def test_kernel_report_import_is_light():
    code = "import sys, fastgpt.tools.inspect.report; print(sorted(m for m in ('torch', 'triton', 'matplotlib') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    # fastgpt/__init__ imports torch; the report itself adds neither triton nor matplotlib
    assert out.returncode == 0, out.stderr
    assert "triton" not in out.stdout and "matplotlib" not in out.stdout, out.stdout


# The decode tiles (Sq <= DECODE_MAX_SQ) of every head-dim bucket: one query over a ragged KV cache.
DECODE_CASES = [
    dict(name=f"decode-d{d}", b=8, hq=8, hk=2, sq=1, sk=300, d=d, causal=True, dtype="bfloat16", passes=("fwd",))
    for d in (24, 64, 128, 256)
]


def test_decode_configs_compile_without_spills_and_use_tensor_cores(workers):
    from fastgpt.kernels import flash_attention as fa

    records, _ = kr.compile_attention(DECODE_CASES, workers=workers)
    problems = [f"{_label(r, a)}: {msg}" for r in records for a, msg in r["error"].items()]
    for r in records:
        assert r["config"]["block_m"] == 16, f"{_label(r, '?')}: a decode step should run the 16-row tiles"
        for arch, res in r["resources"].items():
            if res["stack"] or res["local"]:
                problems.append(f"{_label(r, arch)}: {res['stack']} B stack")
            if res["shared"] > kr.CONSUMER_SMEM_PER_BLOCK:
                problems.append(f"{_label(r, arch)}: {res['shared']} B shared memory > 99 KiB")
            if r["default"] and res["hmma"] + res["hgmma"] == 0:
                problems.append(f"{_label(r, arch)}: no tensor-core MMA")
    assert not problems, "\n".join(problems)
    compiled = {(r["case"], r["config_index"]) for r in records}
    for case in DECODE_CASES:
        n = len(fa.DECODE_CONFIGS[_case_bucket(case)])
        assert {i for c, i in compiled if c == case["name"]} == set(range(n)), f"{case['name']}: not every decode config compiled"


# --------------------------------------------------------------------------------------------
# what the interpreter cannot show: exact float32 dots and the absence of atomics, in the machine code
# --------------------------------------------------------------------------------------------


def test_float32_attention_kernels_use_no_tensor_core_mma(every_config):
    """float32 inputs take exact "ieee" dots; TF32 (what tensor cores would run) breaks parity with
    torch and the interpreter ignores input_precision, so only the SASS can show it: no HMMA/HGMMA."""
    fp32 = [(r, arch, res) for r in every_config if r["default"] and r["case"].startswith("all-fp32")
            for arch, res in r["resources"].items()]
    assert len(fp32) == 2 * len(KERNELS), "every default fp32 kernel on both archs"
    mma = [f"{_label(r, arch)}: {res['hmma']} HMMA, {res['hgmma']} HGMMA" for r, arch, res in fp32 if res["hmma"] + res["hgmma"]]
    # (the dot precision is one constexpr for every head-dim bucket: the d=8 case stands for all;
    # `fastgpt inspect` lists the MMA count of its d128/d256 fp32 cases too)
    assert not mma, "tensor-core MMA in exact-fp32 attention:\n" + "\n".join(mma)
    # and the count is live: the 16-bit kernels of the same compile have MMA
    assert any(res["hmma"] + res["hgmma"] for r in every_config if r["default"] and not r["case"].startswith("all-fp32")
               for res in r["resources"].values())


def test_no_kernel_uses_atomics(every_config, awkward, cuda_code):
    """Deterministic by construction (one writer per output element, fixed loop order): no ATOM/RED
    in any default Triton attention kernel (16-bit and fp32) or any CUDA kernel of the extension, except
    the opt-in atomic dK/dV kernel (deterministic=False), which has them: the count is live."""
    rows = [r for r in every_config + awkward if r["default"]]
    found = [f"{_label(r, arch)}: {res['atomics']} atomics" for r in rows if r["kernel"] != "bwd_dkdv_atomic"
             for arch, res in r["resources"].items() if res["atomics"]]
    found += [f"{name} on sm_{arch}: {res['atomics']} atomics" for (arch, name), res in cuda_code.items() if res["atomics"]]
    assert not found, "\n".join(found)
    assert sum(1 for r in rows if r["kernel"] != "bwd_dkdv_atomic") >= 4 * len(KERNELS) and len(cuda_code) >= 8
    atomic = [(r, res) for r in rows if r["kernel"] == "bwd_dkdv_atomic" for res in r["resources"].values()]
    assert len(atomic) >= 2 * 6 and all(res["atomics"] > 0 for _, res in atomic)


def test_atomics_are_counted():
    from fastgpt.tools.inspect.compiling import summarize_opcodes

    counts = summarize_opcodes({"ATOMG.E.ADD.F32.FTZ.RN.STRONG.GPU": 2, "RED.E.ADD.F32.FTZ.RN.STRONG.GPU": 1,
                                "REDG.E.ADD.STRONG.GPU": 1, "ATOMS.ADD": 1, "REDUX.SUM": 4, "FFMA": 3})
    assert counts["atomics"] == 5 and counts["ffma"] == 3


def test_decode_kernel_launches_are_reported_spill_free_at_the_roofline_target(report):
    """The split-KV decode op's launches (from its registry entry), batch 1 and 8, GQA 32/8, d=128,
    8k cache: compiled for sm_80 and sm_90 without spills, modelled at >= 80% of the roofline."""
    cases = {c["case"]: c for c in report["cases"] if c["op"] == "decode_attention"}
    assert set(cases) == {"kvcache-gqa-b1", "kvcache-gqa-b8"}
    for name, c in cases.items():
        for gpu, g in c["gpus"].items():
            assert g["fraction"] >= 0.8, (name, gpu, g)
    rows = [r for r in report["rows"] if r["op"] == "decode_attention"]
    assert {r["kernel"] for r in rows} == {"decode_split", "decode_combine"} and {r["arch"] for r in rows} == {80, 90}
    assert all(r["stack"] == 0 and r["stl"] == 0 and r["ldl"] == 0 for r in rows)


def test_row_wise_triton_kernels_are_in_the_report_spill_free_with_128_bit_accesses(report):
    """RMSNorm, add + RMSNorm, SwiGLU, rotary and cross-entropy (every op whose registry entry has
    ``report_launches``): every pass compiled for sm_80 and sm_90, no spills, 128-bit global loads and
    stores (16-bit rows). Cross-entropy has one launch (loss and gradient); its backward is no kernel."""
    from fastgpt import registry

    passes = {"rms_norm": ("fwd", "bwd"), "add_rms_norm": ("fwd", "bwd"), "swiglu": ("fwd", "bwd"), "rotary": ("fwd", "bwd"),
              "cross_entropy": ("fwd",)}
    assert set(registry.names(lambda spec: spec.report_launches is not None)) == set(passes)
    rows = [r for r in report["rows"] if r["op"] in passes]
    seen = {(r["op"], r["pass"], r["arch"]) for r in rows}
    assert seen == {(op, p, a) for op, ps in passes.items() for p in ps for a in (80, 90)}
    for r in rows:
        assert r["stack"] == 0 and r["stl"] == 0 and r["ldl"] == 0, r
        assert r["vector_path"] and r["ldg"].get(128) and r["stg"].get(128), r
