"""The opt-in non-deterministic attention backward (``deterministic=False``): dQ computed inside the
dK/dV kernel and summed over key tiles with float32 atomic adds, then scaled and cast by a small
conversion kernel (kernels/flash_attention.py, ATOMIC_DQ). Without a GPU, tests/conftest.py sets
TRITON_INTERPRET=1, so the strict ``triton`` backend runs the real kernels, atomics included, on CPU.

Each case is held to the parity rule against the float64 oracle (fastgpt/testing.py) and compared
with the deterministic kernel: dk and dv are the same computation (bitwise equal), dq the same sums in
another order (equal within a rounding of the result). The compiled code (atomics in this variant
only, no spills, 5 matmuls to 7) is checked offline in tests/test_kernel_report.py.
"""

import math

import pytest
import torch

import fastgpt
from fastgpt.testing import attention_oracle, check_against_torch, check_attention_tight

pytest.importorskip("triton", reason="triton is not installed (it is a Linux-only dependency)")
from fastgpt.kernels import flash_attention as fa  # noqa: E402
import test_attention_varlen as tav  # noqa: E402
from test_attention_triton import Case, lse_oracle, make_qkv  # noqa: E402

ATOMIC_KERNELS = {"fwd", "bwd_preprocess", "bwd_dkdv_atomic", "bwd_dq_convert"}
DETERMINISTIC_KERNELS = {"fwd", "bwd_preprocess", "bwd_dkdv", "bwd_dq"}


@pytest.fixture
def launches(monkeypatch):
    """The LaunchPlans the flash-attention module runs, in order (the kernels still run)."""
    seen = []
    real = fa.launch

    def spy(plan):
        seen.append(plan)
        return real(plan)

    monkeypatch.setattr(fa, "launch", spy)
    monkeypatch.setenv("FASTGPT_AUTOTUNE", "0")  # on a GPU: the default configs (tuning is tested below)
    return seen


def _grads(case: Case, device, deterministic: bool, entry: str = "attention", seed: int = 0):
    """(out, dq, dk, dv) of one backward on the strict triton backend, inputs rounded to the case's dtype."""
    q, k, v = (t.detach().to(case.dtype).requires_grad_() for t in make_qkv(case, device, seed))
    dout = torch.randn(q.shape[0], q.shape[1], q.shape[2], v.shape[-1], generator=torch.Generator().manual_seed(seed + 1))
    dout = dout.to(device=device, dtype=case.dtype)
    with fastgpt.use_backend("triton", strict=True):
        if entry == "flash_attn_func":
            out = fastgpt.flash_attn_func(*(t.transpose(1, 2) for t in (q, k, v)), causal=case.causal,
                                          deterministic=deterministic).transpose(1, 2)
        else:
            out = fastgpt.attention(q, k, v, causal=case.causal, deterministic=deterministic)
        out.backward(dout)
    return out.detach(), q.grad, k.grad, v.grad


CASES = [
    # GQA 2:1, Sq < Sk, head dim 40 (masked columns in the atomic adds), several key tiles per query row
    (Case(sq=40, sk=75, d=40, heads=(4, 2), causal=True, dtype=torch.float16), "attention"),
    # MQA, Sq > Sk: the first 27 rows see no key (their dq rows get no atomic add at all); head dim 80
    (Case(sq=50, sk=23, d=80, heads=(4, 1), causal=True, dtype=torch.bfloat16, batch=1), "attention"),
    # not causal, float32 (exact dots: small slips show), Sq != Sk, ragged tiles in both lengths
    (Case(sq=33, sk=70, d=16, heads=(2, 2), causal=False, dtype=torch.float32), "attention"),
    # flash-attn's (B, S, H, D) layout: dq written through sequence-major strides by the conversion
    (Case(sq=37, sk=37, d=40, heads=(4, 2), causal=True, dtype=torch.float32, batch=1), "flash_attn_func"),
]


