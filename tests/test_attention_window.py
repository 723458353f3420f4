"""Sliding windows, softcap and ALiBi in the Triton flash-attention kernels and the public API.

Without a GPU, tests/conftest.py runs the kernels in Triton's interpreter; every check forces
``use_backend("triton", strict=True)`` and is held to the parity rule (:func:`fastgpt.testing.check_against_torch`)
against the float64 :func:`fastgpt.testing.attention_oracle`, which spells out flash-attn's definitions
independently of fastgpt.reference: forward and all three gradients. The reference backend (the CPU
fallback) is held to the same rule. The kernels' tile bounds are checked against brute force, so a
kernel that visits tiles outside every row's window (correct but quadratic) fails too.
"""

import itertools
import math
import sys
from typing import NamedTuple, Optional, Tuple

import pytest
import torch

import fastgpt
from fastgpt.ops.attention import attention_flops
from fastgpt.testing import attention_oracle, check_against_torch

pytest.importorskip("triton", reason="triton is not installed (it is a Linux-only dependency)")
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from fastgpt.kernels import flash_attention as fa  # noqa: E402
from fastgpt.kernels import flash_attention_configs as fa_configs  # noqa: E402
from fastgpt.kernels import flash_attention_tiles as fa_tiles  # noqa: E402
from fastgpt.kernels.flash_attention_tiles import _window_key_range, _window_query_range  # noqa: E402,F401 (used in jit code)
from test_attention_triton import _default_config_on_gpu, launches  # noqa: E402,F401 (the suite's fixtures)


class Case(NamedTuple):
    sq: int
    sk: int
    heads: Tuple[int, int]
    dtype: torch.dtype
    causal: bool = False
    window: Tuple[int, int] = (-1, -1)
    softcap: float = 0.0
    alibi: Optional[str] = None  # "h": slopes (Hq,), "bh": (B, Hq)
    d: int = 16
    batch: int = 2
    q_scale: float = 1.0  # q's size: larger scores make the softcap bite

    def __str__(self) -> str:
        parts = [f"q{self.sq}-k{self.sk}-h{self.heads[0]}/{self.heads[1]}", str(self.dtype).replace("torch.", "")]
        if self.causal:
            parts.append("causal")
        if self.window != (-1, -1):
            parts.append(f"win{self.window[0]},{self.window[1]}")
        if self.softcap:
            parts.append(f"cap{self.softcap:g}")
        if self.alibi:
            parts.append(f"alibi-{self.alibi}")
        return "-".join(parts)


