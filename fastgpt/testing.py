"""The numerical-parity rule every fastgpt test and benchmark uses (docs/design.md, 'Parity rule').

A kernel result ``out`` in dtype t is compared with ``ref``, the same computation in float64, and
with ``base``, the plain-torch result computed in dtype t::

    max|out - ref| <= 2 * max|base - ref| + atol_t      (forward)
    max|grad - ref| <= 3 * max|grad_base - ref| + atol_t (gradients)

so a kernel may be no worse than twice (three times for gradients) what PyTorch itself gets wrong in
the same precision; the small ``atol_t`` floor keeps exact-zero baselines from making it impossible.
"""

from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch
from torch import Tensor

ATOL = {
    torch.float16: 1e-3,
    torch.bfloat16: 1e-3,
    torch.float32: 1e-5,
    torch.float64: 1e-12,
}
FORWARD_FACTOR = 2.0
GRADIENT_FACTOR = 3.0


@dataclass(frozen=True)
class Parity:
    """One comparison: the kernel's error, the baseline's error and the bound they imply."""

    name: str
    error: float
    base_error: float
    bound: float

    @property
    def ok(self) -> bool:
        return self.error <= self.bound

    def __str__(self) -> str:
        verdict = "ok" if self.ok else "FAILS"
        return (
            f"{self.name}: max|out - ref64| = {self.error:.3e}, max|base - ref64| = {self.base_error:.3e}, "
            f"bound = {self.bound:.3e} ({verdict})"
        )


def _max_abs_diff(a: Tensor, b: Tensor) -> float:
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: {tuple(a.shape)} vs {tuple(b.shape)}")
    if a.numel() == 0:
        return 0.0
    a64, b64 = a.detach().to(torch.float64), b.detach().to(torch.float64)
    # equal infinities (a log-sum-exp of -inf for a row that sees no key) are agreement, not nan
    diff = torch.where(a64 == b64, torch.zeros((), dtype=torch.float64, device=a64.device), (a64 - b64).abs())
    # nan anywhere is an error, never a pass: nan compares false with every bound
    return float("nan") if torch.isnan(diff).any() else float(diff.max())


def parity(name: str, out: Tensor, ref: Tensor, base: Tensor, *, gradient: bool = False, atol: Optional[float] = None) -> Parity:
    """Measure ``out`` against the float64 ``ref`` with the bound set by ``base`` (same dtype as out)."""
    if atol is None:
        atol = ATOL[out.dtype]
    error = _max_abs_diff(out, ref)
    base_error = _max_abs_diff(base, ref)
    factor = GRADIENT_FACTOR if gradient else FORWARD_FACTOR
    return Parity(name, error, base_error, factor * base_error + atol)


def assert_parity(name: str, out: Tensor, ref: Tensor, base: Tensor, *, gradient: bool = False, atol: Optional[float] = None) -> Parity:
    """Raise AssertionError with every figure when the rule does not hold; return the Parity otherwise."""
    if out.dtype != base.dtype:
        raise AssertionError(f"{name}: out has dtype {out.dtype} but base has {base.dtype}; compare like with like")
    result = parity(name, out, ref, base, gradient=gradient, atol=atol)
    if not result.ok:
        raise AssertionError(str(result))
    return result


# --------------------------------------------------------------------------------------------
# running one case three ways: kernel in dtype t, plain torch in dtype t, plain torch in float64
# --------------------------------------------------------------------------------------------


def _as_tuple(x):
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def run_case(fn, inputs: Sequence[Tensor], upstream: Optional[Sequence[Optional[Tensor]]] = None, dtype: Optional[torch.dtype] = None):
    """Call ``fn`` on fresh leaf copies of ``inputs`` (cast to ``dtype`` when given), backprop ``upstream``.

    Returns (detached outputs, gradients of the inputs; None where an input needs no gradient).
    """
    xs = []
    for t in inputs:
        if isinstance(t, Tensor):
            leaf = t.detach().to(dtype) if dtype is not None else t.detach().clone()
            xs.append(leaf.requires_grad_(t.requires_grad))
        else:
            xs.append(t)
    outs = _as_tuple(fn(*xs))
    grads: List[Optional[Tensor]] = [None] * len(xs)
    if upstream is not None:
        pairs = [(o, u.to(o.dtype)) for o, u in zip(outs, upstream) if u is not None and o.requires_grad]
        if pairs:
            torch.autograd.backward([o for o, _ in pairs], [u for _, u in pairs])
            grads = [x.grad if isinstance(x, Tensor) else None for x in xs]
    return tuple(o.detach() for o in outs), grads


