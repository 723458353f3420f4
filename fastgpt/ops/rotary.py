"""Rotary position embeddings: the ``fastgpt::rotary_fwd`` / ``_bwd`` custom ops and the public entry points.

Public functions (one pair of custom ops under all of them):

* :func:`apply_rotary_emb` - drop-in for flash-attn's ``apply_rotary_emb``: x (B, S, H, D), cos/sin
  (S_max, R/2), R <= D (dims past R pass through), ``seqlen_offsets`` for decoding.
* :func:`apply_rotary_emb_qk` - the same on q and k in one launch (k may have fewer heads).
* :func:`apply_rotary_pos_emb` - drop-in for Hugging Face's ``apply_rotary_pos_emb(q, k, cos, sin,
  position_ids=None, unsqueeze_dim=1)``: cos/sin (B or 1, S, D), exactly ``q * cos + rotate_half(q) * sin``.

Custom ops (q, k logical (B, S, H, D), any strides; tables (Bc, S, R/2), see ``fastgpt.kernels.rotary``)::

    fastgpt::rotary_fwd(q, k?, cos1, sin1, cos2, sin2, interleaved, heads_first) -> (q_out, k_out)
    fastgpt::rotary_bwd(dq, dk?, cos1, sin1, cos2, sin2, interleaved, heads_first) -> (dq_in, dk_in)

Outputs are stored (B, H, S, D) when ``heads_first`` (Hugging Face's layout) else (B, S, H, D); k_out
is empty without k. The tables get no gradient (they are position functions, computed without one).
"""

import functools
from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from fastgpt import reference
from fastgpt.ops import _triton_backend as triton
from fastgpt.ops._cases import NORM_DISPATCH_SIZES, rowwise_gpu_shapes
from fastgpt.ops._checks import check_same_device, check_same_dtype, check_tensor
from fastgpt.ops._define import FastgptOp
from fastgpt.registry import OpCases, OpSpec, element_size, passes, register

__all__ = ["apply_rotary_emb", "apply_rotary_emb_qk", "apply_rotary_pos_emb"]

_KERNELS = "rotary"


def _alloc(like: Tensor, heads_first: bool) -> Tensor:
    b, s, h, d = like.shape
    if heads_first:
        return torch.empty(b, h, s, d, dtype=like.dtype, device=like.device).transpose(1, 2)
    return torch.empty(b, s, h, d, dtype=like.dtype, device=like.device)


def _apply(q, k, cos1, sin1, cos2, sin2, interleaved, heads_first, backward) -> Tuple[Tensor, Tensor]:
    out_q = _alloc(q, heads_first)
    out_k = _alloc(k, heads_first) if k is not None else q.new_empty(0)
    if triton.choose("rotary", _KERNELS, q) == "triton":
        triton.kernels(_KERNELS).apply(q, k, out_q, out_k if k is not None else None, cos1, sin1, cos2, sin2, interleaved, backward)
        return out_q, out_k
    for x, out in ((q, out_q), (k, out_k)):
        if x is not None and x.numel():
            out.copy_(reference.rotary_forward(x, cos1, sin1, cos2, sin2, interleaved, backward))
    return out_q, out_k


def _rotary_fwd(q: Tensor, k: Optional[Tensor], cos1: Tensor, sin1: Tensor, cos2: Tensor, sin2: Tensor, interleaved: bool,
                heads_first: bool) -> Tuple[Tensor, Tensor]:
    return _apply(q, k, cos1, sin1, cos2, sin2, interleaved, heads_first, False)


def _rotary_bwd(dq: Tensor, dk: Optional[Tensor], cos1: Tensor, sin1: Tensor, cos2: Tensor, sin2: Tensor, interleaved: bool,
                heads_first: bool) -> Tuple[Tensor, Tensor]:
    return _apply(dq, dk, cos1, sin1, cos2, sin2, interleaved, heads_first, True)


def _fake(q, k, cos1, sin1, cos2, sin2, interleaved, heads_first):
    return _alloc(q, heads_first), (_alloc(k, heads_first) if k is not None else q.new_empty(0))


def _setup_context(ctx, inputs, output):
    q, k, cos1, sin1, cos2, sin2, interleaved, heads_first = inputs
    ctx.save_for_backward(cos1, sin1, cos2, sin2)
    ctx.q_shape, ctx.has_k, ctx.options = q.shape, k is not None, (interleaved, heads_first)


