"""``fastgpt.patch(model)`` / ``fastgpt.unpatch(model)``: fastgpt's ops inside other people's models, in place.

What is recognised (each family can be switched off with ``ops``):

* ``layer_norm``: ``torch.nn.LayerNorm`` and subclasses that keep its forward; nanoGPT's
  ``LayerNorm(ndim, bias)`` (a class named LayerNorm whose only state is ``weight`` and ``bias``-or-None
  and whose forward calls nothing but ``F.layer_norm(input, weight.shape, weight, bias, 1e-5)``).
* ``gelu``: ``torch.nn.GELU`` (either approximation) and subclasses that keep its forward;
  transformers' ``NewGELUActivation``, ``FastGELUActivation``, ``GELUTanh``/``PytorchGELUTanh`` (tanh)
  and ``GELUActivation`` (erf).
* ``attention``: nanoGPT-style ``CausalSelfAttention`` (``c_attn``/``c_proj``/``n_head``/``n_embd``,
  flash or masked-softmax path: the forward may reference nothing beyond what nanoGPT's does); Hugging
  Face GPT-2 (``GPT2Attention``): "fastgpt" is registered with transformers' ``AttentionInterface``
  (and its mask interface) and the model's ``config._attn_implementation`` is switched to it; the
  same for Hugging Face Llama, Mistral and Qwen2 attention (GQA included). What that attention
  function computes for which mask (padding, packed sequences) is ``fastgpt/hf_attention.py``'s.
* ``rms_norm``, ``rotary``, ``swiglu``, ``linear_cross_entropy``: ``torch.nn.RMSNorm`` anywhere and the
  Hugging Face Llama family's norms, rotary application, SiLU MLPs and causal-LM loss
  (``fastgpt/patching_llama.py`` says what each becomes).

How: a module is patched by switching its ``__class__`` to a subclass of its own class whose forward
calls fastgpt's op. The module object, its parameters (same ``Parameter`` objects, same names), buffers
and hooks stay as they were, so optimizers, checkpoints, DDP and ``isinstance`` checks are unaffected;
:func:`unpatch` switches the class back. A patched module pickles and deep-copies as patched (the
pickle names only the original class and the kind of patch). Heuristically recognised modules
(nanoGPT's) are also checked on a small random input before they are switched: the fastgpt forward
must reproduce the original one, else the module is left alone and the report says why.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, Optional, Tuple

import torch
from torch import Tensor, nn

import fastgpt
from fastgpt import hf_attention, registry
from fastgpt import nn as fnn
from fastgpt import patching_llama as llama
from fastgpt.hf_attention import ATTN_IMPLEMENTATION

__all__ = ["patch", "unpatch", "PatchReport", "OPS"]

OPS = registry.names(lambda spec: spec.patchable)  # the ops patch() can swap into a model


@dataclass
class PatchReport:
    """What :func:`patch` (or :func:`unpatch`) did.

    ``replaced``: module path ("" is the model itself) -> "original -> replacement".
    ``left_alone``: module type -> why it was not patched (module types without a fastgpt op, of
    the families not requested, or not recognised).
    """

    replaced: Dict[str, str] = field(default_factory=dict)
    left_alone: Dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"fastgpt: {len(self.replaced)} module(s) changed"]
        lines += [f"  {path or '<model>'}: {what}" for path, what in self.replaced.items()]
        if self.left_alone:
            lines.append("left alone:")
            lines += [f"  {name}: {why}" for name, why in sorted(self.left_alone.items())]
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# the replacement forwards (mixins placed in front of the original class)
# --------------------------------------------------------------------------------------------


class _NanoGPTLayerNorm(nn.Module):
    """nanoGPT's LayerNorm: ``weight`` (N,), ``bias`` (N,) or None, eps 1e-5."""

    def forward(self, input: Tensor) -> Tensor:
        return fastgpt.layer_norm(input, self.weight.shape, self.weight, self.bias, 1e-5)


class _TanhGELU(fnn.GELU):
    approximate = "tanh"  # a class attribute: these modules were built without one


class _ErfGELU(fnn.GELU):
    approximate = "none"


