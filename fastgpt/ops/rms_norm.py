"""RMSNorm and residual-add + RMSNorm: custom ops and public functions.

Custom ops (x is 2-D, rows x normalized size, contiguous; ``wo`` = weight_offset, ``cbw`` = cast_before_weight):

* ``fastgpt::rms_norm_fwd(x, weight?, eps, wo, cbw) -> (y, rstd)``
* ``fastgpt::rms_norm_bwd(dy, x, weight?, rstd, need_weight_grad, wo, cbw) -> (dx, dweight)``
* ``fastgpt::add_rms_norm_fwd(x, residual, weight?, eps, wo, cbw) -> (y, sum, rstd)``
* ``fastgpt::add_rms_norm_bwd(dy, dsum?, sum, weight?, rstd, need_weight_grad, wo, cbw) -> (dx, dweight)``

rstd is float32 (float64 for float64 x). A weight gradient that is not needed comes back as an empty
tensor. The triton backend is ``fastgpt.kernels.rms_norm``.
"""

import math
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from fastgpt import reference
from fastgpt.ops import _triton_backend as triton
from fastgpt.ops._cases import NORM_DISPATCH_SIZES, rowwise_gpu_shapes, rowwise_smoke_shapes
from fastgpt.ops._checks import check_residual, check_tensor
from fastgpt.ops._define import TORCH_EXACT_DTYPES, FastgptOp, reference_serves
from fastgpt.ops.layer_norm import _as_rows, _check_params, _grad_or_empty, _normalized_shape, _param_grad_like
from fastgpt.registry import OpCases, OpSpec, element_size, passes, register

__all__ = ["rms_norm", "add_rms_norm"]

_KERNELS = "rms_norm"


def _out_dtype(x: Tensor, weight: Optional[Tensor], cast_before_weight: bool) -> torch.dtype:
    if cast_before_weight and weight is not None:
        return torch.promote_types(x.dtype, weight.dtype)
    return x.dtype


def _rstd(x: Tensor) -> Tensor:
    return x.new_empty(x.shape[0], dtype=reference.stats_dtype(x.dtype))


# ---- rms norm --------------------------------------------------------------------------------


def _rms_norm_fwd(x: Tensor, weight: Optional[Tensor], eps: float, weight_offset: float, cast_before_weight: bool) -> Tuple[Tensor, Tensor]:
    if triton.choose("rms_norm", _KERNELS, x) == "triton":
        y, rstd = torch.empty_like(x, dtype=_out_dtype(x, weight, cast_before_weight)), _rstd(x)
        triton.kernels(_KERNELS).forward(x, None, weight, y, None, rstd, eps, weight_offset, cast_before_weight)
        return y, rstd
    return reference.rms_norm_forward(x, weight, eps, weight_offset, cast_before_weight)


def _rms_norm_fwd_fake(x, weight, eps, weight_offset, cast_before_weight):
    return torch.empty_like(x, dtype=_out_dtype(x, weight, cast_before_weight)), _rstd(x)


def _rms_norm_bwd(dy: Tensor, x: Tensor, weight: Optional[Tensor], rstd: Tensor, need_weight_grad: bool, weight_offset: float,
                  cast_before_weight: bool) -> Tuple[Tensor, Tensor]:
    if triton.choose("rms_norm", _KERNELS, x) == "triton":
        dx = torch.empty_like(x)
        dw = triton.kernels(_KERNELS).backward(dy, x, weight, rstd, None, dx, need_weight_grad, weight_offset, cast_before_weight)
        return dx, _grad_or_empty(dw, x)
    dx, dw = reference.rms_norm_backward(dy, x, weight, rstd, need_weight_grad, weight_offset, cast_before_weight)
    return dx, _grad_or_empty(dw, x)


def _rms_norm_bwd_fake(dy, x, weight, rstd, need_weight_grad, weight_offset, cast_before_weight):
    return torch.empty_like(x), _param_grad_like(x, weight, need_weight_grad)


def _rn_setup_context(ctx, inputs, output):
    x, weight, _, weight_offset, cast_before_weight = inputs
    ctx.save_for_backward(x, weight, output[1])
    ctx.has_weight, ctx.options = weight is not None, (weight_offset, cast_before_weight)


def _rn_backward(ctx, rms_norm_bwd, dy, _drstd):
    if dy is None:
        return None, None, None, None, None
    x, weight, rstd = ctx.saved_tensors
    need_w = ctx.has_weight and ctx.needs_input_grad[1]
    dx, dw = rms_norm_bwd(dy.contiguous(), x, weight, rstd, need_w, *ctx.options)
    return dx, (dw if need_w else None), None, None, None


