"""The reference ops (the CPU fallback and the oracle) against torch and float64 hand computations.

Every public op runs with the ``reference`` backend forced, forward and gradients, and must satisfy
the parity rule (docs/design.md, "Parity rule") against the matching torch function (baseline in the same dtype, oracle in
float64). The attention reference is also checked against an independent float64 einsum where its
semantics differ from torch's (bottom-right causal with Sq != Sk).
"""

import math

import pytest
import torch
import torch.nn.functional as F

import fastgpt
from fastgpt import reference
from fastgpt.testing import assert_parity, attention_oracle as einsum_attention, check_against_torch, run_case

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


@pytest.fixture(autouse=True, params=["torch-shortcut", "custom-op-path"])
def reference_path(request, monkeypatch):
    """Every test runs twice: eager calls that torch computes exactly go straight to torch (the
    shortcut), and the same calls through fastgpt's custom-op reference path (what torch.compile and
    the GPU backends use)."""
    from fastgpt.ops import _define

    monkeypatch.setattr(_define, "TORCH_SHORTCUT", request.param == "torch-shortcut")
    return request.param


def _randn(*shape, seed, requires_grad=True, scale=1.0, shift=0.0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale + shift).requires_grad_(requires_grad)


def _check(name, fn, torch_fn, inputs, dtype, reference_path):
    """check_against_torch, except where the shortcut hands the call to torch's op itself (float32 /
    float64 eager): parity against that op would compare torch with itself, so there the results,
    forward and gradients, must be the op's bit for bit (the call reached torch with the right
    arguments); the custom-op-path run of the same test checks the values against float64."""
    if dtype not in (torch.float32, torch.float64) or reference_path != "torch-shortcut":
        check_against_torch(name, fn, torch_fn, inputs, dtype)
        return
    rounded = [t.detach().to(dtype).requires_grad_(t.requires_grad) for t in inputs]
    outs, _ = run_case(fn, rounded)
    gen = torch.Generator().manual_seed(0)
    upstream = [torch.randn(o.shape, generator=gen, dtype=dtype) for o in outs]
    got, want = run_case(fn, rounded, upstream), run_case(torch_fn, rounded, upstream)
    for a, b in zip([*got[0], *got[1]], [*want[0], *want[1]]):
        assert (a is None and b is None) or torch.equal(a, b), f"{name}: the shortcut's result is not torch's"


def _ref_backend(fn):
    def run(*args):
        with fastgpt.use_backend("reference"):
            return fn(*args)

    return run


# ---- attention ------------------------------------------------------------------------------


def torch_sdpa(q, k, v, causal, scale):
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, enable_gqa=q.shape[1] != k.shape[1])


