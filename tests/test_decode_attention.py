"""fastgpt.flash_attn_with_kvcache and the split-KV decode kernel (kernels/decode_attention.py).

Without a GPU the kernel runs in the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1);
``use_backend("triton", strict=True)`` makes a call that would fall back an error, so these tests
execute the kernel. Output and LSE follow the parity rule against the reference run in float64 on
the same rounded inputs (fastgpt.testing.assert_parity).
"""

import itertools

import pytest
import torch

import fastgpt
from fastgpt import backends, reference
from fastgpt.ops import decode_attention as op
from fastgpt.testing import TIGHT_FACTOR, assert_parity, attention_rounded_as_a_kernel_must, parity

pytest.importorskip("triton", reason="triton is not installed (it is a Linux-only dependency)")
from fastgpt.kernels import decode_attention as kd  # noqa: E402

LENGTHS = (1, 17, 300)  # ragged within one batch: a single key, a partial tile, many tiles
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _cache(batch, capacity, hk, d, dtype, paged, g, page=16, spare=3):
    """(k_cache, v_cache, block_table): contiguous (B, capacity, Hk, D), or paged with shuffled pages."""
    if not paged:
        kc = torch.randn(batch, capacity, hk, d, generator=g).to(DEVICE, dtype)
        return kc, torch.randn(kc.shape, generator=g).to(DEVICE, dtype), None
    per_seq = -(-capacity // page)
    blocks = batch * per_seq + spare
    kc = torch.randn(blocks, page, hk, d, generator=g).to(DEVICE, dtype)
    table = torch.randperm(blocks, generator=g)[: batch * per_seq].reshape(batch, per_seq).to(DEVICE, torch.int32)
    return kc, torch.randn(kc.shape, generator=g).to(DEVICE, dtype), table


def _check(q, kc, vc, seqlens, table, causal, num_splits, batch_idx=None):
    with backends.use_backend("triton", strict=True):
        out, lse = fastgpt.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=seqlens, block_table=table, cache_batch_idx=batch_idx,
                                                   causal=causal, num_splits=num_splits, return_softmax_lse=True)
    scale = q.shape[-1] ** -0.5
    ref = op.decode_reference(q.double(), kc.double(), vc.double(), seqlens, batch_idx, table, causal, scale)
    base = op.decode_reference(q, kc, vc, seqlens, batch_idx, table, causal, scale)
    assert_parity("out", out, ref[0], base[0])
    assert_parity("lse", lse, ref[1], base[1])
    return out, lse


# a covering set: every (layout, dtype, GQA) with both Sq; num_splits and causal vary across them
CASES = [
    (paged, dtype, heads, sq, (1, 2, 5, 0)[i % 4], i % 3 != 2)
    for i, (paged, dtype, heads, sq) in enumerate(
        itertools.product((False, True), (torch.float16, torch.float32), ((4, 1), (4, 2)), (1, 3)))
]


@pytest.mark.parametrize("paged,dtype,heads,sq,num_splits,causal", CASES,
                         ids=[f"{'paged' if c[0] else 'contig'}-{str(c[1])[6:]}-h{c[2][0]}/{c[2][1]}-q{c[3]}-s{c[4]}-"
                              f"{'causal' if c[5] else 'full'}" for c in CASES])
def test_kernel_matches_the_float64_reference_on_ragged_caches(paged, dtype, heads, sq, num_splits, causal):
    g = torch.Generator().manual_seed(sq * 7 + num_splits)
    hq, hk = heads
    d = 16 if hk == 1 else 32
    # pages of 16 (one interpreter key tile) and 32 (two tiles per page)
    kc, vc, table = _cache(len(LENGTHS), 320, hk, d, dtype, paged, g, page=16 if hk == 1 else 32)
    q = torch.randn(len(LENGTHS), sq, hq, d, generator=g).to(DEVICE, dtype)
    seqlens = torch.tensor(LENGTHS, dtype=torch.int32, device=DEVICE)
    out, lse = _check(q, kc, vc, seqlens, table, causal, num_splits)
    if causal and sq == 3:  # length 1 with 3 queries: the first two rows see no key
        assert torch.equal(out[0, :2], torch.zeros_like(out[0, :2]))
        assert bool((lse[0, :, :2] == float("-inf")).all())


