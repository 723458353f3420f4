"""GELU and bias + GELU: custom ops and public functions.

Custom ops (x contiguous; bias (N,) with N = x.shape[-1]):

* ``fastgpt::gelu_fwd(x, approximate) -> y``
* ``fastgpt::gelu_bwd(dy, x, approximate) -> dx``
* ``fastgpt::bias_gelu_fwd(x, bias, approximate) -> y``
* ``fastgpt::bias_gelu_bwd(dy, x, bias, approximate) -> (dx, dbias)``

``approximate`` is "none" (erf) or "tanh", as in ``torch.nn.functional.gelu``. The cuda backend
(``fastgpt.cuda_ext``) exposes ops of the same names and signatures.
"""

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from fastgpt import reference
from fastgpt.ops._cases import MLP_DISPATCH_SIZES, rowwise_gpu_shapes, rowwise_smoke_shapes
from fastgpt.ops import _cuda_backend as cuda
from fastgpt.ops._checks import check_approximate, check_param_dtype, check_same_device, check_tensor
from fastgpt.ops._define import TORCH_EXACT_DTYPES, FastgptOp, reference_serves
from fastgpt.registry import OpCases, OpSpec, element_size, passes, register

__all__ = ["gelu", "bias_gelu"]


def _gelu_fwd(x: Tensor, approximate: str) -> Tensor:
    if cuda.choose("gelu", x) == "cuda":
        return cuda.ops().gelu_fwd(x, approximate)
    return reference.gelu_forward(x, approximate)


def _gelu_bwd(dy: Tensor, x: Tensor, approximate: str) -> Tensor:
    if cuda.choose("gelu", x) == "cuda":
        return cuda.ops().gelu_bwd(dy, x, approximate)
    return reference.gelu_backward(dy, x, approximate)


def _gelu_fwd_fake(x, approximate):
    return torch.empty_like(x)


def _gelu_bwd_fake(dy, x, approximate):
    return torch.empty_like(x)


def _gelu_setup_context(ctx, inputs, output):
    x, approximate = inputs
    ctx.save_for_backward(x)
    ctx.approximate = approximate


def _gelu_backward(ctx, gelu_bwd, dy):
    if dy is None:
        return None, None
    (x,) = ctx.saved_tensors
    return gelu_bwd(dy.contiguous(), x, ctx.approximate), None


_gelu = FastgptOp("gelu", _gelu_fwd, _gelu_bwd, _gelu_fwd_fake, _gelu_bwd_fake, _gelu_setup_context, _gelu_backward)


def _bias_gelu_fwd(x: Tensor, bias: Tensor, approximate: str) -> Tensor:
    if cuda.choose("bias_gelu", x) == "cuda":
        return cuda.ops().bias_gelu_fwd(x, bias, approximate)
    return reference.bias_gelu_forward(x, bias, approximate)


def _bias_gelu_bwd(dy: Tensor, x: Tensor, bias: Tensor, approximate: str) -> Tuple[Tensor, Tensor]:
    if cuda.choose("bias_gelu", x) == "cuda":
        return cuda.ops().bias_gelu_bwd(dy, x, bias, approximate)
    return reference.bias_gelu_backward(dy, x, bias, approximate)


def _bias_gelu_fwd_fake(x, bias, approximate):
    return torch.empty_like(x)


def _bias_gelu_bwd_fake(dy, x, bias, approximate):
    return torch.empty_like(x), torch.empty_like(bias)


def _bias_gelu_setup_context(ctx, inputs, output):
    x, bias, approximate = inputs
    ctx.save_for_backward(x, bias)
    ctx.approximate = approximate


def _bias_gelu_backward(ctx, bias_gelu_bwd, dy):
    if dy is None:
        return None, None, None
    x, bias = ctx.saved_tensors
    dx, dbias = bias_gelu_bwd(dy.contiguous(), x, bias, ctx.approximate)
    return dx, dbias, None


_bias_gelu = FastgptOp(
    "bias_gelu",
    _bias_gelu_fwd,
    _bias_gelu_bwd,
    _bias_gelu_fwd_fake,
    _bias_gelu_bwd_fake,
    _bias_gelu_setup_context,
    _bias_gelu_backward,
)


def gelu(x: Tensor, approximate: str = "none") -> Tensor:
    """Drop-in for ``torch.nn.functional.gelu``: x of any shape and floating dtype.

    ``approximate="none"`` is the exact erf form, ``"tanh"`` the tanh approximation (GPT-2's
    "gelu_new"). Computed in float32 (float64 for float64 x); returns x's shape and dtype.
    Non-contiguous x is copied to a contiguous layout first.
    """
    fn = "fastgpt.gelu"
    check_tensor(fn, "x", x)
    check_approximate(fn, approximate)
    if reference_serves("gelu", x, cuda.constraint(x)):
        return F.gelu(x, approximate=approximate)
    return _gelu(x.contiguous(), approximate)