# kind -> mixin. The kind names are part of the pickle format of patched modules: keep them stable.
_KINDS: Dict[str, type] = {
    "layer_norm": fnn.LayerNorm,
    "nanogpt_layer_norm": _NanoGPTLayerNorm,
    "gelu": fnn.GELU,
    "gelu_tanh": _TanhGELU,
    "gelu_erf": _ErfGELU,
    "nanogpt_attention": fnn.CausalSelfAttention,
}
_FAMILY = {
    "layer_norm": "layer_norm",
    "nanogpt_layer_norm": "layer_norm",
    "gelu": "gelu",
    "gelu_tanh": "gelu",
    "gelu_erf": "gelu",
    "nanogpt_attention": "attention",
}
_DESCRIPTION = {
    "layer_norm": "fastgpt.layer_norm",
    "nanogpt_layer_norm": "fastgpt.layer_norm",
    "gelu": "fastgpt.gelu",
    "gelu_tanh": "fastgpt.gelu(approximate='tanh')",
    "gelu_erf": "fastgpt.gelu(approximate='none')",
    "nanogpt_attention": "fastgpt.flash_attn_func(causal=True)",
}
_KINDS.update(llama.KINDS)
_FAMILY.update(llama.FAMILY)
_DESCRIPTION.update(llama.DESCRIPTION)
# kind -> the extra attributes of its patched class, made from the original class (a forward of its own,
# a kept "__name__")
_CLASS_ATTRS: Dict[str, Callable[[type], dict]] = dict(llama.CLASS_ATTRS)
_CLASSES: Dict[Tuple[type, str], type] = {}


def _rebuild(original: type, kind: str, new: Callable, args: tuple):
    """Unpickling / deep copy of a patched module: rebuild its patched class from the original one."""
    return new(patched_class(original, kind), *args)


def _reduce_ex(self, protocol):
    cls = type(self)
    rv = super(cls, self).__reduce_ex__(protocol)
    if not isinstance(rv, tuple) or len(rv) < 2 or not rv[1] or rv[1][0] is not cls:
        return rv
    return (_rebuild, (cls._fastgpt_original_class, cls._fastgpt_kind, rv[0], rv[1][1:]), *rv[2:])


def patched_class(original: type, kind: str) -> type:
    """The class a module of class ``original`` is switched to for the patch ``kind`` (cached)."""
    key = (original, kind)
    cls = _CLASSES.get(key)
    if cls is None:
        attrs = _CLASS_ATTRS[kind](original) if kind in _CLASS_ATTRS else {}
        name = attrs.pop("__name__", f"Fastgpt{original.__name__}")
        cls = type(
            name,
            (_KINDS[kind], original),
            {
                "_fastgpt_original_class": original,
                "_fastgpt_kind": kind,
                "__reduce_ex__": _reduce_ex,
                "__module__": __name__,
                "__qualname__": name,
                "__doc__": f"{original.__module__}.{original.__qualname__} computed by fastgpt ({kind}).",
                **attrs,
            },
        )
        _CLASSES[key] = cls
    return cls


def _original_class(m: nn.Module) -> Optional[type]:
    return type(m).__dict__.get("_fastgpt_original_class")


def _type_name(cls: type) -> str:
    if cls.__module__.startswith("torch.nn.modules.") and getattr(nn, cls.__qualname__, None) is cls:
        return f"torch.nn.{cls.__qualname__}"
    return f"{cls.__module__}.{cls.__qualname__}"


# --------------------------------------------------------------------------------------------
# recognising modules
# --------------------------------------------------------------------------------------------

_FASTGPT_NATIVE = (fnn.LayerNorm, fnn.RMSNorm, fnn.GELU, fnn.CausalSelfAttention)

# every global and attribute name nanoGPT's forwards reference (plus layout-only synonyms); a forward
# that references anything else (rotary embeddings, a KV cache, GQA heads, ...) is not nanoGPT's
_NANOGPT_LN_NAMES = {"F", "torch", "nn", "functional", "layer_norm", "weight", "shape", "bias"}
_NANOGPT_ATTN_NAMES = {
    "size", "shape", "c_attn", "split", "chunk", "n_embd", "view", "reshape", "n_head", "transpose", "permute",
    "flash", "torch", "nn", "functional", "F", "scaled_dot_product_attention", "dropout", "training", "math",
    "sqrt", "masked_fill", "bias", "float", "softmax", "attn_dropout", "contiguous", "resid_dropout", "c_proj",
}  # fmt: skip