@pytest.mark.parametrize("case,entry", CASES, ids=lambda c: str(c))
def test_atomic_backward_meets_the_parity_rule_and_matches_the_deterministic_kernel(case, entry, device, launches):
    scale = 1.0 / math.sqrt(case.d)
    q, k, v = make_qkv(case, device, seed=3)
    if entry == "flash_attn_func":
        q, k, v = (t.detach().transpose(1, 2).contiguous().requires_grad_() for t in (q, k, v))
        fn = lambda q, k, v: fastgpt.flash_attn_func(q, k, v, causal=case.causal, deterministic=False)  # noqa: E731
        oracle = lambda q, k, v: attention_oracle(*(t.transpose(1, 2) for t in (q, k, v)), case.causal, scale).transpose(1, 2)  # noqa: E731
    else:
        fn = lambda q, k, v: fastgpt.attention(q, k, v, causal=case.causal, deterministic=False)  # noqa: E731
        oracle = lambda q, k, v: attention_oracle(q, k, v, case.causal, scale)  # noqa: E731
    with fastgpt.use_backend("triton", strict=True):
        check_against_torch(f"atomic {case}", fn, oracle, [q, k, v], case.dtype)
    assert {p.name for p in launches} == ATOMIC_KERNELS

    atomic = _grads(case, device, deterministic=False, entry=entry)
    exact = _grads(case, device, deterministic=True, entry=entry)
    assert_same_but_dq_order(atomic, exact, case.dtype)
    if case.sq > case.sk and case.causal:
        assert torch.all(atomic[1][:, :, : case.sq - case.sk] == 0), "rows that see no key get zero dq"


def assert_same_but_dq_order(atomic, exact, dtype) -> None:
    """(out, dq, dk, dv) of the atomic and the deterministic backward on the same inputs: out, dk and dv
    bitwise equal; dq the same float32 sums in another order, then one rounding to the dtype (to nearest
    here, and toward zero in the deterministic kernel's bfloat16 store under the interpreter): within two
    of its units in the last place, plus float32's reordering error for sums that cancel."""
    assert torch.equal(atomic[0], exact[0])  # the forward does not depend on the flag
    assert torch.equal(atomic[2], exact[2]) and torch.equal(atomic[3], exact[3]), "dk/dv must not change"
    dq_a, dq_d = atomic[1].float(), exact[1].float()
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(dq_a, dq_d, rtol=2 * eps, atol=1e-6 * dq_d.abs().max().item())


def _varlen_grads(case: "tav.Case", window, device, deterministic: bool):
    """(out, dq, dk, dv) of flash_attn_varlen_func on the strict triton backend, inputs rounded to the dtype."""
    q, k, v = (t.detach().to(case.dtype).requires_grad_() for t in tav.make_qkv(case, device, seed=7))
    dout = torch.randn(q.shape[0], q.shape[1], v.shape[-1], generator=torch.Generator().manual_seed(8))
    cu_q, cu_k = tav.cu_of(case.lens_q, device), tav.cu_of(case.lens_k, device)
    with fastgpt.use_backend("triton", strict=True):
        out = fastgpt.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(case.lens_q), max(case.lens_k), causal=case.causal,
                                             window_size=window, deterministic=deterministic)
        out.backward(dout.to(device=device, dtype=case.dtype))
    return out.detach(), q.grad, k.grad, v.grad


VARLEN_CASES = [
    # causal GQA 2:1, head dim 40, a left window; lengths 0 and 1, Sq != Sk per sequence, a sequence
    # longer than one query tile (the conversion's per-sequence tiles) and one with queries but no keys
    (tav.Case((5, 0, 1, 40, 3), (9, 0, 1, 33, 0), 40, (4, 2), True, torch.float16), (9, -1)),
    # not causal, MQA, bfloat16, a two-sided window
    (tav.Case((3, 20, 0, 7, 1), (9, 5, 4, 7, 1), 16, (4, 1), False, torch.bfloat16), (6, 3)),
    # causal without a window, float32 (exact dots: small slips show), Sq > Sk: rows that see no key
    (tav.Case((1, 37, 18), (1, 20, 30), 16, (2, 2), True, torch.float32), (-1, -1)),
]


@pytest.mark.parametrize("case,window", VARLEN_CASES, ids=lambda c: str(c))
def test_varlen_atomic_backward_meets_the_parity_rule_and_matches_the_deterministic_kernel(case, window, device, launches):
    """Packed sequences: the float32 dQ sums are (Hq, total_q, D) like the scratch rows, and the
    conversion kernel writes each sequence's rows into the packed dq."""
    tav.check_case(case, "triton", device, window=window, deterministic=False)
    assert {p.name for p in launches} == ATOMIC_KERNELS and all(p.constexprs["VARLEN"] for p in launches)
    atomic = _varlen_grads(case, window, device, deterministic=False)
    exact = _varlen_grads(case, window, device, deterministic=True)
    assert_same_but_dq_order(atomic, exact, case.dtype)
    start = 0
    for sq, sk in zip(case.lens_q, case.lens_k):  # rows that see no key (no atomic add): zero dq
        blind = sq if sk == 0 else (max(sq - sk, 0) if case.causal else 0)
        assert torch.all(atomic[1][start : start + blind] == 0)
        start += sq