def _backward(ctx, rotary_bwd, dq, dk):
    dk = dk if ctx.has_k else None
    if dq is None and dk is None:
        return (None,) * 8
    if dq is None:  # only k's output was used
        dq = dk.new_zeros(ctx.q_shape)
    dq_in, dk_in = rotary_bwd(dq, dk, *ctx.saved_tensors, *ctx.options)
    return dq_in, (dk_in if dk is not None else None), None, None, None, None, None, None


_rotary = FastgptOp("rotary", _rotary_fwd, _rotary_bwd, _fake, _fake, _setup_context, _backward)


# --------------------------------------------------------------------------------------------
# public functions
# --------------------------------------------------------------------------------------------


def _check_tables(fn: str, x: Tensor, cos: Tensor, sin: Tensor) -> None:
    check_tensor(fn, "cos", cos)
    check_tensor(fn, "sin", sin)
    if cos.shape != sin.shape:
        raise ValueError(f"{fn}: cos and sin must have the same shape; got {tuple(cos.shape)} and {tuple(sin.shape)}")
    check_same_device(fn, x=x, cos=cos, sin=sin)
    if torch.is_grad_enabled() and (cos.requires_grad or sin.requires_grad):
        raise ValueError(f"{fn}: cos and sin must not require grad (their gradient is not computed); pass them detached")


def _check_qk(fn: str, q: Tensor, k: Optional[Tensor], heads_dim: int) -> None:
    check_tensor(fn, "q" if k is not None else "x", q, ndim=(4,))
    if k is None:
        return
    check_tensor(fn, "k", k, ndim=(4,))
    check_same_dtype(fn, q=q, k=k)
    check_same_device(fn, q=q, k=k)
    same = [i for i in range(4) if i != heads_dim]
    if [q.shape[i] for i in same] != [k.shape[i] for i in same]:
        raise ValueError(f"{fn}: q and k must agree in every dim but the heads (dim {heads_dim}); got {tuple(q.shape)} and {tuple(k.shape)}")


def _flash_tables(fn: str, x: Tensor, cos: Tensor, sin: Tensor, seqlen_offsets: Union[int, Tensor]) -> Tuple[Tensor, Tensor]:
    """flash-attn's (S_max, R/2) tables as the (Bc, S, R/2) rows of this call's positions."""
    _check_tables(fn, x, cos, sin)
    b, s, _, d = x.shape
    if cos.dim() != 2:
        raise ValueError(f"{fn}: cos and sin must be 2-D (seqlen_rotary, rotary_dim / 2); got shape {tuple(cos.shape)}")
    if not 1 <= 2 * cos.shape[1] <= d:
        raise ValueError(f"{fn}: rotary_dim = 2 * cos.shape[1] = {2 * cos.shape[1]} must be in [2, head dim {d}]")
    if isinstance(seqlen_offsets, Tensor):
        if seqlen_offsets.dtype not in (torch.int32, torch.int64) or seqlen_offsets.shape != (b,):
            raise ValueError(f"{fn}: seqlen_offsets must be an int or an int32/int64 tensor of shape ({b},); "
                             f"got {seqlen_offsets.dtype} {tuple(seqlen_offsets.shape)}")
        # an index past the table raises in the gather (an IndexError on cpu, a device assert on cuda)
        pos = seqlen_offsets.to(device=cos.device, dtype=torch.long)[:, None] + torch.arange(s, device=cos.device)
        return cos[pos], sin[pos]
    if isinstance(seqlen_offsets, bool) or not isinstance(seqlen_offsets, int) or seqlen_offsets < 0:
        raise ValueError(f"{fn}: seqlen_offsets must be an int >= 0 or a tensor; got {seqlen_offsets!r}")
    if seqlen_offsets + s > cos.shape[0]:
        raise ValueError(f"{fn}: seqlen_offsets + seqlen = {seqlen_offsets + s} exceeds the {cos.shape[0]} positions of cos/sin")
    return cos[None, seqlen_offsets : seqlen_offsets + s], sin[None, seqlen_offsets : seqlen_offsets + s]


