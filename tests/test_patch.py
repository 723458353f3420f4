"""fastgpt.patch / unpatch on other people's models: nanoGPT-style trees and Hugging Face GPT-2."""

import copy
import io
import pickle
import warnings

import pytest
import torch
from nanogpt_reference import CausalSelfAttention as RefAttention
from nanogpt_reference import LayerNorm as RefLayerNorm
from nanogpt_reference import RefConfig, RefGPT, check_compiled_matches_eager, check_model_parity

import fastgpt
from fastgpt import FallbackWarning
from fastgpt.testing import assert_parity

CFG = dict(block_size=16, vocab_size=64, n_layer=2, n_head=4, n_embd=32)


def tokens(b, t, vocab=64, seed=0):
    return torch.randint(0, vocab, (b, t), generator=torch.Generator().manual_seed(seed))


def nanogpt(flash=True, bias=True, n_layer=2):
    torch.manual_seed(0)
    return RefGPT(RefConfig(**{**CFG, "n_layer": n_layer}, bias=bias), flash=flash)


def lm_run(idx, targets):
    def run(m):
        logits, loss = m(idx, targets)
        return {"logits": logits, "loss": loss}

    return run


def module_types(model):
    return {name: type(m) for name, m in model.named_modules()}


# ---- nanoGPT-style models -------------------------------------------------------------------------


@pytest.mark.parametrize("flash", [True, False], ids=["flash", "masked-softmax"])
@pytest.mark.parametrize("bias", [True, False])
def test_patched_nanogpt_outputs_and_every_gradient_match(flash, bias):
    base = nanogpt(flash, bias)
    ref = copy.deepcopy(base).double()
    model = copy.deepcopy(base)
    report = fastgpt.patch(model)
    n = CFG["n_layer"]
    assert len(report.replaced) == 3 * n + 1 + n  # ln_1, ln_2, gelu per block, ln_f, attention per block
    assert "fastgpt.flash_attn_func" in report.replaced["transformer.h.0.attn"]
    assert "fastgpt.layer_norm" in report.replaced["transformer.ln_f"]
    assert "fastgpt.gelu" in report.replaced["transformer.h.1.mlp.gelu"]
    idx, targets = tokens(3, 11), tokens(3, 11, seed=1)
    check_model_parity(f"patched nanoGPT flash={flash} bias={bias}", model, base, ref, lm_run(idx, targets))


def test_patch_keeps_module_objects_parameters_names_and_isinstance():
    model = nanogpt()
    before_modules = dict(model.named_modules())
    before_params = dict(model.named_parameters())
    keys = list(model.state_dict())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    fastgpt.patch(model)
    assert dict(model.named_modules()) == before_modules  # the same objects, by identity
    after = dict(model.named_parameters())
    assert after.keys() == before_params.keys() and all(after[k] is before_params[k] for k in after)
    assert list(model.state_dict()) == keys
    block = model.transformer.h[0]
    assert isinstance(block.ln_1, RefLayerNorm) and isinstance(block.attn, RefAttention)
    assert isinstance(block.mlp.gelu, torch.nn.GELU) and isinstance(block.mlp.gelu, fastgpt.nn.GELU)
    _, loss = model(tokens(2, 8), tokens(2, 8, seed=1))
    loss.backward()
    opt.step()  # the optimizer created before patching still drives the same parameters


def test_patched_model_loads_and_saves_checkpoints_strictly():
    model = nanogpt(flash=False)  # with the causal-mask buffers
    sd = copy.deepcopy(model.state_dict())
    fastgpt.patch(model)
    model.load_state_dict(sd, strict=True)
    assert model.state_dict().keys() == sd.keys()


def test_unpatch_restores_the_original_classes_and_outputs():
    model = nanogpt(flash=False)
    types = module_types(model)
    idx = tokens(2, 9)
    with torch.no_grad():
        want = model(idx)[0]
    fastgpt.patch(model)
    assert module_types(model) != types
    restored = fastgpt.unpatch(model)
    assert module_types(model) == types
    assert len(restored.replaced) == 9
    with torch.no_grad():
        assert torch.equal(model(idx)[0], want)
    assert fastgpt.unpatch(model).replaced == {}


