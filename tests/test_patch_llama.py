"""fastgpt.patch / unpatch on Hugging Face Llama, Mistral and Qwen2 causal LMs and torch.nn.RMSNorm.

Every model is a small random config built here (nothing is downloaded); each patched model is compared
with the unpatched copy of itself and its float64 copy under the parity rule (fastgpt.testing).
"""

import copy
import json

import pytest
import torch
from nanogpt_reference import check_model_parity

import fastgpt
from fastgpt import backends
from fastgpt.testing import allocation_recorder, assert_parity

transformers = pytest.importorskip("transformers", reason="transformers is not installed")

FAMILIES = ("llama", "mistral", "qwen2")
VOCAB = 128
SPIED = ("rms_norm", "swiglu", "apply_rotary_pos_emb", "flash_attn_func", "flash_attn_with_kvcache", "linear_cross_entropy")


def hf_model(family, seed=0, n_layer=2, **overrides):
    """A small random causal LM of the family (4 query heads sharing 2 key/value heads), in training mode."""
    transformers.logging.set_verbosity_error()
    kw = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=n_layer, num_attention_heads=4, num_key_value_heads=2,
              vocab_size=VOCAB, max_position_embeddings=64, initializer_range=0.1)
    if family == "mistral":
        kw["sliding_window"] = None  # plain causal attention here (windows: tests/test_hf_attention_window.py)
    if family == "qwen2":
        kw["tie_word_embeddings"] = True  # the fused loss's weight gradient reaches the tied embedding
    kw.update(overrides)
    config_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    }[family]
    torch.manual_seed(seed)
    model = model_cls(config_cls(**kw))
    with torch.no_grad():  # non-trivial norm weights and biases, so that every gradient is exercised
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.normal_(1.0, 0.2)
            elif p.dim() == 1:
                p.normal_(0.0, 0.2)
    return model.train()


def tokens(b, t, seed=0, vocab=VOCAB):
    return torch.randint(0, vocab, (b, t), generator=torch.Generator().manual_seed(seed))


def training_run(ids, labels, **loss_kwargs):
    """Logits without labels, and the loss with labels (what the fused path serves in training)."""

    def run(m):
        logits = m(input_ids=ids).logits
        return {"logits": logits, "loss": m(input_ids=ids, labels=labels, **loss_kwargs).loss}

    return run


def spy_on_fastgpt(monkeypatch, names=SPIED, owner=fastgpt):
    """Count the calls of owner's functions ``names`` (by default fastgpt's Llama-family ones; the patched
    modules look them up per call)."""
    calls = dict.fromkeys(names, 0)

    def spy(name, real):
        def run(*args, **kwargs):
            calls[name] += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(owner, name, run)

    for name in names:
        spy(name, getattr(owner, name))
    return calls


def three(family, **overrides):
    """(model to patch, plain copy, float64 copy) of one random model."""
    base = hf_model(family, **overrides)
    return copy.deepcopy(base), base, copy.deepcopy(base).double()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("family", FAMILIES)
def test_patched_model_logits_loss_and_every_gradient_match(family, dtype, monkeypatch):
    base = hf_model(family).to(dtype)
    model, ref = copy.deepcopy(base), copy.deepcopy(base).double()
    report = fastgpt.patch(model)
    prefix = type(base).__name__.removesuffix("ForCausalLM")
    assert "fastgpt.linear_cross_entropy" in report.replaced[""]
    attn = report.replaced["model.layers.1.self_attn"]
    assert "fastgpt.apply_rotary_pos_emb" in attn and "attn_implementation 'sdpa' -> 'fastgpt'" in attn
    assert "fastgpt.swiglu" in report.replaced["model.layers.0.mlp"]
    assert "cast_before_weight=True" in report.replaced["model.norm"]
    assert f"{prefix}RotaryEmbedding" in "".join(report.left_alone)
    assert len(report.replaced) == 1 + 2 * 4 + 1  # the loss; attention, MLP and two norms per layer; the final norm
    assert model.config._attn_implementation == "fastgpt" and base.config._attn_implementation == "sdpa"

    ids, labels = tokens(2, 13), tokens(2, 13, seed=1)
    labels[0, :4] = -100
    calls = spy_on_fastgpt(monkeypatch)
    check_model_parity(f"patched {family} {dtype}", model, base, ref, training_run(ids, labels))
    # two forwards of the patched model (logits, loss); the plain copies called nothing of fastgpt's,
    # so transformers' own apply_rotary_pos_emb is untouched for them
    assert calls == {"rms_norm": 10, "swiglu": 4, "apply_rotary_pos_emb": 4, "flash_attn_func": 4,
                     "flash_attn_with_kvcache": 0, "linear_cross_entropy": 1}
    out = model(input_ids=ids, labels=labels)
    assert out.logits is None and out.loss.dtype == torch.float32  # transformers' loss is float32 too
    model.eval()  # evaluation keeps transformers' forward: logits, and its loss over them
    with torch.no_grad():
        out, want = model(input_ids=ids, labels=labels), base(input_ids=ids, labels=labels)
    assert out.logits.shape == (2, 13, VOCAB)
    assert_parity(f"{family} eval loss", out.loss, ref(input_ids=ids, labels=labels).loss.detach(), want.loss)


