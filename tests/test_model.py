"""fastgpt.GPT / GPTConfig: nanoGPT compatibility, parity with nanoGPT and Hugging Face GPT-2, generation."""

import copy
import math

import pytest
import torch
from nanogpt_reference import RefConfig, RefGPT, check_compiled_matches_eager, check_model_parity

import fastgpt
from fastgpt import GPT, GPTConfig
from fastgpt.testing import assert_parity

SMALL = dict(block_size=16, vocab_size=64, n_layer=2, n_head=4, n_embd=32)


def tokens(b, t, vocab=64, seed=0):
    return torch.randint(0, vocab, (b, t), generator=torch.Generator().manual_seed(seed))


def ref_and_gpt(bias=True, flash=True, dtype=torch.float32, **overrides):
    """A nanoGPT-architecture reference model and a fastgpt.GPT holding the same weights (loaded strictly)."""
    kw = {**SMALL, **overrides}
    torch.manual_seed(0)
    ref = RefGPT(RefConfig(bias=bias, **kw), flash=flash)
    gpt = GPT(GPTConfig(bias=bias, **kw))
    gpt.load_state_dict(ref.state_dict(), strict=True)
    return ref.to(dtype), gpt.to(dtype)


def lm_run(idx, targets):
    def run(m):
        logits, loss = m(idx, targets)
        return {"logits": logits, "loss": loss}

    return run


# ---- nanoGPT compatibility -------------------------------------------------------------------


@pytest.mark.parametrize("bias", [True, False])
def test_state_dict_keys_and_shapes_are_nanogpts(bias):
    ref, gpt = ref_and_gpt(bias=bias)
    want = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in gpt.state_dict().items()}
    assert got == want
    assert gpt.lm_head.weight is gpt.transformer.wte.weight  # tied
    if not bias:
        assert not any(k.endswith(".bias") for k in got)


def test_state_dict_round_trip_both_ways():
    ref, gpt = ref_and_gpt()
    back = RefGPT(RefConfig(**SMALL))
    back.load_state_dict(gpt.state_dict(), strict=True)
    for k, v in ref.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k


def test_loads_compiled_checkpoints_and_old_attention_mask_buffers():
    """nanoGPT checkpoints saved from a torch.compile'd model carry '_orig_mod.'; torch<2 ones a causal mask."""
    ref, _ = ref_and_gpt()
    masked = RefGPT(RefConfig(**SMALL), flash=False)  # registers attn.bias, the (1, 1, T, T) mask buffer
    masked.load_state_dict(ref.state_dict(), strict=False)
    sd = {"_orig_mod." + k: v for k, v in masked.state_dict().items()}
    assert any(k.endswith("attn.bias") for k in sd)
    gpt = GPT(GPTConfig(**SMALL))
    gpt.load_state_dict(sd, strict=True)
    assert torch.equal(gpt.transformer.h[1].attn.c_attn.weight, ref.transformer.h[1].attn.c_attn.weight)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("fused", [True, False])
def test_logits_loss_and_every_gradient_match_nanogpt(bias, fused):
    ref, gpt = ref_and_gpt(bias=bias)
    gpt.use_fused_ops = fused
    ref64 = copy.deepcopy(ref).double()
    idx, targets = tokens(3, 13), tokens(3, 13, seed=1)
    targets[0, :2] = -1  # nanoGPT's ignore_index
    check_model_parity(f"GPT bias={bias} fused={fused}", gpt, ref, ref64, lm_run(idx, targets))


def test_bf16_autocast_on_cpu_matches_nanogpt_within_parity():
    ref, gpt = ref_and_gpt()
    ref64 = copy.deepcopy(ref).double()
    idx, targets = tokens(2, 16), tokens(2, 16, seed=1)

    def run(m):
        if next(m.parameters()).dtype == torch.float64:
            logits, loss = m(idx, targets)
            return {"logits": logits.bfloat16(), "loss": loss}
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits, loss = m(idx, targets)
        assert logits.dtype == torch.bfloat16
        return {"logits": logits, "loss": loss}

    check_model_parity("GPT autocast bf16", gpt, ref, ref64, run)


