"""Drop-in modules backed by fastgpt's ops: ``LayerNorm``, ``GELU``, ``CausalSelfAttention``.

Each module subclasses the module it replaces (``torch.nn.LayerNorm``, ``torch.nn.GELU``), so it has the
same constructor, attributes and state_dict keys, and ``isinstance`` checks in user code keep working.
``CausalSelfAttention`` is nanoGPT's module (same submodules and attributes: ``c_attn``, ``c_proj``,
``attn_dropout``, ``resid_dropout``, ``n_head``, ``n_embd``, ``dropout``) with an optional KV cache.

Which kernel serves each call is decided underneath by fastgpt's backend dispatch (``fastgpt.explain()``);
on CPU tensors that is the plain-torch reference.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

import fastgpt

__all__ = ["LayerNorm", "RMSNorm", "GELU", "CausalSelfAttention", "KVCache", "causal_attention"]

DECODE_MAX_SQ = 16  # steps of at most this many new positions use the decode op (its kernel's limit)


class LayerNorm(torch.nn.LayerNorm):
    """``torch.nn.LayerNorm`` computed by :func:`fastgpt.layer_norm`.

    Same constructor, attributes (``normalized_shape``, ``eps``, ``elementwise_affine``, ``weight``,
    ``bias``) and state_dict keys as torch's module; ``bias=False`` drops the bias as in nanoGPT's
    ``LayerNorm(ndim, bias=False)`` (no ``bias`` key in the state_dict). Input (..., *normalized_shape)
    in float16/bfloat16/float32/float64; the output has the input's dtype, also when the parameters are
    float32 and the input bfloat16 (autocast), where torch's CUDA autocast would return float32.
    """

    def __init__(
        self,
        normalized_shape,
        eps: float = 1e-5,
        elementwise_affine: bool = True,
        bias: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(normalized_shape, eps=eps, elementwise_affine=elementwise_affine, bias=bias, device=device, dtype=dtype)

    def forward(self, input: Tensor) -> Tensor:
        return fastgpt.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)


class RMSNorm(torch.nn.RMSNorm):
    """``torch.nn.RMSNorm`` computed by :func:`fastgpt.rms_norm`.

    Same constructor, attributes (``normalized_shape``, ``eps``, ``elementwise_affine``, ``weight``)
    and state_dict keys as torch's module; ``eps=None`` is torch's default. The output has the
    input's dtype (float32 statistics, one rounding, as ``torch.nn.functional.rms_norm``).
    """

    def forward(self, x: Tensor) -> Tensor:
        return fastgpt.rms_norm(x, self.normalized_shape, self.weight, self.eps)


class GELU(torch.nn.GELU):
    """``torch.nn.GELU`` computed by :func:`fastgpt.gelu`: ``approximate="none"`` (erf) or ``"tanh"``.

    Any shape and floating dtype; the output has the input's shape and dtype.
    """

    def forward(self, input: Tensor) -> Tensor:
        return fastgpt.gelu(input, self.approximate)


class KVCache:
    """Keys and values of one attention layer for incremental decoding.

    Holds up to ``capacity`` positions. The buffers are allocated on the first :meth:`append`, with
    the dtype and device of the keys it receives (under autocast that is the autocast dtype), as
    (B, capacity, H, D): the layout the attention op reads through strides, so appending is a slice
    write and attending over the filled part is a view. ``length`` is the number of positions filled.
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"KVCache: capacity must be at least 1; got {capacity}")
        self.capacity = int(capacity)
        self.length = 0
        self.k: Optional[Tensor] = None
        self.v: Optional[Tensor] = None

    def append(self, k: Tensor, v: Tensor) -> Tuple[Tensor, Tensor]:
        """Store k, v (B, T, H, D) after the filled positions; return all keys and values so far."""
        t = k.shape[1]
        if self.length + t > self.capacity:
            raise ValueError(f"KVCache: appending {t} positions to {self.length} exceeds the capacity {self.capacity}")
        if self.k is None:
            b, _, h, d = k.shape
            self.k = k.new_empty(b, self.capacity, h, d)
            self.v = v.new_empty(b, self.capacity, h, v.shape[-1])
        self.k[:, self.length : self.length + t] = k
        self.v[:, self.length : self.length + t] = v
        self.length += t
        return self.k[:, : self.length], self.v[:, : self.length]

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Append k, v (B, T, H, D) and attend q (B, T, H, D) to everything cached, causally, in one
        call of :func:`fastgpt.flash_attn_with_kvcache` (the split-KV decode kernel on a GPU). Needs a
        cache that already holds positions (the prefill goes through :meth:`append`)."""
        t = k.shape[1]
        if self.k is None or self.length + t > self.capacity:
            raise ValueError(f"KVCache: cannot attend {t} new positions to {self.length} (capacity {self.capacity})")
        seqlens = torch.full((q.shape[0],), self.length, dtype=torch.int32, device=q.device)
        y = fastgpt.flash_attn_with_kvcache(q, self.k, self.v, k.to(self.k.dtype), v.to(self.v.dtype),
                                            cache_seqlens=seqlens, causal=True)
        self.length += t
        return y


class CausalSelfAttention(torch.nn.Module):
    """nanoGPT's causal self-attention, computed by fastgpt's attention op.

    ``config`` needs ``n_embd``, ``n_head``, ``bias`` and ``dropout`` (a :class:`fastgpt.GPTConfig`
    or nanoGPT's ``GPTConfig``). Parameters: ``c_attn`` (n_embd -> 3 n_embd, the q, k, v projections)
    and ``c_proj`` (n_embd -> n_embd), both ``torch.nn.Linear`` with bias iff ``config.bias``.

    ``forward(x)`` takes x (B, T, n_embd) and returns (B, T, n_embd). The heads are read in place from
    the projection, in the (B, T, H, D) layout of :func:`fastgpt.flash_attn_func` (the same custom op as
    :func:`fastgpt.scaled_dot_product_attention`, without the transposing copies). Attention dropout
    applies only in training and makes the call fall back to torch's SDPA (the kernels have no
    dropout). With a :class:`KVCache` the new keys and values are appended and the queries attend to
    everything cached: the causal mask is aligned to the bottom right, so a query at step t sees the
    keys 0..t however many queries are passed.
    """

    def __init__(self, config) -> None:
        super().__init__()
        if config.n_embd % config.n_head != 0:
            raise ValueError(f"CausalSelfAttention: n_embd ({config.n_embd}) must be a multiple of n_head ({config.n_head})")
        self.c_attn = torch.nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = torch.nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.attn_dropout = torch.nn.Dropout(config.dropout)
        self.resid_dropout = torch.nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # nanoGPT on torch < 2 saved its causal mask as the buffer "attn.bias" (1, 1, T, T): not state
        # here (unless this is a patched nanoGPT module that still holds that buffer)
        mask = state_dict.get(prefix + "bias")
        if isinstance(mask, Tensor) and mask.dim() == 4 and "bias" not in self._buffers:
            del state_dict[prefix + "bias"]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: Tensor, kv_cache: Optional[KVCache] = None) -> Tensor:
        b, t, c = x.shape
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        shape = (b, t, self.n_head, c // self.n_head)
        q, k, v = q.view(shape), k.view(shape), v.view(shape)
        y = causal_attention(q, k, v, kv_cache, self.dropout if self.training else 0.0)
        return self.resid_dropout(self.c_proj(y.reshape(b, t, c)))


def causal_attention(q: Tensor, k: Tensor, v: Tensor, kv_cache: Optional[KVCache] = None, dropout_p: float = 0.0) -> Tensor:
    """Causal attention of q (B, T, Hq, D) over k, v (B, T, Hk, D) (Hk divides Hq: GQA, no copies),
    through ``kv_cache`` when given: a short step without gradient is a decode step over the cached
    keys (:meth:`KVCache.attend`); otherwise the new keys are appended and the queries attend to
    everything cached (bottom-right causal mask). Returns (B, T, Hq, D)."""
    if kv_cache is not None and kv_cache.length > 0 and q.shape[1] <= DECODE_MAX_SQ and not torch.is_grad_enabled():
        return kv_cache.attend(q, k, v)  # a decode step: the split-KV kernel over the preallocated cache
    if kv_cache is not None:
        k, v = kv_cache.append(k, v)
    return fastgpt.flash_attn_func(q, k, v, dropout_p=dropout_p, causal=True)
