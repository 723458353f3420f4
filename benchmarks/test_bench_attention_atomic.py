"""Attention backward (GPU): ``deterministic=False`` (dQ added by float32 atomics inside the dK/dV kernel,
FlashAttention-2's 5 matmuls per tile) against fastgpt's default deterministic backward (a separate dQ
kernel that recomputes S and dP: 7 matmuls per tile).

bfloat16, causal and not, head dim 64 (MHA) and 128 (GQA 4:1), S = 1024 .. 8192 at 16k tokens. Only
the backward is timed (CUDA-event median, L2 flushed before each call; the forward runs once, outside).
Reported in ``extra_info``: ms, TFLOP/s in FlashAttention's convention (backward = 2.5x forward FLOPs,
the same for both), and for the atomic entry its speed-up over the deterministic one measured just
before it. The static model (``fastgpt inspect``) expects 5/7 of the executed FLOPs; this measures it.
Without a CUDA device every case skips with that reason.
"""

import pytest
import torch

import fastgpt
from fastgpt.ops.attention import attention_flops
from fastgpt.tools.bench import timing as _timing

SHAPES = [(64, 16, 16, s, causal) for s in (1024, 4096) for causal in (True, False)]
SHAPES += [(128, 32, 8, s, causal) for s in (2048, 8192) for causal in (True, False)]
_DETERMINISTIC_MS = {}  # shape -> the deterministic backward's median, for the atomic entry's speed-up


def _shape_id(shape) -> str:
    d, hq, hk, s, causal = shape
    return f"d{d}-h{hq}/{hk}-s{s}-{'causal' if causal else 'full'}"


@pytest.mark.gpu
@pytest.mark.parametrize("shape,deterministic", [(shape, det) for shape in SHAPES for det in (True, False)],
                         ids=[f"{_shape_id(shape)}-{'deterministic' if det else 'atomic'}" for shape in SHAPES for det in (True, False)])
def test_attention_backward_atomic_vs_deterministic(benchmark, budget, cuda_device, shape, deterministic):
    budget.check()
    d, hq, hk, s, causal = shape
    b = max(1, 16384 // s)
    g = torch.Generator(device=cuda_device).manual_seed(0)

    def randn(*size):
        return torch.randn(*size, device=cuda_device, dtype=torch.bfloat16, generator=g)

    q, k, v = randn(b, hq, s, d).requires_grad_(), randn(b, hk, s, d).requires_grad_(), randn(b, hk, s, d).requires_grad_()
    dout = randn(b, hq, s, d)
    with fastgpt.use_backend("triton", strict=True):
        out = fastgpt.attention(q, k, v, causal=causal, deterministic=deterministic)

    def backward():
        torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)

    timing = _timing.time_cuda(backward)  # its first call tunes the kernels (outside the measured calls)
    flops = attention_flops(b, hq, s, s, d, causal=causal, mode="bwd")
    info = {"ms": timing.median_ms, "tflops": flops / (timing.median_ms * 1e-3) / 1e12, "deterministic": deterministic,
            "timing": timing.as_dict()}
    if deterministic:
        _DETERMINISTIC_MS[shape] = timing.median_ms
    elif shape in _DETERMINISTIC_MS:
        info["speedup_vs_deterministic"] = _DETERMINISTIC_MS[shape] / timing.median_ms
    benchmark.group = f"attention bwd {_shape_id(shape)} bf16: atomic vs deterministic"
    benchmark.extra_info.update(info)

    def call():
        backward()
        torch.cuda.synchronize(cuda_device)

    benchmark(call)
