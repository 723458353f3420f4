"""The "fastgpt" attention implementation for Hugging Face transformers (registered by ``fastgpt.patch``).

transformers calls it like its ``sdpa_attention_forward`` and builds its masks with the sdpa mask
function: None when plain causal attention suffices, else a boolean (B, 1, Sq, Sk) mask. What it runs:

* no mask: fastgpt's causal kernel (``flash_attn_func``), or the decode op for a generation step; a
  single row whose ``position_ids`` restart (several sequences packed into one row, with a KV cache
  in use transformers builds no mask for them), or transformers' ``cu_seq_lens_q/k`` +
  ``max_length_q/k`` kwargs, runs ``flash_attn_varlen_func`` over those sequences, the rules of
  transformers' flash-attention integration (``_is_packed_sequence``, ``prepare_fa_kwargs_from_position_ids``).
* a mask it can prove is causal attention over padded rows (left, right or both; cached keys; a
  static cache's unwritten slots) or over packed sequences (block-diagonal causal, what transformers
  builds from restarting ``position_ids`` without a cache): ``flash_attn_varlen_func`` on the
  (B * S, H, D) views of q/k/v, each row split into segments (padding before, tokens, padding after)
  so that padded queries see no key (output 0, as transformers' flash integration returns) and real
  queries see exactly their row's real keys. No gather: the only copy is the reshape when the (B, S)
  dims of transformers' tensor cannot be merged (keys concatenated in a KV cache, for example).
* transformers' ``sliding_window`` and ``softcap`` kwargs (Mistral, Qwen2's sliding layers) go to every
  kernel call as its flash-attention integration passes them (see ``_kernel_kwargs``); a mask is then
  recognised as the patterns above within that window (transformers' sliding-window sdpa masks).
* any other mask: torch's SDPA through :func:`fastgpt.scaled_dot_product_attention` (a one-time
  FallbackWarning; an error in strict mode; a ValueError with ``softcap``, which SDPA lacks). Never a
  silent wrong answer.

The mask (or ``position_ids``) is read once per forward: transformers passes the same tensor to every
layer, and the answer is cached while that tensor is alive and unmodified (each read is a device sync).
Under torch.compile nothing is read: a mask goes to SDPA and ``position_ids`` are not inspected.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import fastgpt
from fastgpt.ops._checks import is_compiling

ATTN_IMPLEMENTATION = "fastgpt"  # the name registered with transformers' AttentionInterface
_HF_UNSUPPORTED_KWARGS = ("s_aux", "position_bias")
DECODE_MAX_SQ = 16  # a causal step of at most this many queries over more cached keys is a decode step
_VARLEN_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")  # transformers' names


@dataclass(frozen=True)
class Layout:
    """How one forward's attention runs, as read from its mask or position_ids (shared by every layer).

    ``cu_q`` None: causal attention of every row over its first ``keys`` keys (the rest are a static
    cache's unwritten slots). Otherwise flash_attn_varlen_func over the (B * Sq, H, D) queries and
    (B * Sk, H, D) keys cut into the segments ``cu_q``/``cu_k`` (int32), causal as ``causal`` says.
    """

    keys: int
    cu_q: Optional[Tensor] = None
    cu_k: Optional[Tensor] = None
    max_q: int = 0
    max_k: int = 0
    causal: bool = True


# --------------------------------------------------------------------------------------------
# reading a mask
# --------------------------------------------------------------------------------------------


def _as_bool_mask(mask: Tensor, batch: int, sq: int, sk: int) -> Optional[Tuple[Tensor, Tensor]]:
    """(allowed (B, Sq, Sk), is-a-clean-mask flag tensor) for a (B|1, 1, Sq, Sk) boolean mask or additive
    float mask of 0 and -inf (or the dtype's lowest value, what eager masks hold); None for other forms."""
    if mask.dim() != 4 or mask.shape[0] not in (1, batch) or mask.shape[1] != 1 or tuple(mask.shape[-2:]) != (sq, sk):
        return None
    if mask.dtype == torch.bool:
        return mask[:, 0].expand(batch, sq, sk), torch.ones((), dtype=torch.bool, device=mask.device)
    if not mask.is_floating_point():
        return None
    allowed = mask[:, 0] == 0
    clean = (allowed | (mask[:, 0] <= torch.finfo(mask.dtype).min)).all()
    return allowed.expand(batch, sq, sk), clean


def _in_window(j: Tensor, pos: Tensor, window: Optional[int]) -> Tensor:
    """Keys j inside the sliding window of queries at key positions pos (B|1, Sq, 1): transformers'
    ``sliding_window_overlay`` (masking_utils), kv_idx > q_idx - sliding_window; all keys when None."""
    return torch.ones((), dtype=torch.bool, device=j.device) if window is None else j > pos - window


def _padding_layout(m: Tensor, clean: Tensor, sq: int, sk: int, window: Optional[int]) -> Optional[Layout]:
    """m (B, Sq, Sk) allowed: a Layout when every row is bottom-right causal attention of queries at key
    positions q0..q0+Sq-1 over one run [start, end) of real keys (padding before and after it), within
    the sliding ``window`` when one is given, else None.

    q0 comes from the mask: a real query sees its own key, so its last visible key is q0 + i; padded
    queries see fewer. [start, end) are the keys some query sees (with a window, cached keys that no
    query reaches count as padding: no query would see them anyway). The answer is proved by rebuilding
    the whole mask from (q0, start, end, window) and comparing; one device sync reads the verdict and
    the sizes.
    """
    j, i = torch.arange(sk, device=m.device), torch.arange(sq, device=m.device)
    q0 = (torch.where(m, j, -1).amax(-1) - i).amax()
    seen = m.any(1)  # (B, Sk): the keys some query of the row sees
    has = seen.any(-1)
    start = torch.where(has, seen.int().argmax(-1), 0)
    end = torch.where(has, sk - seen.flip(-1).int().argmax(-1), 0)
    pos = (q0 + i)[:, None]
    want = (j <= pos) & _in_window(j, pos, window) & (j >= start[:, None, None]) & (j < end[:, None, None])
    ok = clean & (q0 >= 0) & (q0 + sq <= sk) & (m == want).all()
    # queries before the run, in it, after it; keys before, in, after (unwritten slots included)
    q_before = (torch.clamp(start, max=q0 + sq) - q0).clamp(min=0)
    q_real = (end - torch.maximum(start, q0)).clamp(min=0)
    zero = torch.zeros_like(start)
    # segments per row: (pad queries, no key), (no query, pad keys), (real, real), (pad queries, no key),
    # (no query, pad keys): padded queries see nothing, so they give 0 and receive no gradient
    q_seg = torch.stack([q_before, zero, q_real, sq - q_before - q_real, zero], -1).flatten()
    k_seg = torch.stack([zero, start, end - start, zero, sk - end], -1).flatten()
    full = (start == 0).all() & (end == q0 + sq).all()  # no padding: plain causal over the first q0 + Sq keys
    ok, full, q0, max_q, max_k = torch.stack([ok, full, q0, q_seg.max(), k_seg.max()]).tolist()
    if not ok:
        return None
    if full:
        return Layout(keys=q0 + sq)
    cu_q, cu_k = (F.pad(seg.cumsum(0), (1, 0)).to(torch.int32) for seg in (q_seg, k_seg))
    return Layout(keys=sk, cu_q=cu_q, cu_k=cu_k, max_q=max_q, max_k=max_k)


def _cu_from_starts(starts: Tensor, total: int) -> Tuple[Tensor, int]:
    """Flat indices where sequences start (the first 0) -> (int32 cu_seqlens, longest sequence)."""
    cu = torch.cat([starts.flatten(), starts.new_tensor([total])]).to(torch.int32)
    return cu, int(cu.diff().max())


def _packed_layout(m: Tensor, clean: Tensor, sq: int, sk: int, window: Optional[int]) -> Optional[Layout]:
    """m (B, S, S) allowed: a Layout when every row is block-diagonal causal (packed sequences: query i
    sees keys start(i)..i of its sequence), within the sliding ``window`` when one is given, else None.
    A query that sees no earlier key starts a sequence (with a window of 1 every query does: the same
    attention)."""
    if sq != sk:
        return None
    j = torch.arange(sk, device=m.device)
    starts = torch.where(m, j, sk).amin(-1) == j  # (B, S): queries whose first visible key is their own
    first = torch.where(starts, j, 0).cummax(-1).values  # where each query's sequence starts
    want = (j >= first[..., None]) & (j <= j[:, None]) & _in_window(j, j[:, None], window)
    if not bool(clean & (m == want).all()):
        return None
    cu, longest = _cu_from_starts(starts.flatten().nonzero(), m.numel() // sk)
    return Layout(keys=sk, cu_q=cu, cu_k=cu, max_q=longest, max_k=longest)


def read_mask(mask: Tensor, batch: int, sq: int, sk: int, window: Optional[int] = None) -> Optional[Layout]:
    """The Layout that computes attention under ``mask`` exactly at every real query, or None (fallback).
    With a sliding ``window`` (transformers' ``sliding_window``) the Layout is run with that window."""
    if sq == 0 or sk == 0:
        return None
    got = _as_bool_mask(mask, batch, sq, sk)
    if got is None:
        return None
    return _padding_layout(*got, sq, sk, window) or _packed_layout(*got, sq, sk, window)


def causal_prefix_length(mask: Tensor, sq: int, sk: int) -> Optional[int]:
    """L when a (B|1, 1, Sq, Sk) mask is the bottom-right causal pattern over the first L keys and hides
    the rest (a static cache's unwritten slots), for every batch row; else None. Reads the mask (syncs)."""
    layout = read_mask(mask, mask.shape[0], sq, sk) if mask.dim() == 4 else None
    return layout.keys if layout is not None and layout.cu_q is None else None


# transformers hands the same mask (and position_ids) to every layer of one forward: read each once.
# kind -> (weak reference to the tensor, its version counter, the call's sizes, the answer)
_LAST: Dict[str, Tuple["weakref.ref[Tensor]", int, tuple, Optional[Layout]]] = {}


def _cached(kind: str, t: Tensor, sizes: tuple, read: Callable[[], Optional[Layout]]) -> Optional[Layout]:
    """read(), remembered for the last tensor of this kind while it is alive and unchanged."""
    try:
        version = t._version
    except RuntimeError:  # an inference tensor has no version counter: read it every time
        return read()
    hit = _LAST.get(kind)
    if hit is not None and hit[0]() is t and hit[1] == version and hit[2] == sizes:
        return hit[3]
    layout = read()
    _LAST[kind] = (weakref.ref(t), version, sizes, layout)
    return layout


def mask_layout(mask: Tensor, batch: int, sq: int, sk: int, window: Optional[int] = None) -> Optional[Layout]:
    """read_mask, once per mask tensor."""
    return _cached("mask", mask, (batch, sq, sk, window), lambda: read_mask(mask, batch, sq, sk, window))


# --------------------------------------------------------------------------------------------
# packed sequences without a mask: transformers' flash-attention rules
# --------------------------------------------------------------------------------------------


def _read_position_ids(position_ids: Tensor, sq: int, sk: int, causal: bool) -> Optional[Layout]:
    """transformers' _is_packed_sequence and prepare_fa_kwargs_from_position_ids: a new sequence starts
    wherever the position is the row's smallest."""
    pos = position_ids.reshape(-1)
    lowest = pos.min()
    if not bool((torch.arange(sq, device=pos.device) + lowest != pos).any()):
        return None  # one sequence
    if sq != sk:
        raise ValueError(
            f"fastgpt attention: position_ids restart (packed sequences) but there are {sk} keys for {sq} queries; "
            "packed sequences cannot continue from a KV cache"
        )
    starts = (pos == lowest).nonzero()
    if int(starts[0]) != 0:
        raise ValueError("fastgpt attention: packed position_ids must start each sequence at the smallest position, "
                         f"the first token included; got {pos[:8].tolist()}...")
    cu, longest = _cu_from_starts(starts, sq)
    return Layout(keys=sk, cu_q=cu, cu_k=cu, max_q=longest, max_k=longest, causal=causal)


def _unmasked_layout(kwargs: dict, batch: int, sq: int, sk: int, causal: bool) -> Optional[Layout]:
    """Packed sequences given by transformers' varlen kwargs or by position_ids restarts (no mask)."""
    given = [kwargs.get(name) for name in _VARLEN_KWARGS]
    if all(x is not None for x in given):
        cu_q, cu_k, max_q, max_k = given
        return Layout(keys=sk, cu_q=cu_q, cu_k=cu_k, max_q=int(max_q), max_k=int(max_k), causal=causal)
    position_ids = kwargs.get("position_ids")
    if position_ids is None or batch != 1 or sq < 2 or position_ids.numel() != sq or is_compiling():
        return None
    read = lambda: _read_position_ids(position_ids, sq, sk, causal)  # noqa: E731
    return _cached("position_ids", position_ids, (sq, sk, causal), read)


# --------------------------------------------------------------------------------------------
# the attention function
# --------------------------------------------------------------------------------------------


def _is_decode_step(query: Tensor, key: Tensor, value: Tensor, causal: bool, dropout: float) -> bool:
    """A generation step flash_attn_with_kvcache can take: causal, a few queries after cached keys, no
    dropout, no gradient wanted (the decode op is inference-only), not under torch.compile (its range
    checks read the device)."""
    sq, sk = query.shape[2], key.shape[2]
    wants_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
    return causal and 1 <= sq <= DECODE_MAX_SQ and sq < sk and dropout == 0.0 and not wants_grad and not is_compiling()


def _sliding_window(window: object) -> Optional[int]:
    """transformers' ``sliding_window`` kwarg (the number of keys a query sees, itself included), checked."""
    if window is None:
        return None
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"fastgpt attention: sliding_window must be a positive int or None; got {window!r}")
    return window


def _kernel_kwargs(dropout: float, scaling: Optional[float], window: Optional[int], softcap: object, sk: int) -> dict:
    """What every kernel call takes, as transformers' ``_process_flash_attention_kwargs``
    (modeling_flash_attention_utils) builds it for flash-attn: ``window_size=(sliding_window - 1,
    sliding_window - 1)`` when there are more keys than the window (causal keeps only the left side:
    query p sees keys p - sliding_window + 1 .. p, the mask's kv_idx > q_idx - sliding_window), and
    ``softcap`` as given (the kernels validate it)."""
    kernel_kwargs = dict(dropout_p=dropout, softmax_scale=scaling)
    if window is not None and sk > window:
        kernel_kwargs["window_size"] = (window - 1, window - 1)
    if softcap is not None:
        kernel_kwargs["softcap"] = softcap
    return kernel_kwargs


def _varlen(query: Tensor, key: Tensor, value: Tensor, layout: Layout, kernel_kwargs: dict) -> Tensor:
    """flash_attn_varlen_func on (B * S, H, D) views of transformers' (B, H, S, D) tensors (a copy only
    where B and S cannot be merged), GQA heads as they are; -> (B, Sq, Hq, Dv)."""
    b, hq, sq, _ = query.shape
    q, k, v = (t.transpose(1, 2).reshape(-1, t.shape[1], t.shape[3]) for t in (query, key, value))
    out = fastgpt.flash_attn_varlen_func(q, k, v, layout.cu_q, layout.cu_k, layout.max_q, layout.max_k,
                                         causal=layout.causal, **kernel_kwargs)
    return out.view(b, sq, hq, value.shape[-1])


def hf_attention_forward(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Optional[Tensor],
    dropout: float = 0.0,
    scaling: Optional[float] = None,
    is_causal: Optional[bool] = None,
    **kwargs,
) -> Tuple[Tensor, None]:
    """transformers' attention-function interface, computed by fastgpt (registered as "fastgpt").

    query (B, Hq, Sq, D), key/value (B, Hk, Sk, D) -> ((B, Sq, Hq, D) contiguous, None), the contract
    of transformers' ``sdpa_attention_forward``; the module docstring says which path runs for which
    mask. Outputs at padded query positions are 0 (SDPA gives other values there; a loss ignores them).
    A causal decode step (see ``_is_decode_step``) without padding runs
    :func:`fastgpt.flash_attn_with_kvcache` with transformers' concatenated keys/values as a full cache
    (transposed views, no copy).
    """
    unsupported = [name for name in _HF_UNSUPPORTED_KWARGS if kwargs.get(name) is not None]
    if unsupported or kwargs.get("output_attentions"):
        raise ValueError(
            f"fastgpt attention for transformers does not support {', '.join(unsupported) or 'output_attentions'}; "
            "use attn_implementation='sdpa' or 'eager' for this model"
        )
    batch, sq, sk = query.shape[0], query.shape[2], key.shape[2]
    window, softcap = _sliding_window(kwargs.get("sliding_window")), kwargs.get("softcap")
    kernel_kwargs = _kernel_kwargs(dropout, scaling, window, softcap, sk)
    causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
    layout = None
    if attention_mask is not None:
        layout = None if is_compiling() else mask_layout(attention_mask, batch, sq, sk, window)
        if layout is None:  # not a pattern fastgpt's kernels compute: torch's SDPA, with a warning
            if softcap:  # torch's SDPA has no softcap (transformers' sdpa integration would drop it)
                raise ValueError(f"fastgpt attention: softcap={softcap} needs fastgpt's kernels, but this attention mask "
                                 "is not one they compute (see fastgpt.hf_attention); use attn_implementation='eager'")
            out = fastgpt.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout,
                                                       scale=scaling, enable_gqa=query.shape[1] != key.shape[1])
            return out.transpose(1, 2).contiguous(), None
        causal = True  # the mask was causal attention (over padded rows or packed sequences)
    else:
        layout = _unmasked_layout(kwargs, batch, sq, sk, causal)
        if layout is None and causal and 1 < sq < sk:
            # transformers passes no mask with more keys than queries only for an empty static cache's
            # prefill (it builds the mask otherwise): the keys past the queries are unwritten slots
            layout = Layout(keys=sq)
    if layout is not None and layout.cu_q is not None:
        return _varlen(query, key, value, layout, kernel_kwargs), None
    if layout is not None:
        key, value = key[:, :, : layout.keys], value[:, :, : layout.keys]
    if _is_decode_step(query, key, value, causal, dropout) and kernel_kwargs.keys() == {"dropout_p", "softmax_scale"}:
        k_cache, v_cache = key.transpose(1, 2), value.transpose(1, 2)  # (B, S, H, D) views: the op takes strides
        lengths = torch.full((batch,), key.shape[2], dtype=torch.int32, device=key.device)
        out = fastgpt.flash_attn_with_kvcache(query.transpose(1, 2), k_cache, v_cache, cache_seqlens=lengths,
                                              softmax_scale=scaling, causal=True)
        return out, None
    out = fastgpt.flash_attn_func(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                                  causal=causal and sq > 1, **kernel_kwargs)
    return out, None


def register() -> Optional[str]:
    """Register "fastgpt" with this transformers' attention and mask interfaces; None, or why it cannot."""
    import transformers

    try:
        from transformers.masking_utils import AttentionMaskInterface
        from transformers.modeling_utils import AttentionInterface
    except ImportError:
        return (
            f"transformers {transformers.__version__} has no AttentionInterface/AttentionMaskInterface "
            "(needs >= 4.53); its other modules are still patched"
        )
    if ATTN_IMPLEMENTATION not in AttentionInterface._global_mapping:
        AttentionInterface.register(ATTN_IMPLEMENTATION, hf_attention_forward)
    if ATTN_IMPLEMENTATION not in AttentionMaskInterface._global_mapping:
        # the masks of the sdpa implementation: None when causal suffices, else boolean
        AttentionMaskInterface.register(ATTN_IMPLEMENTATION, AttentionMaskInterface._global_mapping["sdpa"])
    return None
