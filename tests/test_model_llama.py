"""fastgpt.GPT's Llama-style configuration: RMSNorm, rotary, SwiGLU, GQA, the fused loss, from_hf for
Llama/Mistral/Qwen2 (against transformers' own models, never downloaded), generation, the Triton kernels."""

import copy

import pytest
import torch
from nanogpt_reference import check_model_parity

import fastgpt
from fastgpt import GPT, GPTConfig
from fastgpt.model import ARCHITECTURES
from fastgpt.model_hf import llama_key_map
from fastgpt.testing import assert_parity

LLAMA = dict(block_size=32, vocab_size=96, n_layer=2, n_head=4, n_embd=64, bias=False, n_kv_head=2, intermediate_size=96,
             **ARCHITECTURES["llama"])


def tokens(b, t, vocab=96, seed=0):
    return torch.randint(0, vocab, (b, t), generator=torch.Generator().manual_seed(seed))


def perturb(model, seed=1, scale=0.05):
    """Norm weights start at 1 and biases at 0: perturb every parameter, so a swapped or misplaced one shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)
    return model


def llama_gpt(dtype=torch.float32, **overrides):
    torch.manual_seed(0)
    return perturb(GPT(GPTConfig(**{**LLAMA, **overrides}))).to(dtype)


def hf_model(kind="llama", **overrides):
    """A small random transformers model of the Llama family (its float32 weights perturbed, as above)."""
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    transformers.logging.set_verbosity_error()
    names = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2"}[kind]
    kw = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2, intermediate_size=96,
              vocab_size=96, max_position_embeddings=32, rms_norm_eps=1e-6, tie_word_embeddings=False,
              bos_token_id=None, eos_token_id=None, pad_token_id=None)
    if kind == "mistral":
        kw["sliding_window"] = None
    kw.update(overrides)
    torch.manual_seed(0)
    config = getattr(transformers, names + "Config")(**kw)
    return perturb(getattr(transformers, names + "ForCausalLM")(config)).eval()


# ---- configuration ------------------------------------------------------------------------------


@pytest.mark.parametrize("field, value, match", [
    ("norm", "batchnorm", "norm must be 'layernorm' or 'rmsnorm'"),
    ("positional", "alibi", "positional must be 'learned' or 'rotary'"),
    ("mlp", "relu", "mlp must be 'gelu' or 'swiglu'"),
    ("norm_eps", 0.0, "norm_eps must be a finite number > 0"),
    ("rope_theta", float("nan"), "rope_theta must be a finite number > 0"),
    ("intermediate_size", 0, "intermediate_size must be None or a positive integer"),
    ("n_kv_head", 3, r"n_kv_head \(3\) must divide n_head \(4\)"),
    ("n_kv_head", True, "n_kv_head must be None or a positive integer"),
    ("qkv_bias", "yes", "qkv_bias must be None or a bool"),
    ("tie_embeddings", None, "tie_embeddings must be a bool"),
    ("n_embd", 36, "positional 'rotary' needs an even head dim"),
])
def test_every_option_is_validated_with_an_error_naming_it(field, value, match):
    with pytest.raises(ValueError, match=match):
        GPTConfig(**{**LLAMA, field: value})


def test_defaults_are_gpt2_and_the_llama_layout_is_what_it_says():
    gpt2 = GPTConfig()
    assert gpt2.gpt2_architecture and GPT(GPTConfig(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).fused_loss is False
    cfg = GPTConfig(**LLAMA)
    assert not cfg.gpt2_architecture and cfg.kv_heads == 2 and cfg.head_dim == 16
    assert GPTConfig(n_embd=4096, n_head=32, mlp="swiglu").mlp_hidden == 11008  # Llama-7B's width by Llama's rule
    model = GPT(cfg)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert "transformer.wpe.weight" not in shapes and not any(k.endswith(".bias") for k in shapes)
    assert shapes["transformer.h.0.attn.c_attn.weight"] == ((4 + 2 * 2) * 16, 64)  # q, then k and v of 2 kv heads
    assert shapes["transformer.h.0.mlp.c_fc.weight"] == (2 * 96, 64) and shapes["transformer.h.0.mlp.c_proj.weight"] == (64, 96)
    assert model.lm_head.weight is not model.transformer.wte.weight and model.fused_loss
    assert isinstance(model.transformer.h[0].ln_1, fastgpt.nn.RMSNorm)
    n_all = sum(p.numel() for p in model.parameters())
    assert model.get_num_params() == n_all - 96 * 64  # the untied wte is a lookup table
    model.crop_block_size(8)  # no position table to cut
    assert model.config.block_size == 8


# ---- the fused loss, forward and backward --------------------------------------------------------


@pytest.mark.parametrize("overrides", [{}, dict(n_kv_head=1, tie_embeddings=True, qkv_bias=True)], ids=["gqa-untied", "mqa-tied-qkvbias"])
def test_fused_loss_and_gradients_equal_cross_entropy_of_the_full_logits(overrides):
    """fused_loss (no logits held) against F.cross_entropy of lm_head(x), float32 and float64, every gradient."""
    model = llama_gpt(**overrides)
    base = copy.deepcopy(model)
    base.fused_loss = False
    ref = copy.deepcopy(base).double()
    idx, targets = tokens(3, 13), tokens(3, 13, seed=1)
    targets[0, :4] = -1  # nanoGPT's ignore_index

    def run(m):
        logits, loss = m(idx, targets)
        assert (logits is None) == m.fused_loss
        return {"loss": loss}

    checked = check_model_parity("fused loss", model, base, ref, run)
    assert len(checked) == 1 + len(list(model.parameters()))


def test_unfused_formulation_and_bf16_autocast_stay_close():
    model = llama_gpt()
    idx, targets = tokens(2, 16), tokens(2, 16, seed=1)
    plain = copy.deepcopy(model)
    plain.use_fused_ops = False
    ref = copy.deepcopy(model).double()
    with torch.no_grad():
        loss, plain_loss, ref_loss = model(idx, targets)[1], plain(idx, targets)[1], ref(idx, targets)[1]
        assert_parity("fused ops", loss, ref_loss, plain_loss)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = model(idx, targets)[1]
    assert bf16.dtype == torch.float32  # a float32 loss, as F.cross_entropy gives under autocast
    assert bf16 != loss  # the lm_head matmuls ran in the autocast dtype
    assert abs(bf16.double() - ref_loss).item() < 0.02 * ref_loss.item()


@pytest.mark.slow
def test_compile_fullgraph_traces_the_llama_model_forward_and_backward():
    """No graph break (rotary, GQA attention, SwiGLU, add+RMSNorm, fused loss); aot_eager: no codegen."""
    model = llama_gpt(n_layer=1)
    idx, targets = tokens(2, 9), tokens(2, 9, seed=1)
    torch._dynamo.reset()
    loss = torch.compile(model, fullgraph=True, dynamic=False, backend="aot_eager")(idx, targets)[1]
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    eager = model(idx, targets)[1]
    eager.backward()
    torch.testing.assert_close(loss, eager, rtol=1e-5, atol=1e-6)
    for n, p in model.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, rtol=1e-5, atol=1e-6, msg=n)


def test_triton_kernels_serve_the_llama_model_under_the_interpreter():
    """Every fastgpt op of the model on its Triton kernel (TRITON_INTERPRET=1 on CPU), strict: no fallback."""
    from fastgpt import backends

    if backends.backend_unavailable_reason("triton", torch.device("cpu")) is not None:
        pytest.skip(f"triton cannot run on cpu tensors here: {backends.backend_unavailable_reason('triton', torch.device('cpu'))}")
    model = llama_gpt(n_layer=1, n_embd=32, n_head=2, n_kv_head=1, intermediate_size=48, vocab_size=40)
    base = copy.deepcopy(model)
    base.fused_loss = False
    ref = copy.deepcopy(base).double()
    idx, targets = tokens(1, 7, vocab=40), tokens(1, 7, vocab=40, seed=1)

    ops = ("rms_norm", "add_rms_norm", "rotary", "attention", "swiglu", "linear_cross_entropy")
    served = {}

    def run(m):
        if m is not model:
            return {"loss": m(idx, targets)[1]}
        backends.reset_last_choices()
        with fastgpt.use_backend("triton", strict=True):
            loss = m(idx, targets)[1]
        served.update({op: getattr(backends.last_choice(op), "backend", None) for op in ops})
        return {"loss": loss}

    check_model_parity("triton llama", model, base, ref, run)  # each backward runs under its forward's backend
    assert served == dict.fromkeys(ops, "triton")


# ---- generation ------------------------------------------------------------------------------------


def test_greedy_generate_with_cache_equals_recomputation_through_the_sliding_window():
    """block_size 16, 5 + 20 tokens: the cache (rotary offsets, 2 kv heads) fills, then the window slides."""
    model = llama_gpt(torch.float64, block_size=16).eval()
    prompt = tokens(2, 5)
    cached = model.generate(prompt, 20, top_k=1)
    assert cached.shape == (2, 25) and torch.equal(cached, model.generate(prompt, 20, top_k=1, use_cache=False))
    torch.manual_seed(5)
    a = model.generate(prompt, 8, temperature=0.8, top_k=10)
    torch.manual_seed(5)
    assert torch.equal(a, model.generate(prompt, 8, temperature=0.8, top_k=10, use_cache=False))


def test_kv_cache_decode_step_logits_match_full_forward_within_parity():
    model = llama_gpt().eval()
    ref = copy.deepcopy(model).double()
    idx = tokens(2, 10)
    caches = [fastgpt.nn.KVCache(16) for _ in model.transformer.h]
    with torch.no_grad():
        model._hidden(idx[:, :9], caches)
        step = model.lm_head(model._hidden(idx[:, 9:], caches))[:, -1]
        assert caches[0].length == 10 and caches[0].k.shape[2] == 2  # n_kv_head heads cached
        assert_parity("decode step", step, ref(idx)[0][:, -1], model(idx)[0][:, -1])


# ---- Hugging Face import ---------------------------------------------------------------------------


def hf_grads(m, idx):
    m.zero_grad(set_to_none=True)
    out = m(input_ids=idx, labels=idx)
    out.loss.backward()
    return out, {n: p.grad for n, p in m.named_parameters()}


@pytest.mark.parametrize("kind, overrides", [
    ("llama", {}),
    ("llama", dict(num_key_value_heads=1, tie_word_embeddings=True, rope_theta=500.0)),
    ("mistral", {}),
    ("qwen2", dict(tie_word_embeddings=True)),
], ids=["llama-gqa", "llama-mqa-tied-theta", "mistral", "qwen2-qkvbias-tied"])
def test_from_hf_logits_loss_and_gradients_match_the_hf_model(kind, overrides):
    hf = hf_model(kind, **overrides)
    hf64 = copy.deepcopy(hf).double()
    gpt = GPT.from_hf(hf)
    cfg = gpt.config
    assert (cfg.qkv_bias, cfg.n_kv_head, cfg.tie_embeddings, cfg.rope_theta, cfg.norm_eps) == (
        True if kind == "qwen2" else None, overrides.get("num_key_value_heads", 2), overrides.get("tie_word_embeddings", False),
        overrides.get("rope_theta", 10000.0), 1e-6)
    assert gpt.fused_loss and gpt.training
    idx = tokens(2, 12)
    (out, base), (ref, ref_g) = hf_grads(hf, idx), hf_grads(hf64, idx)
    gpt.zero_grad()
    _, loss = gpt(idx[:, :-1], idx[:, 1:])  # the fused loss
    loss.backward()
    assert_parity(f"{kind} loss", loss.detach(), ref.loss.detach(), out.loss.detach())
    with torch.no_grad():
        gpt.fused_loss = False
        logits = gpt(idx[:, :-1], idx[:, 1:])[0]
    assert_parity(f"{kind} logits", logits, ref.logits[:, :-1].detach(), out.logits[:, :-1].detach())
    key_map = llama_key_map(gpt.config)
    for name, p in gpt.named_parameters():
        hf_names = key_map[name]
        g_base, g_ref = (torch.cat([g[h] for h in hf_names]) for g in (base, ref_g))
        assert_parity(f"{kind} grad {name}", p.grad, g_ref, g_base, gradient=True)


def test_from_hf_greedy_generation_equals_transformers():
    hf = hf_model("llama").double()
    gpt = GPT.from_hf(hf).eval()
    assert gpt.transformer.wte.weight.dtype == torch.float64
    prompt = tokens(2, 5)
    ours = gpt.generate(prompt, 20, top_k=1)
    theirs = hf.generate(prompt, max_new_tokens=20, do_sample=False, attention_mask=torch.ones_like(prompt))
    assert torch.equal(ours, theirs)
    assert torch.equal(ours, gpt.generate(prompt, 20, top_k=1, use_cache=False))


def test_from_hf_reads_a_save_pretrained_folder(tmp_path):
    hf = hf_model("qwen2")
    hf.save_pretrained(tmp_path)
    gpt = GPT.from_hf(tmp_path).eval()
    idx = tokens(2, 9)
    with torch.no_grad():
        base = hf(idx).logits[:, -1:]
        ref = copy.deepcopy(hf).double()(idx).logits[:, -1:]
        assert_parity("from_hf folder", gpt(idx)[0], ref, base)
    assert gpt.transformer.wte.weight.data_ptr() != hf.model.embed_tokens.weight.data_ptr(), "a copy, not shared storage"


@pytest.mark.parametrize("kind, overrides, match", [
    ("llama", dict(hidden_act="gelu"), "hidden_act"),
    ("llama", dict(rope_scaling={"rope_type": "linear", "factor": 2.0}), "rope_(parameters|scaling)"),
    ("llama", dict(head_dim=32), "head_dim"),
    ("llama", dict(attention_bias=True), "attention_bias"),
    ("llama", dict(mlp_bias=True), "mlp_bias"),
    ("qwen2", dict(use_sliding_window=True, sliding_window=8, max_window_layers=1), "use_sliding_window"),
])
def test_from_hf_rejects_what_gpt_cannot_represent(kind, overrides, match):
    hf = hf_model(kind, **overrides)
    with pytest.raises(ValueError, match=match):
        GPT.from_hf(hf)


def test_from_hf_mistral_window_bounds_the_block_size_and_bad_arguments_raise():
    assert GPT.from_hf(hf_model("mistral", sliding_window=16)).config.block_size == 16
    with pytest.raises(TypeError, match="LlamaForCausalLM"):
        GPT.from_hf(torch.nn.Linear(2, 2))
    base = hf_model("llama").model  # a LlamaModel: untied embeddings and no lm_head
    with pytest.raises(ValueError, match="no lm_head"):
        GPT.from_hf(base)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_model_on_the_kernels_matches_transformers_within_parity(device, dtype):
    """From a 16-bit LlamaForCausalLM (the plain-torch base): loss, logits and every gradient with every op on
    its kernel (the GPU, or TRITON_INTERPRET=1 on CPU), strict: no fallback."""
    from fastgpt import backends

    if backends.backend_unavailable_reason("triton", device) is not None:
        pytest.skip(f"triton cannot run on {device} tensors here: {backends.backend_unavailable_reason('triton', device)}")
    hf = hf_model("llama", hidden_size=32, num_attention_heads=2, num_key_value_heads=1, num_hidden_layers=1,
                  intermediate_size=48, vocab_size=40).to(device)
    hf64, hf = copy.deepcopy(hf).double(), hf.to(dtype)
    gpt = GPT.from_hf(hf)
    idx = tokens(2, 9, vocab=40).to(device)
    (out, base), (ref, ref_g) = hf_grads(hf, idx), hf_grads(hf64, idx)
    with fastgpt.use_backend("triton", strict=True):
        _, loss = gpt(idx[:, :-1], idx[:, 1:])
        loss.backward()
        with torch.no_grad():
            gpt.fused_loss = False
            logits = gpt(idx[:, :-1], idx[:, 1:])[0]
    assert loss.dtype == out.loss.dtype == torch.float32  # both sum 16-bit logits in float32
    assert_parity("16-bit loss", loss.detach(), ref.loss.detach(), out.loss.detach())
    assert_parity("16-bit logits", logits, ref.logits[:, :-1].detach(), out.logits[:, :-1].detach())
    key_map = llama_key_map(gpt.config)
    for name, p in gpt.named_parameters():
        g_base, g_ref = (torch.cat([g[h] for h in key_map[name]]) for g in (base, ref_g))
        assert_parity(f"16-bit grad {name}", p.grad, g_ref, g_base, gradient=True)