def apply_rotary_emb(x: Tensor, cos: Tensor, sin: Tensor, interleaved: bool = False, inplace: bool = False,
                     seqlen_offsets: Union[int, Tensor] = 0) -> Tensor:
    """Drop-in for flash-attn's ``apply_rotary_emb``: rotary embedding of x (B, S, H, D).

    cos, sin: (S_max, R/2) with R <= D; the first R dims of each head are rotated, the rest pass
    through. ``interleaved``: pairs (2i, 2i+1) (GPT-J) instead of (i, i + R/2) (GPT-NeoX / Llama).
    ``seqlen_offsets``: an int, or a (B,) int tensor, added to the positions (decoding with a KV
    cache). ``inplace`` writes the result into x and returns x (computed out of place, then copied).
    Any strides (e.g. q as a view of a fused qkv); float32 math, one rounding; returns x's dtype.
    """
    fn = "fastgpt.apply_rotary_emb"
    _check_qk(fn, x, None, 2)
    c, s = _flash_tables(fn, x, cos, sin, seqlen_offsets)
    out, _ = _rotary(x, None, c, s, c, s, bool(interleaved), False)
    return x.copy_(out) if inplace else out


def apply_rotary_emb_qk(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, interleaved: bool = False,
                        seqlen_offsets: Union[int, Tensor] = 0) -> Tuple[Tensor, Tensor]:
    """:func:`apply_rotary_emb` on q (B, S, Hq, D) and k (B, S, Hk, D) in one launch; returns (q, k)."""
    fn = "fastgpt.apply_rotary_emb_qk"
    _check_qk(fn, q, k, 2)
    c, s = _flash_tables(fn, q, cos, sin, seqlen_offsets)
    return _rotary(q, k, c, s, c, s, bool(interleaved), False)


def apply_rotary_pos_emb(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, position_ids: Optional[Tensor] = None,
                         unsqueeze_dim: int = 1) -> Tuple[Tensor, Tensor]:
    """Drop-in for Hugging Face's ``apply_rotary_pos_emb``: ``q * cos + rotate_half(q) * sin`` (and k).

    ``unsqueeze_dim=1``: q, k are (B, H, S, D) (Llama's layout); 2: (B, S, H, D). cos, sin: (B or 1,
    S, D) or (S, D), as the model's rotary embedding makes them; their two halves are used as given
    (exactly Hugging Face's formula, also when they differ). ``position_ids`` is unused, as in
    Hugging Face (the positions are already in cos/sin). Returns q and k rotated, in their layout and
    in the promoted dtype of q and the tables, as Hugging Face's formula gives (its models cast the
    tables to q's dtype, so that is q's).
    """
    fn = "fastgpt.apply_rotary_pos_emb"
    if unsqueeze_dim not in (1, 2):
        raise ValueError(f"{fn}: unsqueeze_dim must be 1 (q, k as (B, H, S, D)) or 2 ((B, S, H, D)); got {unsqueeze_dim!r}")
    _check_qk(fn, q, k, unsqueeze_dim)
    heads_first = unsqueeze_dim == 1
    qv, kv = (q.transpose(1, 2), k.transpose(1, 2)) if heads_first else (q, k)
    b, s, _, d = qv.shape
    _check_tables(fn, q, cos, sin)
    if cos.dim() not in (2, 3) or cos.shape[-2:] != (s, d) or (cos.dim() == 3 and cos.shape[0] not in (1, b)) or d % 2:
        raise ValueError(f"{fn}: cos and sin must be (B or 1, S, D) or (S, D) with S = {s}, an even D = {d} and B = {b}; "
                         f"got {tuple(cos.shape)}")
    c, sn = (cos, sin) if cos.dim() == 3 else (cos[None], sin[None])
    out_dtype = torch.promote_types(torch.promote_types(q.dtype, cos.dtype), sin.dtype)
    if out_dtype != q.dtype:  # Hugging Face's q * cos promotes (float32 tables on bfloat16 q give float32)
        qv, kv = qv.to(out_dtype), kv.to(out_dtype)
    half = d // 2
    oq, ok = _rotary(qv, kv, c[..., :half], sn[..., :half], c[..., half:], sn[..., half:], False, heads_first)
    return (oq.transpose(1, 2), ok.transpose(1, 2)) if heads_first else (oq, ok)


# --------------------------------------------------------------------------------------------
# registry entry: the byte model, benchmark/parity cases and targets (docs/design.md, 'Adding an op')
# --------------------------------------------------------------------------------------------