_rms_norm = FastgptOp("rms_norm", _rms_norm_fwd, _rms_norm_bwd, _rms_norm_fwd_fake, _rms_norm_bwd_fake, _rn_setup_context,
                      _rn_backward, non_differentiable=(1,))


# ---- add + rms norm --------------------------------------------------------------------------


def _add_rms_norm_fwd(x: Tensor, residual: Tensor, weight: Optional[Tensor], eps: float, weight_offset: float,
                      cast_before_weight: bool) -> Tuple[Tensor, Tensor, Tensor]:
    if triton.choose("add_rms_norm", _KERNELS, x) == "triton":
        y, s, rstd = torch.empty_like(x, dtype=_out_dtype(x, weight, cast_before_weight)), torch.empty_like(x), _rstd(x)
        triton.kernels(_KERNELS).forward(x, residual, weight, y, s, rstd, eps, weight_offset, cast_before_weight)
        return y, s, rstd
    return reference.add_rms_norm_forward(x, residual, weight, eps, weight_offset, cast_before_weight)


def _add_rms_norm_fwd_fake(x, residual, weight, eps, weight_offset, cast_before_weight):
    return torch.empty_like(x, dtype=_out_dtype(x, weight, cast_before_weight)), torch.empty_like(x), _rstd(x)


def _add_rms_norm_bwd(dy: Tensor, dsum: Optional[Tensor], s: Tensor, weight: Optional[Tensor], rstd: Tensor, need_weight_grad: bool,
                      weight_offset: float, cast_before_weight: bool) -> Tuple[Tensor, Tensor]:
    if triton.choose("add_rms_norm", _KERNELS, s) == "triton":
        dx = torch.empty_like(s)
        dw = triton.kernels(_KERNELS).backward(dy, s, weight, rstd, dsum, dx, need_weight_grad, weight_offset, cast_before_weight)
        return dx, _grad_or_empty(dw, s)
    dx, dw = reference.add_rms_norm_backward(dy, dsum, s, weight, rstd, need_weight_grad, weight_offset, cast_before_weight)
    return dx, _grad_or_empty(dw, s)


def _add_rms_norm_bwd_fake(dy, dsum, s, weight, rstd, need_weight_grad, weight_offset, cast_before_weight):
    return torch.empty_like(s), _param_grad_like(s, weight, need_weight_grad)


def _arn_setup_context(ctx, inputs, output):
    _, _, weight, _, weight_offset, cast_before_weight = inputs
    _, s, rstd = output
    ctx.save_for_backward(s, weight, rstd)
    ctx.has_weight, ctx.options = weight is not None, (weight_offset, cast_before_weight)
    ctx.y_dtype = output[0].dtype


def _arn_backward(ctx, add_rms_norm_bwd, dy, dsum, _drstd):
    if dy is None and dsum is None:
        return None, None, None, None, None, None
    s, weight, rstd = ctx.saved_tensors
    dy = torch.zeros_like(s, dtype=ctx.y_dtype) if dy is None else dy.contiguous()
    dsum = None if dsum is None else dsum.contiguous()
    need_w = ctx.has_weight and ctx.needs_input_grad[2]
    dx, dw = add_rms_norm_bwd(dy, dsum, s, weight, rstd, need_w, *ctx.options)
    return dx, dx, (dw if need_w else None), None, None, None


_add_rms_norm = FastgptOp("add_rms_norm", _add_rms_norm_fwd, _add_rms_norm_bwd, _add_rms_norm_fwd_fake, _add_rms_norm_bwd_fake,
                          _arn_setup_context, _arn_backward, non_differentiable=(2,))


# ---- public functions ------------------------------------------------------------------------


def _options(fn: str, x: Tensor, eps: Optional[float], weight_offset: float, cast_before_weight: bool) -> float:
    """Validates the scalar options; returns eps (None: torch's default, the machine epsilon of the
    compute dtype: float32's for float16/bfloat16/float32 x, float64's for float64 x)."""
    if eps is None:
        eps = torch.finfo(reference.compute_dtype(x.dtype)).eps
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"{fn}: eps must be a finite number >= 0 or None; got {eps!r}")
    if isinstance(weight_offset, bool) or not isinstance(weight_offset, (int, float)) or not math.isfinite(weight_offset):
        raise ValueError(f"{fn}: weight_offset must be a finite number; got {weight_offset!r}")
    if not isinstance(cast_before_weight, bool):
        raise TypeError(f"{fn}: cast_before_weight must be a bool; got {type(cast_before_weight).__name__}")
    return float(eps)


def _torch_exact(x: Tensor, weight: Optional[Tensor], weight_offset: float) -> bool:
    """The reference computes exactly F.rms_norm: float32/64 with a weight of x's dtype, no offset
    (cast_before_weight changes nothing when x is float32/64 and the weight has x's dtype)."""
    return x.dtype in TORCH_EXACT_DTYPES and (weight is None or weight.dtype == x.dtype) and not weight_offset


