"""Attention at the numeric edges, the same on every path (README, "Attention semantics"):

* a NaN in value row j reaches only the output rows of the queries that see key j; rows that see no
  key give zeros and zero gradients whatever v holds;
* a NaN in query row i makes output row i, dq row i and the dk/dv rows of the keys it sees NaN (as
  torch's math does) and leaves every other row alone;
* a huge scale (1e10 in float32) gives finite gradients.

Paths: the reference through torch's fused attention (the eager shortcut, TORCH_SHORTCUT on), the
reference through the custom op (shortcut off), and the Triton kernel (on CPU through the Triton
interpreter, which tests/conftest.py switches on), each forced strictly.
"""

import pytest
import torch

import fastgpt
from fastgpt.ops import _define

PATHS = ("reference-shortcut", "reference", "triton")
# Known gap: inside its causal edge tiles the Triton kernel still multiplies a masked P = 0 (forward)
# or dS = 0 (dK) by a NaN value / query. Reading NaN as 0 there was tried and spills registers in
# the default sm_80 configs (tests/test_kernel_report.py), so it needs a design measured on a GPU.
_KERNEL_NAN_GAP = "Triton kernel: 0 * nan in causal edge tiles (an in-loop fix spills registers on sm_80)"
PATHS_NAN = ("reference-shortcut", "reference", pytest.param("triton", marks=pytest.mark.xfail(strict=True, reason=_KERNEL_NAN_GAP)))


def run(path, monkeypatch, q, k, v, causal, scale=None):
    """out, dq, dk, dv of fastgpt.attention on ``path`` for upstream gradient 1 (detached copies in)."""
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    monkeypatch.setattr(_define, "TORCH_SHORTCUT", path == "reference-shortcut")
    with fastgpt.use_backend("triton" if path == "triton" else "reference", strict=True):
        out = fastgpt.attention(q, k, v, causal=causal, scale=scale)
        out.backward(torch.ones_like(out))
    return out.detach(), q.grad, k.grad, v.grad


def _qkv(device, sq, sk, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(2, 2, sq, 16), (2, 1, sk, 16), (2, 1, sk, 16)]  # GQA: two query heads per kv head
    return [torch.randn(*s, generator=g).to(device=device, dtype=dtype) for s in shapes]


def _same(path, got, want):
    """Same values as the run without the NaN: bitwise on the kernel (the NaN takes a separate dot);
    on the reference paths the run without NaN may take torch's fused attention, so within rounding."""
    if path == "triton":
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    else:
        tol = 2e-3 if got.dtype == torch.float16 else 1e-5
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)


def _sees(sq, sk, causal, device):
    """(Sq, Sk) bool: query i sees key j (bottom-right causal mask)."""
    i = torch.arange(sq, device=device)[:, None]
    j = torch.arange(sk, device=device)[None, :]
    return (j <= i + sk - sq) if causal else torch.ones(sq, sk, dtype=torch.bool, device=device)


@pytest.mark.parametrize("path", PATHS_NAN)
@pytest.mark.parametrize("sq,sk,j,dtype", [(20, 20, 13, torch.float32), (24, 12, 5, torch.float32), (20, 20, 3, torch.float16)])
def test_nan_in_a_value_row_reaches_only_the_rows_that_see_it(path, sq, sk, j, dtype, device, monkeypatch):
    q, k, v = _qkv(device, sq, sk, dtype)
    clean = run(path, monkeypatch, q, k, v, True)
    v = v.clone()
    v[:, :, j] = float("nan")
    out, dq, dk, dv = run(path, monkeypatch, q, k, v, True)
    sees_j = _sees(sq, sk, True, device)[:, j]
    no_key = ~_sees(sq, sk, True, device).any(dim=1)
    assert torch.isnan(out[:, :, sees_j]).all() and torch.isnan(dq[:, :, sees_j]).all()
    # the rows that cannot see key j are those of the run without the NaN
    _same(path, out[:, :, ~sees_j], clean[0][:, :, ~sees_j])
    _same(path, dq[:, :, ~sees_j], clean[1][:, :, ~sees_j])
    _same(path, dv, clean[3])  # dV = P^T dO does not read v
    assert torch.all(out[:, :, no_key] == 0) and torch.all(dq[:, :, no_key] == 0)
    # the NaN reaches dK through the rows that saw it (their dS), as in torch's math
    assert torch.isnan(dk).any()


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("causal", [False, True])
def test_nan_in_a_query_row_makes_that_row_nan_and_no_other(path, causal, device, monkeypatch):
    q, k, v = _qkv(device, 20, 20, torch.float32)
    clean = run(path, monkeypatch, q, k, v, causal)
    q = q.clone()
    q[:, :, 3, 5] = float("nan")
    out, dq, dk, dv = run(path, monkeypatch, q, k, v, causal)
    assert torch.isnan(out[:, :, 3]).all() and torch.isnan(dq[:, :, 3]).all()
    others = torch.arange(20, device=device) != 3
    _same(path, out[:, :, others], clean[0][:, :, others])
    _same(path, dq[:, :, others], clean[1][:, :, others])
    seen_by_3 = _sees(20, 20, causal, device)[3]
    assert torch.isnan(dv[:, :, seen_by_3]).all()
    _same(path, dv[:, :, ~seen_by_3], clean[3][:, :, ~seen_by_3])
    if path == "triton" and causal:
        pytest.xfail(_KERNEL_NAN_GAP)  # dK of the keys the NaN query cannot see
    for got, want in ((dk, clean[2]), (dv, clean[3])):  # the keys the NaN query sees, and no other
        assert torch.isnan(got[:, :, seen_by_3]).all()
        _same(path, got[:, :, ~seen_by_3], want[:, :, ~seen_by_3])


@pytest.mark.parametrize("path", PATHS_NAN[1:])
def test_nan_patterns_agree_on_every_path(path, device, monkeypatch):
    q, k, v = _qkv(device, 24, 12, torch.float32, seed=3)
    q, v = q.clone(), v.clone()
    q[0, 1, 20, 0] = float("nan")
    v[1, 0, 7, 2] = float("nan")
    want = [torch.isnan(t) for t in run(PATHS[0], monkeypatch, q, k, v, True)]
    got = [torch.isnan(t) for t in run(path, monkeypatch, q, k, v, True)]
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        assert torch.equal(g, w), name


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("causal", [False, True])
def test_huge_scale_gives_finite_gradients(path, causal, device, monkeypatch):
    """scale=1e10 in float32: softmax is one-hot; a recomputed score or the lse's round trip through
    the natural log is off by hundreds there, and exp2 of it overflowed to inf in the kernel backward.
    dq and dk are scale x rounding noise at this scale (finite, not comparable across paths); out and
    dv are not, and match the float64 reference."""
    q, k, v = _qkv(device, 40, 40, torch.float32, seed=1)
    out, dq, dk, dv = run(path, monkeypatch, q, k, v, causal, scale=1e10)
    for t in (out, dq, dk, dv):
        assert torch.isfinite(t).all()
    want = run("reference", monkeypatch, q.double(), k.double(), v.double(), causal, scale=1e10)
    torch.testing.assert_close(out, want[0].float())
    torch.testing.assert_close(dv, want[3].float())
