"""Parity cases for the ops of the ``cuda`` backend, shared by the emulated (CPU) and the GPU tests.

``ops`` is anything with the cuda backend's op signatures: the CPU emulator
(:class:`cuda_emu.Emulator`) or the real extension (``fastgpt.cuda_ext.load()``). Each case wraps
the forward and backward ops in an autograd.Function and checks them, forward and gradients, with
``fastgpt.testing.check_against_torch``: baseline = torch's own function in the same dtype,
reference = the same in float64, on the same rounded inputs.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from fastgpt.testing import check_against_torch

EPS = 1e-5


def misaligned(t: Tensor) -> Tensor:
    """A contiguous copy of t that starts one element past an aligned address (differentiable)."""
    flat = torch.cat([t.new_zeros(1), t.reshape(-1)])
    out = flat[1:].view(t.shape)
    assert out.data_ptr() % 16 != 0
    return out


def _maybe_misaligned(t: Optional[Tensor], flag: bool) -> Optional[Tensor]:
    return misaligned(t) if (flag and t is not None) else t


def _randn(shape, seed: int, scale: float = 1.0, shift: float = 0.0, device="cpu", requires_grad=True) -> Tensor:
    gen = torch.Generator(device=device).manual_seed(seed)
    t = torch.randn(*shape, generator=gen, dtype=torch.float64, device=device) * scale + shift
    return t.requires_grad_(requires_grad)


# ---- autograd wrappers over the backend's forward/backward ops ------------------------------------


class _LayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ops, misalign_grads, x, residual, weight, bias, eps=EPS):
        if residual is None:
            y, mean, rstd = ops.layer_norm_fwd(x, weight, bias, eps)
            s = None
            ctx.save_for_backward(x, weight, mean, rstd)
        else:
            y, s, mean, rstd = ops.add_layer_norm_fwd(x, residual, weight, bias, eps)
            ctx.save_for_backward(s, weight, mean, rstd)
        ctx.ops, ctx.misalign, ctx.add = ops, misalign_grads, residual is not None
        ctx.has_bias = bias is not None
        return (y, s) if ctx.add else y

    @staticmethod
    def backward(ctx, dy, dsum=None):
        x, weight, mean, rstd = ctx.saved_tensors
        need_w = weight is not None and ctx.needs_input_grad[4]
        need_b = ctx.has_bias and ctx.needs_input_grad[5]
        dy = _maybe_misaligned(dy.contiguous(), ctx.misalign)
        if ctx.add:
            dsum = _maybe_misaligned(dsum.contiguous(), ctx.misalign) if dsum is not None else None
            dx, dw, db = ctx.ops.add_layer_norm_bwd(dy, dsum, x, weight, mean, rstd, need_w, need_b)
        else:
            dx, dw, db = ctx.ops.layer_norm_bwd(dy, x, weight, mean, rstd, need_w, need_b)
        assert dw.shape == ((x.shape[1],) if need_w else (0,)) and db.shape == ((x.shape[1],) if need_b else (0,))
        return None, None, dx, (dx if ctx.add else None), (dw if need_w else None), (db if need_b else None), None


class _Gelu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ops, misalign_grads, approximate, x, bias):
        ctx.ops, ctx.misalign, ctx.approximate = ops, misalign_grads, approximate
        ctx.save_for_backward(x, bias)
        return ops.gelu_fwd(x, approximate) if bias is None else ops.bias_gelu_fwd(x, bias, approximate)

    @staticmethod
    def backward(ctx, dy):
        x, bias = ctx.saved_tensors
        dy = _maybe_misaligned(dy.contiguous(), ctx.misalign)
        if bias is None:
            return None, None, None, ctx.ops.gelu_bwd(dy, x, ctx.approximate), None
        dx, dbias = ctx.ops.bias_gelu_bwd(dy, x, bias, ctx.approximate)
        assert dbias.dtype == bias.dtype and dbias.shape == bias.shape
        return None, None, None, dx, dbias


# ---- cases -----------------------------------------------------------------------------------------


def check_layer_norm(
    ops,
    rows: int,
    n: int,
    dtype: torch.dtype,
    *,
    weight: bool = True,
    bias: bool = True,
    param_fp32: bool = False,
    misalign: bool = False,
    residual: bool = False,
    weight_grad: bool = True,
    device="cpu",
    seed: int = 0,
    eps: float = EPS,
    x_scale: float = 2.0,
    x_shift: float = 0.5,
):
    """Layer norm (or add + layer norm) on (rows, n), forward and gradients, against F.layer_norm;
    x ~ x_scale * N(0, 1) + x_shift (a small scale and a large shift: low-variance rows, large means)."""
    x = _randn((rows, n), seed, scale=x_scale, shift=x_shift, device=device)
    inputs = [x]
    if residual:
        inputs.append(_randn((rows, n), seed + 1, device=device))
    if weight:
        inputs.append(_randn((n,), seed + 2, scale=0.5, shift=1.0, device=device, requires_grad=weight_grad))
    if bias:
        inputs.append(_randn((n,), seed + 3, scale=0.5, device=device))

    def unpack(args):
        it = iter(args)
        xx = next(it)
        r = next(it) if residual else None
        w = next(it) if weight else None
        b = next(it) if bias else None
        return xx, r, w, b

    def fn(*args):
        xx, r, w, b = unpack(args)
        if param_fp32:  # the autocast layout: float32 parameters with 16-bit activations
            w = w.float() if w is not None else None
            b = b.float() if b is not None else None
        xx, r, w, b = (_maybe_misaligned(t, misalign) for t in (xx, r, w, b))
        return _LayerNorm.apply(ops, misalign, xx, r, w, b, eps)

    def torch_fn(*args):
        xx, r, w, b = unpack(args)
        if r is None:
            return F.layer_norm(xx, (n,), w, b, eps)
        s = xx + r
        return F.layer_norm(s, (n,), w, b, eps), s

    name = f"{'add_' if residual else ''}layer_norm {rows}x{n} {dtype} eps={eps:g}"
    return check_against_torch(name, fn, torch_fn, inputs, dtype)


def _bias_gelu_torch(approximate: str):
    def torch_fn(x, b):
        return F.gelu(x + b, approximate=approximate)

    return torch_fn


def check_gelu(ops, shape, dtype: torch.dtype, approximate: str, *, misalign: bool = False, device="cpu", seed: int = 0):
    """GELU of x (any shape), forward and gradient, against F.gelu."""
    x = _randn(shape, seed, scale=3.0, device=device)

    def fn(xx):
        return _Gelu.apply(ops, misalign, approximate, _maybe_misaligned(xx, misalign), None)

    def torch_fn(xx):
        return F.gelu(xx, approximate=approximate)

    return check_against_torch(f"gelu {tuple(shape)} {dtype} {approximate}", fn, torch_fn, [x], dtype)


def check_bias_gelu(
    ops,
    shape,
    dtype: torch.dtype,
    approximate: str,
    *,
    bias_fp32: bool = False,
    misalign: bool = False,
    device="cpu",
    seed: int = 0,
):
    """gelu(x + bias), forward and gradients of x and bias, against F.gelu(x + b) (sum rounded to dtype)."""
    x = _randn(shape, seed, scale=3.0, device=device)
    b = _randn(shape[-1:], seed + 1, device=device)

    def fn(xx, bb):
        if bias_fp32:
            bb = bb.float()
        return _Gelu.apply(ops, misalign, approximate, _maybe_misaligned(xx, misalign), _maybe_misaligned(bb, misalign))

    name = f"bias_gelu {tuple(shape)} {dtype} {approximate}"
    return check_against_torch(name, fn, _bias_gelu_torch(approximate), [x, b], dtype)