def test_contiguous_cache_through_cache_batch_idx():
    g = torch.Generator().manual_seed(1)
    kc, vc, _ = _cache(5, 48, 2, 16, torch.float32, False, g)
    q = torch.randn(3, 1, 4, 16, generator=g).to(DEVICE)
    idx = torch.tensor([4, 0, 2], dtype=torch.int32, device=DEVICE)
    _check(q, kc, vc, torch.tensor([40, 3, 17], dtype=torch.int32, device=DEVICE), None, True, 2, batch_idx=idx)


def test_num_splits_zero_fills_the_gpu_and_respects_the_cache_length():
    assert kd.choose_num_splits(1, 8, 8192, 132, 64) == 32  # 8 programs: split until ~2 waves, <= tiles / 4
    assert kd.choose_num_splits(8, 8, 8192, 132, 64) == 5
    assert kd.choose_num_splits(64, 8, 8192, 132, 64) == 1  # 512 programs already fill the GPU
    assert kd.choose_num_splits(1, 1, 64, 132, 64) == 1  # one tile: nothing to split


@pytest.mark.parametrize("paged", [False, True], ids=["contig", "paged"])
def test_append_writes_exactly_the_new_slots_in_place(paged):
    g = torch.Generator().manual_seed(2)
    kc, vc, table = _cache(3, 64, 2, 16, torch.float16, paged, g)
    k_new = torch.randn(3, 2, 2, 16, generator=g).to(DEVICE, torch.float16)
    v_new = torch.randn(3, 2, 2, 16, generator=g).to(DEVICE, torch.float16)
    seqlens = torch.tensor([0, 15, 40], dtype=torch.int32, device=DEVICE)  # 15: the append crosses a page
    k_before, v_before = kc.clone(), vc.clone()
    q = torch.randn(3, 2, 4, 16, generator=g).to(DEVICE, torch.float16)
    with backends.use_backend("triton", strict=True):
        out = fastgpt.flash_attn_with_kvcache(q, kc, vc, k_new, v_new, cache_seqlens=seqlens, block_table=table, causal=True)
    want_k, want_v = k_before.clone(), v_before.clone()
    for b, start in enumerate(seqlens.tolist()):
        for t in range(2):
            pos = start + t
            row, slot = (int(table[b, pos // 16]), pos % 16) if paged else (b, pos)
            want_k[row, slot], want_v[row, slot] = k_new[b, t], v_new[b, t]
    assert torch.equal(kc, want_k) and torch.equal(vc, want_v)  # the new slots, and nothing else
    assert torch.equal(seqlens, torch.tensor([0, 15, 40], dtype=torch.int32, device=DEVICE))  # not updated (flash-attn)
    ref = op.decode_reference(q.double(), kc.double(), vc.double(), seqlens + 2, None, table, True, 0.25)
    base = op.decode_reference(q, kc, vc, seqlens + 2, None, table, True, 0.25)
    assert_parity("out", out, ref[0], base[0])


def _bad_calls(q, kc, vc, k, v, sl, table):
    fn = fastgpt.flash_attn_with_kvcache
    return [
        ("cache_seqlens", lambda: fn(q, kc, vc, cache_seqlens=sl.long())),
        ("cache_seqlens", lambda: fn(q, kc, vc, k, v, cache_seqlens=torch.tensor([0, 63], dtype=torch.int32))),
        ("cache_seqlens", lambda: fn(q, kc, vc, cache_seqlens=torch.tensor([-1, 3], dtype=torch.int32))),
        ("cache_seqlens", lambda: fn(q, kc, vc, cache_seqlens=torch.tensor([1], dtype=torch.int32))),
        ("cache_batch_idx", lambda: fn(q, kc, vc, k, v, cache_seqlens=sl, cache_batch_idx=torch.tensor([0, 2], dtype=torch.int32))),
        ("k/v of length", lambda: fn(q, kc, vc, torch.cat([k] * 40, 1), torch.cat([v] * 40, 1), cache_seqlens=sl)),
        ("pass k and v together", lambda: fn(q, kc, vc, k, None, cache_seqlens=sl)),
        ("block_table", lambda: fn(q, kc, vc, k, v, cache_seqlens=sl, block_table=table[:, :1].clone().long())),
        ("block_table", lambda: fn(q, kc, vc, k, v, cache_seqlens=sl, block_table=table[:1])),
        ("block_table", lambda: fn(q, kc, vc, k, v, cache_seqlens=sl, block_table=table + 100)),
        ("page size", lambda: fn(q, kc[:, :8], vc[:, :8], k, v, cache_seqlens=sl, block_table=table)),
    ]


def test_bad_input_raises_naming_the_argument_and_leaves_the_cache_untouched():
    g = torch.Generator().manual_seed(3)
    kc, vc, _ = _cache(2, 64, 2, 16, torch.float32, False, g)
    table = torch.tensor([[0, 1], [1, 0]], dtype=torch.int32)
    q = torch.randn(2, 1, 4, 16, generator=g)
    k, v = torch.randn(2, 2, 2, 16, generator=g), torch.randn(2, 2, 2, 16, generator=g)
    sl = torch.tensor([3, 10], dtype=torch.int32)
    k_before, v_before = kc.clone(), vc.clone()
    for what, call in _bad_calls(q, kc.cpu(), vc.cpu(), k, v, sl, table):
        with pytest.raises((ValueError, TypeError), match=what):
            call()
    assert torch.equal(kc, k_before) and torch.equal(vc, v_before)


@pytest.mark.parametrize("arg,value", [("window_size", (4, 0)), ("softcap", 30.0), ("alibi_slopes", torch.ones(4))])
def test_features_of_other_issues_are_refused_by_name(arg, value):
    q, kc = torch.randn(1, 1, 4, 16), torch.randn(1, 32, 2, 16)
    with pytest.raises(NotImplementedError, match=arg.split("_")[0]):
        fastgpt.flash_attn_with_kvcache(q, kc, kc.clone(), **{arg: value})


def test_generation_decodes_through_the_kernel_and_matches_recomputation(monkeypatch):
    """Greedy decoding: the decode op runs (the kernel, strict) on every step after the prefill, and
    the tokens equal those of recomputing the whole context each step (no cache)."""
    from fastgpt.model import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=24, vocab_size=50, n_layer=2, n_head=4, n_embd=32, dropout=0.0)).eval()
    calls = []
    forward = op._decode.forward

    def on_kernel(*args):
        calls.append(args[0].shape)
        with backends.use_backend("triton", strict=True):
            return forward(*args)

    monkeypatch.setattr(op._decode, "forward", on_kernel)
    idx = torch.randint(0, 50, (2, 5), generator=torch.Generator().manual_seed(1))
    cached = model.generate(idx, 6, top_k=1)
    assert len(calls) == 5 * 2 and all(s == (2, 1, 4, 8) for s in calls)  # 5 decode steps x 2 layers
    monkeypatch.setattr(op._decode, "forward", forward)
    assert torch.equal(cached, model.generate(idx, 6, top_k=1, use_cache=False))


def test_bfloat16_paged_cache_with_two_queries_meets_the_tight_rule():
    """bfloat16 P loses bits before P@V that torch's bf16 baseline keeps (and the interpreter rounds
    float32 to bfloat16 toward zero): the tight 16-bit rule (fastgpt.testing) is the bound, per sequence."""
    g = torch.Generator().manual_seed(4)
    kc, vc, table = _cache(3, 320, 2, 32, torch.bfloat16, True, g, page=32)
    q = torch.randn(3, 2, 8, 32, generator=g).to(DEVICE, torch.bfloat16)
    seqlens = torch.tensor(LENGTHS, dtype=torch.int32, device=DEVICE)
    with backends.use_backend("triton", strict=True):
        out = fastgpt.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=seqlens, block_table=table, causal=True, num_splits=3)
    ref = op.decode_reference(q.double(), kc.double(), vc.double(), seqlens, None, table, True, 32 ** -0.5)[0]
    for b, length in enumerate(LENGTHS):
        k, v = (op._sequence_kv(c, b, length, None, table)[None].transpose(1, 2) for c in (kc, vc))
        tight = attention_rounded_as_a_kernel_must(q[b : b + 1].transpose(1, 2), k, v, True, 32 ** -0.5,
                                                   torch.zeros_like(q[b : b + 1].transpose(1, 2)),
                                                   bf16_toward_zero=not torch.cuda.is_available())[0]
        result = parity(f"sequence {b}", out[b], ref[b], tight[0].transpose(0, 1), atol=1e-6)
        assert result.error <= TIGHT_FACTOR * result.base_error + 1e-6, str(result)


