"""SwiGLU, the gated activation of Llama-family MLPs: custom ops and the public function.

Custom ops (gate, up (M, N) with a contiguous last dim and any row stride):

* ``fastgpt::swiglu_fwd(gate, up) -> y``
* ``fastgpt::swiglu_bwd(dy, gate, up) -> (dgate, dup)``

The triton backend is ``fastgpt.kernels.swiglu``.
"""

from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from fastgpt import reference
from fastgpt.ops import _triton_backend as triton
from fastgpt.ops._cases import MLP_DISPATCH_SIZES, rowwise_gpu_shapes, rowwise_smoke_shapes
from fastgpt.ops._checks import check_same_device, check_same_dtype, check_tensor
from fastgpt.ops._define import TORCH_EXACT_DTYPES, FastgptOp, reference_serves
from fastgpt.registry import OpCases, OpSpec, element_size, passes, register

__all__ = ["swiglu"]

_KERNELS = "swiglu"


def _swiglu_fwd(gate: Tensor, up: Tensor) -> Tensor:
    if triton.choose("swiglu", _KERNELS, gate) == "triton":
        y = gate.new_empty(gate.shape)
        triton.kernels(_KERNELS).forward(gate, up, y)
        return y
    return reference.swiglu_forward(gate, up)


def _swiglu_bwd(dy: Tensor, gate: Tensor, up: Tensor) -> Tuple[Tensor, Tensor]:
    if triton.choose("swiglu", _KERNELS, gate) == "triton":
        dgate, dup = gate.new_empty(gate.shape), gate.new_empty(gate.shape)
        triton.kernels(_KERNELS).backward(dy, gate, up, dgate, dup)
        return dgate, dup
    return reference.swiglu_backward(dy, gate, up)


def _swiglu_fwd_fake(gate, up):
    return gate.new_empty(gate.shape)


def _swiglu_bwd_fake(dy, gate, up):
    return gate.new_empty(gate.shape), gate.new_empty(gate.shape)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, swiglu_bwd, dy):
    if dy is None:
        return None, None
    gate, up = ctx.saved_tensors
    return swiglu_bwd(dy.contiguous(), gate, up)


_swiglu = FastgptOp("swiglu", _swiglu_fwd, _swiglu_bwd, _swiglu_fwd_fake, _swiglu_bwd_fake, _setup_context, _backward)


def _rows(t: Tensor, n: int) -> Tensor:
    """(M, n) with a unit column stride: a view where the layout allows (halves of a fused projection)."""
    t = t.reshape(-1, n)
    return t if t.stride(-1) == 1 else t.contiguous()


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """``silu(gate) * up`` in one pass (Llama's MLP: ``down(swiglu(gate_proj(x), up_proj(x)))``).

    gate and up have the same shape and floating dtype; any strides with a contiguous last dim
    are read in place (e.g. ``gate, up = gate_up.chunk(2, dim=-1)``). Computed in float32 (float64
    for float64 inputs) and rounded once; the backward is one pass too. Returns a contiguous tensor
    of gate's shape and dtype.
    """
    fn = "fastgpt.swiglu"
    check_tensor(fn, "gate", gate)
    check_tensor(fn, "up", up)
    check_same_dtype(fn, gate=gate, up=up)
    check_same_device(fn, gate=gate, up=up)
    if up.shape != gate.shape:
        raise ValueError(f"{fn}: up must have gate's shape {tuple(gate.shape)}; got {tuple(up.shape)}")
    if gate.dtype in TORCH_EXACT_DTYPES and reference_serves("swiglu", gate, triton.constraint(_KERNELS, gate)):
        return F.silu(gate) * up
    n = gate.shape[-1] if gate.dim() else 1
    y = _swiglu(_rows(gate, n), _rows(up, n))
    return y.view(gate.shape)


# --------------------------------------------------------------------------------------------
# registry entry: the byte model, benchmark/parity cases and targets (docs/design.md, 'Adding an op')
# --------------------------------------------------------------------------------------------


def swiglu_bytes(numel: int, dtype: torch.dtype, *, backward: bool = False) -> int:
    """SwiGLU over ``numel`` elements of each input: forward 3*n*e (read gate, up, write y),
    backward 5*n*e (read gate, up, dy, write dgate, dup)."""
    return (5 if backward else 3) * numel * element_size(dtype)


def _work(d, dtype, mode, causal=False):
    return "bytes", float(sum(swiglu_bytes(d["M"] * d["N"], dtype, backward=p == "bwd") for p in passes(mode)))


def _inputs(case, randn):
    m, n = case.d["M"], case.d["N"]
    return [randn(m, n), randn(m, n)], [randn(m, n).detach()]


def _targets(mode, dims, vs, pct):
    pct("pct_of_copy_bandwidth", 85.0, "copy bandwidth")
    vs("torch.compile", ("torch-compile",), 1.0)


register(
    OpSpec(
        name="swiglu",
        functions=(swiglu,),
        backends=("triton",),
        custom_ops=(_swiglu,),
        patchable=True,
        parity_dims=((33, 96), (1000, 4099)),
        dispatch_sizes=MLP_DISPATCH_SIZES,
        report_launches=lambda m, n, dtype: [(p, plan, 0.0) for p, plan in triton.kernels(_KERNELS).example_plans(m, n, dtype)],
        cases=OpCases(
            gpu_shapes=lambda tier: rowwise_gpu_shapes(tier, 4),
            smoke_shapes=lambda: rowwise_smoke_shapes(64),
            inputs=_inputs,
            eager=lambda case, device: lambda g, u: F.silu(g) * u,
            call=lambda case: swiglu,
            work=_work,
            work_model={"fwd": "bytes = 3*n*e [read gate, up, write y]", "bwd": "bytes = 5*n*e [read gate, up, dy, write dgate, dup]"},
            peers=("torch-eager", "torch-compile"),
            targets=_targets,
            width_factor=4,
        ),
    )
)
