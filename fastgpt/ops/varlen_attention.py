"""Packed (variable-length) attention: flash-attn's ``flash_attn_varlen_func`` and its packed-qkv/kv forms.

A batch of B sequences of different lengths is stored without padding: q (total_q, Hq, D), k
(total_k, Hk, D), v (total_k, Hk, Dv); sequence b is tokens ``cu_seqlens_q[b]:cu_seqlens_q[b+1]`` of
q and ``cu_seqlens_k[b]:cu_seqlens_k[b+1]`` of k and v (int32 (B+1,) prefix sums starting at 0).
Each sequence attends only to its own keys, with the causal mask bottom-right aligned within it
(query i of a sequence sees its key j iff j <= i + Sk_b - Sq_b), as in :mod:`fastgpt.ops.attention`.

The ``triton`` backend runs the flash-attention kernels of :mod:`fastgpt.kernels.flash_attention`
with one launch per pass for the whole batch (no per-sequence loop, no padded copies); the
reference loops over the sequences (:func:`fastgpt.reference.varlen_attention_forward`).
"""

import functools
import importlib.util
import operator
import weakref
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor

from fastgpt import backends, reference
from fastgpt.ops._attention_options import AttentionOptions, check_options
from fastgpt.ops._checks import check_same_device, check_tensor, is_compiling
from fastgpt.ops._define import FastgptOp
from fastgpt.ops.attention import _backend_options, _check_qkv, _default_scale, _torch_sdpa, _torch_sdpa_fallback, attention_flops
from fastgpt.registry import OpCases, OpSpec, register

__all__ = ["flash_attn_varlen_func", "flash_attn_varlen_qkvpacked_func", "flash_attn_varlen_kvpacked_func"]

_KERNEL_MODULE = "fastgpt.kernels.flash_attention"
_FN = "fastgpt.flash_attn_varlen_func"


# --------------------------------------------------------------------------------------------
# the op: kernel or reference, forward and backward
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _kernel_present() -> bool:
    return importlib.util.find_spec(_KERNEL_MODULE) is not None


def _constraint(q: Tensor, k: Tensor, v: Tensor, max_seqlen_q: int, max_seqlen_k: int):
    def why_not(backend: str) -> Optional[str]:
        if backend != "triton":
            return None
        if not _kernel_present():
            return "the triton flash-attention kernel is not part of this build"
        from fastgpt.kernels import flash_attention

        unsupported = getattr(flash_attention, "varlen_unsupported_reason", None)
        if unsupported is None:
            return "this build's triton flash-attention kernel does not take packed sequences"
        return unsupported(q, k, v, max_seqlen_q, max_seqlen_k)

    return why_not


def _backend_for(q: Tensor, k: Tensor, v: Tensor, max_seqlen_q: int, max_seqlen_k: int) -> str:
    if q.numel() == 0 or k.numel() == 0:
        return "reference"  # nothing to compute (every row sees no key): no launch, no fallback to report
    return backends.select("varlen_attention", q.device, _constraint(q, k, v, max_seqlen_q, max_seqlen_k))


def _alloc_forward(q: Tensor, v: Tensor) -> Tuple[Tensor, Tensor]:
    out = torch.empty(q.shape[0], q.shape[1], v.shape[-1], dtype=q.dtype, device=q.device)
    lse = torch.empty(q.shape[1], q.shape[0], dtype=reference.stats_dtype(q.dtype), device=q.device)
    return out, lse


def _varlen_fwd(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, max_seqlen_q: int,
                max_seqlen_k: int, is_causal: bool, scale: float, deterministic: bool = True, window_left: int = -1,
                window_right: int = -1, softcap: float = 0.0, alibi_slopes: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    # (deterministic is the backward's: an input here so that setup_context can hand it on)
    opts = _backend_options(window_left, window_right, softcap, alibi_slopes)
    if _backend_for(q, k, v, max_seqlen_q, max_seqlen_k) == "triton":
        from fastgpt.kernels import flash_attention

        out, lse = _alloc_forward(q, v)
        flash_attention.varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, out, lse,
                                       is_causal, scale, **opts)
        return out, lse
    return reference.varlen_attention_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, is_causal, scale, **opts)


