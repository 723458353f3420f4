"""Cross-entropy over a vocabulary in Triton: the loss of each row and the gradient of its logits in one launch.

The ``triton`` backend of :mod:`fastgpt.ops.cross_entropy` (``cross_entropy`` and, per chunk of
tokens, ``linear_cross_entropy``), through two functions::

    unsupported_reason(z) -> str | None
    forward(z, target, loss, dz, grad_scale, ignore_index, label_smoothing) -> None

``z`` is (rows, V) logits with a contiguous last dim (any row stride), float16 / bfloat16 / float32;
``target`` (rows,) int64 or int32; ``loss`` (rows,) float32 receives each row's loss
``lse - (1 - eps) * z[t] - eps / V * sum(z)`` (0 where the target is ``ignore_index``). When ``dz`` is
given it receives ``grad_scale * (softmax(z) - (1 - eps) * onehot(t) - eps / V)`` (0 on ignored rows)
in its own dtype; ``dz`` may be ``z`` itself (Liger-Kernel's in-place trick: the linear
cross-entropy's chunk of logits becomes its gradient, no second buffer). ``grad_scale`` is a float32
0-d tensor (``1 / valid rows`` for a mean) or (rows,) (the upstream gradient of reduction 'none').

One program per row, two passes over the row in blocks of BLOCK_N (online softmax, Milakov &
Gimelshein 2018): pass 1 keeps the running max, the running sum of exponentials, and the sum of the
logits (label smoothing) in float32; pass 2 writes the gradient. Each row's logits are read twice and
the gradient written once; every value is computed in float32 whatever the input dtype.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._rounding import cast_out
from ._triton_utils import Config, LaunchPlan, interpreter_active, launch, next_pow2

__all__ = ["unsupported_reason", "forward", "forward_plan", "example_plans", "block_n", "SUPPORTED_DTYPES"]

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_GPU_BLOCK = 4096  # 16 KiB of float32 per block in registers across 8 warps (not tuned: no GPU measured it)
_INTERPRETER_BLOCK = 256  # small, so the CPU tests cross several blocks and a ragged last one


@triton.jit
def _cross_entropy_kernel(
    Z, stride_z, DZ, stride_dz, Target, Loss, Scale, stride_scale,
    V, ignore_index, smoothing,
    HAS_GRAD: tl.constexpr, HAS_SMOOTHING: tl.constexpr, ROUND_BF16: tl.constexpr, BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    z_row = Z + row * stride_z
    t = tl.load(Target + row).to(tl.int64)
    valid = t != ignore_index
    t_safe = tl.where(valid, t, 0)
    cols0 = tl.arange(0, BLOCK_N)

    # pass 1: online max / sum of exponentials (and the sum of the logits for label smoothing)
    m = float("-inf")
    d = 0.0
    s = 0.0
    for start in range(0, V, BLOCK_N):
        cols = start + cols0
        mask = cols < V
        z = tl.load(z_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(z, 0))
        d = d * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), 0)
        m = m_new
        if HAS_SMOOTHING:
            s += tl.sum(tl.where(mask, z, 0.0), 0)
    lse = m + tl.log(d)
    z_t = tl.load(z_row + t_safe).to(tl.float32)
    loss = lse - (1.0 - smoothing) * z_t
    if HAS_SMOOTHING:
        loss -= smoothing / V * s
    tl.store(Loss + row, tl.where(valid, loss, 0.0))

    # pass 2: the gradient, written over the row (possibly in place: each block is read before it is written)
    if HAS_GRAD:
        scale = tl.load(Scale + row * stride_scale).to(tl.float32)
        scale = tl.where(valid, scale, 0.0)
        dz_row = DZ + row * stride_dz
        for start in range(0, V, BLOCK_N):
            cols = start + cols0
            mask = cols < V
            z = tl.load(z_row + cols, mask=mask, other=0.0).to(tl.float32)
            g = tl.exp(z - lse)
            if HAS_SMOOTHING:
                g -= smoothing / V
            g = tl.where(cols == t_safe, g - (1.0 - smoothing), g) * scale
            tl.store(dz_row + cols, cast_out(g, DZ.dtype.element_ty, ROUND_BF16), mask=mask)


def block_n(v: int) -> int:
    """Vocabulary block of one loop step: the whole row when it is small, else a fixed block."""
    return min(next_pow2(max(v, 1)), _INTERPRETER_BLOCK if interpreter_active() else _GPU_BLOCK)


def forward_plan(z: Tensor, target: Tensor, loss: Tensor, dz: Optional[Tensor], grad_scale: Optional[Tensor],
                 ignore_index: int, label_smoothing: float) -> LaunchPlan:
    """The one launch of the kernel for these tensors (see :func:`forward`); meta tensors work."""
    rows, v = z.shape
    has_grad = dz is not None
    scale = grad_scale if has_grad else loss  # a placeholder pointer, never read without HAS_GRAD
    bn = block_n(v)
    return LaunchPlan(
        name="loss_grad", kernel=_cross_entropy_kernel,
        args={
            "Z": z, "stride_z": z.stride(0), "DZ": dz if has_grad else z, "stride_dz": (dz if has_grad else z).stride(0),
            "Target": target, "Loss": loss, "Scale": scale, "stride_scale": scale.stride(0) if scale.dim() else 0,
            "V": v, "ignore_index": int(ignore_index), "smoothing": float(label_smoothing),
        },
        constexprs={"HAS_GRAD": has_grad, "HAS_SMOOTHING": label_smoothing > 0.0,
                    "ROUND_BF16": has_grad and dz.dtype == torch.bfloat16 and interpreter_active()},
        # one config, never benchmarked: the kernel may write in place, so it must run exactly once
        configs=(Config(1, bn, 8 if bn >= 2048 else 4, 1),),
        grid=lambda config: (rows,),
    )


def example_plans(rows: int, v: int, dtype: torch.dtype, device="meta"):
    """[("fwd", LaunchPlan)]: the launch of a training step's loss on (rows, v) logits, the gradient
    written over the logits in place as the linear cross-entropy does (for ``fastgpt inspect``)."""
    z = torch.empty(rows, v, dtype=dtype, device=device)
    target = torch.empty(rows, dtype=torch.int64, device=device)
    loss = torch.empty(rows, dtype=torch.float32, device=device)
    scale = torch.empty((), dtype=torch.float32, device=device)
    return [("fwd", forward_plan(z, target, loss, z, scale, -100, 0.0))]


def unsupported_reason(z: Tensor) -> Optional[str]:
    """Why the kernel cannot take these logits, or None. (Shapes and devices are validated upstream.)"""
    if z.dtype not in SUPPORTED_DTYPES:
        return f"dtype {z.dtype} is not supported by the triton kernel (float16, bfloat16, float32)"
    return None


def forward(z: Tensor, target: Tensor, loss: Tensor, dz: Optional[Tensor], grad_scale: Optional[Tensor],
            ignore_index: int, label_smoothing: float) -> None:
    """Write ``loss`` (rows,) float32 and, when ``dz`` is given, the scaled gradient into ``dz`` (may be ``z``)."""
    if z.shape[0] == 0:
        return
    if z.stride(-1) != 1:
        raise ValueError(f"cross_entropy kernel: z must have a contiguous last dim; got strides {z.stride()}")
    if dz is not None:
        grad_scale = grad_scale.to(device=z.device, dtype=torch.float32)
        if grad_scale.dim() and grad_scale.stride(0) != 1:
            grad_scale = grad_scale.contiguous()
    ctx = torch.cuda.device(z.device) if z.device.type == "cuda" else contextlib.nullcontext()
    with ctx:
        launch(forward_plan(z, target, loss, dz, grad_scale, ignore_index, label_smoothing))