def test_atomic_backward_meets_the_tight_16_bit_rule(device):
    """Float32 sums rounded once at the end: as tight as the deterministic kernel, over many key tiles."""
    case = Case(sq=16, sk=150, d=16, heads=(2, 1), causal=True, dtype=torch.float16, batch=1)
    q, k, v = make_qkv(case, device, seed=9)
    fn = lambda q, k, v: fastgpt.attention(q, k, v, causal=True, deterministic=False)  # noqa: E731
    with fastgpt.use_backend("triton", strict=True):
        check_attention_tight(f"atomic tight {case}", fn, q, k, v, True, 0.25, torch.float16)


def test_atomic_backward_with_the_lse_gradient(device, launches):
    """return_lse=True: the gradient flowing into lse (delta - dlse) reaches dq through the atomic path."""
    case = Case(sq=30, sk=45, d=16, heads=(4, 2), causal=True, dtype=torch.float32, batch=1)
    q, k, v = make_qkv(case, device, seed=5)
    with fastgpt.use_backend("triton", strict=True):
        check_against_torch("atomic lse", lambda q, k, v: fastgpt.attention(q, k, v, causal=True, scale=0.3, return_lse=True,
                                                                              deterministic=False),
                            lambda q, k, v: lse_oracle(q, k, v, True, 0.3), [q, k, v], torch.float32)
    assert {p.name for p in launches} == ATOMIC_KERNELS
    assert next(p for p in launches if p.name == "bwd_preprocess").constexprs["HAS_DLSE"] is True


def test_deterministic_true_is_the_default_and_bitwise_reproducible(device, launches):
    case = Case(sq=33, sk=50, d=40, heads=(4, 1), causal=True, dtype=torch.float16, batch=1)
    runs = [_grads(case, device, deterministic=True, seed=11) for _ in range(2)]
    default = _grads(case, device, deterministic=True, seed=11)
    for a, b, c in zip(*runs, default):
        assert torch.equal(a, b) and torch.equal(a, c)
    assert {p.name for p in launches} == DETERMINISTIC_KERNELS
    assert all(not p.constexprs.get("ATOMIC_DQ", False) for p in launches)


def test_tuning_runs_do_not_leak_into_dq(device, monkeypatch, launches):
    """On a GPU the first call of a shape class tunes the dK/dV kernel by running it several times;
    each run adds into the float32 dQ buffer, so the backward zeroes it after tuning. Stand-in for the
    tuner: a pick_config that runs the plan twice first (a GPU test runs the real one)."""
    real = fa.pick_config

    def tuning(plan):
        config = real(plan)
        for _ in range(2):
            plan.kernel[plan.grid(config)](**plan.kwargs(config))
        return config

    monkeypatch.setattr(fa, "pick_config", tuning)
    case = Case(sq=20, sk=40, d=16, heads=(2, 1), causal=False, dtype=torch.float32, batch=1)
    atomic, exact = _grads(case, device, deterministic=False), _grads(case, device, deterministic=True)
    torch.testing.assert_close(atomic[1], exact[1], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("entry", ["attention", "flash_attn_func"])
def test_deterministic_must_be_a_bool(entry, launches):
    q = torch.zeros(1, 2, 4, 16)
    fn = fastgpt.attention if entry == "attention" else fastgpt.flash_attn_func
    with pytest.raises(TypeError, match=f"fastgpt.{entry}: deterministic must be a bool; got str"):
        fn(q, q, q, deterministic="no")
    with pytest.raises(TypeError):
        fastgpt.flash_attn_func(q, q, q, 0.0, None, False, False, False)  # keyword-only: not flash-attn's position
    assert not launches


@pytest.mark.gpu
@pytest.mark.parametrize("case", [
    Case(sq=2048, sk=2048, d=128, heads=(8, 2), causal=True, dtype=torch.bfloat16, batch=2),
    Case(sq=1000, sk=3000, d=80, heads=(4, 1), causal=True, dtype=torch.float16, batch=2),
    Case(sq=4096, sk=4096, d=64, heads=(4, 4), causal=False, dtype=torch.bfloat16, batch=1),
], ids=str)
def test_gpu_atomic_backward_tuned(case, device, monkeypatch):
    """On a GPU, with the tuner on (its runs add into the dQ buffer before the real one)."""
    monkeypatch.setenv("FASTGPT_AUTOTUNE", "1")
    q, k, v = make_qkv(case, device)
    fn = lambda q, k, v: fastgpt.attention(q, k, v, causal=case.causal, deterministic=False)  # noqa: E731
    with fastgpt.use_backend("triton", strict=True):
        check_against_torch(f"atomic {case}", fn, lambda q, k, v: attention_oracle(q, k, v, case.causal, case.d ** -0.5),
                            [q, k, v], case.dtype)