def _varlen_fwd_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, is_causal, scale, deterministic=True,
                     window_left=-1, window_right=-1, softcap=0.0, alibi_slopes=None):
    return _alloc_forward(q, v)


def _varlen_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, dlse: Optional[Tensor],
                cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, max_seqlen_q: int, max_seqlen_k: int, is_causal: bool,
                scale: float, deterministic: bool = True, window_left: int = -1, window_right: int = -1,
                softcap: float = 0.0, alibi_slopes: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
    opts = _backend_options(window_left, window_right, softcap, alibi_slopes)
    if _backend_for(q, k, v, max_seqlen_q, max_seqlen_k) == "triton":
        from fastgpt.kernels import flash_attention

        dq, dk, dv = (torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))
        flash_attention.varlen_backward(dout, q, k, v, out, lse, dlse, dq, dk, dv, cu_seqlens_q, cu_seqlens_k,
                                        max_seqlen_q, max_seqlen_k, is_causal, scale, deterministic, **opts)
        return dq, dk, dv
    return reference.varlen_attention_backward(dout, q, k, v, out, lse, dlse, cu_seqlens_q, cu_seqlens_k, is_causal, scale,
                                               **opts)


def _varlen_bwd_fake(dout, q, k, v, out, lse, dlse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, is_causal, scale,
                     deterministic=True, window_left=-1, window_right=-1, softcap=0.0, alibi_slopes=None):
    return tuple(torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))


def _setup_context(ctx, inputs, output):
    q, k, v, cu_q, cu_k, max_q, max_k, is_causal, scale, deterministic, window_left, window_right, softcap, alibi_slopes = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k, alibi_slopes)
    ctx.max_q, ctx.max_k, ctx.is_causal, ctx.scale, ctx.deterministic = max_q, max_k, is_causal, scale, deterministic
    ctx.window, ctx.softcap = (window_left, window_right), softcap


def _backward(ctx, varlen_bwd, dout, dlse):
    none = (None,) * 11  # cu_seqlens, max_seqlen, is_causal, scale, deterministic, the options
    if dout is None and dlse is None:
        return (None, None, None) + none
    q, k, v, out, lse, cu_q, cu_k, alibi_slopes = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv = varlen_bwd(dout, q, k, v, out, lse, dlse, cu_q, cu_k, ctx.max_q, ctx.max_k, ctx.is_causal, ctx.scale,
                            ctx.deterministic, *ctx.window, ctx.softcap, alibi_slopes)
    return (dq, dk, dv) + none


_varlen = FastgptOp("varlen_attention", _varlen_fwd, _varlen_bwd, _varlen_fwd_fake, _varlen_bwd_fake, _setup_context, _backward)


# --------------------------------------------------------------------------------------------
# validation: every check before anything is launched
# --------------------------------------------------------------------------------------------

# cu_seqlens facts already read from the device, by tensor (id, checked alive by weakref) and version:
# a model passes the same cu_seqlens to every layer, and each read is a device-to-host sync
_FACTS: Dict[int, Tuple[weakref.ref, int, Tuple[int, int, int, int]]] = {}


def _version(t: Tensor) -> Optional[int]:
    try:
        return t._version
    except RuntimeError:  # inference tensors have no version counter: never cached
        return None


def _cu_facts(cu: Tensor) -> Tuple[int, int, int, int]:
    """(first, smallest step, last, largest step) of a cu_seqlens tensor: one device-to-host read."""
    key, version = id(cu), _version(cu)
    hit = _FACTS.get(key)
    if hit is not None and version is not None and hit[0]() is cu and hit[1] == version:
        return hit[2]
    c = cu.long()  # steps of int32 values can overflow int32
    if c.numel() == 1:
        first = int(c[0])
        facts = (first, 0, first, 0)
    else:
        steps = c[1:] - c[:-1]
        facts = tuple(int(x) for x in torch.stack([c[0], steps.min(), c[-1], steps.max()]).tolist())
    if version is not None:
        if len(_FACTS) >= 64:
            for dead in [i for i, (ref, _, _) in _FACTS.items() if ref() is None] or list(_FACTS):
                del _FACTS[dead]
        _FACTS[key] = (weakref.ref(cu), version, facts)
    return facts