@pytest.mark.parametrize("dtype, weight_dtype", [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
                                                 (torch.bfloat16, torch.float32), (torch.float32, torch.float32)], ids=str)
def test_patched_hf_rms_norm_is_bitwise_the_module_it_replaces(dtype, weight_dtype):
    """float32 statistics, x rounded to its dtype before the weight, the promoted dtype out (autocast: float32)."""
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

    norm = Qwen2RMSNorm(96, eps=1e-5).to(weight_dtype)
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.3)
    x = (torch.randn(3, 7, 96) * 3).to(dtype)
    want = norm(x)
    assert fastgpt.patch(norm).replaced
    got = norm(x)
    assert got.dtype == want.dtype and torch.equal(got, want)


@pytest.mark.parametrize("family", FAMILIES)
def test_patched_greedy_generation_equals_unpatched(family, monkeypatch):
    model = hf_model(family).eval()
    prompt = tokens(2, 5)
    want = model.generate(prompt, max_new_tokens=8, do_sample=False)
    fastgpt.patch(model)
    calls = spy_on_fastgpt(monkeypatch)
    got = model.generate(prompt, max_new_tokens=8, do_sample=False)
    assert torch.equal(got, want)
    # the prefill through flash_attn_func, every later step (GQA, one query) through the decode op
    assert calls["flash_attn_func"] == 2 and calls["flash_attn_with_kvcache"] == 2 * 7


def test_triton_kernels_serve_a_patched_llama_under_the_interpreter():
    """The Triton kernels (TRITON_INTERPRET=1 on CPU), forward and backward, strict: nothing falls back."""
    if backends.backend_unavailable_reason("triton", torch.device("cpu")) is not None:
        pytest.skip(f"triton cannot run on cpu tensors here: {backends.backend_unavailable_reason('triton', torch.device('cpu'))}")
    model, base, ref = three("llama", n_layer=1)
    fastgpt.patch(model)
    ids, labels = tokens(1, 9), tokens(1, 9, seed=1)
    with fastgpt.use_backend("triton", strict=True):
        check_model_parity("triton-patched llama", model, base, ref, training_run(ids, labels))
    for op in ("rms_norm", "swiglu", "rotary", "attention", "linear_cross_entropy"):
        assert backends.last_choice(op).backend == "triton", (op, backends.last_choice(op))


def test_fused_loss_follows_transformers_loss_options():
    """num_items_in_batch (sum / items), shift_labels, ignore_index and return_dict=False as transformers has them."""
    model, base, ref = three("llama")
    fastgpt.patch(model)
    ids, labels = tokens(2, 10), tokens(2, 10, seed=1)
    labels[1, 5:] = -100
    check_model_parity("num_items_in_batch", model, base, ref, training_run(ids, labels, num_items_in_batch=torch.tensor(40)))
    shifted = tokens(2, 10, seed=2)
    shifted[:, -2:] = 7
    for kwargs in (dict(shift_labels=shifted), dict(ignore_index=7)):
        got, want = (m(input_ids=ids, labels=shifted, **kwargs).loss for m in (model, base))
        assert_parity(f"loss {sorted(kwargs)}", got.detach(), ref(input_ids=ids, labels=shifted, **kwargs).loss.detach(), want.detach())
    got, want = (m(ids, None, None, None, None, labels, return_dict=False) for m in (model, base))
    assert type(got) is tuple and len(got) == len(want) - 1  # (loss, cache): no logits
    assert_parity("positional call", got[0].detach(), ref(ids, labels=labels).loss.detach(), want[0].detach())


def test_fused_loss_never_holds_the_logits():
    """Forward and backward of the patched training step allocate nothing of (tokens x vocab) size."""
    vocab, (b, t) = 8192, (2, 64)
    model = hf_model("llama", vocab_size=vocab, n_layer=1)
    base = copy.deepcopy(model)
    fastgpt.patch(model)
    ids = tokens(b, t, vocab=vocab)
    logits_bytes = b * t * vocab * 4
    peaks = []
    for m in (model, base):
        with allocation_recorder() as rec:
            m(input_ids=ids, labels=ids).loss.backward()
        peaks.append(rec.largest)
    assert peaks[0] < logits_bytes <= peaks[1], (peaks, logits_bytes)


