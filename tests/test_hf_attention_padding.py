"""The "fastgpt" attention of patched Hugging Face models with padding masks and packed sequences.

Padded batches (left, right, both), cached generation with left padding and packed rows (position_ids
restarts, transformers' varlen kwargs) run ``flash_attn_varlen_func``, and are compared with unpatched
transformers (SDPA) and its float64 copy under the parity rule (fastgpt.testing) at every real token,
forward and every parameter's gradient. The model tests run the triton kernels, strict, under
TRITON_INTERPRET=1: nothing may fall back. Masks that are not causal attention over padded rows or
packed sequences still go to torch's SDPA with one FallbackWarning.
"""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from nanogpt_reference import check_model_parity
from test_patch import hf_gpt2
from test_patch_llama import hf_model, spy_on_fastgpt

import fastgpt
from fastgpt import BackendUnavailableError, FallbackWarning, backends, hf_attention
from fastgpt.hf_attention import causal_prefix_length, read_mask
from fastgpt.testing import assert_parity

transformers = pytest.importorskip("transformers", reason="transformers is not installed")
masking_utils = pytest.importorskip("transformers.masking_utils", reason="transformers < 4.53 has no masking_utils")
VOCAB = 96
N_LAYER = 2


def triton_or_skip():
    why = backends.backend_unavailable_reason("triton", torch.device("cpu"))
    if why is not None:
        pytest.skip(f"triton cannot run on cpu tensors here: {why}")


def three(family):
    """(model patched for the triton kernels, plain copy, float64 copy) of a small random model (2 layers)."""
    if family == "gpt2":
        base, ops = hf_gpt2(vocab_size=VOCAB), ("attention",)  # GPT-2's norms and GELU have no triton kernel
    else:
        base, ops = hf_model("llama", vocab_size=VOCAB), fastgpt.patching.OPS  # GQA: 4 query, 2 kv heads
    model = copy.deepcopy(base)
    fastgpt.patch(model, ops=ops)
    return model, base, copy.deepcopy(base).double()


def tokens(b, t, seed=0):
    return torch.randint(1, VOCAB, (b, t), generator=torch.Generator().manual_seed(seed))


def padding_mask(side, b=3, t=9):
    """Rows with 0, 2 and 5 padding tokens on the given side (row 0 is the longest, as a tokenizer pads)."""
    mask = torch.ones(b, t, dtype=torch.long)
    for row, pads in enumerate((0, 2, 5)[:b]):
        if side == "left":
            mask[row, :pads] = 0
        else:
            mask[row, t - pads:] = 0
    return mask


@pytest.fixture
def calls(monkeypatch):
    """Calls of the attention entry points the "fastgpt" attention may take."""
    names = ("flash_attn_varlen_func", "flash_attn_func", "flash_attn_with_kvcache", "scaled_dot_product_attention")
    return spy_on_fastgpt(monkeypatch, names)


# ---- whole models against unpatched transformers -------------------------------------------------


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_padded_batch_runs_the_varlen_kernel_and_matches_unpatched(family, side, calls):
    """Logits at real tokens and every gradient (a loss over real tokens) within the parity rule."""
    triton_or_skip()
    model, base, ref = three(family)
    ids, targets, mask = tokens(3, 9), tokens(3, 9, seed=1), padding_mask(side)
    real = mask.bool()

    def run(m):
        logits = m(input_ids=ids, attention_mask=mask).logits
        return {"logits": logits[real], "loss": F.cross_entropy(logits[real].float(), targets[real])}

    with fastgpt.use_backend("triton", strict=True):  # strict: a fallback would raise
        check_model_parity(f"{family} {side}-padded", model, base, ref, run)
    assert calls["flash_attn_varlen_func"] == N_LAYER and calls["scaled_dot_product_attention"] == 0
    assert backends.last_choice("varlen_attention").backend == "triton"


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_greedy_generation_with_left_padding_gives_the_unpatched_tokens(family, calls):
    """Prefill and every decode step (one query over the padded cache) through the varlen kernel."""
    triton_or_skip()
    model, base, _ = three(family)
    model.eval(), base.eval()
    prompt, mask, new = tokens(3, 6, seed=2), padding_mask("left", t=6), 4
    prompt[~mask.bool()] = 0
    kw = dict(attention_mask=mask, max_new_tokens=new, do_sample=False, pad_token_id=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FallbackWarning)
        with fastgpt.use_backend("triton", strict=True):
            got = model.generate(prompt, **kw)
    assert torch.equal(got, base.generate(prompt, **kw))
    assert calls["flash_attn_varlen_func"] == N_LAYER * new
    assert calls["flash_attn_func"] == calls["flash_attn_with_kvcache"] == calls["scaled_dot_product_attention"] == 0