def test_patch_twice_is_harmless_and_ops_selects_families():
    model = nanogpt()
    report = fastgpt.patch(model, ops=("gelu",))
    assert set(report.replaced) == {"transformer.h.0.mlp.gelu", "transformer.h.1.mlp.gelu"}
    assert "'layer_norm' is not in ops" in report.left_alone[f"{RefLayerNorm.__module__}.LayerNorm"]
    assert len(fastgpt.patch(model).replaced) == 7  # the rest; the GELUs are already fastgpt's
    assert fastgpt.patch(model).replaced == {}
    with pytest.raises(ValueError, match="ops must be among"):
        fastgpt.patch(model, ops=("softmax",))
    with pytest.raises(TypeError, match="torch.nn.Module"):
        fastgpt.patch(lambda x: x)


def test_plain_torch_layer_norm_and_gelu_modules_are_patched_in_any_model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(24, 40), torch.nn.LayerNorm(40, elementwise_affine=False), torch.nn.GELU("tanh"),
        torch.nn.Linear(40, 40), torch.nn.LayerNorm(40, bias=False), torch.nn.GELU(),
    )  # fmt: skip
    ref = copy.deepcopy(model).double()
    base = copy.deepcopy(model)
    report = fastgpt.patch(model)
    assert set(report.replaced) == {"1", "2", "4", "5"}
    assert report.left_alone == {"torch.nn.Linear": "no fastgpt op for this module type"}
    x = torch.randn(6, 24)

    def run(m):
        y = m(x.to(m[0].weight.dtype))
        return {"y": y, "loss": y.square().sum()}

    check_model_parity("Sequential", model, base, ref, run)


class RotaryAttention(RefAttention):
    """A fork with an extra step in its forward: fastgpt must not claim it."""

    def forward(self, x):
        return super().forward(self.rotary(x))

    def rotary(self, x):
        return x.flip(-1)


class NonCausalAttention(RefAttention):
    """A planted bug the name check cannot see (it references only nanoGPT's names): the probe must."""

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=False)
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C)))


class ScaledLayerNorm(torch.nn.LayerNorm):
    def forward(self, x):
        return 2 * super().forward(x)


class LayerNorm(torch.nn.Module):
    """Named like nanoGPT's but with another eps: not nanoGPT's."""

    def __init__(self, n):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(n))
        self.bias = None

    def forward(self, input):
        return torch.nn.functional.layer_norm(input, self.weight.shape, self.weight, self.bias, 1e-6)


def renamed(cls, name):
    """cls under another class name (fastgpt only considers classes named like nanoGPT's)."""
    return type(name, (cls,), {})


@pytest.mark.parametrize(
    "make, reason",
    [
        (lambda cfg: renamed(RotaryAttention, "CausalSelfAttention")(cfg), "references what nanoGPT's does not (forward, rotary, super)"),
        (lambda cfg: renamed(NonCausalAttention, "CausalSelfAttention")(cfg), "its output differs from fastgpt's"),
        (lambda cfg: ScaledLayerNorm(cfg.n_embd), "forward differs from torch.nn.LayerNorm's"),
        (lambda cfg: LayerNorm(cfg.n_embd), "does not use nanoGPT's eps 1e-5"),
    ],
    ids=["fork-with-rotary", "planted-non-causal-bug", "layer-norm-subclass", "layer-norm-other-eps"],
)
def test_lookalikes_and_forks_are_left_alone_with_a_reason(make, reason):
    torch.manual_seed(0)
    module = make(RefConfig(**CFG))
    report = fastgpt.patch(torch.nn.ModuleDict({"m": module}))
    assert report.replaced == {}
    assert reason in report.left_alone[f"{type(module).__module__}.{type(module).__qualname__}"], report.left_alone


def test_patched_model_pickles_and_deep_copies_as_patched():
    model = nanogpt(n_layer=1)
    fastgpt.patch(model)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    clone = copy.deepcopy(model)
    for other in (loaded, clone, pickle.loads(pickle.dumps(model))):
        assert module_types(other) == module_types(model)
        with torch.no_grad():
            assert torch.equal(other(tokens(1, 5))[0], model(tokens(1, 5))[0])
    fastgpt.unpatch(clone)
    assert type(clone.transformer.ln_f) is RefLayerNorm and type(model.transformer.ln_f) is not RefLayerNorm


def test_patched_nanogpt_runs_under_cpu_bf16_autocast():
    base = nanogpt()
    ref = copy.deepcopy(base).double()
    model = copy.deepcopy(base)
    fastgpt.patch(model)
    idx, targets = tokens(2, 12), tokens(2, 12, seed=1)

    def run(m):
        if next(m.parameters()).dtype == torch.float64:
            logits, loss = m(idx, targets)
            return {"logits": logits.bfloat16(), "loss": loss}
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits, loss = m(idx, targets)
        return {"logits": logits, "loss": loss}

    check_model_parity("patched nanoGPT autocast bf16", model, base, ref, run)