def test_report_ops_selection_and_unpatch_restore_everything():
    model = hf_model("qwen2")
    types = {name: type(m) for name, m in model.named_modules()}
    ids = tokens(2, 7)
    with torch.no_grad():
        want = model(ids).logits
    report = fastgpt.patch(model, ops=("rms_norm", "attention"))
    assert set(report.replaced) == {"model.norm", "model.layers.0.self_attn", "model.layers.1.self_attn"} | {
        f"model.layers.{i}.{n}" for i in range(2) for n in ("input_layernorm", "post_attention_layernorm")}
    assert report.replaced["model.layers.0.self_attn"].startswith("transformers.models.qwen2.modeling_qwen2.Qwen2Attention: attn")
    left = report.left_alone
    assert left["transformers.models.qwen2.modeling_qwen2.Qwen2MLP"] == "'swiglu' is not in ops"
    assert left["transformers.models.qwen2.modeling_qwen2.Qwen2Attention"] == "'rotary' is not in ops"
    assert left["transformers.models.qwen2.modeling_qwen2.Qwen2ForCausalLM"] == "'linear_cross_entropy' is not in ops"
    rest = fastgpt.patch(model)  # the other families; what is patched stays so
    assert set(rest.replaced) == {"", "model.layers.0.self_attn", "model.layers.1.self_attn", "model.layers.0.mlp", "model.layers.1.mlp"}
    assert "already uses the fastgpt attention" in rest.left_alone["transformers.models.qwen2.modeling_qwen2.Qwen2Attention"]
    assert fastgpt.patch(model).replaced == {}
    restored = fastgpt.unpatch(model)
    assert len(restored.replaced) == 1 + 2 * 4 + 1
    assert {name: type(m) for name, m in model.named_modules()} == types and model.config._attn_implementation == "sdpa"
    with torch.no_grad():
        assert torch.equal(model(ids).logits, want)
    assert fastgpt.unpatch(model).replaced == {}


def test_patched_model_copies_pickles_and_saves_as_its_original(tmp_path):
    model = hf_model("mistral", n_layer=1)
    fastgpt.patch(model)
    ids = tokens(1, 6)
    clone = copy.deepcopy(model)
    path = tmp_path / "model.pt"
    torch.save(model, path)
    loaded = torch.load(path, weights_only=False)  # our own file, written just above
    for other in (clone, loaded):
        assert [type(m) for m in other.modules()] == [type(m) for m in model.modules()]
        with torch.no_grad():
            assert torch.equal(other(ids).logits, model(ids).logits)
    model.save_pretrained(tmp_path / "saved")  # loaders pick the class from config.architectures
    assert json.loads((tmp_path / "saved" / "config.json").read_text())["architectures"] == ["MistralForCausalLM"]


def test_mistral_sliding_window_gets_fastgpt_attention_and_non_silu_mlps_are_left_alone():
    model = hf_model("mistral", sliding_window=4096)  # the window's parity: tests/test_hf_attention_window.py
    report = fastgpt.patch(model)
    assert model.config._attn_implementation == "fastgpt"
    assert "transformers.models.mistral.modeling_mistral.MistralAttention" not in report.left_alone
    assert "fastgpt.apply_rotary_pos_emb" in report.replaced["model.layers.0.self_attn"]
    assert "'fastgpt' (fastgpt.flash_attn_func), sliding_window=4096" in report.replaced["model.layers.0.self_attn"]

    model, base, ref = three("llama", hidden_act="gelu")
    report = fastgpt.patch(model)
    why = report.left_alone["transformers.models.llama.modeling_llama.LlamaMLP"]
    assert "GELUActivation, not SiLU" in why, why
    assert not any(path.endswith("mlp") for path in report.replaced)
    check_model_parity("llama with a GELU MLP", model, base, ref, training_run(tokens(2, 6), tokens(2, 6, seed=1)))


def test_torch_rms_norm_is_patched_in_any_model(monkeypatch):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(24, 40), torch.nn.RMSNorm(40), torch.nn.Linear(40, 40),
                                torch.nn.Unflatten(1, (4, 10)), torch.nn.RMSNorm([4, 10], eps=1e-3, elementwise_affine=False))
    with torch.no_grad():
        model[1].weight.normal_(1.0, 0.2)
    ref, base = copy.deepcopy(model).double(), copy.deepcopy(model)
    report = fastgpt.patch(model)
    assert report.replaced == {"1": "torch.nn.RMSNorm -> fastgpt.rms_norm", "4": "torch.nn.RMSNorm -> fastgpt.rms_norm"}
    assert isinstance(model[1], torch.nn.RMSNorm) and model[1].eps is None
    x = torch.randn(5, 24)
    calls = spy_on_fastgpt(monkeypatch)

    def run(m):
        y = m(x.to(m[0].weight.dtype))
        return {"y": y, "loss": (y * y.detach().sin()).sum()}

    check_model_parity("Sequential with RMSNorm", model, base, ref, run)
    assert calls["rms_norm"] == 2
    fastgpt.unpatch(model)
    assert type(model[1]) is torch.nn.RMSNorm


@pytest.mark.gpu
def test_gpu_patched_llama_training_step_runs_the_kernels_within_parity(device):
    base = hf_model("llama", hidden_size=128, intermediate_size=352)
    ref = copy.deepcopy(base).double().to(device)
    base = base.to(device, torch.bfloat16)
    model = copy.deepcopy(base)
    fastgpt.patch(model)
    ids = tokens(2, 200).to(device)
    check_model_parity("GPU patched llama bf16", model, base, ref, training_run(ids, ids))
    for op in ("rms_norm", "swiglu", "rotary", "attention", "linear_cross_entropy"):
        assert backends.last_choice(op).backend == "triton", (op, backends.last_choice(op))