@pytest.mark.parametrize("how", ["mask", "position_ids", "cu_seq_lens"])
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_a_packed_row_equals_its_sequences_run_separately(family, how, calls, monkeypatch):
    """One row of three sequences told apart by position_ids restarts. Without a KV cache transformers
    builds a block-diagonal mask ("mask"); with one (use_cache's default) it builds none and the
    position_ids are read ("position_ids"); or its varlen kwargs are given ("cu_seq_lens")."""
    triton_or_skip()
    model, base, ref = three(family)
    lengths = (4, 7, 3)
    ids, targets = tokens(1, sum(lengths)), tokens(1, sum(lengths), seed=1)
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    cu = torch.tensor([0, 4, 11, 14], dtype=torch.int32)
    kwargs = {"position_ids": position_ids, "use_cache": False if how == "mask" else None}
    if how == "cu_seq_lens":
        kwargs.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=7, max_length_k=7)
    read = spy_on_fastgpt(monkeypatch, ("_packed_layout", "_read_position_ids"), hf_attention)

    def run(m):
        if m is model:
            logits = m(input_ids=ids, **kwargs).logits[0]
        else:  # the sequences one by one
            logits = torch.cat([m(input_ids=part).logits[0] for part in ids.split(lengths, dim=1)])
        return {"logits": logits, "loss": F.cross_entropy(logits.float(), targets[0])}

    with fastgpt.use_backend("triton", strict=True):
        check_model_parity(f"{family} packed ({how})", model, base, ref, run)
    assert calls["flash_attn_varlen_func"] == N_LAYER and calls["scaled_dot_product_attention"] == 0
    # each forward reads its mask / position_ids once, not once per layer
    assert read == {"_packed_layout": how == "mask", "_read_position_ids": how == "position_ids"}


def test_other_masks_fall_back_to_sdpa_with_one_warning():
    """Padding with a hole (not one run of tokens per row) and a custom 4D sliding-window mask."""
    base = hf_gpt2(vocab_size=VOCAB)
    ref, model = copy.deepcopy(base).double(), copy.deepcopy(base)
    fastgpt.patch(model)
    ids = tokens(2, 10)
    holed = torch.ones(2, 10, dtype=torch.long)
    holed[1, 4] = 0
    window = torch.ones(10, 10, dtype=torch.bool).tril() & ~torch.ones(10, 10, dtype=torch.bool).tril(-4)
    cases = (("holed", holed, holed.bool()), ("window", window.expand(2, 1, 10, 10), torch.ones(2, 10, dtype=torch.bool)))
    for name, mask, real in cases:
        backends.reset_warnings()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with torch.no_grad():
                out, want, want64 = (m(input_ids=ids, attention_mask=mask).logits for m in (model, base, ref))
                model(input_ids=ids, attention_mask=mask)
        fallbacks = [w for w in caught if issubclass(w.category, FallbackWarning) and "attn_mask" in str(w.message)]
        assert len(fallbacks) == 1, (name, [str(w.message) for w in caught])
        assert_parity(f"{name} mask", out[real], want64[real], want[real])
        with fastgpt.use_backend("auto", strict=True), pytest.raises(BackendUnavailableError):
            model(input_ids=ids, attention_mask=mask)
    # an all-ones mask is no mask: the causal kernel, no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error", FallbackWarning)
        with fastgpt.use_backend("reference"), torch.no_grad():
            model(input_ids=ids, attention_mask=torch.ones_like(holed))


