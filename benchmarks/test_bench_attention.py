"""Attention (GPU): fastgpt's Triton flash attention against torch SDPA, eager, torch.compile, flash-attn.

Forward and forward+backward, causal and not, head dims 128 and 64, bfloat16, S = 512 .. 16384 at a
constant 16k tokens (B = 16384 / S, H = 2048 / D), as FlashAttention's own benchmarks. Peers: torch SDPA
on each backend it has (flash, cuDNN, memory-efficient, math) through ``torch.nn.attention.sdpa_kernel``,
eager attention with the S x S scores materialised, torch.compile of that eager code (compiled once,
before timing), and flash-attn when installed. fastgpt runs ``use_backend("triton", strict=True)``.

Reported: TFLOP/s (4*B*H*S^2*D per forward, halved when causal; backward 2.5x forward) and its % of
the bf16 matmul measured in the same run. Targets (docs/design.md, 'Performance targets and the byte/FLOP model'): forward >= 1.0x the best SDPA
backend, forward+backward >= 0.9x, >= 5x eager at S = 4096.

Packed sequences (``varlen_attention``, fastgpt.flash_attn_varlen_func): B sequences with lengths spread
over [Smax/8, Smax] (``length_mix``), d=128, against torch's SDPA on the same batch padded to Smax
(every backend that takes it; the key-padding mask of non-causal calls rules out its flash backend)
and flash-attn's own varlen function. TFLOP/s count each sequence's own S^2 work; target >= 1.0x padded SDPA.
"""

import os

import pytest

from fastgpt import registry

BENCH_OPS = registry.names(lambda spec: "triton" in spec.backends)  # the Triton kernels' ops


@pytest.mark.gpu
def test_attention(run_gpu_case, op_case, impl):
    run_gpu_case(op_case, impl)


def test_attention_benchmark_code_runs_on_cpu(run_smoke, smoke_case):
    """Untimed: each implementation runs once on tiny CPU tensors and matches torch (fastgpt through
    the Triton interpreter where conftest.py could switch it on, i.e. without CUDA); the CUDA-only
    SDPA backends report why they cannot run."""
    skipped = run_smoke(smoke_case)
    if os.environ.get("TRITON_INTERPRET") == "1":
        assert "fastgpt-triton" not in skipped, skipped.get("fastgpt-triton")
