"""The attention tests cannot pass vacuously: Triton kernels with planted bugs fail them.

Each mutation edits the source text of the flash-attention kernels (``kernels/flash_attention.py``
and the two modules of its @triton.jit code) in one place (its pattern must occur exactly once in
them, so a refactor of the kernel breaks this test loudly instead of silently testing nothing), loads
the edited copies as separate modules, routes the ``triton`` backend to them, and runs
one focused check; the check must fail. The same checks pass on an unedited copy loaded the same
way, so each failure is the bug's doing. The checks are the suite's own (``CHECKS``): the parity rule
(:func:`fastgpt.testing.check_against_torch`), the tight 16-bit rule
(:func:`fastgpt.testing.check_attention_tight`), the log-sum-exp check, the extreme-score checks
of tests/test_numeric_edges.py. Shapes are the smallest that reach the planted line with the
interpreter's tiles (forward and dQ: 32 queries x 16 keys; dK/dV: 16 queries x 32 keys).

Runs under the interpreter (the CPU CI); on a GPU every mutant would be a fresh compile of four
kernels (minutes of device time), so there the tests skip with that reason.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

import fastgpt
import fastgpt.kernels
from fastgpt.testing import attention_oracle, check_against_torch, check_attention_tight

pytest.importorskip("triton", reason="triton is not installed (it is a Linux-only dependency)")
from fastgpt.kernels import flash_attention as fa  # noqa: E402
from fastgpt.kernels._triton_utils import interpreter_active  # noqa: E402

# the modules a mutant is loaded from, in import order (each imports the ones before it)
SOURCES = {stem: Path(fa.__file__).with_name(f"{stem}.py")
           for stem in ("flash_attention_tiles", "flash_attention_kernels", "flash_attention")}
pytestmark = pytest.mark.skipif(not interpreter_active(), reason="mutants run under TRITON_INTERPRET=1 (on a GPU each "
                                "would be a fresh compile of four kernels: minutes of device time)")

# name: (pattern, replacement, check). Patterns are short and name one line of one kernel; where a
# line is shared by the forward and dQ kernels, the neighbouring text picks one.
MUTATIONS = {
    # causal tile bounds
    "fwd: masked key loop stops one tile early": (
        "offs_dv, lo, hi, Sk, causal_offset, qk_scale, IS_CAUSAL, True",
        "offs_dv, lo, hi - BLOCK_N, Sk, causal_offset, qk_scale, IS_CAUSAL, True", "causal"),
    "fwd: causal diagonal off by one (< for <=)": (
        "<= offs_m[:, None] + causal_offset)\n            s = tl.where",
        "< offs_m[:, None] + causal_offset)\n            s = tl.where", "causal"),
    "dkdv: first query tile one tile late": (
        "m_lo = tl.maximum(n0 - causal_offset, 0) // BLOCK_M * BLOCK_M",
        "m_lo = tl.maximum(n0 - causal_offset, 0) // BLOCK_M * BLOCK_M + BLOCK_M", "causal"),
    "dkdv: unmasked query tiles start one tile early": (
        "m_full = tl.minimum(tl.maximum(m_full, m_lo), Sq)",
        "m_full = tl.minimum(tl.maximum(m_full - BLOCK_M, m_lo), Sq)", "causal"),
    "dkdv: causal diagonal off by one (< for <=)": (
        "tl.where(offs_n[:, None] <= offs_m[None, :] + causal_offset, p_t",
        "tl.where(offs_n[:, None] < offs_m[None, :] + causal_offset, p_t", "causal"),
    "dq: masked key loop stops one tile early": (
        "lo, hi, Sk, causal_offset, qk_scale, IS_CAUSAL, True,\n                   HEAD_DIM",
        "lo, hi - BLOCK_N, Sk, causal_offset, qk_scale, IS_CAUSAL, True,\n                   HEAD_DIM", "causal"),
    # ragged-tile masks
    "fwd: key-bound mask of the ragged tile dropped": (
        "if MASKED:\n            keep = offs_n[None, :] < Sk", "if MASKED:\n            keep = offs_n[None, :] < Sk + BLOCK_N",
        "ragged"),
    # (The dQ kernel's key-bound mask is no longer a live mutant: since P is clamped at 1 (issue 17) a padded
    # key's P is finite, and its dS meets K's zero-filled padding rows in dS @ K, so dropping the mask
    # changes no result. It stays in the kernel as a guard; the forward's and dK/dV's masks are tested. Its
    # check, scores of -300, left with it: tests/test_numeric_edges.py runs that case on the real kernel.)
    "fwd: rows that saw no key subtract -inf (nan)": (
        "m_sub = tl.where(m_new == float(\"-inf\"), 0.0, m_new)", "m_sub = m_new", "causal"),
    # the GQA mapping (interleaved instead of grouped)
    "fwd: kv head of V interleaved": (
        "v_base = _head_ptr(V, bk, svb, hk, svh, ALIGN)\n    q = _load_tile",
        "v_base = _head_ptr(V, bk, svb, h % (Hq // GROUP), svh, ALIGN)\n    q = _load_tile", "gqa"),
    "dkdv: query heads of the group interleaved": ("h = hk * GROUP + g", "h = g * Hk + hk", "gqa"),
    "dq: kv head of V interleaved": (
        "v_base = _head_ptr(V, bk, svb, hk, svh, ALIGN)\n\n",
        "v_base = _head_ptr(V, bk, svb, h % (Hq // GROUP), svh, ALIGN)\n\n", "gqa"),
    # scales
    "fwd: exp instead of exp2 (log2(e) lost)": (
        "p = tl.math.exp2(s - m_sub[:, None])", "p = tl.math.exp(s - m_sub[:, None])", "ragged"),
    "fwd: lse left in the log2 domain": ("tl.math.log2(l_safe)) * 0.6931471805599453", "tl.math.log2(l_safe))", "lse"),
    "dkdv: dK not scaled": ("sdkh, ALIGN), dk * scale,", "sdkh, ALIGN), dk,", "gqa"),
    "dq: dQ not scaled": ("dq * scale, offs_m", "dq, offs_m", "gqa"),
    "preprocess: dlse added, not subtracted": ("delta = delta - dlse", "delta = delta + dlse", "lse"),
    # intermediates rounded to 16 bits
    "fwd: scores rounded to 16 bits": (
        "s = _dot(q, tl.trans(k), None, DOT_PRECISION) * qk_scale",
        "s = (_dot(q, tl.trans(k), None, DOT_PRECISION) * qk_scale).to(q.dtype).to(tl.float32)", "tight"),
    "fwd: row sum l rounded to 16 bits": (
        "l_i = l_i * alpha + tl.sum(p, 1)", "l_i = (l_i * alpha + tl.sum(p, 1)).to(q.dtype).to(tl.float32)", "tight"),
    "dkdv: dP rounded to 16 bits": (
        "dp_t = _dot(v, tl.trans(do), None, DOT_PRECISION)",
        "dp_t = _dot(v, tl.trans(do), None, DOT_PRECISION).to(do.dtype).to(tl.float32)", "tight"),
    "dq: dP rounded to 16 bits": (
        "dp = _dot(do, tl.trans(v), None, DOT_PRECISION)",
        "dp = _dot(do, tl.trans(v), None, DOT_PRECISION).to(do.dtype).to(tl.float32)", "tight"),
    # accumulators kept in 16 bits between tiles
    "fwd: output accumulator in 16 bits": (
        "acc = _dot(p.to(v.dtype), v, acc, DOT_PRECISION)",
        "acc = _dot(p.to(v.dtype), v, acc, DOT_PRECISION).to(v.dtype).to(tl.float32)", "tight"),
    "dkdv: dV accumulator in 16 bits": (
        "dv = _dot(p_t.to(do.dtype), do, dv, DOT_PRECISION)",
        "dv = _dot(p_t.to(do.dtype), do, dv, DOT_PRECISION).to(do.dtype).to(tl.float32)", "tight"),
    "dkdv: dK accumulator in 16 bits": (
        "dk = _dot(ds_t.to(q.dtype), q, dk, DOT_PRECISION)",
        "dk = _dot(ds_t.to(q.dtype), q, dk, DOT_PRECISION).to(q.dtype).to(tl.float32)", "tight"),
    "dq: dQ accumulator in 16 bits": (
        "dq = _dot(ds.to(k.dtype), k, dq, DOT_PRECISION)",
        "dq = _dot(ds.to(k.dtype), k, dq, DOT_PRECISION).to(k.dtype).to(tl.float32)", "tight, long keys"),
    # sliding window, softcap, ALiBi (tests/test_attention_window.py)
    "window: left edge off by one (> for >=)": (
        "keep = j >= i + causal_offset - win_left", "keep = j > i + causal_offset - win_left", "window"),
    "dkdv: the window's far-edge query tiles skipped": ("m_lo, m_hi, Sq, causal_offset", "m_lo, m_end, Sq, causal_offset", "window"),
    "dq: softcap derivative dropped": ("ds = ds * (1.0 - t * t)", "ds = ds", "softcap"),
    "alibi: distance from the top-left corner": (
        "tl.abs((i + causal_offset).to(tl.float32)", "tl.abs((i + 0).to(tl.float32)", "softcap"),
    # packed sequences (VARLEN): where each sequence starts and how long it is
    "varlen: a sequence's length one short": (
        "return start, tl.load(Cu + b + 1) - start", "return start, tl.load(Cu + b + 1) - start - 1", "varlen"),
    "varlen fwd: keys read from the query's offset": (
        "k_base = _head_ptr(K, bk, skb, hk, skh, ALIGN)\n    v_base = _head_ptr(V, bk, svb, hk, svh, ALIGN)\n    q = _load_tile",
        "k_base = _head_ptr(K, b, skb, hk, skh, ALIGN)\n    v_base = _head_ptr(V, bk, svb, hk, svh, ALIGN)\n    q = _load_tile",
        "varlen"),
    "varlen dkdv: keys located by the queries' cu_seqlens": (
        "bk, Sk = _seq_span(CuK, bhk // Hk, Sk, VARLEN)\n    hk = ", "bk, Sk = _seq_span(CuQ, bhk // Hk, Sk, VARLEN)\n    hk = ",
        "varlen"),
    "varlen dkdv: dK/dV stored at the queries' offsets": (
        "bk, Sk = _seq_span(CuK, bhk // Hk, Sk, VARLEN)\n    _store_tile", "bk, Sk = _seq_span(CuQ, bhk // Hk, Sk, VARLEN)\n    _store_tile",
        "varlen"),
    "varlen: scratch rows not offset to the sequence": (
        "return h.to(tl.int64) * TQ + b", "return h.to(tl.int64) * TQ", "varlen"),
    # the atomic backward (deterministic=False): dQ summed over key tiles by atomics, then scaled
    "dkdv atomic: each key tile's dQ stored, not added": (
        "tl.atomic_add(dq_ptrs, dq_part, mask=(offs_m[:, None] < Sq) & (offs_d[None, :] < HEAD_DIM), sem=\"relaxed\")",
        "tl.store(dq_ptrs, dq_part, mask=(offs_m[:, None] < Sq) & (offs_d[None, :] < HEAD_DIM))", "atomic"),
    "dq convert: dQ not scaled": ("cast_out(acc * scale,", "cast_out(acc,", "atomic"),
    # ... with packed sequences: the conversion's rows are the sequence's, read and written at its first token
    "varlen dq convert: sums read at the sequence's index, not its first token": (
        "(_scratch_row(bh, h, b, Sq, TQ, VARLEN) + offs_m)[:, None] * HEAD_DIM",
        "(_scratch_row(bh, h, bh // Hq, Sq, TQ, VARLEN) + offs_m)[:, None] * HEAD_DIM", "varlen atomic"),
    "varlen dq convert: dq stored at the sequence's index, not its first token": (
        "_store_tile(_head_ptr(DQ, b, sdqb, h, sdqh, ALIGN), dq,", "_store_tile(_head_ptr(DQ, bh // Hq, sdqb, h, sdqh, ALIGN), dq,",
        "varlen atomic"),
}


def _qkv(b, hq, hk, sq, sk, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=g).requires_grad_() for s in ((b, hq, sq, d), (b, hk, sk, d), (b, hk, sk, d))]


def _parity(dtype, causal, sq, sk, heads=(2, 1), d=16, b=1):
    def check(device):
        q, k, v = (t.detach().to(device).requires_grad_() for t in _qkv(b, *heads, sq, sk, d))
        scale = d**-0.5
        check_against_torch(f"{sq}x{sk} {dtype}", lambda q, k, v: fastgpt.attention(q, k, v, causal=causal, scale=scale),
                            lambda q, k, v: attention_oracle(q, k, v, causal, scale), [q, k, v], dtype)

    return check


def _atomic(device):
    """deterministic=False, causal GQA 2:1 with two key tiles per query row (interpreter tiles: 32 keys)."""
    q, k, v = (t.detach().to(device).requires_grad_() for t in _qkv(1, 4, 2, 40, 50, 16))
    check_against_torch("atomic", lambda q, k, v: fastgpt.attention(q, k, v, causal=True, deterministic=False),
                        lambda q, k, v: attention_oracle(q, k, v, True, 0.25), [q, k, v], torch.float32)


def _tight(sq, sk, shift):
    """The tight rule (causal, GQA 2:1, fp16) with q, k at twice unit size and, with ``shift``, K
    along a common direction (4x), V and dO off zero (4, 2): then dP = dO @ V^T is large while
    dP - delta is not, so rounding dP or a 16-bit accumulator costs more than the kernel's own
    roundings. Several tiles along both lengths (accumulators) and ragged ends."""

    def check(device):
        g = torch.Generator().manual_seed(1)
        u = torch.where(torch.arange(16) % 3 == 0, -1.0, 1.0)
        q = 2 * torch.randn(1, 2, sq, 16, generator=g)
        k = 2 * torch.randn(1, 1, sk, 16, generator=g) + 4 * shift * u
        v = torch.randn(1, 1, sk, 16, generator=g) + 4 * shift
        dout = torch.randn(1, 2, sq, 16, generator=g) + 2 * shift
        fn = lambda q, k, v: fastgpt.attention(q, k, v, causal=True)  # noqa: E731
        check_attention_tight(f"tight {sq}x{sk}", fn, *(t.to(device) for t in (q, k, v)), True, 0.25, torch.float16,
                              dout=dout.to(device))

    return check


def _lse(device):
    q, k, v = (t.detach().to(device).requires_grad_() for t in _qkv(1, 2, 1, 20, 24, 16))
    import test_attention_triton as tat  # the suite's lse check

    with fastgpt.use_backend("triton", strict=True):
        check_against_torch("lse", lambda q, k, v: fastgpt.attention(q, k, v, causal=True, scale=0.3, return_lse=True),
                            lambda q, k, v: tat.lse_oracle(q, k, v, True, 0.3), [q, k, v], torch.float32)


def _window(device):
    """A sliding window with both bounds, Sq != Sk, GQA, float32: many window-edge tiles."""
    q, k, v = (t.detach().to(device).requires_grad_() for t in _qkv(1, 2, 1, 40, 56, 16))
    check_against_torch("window", lambda q, k, v: fastgpt.attention(q, k, v, scale=0.25, window_size=(9, 5)),
                        lambda q, k, v: attention_oracle(q, k, v, False, 0.25, window=(9, 5)), [q, k, v], torch.float32)


def _softcap(device):
    """Softcap with scores that saturate it, and ALiBi slopes (B, Hq), causal with Sq < Sk, float32."""
    q, k, v = (t.detach().to(device).requires_grad_() for t in _qkv(1, 2, 1, 24, 40, 16))
    slopes = torch.tensor([[0.5, 0.125]], device=device)
    opts = {"softcap": 2.0, "alibi_slopes": slopes}
    check_against_torch("softcap", lambda q, k, v: fastgpt.attention(q, k, v, causal=True, scale=1.0, **opts),
                        lambda q, k, v: attention_oracle(q, k, v, True, 1.0, window=(-1, -1), **opts), [q, k, v],
                        torch.float32)


def _varlen(device):
    """Packed sequences with lengths 0 and 1, Sq != Sk per sequence, several tiles, causal GQA, and
    the log-sum-exp (float32): the per-sequence oracle of tests/test_attention_varlen.py."""
    import test_attention_varlen as tav

    case = tav.Case((40, 0, 1, 17), (24, 5, 1, 50), 16, (4, 2), True, torch.float32)
    tav.check_case(case, "triton", device, with_lse=True)


def _varlen_atomic(device):
    """deterministic=False on packed sequences (lengths 0 and 1, Sq != Sk, causal GQA, float32)."""
    import test_attention_varlen as tav

    tav.check_case(tav.Case((5, 0, 1, 17), (9, 2, 1, 20), 16, (2, 1), True, torch.float32), "triton", device,
                   deterministic=False)


CHECKS = {
    # causal, Sq < Sk and Sq > Sk, ragged in both; float32 so small slips show
    "causal": lambda device: (_parity(torch.float32, True, 40, 50)(device), _parity(torch.float32, True, 50, 40)(device)),
    "ragged": _parity(torch.float32, False, 20, 20),
    "gqa": _parity(torch.float32, False, 20, 20, heads=(4, 2)),
    "tight": _tight(120, 70, 1),
    # many key tiles per query tile: what the dQ accumulator sees
    "tight, long keys": _tight(16, 256, 0),
    "lse": _lse,
    "window": _window,
    "softcap": _softcap,
    "varlen": _varlen,
    "atomic": _atomic,
    "varlen atomic": _varlen_atomic,
}


def _sources() -> dict:
    return {stem: path.read_text() for stem, path in SOURCES.items()}


def _count(sources: dict, pattern: str) -> int:
    return sum(text.count(pattern) for text in sources.values())


def _load(sources: dict, name: str, directory: Path, monkeypatch):
    """The flash-attention module built from ``sources`` (stem -> text): each module is written to
    ``directory`` (triton's interpreter and JIT read their functions' source from the file) under a
    temporary name in fastgpt.kernels (so its relative imports of the other kernel modules resolve),
    its imports of the modules before it pointed at their copies, and entered in sys.modules for the
    test's duration (``monkeypatch``) so those imports find them."""
    module = None
    renamed = {}
    for stem, text in sources.items():
        for original, copy in renamed.items():
            text = text.replace(f"from .{original} import", f"from .{copy} import")
        renamed[stem] = f"_mutant_{name}_{stem}"
        path = directory / f"{renamed[stem]}.py"
        path.write_text(text)
        spec = importlib.util.spec_from_file_location(f"fastgpt.kernels.{renamed[stem]}", path)
        module = importlib.util.module_from_spec(spec)
        monkeypatch.setitem(sys.modules, spec.name, module)
        spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def mutant_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("mutants")