# ---- the attention function on masks built by transformers' own sdpa_mask ------------------------


def hf_mask(pads, sq, past=0, slots=0, right=(), mask_function=None):
    """transformers' sdpa mask for rows with ``pads`` left-padding tokens (and ``right`` right-padding
    ones), Sq queries after ``past`` cached keys and ``slots`` unwritten static-cache slots; causal
    unless another ``mask_function`` is given."""
    b, seen = len(pads), past + sq
    mask2d = torch.ones(b, seen, dtype=torch.bool)
    for row, n in enumerate(pads):
        mask2d[row, :n] = False
    for row, n in enumerate(right):
        mask2d[row, seen - n:] = False
    mask = masking_utils.sdpa_mask(batch_size=b, q_length=sq, kv_length=seen + slots, q_offset=past,
                                   mask_function=mask_function or masking_utils.causal_mask_function,
                                   attention_mask=mask2d, allow_is_causal_skip=False)
    return mask, mask2d[:, past:]


MASKS = {  # name: (hf_mask arguments, whether the varlen kernel serves it)
    "left prefill": (dict(pads=(0, 3, 6), sq=8), True),
    "right prefill": (dict(pads=(0, 0, 0), right=(0, 2, 7), sq=8), True),
    "both sides": (dict(pads=(1, 0), right=(2, 3), sq=8), True),
    "left decode": (dict(pads=(0, 3, 6), sq=1, past=8), True),
    "left chunk, static slots": (dict(pads=(0, 4), sq=3, past=6, slots=5), True),
    "an all-padding row": (dict(pads=(0, 6), sq=6), True),
    "no padding, static slots": (dict(pads=(0, 0), sq=3, past=2, slots=4), False),
}


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("name", list(MASKS))
def test_attention_under_transformers_masks_equals_masked_sdpa(name, backend, calls):
    """Output at real queries and q/k/v gradients against torch's SDPA under the same mask (GQA, float32,
    parity against float64); padded queries give 0 and their positions no gradient."""
    if backend == "triton":
        triton_or_skip()
    args, varlen = MASKS[name]
    mask, real = hf_mask(**args)
    b, sq, sk = mask.shape[0], mask.shape[2], mask.shape[3]
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b, h, s, 16, generator=g) for h, s in ((4, sq), (2, sk), (2, sk)))
    module = torch.nn.Module()
    results = []
    for fn, dtype in ((hf_attention.hf_attention_forward, torch.float32), (None, torch.float32), (None, torch.float64)):
        x = [t.to(dtype).requires_grad_() for t in (q, k, v)]
        if fn is None:
            dense = F.scaled_dot_product_attention(*x, attn_mask=mask, enable_gqa=True).transpose(1, 2)
            out = torch.where(real[..., None, None], dense, 0.0)
        else:
            with fastgpt.use_backend(backend, strict=True):
                out, _ = fn(module, *x, mask)
        loss = (out * torch.linspace(-1, 1, out.numel(), dtype=dtype).view(out.shape)).sum()
        results.append((out.detach(), torch.autograd.grad(loss, x)))
    (out, grads), (base, bgrads), (ref, rgrads) = results
    assert_parity(f"{name} out", out, ref, base)
    assert torch.equal(out[~real], torch.zeros_like(out[~real]))
    for t, g32, gb, g64 in zip("qkv", grads, bgrads, rgrads):
        assert_parity(f"{name} d{t}", g32, g64, gb, gradient=True)
    assert calls["flash_attn_varlen_func"] == int(varlen) and calls["scaled_dot_product_attention"] == 0


