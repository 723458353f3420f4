"""``GPT.from_hf``: Hugging Face GPT-2 and Llama-family (Llama, Mistral, Qwen2) causal LMs as :class:`fastgpt.GPT`.

transformers is imported here only, on use; nothing is ever downloaded, and weights in a folder are
read with ``weights_only=True`` (torch's safe unpickler) or from safetensors.
"""

from __future__ import annotations

import os
import pickle
from typing import Dict, List

import torch
from torch import Tensor, nn

__all__ = ["from_hf", "llama_key_map", "LLAMA_FAMILY"]

LLAMA_FAMILY = ("llama", "mistral", "qwen2")
_SUPPORTED = ("gpt2", *LLAMA_FAMILY)
_HF_TANH = ("gelu_new", "gelu_fast", "gelu_pytorch_tanh", "gelu_python_tanh")
_HF_ERF = ("gelu", "gelu_python")
_FN = "GPT.from_hf"


def from_hf(cls, model_or_path, dropout: float = 0.0):
    """See :meth:`fastgpt.GPT.from_hf`."""
    hf = _load(model_or_path)
    hf_cfg, hf_sd = hf.config, hf.state_dict()
    gpt2 = hf_cfg.model_type == "gpt2"
    config = _gpt2_config(hf_cfg, dropout) if gpt2 else _llama_config(hf_cfg, dropout)
    with torch.device("meta"):  # no random initialisation of weights that are about to be replaced
        model = cls(config)
    sources = _gpt2_sources(hf_sd, model) if gpt2 else _llama_sources(hf_sd, config)
    # fresh contiguous copies: the model never shares storage with the Hugging Face one
    sd = {k: sources[k].detach().clone(memory_format=torch.contiguous_format) for k in model.state_dict()}
    model.load_state_dict(sd, strict=True, assign=True)
    if config.tie_embeddings:  # assign replaced the shared parameter by two
        model.transformer.wte.weight = model.lm_head.weight
    return model


def _load(model_or_path) -> nn.Module:
    if isinstance(model_or_path, (str, os.PathLike)):
        path = os.fspath(model_or_path)
        if not os.path.isdir(path):
            raise ValueError(
                f"{_FN}: {path!r} is not a local folder; pass a GPT2LMHeadModel / LlamaForCausalLM (or Mistral, "
                "Qwen2) or a folder written by save_pretrained (fastgpt never downloads weights)"
            )
        from transformers import AutoConfig, AutoModelForCausalLM

        hf_cfg = AutoConfig.from_pretrained(path, local_files_only=True)  # config.json only
        if hf_cfg.model_type not in _SUPPORTED:
            raise ValueError(f"{_FN}: {path!r} holds a {hf_cfg.model_type!r} model; supported: {', '.join(_SUPPORTED)}")
        try:  # weights_only: a pickled .bin file is read by torch's safe unpickler, never executed
            return AutoModelForCausalLM.from_pretrained(path, config=hf_cfg, local_files_only=True, weights_only=True)
        except pickle.UnpicklingError:
            raise ValueError(f"{_FN}: {path!r} holds weights with objects other than tensors; refused (nothing in them was run)") from None
    config = getattr(model_or_path, "config", None)
    if not isinstance(model_or_path, nn.Module) or getattr(config, "model_type", None) not in _SUPPORTED:
        raise TypeError(
            f"{_FN}: expected a transformers GPT2LMHeadModel/GPT2Model, LlamaForCausalLM, MistralForCausalLM or "
            f"Qwen2ForCausalLM (or their base models), or a folder path; got {type(model_or_path).__name__}"
        )
    return model_or_path


def _check(hf_cfg, checks) -> None:
    for name, ok, expected in checks:
        if not ok:
            raise ValueError(f"{_FN}: config.{name} = {getattr(hf_cfg, name, None)!r} is not supported; expected {expected}")


