"""Layer norm and residual-add + layer norm: custom ops and public functions.

Custom ops (x is 2-D, rows x normalized size, contiguous):

* ``fastgpt::layer_norm_fwd(x, weight?, bias?, eps) -> (y, mean, rstd)``
* ``fastgpt::layer_norm_bwd(dy, x, weight?, mean, rstd, need_weight_grad, need_bias_grad) -> (dx, dweight, dbias)``
* ``fastgpt::add_layer_norm_fwd(x, residual, weight?, bias?, eps) -> (y, sum, mean, rstd)``
* ``fastgpt::add_layer_norm_bwd(dy, dsum?, sum, weight?, mean, rstd, need_weight_grad, need_bias_grad) -> (dx, dweight, dbias)``

mean and rstd are float32 (float64 for float64 x). A gradient that is not needed comes back as an
empty tensor (custom ops cannot return None). The cuda backend (``fastgpt.cuda_ext``) exposes ops of
the same names and signatures.
"""

import math
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from fastgpt import reference
from fastgpt.ops._cases import NORM_DISPATCH_SIZES, rowwise_gpu_shapes, rowwise_smoke_shapes
from fastgpt.ops import _cuda_backend as cuda
from fastgpt.ops._checks import HALF_DTYPES, check_int_shape, check_param_dtype, check_residual, check_same_device, check_tensor
from fastgpt.ops._define import TORCH_EXACT_DTYPES, FastgptOp, reference_serves
from fastgpt.registry import OpCases, OpSpec, element_size, passes, register

__all__ = ["layer_norm", "add_layer_norm"]

_EMPTY_SHAPE = (0,)





def _stats(x: Tensor) -> Tuple[Tensor, Tensor]:
    m = x.shape[0]
    dt = reference.stats_dtype(x.dtype)
    return x.new_empty(m, dtype=dt), x.new_empty(m, dtype=dt)


def _grad_or_empty(g: Optional[Tensor], like: Tensor) -> Tensor:
    return g if g is not None else like.new_empty(_EMPTY_SHAPE)


def _param_grad_like(x: Tensor, weight: Optional[Tensor], needed: bool) -> Tensor:
    if not needed:
        return x.new_empty(_EMPTY_SHAPE)
    dtype = weight.dtype if weight is not None else x.dtype
    return x.new_empty(x.shape[-1], dtype=dtype)


# ---- layer norm ------------------------------------------------------------------------------


def _layer_norm_fwd(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float) -> Tuple[Tensor, Tensor, Tensor]:
    if cuda.choose("layer_norm", x) == "cuda":
        return cuda.ops().layer_norm_fwd(x, weight, bias, eps)
    return reference.layer_norm_forward(x, weight, bias, eps)


def _layer_norm_fwd_fake(x, weight, bias, eps):
    return (torch.empty_like(x), *_stats(x))


def _layer_norm_bwd(
    dy: Tensor, x: Tensor, weight: Optional[Tensor], mean: Tensor, rstd: Tensor, need_weight_grad: bool, need_bias_grad: bool
) -> Tuple[Tensor, Tensor, Tensor]:
    if cuda.choose("layer_norm", x) == "cuda":
        return cuda.ops().layer_norm_bwd(dy, x, weight, mean, rstd, need_weight_grad, need_bias_grad)
    dx, dw, db = reference.layer_norm_backward(dy, x, weight, mean, rstd, need_weight_grad, need_bias_grad)
    return dx, _grad_or_empty(dw, x), _grad_or_empty(db, x)


def _layer_norm_bwd_fake(dy, x, weight, mean, rstd, need_weight_grad, need_bias_grad):
    return torch.empty_like(x), _param_grad_like(x, weight, need_weight_grad), _param_grad_like(x, weight, need_bias_grad)


def _ln_setup_context(ctx, inputs, output):
    x, weight, bias, _ = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, mean, rstd)
    ctx.has_weight, ctx.has_bias = weight is not None, bias is not None


def _ln_backward(ctx, layer_norm_bwd, dy, _dmean, _drstd):
    if dy is None:
        return None, None, None, None
    x, weight, mean, rstd = ctx.saved_tensors
    need_w = ctx.has_weight and ctx.needs_input_grad[1]
    need_b = ctx.has_bias and ctx.needs_input_grad[2]
    dx, dw, db = layer_norm_bwd(dy.contiguous(), x, weight, mean, rstd, need_w, need_b)
    return dx, (dw if need_w else None), (db if need_b else None), None


_layer_norm = FastgptOp(
    "layer_norm",
    _layer_norm_fwd,
    _layer_norm_bwd,
    _layer_norm_fwd_fake,
    _layer_norm_bwd_fake,
    _ln_setup_context,
    _ln_backward,
    non_differentiable=(1, 2),
)


