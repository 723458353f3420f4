"""fastgpt.nn: LayerNorm, GELU, CausalSelfAttention (+ KVCache) against torch, with the parity rule."""

import math
import warnings

import pytest
import torch
from torch.func import functional_call
from torch.nn import functional as F

import fastgpt
from fastgpt import FallbackWarning
from fastgpt.nn import GELU, CausalSelfAttention, KVCache, LayerNorm
from fastgpt.testing import assert_parity, attention_oracle, check_against_torch

DTYPES = [torch.float32, torch.bfloat16]


def randn(*shape, seed=0, scale=1.0, requires_grad=True):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).requires_grad_(requires_grad)


# ---- LayerNorm --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs", [{}, {"bias": False}, {"elementwise_affine": False}, {"eps": 1e-3}])
def test_layer_norm_has_torchs_constructor_attributes_and_state_dict(kwargs):
    ours, theirs = LayerNorm(24, **kwargs), torch.nn.LayerNorm(24, **kwargs)
    assert isinstance(ours, torch.nn.LayerNorm)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    assert (ours.normalized_shape, ours.eps, ours.elementwise_affine) == (theirs.normalized_shape, theirs.eps, theirs.elementwise_affine)
    ours.load_state_dict(theirs.state_dict(), strict=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False])
def test_layer_norm_forward_and_gradients_match_torch(dtype, bias):
    module = LayerNorm((5, 12), bias=bias)
    inputs = [randn(3, 5, 12, scale=3.0) + 2.0, randn(5, 12, seed=1) + 1.0] + ([randn(5, 12, seed=2)] if bias else [])

    def ours(x, w, b=None):
        return functional_call(module, {"weight": w, **({"bias": b} if bias else {})}, (x,))

    def theirs(x, w, b=None):
        return F.layer_norm(x, (5, 12), w, b, 1e-5)

    check_against_torch("nn.LayerNorm", ours, theirs, [t.detach().requires_grad_() for t in inputs], dtype)


def test_layer_norm_takes_fp32_weights_with_bf16_input_under_autocast():
    module = LayerNorm(16)
    with torch.no_grad():
        module.weight.normal_(1.0, 0.3), module.bias.normal_(0.0, 0.3)
    lin = torch.nn.Linear(8, 16)
    x = torch.randn(4, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = lin(x)
        y = module(h)
        want = torch.nn.functional.layer_norm(h, (16,), module.weight, module.bias)
    assert h.dtype == y.dtype == torch.bfloat16 and module.weight.dtype == torch.float32
    ref = F.layer_norm(h.double(), (16,), module.weight.double(), module.bias.double())
    assert_parity("LayerNorm under autocast", y, ref, want)


# ---- GELU -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_gelu_matches_torch(approximate, dtype):
    module = GELU(approximate)
    assert isinstance(module, torch.nn.GELU) and repr(module) == repr(torch.nn.GELU(approximate))
    check_against_torch("nn.GELU", module, lambda x: F.gelu(x, approximate=approximate), [randn(7, 33, scale=3.0)], dtype)


def test_gelu_rejects_an_unknown_approximation():
    with pytest.raises(ValueError, match="approximate"):
        GELU("fast")(torch.randn(3))


# ---- CausalSelfAttention ---------------------------------------------------------------------------


class Cfg:
    n_embd, n_head, bias, dropout = 48, 3, True, 0.0


def plain_attention(x, w_attn, b_attn, w_proj, b_proj, n_head=3):
    """nanoGPT's attention in plain torch (the oracle's masked softmax), independent of fastgpt."""
    b, t, c = x.shape
    q, k, v = F.linear(x, w_attn, b_attn).split(c, dim=2)
    q, k, v = (z.view(b, t, n_head, c // n_head).transpose(1, 2) for z in (q, k, v))
    y = attention_oracle(q, k, v, causal=True, scale=1.0 / math.sqrt(c // n_head))
    return F.linear(y.transpose(1, 2).reshape(b, t, c), w_proj, b_proj)


@pytest.mark.parametrize("dtype", DTYPES)
def test_causal_self_attention_forward_and_gradients_match_plain_torch(dtype):
    module = CausalSelfAttention(Cfg())
    names = ["c_attn.weight", "c_attn.bias", "c_proj.weight", "c_proj.bias"]

    def ours(x, *params):
        return functional_call(module, dict(zip(names, params)), (x,))

    inputs = [randn(2, 17, 48), randn(144, 48, seed=1, scale=0.2), randn(144, seed=2, scale=0.2), randn(48, 48, seed=3, scale=0.2), randn(48, seed=4, scale=0.2)]
    check_against_torch("nn.CausalSelfAttention", ours, plain_attention, inputs, dtype)


def test_causal_self_attention_has_nanogpts_parameters_and_attributes():
    module = CausalSelfAttention(Cfg())
    assert [n for n, _ in module.named_parameters()] == ["c_attn.weight", "c_attn.bias", "c_proj.weight", "c_proj.bias"]
    assert (module.n_head, module.n_embd, module.dropout) == (3, 48, 0.0)
    assert isinstance(module.attn_dropout, torch.nn.Dropout) and isinstance(module.resid_dropout, torch.nn.Dropout)
    bad = Cfg()
    bad.n_head = 5
    with pytest.raises(ValueError, match="multiple of n_head"):
        CausalSelfAttention(bad)


def test_kv_cache_prefill_then_steps_equal_the_full_forward():
    torch.manual_seed(0)
    module = CausalSelfAttention(Cfg()).double().eval()
    x = torch.randn(2, 9, 48, dtype=torch.float64)
    full = module(x)
    cache = KVCache(12)
    parts = [module(x[:, :6], kv_cache=cache)] + [module(x[:, i : i + 1], kv_cache=cache) for i in range(6, 9)]
    assert cache.length == 9 and cache.k.shape == (2, 12, 3, 16)
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="exceeds the capacity"):
        module(torch.randn(2, 4, 48, dtype=torch.float64), kv_cache=cache)


def test_attention_dropout_applies_only_in_training():
    torch.manual_seed(0)
    cfg = Cfg()
    cfg.dropout = 0.5
    module = CausalSelfAttention(cfg).eval()
    no_dropout = CausalSelfAttention(Cfg()).eval()
    no_dropout.load_state_dict(module.state_dict())
    x = torch.randn(2, 5, 48)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FallbackWarning)  # eval: no dropout, nothing falls back
        with fastgpt.use_backend("reference"):
            # eval: exactly the module without dropout (same weights, dropout 0)
            torch.testing.assert_close(module(x), no_dropout(x), rtol=0, atol=0)
    module.train()
    with pytest.warns(FallbackWarning, match="dropout"):
        y = module(x)
    assert y.shape == x.shape
    # training: dropout applied (p = 0.5 changes the output; two draws differ)
    assert not torch.allclose(y, no_dropout(x)) and not torch.allclose(module(x), y)
