"""Plain-torch attention: dense (GQA, bottom-right causal, flash-attn's sliding window, softcap and
ALiBi) and packed (varlen) sequences, forward and backward. Part of :mod:`fastgpt.reference` (which
re-exports these names; its docstring states the conventions): the CPU fallback and the oracle the
attention kernels are tested against.
"""

from typing import Optional, Tuple

import torch
from torch import Tensor

from fastgpt._dtypes import compute_dtype, stats_dtype


def causal_mask(sq: int, sk: int, device: torch.device | str = "cpu") -> Tensor:
    """Boolean (sq, sk) mask, True where query i may attend to key j (bottom-right aligned)."""
    i = torch.arange(sq, device=device)[:, None]
    j = torch.arange(sk, device=device)[None, :]
    return j <= i + (sk - sq)


def _relative_positions(sq: int, sk: int, device) -> Tensor:
    """(sq, sk) int64: i + Sk - Sq - j, the distance of key j behind query i (bottom-right aligned)."""
    return (torch.arange(sq, device=device)[:, None] + (sk - sq)) - torch.arange(sk, device=device)[None, :]


def attention_mask(sq: int, sk: int, is_causal: bool, window: Tuple[int, int] = (-1, -1),
                   device: torch.device | str = "cpu") -> Optional[Tensor]:
    """Boolean (sq, sk) mask, True where query i may attend to key j, or None when every query sees
    every key: j <= i + Sk - Sq when causal, and i + Sk - Sq - left <= j <= i + Sk - Sq + right for a
    sliding ``window`` = (left, right) (flash-attn's ``window_size``; -1 leaves a side unbounded)."""
    left, right = window
    if not is_causal and left < 0 and right < 0:
        return None
    rel = _relative_positions(sq, sk, device)
    mask = torch.ones(sq, sk, dtype=torch.bool, device=device)
    if is_causal:
        mask &= rel >= 0
    if left >= 0:
        mask &= rel <= left
    if right >= 0:
        mask &= rel >= -right
    return mask