def _inputs(case: Case, device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hq, hk = case.heads
    shapes = [(case.batch, hq, case.sq, case.d), (case.batch, hk, case.sk, case.d), (case.batch, hk, case.sk, case.d)]
    q, k, v = (torch.randn(*s, generator=g) for s in shapes)
    q = q * case.q_scale
    slopes = None
    if case.alibi:  # BLOOM-like slopes 2^-(8h/H), and a batch that differs
        base = torch.tensor([2.0 ** (-8.0 * (h + 1) / hq) for h in range(hq)])
        slopes = base if case.alibi == "h" else base[None] * torch.linspace(1.0, 3.0, case.batch)[:, None]
        slopes = slopes.to(device)
    return [t.to(device).requires_grad_() for t in (q, k, v)], slopes


def _opts(case: Case, slopes):
    return {"window": case.window, "softcap": case.softcap, "alibi_slopes": slopes}


def check(case: Case, device, *, entry: str = "attention", backend: str = "triton", launches=None, seed: int = 0):
    """Parity of one case through one entry point, forward and gradients, on the strict ``backend``."""
    (q, k, v), slopes = _inputs(case, device, seed)
    scale = case.d ** -0.5
    opts = _opts(case, slopes)
    oracle = lambda q, k, v: attention_oracle(q, k, v, case.causal, scale, **opts)  # noqa: E731
    kw = {"window_size": case.window, "softcap": case.softcap, "alibi_slopes": slopes}
    if entry == "attention":
        fn = lambda q, k, v: fastgpt.attention(q, k, v, causal=case.causal, scale=scale, **kw)  # noqa: E731
        torch_fn = oracle
    else:  # flash_attn_func: (B, S, H, D) tensors, as its callers store them
        q, k, v = (t.detach().transpose(1, 2).contiguous().requires_grad_() for t in (q, k, v))
        fn = lambda q, k, v: fastgpt.flash_attn_func(q, k, v, softmax_scale=scale, causal=case.causal, **kw)  # noqa: E731
        torch_fn = lambda q, k, v: oracle(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)  # noqa: E731
    with fastgpt.use_backend(backend, strict=True):
        check_against_torch(str(case), fn, torch_fn, [q, k, v], case.dtype)
    if launches is not None and backend == "triton":
        fwd = next(p for p in launches if p.name == "fwd")
        return {name: fwd.constexprs[name] for name in ("IS_CAUSAL", "WINDOW", "SOFTCAP", "ALIBI")}
    return None


F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32

# (case, the kernels' feature constexprs it must switch on: IS_CAUSAL, WINDOW, SOFTCAP, ALIBI)
CASES = [
    # sliding windows: left only, right only, both, with causal; Sq != Sk both ways; GQA and MQA
    (Case(70, 70, (4, 2), F32, window=(9, -1), batch=1), (False, True, False, False)),
    (Case(40, 60, (2, 2), F16, window=(-1, 5)), (False, True, False, False)),
    (Case(60, 40, (4, 1), BF16, window=(6, 3)), (False, True, False, False)),  # rows 0..16 see no key
    (Case(100, 100, (4, 1), F32, causal=True, window=(17, -1), batch=1), (True, True, False, False)),
    (Case(30, 90, (2, 1), F16, causal=True, window=(20, 7)), (True, True, False, False)),  # causal: right = 0
    (Case(80, 30, (2, 2), F32, causal=True, window=(4, -1)), (True, True, False, False)),  # 50 rows see no key
    (Case(33, 33, (2, 1), F32, window=(0, 0)), (False, True, False, False)),  # one key per row
    # softcap (q scaled up so tanh saturates), ALiBi of both slope shapes
    (Case(50, 70, (4, 2), F32, softcap=5.0, q_scale=3.0, batch=1), (False, False, True, False)),
    (Case(64, 64, (2, 1), BF16, causal=True, softcap=20.0, q_scale=3.0), (True, False, True, False)),
    (Case(50, 50, (4, 2), F32, causal=True, alibi="h"), (True, False, False, True)),
    (Case(30, 70, (2, 2), F32, alibi="bh"), (False, False, False, True)),
    # all three together
    (Case(90, 90, (2, 1), F32, causal=True, window=(20, -1), softcap=8.0, alibi="bh", q_scale=2.0), (True, True, True, True)),
    (Case(45, 75, (2, 1), BF16, window=(8, 4), softcap=4.0, alibi="h", q_scale=2.0), (False, True, True, True)),
]


@pytest.mark.parametrize("case, features", CASES, ids=[str(c) for c, _ in CASES])
def test_kernel_matches_float64_oracle(case, features, device, launches):
    assert check(case, device, launches=launches) == dict(zip(("IS_CAUSAL", "WINDOW", "SOFTCAP", "ALIBI"), features))
    assert {p.name for p in launches} == {"fwd", "bwd_preprocess", "bwd_dkdv", "bwd_dq"}


# float16, not bfloat16: the interpreter rounds bfloat16 results toward zero (a GPU to nearest), which on
# this case's dq (|dq| ~ 4, few keys per row) alone costs 3x torch's round-to-nearest error
@pytest.mark.parametrize("case", [CASES[2][0]._replace(dtype=F16), CASES[11][0]], ids=str)
def test_flash_attn_func_takes_the_options(case, device, launches):
    check(case, device, entry="flash_attn_func", launches=launches)


@pytest.mark.parametrize("case", [CASES[1][0], CASES[5][0], CASES[11][0]], ids=str)
def test_reference_backend_implements_the_options(case, device):
    check(case, device, backend="reference")


def test_atomic_backward_takes_the_options(device, launches):
    """deterministic=False: dQ summed by atomics in the dK/dV kernel, through the softcap and the window."""
    case = Case(70, 50, (2, 1), F32, causal=True, window=(11, -1), softcap=6.0, alibi="bh", q_scale=2.0, batch=1)
    (q, k, v), slopes = _inputs(case, device)
    opts = {"window_size": case.window, "softcap": case.softcap, "alibi_slopes": slopes}
    with fastgpt.use_backend("triton", strict=True):
        check_against_torch(str(case), lambda q, k, v: fastgpt.attention(q, k, v, causal=True, deterministic=False, **opts),
                            lambda q, k, v: attention_oracle(q, k, v, True, 0.25, window=case.window, softcap=case.softcap,
                                                             alibi_slopes=slopes), [q, k, v], F32)
    dkdv = next(p for p in launches if p.name == "bwd_dkdv_atomic")
    assert all(dkdv.constexprs[f] for f in ("WINDOW", "SOFTCAP", "ALIBI", "ATOMIC_DQ"))


# packed sequences: lengths 0 and 1, Sq != Sk per sequence, slopes per sequence (B, Hq)
VARLEN = [((9, 0, 1, 40, 23), (30, 4, 1, 17, 23), True, (6, -1), 0.0, "bh"),
          ((33, 5, 20), (12, 5, 45), False, (4, 9), 5.0, "h")]


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("lens_q, lens_k, causal, window, softcap, alibi", VARLEN, ids=["causal-left-alibi", "both-softcap"])
def test_varlen_takes_the_options(lens_q, lens_k, causal, window, softcap, alibi, backend, device, launches):
    """flash_attn_varlen_func with window, softcap and ALiBi: each sequence against the oracle on its own."""
    cu = [torch.tensor([0] + list(itertools.accumulate(n)), dtype=torch.int32, device=device) for n in (lens_q, lens_k)]
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(sum(n), h, 16, generator=g).to(device).requires_grad_()
               for n, h in ((lens_q, 4), (lens_k, 2), (lens_k, 2)))
    slopes = torch.rand(len(lens_q), 4, generator=g) if alibi == "bh" else torch.rand(4, generator=g)
    slopes = slopes.to(device)

    def oracle(q, k, v):
        outs, q0, k0 = [], 0, 0
        for b, (sq, sk) in enumerate(zip(lens_q, lens_k)):
            qs, ks, vs = (t[a : a + n].transpose(0, 1)[None] for t, a, n in ((q, q0, sq), (k, k0, sk), (v, k0, sk)))
            sl = slopes[b : b + 1] if slopes.dim() == 2 else slopes
            outs.append(attention_oracle(qs, ks, vs, causal, 0.25, window=window, softcap=softcap, alibi_slopes=sl)[0]
                        .transpose(0, 1))
            q0, k0 = q0 + sq, k0 + sk
        return torch.cat(outs)

    def fn(q, k, v):
        return fastgpt.flash_attn_varlen_func(q, k, v, *cu, max(lens_q), max(lens_k), softmax_scale=0.25, causal=causal,
                                              window_size=window, softcap=softcap, alibi_slopes=slopes)

    with fastgpt.use_backend(backend, strict=True):
        check_against_torch(f"varlen {backend}", fn, oracle, [q, k, v], F32)
    if backend == "triton":
        fwd = next(p for p in launches if p.name == "fwd")
        assert fwd.constexprs["VARLEN"] and fwd.constexprs["ALIBI"] and fwd.constexprs["WINDOW"]


