"""FlashAttention-2 in Triton: forward and backward, any lengths, GQA, causal (bottom-right), any strides.

The ``triton`` backend of :mod:`fastgpt.ops.attention`, through three functions::

    unsupported_reason(q, k, v) -> str | None
    forward(q, k, v, out, lse, is_causal, scale, *, window, softcap, alibi_slopes) -> None
    backward(dout, q, k, v, out, lse, dlse, dq, dk, dv, is_causal, scale, deterministic=True, *, window, softcap,
             alibi_slopes) -> None

and of :mod:`fastgpt.ops.varlen_attention` (packed sequences, flash-attn's varlen layout) through
``varlen_unsupported_reason``, ``varlen_forward`` and ``varlen_backward``: the same kernels with the
``VARLEN`` constexpr, one launch per pass for the whole batch. Each program takes its sequence b
from the grid and reads its first token and length from the int32 cu_seqlens (``_seq_span``) before
the bound logic, which then sees that sequence's Sq and Sk; packed (T, H, D) tensors are passed with
their token stride as the batch stride, so a sequence starts at cu_seqlens[b] x that stride. The
grid has cdiv(max_seqlen, BLOCK) tiles per sequence; tiles past a sequence's end exit at once.

Tensors are logical (B, H, S, D) views with arbitrary strides (every stride is passed to the
kernels; nothing is copied or transposed): q (B, Hq, Sq, D), k (B, Hk, Sk, D), v (B, Hk, Sk, Dv),
out/dout (B, Hq, Sq, Dv), lse/dlse (B, Hq, Sq) float32 natural-log. Hq % Hk == 0 and query head h
reads kv head h // (Hq // Hk). float16 / bfloat16 / float32 inputs, float32 accumulation; float32
dots are exact ("ieee"), not TF32, so float32 results stay within the parity rule against torch.

Semantics (those of :func:`fastgpt.reference.attention_forward`): query i sees key j iff
j <= i + Sk - Sq when causal, and i + Sk - Sq - left <= j <= i + Sk - Sq + right with a sliding
window (flash-attn's ``window_size``; -1 unbounded; causal means right = 0); rows that see no key
give out = 0, lse = -inf, zero gradients. Optional, as in flash-attn: ``softcap`` c > 0 replaces the
scaled score s by c * tanh(s / c), then ALiBi adds -slope * |i + Sk - Sq - j|. Each of the three is
a constexpr (WINDOW, SOFTCAP, ALIBI): with all off the kernels compile to the dense code.

Kernels (FlashAttention-2, Dao 2023):

* ``_attn_fwd_kernel``: one program per (Q tile, batch, head); online softmax over K/V tiles in the
  exp2 domain (log2(e) folded into the scale); key tiles wholly above the causal diagonal (or outside
  every row's window) are never visited, tiles wholly visible run without masks, only the diagonal /
  window-edge / ragged-end tiles mask. A window of w keys costs ~Sq x (w + tiles), not Sq x Sk.
* ``_attn_bwd_preprocess_kernel``: delta = rowsum(dO * O) - dlse and the log2-domain lse.
* ``_attn_bwd_dkdv_kernel``: one program per (K tile, batch, kv head); loops over the query heads of
  its GQA group and their Q tiles, so the group's gradients are summed in registers (no atomics).
* ``_attn_bwd_dq_kernel``: one program per (Q tile, batch, head); loops over K/V tiles.

By default everything is deterministic: each output element is written by one program with a fixed
loop order, so two runs with the same config are bitwise equal. (On a GPU the config is tuned once per
process and shape class; see :func:`kernels._triton_utils.pick_config`.) ``deterministic=False`` is
FlashAttention-2's own backward: the dK/dV kernel (ATOMIC_DQ) also computes each tile's dS K and adds
it into a float32 dQ buffer with atomics (laid out as the scratch rows x D: packed sequences work the
same way), so there is no dQ kernel and its recomputation of S and dP
(5 matmuls per tile instead of 7), and ``_attn_bwd_dq_convert_kernel`` scales and casts the sums. The
order of the atomic adds, and so dq's last bits, varies from run to run; dk and dv do not change.

Head dims are padded to a power of two >= 16 inside the kernel (masks, no padded copies), which is
also what lets D < 16 and D = 40, 80, 96 run. Each launch is described by a
:class:`~kernels._triton_utils.LaunchPlan` from one of the ``*_plan`` functions, which the launchers
here and the offline kernel report both use; the tile configs are plain data in
:mod:`fastgpt.kernels.flash_attention_configs`.
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import Dict, List, NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastgpt.ops.attention import MAX_HEAD_DIM  # one limit: the op validates calls against it

from ._rounding import cast_out
from ._triton_utils import Config, LaunchPlan, ceil_div, interpreter_active, launch, length_bucket, next_pow2, pick_config
from .flash_attention_configs import (  # noqa: F401  (re-exported: the configs are part of this kernel's interface)
    ARCH_CONFIGS,
    CONFIGS,
    CONFIGS_FP32,
    CONFIGS_SM90,
    DECODE_CONFIGS,
    DECODE_MAX_SQ,
    INTERPRETER_CONFIGS,
    configs_for,
    default_configs,
    head_dim_bucket,
)


__all__ = [
    "unsupported_reason",
    "forward",
    "backward",
    "varlen_unsupported_reason",
    "varlen_forward",
    "varlen_backward",
    "Seqs",
    "CONFIGS",
    "CONFIGS_FP32",
    "INTERPRETER_CONFIGS",
    "DECODE_CONFIGS",
    "DECODE_MAX_SQ",
    "head_dim_bucket",
    "configs_for",
    "default_configs",
    "CONFIGS_SM90",
    "ARCH_CONFIGS",
    "forward_plan",
    "backward_plans",
    "example_plans",
]

LOG2E = 1.4426950408889634
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

def _arch(t: Tensor) -> Optional[int]:
    """Compute capability x 10 of a CUDA tensor's device (None elsewhere: meta and CPU tensors)."""
    if t.device.type != "cuda" or interpreter_active():
        return None
    major, minor = _capability(t.device.index if t.device.index is not None else torch.cuda.current_device())
    return major * 10 + minor