def _forward_names(cls: type) -> Optional[set]:
    code = getattr(getattr(cls, "forward", None), "__code__", None)
    return set(code.co_names) if code is not None else None


def _nanogpt_layer_norm_reason(m: nn.Module) -> Optional[str]:
    """None if m is nanoGPT's LayerNorm, else why not (only asked of classes named LayerNorm)."""
    names = _forward_names(type(m))
    weight = m._parameters.get("weight")
    bias = m._parameters.get("bias", m.__dict__.get("bias", "missing"))
    if names is None or "layer_norm" not in names or not names <= _NANOGPT_LN_NAMES:
        return "its forward is not nanoGPT's F.layer_norm(input, weight.shape, weight, bias, 1e-5)"
    if 1e-5 not in type(m).forward.__code__.co_consts:
        return "its forward does not use nanoGPT's eps 1e-5"
    if weight is None or weight.dim() != 1 or not (bias is None or (isinstance(bias, Tensor) and bias.shape == weight.shape)):
        return "it does not hold nanoGPT's weight (N,) and bias (N,) or None"
    if list(m.children()) or list(m.buffers(recurse=False)) or set(m._parameters) - {"weight", "bias"}:
        return "it holds more state than nanoGPT's LayerNorm"
    return None


def _nanogpt_attention_reason(m: nn.Module) -> Optional[str]:
    """None if m is a nanoGPT-style CausalSelfAttention, else why not."""
    names = _forward_names(type(m))
    if names is None or not names <= _NANOGPT_ATTN_NAMES:
        extra = sorted(names - _NANOGPT_ATTN_NAMES) if names is not None else []
        return f"its forward references what nanoGPT's does not ({', '.join(extra)})"
    c_attn, c_proj = getattr(m, "c_attn", None), getattr(m, "c_proj", None)
    n_head, n_embd = getattr(m, "n_head", None), getattr(m, "n_embd", None)
    if not (isinstance(c_attn, nn.Linear) and isinstance(c_proj, nn.Linear) and isinstance(n_head, int) and isinstance(n_embd, int)):
        return "it lacks nanoGPT's c_attn/c_proj Linears and integer n_head/n_embd"
    if n_head < 1 or n_embd % n_head or (c_attn.in_features, c_attn.out_features) != (n_embd, 3 * n_embd):
        return "its c_attn is not n_embd -> 3 * n_embd with n_head dividing n_embd"
    if (c_proj.in_features, c_proj.out_features) != (n_embd, n_embd) or not isinstance(getattr(m, "dropout", None), (int, float)):
        return "its c_proj or dropout differ from nanoGPT's"
    if set(m._modules) - {"c_attn", "c_proj", "attn_dropout", "resid_dropout"} or set(m._buffers) - {"bias"}:
        return "it holds more submodules or buffers than nanoGPT's"
    return None


def _probe(m: nn.Module, kind: str, shape: Tuple[int, ...]) -> Optional[str]:
    """Run the original forward and fastgpt's on one random input; None if they agree, else why not."""
    params = list(m.parameters())
    if not params or params[0].device.type == "meta":
        return None  # nothing to run on: the structural match has to do
    dtype, device = params[0].dtype, params[0].device
    gen = torch.Generator().manual_seed(0)  # never touches the global RNG
    x = torch.randn(shape, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)
    was_training = m.training
    m.train(False)
    try:
        with torch.no_grad():
            want = type(m).forward(m, x)
            got = _KINDS[kind].forward(m, x)
    except Exception as e:  # noqa: BLE001 - any failure means "not what we thought"
        return f"its forward could not be checked ({type(e).__name__}: {e})"
    finally:
        m.train(was_training)
    tol = 1e-3 if dtype in (torch.float32, torch.float64) else 5e-2
    if not isinstance(want, Tensor) or want.shape != got.shape:
        return "its forward returns something else than fastgpt's"
    err, scale = float((want.float() - got.float()).abs().max()), float(want.float().abs().max())
    if not err <= tol * scale + 1e-6:
        return f"on a test input its output differs from fastgpt's by {err:.2e} (scale {scale:.2e})"
    return None


