"""fastgpt.cross_entropy and fastgpt.linear_cross_entropy against a float64 oracle (the parity rule).

The oracle is torch's own F.cross_entropy on float64 logits (for linear cross-entropy: on the float64
product ``x @ weight.T + bias``), with one documented difference: a mean over no valid row is 0, not
NaN. The baseline ("what plain torch gets wrong") is the same code in the case's dtype. The Triton
kernel (kernels/cross_entropy.py) runs under TRITON_INTERPRET=1 on CPU tensors (tests/conftest.py).
"""

import importlib
import math

import pytest
import torch
import torch.nn.functional as F

import fastgpt
from fastgpt import backends, reference
from fastgpt.ops import _define
from fastgpt.testing import allocation_recorder, check_against_torch

ce_mod = importlib.import_module("fastgpt.ops.cross_entropy")  # fastgpt.ops.cross_entropy is the function
IGNORE = -100
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def oracle_cross_entropy(z, target, reduction="mean", label_smoothing=0.0, ignore_index=IGNORE):
    """torch's cross-entropy, except that a mean over no valid row is 0 (fastgpt's semantics)."""
    if reduction != "mean":
        return F.cross_entropy(z, target, ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing)
    total = F.cross_entropy(z, target, ignore_index=ignore_index, reduction="sum", label_smoothing=label_smoothing)
    return total / max(int((target != ignore_index).sum()), 1)


def make_target(n, v, ignored="some", seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, v, (n,), generator=g)
    if ignored == "some":
        t[::3] = IGNORE
    elif ignored == "all":
        t[:] = IGNORE
    return t


def linear_oracle(target, reduction, label_smoothing, with_bias):
    def fn(x, w, *b):
        z = x @ w.t() + b[0] if with_bias else x @ w.t()
        return oracle_cross_entropy(z, target, reduction, label_smoothing)

    return fn


# (N, V, ignored rows, reduction, label smoothing): every N and V, each reduction, smoothing on and off
CASES = [
    (1, 1, "none_ignored", "mean", 0.0),
    (1, 17, "none_ignored", "sum", 0.1),
    (7, 17, "some", "none", 0.0),
    (7, 1000, "some", "mean", 0.2),
    (33, 1000, "all", "mean", 0.0),
    (33, 5003, "some", "sum", 0.0),
    (33, 5003, "some", "mean", 1.0),
    (7, 5003, "all", "none", 0.1),
    (33, 17, "some", "mean", 0.0),
]


def _ids(case):
    n, v, ignored, reduction, ls = case
    return f"n{n}-v{v}-{ignored}-{reduction}-ls{ls}"


