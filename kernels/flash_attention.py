"""FlashAttention-2 in Triton: forward and backward, any lengths, GQA, causal (bottom-right), any strides.

The ``triton`` backend of :mod:`fastgpt.ops.attention`, through three functions::

    unsupported_reason(q, k, v) -> str | None
    forward(q, k, v, out, lse, is_causal, scale, *, window, softcap, alibi_slopes) -> None
    backward(dout, q, k, v, out, lse, dlse, dq, dk, dv, is_causal, scale, deterministic=True, *, window, softcap,
             alibi_slopes) -> None

and of :mod:`fastgpt.ops.varlen_attention` (packed sequences, flash-attn's varlen layout) through
``varlen_unsupported_reason``, ``varlen_forward`` and ``varlen_backward``: the same kernels with the
``VARLEN`` constexpr, one launch per pass for the whole batch. Each program takes its sequence b
from the grid and reads its first token and length from the int32 cu_seqlens (``_seq_span``) before
the bound logic, which then sees that sequence's Sq and Sk; packed (T, H, D) tensors are passed with
their token stride as the batch stride, so a sequence starts at cu_seqlens[b] x that stride. The
grid has cdiv(max_seqlen, BLOCK) tiles per sequence; tiles past a sequence's end exit at once.

Tensors are logical (B, H, S, D) views with arbitrary strides (every stride is passed to the
kernels; nothing is copied or transposed): q (B, Hq, Sq, D), k (B, Hk, Sk, D), v (B, Hk, Sk, Dv),
out/dout (B, Hq, Sq, Dv), lse/dlse (B, Hq, Sq) float32 natural-log. Hq % Hk == 0 and query head h
reads kv head h // (Hq // Hk). float16 / bfloat16 / float32 inputs, float32 accumulation; float32
dots are exact ("ieee"), not TF32, so float32 results stay within the parity rule against torch.

Semantics (those of :func:`fastgpt.reference.attention_forward`): query i sees key j iff
j <= i + Sk - Sq when causal, and i + Sk - Sq - left <= j <= i + Sk - Sq + right with a sliding
window (flash-attn's ``window_size``; -1 unbounded; causal means right = 0); rows that see no key
give out = 0, lse = -inf, zero gradients. Optional, as in flash-attn: ``softcap`` c > 0 replaces the
scaled score s by c * tanh(s / c), then ALiBi adds -slope * |i + Sk - Sq - j|. Each of the three is
a constexpr (WINDOW, SOFTCAP, ALIBI): with all off the kernels compile to the dense code.

Kernels (FlashAttention-2, Dao 2023):

* ``_attn_fwd_kernel``: one program per (Q tile, batch, head); online softmax over K/V tiles in the
  exp2 domain (log2(e) folded into the scale); key tiles wholly above the causal diagonal (or outside
  every row's window) are never visited, tiles wholly visible run without masks, only the diagonal /
  window-edge / ragged-end tiles mask. A window of w keys costs ~Sq x (w + tiles), not Sq x Sk.
* ``_attn_bwd_preprocess_kernel``: delta = rowsum(dO * O) - dlse and the log2-domain lse.
* ``_attn_bwd_dkdv_kernel``: one program per (K tile, batch, kv head); loops over the query heads of
  its GQA group and their Q tiles, so the group's gradients are summed in registers (no atomics).
* ``_attn_bwd_dq_kernel``: one program per (Q tile, batch, head); loops over K/V tiles.

By default everything is deterministic: each output element is written by one program with a fixed
loop order, so two runs with the same config are bitwise equal. (On a GPU the config is tuned once per
process and shape class; see :func:`kernels._triton_utils.pick_config`.) ``deterministic=False`` is
FlashAttention-2's own backward: the dK/dV kernel (ATOMIC_DQ) also computes each tile's dS K and adds
it into a float32 dQ buffer with atomics (laid out as the scratch rows x D: packed sequences work the
same way), so there is no dQ kernel and its recomputation of S and dP
(5 matmuls per tile instead of 7), and ``_attn_bwd_dq_convert_kernel`` scales and casts the sums. The
order of the atomic adds, and so dq's last bits, varies from run to run; dk and dv do not change.

Head dims are padded to a power of two >= 16 inside the kernel (masks, no padded copies), which is
also what lets D < 16 and D = 40, 80, 96 run. Each launch is described by a
:class:`~kernels._triton_utils.LaunchPlan` from one of the ``*_plan`` functions, which the launchers
here and the offline kernel report both use; the tile configs are plain data in
:mod:`fastgpt.kernels.flash_attention_configs`. The @triton.jit code is in
:mod:`fastgpt.kernels.flash_attention_kernels` (the kernels) and
:mod:`fastgpt.kernels.flash_attention_tiles` (their building blocks); this module turns tensors into
their launches.
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import Dict, List, NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from fastgpt.ops.attention import MAX_HEAD_DIM  # one limit: the op validates calls against it

from ._triton_utils import Config, LaunchPlan, ceil_div, interpreter_active, launch, length_bucket, next_pow2, pick_config
from .flash_attention_kernels import (
    _attn_fwd_kernel,
    _attn_bwd_preprocess_kernel,
    _attn_bwd_dkdv_kernel,
    _attn_bwd_dq_kernel,
    _attn_bwd_dq_convert_kernel,
)
from .flash_attention_configs import (  # noqa: F401  (re-exported: the configs are part of this kernel's interface)
    ARCH_CONFIGS,
    CONFIGS,
    CONFIGS_FP32,
    CONFIGS_SM90,
    DECODE_CONFIGS,
    DECODE_MAX_SQ,
    INTERPRETER_CONFIGS,
    configs_for,
    default_configs,
    head_dim_bucket,
)


__all__ = [
    "unsupported_reason",
    "forward",
    "backward",
    "varlen_unsupported_reason",
    "varlen_forward",
    "varlen_backward",
    "Seqs",
    "CONFIGS",
    "CONFIGS_FP32",
    "INTERPRETER_CONFIGS",
    "DECODE_CONFIGS",
    "DECODE_MAX_SQ",
    "head_dim_bucket",
    "configs_for",
    "default_configs",
    "CONFIGS_SM90",
    "ARCH_CONFIGS",
    "forward_plan",
    "backward_plans",
    "example_plans",
]

LOG2E = 1.4426950408889634
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

def _arch(t: Tensor) -> Optional[int]:
    """Compute capability x 10 of a CUDA tensor's device (None elsewhere: meta and CPU tensors)."""
    if t.device.type != "cuda" or interpreter_active():
        return None
    major, minor = _capability(t.device.index if t.device.index is not None else torch.cuda.current_device())
    return major * 10 + minor


