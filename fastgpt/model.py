"""GPT: nanoGPT's model on fastgpt's ops, its Llama-style variant, Hugging Face import, and generation with a KV cache.

``GPTConfig`` and ``GPT`` keep nanoGPT's API and parameter names (``transformer.wte``, ``wpe``, ``drop``,
``h.N.ln_1``, ``h.N.attn.c_attn``, ``h.N.attn.c_proj``, ``h.N.ln_2``, ``h.N.mlp.c_fc``, ``h.N.mlp.c_proj``,
``ln_f``, ``lm_head`` tied to ``wte``), so a nanoGPT checkpoint's ``model`` state_dict loads with
``strict=True`` and nanoGPT's train.py runs unchanged with ``from fastgpt import GPT, GPTConfig``.

What is computed differently from nanoGPT (the numbers stay within the parity rule of fastgpt.testing):

* attention is :func:`fastgpt.flash_attn_func` (one custom op; the heads are read in place),
* the MLP's bias + GELU is :func:`fastgpt.bias_gelu` after a bias-free ``F.linear``,
* each residual add is fused with the norm that follows it (:func:`fastgpt.add_layer_norm` or
  :func:`fastgpt.add_rms_norm`), across block boundaries too (the MLP output of block i is added
  inside block i+1's ``ln_1``).

``GPT.use_fused_ops`` (default True) switches the last two off, for comparisons.

The Llama-style options of ``GPTConfig`` (``norm="rmsnorm"``, ``positional="rotary"``, ``mlp="swiglu"``,
``n_kv_head``, ``tie_embeddings=False``; ``ARCHITECTURES["llama"]`` sets them) build the same model with
RMSNorm, rotary embeddings, a SwiGLU MLP and grouped-query attention, and train with the fused
linear cross-entropy (:attr:`GPT.fused_loss`). The modules live in :mod:`fastgpt.model_blocks`, the
Hugging Face import in :mod:`fastgpt.model_hf`.
"""

from __future__ import annotations

import inspect
import math
import os
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F

import fastgpt
from fastgpt.model_blocks import MLP, Block, SwiGLUMLP, _add_then_norm, _plain_linear, make_norm, rope_tables
from fastgpt.nn import KVCache

__all__ = ["GPTConfig", "GPT", "Block", "MLP", "SwiGLUMLP", "ARCHITECTURES"]

_GELU_APPROXIMATIONS = ("none", "tanh")
_NORMS = ("layernorm", "rmsnorm")
_POSITIONALS = ("learned", "rotary")
_MLPS = ("gelu", "swiglu")

# named architectures (``fastgpt train --arch``): the GPTConfig fields each sets
ARCHITECTURES = {
    "gpt2": {},
    "llama": dict(norm="rmsnorm", positional="rotary", mlp="swiglu", tie_embeddings=False),
}


