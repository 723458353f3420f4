"""Attention: the ``fastgpt::attention_fwd`` / ``fastgpt::attention_bwd`` custom ops and the public entry points.

Public functions (all share one pair of custom ops, so every layout runs the same kernels):

* :func:`scaled_dot_product_attention` - drop-in for ``torch.nn.functional.scaled_dot_product_attention``,
  layout (B, H, S, D).
* :func:`flash_attn_func` - drop-in for ``flash_attn.flash_attn_func``, layout (B, S, H, D).
* :func:`attention` - fastgpt's own entry point, (B, H, S, D), with ``return_lse``.

Semantics that differ from torch: when ``is_causal`` and Sq != Sk the mask is aligned to the bottom
right (query i sees key j iff j <= i + Sk - Sq), as in flash-attn and KV-cache decoding; torch aligns
it to the top left. Query rows that see no key (Sq > Sk) give zeros, never NaN.

Backend interface (``fastgpt.kernels.flash_attention`` implements it for ``triton``)::

    unsupported_reason(q, k, v) -> str | None          # why this call cannot run on the kernel
    forward(q, k, v, out, lse, is_causal, scale, **options) -> None   # writes out and lse (B, Hq, Sq) float32
    backward(dout, q, k, v, out, lse, dlse, dq, dk, dv, is_causal, scale, deterministic=True, **options) -> None

(``options``: window, softcap, alibi_slopes; passed only when one is on, see :func:`_backend_options`.)

q, k, v, out, dout, dq, dk, dv are logical (B, H, S, D) tensors with arbitrary strides (any strides
work, 0 included; a contiguous last dim is fastest); ``dlse`` is None or (B, Hq, Sq).
"""

import functools
import importlib.util
import math
from typing import Optional, Tuple

import torch
from torch import Tensor

from fastgpt import backends, reference
from fastgpt.ops._attention_options import AttentionOptions, check_options, visible_pairs
from fastgpt.ops._checks import FLOAT_DTYPES, check_broadcastable, check_same_device, check_same_dtype, check_tensor, is_compiling
from fastgpt.ops._define import FastgptOp, reference_serves
from fastgpt.registry import OpCases, OpSpec, register

__all__ = ["attention", "scaled_dot_product_attention", "flash_attn_func", "MAX_HEAD_DIM"]

MAX_HEAD_DIM = 256
_KERNEL_MODULE = "fastgpt.kernels.flash_attention"


# --------------------------------------------------------------------------------------------
# output allocation: one helper for the real and the fake (meta) implementation, so strides agree
# --------------------------------------------------------------------------------------------


def _alloc(like: Tensor, b: int, h: int, s: int, d: int, seq_major: bool, dtype: Optional[torch.dtype] = None) -> Tensor:
    """A logical (b, h, s, d) tensor stored as (b, s, h, d) when seq_major, else contiguous."""
    dtype = dtype or like.dtype
    if seq_major:
        return torch.empty(b, s, h, d, dtype=dtype, device=like.device).transpose(1, 2)
    return torch.empty(b, h, s, d, dtype=dtype, device=like.device)


def _alloc_forward(q: Tensor, v: Tensor, seq_major: bool) -> Tuple[Tensor, Tensor]:
    b, hq, sq, _ = q.shape
    out = _alloc(q, b, hq, sq, v.shape[-1], seq_major)
    lse = torch.empty(b, hq, sq, dtype=reference.stats_dtype(q.dtype), device=q.device)
    return out, lse


def _alloc_grads(q: Tensor, k: Tensor, v: Tensor, seq_major: bool) -> Tuple[Tensor, Tensor, Tensor]:
    return (
        _alloc(q, *q.shape, seq_major),
        _alloc(k, *k.shape, seq_major),
        _alloc(v, *v.shape, seq_major),
    )


# --------------------------------------------------------------------------------------------
# backend choice
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _kernel_present() -> bool:
    """Looked up once: find_spec costs tens of microseconds, and this runs on every CUDA call."""
    return importlib.util.find_spec(_KERNEL_MODULE) is not None


