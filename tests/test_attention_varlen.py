"""Packed-sequence attention (fastgpt.flash_attn_varlen_func and its packed forms) against the per-sequence oracle.

The oracle is :func:`fastgpt.testing.attention_oracle` run on each sequence and concatenated (written
independently of fastgpt.reference), and the parity rule (docs/design.md, 'Parity rule') compares
forward, log-sum-exp and all three gradients. Every case runs on the reference backend and, forced
strict, on the ``triton`` kernels (under TRITON_INTERPRET=1 on a CPU: the real kernel code).
Lengths include 0 and 1, Sq != Sk per sequence, GQA, causal and not, head dims 16/40/80.
"""

import math
from typing import List, NamedTuple, Optional, Sequence, Tuple

import pytest
import torch

import fastgpt
from fastgpt import backends
from fastgpt.testing import attention_oracle, check_against_torch

pytest.importorskip("triton", reason="triton is not installed (it is a Linux-only dependency)")
from test_attention_triton import _default_config_on_gpu, launches  # noqa: E402, F401  (fixtures: default configs
# on a GPU, every LaunchPlan run)

BACKENDS = ("reference", "triton")


def cu_of(lengths: Sequence[int], device=None) -> torch.Tensor:
    out = [0]
    for n in lengths:
        out.append(out[-1] + n)
    return torch.tensor(out, dtype=torch.int32, device=device)


class Case(NamedTuple):
    lens_q: Tuple[int, ...]
    lens_k: Tuple[int, ...]
    d: int
    heads: Tuple[int, int]
    causal: bool
    dtype: torch.dtype
    dv: Optional[int] = None

    def __str__(self) -> str:
        return (f"q{'-'.join(map(str, self.lens_q))}_k{'-'.join(map(str, self.lens_k))}-d{self.d}"
                f"{'' if self.dv is None else f'/dv{self.dv}'}-h{self.heads[0]}/{self.heads[1]}-"
                f"{'causal' if self.causal else 'full'}-{str(self.dtype).replace('torch.', '')}")


def make_qkv(case: Case, device, seed: int = 0) -> List[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    hq, hk = case.heads
    tq, tk = sum(case.lens_q), sum(case.lens_k)
    dv = case.dv or case.d
    shapes = [(tq, hq, case.d), (tk, hk, case.d), (tk, hk, dv)]
    return [torch.randn(*s, generator=g).to(device).requires_grad_() for s in shapes]


def packed_oracle(lens_q: Sequence[int], lens_k: Sequence[int], causal: bool, scale: float, with_lse: bool = False,
                  window: Tuple[int, int] = (-1, -1)):
    """(q, k, v) packed -> out (and lse (Hq, Tq); not with a window): attention_oracle per sequence, concatenated."""

    def fn(q, k, v):
        outs, lses, q0, k0 = [], [], 0, 0
        for sq, sk in zip(lens_q, lens_k):
            qs, ks, vs = (t[a : a + n].transpose(0, 1)[None] for t, a, n in ((q, q0, sq), (k, k0, sk), (v, k0, sk)))
            outs.append(attention_oracle(qs, ks, vs, causal, scale, window=window)[0].transpose(0, 1))
            if with_lse:
                lses.append(_lse(qs, ks, causal, scale)[0])
            q0, k0 = q0 + sq, k0 + sk
        out = torch.cat(outs)
        return (out, torch.cat(lses, dim=1)) if with_lse else out

    return fn


def _lse(q, k, causal, scale):
    """Natural-log log-sum-exp of the scaled scores in float32 (float64 for float64), -inf with no key."""
    cd = torch.float64 if q.dtype == torch.float64 else torch.float32
    g = q.shape[1] // k.shape[1]
    s = torch.einsum("bhqd,bhkd->bhqk", q.to(cd), k.repeat_interleave(g, dim=1).to(cd)) * scale
    sq, sk = q.shape[2], k.shape[2]
    mask = torch.ones(sq, sk, dtype=torch.bool, device=q.device)
    if causal:
        mask = torch.arange(sk, device=q.device)[None, :] <= torch.arange(sq, device=q.device)[:, None] + (sk - sq)
    has_key = mask.any(-1)
    s = torch.where(mask, s, torch.tensor(float("-inf"), dtype=cd, device=s.device))
    s = torch.where(has_key[:, None], s, torch.zeros((), dtype=cd, device=s.device))
    return torch.logsumexp(s, dim=-1).masked_fill(~has_key, float("-inf"))


def check_case(case: Case, backend: str, device, with_lse: bool = False, scale: Optional[float] = None,
               window: Tuple[int, int] = (-1, -1), deterministic: bool = True):
    q, k, v = make_qkv(case, device)
    scale = scale if scale is not None else 1.0 / math.sqrt(case.d)
    cu_q, cu_k = cu_of(case.lens_q, device), cu_of(case.lens_k, device)
    max_q, max_k = max(case.lens_q, default=0), max(case.lens_k, default=0)

    def fn(q, k, v):
        return fastgpt.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale=scale,
                                              causal=case.causal, return_attn_probs=with_lse, window_size=window,
                                              deterministic=deterministic)

    with fastgpt.use_backend(backend, strict=True):
        check_against_torch(str(case), fn, packed_oracle(case.lens_q, case.lens_k, case.causal, scale, with_lse, window),
                            [q, k, v], case.dtype)


