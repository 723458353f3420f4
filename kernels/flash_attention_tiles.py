"""The flash-attention kernels' @triton.jit building blocks (see :mod:`fastgpt.kernels.flash_attention`).

Tile access and dots (masks and hints are compile-time choices, so full tiles carry no masks), each
program's sequence and query tile (``_seq_span``, ``_scratch_row``, ``_q_tile``; packed sequences with
VARLEN), and the sliding-window / softcap / ALiBi helpers, each behind its own constexpr.
"""

import triton
import triton.language as tl


# --------------------------------------------------------------------------------------------
# tile access and dots (masks and hints are compile-time choices, so full tiles carry no masks)
# --------------------------------------------------------------------------------------------


@triton.jit
def _head_ptr(ptr, b, stride_b, h, stride_h, ALIGN: tl.constexpr):
    """Start of the (batch b, head h) slice, in 64-bit arithmetic (B*H*S*D may exceed 2**31)."""
    if ALIGN > 1 and ALIGN < 16:  # see _tile_ptrs
        stride_b = stride_b // ALIGN * ALIGN
        stride_h = stride_h // ALIGN * ALIGN
    return ptr + b.to(tl.int64) * stride_b + h.to(tl.int64) * stride_h


@triton.jit
def _tile_ptrs(base, rows, stride_row, cols, stride_col, ALIGN: tl.constexpr):
    # ALIGN: the launcher checked every stride is a multiple of it. Triton itself only learns
    # "divisible by 16" from an integer argument, so a (B, H, S, 40) tensor (row stride 40) would
    # load element by element and skip the cp.async pipeline. s // ALIGN * ALIGN (exact here) tells
    # it rows start 16-byte aligned in 16-bit types. (tl.multiple_of on a scalar does not stick.)
    if ALIGN > 1 and ALIGN < 16:
        stride_row = stride_row // ALIGN * ALIGN
    return base + rows[:, None] * stride_row + cols[None, :] * stride_col


@triton.jit
def _load_tile(base, rows, stride_row, cols, stride_col, n_rows, N_COLS: tl.constexpr,
               MASK_ROWS: tl.constexpr, MASK_COLS: tl.constexpr, ALIGN: tl.constexpr):
    """A (rows, cols) tile, zero outside rows < n_rows (if MASK_ROWS) and cols < N_COLS (if MASK_COLS)."""
    ptrs = _tile_ptrs(base, rows, stride_row, cols, stride_col, ALIGN)
    if MASK_ROWS:
        if MASK_COLS:
            x = tl.load(ptrs, mask=(rows[:, None] < n_rows) & (cols[None, :] < N_COLS), other=0.0)
        else:
            x = tl.load(ptrs, mask=rows[:, None] < n_rows, other=0.0)
    else:
        if MASK_COLS:
            x = tl.load(ptrs, mask=cols[None, :] < N_COLS, other=0.0)
        else:
            x = tl.load(ptrs)
    return x


@triton.jit
def _store_tile(base, x, rows, stride_row, cols, stride_col, n_rows, N_COLS: tl.constexpr,
                MASK_COLS: tl.constexpr, ALIGN: tl.constexpr):
    ptrs = _tile_ptrs(base, rows, stride_row, cols, stride_col, ALIGN)
    if MASK_COLS:
        tl.store(ptrs, x.to(base.dtype.element_ty), mask=(rows[:, None] < n_rows) & (cols[None, :] < N_COLS))
    else:
        tl.store(ptrs, x.to(base.dtype.element_ty), mask=rows[:, None] < n_rows)


@triton.jit
def _dot(a, b, acc, DOT_PRECISION: tl.constexpr):
    """a @ b (+ acc) in float32. "ieee": exact float32 products (float32 inputs; TF32 would break
    parity with torch). "bf16_via_fp32": bfloat16 operands upcast first, for the interpreter only,
    whose tl.dot multiplies bfloat16 bit patterns (triton-lang/triton#11584); bf16 products are
    exact in float32, so this is what a tensor core computes."""
    if DOT_PRECISION == "bf16_via_fp32":
        c = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        c = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    return c


# --------------------------------------------------------------------------------------------
# each program's sequence and tile (packed sequences: VARLEN), shared by the forward and dQ kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _seq_span(Cu, b, S, VARLEN: tl.constexpr):
    """(index, length) of sequence b: its first row in units of the tensors' batch strides, and its
    length. Dense: (b, S). VARLEN (packed tokens, whose "batch" strides are the token strides, see
    _strides): (cu[b], cu[b+1] - cu[b]), read from the int32 cu_seqlens ``Cu``."""
    if VARLEN:
        start = tl.load(Cu + b)
        return start, tl.load(Cu + b + 1) - start
    else:
        return b, S