def _kernel_constraint(q: Tensor, k: Tensor, v: Tensor):
    def why_not(backend: str) -> Optional[str]:
        if backend != "triton":
            return None
        if not _kernel_present():
            return "the triton flash-attention kernel is not part of this build"
        from fastgpt.kernels import flash_attention

        return flash_attention.unsupported_reason(q, k, v)

    return why_not


def _backend_for(q: Tensor, k: Tensor, v: Tensor) -> str:
    if q.numel() == 0 or k.numel() == 0:
        return "reference"  # nothing to compute; no kernel launch, no fallback to report
    return backends.select("attention", q.device, _kernel_constraint(q, k, v))


# --------------------------------------------------------------------------------------------
# custom ops
# --------------------------------------------------------------------------------------------


def _backend_options(window_left: int, window_right: int, softcap: float, alibi_slopes: Optional[Tensor]) -> dict:
    """The options as backend keyword arguments; none at all for a plain call (the interface's original form)."""
    if AttentionOptions(False, (window_left, window_right), softcap, alibi_slopes).plain:
        return {}
    return {"window": (window_left, window_right), "softcap": softcap, "alibi_slopes": alibi_slopes}


def _attention_fwd(q: Tensor, k: Tensor, v: Tensor, is_causal: bool, scale: float, seq_major: bool,
                   deterministic: bool = True, window_left: int = -1, window_right: int = -1, softcap: float = 0.0,
                   alibi_slopes: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    # (deterministic is the backward's: an input here so that setup_context can hand it on)
    out, lse = _alloc_forward(q, v, seq_major)
    opts = _backend_options(window_left, window_right, softcap, alibi_slopes)
    if _backend_for(q, k, v) == "triton":
        from fastgpt.kernels import flash_attention

        flash_attention.forward(q, k, v, out, lse, is_causal, scale, **opts)
        return out, lse
    ref_out, ref_lse = reference.attention_forward(q, k, v, is_causal, scale, **opts)
    out.copy_(ref_out)
    lse.copy_(ref_lse)
    return out, lse


def _attention_fwd_fake(q, k, v, is_causal, scale, seq_major, deterministic=True, window_left=-1, window_right=-1,
                        softcap=0.0, alibi_slopes=None):
    return _alloc_forward(q, v, seq_major)


def _attention_bwd(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    dlse: Optional[Tensor],
    is_causal: bool,
    scale: float,
    seq_major: bool,
    deterministic: bool = True,
    window_left: int = -1,
    window_right: int = -1,
    softcap: float = 0.0,
    alibi_slopes: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor, Tensor]:
    dq, dk, dv = _alloc_grads(q, k, v, seq_major)
    opts = _backend_options(window_left, window_right, softcap, alibi_slopes)
    if _backend_for(q, k, v) == "triton":
        from fastgpt.kernels import flash_attention

        flash_attention.backward(dout, q, k, v, out, lse, dlse, dq, dk, dv, is_causal, scale, deterministic=deterministic,
                                 **opts)
        return dq, dk, dv
    for dst, src in zip((dq, dk, dv), reference.attention_backward(dout, q, k, v, out, lse, dlse, is_causal, scale, **opts)):
        dst.copy_(src)
    return dq, dk, dv


def _attention_bwd_fake(dout, q, k, v, out, lse, dlse, is_causal, scale, seq_major, deterministic=True, window_left=-1,
                        window_right=-1, softcap=0.0, alibi_slopes=None):
    return _alloc_grads(q, k, v, seq_major)


def _setup_context(ctx, inputs, output):
    # (the custom op fills in defaults)
    q, k, v, is_causal, scale, seq_major, deterministic, window_left, window_right, softcap, alibi_slopes = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, alibi_slopes)
    ctx.is_causal, ctx.scale, ctx.seq_major, ctx.deterministic = is_causal, scale, seq_major, deterministic
    ctx.window, ctx.softcap = (window_left, window_right), softcap


