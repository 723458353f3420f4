"""Plain-torch implementations of every fastgpt op.

These are two things at once: the CPU fallback (what runs when no GPU kernel can serve a call), and
the oracle every kernel is tested against. They favour clarity over speed, and compute in float32 for
float16/bfloat16 inputs (float64 inputs stay float64, which is how the tests get their exact answers).

Conventions shared with the kernels (so they can be compared output for output):

* attention works on logical (B, H, S, D) tensors; k and v may have fewer heads than q (GQA: query
  head ``h`` uses kv head ``h // (Hq // Hk)``); the causal mask is aligned to the bottom right, so
  query ``i`` sees key ``j`` iff ``j <= i + Sk - Sq``. Query rows that see no key (``Sq > Sk``)
  output zeros and have log-sum-exp ``-inf``; their gradients are zero. Sliding windows, softcap
  and ALiBi follow flash-attn (see :func:`attention_mask` and :func:`attention_forward`).
* the log-sum-exp is natural-log, of the *scaled* scores, in float32 (float64 for float64 inputs).
* layer norm saves mean and rstd (1 / sqrt(var + eps)) per row in float32 (float64 for float64).
* weight/bias of the norms may be float32 when x is float16/bfloat16 (the mixed-precision layout that
  autocast produces); outputs always have x's dtype, weight gradients the weight's dtype.
"""

import math
from typing import Optional, Tuple

import torch
from torch import Tensor

from fastgpt._dtypes import compute_dtype, stats_dtype  # noqa: F401  (re-exported)
# attention's references live in their own module; these names stay fastgpt.reference's
from fastgpt.reference_attention import (  # noqa: F401
    _expand_kv,
    _spans,
    attention_backward,
    attention_forward,
    attention_mask,
    causal_mask,
    fused_attention_ok,
    varlen_attention_backward,
    varlen_attention_forward,
)

__all__ = [
    "compute_dtype",
    "stats_dtype",
    "causal_mask",
    "attention_mask",
    "attention_forward",
    "attention_backward",
    "varlen_attention_forward",
    "varlen_attention_backward",
    "cross_entropy_rows",
    "linear_cross_entropy_chunked",
    "layer_norm_forward",
    "layer_norm_backward",
    "add_layer_norm_forward",
    "add_layer_norm_backward",
    "gelu_forward",
    "gelu_backward",
    "bias_gelu_forward",
    "bias_gelu_backward",
    "rms_norm_forward",
    "rms_norm_backward",
    "add_rms_norm_forward",
    "add_rms_norm_backward",
    "swiglu_forward",
    "swiglu_backward",
    "rotary_forward",
]

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_INV_SQRT_2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_TANH_COEF = 0.044715


# --------------------------------------------------------------------------------------------
# cross-entropy (logits are 2-D here: rows x vocab; the public ops flatten)
# --------------------------------------------------------------------------------------------


def cross_entropy_rows(
    z: Tensor, target: Tensor, ignore_index: int, label_smoothing: float, grad_scale: Optional[Tensor] = None
) -> Tuple[Tensor, Optional[Tensor]]:
    """Each row's loss of logits ``z`` (rows, V) and, when ``grad_scale`` is given, its gradient.

    ``loss_i = lse_i - (1 - eps) z[i, t_i] - eps / V sum_j z[i, j]`` (torch's label smoothing), 0 where
    ``t_i == ignore_index``. The gradient is ``grad_scale_i * (softmax(z_i) - (1 - eps) onehot(t_i) -
    eps / V)``, 0 on ignored rows; ``grad_scale`` is 0-d or (rows,). Both in the compute dtype
    (float32 for 16-bit z); z itself is never modified.
    """
    zc = z.to(compute_dtype(z.dtype))
    v = zc.shape[-1]
    valid = target != ignore_index
    t = torch.where(valid, target, 0).long().unsqueeze(1)
    lse = torch.logsumexp(zc, dim=-1)
    loss = lse - (1.0 - label_smoothing) * zc.gather(1, t).squeeze(1)
    if label_smoothing:
        loss = loss - (label_smoothing / v) * zc.sum(-1)
    loss = torch.where(valid, loss, torch.zeros((), dtype=loss.dtype, device=loss.device))
    if grad_scale is None:
        return loss, None
    # in place on the float32 copy of 16-bit logits; a new tensor when z already has the compute dtype
    g = (zc - lse.unsqueeze(1)) if zc is z else zc.sub_(lse.unsqueeze(1))
    g.exp_()
    if label_smoothing:
        g.sub_(label_smoothing / v)
    g.scatter_add_(1, t, torch.full_like(t, -(1.0 - label_smoothing), dtype=g.dtype))
    g.mul_((grad_scale.to(g.dtype) * valid).unsqueeze(1))  # 0-d or (rows,) scale, zero on ignored rows
    return loss, g


