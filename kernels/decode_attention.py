"""Split-KV decoding attention (flash-decoding) in Triton: a few queries against a long KV cache.

The ``triton`` backend of :func:`fastgpt.flash_attn_with_kvcache` (:mod:`fastgpt.ops.decode_attention`)::

    unsupported_reason(q, k_cache, v_cache) -> str | None
    forward(q, k_cache, v_cache, seqlens, batch_idx, block_table, out, lse, causal, scale, num_splits) -> None

Layouts are flash-attn's: q (B, Sq, Hq, D), out (B, Sq, Hq, Dv) in q's dtype, lse (B, Hq, Sq)
float32; contiguous caches (B_cache, S_cache, Hk, D) addressed through ``batch_idx`` (B,) int32, or
paged caches (num_blocks, PAGE, Hk, D) addressed through ``block_table`` (B, max_blocks) int32;
``seqlens`` (B,) int32 is each sequence's length L (keys 0..L-1 are attended). Any strides.

Kernels (Dao et al., "Flash-Decoding for long-context inference", 2023):

* ``_decode_split_kernel``: one program per (batch, kv head, split). Its query tile packs the
  GROUP = Hq / Hk query heads of the kv head times the Sq queries (row r = g * Sq + i), so each K/V
  byte of the cache is read once per kv head, not once per query head. The split covers a run of
  BLOCK_N-key tiles of [0, L); it writes a float32 partial output (normalised) and partial LSE.
* ``_decode_combine_kernel``: one program per (batch, query head, query): merges the splits'
  partials by their LSEs (out = sum_s exp(lse_s - lse) out_s), writes out and lse.

Causal semantics are the main kernel's bottom-right rule: query i of Sq sees key j iff
j <= i + L - Sq; rows that see no key give out = 0 and lse = -inf. A paged cache's page size must
be a multiple of the key tile (:data:`PAGE_MULTIPLE`), so a key tile never straddles two pages.
"""

from __future__ import annotations

import contextlib
import math
from typing import Dict, List, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._triton_utils import Config, LaunchPlan, ceil_div, interpreter_active, launch, length_bucket, next_pow2
from .flash_attention import LOG2E, SUPPORTED_DTYPES, _dot_precision, head_dim_bucket
from .flash_attention_tiles import _dot

__all__ = ["unsupported_reason", "forward", "forward_plans", "example_plans", "choose_num_splits", "PAGE_MULTIPLE",
           "MAX_SQ", "MAX_SPLITS", "CONFIGS"]

MAX_SQ = 16  # queries per sequence the decode kernel takes (GROUP * Sq rows form one tile)
MAX_SPLITS = 128
PAGE_MULTIPLE = 16  # a paged cache's page size must be a multiple of every key tile below
INTERPRETER_SMS = 132  # the SM count num_splits=0 assumes where there is no GPU (an H100's)

C = Config
# candidates for the tuner (the first is the default); `fastgpt inspect` compiles them all spill-free
_16BIT = (C(16, 64, 4, 3), C(16, 64, 4, 2), C(16, 128, 4, 2), C(16, 32, 4, 4))
# BLOCK_M is the packed query tile (GROUP * Sq rows, padded to a power of two >= 16, set per call);
# the configs choose the key tile. 16-bit: K and V tiles of BLOCK_N x D stream through shared memory.
CONFIGS: Dict[str, Dict[int, Tuple[Config, ...]]] = {
    "16bit": {**{bucket: _16BIT for bucket in (16, 32, 64, 128)}, 256: (C(16, 32, 4, 2), C(16, 64, 4, 1))},
    "fp32": {16: (C(16, 32, 4, 2),), 32: (C(16, 32, 4, 2),), 64: (C(16, 32, 4, 2),),
             128: (C(16, 32, 4, 2),), 256: (C(16, 16, 4, 2),)},
}
INTERPRETER_CONFIG = C(16, 16, 4, 1)
del C, _16BIT