def _hf_gelu_kinds() -> Dict[type, str]:
    """transformers' GELU activation classes -> patch kind (transformers is already imported here)."""
    from transformers import activations

    table = {
        "NewGELUActivation": "gelu_tanh",
        "FastGELUActivation": "gelu_tanh",
        "GELUTanh": "gelu_tanh",
        "PytorchGELUTanh": "gelu_tanh",
        "GELUActivation": "gelu_erf",
    }
    return {getattr(activations, name): kind for name, kind in table.items() if hasattr(activations, name)}


def _classify(m: nn.Module, hf_gelus: Dict[type, str], hf_llama: Dict[type, str]) -> Tuple[Optional[str], Optional[str]]:
    """(kind, None) when m can be patched; (None, reason) when it is a known family but cannot be."""
    cls = type(m)
    if isinstance(m, _FASTGPT_NATIVE) or _original_class(m) is not None:
        return None, "already a fastgpt module"
    if isinstance(m, nn.LayerNorm):
        if cls.forward is not nn.LayerNorm.forward:
            return None, "its forward differs from torch.nn.LayerNorm's"
        return "layer_norm", None
    if isinstance(m, nn.GELU):
        if cls.forward is not nn.GELU.forward:
            return None, "its forward differs from torch.nn.GELU's"
        return "gelu", None
    if cls in hf_gelus:
        return hf_gelus[cls], None
    kind, reason = llama.classify(m, hf_llama)
    if kind is not None or reason is not None:
        return kind, reason
    if cls.__name__ == "LayerNorm":
        reason = _nanogpt_layer_norm_reason(m)
        if reason is None:
            n = m._parameters["weight"].shape[0]
            reason = _probe(m, "nanogpt_layer_norm", (2, 3, n))
        return ("nanogpt_layer_norm", None) if reason is None else (None, reason)
    if cls.__name__ == "CausalSelfAttention":
        reason = _nanogpt_attention_reason(m)
        if reason is None:
            mask = m._buffers.get("bias")
            t = min(5, mask.shape[-1]) if mask is not None else 5
            reason = _probe(m, "nanogpt_attention", (2, t, m.n_embd))
        return ("nanogpt_attention", None) if reason is None else (None, reason)
    return None, None


# --------------------------------------------------------------------------------------------
# Hugging Face: which attention modules the "fastgpt" attention (fastgpt/hf_attention.py) serves
# --------------------------------------------------------------------------------------------

_HF_ATTENTION = ("GPT2Attention",) + llama.HF_ATTENTION  # transformers' attention classes switched to "fastgpt"


def _hf_attention_class(m: nn.Module) -> Optional[type]:
    """The transformers attention class of m (patched or not) that the "fastgpt" attention serves, or None."""
    for c in (_original_class(m) or type(m)).__mro__:
        if c.__name__ in _HF_ATTENTION and c.__module__.startswith("transformers."):
            return c
    return None


def _switch_attention(m: nn.Module, switched: Dict[int, Optional[str]], blocked: Dict[int, str]) -> Tuple[Optional[str], Optional[str]]:
    """Switch m's config (shared by every layer: once) to the "fastgpt" attention: (what changed, None) or (None, why not)."""
    config = m.config
    if id(config) in blocked:
        return None, blocked[id(config)]
    if id(config) not in switched and config._attn_implementation != ATTN_IMPLEMENTATION:
        switched[id(config)] = config._attn_implementation
        _HF_ORIGINAL_IMPL[id(config)] = (weakref.ref(config), config._attn_implementation)
        config._attn_implementation = ATTN_IMPLEMENTATION
    if id(config) in switched:
        return f"attn_implementation {switched[id(config)]!r} -> {ATTN_IMPLEMENTATION!r} (fastgpt.flash_attn_func)", None
    return None, "already uses the fastgpt attention"


# id(config) -> (weak reference to it, the attn_implementation it had before patch)
_HF_ORIGINAL_IMPL: Dict[int, Tuple[weakref.ref, Optional[str]]] = {}


# --------------------------------------------------------------------------------------------
# patch / unpatch
# --------------------------------------------------------------------------------------------


def _check_ops(ops: Iterable[str]) -> Tuple[str, ...]:
    if isinstance(ops, str):
        ops = (ops,)
    ops = tuple(ops)
    bad = [op for op in ops if op not in OPS]
    if bad:
        raise ValueError(f"fastgpt.patch: ops must be among {OPS}; got {bad}")
    return ops