def _backward(ctx, attention_bwd, dout, dlse):
    nones = (None,) * 8  # is_causal, scale, seq_major, deterministic and the options get no gradient
    if dout is None and dlse is None:
        return (None, None, None) + nones
    q, k, v, out, lse, alibi_slopes = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv = attention_bwd(dout, q, k, v, out, lse, dlse, ctx.is_causal, ctx.scale, ctx.seq_major, ctx.deterministic,
                               *ctx.window, ctx.softcap, alibi_slopes)
    return (dq, dk, dv) + nones


_attention = FastgptOp(
    "attention", _attention_fwd, _attention_bwd, _attention_fwd_fake, _attention_bwd_fake, _setup_context, _backward
)


# --------------------------------------------------------------------------------------------
# validation and the torch fallback for what the kernels do not implement
# --------------------------------------------------------------------------------------------


def _qkv_ok(q: Tensor, k: Tensor, v: Tensor, allow_gqa: bool) -> bool:
    """Every rule of _check_qkv at once, in plain comparisons (this runs on every call)."""
    if not (isinstance(q, Tensor) and isinstance(k, Tensor) and isinstance(v, Tensor)):
        return False
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4 or q.dtype not in FLOAT_DTYPES:
        return False
    if k.dtype != q.dtype or v.dtype != q.dtype or k.device != q.device or v.device != q.device:
        return False
    (b, hq, _, d), (bk, hk, sk, dk), (bv, hv, sv, dv) = q.shape, k.shape, v.shape
    return (
        bk == b and bv == b and dk == d and hv == hk and sv == sk and d <= MAX_HEAD_DIM and dv <= MAX_HEAD_DIM
        and (hk > 0 and hq % hk == 0 or hq == hk == 0) and (allow_gqa or hq == hk)
    )


def _check_qkv(fn: str, q: Tensor, k: Tensor, v: Tensor, *, allow_gqa: bool, gqa_flag: str = "") -> None:
    """q (B, Hq, Sq, D), k (B, Hk, Sk, D), v (B, Hk, Sk, Dv) as logical views; raise before computing."""
    if _qkv_ok(q, k, v, allow_gqa):
        return
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(fn, name, t, ndim=(4,))
    check_same_dtype(fn, q=q, k=k, v=v)
    check_same_device(fn, q=q, k=k, v=v)
    (b, hq, _, d), (bk, hk, sk, dk), (bv, hv, sv, dv) = q.shape, k.shape, v.shape
    if bk != b or bv != b:
        raise ValueError(f"{fn}: batch sizes differ: q has {b}, k has {bk}, v has {bv}; expected the same batch")
    if dk != d:
        raise ValueError(f"{fn}: k must have q's head dim {d}; got {dk}")
    if (hv, sv) != (hk, sk):
        raise ValueError(f"{fn}: v must have k's heads and length ({hk}, {sk}); got ({hv}, {sv})")
    for name, size in (("q/k", d), ("v", dv)):
        if size > MAX_HEAD_DIM:
            raise ValueError(f"{fn}: {name} head dim {size} is not supported; expected at most {MAX_HEAD_DIM}")
    if hk == 0 and hq > 0:
        raise ValueError(f"{fn}: k and v have 0 heads but q has {hq}; expected at least one k/v head")
    if hk > 0 and hq % hk != 0:
        raise ValueError(f"{fn}: the number of q heads ({hq}) must be a multiple of the k/v heads ({hk})")
    if hq != hk and not allow_gqa:
        raise ValueError(
            f"{fn}: q has {hq} heads but k/v have {hk}; pass {gqa_flag}=True for grouped-query attention"
        )


_SDPA_HAS_GQA = tuple(int(part) for part in torch.__version__.split(".")[:2]) >= (2, 5)  # enable_gqa=


def _torch_sdpa(q: Tensor, k: Tensor, v: Tensor, **kwargs) -> Tensor:
    """torch's SDPA on fastgpt's GQA layout: enable_gqa where torch has it (>= 2.5), else repeated k/v."""
    if q.shape[1] != k.shape[1]:
        if _SDPA_HAS_GQA:
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True, **kwargs)
        k, v = reference._expand_kv(k, q.shape[1]), reference._expand_kv(v, q.shape[1])
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, **kwargs)