# ---- add + layer norm ------------------------------------------------------------------------


def _add_layer_norm_fwd(
    x: Tensor, residual: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    if cuda.choose("add_layer_norm", x) == "cuda":
        return cuda.ops().add_layer_norm_fwd(x, residual, weight, bias, eps)
    return reference.add_layer_norm_forward(x, residual, weight, bias, eps)


def _add_layer_norm_fwd_fake(x, residual, weight, bias, eps):
    return (torch.empty_like(x), torch.empty_like(x), *_stats(x))


def _add_layer_norm_bwd(
    dy: Tensor,
    dsum: Optional[Tensor],
    s: Tensor,
    weight: Optional[Tensor],
    mean: Tensor,
    rstd: Tensor,
    need_weight_grad: bool,
    need_bias_grad: bool,
) -> Tuple[Tensor, Tensor, Tensor]:
    if cuda.choose("add_layer_norm", s) == "cuda":
        return cuda.ops().add_layer_norm_bwd(dy, dsum, s, weight, mean, rstd, need_weight_grad, need_bias_grad)
    dx, dw, db = reference.add_layer_norm_backward(dy, dsum, s, weight, mean, rstd, need_weight_grad, need_bias_grad)
    return dx, _grad_or_empty(dw, s), _grad_or_empty(db, s)


def _add_layer_norm_bwd_fake(dy, dsum, s, weight, mean, rstd, need_weight_grad, need_bias_grad):
    return torch.empty_like(s), _param_grad_like(s, weight, need_weight_grad), _param_grad_like(s, weight, need_bias_grad)


def _aln_setup_context(ctx, inputs, output):
    _, _, weight, bias, _ = inputs
    _, s, mean, rstd = output
    ctx.save_for_backward(s, weight, mean, rstd)
    ctx.has_weight, ctx.has_bias = weight is not None, bias is not None


def _aln_backward(ctx, add_layer_norm_bwd, dy, dsum, _dmean, _drstd):
    if dy is None and dsum is None:
        return None, None, None, None, None
    s, weight, mean, rstd = ctx.saved_tensors
    dy = torch.zeros_like(s) if dy is None else dy.contiguous()
    dsum = None if dsum is None else dsum.contiguous()
    need_w = ctx.has_weight and ctx.needs_input_grad[2]
    need_b = ctx.has_bias and ctx.needs_input_grad[3]
    dx, dw, db = add_layer_norm_bwd(dy, dsum, s, weight, mean, rstd, need_w, need_b)
    return dx, dx, (dw if need_w else None), (db if need_b else None), None


_add_layer_norm = FastgptOp(
    "add_layer_norm",
    _add_layer_norm_fwd,
    _add_layer_norm_bwd,
    _add_layer_norm_fwd_fake,
    _add_layer_norm_bwd_fake,
    _aln_setup_context,
    _aln_backward,
    non_differentiable=(2, 3),
)


# ---- public functions ------------------------------------------------------------------------


def _normalized_shape(fn: str, x: Tensor, normalized_shape: Union[int, Sequence[int], torch.Size]) -> Tuple[int, ...]:
    shape = check_int_shape(fn, "normalized_shape", normalized_shape)
    if len(shape) == 0 or len(shape) > x.dim() or tuple(x.shape[x.dim() - len(shape) :]) != shape:
        raise ValueError(
            f"{fn}: normalized_shape {shape} must equal the trailing dims of x; x has shape {tuple(x.shape)}"
        )
    return shape


def _param_ok(p: Optional[Tensor], x: Tensor, n_shape: Tuple[int, ...]) -> bool:
    """The whole rule _check_params enforces, for one parameter, in a few comparisons."""
    return p is None or (
        isinstance(p, Tensor)
        and p.shape == n_shape
        and p.device == x.device
        and (p.dtype == x.dtype or (p.dtype == torch.float32 and x.dtype in HALF_DTYPES))
    )


def _check_params(fn: str, x: Tensor, n_shape: Tuple[int, ...], weight: Optional[Tensor], bias: Optional[Tensor]) -> None:
    # this runs on every call: accept the valid case quickly, and only work out the message otherwise
    if _param_ok(weight, x, n_shape) and _param_ok(bias, x, n_shape):
        return
    for name, p in (("weight", weight), ("bias", bias)):
        if p is None:
            continue
        check_tensor(fn, name, p)
        if tuple(p.shape) != n_shape:
            raise ValueError(f"{fn}: {name} must have shape {n_shape} (normalized_shape); got {tuple(p.shape)}")
        check_param_dtype(fn, name, p, x)
    check_same_device(fn, x=x, weight=weight, bias=bias)


def _as_rows(x: Tensor, n: int) -> Tensor:
    if x.dim() == 2 and x.is_contiguous():
        return x
    return x.contiguous().view(-1, n) if x.numel() else x.reshape(-1, n)


def _torch_exact(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor]) -> bool:
    """The reference computes exactly F.layer_norm: float32/64 with parameters of x's dtype."""
    return x.dtype in TORCH_EXACT_DTYPES and (weight is None or weight.dtype == x.dtype) and (bias is None or bias.dtype == x.dtype)