def test_layouts_read_from_masks():
    """Which masks are recognised, and the segments a padded row becomes."""
    mask, _ = hf_mask(pads=(2, 0), right=(0, 1), sq=4)
    layout = read_mask(mask, 2, 4, 4)
    # per row: (pad queries, no key), (no query, pad keys), (real, real), (pad queries, no key), (no query, pad keys)
    assert layout.cu_q.tolist() == [0, 2, 2, 4, 4, 4, 4, 4, 7, 8, 8]
    assert layout.cu_k.tolist() == [0, 0, 2, 4, 4, 4, 4, 4, 7, 7, 8]
    assert (layout.max_q, layout.max_k, layout.causal) == (3, 3, True)
    additive = torch.zeros(mask.shape).masked_fill(~mask, float("-inf"))
    assert read_mask(additive, 2, 4, 4).cu_q.tolist() == layout.cu_q.tolist()
    lowest = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)  # eager masks' form
    assert read_mask(lowest, 2, 4, 4) is not None
    assert read_mask(additive.masked_fill(mask, 0.5), 2, 4, 4) is None  # a bias, not a mask
    assert read_mask(mask.expand(2, 3, 4, 4), 2, 4, 4) is None  # per-head masks are not transformers'
    packed = torch.block_diag(torch.ones(2, 2), torch.ones(3, 3)).bool().tril()[None, None]
    layout = read_mask(packed, 1, 5, 5)
    assert layout.cu_q.tolist() == layout.cu_k.tolist() == [0, 2, 5] and layout.max_q == 3
    reopened = packed.clone()
    reopened[..., 4, 0] = True  # a query that sees into the previous sequence
    assert read_mask(reopened, 1, 5, 5) is None


def test_causal_prefix_detection():
    causal = torch.ones(3, 5, dtype=torch.bool).tril(diagonal=2)[None, None]  # 3 queries after 2 cached keys
    assert causal_prefix_length(causal.expand(2, 1, 3, 5), 3, 5) == 5
    static = torch.zeros(1, 1, 3, 8, dtype=torch.bool)
    static[..., :5] = causal  # 3 unwritten static-cache slots after them
    assert causal_prefix_length(static, 3, 8) == 5
    # top-left alignment is the causal pattern over the first 3 keys, the last 2 hidden
    assert causal_prefix_length(torch.ones(3, 5, dtype=torch.bool).tril()[None, None], 3, 5) == 3
    window = causal.clone()
    window[..., 2, 0] = False  # a sliding window: not causal attention
    assert causal_prefix_length(window, 3, 5) is None
    padded = causal.repeat(2, 1, 1, 1)
    padded[0, :, :, 0] = False  # left padding in one row: the varlen kernel's, not a causal prefix
    assert causal_prefix_length(padded, 3, 5) is None and read_mask(padded, 2, 3, 5).cu_q is not None
    assert causal_prefix_length(causal.float(), 3, 5) is None  # 1.0 is not an additive mask's 0


def test_one_mask_is_read_once_per_forward_not_once_per_layer(monkeypatch):
    """transformers passes one mask object to every layer: fastgpt inspects it (a GPU sync) once."""
    seen = []
    real = hf_attention.read_mask
    monkeypatch.setattr(hf_attention, "read_mask", lambda *a: seen.append(a) or real(*a))
    mask = torch.ones(3, 5, dtype=torch.bool).tril(diagonal=2)[None, None]
    assert [hf_attention.mask_layout(mask, 1, 3, 5).keys for _ in range(4)] == [5] * 4
    assert len(seen) == 1
    mask[..., -1] = False  # changed in place: read again (now the last query is right padding)
    assert hf_attention.mask_layout(mask, 1, 3, 5).cu_q is not None and len(seen) == 2
    hf_attention.mask_layout(mask.clone(), 1, 3, 5)  # another tensor, even with equal values: read again
    assert len(seen) == 3


def test_packed_position_ids_that_cannot_be_served_raise():
    module, q = torch.nn.Module(), torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match="cannot continue from a KV cache"):
        hf_attention.hf_attention_forward(module, q, torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8), None,
                                          position_ids=torch.tensor([[0, 1, 0, 1]]))
    with pytest.raises(ValueError, match="position_ids must start each sequence"):
        hf_attention.hf_attention_forward(module, q, q, q, None, position_ids=torch.tensor([[1, 0, 1, 2]]))