def _check_cu(fn: str, name: str, cu: object, q: Tensor, total: int, max_name: str, max_seqlen: int) -> int:
    """cu_seqlens: int32, 1-D, on q's device, 0 first, non-decreasing, ``total`` last, steps <= max_seqlen.
    Returns the batch size B."""
    if not isinstance(cu, Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor; got {type(cu).__name__}")
    if cu.dtype != torch.int32:
        raise ValueError(f"{fn}: {name} must be an int32 tensor; got {cu.dtype}")
    if cu.dim() != 1 or cu.numel() < 1:
        raise ValueError(f"{fn}: {name} must be 1-D of length B + 1 >= 1; got shape {tuple(cu.shape)}")
    check_same_device(fn, q=q, **{name: cu})
    if is_compiling():
        return cu.numel() - 1  # values are data: not read while tracing (a graph break); checked in eager calls
    first, min_step, last, max_step = _cu_facts(cu)
    if first != 0:
        raise ValueError(f"{fn}: {name} must start at 0; got {first}")
    if min_step < 0:
        raise ValueError(f"{fn}: {name} must be non-decreasing (sequence lengths >= 0); a step is {min_step}")
    if last != total:
        raise ValueError(f"{fn}: {name} must end at the number of tokens, {total}; got {last}")
    if max_step > max_seqlen:
        raise ValueError(f"{fn}: {max_name}={max_seqlen} is smaller than the longest sequence in {name} ({max_step})")
    return cu.numel() - 1


def _check_int(fn: str, name: str, value: object) -> int:
    if isinstance(value, bool):
        raise TypeError(f"{fn}: {name} must be an int; got {value!r}")
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{fn}: {name} must be an int; got {type(value).__name__}") from None
    if value < 0:
        raise ValueError(f"{fn}: {name} must be >= 0; got {value}")
    return value


def _validate(fn: str, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, causal, window_size,
              softcap, alibi_slopes, deterministic, return_attn_probs) -> AttentionOptions:
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(fn, name, t, ndim=(3,))
    # (T, H, D) as the (1, H, T, D) view the dense op checks: dtypes, devices, heads, head dims
    _check_qkv(fn, *(t.transpose(0, 1).unsqueeze(0) for t in (q, k, v)), allow_gqa=True)
    max_q = _check_int(fn, "max_seqlen_q", max_seqlen_q)
    max_k = _check_int(fn, "max_seqlen_k", max_seqlen_k)
    batch = _check_cu(fn, "cu_seqlens_q", cu_seqlens_q, q, q.shape[0], "max_seqlen_q", max_q)
    batch_k = _check_cu(fn, "cu_seqlens_k", cu_seqlens_k, q, k.shape[0], "max_seqlen_k", max_k)
    if batch_k != batch:
        raise ValueError(f"{fn}: cu_seqlens_k describes {batch_k} sequences but cu_seqlens_q {batch}; expected the same batch")
    if not isinstance(dropout_p, (int, float)) or isinstance(dropout_p, bool) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"{fn}: dropout_p must be a float in [0, 1); got {dropout_p!r}")
    opts = check_options(fn, q, causal, window_size, softcap, alibi_slopes, batch=batch)
    for name, flag in (("deterministic", deterministic), ("return_attn_probs", return_attn_probs)):
        if not isinstance(flag, bool):
            raise TypeError(f"{fn}: {name} must be a bool; got {flag!r}")
    if return_attn_probs and dropout_p > 0.0:
        raise ValueError(f"{fn}: return_attn_probs is not available with dropout_p > 0")
    if dropout_p > 0.0 and not opts.plain:  # the fallback (torch's SDPA) has none of them
        raise ValueError(f"{fn}: dropout_p > 0 cannot be combined with window_size, softcap or alibi_slopes")
    return opts