def check_against_torch(
    name: str,
    fn,
    torch_fn,
    inputs: Sequence[Tensor],
    dtype: torch.dtype,
    *,
    gradients: bool = True,
    seed: int = 0,
    ref_fn=None,
    grad_atol: Optional[float] = None,
) -> List[Parity]:
    """Assert the parity rule (docs/design.md, 'Parity rule') for ``fn`` against ``torch_fn``, forward and gradients.

    ``inputs`` (any floating dtype; ``requires_grad=True`` on those whose gradient is checked) are
    rounded to ``dtype`` once. ``fn`` and the baseline ``torch_fn`` run on the rounded values; the
    reference (``ref_fn`` or ``torch_fn``) runs on the *same rounded values* upcast to float64, as
    FlashAttention's tests do, so the bound measures each computation's own error rather than the
    rounding of its inputs, which all three share. A random upstream gradient per output, rounded
    to that output's dtype, is shared the same way. ``grad_atol`` replaces the gradients' floor
    ``atol_t`` (for inputs far from unit magnitude). Returns the Parity results (all passed).
    """
    ref_fn = ref_fn or torch_fn
    rounded = [t.detach().to(dtype).requires_grad_(t.requires_grad) if isinstance(t, Tensor) else t for t in inputs]
    outs, _ = run_case(fn, rounded)
    upstream = None
    if gradients:
        gen = torch.Generator().manual_seed(seed)
        upstream = [
            torch.randn(o.shape, generator=gen, dtype=torch.float64).to(device=o.device, dtype=o.dtype) if o.is_floating_point() else None
            for o in outs
        ]
    ref_outs, ref_grads = run_case(ref_fn, rounded, upstream, dtype=torch.float64)
    base_outs, base_grads = run_case(torch_fn, rounded, upstream)
    outs, grads = run_case(fn, rounded, upstream)
    if len(outs) != len(ref_outs):
        raise AssertionError(f"{name}: {len(outs)} outputs, the reference has {len(ref_outs)}")
    results = []
    for i, (o, b, r) in enumerate(zip(outs, base_outs, ref_outs)):
        if o.dtype != b.dtype or o.shape != b.shape:
            raise AssertionError(f"{name}: output {i} is {o.dtype} {tuple(o.shape)}, torch gives {b.dtype} {tuple(b.shape)}")
        results.append(assert_parity(f"{name} output {i}", o, r, b))
    if gradients:
        for i, (g, b, r) in enumerate(zip(grads, base_grads, ref_grads)):
            if r is None:
                continue
            if g is None:
                raise AssertionError(f"{name}: input {i} got no gradient, the reference has one")
            results.append(assert_parity(f"{name} grad of input {i}", g, r, b, gradient=True, atol=grad_atol))
    return results


def attention_oracle(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float, *, window=(-1, -1),
                     softcap: float = 0.0, alibi_slopes: Optional[Tensor] = None) -> Tensor:
    """Plain-torch attention in the inputs' own dtype, written independently of fastgpt.reference.

    einsum + softmax with an explicit bottom-right causal mask; GQA by repeat_interleave; rows that
    see no key are zero (with zero gradients). flash-attn's options, spelled out from its docstring:
    ``window`` (left, right): key j visible to query i iff i + Sk - Sq - left <= j <= i + Sk - Sq + right
    (-1: that side unbounded); ``softcap`` c > 0: scores c * tanh(score / c); ``alibi_slopes`` (Hq,) or
    (B, Hq): -slope * |i + Sk - Sq - j| added after the softcap (the slopes are cast to the scores'
    dtype). Differentiable by autograd: run in float64 it is the oracle, run in
    float16/bfloat16/float32 it is the "what plain torch gets wrong" baseline.
    """
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
    s = torch.einsum("bhqd,bhkd->bhqk", q, k) * scale
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    sq, sk = q.shape[2], k.shape[2]
    i = torch.arange(sq, device=q.device)[:, None]
    j = torch.arange(sk, device=q.device)[None, :]
    if alibi_slopes is not None:
        slopes = alibi_slopes.to(device=s.device, dtype=s.dtype)
        slopes = slopes.view(1, -1, 1, 1) if slopes.dim() == 1 else slopes.view(*slopes.shape, 1, 1)
        s = s - slopes * (i + (sk - sq) - j).abs().to(s.dtype)
    left, right = window
    if not causal and left < 0 and right < 0:
        return torch.einsum("bhqk,bhkd->bhqd", torch.softmax(s, dim=-1), v)
    mask = torch.ones(sq, sk, dtype=torch.bool, device=q.device)
    if causal:
        mask = mask & (j <= i + (sk - sq))
    if left >= 0:
        mask = mask & (j >= i + (sk - sq) - left)
    if right >= 0:
        mask = mask & (j <= i + (sk - sq) + right)
    has_key = mask.any(-1)[:, None]
    s = torch.where(mask, s, torch.tensor(float("-inf"), dtype=s.dtype, device=s.device))
    s = torch.where(has_key, s, torch.zeros((), dtype=s.dtype, device=s.device))
    p = torch.softmax(s, dim=-1) * has_key
    return torch.einsum("bhqk,bhkd->bhqd", p, v)