def _torch_sdpa_shortcut(q: Tensor, k: Tensor, v: Tensor, is_causal: bool, scale: float) -> Optional[Tensor]:
    """torch's own SDPA for an eager call the reference serves with torch's semantics, else None.

    Causal masks agree with torch's when Sq == Sk, and mean nothing when Sq == 1 (the one query sees
    every key); other causal shapes need fastgpt's bottom-right mask and go through the custom op.
    """
    sq, sk = q.shape[2], k.shape[2]
    if is_causal and sq != sk and sq != 1:
        return None
    if k.numel() == 0 or not reference_serves("attention", q, _kernel_constraint(q, k, v)):
        return None
    torch_causal = is_causal and sq == sk and sq > 1
    if not reference.fused_attention_ok(q, k, v, torch_causal, scale):
        return None  # NaN or huge scores: the explicit reference gives fastgpt's semantics
    return _torch_sdpa(q, k, v, is_causal=torch_causal, scale=scale)


def _check_deterministic(fn: str, deterministic) -> None:
    if not isinstance(deterministic, bool):
        raise TypeError(f"{fn}: deterministic must be a bool; got {type(deterministic).__name__}")


def _run(q: Tensor, k: Tensor, v: Tensor, opts: AttentionOptions, scale: float, seq_major: bool,
         deterministic: bool = True) -> Tuple[Tensor, Tensor]:
    """The custom op on validated options: (out, lse)."""
    return _attention(q, k, v, opts.causal, scale, seq_major, deterministic, *opts.window, opts.softcap, opts.alibi_slopes)


def _default_scale(scale: Optional[float], d: int) -> float:
    if scale is not None:
        return float(scale)
    # head dim 0: every score is 0 whatever the scale (torch returns the mean of v, or an empty tensor)
    return 1.0 / math.sqrt(d) if d > 0 else 1.0


def _torch_sdpa_fallback(q, k, v, attn_mask, dropout_p, is_causal, scale, reason, op="attention"):
    """Features the kernels lack (dense masks, dropout): torch's own SDPA, with our semantics kept."""
    if not is_compiling():
        requested = backends.requested_backend()
        if requested != "reference":
            backends.report_fallback(op, "triton" if requested == "auto" else requested, reason)
    if not is_causal:
        return _torch_sdpa(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, scale=scale)
    sq, sk = q.shape[2], k.shape[2]
    if sq > sk:
        # the first sq - sk rows see no key: zeros, and the rest is a square causal problem
        tail = _torch_sdpa(q[:, :, sq - sk :], k, v, dropout_p=dropout_p, is_causal=True, scale=scale)
        head = tail.new_zeros(*tail.shape[:2], sq - sk, tail.shape[-1])
        return torch.cat([head, tail], dim=2)
    return _torch_sdpa(q, k, v, attn_mask=reference.causal_mask(sq, sk, q.device), dropout_p=dropout_p, scale=scale)