# ragged lengths with 0 and 1, Sq != Sk per sequence, GQA, causal and not, head dims 16/40/80, each dtype
CASES = [
    Case((5, 0, 1, 17, 33), (5, 0, 1, 17, 33), 16, (4, 2), True, torch.float32),
    Case((5, 0, 1, 17, 33), (5, 0, 1, 17, 33), 16, (4, 2), False, torch.float32),
    Case((3, 20, 0, 7, 1), (9, 5, 4, 7, 0), 40, (2, 2), True, torch.bfloat16),
    Case((1, 30, 17), (20, 1, 17), 80, (4, 1), False, torch.float16),
    Case((18, 2), (3, 33), 16, (2, 1), True, torch.float32, dv=24),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_varlen_matches_per_sequence_oracle(case, backend, device, launches):
    check_case(case, backend, device)
    if backend == "triton":  # one launch per pass for the whole batch, on the packed tensors
        names = [p.name for p in launches]
        assert names == ["fwd", "fwd", "bwd_preprocess", "bwd_dkdv", "bwd_dq"], names  # the check runs fn twice
        assert all(p.constexprs["VARLEN"] for p in launches)


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [True, False])
def test_gpu_realistic_lengths(causal, device):
    """On a GPU: bf16, d=128, GQA 4:1, a ragged batch with long sequences, the default tile configs."""
    check_case(Case((1000, 0, 1, 2047, 513), (1000, 0, 1, 2047, 700), 128, (8, 2), causal, torch.bfloat16), "triton", device)