def test_more_queries_than_the_kernel_takes_are_declined_by_name():
    q, kc = torch.randn(1, kd.MAX_SQ + 1, 2, 16), torch.randn(1, 32, 2, 16)
    with backends.use_backend("triton", strict=True), pytest.raises(backends.BackendUnavailableError, match="at most 16"):
        fastgpt.flash_attn_with_kvcache(q, kc, kc.clone(), causal=True)


# --------------------------------------------------------------------------------------------
# rotary_cos / rotary_sin: flash-attn's positions, through the rotary op
# --------------------------------------------------------------------------------------------


def _tables(seqlen_ro, rotary_dim, dtype):
    inv_freq = 1.0 / (10000 ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim))
    ang = torch.arange(seqlen_ro, dtype=torch.float64)[:, None] * inv_freq
    return ang.cos().to(DEVICE, dtype), ang.sin().to(DEVICE, dtype)


def _rotary_then_attention(q, kc, vc, k, v, seqlens, cos, sin, interleaved, causal):
    """The definition, in q's precision: rotate k at cache_seqlens + i (q there too when causal, else at
    cache_seqlens) with the reference rotary, append, reference attention; returns (out, lse, k_cache)."""
    kc, vc = kc.clone(), vc.clone()
    steps = torch.arange(q.shape[1], device=q.device)
    pos_k = seqlens.long()[:, None] + steps
    pos_q = pos_k if causal else seqlens.long()[:, None] + 0 * steps

    def rot(x, pos):
        return reference.rotary_forward(x, cos[pos], sin[pos], cos[pos], sin[pos], interleaved)

    k, q = rot(k, pos_k), rot(q, pos_q)
    op._append(kc, vc, k, v, seqlens, None, None)
    out, lse = op.decode_reference(q, kc, vc, seqlens + k.shape[1], None, None, causal, q.shape[-1] ** -0.5)
    return out, lse, kc