@pytest.mark.parametrize(
    "tiles",
    [
        {"fwd": fa.Config(16, 64, 4, 1), "bwd_dkdv": fa.Config(64, 16, 4, 1), "bwd_dq": fa.Config(16, 64, 4, 1)},
        {"fwd": fa.Config(64, 16, 4, 1), "bwd_dkdv": fa.Config(16, 64, 4, 1), "bwd_dq": fa.Config(64, 16, 4, 1)},
    ],
    ids=["q-tile-16-k-tile-64", "q-tile-64-k-tile-16"],
)
def test_window_tile_bounds_hold_for_other_tile_shapes(tiles, device, monkeypatch, launches):
    if device.type == "cuda":
        pytest.skip("the interpreter's tile shapes; on a GPU the real configs run")
    monkeypatch.setattr(fa_configs, "INTERPRETER_CONFIGS", tiles)
    check(Case(110, 90, (2, 1), F32, window=(21, 13), alibi="h", batch=1), device)
    assert {p.configs[0] for p in launches if p.name in tiles} == set(tiles.values())


def test_options_that_change_nothing_run_the_plain_kernels(device, launches):
    """A window wider than both lengths binds nowhere (WINDOW off); (-1, 0) without causal is the causal
    mask (the causal kernels, which skip the tiles above the diagonal)."""
    assert check(Case(40, 50, (2, 1), F32, window=(1000, 200)), device, launches=launches)["WINDOW"] is False
    launches.clear()
    assert check(Case(40, 50, (2, 1), F32, window=(-1, 0)), device, launches=launches) == {
        "IS_CAUSAL": True, "WINDOW": False, "SOFTCAP": False, "ALIBI": False}


