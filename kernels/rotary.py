"""Rotary position embeddings in Triton: forward and backward, q and k in one launch, any strides.

The ``triton`` backend of :mod:`fastgpt.ops.rotary`, through three functions::

    unsupported_reason(x) -> str | None
    apply(q, k, out_q, out_k, cos1, sin1, cos2, sin2, interleaved, backward) -> None

q, k, out_q, out_k are logical (B, S, H, D) tensors with arbitrary strides (views of a fused qkv
projection are read in place; k and out_k may be None, and k may have fewer heads than q);
cos1/sin1/cos2/sin2 are (Bc, S, R/2) with Bc 1 or B (a batch stride of 0 broadcasts), cos1 and
cos2 sharing strides (two halves of one table, or one table twice), likewise sin1 and sin2.
Semantics: :func:`fastgpt.reference.rotary_forward`: the first R dims of each head are rotated in
pairs (i, i + R/2) or, ``interleaved``, (2i, 2i + 1); (a, b) becomes (a*cos1 - b*sin1,
b*cos2 + a*sin2), and ``backward`` applies the transposed map; dims R..D are copied. float32 math,
one rounding.

One program per (batch, position) and tensor (axis 1: 0 for q, 1 for k): it loads that position's
cos/sin once and loops over the heads in blocks of BLOCK_M heads (BLOCK_N = the padded R/2).
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._rounding import cast_out
from ._triton_utils import Config, LaunchPlan, interpreter_active, launch, next_pow2, on_device

__all__ = ["unsupported_reason", "apply", "plan", "example_plans"]

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
TILE_ELEMENTS = 2048  # per head block: BLOCK_M heads x 2 halves x BLOCK_N


@triton.jit
def _rotate_heads(x_ptr, o_ptr, H, sxh, sxd, soh, sod, c1, s1, c2, s2, i, im, R2, D, INTERLEAVED: tl.constexpr,
                  BACKWARD: tl.constexpr, COPY_REST: tl.constexpr, BLOCK_REST: tl.constexpr, RTNE: tl.constexpr,
                  BLOCK_M: tl.constexpr):
    """Rotate all H heads at one position of one tensor, BLOCK_M heads at a time."""
    if INTERLEAVED:
        da = 2 * i
        db = 2 * i + 1
    else:
        da = i
        db = i + R2
    out_ty = o_ptr.dtype.element_ty
    for h0 in range(0, H, BLOCK_M):
        h = (h0 + tl.arange(0, BLOCK_M)).to(tl.int64)
        hm = h < H
        mask = hm[:, None] & im[None, :]
        xa = tl.load(x_ptr + h[:, None] * sxh + da[None, :] * sxd, mask=mask, other=0.0).to(tl.float32)
        xb = tl.load(x_ptr + h[:, None] * sxh + db[None, :] * sxd, mask=mask, other=0.0).to(tl.float32)
        if BACKWARD:  # the transposed map: the gradient of the forward
            oa = xa * c1[None, :] + xb * s2[None, :]
            ob = xb * c2[None, :] - xa * s1[None, :]
        else:
            oa = xa * c1[None, :] - xb * s1[None, :]
            ob = xb * c2[None, :] + xa * s2[None, :]
        tl.store(o_ptr + h[:, None] * soh + da[None, :] * sod, cast_out(oa, out_ty, RTNE), mask=mask)
        tl.store(o_ptr + h[:, None] * soh + db[None, :] * sod, cast_out(ob, out_ty, RTNE), mask=mask)
        if COPY_REST:  # dims past the rotary ones pass through
            for j0 in range(2 * R2, D, BLOCK_REST):
                j = j0 + tl.arange(0, BLOCK_REST)
                rmask = hm[:, None] & (j < D)[None, :]
                v = tl.load(x_ptr + h[:, None] * sxh + j[None, :] * sxd, mask=rmask)
                tl.store(o_ptr + h[:, None] * soh + j[None, :] * sod, v, mask=rmask)


@triton.jit
def _rotary_kernel(
    Q, K, OQ, OK, C1, S1, C2, S2, S, Hq, Hk, R2, D,
    sqb, sqs, sqh, sqd, skb, sks, skh, skd, soqb, soqs, soqh, soqd, sokb, soks, sokh, sokd,
    scb, scs, scd, ssb, sss, ssd,
    INTERLEAVED: tl.constexpr, BACKWARD: tl.constexpr, COPY_REST: tl.constexpr, BLOCK_REST: tl.constexpr,
    RTNE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    b = (pid // S).to(tl.int64)
    s = (pid % S).to(tl.int64)
    i = tl.arange(0, BLOCK_N)
    im = i < R2
    c_off = b * scb + s * scs + i * scd
    s_off = b * ssb + s * sss + i * ssd
    c1 = tl.load(C1 + c_off, mask=im, other=0.0).to(tl.float32)
    c2 = tl.load(C2 + c_off, mask=im, other=0.0).to(tl.float32)
    s1 = tl.load(S1 + s_off, mask=im, other=0.0).to(tl.float32)
    s2 = tl.load(S2 + s_off, mask=im, other=0.0).to(tl.float32)
    if tl.program_id(1) == 0:
        _rotate_heads(Q + b * sqb + s * sqs, OQ + b * soqb + s * soqs, Hq, sqh, sqd, soqh, soqd, c1, s1, c2, s2, i, im, R2, D,
                      INTERLEAVED, BACKWARD, COPY_REST, BLOCK_REST, RTNE, BLOCK_M)
    else:
        _rotate_heads(K + b * skb + s * sks, OK + b * sokb + s * soks, Hk, skh, skd, sokh, sokd, c1, s1, c2, s2, i, im, R2, D,
                      INTERLEAVED, BACKWARD, COPY_REST, BLOCK_REST, RTNE, BLOCK_M)


def _strides(t: Tensor) -> Tuple[int, ...]:
    return tuple(t.stride())


def plan(q: Tensor, k: Optional[Tensor], out_q: Tensor, out_k: Optional[Tensor], cos1: Tensor, sin1: Tensor, cos2: Tensor,
         sin2: Tensor, interleaved: bool, backward: bool) -> LaunchPlan:
    b, s, hq, d = q.shape
    r2 = cos1.shape[-1]
    if cos1.stride() != cos2.stride() or sin1.stride() != sin2.stride():
        raise ValueError("rotary kernel: cos1/cos2 (and sin1/sin2) must share strides")
    block_n = max(1, next_pow2(r2))
    interp = interpreter_active()
    block_m = max(1, min(next_pow2(max(hq, 1)), (TILE_ELEMENTS if not interp else 64) // (2 * block_n)))
    # 8 elements per thread in each half-tile: one 16-byte vector of 16-bit values (`fastgpt inspect`
    # found 64-bit accesses at 6 heads of 128 with 4 warps over an 8 x 64 tile)
    warps = max(1, min(4, block_m * block_n // (32 * 8)))
    rest = d - 2 * r2
    cb, cs, cd = (0 if cos1.shape[0] == 1 else cos1.stride(0)), cos1.stride(1), cos1.stride(2)
    sb, ss, sd = (0 if sin1.shape[0] == 1 else sin1.stride(0)), sin1.stride(1), sin1.stride(2)
    kk, ok = (k, out_k) if k is not None else (q, out_q)
    args = {
        "Q": q, "K": kk, "OQ": out_q, "OK": ok, "C1": cos1, "S1": sin1, "C2": cos2, "S2": sin2,
        "S": s, "Hq": hq, "Hk": kk.shape[2], "R2": r2, "D": d,
        **dict(zip(("sqb", "sqs", "sqh", "sqd"), _strides(q))), **dict(zip(("skb", "sks", "skh", "skd"), _strides(kk))),
        **dict(zip(("soqb", "soqs", "soqh", "soqd"), _strides(out_q))), **dict(zip(("sokb", "soks", "sokh", "sokd"), _strides(ok))),
        "scb": cb, "scs": cs, "scd": cd, "ssb": sb, "sss": ss, "ssd": sd,
    }  # fmt: skip
    constexprs = {"INTERLEAVED": bool(interleaved), "BACKWARD": bool(backward), "COPY_REST": rest > 0,
                  "BLOCK_REST": max(16, min(next_pow2(max(rest, 1)), 128)), "RTNE": interp}
    tensors = 2 if k is not None else 1
    return LaunchPlan(name="bwd" if backward else "fwd", kernel=_rotary_kernel, args=args, constexprs=constexprs,
                      configs=(Config(block_m, block_n, warps, 1),), grid=lambda c: (b * s, tensors))


def example_plans(tokens: int, hq: int, hk: int, d: int, dtype: torch.dtype, device="meta") -> List[Tuple[str, LaunchPlan]]:
    """[(pass, LaunchPlan)] of a forward and backward on q (1, tokens, hq, d), k (1, tokens, hk, d) with
    Hugging Face-style (1, tokens, d) tables, as the op makes them (for ``fastgpt inspect``)."""
    q = torch.empty(1, tokens, hq, d, dtype=dtype, device=device)
    k = torch.empty(1, tokens, hk, d, dtype=dtype, device=device)
    cos = torch.empty(1, tokens, d, dtype=dtype, device=device)
    halves = (cos[..., : d // 2], cos[..., : d // 2], cos[..., d // 2 :], cos[..., d // 2 :])
    return [(p, plan(q, k, torch.empty_like(q), torch.empty_like(k), *halves, False, p == "bwd")) for p in ("fwd", "bwd")]


def unsupported_reason(x: Tensor) -> Optional[str]:
    if x.dtype not in SUPPORTED_DTYPES:
        return f"dtype {x.dtype} is not supported by the triton kernel (float16, bfloat16, float32)"
    return None


def apply(q: Tensor, k: Optional[Tensor], out_q: Tensor, out_k: Optional[Tensor], cos1: Tensor, sin1: Tensor, cos2: Tensor,
          sin2: Tensor, interleaved: bool, backward: bool) -> None:
    """Write out_q (and out_k) from q (and k); see the module docstring."""
    with on_device(q):
        launch(plan(q, k, out_q, out_k, cos1, sin1, cos2, sin2, interleaved, backward))