def _preprocess_block_m(block_dv: int) -> int:
    # ~64 elements of each of O and dO per thread (4 warps), whatever the head dim (also the dQ conversion's rows)
    return max(16, min(128, 8192 // block_dv))


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
# forward
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
# launch plans: the one place that turns tensors into kernel arguments
# --------------------------------------------------------------------------------------------


class Seqs(NamedTuple):
    """Packed sequences (flash-attn's varlen layout): int32 (B+1,) cu_seqlens of q and k, and the
    longest lengths, which size the grid (every sequence gets that many tiles; the extra ones exit)."""

    cu_q: Tensor
    cu_k: Tensor
    max_q: int
    max_k: int


def _strides(prefix: str, t: Tensor) -> Dict[str, int]:
    """Strides of a (B, H, S, D) tensor, or of a packed (T, H, D) one, whose "batch" stride is its
    token stride: the kernels offset a sequence by (its first token) x (that stride)."""
    if t.dim() == 3:
        return {f"{prefix}b": t.stride(0), f"{prefix}h": t.stride(1), f"{prefix}s": t.stride(0), f"{prefix}d": t.stride(2)}
    return {f"{prefix}{axis}": s for axis, s in zip("bhsd", t.stride())}


def _lse_strides(prefix: str, t: Tensor) -> Dict[str, int]:
    """Strides of a (B, H, S) log-sum-exp, or of a packed (H, T) one (batch stride = token stride)."""
    if t.dim() == 2:
        return {f"{prefix}b": t.stride(1), f"{prefix}h": t.stride(0), f"{prefix}s": t.stride(1)}
    return {f"{prefix}{axis}": s for axis, s in zip("bhs", t.stride())}


def _shape(q: Tensor, k: Tensor, seqs: Optional[Seqs]) -> Tuple[int, int, int, int, int]:
    """(B, Hq, Hk, Sq, Sk) of a call; packed: B sequences, the longest lengths."""
    if seqs is None:
        return q.shape[0], q.shape[1], k.shape[1], q.shape[2], k.shape[2]
    return seqs.cu_q.shape[0] - 1, q.shape[1], k.shape[1], seqs.max_q, seqs.max_k


def _seq_args(seqs: Optional[Seqs], q: Tensor, placeholder: Tensor) -> Dict[str, object]:
    """The kernels' packed-sequence arguments; dense calls pass a placeholder pointer (never read)."""
    if seqs is None:
        return {"CuQ": placeholder, "CuK": placeholder, "TQ": 0}
    return {"CuQ": seqs.cu_q, "CuK": seqs.cu_k, "TQ": q.shape[0]}


def _dot_precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32:
        return "ieee"
    if dtype == torch.bfloat16 and interpreter_active():
        return "bf16_via_fp32"
    return "tf32"  # ignored for 16-bit operands: they use the tensor cores' native format


def _stride_align(*tensors: Optional[Tensor]) -> int:
    """Largest power of two <= 16 dividing every row/head/batch stride of ``tensors``: the ALIGN hint.

    Triton only learns "divisible by 16" from an integer argument; a (B, H, S, 40) tensor has row
    stride 40, which is a multiple of 8 (16 bytes in 16-bit types), enough for vector loads."""
    align = 16
    for t in tensors:
        if t is not None:
            for s in t.stride()[:-1]:
                align = math.gcd(align, s)
    return align


def _common_constexprs(q: Tensor, v: Tensor, is_causal: bool, *tensors: Tensor) -> Dict[str, object]:
    d, dv = q.shape[-1], v.shape[-1]
    return {
        "IS_CAUSAL": bool(is_causal),
        "HEAD_DIM": d,
        "HEAD_DIM_V": dv,
        "BLOCK_D": max(16, next_pow2(d)),
        "BLOCK_DV": max(16, next_pow2(dv)),
        "DOT_PRECISION": _dot_precision(q.dtype),
        "ALIGN": _stride_align(q, v, *tensors),
    }


def _feature_args(sq: int, sk: int, is_causal: bool, window: Tuple[int, int], softcap: float,
                  alibi_slopes: Optional[Tensor], placeholder: Tensor) -> Tuple[Dict[str, object], Dict[str, object]]:
    """(runtime args, constexprs) of the sliding window, softcap and ALiBi: the kernels' trailing arguments.

    ``window`` is flash-attn's (left, right), -1 unbounded; when causal the right bound is the causal
    one (right = 0). A side that cannot bind becomes Sq + Sk (the plan's, the longest with packed
    sequences; the masks stay plain comparisons, and WINDOW is off when neither side binds).
    ``placeholder`` stands in for absent slopes (never read)."""
    never = sq + sk
    left, right = window
    left = never if left < 0 else min(left, never)
    right = 0 if is_causal else (never if right < 0 else min(right, never))
    alibi = alibi_slopes if alibi_slopes is not None else placeholder
    args = {"Alibi": alibi, "sab": alibi.stride(0) if alibi.dim() == 2 else 0, "sah": alibi.stride(-1),
            "win_left": left, "win_right": right, "softcap2": float(softcap) * LOG2E}
    window_on = left < never or (not is_causal and right < never)
    constexprs = {"WINDOW": window_on, "SOFTCAP": softcap > 0, "ALIBI": alibi_slopes is not None}
    return args, constexprs


def _tune_key(q: Tensor, k: Tensor, v: Tensor, is_causal: bool, sq: int, sk: int, varlen: bool,
              features: Tuple[bool, ...] = ()):
    return (
        q.dtype,
        q.device.index,
        q.shape[-1],
        v.shape[-1],
        bool(is_causal),
        q.shape[1] // k.shape[1] > 1,
        length_bucket(sq),
        length_bucket(sk),
        varlen,
        *features,
    )


def _grid(rows: int, programs: int, tiles_of: str):
    """Grid of ``programs`` x (tiles of ``rows``), flattened into axis 0 (no 65535 limit on B*H)."""

    def grid(config: Config) -> Tuple[int]:
        return (ceil_div(rows, getattr(config, tiles_of)) * programs,)

    return grid


def forward_plan(q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, is_causal: bool, scale: float,
                 arch: Optional[int] = None, seqs: Optional[Seqs] = None, *, window: Tuple[int, int] = (-1, -1),
                 softcap: float = 0.0, alibi_slopes: Optional[Tensor] = None) -> LaunchPlan:
    """The launch of the forward kernel for these tensors (shapes and options as in :func:`forward`, or
    packed as in :func:`varlen_forward` with ``seqs``); its candidate configs are those of ``arch``
    (default: q's GPU; see :func:`configs_for`)."""
    arch = arch if arch is not None else _arch(q)
    b, hq, hk, sq, sk = _shape(q, k, seqs)
    feature_args, features = _feature_args(sq, sk, is_causal, window, softcap, alibi_slopes, lse)
    constexprs = {**_common_constexprs(q, v, is_causal, k, out), "VARLEN": seqs is not None, **features}
    args = {
        "Q": q, "K": k, "V": v, "Out": out, "Lse": lse,
        **_strides("sq", q), **_strides("sk", k), **_strides("sv", v), **_strides("so", out), **_lse_strides("sl", lse),
        "Hq": hq, "GROUP": hq // hk, "Sq": sq, "Sk": sk, "qk_scale": float(scale) * LOG2E, **feature_args,
    }
    args.update({name: value for name, value in _seq_args(seqs, q, lse).items() if name != "TQ"})
    return LaunchPlan(
        name="fwd", kernel=_attn_fwd_kernel, args=args, constexprs=constexprs,
        configs=configs_for("fwd_decode" if sq <= DECODE_MAX_SQ else "fwd", head_dim_bucket(q.shape[-1], v.shape[-1]), q.dtype,
                            arch=arch),
        grid=_grid(sq, b * hq, "block_m"),
        tune_key=_tune_key(q, k, v, is_causal, sq, sk, seqs is not None, tuple(features.values())),
    )


def backward_plans(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, dlse: Optional[Tensor],
    dq: Tensor, dk: Tensor, dv: Tensor, is_causal: bool, scale: float, arch: Optional[int] = None,
    seqs: Optional[Seqs] = None,
    deterministic: bool = True, *,
    window: Tuple[int, int] = (-1, -1), softcap: float = 0.0, alibi_slopes: Optional[Tensor] = None,
) -> List[LaunchPlan]:
    """The three launches of the backward (preprocess, dK/dV, dQ), in order, with ``arch``'s configs
    (default: q's GPU); packed tensors with ``seqs``. Allocates the float32 scratch buffers delta and
    lse2 that connect them: (B, Hq, Sq), or (Hq, total_q) packed.
    With ``deterministic=False``: preprocess, the dK/dV kernel that also adds dQ into a zeroed float32
    buffer laid out as the scratch rows x D ((B, Hq, Sq, D), or (Hq, total_q, D) packed) with atomics
    ("bwd_dkdv_atomic"), and its conversion to dq ("bwd_dq_convert"); that buffer (args["DQacc"]) is
    allocated here and must be zeroed right before its launch (see backward)."""
    arch = arch if arch is not None else _arch(q)
    b, hq, hk, sq, sk = _shape(q, k, seqs)
    d, dv_dim = q.shape[-1], v.shape[-1]
    varlen = seqs is not None
    feature_args, features = _feature_args(sq, sk, is_causal, window, softcap, alibi_slopes, lse)
    constexprs = {**_common_constexprs(q, v, is_causal, k, out, dout, dq, dk, dv), "VARLEN": varlen, **features}
    bucket = head_dim_bucket(d, dv_dim)
    tune_key = _tune_key(q, k, v, is_causal, sq, sk, varlen, tuple(features.values()))
    delta = torch.empty(*((hq, q.shape[0]) if varlen else (b, hq, sq)), dtype=torch.float32, device=q.device)
    lse2 = torch.empty_like(delta)
    seq_args = _seq_args(seqs, q, lse)

    block_dv = constexprs["BLOCK_DV"]
    pre_block = INTERPRETER_CONFIGS["fwd"].block_m if interpreter_active() else _preprocess_block_m(block_dv)
    dlse_t = dlse if dlse is not None else lse  # a placeholder pointer, never read when HAS_DLSE is False
    pre = LaunchPlan(
        name="bwd_preprocess", kernel=_attn_bwd_preprocess_kernel,
        args={
            "Out": out, "DOut": dout, "Lse": lse, "DLse": dlse_t, "Delta": delta, "Lse2": lse2,
            **_strides("so", out), **_strides("sdo", dout), **_lse_strides("sl", lse), **_lse_strides("sdl", dlse_t),
            "Hq": hq, "Sq": sq, "CuQ": seq_args["CuQ"], "TQ": seq_args["TQ"],
        },
        constexprs={"HAS_DLSE": dlse is not None, "VARLEN": varlen, "HEAD_DIM_V": dv_dim, "BLOCK_DV": block_dv,
                    "ALIGN": constexprs["ALIGN"]},
        configs=(Config(pre_block, 0, 4, 1),),
        grid=_grid(sq, b * hq, "block_m"),
    )
    common = {
        "Q": q, "K": k, "V": v, "DOut": dout, "Lse2": lse2, "Delta": delta,
        **_strides("sq", q), **_strides("sk", k), **_strides("sv", v), **_strides("sdo", dout),
    }
    scales = {"scale": float(scale), "qk_scale": float(scale) * LOG2E, **feature_args}
    # (deterministic: DQacc is a placeholder pointer, never read, and the kernel compiles as without it)
    dq_acc = delta if deterministic else torch.empty(*delta.shape, d, dtype=torch.float32, device=q.device)
    dkdv = LaunchPlan(
        name="bwd_dkdv" if deterministic else "bwd_dkdv_atomic", kernel=_attn_bwd_dkdv_kernel,
        args={**common, "DK": dk, "DV": dv, **_strides("sdk", dk), **_strides("sdv", dv),
              "Hk": hk, "GROUP": hq // hk, "Sq": sq, "Sk": sk, **scales, **seq_args, "DQacc": dq_acc},
        constexprs={**constexprs, "ATOMIC_DQ": not deterministic},
        configs=configs_for("bwd_dkdv" if deterministic else "bwd_dkdv_atomic", bucket, q.dtype, arch=arch),
        grid=_grid(sk, b * hk, "block_n"), tune_key=tune_key,
    )
    if not deterministic:
        block_d = constexprs["BLOCK_D"]
        convert = LaunchPlan(
            name="bwd_dq_convert", kernel=_attn_bwd_dq_convert_kernel,
            args={"DQacc": dq_acc, "DQ": dq, **_strides("sdq", dq), "Hq": hq, "Sq": sq, "scale": float(scale),
                  "CuQ": seq_args["CuQ"], "TQ": seq_args["TQ"]},
            constexprs={"HEAD_DIM": d, "BLOCK_D": block_d, "ALIGN": _stride_align(dq),
                        "RTNE_IN_SOFTWARE": interpreter_active(), "VARLEN": varlen},
            configs=(Config(INTERPRETER_CONFIGS["fwd"].block_m if interpreter_active() else _preprocess_block_m(block_d), 0, 4, 1),),
            grid=_grid(sq, b * hq, "block_m"),
        )
        return [pre, dkdv, convert]
    dq_plan = LaunchPlan(
        name="bwd_dq", kernel=_attn_bwd_dq_kernel,
        args={**common, "DQ": dq, **_strides("sdq", dq), "Hq": hq, "GROUP": hq // hk, "Sq": sq, "Sk": sk, **scales,
              **seq_args},
        constexprs=constexprs, configs=configs_for("bwd_dq", bucket, q.dtype, arch=arch),
        grid=_grid(sq, b * hq, "block_m"), tune_key=tune_key,
    )
    return [pre, dkdv, dq_plan]


def example_plans(q: Tensor, k: Tensor, v: Tensor, is_causal: bool, scale: Optional[float] = None,
                  arch: Optional[int] = None, seqs: Optional[Seqs] = None, deterministic: bool = True, *,
                  window: Tuple[int, int] = (-1, -1), softcap: float = 0.0, alibi: bool = False) -> List[LaunchPlan]:
    """Every launch of a forward + backward on tensors shaped like q, k, v (meta tensors work);
    packed (T, H, D) tensors with ``seqs``.

    Outputs are allocated like the op layer does (contiguous); ``arch`` picks the candidate configs
    (meta tensors have no GPU: None gives the generic list); ``window``, ``softcap`` and ``alibi``
    (slopes of shape (Hq,)) pick the variant. For the kernel report: compile each plan with each of
    its configs via :func:`fastgpt.tools.inspect.compiling.compile_plan`.
    """
    d = q.shape[-1]
    scale = scale if scale is not None else d ** -0.5
    out = torch.empty(*q.shape[:-1], v.shape[-1], dtype=q.dtype, device=q.device)
    lse_shape = (q.shape[1], q.shape[0]) if seqs is not None else q.shape[:-1]
    lse = torch.empty(*lse_shape, dtype=torch.float32, device=q.device)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    opts = {"window": window, "softcap": softcap,
            "alibi_slopes": torch.empty(q.shape[1], dtype=torch.float32, device=q.device) if alibi else None}
    fwd = forward_plan(q, k, v, out, lse, is_causal, scale, arch, seqs, **opts)
    return [fwd, *backward_plans(torch.empty_like(out), q, k, v, out, lse, None, dq, dk, dv, is_causal, scale, arch, seqs,
                                 deterministic, **opts)]


# --------------------------------------------------------------------------------------------
# the backend interface
# --------------------------------------------------------------------------------------------


def _in_head_extent(t: Tensor) -> int:
    """Largest element offset inside one (batch, head) slice: the kernels index it with int32."""
    return sum((n - 1) * s for n, s in zip(t.shape[2:], t.stride()[2:]))


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> Tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def unsupported_reason(q: Tensor, k: Tensor, v: Tensor) -> Optional[str]:
    """Why the kernel cannot take this call, or None. (Shapes and devices are validated upstream.)"""
    if q.dtype not in SUPPORTED_DTYPES:
        return f"dtype {q.dtype} is not supported by the triton kernel (float16, bfloat16, float32)"
    if max(q.shape[-1], v.shape[-1]) > MAX_HEAD_DIM:
        return f"head dim {max(q.shape[-1], v.shape[-1])} exceeds the kernel's {MAX_HEAD_DIM}"
    if q.device.type == "cuda":
        major, minor = _capability(q.device.index if q.device.index is not None else torch.cuda.current_device())
        if major < 8:
            return f"the triton kernel needs compute capability 8.0 (Ampere) or newer; this GPU has {major}.{minor}"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if _in_head_extent(t) >= 2**31:
            return f"{name} spans more than 2**31 elements within one (batch, head) slice (32-bit in-kernel offsets)"
    return None


def forward(q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, is_causal: bool, scale: float, *,
            window: Tuple[int, int] = (-1, -1), softcap: float = 0.0, alibi_slopes: Optional[Tensor] = None) -> None:
    """Write ``out`` (B, Hq, Sq, Dv) in q's dtype and ``lse`` (B, Hq, Sq) float32 (natural log).

    q (B, Hq, Sq, D), k (B, Hk, Sk, D), v (B, Hk, Sk, Dv), any strides; Sq, Sk >= 1. ``window`` (left,
    right; -1 unbounded; right is 0 when causal), ``softcap`` (0: off) and ``alibi_slopes`` ((Hq,) or
    (B, Hq) float32 on q's device, or None) as flash-attn defines them (validated upstream).
    """
    with _on_device(q):
        launch(forward_plan(q, k, v, out, lse, is_causal, scale, window=window, softcap=softcap, alibi_slopes=alibi_slopes))


def backward(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, dlse: Optional[Tensor],
    dq: Tensor, dk: Tensor, dv: Tensor, is_causal: bool, scale: float, deterministic: bool = True, *,
    window: Tuple[int, int] = (-1, -1), softcap: float = 0.0, alibi_slopes: Optional[Tensor] = None,
) -> None:
    """Write dq, dk, dv (shapes of q, k, v; any strides) from dout (shape of out) and ``dlse``
    (None or (B, Hq, Sq), the gradient flowing into lse); options as in :func:`forward` (the slopes
    get no gradient). GQA gradients are summed over each kv head's query heads inside the dK/dV
    kernel. Deterministic by default; ``deterministic=False`` computes dQ in the dK/dV kernel with
    float32 atomics (5 matmuls per tile instead of 7; dq's rounding varies from run to run, dk and dv
    stay bitwise reproducible)."""
    with _on_device(q):
        _launch_backward(backward_plans(dout, q, k, v, out, lse, dlse, dq, dk, dv, is_causal, scale,
                                        deterministic=deterministic, window=window, softcap=softcap,
                                        alibi_slopes=alibi_slopes))


def _launch_backward(plans: List[LaunchPlan]) -> None:
    for plan in plans:
        if plan.name == "bwd_dkdv_atomic":
            pick_config(plan)  # a first call may tune: those runs add into DQacc too, so zero it after
            plan.args["DQacc"].zero_()
        launch(plan)


def varlen_unsupported_reason(q: Tensor, k: Tensor, v: Tensor, max_seqlen_q: int, max_seqlen_k: int) -> Optional[str]:
    """:func:`unsupported_reason` for packed q (Tq, Hq, D), k (Tk, Hk, D), v (Tk, Hk, Dv): judged on
    the (1, H, S, D) view of the longest sequence each may hold."""
    views = (t[:n].transpose(0, 1).unsqueeze(0) for t, n in ((q, max_seqlen_q), (k, max_seqlen_k), (v, max_seqlen_k)))
    return unsupported_reason(*views)


def _seqs(cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, max_seqlen_q: int, max_seqlen_k: int) -> Seqs:
    # the kernels read cu[b] at offset b: a strided cu_seqlens is copied (B + 1 ints)
    return Seqs(cu_seqlens_q.contiguous(), cu_seqlens_k.contiguous(), int(max_seqlen_q), int(max_seqlen_k))


def varlen_forward(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, max_seqlen_q: int,
                   max_seqlen_k: int, out: Tensor, lse: Tensor, is_causal: bool, scale: float, *,
                   window: Tuple[int, int] = (-1, -1), softcap: float = 0.0, alibi_slopes: Optional[Tensor] = None) -> None:
    """Packed sequences, one launch: write ``out`` (Tq, Hq, Dv) and ``lse`` (Hq, Tq) float32.

    q (Tq, Hq, D), k (Tk, Hk, D), v (Tk, Hk, Dv), any strides; sequence b is rows
    cu_seqlens_q[b]:cu_seqlens_q[b+1] of q (int32, validated upstream) and likewise of k and v;
    max_seqlen_* at least the longest sequence, >= 1. Options as in :func:`forward`, per sequence
    (alibi_slopes (B, Hq): row b is sequence b's)."""
    seqs = _seqs(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    with _on_device(q):
        launch(forward_plan(q, k, v, out, lse, is_causal, scale, seqs=seqs, window=window, softcap=softcap,
                            alibi_slopes=alibi_slopes))


def varlen_backward(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, dlse: Optional[Tensor],
    dq: Tensor, dk: Tensor, dv: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, max_seqlen_q: int,
    max_seqlen_k: int, is_causal: bool, scale: float, deterministic: bool = True, *,
    window: Tuple[int, int] = (-1, -1), softcap: float = 0.0, alibi_slopes: Optional[Tensor] = None,
) -> None:
    """:func:`backward` for packed sequences (layouts and options as in :func:`varlen_forward`; dlse None
    or (Hq, Tq)); ``deterministic=False`` as there (the float32 dQ sums are (Hq, Tq, D))."""
    seqs = _seqs(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    with _on_device(q):
        _launch_backward(backward_plans(dout, q, k, v, out, lse, dlse, dq, dk, dv, is_causal, scale, seqs=seqs,
                                        deterministic=deterministic, window=window, softcap=softcap,
                                        alibi_slopes=alibi_slopes))


def _on_device(t: Tensor):
    """Triton launches on the current CUDA device: make it the tensors' (they may be on cuda:1)."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()
