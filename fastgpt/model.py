"""GPT: nanoGPT's model on fastgpt's ops, Hugging Face GPT-2 weight import, and generation with a KV cache.

``GPTConfig`` and ``GPT`` keep nanoGPT's API and parameter names (``transformer.wte``, ``wpe``, ``drop``,
``h.N.ln_1``, ``h.N.attn.c_attn``, ``h.N.attn.c_proj``, ``h.N.ln_2``, ``h.N.mlp.c_fc``, ``h.N.mlp.c_proj``,
``ln_f``, ``lm_head`` tied to ``wte``), so a nanoGPT checkpoint's ``model`` state_dict loads with
``strict=True`` and nanoGPT's train.py runs unchanged with ``from fastgpt import GPT, GPTConfig``.

What is computed differently from nanoGPT (the numbers stay within the parity rule of fastgpt.testing):

* attention is :func:`fastgpt.flash_attn_func` (one custom op; the heads are read in place),
* the MLP's bias + GELU is :func:`fastgpt.bias_gelu` after a bias-free ``F.linear``,
* each residual add is fused with the layer norm that follows it (:func:`fastgpt.add_layer_norm`),
  across block boundaries too (the MLP output of block i is added inside block i+1's ``ln_1``).

``GPT.use_fused_ops`` (default True) switches the last two off, for comparisons.
"""

from __future__ import annotations

import inspect
import math
import os
import pickle
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F

import fastgpt
from fastgpt.nn import GELU, CausalSelfAttention, KVCache, LayerNorm

__all__ = ["GPTConfig", "GPT", "Block", "MLP"]

_GELU_APPROXIMATIONS = ("none", "tanh")


@dataclass
class GPTConfig:
    """nanoGPT's GPTConfig (same fields, defaults and meaning) plus ``gelu_approximate``.

    ``gelu_approximate`` is "none" (erf GELU, nanoGPT's ``nn.GELU()``) or "tanh" (GPT-2's
    ``gelu_new``, what :meth:`GPT.from_hf` sets for OpenAI GPT-2 weights).
    """

    block_size: int = 1024
    vocab_size: int = 50304  # GPT-2's 50257 padded up to a multiple of 64
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # bias in the Linears and LayerNorms, like GPT-2
    gelu_approximate: str = "none"

    def __post_init__(self) -> None:
        for name in ("block_size", "vocab_size", "n_head", "n_embd"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"GPTConfig: {name} must be a positive integer; got {getattr(self, name)!r}")
        if self.n_layer < 0:
            raise ValueError(f"GPTConfig: n_layer must be >= 0; got {self.n_layer!r}")
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"GPTConfig: n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig: dropout must be in [0, 1); got {self.dropout!r}")
        if self.gelu_approximate not in _GELU_APPROXIMATIONS:
            raise ValueError(f"GPTConfig: gelu_approximate must be 'none' or 'tanh'; got {self.gelu_approximate!r}")


def _plain_linear(m: nn.Module) -> bool:
    """True when calling F.linear on m's weight is what m(x) does (no subclass such as a LoRA wrapper, no hooks)."""
    return type(m) is nn.Linear and not m._forward_hooks and not m._forward_pre_hooks


def _plain_layer_norm(m: nn.Module) -> bool:
    return type(m) is LayerNorm and len(m.normalized_shape) == 1 and not m._forward_hooks and not m._forward_pre_hooks


def _add_then_norm(sub: Tensor, x: Tensor, ln: nn.Module, fused: bool) -> Tuple[Tensor, Tensor]:
    """``s = x + sub`` (the residual stream) and ``ln(s)``; one fused op when ``fused`` and ln allows it.

    The sum takes the promoted dtype, as eager ``x + sub`` does (under autocast the residual stream
    stays float32 while the sublayer output is bfloat16).
    """
    if fused and _plain_layer_norm(ln):
        dtype = torch.promote_types(x.dtype, sub.dtype)
        y, s = fastgpt.add_layer_norm(sub.to(dtype), x.to(dtype), ln.weight, ln.bias, ln.eps)
        return y, s
    s = x + sub
    return ln(s), s


