"""The fast paths ran, not just produced the right numbers.

Output comparisons pass as well when a path is skipped: a ``generate`` that never used its KV cache
(recomputing the window each step) or a GPT whose fused ops fell back to the unfused modules gives
the same tokens and logits. These tests count the calls through spies on the functions the model
calls (fastgpt looks them up at call time, so the spies see every call), and check which backend
served the fused ops.
"""

from __future__ import annotations

import pytest
import torch

import fastgpt
from fastgpt import GPT, GPTConfig, backends
from fastgpt.nn import KVCache

N_LAYER = 3


def _gpt(**kw) -> GPT:
    torch.manual_seed(0)
    cfg = dict(block_size=32, vocab_size=64, n_layer=N_LAYER, n_head=2, n_embd=32, dropout=0.0, bias=True)
    return GPT(GPTConfig(**{**cfg, **kw})).eval()


def _spy(monkeypatch, owner, name: str, record):
    real = getattr(owner, name)

    def spy(*args, **kwargs):
        record(*args, **kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, spy)


@pytest.fixture
def calls(monkeypatch):
    """{name: [query lengths / appended lengths / 1 per call]} of the ops the GPT module calls."""
    seen = {"flash_attn_func": [], "flash_attn_with_kvcache": [], "append": [], "add_layer_norm": [], "bias_gelu": [],
            "layer_norm": []}
    for name in ("flash_attn_func", "flash_attn_with_kvcache"):
        _spy(monkeypatch, fastgpt, name, lambda q, *a, _n=name, **kw: seen[_n].append(q.shape[1]))
    _spy(monkeypatch, KVCache, "append", lambda self, k, v: seen["append"].append(k.shape[1]))
    for name in ("add_layer_norm", "bias_gelu", "layer_norm"):
        _spy(monkeypatch, fastgpt, name, lambda *a, _n=name, **kw: seen[_n].append(1))
    return seen


def test_generate_uses_the_kv_cache(calls):
    gpt, prompt, new = _gpt(), torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(1)), 6
    cached = gpt.generate(prompt, new, top_k=1)
    # prefill: each layer attends 5 queries and caches 5 positions; then one query per layer and step,
    # appended and attended by the decode op on the preallocated cache
    assert calls["append"] == [5] * N_LAYER and calls["flash_attn_func"] == [5] * N_LAYER
    assert calls["flash_attn_with_kvcache"] == [1] * N_LAYER * (new - 1)
    for seen in calls.values():
        seen.clear()
    recomputed = gpt.generate(prompt, new, top_k=1, use_cache=False)
    assert calls["append"] == [] and calls["flash_attn_with_kvcache"] == []
    assert calls["flash_attn_func"] == [5 + i for i in range(new) for _ in range(N_LAYER)]
    assert torch.equal(cached, recomputed)


def test_generate_drops_the_cache_once_the_window_slides(calls):
    gpt = _gpt(block_size=8)
    gpt.generate(torch.zeros(1, 6, dtype=torch.long), 4, top_k=1)
    # 6 prefill + 1 + 1 fill the 8 positions; the 4th token recomputes the full window without a cache
    assert calls["append"] == [6] * N_LAYER and calls["flash_attn_with_kvcache"] == [1] * N_LAYER * 2
    assert calls["flash_attn_func"][-N_LAYER:] == [8] * N_LAYER


@pytest.mark.parametrize("fused", [True, False])
def test_gpt_forward_runs_the_fused_ops(calls, fused):
    gpt = _gpt()
    gpt.use_fused_ops = fused
    idx = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(2))
    gpt(idx, idx)
    if fused:
        # block 0's ln_1 has no pending residual (a plain layer norm); every other residual add is
        # fused with the layer norm after it: ln_2 of each block, ln_1 of blocks 1.., and ln_f
        assert len(calls["add_layer_norm"]) == 2 * N_LAYER
        assert len(calls["bias_gelu"]) == N_LAYER
        assert len(calls["layer_norm"]) == 1
        assert backends.last_choice("add_layer_norm") is not None and backends.last_choice("bias_gelu") is not None
    else:
        assert calls["add_layer_norm"] == [] and calls["bias_gelu"] == []
        assert len(calls["layer_norm"]) == 2 * N_LAYER + 1
    assert calls["flash_attn_func"] == [9] * N_LAYER