ATTN_CASES = [
    # (B, Hq, Hk, Sq, Sk, D)
    (2, 4, 4, 17, 17, 16),
    (1, 2, 2, 1, 1, 40),
    (2, 4, 2, 64, 64, 64),
    (1, 4, 1, 113, 113, 80),
    (2, 2, 2, 17, 113, 96),
    (1, 4, 2, 1, 64, 128),
    (1, 2, 1, 64, 17, 40),
    (1, 2, 2, 113, 1, 16),
    (1, 2, 2, 33, 33, 256),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", ATTN_CASES, ids=lambda s: "B{}H{}/{}S{}x{}D{}".format(*s))
def test_reference_attention_matches_oracle(shape, causal, dtype, reference_path):
    b, hq, hk, sq, sk, d = shape
    seed = hash((shape, causal)) % 1000
    q, k, v = _randn(b, hq, sq, d, seed=seed), _randn(b, hk, sk, d, seed=seed + 1), _randn(b, hk, sk, d, seed=seed + 2)
    scale = 1.0 / math.sqrt(d)
    agrees_with_torch = not causal or sq == sk
    oracle = torch_sdpa if agrees_with_torch else einsum_attention
    fn = _ref_backend(lambda q, k, v: fastgpt.attention(q, k, v, causal=causal))
    path = reference_path if agrees_with_torch else "custom-op-path"  # the shortcut is torch's sdpa: top-left causal
    _check("attention", fn, lambda q, k, v: oracle(q, k, v, causal, scale), [q, k, v], dtype, path)


@pytest.mark.parametrize("sq,sk", [(5, 9), (9, 5), (1, 7), (16, 16)])
def test_reference_attention_equals_sdpa_with_bottom_right_mask(sq, sk):
    """Where a bottom-right boolean mask leaves no row empty, torch SDPA with that mask is the same op."""
    q, k, v = _randn(1, 2, sq, 8, seed=1), _randn(1, 2, sk, 8, seed=2), _randn(1, 2, sk, 8, seed=3)
    mask = reference.causal_mask(sq, sk)
    rows = mask.any(-1)
    out = reference.attention_forward(q, k, v, True, 0.3)[0]
    expected = F.scaled_dot_product_attention(q[:, :, rows], k, v, attn_mask=mask[rows], scale=0.3)
    torch.testing.assert_close(out[:, :, rows], expected, rtol=1e-12, atol=1e-12)
    assert torch.equal(out[:, :, ~rows], torch.zeros_like(out[:, :, ~rows]))


def test_reference_attention_rows_without_keys_are_zero_with_zero_grads():
    q, k, v = _randn(1, 2, 9, 16, seed=4), _randn(1, 2, 4, 16, seed=5), _randn(1, 2, 4, 16, seed=6)
    with fastgpt.use_backend("reference"):
        out, lse = fastgpt.attention(q, k, v, causal=True, return_lse=True)
    assert torch.equal(out[:, :, :5], torch.zeros_like(out[:, :, :5]))
    assert torch.isneginf(lse[:, :, :5]).all() and torch.isfinite(lse[:, :, 5:]).all()
    out.sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    assert torch.equal(q.grad[:, :, :5], torch.zeros_like(q.grad[:, :, :5]))


@pytest.mark.parametrize("causal", [False, True])
def test_reference_lse_and_its_gradient(causal):
    """lse = logsumexp of the scaled, masked scores; d(lse) flows back like torch.logsumexp's."""
    q, k, v = _randn(2, 4, 7, 16, seed=7), _randn(2, 2, 11, 16, seed=8), _randn(2, 2, 11, 16, seed=9)
    scale = 0.25

    def lse_oracle(q, k, v):
        kk = k.repeat_interleave(2, dim=1)
        s = torch.einsum("bhqd,bhkd->bhqk", q, kk) * scale
        if causal:
            s = s.masked_fill(~reference.causal_mask(7, 11), float("-inf"))
        return einsum_attention(q, k, v, causal, scale), torch.logsumexp(s, dim=-1).to(
            torch.float32 if q.dtype != torch.float64 else torch.float64
        )

    fn = _ref_backend(lambda q, k, v: fastgpt.attention(q, k, v, causal=causal, scale=scale, return_lse=True))
    for dtype in (torch.float32, torch.float64):
        check_against_torch("attention+lse", fn, lse_oracle, [q, k, v], dtype)


def test_reference_attention_gradcheck():
    q, k, v = _randn(1, 2, 5, 4, seed=10), _randn(1, 1, 6, 4, seed=11), _randn(1, 1, 6, 4, seed=12)

    def f(q, k, v):
        with fastgpt.use_backend("reference"):
            return fastgpt.attention(q, k, v, causal=True, return_lse=True)

    assert torch.autograd.gradcheck(f, (q, k, v))


def test_layouts_agree_and_flash_attn_output_is_contiguous():
    q, k, v = _randn(2, 3, 10, 8, seed=13), _randn(2, 1, 12, 8, seed=14), _randn(2, 1, 12, 8, seed=15)
    with fastgpt.use_backend("reference"):
        a = fastgpt.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        b = fastgpt.flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True)
    assert b.shape == (2, 10, 3, 8) and b.is_contiguous()
    torch.testing.assert_close(a, b.transpose(1, 2), rtol=0, atol=0)


def test_sdpa_three_dim_input_and_explicit_scale():
    q, k, v = _randn(3, 5, 8, seed=16), _randn(3, 7, 8, seed=17), _randn(3, 7, 8, seed=18)
    with fastgpt.use_backend("reference"):
        out = fastgpt.scaled_dot_product_attention(q, k, v, scale=0.7)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, scale=0.7))


def test_sdpa_fallback_with_a_mask_keeps_grouped_query_heads():
    """A dense mask with GQA: query head h attends with kv head h // (Hq // Hk), as without a mask."""
    q, k, v = _randn(1, 4, 6, 8, seed=23), _randn(1, 2, 6, 8, seed=24), _randn(1, 2, 6, 8, seed=25)
    mask = torch.rand(6, 6, generator=torch.Generator().manual_seed(1)) > 0.3
    mask[:, 0] = True
    with fastgpt.use_backend("reference"):
        out = fastgpt.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    expected = F.scaled_dot_product_attention(q, k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1), attn_mask=mask)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