# --------------------------------------------------------------------------------------------
# public entry points
# --------------------------------------------------------------------------------------------


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    scale: Optional[float] = None,
    return_lse: bool = False,
    deterministic: bool = True,
    window_size: Tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Optional[Tensor] = None,
):
    """Softmax attention over (B, H, S, D) tensors, with the log-sum-exp on request.

    Args:
        q: (B, Hq, Sq, D) queries; float16, bfloat16, float32 (or float64, reference only).
        k: (B, Hk, Sk, D) keys; Hk divides Hq (GQA/MQA: query head h uses kv head h // (Hq // Hk)).
        v: (B, Hk, Sk, Dv) values.
        causal: causal mask aligned to the bottom right when Sq != Sk (rows that see no key give 0).
        scale: softmax scale; default 1/sqrt(D).
        return_lse: also return the natural-log log-sum-exp of the scaled scores, (B, Hq, Sq) float32
            (-inf for rows that see no key). It is differentiable, so partial attentions over key
            blocks can be merged (out = sum_i exp(lse_i - lse) out_i) and trained through.
        deterministic: True (the default): the backward is bitwise reproducible. False: the Triton
            backward computes dq inside the dK/dV kernel with float32 atomic adds (5 matmuls per tile
            instead of 7, as FlashAttention-2 does), so dq's rounding varies from run to run (dk, dv do
            not). flash-attn's default is the non-deterministic backward; fastgpt's is not.
        window_size: (left, right) sliding window, flash-attn's: query i sees keys
            [i + Sk - Sq - left, i + Sk - Sq + right]; -1 leaves a side unbounded; causal sets right = 0.
            Key tiles outside every row's window are skipped (work ~ Sq x window).
        softcap: c > 0 caps the scaled scores at c * tanh(s / c) (Gemma-2, Grok); 0.0 is off.
        alibi_slopes: (Hq,) or (B, Hq) float32 ALiBi slopes: -slope * |i + Sk - Sq - j| is added to
            the (capped) score; they get no gradient.

    Returns:
        out (B, Hq, Sq, Dv) in q's dtype, or (out, lse) when ``return_lse``. Any strides are accepted
        and read in place (a contiguous last dim is fastest).
    """
    fn = "fastgpt.attention"
    _check_qkv(fn, q, k, v, allow_gqa=True)
    _check_deterministic(fn, deterministic)
    opts = check_options(fn, q, causal, window_size, softcap, alibi_slopes)
    scale = _default_scale(scale, q.shape[-1])
    if not return_lse and opts.plain:  # torch's SDPA knows no window, softcap or ALiBi
        out = _torch_sdpa_shortcut(q, k, v, opts.causal, scale)
        if out is not None:
            return out
    out, lse = _run(q, k, v, opts, scale, False, deterministic)
    return (out, lse) if return_lse else out


def scaled_dot_product_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: Optional[float] = None,
    enable_gqa: bool = False,
) -> Tensor:
    """Drop-in for ``torch.nn.functional.scaled_dot_product_attention`` (same arguments and defaults).

    Layout (B, H, S, D) (or (B, S, D), one head). ``is_causal`` aligns the mask to the bottom right
    when Sq != Sk (torch aligns it to the top left; they agree when Sq == Sk). A dense ``attn_mask``
    or ``dropout_p > 0`` is not implemented by the kernels: such calls run torch's SDPA, with a
    one-time :class:`~fastgpt.backends.FallbackWarning` (an error in strict mode). Returns
    (B, Hq, Sq, Dv) in query's dtype.
    """
    fn = "fastgpt.scaled_dot_product_attention"
    for name, t in (("query", query), ("key", key), ("value", value)):
        check_tensor(fn, name, t, ndim=(3, 4))
    if not (query.dim() == key.dim() == value.dim()):
        raise ValueError(f"{fn}: query, key and value must have the same rank; got {query.dim()}, {key.dim()}, {value.dim()}")
    squeeze = query.dim() == 3
    q, k, v = (t.unsqueeze(1) for t in (query, key, value)) if squeeze else (query, key, value)
    _check_qkv(fn, q, k, v, allow_gqa=enable_gqa, gqa_flag="enable_gqa")
    if attn_mask is not None and is_causal:
        raise ValueError(f"{fn}: pass either attn_mask or is_causal=True, not both (as torch does)")
    if attn_mask is not None:
        b, hq, sq, sk = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
        want, dims = ((b, sq, sk), "(B, Sq, Sk)") if squeeze else ((b, hq, sq, sk), "(B, Hq, Sq, Sk)")
        check_broadcastable(fn, "attn_mask", attn_mask, want, dims)
        check_same_device(fn, query=query, attn_mask=attn_mask)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"{fn}: dropout_p must be in [0, 1); got {dropout_p}")
    scale = _default_scale(scale, q.shape[-1])
    if attn_mask is not None or dropout_p > 0.0:
        reason = "attn_mask is not supported by the kernels" if attn_mask is not None else "dropout_p > 0 is not supported by the kernels"
        if attn_mask is not None and squeeze and attn_mask.dim() == 3:
            attn_mask = attn_mask.unsqueeze(1)
        out = _torch_sdpa_fallback(q, k, v, attn_mask, dropout_p, is_causal, scale, reason)
    else:
        out = _torch_sdpa_shortcut(q, k, v, is_causal, scale)
        if out is None:
            out, _ = _run(q, k, v, AttentionOptions(bool(is_causal)), scale, False)
    return out.squeeze(1) if squeeze else out