def _preprocess_block_m(block_dv: int) -> int:
    # ~64 elements of each of O and dO per thread (4 warps), whatever the head dim (also the dQ conversion's rows)
    return max(16, min(128, 8192 // block_dv))


# launch plans: the one place that turns tensors into kernel arguments
# --------------------------------------------------------------------------------------------


class Seqs(NamedTuple):
    """Packed sequences (flash-attn's varlen layout): int32 (B+1,) cu_seqlens of q and k, and the
    longest lengths, which size the grid (every sequence gets that many tiles; the extra ones exit)."""

    cu_q: Tensor
    cu_k: Tensor
    max_q: int
    max_k: int


def _strides(prefix: str, t: Tensor) -> Dict[str, int]:
    """Strides of a (B, H, S, D) tensor, or of a packed (T, H, D) one, whose "batch" stride is its
    token stride: the kernels offset a sequence by (its first token) x (that stride)."""
    if t.dim() == 3:
        return {f"{prefix}b": t.stride(0), f"{prefix}h": t.stride(1), f"{prefix}s": t.stride(0), f"{prefix}d": t.stride(2)}
    return {f"{prefix}{axis}": s for axis, s in zip("bhsd", t.stride())}


def _lse_strides(prefix: str, t: Tensor) -> Dict[str, int]:
    """Strides of a (B, H, S) log-sum-exp, or of a packed (H, T) one (batch stride = token stride)."""
    if t.dim() == 2:
        return {f"{prefix}b": t.stride(1), f"{prefix}h": t.stride(0), f"{prefix}s": t.stride(1)}
    return {f"{prefix}{axis}": s for axis, s in zip("bhs", t.stride())}


def _shape(q: Tensor, k: Tensor, seqs: Optional[Seqs]) -> Tuple[int, int, int, int, int]:
    """(B, Hq, Hk, Sq, Sk) of a call; packed: B sequences, the longest lengths."""
    if seqs is None:
        return q.shape[0], q.shape[1], k.shape[1], q.shape[2], k.shape[2]
    return seqs.cu_q.shape[0] - 1, q.shape[1], k.shape[1], seqs.max_q, seqs.max_k


def _seq_args(seqs: Optional[Seqs], q: Tensor, placeholder: Tensor) -> Dict[str, object]:
    """The kernels' packed-sequence arguments; dense calls pass a placeholder pointer (never read)."""
    if seqs is None:
        return {"CuQ": placeholder, "CuK": placeholder, "TQ": 0}
    return {"CuQ": seqs.cu_q, "CuK": seqs.cu_k, "TQ": q.shape[0]}


def _dot_precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32:
        return "ieee"
    if dtype == torch.bfloat16 and interpreter_active():
        return "bf16_via_fp32"
    return "tf32"  # ignored for 16-bit operands: they use the tensor cores' native format


def _stride_align(*tensors: Optional[Tensor]) -> int:
    """Largest power of two <= 16 dividing every row/head/batch stride of ``tensors``: the ALIGN hint.

    Triton only learns "divisible by 16" from an integer argument; a (B, H, S, 40) tensor has row
    stride 40, which is a multiple of 8 (16 bytes in 16-bit types), enough for vector loads."""
    align = 16
    for t in tensors:
        if t is not None:
            for s in t.stride()[:-1]:
                align = math.gcd(align, s)
    return align


def _common_constexprs(q: Tensor, v: Tensor, is_causal: bool, *tensors: Tensor) -> Dict[str, object]:
    d, dv = q.shape[-1], v.shape[-1]
    return {
        "IS_CAUSAL": bool(is_causal),
        "HEAD_DIM": d,
        "HEAD_DIM_V": dv,
        "BLOCK_D": max(16, next_pow2(d)),
        "BLOCK_DV": max(16, next_pow2(dv)),
        "DOT_PRECISION": _dot_precision(q.dtype),
        "ALIGN": _stride_align(q, v, *tensors),
    }


def _feature_args(sq: int, sk: int, is_causal: bool, window: Tuple[int, int], softcap: float,
                  alibi_slopes: Optional[Tensor], placeholder: Tensor) -> Tuple[Dict[str, object], Dict[str, object]]:
    """(runtime args, constexprs) of the sliding window, softcap and ALiBi: the kernels' trailing arguments.

    ``window`` is flash-attn's (left, right), -1 unbounded; when causal the right bound is the causal
    one (right = 0). A side that cannot bind becomes Sq + Sk (the plan's, the longest with packed
    sequences; the masks stay plain comparisons, and WINDOW is off when neither side binds).
    ``placeholder`` stands in for absent slopes (never read)."""
    never = sq + sk
    left, right = window
    left = never if left < 0 else min(left, never)
    right = 0 if is_causal else (never if right < 0 else min(right, never))
    alibi = alibi_slopes if alibi_slopes is not None else placeholder
    args = {"Alibi": alibi, "sab": alibi.stride(0) if alibi.dim() == 2 else 0, "sah": alibi.stride(-1),
            "win_left": left, "win_right": right, "softcap2": float(softcap) * LOG2E}
    window_on = left < never or (not is_causal and right < never)
    constexprs = {"WINDOW": window_on, "SOFTCAP": softcap > 0, "ALIBI": alibi_slopes is not None}
    return args, constexprs


def _tune_key(q: Tensor, k: Tensor, v: Tensor, is_causal: bool, sq: int, sk: int, varlen: bool,
              features: Tuple[bool, ...] = ()):
    return (
        q.dtype,
        q.device.index,
        q.shape[-1],
        v.shape[-1],
        bool(is_causal),
        q.shape[1] // k.shape[1] > 1,
        length_bucket(sq),
        length_bucket(sk),
        varlen,
        *features,
    )


def _grid(rows: int, programs: int, tiles_of: str):
    """Grid of ``programs`` x (tiles of ``rows``), flattened into axis 0 (no 65535 limit on B*H)."""

    def grid(config: Config) -> Tuple[int]:
        return (ceil_div(rows, getattr(config, tiles_of)) * programs,)

    return grid


def forward_plan(q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, is_causal: bool, scale: float,
                 arch: Optional[int] = None, seqs: Optional[Seqs] = None, *, window: Tuple[int, int] = (-1, -1),
                 softcap: float = 0.0, alibi_slopes: Optional[Tensor] = None) -> LaunchPlan:
    """The launch of the forward kernel for these tensors (shapes and options as in :func:`forward`, or
    packed as in :func:`varlen_forward` with ``seqs``); its candidate configs are those of ``arch``
    (default: q's GPU; see :func:`configs_for`)."""
    arch = arch if arch is not None else _arch(q)
    b, hq, hk, sq, sk = _shape(q, k, seqs)
    feature_args, features = _feature_args(sq, sk, is_causal, window, softcap, alibi_slopes, lse)
    constexprs = {**_common_constexprs(q, v, is_causal, k, out), "VARLEN": seqs is not None, **features}
    args = {
        "Q": q, "K": k, "V": v, "Out": out, "Lse": lse,
        **_strides("sq", q), **_strides("sk", k), **_strides("sv", v), **_strides("so", out), **_lse_strides("sl", lse),
        "Hq": hq, "GROUP": hq // hk, "Sq": sq, "Sk": sk, "qk_scale": float(scale) * LOG2E, **feature_args,
    }
    args.update({name: value for name, value in _seq_args(seqs, q, lse).items() if name != "TQ"})
    return LaunchPlan(
        name="fwd", kernel=_attn_fwd_kernel, args=args, constexprs=constexprs,
        configs=configs_for("fwd_decode" if sq <= DECODE_MAX_SQ else "fwd", head_dim_bucket(q.shape[-1], v.shape[-1]), q.dtype,
                            arch=arch),
        grid=_grid(sq, b * hq, "block_m"),
        tune_key=_tune_key(q, k, v, is_causal, sq, sk, seqs is not None, tuple(features.values())),
    )


def backward_plans(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, dlse: Optional[Tensor],
    dq: Tensor, dk: Tensor, dv: Tensor, is_causal: bool, scale: float, arch: Optional[int] = None,
    seqs: Optional[Seqs] = None,
    deterministic: bool = True, *,
    window: Tuple[int, int] = (-1, -1), softcap: float = 0.0, alibi_slopes: Optional[Tensor] = None,
) -> List[LaunchPlan]:
    """The three launches of the backward (preprocess, dK/dV, dQ), in order, with ``arch``'s configs
    (default: q's GPU); packed tensors with ``seqs``. Allocates the float32 scratch buffers delta and
    lse2 that connect them: (B, Hq, Sq), or (Hq, total_q) packed.
    With ``deterministic=False``: preprocess, the dK/dV kernel that also adds dQ into a zeroed float32
    buffer laid out as the scratch rows x D ((B, Hq, Sq, D), or (Hq, total_q, D) packed) with atomics
    ("bwd_dkdv_atomic"), and its conversion to dq ("bwd_dq_convert"); that buffer (args["DQacc"]) is
    allocated here and must be zeroed right before its launch (see backward)."""
    arch = arch if arch is not None else _arch(q)
    b, hq, hk, sq, sk = _shape(q, k, seqs)
    d, dv_dim = q.shape[-1], v.shape[-1]
    varlen = seqs is not None
    feature_args, features = _feature_args(sq, sk, is_causal, window, softcap, alibi_slopes, lse)
    constexprs = {**_common_constexprs(q, v, is_causal, k, out, dout, dq, dk, dv), "VARLEN": varlen, **features}
    bucket = head_dim_bucket(d, dv_dim)
    tune_key = _tune_key(q, k, v, is_causal, sq, sk, varlen, tuple(features.values()))
    delta = torch.empty(*((hq, q.shape[0]) if varlen else (b, hq, sq)), dtype=torch.float32, device=q.device)
    lse2 = torch.empty_like(delta)
    seq_args = _seq_args(seqs, q, lse)

    block_dv = constexprs["BLOCK_DV"]
    pre_block = INTERPRETER_CONFIGS["fwd"].block_m if interpreter_active() else _preprocess_block_m(block_dv)
    dlse_t = dlse if dlse is not None else lse  # a placeholder pointer, never read when HAS_DLSE is False
    pre = LaunchPlan(
        name="bwd_preprocess", kernel=_attn_bwd_preprocess_kernel,
        args={
            "Out": out, "DOut": dout, "Lse": lse, "DLse": dlse_t, "Delta": delta, "Lse2": lse2,
            **_strides("so", out), **_strides("sdo", dout), **_lse_strides("sl", lse), **_lse_strides("sdl", dlse_t),
            "Hq": hq, "Sq": sq, "CuQ": seq_args["CuQ"], "TQ": seq_args["TQ"],
        },
        constexprs={"HAS_DLSE": dlse is not None, "VARLEN": varlen, "HEAD_DIM_V": dv_dim, "BLOCK_DV": block_dv,
                    "ALIGN": constexprs["ALIGN"]},
        configs=(Config(pre_block, 0, 4, 1),),
        grid=_grid(sq, b * hq, "block_m"),
    )
    common = {
        "Q": q, "K": k, "V": v, "DOut": dout, "Lse2": lse2, "Delta": delta,
        **_strides("sq", q), **_strides("sk", k), **_strides("sv", v), **_strides("sdo", dout),
    }
    scales = {"scale": float(scale), "qk_scale": float(scale) * LOG2E, **feature_args}
    # (deterministic: DQacc is a placeholder pointer, never read, and the kernel compiles as without it)
    dq_acc = delta if deterministic else torch.empty(*delta.shape, d, dtype=torch.float32, device=q.device)
    dkdv = LaunchPlan(
        name="bwd_dkdv" if deterministic else "bwd_dkdv_atomic", kernel=_attn_bwd_dkdv_kernel,
        args={**common, "DK": dk, "DV": dv, **_strides("sdk", dk), **_strides("sdv", dv),
              "Hk": hk, "GROUP": hq // hk, "Sq": sq, "Sk": sk, **scales, **seq_args, "DQacc": dq_acc},
        constexprs={**constexprs, "ATOMIC_DQ": not deterministic},
        configs=configs_for("bwd_dkdv" if deterministic else "bwd_dkdv_atomic", bucket, q.dtype, arch=arch),
        grid=_grid(sk, b * hk, "block_n"), tune_key=tune_key,
    )
    if not deterministic:
        block_d = constexprs["BLOCK_D"]
        convert = LaunchPlan(
            name="bwd_dq_convert", kernel=_attn_bwd_dq_convert_kernel,
            args={"DQacc": dq_acc, "DQ": dq, **_strides("sdq", dq), "Hq": hq, "Sq": sq, "scale": float(scale),
                  "CuQ": seq_args["CuQ"], "TQ": seq_args["TQ"]},
            constexprs={"HEAD_DIM": d, "BLOCK_D": block_d, "ALIGN": _stride_align(dq),
                        "RTNE_IN_SOFTWARE": interpreter_active(), "VARLEN": varlen},
            configs=(Config(INTERPRETER_CONFIGS["fwd"].block_m if interpreter_active() else _preprocess_block_m(block_d), 0, 4, 1),),
            grid=_grid(sq, b * hq, "block_m"),
        )
        return [pre, dkdv, convert]
    dq_plan = LaunchPlan(
        name="bwd_dq", kernel=_attn_bwd_dq_kernel,
        args={**common, "DQ": dq, **_strides("sdq", dq), "Hq": hq, "GROUP": hq // hk, "Sq": sq, "Sk": sk, **scales,
              **seq_args},
        constexprs=constexprs, configs=configs_for("bwd_dq", bucket, q.dtype, arch=arch),
        grid=_grid(sq, b * hq, "block_m"), tune_key=tune_key,
    )
    return [pre, dkdv, dq_plan]


def example_plans(q: Tensor, k: Tensor, v: Tensor, is_causal: bool, scale: Optional[float] = None,
                  arch: Optional[int] = None, seqs: Optional[Seqs] = None, deterministic: bool = True, *,
                  window: Tuple[int, int] = (-1, -1), softcap: float = 0.0, alibi: bool = False) -> List[LaunchPlan]:
    """Every launch of a forward + backward on tensors shaped like q, k, v (meta tensors work);
    packed (T, H, D) tensors with ``seqs``.

    Outputs are allocated like the op layer does (contiguous); ``arch`` picks the candidate configs
    (meta tensors have no GPU: None gives the generic list); ``window``, ``softcap`` and ``alibi``
    (slopes of shape (Hq,)) pick the variant. For the kernel report: compile each plan with each of
    its configs via :func:`fastgpt.tools.inspect.compiling.compile_plan`.
    """
    d = q.shape[-1]
    scale = scale if scale is not None else d ** -0.5
    out = torch.empty(*q.shape[:-1], v.shape[-1], dtype=q.dtype, device=q.device)
    lse_shape = (q.shape[1], q.shape[0]) if seqs is not None else q.shape[:-1]
    lse = torch.empty(*lse_shape, dtype=torch.float32, device=q.device)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    opts = {"window": window, "softcap": softcap,
            "alibi_slopes": torch.empty(q.shape[1], dtype=torch.float32, device=q.device) if alibi else None}
    fwd = forward_plan(q, k, v, out, lse, is_causal, scale, arch, seqs, **opts)
    return [fwd, *backward_plans(torch.empty_like(out), q, k, v, out, lse, None, dq, dk, dv, is_causal, scale, arch, seqs,
                                 deterministic, **opts)]


# --------------------------------------------------------------------------------------------
# the backend interface
# --------------------------------------------------------------------------------------------


def _in_head_extent(t: Tensor) -> int:
    """Largest element offset inside one (batch, head) slice: the kernels index it with int32."""
    return sum((n - 1) * s for n, s in zip(t.shape[2:], t.stride()[2:]))


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> Tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def unsupported_reason(q: Tensor, k: Tensor, v: Tensor) -> Optional[str]:
    """Why the kernel cannot take this call, or None. (Shapes and devices are validated upstream.)"""
    if q.dtype not in SUPPORTED_DTYPES:
        return f"dtype {q.dtype} is not supported by the triton kernel (float16, bfloat16, float32)"
    if max(q.shape[-1], v.shape[-1]) > MAX_HEAD_DIM:
        return f"head dim {max(q.shape[-1], v.shape[-1])} exceeds the kernel's {MAX_HEAD_DIM}"
    if q.device.type == "cuda":
        major, minor = _capability(q.device.index if q.device.index is not None else torch.cuda.current_device())
        if major < 8:
            return f"the triton kernel needs compute capability 8.0 (Ampere) or newer; this GPU has {major}.{minor}"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if _in_head_extent(t) >= 2**31:
            return f"{name} spans more than 2**31 elements within one (batch, head) slice (32-bit in-kernel offsets)"
    return None


def forward(q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, is_causal: bool, scale: float, *,
            window: Tuple[int, int] = (-1, -1), softcap: float = 0.0, alibi_slopes: Optional[Tensor] = None) -> None:
    """Write ``out`` (B, Hq, Sq, Dv) in q's dtype and ``lse`` (B, Hq, Sq) float32 (natural log).

    q (B, Hq, Sq, D), k (B, Hk, Sk, D), v (B, Hk, Sk, Dv), any strides; Sq, Sk >= 1. ``window`` (left,
    right; -1 unbounded; right is 0 when causal), ``softcap`` (0: off) and ``alibi_slopes`` ((Hq,) or
    (B, Hq) float32 on q's device, or None) as flash-attn defines them (validated upstream).
    """
    with _on_device(q):
        launch(forward_plan(q, k, v, out, lse, is_causal, scale, window=window, softcap=softcap, alibi_slopes=alibi_slopes))


def backward(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, dlse: Optional[Tensor],
    dq: Tensor, dk: Tensor, dv: Tensor, is_causal: bool, scale: float, deterministic: bool = True, *,
    window: Tuple[int, int] = (-1, -1), softcap: float = 0.0, alibi_slopes: Optional[Tensor] = None,
) -> None:
    """Write dq, dk, dv (shapes of q, k, v; any strides) from dout (shape of out) and ``dlse``
    (None or (B, Hq, Sq), the gradient flowing into lse); options as in :func:`forward` (the slopes
    get no gradient). GQA gradients are summed over each kv head's query heads inside the dK/dV
    kernel. Deterministic by default; ``deterministic=False`` computes dQ in the dK/dV kernel with
    float32 atomics (5 matmuls per tile instead of 7; dq's rounding varies from run to run, dk and dv
    stay bitwise reproducible)."""
    with _on_device(q):
        _launch_backward(backward_plans(dout, q, k, v, out, lse, dlse, dq, dk, dv, is_causal, scale,
                                        deterministic=deterministic, window=window, softcap=softcap,
                                        alibi_slopes=alibi_slopes))


def _launch_backward(plans: List[LaunchPlan]) -> None:
    for plan in plans:
        if plan.name == "bwd_dkdv_atomic":
            pick_config(plan)  # a first call may tune: those runs add into DQacc too, so zero it after
            plan.args["DQacc"].zero_()
        launch(plan)


def varlen_unsupported_reason(q: Tensor, k: Tensor, v: Tensor, max_seqlen_q: int, max_seqlen_k: int) -> Optional[str]:
    """:func:`unsupported_reason` for packed q (Tq, Hq, D), k (Tk, Hk, D), v (Tk, Hk, Dv): judged on
    the (1, H, S, D) view of the longest sequence each may hold."""
    views = (t[:n].transpose(0, 1).unsqueeze(0) for t, n in ((q, max_seqlen_q), (k, max_seqlen_k), (v, max_seqlen_k)))
    return unsupported_reason(*views)


def _seqs(cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, max_seqlen_q: int, max_seqlen_k: int) -> Seqs:
    # the kernels read cu[b] at offset b: a strided cu_seqlens is copied (B + 1 ints)
    return Seqs(cu_seqlens_q.contiguous(), cu_seqlens_k.contiguous(), int(max_seqlen_q), int(max_seqlen_k))


def varlen_forward(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, max_seqlen_q: int,
                   max_seqlen_k: int, out: Tensor, lse: Tensor, is_causal: bool, scale: float, *,
                   window: Tuple[int, int] = (-1, -1), softcap: float = 0.0, alibi_slopes: Optional[Tensor] = None) -> None:
    """Packed sequences, one launch: write ``out`` (Tq, Hq, Dv) and ``lse`` (Hq, Tq) float32.

    q (Tq, Hq, D), k (Tk, Hk, D), v (Tk, Hk, Dv), any strides; sequence b is rows
    cu_seqlens_q[b]:cu_seqlens_q[b+1] of q (int32, validated upstream) and likewise of k and v;
    max_seqlen_* at least the longest sequence, >= 1. Options as in :func:`forward`, per sequence
    (alibi_slopes (B, Hq): row b is sequence b's)."""
    seqs = _seqs(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    with _on_device(q):
        launch(forward_plan(q, k, v, out, lse, is_causal, scale, seqs=seqs, window=window, softcap=softcap,
                            alibi_slopes=alibi_slopes))


def varlen_backward(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, dlse: Optional[Tensor],
    dq: Tensor, dk: Tensor, dv: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, max_seqlen_q: int,
    max_seqlen_k: int, is_causal: bool, scale: float, deterministic: bool = True, *,
    window: Tuple[int, int] = (-1, -1), softcap: float = 0.0, alibi_slopes: Optional[Tensor] = None,
) -> None:
    """:func:`backward` for packed sequences (layouts and options as in :func:`varlen_forward`; dlse None
    or (Hq, Tq)); ``deterministic=False`` as there (the float32 dQ sums are (Hq, Tq, D))."""
    seqs = _seqs(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    with _on_device(q):
        _launch_backward(backward_plans(dout, q, k, v, out, lse, dlse, dq, dk, dv, is_causal, scale, seqs=seqs,
                                        deterministic=deterministic, window=window, softcap=softcap,
                                        alibi_slopes=alibi_slopes))


def _on_device(t: Tensor):
    """Triton launches on the current CUDA device: make it the tensors' (they may be on cuda:1)."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()