@pytest.mark.parametrize("backend", BACKENDS)
def test_varlen_lse_and_its_gradient(backend, device):
    """return_attn_probs: (out, lse (Hq, total_q) float32), lse -inf for rows that see no key, and the
    gradient flowing into lse reaches q and k."""
    check_case(Case((7, 1, 0, 19), (3, 4, 2, 25), 16, (4, 2), True, torch.float32), backend, device, with_lse=True, scale=0.3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_qkv_and_kv_forms_read_views(backend, device):
    """qkv (T, 3, H, D) and kv (T, 2, Hk, D): strided views, no copies; the gradients land in the packed tensor."""
    lens = (9, 0, 17, 1)
    cu, t = cu_of(lens, device), sum(lens)
    g = torch.Generator().manual_seed(3)
    qkv = torch.randn(t, 3, 2, 16, generator=g).to(device).requires_grad_()
    q_only = torch.randn(t, 4, 16, generator=g).to(device).requires_grad_()
    kv = torch.randn(t, 2, 2, 16, generator=g).to(device).requires_grad_()
    oracle = packed_oracle(lens, lens, True, 0.25)
    with fastgpt.use_backend(backend, strict=True):
        check_against_torch("qkvpacked", lambda x: fastgpt.flash_attn_varlen_qkvpacked_func(x, cu, 17, softmax_scale=0.25, causal=True),
                            lambda x: oracle(*x.unbind(1)), [qkv], torch.float32)
        check_against_torch("kvpacked", lambda q, x: fastgpt.flash_attn_varlen_kvpacked_func(q, x, cu, cu, 17, 17, softmax_scale=0.25,
                                                                                            causal=True),
                            lambda q, x: oracle(q, *x.unbind(1)), [q_only, kv], torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_cu_seqlens_and_a_generous_max_seqlen(backend, device):
    """cu_seqlens as a strided view (every other element of a longer tensor) and max_seqlen above the
    longest sequence: the same result as contiguous, exact lengths."""
    lens = (7, 0, 20, 1)
    cu = cu_of(lens, device)
    strided = torch.stack([cu, torch.full_like(cu, -5)], dim=1).reshape(-1)[::2]
    assert not strided.is_contiguous() and torch.equal(strided, cu)
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(28, 2, 16, generator=g).to(device) for _ in range(3))
    with fastgpt.use_backend(backend, strict=True):
        want = fastgpt.flash_attn_varlen_func(q, k, v, cu, cu, 20, 20, causal=True)
        got = fastgpt.flash_attn_varlen_func(q, k, v, strided, strided, 45, 33, causal=True)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batches(backend, device):
    """No sequence (cu = [0]) and only empty sequences: empty or zero outputs, -inf lse, zero gradients."""
    q, k, v = (torch.randn(0, 2, 16, device=device, requires_grad=True) for _ in range(3))
    with fastgpt.use_backend(backend, strict=True):
        out, lse = fastgpt.flash_attn_varlen_func(q, k, v, cu_of([], device), cu_of([], device), 0, 0, return_attn_probs=True)
        assert out.shape == (0, 2, 16) and lse.shape == (2, 0)
        q = torch.randn(3, 2, 16, device=device, requires_grad=True)
        out, lse = fastgpt.flash_attn_varlen_func(q, k, v, cu_of([3, 0], device), cu_of([0, 0], device), 3, 0,
                                                  causal=True, return_attn_probs=True)
        out.sum().backward()
    assert torch.equal(out, torch.zeros_like(out)) and bool((lse == float("-inf")).all())
    assert torch.equal(q.grad, torch.zeros_like(q))


def test_dropout_runs_torch_sdpa_per_sequence_with_one_warning(device):
    lens = (5, 0, 9)
    cu = cu_of(lens, device)
    q, k, v = (torch.randn(14, 2, 16, device=device) for _ in range(3))
    with fastgpt.use_backend("triton"), pytest.warns(backends.FallbackWarning, match="dropout_p > 0") as record:
        out = fastgpt.flash_attn_varlen_func(q, k, v, cu, cu, 9, 9, dropout_p=0.5, causal=True)
        fastgpt.flash_attn_varlen_func(q, k, v, cu, cu, 9, 9, dropout_p=0.5)
    assert sum("dropout_p" in str(w.message) for w in record) == 1
    assert out.shape == (14, 2, 16) and torch.isfinite(out).all()
    with fastgpt.use_backend("triton", strict=True), pytest.raises(backends.BackendUnavailableError, match="dropout_p"):
        fastgpt.flash_attn_varlen_func(q, k, v, cu, cu, 9, 9, dropout_p=0.5)
    with pytest.raises(ValueError, match="return_attn_probs"):
        fastgpt.flash_attn_varlen_func(q, k, v, cu, cu, 9, 9, dropout_p=0.5, return_attn_probs=True)


# --------------------------------------------------------------------------------------------
# bad input: a ValueError/TypeError naming the argument, before anything runs
# --------------------------------------------------------------------------------------------


def _good(device):
    lens = (3, 0, 5)
    q, k, v = (torch.randn(8, 2, 16, device=device) for _ in range(3))
    return dict(q=q, k=k, v=v, cu_seqlens_q=cu_of(lens, device), cu_seqlens_k=cu_of(lens, device), max_seqlen_q=5, max_seqlen_k=5)


def _i32(values, device):
    return torch.tensor(values, dtype=torch.int32, device=device)


BAD = {
    "cu_seqlens_q int64": (lambda a, dev: {"cu_seqlens_q": a["cu_seqlens_q"].long()}, ValueError, "cu_seqlens_q must be an int32"),
    "cu_seqlens_k a list": (lambda a, dev: {"cu_seqlens_k": [0, 3, 3, 8]}, TypeError, "cu_seqlens_k must be a torch.Tensor"),
    "cu_seqlens_q 2-D": (lambda a, dev: {"cu_seqlens_q": a["cu_seqlens_q"][None]}, ValueError, "cu_seqlens_q must be 1-D"),
    "cu_seqlens_q empty": (lambda a, dev: {"cu_seqlens_q": _i32([], dev)}, ValueError, "cu_seqlens_q must be 1-D of length B"),
    "cu_seqlens_q not from 0": (lambda a, dev: {"cu_seqlens_q": _i32([1, 3, 3, 8], dev)}, ValueError, "cu_seqlens_q must start at 0"),
    "cu_seqlens_k decreasing": (lambda a, dev: {"cu_seqlens_k": _i32([0, 6, 3, 8], dev)}, ValueError, "cu_seqlens_k must be non-decreasing"),
    "cu_seqlens_q short of the tokens": (lambda a, dev: {"cu_seqlens_q": _i32([0, 3, 3, 7], dev)}, ValueError,
                                         "cu_seqlens_q must end at the number of tokens, 8; got 7"),
    "cu_seqlens_k past the tokens": (lambda a, dev: {"cu_seqlens_k": _i32([0, 3, 3, 9], dev)}, ValueError,
                                     "cu_seqlens_k must end at the number of tokens, 8; got 9"),
    "batch sizes differ": (lambda a, dev: {"cu_seqlens_k": _i32([0, 4, 8], dev)}, ValueError, "cu_seqlens_k describes 2 sequences"),
    "max_seqlen_q too small": (lambda a, dev: {"max_seqlen_q": 4}, ValueError, "max_seqlen_q=4 is smaller than the longest"),
    "max_seqlen_k too small": (lambda a, dev: {"max_seqlen_k": 0}, ValueError, "max_seqlen_k=0 is smaller than the longest"),
    "max_seqlen_q negative": (lambda a, dev: {"max_seqlen_q": -1}, ValueError, "max_seqlen_q must be >= 0"),
    "max_seqlen_k a float": (lambda a, dev: {"max_seqlen_k": 5.0}, TypeError, "max_seqlen_k must be an int"),
    "q 4-D": (lambda a, dev: {"q": a["q"][None]}, ValueError, "q must be 3-D"),
    "k int": (lambda a, dev: {"k": a["k"].long()}, TypeError, "k must have a floating dtype"),
    "v other dtype": (lambda a, dev: {"v": a["v"].double()}, TypeError, "v has dtype torch.float64"),
    "k other head dim": (lambda a, dev: {"k": a["k"][..., :8]}, ValueError, "k must have q's head dim"),
    "v other length": (lambda a, dev: {"v": a["v"][:7]}, ValueError, "v must have k's heads and length"),
    "heads not a multiple": (lambda a, dev: {"q": torch.randn(8, 3, 16, device=dev)}, ValueError, "must be a multiple of the k/v heads"),
    "window below -1": (lambda a, dev: {"window_size": (-2, 4)}, ValueError, "window_size values must be >= -1"),
    "window not a pair": (lambda a, dev: {"window_size": 4}, TypeError, "window_size must be a \\(left, right\\) pair"),
    "softcap negative": (lambda a, dev: {"softcap": -1.0}, ValueError, "softcap must be finite and >= 0"),
    "softcap inf": (lambda a, dev: {"softcap": float("inf")}, ValueError, "softcap must be finite and >= 0"),
    "alibi wrong shape": (lambda a, dev: {"alibi_slopes": torch.ones(3, device=dev)}, ValueError,
                          "alibi_slopes must have shape \\(Hq,\\) = \\(2,\\) or \\(B, Hq\\) = \\(3, 2\\)"),
    "alibi wrong dtype": (lambda a, dev: {"alibi_slopes": torch.ones(2, device=dev, dtype=torch.float16)}, TypeError,
                          "alibi_slopes must be float32"),
    "dropout out of range": (lambda a, dev: {"dropout_p": 1.0}, ValueError, "dropout_p must be a float in"),
    "deterministic not a bool": (lambda a, dev: {"deterministic": "yes"}, TypeError, "deterministic must be a bool"),
    "dropout with a window": (lambda a, dev: {"dropout_p": 0.1, "window_size": (4, 0)}, ValueError,
                              "dropout_p > 0 cannot be combined with window_size"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_names_the_argument(name, device, monkeypatch):
    change, exc, match = BAD[name]
    args = _good(device)
    args.update(change(args, device))
    ran = []
    monkeypatch.setattr("fastgpt.ops.varlen_attention._varlen", lambda *a: ran.append(a))
    with pytest.raises(exc, match=match):
        fastgpt.flash_attn_varlen_func(**args)
    assert not ran


def test_cu_seqlens_are_read_again_after_an_in_place_change(device):
    args = _good(device)
    fastgpt.flash_attn_varlen_func(**args)
    args["cu_seqlens_q"][-1] = 7  # the validated values are cached per tensor version, not per object
    with pytest.raises(ValueError, match="cu_seqlens_q must end at the number of tokens"):
        fastgpt.flash_attn_varlen_func(**args)


def test_packed_forms_check_their_layout():
    with pytest.raises(ValueError, match="qkv must be \\(total, 3, H, D\\)"):
        fastgpt.flash_attn_varlen_qkvpacked_func(torch.randn(4, 2, 2, 16), cu_of([4]), 4)
    with pytest.raises(ValueError, match="kv must be 4-D"):
        fastgpt.flash_attn_varlen_kvpacked_func(torch.randn(4, 2, 16), torch.randn(4, 2, 16), cu_of([4]), cu_of([4]), 4, 4)


# --------------------------------------------------------------------------------------------
# torch.compile and the custom op's registration
# --------------------------------------------------------------------------------------------


def test_custom_op_passes_opcheck():
    opcheck = getattr(torch.library, "opcheck", None)
    if opcheck is None:
        pytest.skip("torch.library.opcheck needs torch >= 2.4")
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(*s, generator=g, requires_grad=True) for s in ((9, 4, 8), (11, 2, 8), (11, 2, 8)))
    cu_q, cu_k = cu_of([4, 0, 5]), cu_of([6, 2, 3])
    with fastgpt.use_backend("reference"):
        for causal in (True, False):
            for extra in ((), (False,)):  # deterministic=False: a custom-op argument, handed to the backward
                opcheck(torch.ops.fastgpt.varlen_attention_fwd.default, (q, k, v, cu_q, cu_k, 5, 6, causal, 0.3, *extra),
                        test_utils=("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_static"))


@pytest.mark.slow
def test_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    lens = (5, 0, 9, 1)
    cu = cu_of(lens)

    def f(q, k, v):
        out, lse = fastgpt.flash_attn_varlen_func(q, k, v, cu, cu, 9, 9, causal=True, return_attn_probs=True)
        return out.square().sum() + lse.sum()

    def inputs():
        g = torch.Generator().manual_seed(0)
        return [torch.randn(15, h, 16, generator=g, requires_grad=True) for h in (4, 2, 2)]

    eager_in, compiled_in = inputs(), inputs()
    eager = f(*eager_in)
    eager.backward()
    out = torch.compile(f, fullgraph=True, dynamic=False)(*compiled_in)
    out.backward()
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-4)
    for a, b in zip(compiled_in, eager_in):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-5)