def test_forward_without_targets_gives_last_position_only():
    _, gpt = ref_and_gpt()
    idx = tokens(2, 7)
    logits, loss = gpt(idx)
    assert loss is None and logits.shape == (2, 1, 64)
    full, _ = gpt(idx, tokens(2, 7, seed=3))
    torch.testing.assert_close(logits[:, 0], full[:, -1], rtol=0, atol=1e-6)


def test_bad_input_and_config_raise_clear_errors():
    _, gpt = ref_and_gpt()
    with pytest.raises(ValueError, match="block_size is only 16"):
        gpt(tokens(1, 17))
    with pytest.raises(ValueError, match="idx must be"):
        gpt(tokens(1, 4)[0])
    with pytest.raises(ValueError, match="multiple of n_head"):
        GPTConfig(n_embd=30, n_head=4)
    with pytest.raises(ValueError, match="gelu_approximate"):
        GPTConfig(gelu_approximate="fast")
    with pytest.raises(ValueError, match="crop_block_size"):
        gpt.crop_block_size(32)


# ---- nanoGPT's other methods -------------------------------------------------------------------


def test_configure_optimizers_get_num_params_estimate_mfu_crop_block_size():
    _, gpt = ref_and_gpt()
    n_all = sum(p.numel() for p in gpt.parameters())
    assert gpt.get_num_params(non_embedding=False) == n_all
    assert gpt.get_num_params() == n_all - 16 * 32
    opt = gpt.configure_optimizers(weight_decay=0.1, learning_rate=1e-3, betas=(0.9, 0.95), device_type="cpu")
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == n_all  # the tied weight once
    n = gpt.get_num_params()
    flops = (6 * n + 12 * 2 * 4 * 8 * 16) * 16 * 5
    assert math.isclose(gpt.estimate_mfu(fwdbwd_per_iter=5, dt=0.5), flops / 0.5 / 312e12)
    gpt.crop_block_size(8)
    assert gpt.config.block_size == 8 and gpt.transformer.wpe.weight.shape == (8, 32)
    logits, _ = gpt(tokens(1, 8), tokens(1, 8))
    assert logits.shape == (1, 8, 64)


# ---- generation ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_greedy_generate_with_cache_equals_recomputation_and_nanogpt(dtype):
    """20 new tokens after 5 with block_size 16: the cache fills, then the window slides (recompute)."""
    ref, gpt = ref_and_gpt(dtype=dtype)
    ref.eval(), gpt.eval()
    prompt = tokens(2, 5)
    cached = gpt.generate(prompt, 20, top_k=1)
    recomputed = gpt.generate(prompt, 20, top_k=1, use_cache=False)
    nanogpt = ref.generate(prompt, 20, top_k=1)
    assert cached.shape == (2, 25)
    assert torch.equal(cached, recomputed)
    assert torch.equal(cached, nanogpt)


def test_sampled_generate_with_cache_follows_the_same_random_stream():
    _, gpt = ref_and_gpt(dtype=torch.float64)
    gpt.eval()
    prompt = tokens(3, 4)
    torch.manual_seed(123)
    a = gpt.generate(prompt, 14, temperature=0.8, top_k=10)
    torch.manual_seed(123)
    b = gpt.generate(prompt, 14, temperature=0.8, top_k=10, use_cache=False)
    assert torch.equal(a, b)


def test_kv_cache_step_logits_match_full_forward_within_parity():
    """One decode step (Sq=1 over 9 cached keys) against the full recomputation, with the parity rule."""
    ref, gpt = ref_and_gpt()
    ref64 = copy.deepcopy(ref).double()
    gpt.eval()
    idx = tokens(2, 10)
    caches = [fastgpt.nn.KVCache(16) for _ in gpt.transformer.h]
    gpt._hidden(idx[:, :9], caches)
    step = gpt.lm_head(gpt._hidden(idx[:, 9:], caches))[:, -1]
    assert caches[0].length == 10
    with torch.no_grad():
        assert_parity("decode step", step.detach(), ref64(idx)[0][:, -1], ref(idx)[0][:, -1])


