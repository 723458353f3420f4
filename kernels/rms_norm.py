"""RMSNorm and residual-add + RMSNorm in Triton: forward and backward, one kernel each for both ops.

The ``triton`` backend of :mod:`fastgpt.ops.rms_norm`, through three functions::

    unsupported_reason(x) -> str | None
    forward(x, residual, weight, y, s, rstd, eps, weight_offset, cast_before_weight) -> None
    backward(dy, x, weight, rstd, dsum, dx, need_weight_grad, weight_offset, cast_before_weight) -> dweight | None

x, residual, dy, dsum, y, s, dx are (M, N) with a contiguous last dim (any row stride); weight (N,);
rstd (M,) float32. Semantics: :func:`fastgpt.reference.rms_norm_forward` / ``rms_norm_backward``
(float32 statistics and math, one rounding per output; the residual sum is rounded to x's dtype
before it is normalized, as the stored residual stream is).

Kernels:

* ``_rms_norm_fwd_kernel``: BLOCK_M rows per program. Rows of up to ``FWD_CHUNK_MAX`` elements stay
  in registers (one read of x, one write of y); wider rows loop over chunks twice (the second read is
  usually an L2 hit).
* ``_rms_norm_bwd_kernel``: a persistent grid of ``G`` programs (a few per SM), each looping over row
  tiles: dx per row, and the weight gradient summed over its rows in float32 registers (wide rows:
  in its own row of the float32 (G, N) partial buffer). The G partial rows are summed by torch
  afterwards: deterministic, no atomics.

Each launch is a :class:`~kernels._triton_utils.LaunchPlan` from :func:`forward_plan` /
:func:`backward_plan`, which the launchers and ``fastgpt inspect`` both use.
"""

from __future__ import annotations

import functools
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._rounding import cast_out
from ._triton_utils import Config, LaunchPlan, ceil_div, interpreter_active, launch, next_pow2, on_device

__all__ = ["unsupported_reason", "forward", "backward", "forward_plan", "backward_plan", "example_plans", "CHUNK_MAX", "FWD_CHUNK_MAX"]

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
CHUNK_MAX = 8192  # widest row the backward holds in registers; wider rows loop over chunks of this size
# the forward holds twice that at 32 warps (16 float32 per thread): no second read of x up to N=16384.
# The backward at 16384 (x, dy, weight and the dweight sum per thread) spilled on sm_80 and sm_90.
FWD_CHUNK_MAX = 16384
_ELEMS_PER_THREAD = 16  # a tile of BLOCK_M x BLOCK_N spread so each thread holds ~16 elements per tensor
_INTERPRETER_CHUNK_MAX = 64  # under the interpreter a smaller chunk, so small test rows cover the wide-row loop


