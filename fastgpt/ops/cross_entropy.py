"""Cross-entropy and fused linear cross-entropy: custom ops and public functions.

Custom ops (logits and x are 2-D, contiguous; target 1-D int64/int32; a gradient not computed comes
back as an empty tensor, since custom ops cannot return None):

* ``fastgpt::cross_entropy_fwd(logits, target, ignore_index, reduction, label_smoothing, need_grad) -> (loss, dlogits)``
* ``fastgpt::cross_entropy_bwd(dloss, logits, target, dlogits, ignore_index, reduction, label_smoothing) -> dlogits``
* ``fastgpt::linear_cross_entropy_fwd(x, weight, bias?, target, ignore_index, reduction, label_smoothing, need_dx, need_dweight, need_dbias) -> (loss, dx, dweight, dbias)``
* ``fastgpt::linear_cross_entropy_bwd(dloss, x, weight, bias?, target, dx, dweight, dbias, ignore_index, reduction, label_smoothing, need_dx, need_dweight, need_dbias) -> (dx, dweight, dbias)``

For reductions "mean" and "sum" the forward computes the gradients in the same pass (Liger-Kernel's
fused linear cross-entropy) and the backward only scales them by the upstream gradient; for "none"
the per-row upstream gradient is only known in the backward, which recomputes the (chunked) logits.
"""

import functools
import importlib.util
import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from fastgpt import backends, reference
from fastgpt.ops._checks import check_same_device, check_same_dtype, check_tensor, is_compiling
from fastgpt.ops._define import TORCH_EXACT_DTYPES, FastgptOp, reference_serves
from fastgpt.registry import OpSpec, element_size, register

__all__ = ["cross_entropy", "linear_cross_entropy", "chunk_rows"]

REDUCTIONS = ("mean", "sum", "none")
TARGET_DTYPES = (torch.int64, torch.int32)
CHUNK_MAX_BYTES = 256 * 2**20  # cap on one chunk's float32 logits
CHUNK_MIN_BYTES = 2**20  # below a MiB of logits, chunking saves nothing and costs a Python loop
# each chunk also reads and writes the (V, D) dweight sum (8*V*D bytes in float32): below ~256 rows that
# update costs more than the chunk's GEMMs (CPU, V=50304, D=768, 1024 tokens, forward + backward:
# 16-row chunks 10.0 s, 64 rows 6.4 s, 256 rows 4.7 s, eager 4.6 s); small-M GEMMs are slow on GPUs too
CHUNK_MIN_ROWS = 256
_KERNEL_MODULE = "fastgpt.kernels.cross_entropy"
_EMPTY_SHAPE = (0,)


