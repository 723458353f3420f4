"""GPU tests cannot pass on a fallback; what only a GPU can show is tested there.

* tests/conftest.py makes a FallbackWarning an error in every ``gpu`` test (checked here on any
  machine by running its collection hook with a CUDA device pretended), and every test starts with
  no op's ``last_choice`` recorded, so a test's ``last_choice`` check sees its own calls only.
* On a GPU: the attention backward is bitwise deterministic on a shape of many tiles in both
  directions (the interpreter runs programs one after another, so there it proves nothing), and the
  CUDA extension honours eps (1e-2, low-variance rows with a large mean) through its bindings.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import fastgpt
from fastgpt import backends
from fastgpt.testing import reset_backend_state


class _Item:
    def __init__(self, *keywords):
        self.keywords = dict.fromkeys(keywords)
        self.markers = []

    def add_marker(self, marker):
        self.markers.append(marker)


def test_gpu_tests_turn_fallback_warnings_into_errors(monkeypatch):
    import conftest

    monkeypatch.setattr(conftest, "HAS_CUDA", True)
    gpu, allowed, cpu = _Item("gpu"), _Item("gpu", "fallback_ok"), _Item()
    conftest.pytest_collection_modifyitems(None, [gpu, allowed, cpu])
    assert not allowed.markers and not cpu.markers
    (mark,) = gpu.markers
    assert mark.name == "filterwarnings"
    # the filters as pytest applies them (each inserted in front: the last one wins)
    from _pytest.config import parse_warning_filter

    with warnings.catch_warnings():
        warnings.simplefilter("default")
        for arg in mark.args:
            warnings.filterwarnings(*parse_warning_filter(arg, escape=False))
        with pytest.raises(backends.FallbackWarning):
            warnings.warn("fastgpt: the cuda backend was requested but ...", backends.FallbackWarning)
        warnings.warn("fastgpt: cpu tensors run the plain-torch reference ops", backends.FallbackWarning)


def test_reset_backend_state_forgets_the_last_choice(monkeypatch):
    x = torch.randn(2, 8)
    fastgpt.gelu(x)
    assert backends.last_choice("gelu") is not None
    reset_backend_state(monkeypatch)
    assert backends.last_choice("gelu") is None


def test_each_test_starts_without_a_last_choice():
    # the autouse fixture of tests/conftest.py cleared what earlier tests recorded
    assert all(backends.last_choice(op) is None for op in ("attention", "layer_norm", "gelu", "add_layer_norm", "bias_gelu"))


@pytest.mark.gpu
def test_gpu_backward_is_bitwise_deterministic_on_many_tiles(device, monkeypatch):
    """2048 x 2048 causal GQA: 16+ query tiles and 16+ key tiles per head in every kernel, with the
    default (untuned) configs; three runs, bitwise equal (no atomics, fixed loop order)."""
    monkeypatch.setenv("FASTGPT_AUTOTUNE", "0")
    g = torch.Generator(device=device).manual_seed(0)
    shapes = [(2, 8, 2048, 64), (2, 2, 2048, 64), (2, 2, 2048, 64)]
    q, k, v = (torch.randn(*s, generator=g, device=device, dtype=torch.bfloat16) for s in shapes)
    dout = torch.randn(2, 8, 2048, 64, generator=g, device=device, dtype=torch.bfloat16)

    def run():
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        with fastgpt.use_backend("triton", strict=True):
            out = fastgpt.attention(*leaves, causal=True)
            out.backward(dout)
        return [out.detach()] + [t.grad for t in leaves]

    first = run()
    for _ in range(2):
        for a, b in zip(first, run()):
            assert torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.parametrize("n", [768, 4096])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("residual", [False, True], ids=["layer_norm", "add_layer_norm"])
def test_gpu_cuda_extension_honours_eps(n, dtype, residual, device):
    from fastgpt.tools.cuda_emu.parity import check_layer_norm
    from fastgpt import cuda_ext
    from test_numeric_edges import EPS, LOW_VARIANCE

    scale, shift = LOW_VARIANCE[dtype]
    check_layer_norm(cuda_ext.load(), 257, n, dtype, eps=EPS, x_scale=scale, x_shift=shift, residual=residual, device=device)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_gpu_attention_meets_the_tight_16_bit_rule(dtype, causal, device, monkeypatch):
    """The tight rule with the real kernels (tensor-core MMA, the default configs), many tiles."""
    from fastgpt.testing import check_attention_tight

    monkeypatch.setenv("FASTGPT_AUTOTUNE", "0")
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(*s, generator=g).to(device) for s in ((2, 4, 1000, 64), (2, 2, 1000, 64), (2, 2, 1000, 64)))
    fn = lambda q, k, v: fastgpt.attention(q, k, v, causal=causal)  # noqa: E731
    with fastgpt.use_backend("triton", strict=True):
        check_attention_tight(f"GPU {dtype}", fn, q, k, v, causal, 64**-0.5, dtype)