def linear_cross_entropy_chunked(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    target: Tensor,
    ignore_index: int,
    label_smoothing: float,
    grad_scale: Optional[Tensor],
    need_dx: bool,
    need_dweight: bool,
    need_dbias: bool,
    chunk: int,
    rows_fn=cross_entropy_rows,
    dweight_in_weight_dtype: bool = False,
) -> Tuple[Tensor, Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """Each row's loss of ``x @ weight.T + bias`` and the gradients of x, weight and bias, ``chunk`` rows at a time.

    x (N, D), weight (V, D), bias (V,) or None, target (N,). The logits of one chunk (chunk, V) are the
    largest tensor alive; the (N, V) logits never exist. ``grad_scale`` (0-d or (N,)) scales each
    row's gradient (see :func:`cross_entropy_rows`); the gradients are computed only when a ``need_*``
    flag is set. ``rows_fn(z, target, ignore_index, label_smoothing, grad_scale) -> (loss, dz)`` is
    the per-chunk cross-entropy (the Triton backend passes its kernel, which writes dz over z).
    The logits and their gradient meet x and weight in matmuls of x's dtype (as eager code's do);
    dweight and dbias are summed over chunks in the compute dtype, or dweight in weight's own dtype
    when ``dweight_in_weight_dtype`` (Liger-Kernel's memory trade: no float32 (V, D) buffer, one
    rounding per chunk). Returns (loss (N,), dx (x's dtype), dweight, dbias (in the compute dtype, or
    weight's for dweight as asked: the caller rounds them once, after any scaling)), None for a
    gradient not asked for.
    """
    n, v = x.shape[0], weight.shape[0]
    cd = compute_dtype(x.dtype)
    need_grad = need_dx or need_dweight or need_dbias
    loss = torch.empty(n, dtype=cd, device=x.device)
    dx = torch.empty_like(x) if need_dx else None
    dw = torch.zeros(weight.shape, dtype=weight.dtype if dweight_in_weight_dtype else cd, device=x.device) if need_dweight else None
    db = torch.zeros(v, dtype=cd, device=x.device) if need_dbias else None
    wt = weight.t()
    for c0 in range(0, n, chunk):
        c1 = min(c0 + chunk, n)
        xc = x[c0:c1]
        z = torch.addmm(bias, xc, wt) if bias is not None else torch.mm(xc, wt)
        scale = None
        if need_grad:
            scale = grad_scale if grad_scale.dim() == 0 else grad_scale[c0:c1]
        loss_c, g = rows_fn(z, target[c0:c1], ignore_index, label_smoothing, scale)
        loss[c0:c1] = loss_c
        del z
        if not need_grad:
            continue
        if db is not None:
            db += g.sum(0, dtype=cd)
        gx = g.to(x.dtype)
        if dx is not None:
            torch.mm(gx, weight, out=dx[c0:c1])
        if dw is not None:
            if dw.dtype == x.dtype:
                dw.addmm_(gx.t(), xc)  # float32 sum inside the GEMM, rounded to x's dtype once per chunk
            elif x.device.type != "cuda":
                dw.addmm_(g.t().to(cd), xc.to(cd))  # a float32 GEMM costs a CPU no more; no (V, D) temporary
            else:
                dw += torch.mm(gx.t(), xc)  # 16-bit GEMM, its (V, D) result summed in float32
        del g, gx
    return loss, dx, dw, db


# --------------------------------------------------------------------------------------------
# layer norm (x is 2-D here: rows x normalized size; the public op flattens)
# --------------------------------------------------------------------------------------------


def _native_layer_norm_ok(x: Tensor, weight: Optional[Tensor]) -> bool:
    """torch's fused layer norm keeps its statistics in x's dtype: use it only where that is float32/64."""
    return x.dtype in (torch.float32, torch.float64) and (weight is None or weight.dtype == x.dtype) and x.numel() > 0


def layer_norm_forward(
    x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float
) -> Tuple[Tensor, Tensor, Tensor]:
    """Layer norm over the last dim of x (M, N). Returns y (x's dtype), mean and rstd (M,)."""
    if _native_layer_norm_ok(x, weight):
        y, mean, rstd = torch.native_layer_norm(x, [x.shape[-1]], weight, bias, eps)
        return y, mean.view(-1), rstd.view(-1)
    cd = compute_dtype(x.dtype)
    xc = x.to(cd)
    mean = xc.mean(dim=-1)
    xm = xc - mean[:, None]
    # two-pass variance: E[x^2] - E[x]^2 cancels catastrophically for rows with a large mean
    rstd = torch.rsqrt((xm * xm).mean(dim=-1) + eps)
    y = xm * rstd[:, None]
    if weight is not None:
        y = y * weight.to(cd)
    if bias is not None:
        y = y + bias.to(cd)
    return y.to(x.dtype), mean.to(stats_dtype(x.dtype)), rstd.to(stats_dtype(x.dtype))


def layer_norm_backward(
    dy: Tensor,
    x: Tensor,
    weight: Optional[Tensor],
    mean: Tensor,
    rstd: Tensor,
    need_weight_grad: bool,
    need_bias_grad: bool,
) -> Tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
    """Gradients of :func:`layer_norm_forward`: dx (x's dtype), dweight and dbias (weight's dtype) or None."""
    if _native_layer_norm_ok(x, weight):
        n = x.shape[-1]
        # the bias only tells native_layer_norm_backward that a bias gradient is wanted
        bias = torch.empty(n, dtype=x.dtype, device=x.device) if need_bias_grad else None
        dx, dw, db = torch.ops.aten.native_layer_norm_backward(
            dy, x, [n], mean.view(-1, 1), rstd.view(-1, 1), weight, bias, [True, need_weight_grad, need_bias_grad]
        )
        if need_bias_grad and weight is None:
            db = dy.sum(dim=0)
        return dx, (dw if need_weight_grad else None), (db if need_bias_grad else None)
    cd = compute_dtype(x.dtype)
    dyc = dy.to(cd)
    xhat = (x.to(cd) - mean.to(cd)[:, None]) * rstd.to(cd)[:, None]
    g = dyc * weight.to(cd) if weight is not None else dyc
    dx = rstd.to(cd)[:, None] * (g - g.mean(dim=-1, keepdim=True) - xhat * (g * xhat).mean(dim=-1, keepdim=True))
    wdtype = weight.dtype if weight is not None else x.dtype
    dw = (dyc * xhat).sum(dim=0).to(wdtype) if need_weight_grad else None
    db = dyc.sum(dim=0).to(wdtype) if need_bias_grad else None
    return dx.to(x.dtype), dw, db


def add_layer_norm_forward(
    x: Tensor, residual: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """``s = x + residual`` (rounded to x's dtype, as eager code stores it) and ``layer_norm(s)``.

    Returns y, s, mean, rstd. The norm is taken of the rounded sum so that y is exactly the layer
    norm of the residual stream the caller keeps.
    """
    s = x + residual  # torch rounds the float32 sum of half inputs once: the stored residual stream
    y, mean, rstd = layer_norm_forward(s, weight, bias, eps)
    return y, s, mean, rstd


def add_layer_norm_backward(
    dy: Tensor,
    dsum: Optional[Tensor],
    s: Tensor,
    weight: Optional[Tensor],
    mean: Tensor,
    rstd: Tensor,
    need_weight_grad: bool,
    need_bias_grad: bool,
) -> Tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
    """Gradients of :func:`add_layer_norm_forward`.

    ``dsum`` is the gradient flowing into the returned sum (None when unused). The gradient of x and
    of residual are the same tensor: ``layer_norm_backward(dy) + dsum``.
    """
    dx, dw, db = layer_norm_backward(dy, s, weight, mean, rstd, need_weight_grad, need_bias_grad)
    if dsum is not None:
        cd = compute_dtype(s.dtype)
        dx = (dx.to(cd) + dsum.to(cd)).to(s.dtype)
    return dx, dw, db


# --------------------------------------------------------------------------------------------
# GELU
# --------------------------------------------------------------------------------------------


def _gelu(xc: Tensor, approximate: str) -> Tensor:
    if approximate == "tanh":
        return 0.5 * xc * (1.0 + torch.tanh(_SQRT_2_OVER_PI * (xc + _TANH_COEF * xc * xc * xc)))
    return 0.5 * xc * (1.0 + torch.erf(xc * _INV_SQRT_2))


def _gelu_grad(xc: Tensor, approximate: str) -> Tensor:
    if approximate == "tanh":
        t = torch.tanh(_SQRT_2_OVER_PI * (xc + _TANH_COEF * xc * xc * xc))
        return 0.5 * (1.0 + t) + 0.5 * xc * (1.0 - t * t) * _SQRT_2_OVER_PI * (1.0 + 3.0 * _TANH_COEF * xc * xc)
    return 0.5 * (1.0 + torch.erf(xc * _INV_SQRT_2)) + xc * torch.exp(-0.5 * xc * xc) * _INV_SQRT_2PI


def gelu_forward(x: Tensor, approximate: str) -> Tensor:
    """GELU of x (any shape), ``approximate`` "none" (erf) or "tanh"; computed in float32 or float64.

    torch's fused GELU computes in float32 for half inputs and rounds once, which is this formula.
    """
    return torch.ops.aten.gelu(x, approximate=approximate)


def gelu_backward(dy: Tensor, x: Tensor, approximate: str) -> Tensor:
    """dx = dy * gelu'(x), in x's dtype (torch's fused backward: float32 math, one rounding)."""
    return torch.ops.aten.gelu_backward(dy, x, approximate=approximate)


def gelu_formula(x: Tensor, approximate: str) -> Tensor:
    """The GELU formula itself, in x's dtype (the specification the fused paths implement)."""
    return _gelu(x, approximate)


def gelu_grad_formula(x: Tensor, approximate: str) -> Tensor:
    """d gelu / dx, in x's dtype."""
    return _gelu_grad(x, approximate)


def bias_gelu_forward(x: Tensor, bias: Tensor, approximate: str) -> Tensor:
    """gelu(x + bias) with bias (N,) broadcast over the last dim; the sum is not rounded in between."""
    if x.dtype in (torch.float32, torch.float64):
        return torch.ops.aten.gelu(x + bias, approximate=approximate)
    cd = compute_dtype(x.dtype)
    return _gelu(x.to(cd) + bias.to(cd), approximate).to(x.dtype)


def bias_gelu_backward(dy: Tensor, x: Tensor, bias: Tensor, approximate: str) -> Tuple[Tensor, Tensor]:
    """dx = dy * gelu'(x + bias) (x's dtype) and dbias = dx summed over all leading dims (bias's dtype)."""
    if x.dtype in (torch.float32, torch.float64):
        dx = torch.ops.aten.gelu_backward(dy, x + bias, approximate=approximate)
        return dx, dx.reshape(-1, x.shape[-1]).sum(dim=0).to(bias.dtype)
    cd = compute_dtype(x.dtype)
    dxc = dy.to(cd) * _gelu_grad(x.to(cd) + bias.to(cd), approximate)
    dbias = dxc.reshape(-1, x.shape[-1]).sum(dim=0)
    return dxc.to(x.dtype), dbias.to(bias.dtype)


# --------------------------------------------------------------------------------------------
# RMSNorm (x is 2-D: rows x normalized size; the public op flattens)
# --------------------------------------------------------------------------------------------


def _rms_weight(weight: Tensor, weight_offset: float, cd: torch.dtype) -> Tensor:
    return weight.to(cd) + weight_offset if weight_offset else weight.to(cd)


def rms_norm_forward(
    x: Tensor, weight: Optional[Tensor], eps: float, weight_offset: float = 0.0, cast_before_weight: bool = False
) -> Tuple[Tensor, Tensor]:
    """RMSNorm over the last dim of x (M, N): ``y = x * rstd * (weight + weight_offset)``, rstd =
    1 / sqrt(mean(x^2) + eps) per row (float32, float64 for float64 x). Returns y and rstd (M,).

    y has x's dtype and is rounded once, as torch's F.rms_norm. ``cast_before_weight`` is Hugging
    Face's LlamaRMSNorm: the normalized x is rounded to x's dtype *before* the weight multiplies it,
    and y has the promoted dtype of x and weight (float32 weight on bfloat16 x gives float32 y).
    """
    cd = compute_dtype(x.dtype)
    xc = x.to(cd)
    rstd = torch.rsqrt(xc.pow(2).mean(dim=-1) + eps)
    xhat = xc * rstd[:, None]
    out_dtype = x.dtype
    if cast_before_weight:
        xhat = xhat.to(x.dtype).to(cd)
        if weight is not None:
            out_dtype = torch.promote_types(x.dtype, weight.dtype)
    y = xhat * _rms_weight(weight, weight_offset, cd) if weight is not None else xhat
    return y.to(out_dtype), rstd.to(stats_dtype(x.dtype))


def rms_norm_backward(
    dy: Tensor,
    x: Tensor,
    weight: Optional[Tensor],
    rstd: Tensor,
    need_weight_grad: bool,
    weight_offset: float = 0.0,
    cast_before_weight: bool = False,
    dsum: Optional[Tensor] = None,
) -> Tuple[Tensor, Optional[Tensor]]:
    """Gradients of :func:`rms_norm_forward`: dx (x's dtype; plus ``dsum`` before the one rounding,
    for the residual add) and dweight (weight's dtype) or None. The rounding of
    ``cast_before_weight`` passes gradients through unchanged (as autograd treats a cast)."""
    cd = compute_dtype(x.dtype)
    dyc = dy.to(cd)
    r = rstd.to(cd)[:, None]
    xhat = x.to(cd) * r
    g = dyc * _rms_weight(weight, weight_offset, cd) if weight is not None else dyc
    dx = r * (g - xhat * (g * xhat).mean(dim=-1, keepdim=True))
    if dsum is not None:
        dx = dx + dsum.to(cd)
    dw = None
    if need_weight_grad:
        xw = xhat.to(x.dtype).to(cd) if cast_before_weight else xhat
        dw = (dyc * xw).sum(dim=0).to(weight.dtype)
    return dx.to(x.dtype), dw


def add_rms_norm_forward(
    x: Tensor, residual: Tensor, weight: Optional[Tensor], eps: float, weight_offset: float = 0.0,
    cast_before_weight: bool = False,
) -> Tuple[Tensor, Tensor, Tensor]:
    """``s = x + residual`` (rounded to x's dtype: the residual stream eager code stores) and
    ``rms_norm(s)``. Returns y, s, rstd."""
    s = x + residual
    y, rstd = rms_norm_forward(s, weight, eps, weight_offset, cast_before_weight)
    return y, s, rstd


def add_rms_norm_backward(
    dy: Tensor, dsum: Optional[Tensor], s: Tensor, weight: Optional[Tensor], rstd: Tensor, need_weight_grad: bool,
    weight_offset: float = 0.0, cast_before_weight: bool = False,
) -> Tuple[Tensor, Optional[Tensor]]:
    """Gradients of :func:`add_rms_norm_forward`: the gradient of x and of residual (one tensor:
    the norm's dx plus ``dsum``, the gradient flowing into the returned sum) and dweight."""
    return rms_norm_backward(dy, s, weight, rstd, need_weight_grad, weight_offset, cast_before_weight, dsum)


# --------------------------------------------------------------------------------------------
# SwiGLU
# --------------------------------------------------------------------------------------------


def swiglu_forward(gate: Tensor, up: Tensor) -> Tensor:
    """``silu(gate) * up`` computed in float32 (float64 for float64 inputs), rounded once (float32 and
    float64 inputs: torch's ``F.silu(gate) * up``, which the op's torch shortcut also calls)."""
    if gate.dtype in (torch.float32, torch.float64):
        return torch.nn.functional.silu(gate) * up
    cd = compute_dtype(gate.dtype)
    g = gate.to(cd)
    return (g * torch.sigmoid(g) * up.to(cd)).to(gate.dtype)


def swiglu_backward(dy: Tensor, gate: Tensor, up: Tensor) -> Tuple[Tensor, Tensor]:
    """(dgate, dup) of :func:`swiglu_forward`: dgate = dy * up * silu'(gate), dup = dy * silu(gate)."""
    cd = compute_dtype(gate.dtype)
    g, u, d = gate.to(cd), up.to(cd), dy.to(cd)
    sig = torch.sigmoid(g)
    dgate = d * u * sig * (1.0 + g * (1.0 - sig))
    return dgate.to(gate.dtype), (d * g * sig).to(up.dtype)


# --------------------------------------------------------------------------------------------
# rotary embeddings
# --------------------------------------------------------------------------------------------


def rotary_forward(x: Tensor, cos1: Tensor, sin1: Tensor, cos2: Tensor, sin2: Tensor, interleaved: bool,
                   backward: bool = False) -> Tensor:
    """Rotary embedding of x, a logical (B, S, H, D) tensor, on its first R = 2 * cos1.shape[-1] dims.

    cos1/sin1 (for the first element of each pair) and cos2/sin2 (for the second) are (Bc, S, R/2),
    Bc in (1, B). The pairs are (i, i + R/2) (GPT-NeoX / Llama, ``interleaved=False``) or (2i, 2i+1)
    (GPT-J). Each pair (a, b) becomes (a*cos1 - b*sin1, b*cos2 + a*sin2): a rotation when the two
    halves of cos/sin agree (flash-attn passes one table for both; Hugging Face's full-width cos/sin
    are cat(freqs, freqs)), exactly Hugging Face's ``q * cos + rotate_half(q) * sin`` in general.
    ``backward`` applies the transposed map (the gradient). Dims past R pass through. Computed in
    float32 (float64 for float64 x), rounded once to x's dtype.
    """
    cd = compute_dtype(x.dtype)
    r2 = cos1.shape[-1]
    xc = x.to(cd)
    c1, s1, c2, s2 = (t.to(cd)[:, :, None, :] for t in (cos1, sin1, cos2, sin2))
    if interleaved:
        a, b = xc[..., 0 : 2 * r2 : 2], xc[..., 1 : 2 * r2 : 2]
    else:
        a, b = xc[..., :r2], xc[..., r2 : 2 * r2]
    if backward:
        oa, ob = a * c1 + b * s2, b * c2 - a * s1
    else:
        oa, ob = a * c1 - b * s1, b * c2 + a * s2
    rot = torch.stack((oa, ob), dim=-1).flatten(-2) if interleaved else torch.cat((oa, ob), dim=-1)
    return torch.cat((rot, xc[..., 2 * r2 :]), dim=-1).to(x.dtype)