ROTARY_CASES = [(interleaved, sq, dtype) for interleaved in (True, False) for sq in (1, 3) for dtype in (torch.float16, torch.float32)]


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("interleaved,sq,dtype", ROTARY_CASES,
                         ids=[f"{'interleaved' if c[0] else 'halves'}-q{c[1]}-{str(c[2])[6:]}" for c in ROTARY_CASES])
def test_rotary_rotates_the_new_keys_and_the_queries_at_flash_attn_positions(backend, interleaved, sq, dtype):
    g = torch.Generator().manual_seed(sq * 11 + interleaved)
    d, hq, hk = 32, 4, 2
    rotary_dim = d if dtype == torch.float32 else d // 2  # a partial rotation: the last dims pass through
    causal = not (interleaved and sq == 3)  # non-causal with 3 queries: every query at cache_seqlens
    seqlens = torch.tensor(LENGTHS, dtype=torch.int32, device=DEVICE)
    kc, vc, _ = _cache(len(LENGTHS), 304, hk, d, dtype, False, g)
    q = torch.randn(len(LENGTHS), sq, hq, d, generator=g).to(DEVICE, dtype)
    k = torch.randn(len(LENGTHS), sq, hk, d, generator=g).to(DEVICE, dtype)
    v = torch.randn(len(LENGTHS), sq, hk, d, generator=g).to(DEVICE, dtype)
    cos, sin = _tables(max(LENGTHS) + sq, rotary_dim, dtype)  # exactly the positions needed
    k_before, v_before = kc.clone(), vc.clone()
    with backends.use_backend(backend, strict=True):
        out, lse = fastgpt.flash_attn_with_kvcache(q, kc, vc, k, v, cos, sin, cache_seqlens=seqlens, causal=causal,
                                                   rotary_interleaved=interleaved, return_softmax_lse=True)
    f64 = [t.double() for t in (q, k_before, v_before, k, v)]
    ref = _rotary_then_attention(*f64[:5], seqlens, cos.double(), sin.double(), interleaved, causal)
    base = _rotary_then_attention(q, k_before, v_before, k, v, seqlens, cos, sin, interleaved, causal)
    assert_parity("out", out, ref[0], base[0])
    assert_parity("lse", lse, ref[1], base[1])
    # the cache element by element: rotated keys in the new slots, v as given, every other slot untouched
    new = torch.zeros(kc.shape[:2], dtype=torch.bool, device=DEVICE)
    for b, start in enumerate(LENGTHS):
        new[b, start : start + sq] = True
    assert_parity("k_cache new slots", kc[new], ref[2][new], base[2][new])
    assert torch.equal(kc[~new], k_before[~new])
    assert not torch.equal(kc[new], torch.cat([k[b] for b in range(len(LENGTHS))]))  # rotated, not copied
    want_v = v_before.clone()
    op._append(k_before.clone(), want_v, k, v, seqlens, None, None)
    assert torch.equal(vc, want_v)


