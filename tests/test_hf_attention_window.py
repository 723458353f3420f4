"""Sliding windows and softcap in the "fastgpt" attention of patched Hugging Face models.

A Mistral model with a window of 4 on 11 tokens (and Qwen2's sliding layers) is compared with unpatched
transformers (its sdpa integration, whose masks encode the window) and its float64 copy under the parity
rule, forward and every gradient, with the triton kernels strict under TRITON_INTERPRET=1: the kernels
must run with transformers' flash-attention window, window_size=(sliding_window - 1, sliding_window - 1),
and nothing may fall back. The attention function is checked on transformers' own sliding-window sdpa
masks and with softcap against a masked float64 computation.
"""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from nanogpt_reference import check_model_parity
from test_hf_attention_padding import hf_mask, padding_mask, triton_or_skip
from test_patch_llama import hf_model

import fastgpt
from fastgpt import FallbackWarning, hf_attention
from fastgpt.hf_attention import read_mask
from fastgpt.testing import assert_parity

transformers = pytest.importorskip("transformers", reason="transformers is not installed")
masking_utils = pytest.importorskip("transformers.masking_utils", reason="transformers < 4.53 has no masking_utils")
WINDOW, N_LAYER = 4, 2
KERNELS = ("flash_attn_func", "flash_attn_varlen_func", "flash_attn_with_kvcache", "scaled_dot_product_attention")


@pytest.fixture
def windows(monkeypatch):
    """kernel name -> the window_size of each of its calls (None: no window)."""
    seen = {name: [] for name in KERNELS}

    def spy(name, real):
        def run(*args, **kwargs):
            seen[name].append(kwargs.get("window_size"))
            return real(*args, **kwargs)

        monkeypatch.setattr(fastgpt, name, run)

    for name in KERNELS:
        spy(name, getattr(fastgpt, name))
    return seen


def three(family="mistral", **overrides):
    base = hf_model(family, vocab_size=96, sliding_window=WINDOW, **overrides)
    model = copy.deepcopy(base)
    report = fastgpt.patch(model)
    assert model.config._attn_implementation == "fastgpt"
    assert f"sliding_window={WINDOW}" in report.replaced["model.layers.0.self_attn"], report.replaced
    return model, base, copy.deepcopy(base).double()


def tokens(b, t, seed=0):
    return torch.randint(1, 96, (b, t), generator=torch.Generator().manual_seed(seed))


def test_left_padded_sliding_window_model_matches_unpatched(windows):
    """Logits at real tokens and every gradient: 11 tokens, a window of 4 (each query sees 4 keys); the
    unpadded case is the Qwen2 test's sliding layer."""
    triton_or_skip()
    model, base, ref = three()
    ids, targets, mask = tokens(3, 11), tokens(3, 11, seed=1), padding_mask("left", t=11)
    real = mask.bool()

    def run(m):
        logits = m(input_ids=ids, attention_mask=mask).logits
        return {"logits": logits[real], "loss": F.cross_entropy(logits[real].float(), targets[real])}

    with warnings.catch_warnings():
        warnings.simplefilter("error", FallbackWarning)
        with fastgpt.use_backend("triton", strict=True):
            check_model_parity(f"mistral window {WINDOW}", model, base, ref, run)
    assert windows["flash_attn_varlen_func"] == [(WINDOW - 1, WINDOW - 1)] * N_LAYER, windows
    assert sum(len(v) for v in windows.values()) == N_LAYER


def test_qwen2_sliding_layers_get_the_window_and_full_layers_do_not(windows):
    """max_window_layers=1: layer 0 is full attention, layer 1 slides (transformers' layer_types)."""
    triton_or_skip()
    base = hf_model("qwen2", vocab_size=96, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1)
    model, ref = copy.deepcopy(base), copy.deepcopy(base).double()
    report = fastgpt.patch(model)
    assert "sliding_window" not in report.replaced["model.layers.0.self_attn"]
    assert f"sliding_window={WINDOW}" in report.replaced["model.layers.1.self_attn"]
    ids, targets = tokens(2, 11), tokens(2, 11, seed=1)

    def run(m):
        logits = m(input_ids=ids).logits
        return {"logits": logits, "loss": F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())}

    with fastgpt.use_backend("triton", strict=True):
        check_model_parity("qwen2 sliding layer", model, base, ref, run)
    assert windows["flash_attn_func"] == [None, (WINDOW - 1, WINDOW - 1)]


def test_greedy_generation_past_the_window_gives_the_unpatched_tokens(windows):
    """A left-padded 6-token prompt and 7 new tokens through a window of 4 (transformers' sliding cache)."""
    triton_or_skip()
    model, base, _ = three()
    model.eval(), base.eval()
    prompt, mask = tokens(3, 6, seed=2), padding_mask("left", t=6)
    prompt[~mask.bool()] = 0
    kw = dict(attention_mask=mask, max_new_tokens=7, do_sample=False, pad_token_id=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FallbackWarning)
        with fastgpt.use_backend("triton", strict=True):
            got = model.generate(prompt, **kw)
    assert torch.equal(got, base.generate(prompt, **kw))
    assert windows["scaled_dot_product_attention"] == [] and sum(len(v) for v in windows.values()) == N_LAYER * 7
    # the prefill (6 keys > the window) runs it; the sliding cache then holds window - 1 keys, so a step sees
    # at most the window: decode steps take the decode op once no padding is left in the cache
    assert windows["flash_attn_varlen_func"][:N_LAYER] == [(WINDOW - 1, WINDOW - 1)] * N_LAYER
    assert windows["flash_attn_with_kvcache"] and set(windows["flash_attn_with_kvcache"]) == {None}


