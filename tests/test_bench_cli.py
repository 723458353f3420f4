"""`fastgpt bench` end to end on this machine, and the byte/FLOP model and timers behind every figure."""

import json
import subprocess
import sys
import time

import pytest
import torch

from fastgpt.tools.bench import op_cases as bc
from fastgpt.tools.bench import dispatch_cases as dc
from fastgpt.tools.bench import timing as _timing

BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32


# --------------------------------------------------------------------------------------------
# the work model, against hand-computed values
# --------------------------------------------------------------------------------------------


def test_element_sizes_come_from_the_dtype():
    assert _timing.element_size(BF16) == 2  # the classic mistake is 4
    assert _timing.element_size(FP16) == 2
    assert _timing.element_size(FP32) == 4


def test_layer_norm_bytes_bf16():
    # forward: read x, write y (2 * 4096 * 768 * 2 B) + read weight and bias (768 * 2 B each)
    assert _timing.layer_norm_bytes(4096, 768, BF16, BF16, BF16) == 12_582_912 + 3_072
    # backward: read x, dy, write dx (3 * 4096 * 768 * 2 B) + read weight, write dweight, dbias
    assert _timing.layer_norm_bytes(4096, 768, BF16, BF16, BF16, backward=True) == 18_874_368 + 4_608
    # float32 parameters (autocast's layout) count 4 bytes each; no parameters count nothing
    assert _timing.layer_norm_bytes(4096, 768, BF16, FP32, FP32) == 12_582_912 + 6_144
    assert _timing.layer_norm_bytes(4096, 768, BF16) == 12_582_912
    assert _timing.layer_norm_bytes(10, 8, FP32, None, FP32, backward=True) == 3 * 10 * 8 * 4 + 8 * 4


def test_add_layer_norm_bytes():
    # x, residual read; y, sum written: 4 * 16 * 32 * 2 B; weight + bias 2 * 32 * 2 B
    assert _timing.add_layer_norm_bytes(16, 32, BF16, BF16, BF16) == 4096 + 128
    # dy, dsum, sum read; dx written; weight read, dweight, dbias written
    assert _timing.add_layer_norm_bytes(16, 32, BF16, BF16, BF16, backward=True) == 4096 + 192


def test_gelu_bytes():
    assert _timing.gelu_bytes(1000, BF16) == 4_000
    assert _timing.gelu_bytes(1000, BF16, backward=True) == 6_000
    assert _timing.gelu_bytes(1000, FP32) == 8_000
    # bias + GELU on (8, 3072): 2 * 24576 * 2 B + the bias 3072 * 2 B; backward also writes dbias
    assert _timing.bias_gelu_bytes(8 * 3072, 3072, BF16) == 98_304 + 6_144
    assert _timing.bias_gelu_bytes(8 * 3072, 3072, BF16, backward=True) == 147_456 + 12_288


def test_attention_flops():
    dense = 4 * 2 * 16 * 1024 * 1024 * 128
    assert _timing.attention_flops(2, 16, 1024, 1024, 128, causal=False) == dense == 17_179_869_184
    assert _timing.attention_flops(2, 16, 1024, 1024, 128, causal=True) == dense / 2
    assert _timing.attention_flops(2, 16, 1024, 1024, 128, causal=False, mode="bwd") == 2.5 * dense
    assert _timing.attention_flops(2, 16, 1024, 1024, 128, causal=True, mode="fwd+bwd") == 3.5 * dense / 2
    with pytest.raises(ValueError, match="mode"):
        _timing.attention_flops(1, 1, 1, 1, 1, causal=False, mode="forward")


def test_copy_matmul_gpt_flops_and_peaks():
    assert _timing.copy_bytes(2**20, FP32) == 8 * 2**20
    assert _timing.matmul_flops(8192, 8192, 8192) == 2 * 8192**3
    assert _timing.gpt_flops_per_token(124_000_000, 12, 768, 1024) == 6 * 124_000_000 + 12 * 12 * 768 * 1024
    assert _timing.nominal_peak_tflops("NVIDIA H100 80GB HBM3") == 989.4
    assert _timing.nominal_peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert _timing.nominal_peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert _timing.nominal_peak_tflops("some future GPU") is None