# ---- GPT-2 ----------------------------------------------------------------------------------


def _gpt2_config(hf_cfg, dropout: float):
    from fastgpt.model import GPTConfig

    act = hf_cfg.activation_function
    if act in _HF_TANH:
        approximate = "tanh"
    elif act in _HF_ERF:
        approximate = "none"
    else:
        raise ValueError(f"{_FN}: activation_function {act!r} is not a GELU fastgpt.GPT implements")
    _check(hf_cfg, [
        ("n_inner", hf_cfg.n_inner in (None, 4 * hf_cfg.n_embd), "None or 4 * n_embd"),
        ("layer_norm_epsilon", hf_cfg.layer_norm_epsilon == 1e-5, "1e-5"),
        ("scale_attn_weights", bool(hf_cfg.scale_attn_weights), "True"),
        ("scale_attn_by_inverse_layer_idx", not hf_cfg.scale_attn_by_inverse_layer_idx, "False"),
        ("add_cross_attention", not getattr(hf_cfg, "add_cross_attention", False), "False"),
    ])
    return GPTConfig(
        block_size=hf_cfg.n_positions, vocab_size=hf_cfg.vocab_size, n_layer=hf_cfg.n_layer, n_head=hf_cfg.n_head,
        n_embd=hf_cfg.n_embd, dropout=dropout, bias=True, gelu_approximate=approximate,
    )


def _gpt2_sources(hf_sd: Dict[str, Tensor], model) -> Dict[str, Tensor]:
    """Each of the model's state_dict keys -> its HF tensor (Conv1D weights (in, out) transposed)."""
    base = "transformer." if any(k.startswith("transformer.") for k in hf_sd) else ""
    wte = hf_sd[base + "wte.weight"]
    head = hf_sd.get("lm_head.weight")
    if head is not None and head.data_ptr() != wte.data_ptr() and not torch.equal(head, wte):
        raise ValueError(f"{_FN}: the model's lm_head is not tied to wte; fastgpt.GPT ties them for GPT-2")
    conv1d = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
    sources = {}
    for key in model.state_dict():
        src = wte if key == "lm_head.weight" else hf_sd[base + key.removeprefix("transformer.")]
        sources[key] = src.t() if key.endswith(conv1d) else src
    return sources


# ---- Llama, Mistral, Qwen2 ------------------------------------------------------------------------


def _rope(hf_cfg):
    """(rope_theta, rope_type, partial_rotary_factor, the config field that holds them): transformers 5
    keeps them in ``rope_parameters``, transformers 4 in ``rope_theta`` and ``rope_scaling``."""
    params = getattr(hf_cfg, "rope_parameters", None)
    field = "rope_parameters"
    if params is None:
        field, scaling = "rope_scaling", getattr(hf_cfg, "rope_scaling", None) or {}
        params = {"rope_theta": getattr(hf_cfg, "rope_theta", 10000.0), **scaling}
        params.setdefault("rope_type", scaling.get("type", "default"))
    if "rope_theta" not in params:  # one set of parameters per layer type: not a Llama-family layout
        return None, "per layer type", 1.0, field
    factor = params.get("partial_rotary_factor", getattr(hf_cfg, "partial_rotary_factor", 1.0))
    return float(params["rope_theta"]), params.get("rope_type", "default"), factor, field


