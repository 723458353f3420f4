"""RMSNorm and add + RMSNorm: the Triton kernels (kernels/rms_norm.py, executed by the Triton
interpreter on CPU) and the reference path against the float64 oracle (the parity rule,
fastgpt.testing), torch's F.rms_norm semantics, Hugging Face's LlamaRMSNorm, bad input, compile."""

import pytest
import torch
import torch.nn.functional as F

import fastgpt
from fastgpt import backends
from fastgpt.ops import _define
from fastgpt.ops.rms_norm import llama_rms_norm
from fastgpt.testing import check_against_torch

pytest.importorskip("triton", reason="triton is not installed (it is a Linux-only dependency)")

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
EPS = 1e-6


def torch_rms_norm(x, w, offset=0.0, cast_before_weight=False):
    """The plain-torch formula in x's dtype (the parity rule's baseline); in float64, the oracle."""
    if cast_before_weight:
        return llama_rms_norm(x, w, EPS)
    if not offset:
        return F.rms_norm(x, (x.shape[-1],), w, EPS)
    xf = x.float() if x.dtype != torch.float64 else x
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + EPS) * (w.to(xf.dtype) + offset)
    return y.to(x.dtype)


def make(m, n, *, weight=True, residual=False, seed=0, device="cpu"):
    """x (m, n), [residual (m, n)], [weight (n,)]: leaves on ``device`` that require grad."""
    g = torch.Generator().manual_seed(seed)
    out = [torch.randn(m, n, generator=g) * 2 + 0.5]
    if residual:
        out.append(torch.randn(m, n, generator=g))
    if weight:
        out.append(torch.randn(n, generator=g) * 0.1 + 1.0)
    return [t.to(device).requires_grad_() for t in out]


def ran_triton(op):
    choice = backends.last_choice(op)
    assert choice is not None and choice.backend == "triton", choice


# rows 0, 1, 33 and widths 1, 17, 96, 1000, 4099: the interpreter's chunk is 64 wide, so 96, 1000
# and 4099 run the wide-row loops and 1, 17 the single-chunk path
SHAPES = [(1, 1), (33, 17), (1, 96), (33, 1000), (5, 4099), (0, 17)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m,n", SHAPES)
def test_triton_rms_norm_matches_oracle(m, n, dtype, device):
    inputs = make(m, n, device=device)
    with fastgpt.use_backend("triton", strict=True):
        check_against_torch(f"rms_norm {m}x{n}", lambda x, w: fastgpt.rms_norm(x, (n,), w, EPS), torch_rms_norm, inputs, dtype)
        if m:
            ran_triton("rms_norm")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m,n", [(33, 17), (3, 1000), (0, 96)])
def test_triton_add_rms_norm_matches_oracle(m, n, dtype, device):
    inputs = make(m, n, residual=True, device=device)

    def torch_fn(x, r, w):
        s = x + r
        return torch_rms_norm(s, w), s

    with fastgpt.use_backend("triton", strict=True):
        check_against_torch(f"add_rms_norm {m}x{n}", lambda x, r, w: fastgpt.add_rms_norm(x, r, w, EPS), torch_fn, inputs, dtype)


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float32), ids=str)
@pytest.mark.parametrize("n", [17, 200])
@pytest.mark.parametrize("variant", ["no_weight", "offset", "hf_llama", "hf_llama_fp32_weight"])
def test_triton_variants_match_oracle(variant, n, dtype, device):
    weight = variant != "no_weight"
    inputs = make(9, n, weight=weight, device=device)
    offset = 1.0 if variant == "offset" else 0.0
    cbw = variant.startswith("hf_llama")
    if variant == "hf_llama_fp32_weight" and dtype != torch.float32:
        inputs[1] = inputs[1].detach().float().requires_grad_()

        def fn(x, w):  # the float32 weight must stay float32 when check_against_torch rounds inputs
            return fastgpt.rms_norm(x, (n,), w.float(), EPS, cast_before_weight=True)

        def torch_fn(x, w):
            return llama_rms_norm(x, w.float() if x.dtype != torch.float64 else w, EPS)
    elif weight:
        fn = lambda x, w: fastgpt.rms_norm(x, (n,), w, EPS, weight_offset=offset, cast_before_weight=cbw)  # noqa: E731
        torch_fn = lambda x, w: torch_rms_norm(x, w, offset, cbw)  # noqa: E731
    else:
        fn = lambda x: fastgpt.rms_norm(x, (n,), None, EPS)  # noqa: E731
        torch_fn = lambda x: F.rms_norm(x, (n,), None, EPS)  # noqa: E731
    with fastgpt.use_backend("triton", strict=True):
        check_against_torch(f"rms_norm {variant}", fn, torch_fn, inputs, dtype)
        ran_triton("rms_norm")


