"""The transformer blocks of :class:`fastgpt.GPT`: norms, attention, MLPs, rotary tables.

GPT-2's configuration (the defaults of :class:`fastgpt.GPTConfig`) builds nanoGPT's modules
(``fastgpt.nn.LayerNorm``, ``fastgpt.nn.CausalSelfAttention``, :class:`MLP`); the Llama-style options
swap in ``fastgpt.nn.RMSNorm``, :class:`Attention` (grouped-query attention and rotary embeddings)
and :class:`SwiGLUMLP`, under the same parameter names (``ln_1``, ``attn.c_attn``, ``attn.c_proj``,
``ln_2``, ``mlp.c_fc``, ``mlp.c_proj``), so every configuration is one model with one forward.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F

import fastgpt
from fastgpt.nn import GELU, CausalSelfAttention, KVCache, LayerNorm, RMSNorm, causal_attention

__all__ = ["Block", "MLP", "SwiGLUMLP", "Attention", "make_norm", "rope_tables"]

Rope = Tuple[Tensor, Tensor]


def _plain_linear(m: nn.Module) -> bool:
    """True when calling F.linear on m's weight is what m(x) does (no subclass such as a LoRA wrapper, no hooks)."""
    return type(m) is nn.Linear and not m._forward_hooks and not m._forward_pre_hooks


def _fusable_norm(m: nn.Module) -> Optional[str]:
    """The kind of fused add + norm m allows: "layer" or "rms" for fastgpt's own norms over the last
    dim without hooks, else None."""
    if m._forward_hooks or m._forward_pre_hooks or len(getattr(m, "normalized_shape", ())) != 1:
        return None
    return {LayerNorm: "layer", RMSNorm: "rms"}.get(type(m))


def _add_then_norm(sub: Tensor, x: Tensor, ln: nn.Module, fused: bool) -> Tuple[Tensor, Tensor]:
    """``s = x + sub`` (the residual stream) and ``ln(s)``; one fused op when ``fused`` and ln allows it.

    The sum takes the promoted dtype, as eager ``x + sub`` does (under autocast the residual stream
    stays float32 while the sublayer output is bfloat16).
    """
    kind = _fusable_norm(ln) if fused else None
    if kind is None:
        s = x + sub
        return ln(s), s
    dtype = torch.promote_types(x.dtype, sub.dtype)
    if kind == "rms":
        return fastgpt.add_rms_norm(sub.to(dtype), x.to(dtype), ln.weight, ln.eps)
    return fastgpt.add_layer_norm(sub.to(dtype), x.to(dtype), ln.weight, ln.bias, ln.eps)


def make_norm(config) -> nn.Module:
    """The config's norm over n_embd: LayerNorm (bias iff config.bias) or RMSNorm (no bias), eps = norm_eps."""
    if config.norm == "rmsnorm":
        return RMSNorm(config.n_embd, eps=config.norm_eps)
    return LayerNorm(config.n_embd, eps=config.norm_eps, bias=config.bias)


def rope_tables(start: int, length: int, head_dim: int, theta: float, device, dtype: torch.dtype) -> Rope:
    """cos and sin (length, head_dim / 2) of positions start .. start + length - 1, in ``dtype``.

    The frequencies are Llama's (and Hugging Face's): ``theta ** (-2i / head_dim)``; the tables are
    flash-attn's layout, which :func:`fastgpt.apply_rotary_emb_qk` reads (half rotation, the first
    half of each head paired with the second). Computed per call from the positions: elementwise
    products, so autocast leaves them in ``dtype``.
    """
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.int64).to(dtype) / head_dim)
    freqs = torch.arange(start, start + length, device=device, dtype=dtype)[:, None] * inv_freq[None, :]
    return freqs.cos(), freqs.sin()


class MLP(nn.Module):
    """nanoGPT's MLP: c_fc (n_embd -> 4 n_embd, or intermediate_size), GELU, c_proj, dropout."""

    def __init__(self, config) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, config.mlp_hidden, bias=config.bias)
        self.gelu = GELU(approximate=config.gelu_approximate)
        self.c_proj = nn.Linear(config.mlp_hidden, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)
        self.use_fused_ops = True

    def forward(self, x: Tensor) -> Tensor:
        if self.use_fused_ops and self.c_fc.bias is not None and _plain_linear(self.c_fc) and type(self.gelu) is GELU:
            # the bias add moves from the matmul into the GELU pass: one read and write less
            h = fastgpt.bias_gelu(F.linear(x, self.c_fc.weight), self.c_fc.bias, self.gelu.approximate)
        else:
            h = self.gelu(self.c_fc(x))
        return self.dropout(self.c_proj(h))