@triton.jit
def _load_row_chunk(X, R, S, rows, stride_x, stride_r, stride_s, cols, mask, HAS_RESIDUAL: tl.constexpr, RTNE: tl.constexpr):
    """x (float32) for a tile; with a residual, s = x + r rounded to x's dtype is stored and returned."""
    x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(R + rows[:, None] * stride_r + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        s = cast_out(x + r, S.dtype.element_ty, RTNE)
        tl.store(S + rows[:, None] * stride_s + cols[None, :], s, mask=mask)
        x = s.to(tl.float32)
    return x


@triton.jit
def _normalize(x, rstd, W, cols, n_mask, weight_offset, HAS_WEIGHT: tl.constexpr, CAST_BEFORE_WEIGHT: tl.constexpr,
               X_DTYPE: tl.constexpr, RTNE: tl.constexpr):
    xhat = x * rstd[:, None]
    if CAST_BEFORE_WEIGHT:  # Hugging Face's LlamaRMSNorm: round to x's dtype, then the weight
        xhat = cast_out(xhat, X_DTYPE, RTNE).to(tl.float32)
    if HAS_WEIGHT:
        w = tl.load(W + cols, mask=n_mask, other=0.0).to(tl.float32) + weight_offset
        xhat = xhat * w[None, :]
    return xhat


@triton.jit
def _rms_norm_fwd_kernel(
    X, R, W, Y, S, Rstd, M, N, stride_x, stride_r, stride_y, stride_s, eps, weight_offset,
    HAS_RESIDUAL: tl.constexpr, HAS_WEIGHT: tl.constexpr, CAST_BEFORE_WEIGHT: tl.constexpr,
    NUM_CHUNKS: tl.constexpr, RTNE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    row_ok = rows < M
    cols = tl.arange(0, BLOCK_N)
    x_dtype = X.dtype.element_ty
    if NUM_CHUNKS == 1:
        n_mask = cols < N
        mask = row_ok[:, None] & n_mask[None, :]
        x = _load_row_chunk(X, R, S, rows, stride_x, stride_r, stride_s, cols, mask, HAS_RESIDUAL, RTNE)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / N + eps)
        y = _normalize(x, rstd, W, cols, n_mask, weight_offset, HAS_WEIGHT, CAST_BEFORE_WEIGHT, x_dtype, RTNE)
        tl.store(Y + rows[:, None] * stride_y + cols[None, :], cast_out(y, Y.dtype.element_ty, RTNE), mask=mask)
    else:
        ss = tl.zeros([BLOCK_M], dtype=tl.float32)
        for c in range(NUM_CHUNKS):
            cc = c * BLOCK_N + cols
            mask = row_ok[:, None] & (cc < N)[None, :]
            x = _load_row_chunk(X, R, S, rows, stride_x, stride_r, stride_s, cc, mask, HAS_RESIDUAL, RTNE)
            ss += tl.sum(x * x, axis=1)
        rstd = 1.0 / tl.sqrt(ss / N + eps)
        for c in range(NUM_CHUNKS):
            cc = c * BLOCK_N + cols
            n_mask = cc < N
            mask = row_ok[:, None] & n_mask[None, :]
            # the sum is recomputed (not re-read from S): no barrier orders this program's stores before its loads
            x = tl.load(X + rows[:, None] * stride_x + cc[None, :], mask=mask, other=0.0).to(tl.float32)
            if HAS_RESIDUAL:
                r = tl.load(R + rows[:, None] * stride_r + cc[None, :], mask=mask, other=0.0).to(tl.float32)
                x = cast_out(x + r, S.dtype.element_ty, RTNE).to(tl.float32)
            y = _normalize(x, rstd, W, cc, n_mask, weight_offset, HAS_WEIGHT, CAST_BEFORE_WEIGHT, x_dtype, RTNE)
            tl.store(Y + rows[:, None] * stride_y + cc[None, :], cast_out(y, Y.dtype.element_ty, RTNE), mask=mask)
    tl.store(Rstd + rows, rstd, mask=row_ok)


@triton.jit
def _bwd_tile(DY, X, W, DSUM, DX, rows, row_ok, rstd, cc, n_mask, stride_dy, stride_x, stride_dsum, stride_dx,
              weight_offset, HAS_WEIGHT: tl.constexpr):
    """(dy, xhat, g = dy * w) of one tile, float32."""
    mask = row_ok[:, None] & n_mask[None, :]
    dy = tl.load(DY + rows[:, None] * stride_dy + cc[None, :], mask=mask, other=0.0).to(tl.float32)
    xhat = tl.load(X + rows[:, None] * stride_x + cc[None, :], mask=mask, other=0.0).to(tl.float32) * rstd[:, None]
    g = dy
    if HAS_WEIGHT:
        g = dy * (tl.load(W + cc, mask=n_mask, other=0.0).to(tl.float32) + weight_offset)[None, :]
    return dy, xhat, g


@triton.jit
def _store_dx(DSUM, DX, rows, row_ok, cc, n_mask, stride_dsum, stride_dx, dx, HAS_DSUM: tl.constexpr, RTNE: tl.constexpr):
    mask = row_ok[:, None] & n_mask[None, :]
    if HAS_DSUM:
        dx += tl.load(DSUM + rows[:, None] * stride_dsum + cc[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(DX + rows[:, None] * stride_dx + cc[None, :], cast_out(dx, DX.dtype.element_ty, RTNE), mask=mask)


@triton.jit
def _rms_norm_bwd_kernel(
    DY, X, W, Rstd, DSUM, DX, DW, M, N, stride_dy, stride_x, stride_dsum, stride_dx, weight_offset,
    HAS_WEIGHT: tl.constexpr, NEED_DW: tl.constexpr, HAS_DSUM: tl.constexpr, CAST_BEFORE_WEIGHT: tl.constexpr,
    NUM_CHUNKS: tl.constexpr, RTNE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    tiles = tl.cdiv(M, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    x_dtype = X.dtype.element_ty
    dw_row = DW + pid.to(tl.int64) * N
    if NUM_CHUNKS == 1:
        n_mask = cols < N
        dw_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for tile in range(pid, tiles, programs):
            rows = (tile * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
            row_ok = rows < M
            rstd = tl.load(Rstd + rows, mask=row_ok, other=0.0)
            dy, xhat, g = _bwd_tile(DY, X, W, DSUM, DX, rows, row_ok, rstd, cols, n_mask, stride_dy, stride_x,
                                    stride_dsum, stride_dx, weight_offset, HAS_WEIGHT)
            c = tl.sum(g * xhat, axis=1) / N
            dx = (g - xhat * c[:, None]) * rstd[:, None]
            _store_dx(DSUM, DX, rows, row_ok, cols, n_mask, stride_dsum, stride_dx, dx, HAS_DSUM, RTNE)
            if NEED_DW:
                if CAST_BEFORE_WEIGHT:
                    xhat = cast_out(xhat, x_dtype, RTNE).to(tl.float32)
                dw_acc += dy * xhat
        if NEED_DW:
            tl.store(dw_row + cols, tl.sum(dw_acc, axis=0), mask=n_mask)
    else:
        for tile in range(pid, tiles, programs):
            rows = (tile * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
            row_ok = rows < M
            rstd = tl.load(Rstd + rows, mask=row_ok, other=0.0)
            acc = tl.zeros([BLOCK_M], dtype=tl.float32)
            for ch in range(NUM_CHUNKS):
                cc = ch * BLOCK_N + cols
                dy, xhat, g = _bwd_tile(DY, X, W, DSUM, DX, rows, row_ok, rstd, cc, cc < N, stride_dy, stride_x,
                                        stride_dsum, stride_dx, weight_offset, HAS_WEIGHT)
                acc += tl.sum(g * xhat, axis=1)
            c = acc / N
            for ch in range(NUM_CHUNKS):
                cc = ch * BLOCK_N + cols
                n_mask = cc < N
                dy, xhat, g = _bwd_tile(DY, X, W, DSUM, DX, rows, row_ok, rstd, cc, n_mask, stride_dy, stride_x,
                                        stride_dsum, stride_dx, weight_offset, HAS_WEIGHT)
                dx = (g - xhat * c[:, None]) * rstd[:, None]
                _store_dx(DSUM, DX, rows, row_ok, cc, n_mask, stride_dsum, stride_dx, dx, HAS_DSUM, RTNE)
                if NEED_DW:  # this program's own partial row: no other program touches it
                    if CAST_BEFORE_WEIGHT:
                        xhat = cast_out(xhat, x_dtype, RTNE).to(tl.float32)
                    part = tl.load(dw_row + cc, mask=n_mask, other=0.0)
                    tl.store(dw_row + cc, part + tl.sum(dy * xhat, axis=0), mask=n_mask)


# --------------------------------------------------------------------------------------------
# launch plans
# --------------------------------------------------------------------------------------------


def _tile(n: int, interpreter: bool, chunk_max: int = CHUNK_MAX) -> Tuple[Config, int]:
    """(config, chunks) for rows of n: BLOCK_N = the row (or a chunk of it, at most ``chunk_max``),
    BLOCK_M rows per program so that narrow rows still give each thread a few 16-byte vectors."""
    chunk_max = _INTERPRETER_CHUNK_MAX if interpreter else chunk_max
    block_n = min(max(16, next_pow2(n)), chunk_max)
    block_m = max(1, min(16, 4096 // block_n)) if not interpreter else max(1, min(4, 256 // block_n))
    warps = max(1, min(32, block_m * block_n // (32 * _ELEMS_PER_THREAD)))
    return Config(block_m, block_n, warps, 1), ceil_div(n, block_n)


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _programs(x: Tensor, tiles: int, sms: Optional[int]) -> int:
    """The backward's persistent grid: a few programs per SM, but at least 8 rows each, so the float32
    (G, N) weight-gradient partials stay small next to x (at most an eighth of its rows)."""
    if sms is None:
        sms = 4 if x.device.type != "cuda" else _sm_count(x.device.index if x.device.index is not None else torch.cuda.current_device())
    return max(1, min(tiles, 4 * sms, ceil_div(x.shape[0], 8)))


def forward_plan(x: Tensor, residual: Optional[Tensor], weight: Optional[Tensor], y: Tensor, s: Optional[Tensor], rstd: Tensor,
                 eps: float, weight_offset: float = 0.0, cast_before_weight: bool = False) -> LaunchPlan:
    m, n = x.shape
    config, chunks = _tile(n, interpreter_active(), FWD_CHUNK_MAX)
    has_r = residual is not None
    args = {
        "X": x, "R": residual if has_r else x, "W": weight if weight is not None else x, "Y": y, "S": s if has_r else y,
        "Rstd": rstd, "M": m, "N": n, "stride_x": x.stride(0), "stride_r": (residual if has_r else x).stride(0),
        "stride_y": y.stride(0), "stride_s": (s if has_r else y).stride(0), "eps": float(eps), "weight_offset": float(weight_offset),
    }  # fmt: skip
    constexprs = {"HAS_RESIDUAL": has_r, "HAS_WEIGHT": weight is not None, "CAST_BEFORE_WEIGHT": bool(cast_before_weight),
                  "NUM_CHUNKS": chunks, "RTNE": interpreter_active()}
    return LaunchPlan(name="fwd", kernel=_rms_norm_fwd_kernel, args=args, constexprs=constexprs, configs=(config,),
                      grid=lambda c: (ceil_div(m, c.block_m),))


def backward_plan(dy: Tensor, x: Tensor, weight: Optional[Tensor], rstd: Tensor, dsum: Optional[Tensor], dx: Tensor,
                  need_weight_grad: bool, weight_offset: float = 0.0, cast_before_weight: bool = False,
                  sms: Optional[int] = None) -> Tuple[LaunchPlan, Optional[Tensor]]:
    """The backward's launch and its float32 (G, N) weight-gradient partial buffer (None when not needed)."""
    m, n = x.shape
    config, chunks = _tile(n, interpreter_active())
    programs = _programs(x, ceil_div(m, config.block_m), sms)
    need_dw = bool(need_weight_grad and weight is not None)
    partial = torch.zeros(programs, n, dtype=torch.float32, device=x.device) if need_dw else None
    args = {
        "DY": dy, "X": x, "W": weight if weight is not None else x, "Rstd": rstd, "DSUM": dsum if dsum is not None else dy,
        "DX": dx, "DW": partial if partial is not None else rstd, "M": m, "N": n, "stride_dy": dy.stride(0),
        "stride_x": x.stride(0), "stride_dsum": (dsum if dsum is not None else dy).stride(0), "stride_dx": dx.stride(0),
        "weight_offset": float(weight_offset),
    }  # fmt: skip
    constexprs = {"HAS_WEIGHT": weight is not None, "NEED_DW": need_dw, "HAS_DSUM": dsum is not None,
                  "CAST_BEFORE_WEIGHT": bool(cast_before_weight), "NUM_CHUNKS": chunks, "RTNE": interpreter_active()}
    plan = LaunchPlan(name="bwd", kernel=_rms_norm_bwd_kernel, args=args, constexprs=constexprs, configs=(config,),
                      grid=lambda c: (programs,))
    return plan, partial


def example_plans(m: int, n: int, dtype: torch.dtype, device="meta", residual: bool = False, sms: int = 132):
    """[(pass, LaunchPlan)] of a forward and backward on (m, n) rows with a weight, as the op makes them
    (for ``fastgpt inspect``; meta tensors work)."""
    x = torch.empty(m, n, dtype=dtype, device=device)
    w = torch.empty(n, dtype=dtype, device=device)
    rstd = torch.empty(m, dtype=torch.float32, device=device)
    r = torch.empty_like(x) if residual else None
    fwd = forward_plan(x, r, w, torch.empty_like(x), torch.empty_like(x) if residual else None, rstd, 1e-6)
    bwd, _ = backward_plan(torch.empty_like(x), x, w, rstd, torch.empty_like(x) if residual else None, torch.empty_like(x),
                           True, sms=sms)
    return [("fwd", fwd), ("bwd", bwd)]


# --------------------------------------------------------------------------------------------
# the backend interface
# --------------------------------------------------------------------------------------------


def unsupported_reason(x: Tensor) -> Optional[str]:
    if x.dtype not in SUPPORTED_DTYPES:
        return f"dtype {x.dtype} is not supported by the triton kernel (float16, bfloat16, float32)"
    return None


def forward(x: Tensor, residual: Optional[Tensor], weight: Optional[Tensor], y: Tensor, s: Optional[Tensor], rstd: Tensor,
            eps: float, weight_offset: float = 0.0, cast_before_weight: bool = False) -> None:
    """Write y (and s = x + residual when residual is given) and rstd (M,) float32."""
    with on_device(x):
        launch(forward_plan(x, residual, weight, y, s, rstd, eps, weight_offset, cast_before_weight))


def backward(dy: Tensor, x: Tensor, weight: Optional[Tensor], rstd: Tensor, dsum: Optional[Tensor], dx: Tensor,
             need_weight_grad: bool, weight_offset: float = 0.0, cast_before_weight: bool = False) -> Optional[Tensor]:
    """Write dx (plus dsum when given) and return dweight (weight's dtype) or None."""
    with on_device(x):
        plan, partial = backward_plan(dy, x, weight, rstd, dsum, dx, need_weight_grad, weight_offset, cast_before_weight)
        launch(plan)
    return None if partial is None else partial.sum(dim=0).to(weight.dtype)
