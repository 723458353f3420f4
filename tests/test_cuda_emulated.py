"""Every CUDA kernel in csrc/, executed on the CPU by the CUDA emulator (fastgpt/tools/cuda_emu), against float64.

The emulator compiles the unmodified kernel sources for the host (one fiber per CUDA thread,
barriers, emulated warp shuffles, poisoned shared memory) and these tests run each op forward and
backward with the parity rule (docs/design.md): every dtype path (float32, float16, bfloat16, float32
parameters with 16-bit activations), the vectorised and the scalar path (misaligned views, row
lengths that are not a multiple of the pack), row lengths that are not a multiple of anything
(1, 7, 33, 1000, 4097), the multi-pass kernels for wide rows, optional weight and bias. The
emulated device is small (2 SMs of 256 resident threads), so every grid-stride loop takes several
turns and the backward sums several partial rows. The launch log checks that each case ran the
kernel path it was meant to exercise.
"""

from __future__ import annotations

import re

import pytest
import torch

from fastgpt.tools import cuda_emu
from fastgpt.tools.cuda_emu.parity import check_bias_gelu, check_gelu, check_layer_norm

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ITEMSIZE = {torch.float32: 4, torch.float16: 2, torch.bfloat16: 2}
C_NAME = {torch.float32: "float", torch.float16: "__half", torch.bfloat16: "__nv_bfloat16"}
# widest row the register-resident layer norm kernels take (csrc/layer_norm.cu, plan_rows): 1024
# threads x 4 packs forward, 512 threads x 16 elements backward, 1024 x 8 on the scalar paths
FWD_CAPACITY = {"vector": {4: 16384, 2: 32768}, "scalar": {4: 8192, 2: 8192}}
BWD_CAPACITY = {"vector": {4: 8192, 2: 8192}, "scalar": {4: 8192, 2: 8192}}


@pytest.fixture(scope="module")
def emu():
    reason = cuda_emu.unavailable_reason()
    if reason:
        pytest.skip(reason)
    return cuda_emu.load()


@pytest.fixture(autouse=True)
def small_device(request):
    if "emu" not in request.fixturenames:
        yield
        return
    e = request.getfixturevalue("emu")
    e.configure(sms=2, threads_per_sm=256)
    e.take_launches()
    yield
    e.configure()


# Races show under the schedules that run the reader first (tests/test_cuda_emulator_catches_bugs.py):
# the main cases run under two opposite ones.
SCHEDULES = {"forward": dict(order="forward", greedy=False), "reverse-greedy": dict(order="reverse", greedy=True)}


@pytest.fixture(params=list(SCHEDULES))
def schedule(request, emu):
    emu.configure(sms=2, threads_per_sm=256, **SCHEDULES[request.param])
    return request.param


def _vec(dtype: torch.dtype, n: int, misalign: bool) -> int:
    vec = 16 // ITEMSIZE[dtype]
    return 1 if misalign or n % vec else vec


def _launched(emu, pattern: str) -> list[re.Match]:
    return [m for m in (re.match(pattern, line) for line in emu.take_launches()) if m]


def _assert_ln_path(emu, n, dtype, misalign, param_dtype=None):
    vec = _vec(dtype, n, misalign)
    path = "scalar" if vec == 1 else "vector"
    p = C_NAME[param_dtype or dtype]
    launches = emu.take_launches()
    fwd = [l for l in launches if l.startswith("layer_norm_fwd")]
    bwd = [l for l in launches if l.startswith("layer_norm_bwd")]
    big_fwd = "_big" if n > FWD_CAPACITY[path][ITEMSIZE[dtype]] else ""
    big_bwd = "_big" if n > BWD_CAPACITY[path][ITEMSIZE[dtype]] else ""
    assert fwd and all(l.startswith(f"layer_norm_fwd{big_fwd}_kernel<{C_NAME[dtype]}, {p}, {vec}") for l in fwd), fwd
    assert bwd and all(l.startswith(f"layer_norm_bwd{big_bwd}_kernel<{C_NAME[dtype]}, {p}, {vec}") for l in bwd if "params" not in l), bwd


