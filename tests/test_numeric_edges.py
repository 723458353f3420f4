"""Numeric edges that random N(0, 1) inputs never reach, forward and gradients.

Attention: scores around -300 (exp2(-lse) overflows float32, so every padded key must be masked
exactly, not just multiplied by a zero key), scores around +300 (exp overflows unless the row max is
subtracted), extreme softmax scales, and rows that see no key next to rows of extreme values; on the
reference backend and on the Triton kernel (strict; under TRITON_INTERPRET=1 on a CPU). 16-bit runs
are held to the parity rule (see :func:`run_attention_check` for why not the tight rule).

Layer norm: eps = 1e-2 on rows whose variance is of the order of eps (an implementation that
ignored eps, or used a fixed 1e-5, is far off) and rows with a large mean, through the public
function, ``fastgpt.nn.LayerNorm`` and the CUDA kernels in the emulator.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import fastgpt
from fastgpt.testing import ATOL, attention_oracle, check_against_torch

pytest.importorskip("triton", reason="triton is not installed (it is a Linux-only dependency)")
from fastgpt.kernels._triton_utils import interpreter_active  # noqa: E402

# b=1, 4 query heads over 2 kv heads, Sq=33 > Sk=20 (13 causal rows see no key); no length is a
# multiple of any interpreter tile (16 and 32), so every kernel has a ragged tile
SHAPE = dict(b=1, hq=4, hk=2, sq=33, sk=20, d=16)


def edge_qkv(kind: str, seed: int = 0, sq: int = SHAPE["sq"], sk: int = SHAPE["sk"], d: int = SHAPE["d"]):
    """float32 leaves. "negative"/"positive": q and k share a direction u of norm sqrt(d) with
    amplitude 8.7 (a small N(0, 0.1) spread on top), so with scale 1/sqrt(d) every score is about
    -+300 (natural log) while the rows still differ; "big": N(0, 1) times 100."""
    g = torch.Generator().manual_seed(seed)
    b, hq, hk = SHAPE["b"], SHAPE["hq"], SHAPE["hk"]
    q = torch.randn(b, hq, sq, d, generator=g)
    k = torch.randn(b, hk, sk, d, generator=g)
    v = torch.randn(b, hk, sk, d, generator=g)
    u = torch.where(torch.arange(d) % 3 == 0, -1.0, 1.0)
    a = math.sqrt(300.0 * math.sqrt(d) / d)
    if kind == "negative":
        q, k = 0.1 * q + a * u, 0.1 * k - a * u
    elif kind == "positive":
        q, k = 0.1 * q + a * u, 0.1 * k + a * u
    elif kind == "big":
        q, k = 100 * q, 100 * k
    elif kind != "normal":
        raise ValueError(kind)
    return [t.requires_grad_() for t in (q, k, v)]


def run_attention_check(kind: str, dtype: torch.dtype, causal: bool, scale: float | None = None, seed: int = 0):
    """The parity rule of fastgpt.attention on ``edge_qkv(kind)`` against the float64 oracle, with
    whatever backend the caller selected. (Not the tight 16-bit rule: with q and k along a common
    direction of amplitude 8.7, the gradients' error is the rounding of O in delta = rowsum(dO * O)
    times that amplitude, a different draw of the same size for the kernel and the tight reference,
    whose ratio varies past the tight factor.)"""
    q, k, v = edge_qkv(kind, seed)
    scale = scale if scale is not None else SHAPE["d"] ** -0.5
    fn = lambda q, k, v: fastgpt.attention(q, k, v, causal=causal, scale=scale)  # noqa: E731
    name = f"{kind} scores {dtype} {'causal' if causal else 'full'} scale={scale:g}"
    # dQ = scale * dS @ K with dS = P * (dP - delta), delta = rowsum(dO * O) (FlashAttention-2, the
    # kernel and the reference backend alike): a rounding-level mismatch between delta and dP
    # reaches dQ times scale * |K|, where torch's softmax backward cancels exactly (one-hot rows).
    # So the gradients' floor is the dtype's atol times that amplification (1 for unit inputs).
    amplification = max(1.0, scale * float(k.detach().abs().max()))
    check_against_torch(name, fn, lambda q, k, v: attention_oracle(q, k, v, causal, scale), [q, k, v], dtype,
                        grad_atol=ATOL[dtype] * amplification)


EDGES = [
    ("negative", torch.float16, False),
    ("negative", torch.float32, True),
    ("negative", torch.bfloat16, True),
    ("positive", torch.float16, True),
    ("positive", torch.float32, False),
    ("big", torch.float32, True),
]


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("kind, dtype, causal", EDGES, ids=lambda x: str(x).replace("torch.", ""))
def test_attention_extreme_scores(kind, dtype, causal, backend, device, request):
    if backend == "triton" and kind == "big":
        # scores ~1e4: the backward recomputes P = exp2(s - lse2) from the forward's natural-log lse
        # (log2 -> ln -> log2), which is off by ~ulp(1.4e4) = 2e-3: P off by ~1e-3, dV by 1e-2
        request.applymarker(pytest.mark.xfail(strict=True, reason="issue 17 item 8: the Triton backward's lse round "
                                              "trip loses ~ulp(|lse|) in P (inf at scale=1e10)"))
    if backend == "triton" and device.type == "cpu" and not interpreter_active():
        pytest.skip("TRITON_INTERPRET is off and there is no GPU")
    with fastgpt.use_backend(backend, strict=True):
        run_attention_check(kind, dtype, causal)


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("scale", [1e-10, 1e4, 1e10])
def test_attention_extreme_scale(scale, backend, device):
    with fastgpt.use_backend(backend, strict=True):
        run_attention_check("normal", torch.float32, True, scale=scale)


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_rows_that_see_no_key_next_to_extreme_rows(backend, device):
    """Causal Sq > Sk: the first rows see no key (out 0, lse -inf, zero gradients, no nan) while the
    others carry scores of +-1e3..1e4; lse gradients flow too."""
    q, k, v = (t.detach().to(device) for t in edge_qkv("big", seed=3))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    with fastgpt.use_backend(backend, strict=True):
        out, lse = fastgpt.attention(q, k, v, causal=True, return_lse=True)
        (out.square().sum() + torch.where(torch.isfinite(lse), lse, 0.0).sum()).backward()
    empty = SHAPE["sq"] - SHAPE["sk"]
    assert torch.all(out[:, :, :empty] == 0) and torch.all(lse[:, :, :empty] == float("-inf"))
    assert torch.all(q.grad[:, :, :empty] == 0)
    for t in (out, lse[:, :, empty:], q.grad, k.grad, v.grad):
        assert torch.isfinite(t).all()
    ref = attention_oracle(q.detach().double(), k.detach().double(), v.detach().double(), True, SHAPE["d"] ** -0.5)
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------------------
# layer norm: eps that matters, large means
# --------------------------------------------------------------------------------------------

# (x_scale, x_shift) per dtype: a variance of 0.01 (= eps) on a large mean that the dtype can still
# resolve (16-bit: mean 8, where the spacing is 1/128; float32: mean 1000)
LOW_VARIANCE = {torch.float16: (0.1, 8.0), torch.bfloat16: (0.1, 2.0), torch.float32: (0.1, 1000.0)}
EPS = 1e-2


def _ln_inputs(dtype, rows=6, n=96, seed=0):
    scale, shift = LOW_VARIANCE[dtype]
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, n, generator=g, dtype=torch.float64) * scale + shift).requires_grad_()
    w = (torch.randn(n, generator=g, dtype=torch.float64) * 0.5 + 1).requires_grad_()
    b = (torch.randn(n, generator=g, dtype=torch.float64) * 0.5).requires_grad_()
    return x, w, b


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_layer_norm_eps_and_large_mean_public_function(dtype, device):
    x, w, b = (t.detach().to(device).requires_grad_() for t in _ln_inputs(dtype))
    check_against_torch(f"layer_norm eps={EPS} {dtype}", lambda x, w, b: fastgpt.layer_norm(x, (96,), w, b, eps=EPS),
                        lambda x, w, b: F.layer_norm(x, (96,), w, b, eps=EPS), [x, w, b], dtype)
    # add + layer norm takes eps too
    r = torch.zeros_like(x).requires_grad_()
    check_against_torch(f"add_layer_norm eps={EPS} {dtype}",
                        lambda x, r: fastgpt.add_layer_norm(x, r, None, None, eps=EPS)[0],
                        lambda x, r: F.layer_norm(x + r, (96,), eps=EPS), [x, r], dtype)


def test_eps_is_not_ignored():
    """The inputs above are ones where eps matters: 1e-2 and 1e-5 give clearly different results."""
    x, _, _ = _ln_inputs(torch.float32)
    gap = (F.layer_norm(x.detach(), (96,), eps=EPS) - F.layer_norm(x.detach(), (96,), eps=1e-5)).abs().max()
    assert gap > 0.1


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_nn_layer_norm_passes_its_eps(dtype, device):
    ln = fastgpt.nn.LayerNorm(96, eps=EPS, device=device, dtype=dtype)
    x = _ln_inputs(dtype)[0].detach().to(device).requires_grad_()
    check_against_torch(f"nn.LayerNorm eps={EPS} {dtype}", ln, lambda x: F.layer_norm(x, (96,), ln.weight.to(x.dtype),
                        ln.bias.to(x.dtype), eps=EPS), [x], dtype)


@pytest.fixture(scope="module")
def emu():
    from fastgpt.tools import cuda_emu

    reason = cuda_emu.unavailable_reason()
    if reason:
        pytest.skip(reason)
    e = cuda_emu.load()
    e.configure(sms=2, threads_per_sm=256)
    yield e
    e.configure()


@pytest.mark.parametrize("n", [96, 1024])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("residual", [False, True], ids=["layer_norm", "add_layer_norm"])
def test_layer_norm_eps_and_large_mean_cuda_emulated(emu, n, dtype, residual):
    from fastgpt.tools.cuda_emu.parity import check_layer_norm

    scale, shift = LOW_VARIANCE[dtype]
    check_layer_norm(emu, 5, n, dtype, eps=EPS, x_scale=scale, x_shift=shift, residual=residual)