def _expand_kv(t: Tensor, hq: int) -> Tensor:
    """Repeat kv heads so head h of the result is kv head h // (hq // hk) (a view when possible)."""
    b, hk, s, d = t.shape
    if hk == hq:
        return t
    return t[:, :, None].expand(b, hk, hq // hk, s, d).reshape(b, hq, s, d)


def _sum_groups(t: Tensor, hk: int) -> Tensor:
    """Inverse of _expand_kv for gradients: sum the query heads that share a kv head."""
    b, hq, s, d = t.shape
    if hk == hq:
        return t
    return t.reshape(b, hk, hq // hk, s, d).sum(dim=2)


def _scores(q: Tensor, k: Tensor, is_causal: bool, scale: float, window: Tuple[int, int] = (-1, -1),
            softcap: float = 0.0, alibi_slopes: Optional[Tensor] = None) -> Tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
    """Scores (B, Hq, Sq, Sk) in compute dtype, the mask (or None), and d(score)/d(scaled score) where
    a softcap makes it other than 1 (else None). flash-attn's order: scale, softcap, ALiBi bias."""
    cd = compute_dtype(q.dtype)
    sq, sk = q.shape[2], k.shape[2]
    s = torch.matmul(q.to(cd), _expand_kv(k.to(cd), q.shape[1]).transpose(-2, -1)) * scale
    dcap = None
    if softcap > 0:
        t = torch.tanh(s / softcap)
        s, dcap = softcap * t, 1.0 - t * t
    if alibi_slopes is not None:
        slopes = alibi_slopes.to(cd)
        slopes = slopes[None, :, None, None] if slopes.dim() == 1 else slopes[:, :, None, None]
        s = s - slopes * _relative_positions(sq, sk, q.device).abs().to(cd)
    return s, attention_mask(sq, sk, is_causal, window, q.device), dcap


def _plain(window: Tuple[int, int], softcap: float, alibi_slopes: Optional[Tensor]) -> bool:
    """No sliding window, softcap or ALiBi: torch's fused CPU attention computes the call."""
    return window[0] < 0 and window[1] < 0 and softcap == 0 and alibi_slopes is None


# torch's own fused CPU attention returns the log-sum-exp we need; it aligns causal masks to the top
# left, which is the same mask as ours when Sq == Sk, and no mask at all when Sq == 1 <= Sk.
_CPU_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_CPU_FLASH_BWD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)


# A bound on |score| below which torch's fused attention is used: its backward recomputes the scores
# in another order, off by up to ~D * eps * |s| (float32: < 20 here, far from exp's overflow at 88).
_FUSED_SCORE_BOUND = 1e6


def fused_attention_ok(q: Tensor, k: Tensor, v: Tensor, is_causal: bool, scale: float) -> bool:
    """True when torch's fused attention computes this call as the explicit reference does: no NaN in
    q or k (the fused CPU kernel hides them; a NaN query row must give NaN), no NaN in v under a
    causal mask (it would reach rows that cannot see it: 0 * nan), and |scores| <= scale * D *
    max|q| * max|k| within :data:`_FUSED_SCORE_BOUND`. A few reductions; run before the fused path."""
    cd = compute_dtype(q.dtype)
    bound = q.abs().amax().to(cd) * k.abs().amax().to(cd)  # amax propagates NaN (vector_norm(inf) is 100x slower)
    if is_causal:
        bound = bound + v.sum(dtype=cd) * 0.0  # a NaN (or inf) anywhere in v makes it NaN
    return bool(bound * (abs(scale) * q.shape[-1]) <= _FUSED_SCORE_BOUND)  # False for NaN


def _cpu_flash_causal(q: Tensor, k: Tensor, v: Tensor, is_causal: bool, scale: float) -> Optional[bool]:
    """The is_causal flag for torch's fused CPU attention, or None when it cannot compute this call."""
    sq, sk = q.shape[2], k.shape[2]
    if _CPU_FLASH is None or q.device.type != "cpu" or q.numel() == 0 or k.numel() == 0:
        return None
    if q.shape[-1] != v.shape[-1] or (is_causal and sq != sk and sq != 1):
        return None
    flash_causal = is_causal and sq == sk
    return flash_causal if fused_attention_ok(q, k, v, flash_causal, scale) else None


def attention_forward(q: Tensor, k: Tensor, v: Tensor, is_causal: bool, scale: float, *,
                      window: Tuple[int, int] = (-1, -1), softcap: float = 0.0,
                      alibi_slopes: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """Softmax attention. q (B, Hq, Sq, D), k (B, Hk, Sk, D), v (B, Hk, Sk, Dv), any strides.

    Options as flash-attn defines them: a sliding ``window`` (see :func:`attention_mask`), ``softcap``
    c > 0 (the scaled score s becomes c * tanh(s / c)), ``alibi_slopes`` (Hq,) or (B, Hq): the bias
    -slope * |i + Sk - Sq - j| added after the softcap. (flash-attn's CUDA kernel drops the bias's
    per-row constant under causal masks: the same output, a different log-sum-exp; this is the documented one.)
    Returns ``out`` (B, Hq, Sq, Dv) in q's dtype and ``lse`` (B, Hq, Sq) in :func:`stats_dtype`.
    Non-finite input: a NaN in query row i makes out row i and lse i NaN; a NaN in value row j reaches
    only the rows that see key j (masked entries contribute nothing, not 0 * nan); rows that see no
    key give 0 and lse -inf whatever the input.
    """
    flash_causal = _cpu_flash_causal(q, k, v, is_causal, scale) if _plain(window, softcap, alibi_slopes) else None
    if flash_causal is not None:
        hq = q.shape[1]
        out, lse = _CPU_FLASH(q, _expand_kv(k, hq), _expand_kv(v, hq), 0.0, flash_causal, scale=scale)
        return out, lse.to(stats_dtype(q.dtype))
    cd = compute_dtype(q.dtype)
    zero = torch.zeros((), dtype=cd, device=q.device)
    s, mask, _ = _scores(q, k, is_causal, scale, window, softcap, alibi_slopes)
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
        row_has_key = mask.any(dim=-1)  # (Sq,)
        # rows that see no key would give -inf - -inf = nan below; make them finite, zero them after
        s = torch.where(row_has_key[:, None], s, zero)
    lse = torch.logsumexp(s, dim=-1)
    # softmax, not exp(s - lse): lse carries an absolute error ~ ulp(|s|), which would leave P's rows
    # summing to 1 +- that, and the backward's delta = rowsum(dout * out) inconsistent with its P
    p = torch.softmax(s, dim=-1)
    v_e = _expand_kv(v.to(cd), q.shape[1])
    if mask is None:
        out = torch.matmul(p, v_e)
    else:
        p = torch.where(mask, p, zero)  # also the rows that see no key
        v_nan = torch.isnan(v_e)
        if bool(v_nan.any()):
            # p = 0 does not stop 0 * nan in a matmul: a NaN value reaches only the rows that see its key
            seen = torch.matmul(mask.to(cd), v_nan.to(cd)) > 0
            out = torch.where(seen, float("nan"), torch.matmul(p, torch.where(v_nan, zero, v_e)))
        else:
            out = torch.matmul(p, v_e)
        lse = lse.masked_fill(~row_has_key, float("-inf"))
    return out.to(q.dtype), lse.to(stats_dtype(q.dtype))


def attention_backward(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    dlse: Optional[Tensor],
    is_causal: bool,
    scale: float,
    *,
    window: Tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Gradients of :func:`attention_forward` (same options; the slopes get none), recomputing P from
    the saved log-sum-exp. A softcap multiplies dS by 1 - tanh^2.

    The FlashAttention-2 formulation: with ``delta = rowsum(dout * out) - dlse``,
    ``dS = P * (dout @ V^T - delta)``, ``dQ = scale * dS @ K``, ``dK = scale * dS^T @ Q``,
    ``dV = P^T @ dout``; kv gradients are summed over the query heads of each GQA group.
    ``dlse`` (B, Hq, Sq), the gradient flowing into the returned log-sum-exp, may be None.
    Masked entries of P and dS are exactly 0 (a NaN value row reaches only the rows that see it);
    rows with lse -inf (no key) get zero gradients, rows with a NaN lse (a NaN query) NaN ones.
    Returns dq, dk, dv in the dtypes of q, k, v.
    """
    hq, hk = q.shape[1], k.shape[1]
    flash_causal = _cpu_flash_causal(q, k, v, is_causal, scale) if _plain(window, softcap, alibi_slopes) else None
    if flash_causal is not None and dlse is None and _CPU_FLASH_BWD is not None:
        dq, dk, dv = _CPU_FLASH_BWD(
            dout.contiguous(), q, _expand_kv(k, hq), _expand_kv(v, hq), out, lse, 0.0, flash_causal, scale=scale
        )
        return dq, _sum_groups(dk, hk).to(k.dtype), _sum_groups(dv, hk).to(v.dtype)
    cd = compute_dtype(q.dtype)
    zero = torch.zeros((), dtype=cd, device=q.device)
    s, mask, dcap = _scores(q, k, is_causal, scale, window, softcap, alibi_slopes)
    lse_c = lse.to(cd)
    has_key = lse_c != float("-inf")
    p = torch.exp(s - torch.where(has_key, lse_c, zero)[..., None])
    keep = has_key[..., None] if mask is None else (mask & has_key[..., None])
    p = torch.where(keep, p, zero)

    do_c = dout.to(cd)
    v_e = _expand_kv(v.to(cd), hq)
    delta = (do_c * out.to(cd)).sum(dim=-1)
    if dlse is not None:
        delta = delta - dlse.to(cd)
    dp = torch.matmul(do_c, v_e.transpose(-2, -1))
    ds = p * (dp - delta[..., None])
    ds = torch.where(keep, ds if dcap is None else ds * dcap, zero)
    dq = torch.matmul(ds, _expand_kv(k.to(cd), hq)) * scale
    q_c = q.to(cd)
    # a NaN query reaches the keys it sees through its dS; a masked dS = 0 must not meet it (0 * nan)
    dk = _sum_groups(torch.matmul(ds.transpose(-2, -1), torch.where(torch.isnan(q_c), zero, q_c)) * scale, hk)
    dv = _sum_groups(torch.matmul(p.transpose(-2, -1), do_c), hk)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _spans(cu_seqlens_q: Tensor, cu_seqlens_k: Tensor):
    """(q0, q1, k0, k1) token ranges of each packed sequence (one device-to-host read each)."""
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    return [(cq[i], cq[i + 1], ck[i], ck[i + 1]) for i in range(len(cq) - 1)]


def _as_bhsd(t: Tensor, start: int, end: int) -> Tensor:
    """Tokens [start, end) of a packed (T, H, D) tensor as a (1, H, S, D) view."""
    return t[start:end].transpose(0, 1).unsqueeze(0)


def _seq_options(opts: dict, b: int) -> dict:
    """Sequence b's options: its row of (B, Hq) ALiBi slopes, as a (1, Hq) batch."""
    slopes = opts.get("alibi_slopes")
    return {**opts, "alibi_slopes": slopes[b : b + 1]} if slopes is not None and slopes.dim() == 2 else opts


def varlen_attention_forward(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                             is_causal: bool, scale: float, **options) -> Tuple[Tensor, Tensor]:
    """Attention over packed sequences: :func:`attention_forward` on each sequence in turn.

    q (Tq, Hq, D), k (Tk, Hk, D), v (Tk, Hk, Dv), any strides; sequence b is tokens
    cu_seqlens_q[b]:cu_seqlens_q[b+1] of q and cu_seqlens_k[b]:cu_seqlens_k[b+1] of k and v (int32,
    (B+1,)); the causal mask is bottom-right aligned within each sequence, as are the ``options`` of
    :func:`attention_forward` (window, softcap, alibi_slopes (Hq,) or (B, Hq)). Returns out (Tq, Hq, Dv)
    in q's dtype and lse (Hq, Tq) in :func:`stats_dtype`; a sequence with no key gives 0 and -inf.
    """
    out = q.new_zeros(q.shape[0], q.shape[1], v.shape[-1])
    lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), dtype=stats_dtype(q.dtype), device=q.device)
    for b, (q0, q1, k0, k1) in enumerate(_spans(cu_seqlens_q, cu_seqlens_k)):
        if q1 > q0 and k1 > k0:
            o, l = attention_forward(_as_bhsd(q, q0, q1), _as_bhsd(k, k0, k1), _as_bhsd(v, k0, k1), is_causal, scale,
                                     **_seq_options(options, b))
            out[q0:q1] = o[0].transpose(0, 1)
            lse[:, q0:q1] = l[0]
    return out, lse


def varlen_attention_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                              dlse: Optional[Tensor], cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, is_causal: bool,
                              scale: float, **options) -> Tuple[Tensor, Tensor, Tensor]:
    """Gradients of :func:`varlen_attention_forward` (``dlse``: None or (Hq, Tq)), sequence by sequence
    through :func:`attention_backward`. Returns dq, dk, dv packed like q, k, v (contiguous)."""
    dq, dk, dv = torch.zeros_like(q, memory_format=torch.contiguous_format), torch.zeros_like(
        k, memory_format=torch.contiguous_format), torch.zeros_like(v, memory_format=torch.contiguous_format)
    for b, (q0, q1, k0, k1) in enumerate(_spans(cu_seqlens_q, cu_seqlens_k)):
        if q1 > q0 and k1 > k0:
            dl = None if dlse is None else dlse[:, q0:q1].unsqueeze(0)
            grads = attention_backward(_as_bhsd(dout, q0, q1), _as_bhsd(q, q0, q1), _as_bhsd(k, k0, k1), _as_bhsd(v, k0, k1),
                                       _as_bhsd(out, q0, q1), lse[:, q0:q1].unsqueeze(0), dl, is_causal, scale,
                                       **_seq_options(options, b))
            for dst, src, a, b in zip((dq, dk, dv), grads, (q0, k0, k0), (q1, k1, k1)):
                dst[a:b] = src[0].transpose(0, 1)
    return dq, dk, dv