class MLP(nn.Module):
    """nanoGPT's MLP: c_fc (n_embd -> 4 n_embd), GELU, c_proj (4 n_embd -> n_embd), dropout."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = GELU(approximate=config.gelu_approximate)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)
        self.use_fused_ops = True

    def forward(self, x: Tensor) -> Tensor:
        if self.use_fused_ops and self.c_fc.bias is not None and _plain_linear(self.c_fc) and type(self.gelu) is GELU:
            # the bias add moves from the matmul into the GELU pass: one read and write less
            h = fastgpt.bias_gelu(F.linear(x, self.c_fc.weight), self.c_fc.bias, self.gelu.approximate)
        else:
            h = self.gelu(self.c_fc(x))
        return self.dropout(self.c_proj(h))


class Block(nn.Module):
    """nanoGPT's pre-norm transformer block: ``x + attn(ln_1(x))``, then ``x + mlp(ln_2(x))``."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)
        self.use_fused_ops = True

    def forward(
        self, x: Tensor, kv_cache: Optional[KVCache] = None, *, pending: Optional[Tensor] = None, defer_residual: bool = False
    ) -> Tensor:
        """``x + attn(...) + mlp(...)``; with ``defer_residual=True`` returns :meth:`forward_residual`'s pair.

        GPT calls its blocks through here (``block(...)``), so module hooks, FSDP's unsharding and
        activation-checkpoint wrappers apply to each block as they do for nanoGPT's.
        """
        if defer_residual:
            return self.forward_residual(x, pending, kv_cache)
        x, m = self.forward_residual(x, pending, kv_cache)
        return x + m

    def forward_residual(self, x: Tensor, pending: Optional[Tensor], kv_cache: Optional[KVCache] = None) -> Tuple[Tensor, Tensor]:
        """The block with its last residual add deferred: returns ``(x, m)`` where the output is ``x + m``.

        ``pending``, the previous block's deferred MLP output (or None), is added to x inside ln_1,
        so consecutive blocks fuse every residual add with the layer norm that follows it.
        """
        fused = self.use_fused_ops
        if pending is None:
            h = self.ln_1(x)
        else:
            h, x = _add_then_norm(pending, x, self.ln_1, fused)
        h, x = _add_then_norm(self.attn(h, kv_cache), x, self.ln_2, fused)
        return x, self.mlp(h)