def layer_norm(
    x: Tensor,
    normalized_shape: Union[int, Sequence[int], torch.Size],
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    eps: float = 1e-5,
) -> Tensor:
    """Drop-in for ``torch.nn.functional.layer_norm``.

    Normalizes over the trailing dims ``normalized_shape`` of x (any leading shape), then scales by
    ``weight`` and shifts by ``bias`` (each optional, shape ``normalized_shape``). x is float16,
    bfloat16, float32 or float64; weight/bias have x's dtype or float32 for half-precision x. Statistics
    are computed in float32 with a two-pass variance. Returns a tensor of x's shape and dtype.
    Non-contiguous x is copied to a contiguous layout first.
    """
    fn = "fastgpt.layer_norm"
    check_tensor(fn, "x", x, min_ndim=1)
    n_shape = _normalized_shape(fn, x, normalized_shape)
    _check_params(fn, x, n_shape, weight, bias)
    if _torch_exact(x, weight, bias) and reference_serves("layer_norm", x, cuda.constraint(x)):
        return F.layer_norm(x, n_shape, weight, bias, eps)
    n = math.prod(n_shape)
    w = weight.reshape(n) if weight is not None and weight.dim() != 1 else weight
    b = bias.reshape(n) if bias is not None and bias.dim() != 1 else bias
    y, _, _ = _layer_norm(_as_rows(x, n), w, b, float(eps))
    return y if y.shape == x.shape else y.view(x.shape)


def add_layer_norm(
    x: Tensor,
    residual: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    eps: float = 1e-5,
) -> Tuple[Tensor, Tensor]:
    """Residual add and layer norm over the last dim in one pass: returns ``(layer_norm(x + residual), x + residual)``.

    x and residual have the same shape (..., N) and dtype; weight and bias are (N,) or None. The sum
    is rounded to x's dtype before it is normalized (as in eager code that stores the residual
    stream), so the two outputs are consistent. Both outputs have x's shape and dtype.
    """
    fn = "fastgpt.add_layer_norm"
    check_tensor(fn, "x", x, min_ndim=1)
    check_residual(fn, x, residual)
    n = x.shape[-1]
    _check_params(fn, x, (n,), weight, bias)
    if _torch_exact(x, weight, bias) and reference_serves("add_layer_norm", x, cuda.constraint(x)):
        s = x + residual
        return F.layer_norm(s, (n,), weight, bias, eps), s
    y, s, _, _ = _add_layer_norm(_as_rows(x, n), _as_rows(residual, n), weight, bias, float(eps))
    if y.shape != x.shape:
        y, s = y.view(x.shape), s.view(x.shape)
    return y, s


# --------------------------------------------------------------------------------------------
# registry entries: the byte model, benchmark/parity cases and targets (docs/design.md, 'Adding an op')
# --------------------------------------------------------------------------------------------


def _param_bytes(n: int, weight_dtype: Optional[torch.dtype], bias_dtype: Optional[torch.dtype]) -> int:
    return sum(n * element_size(d) for d in (weight_dtype, bias_dtype) if d is not None)


def _norm_bytes(reads_writes_fwd: int, reads_writes_bwd: int, what: str):
    """The byte model of a norm that moves ``reads_writes`` (M, N) tensors per pass, plus its parameters."""

    def norm_bytes(
        m: int,
        n: int,
        dtype: torch.dtype,
        weight_dtype: Optional[torch.dtype] = None,
        bias_dtype: Optional[torch.dtype] = None,
        *,
        backward: bool = False,
    ) -> int:
        e = element_size(dtype)
        if not backward:
            return reads_writes_fwd * m * n * e + _param_bytes(n, weight_dtype, bias_dtype)
        # the backward reads the weight and writes dweight and dbias
        return reads_writes_bwd * m * n * e + _param_bytes(n, weight_dtype, None) + _param_bytes(n, weight_dtype, bias_dtype)

    norm_bytes.__doc__ = (
        f"Bytes {what} of x (m, n) must move: forward {reads_writes_fwd}*m*n*e + params, backward "
        f"{reads_writes_bwd}*m*n*e + params. ``weight_dtype`` / ``bias_dtype`` are None when there is no weight / bias."
    )
    return norm_bytes