def _lse_oracle(case, slopes, scale):
    """(out, lse) of the oracle's definitions, lse computed from the modified scores directly."""
    def fn(q, k, v):
        g = q.shape[1] // k.shape[1]
        s = torch.einsum("bhqd,bhkd->bhqk", q, k.repeat_interleave(g, 1)) * scale
        s = case.softcap * torch.tanh(s / case.softcap) if case.softcap else s
        i, j = torch.arange(case.sq)[:, None], torch.arange(case.sk)[None, :]
        rel = i + case.sk - case.sq - j
        if slopes is not None:
            s = s - (slopes.view(1, -1, 1, 1) if slopes.dim() == 1 else slopes[:, :, None, None]).to(s.dtype) * rel.abs()
        keep = (rel >= 0) & (rel <= case.window[0])  # the case below: causal, left window, every row sees a key
        lse = torch.logsumexp(s.masked_fill(~keep, float("-inf")), dim=-1)
        return attention_oracle(q, k, v, case.causal, scale, window=case.window, softcap=case.softcap,
                                alibi_slopes=slopes), lse.float() if q.dtype != torch.float64 else lse
    return fn


def test_lse_and_its_gradient_with_every_option(device):
    """return_lse=True with window, softcap and ALiBi: the lse is of the modified scores (flash-attn's
    documented bias, per-row constant included), and dlse reaches q and k through them."""
    case = Case(40, 40, (2, 1), F32, causal=True, window=(9, -1), softcap=6.0, alibi="bh", q_scale=2.0)
    (q, k, v), slopes = _inputs(case, device, seed=3)
    scale = case.d ** -0.5
    with fastgpt.use_backend("triton", strict=True):
        check_against_torch("lse", lambda q, k, v: fastgpt.attention(
            q, k, v, causal=True, scale=scale, return_lse=True, window_size=case.window, softcap=case.softcap,
            alibi_slopes=slopes), _lse_oracle(case, slopes.cpu(), scale), [q, k, v], F32)


def test_rows_outside_every_window_give_zeros_and_no_nan(device):
    case = Case(60, 40, (2, 1), F16, window=(6, 3), softcap=3.0, alibi="h", batch=1)
    (q, k, v), slopes = _inputs(case, device, seed=9)
    with fastgpt.use_backend("triton", strict=True):
        out, lse = fastgpt.attention(q, k, v, return_lse=True, window_size=(6, 3), softcap=3.0, alibi_slopes=slopes)
        (out.float().square().sum() + torch.where(torch.isfinite(lse), lse, 0.0).sum()).backward()
    empty = 60 - 40 - 3  # query i sees keys [i - 26, i - 17]
    assert torch.all(out[:, :, :empty] == 0) and torch.all(lse[:, :, :empty] == float("-inf"))
    assert torch.isfinite(lse[:, :, empty:]).all() and torch.all(q.grad[:, :, :empty] == 0)
    for t in (out, q.grad, k.grad, v.grad):
        assert not torch.isnan(t).any()