def test_case_metrics_use_the_model():
    case = bc.OpCase("layer_norm", "bwd", (("M", 4096), ("N", 768)))
    kind, amount = bc.work_of(case)
    assert (kind, amount) == ("bytes", 18_874_368 + 4_608)
    roof = _timing.Roofline("x", copy_gbps=2000.0, copy_bytes=0, matmul_tflops=500.0, matmul_shape=[1, 1, 1],
                            matmul_dtype="bfloat16", nominal_bf16_tflops=None, method="")
    m = bc.metrics(case, 0.01, roof)  # 10 us
    assert m["GB/s"] == pytest.approx(amount / 1e-5 / 1e9)
    assert m["pct_of_copy_bandwidth"] == pytest.approx(100 * m["GB/s"] / 2000.0)
    att = bc.OpCase("attention", "fwd+bwd", (("B", 4), ("H", 16), ("S", 4096), ("D", 128)), causal=True)
    m = bc.metrics(att, 1.0, roof)
    assert m["TFLOP/s"] == pytest.approx(3.5 * 4 * 4 * 16 * 4096**2 * 128 / 2 / 1e-3 / 1e12)
    assert m["pct_of_matmul"] == pytest.approx(100 * m["TFLOP/s"] / 500.0)


def test_gpu_case_shapes_are_realistic():
    attn = bc.gpu_cases("attention", "default")
    assert {c.d["S"] for c in attn} == {512, 1024, 2048, 4096, 8192, 16384}
    assert all(c.d["B"] * c.d["S"] == 16384 and c.d["H"] * c.d["D"] == 2048 for c in attn)
    ln = bc.gpu_cases("layer_norm", "default")
    assert {c.d["N"] for c in ln} == {768, 1024, 2048, 4096, 8192}
    assert {c.d["N"] for c in bc.gpu_cases("gelu", "default")} == {4 * n for n in (768, 1024, 2048, 4096, 8192)}
    assert bc.impls_for("attention")[:1] == ["fastgpt-triton"] and "sdpa-flash" in bc.impls_for("attention")


# --------------------------------------------------------------------------------------------
# the checks and timers catch what they are there to catch
# --------------------------------------------------------------------------------------------


def _spin(seconds: float, clock=None) -> None:
    # on the clock the timer reads (compare_cpu: thread CPU time with one torch thread; a wall-clock
    # spin descheduled half-way would cost it less CPU time than planted)
    clock = clock or _timing._host_clock()[0]
    end = clock() + seconds
    while clock() < end:
        pass


def test_compare_cpu_finds_a_planted_overhead():
    x = torch.randn(64, 64)
    base = lambda: x.sum()  # noqa: E731
    slower = lambda: (_spin(200e-6), x.sum())  # noqa: E731
    cmp = _timing.compare_cpu(base, slower, budget_s=0.3, batch_s=2e-3)
    assert 100 < cmp.overhead_us < 2000, cmp
    assert cmp.overhead_pct > 0 and cmp.rounds >= 7


class _FakeEvent:
    """A CUDA event on the host clock, so time_cuda's control flow runs on a CPU-only machine."""

    def __init__(self, enable_timing=False):
        self.t = None

    def record(self):
        self.t = time.perf_counter()

    def elapsed_time(self, end):
        return (end.t - self.t) * 1e3