layer_norm_bytes = _norm_bytes(2, 3, "a layer norm")  # read x, write y; read x, dy, write dx
add_layer_norm_bytes = _norm_bytes(4, 4, "a residual add + layer norm")  # x, residual, y, sum; dy, dsum, sum, dx


def _layer_norm_work(d, dtype, mode, causal=False):
    return "bytes", float(sum(layer_norm_bytes(d["M"], d["N"], dtype, dtype, dtype, backward=p == "bwd") for p in passes(mode)))


def _add_layer_norm_work(d, dtype, mode, causal=False):
    return "bytes", float(sum(add_layer_norm_bytes(d["M"], d["N"], dtype, dtype, dtype, backward=p == "bwd") for p in passes(mode)))


def _layer_norm_inputs(case, randn):
    m, n = case.d["M"], case.d["N"]
    return [randn(m, n), randn(n, scale=0.1, shift=1.0), randn(n, scale=0.1)], [randn(m, n).detach()]


def _add_layer_norm_inputs(case, randn):
    m, n = case.d["M"], case.d["N"]
    inputs = [randn(m, n), randn(m, n), randn(n, scale=0.1, shift=1.0), randn(n, scale=0.1)]
    return inputs, [randn(m, n).detach(), randn(m, n).detach()]


def _eager_add_layer_norm(x: Tensor, r: Tensor, w: Tensor, b: Tensor) -> Tuple[Tensor, Tensor]:
    s = x + r
    return F.layer_norm(s, (s.shape[-1],), w, b), s


def _layer_norm_targets(mode, dims, vs, pct):
    vs("eager", ("torch-eager",), 1.5)
    pct("pct_of_copy_bandwidth", 90.0 if mode == "fwd" else 80.0, "copy bandwidth")


def _add_layer_norm_targets(mode, dims, vs, pct):
    vs("eager", ("torch-eager",), 1.4)
    vs("torch.compile", ("torch-compile",), 1.0)


_MULTI_PASS_SHAPES = ((8192, 16384), (1024, 65536))  # the backward's / the forward's multi-pass kernels
_LN_WORK_MODEL = {
    "fwd": "bytes = 2*M*N*e(x) [read x, write y] + N*e(w) + N*e(b) [read weight, bias]",
    "bwd": "bytes = 3*M*N*e(x) [read x, dy, write dx] + N*e(w) [read weight] + N*e(w) + N*e(b) [write dweight, dbias]",
}
_ALN_WORK_MODEL = {
    "fwd": "bytes = 4*M*N*e(x) [read x, residual, write y, sum] + N*e(w) + N*e(b)",
    "bwd": "bytes = 4*M*N*e(x) [read dy, dsum, sum, write dx (= dresidual)] + N*e(w) + N*e(w) + N*e(b)",
}

register(
    OpSpec(
        name="layer_norm",
        functions=(layer_norm,),
        backends=("cuda",),
        custom_ops=(_layer_norm,),
        cuda_ops=("layer_norm_fwd", "layer_norm_bwd"),
        patchable=True,
        parity_dims=((33, 96), (1000, 768)),
        dispatch_sizes=NORM_DISPATCH_SIZES,
        report_shapes=_MULTI_PASS_SHAPES,
        cases=OpCases(
            gpu_shapes=rowwise_gpu_shapes,
            smoke_shapes=lambda: rowwise_smoke_shapes(48),
            inputs=_layer_norm_inputs,
            eager=lambda case, device: lambda x, w, b: F.layer_norm(x, (x.shape[-1],), w, b),
            call=lambda case: lambda x, w, b: layer_norm(x, (x.shape[-1],), w, b),
            work=_layer_norm_work,
            work_model=_LN_WORK_MODEL,
            peers=("torch-eager", "torch-compile", "liger"),
            targets=_layer_norm_targets,
        ),
    )
)

register(
    OpSpec(
        name="add_layer_norm",
        functions=(add_layer_norm,),
        backends=("cuda",),
        custom_ops=(_add_layer_norm,),
        cuda_ops=("add_layer_norm_fwd", "add_layer_norm_bwd"),
        parity_dims=((33, 96), (1000, 768)),
        dispatch_sizes=NORM_DISPATCH_SIZES,
        report_shapes=_MULTI_PASS_SHAPES,
        cases=OpCases(
            gpu_shapes=rowwise_gpu_shapes,
            smoke_shapes=lambda: rowwise_smoke_shapes(48),
            inputs=_add_layer_norm_inputs,
            eager=lambda case, device: _eager_add_layer_norm,
            call=lambda case: lambda x, r, w, b: add_layer_norm(x, r, w, b),
            work=_add_layer_norm_work,
            work_model=_ALN_WORK_MODEL,
            peers=("torch-eager", "torch-compile"),
            targets=_add_layer_norm_targets,
        ),
    )
)