@pytest.fixture
def route_triton_to(monkeypatch):
    """Make the ``triton`` attention backend call ``module`` (strict: no fallback can hide a failure)."""

    def route(module):
        monkeypatch.setattr(fastgpt.kernels, "flash_attention", module)
        monkeypatch.setitem(sys.modules, "fastgpt.kernels.flash_attention", module)

    monkeypatch.setenv("FASTGPT_AUTOTUNE", "0")
    return route


def _run(check: str, device) -> None:
    with fastgpt.use_backend("triton", strict=True):
        CHECKS[check](device)


@pytest.fixture
def unedited(mutant_dir, monkeypatch):
    return _load(_sources(), "unedited", mutant_dir, monkeypatch)


@pytest.mark.parametrize("check", sorted(CHECKS))
def test_unedited_copy_passes_each_check(check, unedited, route_triton_to, device):
    route_triton_to(unedited)
    _run(check, device)


def test_every_check_is_used_and_every_pattern_is_unique():
    sources = _sources()
    counts = {name: _count(sources, pattern) for name, (pattern, _, _) in MUTATIONS.items()}
    assert all(n == 1 for n in counts.values()), "patterns that no longer name one place in the kernel modules: " + str(
        {name: n for name, n in counts.items() if n != 1})
    assert {check for _, _, check in MUTATIONS.values()} == set(CHECKS)


@pytest.mark.parametrize("name", list(MUTATIONS))
def test_planted_bug_is_caught(name, route_triton_to, mutant_dir, device, monkeypatch):
    pattern, replacement, check = MUTATIONS[name]
    sources = _sources()
    assert _count(sources, pattern) == 1, f"the pattern of {name!r} occurs {_count(sources, pattern)} times in the kernel modules"
    slug = "".join(c if c.isalnum() else "_" for c in name)[:60]
    mutated = {stem: text.replace(pattern, replacement) for stem, text in sources.items()}
    route_triton_to(_load(mutated, slug, mutant_dir, monkeypatch))
    with pytest.raises(AssertionError, match="FAILS"):
        _run(check, device)