def test_time_cuda_logic_with_a_host_clock(monkeypatch):
    monkeypatch.setattr(torch.cuda, "Event", _FakeEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(_timing, "_flush_buffer", lambda device: torch.zeros(16))
    calls = {"setup": 0, "fn": 0}

    def setup():
        calls["setup"] += 1
        _spin(3e-3, time.perf_counter)  # outside the events: must not be counted

    def fn():
        assert calls["setup"] == calls["fn"] + 1, "setup must run before every call"
        calls["fn"] += 1
        _spin(1e-3, time.perf_counter)  # the fake events read the wall clock

    t = _timing.time_cuda(fn, device=torch.device("cuda", 0), setup=setup, warmup_ms=5, rep_ms=20)
    assert 0.9 <= t.median_ms < 2.5 and t.min_ms <= t.median_ms, t
    assert t.n >= 10 and calls["fn"] == 1 + 5 + t.n + int(t.method.split(" after ")[1].split()[0])
    assert "L2 flushed" in t.method


def test_prepare_rejects_a_benchmark_that_compares_different_computations(monkeypatch):
    case = bc.smoke_cases("attention")[0]  # causal
    assert case.causal
    real = bc._torch_fn

    def non_causal_eager(c, device):
        return real(bc.OpCase(c.op, c.mode, c.dims, c.dtype, causal=False, tier=c.tier), device)

    monkeypatch.setattr(bc, "_torch_fn", non_causal_eager)
    bc.release()
    with pytest.raises(AssertionError, match="different computations"):
        bc.prepare(case, "torch-eager", torch.device("cpu"))
    bc.release()


def test_dispatch_check_rejects_different_results():
    case = dc.DispatchCase("gelu", "tiny", "fwd-nograd")
    torch_call, fast_call = dc.dispatch_pair(case)
    assert dc.check_dispatch_pair(case, torch_call, fast_call) <= 1e-6
    with pytest.raises(AssertionError, match="differs"):
        dc.check_dispatch_pair(case, torch_call, lambda: fast_call() * 1.01)


def test_fastgpt_gpu_backend_is_never_timed_as_a_fallback():
    case = bc.OpCase("layer_norm", "fwd", (("M", 4), ("N", 8)), "float32", tier="smoke")
    with pytest.raises(bc.Unavailable, match="strict mode"):
        bc.prepare(case, "fastgpt-cuda", torch.device("cpu"))


# --------------------------------------------------------------------------------------------
# the CLI
# --------------------------------------------------------------------------------------------


def test_bench_module_import_is_light():
    """The CLI imports fastgpt.tools.bench.cli to build its parser: that must not load the benchmark machinery."""
    code = (
        "import sys, fastgpt; before = set(sys.modules); import fastgpt.tools.bench.cli, fastgpt.cli; fastgpt.cli.build_parser(); "
        "new = set(sys.modules) - before; "
        "heavy = sorted(m for m in new if m.split('.')[0] in ('matplotlib', 'tqdm', 'triton', 'numpy') "
        "or m in ('fastgpt.tools.bench.op_cases', 'fastgpt.tools.bench.timing')); print(heavy); sys.exit(1 if heavy else 0)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    from fastgpt import cli

    d = tmp_path_factory.mktemp("bench")
    json_path, png_path = d / "out.json", d / "out.png"
    start = time.perf_counter()
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = cli.main(["bench", "--quick", "--json", str(json_path), "--plot", str(png_path), "--no-progress"])
    return {"rc": rc, "json": json_path, "png": png_path, "stdout": buf.getvalue(), "seconds": time.perf_counter() - start}


def test_bench_quick_completes_and_writes_json_and_png(quick_run):
    assert quick_run["rc"] == 0, quick_run["stdout"]
    assert quick_run["seconds"] < 120, quick_run["seconds"]
    report = json.loads(quick_run["json"].read_text())
    for key in ("device", "versions", "date", "roofline", "parity", "results", "work_model", "backends", "static_report"):
        assert key in report, key
    assert report["versions"]["torch"] == torch.__version__
    assert report["roofline"]["copy_gbps"] > 0 and report["roofline"]["matmul_tflops"] > 0
    assert all(p["ok"] for p in report["parity"]), report["parity"]
    ops = {r["op"] for r in report["results"]}
    assert {"attention", "layer_norm", "add_layer_norm", "gelu", "bias_gelu"} <= ops
    for row in report["results"]:
        assert row["fastgpt_ms"] > 0 and row["best_peer_ms"] > 0 and row["speedup_vs_best"] > 0
    assert quick_run["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only report")
def test_bench_on_cpu_says_why_gpu_backends_are_unavailable(quick_run):
    report = json.loads(quick_run["json"].read_text())
    assert report["device"]["type"] == "cpu"
    unavailable = report["gpu_backends_unavailable"]
    assert "cuda" in unavailable and "cuda extension" in unavailable
    # triton runs on CPU tensors only under TRITON_INTERPRET=1 (which this suite sets); else it is listed
    import os

    assert ("triton" in unavailable) == (os.environ.get("TRITON_INTERPRET", "0") in ("", "0"))
    # the static report is there wherever triton's compiler and cuobjdump are (as in this suite's
    # environment, tests/test_kernel_report.py); otherwise it says why
    from fastgpt.tools.inspect.compiling import _nvidia_tool

    static = report["static_report"]
    assert static["available"] == (_nvidia_tool("cuobjdump") is not None), static.get("reason")
    if static["available"]:
        assert static["rows"] and any("not a timing" in line for line in static["text"])
    else:
        assert static["reason"]
    out = quick_run["stdout"]
    assert "GPU backends unavailable here" in out and "no CUDA device" in out
    assert "static report" in out
    # the CPU rows are the dispatch overhead of the reference path, both directions
    modes = {(r["op"], r["mode"]) for r in report["results"]}
    assert ("layer_norm", "fwd-nograd") in modes and ("layer_norm", "fwd+bwd") in modes
    assert all("overhead_us" in r for r in report["results"])
    # the Triton attention kernel's parity was checked through the interpreter
    assert any(p["op"] == "attention" and p["backend"] == "triton" and p["ok"] for p in report["parity"])


def test_bench_rejects_unknown_ops():
    from fastgpt import cli

    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", "--ops", "softmax"])
    assert exc.value.code == 2