def test_the_sdpa_shortcut_is_not_taken_with_options(device, monkeypatch):
    """torch's SDPA knows no window, softcap or ALiBi: a call with any of them must not take it."""
    attn_op = sys.modules["fastgpt.ops.attention"]  # (fastgpt.ops.attention is also the function's name)

    def planted(*args, **kwargs):
        raise AssertionError("the torch SDPA shortcut ran")

    monkeypatch.setattr(attn_op, "_torch_sdpa_shortcut", planted)
    q = torch.randn(1, 2, 8, 16, device=device)
    for kw in ({"window_size": (2, -1)}, {"softcap": 5.0}, {"alibi_slopes": torch.ones(2, device=device)}):
        with fastgpt.use_backend("reference"):
            torch.testing.assert_close(fastgpt.attention(q, q, q, **kw), attention_oracle(
                q, q, q, False, 0.25, window=kw.get("window_size", (-1, -1)), softcap=kw.get("softcap", 0.0),
                alibi_slopes=kw.get("alibi_slopes")))
            fastgpt.flash_attn_func(q.transpose(1, 2), q.transpose(1, 2), q.transpose(1, 2), **kw)


@triton.jit
def _tanh_kernel(X, Y, N: tl.constexpr):
    offs = tl.arange(0, N)
    tl.store(Y + offs, fa_tiles._tanh(tl.load(X + offs)))


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's numpy on NaN
def test_softcap_tanh_is_accurate_to_a_few_ulp(device):
    """The kernels' tanh (exp2 and FMAs; libdevice's does not run in the interpreter) against float64."""
    x = torch.cat([torch.linspace(-40, 40, 4096 - 8), torch.tensor([0.0, 1e-30, -1e-20, 0.625, -0.625, 0.6249,
                                                                    float("inf"), -float("inf")])]).to(device)
    y = torch.empty_like(x)
    _tanh_kernel[(1,)](x, y, x.numel())
    ref = torch.tanh(x.double())
    ulp = (torch.nextafter(ref.float().abs(), torch.tensor(float("inf"), device=device)) - ref.float().abs()).double()
    assert float(((y.double() - ref).abs() / ulp).max()) <= 3.0
    assert y[-2:].tolist() == [1.0, -1.0]
    nan = torch.full((16,), float("nan"), device=device)
    _tanh_kernel[(1,)](nan, y[:16], 16)
    assert torch.isnan(y[:16]).all()


# --------------------------------------------------------------------------------------------
# the tile bounds: exactly the tiles some row's window reaches, and unmasked only where all rows see all
# --------------------------------------------------------------------------------------------


@triton.jit
def _bounds_kernel(Out, Sq, Sk, causal_offset, win_left, win_right, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   QUERY_TILES: tl.constexpr):
    t = tl.program_id(0)
    if QUERY_TILES:  # the forward / dQ kernels: key tiles of query tile t
        a, b, c, d = _window_key_range(t * BLOCK_M, Sk, causal_offset, win_left, win_right, BLOCK_M, BLOCK_N)
    else:  # the dK/dV kernel: query tiles of key tile t
        a, b, c, d = _window_query_range(t * BLOCK_N, Sq, causal_offset, win_left, win_right, BLOCK_M, BLOCK_N)
    tl.store(Out + 4 * t, a)
    tl.store(Out + 4 * t + 1, b)
    tl.store(Out + 4 * t + 2, c)
    tl.store(Out + 4 * t + 3, d)


def _sees(i: int, j: int, off: int, left: int, right: int, causal: bool) -> bool:
    rel = i + off - j
    return (not causal or rel >= 0) and (left < 0 or rel <= left) and (right < 0 or rel >= -right)


@pytest.mark.parametrize("sq, sk", [(100, 100), (37, 130), (130, 37)])
@pytest.mark.parametrize("window, causal", [((9, -1), True), ((0, 0), False), ((21, 5), False), ((-1, 12), False),
                                            ((40, -1), True)])