def test_rotary_position_semantics_differ_between_causal_and_not():
    """Guards the causal/non-causal q positions: with 3 queries the two give different outputs."""
    g = torch.Generator().manual_seed(5)
    kc, vc, _ = _cache(1, 32, 1, 16, torch.float64, False, g)
    q, k, v = (torch.randn(1, 3, 1, 16, generator=g, dtype=torch.float64) for _ in range(3))
    cos, sin = _tables(32, 16, torch.float64)
    sl = torch.tensor([4], dtype=torch.int32)
    got = fastgpt.flash_attn_with_kvcache(q, kc.clone(), vc.clone(), k, v, cos, sin, cache_seqlens=sl, causal=False)
    want = _rotary_then_attention(q, kc, vc, k, v, sl, cos, sin, True, False)[0]
    wrong = _rotary_then_attention(q, kc, vc, k, v, sl, cos, sin, True, True)[0]
    assert torch.allclose(got, want) and not torch.allclose(got[0, 1:], wrong[0, 1:])


def test_rotary_bad_input_raises_naming_the_argument_and_leaves_the_cache_untouched():
    g = torch.Generator().manual_seed(6)
    kc, vc, _ = _cache(2, 16, 2, 16, torch.float32, False, g)
    q = torch.randn(2, 2, 4, 16, generator=g)
    k, v = torch.randn(2, 2, 2, 16, generator=g), torch.randn(2, 2, 2, 16, generator=g)
    sl = torch.tensor([3, 10], dtype=torch.int32)
    cos, sin = _tables(16, 8, torch.float32)
    fn = fastgpt.flash_attn_with_kvcache
    k_before, v_before = kc.clone(), vc.clone()
    for what, call in [
        ("rotary_cos and rotary_sin together", lambda: fn(q, kc, vc, k, v, cos, None, cache_seqlens=sl)),
        ("rotary_cos and rotary_sin together", lambda: fn(q, kc, vc, k, v, None, sin, cache_seqlens=sl)),
        ("need new k and v", lambda: fn(q, kc, vc, None, None, cos, sin, cache_seqlens=sl)),
        ("rotary_cos must have q's dtype", lambda: fn(q, kc, vc, k, v, cos.double(), sin.double(), cache_seqlens=sl)),
        ("rotary_sin must have rotary_cos's shape", lambda: fn(q, kc, vc, k, v, cos, sin[:, :2], cache_seqlens=sl)),
        ("rotary_cos", lambda: fn(q, kc, vc, k, v, cos[None], sin[None], cache_seqlens=sl)),
        ("rotary_dim", lambda: fn(q, kc, vc, k, v, torch.ones(16, 9), torch.ones(16, 9), cache_seqlens=sl)),
        ("rotary_dim", lambda: fn(q, kc, vc, k, v, torch.ones(16, 0), torch.ones(16, 0), cache_seqlens=sl)),
        ("rotary_cos/rotary_sin have 11 positions", lambda: fn(q, kc, vc, k, v, cos[:11], sin[:11], cache_seqlens=sl)),
    ]:
        with pytest.raises((ValueError, TypeError), match=what):
            call()
    assert torch.equal(kc, k_before) and torch.equal(vc, v_before)
    fn(q, kc, vc, k, v, cos[:12], sin[:12], cache_seqlens=sl)  # exactly the 12 positions needed: accepted