# ---- layer norm ------------------------------------------------------------------------------------

LN_SHAPES = [(1, 1), (3, 7), (65, 33), (3, 768), (65, 1000), (3, 4097), (2, 8200), (2, 20000), (1, 40000)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", LN_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_layer_norm_emulated(emu, shape, dtype, schedule):
    rows, n = shape
    check_layer_norm(emu, rows, n, dtype)
    _assert_ln_path(emu, n, dtype, misalign=False)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(3, 7), (65, 33), (3, 768), (2, 8200)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("params", ["none", "weight", "bias", "frozen_weight"])
def test_layer_norm_optional_params_emulated(emu, shape, dtype, params):
    rows, n = shape
    check_layer_norm(
        emu,
        rows,
        n,
        dtype,
        weight=params in ("weight", "frozen_weight"),
        bias=params == "bias",
        weight_grad=params != "frozen_weight",
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(3, 7), (65, 64), (3, 1000), (2, 8200), (1, 40000)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_layer_norm_float32_params_emulated(emu, shape, dtype):
    rows, n = shape
    check_layer_norm(emu, rows, n, dtype, param_fp32=True)
    _assert_ln_path(emu, n, dtype, misalign=False, param_dtype=torch.float32)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(3, 8), (65, 768), (2, 8200), (1, 40000)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_layer_norm_misaligned_emulated(emu, shape, dtype):
    rows, n = shape
    check_layer_norm(emu, rows, n, dtype, misalign=True)
    _assert_ln_path(emu, n, dtype, misalign=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (65, 768), (3, 1000), (2, 8200), (1, 40000)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_add_layer_norm_emulated(emu, shape, dtype, schedule):
    rows, n = shape
    check_layer_norm(emu, rows, n, dtype, residual=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_add_layer_norm_misaligned_no_params_emulated(emu, dtype):
    check_layer_norm(emu, 5, 256, dtype, residual=True, misalign=True, weight=False, bias=False)
    _assert_ln_path(emu, 256, dtype, misalign=True)


def test_layer_norm_large_mean_keeps_precision_emulated(emu):
    """Rows with a large mean: a single-pass E[x^2] - E[x]^2 variance would lose every digit."""
    x = torch.randn(4, 1024, dtype=torch.float64) + 1e4
    y, mean, rstd = emu.layer_norm_fwd(x.float(), None, None, 1e-5)
    ref = torch.nn.functional.layer_norm(x, (1024,), eps=1e-5)
    assert mean.dtype == rstd.dtype == torch.float32
    assert (y.double() - ref).abs().max() < 2e-3  # float32 input rounding at 1e4 is ~5e-4 of a unit


def test_many_rows_emulated(emu):
    """>= 65536 rows on the emulated device of an H100 (132 SMs): grids stay in range, every row is done."""
    emu.configure(sms=132, threads_per_sm=2048)
    check_layer_norm(emu, 65537, 3, torch.float32)
    check_bias_gelu(emu, (70000, 5), torch.bfloat16, "none")
    grids = _launched(emu, r"(\S+) grid=\((\d+),(\d+),(\d+)\)")
    assert grids and all(int(m.group(3)) <= 65535 and int(m.group(4)) <= 65535 for m in grids)


def test_parameter_gradients_are_deterministic_emulated(emu):
    """dweight/dbias (partial rows summed in a fixed order) do not depend on the thread schedule."""
    x, dy = torch.randn(97, 768), torch.randn(97, 768)
    w = torch.randn(768)
    _, mean, rstd = emu.layer_norm_fwd(x, w, None, 1e-5)
    results = []
    for order, greedy in (("forward", False), ("reverse", False), ("shuffle", False), ("forward", True), ("reverse", True)):
        emu.configure(sms=2, threads_per_sm=256, order=order, greedy=greedy, seed=7)
        results.append(emu.layer_norm_bwd(dy, x, w, mean, rstd, True, True))
    for dx, dw, db in results[1:]:
        assert torch.equal(dx, results[0][0]) and torch.equal(dw, results[0][1]) and torch.equal(db, results[0][2])


# ---- GELU ------------------------------------------------------------------------------------------

GELU_SHAPES = [(1,), (7,), (3, 33), (4, 1000), (2, 3, 129)]


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", GELU_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_gelu_emulated(emu, shape, dtype, approximate):
    check_gelu(emu, shape, dtype, approximate)
    vec = 16 // ITEMSIZE[dtype]
    assert any(l.startswith(f"gelu_kernel<{C_NAME[dtype]}, {vec}") for l in emu.take_launches())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(7,), (4, 1000)], ids=lambda s: "x".join(map(str, s)))
def test_gelu_misaligned_emulated(emu, shape, dtype):
    check_gelu(emu, shape, dtype, "tanh", misalign=True)
    launches = [l for l in emu.take_launches() if l.startswith("gelu_kernel")]
    assert launches and all(l.startswith(f"gelu_kernel<{C_NAME[dtype]}, 1,") for l in launches)


BIAS_GELU_SHAPES = [(1, 1), (3, 7), (65, 33), (4, 768), (3, 1000), (2, 3, 40)]


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", BIAS_GELU_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_bias_gelu_emulated(emu, shape, dtype, approximate, schedule):
    check_bias_gelu(emu, shape, dtype, approximate)
    vec = _vec(dtype, shape[-1], False)
    launches = [l for l in emu.take_launches() if l.startswith("bias_gelu_kernel")]
    assert launches and all(l.startswith(f"bias_gelu_kernel<{C_NAME[dtype]}, {C_NAME[dtype]}, {vec},") for l in launches)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(3, 7), (65, 64)], ids=lambda s: "x".join(map(str, s)))
