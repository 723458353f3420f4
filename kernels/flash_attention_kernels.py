"""The flash-attention kernels (FlashAttention-2 in Triton): forward, backward preprocess, dK/dV (with
the optional atomic dQ), dQ, and the atomic dQ's conversion. What each one does, and the semantics,
are in :mod:`fastgpt.kernels.flash_attention`, which builds their launches; their building blocks are
in :mod:`fastgpt.kernels.flash_attention_tiles`.
"""

import triton
import triton.language as tl

from ._rounding import cast_out
from .flash_attention_tiles import (
    _head_ptr,
    _load_tile,
    _store_tile,
    _dot,
    _seq_span,
    _scratch_row,
    _q_tile,
    _score_mods,
    _alibi_slope,
    _in_window,
    _gap_end,
    _gap_skip,
    _window_key_range,
    _window_query_range,
)


@triton.jit
def _fwd_inner(
    acc, l_i, m_i, q,
    k_base, v_base, sks, skd, svs, svd,
    offs_m, offs_d, offs_dv, lo, hi, Sk, causal_offset, qk_scale,
    IS_CAUSAL: tl.constexpr, MASKED: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr, ALIGN: tl.constexpr,
    gap_lo, gap_hi, win_left, win_right, softcap2, slope2,
    WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr,
):
    """Online softmax over key tiles [lo, hi) (masked windowed ones: less [gap_lo, gap_hi)). MASKED tiles
    apply the key bound, window and causal mask."""
    for it in range(lo, _gap_end(hi, gap_lo, gap_hi, WINDOW and MASKED), BLOCK_N):
        start_n = _gap_skip(it, gap_lo, gap_hi, WINDOW and MASKED)
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_tile(k_base, offs_n, sks, offs_d, skd, Sk, HEAD_DIM, MASKED, HEAD_DIM != BLOCK_D, ALIGN)
        s = _dot(q, tl.trans(k), None, DOT_PRECISION) * qk_scale
        s, _ = _score_mods(s, offs_m[:, None], offs_n[None, :], causal_offset, softcap2, slope2, SOFTCAP, ALIBI)
        if MASKED:
            keep = offs_n[None, :] < Sk
            if WINDOW:
                keep = keep & _in_window(offs_m[:, None], offs_n[None, :], causal_offset, win_left, win_right, IS_CAUSAL)
            if IS_CAUSAL:
                keep = keep & (offs_n[None, :] <= offs_m[:, None] + causal_offset)
            s = tl.where(keep, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # a row that has seen no key yet keeps m = -inf; subtract 0 so exp2 gives 0, not nan
            m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_sub = m_new
        p = tl.math.exp2(s - m_sub[:, None])
        alpha = tl.math.exp2(m_i - m_sub)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_tile(v_base, offs_n, svs, offs_dv, svd, Sk, HEAD_DIM_V, MASKED, HEAD_DIM_V != BLOCK_DV, ALIGN)
        acc = acc * alpha[:, None]
        acc = _dot(p.to(v.dtype), v, acc, DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, Out, Lse,
    sqb, sqh, sqs, sqd,
    skb, skh, sks, skd,
    svb, svh, svs, svd,
    sob, soh, sos, sod,
    slb, slh, sls,
    Hq, GROUP, Sq, Sk, qk_scale, CuQ, CuK,
    IS_CAUSAL: tl.constexpr, VARLEN: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    DOT_PRECISION: tl.constexpr, ALIGN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    Alibi, sab, sah, win_left, win_right, softcap2,
    WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr,
):
    bh, b, bk, h, hk, m0, Sq, Sk, causal_offset, full, hi = _q_tile(Hq, GROUP, Sq, Sk, CuQ, CuK, IS_CAUSAL, VARLEN,
                                                                    BLOCK_M, BLOCK_N)
    if VARLEN:
        if m0 >= Sq:
            return  # a tile past the end of a sequence shorter than the longest
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    slope2 = _alibi_slope(Alibi, bh // Hq, h, sab, sah, ALIBI)
    lo = full  # masked tiles: [full, hi); with a window [lo, full_lo) and [full, hi), unmasked [full_lo, full)
    full_lo = 0
    if WINDOW:
        lo, full_lo, full, hi = _window_key_range(m0, Sk, causal_offset, win_left, win_right, BLOCK_M, BLOCK_N)

    k_base = _head_ptr(K, bk, skb, hk, skh, ALIGN)
    v_base = _head_ptr(V, bk, svb, hk, svh, ALIGN)
    q = _load_tile(_head_ptr(Q, b, sqb, h, sqh, ALIGN), offs_m, sqs, offs_d, sqd, Sq, HEAD_DIM,
                   True, HEAD_DIM != BLOCK_D, ALIGN)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, sks, skd, svs, svd,
                               offs_m, offs_d, offs_dv, full_lo, full, Sk, causal_offset, qk_scale, IS_CAUSAL, False,
                               HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, BLOCK_N, DOT_PRECISION, ALIGN,
                               full_lo, full, win_left, win_right, softcap2, slope2, WINDOW, SOFTCAP, ALIBI)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, sks, skd, svs, svd,
                               offs_m, offs_d, offs_dv, lo, hi, Sk, causal_offset, qk_scale, IS_CAUSAL, True,
                               HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, BLOCK_N, DOT_PRECISION, ALIGN,
                               full_lo, full, win_left, win_right, softcap2, slope2, WINDOW, SOFTCAP, ALIBI)

    # rows that saw no key: l = 0, out = 0, lse = -inf
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)
    _store_tile(_head_ptr(Out, b, sob, h, soh, ALIGN), acc / l_safe[:, None], offs_m, sos, offs_dv, sod, Sq,
                HEAD_DIM_V, HEAD_DIM_V != BLOCK_DV, ALIGN)
    tl.store(_head_ptr(Lse, b, slb, h, slh, 1) + offs_m * sls, lse, mask=offs_m < Sq)


