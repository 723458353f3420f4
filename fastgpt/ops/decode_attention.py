"""Decoding attention over a KV cache: :func:`flash_attn_with_kvcache`, flash-attn's API, and its op.

A few queries per sequence (Sq in 1..16 on the kernel) attend to a preallocated KV cache, contiguous
(B_cache, S_cache, Hk, D) or paged (num_blocks, page_size, Hk, D) with a block table, with ragged
per-sequence lengths. New keys and values are appended into the cache in place before attention.
The ``triton`` backend is the split-KV (flash-decoding) kernel of :mod:`fastgpt.kernels.decode_attention`;
the reference gathers each sequence's keys and runs :func:`fastgpt.reference.attention_forward`.

Inference only: the op has no gradient (as flash-attn's function has none).
"""

import functools
import importlib.util
from typing import Optional, Tuple

import torch
from torch import Tensor

from fastgpt import backends, reference
from fastgpt.ops._checks import FLOAT_DTYPES, check_same_device, check_tensor
from fastgpt.ops._define import FastgptOp
from fastgpt.ops.attention import MAX_HEAD_DIM, _default_scale, _torch_sdpa
from fastgpt.ops.rotary import apply_rotary_emb
from fastgpt.registry import OpCases, OpSpec, element_size, register

__all__ = ["flash_attn_with_kvcache", "PAGE_MULTIPLE"]

PAGE_MULTIPLE = 16  # a paged cache's page size must be a multiple of this (the kernel's smallest key tile)
_KERNEL_MODULE = "fastgpt.kernels.decode_attention"
_FN = "fastgpt.flash_attn_with_kvcache"


# --------------------------------------------------------------------------------------------
# the op: reference and kernel forward on an already-appended cache
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _kernel_present() -> bool:
    return importlib.util.find_spec(_KERNEL_MODULE) is not None


def _constraint(q: Tensor, k_cache: Tensor, v_cache: Tensor):
    def why_not(backend: str) -> Optional[str]:
        if backend != "triton":
            return None
        if not _kernel_present():
            return "the triton decode kernel is not part of this build"
        from fastgpt.kernels import decode_attention

        return decode_attention.unsupported_reason(q, k_cache, v_cache)

    return why_not