def test_bias_gelu_float32_bias_emulated(emu, shape, dtype):
    check_bias_gelu(emu, shape, dtype, "none", bias_fp32=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bias_gelu_misaligned_emulated(emu, dtype):
    check_bias_gelu(emu, (5, 64), dtype, "tanh", misalign=True)
    launches = [l for l in emu.take_launches() if l.startswith("bias_gelu_kernel")]
    assert launches and all(re.match(r"bias_gelu_kernel<[^,]+, [^,]+, 1,", l) for l in launches), launches


def test_expanded_gradient_emulated(emu):
    """dy of y.sum() is an expanded (stride-0) tensor: the backward ops make it contiguous."""
    x = torch.randn(4, 8)
    _, mean, rstd = emu.layer_norm_fwd(x, None, None, 1e-5)
    dy = torch.ones(()).expand(4, 8)
    dx, _, _ = emu.layer_norm_bwd(dy, x, None, mean, rstd, False, False)
    assert dx.abs().max() < 1e-5  # the gradient of sum(layer_norm(x)) is zero
    assert torch.equal(emu.gelu_bwd(dy, x, "none"), emu.gelu_bwd(dy.contiguous(), x, "none"))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(3, 7), (65, 768), (2, 8200)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_add_layer_norm_float32_params_emulated(emu, shape, dtype):
    rows, n = shape
    check_layer_norm(emu, rows, n, dtype, residual=True, param_fp32=True)


@pytest.mark.parametrize("n", [7, 768, 8200])
def test_add_layer_norm_without_sum_gradient_emulated(emu, n):
    """dsum absent (the sum output unused): dx is exactly the layer norm backward of the sum."""
    x, r, dy = torch.randn(5, n), torch.randn(5, n), torch.randn(5, n)
    w = torch.randn(n)
    _, s, mean, rstd = emu.add_layer_norm_fwd(x, r, w, None, 1e-5)
    dx, dw, db = emu.add_layer_norm_bwd(dy, None, s, w, mean, rstd, True, False)
    ref = emu.layer_norm_bwd(dy, s, w, mean, rstd, True, False)
    assert torch.equal(dx, ref[0]) and torch.equal(dw, ref[1]) and db.shape == (0,)