def test_prompt_longer_than_block_size_is_cropped_like_nanogpt():
    ref, gpt = ref_and_gpt(dtype=torch.float64)
    ref.eval(), gpt.eval()
    prompt = tokens(1, 21)
    assert torch.equal(gpt.generate(prompt, 3, top_k=1), ref.generate(prompt, 3, top_k=1))


# ---- Hugging Face import -------------------------------------------------------------------------


def hf_gpt2(seed=0, **overrides):
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    transformers.logging.set_verbosity_error()
    kw = dict(n_layer=2, n_head=4, n_embd=64, vocab_size=96, n_positions=32, bos_token_id=0, eos_token_id=0)
    kw.update(overrides)
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(**kw)).eval()


def hf_run(idx):
    """logits of HF (all positions) or of fastgpt.GPT, and the same next-token loss."""

    def run(m):
        if isinstance(m, GPT):
            logits, loss = m(idx[:, :-1], idx[:, 1:])
            return {"logits": logits, "loss": loss}
        out = m(input_ids=idx, labels=idx)
        return {"logits": out.logits[:, :-1], "loss": out.loss}

    return run


def test_from_hf_logits_and_loss_match_the_hf_model():
    hf = hf_gpt2()
    gpt = GPT.from_hf(hf).eval()
    assert gpt.config.gelu_approximate == "tanh" and gpt.config.block_size == 32
    hf64 = copy.deepcopy(hf).double()
    idx = tokens(2, 12, vocab=96)
    with torch.no_grad():
        out, base, ref = (hf_run(idx)(m) for m in (gpt, hf, hf64))
    for key in ("logits", "loss"):
        assert_parity(f"from_hf {key}", out[key], ref[key], base[key])


def test_from_hf_reads_a_save_pretrained_folder_and_never_downloads(tmp_path):
    hf = hf_gpt2(seed=1, activation_function="gelu")
    hf.save_pretrained(tmp_path)
    gpt = GPT.from_hf(tmp_path).eval()
    assert gpt.config.gelu_approximate == "none"
    idx = tokens(2, 9, vocab=96)
    with torch.no_grad():
        base = hf(idx).logits[:, -1:]
        ref = copy.deepcopy(hf).double()(idx).logits[:, -1:]
        assert_parity("from_hf folder", gpt(idx)[0], ref, base)
    with pytest.raises(ValueError, match="not a local folder"):
        GPT.from_hf(tmp_path / "missing")


def test_from_hf_rejects_what_gpt_cannot_represent():
    with pytest.raises(TypeError, match="GPT2LMHeadModel"):
        GPT.from_hf(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="n_inner"):
        GPT.from_hf(hf_gpt2(n_inner=100))
    with pytest.raises(ValueError, match="activation_function"):
        GPT.from_hf(hf_gpt2(activation_function="relu"))


@pytest.mark.slow
def test_compile_fullgraph_traces_gpt_forward_and_backward():
    """No graph break in fastgpt.GPT (fused ops included); aot_eager runs the traced graph without codegen."""
    _, gpt = ref_and_gpt(n_layer=1)
    check_compiled_matches_eager(gpt, tokens(2, 9), tokens(2, 9, seed=1), backend="aot_eager", atol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_gpt_matches_nanogpt_within_parity(device, dtype):
    from fastgpt import backends

    ref, gpt = ref_and_gpt(block_size=256, n_embd=128, n_head=2)
    ref64 = copy.deepcopy(ref).double().to(device)
    idx, targets = tokens(2, 200).to(device), tokens(2, 200, seed=1).to(device)
    check_model_parity(f"GPU GPT {dtype}", gpt.to(device, dtype), ref.to(device, dtype), ref64, lm_run(idx, targets))
    assert backends.last_choice("attention").backend == "triton"


@pytest.mark.gpu
def test_gpu_greedy_generate_with_cache_equals_recomputation(device):
    _, gpt = ref_and_gpt(block_size=64, n_embd=128, n_head=2)
    gpt.to(device).eval()
    prompt = tokens(2, 7).to(device)
    assert torch.equal(gpt.generate(prompt, 70, top_k=1), gpt.generate(prompt, 70, top_k=1, use_cache=False))