def _llama_config(hf_cfg, dropout: float):
    from fastgpt.model import GPTConfig

    c = hf_cfg
    n_head, hidden = c.num_attention_heads, c.hidden_size
    theta, rope_type, partial, rope_field = _rope(c)
    _check(c, [
        ("hidden_act", c.hidden_act == "silu", "'silu' (SwiGLU)"),
        (rope_field, rope_type == "default" and partial == 1.0, "plain rotary embeddings (rope_type 'default': no rope scaling)"),
        ("head_dim", getattr(c, "head_dim", None) in (None, hidden // n_head), f"hidden_size / num_attention_heads = {hidden // n_head}"),
        ("attention_bias", not getattr(c, "attention_bias", False), "False"),
        ("mlp_bias", not getattr(c, "mlp_bias", False), "False"),
        ("use_sliding_window", not getattr(c, "use_sliding_window", False), "False"),
        ("layer_types", all(t == "full_attention" for t in (getattr(c, "layer_types", None) or ())), "only 'full_attention' layers"),
    ])
    block_size = c.max_position_embeddings
    window = getattr(c, "sliding_window", None) if c.model_type == "mistral" else None
    if window:  # within one window, sliding-window attention is plain causal attention
        block_size = min(block_size, window)
    return GPTConfig(
        block_size=block_size, vocab_size=c.vocab_size, n_layer=c.num_hidden_layers, n_head=n_head, n_embd=hidden,
        dropout=dropout, bias=False, norm="rmsnorm", norm_eps=float(c.rms_norm_eps), positional="rotary", rope_theta=theta,
        mlp="swiglu", intermediate_size=c.intermediate_size, n_kv_head=c.num_key_value_heads or n_head,
        qkv_bias=True if c.model_type == "qwen2" else None, tie_embeddings=bool(getattr(c, "tie_word_embeddings", False)),
    )


def llama_key_map(config, base: str = "model.") -> Dict[str, List[str]]:
    """fastgpt.GPT's state_dict keys -> the Hugging Face Llama-family keys concatenated (along dim 0)
    into each: q, k, v into ``attn.c_attn``, gate and up into ``mlp.c_fc``. No permutation: HF's
    rotary (rotate_half) pairs dims (i, i + head_dim / 2), as fastgpt's non-interleaved rotary does."""
    m = {"transformer.wte.weight": [base + "embed_tokens.weight"], "transformer.ln_f.weight": [base + "norm.weight"]}
    qkv_bias = config.bias if config.qkv_bias is None else config.qkv_bias
    for i in range(config.n_layer):
        hf, ours = f"{base}layers.{i}.", f"transformer.h.{i}."
        m[ours + "ln_1.weight"] = [hf + "input_layernorm.weight"]
        m[ours + "attn.c_attn.weight"] = [hf + f"self_attn.{p}_proj.weight" for p in "qkv"]
        if qkv_bias:
            m[ours + "attn.c_attn.bias"] = [hf + f"self_attn.{p}_proj.bias" for p in "qkv"]
        m[ours + "attn.c_proj.weight"] = [hf + "self_attn.o_proj.weight"]
        m[ours + "ln_2.weight"] = [hf + "post_attention_layernorm.weight"]
        m[ours + "mlp.c_fc.weight"] = [hf + "mlp.gate_proj.weight", hf + "mlp.up_proj.weight"]
        m[ours + "mlp.c_proj.weight"] = [hf + "mlp.down_proj.weight"]
    m["lm_head.weight"] = [base + "embed_tokens.weight"] if config.tie_embeddings else ["lm_head.weight"]
    return m


def _llama_sources(hf_sd: Dict[str, Tensor], config) -> Dict[str, Tensor]:
    base = "model." if any(k.startswith("model.") for k in hf_sd) else ""
    embed, head = hf_sd[base + "embed_tokens.weight"], hf_sd.get("lm_head.weight")
    if config.tie_embeddings and head is not None and head.data_ptr() != embed.data_ptr() and not torch.equal(head, embed):
        raise ValueError(f"{_FN}: config.tie_word_embeddings is True but the model's lm_head differs from embed_tokens")
    if not config.tie_embeddings and head is None:
        raise ValueError(f"{_FN}: the model has no lm_head (a base model with untied embeddings): pass the ...ForCausalLM model")
    return {k: torch.cat([hf_sd[h] for h in hs]) if len(hs) > 1 else hf_sd[hs[0]] for k, hs in llama_key_map(config, base).items()}