def _sequence_kv(cache: Tensor, b: int, length: int, batch_idx: Optional[Tensor], block_table: Optional[Tensor]) -> Tensor:
    """The first ``length`` positions of sequence b's cache, (length, Hk, D)."""
    if block_table is None:
        return cache[int(batch_idx[b]) if batch_idx is not None else b, :length]
    page = cache.shape[1]
    pages = block_table[b, : -(-length // page)].long()
    return cache[pages].reshape(-1, *cache.shape[2:])[:length]


def decode_reference(q: Tensor, k_cache: Tensor, v_cache: Tensor, seqlens: Tensor, batch_idx: Optional[Tensor],
                     block_table: Optional[Tensor], causal: bool, scale: float) -> Tuple[Tensor, Tensor]:
    """Plain torch: each sequence's keys gathered and :func:`reference.attention_forward` run on them.

    q (B, Sq, Hq, D); returns out (B, Sq, Hq, Dv) in q's dtype and lse (B, Hq, Sq) float32 (float64
    for float64 inputs); a sequence of length 0 gives zeros and -inf."""
    b, sq, hq, _ = q.shape
    out = q.new_zeros(b, sq, hq, v_cache.shape[-1])
    lse = torch.full((b, hq, sq), float("-inf"), dtype=reference.stats_dtype(q.dtype), device=q.device)
    for i, length in enumerate(seqlens.tolist()):
        if length == 0:
            continue
        k = _sequence_kv(k_cache, i, length, batch_idx, block_table)
        v = _sequence_kv(v_cache, i, length, batch_idx, block_table)
        o, l = reference.attention_forward(q[i : i + 1].transpose(1, 2), k[None].transpose(1, 2), v[None].transpose(1, 2),
                                           causal, scale)
        out[i] = o[0].transpose(0, 1)
        lse[i] = l[0]
    return out, lse


def _decode_fwd(q: Tensor, k_cache: Tensor, v_cache: Tensor, seqlens: Tensor, batch_idx: Optional[Tensor],
                block_table: Optional[Tensor], causal: bool, scale: float, num_splits: int) -> Tuple[Tensor, Tensor]:
    b, sq, hq, _ = q.shape
    if q.numel() > 0 and backends.select("decode_attention", q.device, _constraint(q, k_cache, v_cache)) == "triton":
        from fastgpt.kernels import decode_attention

        out = torch.empty(b, sq, hq, v_cache.shape[-1], dtype=q.dtype, device=q.device)
        lse = torch.empty(b, hq, sq, dtype=torch.float32, device=q.device)
        decode_attention.forward(q, k_cache, v_cache, seqlens, batch_idx, block_table, out, lse, causal, scale, num_splits)
        return out, lse
    return decode_reference(q, k_cache, v_cache, seqlens, batch_idx, block_table, causal, scale)


def _decode_fwd_fake(q, k_cache, v_cache, seqlens, batch_idx, block_table, causal, scale, num_splits):
    b, sq, hq, _ = q.shape
    return (q.new_empty(b, sq, hq, v_cache.shape[-1]),
            torch.empty(b, hq, sq, dtype=reference.stats_dtype(q.dtype), device=q.device))


def _no_gradient(dout: Tensor, q: Tensor) -> Tensor:
    raise RuntimeError(f"{_FN} is inference-only: it has no gradient (call it under torch.no_grad())")


def _no_gradient_fake(dout, q):
    return torch.empty_like(q)


def _setup_context(ctx, inputs, output):
    pass


def _backward(ctx, bwd, dout, dlse):
    return _no_gradient(dout, dout)


_decode = FastgptOp("decode_attention", _decode_fwd, _no_gradient, _decode_fwd_fake, _no_gradient_fake, _setup_context, _backward)


# --------------------------------------------------------------------------------------------
# validation: every check before anything is written or launched
# --------------------------------------------------------------------------------------------


def _unsupported(name: str, value, default) -> None:
    if value != default:
        raise NotImplementedError(f"{_FN}: {name}={value!r} is not supported yet (only the default {default!r})")


def _check_int32(name: str, t: Optional[Tensor], shape: Tuple[int, ...], device: torch.device) -> None:
    if t is None:
        return
    if not isinstance(t, Tensor):
        raise TypeError(f"{_FN}: {name} must be a tensor; got {type(t).__name__}")
    if t.dtype != torch.int32:
        raise ValueError(f"{_FN}: {name} must be an int32 tensor; got {t.dtype}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{_FN}: {name} must have shape {shape}; got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{_FN}: {name} must be on q's device {device}; got {t.device}")


def _check_rotary(q: Tensor, k: Optional[Tensor], cos: Optional[Tensor], sin: Optional[Tensor]) -> Optional[int]:
    """flash-attn's rotary tables: both or neither, (seqlen_ro, rotary_dim / 2) in q's dtype and device,
    rotary_dim (even by construction) <= D, and new k/v to rotate; returns seqlen_ro (None without rotary)."""
    if (cos is None) != (sin is None):
        raise ValueError(f"{_FN}: pass rotary_cos and rotary_sin together (got only {'rotary_cos' if sin is None else 'rotary_sin'})")
    if cos is None:
        return None
    if k is None:  # as flash-attn: the rotary positions are those of the appended keys
        raise ValueError(f"{_FN}: rotary_cos/rotary_sin need new k and v to append (the keys are rotated as they are written)")
    for name, t in (("rotary_cos", cos), ("rotary_sin", sin)):
        check_tensor(_FN, name, t, ndim=(2,))
        if t.dtype != q.dtype:
            raise ValueError(f"{_FN}: {name} must have q's dtype {q.dtype}; got {t.dtype}")
    if sin.shape != cos.shape:
        raise ValueError(f"{_FN}: rotary_sin must have rotary_cos's shape {tuple(cos.shape)}; got {tuple(sin.shape)}")
    check_same_device(_FN, q=q, rotary_cos=cos, rotary_sin=sin)
    if not 2 <= 2 * cos.shape[1] <= q.shape[-1]:
        raise ValueError(f"{_FN}: rotary_dim = 2 * rotary_cos.shape[1] = {2 * cos.shape[1]} must be in [2, head dim {q.shape[-1]}]")
    return cos.shape[0]


def _validate(q, k_cache, v_cache, k, v, cache_seqlens, cache_batch_idx, block_table, rotary_len=None) -> Tuple[Tensor, int]:
    """Shapes, dtypes and ranges; returns (seqlens before the append as an int32 tensor, capacity)."""
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        check_tensor(_FN, name, t, ndim=(4,))
    if q.dtype not in FLOAT_DTYPES or k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise TypeError(f"{_FN}: q, k_cache and v_cache must share one floating dtype; got {q.dtype}, {k_cache.dtype}, {v_cache.dtype}")
    check_same_device(_FN, q=q, k_cache=k_cache, v_cache=v_cache)
    b, sq, hq, d = q.shape
    nb, page, hk, dk = k_cache.shape
    dv = v_cache.shape[-1]
    if dk != d:
        raise ValueError(f"{_FN}: k_cache must have q's head dim {d}; got {dk}")
    if tuple(v_cache.shape[:3]) != (nb, page, hk):
        raise ValueError(f"{_FN}: v_cache must match k_cache in its first three dims {(nb, page, hk)}; got {tuple(v_cache.shape[:3])}")
    if max(d, dv) > MAX_HEAD_DIM:
        raise ValueError(f"{_FN}: head dim {max(d, dv)} is not supported; expected at most {MAX_HEAD_DIM}")
    if hk == 0 or hq % hk != 0:
        raise ValueError(f"{_FN}: the number of q heads ({hq}) must be a multiple of the cache's kv heads ({hk})")
    if block_table is not None:
        if cache_batch_idx is not None:
            raise ValueError(f"{_FN}: cache_batch_idx cannot be combined with block_table (a paged cache maps sequences by its table)")
        if isinstance(block_table, Tensor) and block_table.dim() != 2:
            raise ValueError(f"{_FN}: block_table must be (B, max_blocks_per_seq); got shape {tuple(block_table.shape)}")
        _check_int32("block_table", block_table, (b, block_table.shape[1]), q.device)
        if page % PAGE_MULTIPLE != 0:
            raise ValueError(f"{_FN}: with block_table the page size (k_cache.shape[1] = {page}) must be a multiple of {PAGE_MULTIPLE}")
        capacity = block_table.shape[1] * page
    else:
        _check_int32("cache_batch_idx", cache_batch_idx, (b,), q.device)
        if cache_batch_idx is None and nb != b:
            raise ValueError(f"{_FN}: k_cache holds {nb} sequences but q has batch {b}; pass cache_batch_idx to map them")
        capacity = page
    new = 0
    if (k is None) != (v is None):
        raise ValueError(f"{_FN}: pass k and v together (got only {'k' if v is None else 'v'})")
    if k is not None:
        for name, t, dim in (("k", k, d), ("v", v, dv)):
            check_tensor(_FN, name, t, ndim=(4,))
            if t.dtype != q.dtype or t.device != q.device:
                raise ValueError(f"{_FN}: {name} must have q's dtype and device; got {t.dtype} on {t.device}")
            if t.shape[0] != b or t.shape[2:] != (hk, dim):
                raise ValueError(f"{_FN}: {name} must be (B, S_new, Hk, D) = ({b}, S_new, {hk}, {dim}); got {tuple(t.shape)}")
        if v.shape[1] != k.shape[1]:
            raise ValueError(f"{_FN}: k and v must have the same length; got {k.shape[1]} and {v.shape[1]}")
        new = k.shape[1]
    if cache_seqlens is None:
        if new:
            raise ValueError(f"{_FN}: cache_seqlens is needed to append k and v (where each sequence ends)")
        seqlens = torch.full((b,), capacity, dtype=torch.int32, device=q.device)
    elif isinstance(cache_seqlens, int):
        seqlens = torch.full((b,), cache_seqlens, dtype=torch.int32, device=q.device)
    else:
        _check_int32("cache_seqlens", cache_seqlens, (b,), q.device)
        seqlens = cache_seqlens
    # one device->host read for every range check: nothing is written or launched on bad input
    checks = [(seqlens < 0).any(), (seqlens + new > capacity).any(), (seqlens + new > (rotary_len or 0)).any()]
    if cache_batch_idx is not None:
        checks.append(((cache_batch_idx < 0) | (cache_batch_idx >= nb)).any())
    if block_table is not None and b > 0:
        used = -(-(seqlens.long() + new) // page)  # pages each sequence touches
        cols = torch.arange(block_table.shape[1], device=q.device)
        touched = cols[None, :] < used[:, None]
        checks.append((touched & ((block_table < 0) | (block_table >= nb))).any())
    flags = torch.stack(checks).tolist() if b > 0 else [False] * len(checks)
    if flags[0]:
        raise ValueError(f"{_FN}: cache_seqlens must be >= 0; got {seqlens.tolist()}")
    if flags[1]:
        what = f"k/v of length {new} do not fit" if new else "a sequence is longer than the cache"
        raise ValueError(f"{_FN}: cache_seqlens out of range: {what} (capacity {capacity} per sequence; "
                         f"cache_seqlens {seqlens.tolist()})")
    if rotary_len is not None and flags[2]:
        raise ValueError(f"{_FN}: rotary_cos/rotary_sin have {rotary_len} positions but the new keys reach position "
                         f"{int((seqlens + new).max()) - 1} (cache_seqlens {seqlens.tolist()}, {new} new)")
    if cache_batch_idx is not None and flags[3]:
        raise ValueError(f"{_FN}: cache_batch_idx must index the cache's {nb} sequences; got {cache_batch_idx.tolist()}")
    if block_table is not None and flags[-1]:
        raise ValueError(f"{_FN}: block_table holds page indices outside [0, {nb}) in the pages the sequences use")
    return seqlens, capacity


def _append(k_cache: Tensor, v_cache: Tensor, k: Tensor, v: Tensor, seqlens: Tensor, batch_idx: Optional[Tensor],
            block_table: Optional[Tensor]) -> None:
    """Write k, v (B, S_new, Hk, D) at positions seqlens[b] .. seqlens[b] + S_new - 1 of each sequence."""
    b, new = k.shape[:2]
    pos = seqlens.long()[:, None] + torch.arange(new, device=k.device)  # (B, S_new)
    if block_table is None:
        rows = (batch_idx.long() if batch_idx is not None else torch.arange(b, device=k.device))[:, None].expand(b, new)
        slots = pos
    else:
        page = k_cache.shape[1]
        rows = torch.gather(block_table.long(), 1, pos // page)
        slots = pos % page
    k_cache[rows, slots] = k
    v_cache[rows, slots] = v


# --------------------------------------------------------------------------------------------
# the public function
# --------------------------------------------------------------------------------------------


def _rotate(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, seqlens: Tensor, interleaved: bool, causal: bool) -> Tuple[Tensor, Tensor]:
    """flash-attn's positions: k at cache_seqlens + i; q too when causal, else every query at cache_seqlens."""
    k = apply_rotary_emb(k, cos, sin, interleaved, seqlen_offsets=seqlens)
    if causal:
        return apply_rotary_emb(q, cos, sin, interleaved, seqlen_offsets=seqlens), k
    b, sq, hq, d = q.shape  # the queries as heads of one position
    return apply_rotary_emb(q.reshape(b, 1, sq * hq, d), cos, sin, interleaved, seqlen_offsets=seqlens).reshape(q.shape), k


def flash_attn_with_kvcache(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    k: Optional[Tensor] = None,
    v: Optional[Tensor] = None,
    rotary_cos: Optional[Tensor] = None,
    rotary_sin: Optional[Tensor] = None,
    cache_seqlens=None,
    cache_batch_idx: Optional[Tensor] = None,
    block_table: Optional[Tensor] = None,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    window_size=(-1, -1),
    softcap: float = 0.0,
    rotary_interleaved: bool = True,
    alibi_slopes: Optional[Tensor] = None,
    num_splits: int = 0,
    return_softmax_lse: bool = False,
):
    """Drop-in for ``flash_attn.flash_attn_with_kvcache``: attention of q over a KV cache, appending k/v first.

    Args:
        q: (B, Sq, Hq, D) queries; float16, bfloat16, float32 (float64: reference only).
        k_cache, v_cache: (B_cache, S_cache, Hk, D / Dv) contiguous caches, or with ``block_table``
            paged caches (num_blocks, page_size, Hk, D / Dv); page_size a multiple of 16.
        k, v: optional (B, S_new, Hk, D / Dv) new keys and values, written into the cache in place at
            positions cache_seqlens[b] .. cache_seqlens[b] + S_new - 1 (needs ``cache_seqlens``).
        cache_seqlens: (B,) int32 tensor (or an int) of each sequence's length *before* the append;
            None: every sequence fills the cache. Not updated (as flash-attn).
        cache_batch_idx: (B,) int32: sequence b uses row cache_batch_idx[b] of a contiguous cache.
        block_table: (B, max_blocks_per_seq) int32 page indices of each sequence.
        softmax_scale: default 1/sqrt(D). causal: query i sees key j iff j <= i + L - Sq, with L the
            sequence's length after the append (bottom-right, as the main kernel).
        num_splits: key splits of the split-KV kernel; 0 chooses from batch, heads, cache size and
            the SM count. The result does not depend on it beyond rounding.
        return_softmax_lse: also return the natural-log LSE, (B, Hq, Sq) float32.
        rotary_cos, rotary_sin: (seqlen_ro, rotary_dim / 2) in q's dtype, both or neither, as
            flash-attn: the new k (required) is rotated at positions cache_seqlens[b] + i before it
            is appended; q at cache_seqlens[b] + i when causal, else every query at cache_seqlens[b].
            ``rotary_interleaved``: pairs (2i, 2i+1) (GPT-J, the default) or (i, i + rotary_dim/2).
            Done by :func:`fastgpt.apply_rotary_emb` (the rotary op) before the append.

    Not supported yet (NotImplementedError naming the argument): window_size != (-1, -1),
    softcap != 0, alibi_slopes. Bad input (ranges, dtypes, shapes) raises
    ValueError/TypeError before anything is written to the cache.
    Returns out (B, Sq, Hq, Dv) in q's dtype (and the LSE).
    """
    _unsupported("window_size", tuple(window_size), (-1, -1))
    _unsupported("softcap", float(softcap), 0.0)
    _unsupported("alibi_slopes", alibi_slopes, None)
    if isinstance(num_splits, bool) or not isinstance(num_splits, int) or num_splits < 0:
        raise ValueError(f"{_FN}: num_splits must be an int >= 0; got {num_splits!r}")
    rotary_len = _check_rotary(q, k, rotary_cos, rotary_sin)
    seqlens, _ = _validate(q, k_cache, v_cache, k, v, cache_seqlens, cache_batch_idx, block_table, rotary_len)
    scale = _default_scale(softmax_scale, q.shape[-1])
    if k is not None:
        with torch.no_grad():
            if rotary_len is not None:
                q, k = _rotate(q, k, rotary_cos, rotary_sin, seqlens, bool(rotary_interleaved), bool(causal))
            _append(k_cache, v_cache, k, v, seqlens, cache_batch_idx, block_table)
        seqlens = seqlens + k.shape[1]
    out, lse = _decode(q, k_cache, v_cache, seqlens, cache_batch_idx, block_table, bool(causal), scale, num_splits)
    return (out, lse) if return_softmax_lse else out


# --------------------------------------------------------------------------------------------
# registry entry: byte model, benchmark cases, targets (docs/design.md, 'Adding an op')
# --------------------------------------------------------------------------------------------

DIMS = ("B", "Hq", "Hk", "Sq", "L", "D")


def decode_bytes(b: int, hq: int, hk: int, sq: int, length: int, d: int, e: int) -> float:
    """Minimum HBM bytes of one decode call: the K/V cache read once per kv head (B*L*Hk*2D*e), q read,
    out written (B*Sq*Hq*D*e each)."""
    return float(b * length * hk * 2 * d * e + 2 * b * sq * hq * d * e)


def _gpu_shapes(t):
    out = []
    for length in t.get("decode_lengths", (1024, 8192, 32768, 131072)):
        for b in t.get("decode_batches", (1, 8, 64)):
            out.append(("fwd", (("B", b), ("Hq", 32), ("Hk", 8), ("Sq", 1), ("L", length), ("D", 128)), {"causal": True}))
    return out


def _smoke_shapes():
    return [("fwd", (("B", 2), ("Hq", 4), ("Hk", 2), ("Sq", 3), ("L", 33), ("D", 16)), {"causal": True})]


def _inputs(case, randn):
    d = case.d
    q = randn(d["B"], d["Sq"], d["Hq"], d["D"])
    return [q, randn(d["B"], d["L"], d["Hk"], d["D"]), randn(d["B"], d["L"], d["Hk"], d["D"])], [randn(*q.shape).detach()]


def _eager(case, device):
    """torch SDPA on the same (full) cache, bottom-right causal mask."""
    sq, length = case.d["Sq"], case.d["L"]
    mask = reference.causal_mask(sq, length, device) if case.causal and sq > 1 else None

    def run(q, k_cache, v_cache):
        o = _torch_sdpa(q.transpose(1, 2), k_cache.transpose(1, 2), v_cache.transpose(1, 2), attn_mask=mask)
        return o.transpose(1, 2)

    return run


def _call(case):
    return lambda q, k_cache, v_cache: flash_attn_with_kvcache(q, k_cache, v_cache, causal=case.causal)


def _work(d, dtype, mode, causal=False):
    return "bytes", decode_bytes(d["B"], d["Hq"], d["Hk"], d["Sq"], d["L"], d["D"], element_size(dtype))


def _targets(mode, dims, vs, pct):
    vs("torch SDPA on the same cache", ("sdpa-flash", "sdpa-efficient", "sdpa-math", "torch-eager"), 1.0)
    pct("pct_of_copy_bandwidth", 80.0, "copy bandwidth (KV read)")


# `fastgpt inspect`: one decode step of an 8B-class GQA model (32 query heads, 8 kv heads, d=128) over
# an 8k cache, batch 1 and 8 (the same shapes as the main kernel's decode-gqa cases)
REPORT_CASES = tuple(
    dict(op="decode_attention", name=f"kvcache-gqa-b{b}", b=b, hq=32, hk=8, sq=1, sk=8192, d=128, causal=True,
         dtype="bfloat16", passes=("fwd",), quick=True)
    for b in (1, 8)
)


def _report_plans(case):
    from fastgpt.kernels import decode_attention as kd

    plans = kd.example_plans(case["b"], case["hq"], case["hk"], case["sq"], case["sk"], case["d"],
                             getattr(torch, case["dtype"]), case["causal"])
    return [("fwd", p) for p in plans]


register(
    OpSpec(
        name="decode_attention",
        functions=(flash_attn_with_kvcache,),
        backends=("triton",),
        custom_ops=(_decode,),
        dims=DIMS,
        parity_dims=((1, 4, 2, 1, 17, 16), (2, 4, 1, 3, 300, 32)),
        dispatch_sizes={"tiny": (1, 4, 2, 1, 16, 16), "small": (8, 4, 4, 1, 256, 32), "realistic": (4, 12, 12, 1, 1024, 64)},
        causal=True,
        differentiable=False,
        report_cases=REPORT_CASES,
        report_plans=_report_plans,
        cases=OpCases(
            gpu_shapes=_gpu_shapes,
            smoke_shapes=_smoke_shapes,
            inputs=_inputs,
            eager=_eager,
            call=_call,
            work=_work,
            work_model={"fwd": "bytes = B*L*Hk*2*D*e (K/V read once per kv head) + 2*B*Sq*Hq*D*e (q read, out written)"},
            peers=("sdpa-flash", "sdpa-efficient", "sdpa-math", "torch-eager", "flash-attn"),
            targets=_targets,
        ),
    )
)