def reset_backend_state(monkeypatch) -> None:
    """For test fixtures: auto dispatch, strict off (FASTGPT_BACKEND / FASTGPT_STRICT unset through
    pytest's ``monkeypatch``), no fallback already reported, and no op's last choice recorded (so a
    test's ``last_choice`` check sees its own calls only)."""
    from fastgpt import backends

    monkeypatch.delenv("FASTGPT_BACKEND", raising=False)
    monkeypatch.delenv("FASTGPT_STRICT", raising=False)
    backends.reset_warnings()
    backends.reset_last_choices()


# --------------------------------------------------------------------------------------------
# the tight 16-bit rule for attention: float32 everywhere, rounded only where a kernel must round
# --------------------------------------------------------------------------------------------

TIGHT_FACTOR = 1.5


def _rounded(x: Tensor, dtype: torch.dtype, toward_zero: bool) -> Tensor:
    """float32 ``x`` rounded to ``dtype`` and back: to nearest, or toward zero if bfloat16 and ``toward_zero``."""
    if not toward_zero or dtype != torch.bfloat16:
        return x.to(dtype).float()
    return (x.contiguous().view(torch.int32) & -65536).view(torch.float32)


def attention_rounded_as_a_kernel_must(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float, dout: Tensor,
                                       *, bf16_toward_zero: bool = False):
    """(out, dq, dk, dv) of attention on 16-bit q, k, v computed in float32, rounding to q's dtype
    only where a tensor-core kernel has to: P (and dS) before they meet V, dO, K, Q in a 16-bit
    matmul, and the results at the end. GQA sums and everything else stay float32. The gap between
    this and the float64 oracle is the error a correct 16-bit kernel cannot avoid; the einsum
    baseline of :func:`check_against_torch` also rounds the scores and softmax, and is looser.
    ``bf16_toward_zero``: round float32 to bfloat16 toward zero, as triton's interpreter does
    (a GPU rounds to nearest), so the rule stays tight for the interpreter's bfloat16 runs."""
    rnd = lambda x: _rounded(x, q.dtype, bf16_toward_zero)  # noqa: E731
    dt, f = q.dtype, torch.float32
    b, hq, sq, _ = q.shape
    hk, sk = k.shape[1], k.shape[2]
    g = hq // hk
    qf, kf, vf, dof = q.float(), k.repeat_interleave(g, 1).float(), v.repeat_interleave(g, 1).float(), dout.float()
    s = torch.einsum("bhqd,bhkd->bhqk", qf, kf) * scale
    if causal:
        mask = torch.arange(sk, device=q.device)[None, :] <= torch.arange(sq, device=q.device)[:, None] + (sk - sq)
        s = s.masked_fill(~mask, float("-inf"))
    m = s.amax(-1, keepdim=True)
    m = torch.where(torch.isinf(m), torch.zeros((), dtype=f, device=q.device), m)  # rows that see no key
    p = torch.exp(s - m)
    l_sum = p.sum(-1, keepdim=True)
    l_sum = torch.where(l_sum == 0, torch.ones((), dtype=f, device=q.device), l_sum)
    out = rnd(torch.einsum("bhqk,bhkd->bhqd", rnd(p), vf) / l_sum)
    pn = p / l_sum
    dp = torch.einsum("bhqd,bhkd->bhqk", dof, vf)
    delta = (out * dof).sum(-1, keepdim=True)
    ds = rnd(pn * (dp - delta))
    dq = torch.einsum("bhqk,bhkd->bhqd", ds, kf) * scale
    dk = (torch.einsum("bhqk,bhqd->bhkd", ds, qf) * scale).view(b, hk, g, sk, -1).sum(2)
    dv = torch.einsum("bhqk,bhqd->bhkd", rnd(pn), dof).view(b, hk, g, sk, -1).sum(2)
    return tuple(rnd(x).to(dt) for x in (out, dq, dk, dv))