@dataclass
class GPTConfig:
    """nanoGPT's GPTConfig (same fields, defaults and meaning) plus options; the defaults are GPT-2.

    * ``gelu_approximate``: "none" (erf GELU, nanoGPT's ``nn.GELU()``) or "tanh" (GPT-2's
      ``gelu_new``, what :meth:`GPT.from_hf` sets for OpenAI GPT-2 weights).
    * ``norm``: "layernorm" (bias iff ``bias``) or "rmsnorm" (no bias); ``norm_eps`` its epsilon.
    * ``positional``: "learned" (``transformer.wpe``) or "rotary" (no ``wpe``; Llama's half-rotation
      rotary embeddings with base ``rope_theta``; needs an even head dim). No rope scaling.
    * ``mlp``: "gelu" (c_fc, GELU, c_proj) or "swiglu" (c_fc holds gate then up; ``c_proj(silu(gate) * up)``);
      ``intermediate_size``: the MLP's hidden width, default 4 * n_embd for "gelu" and Llama's rule for
      "swiglu" (2/3 of 4 * n_embd, rounded up to a multiple of 256).
    * ``n_kv_head``: key/value heads (grouped-query attention; divides n_head; default n_head).
    * ``qkv_bias``: bias in the q, k, v projection (default: ``bias``; Qwen2 has it without other biases).
    * ``tie_embeddings``: lm_head shares wte's weight (GPT-2, nanoGPT) or has its own (Llama).

    A bad value raises ValueError naming the field. The fields hold plain data (checkpoints store
    ``dataclasses.asdict(config)``; a checkpoint from before a field existed rebuilds with its default).
    """

    block_size: int = 1024
    vocab_size: int = 50304  # GPT-2's 50257 padded up to a multiple of 64
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # bias in the Linears and LayerNorms, like GPT-2
    gelu_approximate: str = "none"
    norm: str = "layernorm"
    norm_eps: float = 1e-5
    positional: str = "learned"
    rope_theta: float = 10000.0
    mlp: str = "gelu"
    intermediate_size: Optional[int] = None
    n_kv_head: Optional[int] = None
    qkv_bias: Optional[bool] = None
    tie_embeddings: bool = True

    def __post_init__(self) -> None:
        def fail(name: str, expected: str) -> None:
            raise ValueError(f"GPTConfig: {name} must be {expected}; got {getattr(self, name)!r}")

        for name in ("block_size", "vocab_size", "n_head", "n_embd"):
            if int(getattr(self, name)) < 1:
                fail(name, "a positive integer")
        if self.n_layer < 0:
            fail("n_layer", ">= 0")
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"GPTConfig: n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head})")
        if not 0.0 <= self.dropout < 1.0:
            fail("dropout", "in [0, 1)")
        for name, choices in (("gelu_approximate", _GELU_APPROXIMATIONS), ("norm", _NORMS), ("positional", _POSITIONALS), ("mlp", _MLPS)):
            if getattr(self, name) not in choices:
                fail(name, " or ".join(map(repr, choices)))
        for name in ("norm_eps", "rope_theta"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                fail(name, "a finite number > 0")
        for name in ("intermediate_size", "n_kv_head"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                fail(name, "None or a positive integer")
        if self.n_kv_head is not None and self.n_head % self.n_kv_head:
            raise ValueError(f"GPTConfig: n_kv_head ({self.n_kv_head}) must divide n_head ({self.n_head})")
        if self.qkv_bias is not None and not isinstance(self.qkv_bias, bool):
            fail("qkv_bias", "None or a bool")
        if not isinstance(self.tie_embeddings, bool):
            fail("tie_embeddings", "a bool")
        if self.positional == "rotary" and self.head_dim % 2:
            raise ValueError(f"GPTConfig: positional 'rotary' needs an even head dim; n_embd / n_head = {self.head_dim}")

    # derived values (computed on use: nanoGPT code edits config fields after construction)

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def kv_heads(self) -> int:
        """n_kv_head, or n_head when it is None."""
        return self.n_head if self.n_kv_head is None else self.n_kv_head

    @property
    def mlp_hidden(self) -> int:
        """The MLP's hidden width: intermediate_size, or its default (see the class docstring)."""
        if self.intermediate_size is not None:
            return self.intermediate_size
        if self.mlp == "gelu":
            return 4 * self.n_embd
        return 256 * math.ceil(int(2 * 4 * self.n_embd / 3) / 256)

    @property
    def mha_learned(self) -> bool:
        """Attention is nanoGPT's: as many kv heads as query heads, learned positions, qkv bias as ``bias``."""
        return self.kv_heads == self.n_head and self.positional == "learned" and self.qkv_bias in (None, self.bias)

    @property
    def gpt2_architecture(self) -> bool:
        """Every option at GPT-2's value: the model nanoGPT builds (and whose checkpoints it loads)."""
        return (self.mha_learned and self.norm == "layernorm" and self.norm_eps == 1e-5 and self.mlp == "gelu"
                and self.mlp_hidden == 4 * self.n_embd and self.tie_embeddings)


class GPT(nn.Module):
    """nanoGPT's GPT language model (same constructor, methods, parameter names and initialisation).

    ``forward(idx, targets=None)`` takes token ids idx (B, T) int64, T <= block_size, and returns
    ``(logits, loss)``. Without targets: logits (B, 1, vocab_size) of the last position, and None.
    With targets (B, T) the loss is the mean cross-entropy (targets -1 are ignored), and the logits
    depend on :attr:`fused_loss`:

    * ``fused_loss`` False (the default for GPT-2's architecture, nanoGPT's contract): logits
      (B, T, vocab_size), and the loss computed from them;
    * ``fused_loss`` True (the default for every other configuration, e.g. Llama-style): logits are
      **None**, and the loss is :func:`fastgpt.linear_cross_entropy` of the final hidden states and the
      lm_head weight, chunk by chunk: the (B*T, vocab_size) logits never exist, in the forward or the
      backward (as Liger-Kernel's fused loss, which also returns no logits). Under autocast its
      matmuls run in the autocast dtype, as ``lm_head(x)`` would, and the loss has that dtype.

    Set ``model.fused_loss`` to choose. An lm_head that is not a plain ``nn.Linear`` (hooks, a LoRA
    wrapper) is always called, with the logits returned.
    """

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        if config.vocab_size is None or config.block_size is None:
            raise ValueError("GPT: config.vocab_size and config.block_size must be set")
        self.config = config
        modules = dict(wte=nn.Embedding(config.vocab_size, config.n_embd))
        if config.positional == "learned":
            modules["wpe"] = nn.Embedding(config.block_size, config.n_embd)
        modules.update(
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=make_norm(config),
        )
        self.transformer = nn.ModuleDict(modules)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.transformer.wte.weight = self.lm_head.weight  # weight tying, as GPT-2 and nanoGPT
        self.fused_loss = not config.gpt2_architecture
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):  # GPT-2's scaled init of the residual projections
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    # ---- nanoGPT's methods ------------------------------------------------------------------

    @property
    def use_fused_ops(self) -> bool:
        """Fuse bias + GELU and residual add + norm (default True); False runs the plain formulation."""
        return all(b.use_fused_ops for b in self.transformer.h) if len(self.transformer.h) else True

    @use_fused_ops.setter
    def use_fused_ops(self, value: bool) -> None:
        for b in self.transformer.h:
            b.use_fused_ops = b.mlp.use_fused_ops = bool(value)

    def get_num_params(self, non_embedding: bool = True) -> int:
        """Number of parameters; ``non_embedding`` subtracts the embedding tables that are only looked up:
        the position embeddings, and wte when it is not tied to lm_head (a tied wte is a matmul weight)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            tables = [self.transformer[k].weight for k in ("wpe", "wte") if k in self.transformer]
            n -= sum(w.numel() for w in tables if w is not self.lm_head.weight)
        return n

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx: Tensor, targets: Optional[Tensor] = None) -> Tuple[Optional[Tensor], Optional[Tensor]]:
        x = self._hidden(idx, None)
        if targets is None:
            return self.lm_head(x[:, [-1], :]), None  # inference: only the last position (a list keeps the time dim)
        if self.fused_loss and _plain_linear(self.lm_head):
            return None, self._fused_loss(x, targets)
        logits = self.lm_head(x)
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def _fused_loss(self, x: Tensor, targets: Tensor) -> Tensor:
        """Mean cross-entropy of ``lm_head(x)`` against targets (-1 ignored), without the logits."""
        w, device = self.lm_head.weight, x.device.type
        if torch.is_autocast_enabled(device):  # the matmuls in the autocast dtype, as lm_head(x) would run them
            dtype = torch.get_autocast_dtype(device)
            x, w = x.to(dtype), w.to(dtype)
        elif x.dtype != w.dtype:
            x = x.to(w.dtype)
        with torch.autocast(device, enabled=False):  # the op's own matmuls keep the dtype chosen here
            # a float32 loss, as F.cross_entropy gives under autocast (it runs in float32 there)
            return fastgpt.linear_cross_entropy(x, w, targets, ignore_index=-1, loss_dtype=torch.float32)

    def _hidden(self, idx: Tensor, caches: Optional[List[KVCache]]) -> Tensor:
        """Final hidden states (B, T, n_embd) of idx (B, T); with caches, idx continues the cached positions."""
        if idx.dim() != 2:
            raise ValueError(f"GPT: idx must be (batch, time) token ids; got shape {tuple(idx.shape)}")
        t = idx.shape[1]
        start = caches[0].length if caches else 0
        if start + t > self.config.block_size:
            raise ValueError(f"GPT: cannot forward a sequence of length {start + t}: block_size is only {self.config.block_size}")
        x = self.transformer.wte(idx)
        rope = None
        if self.config.positional == "learned":
            x = x + self.transformer.wpe(torch.arange(start, start + t, dtype=torch.long, device=idx.device))
        else:  # the tables of these positions (float64 for a float64 model, else float32), shared by all blocks
            dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
            rope = rope_tables(start, t, self.config.head_dim, self.config.rope_theta, idx.device, dtype)
        x = self.transformer.drop(x)
        pending, kw = None, ({} if rope is None else {"rope": rope})
        for i, block in enumerate(self.transformer.h):
            x, pending = block(x, caches[i] if caches else None, pending=pending, defer_residual=True, **kw)
        if pending is None:
            return self.transformer.ln_f(x)
        return _add_then_norm(pending, x, self.transformer.ln_f, self.use_fused_ops)[0]

    def crop_block_size(self, block_size: int) -> None:
        """Model surgery: shrink the context to ``block_size`` (e.g. GPT-2's 1024 down to 256)."""
        if not 0 < block_size <= self.config.block_size:
            raise ValueError(f"crop_block_size: block_size must be in [1, {self.config.block_size}]; got {block_size}")
        self.config.block_size = block_size
        if "wpe" in self.transformer:
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
        every position (learned or rotary) changes, so cached keys are stale: from then on each step
        recomputes the window without a cache, exactly what nanoGPT computes. The cache holds
        min(block_size, T + max_new_tokens) positions per layer, of n_kv_head heads.
        """
        bs = self.config.block_size
        capacity = max(1, min(bs, idx.shape[1] + max_new_tokens))
        caches = [KVCache(capacity) for _ in self.transformer.h] if use_cache and len(self.transformer.h) else None
        for _ in range(max_new_tokens):
            if caches is not None and caches[0].length == 0:
                x = self._hidden(idx[:, -bs:], caches)  # prefill
            elif caches is not None and caches[0].length < capacity:
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
        """A GPT with the weights of a Hugging Face model, given as an object or as the path of a local
        folder written by its ``save_pretrained`` (weights read with ``weights_only=True`` or from
        safetensors). Never downloads.

        * GPT-2 (``GPT2LMHeadModel``, ``GPT2Model``): HF's Conv1D weights (in, out) are transposed to
          nn.Linear's (out, in); the GELU approximation follows ``config.activation_function``
          ("gelu_new" and friends: tanh). Raises ValueError for options this architecture does not
          have (cross-attention, untied lm_head, n_inner != 4 n_embd, layer_norm_epsilon != 1e-5,
          unscaled or layer-scaled attention).
        * Llama family (``LlamaForCausalLM``, ``MistralForCausalLM``, ``Qwen2ForCausalLM``, or their
          base models when the embeddings are tied): RMSNorm, rotary, SwiGLU, GQA, Qwen2's q/k/v bias;
          q, k, v are concatenated into ``attn.c_attn`` and gate, up into ``mlp.c_fc``, with no
          permutation (HF's rotate_half pairs the dims fastgpt's rotary pairs). block_size is
          ``max_position_embeddings`` (for Mistral at most ``sliding_window``, within which its
          attention is plain causal). Raises ValueError for rope scaling (Llama 3.1's "llama3" and
          others), partial rotary, a head_dim other than hidden_size / num_attention_heads, attention or
          MLP biases, sliding-window layers, or an activation other than SiLU.

        The result is on the HF model's device and dtype, in training mode like a new module;
        ``dropout`` sets GPTConfig.dropout.
        """
        from fastgpt import model_hf

        return model_hf.from_hf(cls, model_or_path, dropout)

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