@pytest.mark.slow
def test_compile_fullgraph_patched_model_matches_eager():
    """Inductor, forward and backward, on a patched nanoGPT model (one cold compile: ~30 s on 2 cores)."""
    model = nanogpt(n_layer=1)
    fastgpt.patch(model)
    check_compiled_matches_eager(model, tokens(2, 9), tokens(2, 9, seed=1))


def test_triton_attention_kernel_serves_a_patched_model_under_the_interpreter():
    """The real Triton kernel (TRITON_INTERPRET=1 on CPU) behind a patched 1-layer model; strict: no fallback."""
    pytest.importorskip(
        "fastgpt.kernels.flash_attention", reason="the triton flash-attention kernel (fastgpt.kernels.flash_attention) is not written yet"
    )
    from fastgpt import backends

    if backends.backend_unavailable_reason("triton", torch.device("cpu")) is not None:
        pytest.skip(f"triton cannot run on cpu tensors here: {backends.backend_unavailable_reason('triton', torch.device('cpu'))}")
    base = nanogpt(n_layer=1)
    ref = copy.deepcopy(base).double()
    model = copy.deepcopy(base)
    fastgpt.patch(model, ops=("attention",))  # layer norm and GELU have no triton backend
    idx = tokens(1, 7)
    with torch.no_grad():
        with fastgpt.use_backend("triton", strict=True):
            out = model(idx, idx)[0]
        assert_parity("triton-patched logits", out, ref(idx, idx)[0], base(idx, idx)[0])


# ---- Hugging Face GPT-2 ------------------------------------------------------------------------------


def hf_gpt2(seed=0, **overrides):
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    transformers.logging.set_verbosity_error()
    kw = dict(n_layer=2, n_head=4, n_embd=64, vocab_size=96, n_positions=32, bos_token_id=0, eos_token_id=0)
    kw.update(overrides)
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**kw))
    with torch.no_grad():  # non-trivial norms, so that every gradient is exercised
        for name, p in model.named_parameters():
            if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
                p.normal_(1.0, 0.2)
            elif p.dim() == 1:
                p.normal_(0.0, 0.2)
    return model.eval()


def hf_run(idx, attention_mask=None):
    def run(m):
        logits = m(input_ids=idx, attention_mask=attention_mask).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), idx[:, 1:].reshape(-1))
        return {"logits": logits, "loss": loss}

    return run


def test_patched_hf_gpt2_logits_and_every_gradient_match():
    base = hf_gpt2()
    ref = copy.deepcopy(base).double()
    model = copy.deepcopy(base)
    report = fastgpt.patch(model)
    assert model.config._attn_implementation == "fastgpt"
    assert "attn_implementation 'sdpa' -> 'fastgpt'" in report.replaced["transformer.h.0.attn"]
    assert "approximate='tanh'" in report.replaced["transformer.h.1.mlp.act"]
    assert "fastgpt.layer_norm" in report.replaced["transformer.ln_f"]
    assert "transformers.pytorch_utils.Conv1D" in report.left_alone
    check_model_parity("patched HF GPT-2", model, base, ref, hf_run(tokens(2, 13, vocab=96)))


def test_unpatch_restores_hf_module_types_and_attention_implementation():
    model = hf_gpt2(attn_implementation="eager")
    types = module_types(model)
    fastgpt.patch(model)
    assert module_types(model) != types and model.config._attn_implementation == "fastgpt"
    again = fastgpt.patch(model)
    assert again.replaced == {} and "already" in again.left_alone["transformers.models.gpt2.modeling_gpt2.GPT2Attention"]
    assert len(fastgpt.unpatch(model).replaced) == 2 * 2 + 1 + 2 + 2  # norms, ln_f, GELUs, attentions
    assert module_types(model) == types and model.config._attn_implementation == "eager"