@pytest.mark.parametrize("bm, bn", [(32, 16), (16, 64)])
def test_tile_bounds_are_those_of_brute_force(sq, sk, window, causal, bm, bn):
    """Visited tiles are exactly those where some row sees some key, unmasked ones exactly those where
    every row sees every key (padding rows counted, as the kernels do): no tile outside the window."""
    if not fa.interpreter_active():
        pytest.skip("checks the bound helpers in the interpreter (the GPU runs the same code)")
    off = sk - sq
    left, right = window[0], (0 if causal else window[1])
    # what the launcher passes: unbounded sides as Sq + Sk
    kl, kr = (left if left >= 0 else sq + sk), (right if right >= 0 else sq + sk)
    for query_tiles in (True, False):
        n = -(-sq // bm) if query_tiles else -(-sk // bn)
        out = torch.zeros(4 * n, dtype=torch.int32)
        _bounds_kernel[(n,)](out, sq, sk, off, kl, kr, bm, bn, query_tiles)
        for t, (lo, full_lo, full, hi) in enumerate(out.view(n, 4).tolist()):
            assert lo <= full_lo <= full <= hi
            if query_tiles:  # query rows [t*bm, t*bm + bm) (padding rows included), tiles of bn real keys
                rows, step, limit = range(t * bm, t * bm + bm), bn, sk
                sees = lambda r, c: _sees(r, c, off, left, right, causal)  # noqa: E731
            else:  # keys [t*bn, t*bn + bn) (padding keys included), tiles of bm real query rows
                rows, step, limit = range(t * bn, t * bn + bn), bm, sq
                sees = lambda r, c: _sees(c, r, off, left, right, causal)  # noqa: E731
            starts = range(0, limit, step)
            wanted = [s for s in starts if any(sees(r, c) for r in rows for c in range(s, min(s + step, limit)))]
            visited = [s for s in starts if lo <= s < hi]
            assert visited == wanted, ("key tiles" if query_tiles else "query tiles", t, (lo, full_lo, full, hi), wanted)
            # unmasked: every row (padding included, as the kernels count them) sees every key of the tile
            # (key padding included for the dK/dV kernel; the forward's unmasked tiles end before Sk)
            whole = [s for s in wanted if all(sees(r, c) for r in rows for c in range(s, s + step))
                     and (not query_tiles or s + step <= sk)]
            assert list(range(full_lo, full, step)) == whole, (query_tiles, t, (lo, full_lo, full, hi), whole)


def test_flop_model_counts_the_window():
    """attention_flops with a window: 4*B*H*D per visible pair, so work ~ S x window, not S^2."""
    full = attention_flops(1, 1, 16384, 16384, 128, causal=True)
    win = attention_flops(1, 1, 16384, 16384, 128, causal=True, window=(4095, -1))
    assert win == 4.0 * 128 * (4096 * 16384 - 4095 * 4096 / 2)
    assert 0.43 < win / full < 0.45
    assert attention_flops(2, 3, 64, 64, 16, causal=False, window=(-1, -1)) == attention_flops(2, 3, 64, 64, 16, causal=False)
    assert attention_flops(1, 1, 10, 10, 1, causal=False, window=(0, 0), mode="bwd") == 2.5 * 4 * 10
    # twice the window, about twice the work
    w1, w2 = (attention_flops(1, 1, 1 << 15, 1 << 15, 64, causal=True, window=(w - 1, -1)) for w in (1024, 2048))
    assert 1.95 < w2 / w1 < 2.0


def test_inspect_models_windowed_work_in_proportion_to_the_window():
    """`fastgpt inspect`'s byte/FLOP model follows the kernels' window bounds: the 4096-key window over
    16k runs ~0.44x the causal useful FLOPs, and its tiles execute about that share too."""
    from fastgpt.tools.inspect import model as im
    from fastgpt.tools.inspect.gpus import GPUS

    case = next(c for c in im.ATTENTION_CASES if c["name"] == "mistral-window-16k")
    dense = {k: v for k, v in case.items() if k != "window"}
    useful = im._attention_work(case, "fwd")[1] / im._attention_work(dense, "fwd")[1]
    assert 0.43 < useful < 0.45
    for kernel, (bm, bn) in (("fwd", (128, 64)), ("bwd_dq", (128, 32)), ("bwd_dkdv", (16, 64))):
        rec = {"kernel": kernel, "config": {"block_m": bm, "block_n": bn, "num_warps": 8, "num_stages": 2},
               "block_d": 128, "block_dv": 128}
        executed = [im._attention_model(rec, c, resident=132, gpu=GPUS[0])["exec_flops"] for c in (case, dense)]
        assert useful < executed[0] / executed[1] < useful + 0.02, (kernel, executed)


# --------------------------------------------------------------------------------------------
# bad input: TypeError / ValueError naming the argument, before any launch
# --------------------------------------------------------------------------------------------

_Q = torch.randn(2, 4, 8, 16)


@pytest.mark.parametrize(
    "kwargs, exc, pattern",
    [
        ({"window_size": 4}, TypeError, "window_size must be a \\(left, right\\) pair"),
        ({"window_size": (1, 2, 3)}, TypeError, "window_size must be a \\(left, right\\) pair"),
        ({"window_size": (1.5, -1)}, TypeError, "window_size must hold two ints"),
        ({"window_size": (True, -1)}, TypeError, "window_size must hold two ints"),
        ({"window_size": (-2, 0)}, ValueError, "window_size values must be >= -1"),
        ({"window_size": (3, -5)}, ValueError, "window_size values must be >= -1"),
        ({"softcap": -1.0}, ValueError, "softcap must be finite and >= 0"),
        ({"softcap": float("inf")}, ValueError, "softcap must be finite and >= 0"),
        ({"softcap": float("nan")}, ValueError, "softcap must be finite and >= 0"),
        ({"softcap": "5"}, TypeError, "softcap must be a float"),
        ({"softcap": True}, TypeError, "softcap must be a float"),
        ({"alibi_slopes": [0.5] * 4}, TypeError, "alibi_slopes must be a torch.Tensor"),
        ({"alibi_slopes": torch.ones(4, dtype=torch.float16)}, TypeError, "alibi_slopes must be float32"),
        ({"alibi_slopes": torch.ones(3)}, ValueError, "alibi_slopes must have shape \\(Hq,\\) = \\(4,\\) or \\(B, Hq\\) = \\(2, 4\\)"),
        ({"alibi_slopes": torch.ones(1, 4)}, ValueError, "alibi_slopes must have shape"),
        ({"alibi_slopes": torch.ones(2, 4, 1)}, ValueError, "alibi_slopes must have shape"),
        ({"alibi_slopes": torch.ones(4, device="meta")}, ValueError, "alibi_slopes is on meta but q is on cpu"),
        ({"alibi_slopes": torch.ones(4, requires_grad=True)}, ValueError, "alibi_slopes requires grad"),
    ],
)
@pytest.mark.parametrize("entry", ["attention", "flash_attn_func"])
def test_bad_options_raise_before_any_launch(entry, kwargs, exc, pattern, launches):
    with fastgpt.use_backend("triton", strict=True), pytest.raises(exc, match=pattern):
        if entry == "attention":
            fastgpt.attention(_Q, _Q, _Q, **kwargs)
        else:
            t = _Q.transpose(1, 2)
            fastgpt.flash_attn_func(t, t, t, **kwargs)
    assert not launches


def test_dropout_with_options_is_refused_not_silently_dropped():
    t = _Q.transpose(1, 2)
    with pytest.raises(ValueError, match="dropout_p > 0 cannot be combined with window_size, softcap or alibi_slopes"):
        fastgpt.flash_attn_func(t, t, t, dropout_p=0.1, window_size=(4, 0))
    assert math.isfinite(float(fastgpt.flash_attn_func(t, t, t, window_size=(4, 0)).sum()))