def flash_attn_func(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    dropout_p: float = 0.0,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    window_size: Tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Optional[Tensor] = None,
    return_lse: bool = False,
    *,
    deterministic: bool = True,
):
    """Drop-in for ``flash_attn.flash_attn_func``: layout (B, S, H, D), GQA when k/v have fewer heads.

    Runs the same kernels as :func:`scaled_dot_product_attention` through strides (no transposing
    copy); the output is a contiguous (B, Sq, Hq, Dv) tensor. The causal mask is bottom-right
    aligned, as in flash-attn >= 2.1. ``window_size``, ``softcap`` and ``alibi_slopes`` are
    flash-attn's (see :func:`attention`). ``dropout_p > 0`` runs torch's SDPA with a one-time warning
    (not with those three). With ``return_lse`` also returns the log-sum-exp, (B, Hq, Sq) float32. ``deterministic`` (keyword)
    is :func:`attention`'s: True by default, where flash-attn's default is False (its atomic dq); pass
    False for the faster backward whose dq varies in its last bits from run to run.
    """
    fn = "fastgpt.flash_attn_func"
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(fn, name, t, ndim=(4,))
    _check_deterministic(fn, deterministic)
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    _check_qkv(fn, qt, kt, vt, allow_gqa=True)
    opts = check_options(fn, qt, causal, window_size, softcap, alibi_slopes)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"{fn}: dropout_p must be in [0, 1); got {dropout_p}")
    scale = _default_scale(softmax_scale, q.shape[-1])
    if dropout_p > 0.0:
        if return_lse:
            raise ValueError(f"{fn}: return_lse is not available with dropout_p > 0")
        if not opts.plain:  # the fallback (torch's SDPA) has none of them
            raise ValueError(f"{fn}: dropout_p > 0 cannot be combined with window_size, softcap or alibi_slopes")
        out = _torch_sdpa_fallback(qt, kt, vt, None, dropout_p, opts.causal, scale, "dropout_p > 0 is not supported by the kernels")
        return out.transpose(1, 2).contiguous()
    if not return_lse and opts.plain:
        out = _torch_sdpa_shortcut(qt, kt, vt, opts.causal, scale)
        if out is not None:
            return out.transpose(1, 2).contiguous()
    out, lse = _run(qt, kt, vt, opts, scale, True, deterministic)
    out = out.transpose(1, 2)
    return (out, lse) if return_lse else out


# --------------------------------------------------------------------------------------------
# registry entry: the FLOP model, benchmark/parity cases and targets (docs/design.md, 'Adding an op')
# --------------------------------------------------------------------------------------------

ATTN_TOKENS = 16384  # batch * seqlen held constant across lengths, as FlashAttention's benchmarks do
ATTN_HIDDEN = 2048  # heads = 2048 / head_dim
SDPA_PEERS = ("sdpa-flash", "sdpa-cudnn", "sdpa-efficient", "sdpa-math")


def attention_flops(b: int, h: int, sq: int, sk: int, d: int, *, causal: bool, mode: str = "fwd",
                    window: Tuple[int, int] = (-1, -1)) -> float:
    """Matmul FLOPs of attention: 4*B*H*Sq*Sk*D forward (QK^T and PV), halved when causal; with a
    sliding ``window`` (left, right) 4*B*H*D per (query, key) pair it leaves (~ Sq x window).

    ``mode`` is "fwd", "bwd" (2.5x forward: five matmuls to the forward's two) or "fwd+bwd" (3.5x).
    This is the convention of FlashAttention's benchmarks, so figures compare with theirs.
    """
    factor = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}
    if mode not in factor:
        raise ValueError(f"attention_flops: mode must be one of {', '.join(factor)}; got {mode!r}")
    if tuple(window) != (-1, -1):
        return 4.0 * b * h * visible_pairs(sq, sk, causal, tuple(window)) * d * factor[mode]
    fwd = 4.0 * b * h * sq * sk * d
    if causal:
        fwd /= 2.0
    return fwd * factor[mode]