@pytest.fixture(params=[True, False], ids=["shortcut", "custom-op"])
def shortcut(request, monkeypatch):
    monkeypatch.setattr(_define, "TORCH_SHORTCUT", request.param)
    return request.param


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_cross_entropy_reference_parity(case, dtype, shortcut):
    n, v, ignored, reduction, ls = case
    t = make_target(n, v, ignored)
    z = (torch.randn(n, v) * 3).requires_grad_()
    fn = lambda z: fastgpt.cross_entropy(z, t, reduction=reduction, label_smoothing=ls)  # noqa: E731
    with backends.use_backend("reference"):
        check_against_torch("cross_entropy", fn, lambda z: oracle_cross_entropy(z, t, reduction, ls), [z], dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_linear_cross_entropy_reference_parity(case, dtype, monkeypatch):
    n, v, ignored, reduction, ls = case
    d = 16
    t = make_target(n, v, ignored)
    # chunks of 3 rows: every case with n > 3 crosses chunk boundaries, and a ragged last chunk
    monkeypatch.setattr(ce_mod, "chunk_rows", lambda n, v, d: 3)
    with_bias = v != 5003 or reduction != "sum"
    inputs = [torch.randn(n, d).requires_grad_(), (torch.randn(v, d) * d**-0.5).requires_grad_()]
    if with_bias:
        inputs.append((torch.randn(v) * 0.1).requires_grad_())

    def fn(x, w, *b):
        return fastgpt.linear_cross_entropy(x, w, t, b[0] if b else None, reduction=reduction, label_smoothing=ls)

    with backends.use_backend("reference"):
        check_against_torch("linear_cross_entropy", fn, linear_oracle(t, reduction, ls, with_bias), inputs, dtype)


def test_all_ignored_gives_zero_loss_and_zero_gradients():
    x = torch.randn(5, 8, requires_grad=True)
    w = torch.randn(11, 8, requires_grad=True)
    t = torch.full((5,), IGNORE)
    loss = fastgpt.linear_cross_entropy(x, w, t)
    loss.backward()
    assert loss.item() == 0.0 and not torch.isnan(loss)
    assert torch.count_nonzero(x.grad) == 0 and torch.count_nonzero(w.grad) == 0
    z = torch.randn(5, 11, requires_grad=True)
    loss = fastgpt.cross_entropy(z, t)
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(z.grad) == 0
    assert torch.isnan(F.cross_entropy(z.detach(), t))  # the documented difference from torch


def test_leading_dims_are_flattened_and_none_keeps_target_shape():
    z = torch.randn(2, 3, 10)
    t = torch.randint(0, 10, (2, 3))
    out = fastgpt.cross_entropy(z, t, reduction="none")
    assert out.shape == (2, 3)
    torch.testing.assert_close(out, F.cross_entropy(z.reshape(6, 10), t.reshape(6), reduction="none").view(2, 3))
    x, w = torch.randn(2, 3, 4), torch.randn(10, 4)
    torch.testing.assert_close(fastgpt.linear_cross_entropy(x, w, t), F.cross_entropy((x @ w.t()).reshape(6, 10), t.reshape(6)))


def test_int32_target_and_in_range_ignore_index():
    z = torch.randn(6, 9, requires_grad=True)
    t = torch.tensor([0, 3, 8, 0, 5, 0], dtype=torch.int32)
    out = fastgpt.cross_entropy(z, t, ignore_index=0)
    torch.testing.assert_close(out, F.cross_entropy(z, t.long(), ignore_index=0))


def test_gradients_are_computed_in_the_forward_and_only_scaled_by_the_backward(monkeypatch):
    """reduction mean/sum: one chunked pass; the backward must not recompute (no call of the loop)."""
    x = torch.randn(9, 8, requires_grad=True)
    w = torch.randn(13, 8, requires_grad=True)
    t = make_target(9, 13)
    calls = []
    real = reference.linear_cross_entropy_chunked
    monkeypatch.setattr(reference, "linear_cross_entropy_chunked", lambda *a, **k: calls.append(a) or real(*a, **k))
    with backends.use_backend("reference"):
        loss = fastgpt.linear_cross_entropy(x, w, t, reduction="sum")
        (2.5 * loss).backward()
    assert len(calls) == 1
    xr, wr = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    (2.5 * F.cross_entropy(xr @ wr.t(), t, reduction="sum")).backward()
    torch.testing.assert_close(x.grad, xr.grad.float())
    torch.testing.assert_close(w.grad, wr.grad.float())


def test_no_gradient_needed_computes_none(monkeypatch):
    seen = []
    real = reference.linear_cross_entropy_chunked
    monkeypatch.setattr(reference, "linear_cross_entropy_chunked", lambda *a, **k: seen.append(a[7:10]) or real(*a, **k))
    x, w, t = torch.randn(4, 8), torch.randn(5, 8), make_target(4, 5)
    with torch.no_grad():
        fastgpt.linear_cross_entropy(x.requires_grad_(), w, t)
    fastgpt.linear_cross_entropy(x.detach(), w.requires_grad_(), t)
    assert seen == [(False, False, False), (False, True, False)]


def test_chunk_rows_keeps_a_chunk_of_logits_about_the_size_of_x():
    assert ce_mod.chunk_rows(8192, 50304, 768) == max(math.ceil(8192 / math.ceil(50304 / 768)), ce_mod.CHUNK_MIN_ROWS)
    assert ce_mod.chunk_rows(8192, 50304, 8192) == math.ceil(8192 / math.ceil(50304 / 8192))
    assert ce_mod.chunk_rows(8192, 50304, 64) == max(8192 // 787 + 1, ce_mod.CHUNK_MIN_BYTES // (4 * 50304), 64)
    assert ce_mod.chunk_rows(100, 50304, 768) == 100
    assert ce_mod.chunk_rows(8192, 128256, 4096) * 128256 <= 8192 * 4096 * 1.1
    assert ce_mod.chunk_rows(1, 10**6, 8) == 1
    assert ce_mod.chunk_rows(10**6, 2**20, 2**20) * 4 * 2**20 <= ce_mod.CHUNK_MAX_BYTES


# --------------------------------------------------------------------------------------------
# the Triton kernel, executed by the interpreter on CPU tensors
# --------------------------------------------------------------------------------------------

TRITON_CASES = [
    (1, 17, "none_ignored", "mean", 0.0),
    (7, 1000, "some", "mean", 0.1),  # 4 vocabulary blocks of 256 in the interpreter, the last ragged
    (7, 300, "some", "none", 0.0),
    (5, 300, "all", "sum", 0.0),
    (7, 17, "some", "sum", 0.3),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", TRITON_CASES, ids=_ids)
def test_cross_entropy_triton_parity(case, dtype, device):
    n, v, ignored, reduction, ls = case
    t = make_target(n, v, ignored).to(device)
    # shifted: the loss does not change, but a wrong smoothing term (eps / V * sum z) would
    z = (torch.randn(n, v) * 3 + 5).to(device).requires_grad_()
    fn = lambda z: fastgpt.cross_entropy(z, t, reduction=reduction, label_smoothing=ls)  # noqa: E731
    with backends.use_backend("triton", strict=True):
        check_against_torch("cross_entropy", fn, lambda z: oracle_cross_entropy(z, t, reduction, ls), [z], dtype)
    assert backends.last_choice("cross_entropy").backend == "triton"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", TRITON_CASES[1:], ids=_ids)
def test_linear_cross_entropy_triton_parity(case, dtype, device, monkeypatch):
    n, v, ignored, reduction, ls = case
    d = 16
    t = make_target(n, v, ignored).to(device)
    monkeypatch.setattr(ce_mod, "chunk_rows", lambda n, v, d: 3)
    inputs = [torch.randn(n, d).to(device).requires_grad_(), (torch.randn(v, d) * d**-0.5).to(device).requires_grad_(),
              (torch.randn(v) * 0.1).to(device).requires_grad_()]

    def fn(x, w, b):
        return fastgpt.linear_cross_entropy(x, w, t, b, reduction=reduction, label_smoothing=ls)

    with backends.use_backend("triton", strict=True):
        check_against_torch("linear_cross_entropy", fn, linear_oracle(t, reduction, ls, True), inputs, dtype)
    assert backends.last_choice("linear_cross_entropy").backend == "triton"


def test_triton_kernel_writes_the_gradient_in_place(device):
    """dz may be z itself (the linear cross-entropy's chunk): the result equals the out-of-place one."""
    kernel = pytest.importorskip("fastgpt.kernels.cross_entropy")
    n, v = 3, 600
    z = torch.randn(n, v, device=device)
    t = torch.tensor([5, IGNORE, 599], device=device)
    scale = torch.tensor([0.5, 2.0, -1.0], device=device)
    loss_a, loss_b = (torch.empty(n, device=device) for _ in range(2))
    dz = torch.empty_like(z)
    kernel.forward(z, t, loss_a, dz, scale, IGNORE, 0.1)
    z_in_place = z.clone()
    kernel.forward(z_in_place, t, loss_b, z_in_place, scale, IGNORE, 0.1)
    torch.testing.assert_close(z_in_place, dz, rtol=0, atol=0)
    torch.testing.assert_close(loss_a, loss_b, rtol=0, atol=0)
    ref_loss, ref_g = reference.cross_entropy_rows(z.double(), t, IGNORE, 0.1, scale.double())
    torch.testing.assert_close(loss_a.double(), ref_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dz.double(), ref_g, rtol=1e-5, atol=1e-6)
    assert torch.count_nonzero(dz[1]) == 0 and loss_a[1] == 0


def test_float64_declines_the_triton_backend_with_a_reason():
    z, t = torch.randn(2, 5, dtype=torch.float64), torch.tensor([1, 2])
    with backends.use_backend("triton", strict=True), pytest.raises(backends.BackendUnavailableError, match="float64"):
        fastgpt.cross_entropy(z, t)


# --------------------------------------------------------------------------------------------
# memory: the reference linear cross-entropy never holds the (tokens x vocab) logits
# --------------------------------------------------------------------------------------------


def _run_recorded(fn):
    with allocation_recorder() as rec:
        fn().backward()
    return rec


def test_reference_linear_cross_entropy_never_allocates_the_logits():
    n, v, d = 1024, 4096, 64
    x = torch.randn(n, d, requires_grad=True)
    w = (torch.randn(v, d) * 0.1).requires_grad_()
    t = make_target(n, v)
    with backends.use_backend("reference"):
        ours = _run_recorded(lambda: fastgpt.linear_cross_entropy(x, w, t))
    eager = _run_recorded(lambda: F.cross_entropy(x @ w.t(), t, ignore_index=IGNORE))
    logits_bytes = n * v * 4
    assert eager.largest >= logits_bytes  # the recorder sees eager's logits
    chunk = ce_mod.chunk_rows(n, v, d)
    assert chunk < n
    assert ours.largest <= max(chunk * v * 4, v * d * 4)  # one chunk of float32 logits, or dweight
    assert ours.peak <= 0.25 * eager.peak, (ours.peak, eager.peak)


def test_accum_dtype_in_the_weight_dtype_drops_the_float32_weight_buffer():
    """accum_dtype=bfloat16: no float32 (V, D) tensor is ever allocated (the default allocates one), and
    the peak drops by at least the difference."""
    n, v, d = 64, 512, 512  # D large: the (V, D) float32 buffer is the biggest tensor of the default
    x = torch.randn(n, d, dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(v, d) * 0.1).to(torch.bfloat16).requires_grad_()
    t = make_target(n, v)
    float32_weight = v * d * 4
    with backends.use_backend("reference"):
        exact = _run_recorded(lambda: fastgpt.linear_cross_entropy(x, w, t))
        low = _run_recorded(lambda: fastgpt.linear_cross_entropy(x, w, t, accum_dtype=torch.bfloat16))
    assert exact.largest >= float32_weight
    # at least the float32 buffer less a bfloat16 weight's worth (both return a bfloat16 dweight)
    assert low.largest < float32_weight and low.peak <= exact.peak - float32_weight // 2, (low.peak, exact.peak)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("with_bias", [False, True], ids=["no-bias", "bias"])
def test_accum_dtype_in_the_weight_dtype_rounds_once_per_chunk(backend, with_bias, device, monkeypatch):
    """dx and dbias are those of the default (bitwise); each dweight element is within the float32
    path's error plus one bfloat16 rounding (2**-8 relative) of each chunk's running sum, bounded by the
    sum over chunks of |that chunk's float64 contribution|."""
    n, v, d, chunk = 37, 300, 16, 5
    monkeypatch.setattr(ce_mod, "chunk_rows", lambda n, v, d: chunk)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(n, d, generator=g).to(device, torch.bfloat16)
    w = (torch.randn(v, d, generator=g) * 0.5).to(device, torch.bfloat16)
    b = (torch.randn(v, generator=g) * 0.1).to(device, torch.bfloat16) if with_bias else None
    t = make_target(n, v).to(device)

    def grads(accum_dtype):
        xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
        bs = b.clone().requires_grad_() if with_bias else None
        with backends.use_backend(backend, strict=backend == "triton"):
            fastgpt.linear_cross_entropy(xs, ws, t, bs, accum_dtype=accum_dtype).backward()
        return xs.grad, ws.grad, bs.grad if with_bias else None

    dx_exact, dw_exact, db_exact = grads(None)
    dx_low, dw_low, db_low = grads(torch.bfloat16)
    assert dw_low.dtype == torch.bfloat16
    torch.testing.assert_close(dx_low, dx_exact, rtol=0, atol=0)
    if with_bias:
        torch.testing.assert_close(db_low, db_exact, rtol=0, atol=0)
    # the float64 oracle, chunk by chunk
    x64, w64 = x.double().cpu(), w.double().cpu()
    z = x64 @ w64.t() + (b.double().cpu() if with_bias else 0)
    valid = (t.cpu() != IGNORE)
    dz = (torch.softmax(z, -1) - F.one_hot(t.cpu().clamp(min=0), v)) * valid[:, None] / valid.sum()
    parts = [(dz[c:c + chunk].t() @ x64[c:c + chunk]) for c in range(0, n, chunk)]
    running = torch.stack(parts).cumsum(0)
    dw64 = running[-1]
    # one rounding (unit roundoff 2**-8) of each chunk's running sum, and of the chunk's dz to x's dtype
    rounding = running.abs().sum(0) + dz.abs().t() @ x64.abs()
    bound = (dw_exact.double().cpu() - dw64).abs() + 2.0**-8 * rounding * 1.01
    err = (dw_low.double().cpu() - dw64).abs()
    assert bool((err <= bound).all()), float((err - bound).max())
    assert not torch.equal(dw_low, dw_exact)  # the per-chunk rounding did happen


# --------------------------------------------------------------------------------------------
# bad input: named errors before any work
# --------------------------------------------------------------------------------------------

BAD = [
    (dict(target=torch.zeros(4, dtype=torch.float32)), TypeError, "target must have dtype int64 or int32"),
    (dict(target=torch.zeros(5, dtype=torch.long)), ValueError, r"target must have shape \(4,\)"),
    (dict(target=torch.tensor([0, 1, 7, 2])), ValueError, r"target\[2\].*outside the classes \[0, 7\)"),
    (dict(target=torch.tensor([0, -1, 1, 2])), ValueError, r"target\[1\]"),
    (dict(reduction="avg"), ValueError, "reduction must be one of"),
    (dict(label_smoothing=1.5), ValueError, r"label_smoothing must be in \[0, 1\]"),
    (dict(label_smoothing=-0.1), ValueError, "label_smoothing"),
    (dict(ignore_index=1.0), TypeError, "ignore_index must be an int"),
]


@pytest.mark.parametrize("bad,exc,match", BAD, ids=lambda p: str(p)[:40] if isinstance(p, (dict, str)) else None)
def test_bad_input_cross_entropy(bad, exc, match):
    args = dict(logits=torch.randn(4, 7), target=torch.tensor([0, 1, IGNORE, 6]))
    args.update(bad)
    with pytest.raises(exc, match=match):
        fastgpt.cross_entropy(**args)


@pytest.mark.parametrize("bad,exc,match", BAD, ids=lambda p: str(p)[:40] if isinstance(p, (dict, str)) else None)
def test_bad_input_linear_cross_entropy(bad, exc, match):
    args = dict(x=torch.randn(4, 3), weight=torch.randn(7, 3), target=torch.tensor([0, 1, IGNORE, 6]))
    args.update(bad)
    with pytest.raises(exc, match=match):
        fastgpt.linear_cross_entropy(**args)


@pytest.mark.parametrize(
    "change,exc,match",
    [
        (dict(weight=torch.randn(7, 4)), ValueError, r"weight must be \(V, 3\)"),
        (dict(weight=torch.randn(7)), ValueError, "weight must be 2-D"),
        (dict(weight=torch.randn(7, 3, dtype=torch.float64)), TypeError, "weight has dtype"),
        (dict(bias=torch.randn(6)), ValueError, r"bias must have shape \(7,\)"),
        (dict(bias=torch.randn(7, dtype=torch.float16)), TypeError, "bias has dtype"),
        (dict(x=torch.zeros(4, 3, dtype=torch.long)), TypeError, "x must have a floating dtype"),
        (dict(weight=torch.randn(7, 3, device="meta")), ValueError, "weight is on meta"),
        (dict(accum_dtype=torch.float16), ValueError, "accum_dtype must be None, torch.float32 or weight's dtype"),
    ],
)
def test_bad_input_linear_cross_entropy_shapes(change, exc, match):
    args = dict(x=torch.randn(4, 3), weight=torch.randn(7, 3), target=torch.tensor([0, 1, IGNORE, 6]))
    args.update(change)
    with pytest.raises(exc, match=match):
        fastgpt.linear_cross_entropy(**args)


def test_bad_input_cross_entropy_logits():
    with pytest.raises(ValueError, match="at least one class"):
        fastgpt.cross_entropy(torch.randn(3, 0), torch.zeros(3, dtype=torch.long))
    with pytest.raises(TypeError, match="logits must be a torch.Tensor"):
        fastgpt.cross_entropy([1.0], torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError, match="target is on meta"):
        fastgpt.cross_entropy(torch.randn(2, 3), torch.zeros(2, dtype=torch.long, device="meta"))


# --------------------------------------------------------------------------------------------
# torch.compile
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_linear_cross_entropy_under_torch_compile_fullgraph(reduction):
    torch._dynamo.reset()
    x = torch.randn(6, 8, requires_grad=True)
    w = torch.randn(11, 8, requires_grad=True)
    b = torch.randn(11, requires_grad=True)
    t = make_target(6, 11)

    def step(x, w, b, t):
        loss = fastgpt.linear_cross_entropy(x, w, t, b, reduction=reduction, label_smoothing=0.1)
        return loss.sum() + fastgpt.cross_entropy(x @ w.t(), t, reduction=reduction).sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    out = compiled(x, w, b, t)
    grads = torch.autograd.grad(out, (x, w, b))
    xr, wr, br = (a.detach().double().requires_grad_() for a in (x, w, b))
    ref = (oracle_cross_entropy(xr @ wr.t() + br, t, reduction, 0.1).sum() + oracle_cross_entropy(xr @ wr.t(), t, reduction).sum())
    ref_grads = torch.autograd.grad(ref, (xr, wr, br))
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g.double(), r, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_plain_backward_of_the_mean_loss_meets_the_parity_rule(backend, dtype, device, monkeypatch):
    """loss.backward() (upstream gradient exactly 1) takes the eager shortcut: the forward's gradients."""
    from fastgpt.testing import assert_parity

    monkeypatch.setattr(ce_mod, "chunk_rows", lambda n, v, d: 4)
    n, v, d = 9, 300, 16
    t = make_target(n, v).to(device)
    x0, w0 = torch.randn(n, d).to(dtype).to(device), (torch.randn(v, d) * d**-0.5).to(dtype).to(device)

    def grads(fn, dt):
        x, w = x0.to(dt).clone().requires_grad_(), w0.to(dt).clone().requires_grad_()
        fn(x, w).backward()
        return x.grad, w.grad

    with backends.use_backend(backend, strict=backend == "triton"):
        ours = grads(lambda x, w: fastgpt.linear_cross_entropy(x, w, t), dtype)
    base = grads(lambda x, w: F.cross_entropy(x @ w.t(), t, ignore_index=IGNORE), dtype)
    ref = grads(lambda x, w: F.cross_entropy(x @ w.t(), t, ignore_index=IGNORE), torch.float64)
    for name, o, b, r in zip(("dx", "dweight"), ours, base, ref):
        assert o.dtype == dtype
        assert_parity(name, o, r, b, gradient=True)


def test_linear_cross_entropy_loss_dtype_keeps_the_float32_sums():
    """loss_dtype=float32 on 16-bit x returns the float32 sums the default rounds to x's dtype (once)."""
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(9, 16, generator=g).bfloat16(), torch.randn(40, 16, generator=g).bfloat16()
    t = torch.randint(0, 40, (9,), generator=g)
    for reduction in ("mean", "sum", "none"):
        wide = fastgpt.linear_cross_entropy(x, w, t, reduction=reduction, loss_dtype=torch.float32)
        assert wide.dtype == torch.float32
        assert torch.equal(fastgpt.linear_cross_entropy(x, w, t, reduction=reduction), wide.bfloat16())
        want = F.cross_entropy((x @ w.t()).double(), t, reduction=reduction)  # the logits meet in bf16, as eager code's
        assert (wide.double() - want).abs().max() < 1e-5 * want.abs().max()
    with pytest.raises(TypeError, match="loss_dtype must be None or a floating torch.dtype"):
        fastgpt.linear_cross_entropy(x, w, t, loss_dtype=torch.int64)