@triton.jit
def _decode_split_kernel(
    Q, K, V, SeqLens, BatchIdx, BlockTable, OPart, LsePart,
    sqb, sqs, sqh, sqd,
    skb, sks, skh, skd,
    svb, svs, svh, svd,
    sbt,
    Hk, GROUP, Sq, NUM_SPLITS, qk_scale,
    IS_CAUSAL: tl.constexpr, PAGED: tl.constexpr, PAGE_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    bhk = tl.program_id(0)
    split = tl.program_id(1)
    b = bhk // Hk
    hk = bhk % Hk
    L = tl.load(SeqLens + b)
    # this split's run of key tiles of [0, L)
    tiles_per_split = tl.cdiv(tl.cdiv(L, BLOCK_N), NUM_SPLITS)
    lo = split * tiles_per_split * BLOCK_N
    hi = tl.minimum(lo + tiles_per_split * BLOCK_N, L)

    rows = tl.arange(0, BLOCK_M)  # row r = query head g of the group, query i
    g = rows // Sq
    qi = rows % Sq
    row_ok = rows < GROUP * Sq
    h = hk * GROUP + g
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q_ptrs = (Q + b.to(tl.int64) * sqb + qi[:, None] * sqs + h[:, None].to(tl.int64) * sqh + offs_d[None, :] * sqd)
    q = tl.load(q_ptrs, mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    if PAGED:
        cache_b = b  # unused: pages come from the block table
    else:
        cache_b = tl.load(BatchIdx + b)
    last_key = qi + L - Sq  # causal: the last key each row sees

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        if PAGED:
            page = tl.load(BlockTable + b.to(tl.int64) * sbt + start_n // PAGE_SIZE).to(tl.int64)
            slot = (start_n % PAGE_SIZE) + tl.arange(0, BLOCK_N)
        else:
            page = cache_b.to(tl.int64)
            slot = offs_n
        key_ok = offs_n < hi
        k_base = K + page * skb + hk.to(tl.int64) * skh
        v_base = V + page * svb + hk.to(tl.int64) * svh
        k = tl.load(k_base + slot[:, None] * sks + offs_d[None, :] * skd,
                    mask=key_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
        s = _dot(q, tl.trans(k), None, DOT_PRECISION) * qk_scale
        keep = key_ok[None, :]
        if IS_CAUSAL:
            keep = keep & (offs_n[None, :] <= last_key[:, None])
        s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no key yet: exp2(-inf) = 0, not nan
        p = tl.math.exp2(s - m_sub[:, None])
        alpha = tl.math.exp2(m_i - m_sub)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + slot[:, None] * svs + offs_dv[None, :] * svd,
                    mask=key_ok[:, None] & (offs_dv[None, :] < HEAD_DIM_V), other=0.0)
        acc = _dot(p.to(v.dtype), v, acc * alpha[:, None], DOT_PRECISION)
        m_i = m_new

    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)
    # partials: (B, Hq, Sq, NUM_SPLITS[, Dv]) contiguous float32
    prow = ((b * Hk * GROUP + h).to(tl.int64) * Sq + qi) * NUM_SPLITS + split
    tl.store(LsePart + prow, lse, mask=row_ok)
    tl.store(OPart + prow[:, None] * HEAD_DIM_V + offs_dv[None, :], acc / l_safe[:, None],
             mask=row_ok[:, None] & (offs_dv[None, :] < HEAD_DIM_V))


@triton.jit
def _decode_combine_kernel(
    OPart, LsePart, Out, Lse,
    sob, sos, soh, sod,
    slb, slh, sls,
    Hq, Sq, NUM_SPLITS,
    HEAD_DIM_V: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_S: tl.constexpr,
):
    row = tl.program_id(0)  # (b, h, i) of a (B, Hq, Sq) grid
    i = row % Sq
    h = (row // Sq) % Hq
    b = row // (Sq * Hq)
    offs_s = tl.arange(0, BLOCK_S)
    offs_dv = tl.arange(0, BLOCK_DV)
    s_ok = offs_s < NUM_SPLITS
    base = row.to(tl.int64) * NUM_SPLITS
    lse_s = tl.load(LsePart + base + offs_s, mask=s_ok, other=float("-inf"))
    m = tl.max(lse_s, 0)
    m_sub = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp(lse_s - m_sub)  # 0 for empty splits
    total = tl.sum(w, 0)
    o = tl.load(OPart + (base + offs_s[:, None]) * HEAD_DIM_V + offs_dv[None, :],
                mask=s_ok[:, None] & (offs_dv[None, :] < HEAD_DIM_V), other=0.0)
    total_safe = tl.where(total == 0.0, 1.0, total)
    out = tl.sum(o * w[:, None], 0) / total_safe
    lse = tl.where(total == 0.0, float("-inf"), m_sub + tl.log(total_safe))
    tl.store(Out + b.to(tl.int64) * sob + i * sos + h.to(tl.int64) * soh + offs_dv * sod,
             out.to(Out.dtype.element_ty), mask=offs_dv < HEAD_DIM_V)
    tl.store(Lse + b.to(tl.int64) * slb + h.to(tl.int64) * slh + i * sls, lse)


# --------------------------------------------------------------------------------------------
# launch plans
# --------------------------------------------------------------------------------------------


def _configs(dtype: torch.dtype, bucket: int) -> Tuple[Config, ...]:
    if interpreter_active():
        return (INTERPRETER_CONFIG,)
    return CONFIGS["fp32" if dtype == torch.float32 else "16bit"][bucket]


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return INTERPRETER_SMS


def choose_num_splits(batch: int, kv_heads: int, max_len: int, sms: int, block_n: int) -> int:
    """Splits for ``num_splits=0``: enough (batch, kv head, split) programs to fill the GPU about twice
    (``sms`` SMs), never more than the key tiles of ``max_len`` (the cache's capacity: the launcher
    does not read the lengths back from the device) nor so many that a split gets under 4 tiles."""
    programs = max(1, batch * kv_heads)
    if programs >= sms:
        return 1
    want = ceil_div(2 * sms, programs)
    tiles = max(1, ceil_div(max_len, block_n))
    return max(1, min(want, ceil_div(tiles, 4), MAX_SPLITS))


def forward_plans(q: Tensor, k_cache: Tensor, v_cache: Tensor, seqlens: Tensor, batch_idx: Optional[Tensor],
                  block_table: Optional[Tensor], out: Tensor, lse: Tensor, causal: bool, scale: float,
                  num_splits: int) -> List[LaunchPlan]:
    """The split and combine launches for these tensors (as in :func:`forward`); allocates the partials."""
    b, sq, hq, d = q.shape
    hk, dv = k_cache.shape[2], v_cache.shape[-1]
    group = hq // hk
    bucket = head_dim_bucket(d, dv)
    configs = _configs(q.dtype, bucket)
    paged = block_table is not None
    if paged:  # a key tile must not straddle two pages: the page size (a multiple of 16) bounds it
        configs = tuple(Config(c.block_m, math.gcd(c.block_n, k_cache.shape[1]), c.num_warps, c.num_stages) for c in configs)
    block_n = configs[0].block_n
    capacity = block_table.shape[1] * k_cache.shape[1] if paged else k_cache.shape[1]
    if num_splits <= 0:
        num_splits = choose_num_splits(b, hk, capacity, _sm_count(q.device), block_n)
    num_splits = max(1, min(int(num_splits), MAX_SPLITS))
    block_m = max(16, next_pow2(group * sq))
    configs = tuple(Config(block_m, c.block_n, c.num_warps, c.num_stages) for c in configs)
    o_part = torch.empty(b, hq, sq, num_splits, dv, dtype=torch.float32, device=q.device)
    lse_part = torch.empty(b, hq, sq, num_splits, dtype=torch.float32, device=q.device)
    table = block_table if paged else seqlens  # a placeholder pointer when contiguous (never read)
    if batch_idx is None:  # contiguous: sequence b is cache row b (paged: a placeholder, never read)
        batch_idx = seqlens if paged else torch.arange(b, dtype=torch.int32, device=q.device)
    split = LaunchPlan(
        name="decode_split", kernel=_decode_split_kernel,
        args={"Q": q, "K": k_cache, "V": v_cache, "SeqLens": seqlens, "BatchIdx": batch_idx, "BlockTable": table,
              "OPart": o_part, "LsePart": lse_part,
              **dict(zip(("sqb", "sqs", "sqh", "sqd"), q.stride())), **dict(zip(("skb", "sks", "skh", "skd"), k_cache.stride())),
              **dict(zip(("svb", "svs", "svh", "svd"), v_cache.stride())), "sbt": table.stride(0),
              "Hk": hk, "GROUP": group, "Sq": sq, "NUM_SPLITS": num_splits, "qk_scale": float(scale) * LOG2E},
        constexprs={"IS_CAUSAL": bool(causal), "PAGED": paged, "PAGE_SIZE": k_cache.shape[1] if paged else 1,
                    "HEAD_DIM": d, "HEAD_DIM_V": dv, "BLOCK_D": max(16, next_pow2(d)), "BLOCK_DV": max(16, next_pow2(dv)),
                    "DOT_PRECISION": _dot_precision(q.dtype)},
        configs=configs, grid=lambda c: (b * hk, num_splits),
        tune_key=(q.dtype, q.device.index, d, dv, block_m, paged, bool(causal), num_splits, length_bucket(capacity)),
    )  # fmt: skip
    combine = LaunchPlan(
        name="decode_combine", kernel=_decode_combine_kernel,
        args={"OPart": o_part, "LsePart": lse_part, "Out": out, "Lse": lse,
              **dict(zip(("sob", "sos", "soh", "sod"), out.stride())), **dict(zip(("slb", "slh", "sls"), lse.stride())),
              "Hq": hq, "Sq": sq, "NUM_SPLITS": num_splits},
        constexprs={"HEAD_DIM_V": dv, "BLOCK_DV": max(16, next_pow2(dv)), "BLOCK_S": max(2, next_pow2(num_splits))},
        configs=(Config(0, 0, 4 if dv >= 128 else 2, 1),), grid=lambda c: (b * hq * sq,),
    )  # fmt: skip
    return [split, combine]


def example_plans(b: int, hq: int, hk: int, sq: int, sk: int, d: int, dtype: torch.dtype, causal: bool = True,
                  device: str = "meta", num_splits: int = 0, sms: int = INTERPRETER_SMS) -> List[LaunchPlan]:
    """The launches of one decode call on a contiguous cache of length ``sk`` (meta tensors work), for
    the kernel report; ``num_splits=0`` chooses for a GPU of ``sms`` SMs."""
    q = torch.empty(b, sq, hq, d, dtype=dtype, device=device)
    kc = torch.empty(b, sk, hk, d, dtype=dtype, device=device)
    seqlens = torch.empty(b, dtype=torch.int32, device=device)
    out = torch.empty(b, sq, hq, d, dtype=dtype, device=device)
    lse = torch.empty(b, hq, sq, dtype=torch.float32, device=device)
    if num_splits <= 0:
        num_splits = choose_num_splits(b, hk, sk, sms, _configs(dtype, head_dim_bucket(d, d))[0].block_n)
    return forward_plans(q, kc, kc.clone(), seqlens, seqlens, None, out, lse, causal, d ** -0.5, num_splits)


# --------------------------------------------------------------------------------------------
# the backend interface
# --------------------------------------------------------------------------------------------


def unsupported_reason(q: Tensor, k_cache: Tensor, v_cache: Tensor) -> Optional[str]:
    """Why the kernel cannot take this call, or None (shapes, devices and ranges are validated upstream)."""
    from .flash_attention import unsupported_reason as attention_reason

    if q.dtype not in SUPPORTED_DTYPES:
        return f"dtype {q.dtype} is not supported by the triton decode kernel (float16, bfloat16, float32)"
    if q.shape[1] > MAX_SQ:
        return f"{q.shape[1]} queries per sequence; the decode kernel takes at most {MAX_SQ}"
    if (q.shape[2] // k_cache.shape[2]) * q.shape[1] > 128:
        return "more than 128 query rows per kv head (query heads per kv head x queries)"
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if (t.shape[1] - 1) * t.stride(1) + (t.shape[2] - 1) * t.stride(2) + (t.shape[3] - 1) * t.stride(3) >= 2**31:
            return f"{name} spans more than 2**31 elements within one sequence/page (32-bit in-kernel offsets)"
    q4 = q.transpose(1, 2)
    return attention_reason(q4, q4, q4)  # compute capability, head dim


def forward(q: Tensor, k_cache: Tensor, v_cache: Tensor, seqlens: Tensor, batch_idx: Optional[Tensor],
            block_table: Optional[Tensor], out: Tensor, lse: Tensor, causal: bool, scale: float, num_splits: int) -> None:
    """Write ``out`` (B, Sq, Hq, Dv) and ``lse`` (B, Hq, Sq) float32 (see the module docstring)."""
    ctx = torch.cuda.device(q.device) if q.device.type == "cuda" else contextlib.nullcontext()
    with ctx:
        for plan in forward_plans(q, k_cache, v_cache, seqlens, batch_idx, block_table, out, lse, causal, scale, num_splits):
            launch(plan)