# --------------------------------------------------------------------------------------------
# the public functions
# --------------------------------------------------------------------------------------------


def _dropout_fallback(q, k, v, cu_q, cu_k, causal, scale, dropout_p):
    """dropout_p > 0: torch's SDPA per sequence (reported once as a fallback; an error in strict mode)."""
    pieces: List[Tensor] = []
    for q0, q1, k0, k1 in reference._spans(cu_q, cu_k):
        if q1 == q0 or k1 == k0:
            pieces.append(q.new_zeros(q1 - q0, q.shape[1], v.shape[-1]))
            continue
        seq = (t.transpose(0, 1).unsqueeze(0) for t in (q[q0:q1], k[k0:k1], v[k0:k1]))
        out = _torch_sdpa_fallback(*seq, None, dropout_p, causal, scale, "dropout_p > 0 is not supported by the kernels",
                                   op="varlen_attention")
        pieces.append(out[0].transpose(0, 1))
    return torch.cat(pieces) if pieces else q.new_zeros(0, q.shape[1], v.shape[-1])


def flash_attn_varlen_func(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_p: float = 0.0,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    window_size: Tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Optional[Tensor] = None,
    deterministic: bool = True,
    return_attn_probs: bool = False,
):
    """Drop-in for ``flash_attn.flash_attn_varlen_func``: attention over packed variable-length sequences.

    Args:
        q: (total_q, Hq, D) queries of all sequences, concatenated; float16, bfloat16, float32
            (float64: reference only). Any strides (views of a packed QKV tensor are read in place).
        k: (total_k, Hk, D) keys; Hk divides Hq (GQA: query head h uses kv head h // (Hq // Hk)).
        v: (total_k, Hk, Dv) values.
        cu_seqlens_q, cu_seqlens_k: int32 (B + 1,) on q's device: 0, then the running token counts
            (non-decreasing, last = total_q / total_k). Sequences may be empty, and Sq != Sk per
            sequence (the causal mask is bottom-right aligned in each; rows that see no key give 0).
        max_seqlen_q, max_seqlen_k: ints at least the longest sequence (they size the launch grid).
        dropout_p: > 0 runs torch's SDPA sequence by sequence, with a one-time FallbackWarning.
        softmax_scale: default 1/sqrt(D). causal: bottom-right causal mask per sequence.
        window_size, softcap, alibi_slopes: flash-attn's, within each sequence (see
            :func:`fastgpt.attention`): query i of a sequence sees its keys i + Sk_b - Sq_b - left ..
            i + Sk_b - Sq_b + right (-1 unbounded; causal sets right = 0); softcap c > 0 caps the scaled
            scores at c * tanh(s / c); alibi_slopes (Hq,) or (B, Hq) float32 (row b: sequence b's) add
            -slope * |i + Sk_b - Sq_b - j|. Not with dropout_p > 0.
        deterministic: True (the default): the backward is bitwise reproducible. False: the Triton
            backward computes dq inside the dK/dV kernel with float32 atomic adds (as
            :func:`fastgpt.attention`'s), so dq's rounding varies from run to run (dk, dv do not).
            flash-attn's default is False; fastgpt's is True.
        return_attn_probs: also return the log-sum-exp (see Returns). Not with dropout_p > 0.

    Returns:
        out (total_q, Hq, Dv) in q's dtype; with ``return_attn_probs``, ``(out, lse)`` where lse is
        the natural-log log-sum-exp of the scaled scores, (Hq, total_q) float32 (float64 for float64
        inputs), -inf for rows that see no key, and differentiable. flash-attn returns a third
        element (the dropout mask for testing, None without dropout); fastgpt returns two.

    Bad input (dtypes, shapes, cu_seqlens values, max_seqlen below the longest sequence) raises
    ValueError/TypeError naming the argument before anything runs. cu_seqlens values are read
    once per tensor (a device-to-host copy; cached while the tensor is unmodified), and not while
    torch.compile traces.
    """
    opts = _validate(_FN, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, causal, window_size,
                     softcap, alibi_slopes, deterministic, return_attn_probs)
    scale = _default_scale(softmax_scale, q.shape[-1])
    if dropout_p > 0.0:
        return _dropout_fallback(q, k, v, cu_seqlens_q, cu_seqlens_k, opts.causal, scale, float(dropout_p))
    out, lse = _varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, operator.index(max_seqlen_q), operator.index(max_seqlen_k),
                       opts.causal, scale, deterministic, *opts.window, opts.softcap, opts.alibi_slopes)
    return (out, lse) if return_attn_probs else out