def rms_norm(
    x: Tensor,
    normalized_shape: Union[int, Sequence[int], torch.Size],
    weight: Optional[Tensor] = None,
    eps: Optional[float] = None,
    *,
    weight_offset: float = 0.0,
    cast_before_weight: bool = False,
) -> Tensor:
    """Drop-in for ``torch.nn.functional.rms_norm``: ``x / sqrt(mean(x^2) + eps) * weight``.

    Normalizes over the trailing dims ``normalized_shape`` of x (any leading shape); ``weight``
    (optional, shape ``normalized_shape``) has x's dtype or float32 for float16/bfloat16 x. eps=None
    is torch's default (the float32 machine epsilon for 16-bit and float32 x). Statistics and math in
    float32, one rounding, as torch. ``weight_offset``: scale by ``weight + weight_offset`` (1.0 for
    Gemma-style ``(1 + weight)`` norms). ``cast_before_weight``: Hugging Face's ``LlamaRMSNorm``,
    which rounds the normalized x to x's dtype before multiplying by the weight and returns the
    promoted dtype of x and weight. Returns x's shape.
    """
    fn = "fastgpt.rms_norm"
    check_tensor(fn, "x", x, min_ndim=1)
    n_shape = _normalized_shape(fn, x, normalized_shape)
    _check_params(fn, x, n_shape, weight, None)
    eps = _options(fn, x, eps, weight_offset, cast_before_weight)
    if _torch_exact(x, weight, weight_offset) and reference_serves("rms_norm", x, triton.constraint(_KERNELS, x)):
        return F.rms_norm(x, n_shape, weight, eps)
    n = math.prod(n_shape)
    w = weight.reshape(n) if weight is not None and weight.dim() != 1 else weight
    y, _ = _rms_norm(_as_rows(x, n), w, eps, float(weight_offset), cast_before_weight)
    return y if y.shape == x.shape else y.view(x.shape)


def add_rms_norm(
    x: Tensor,
    residual: Tensor,
    weight: Optional[Tensor],
    eps: Optional[float] = None,
    *,
    weight_offset: float = 0.0,
    cast_before_weight: bool = False,
) -> Tuple[Tensor, Tensor]:
    """Residual add and RMSNorm over the last dim in one pass: ``(rms_norm(x + residual), x + residual)``.

    x and residual have the same shape (..., N) and dtype; weight is (N,) or None. The sum is rounded
    to x's dtype before it is normalized (the residual stream eager code stores). Options as
    :func:`rms_norm`.
    """
    fn = "fastgpt.add_rms_norm"
    check_tensor(fn, "x", x, min_ndim=1)
    check_residual(fn, x, residual)
    n = x.shape[-1]
    _check_params(fn, x, (n,), weight, None)
    eps = _options(fn, x, eps, weight_offset, cast_before_weight)
    if _torch_exact(x, weight, weight_offset) and reference_serves("add_rms_norm", x, triton.constraint(_KERNELS, x)):
        s = x + residual
        return F.rms_norm(s, (n,), weight, eps), s
    y, s, _ = _add_rms_norm(_as_rows(x, n), _as_rows(residual, n), weight, eps, float(weight_offset), cast_before_weight)
    if y.shape != x.shape:
        y, s = y.view(x.shape), s.view(x.shape)
    return y, s


# --------------------------------------------------------------------------------------------
# registry entries: the byte model, benchmark/parity cases and targets (docs/design.md, 'Adding an op')
# --------------------------------------------------------------------------------------------


def rms_norm_bytes(m: int, n: int, dtype: torch.dtype, weight_dtype: Optional[torch.dtype] = None, *, backward: bool = False,
                   residual: bool = False) -> int:
    """Bytes an RMSNorm of x (m, n) must move. Forward: read x, write y (+ read residual, write the
    sum); backward: read x, dy, write dx (+ read dsum) (2, 3, 4, 4 (m, n) tensors), plus the weight
    (read; the backward also writes dweight)."""
    e = element_size(dtype)
    w = n * element_size(weight_dtype) if weight_dtype is not None else 0
    tensors = (4 if residual else 3) if backward else (4 if residual else 2)
    return tensors * m * n * e + (2 * w if backward else w)


def _work(residual: bool):
    def work(d, dtype, mode, causal=False):
        return "bytes", float(sum(rms_norm_bytes(d["M"], d["N"], dtype, dtype, backward=p == "bwd", residual=residual)
                                  for p in passes(mode)))

    return work