# --------------------------------------------------------------------------------------------
# backward
# --------------------------------------------------------------------------------------------


@triton.jit
def _attn_bwd_preprocess_kernel(
    Out, DOut, Lse, DLse, Delta, Lse2,
    sob, soh, sos, sod,
    sdob, sdoh, sdos, sdod,
    slb, slh, sls,
    sdlb, sdlh, sdls,
    Hq, Sq, CuQ, TQ,
    HAS_DLSE: tl.constexpr, VARLEN: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_DV: tl.constexpr,
    ALIGN: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """delta = rowsum(dO * O) - dlse and lse2 = lse * log2(e) (+inf for rows that saw no key, so
    that P = exp2(s - lse2) is 0 there), both (B, Hq, Sq) contiguous float32 ((Hq, TQ) with VARLEN)."""
    pid = tl.program_id(0)
    n_m_tiles = tl.cdiv(Sq, BLOCK_M)
    bh = pid // n_m_tiles
    tile = pid % n_m_tiles
    b, Sq = _seq_span(CuQ, bh // Hq, Sq, VARLEN)
    h = bh % Hq
    if VARLEN:
        if tile * BLOCK_M >= Sq:
            return
    offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = offs_m < Sq
    o = _load_tile(_head_ptr(Out, b, sob, h, soh, ALIGN), offs_m, sos, offs_dv, sod, Sq, HEAD_DIM_V,
                   True, HEAD_DIM_V != BLOCK_DV, ALIGN)
    do = _load_tile(_head_ptr(DOut, b, sdob, h, sdoh, ALIGN), offs_m, sdos, offs_dv, sdod, Sq, HEAD_DIM_V,
                    True, HEAD_DIM_V != BLOCK_DV, ALIGN)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    if HAS_DLSE:
        dlse = tl.load(_head_ptr(DLse, b, sdlb, h, sdlh, 1) + offs_m * sdls, mask=row_ok, other=0.0)
        delta = delta - dlse.to(tl.float32)
    lse = tl.load(_head_ptr(Lse, b, slb, h, slh, 1) + offs_m * sls, mask=row_ok, other=0.0)
    lse2 = lse * 1.4426950408889634
    # beyond 2**23 float32 steps are >= 1 in the exponent, and the lse's round trip through the
    # natural log (and a score recomputed in another order) can put lse2 steps above the dominant
    # score: its P = exp2(s - lse2) would vanish. Step 4 ulps down there; P is clamped at 1.
    lse2 = tl.where(tl.abs(lse2) >= 8388608.0, lse2 - tl.abs(lse2) * 4.8e-7, lse2)
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse2)
    row = _scratch_row(bh, h, b, Sq, TQ, VARLEN) + offs_m
    tl.store(Delta + row, delta, mask=row_ok)
    tl.store(Lse2 + row, lse2, mask=row_ok)


@triton.jit
def _at_most_zero(x):
    """min(x, 0), keeping NaN. P = exp2(s - lse) <= 1, but a score recomputed in another order, or the
    lse's round trip through the natural log (lse2 = lse * log2(e)), can put s above lse by rounding:
    at huge scales (scale=1e10 in float32) by hundreds, and exp2 overflows to inf."""
    return tl.where(x > 0.0, 0.0, x)


@triton.jit
def _dkdv_inner(
    dk, dv, k, v,
    q_base, do_base, lse2_base, delta_base, sqs, sqd, sdos, sdod,
    offs_n, offs_d, offs_dv, lo, hi, Sq, causal_offset, qk_scale,
    MASKED: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, DOT_PRECISION: tl.constexpr, ALIGN: tl.constexpr,
    dq_base, ATOMIC_DQ: tl.constexpr,
    gap_lo, gap_hi, win_left, win_right, softcap2, slope2,
    IS_CAUSAL: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr,
):
    """Accumulate dK, dV of one key tile over query tiles [lo, hi) (masked windowed ones: less [gap_lo,
    gap_hi)), in transposed (key-major) form.
    ATOMIC_DQ: also add each query tile's share of dQ (unscaled) into the float32 rows at dq_base."""
    for it in range(lo, _gap_end(hi, gap_lo, gap_hi, WINDOW and MASKED), BLOCK_M):
        start_m = _gap_skip(it, gap_lo, gap_hi, WINDOW and MASKED)
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q = _load_tile(q_base, offs_m, sqs, offs_d, sqd, Sq, HEAD_DIM, True, HEAD_DIM != BLOCK_D, ALIGN)
        # rows past Sq read lse2 = +inf, so their P is exactly 0
        lse2 = tl.load(lse2_base + offs_m, mask=offs_m < Sq, other=float("inf"))
        s_t = _dot(k, tl.trans(q), None, DOT_PRECISION)
        s_t, t_t = _score_mods(s_t * qk_scale, offs_m[None, :], offs_n[:, None], causal_offset, softcap2, slope2,
                               SOFTCAP, ALIBI)
        p_t = tl.math.exp2(_at_most_zero(s_t - lse2[None, :]))
        if MASKED:
            if IS_CAUSAL:
                p_t = tl.where(offs_n[:, None] <= offs_m[None, :] + causal_offset, p_t, 0.0)
            if WINDOW:
                p_t = tl.where(_in_window(offs_m[None, :], offs_n[:, None], causal_offset, win_left, win_right,
                                          IS_CAUSAL), p_t, 0.0)
        do = _load_tile(do_base, offs_m, sdos, offs_dv, sdod, Sq, HEAD_DIM_V, True, HEAD_DIM_V != BLOCK_DV, ALIGN)
        dv = _dot(p_t.to(do.dtype), do, dv, DOT_PRECISION)
        delta = tl.load(delta_base + offs_m, mask=offs_m < Sq, other=0.0)
        dp_t = _dot(v, tl.trans(do), None, DOT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        if SOFTCAP:
            ds_t = ds_t * (1.0 - t_t * t_t)  # through the cap: d(c tanh(s / c)) / ds (dK's and the atomic dQ's)
        dk = _dot(ds_t.to(q.dtype), q, dk, DOT_PRECISION)
        if ATOMIC_DQ:
            # FlashAttention-2's dQ: dS^T K from this key tile, summed over key tiles (programs) by float32
            # atomics, so the sum's order, and its rounding, varies from run to run
            dq_part = _dot(tl.trans(ds_t.to(k.dtype)), k, None, DOT_PRECISION)
            dq_ptrs = dq_base + offs_m[:, None] * HEAD_DIM + offs_d[None, :]
            tl.atomic_add(dq_ptrs, dq_part, mask=(offs_m[:, None] < Sq) & (offs_d[None, :] < HEAD_DIM), sem="relaxed")
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DOut, Lse2, Delta, DK, DV,
    sqb, sqh, sqs, sqd,
    skb, skh, sks, skd,
    svb, svh, svs, svd,
    sdob, sdoh, sdos, sdod,
    sdkb, sdkh, sdks, sdkd,
    sdvb, sdvh, sdvs, sdvd,
    Hk, GROUP, Sq, Sk, scale, qk_scale, CuQ, CuK, TQ,
    IS_CAUSAL: tl.constexpr, VARLEN: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    DOT_PRECISION: tl.constexpr, ALIGN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DQacc, ATOMIC_DQ: tl.constexpr,  # float32 scratch rows x HEAD_DIM, contiguous, zeroed; unused unless ATOMIC_DQ
    Alibi, sab, sah, win_left, win_right, softcap2,
    WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr,
):
    pid = tl.program_id(0)
    n_n_tiles = tl.cdiv(Sk, BLOCK_N)
    bhk = pid // n_n_tiles
    tile = pid % n_n_tiles
    b, Sq = _seq_span(CuQ, bhk // Hk, Sq, VARLEN)  # see _q_tile: per-sequence lengths with VARLEN
    bk, Sk = _seq_span(CuK, bhk // Hk, Sk, VARLEN)
    hk = bhk % Hk
    n0 = tile * BLOCK_N
    if VARLEN:
        if n0 >= Sk:
            return
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)

    k = _load_tile(_head_ptr(K, bk, skb, hk, skh, ALIGN), offs_n, sks, offs_d, skd, Sk, HEAD_DIM,
                   True, HEAD_DIM != BLOCK_D, ALIGN)
    v = _load_tile(_head_ptr(V, bk, svb, hk, svh, ALIGN), offs_n, svs, offs_dv, svd, Sk, HEAD_DIM_V,
                   True, HEAD_DIM_V != BLOCK_DV, ALIGN)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)

    # query tiles [m_lo, m_full) straddle the causal diagonal of this key tile; [m_full, Sq) see all of it
    causal_offset = Sk - Sq
    if IS_CAUSAL:
        m_lo = tl.maximum(n0 - causal_offset, 0) // BLOCK_M * BLOCK_M
        m_full = (tl.maximum(n0 + BLOCK_N - 1 - causal_offset, 0) + BLOCK_M - 1) // BLOCK_M * BLOCK_M
        m_full = tl.minimum(tl.maximum(m_full, m_lo), Sq)
    else:
        m_full = 0
    # the window: [m_lo, m_full) and [m_end, m_hi) mask, [m_full, m_end) see the whole key tile
    m_end = Sq
    m_hi = m_full
    if WINDOW:
        m_lo, m_full, m_end, m_hi = _window_query_range(n0, Sq, causal_offset, win_left, win_right, BLOCK_M, BLOCK_N)

    # the query heads of this kv head's GQA group, summed here in registers: no atomics
    for g in range(GROUP):
        h = hk * GROUP + g
        q_base = _head_ptr(Q, b, sqb, h, sqh, ALIGN)
        do_base = _head_ptr(DOut, b, sdob, h, sdoh, ALIGN)
        row_base = _scratch_row(b * Hk * GROUP + h, h, b, Sq, TQ, VARLEN)
        slope2 = _alibi_slope(Alibi, bhk // Hk, h, sab, sah, ALIBI)
        if IS_CAUSAL or WINDOW:
            dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, Lse2 + row_base, Delta + row_base,
                                 sqs, sqd, sdos, sdod, offs_n, offs_d, offs_dv, m_lo, m_hi, Sq, causal_offset,
                                 qk_scale, True, HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, BLOCK_M, DOT_PRECISION, ALIGN,
                                 DQacc + row_base * HEAD_DIM, ATOMIC_DQ,
                                 m_full, m_end, win_left, win_right, softcap2, slope2, IS_CAUSAL, WINDOW, SOFTCAP, ALIBI)
        dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, Lse2 + row_base, Delta + row_base,
                             sqs, sqd, sdos, sdod, offs_n, offs_d, offs_dv, m_full, m_end, Sq, causal_offset,
                             qk_scale, False, HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, BLOCK_M, DOT_PRECISION, ALIGN,
                             DQacc + row_base * HEAD_DIM, ATOMIC_DQ,
                             m_full, m_end, win_left, win_right, softcap2, slope2, IS_CAUSAL, WINDOW, SOFTCAP, ALIBI)

    if VARLEN:  # read again: held through the loop, they cost registers the tiles need (sm_80 spilled)
        bk, Sk = _seq_span(CuK, bhk // Hk, Sk, VARLEN)
    _store_tile(_head_ptr(DK, bk, sdkb, hk, sdkh, ALIGN), dk * scale, offs_n, sdks, offs_d, sdkd, Sk, HEAD_DIM,
                HEAD_DIM != BLOCK_D, ALIGN)
    _store_tile(_head_ptr(DV, bk, sdvb, hk, sdvh, ALIGN), dv, offs_n, sdvs, offs_dv, sdvd, Sk, HEAD_DIM_V,
                HEAD_DIM_V != BLOCK_DV, ALIGN)


@triton.jit
def _dq_inner(
    dq, q, do, lse2, delta,
    k_base, v_base, sks, skd, svs, svd,
    offs_m, offs_d, offs_dv, lo, hi, Sk, causal_offset, qk_scale,
    IS_CAUSAL: tl.constexpr, MASKED: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr, ALIGN: tl.constexpr,
    gap_lo, gap_hi, win_left, win_right, softcap2, slope2,
    WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr,
):
    """Accumulate dQ of one query tile over key tiles [lo, hi) (masked windowed ones: less [gap_lo, gap_hi))."""
    for it in range(lo, _gap_end(hi, gap_lo, gap_hi, WINDOW and MASKED), BLOCK_N):
        start_n = _gap_skip(it, gap_lo, gap_hi, WINDOW and MASKED)
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_tile(k_base, offs_n, sks, offs_d, skd, Sk, HEAD_DIM, MASKED, HEAD_DIM != BLOCK_D, ALIGN)
        v = _load_tile(v_base, offs_n, svs, offs_dv, svd, Sk, HEAD_DIM_V, MASKED, HEAD_DIM_V != BLOCK_DV, ALIGN)
        s = _dot(q, tl.trans(k), None, DOT_PRECISION)
        s, t = _score_mods(s * qk_scale, offs_m[:, None], offs_n[None, :], causal_offset, softcap2, slope2, SOFTCAP, ALIBI)
        p = tl.math.exp2(_at_most_zero(s - lse2[:, None]))
        if MASKED:
            # padded keys get P = 0 (with P clamped at 1 and K's padding rows zero, dS @ K would drop them
            # anyway: this is a guard, and the window and causal parts below are not)
            keep = offs_n[None, :] < Sk
            if WINDOW:
                keep = keep & _in_window(offs_m[:, None], offs_n[None, :], causal_offset, win_left, win_right, IS_CAUSAL)
            if IS_CAUSAL:
                keep = keep & (offs_n[None, :] <= offs_m[:, None] + causal_offset)
            p = tl.where(keep, p, 0.0)
        dp = _dot(do, tl.trans(v), None, DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        if SOFTCAP:
            ds = ds * (1.0 - t * t)
        dq = _dot(ds.to(k.dtype), k, dq, DOT_PRECISION)
    return dq


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DOut, Lse2, Delta, DQ,
    sqb, sqh, sqs, sqd,
    skb, skh, sks, skd,
    svb, svh, svs, svd,
    sdob, sdoh, sdos, sdod,
    sdqb, sdqh, sdqs, sdqd,
    Hq, GROUP, Sq, Sk, scale, qk_scale, CuQ, CuK, TQ,
    IS_CAUSAL: tl.constexpr, VARLEN: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    DOT_PRECISION: tl.constexpr, ALIGN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    Alibi, sab, sah, win_left, win_right, softcap2,
    WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr,
):
    bh, b, bk, h, hk, m0, Sq, Sk, causal_offset, full, hi = _q_tile(Hq, GROUP, Sq, Sk, CuQ, CuK, IS_CAUSAL, VARLEN,
                                                                    BLOCK_M, BLOCK_N)
    if VARLEN:
        if m0 >= Sq:
            return
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    slope2 = _alibi_slope(Alibi, bh // Hq, h, sab, sah, ALIBI)
    lo = full  # as in the forward kernel
    full_lo = 0
    if WINDOW:
        lo, full_lo, full, hi = _window_key_range(m0, Sk, causal_offset, win_left, win_right, BLOCK_M, BLOCK_N)

    q = _load_tile(_head_ptr(Q, b, sqb, h, sqh, ALIGN), offs_m, sqs, offs_d, sqd, Sq, HEAD_DIM,
                   True, HEAD_DIM != BLOCK_D, ALIGN)
    do = _load_tile(_head_ptr(DOut, b, sdob, h, sdoh, ALIGN), offs_m, sdos, offs_dv, sdod, Sq, HEAD_DIM_V,
                    True, HEAD_DIM_V != BLOCK_DV, ALIGN)
    row = _scratch_row(bh, h, b, Sq, TQ, VARLEN) + offs_m
    lse2 = tl.load(Lse2 + row, mask=offs_m < Sq, other=float("inf"))
    delta = tl.load(Delta + row, mask=offs_m < Sq, other=0.0)
    k_base = _head_ptr(K, bk, skb, hk, skh, ALIGN)
    v_base = _head_ptr(V, bk, svb, hk, svh, ALIGN)

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    dq = _dq_inner(dq, q, do, lse2, delta, k_base, v_base, sks, skd, svs, svd, offs_m, offs_d, offs_dv,
                   full_lo, full, Sk, causal_offset, qk_scale, IS_CAUSAL, False,
                   HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, BLOCK_N, DOT_PRECISION, ALIGN,
                   full_lo, full, win_left, win_right, softcap2, slope2, WINDOW, SOFTCAP, ALIBI)
    dq = _dq_inner(dq, q, do, lse2, delta, k_base, v_base, sks, skd, svs, svd, offs_m, offs_d, offs_dv,
                   lo, hi, Sk, causal_offset, qk_scale, IS_CAUSAL, True,
                   HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, BLOCK_N, DOT_PRECISION, ALIGN,
                   full_lo, full, win_left, win_right, softcap2, slope2, WINDOW, SOFTCAP, ALIBI)
    _store_tile(_head_ptr(DQ, b, sdqb, h, sdqh, ALIGN), dq * scale, offs_m, sdqs, offs_d, sdqd, Sq, HEAD_DIM,
                HEAD_DIM != BLOCK_D, ALIGN)


@triton.jit
def _attn_bwd_dq_convert_kernel(
    DQacc, DQ,
    sdqb, sdqh, sdqs, sdqd,
    Hq, Sq, scale, CuQ, TQ,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, ALIGN: tl.constexpr, RTNE_IN_SOFTWARE: tl.constexpr,
    VARLEN: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """dQ = scale * the float32 sums of the atomic dK/dV kernel, in dQ's dtype and strides. The sums'
    rows are the scratch rows (_scratch_row) x HEAD_DIM: (B, Hq, Sq, HEAD_DIM), or (Hq, TQ, HEAD_DIM) packed."""
    pid = tl.program_id(0)
    n_m_tiles = tl.cdiv(Sq, BLOCK_M)
    bh = pid // n_m_tiles
    m0 = pid % n_m_tiles * BLOCK_M
    h = bh % Hq
    b, Sq = _seq_span(CuQ, bh // Hq, Sq, VARLEN)
    if VARLEN:
        if m0 >= Sq:
            return  # a tile past the end of a sequence shorter than the longest
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    rows = DQacc + (_scratch_row(bh, h, b, Sq, TQ, VARLEN) + offs_m)[:, None] * HEAD_DIM
    acc = tl.load(rows + offs_d[None, :], mask=(offs_m[:, None] < Sq) & (offs_d[None, :] < HEAD_DIM), other=0.0)
    dq = cast_out(acc * scale, DQ.dtype.element_ty, RTNE_IN_SOFTWARE)
    _store_tile(_head_ptr(DQ, b, sdqb, h, sdqh, ALIGN), dq, offs_m, sdqs, offs_d, sdqd, Sq, HEAD_DIM,
                HEAD_DIM != BLOCK_D, ALIGN)


# --------------------------------------------------------------------------------------------
