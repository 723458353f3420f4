"""SwiGLU in Triton: ``silu(gate) * up``, forward and backward, one pass each.

The ``triton`` backend of :mod:`fastgpt.ops.swiglu`, through three functions::

    unsupported_reason(gate) -> str | None
    forward(gate, up, y) -> None                      # y = silu(gate) * up
    backward(dy, gate, up, dgate, dup) -> None        # dgate = dy * up * silu'(gate), dup = dy * silu(gate)

Tensors are (M, N) with a contiguous last dim and any row stride, so gate and up may be the two
halves of a fused gate/up projection's output without copies. float32 math, one rounding per
output (:func:`fastgpt.reference.swiglu_forward` / ``swiglu_backward``). One program per tile of
BLOCK_M rows x BLOCK_N columns, the grid flattened into axis 0 (no 65535 limit on rows); each thread
moves 16-byte vectors along a row.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._rounding import cast_out
from ._triton_utils import Config, LaunchPlan, ceil_div, interpreter_active, launch, next_pow2, on_device

__all__ = ["unsupported_reason", "forward", "backward", "plan", "example_plans"]

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
TILE_ELEMENTS = 4096  # per program: 32 elements per thread at 4 warps (four 16-byte vectors of 16-bit values)


@triton.jit
def _swiglu_kernel(
    G, U, DY, Y, DG, M, N, stride_g, stride_u, stride_dy, stride_y, stride_dg,
    BACKWARD: tl.constexpr, RTNE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Forward: Y = silu(G) * U. Backward: Y = dU = DY * silu(G), DG = DY * U * silu'(G)."""
    pid = tl.program_id(0)
    col_tiles = tl.cdiv(N, BLOCK_N)
    rows = ((pid // col_tiles) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = (pid % col_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    g = tl.load(G + rows[:, None] * stride_g + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + rows[:, None] * stride_u + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    sig = 1.0 / (1.0 + tl.exp(-g))
    if BACKWARD:
        dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dg = dy * u * sig * (1.0 + g * (1.0 - sig))
        tl.store(DG + rows[:, None] * stride_dg + cols[None, :], cast_out(dg, DG.dtype.element_ty, RTNE), mask=mask)
        out = dy * g * sig
    else:
        out = g * sig * u
    tl.store(Y + rows[:, None] * stride_y + cols[None, :], cast_out(out, Y.dtype.element_ty, RTNE), mask=mask)


def plan(gate: Tensor, up: Tensor, out: Tensor, dy: Optional[Tensor] = None, dgate: Optional[Tensor] = None) -> LaunchPlan:
    """The forward launch (dy None: out = y) or the backward one (out = dup, plus dgate)."""
    m, n = gate.shape
    block_n = min(max(16, next_pow2(n)), 1024 if not interpreter_active() else 64)
    block_m = max(1, (TILE_ELEMENTS if not interpreter_active() else 256) // block_n)
    backward = dy is not None
    args = {
        "G": gate, "U": up, "DY": dy if backward else gate, "Y": out, "DG": dgate if backward else out, "M": m, "N": n,
        "stride_g": gate.stride(0), "stride_u": up.stride(0), "stride_dy": (dy if backward else gate).stride(0),
        "stride_y": out.stride(0), "stride_dg": (dgate if backward else out).stride(0),
    }  # fmt: skip
    return LaunchPlan(name="bwd" if backward else "fwd", kernel=_swiglu_kernel, args=args,
                      constexprs={"BACKWARD": backward, "RTNE": interpreter_active()},
                      configs=(Config(block_m, block_n, 4, 1),),
                      grid=lambda c: (ceil_div(m, c.block_m) * ceil_div(n, c.block_n),))


def example_plans(m: int, n: int, dtype: torch.dtype, device="meta"):
    """[(pass, LaunchPlan)] of a forward and backward on contiguous (m, n) inputs (for ``fastgpt inspect``)."""
    g, u = torch.empty(m, n, dtype=dtype, device=device), torch.empty(m, n, dtype=dtype, device=device)
    return [("fwd", plan(g, u, torch.empty_like(g))),
            ("bwd", plan(g, u, torch.empty_like(g), torch.empty_like(g), torch.empty_like(g)))]


def unsupported_reason(gate: Tensor) -> Optional[str]:
    if gate.dtype not in SUPPORTED_DTYPES:
        return f"dtype {gate.dtype} is not supported by the triton kernel (float16, bfloat16, float32)"
    return None


def forward(gate: Tensor, up: Tensor, y: Tensor) -> None:
    with on_device(gate):
        launch(plan(gate, up, y))


def backward(dy: Tensor, gate: Tensor, up: Tensor, dgate: Tensor, dup: Tensor) -> None:
    with on_device(gate):
        launch(plan(gate, up, dup, dy, dgate))