def chunk_rows(n: int, v: int, d: int) -> int:
    """Tokens per chunk of the linear cross-entropy: a chunk's logits about the size of x (N / ceil(V / D)
    rows, Liger-Kernel's rule), at least min(:data:`CHUNK_MIN_ROWS`, D) rows and :data:`CHUNK_MIN_BYTES` of
    float32 logits, at most :data:`CHUNK_MAX_BYTES` of them and N rows, at least one row."""
    v = max(v, 1)
    # CHUNK_MIN_ROWS only up to D rows: then a chunk's logits are no bigger than the (V, D) dweight sum
    rows = max(math.ceil(max(n, 1) / math.ceil(v / max(d, 1))), CHUNK_MIN_BYTES // (4 * v), min(CHUNK_MIN_ROWS, d))
    return max(1, min(rows, CHUNK_MAX_BYTES // (4 * v), n))


# --------------------------------------------------------------------------------------------
# backend choice
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _kernel_present() -> bool:
    return importlib.util.find_spec(_KERNEL_MODULE) is not None


def _constraint(z_dtype: torch.dtype):
    def why_not(backend: str) -> Optional[str]:
        if backend != "triton":
            return None
        if not _kernel_present():
            return "the triton cross-entropy kernel is not part of this build"
        if z_dtype not in (torch.float16, torch.bfloat16, torch.float32):
            return f"dtype {z_dtype} is not supported by the triton kernel (float16, bfloat16, float32)"
        return None

    return why_not


def _rows_fn(op: str, like: Tensor):
    """The per-chunk cross-entropy of the backend serving this call: the Triton kernel (in place) or the reference."""
    if like.numel() == 0 or backends.select(op, like.device, _constraint(like.dtype)) != "triton":
        return reference.cross_entropy_rows
    from fastgpt.kernels import cross_entropy as kernel

    def triton_rows(z, target, ignore_index, label_smoothing, grad_scale):
        loss = torch.empty(z.shape[0], dtype=torch.float32, device=z.device)
        kernel.forward(z, target, loss, z if grad_scale is not None else None, grad_scale, ignore_index, label_smoothing)
        return loss, (z if grad_scale is not None else None)

    return triton_rows


def _mean_scale(target: Tensor, ignore_index: int, dtype: torch.dtype) -> Tensor:
    """1 / (rows whose target is not ignore_index), 1 when there are none (the loss is then 0)."""
    return (target != ignore_index).sum().clamp(min=1).to(dtype).reciprocal()


def _reduce(loss_rows: Tensor, target: Tensor, ignore_index: int, reduction: str, dtype: torch.dtype) -> Tensor:
    if reduction == "none":
        return loss_rows.to(dtype)
    total = loss_rows.sum()
    if reduction == "mean":
        total = total * _mean_scale(target, ignore_index, total.dtype)
    return total.to(dtype)


def _grad_scale(target: Tensor, ignore_index: int, reduction: str, dtype: torch.dtype, dloss: Optional[Tensor] = None) -> Tensor:
    if reduction == "none":
        return dloss.reshape(-1).to(dtype)
    scale = _mean_scale(target, ignore_index, dtype) if reduction == "mean" else torch.ones((), dtype=dtype, device=target.device)
    return scale if dloss is None else scale * dloss.to(dtype)


def _empty(like: Tensor) -> Tensor:
    return like.new_empty(_EMPTY_SHAPE)


def _loss_fake(rows: int, like: Tensor, reduction: str, dtype: Optional[torch.dtype] = None) -> Tensor:
    return like.new_empty((rows,) if reduction == "none" else (), dtype=dtype)


# ---- cross_entropy ---------------------------------------------------------------------------


def _ce_compute(logits: Tensor, target: Tensor, ignore_index: int, label_smoothing: float, grad_scale: Optional[Tensor]):
    """(loss rows in the compute dtype, dlogits in logits' dtype or None); logits are never modified."""
    rows_fn = _rows_fn("cross_entropy", logits)
    if rows_fn is reference.cross_entropy_rows:
        loss, g = rows_fn(logits, target, ignore_index, label_smoothing, grad_scale)
        return loss, (g.to(logits.dtype) if g is not None else None)
    from fastgpt.kernels import cross_entropy as kernel

    loss = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
    dz = torch.empty_like(logits) if grad_scale is not None else None
    kernel.forward(logits, target, loss, dz, grad_scale, ignore_index, label_smoothing)
    return loss, dz


def _ce_fwd(logits: Tensor, target: Tensor, ignore_index: int, reduction: str, label_smoothing: float, need_grad: bool) -> Tuple[Tensor, Tensor]:
    cd = reference.compute_dtype(logits.dtype)
    scale = _grad_scale(target, ignore_index, reduction, cd) if need_grad and reduction != "none" else None
    loss, dz = _ce_compute(logits, target, ignore_index, label_smoothing, scale)
    return _reduce(loss, target, ignore_index, reduction, logits.dtype), (dz if dz is not None else _empty(logits))


def _ce_fwd_fake(logits, target, ignore_index, reduction, label_smoothing, need_grad):
    dz = torch.empty_like(logits) if need_grad and reduction != "none" else _empty(logits)
    return _loss_fake(logits.shape[0], logits, reduction), dz


def _ce_bwd(dloss: Tensor, logits: Tensor, target: Tensor, dlogits: Tensor, ignore_index: int, reduction: str, label_smoothing: float) -> Tensor:
    cd = reference.compute_dtype(logits.dtype)
    if reduction != "none" and dlogits.numel() == logits.numel() and logits.dtype == cd:
        return dlogits * dloss.to(cd)
    # 16-bit logits: recompute with the upstream gradient folded into the scale, so the gradient is
    # rounded to the 16-bit type once (scaling the stored 16-bit gradient would round it twice)
    _, dz = _ce_compute(logits, target, ignore_index, label_smoothing, _grad_scale(target, ignore_index, reduction, cd, dloss))
    return dz


def _ce_bwd_fake(dloss, logits, target, dlogits, ignore_index, reduction, label_smoothing):
    return torch.empty_like(logits)


def _ce_setup_context(ctx, inputs, output):
    logits, target, ignore_index, reduction, label_smoothing, _ = inputs
    ctx.save_for_backward(logits, target, output[1])
    ctx.args = (ignore_index, reduction, label_smoothing)


def _unit_upstream(reduction: str, dloss: Tensor, saved_grad: Tensor, compiled: bool) -> bool:
    """In eager mode, when the upstream gradient of a reduced loss is 1 (the usual ``loss.backward()``),
    the forward's gradients are the answer: returning them costs one scalar sync (as Liger-Kernel's
    check does) instead of a scaled copy of dweight / dlogits. Under torch.compile (``compiled``: the
    backward formula was handed the custom op) the backward op always runs: a custom op may not return
    its inputs, and dloss is a traced tensor there (torch 2.11's AOT backward trace does not report
    is_compiling(), so that check alone is not enough)."""
    if compiled or reduction == "none" or saved_grad.numel() == 0 or is_compiling() or dloss.device.type == "meta":
        return False
    return bool(dloss == 1)


def _ce_backward(ctx, cross_entropy_bwd, dloss, _ddlogits):
    if dloss is None:
        return (None,) * 6
    logits, target, dlogits = ctx.saved_tensors
    if _unit_upstream(ctx.args[1], dloss, dlogits, cross_entropy_bwd is _cross_entropy.bwd_op):
        return dlogits, None, None, None, None, None
    return cross_entropy_bwd(dloss.contiguous(), logits, target, dlogits, *ctx.args), None, None, None, None, None


_cross_entropy = FastgptOp(
    "cross_entropy", _ce_fwd, _ce_bwd, _ce_fwd_fake, _ce_bwd_fake, _ce_setup_context, _ce_backward, non_differentiable=(1,)
)


# ---- linear_cross_entropy --------------------------------------------------------------------


def _lce_compute(x, weight, bias, target, ignore_index, label_smoothing, grad_scale, need_dx, need_dw, need_db, dw_in_w_dtype):
    rows_fn = _rows_fn("linear_cross_entropy", x)
    chunk = chunk_rows(x.shape[0], weight.shape[0], x.shape[1])
    return reference.linear_cross_entropy_chunked(
        x, weight, bias, target, ignore_index, label_smoothing, grad_scale, need_dx, need_dw, need_db, chunk, rows_fn,
        dweight_in_weight_dtype=dw_in_w_dtype,
    )


def _lce_fwd(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor, ignore_index: int, reduction: str,
    label_smoothing: float, need_dx: bool, need_dweight: bool, need_dbias: bool, dweight_in_weight_dtype: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    cd = reference.compute_dtype(x.dtype)
    now = reduction != "none"  # 'none' needs the per-row upstream gradient: computed in the backward
    flags = (need_dx and now, need_dweight and now, need_dbias and now and bias is not None)
    scale = _grad_scale(target, ignore_index, reduction, cd) if any(flags) else None
    loss, dx, dw, db = _lce_compute(x, weight, bias, target, ignore_index, label_smoothing, scale, *flags, dweight_in_weight_dtype)
    # dweight and dbias stay in the compute dtype until the backward has scaled them: one rounding;
    # the loss too (linear_cross_entropy rounds it to its loss_dtype)
    return (
        _reduce(loss, target, ignore_index, reduction, cd),
        dx if dx is not None else _empty(x),
        dw if dw is not None else _empty(weight),
        db if db is not None else _empty(weight),
    )


def _lce_fwd_fake(x, weight, bias, target, ignore_index, reduction, label_smoothing, need_dx, need_dweight, need_dbias,
                  dweight_in_weight_dtype):
    now = reduction != "none"
    dw_dtype = weight.dtype if dweight_in_weight_dtype else _cd(weight)
    return (
        _loss_fake(x.shape[0], x, reduction, _cd(x)),
        torch.empty_like(x) if need_dx and now else _empty(x),
        torch.empty_like(weight, dtype=dw_dtype) if need_dweight and now else _empty(weight),
        weight.new_empty(weight.shape[0], dtype=_cd(weight)) if need_dbias and now and bias is not None else _empty(weight),
    )


def _lce_bwd(
    dloss: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor, dx: Tensor, dweight: Tensor,
    dbias: Tensor, ignore_index: int, reduction: str, label_smoothing: float, need_dx: bool, need_dweight: bool, need_dbias: bool,
    dweight_in_weight_dtype: bool,
) -> Tuple[Tensor, Tensor, Tensor]:
    need_dbias = need_dbias and bias is not None
    cd = reference.compute_dtype(x.dtype)
    if reduction == "none":
        scale = _grad_scale(target, ignore_index, reduction, cd, dloss)
        _, dx, dweight, dbias = _lce_compute(x, weight, bias, target, ignore_index, label_smoothing, scale, need_dx, need_dweight,
                                             need_dbias, dweight_in_weight_dtype)
        s = None
    else:
        s = dloss.to(cd)
        if s.device.type != "meta" and bool(s == 1):
            s = None  # the usual loss.backward(): round the float32 sums once, without a float32 product
    out = []
    for g, need, like in ((dx, need_dx, x), (dweight, need_dweight, weight), (dbias, need_dbias, bias)):
        if not need or g is None:
            out.append(_empty(x))
            continue
        # a fresh tensor: a custom op may not return its inputs (the saved gradients)
        if s is None:
            out.append(g.to(like.dtype, copy=reduction != "none"))
        elif g.dtype == like.dtype:  # dweight kept in weight's dtype: scaled in float32 per element, no float32 copy
            out.append(g * s)
        else:
            out.append((g.to(cd) * s).to(like.dtype))
    return tuple(out)


def _lce_bwd_fake(dloss, x, weight, bias, target, dx, dweight, dbias, ignore_index, reduction, label_smoothing, need_dx, need_dweight,
                  need_dbias, dweight_in_weight_dtype):
    return (
        torch.empty_like(x) if need_dx else _empty(x),
        torch.empty_like(weight) if need_dweight else _empty(weight),
        weight.new_empty(weight.shape[0], dtype=bias.dtype) if need_dbias and bias is not None else _empty(weight),
    )


def _cd(t: Tensor) -> torch.dtype:
    return reference.compute_dtype(t.dtype)


def _lce_setup_context(ctx, inputs, output):
    x, weight, bias, target, ignore_index, reduction, label_smoothing, need_dx, need_dw, need_db, dw_in_w_dtype = inputs
    _, dx, dw, db = output
    ctx.save_for_backward(x, weight, bias, target, dx, dw, db)
    ctx.args = (ignore_index, reduction, label_smoothing, need_dx, need_dw, need_db, dw_in_w_dtype)


def _lce_backward(ctx, linear_cross_entropy_bwd, dloss, _dx, _dw, _db):
    if dloss is None:
        return (None,) * 11
    x, weight, bias, target, dx, dw, db = ctx.saved_tensors
    _, reduction, _, need_dx, need_dw, need_db, dw_in_w_dtype = ctx.args
    need_db = need_db and bias is not None
    # the forward's gradients are final when each is in its tensor's dtype (16-bit float32 sums are
    # rounded in the backward op): float32 inputs, or dweight kept in weight's dtype and no dbias
    final = x.dtype == _cd(x) or (dw_in_w_dtype and not need_db)
    compiled = linear_cross_entropy_bwd is _linear_cross_entropy.bwd_op
    if not (final and _unit_upstream(reduction, dloss, dx if need_dx else dw, compiled)):
        dx, dw, db = linear_cross_entropy_bwd(dloss.contiguous(), x, weight, bias, target, dx, dw, db, *ctx.args)
    return (dx if need_dx else None), (dw if need_dw else None), (db if need_db else None), *(None,) * 8


_linear_cross_entropy = FastgptOp(
    "linear_cross_entropy", _lce_fwd, _lce_bwd, _lce_fwd_fake, _lce_bwd_fake, _lce_setup_context, _lce_backward,
    non_differentiable=(1, 2, 3),
)


# ---- validation and public functions ---------------------------------------------------------


def _check_options(fn: str, ignore_index, reduction, label_smoothing) -> None:
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"{fn}: ignore_index must be an int; got {type(ignore_index).__name__}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"{fn}: reduction must be one of {', '.join(map(repr, REDUCTIONS))}; got {reduction!r}")
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, (int, float)):
        raise TypeError(f"{fn}: label_smoothing must be a float; got {type(label_smoothing).__name__}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"{fn}: label_smoothing must be in [0, 1]; got {label_smoothing}")


def _check_target(fn: str, target, rows_shape: torch.Size, v: int, ignore_index: int, what: str) -> None:
    if not isinstance(target, Tensor):
        raise TypeError(f"{fn}: target must be a torch.Tensor; got {type(target).__name__}")
    if target.dtype not in TARGET_DTYPES:
        raise TypeError(f"{fn}: target must have dtype int64 or int32 (class indices); got {target.dtype}")
    if target.shape != rows_shape:
        raise ValueError(f"{fn}: target must have shape {tuple(rows_shape)} ({what}); got {tuple(target.shape)}")
    if target.numel() == 0 or is_compiling() or target.device.type == "meta":
        return  # a data-dependent check cannot be traced (compiled calls) and meta tensors hold no data
    bad = (target != ignore_index) & ((target < 0) | (target >= v))
    if bool(bad.any()):
        i = int(bad.reshape(-1).nonzero()[0])
        raise ValueError(
            f"{fn}: target[{i}] (flattened) is {int(target.reshape(-1)[i])}, outside the classes [0, {v}) and not "
            f"ignore_index ({ignore_index})"
        )


def cross_entropy(
    logits: Tensor, target: Tensor, ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0
) -> Tensor:
    """``torch.nn.functional.cross_entropy`` with class indices, over logits (..., V) and target (...).

    The class dim is the *last* one: (N, V) with target (N,) is torch's own layout; (B, T, V) with
    target (B, T) is flattened to (B*T, V) (torch would read a 3-D input as (N, C, d1)). Rows whose
    target is ``ignore_index`` contribute nothing; ``reduction`` "mean" divides by the rows that are
    not ignored, and gives 0 with zero gradients when every row is ignored (torch gives NaN);
    "none" returns target's shape (0 on ignored rows). ``label_smoothing`` in [0, 1] as torch defines
    it. The log-sum-exp is float32 for 16-bit logits; the loss has logits' dtype. logits are never
    modified. A target outside [0, V) that is not ignore_index is a ValueError (checked eagerly, one
    device sync; not under torch.compile).
    """
    fn = "fastgpt.cross_entropy"
    check_tensor(fn, "logits", logits, min_ndim=1)
    _check_options(fn, ignore_index, reduction, label_smoothing)
    v = logits.shape[-1]
    if v == 0:
        raise ValueError(f"{fn}: logits must have at least one class (last dim); got shape {tuple(logits.shape)}")
    _check_target(fn, target, logits.shape[:-1], v, ignore_index, "logits' shape without its last dim")
    check_same_device(fn, logits=logits, target=target)
    z = logits.reshape(-1, v)
    t = target.reshape(-1)
    if logits.dtype in TORCH_EXACT_DTYPES and reference_serves("cross_entropy", z, _constraint(z.dtype)):
        if reduction == "none":
            return F.cross_entropy(z, t.long(), ignore_index=ignore_index, reduction="none", label_smoothing=label_smoothing).view(target.shape)
        loss = F.cross_entropy(z, t.long(), ignore_index=ignore_index, reduction="sum", label_smoothing=label_smoothing)
        return loss * _mean_scale(t, ignore_index, loss.dtype) if reduction == "mean" else loss
    need_grad = torch.is_grad_enabled() and logits.requires_grad
    loss, _ = _cross_entropy(z.contiguous(), t.contiguous(), int(ignore_index), reduction, float(label_smoothing), need_grad)
    return loss.view(target.shape) if reduction == "none" else loss


def linear_cross_entropy(
    x: Tensor,
    weight: Tensor,
    target: Tensor,
    bias: Optional[Tensor] = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    *,
    loss_dtype: Optional[torch.dtype] = None,
    accum_dtype: Optional[torch.dtype] = None,
) -> Tensor:
    """``cross_entropy(x @ weight.T + bias, target, ...)`` without ever holding the (tokens x V) logits.

    x (..., D), weight (V, D) and bias (V,) of x's dtype, target (...) int64/int32 (flattened like
    :func:`cross_entropy`, with the same semantics). The logits are computed chunk by chunk over the
    tokens (:func:`chunk_rows`: a chunk's logits about the size of x); for reductions "mean" and "sum"
    the gradients of x, weight and bias are computed in the same pass when they are needed, so the
    backward only scales them; for "none" the backward recomputes the chunks. Returns the loss in x's
    dtype, or in ``loss_dtype`` (a floating dtype) rounded once from the float32 sums: ``torch.float32``
    for 16-bit x is the loss Hugging Face's causal LMs report (they upcast the logits before the loss).

    ``accum_dtype``: the dtype dweight is summed in across chunks. None (default) or torch.float32:
    float32 for 16-bit weights (within the parity rule of eager's one GEMM), which costs a (V, D) float32
    buffer (4*V*D bytes, twice a bfloat16 weight: at D=4096 more than eager's logits). The weight's
    own dtype (e.g. torch.bfloat16): no such buffer, one rounding per chunk instead (what
    Liger-Kernel does by default; its error grows with the number of chunks). dbias is always summed
    in float32.
    """
    fn = "fastgpt.linear_cross_entropy"
    check_tensor(fn, "x", x, min_ndim=1)
    check_tensor(fn, "weight", weight, ndim=(2,))
    _check_options(fn, ignore_index, reduction, label_smoothing)
    v, d = weight.shape
    if weight.shape[1] != x.shape[-1]:
        raise ValueError(f"{fn}: weight must be (V, {x.shape[-1]}) (x's last dim); got {tuple(weight.shape)}")
    if v == 0:
        raise ValueError(f"{fn}: weight must have at least one class (row); got shape {tuple(weight.shape)}")
    if bias is not None:
        check_tensor(fn, "bias", bias, ndim=(1,))
        if bias.shape[0] != v:
            raise ValueError(f"{fn}: bias must have shape ({v},) (weight's rows); got {tuple(bias.shape)}")
    check_same_dtype(fn, x=x, weight=weight, bias=bias)
    _check_target(fn, target, x.shape[:-1], v, ignore_index, "x's shape without its last dim")
    check_same_device(fn, x=x, weight=weight, bias=bias, target=target)
    if loss_dtype is not None and not (isinstance(loss_dtype, torch.dtype) and loss_dtype.is_floating_point):
        raise TypeError(f"{fn}: loss_dtype must be None or a floating torch.dtype; got {loss_dtype!r}")
    cd = reference.compute_dtype(weight.dtype)
    if accum_dtype is not None and accum_dtype not in (cd, weight.dtype):
        raise ValueError(f"{fn}: accum_dtype must be None, {cd} or weight's dtype {weight.dtype}; got {accum_dtype!r}")
    grad = torch.is_grad_enabled()
    need = (grad and x.requires_grad, grad and weight.requires_grad, grad and bias is not None and bias.requires_grad)
    x2 = x.reshape(-1, d).contiguous()
    loss, *_ = _linear_cross_entropy(
        x2, weight.contiguous(), None if bias is None else bias.contiguous(), target.reshape(-1).contiguous(),
        int(ignore_index), reduction, float(label_smoothing), *need, accum_dtype is not None and accum_dtype != cd,
    )
    loss = loss.to(loss_dtype or x.dtype)
    return loss.view(target.shape) if reduction == "none" else loss


# --------------------------------------------------------------------------------------------
# registry entries: work model, benchmark/parity cases and targets (docs/design.md, 'Adding an op')
# --------------------------------------------------------------------------------------------
from fastgpt.ops import _cross_entropy_cases as _cases  # noqa: E402  (needs the functions above)



def _report_launches(t: int, v: int, dtype: torch.dtype):
    """The registry's ``report_launches``: the kernel's one launch (loss and gradient of a training
    step); its second pass over each row reads the logits again (counted as HBM traffic, no L2 credit).
    The backward is not a kernel: it scales the saved gradient by the upstream one."""
    from fastgpt.kernels import cross_entropy as kernels

    return [(p, plan, float(t * v * element_size(dtype))) for p, plan in kernels.example_plans(t, v, dtype)]


register(
    OpSpec(
        name="cross_entropy",
        functions=(cross_entropy,),
        backends=("triton",),
        custom_ops=(_cross_entropy,),
        dims=("T", "V"),
        parity_dims=((33, 1000), (257, 5003)),
        dispatch_sizes={"tiny": (8, 64), "small": (256, 1024), "realistic": (512, 8192)},
        report_shapes=((8192, 50304), (8192, 128256)),  # GPT-2's and Llama-3's vocabularies
        report_launches=_report_launches,
        report_hidden=False,
        cases=_cases.cross_entropy_cases(cross_entropy),
    )
)

register(
    OpSpec(
        name="linear_cross_entropy",
        functions=(linear_cross_entropy,),
        backends=("triton",),
        custom_ops=(_linear_cross_entropy,),
        patchable=True,
        dims=("T", "V", "D"),
        parity_dims=((33, 1000, 16), (257, 5003, 64)),
        dispatch_sizes={"tiny": (8, 64, 16), "small": (256, 1024, 64), "realistic": (256, 8192, 128)},
        cases=_cases.linear_cross_entropy_cases(linear_cross_entropy),
    )
)