HEAD_DIM = 128  # the benchmarked head dim (a width that is not a multiple of it is one head)


def _heads(n: int) -> Tuple[int, int]:
    d = HEAD_DIM if n % HEAD_DIM == 0 else n
    return n // d, d


def rotary_bytes(tokens: int, q_width: int, k_width: int, table_width: int, dtype: torch.dtype, table_dtype=None) -> int:
    """Bytes one pass moves (forward and backward alike): read q and k, write them (2*(q+k)*e), and
    read cos and sin (2*tokens*table_width*e(table))."""
    e, et = element_size(dtype), element_size(table_dtype or dtype)
    return 2 * tokens * (q_width + k_width) * e + 2 * tokens * table_width * et


def _work(d, dtype, mode, causal=False):
    _, hd = _heads(d["N"])
    return "bytes", float(sum(rotary_bytes(d["M"], d["N"], d["N"], hd, dtype) for _ in passes(mode)))


def rotate_half(x: Tensor) -> Tensor:
    """Hugging Face's rotate_half: (x1, x2) -> (-x2, x1) over the two halves of the last dim."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def eager_apply_rotary_pos_emb(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, unsqueeze_dim: int = 1) -> Tuple[Tensor, Tensor]:
    """Hugging Face's apply_rotary_pos_emb as eager code (the torch-eager peer and the tests' baseline)."""
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


@functools.lru_cache(maxsize=16)
def rope_tables(s: int, d: int, device: str, dtype: torch.dtype, base: float = 10000.0) -> Tuple[Tensor, Tensor]:
    """Llama's (1, s, d) cos/sin tables (cat(freqs, freqs)), computed in float32, cast to ``dtype``."""
    inv_freq = 1.0 / base ** (torch.arange(0, d, 2, dtype=torch.float32, device=device) / d)
    freqs = torch.outer(torch.arange(s, dtype=torch.float32, device=device), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)[None]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _inputs(case, randn):
    m, n = case.d["M"], case.d["N"]
    h, d = _heads(n)
    return [randn(1, m, h, d), randn(1, m, h, d)], [randn(1, m, h, d).detach(), randn(1, m, h, d).detach()]


def _eager(case, device):
    def eager(q, k):
        return eager_apply_rotary_pos_emb(q, k, *rope_tables(q.shape[1], q.shape[-1], str(q.device), q.dtype), unsqueeze_dim=2)

    return eager


def _call(case):
    def call(q, k):
        return apply_rotary_pos_emb(q, k, *rope_tables(q.shape[1], q.shape[-1], str(q.device), q.dtype), unsqueeze_dim=2)

    return call


def _targets(mode, dims, vs, pct):
    pct("pct_of_copy_bandwidth", 85.0, "copy bandwidth")


def _report_launches(m: int, n: int, dtype: torch.dtype):
    """The registry's ``report_launches``: q and k of the benchmark case (M tokens, N / 128 heads of 128
    each, as ``_work`` counts them) rotated in one launch, forward and backward."""
    h, d = _heads(n)
    return [(p, plan, 0.0) for p, plan in triton.kernels(_KERNELS).example_plans(m, h, h, d, dtype)]


register(
    OpSpec(
        name="rotary",
        functions=(apply_rotary_emb, apply_rotary_emb_qk, apply_rotary_pos_emb),
        backends=("triton",),
        custom_ops=(_rotary,),
        patchable=True,
        parity_dims=((17, 64), (1000, 768)),
        dispatch_sizes=NORM_DISPATCH_SIZES,
        report_launches=_report_launches,
        cases=OpCases(
            gpu_shapes=rowwise_gpu_shapes,
            smoke_shapes=lambda: [(mode, (("M", 7), ("N", 32)), {}) for mode in ("fwd", "bwd")],
            inputs=_inputs,
            eager=_eager,
            call=_call,
            work=_work,
            work_model={
                "fwd": "bytes = 2*M*(Nq+Nk)*e [read q, k, write them] + 2*M*D*e [read cos, sin (Hugging Face's (1, S, D) tables)]",
                "bwd": "bytes = 2*M*(Nq+Nk)*e [read dq, dk, write their inputs' gradients] + 2*M*D*e [read cos, sin]",
            },
            peers=("torch-eager", "torch-compile"),
            targets=_targets,
        ),
    )
)
