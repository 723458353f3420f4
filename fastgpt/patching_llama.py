"""The Llama family in :func:`fastgpt.patch`: ``torch.nn.RMSNorm`` anywhere, and Hugging Face's Llama,
Mistral and Qwen2 causal LMs.

What is recognised (``fastgpt.patching`` holds the class-swap machinery, the "fastgpt" attention
implementation and the report; this module says what a Llama-family module becomes):

* ``rms_norm``: ``torch.nn.RMSNorm`` (``F.rms_norm``'s semantics, eps=None included) and
  transformers' ``LlamaRMSNorm``/``MistralRMSNorm``/``Qwen2RMSNorm`` (float32 statistics, the
  normalized x rounded to the input dtype before the weight: ``cast_before_weight=True``).
* ``rotary``: the models' attention classes run their own forward with ``apply_rotary_pos_emb``
  bound to fastgpt's (see :func:`rotary_forward`).
* ``swiglu``: the ``*MLP`` classes, ``down(act(gate(x)) * up(x))``, when ``act`` is SiLU: ``down(swiglu(gate(x), up(x)))``.
* ``linear_cross_entropy``: the ``*ForCausalLM`` classes, when ``labels`` are passed in training mode
  (see :func:`causal_lm_loss`).
* ``attention`` is ``fastgpt.patching``'s: the config's attention implementation becomes "fastgpt"
  (GQA without copies), sliding windows included (see :func:`attention_note`).

Each family's classes are matched exactly (a subclass that keeps the forward counts): these are
transformers' own modules, so no probe run is needed. Only the modeling modules already imported are
looked at (patching never imports a model family).
"""

from __future__ import annotations

import functools
import inspect
import sys
import types
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import fastgpt
from fastgpt import nn as fnn

# transformers' modeling module of each family -> the prefix of its class names
HF_FAMILIES = {
    "transformers.models.llama.modeling_llama": "Llama",
    "transformers.models.mistral.modeling_mistral": "Mistral",
    "transformers.models.qwen2.modeling_qwen2": "Qwen2",
}
HF_ATTENTION = tuple(f"{prefix}Attention" for prefix in HF_FAMILIES.values())  # switched to "fastgpt" attention


# --------------------------------------------------------------------------------------------
# the replacement forwards (mixins placed in front of the original class by fastgpt.patching)
# --------------------------------------------------------------------------------------------


class _HFRMSNorm(nn.Module):
    """transformers' LlamaRMSNorm: ``weight * (x.float() * rsqrt(mean(x^2) + eps)).to(x.dtype)``."""

    def forward(self, hidden_states: Tensor) -> Tensor:
        w = self.weight
        return fastgpt.rms_norm(hidden_states, w.shape, w, self.variance_epsilon, cast_before_weight=True)


class _HFSwiGLUMLP(nn.Module):
    """transformers' LlamaMLP with a SiLU ``act_fn``: ``down_proj(silu(gate_proj(x)) * up_proj(x))``."""

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(fastgpt.swiglu(self.gate_proj(x), self.up_proj(x)))


class _HFRotaryAttention(nn.Module):
    """A marker: the patched class's ``forward`` is the original's with fastgpt's rotary (:func:`rotary_forward`)."""


class _HFFusedLossCausalLM(nn.Module):
    """``*ForCausalLM`` whose training loss is :func:`fastgpt.linear_cross_entropy` (see :func:`causal_lm_loss`)."""

    def forward(self, *args, **kwargs):
        original = super().forward
        if not self.training:  # generation and evaluation: transformers' forward, logits included
            return original(*args, **kwargs)
        names = type(self)._fastgpt_forward_parameters
        if len(args) > len(names):
            return original(*args, **kwargs)  # let transformers report the bad call
        call = dict(zip(names, args))
        if call.keys() & kwargs.keys():
            return original(*args, **kwargs)
        call.update(kwargs)
        labels, keep = call.get("labels"), call.get("logits_to_keep", 0)
        if labels is None or not (isinstance(keep, int) and keep == 0) or not _default_loss(self):
            return original(*args, **kwargs)
        return _fused_loss_forward(self, call)


def _default_loss(model: nn.Module) -> bool:
    """transformers' own causal-LM loss: no loss function set on the model, loss_type ForCausalLM."""
    return "_loss_function" not in model.__dict__ and getattr(model, "loss_type", None) in (None, "ForCausalLM")


def causal_lm_loss(hidden: Tensor, lm_head: nn.Linear, labels: Tensor, num_items_in_batch=None, ignore_index: int = -100,
                   shift_labels: Optional[Tensor] = None, **_) -> Tensor:
    """transformers' ``ForCausalLMLoss`` on ``lm_head(hidden)`` without the logits: labels shifted by one
    (or ``shift_labels`` as given), ``ignore_index`` rows left out, the mean over the rest, or the sum
    divided by ``num_items_in_batch`` when that is given (gradient accumulation). float32 like
    transformers' (which upcasts the logits). Where every label is ignored the mean is 0 (transformers
    gives NaN)."""
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    reduction = "sum" if num_items_in_batch is not None else "mean"
    loss = fastgpt.linear_cross_entropy(hidden, lm_head.weight, shift_labels.to(hidden.device), lm_head.bias,
                                        ignore_index=ignore_index, reduction=reduction, loss_dtype=torch.float32)
    if num_items_in_batch is not None:
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch
    return loss