def test_hf_llama_mode_returns_the_promoted_dtype_like_the_module(device):
    x = torch.randn(4, 32, dtype=torch.bfloat16, device=device)
    w = torch.randn(32, device=device)
    expected = llama_rms_norm(x, w, EPS)
    for backend in ("reference", "triton"):
        with fastgpt.use_backend(backend, strict=True):
            y = fastgpt.rms_norm(x, 32, w, EPS, cast_before_weight=True)
        assert y.dtype == torch.float32
        # the reference: the module's own ops; the kernel: its rstd may differ in the last float32 bit,
        # which can move the bfloat16 rounding of x_hat by one unit (the variants test holds it to the parity rule)
        tol = 1e-6 if backend == "reference" else 2**-7 * float(w.abs().max())
        torch.testing.assert_close(y, expected, rtol=0, atol=tol)


@pytest.mark.parametrize("shortcut", [True, False])
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64, torch.bfloat16), ids=str)
def test_reference_path_matches_torch_semantics(dtype, shortcut, monkeypatch):
    monkeypatch.setattr(_define, "TORCH_SHORTCUT", shortcut)
    x = torch.randn(2, 3, 40, dtype=dtype) * 1e-3  # small: the default eps shows
    w = torch.randn(3, 40, dtype=dtype)
    with fastgpt.use_backend("reference"):
        got = fastgpt.rms_norm(x, (3, 40), w)  # eps=None: torch's default
        y, s = fastgpt.add_rms_norm(x, x, w[0])
    torch.testing.assert_close(got, F.rms_norm(x, (3, 40), w), rtol=0, atol=0)
    torch.testing.assert_close(y, F.rms_norm(x + x, (40,), w[0]), rtol=0, atol=0)
    assert torch.equal(s, x + x)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_reference_path_matches_oracle(dtype, monkeypatch):
    monkeypatch.setattr(_define, "TORCH_SHORTCUT", False)
    with fastgpt.use_backend("reference"):
        check_against_torch("rms_norm ref", lambda x, w: fastgpt.rms_norm(x, (96,), w, EPS), torch_rms_norm, make(33, 96), dtype)
        check_against_torch("gemma ref", lambda x, w: fastgpt.rms_norm(x, 96, w, EPS, weight_offset=1.0),
                            lambda x, w: torch_rms_norm(x, w, 1.0), make(7, 96), dtype)


def test_unused_sum_or_norm_outputs_still_give_gradients(device):
    x, r, w = make(6, 20, residual=True, device=device)
    with fastgpt.use_backend("triton", strict=True):
        y, _ = fastgpt.add_rms_norm(x, r, w, EPS)
        y.sum().backward()
        gx = x.grad.clone()
        x.grad = r.grad = None
        _, s = fastgpt.add_rms_norm(x, r, w, EPS)
        s.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x)) and torch.equal(r.grad, torch.ones_like(r))
    with fastgpt.use_backend("reference"):
        xx = x.detach().clone().requires_grad_()
        fastgpt.add_rms_norm(xx, r.detach(), w.detach(), EPS)[0].sum().backward()
    torch.testing.assert_close(gx, xx.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda x, w: fastgpt.rms_norm(x.tolist(), 16, w), TypeError, "x must be a torch.Tensor"),
        (lambda x, w: fastgpt.rms_norm(x.long(), 16, w), TypeError, "x must have a floating dtype"),
        (lambda x, w: fastgpt.rms_norm(x, 15, w), ValueError, "normalized_shape"),
        (lambda x, w: fastgpt.rms_norm(x, 16, w[:8]), ValueError, "weight must have shape"),
        (lambda x, w: fastgpt.rms_norm(x, 16, w.double()), TypeError, "weight has dtype"),
        (lambda x, w: fastgpt.rms_norm(x, 16, w, eps=-1.0), ValueError, "eps must be"),
        (lambda x, w: fastgpt.rms_norm(x, 16, w, eps="1e-6"), ValueError, "eps must be"),
        (lambda x, w: fastgpt.rms_norm(x, 16, w, weight_offset=float("nan")), ValueError, "weight_offset"),
        (lambda x, w: fastgpt.rms_norm(x, 16, w, cast_before_weight=1), TypeError, "cast_before_weight"),
        (lambda x, w: fastgpt.add_rms_norm(x, x[:1], w), ValueError, "residual must have x's shape"),
        (lambda x, w: fastgpt.add_rms_norm(x, x.half(), w), TypeError, "residual has dtype"),
    ],
)
def test_bad_input_names_the_argument(call, exc, match):
    x, w = torch.randn(4, 16), torch.randn(16)
    with fastgpt.use_backend("triton", strict=True), pytest.raises(exc, match=match):
        call(x, w)


def test_auto_on_cpu_uses_the_reference_and_float64_declines_the_kernel(device):
    x = torch.randn(3, 8, dtype=torch.float64, device=device)
    with fastgpt.use_backend("triton", strict=True), pytest.raises(backends.BackendUnavailableError, match="float64"):
        fastgpt.rms_norm(x, 8)
    assert fastgpt.explain(as_dict=True, device="cpu")["rms_norm"]["backend"] == "reference"


def test_module_matches_torch_rmsnorm():
    from fastgpt.nn import RMSNorm

    ref = torch.nn.RMSNorm(24, eps=1e-5)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
    mod = RMSNorm(24, eps=1e-5)
    mod.load_state_dict(ref.state_dict())
    x = torch.randn(2, 5, 24)
    torch.testing.assert_close(mod(x), ref(x), rtol=0, atol=0)