def test_sdpa_with_mask_or_dropout_runs_torch_with_our_semantics():
    q, k, v = _randn(1, 2, 6, 8, seed=19), _randn(1, 2, 6, 8, seed=20), _randn(1, 2, 6, 8, seed=21)
    mask = torch.rand(6, 6, generator=torch.Generator().manual_seed(0)) > 0.3
    mask[:, 0] = True
    with fastgpt.use_backend("reference"):
        out = fastgpt.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
        # dropout keeps the bottom-right causal semantics; rows with no key stay zero
        torch.manual_seed(0)
        qd = _randn(1, 2, 9, 8, seed=22)
        dropped = fastgpt.scaled_dot_product_attention(qd, k, v, dropout_p=0.5, is_causal=True)
    assert dropped.shape == (1, 2, 9, 8)
    assert torch.equal(dropped[:, :, :3], torch.zeros_like(dropped[:, :, :3]))
    dropped.sum().backward()
    assert torch.isfinite(qd.grad).all()


# ---- layer norm -----------------------------------------------------------------------------

LN_SHAPES = [(1, 1), (3, 7), (4, 768), (2, 5, 1000), (17, 64)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("affine", ["weight+bias", "weight", "none"])
@pytest.mark.parametrize("shape", LN_SHAPES, ids=str)
def test_reference_layer_norm_matches_torch(shape, affine, dtype, reference_path):
    n = shape[-1]
    x = _randn(*shape, seed=1, scale=2.0, shift=0.5)
    w = _randn(n, seed=2, shift=1.0) if affine != "none" else None
    b = _randn(n, seed=3) if affine == "weight+bias" else None
    inputs = [t for t in (x, w, b) if t is not None]

    def call(f):
        def run(*ts):
            it = iter(ts)
            xx = next(it)
            ww = next(it) if w is not None else None
            bb = next(it) if b is not None else None
            return f(xx, (n,), ww, bb, 1e-5)

        return run

    _check("layer_norm", _ref_backend(call(fastgpt.layer_norm)), call(F.layer_norm), inputs, dtype, reference_path)


def test_reference_layer_norm_large_mean_is_stable():
    """Two-pass variance: a row with mean 1e4 and unit spread normalizes exactly in float32."""
    x = torch.randn(8, 4096, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) + 1e4
    with fastgpt.use_backend("reference"):
        y = fastgpt.layer_norm(x.float(), (4096,))
    assert_parity("large mean", y, F.layer_norm(x, (4096,)), F.layer_norm(x.float(), (4096,)))


def test_reference_layer_norm_multi_dim_normalized_shape():
    x = _randn(3, 4, 5, seed=4)
    w, b = _randn(4, 5, seed=5), _randn(4, 5, seed=6)
    check_against_torch(
        "layer_norm 2-D",
        _ref_backend(lambda x, w, b: fastgpt.layer_norm(x, (4, 5), w, b)),
        lambda x, w, b: F.layer_norm(x, (4, 5), w, b),
        [x, w, b],
        torch.float32,
    )


def test_reference_layer_norm_float32_params_with_half_input():
    """The autocast layout: bf16 activations, float32 weight and bias; output bf16, grads in float32."""
    x = torch.randn(4, 64, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(64, requires_grad=True)
    b = torch.randn(64, requires_grad=True)
    with fastgpt.use_backend("reference"):
        y = fastgpt.layer_norm(x, (64,), w, b)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert w.grad.dtype == torch.float32 and b.grad.dtype == torch.float32 and x.grad.dtype == torch.bfloat16
    expected = F.layer_norm(x.detach().double(), (64,), w.detach().double(), b.detach().double())
    assert_parity("mixed ln", y, expected, F.layer_norm(x.detach(), (64,), w.detach().bfloat16(), b.detach().bfloat16()))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("affine", [True, False])
def test_reference_add_layer_norm_matches_torch(affine, dtype, reference_path):
    x, r = _randn(3, 5, 96, seed=7), _randn(3, 5, 96, seed=8)
    w, b = (_randn(96, seed=9, shift=1.0), _randn(96, seed=10)) if affine else (None, None)

    def eager(x, r, *wb):
        s = x + r
        return F.layer_norm(s, (96,), *(wb or (None, None))), s

    def ours(x, r, *wb):
        return fastgpt.add_layer_norm(x, r, *(wb or (None, None)))

    inputs = [x, r] + ([w, b] if affine else [])
    _check("add_layer_norm", _ref_backend(ours), eager, inputs, dtype, reference_path)


def test_reference_add_layer_norm_sum_only_gradient():
    """Only the sum output used: its gradient reaches x and residual unchanged."""
    x, r = _randn(2, 8, seed=11), _randn(2, 8, seed=12)
    w, b = _randn(8, seed=13), _randn(8, seed=14)
    with fastgpt.use_backend("reference"):
        _, s = fastgpt.add_layer_norm(x, r, w, b)
    s.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x)) and torch.equal(r.grad, torch.ones_like(r))