def llama_rms_norm(x: Tensor, weight: Tensor, eps: float = 1e-6) -> Tensor:
    """Hugging Face's LlamaRMSNorm.forward as eager code (the torch-eager peer: what Llama code runs)."""
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def _rn_inputs(case, randn):
    m, n = case.d["M"], case.d["N"]
    return [randn(m, n), randn(n, scale=0.1, shift=1.0)], [randn(m, n).detach()]


def _arn_inputs(case, randn):
    m, n = case.d["M"], case.d["N"]
    return [randn(m, n), randn(m, n), randn(n, scale=0.1, shift=1.0)], [randn(m, n).detach(), randn(m, n).detach()]


def _eager_add_rms_norm(x: Tensor, r: Tensor, w: Tensor) -> Tuple[Tensor, Tensor]:
    s = x + r
    return llama_rms_norm(s, w), s


def _rn_targets(mode, dims, vs, pct):
    vs("eager", ("torch-eager",), 1.5)
    vs("torch.compile", ("torch-compile",), 1.0)
    pct("pct_of_copy_bandwidth", 90.0 if mode == "fwd" else 80.0, "copy bandwidth")


def _arn_targets(mode, dims, vs, pct):
    vs("eager", ("torch-eager",), 1.4)
    vs("torch.compile", ("torch-compile",), 1.0)


_RN_MODEL = {
    "fwd": "bytes = 2*M*N*e(x) [read x, write y] + N*e(w) [read weight]",
    "bwd": "bytes = 3*M*N*e(x) [read x, dy, write dx] + 2*N*e(w) [read weight, write dweight]",
}
_ARN_MODEL = {
    "fwd": "bytes = 4*M*N*e(x) [read x, residual, write y, sum] + N*e(w)",
    "bwd": "bytes = 4*M*N*e(x) [read dy, dsum, sum, write dx (= dresidual)] + 2*N*e(w)",
}
_WIDE = ((8192, 16384), (1024, 65536))  # the wide-row (chunked) paths


def _report_launches(residual: bool):
    """The registry's ``report_launches``: the kernel's example launches, plus the bytes its wide-row
    path reads a second time (its second loop over a row's chunks: x (and the residual) forward, x
    and dy backward), counted as HBM traffic (no L2 credit)."""

    def launches(m: int, n: int, dtype: torch.dtype):
        out = []
        for pass_, plan in triton.kernels(_KERNELS).example_plans(m, n, dtype, residual=residual):
            tensors = (2 if residual else 1) if pass_ == "fwd" else 2
            reread = tensors * m * n * element_size(dtype) if plan.constexprs.get("NUM_CHUNKS", 1) > 1 else 0
            out.append((pass_, plan, float(reread)))
        return out

    return launches


register(
    OpSpec(
        name="rms_norm",
        functions=(rms_norm,),
        backends=("triton",),
        custom_ops=(_rms_norm,),
        patchable=True,
        parity_dims=((33, 96), (1000, 4099)),
        dispatch_sizes=NORM_DISPATCH_SIZES,
        report_shapes=_WIDE,
        report_launches=_report_launches(residual=False),
        cases=OpCases(
            gpu_shapes=rowwise_gpu_shapes,
            smoke_shapes=lambda: rowwise_smoke_shapes(48),
            inputs=_rn_inputs,
            eager=lambda case, device: llama_rms_norm,
            expected=lambda case, device: lambda x, w: F.rms_norm(x, (x.shape[-1],), w, 1e-6),
            call=lambda case: lambda x, w: rms_norm(x, (x.shape[-1],), w, 1e-6),
            work=_work(False),
            work_model=_RN_MODEL,
            peers=("torch-eager", "torch-compile"),
            targets=_rn_targets,
        ),
    )
)

register(
    OpSpec(
        name="add_rms_norm",
        functions=(add_rms_norm,),
        backends=("triton",),
        custom_ops=(_add_rms_norm,),
        parity_dims=((33, 96), (1000, 4099)),
        dispatch_sizes=NORM_DISPATCH_SIZES,
        report_shapes=_WIDE,
        report_launches=_report_launches(residual=True),
        cases=OpCases(
            gpu_shapes=rowwise_gpu_shapes,
            smoke_shapes=lambda: rowwise_smoke_shapes(48),
            inputs=_arn_inputs,
            eager=lambda case, device: _eager_add_rms_norm,
            expected=lambda case, device: lambda x, r, w: (F.rms_norm(x + r, (x.shape[-1],), w, 1e-6), x + r),
            call=lambda case: lambda x, r, w: add_rms_norm(x, r, w, 1e-6),
            work=_work(True),
            work_model=_ARN_MODEL,
            peers=("torch-eager", "torch-compile"),
            targets=_arn_targets,
        ),
    )
)