def bias_gelu(x: Tensor, bias: Tensor, approximate: str = "none") -> Tensor:
    """``gelu(x + bias)`` in one pass (the epilogue of a bias-free linear layer).

    x is (..., N); bias is (N,), of x's dtype (or float32 for float16/bfloat16 x). The sum is kept in
    float32 rather than rounded to x's dtype before the GELU. Returns x's shape and dtype; the bias
    gradient is summed over all leading dims of x.
    """
    fn = "fastgpt.bias_gelu"
    check_tensor(fn, "x", x, min_ndim=1)
    check_tensor(fn, "bias", bias, ndim=(1,))
    check_approximate(fn, approximate)
    if bias.shape[0] != x.shape[-1]:
        raise ValueError(f"{fn}: bias must have shape ({x.shape[-1]},) (x's last dim); got {tuple(bias.shape)}")
    check_param_dtype(fn, "bias", bias, x)
    check_same_device(fn, x=x, bias=bias)
    if x.dtype in TORCH_EXACT_DTYPES and bias.dtype == x.dtype and reference_serves("bias_gelu", x, cuda.constraint(x)):
        return F.gelu(x + bias, approximate=approximate)
    return _bias_gelu(x.contiguous(), bias.contiguous(), approximate)


# --------------------------------------------------------------------------------------------
# registry entries: the byte model, benchmark/parity cases and targets (docs/design.md, 'Adding an op')
# --------------------------------------------------------------------------------------------


def gelu_bytes(numel: int, dtype: torch.dtype, *, backward: bool = False) -> int:
    """GELU over ``numel`` elements: forward 2*n*e, backward 3*n*e."""
    return (3 if backward else 2) * numel * element_size(dtype)


def bias_gelu_bytes(numel: int, n: int, dtype: torch.dtype, bias_dtype: Optional[torch.dtype] = None, *, backward: bool = False) -> int:
    """gelu(x + bias), x of ``numel`` elements, bias (n,): GELU's bytes plus the bias (and dbias)."""
    be = element_size(bias_dtype or dtype)
    return gelu_bytes(numel, dtype, backward=backward) + (2 if backward else 1) * n * be


def _gelu_work(d, dtype, mode, causal=False):
    return "bytes", float(sum(gelu_bytes(d["M"] * d["N"], dtype, backward=p == "bwd") for p in passes(mode)))


def _bias_gelu_work(d, dtype, mode, causal=False):
    return "bytes", float(sum(bias_gelu_bytes(d["M"] * d["N"], d["N"], dtype, dtype, backward=p == "bwd") for p in passes(mode)))


def _gelu_inputs(case, randn):
    d = case.d
    return [randn(d["M"], d["N"])], [randn(d["M"], d["N"]).detach()]


def _bias_gelu_inputs(case, randn):
    d = case.d
    return [randn(d["M"], d["N"]), randn(d["N"], scale=0.1)], [randn(d["M"], d["N"]).detach()]


def _gelu_targets(mode, dims, vs, pct):
    vs("torch.compile", ("torch-compile",), 1.0)


def _bias_gelu_targets(mode, dims, vs, pct):
    vs("eager", ("torch-eager",), 1.4)
    vs("torch.compile", ("torch-compile",), 1.0)


def _gpu_shapes(tier):
    return rowwise_gpu_shapes(tier, 4, tier["gelu_approximate"])


def _smoke_shapes():
    return rowwise_smoke_shapes(64, "tanh")


register(
    OpSpec(
        name="gelu",
        functions=(gelu,),
        backends=("cuda",),
        custom_ops=(_gelu,),
        cuda_ops=("gelu_fwd", "gelu_bwd"),
        patchable=True,
        parity_dims=((33, 96), (1000, 3072)),
        dispatch_sizes=MLP_DISPATCH_SIZES,
        cases=OpCases(
            gpu_shapes=_gpu_shapes,
            smoke_shapes=_smoke_shapes,
            inputs=_gelu_inputs,
            eager=lambda case, device: lambda x: F.gelu(x, approximate=case.approximate),
            call=lambda case: lambda x: gelu(x, case.approximate),
            work=_gelu_work,
            work_model={"fwd": "bytes = 2*n*e(x) [read x, write y]", "bwd": "bytes = 3*n*e(x) [read x, dy, write dx]"},
            peers=("torch-eager", "torch-compile"),
            targets=_gelu_targets,
            width_factor=4,
        ),
    )
)

register(
    OpSpec(
        name="bias_gelu",
        functions=(bias_gelu,),
        backends=("cuda",),
        custom_ops=(_bias_gelu,),
        cuda_ops=("bias_gelu_fwd", "bias_gelu_bwd"),
        parity_dims=((33, 96), (1000, 3072)),
        dispatch_sizes=MLP_DISPATCH_SIZES,
        cases=OpCases(
            gpu_shapes=_gpu_shapes,
            smoke_shapes=_smoke_shapes,
            inputs=_bias_gelu_inputs,
            eager=lambda case, device: lambda x, b: F.gelu(x + b, approximate=case.approximate),
            call=lambda case: lambda x, b: bias_gelu(x, b, case.approximate),
            work=_bias_gelu_work,
            work_model={
                "fwd": "bytes = 2*n*e(x) + N*e(b) [read x, bias, write y]",
                "bwd": "bytes = 3*n*e(x) + 2*N*e(b) [read x, dy, bias, write dx, dbias]",
            },
            peers=("torch-eager", "torch-compile"),
            targets=_bias_gelu_targets,
            width_factor=4,
        ),
    )
)