def test_patched_hf_generate_with_its_kv_cache_equals_unpatched():
    model = hf_gpt2()
    prompt = tokens(2, 4, vocab=96)
    want = model.generate(prompt, max_new_tokens=8, do_sample=False)
    fastgpt.patch(model)
    got = model.generate(prompt, max_new_tokens=8, do_sample=False)
    assert torch.equal(got, want)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_patched_hf_decode_steps_run_flash_attn_with_kvcache_and_match_the_unpatched_model(backend, monkeypatch):
    """Greedy generation: the prefill takes flash_attn_func, every later step (one query over the dynamic
    cache's concatenated keys) flash_attn_with_kvcache; tokens equal the unpatched model's, and every
    step's logits meet the parity rule against the float64 model."""
    from fastgpt import backends

    if backend == "triton" and backends.backend_unavailable_reason("triton", torch.device("cpu")) is not None:
        pytest.skip(f"triton cannot run on cpu tensors here: {backends.backend_unavailable_reason('triton', torch.device('cpu'))}")
    base = hf_gpt2()
    ref = copy.deepcopy(base).double()
    model = copy.deepcopy(base)
    fastgpt.patch(model, ops=("attention",) if backend == "triton" else fastgpt.patching.OPS)  # norms/GELU: no triton
    calls = []

    def spy(name, real):
        def run(q, k, *args, **kwargs):
            calls.append((name, q.shape[1], k.shape[1], k.is_contiguous()))
            return real(q, k, *args, **kwargs)

        monkeypatch.setattr(fastgpt, name, run)

    spy("flash_attn_func", fastgpt.flash_attn_func)
    spy("flash_attn_with_kvcache", fastgpt.flash_attn_with_kvcache)
    prompt, new = tokens(2, 5, vocab=96), 6
    kw = dict(max_new_tokens=new, do_sample=False, output_logits=True, return_dict_in_generate=True)
    want, want64 = base.generate(prompt, **kw), ref.generate(prompt, **kw)
    with fastgpt.use_backend(backend, strict=True):
        got = model.generate(prompt, **kw)
    assert torch.equal(got.sequences, want.sequences)
    for step, (o, b, r) in enumerate(zip(got.logits, want.logits, want64.logits)):
        assert_parity(f"decode step {step}", o, r, b)
    layers = base.config.n_layer
    assert calls[:layers] == [("flash_attn_func", 5, 5, False)] * layers  # the prefill
    decode = [("flash_attn_with_kvcache", 1, 5 + step + 1, False) for step in range(new - 1) for _ in range(layers)]
    assert calls[layers:] == decode  # every decode step, on transposed views of transformers' cache


def test_patched_hf_generate_with_a_static_cache_matches_step_by_step():
    """A static cache's prefill passes no mask with more keys than queries (unwritten slots): top-left causal."""
    base = hf_gpt2()
    ref = copy.deepcopy(base).double()
    model = copy.deepcopy(base)
    fastgpt.patch(model)
    prompt = tokens(2, 4, vocab=96)
    kw = dict(max_new_tokens=3, do_sample=False, cache_implementation="static", output_logits=True, return_dict_in_generate=True)
    with warnings.catch_warnings():
        # decoding passes a mask of the filled slots: recognised as causal, so nothing falls back
        warnings.filterwarnings("error", "fastgpt.attention", FallbackWarning)
        out, want, want64 = (m.generate(prompt, **kw) for m in (model, base, ref))
    assert torch.equal(out.sequences, want.sequences)
    for step, (o, b, r) in enumerate(zip(out.logits, want.logits, want64.logits)):
        assert_parity(f"static-cache step {step}", o, r, b)


@pytest.mark.slow
def test_compile_fullgraph_traces_the_patched_hf_model():
    """No graph break through transformers' GPT-2 with the "fastgpt" attention; aot_eager skips codegen."""
    torch._dynamo.reset()
    model = hf_gpt2(n_layer=1)
    fastgpt.patch(model)
    run = hf_run(tokens(2, 9, vocab=96))
    compiled = torch.compile(lambda idx: run(model)["loss"], fullgraph=True, dynamic=False, backend="aot_eager")
    loss = compiled(None)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    eager_loss = run(model)["loss"]
    eager_loss.backward()
    torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-6)
    for n, p in model.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, rtol=1e-5, atol=1e-6, msg=n)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_patched_hf_gpt2_matches_within_parity(device, dtype):
    from fastgpt import backends

    base = hf_gpt2(n_embd=128, n_head=2, n_positions=256)
    ref = copy.deepcopy(base).double().to(device)
    model = copy.deepcopy(base).to(device, dtype)
    fastgpt.patch(model)
    check_model_parity(f"GPU patched HF GPT-2 {dtype}", model, base.to(device, dtype), ref, hf_run(tokens(2, 200, vocab=96).to(device)))
    assert backends.last_choice("attention").backend == "triton"