def check_attention_tight(name: str, fn, q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float,
                          dtype: torch.dtype, *, seed: int = 0, bf16_toward_zero: bool = False,
                          dout: Optional[Tensor] = None) -> List[Parity]:
    """The tight rule for a 16-bit attention ``fn(q, k, v) -> out``, forward and gradients:
    ``max|out - ref64| <= TIGHT_FACTOR * max|tight - ref64| + ulp/2`` where ``tight`` is
    :func:`attention_rounded_as_a_kernel_must` and ref64 the float64 :func:`attention_oracle`, all on
    ``q``, ``k``, ``v`` rounded to the 16-bit ``dtype`` once and the
    same upstream gradient (``dout``, or N(0, 1) drawn from ``seed``). The floor (half a unit in the last place of the
    reference's largest value) is the rounding of the result itself. ``bf16_toward_zero``: see
    :func:`attention_rounded_as_a_kernel_must`. Raises AssertionError."""
    dt = dtype
    if dt not in (torch.float16, torch.bfloat16):
        raise ValueError(f"check_attention_tight is for 16-bit dtypes, got {dt}")
    gen = torch.Generator().manual_seed(seed)
    qkv = [t.detach().to(dt) for t in (q, k, v)]
    hq, sq, dv_dim = q.shape[1], q.shape[2], v.shape[-1]
    if dout is None:
        dout = torch.randn(q.shape[0], hq, sq, dv_dim, generator=gen)
    dout = dout.detach().to(device=q.device, dtype=dt)
    tight = attention_rounded_as_a_kernel_must(*qkv, causal, scale, dout, bf16_toward_zero=bf16_toward_zero)
    leaves = lambda: [t.clone().requires_grad_() for t in qkv]  # noqa: E731
    (ref_out,), ref_grads = run_case(lambda q, k, v: attention_oracle(q, k, v, causal, scale), leaves(), [dout],
                                     dtype=torch.float64)
    outs, grads = run_case(fn, leaves(), [dout])
    results = []
    for label, got, want, base in zip(("output", "grad q", "grad k", "grad v"), (outs[0], *grads), (ref_out, *ref_grads), tight):
        if got is None:
            raise AssertionError(f"{name}: {label} missing")
        base_error = _max_abs_diff(base, want)
        bound = TIGHT_FACTOR * base_error + 1e-6  # the floor: for exact-zero gradients (one key per row)
        result = Parity(f"{name} {label} (tight 16-bit rule)", _max_abs_diff(got, want), base_error, bound)
        if not result.ok:
            raise AssertionError(str(result))
        results.append(result)
    return results


# --------------------------------------------------------------------------------------------
# memory: what an op allocates, recorded at the dispatcher (works on CPU and meta tensors)
# --------------------------------------------------------------------------------------------


def allocation_recorder():
    """A TorchDispatchMode that records every tensor allocated inside it: ``largest`` (bytes),
    ``largest_shape``, and ``peak`` (the most bytes alive at once, counting each new tensor from its
    creation until it is freed). Views and in-place/out= results allocate nothing and are not counted;
    tensors that existed before the mode (inputs, parameters) are not counted either. Use as
    ``with allocation_recorder() as rec: ...``."""
    import weakref

    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    class AllocationRecorder(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.largest, self.largest_shape, self.live, self.peak = 0, (), 0, 0

        def _free(self, nbytes: int) -> None:
            self.live -= nbytes

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if any(r.alias_info is not None for r in func._schema.returns):
                return out  # a view, or an in-place / out= result: no new memory
            for t in tree_leaves(out):
                if isinstance(t, Tensor):
                    nbytes = t.numel() * t.element_size()
                    if nbytes > self.largest:
                        self.largest, self.largest_shape = nbytes, tuple(t.shape)
                    self.live += nbytes
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(t, self._free, nbytes)
            return out

    return AllocationRecorder()