# ---- gelu -----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("shape", [(1,), (7,), (3, 1000), (2, 3, 64)], ids=str)
def test_reference_gelu_matches_torch(shape, approximate, dtype, reference_path):
    x = _randn(*shape, seed=1, scale=3.0)
    _check(
        "gelu",
        _ref_backend(lambda x: fastgpt.gelu(x, approximate)),
        lambda x: F.gelu(x, approximate=approximate),
        [x],
        dtype,
        reference_path,
    )


def test_reference_gelu_extreme_inputs_are_finite():
    x = torch.tensor([-1e4, -30.0, -5.0, 0.0, 5.0, 30.0, 1e4], dtype=torch.float32, requires_grad=True)
    for approximate in ("none", "tanh"):
        with fastgpt.use_backend("reference"):
            y = fastgpt.gelu(x, approximate)
        (g,) = torch.autograd.grad(y.sum(), x)
        torch.testing.assert_close(y, F.gelu(x, approximate=approximate))
        assert torch.isfinite(g).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_reference_bias_gelu_matches_torch(approximate, dtype, reference_path):
    x, b = _randn(4, 3, 80, seed=2, scale=2.0), _randn(80, seed=3)
    _check(
        "bias_gelu",
        _ref_backend(lambda x, b: fastgpt.bias_gelu(x, b, approximate)),
        lambda x, b: F.gelu(x + b, approximate=approximate),
        [x, b],
        dtype,
        reference_path,
    )


def test_reference_ops_gradcheck_in_float64():
    x = _randn(3, 6, seed=4)
    w, b = _randn(6, seed=5), _randn(6, seed=6)
    r = _randn(3, 6, seed=7)
    with fastgpt.use_backend("reference"):
        assert torch.autograd.gradcheck(lambda x, w, b: fastgpt.layer_norm(x, (6,), w, b), (x, w, b))
        assert torch.autograd.gradcheck(lambda x, r, w, b: fastgpt.add_layer_norm(x, r, w, b), (x, r, w, b))
        assert torch.autograd.gradcheck(lambda x: fastgpt.gelu(x, "tanh"), (x,))
        assert torch.autograd.gradcheck(lambda x, b: fastgpt.bias_gelu(x, b), (x, b))


def test_parity_rule_rejects_a_wrong_answer():
    """The checker itself can fail: a result off by more than the bound raises."""
    x = _randn(4, 32, seed=8)
    wrong = lambda x: fastgpt.gelu(x) * (1 + 1e-3)  # noqa: E731
    with pytest.raises(AssertionError, match="FAILS"):
        check_against_torch("planted", wrong, F.gelu, [x], torch.float32)
    nan_out = lambda x: fastgpt.gelu(x) + float("nan")  # noqa: E731
    with pytest.raises(AssertionError):
        check_against_torch("nan", nan_out, F.gelu, [x], torch.float32, gradients=False)


def test_matrix_covers_design_lengths_and_head_dims():
    """The attention matrix above exercises every length and head dim docs/design.md ("Parity rule") lists."""
    lengths = {s for c in ATTN_CASES for s in (c[3], c[4])}
    dims = {c[5] for c in ATTN_CASES}
    assert {1, 17, 64, 113} <= lengths and {16, 40, 64, 80, 96, 128, 256} <= dims
    assert any(c[1] != c[2] for c in ATTN_CASES) and any(c[3] != c[4] for c in ATTN_CASES)


def test_gelu_formula_is_the_derivative_torch_computes():
    """The written-out GELU formulas (used for half-precision bias_gelu) match torch in float64."""
    x = _randn(257, seed=30, scale=4.0)
    for approximate in ("none", "tanh"):
        y = reference.gelu_formula(x, approximate)
        torch.testing.assert_close(y, F.gelu(x, approximate=approximate), rtol=1e-13, atol=1e-13)
        (g,) = torch.autograd.grad(F.gelu(x, approximate=approximate).sum(), x)
        torch.testing.assert_close(reference.gelu_grad_formula(x.detach(), approximate), g, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("hk", [4, 1])
def test_attention_backward_formula_equals_torch_fused_cpu_path(hk):
    """The FlashAttention-2 backward formula and torch's fused CPU backward agree (both reference paths)."""
    q, k, v = _randn(2, 4, 9, 16, seed=31), _randn(2, hk, 9, 16, seed=32), _randn(2, hk, 9, 16, seed=33)
    dout = _randn(2, 4, 9, 16, seed=34, requires_grad=False)
    out, lse = reference.attention_forward(q, k, v, True, 0.25)
    fused = reference.attention_backward(dout, q, k, v, out, lse, None, True, 0.25)
    formula = reference.attention_backward(dout, q, k, v, out, lse, torch.zeros_like(lse), True, 0.25)
    for a, b in zip(fused, formula):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