def patch(model: nn.Module, ops: Iterable[str] = OPS) -> PatchReport:
    """Make ``model`` run fastgpt's ops, in place; returns a :class:`PatchReport`.

    ``ops`` picks the families to patch: any of :data:`OPS` (all by default).
    Parameters, their names and the module objects are unchanged (see the module docstring), so call
    it before or after creating the optimizer, loading a checkpoint or wrapping in DDP (before
    ``torch.compile``, which would otherwise recompile). Patching twice is harmless.
    Numbers stay within fastgpt's parity rule of the original model's (fastgpt.testing).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fastgpt.patch: model must be a torch.nn.Module; got {type(model).__name__}")
    ops = _check_ops(ops)
    report = PatchReport()
    switched: Dict[int, Optional[str]] = {}  # id(config) -> its attn_implementation before this call
    has_hf = any(type(m).__module__.startswith("transformers.") for m in model.modules())
    hf_gelus, hf_llama = (_hf_gelu_kinds(), llama.hf_classes()) if has_hf else ({}, {})
    # id(config) -> why its attention stays (a config serves every layer: one layer that cannot keeps all)
    blocked: Dict[int, str] = {}
    attention = [m for m in model.modules() if _hf_attention_class(m) is not None]
    if attention:
        hf_reason = hf_attention.register() if "attention" in ops else "'attention' is not in ops"
        for m in attention:
            if hf_reason is not None:
                blocked.setdefault(id(m.config), hf_reason)

    for path, m in model.named_modules():
        cls = type(m)
        kind, reason = _classify(m, hf_gelus, hf_llama)
        if kind is not None and _FAMILY[kind] not in ops:
            kind, reason = None, f"'{_FAMILY[kind]}' is not in ops"
        changes, reasons = [], [reason] if reason is not None else []
        if kind is not None:
            m.__class__ = patched_class(cls, kind)
            changes.append(f"{_type_name(cls)} -> {_DESCRIPTION[kind]}")
        if _hf_attention_class(m) is not None:
            change, why = _switch_attention(m, switched, blocked)
            if change and _hf_attention_class(m).__name__ in llama.HF_ATTENTION:
                change += llama.attention_note(m)
            changes += [change if changes else f"{_type_name(cls)}: {change}"] if change else []
            reasons += [why] if why else []
        if changes:
            report.replaced[path] = "; ".join(changes)
        elif not reasons and (not m._modules or "attn" in cls.__name__.lower() or "attention" in cls.__name__.lower()):
            if isinstance(m, (nn.ModuleList, nn.ModuleDict, nn.Sequential)):
                continue
            if m._modules:
                reasons.append("fastgpt recognises nanoGPT's CausalSelfAttention and transformers' GPT-2, Llama, Mistral "
                               "and Qwen2 attention")
            else:
                reasons.append("no fastgpt op for this module type")
        if reasons:
            report.left_alone.setdefault(_type_name(cls), "; ".join(reasons))
    return report


def unpatch(model: nn.Module) -> PatchReport:
    """Undo :func:`patch` in place: original classes and attention implementations; returns what was restored."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"fastgpt.unpatch: model must be a torch.nn.Module; got {type(model).__name__}")
    report = PatchReport()
    hf_configs: Dict[int, object] = {}
    for path, m in model.named_modules():
        done = []
        original = _original_class(m)
        if original is not None:
            m.__class__ = original
            done.append(f"fastgpt -> {_type_name(original)}")
        config = getattr(m, "config", None)
        if _hf_attention_class(m) is not None and getattr(config, "_attn_implementation", None) == ATTN_IMPLEMENTATION:
            hf_configs[id(config)] = config
            ref, old = _HF_ORIGINAL_IMPL.get(id(config), (None, None))
            if ref is None or ref() is not config:
                old = "sdpa"  # patched elsewhere (e.g. in the process that pickled it): transformers' default
            done.append(f"attn_implementation {ATTN_IMPLEMENTATION!r} -> {old!r}")
        if done:
            report.replaced[path] = "; ".join(done)
    for key, config in hf_configs.items():
        ref, old = _HF_ORIGINAL_IMPL.pop(key, (None, None))
        config._attn_implementation = old if ref is not None and ref() is config else "sdpa"
    return report