def _unpack(fn: str, name: str, t: object, parts: int) -> Tuple[Tensor, ...]:
    check_tensor(fn, name, t, ndim=(4,))
    if t.shape[1] != parts:
        raise ValueError(f"{fn}: {name} must be (total, {parts}, H, D); got shape {tuple(t.shape)}")
    return t.unbind(1)  # views: nothing is copied


def flash_attn_varlen_qkvpacked_func(qkv: Tensor, cu_seqlens: Tensor, max_seqlen: int, dropout_p: float = 0.0,
                                     softmax_scale: Optional[float] = None, causal: bool = False,
                                     window_size: Tuple[int, int] = (-1, -1), softcap: float = 0.0,
                                     alibi_slopes: Optional[Tensor] = None, deterministic: bool = True,
                                     return_attn_probs: bool = False):
    """Drop-in for ``flash_attn.flash_attn_varlen_qkvpacked_func``: qkv (total, 3, H, D), one
    cu_seqlens for queries and keys; q, k and v are read in place as views. Otherwise as
    :func:`flash_attn_varlen_func`."""
    q, k, v = _unpack("fastgpt.flash_attn_varlen_qkvpacked_func", "qkv", qkv, 3)
    return flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, dropout_p, softmax_scale,
                                  causal, window_size, softcap, alibi_slopes, deterministic, return_attn_probs)


def flash_attn_varlen_kvpacked_func(q: Tensor, kv: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, max_seqlen_q: int,
                                    max_seqlen_k: int, dropout_p: float = 0.0, softmax_scale: Optional[float] = None,
                                    causal: bool = False, window_size: Tuple[int, int] = (-1, -1), softcap: float = 0.0,
                                    alibi_slopes: Optional[Tensor] = None, deterministic: bool = True,
                                    return_attn_probs: bool = False):
    """Drop-in for ``flash_attn.flash_attn_varlen_kvpacked_func``: kv (total_k, 2, Hk, D), read in
    place as views. Otherwise as :func:`flash_attn_varlen_func`."""
    k, v = _unpack("fastgpt.flash_attn_varlen_kvpacked_func", "kv", kv, 2)
    return flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                                  softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                                  return_attn_probs)


# --------------------------------------------------------------------------------------------
# registry entry: FLOP model, benchmark cases (varlen against padded SDPA), targets
# --------------------------------------------------------------------------------------------

DIMS = ("B", "H", "Smax", "D")