class GPT(nn.Module):
    """nanoGPT's GPT language model (same constructor, methods, parameter names and initialisation).

    ``forward(idx, targets=None)`` takes token ids idx (B, T) int64, T <= block_size, and returns
    ``(logits, loss)``: logits (B, T, vocab_size) and the mean cross-entropy (targets -1 are ignored)
    when targets (B, T) are given, else logits (B, 1, vocab_size) for the last position and None.
    """

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        if config.vocab_size is None or config.block_size is None:
            raise ValueError("GPT: config.vocab_size and config.block_size must be set")
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=LayerNorm(config.n_embd, bias=config.bias),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying, as GPT-2 and nanoGPT
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):  # GPT-2's scaled init of the residual projections
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    # ---- nanoGPT's methods ------------------------------------------------------------------

    @property
    def use_fused_ops(self) -> bool:
        """Fuse bias + GELU and residual add + layer norm (default True); False runs the plain formulation."""
        return all(b.use_fused_ops for b in self.transformer.h) if len(self.transformer.h) else True

    @use_fused_ops.setter
    def use_fused_ops(self, value: bool) -> None:
        for b in self.transformer.h:
            b.use_fused_ops = b.mlp.use_fused_ops = bool(value)

    def get_num_params(self, non_embedding: bool = True) -> int:
        """Number of parameters; ``non_embedding`` subtracts the position embeddings (wte is shared with lm_head)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.transformer.wpe.weight.numel()
        return n

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx: Tensor, targets: Optional[Tensor] = None) -> Tuple[Tensor, Optional[Tensor]]:
        x = self._hidden(idx, None)
        if targets is not None:
            logits = self.lm_head(x)
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        else:
            logits = self.lm_head(x[:, [-1], :])  # inference: only the last position (a list keeps the time dim)
            loss = None
        return logits, loss

    def _hidden(self, idx: Tensor, caches: Optional[List[KVCache]]) -> Tensor:
        """Final hidden states (B, T, n_embd) of idx (B, T); with caches, idx continues the cached positions."""
        if idx.dim() != 2:
            raise ValueError(f"GPT: idx must be (batch, time) token ids; got shape {tuple(idx.shape)}")
        t = idx.shape[1]
        start = caches[0].length if caches else 0
        if start + t > self.config.block_size:
            raise ValueError(f"GPT: cannot forward a sequence of length {start + t}: block_size is only {self.config.block_size}")
        pos = torch.arange(start, start + t, dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        pending = None
        for i, block in enumerate(self.transformer.h):
            x, pending = block(x, caches[i] if caches else None, pending=pending, defer_residual=True)
        if pending is None:
            return self.transformer.ln_f(x)
        return _add_then_norm(pending, x, self.transformer.ln_f, self.use_fused_ops)[0]

    def crop_block_size(self, block_size: int) -> None:
        """Model surgery: shrink the context to ``block_size`` (e.g. GPT-2's 1024 down to 256)."""
        if not 0 < block_size <= self.config.block_size:
            raise ValueError(f"crop_block_size: block_size must be in [1, {self.config.block_size}]; got {block_size}")
        self.config.block_size = block_size
        self.transformer.wpe.weight = nn.Parameter(self.transformer.wpe.weight[:block_size])

    def configure_optimizers(self, weight_decay: float, learning_rate: float, betas, device_type: str) -> torch.optim.AdamW:
        """AdamW with weight decay on the 2-D parameters (matmul weights, embeddings) only; fused on CUDA."""
        params = [p for p in self.parameters() if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        use_fused = device_type == "cuda" and "fused" in inspect.signature(torch.optim.AdamW).parameters
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, **({"fused": True} if use_fused else {}))

    def estimate_mfu(self, fwdbwd_per_iter: int, dt: float) -> float:
        """Model FLOPs utilisation in units of the A100's 312 TFLOP/s bf16 peak (PaLM appendix B), as nanoGPT."""
        n = self.get_num_params()
        cfg = self.config
        heads, head_dim, t = cfg.n_head, cfg.n_embd // cfg.n_head, cfg.block_size
        flops_per_token = 6 * n + 12 * cfg.n_layer * heads * head_dim * t
        flops_per_iter = flops_per_token * t * fwdbwd_per_iter
        return flops_per_iter / dt / 312e12

    @torch.no_grad()
    def generate(
        self,
        idx: Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: Optional[int] = None,
        use_cache: bool = True,
    ) -> Tensor:
        """Extend idx (B, T) by ``max_new_tokens`` sampled tokens; returns (B, T + max_new_tokens).

        As nanoGPT: the context is the last ``block_size`` tokens, logits are divided by
        ``temperature``, ``top_k`` keeps the k most likely tokens (``top_k=1`` is greedy). Call
        ``model.eval()`` first. With ``use_cache`` (the default) the prompt is run once (prefill) and
        each new token attends to the cached keys and values (one query over the cached keys; the
        bottom-right causal mask makes that exact). Once the context is full the window slides and
        every position embedding changes, so cached keys are stale: from then on each step recomputes
        the window without a cache, exactly what nanoGPT computes.
        """
        bs = self.config.block_size
        caches = [KVCache(bs) for _ in self.transformer.h] if use_cache and len(self.transformer.h) else None
        for _ in range(max_new_tokens):
            if caches is not None and caches[0].length == 0:
                x = self._hidden(idx[:, -bs:], caches)  # prefill
            elif caches is not None and caches[0].length < bs:
                x = self._hidden(idx[:, -1:], caches)  # one new position
            else:
                caches = None
                x = self._hidden(idx[:, -bs:], None)
            logits = self.lm_head(x[:, -1, :]) / temperature
            if top_k is not None:
                v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                logits[logits < v[:, [-1]]] = -float("inf")
            probs = F.softmax(logits, dim=-1)
            idx = torch.cat((idx, torch.multinomial(probs, num_samples=1)), dim=1)
        return idx

    # ---- loading --------------------------------------------------------------------------------

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """``nn.Module.load_state_dict``, also accepting the keys of a ``torch.compile``d model (``_orig_mod.``)."""
        prefix = "_orig_mod."
        if any(k.startswith(prefix) for k in state_dict):
            state_dict = {k[len(prefix) :] if k.startswith(prefix) else k: v for k, v in state_dict.items()}
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    @classmethod
    def from_hf(cls, model_or_path, dropout: float = 0.0) -> "GPT":
        """A GPT with the weights of a Hugging Face GPT-2 model: a ``GPT2LMHeadModel`` (or ``GPT2Model``)
        object, or the path of a local folder written by its ``save_pretrained``. Never downloads.

        HF's Conv1D weights (in, out) are transposed to nn.Linear's (out, in). The GELU approximation
        follows ``config.activation_function`` ("gelu_new" and friends: tanh). The result is on the HF
        model's device and dtype, in training mode like a new module; ``dropout`` sets GPTConfig.dropout.
        Raises ValueError for GPT-2 options this architecture does not have (cross-attention, untied
        lm_head, n_inner != 4 n_embd, layer_norm_epsilon != 1e-5, unscaled or layer-scaled attention).
        """
        hf = _load_hf_gpt2(model_or_path)
        config = _config_from_hf(hf.config, dropout)
        hf_sd = hf.state_dict()
        base = "transformer." if any(k.startswith("transformer.") for k in hf_sd) else ""
        wte = hf_sd[base + "wte.weight"]
        head = hf_sd.get("lm_head.weight")
        if head is not None and head.data_ptr() != wte.data_ptr() and not torch.equal(head, wte):
            raise ValueError("GPT.from_hf: the model's lm_head is not tied to wte; fastgpt.GPT ties them (as GPT-2)")
        model = cls(config).to(device=wte.device, dtype=wte.dtype)
        conv1d = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
        sd = {}
        for key in model.state_dict():
            src = wte if key == "lm_head.weight" else hf_sd[base + key.removeprefix("transformer.")]
            sd[key] = src.t() if key.endswith(conv1d) else src
        model.load_state_dict(sd, strict=True)
        return model

    @classmethod
    def from_pretrained(cls, model_type: str, override_args: Optional[dict] = None) -> "GPT":
        """nanoGPT's ``from_pretrained``: 'gpt2', 'gpt2-medium', 'gpt2-large', 'gpt2-xl', or a local folder.

        The weights come from the local Hugging Face cache (``local_files_only=True``); fastgpt never
        downloads. ``override_args`` may only set ``dropout``.
        """
        override_args = override_args or {}
        if any(k != "dropout" for k in override_args):
            raise ValueError(f"from_pretrained: only 'dropout' can be overridden; got {sorted(override_args)}")
        if model_type not in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl") and not os.path.isdir(model_type):
            raise ValueError(f"from_pretrained: model_type must be a GPT-2 name or a local folder; got {model_type!r}")
        from transformers import GPT2LMHeadModel

        hf = GPT2LMHeadModel.from_pretrained(model_type, local_files_only=True, weights_only=True)
        return cls.from_hf(hf, dropout=override_args.get("dropout", 0.0))


# --------------------------------------------------------------------------------------------
# Hugging Face import helpers (transformers is imported only here, on use)
# --------------------------------------------------------------------------------------------

_HF_TANH = ("gelu_new", "gelu_fast", "gelu_pytorch_tanh", "gelu_python_tanh")
_HF_ERF = ("gelu", "gelu_python")


def _load_hf_gpt2(model_or_path):
    if isinstance(model_or_path, (str, os.PathLike)):
        path = os.fspath(model_or_path)
        if not os.path.isdir(path):
            raise ValueError(
                f"GPT.from_hf: {path!r} is not a local folder; pass a GPT2LMHeadModel or a folder written by "
                "save_pretrained (fastgpt never downloads weights)"
            )
        from transformers import GPT2LMHeadModel

        try:  # weights_only: a pickled .bin file is read by torch's safe unpickler, never executed
            return GPT2LMHeadModel.from_pretrained(path, local_files_only=True, weights_only=True)
        except pickle.UnpicklingError:
            raise ValueError(f"GPT.from_hf: {path!r} holds weights with objects other than tensors; refused (nothing in them was run)") from None
    config = getattr(model_or_path, "config", None)
    if not isinstance(model_or_path, nn.Module) or getattr(config, "model_type", None) != "gpt2":
        raise TypeError(
            f"GPT.from_hf: expected a transformers GPT2LMHeadModel/GPT2Model or a folder path; got {type(model_or_path).__name__}"
        )
    return model_or_path


def _config_from_hf(hf_cfg, dropout: float) -> GPTConfig:
    act = hf_cfg.activation_function
    if act in _HF_TANH:
        approximate = "tanh"
    elif act in _HF_ERF:
        approximate = "none"
    else:
        raise ValueError(f"GPT.from_hf: activation_function {act!r} is not a GELU fastgpt.GPT implements")
    checks = [
        ("n_inner", hf_cfg.n_inner in (None, 4 * hf_cfg.n_embd), "None or 4 * n_embd"),
        ("layer_norm_epsilon", hf_cfg.layer_norm_epsilon == 1e-5, "1e-5"),
        ("scale_attn_weights", bool(hf_cfg.scale_attn_weights), "True"),
        ("scale_attn_by_inverse_layer_idx", not hf_cfg.scale_attn_by_inverse_layer_idx, "False"),
        ("add_cross_attention", not getattr(hf_cfg, "add_cross_attention", False), "False"),
    ]
    for name, ok, expected in checks:
        if not ok:
            raise ValueError(f"GPT.from_hf: config.{name} = {getattr(hf_cfg, name)!r} is not supported; expected {expected}")
    return GPTConfig(
        block_size=hf_cfg.n_positions,
        vocab_size=hf_cfg.vocab_size,
        n_layer=hf_cfg.n_layer,
        n_head=hf_cfg.n_head,
        n_embd=hf_cfg.n_embd,
        dropout=dropout,
        bias=True,
        gelu_approximate=approximate,
    )