@triton.jit
def _scratch_row(bh, h, b, Sq, TQ, VARLEN: tl.constexpr):
    """Offset of row 0 of (batch, head) bh in the float32 delta / lse2 scratch: (B, Hq, Sq) dense,
    (Hq, TQ) packed (b: the sequence's first token, TQ: the total number of query tokens)."""
    if VARLEN:
        return h.to(tl.int64) * TQ + b
    else:
        return bh.to(tl.int64) * Sq


@triton.jit
def _q_tile(Hq, GROUP, Sq, Sk, CuQ, CuK, IS_CAUSAL: tl.constexpr, VARLEN: tl.constexpr, BLOCK_M: tl.constexpr,
            BLOCK_N: tl.constexpr):
    """The query tile of this program (forward and dQ kernels) and the key range it visits.

    Returns (bh, b, bk, h, hk, m0, Sq, Sk, causal_offset, full, hi): the (batch, head) index bh,
    the indices of the sequence's first query and key rows (b, bk: see _seq_span) and its lengths,
    h and hk the query head and its kv head (GQA), m0 the tile's first row; key tiles [0, full) are
    visible to every row of the tile, [full, hi) need the causal mask. Causal grids run the longest
    rows first (better tail balance). VARLEN: Sq, Sk come in as the longest lengths (the grid has
    that many tiles per sequence) and go out as this sequence's; tiles with m0 >= Sq have no rows.
    """
    pid = tl.program_id(0)
    n_m_tiles = tl.cdiv(Sq, BLOCK_M)
    bh = pid // n_m_tiles
    tile = pid % n_m_tiles
    if IS_CAUSAL:
        tile = n_m_tiles - 1 - tile
    h = bh % Hq
    m0 = tile * BLOCK_M
    b, Sq = _seq_span(CuQ, bh // Hq, Sq, VARLEN)
    bk, Sk = _seq_span(CuK, bh // Hq, Sk, VARLEN)
    causal_offset = Sk - Sq
    if IS_CAUSAL:
        hi = tl.maximum(tl.minimum(Sk, m0 + BLOCK_M + causal_offset), 0)
        full = tl.minimum(tl.maximum(m0 + causal_offset + 1, 0) // BLOCK_N * BLOCK_N, Sk // BLOCK_N * BLOCK_N)
    else:
        hi = Sk
        full = Sk // BLOCK_N * BLOCK_N
    return bh, b, bk, h, h // GROUP, m0, Sq, Sk, causal_offset, full, hi


# --------------------------------------------------------------------------------------------
# sliding window, softcap, ALiBi: each one a constexpr, so with all off nothing here is compiled
# --------------------------------------------------------------------------------------------


@triton.jit
def _tanh(x):
    """float32 tanh with one special-function op (exp2), as flash-attn's tanh.approx (libdevice's tanhf
    takes two, exp2 and a reciprocal, and does not run in the interpreter). |x| >= 0.625: (1 - e) / (1 + e),
    e = exp(-2|x|), the reciprocal of 1 + e (in [1, 1.2865]) from a minimax line and two Newton steps on
    the FMA pipe; below: x + x^3 P(x^2), P fitted to tanh on [0, 0.625]. About 2 ulp in float32."""
    ax = tl.abs(x)
    e = tl.math.exp2(ax * -2.8853900817779268)
    z = 1.0 + e
    r = 1.763237 - 0.7711495 * z
    r = r + r * (1.0 - z * r)
    r = r + r * (1.0 - z * r)
    big = (1.0 - e) * r
    z = x * x
    p = (((-0.0057875774800777435 * z + 0.020711632445454597) * z - 0.05376141145825386) * z
         + 0.13331693410873413) * z - 0.333332896232605
    return tl.where(ax >= 0.625, tl.where(x < 0.0, -big, big), x + x * z * p)


@triton.jit
def _score_mods(s, i, j, causal_offset, softcap2, slope2, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr):
    """Softcap, then ALiBi, on log2-domain scaled scores s of queries i and keys j (broadcast index
    tiles), in flash-attn's order: softcap2 * tanh(s / softcap2), then - slope2 * |i + Sk - Sq - j|
    (softcap2, slope2 carry the log2(e) factor). Returns (s, t = the tanh), t for the backward's 1 - t^2."""
    t = s
    if SOFTCAP:
        t = _tanh(s * (1.0 / softcap2))
        s = softcap2 * t
    if ALIBI:
        # distances in float32 (exact below 2**24): converts the index vectors, not the tile
        s = s - slope2 * tl.abs((i + causal_offset).to(tl.float32) - j.to(tl.float32))
    return s, t


@triton.jit
def _alibi_slope(Alibi, b, h, sab, sah, ALIBI: tl.constexpr):
    """Head h's ALiBi slope (of batch b: the slopes are (Hq,) with sab = 0, or (B, Hq)) times log2(e)."""
    if ALIBI:
        return tl.load(Alibi + b * sab + h * sah).to(tl.float32) * 1.4426950408889634
    else:
        return 0.0


@triton.jit
def _in_window(i, j, causal_offset, win_left, win_right, IS_CAUSAL: tl.constexpr):
    """Key j inside query i's window [i + Sk - Sq - left, i + Sk - Sq + right] (flash-attn's); the right
    bound is the causal mask's when causal. An unbounded side comes as a length that never binds."""
    keep = j >= i + causal_offset - win_left
    if not IS_CAUSAL:
        keep = keep & (j <= i + causal_offset + win_right)
    return keep


@triton.jit
def _gap_end(hi, gap_lo, gap_hi, SKIP: tl.constexpr):
    """One masked loop serves both window edges, [lo, gap_lo) and [gap_hi, hi): it runs gap_hi - gap_lo
    keys short and jumps the unmasked middle (a second masked loop would cost registers: it spilled the
    d=128 forward on sm_80)."""
    if SKIP:
        return hi - (gap_hi - gap_lo)
    else:
        return hi


@triton.jit
def _gap_skip(it, gap_lo, gap_hi, SKIP: tl.constexpr):
    if SKIP:
        return tl.where(it < gap_lo, it, it + (gap_hi - gap_lo))
    else:
        return it


@triton.jit
def _window_key_range(m0, Sk, causal_offset, win_left, win_right, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key tiles of query tile [m0, m0 + BLOCK_M) under the window (win_right = 0 when causal): (lo,
    full_lo, full, hi); [full_lo, full) lie in every row's window, [lo, full_lo) and [full, hi) mask, and
    tiles outside [lo, hi) are in no row's window and never visited: work ~ Sq x window, not Sq x Sk."""
    hi = tl.maximum(tl.minimum(Sk, m0 + BLOCK_M + causal_offset + win_right), 0)
    lo = tl.minimum(tl.maximum(m0 + causal_offset - win_left, 0) // BLOCK_N * BLOCK_N, hi)
    full_lo = (tl.maximum(m0 + BLOCK_M - 1 + causal_offset - win_left, 0) + BLOCK_N - 1) // BLOCK_N * BLOCK_N
    full = tl.minimum(tl.maximum(m0 + causal_offset + win_right + 1, 0) // BLOCK_N * BLOCK_N, Sk // BLOCK_N * BLOCK_N)
    full_lo = tl.minimum(tl.maximum(full_lo, lo), hi)
    full = tl.minimum(tl.maximum(full, full_lo), hi)
    return lo, full_lo, full, hi


@triton.jit
def _window_query_range(n0, Sq, causal_offset, win_left, win_right, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Query tiles that see key tile [n0, n0 + BLOCK_N) under the window (key j is seen by queries
    [j - Sk + Sq - right, j - Sk + Sq + left]): (m_lo, m_full, m_end, m_hi); [m_full, m_end) see the
    whole tile, [m_lo, m_full) and [m_end, m_hi) mask, the others see none of it."""
    m_hi = tl.minimum(tl.maximum(n0 + BLOCK_N - causal_offset + win_left, 0), Sq)
    m_lo = tl.minimum(tl.maximum(n0 - causal_offset - win_right, 0) // BLOCK_M * BLOCK_M, m_hi)
    m_full = (tl.maximum(n0 + BLOCK_N - 1 - causal_offset - win_right, 0) + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    m_end = tl.maximum(n0 - causal_offset + win_left + 1, 0) // BLOCK_M * BLOCK_M
    m_full = tl.minimum(tl.maximum(m_full, m_lo), m_hi)
    m_end = tl.minimum(tl.maximum(m_end, m_full), m_hi)
    return m_lo, m_full, m_end, m_hi