def length_mix(batch: int, max_len: int) -> List[int]:
    """The benchmarks' length mix: ``batch`` lengths spread over [max_len / 8, max_len] by golden-ratio
    steps (mean about 0.56 max_len, the first max_len): ragged as fine-tuning batches are."""
    lo = max(1, max_len // 8)
    return [max_len - round(((i * 0.6180339887498949) % 1.0) * (max_len - lo)) for i in range(batch)]


@functools.lru_cache(maxsize=16)
def mix_tensors(batch: int, max_len: int, device: str) -> Tuple[Tensor, Tensor]:
    """(cu_seqlens int32, (B, max_len) bool mask of real tokens) of :func:`length_mix` on ``device``."""
    lengths = torch.tensor(length_mix(batch, max_len))
    cu = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
    mask = torch.arange(max_len)[None, :] < lengths[:, None]
    return cu.to(device), mask.to(device)


def padded_sdpa(q: Tensor, k: Tensor, v: Tensor, batch: int, max_len: int, causal: bool) -> Tensor:
    """The peer: packed tokens padded to (B, H, Smax, D), torch's SDPA (key-padding mask, or its causal
    mask, which hides right padding from real rows), real rows gathered back: what a padded batch costs."""
    cu, mask = mix_tensors(batch, max_len, str(q.device))
    padded = []
    for t in (q, k, v):
        p = t.new_zeros(batch, max_len, *t.shape[1:])
        padded.append(p.masked_scatter(mask[:, :, None, None], t).transpose(1, 2))
    if causal:
        out = _torch_sdpa(*padded, is_causal=True)
    else:
        out = _torch_sdpa(*padded, attn_mask=mask[:, None, None, :])
    return out.transpose(1, 2)[mask]


def _gpu_shapes(t):
    out = []
    for d in t["attn_head_dims"][:1]:  # the dense cases cover the head dims; this is the packing
        for causal in t["attn_causal"]:
            for s in (s for s in t["attn_seqlens"] if 1024 <= s <= 4096):
                for mode in t["attn_modes"]:
                    out.append((mode, (("B", max(1, 32768 // s)), ("H", 2048 // d), ("Smax", s), ("D", d)), {"causal": causal}))
    return out


def _smoke_shapes():
    dims = (("B", 3), ("H", 2), ("Smax", 33), ("D", 16))
    return [("fwd+bwd", dims, {"causal": True}), ("fwd", dims, {"causal": False})]


def _inputs(case, randn):
    d = case.d
    total = sum(length_mix(d["B"], d["Smax"]))
    shape = (total, d["H"], d["D"])
    return [randn(*shape), randn(*shape), randn(*shape)], [randn(*shape).detach()]


def _eager(case, device):
    d = case.d
    return lambda q, k, v: padded_sdpa(q, k, v, d["B"], d["Smax"], case.causal)


def _call(case):
    d, causal = case.d, case.causal

    def run(q, k, v):
        cu, _ = mix_tensors(d["B"], d["Smax"], str(q.device))
        return flash_attn_varlen_func(q, k, v, cu, cu, d["Smax"], d["Smax"], causal=causal)

    return run


def _work(d, dtype, mode, causal=False):
    return "flops", sum(attention_flops(1, d["H"], s, s, d["D"], causal=causal, mode=mode) for s in length_mix(d["B"], d["Smax"]))


def _targets(mode, dims, vs, pct):
    vs("torch SDPA on the padded batch (best backend)", ("sdpa-flash", "sdpa-cudnn", "sdpa-efficient", "sdpa-math", "torch-eager"), 1.0)


register(
    OpSpec(
        name="varlen_attention",
        functions=(flash_attn_varlen_func, flash_attn_varlen_qkvpacked_func, flash_attn_varlen_kvpacked_func),
        backends=("triton",),
        custom_ops=(_varlen,),
        dims=DIMS,
        parity_dims=((2, 2, 17, 16), (3, 4, 113, 64)),
        dispatch_sizes={"tiny": (1, 2, 16, 16), "small": (4, 4, 64, 32), "realistic": (4, 12, 256, 64)},
        causal=True,
        cases=OpCases(
            gpu_shapes=_gpu_shapes,
            smoke_shapes=_smoke_shapes,
            inputs=_inputs,
            eager=_eager,
            call=_call,
            work=_work,
            work_model={
                "fwd": "flops = sum over sequences of 4*H*S_b^2*D, halved when causal (lengths: length_mix(B, Smax))",
                "bwd": "flops = 2.5 * forward flops",
                "fwd+bwd": "flops = 3.5 * forward flops",
            },
            peers=("sdpa-flash", "sdpa-cudnn", "sdpa-efficient", "sdpa-math", "torch-eager", "flash-attn"),
            targets=_targets,
        ),
    )
)
