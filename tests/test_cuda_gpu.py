"""The CUDA kernels on a GPU: forward and gradients against the float64 reference (the parity rule of docs/design.md).

Hidden sizes {1, 7, 768, 1000, 4096, 8192, 65536} x rows {1, 3, 4097} x float32/float16/bfloat16,
weight/bias present or absent (and float32 parameters with 16-bit activations), misaligned views
(an odd element offset: the scalar paths), add + layer norm, GELU (erf and tanh) and bias + GELU,
through the ops of ``fastgpt.cuda_ext.load()`` directly and through the public API with the cuda
backend forced. Skipped, with the reason, on machines without a CUDA device (tests/conftest.py).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastgpt
from fastgpt import cuda_ext
from fastgpt.testing import check_against_torch

from fastgpt.tools.cuda_emu.parity import check_bias_gelu, check_gelu, check_layer_norm

pytestmark = pytest.mark.gpu

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
HIDDEN = [1, 7, 768, 1000, 4096, 8192, 65536]
ROWS = [1, 3, 4097]


@pytest.fixture(scope="module")
def ops():
    return cuda_ext.load()


def _rows(rows: int, n: int) -> int:
    # 4097 rows of 65536 would make the float64 reference tensors 2 GiB each: 257 rows still span
    # many blocks of the grid-stride loop
    return min(rows, 257) if n >= 65536 else rows


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("n", HIDDEN)
def test_layer_norm_gpu(ops, n, rows, dtype):
    check_layer_norm(ops, _rows(rows, n), n, dtype, device="cuda")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", HIDDEN)
@pytest.mark.parametrize("params", ["none", "weight", "bias", "float32"])
def test_layer_norm_params_gpu(ops, n, dtype, params):
    if params == "float32" and dtype == torch.float32:
        pytest.skip("float32 parameters with float32 x is the plain case")
    check_layer_norm(
        ops, 3, n, dtype, weight=params in ("weight", "float32"), bias=params in ("bias", "float32"), param_fp32=params == "float32", device="cuda"
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows", [3, 4097])
@pytest.mark.parametrize("n", HIDDEN)
def test_layer_norm_misaligned_gpu(ops, n, rows, dtype):
    check_layer_norm(ops, _rows(rows, n), n, dtype, misalign=True, device="cuda")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows", [1, 4097])
@pytest.mark.parametrize("n", HIDDEN)
def test_add_layer_norm_gpu(ops, n, rows, dtype):
    check_layer_norm(ops, _rows(rows, n), n, dtype, residual=True, device="cuda")


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1,), (7,), (4097, 768), (3, 65536), (4097, 1000)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("misalign", [False, True], ids=["aligned", "misaligned"])
def test_gelu_gpu(ops, shape, dtype, approximate, misalign):
    check_gelu(ops, shape, dtype, approximate, misalign=misalign, device="cuda")


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (4097, 768), (3, 65536), (4097, 1000), (2, 3, 3072)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("variant", ["aligned", "misaligned", "float32_bias"])
def test_bias_gelu_gpu(ops, shape, dtype, approximate, variant):
    if variant == "float32_bias" and dtype == torch.float32:
        pytest.skip("a float32 bias with float32 x is the plain case")
    check_bias_gelu(
        ops, shape, dtype, approximate, misalign=variant == "misaligned", bias_fp32=variant == "float32_bias", device="cuda"
    )


def test_many_rows_gpu(ops):
    check_layer_norm(ops, 70000, 64, torch.bfloat16, device="cuda")
    check_bias_gelu(ops, (70000, 64), torch.bfloat16, "tanh", device="cuda")


def test_parameter_gradients_are_deterministic_gpu(ops):
    x = torch.randn(4097, 1024, device="cuda", dtype=torch.bfloat16)
    dy = torch.randn_like(x)
    w = torch.randn(1024, device="cuda", dtype=torch.bfloat16)
    _, mean, rstd = ops.layer_norm_fwd(x, w, None, 1e-5)
    first = ops.layer_norm_bwd(dy, x, w, mean, rstd, True, True)
    for _ in range(3):
        again = ops.layer_norm_bwd(dy, x, w, mean, rstd, True, True)
        assert all(torch.equal(a, b) for a, b in zip(first, again))


def test_public_api_uses_the_cuda_backend_gpu():
    """fastgpt.layer_norm / add_layer_norm / gelu / bias_gelu on CUDA tensors, cuda backend forced (strict)."""
    gen = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).cuda().requires_grad_()

    x, r, w, b = randn(4, 33, 768), randn(4, 33, 768), randn(768), randn(768)
    with fastgpt.use_backend("cuda", strict=True):
        check_against_torch(
            "fastgpt.layer_norm",
            lambda x, w, b: fastgpt.layer_norm(x, (768,), w, b),
            lambda x, w, b: F.layer_norm(x, (768,), w, b),
            [x, w, b],
            torch.bfloat16,
        )
        check_against_torch(
            "fastgpt.add_layer_norm",
            lambda x, r, w, b: fastgpt.add_layer_norm(x, r, w, b),
            lambda x, r, w, b: (F.layer_norm(x + r, (768,), w, b), x + r),
            [x, r, w, b],
            torch.float16,
        )
        check_against_torch("fastgpt.gelu", lambda x: fastgpt.gelu(x, "tanh"), lambda x: F.gelu(x, approximate="tanh"), [x], torch.bfloat16)
        check_against_torch(
            "fastgpt.bias_gelu", lambda x, b: fastgpt.bias_gelu(x, b), lambda x, b: F.gelu(x + b), [x, b], torch.float32
        )
    assert fastgpt.explain(as_dict=True)["layer_norm"]["backend"] == "cuda"
