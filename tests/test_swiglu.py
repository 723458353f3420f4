"""SwiGLU: the Triton kernel (kernels/swiglu.py, executed by the Triton interpreter on CPU) and the
reference path against the float64 oracle (the parity rule, fastgpt.testing), views of a fused
gate/up projection, bad input, compile."""

import pytest
import torch
import torch.nn.functional as F

import fastgpt
from fastgpt import backends
from fastgpt.ops import _define
from fastgpt.testing import check_against_torch

pytest.importorskip("triton", reason="triton is not installed (it is a Linux-only dependency)")

DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def torch_swiglu(g, u):
    return F.silu(g) * u


def make(*shape, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(*shape, generator=g) * 3).to(device).requires_grad_() for _ in range(2)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 1), (33, 17), (2, 3, 96), (1, 1000), (4099,), (0, 17)], ids=str)
def test_triton_swiglu_matches_oracle(shape, dtype, device):
    with fastgpt.use_backend("triton", strict=True):
        check_against_torch(f"swiglu {shape}", fastgpt.swiglu, torch_swiglu, make(*shape, device=device), dtype)
        if 0 not in shape:
            assert backends.last_choice("swiglu").backend == "triton"


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float32), ids=str)
def test_triton_reads_halves_of_a_fused_projection_in_place(dtype, device):
    (gu,) = make(3, 5, 2 * 40, device=device)[:1]

    def fn(gu):
        gate, up = gu.chunk(2, dim=-1)  # row stride 80: strided views, no copies
        return fastgpt.swiglu(gate, up)

    with fastgpt.use_backend("triton", strict=True):
        check_against_torch("swiglu fused", fn, lambda gu: torch_swiglu(*gu.chunk(2, dim=-1)), [gu], dtype)
        # and a transposed (non-unit last stride) input is copied, not misread
        g, u = make(40, 6, device=device)
        check_against_torch("swiglu transposed", lambda g, u: fastgpt.swiglu(g.t(), u.t()),
                            lambda g, u: torch_swiglu(g.t(), u.t()), [g, u], dtype)


@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")  # numpy in the interpreter: exp(1e4) = inf, as on a GPU
def test_extreme_gates_give_finite_results(device):
    g = torch.tensor([[-1e4, -100.0, -20.0, 0.0, 20.0, 100.0, 1e4, 3.0]], device=device, requires_grad=True)
    u = torch.ones_like(g, requires_grad=True)
    with fastgpt.use_backend("triton", strict=True):
        check_against_torch("swiglu extremes", fastgpt.swiglu, torch_swiglu, [g, u], torch.float32)
        check_against_torch("swiglu extremes", fastgpt.swiglu, torch_swiglu, [g, u], torch.bfloat16)


@pytest.mark.parametrize("shortcut", [True, False])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_reference_path_matches_oracle(dtype, shortcut, monkeypatch):
    monkeypatch.setattr(_define, "TORCH_SHORTCUT", shortcut)
    with fastgpt.use_backend("reference"):
        check_against_torch("swiglu ref", fastgpt.swiglu, torch_swiglu, make(7, 33), dtype)


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda g: fastgpt.swiglu(g.tolist(), g), TypeError, "gate must be a torch.Tensor"),
        (lambda g: fastgpt.swiglu(g, g.int()), TypeError, "up must have a floating dtype"),
        (lambda g: fastgpt.swiglu(g, g.half()), TypeError, "up has dtype"),
        (lambda g: fastgpt.swiglu(g, g[:, :3]), ValueError, "up must have gate's shape"),
    ],
)
def test_bad_input_names_the_argument(call, exc, match):
    with fastgpt.use_backend("triton", strict=True), pytest.raises(exc, match=match):
        call(torch.randn(2, 8))


def test_float64_declines_the_kernel_in_strict_mode(device):
    g = torch.randn(2, 8, dtype=torch.float64, device=device)
    with fastgpt.use_backend("triton", strict=True), pytest.raises(backends.BackendUnavailableError, match="float64"):
        fastgpt.swiglu(g, g)