def _fused_loss_forward(model: nn.Module, call: Dict):
    """The causal LM's forward with the loss of :func:`causal_lm_loss` and ``logits=None``: the base
    model runs exactly as in transformers' forward; the other outputs (cache, hidden states,
    attentions) are passed on under the base model's names."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    labels = call.pop("labels")
    call.pop("logits_to_keep", None)
    return_dict = call.pop("return_dict", None)
    if return_dict is None:
        return_dict = getattr(model.config, "return_dict", True)
    # like transformers' forward: every other argument goes to the base model, and the loss sees them too
    outputs = getattr(model, model.base_model_prefix)(**call)
    loss = causal_lm_loss(outputs[0], model.lm_head, labels, **call)
    rest = {k: v for k, v in outputs.items() if k != "last_hidden_state"}
    out = CausalLMOutputWithPast(loss=loss, logits=None, **rest)
    return out if return_dict else out.to_tuple()


# --------------------------------------------------------------------------------------------
# rotary: the attention's own forward, with fastgpt's apply_rotary_pos_emb
# --------------------------------------------------------------------------------------------

ROTARY_NAME = "apply_rotary_pos_emb"


def _rotary_v5(q, k, cos, sin, unsqueeze_dim=1):
    """transformers 5's ``apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)`` on fastgpt's op."""
    return fastgpt.apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)


def _rotary_v4(q, k, cos, sin, position_ids=None, unsqueeze_dim=1):
    """transformers 4's ``apply_rotary_pos_emb(q, k, cos, sin, position_ids=None, unsqueeze_dim=1)``."""
    return fastgpt.apply_rotary_pos_emb(q, k, cos, sin, position_ids, unsqueeze_dim)


_ROTARY_SIGNATURES = {("q", "k", "cos", "sin", "unsqueeze_dim"): _rotary_v5,
                      ("q", "k", "cos", "sin", "position_ids", "unsqueeze_dim"): _rotary_v4}


def _rebind(fn, name: str, value, depth: int = 0):
    """A copy of function ``fn`` whose global ``name`` is ``value``, also inside the functions its closure
    holds (decorators such as transformers' ``deprecate_kwarg`` keep the real forward in a closure
    cell); None when no function in that chain reads the global ``name``."""
    if not isinstance(fn, types.FunctionType) or depth > 4:
        return None
    changed = False
    cells = []
    for cell in fn.__closure__ or ():
        try:
            inner = _rebind(cell.cell_contents, name, value, depth + 1)
        except ValueError:  # an empty cell
            inner = None
        changed |= inner is not None
        cells.append(types.CellType(inner) if inner is not None else cell)
    glob = fn.__globals__
    if name in fn.__code__.co_names and name in glob:
        glob, changed = {**glob, name: value}, True
    if not changed:
        return None
    new = types.FunctionType(fn.__code__, glob, fn.__name__, fn.__defaults__, tuple(cells) if fn.__closure__ else None)
    new.__kwdefaults__ = dict(fn.__kwdefaults__) if fn.__kwdefaults__ else None
    new.__dict__.update(fn.__dict__)
    new.__qualname__, new.__doc__, new.__module__ = fn.__qualname__, fn.__doc__, fn.__module__
    return new


@functools.lru_cache(maxsize=None)
def rotary_forward(original: type) -> Tuple[Optional[Callable], Optional[str]]:
    """(forward, None): ``original.forward`` with ``apply_rotary_pos_emb`` bound to fastgpt's, or (None, why not).

    Why this way: the attention forward calls its modeling module's global ``apply_rotary_pos_emb``.
    Rebinding that global in transformers' module would change every model of the family in the
    process, patched or not, and writing our own attention forward would copy transformers' (cache
    update, attention interface, projections) and drift from it across versions. A copy of the
    original forward function whose globals are the module's with that one name rebound changes
    exactly the patched classes, and runs transformers' code otherwise unchanged.
    """
    hf_rotary = sys.modules[original.__module__].__dict__.get(ROTARY_NAME)
    try:
        names = tuple(inspect.signature(hf_rotary).parameters) if hf_rotary is not None else ()
    except (TypeError, ValueError):
        names = ()
    ours = _ROTARY_SIGNATURES.get(names)
    if ours is None:
        return None, f"its module's {ROTARY_NAME} has an unknown signature ({', '.join(names) or 'none'})"
    forward = _rebind(original.forward, ROTARY_NAME, ours)
    if forward is None:
        return None, f"its forward does not call {ROTARY_NAME}"
    return forward, None


def _rotary_class_attrs(original: type) -> Dict[str, object]:
    forward, _ = rotary_forward(original)
    return {"forward": forward}