# ---- the attention function on transformers' sliding-window sdpa masks ---------------------------


def window_mask(pads, sq, past=0, right=(), window=WINDOW, packed=None):
    """transformers' sliding-window sdpa mask (sliding_window_causal_mask_function) for rows with
    ``pads`` left-padding tokens (``right`` right-padding ones), Sq queries after ``past`` cached keys;
    ``packed``: sequence lengths packed in one row (and_masks with packed_sequence_mask_function)."""
    fn = masking_utils.sliding_window_causal_mask_function(window)
    if packed is not None:
        ids = torch.cat([torch.full((n,), i) for i, n in enumerate(packed)])[None]
        fn = masking_utils.and_masks(fn, masking_utils.packed_sequence_mask_function(ids))
    return hf_mask(pads, sq, past, right=right, mask_function=fn)


def masked_attention(q, k, v, mask, softcap):
    """Softcapped attention under a boolean mask, plain torch (GQA by repeating the key/value heads)."""
    k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
    s = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    s = softcap * torch.tanh(s / softcap) if softcap else s
    # the lowest value, not -inf: a padded query's empty row gives no NaN (its output is dropped)
    return torch.softmax(s.masked_fill(~mask, torch.finfo(s.dtype).min), -1) @ v


CASES = {  # name: (window_mask arguments, softcap, kernel)
    "prefill": (dict(pads=(0, 0), sq=11), None, "flash_attn_func"),
    "prefill, softcap": (dict(pads=(0, 0), sq=11), 2.0, "flash_attn_func"),
    "left padding": (dict(pads=(0, 3, 6), sq=11), None, "flash_attn_varlen_func"),
    "both sides, softcap": (dict(pads=(1, 0), right=(2, 5), sq=11), 1.5, "flash_attn_varlen_func"),
    "left-padded decode chunk": (dict(pads=(0, 7), sq=2, past=9), None, "flash_attn_varlen_func"),
    "decode, no padding": (dict(pads=(0,), sq=1, past=10), None, "flash_attn_varlen_func"),
    "packed": (dict(pads=(0,), sq=12, packed=(5, 2, 5)), 3.0, "flash_attn_varlen_func"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_window_and_softcap_kwargs_equal_masked_attention(name, windows):
    """Output at real queries and q/k/v gradients (GQA, float32) against the masked computation in
    float32 and float64, with the triton kernels (strict) given transformers' kwargs."""
    triton_or_skip()
    args, softcap, kernel = CASES[name]
    mask, real = window_mask(**args)
    b, sq, sk = mask.shape[0], mask.shape[2], mask.shape[3]
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b, h, s, 16, generator=g) for h, s in ((4, sq), (2, sk), (2, sk)))
    results = []
    for dtype, ours in ((torch.float32, True), (torch.float32, False), (torch.float64, False)):
        x = [t.to(dtype).requires_grad_() for t in (q, k, v)]
        if ours:
            with fastgpt.use_backend("triton", strict=True):
                out, _ = hf_attention.hf_attention_forward(torch.nn.Module(), *x, mask, sliding_window=WINDOW,
                                                           softcap=softcap)
        else:
            out = torch.where(real[..., None, None], masked_attention(*x, mask, softcap).transpose(1, 2), 0.0)
        loss = (out * torch.linspace(-1, 1, out.numel(), dtype=dtype).view(out.shape)).sum()
        results.append((out.detach(), torch.autograd.grad(loss, x)))
    (out, grads), (base, bgrads), (ref, rgrads) = results
    assert_parity(f"{name} out", out, ref, base)
    for t, g32, gb, g64 in zip("qkv", grads, bgrads, rgrads):
        assert_parity(f"{name} d{t}", g32, g64, gb, gradient=True)
    assert windows[kernel] == [(WINDOW - 1, WINDOW - 1)], windows
    assert windows["scaled_dot_product_attention"] == []


def test_window_masks_are_recognised_only_with_their_window():
    mask, _ = window_mask(pads=(0, 3), sq=11)
    assert read_mask(mask, 2, 11, 11) is None  # without the kwarg a windowed mask is not causal attention
    assert read_mask(mask, 2, 11, 11, window=WINDOW) is not None
    assert read_mask(mask, 2, 11, 11, window=WINDOW + 1) is None
    full, _ = window_mask(pads=(0, 3), sq=11, window=11)  # no key outside the window: plain padding
    assert read_mask(full, 2, 11, 11, window=WINDOW) is None
    short, _ = window_mask(pads=(0, 0), sq=3)  # 3 keys within a window of 4: the same as causal
    assert read_mask(short, 2, 3, 3, window=WINDOW).keys == 3
    packed, _ = window_mask(pads=(0,), sq=12, packed=(5, 2, 5))
    layout = read_mask(packed, 1, 12, 12, window=WINDOW)
    assert layout.cu_q.tolist() == [0, 5, 7, 12] and read_mask(packed, 1, 12, 12) is None


def test_unservable_softcap_and_bad_sliding_window_raise():
    module, q = torch.nn.Module(), torch.randn(1, 2, 5, 8)
    holed = torch.ones(1, 1, 5, 5, dtype=torch.bool).tril()
    holed[..., 4, 2] = False
    with pytest.raises(ValueError, match="softcap=2.0 needs fastgpt's kernels"):
        hf_attention.hf_attention_forward(module, q, q, q, holed, softcap=2.0)
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match="sliding_window must be a positive int"):
            hf_attention.hf_attention_forward(module, q, q, q, None, sliding_window=bad)
    with pytest.raises(ValueError, match="softcap"):
        hf_attention.hf_attention_forward(module, q, q, q, None, softcap=-1.0)