def eager_attention(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor]) -> Tensor:
    """Attention as plain torch writes it (the torch-eager peer): the (S, S) scores are materialised.

    Deliberately not :func:`fastgpt.reference.attention_forward`: the peer is what a user's own
    eager code costs, in the input dtype, not fastgpt's float32 oracle.
    """
    s = torch.matmul(q, k.transpose(-2, -1)) * (q.shape[-1] ** -0.5)
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    return torch.matmul(torch.softmax(s, dim=-1), v)


def _gpu_shapes(t):
    out = []
    for d in t["attn_head_dims"]:
        for causal in t["attn_causal"]:
            for s in t["attn_seqlens"]:
                for mode in t["attn_modes"]:
                    dims = (("B", max(1, ATTN_TOKENS // s)), ("H", ATTN_HIDDEN // d), ("S", s), ("D", d))
                    out.append((mode, dims, {"causal": causal}))
    return out


def _smoke_shapes():
    dims = (("B", 1), ("H", 2), ("S", 33), ("D", 16))
    return [("fwd+bwd", dims, {"causal": True}), ("fwd", dims, {"causal": False})]


def _inputs(case, randn):
    d = case.d
    shape = (d["B"], d["H"], d["S"], d["D"])
    return [randn(*shape), randn(*shape), randn(*shape)], [randn(*shape).detach()]


def _eager(case, device):
    s = case.d["S"]
    mask = torch.ones(s, s, dtype=torch.bool, device=device).tril() if case.causal else None
    return lambda q, k, v: eager_attention(q, k, v, mask)


def _work(d, dtype, mode, causal=False):
    return "flops", attention_flops(d["B"], d["H"], d["S"], d["S"], d["D"], causal=causal, mode=mode)


def _targets(mode, dims, vs, pct):
    vs("torch SDPA (best backend)", SDPA_PEERS, 1.0 if mode == "fwd" else 0.9)
    if dims.get("S") == 4096:
        vs("eager attention", ("torch-eager",), 5.0)


register(
    OpSpec(
        name="attention",
        functions=(attention, scaled_dot_product_attention, flash_attn_func),
        backends=("triton",),
        custom_ops=(_attention,),
        patchable=True,
        dims=("B", "H", "S", "D"),
        parity_dims=((1, 2, 17, 16), (2, 4, 113, 64)),
        # tiny: pure per-call overhead; small: nanoGPT's CPU example (B=12, T=64, 4 heads);
        # realistic: GPT-2 small's heads on a CPU batch (B=4, T=256)
        dispatch_sizes={"tiny": (1, 2, 16, 16), "small": (12, 4, 64, 32), "realistic": (4, 12, 256, 64)},
        causal=True,
        cases=OpCases(
            gpu_shapes=_gpu_shapes,
            smoke_shapes=_smoke_shapes,
            inputs=_inputs,
            eager=_eager,
            expected=lambda case, device: lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=case.causal),
            call=lambda case: lambda q, k, v: scaled_dot_product_attention(q, k, v, is_causal=case.causal),
            work=_work,
            work_model={
                "fwd": "flops = 4*B*H*Sq*Sk*D, halved when causal (Sq == Sk); with a window 4*B*H*D per visible (query, key) pair",
                "bwd": "flops = 2.5 * forward flops",
                "fwd+bwd": "flops = 3.5 * forward flops",
            },
            peers=SDPA_PEERS + ("torch-eager", "torch-compile", "flash-attn"),
            targets=_targets,
        ),
    )
)