def _fused_loss_class_attrs(original: type) -> Dict[str, object]:
    params = list(inspect.signature(original.forward).parameters.values())[1:]
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return {
        # transformers writes the class name into config.architectures on save_pretrained (what loaders
        # read to pick the model class): the patched causal LM keeps the original's name
        "__name__": original.__name__,
        # the forward's positional parameters after self, read once here (the forward runs under torch.compile)
        "_fastgpt_forward_parameters": tuple(p.name for p in params if p.kind in kinds),
    }


# --------------------------------------------------------------------------------------------
# recognising modules
# --------------------------------------------------------------------------------------------

# kind -> mixin, family (the registry op name patch(ops=...) selects), description; the kind names
# are part of the pickle format of patched modules: keep them stable
KINDS = {"rms_norm": fnn.RMSNorm, "hf_rms_norm": _HFRMSNorm, "hf_rotary_attention": _HFRotaryAttention,
         "hf_swiglu_mlp": _HFSwiGLUMLP, "hf_fused_loss": _HFFusedLossCausalLM}
FAMILY = {"rms_norm": "rms_norm", "hf_rms_norm": "rms_norm", "hf_rotary_attention": "rotary", "hf_swiglu_mlp": "swiglu",
          "hf_fused_loss": "linear_cross_entropy"}
DESCRIPTION = {
    "rms_norm": "fastgpt.rms_norm",
    "hf_rms_norm": "fastgpt.rms_norm(cast_before_weight=True)",
    "hf_rotary_attention": "rotary: fastgpt.apply_rotary_pos_emb",
    "hf_swiglu_mlp": "fastgpt.swiglu(gate_proj(x), up_proj(x))",
    "hf_fused_loss": "loss: fastgpt.linear_cross_entropy when labels are passed in training (logits returned as None)",
}
CLASS_ATTRS: Dict[str, Callable[[type], Dict[str, object]]] = {"hf_rotary_attention": _rotary_class_attrs,
                                                               "hf_fused_loss": _fused_loss_class_attrs}
_SUFFIX_KIND = {"RMSNorm": "hf_rms_norm", "MLP": "hf_swiglu_mlp", "Attention": "hf_rotary_attention", "ForCausalLM": "hf_fused_loss"}


def hf_classes() -> Dict[type, str]:
    """transformers' Llama-family classes -> patch kind, for the modeling modules already imported."""
    table = {}
    for module_name, prefix in HF_FAMILIES.items():
        module = sys.modules.get(module_name)
        for suffix, kind in _SUFFIX_KIND.items():
            cls = getattr(module, prefix + suffix, None) if module is not None else None
            if isinstance(cls, type):
                table[cls] = kind
    return table


def _is_silu(act) -> bool:
    from transformers import activations

    silu = (nn.SiLU.forward, getattr(getattr(activations, "SiLUActivation", None), "forward", None))
    return isinstance(act, nn.Module) and type(act).forward in silu


def classify(m: nn.Module, hf: Dict[type, str]) -> Tuple[Optional[str], Optional[str]]:
    """(kind, None) when m is a Llama-family module fastgpt patches; (None, why not) when it is one it
    cannot; (None, None) when it is none of them."""
    cls = type(m)
    if isinstance(m, nn.RMSNorm):
        if cls.forward is not nn.RMSNorm.forward:
            return None, "its forward differs from torch.nn.RMSNorm's"
        return "rms_norm", None
    base = next((c for c in cls.__mro__ if c in hf), None)
    if base is None:
        if hf and _is_silu(m):
            return None, "no fastgpt op of its own (the Llama-family MLPs fastgpt recognises fuse it into fastgpt.swiglu)"
        if cls.__name__.endswith("RotaryEmbedding") and cls.__module__ in HF_FAMILIES:
            return None, "it computes the cos/sin tables once per forward; fastgpt patches their application in the attention"
        return None, None
    kind = hf[base]
    if cls.forward is not base.forward:
        return None, f"its forward differs from {base.__module__}.{base.__qualname__}'s"
    if kind == "hf_swiglu_mlp" and not _is_silu(getattr(m, "act_fn", None)):
        act = type(getattr(m, "act_fn", None))
        return None, f"its act_fn is {act.__module__}.{act.__qualname__}, not SiLU (fastgpt.swiglu is silu(gate) * up)"
    if kind == "hf_rotary_attention":
        reason = rotary_forward(base)[1]
        if reason is not None:
            return None, reason
    if kind == "hf_fused_loss" and not (type(getattr(m, "lm_head", None)) is nn.Linear and getattr(m, "base_model_prefix", "") in m._modules):
        return None, "its lm_head is not a plain torch.nn.Linear next to its base model"
    return kind, None


def attention_note(m: nn.Module) -> str:
    """What the report adds for this Llama-family attention module: its sliding window, if it has one
    (Mistral's config.sliding_window; Qwen2 sets the module's own on its sliding layers only)."""
    window = getattr(m, "sliding_window", getattr(getattr(m, "config", None), "sliding_window", None))
    return f", sliding_window={window}" if window is not None else ""