class SwiGLUMLP(nn.Module):
    """Llama's MLP: ``c_proj(silu(gate) * up)`` with gate and up the two halves of c_fc's output.

    c_fc (n_embd -> 2 * hidden) holds Llama's gate_proj rows then its up_proj rows, one matmul;
    :func:`fastgpt.swiglu` reads the halves in place. ``use_fused_ops = False`` computes
    ``F.silu(gate) * up`` instead.
    """

    def __init__(self, config) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 2 * config.mlp_hidden, bias=config.bias)
        self.c_proj = nn.Linear(config.mlp_hidden, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)
        self.use_fused_ops = True

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.c_fc(x).chunk(2, dim=-1)
        h = fastgpt.swiglu(gate, up) if self.use_fused_ops else F.silu(gate) * up
        return self.dropout(self.c_proj(h))


class Attention(nn.Module):
    """Causal self-attention with grouped-query heads and rotary position embeddings.

    c_attn (n_embd -> (n_head + 2 n_kv_head) * head_dim) holds the q, k, v projections in that order
    (bias iff ``qkv_bias``, default ``bias``); c_proj (n_embd -> n_embd, bias iff ``bias``). q and k
    are read in place from the projection and rotated by :func:`fastgpt.apply_rotary_emb_qk` (one
    launch); the kv heads are shared by ``n_head / n_kv_head`` query heads inside the attention op
    (no repeated copies). The KV cache holds the rotated keys of n_kv_head heads.
    """

    def __init__(self, config) -> None:
        super().__init__()
        self.n_head, self.n_kv_head, self.n_embd = config.n_head, config.kv_heads, config.n_embd
        self.head_dim = config.head_dim
        qkv_bias = config.bias if config.qkv_bias is None else config.qkv_bias
        self.c_attn = nn.Linear(config.n_embd, (self.n_head + 2 * self.n_kv_head) * self.head_dim, bias=qkv_bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.attn_dropout = nn.Dropout(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.dropout = config.dropout

    def forward(self, x: Tensor, kv_cache: Optional[KVCache] = None, rope: Optional[Rope] = None) -> Tensor:
        """x (B, T, n_embd) -> (B, T, n_embd); ``rope`` = (cos, sin) of these T positions, or None."""
        b, t, c = x.shape
        hq, hk, d = self.n_head, self.n_kv_head, self.head_dim
        q, k, v = self.c_attn(x).split((hq * d, hk * d, hk * d), dim=2)
        q, k, v = q.view(b, t, hq, d), k.view(b, t, hk, d), v.view(b, t, hk, d)
        if rope is not None:
            q, k = fastgpt.apply_rotary_emb_qk(q, k, *rope)
        y = causal_attention(q, k, v, kv_cache, self.dropout if self.training else 0.0)
        return self.resid_dropout(self.c_proj(y.reshape(b, t, c)))


class Block(nn.Module):
    """nanoGPT's pre-norm transformer block: ``x + attn(ln_1(x))``, then ``x + mlp(ln_2(x))``."""

    def __init__(self, config) -> None:
        super().__init__()
        self.ln_1 = make_norm(config)
        self.attn = CausalSelfAttention(config) if config.mha_learned else Attention(config)
        self.ln_2 = make_norm(config)
        self.mlp = SwiGLUMLP(config) if config.mlp == "swiglu" else MLP(config)
        self.use_fused_ops = True

    def forward(
        self, x: Tensor, kv_cache: Optional[KVCache] = None, *, pending: Optional[Tensor] = None, defer_residual: bool = False,
        rope: Optional[Rope] = None,
    ) -> Tensor:
        """``x + attn(...) + mlp(...)``; with ``defer_residual=True`` returns :meth:`forward_residual`'s pair.

        GPT calls its blocks through here (``block(...)``), so module hooks, FSDP's unsharding and
        activation-checkpoint wrappers apply to each block as they do for nanoGPT's. ``rope``: the
        rotary tables of x's positions (rotary configurations only).
        """
        if defer_residual:
            return self.forward_residual(x, pending, kv_cache, rope)
        x, m = self.forward_residual(x, pending, kv_cache, rope)
        return x + m

    def forward_residual(self, x: Tensor, pending: Optional[Tensor], kv_cache: Optional[KVCache] = None,
                         rope: Optional[Rope] = None) -> Tuple[Tensor, Tensor]:
        """The block with its last residual add deferred: returns ``(x, m)`` where the output is ``x + m``.

        ``pending``, the previous block's deferred MLP output (or None), is added to x inside ln_1,
        so consecutive blocks fuse every residual add with the norm that follows it.
        """
        fused = self.use_fused_ops
        if pending is None:
            h = self.ln_1(x)
        else:
            h, x = _add_then_norm(pending, x, self.ln_1, fused)
        a = self.attn(h, kv_cache) if rope is None else self.attn(h, kv_cache, rope)
        h, x = _add_then_norm(a, x, self.ln_2, fused)
        return x, self.mlp(h)
