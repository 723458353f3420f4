"""Layer norm, residual add + layer norm, GELU and bias + GELU (GPU): fastgpt's CUDA kernels against
eager PyTorch, torch.compile of the same eager code (compiled once, before timing) and liger-kernel's
layer norm when installed.

bfloat16, 16384 rows (B*T = 16 x 1024) by hidden sizes 768 .. 8192 (GPT-2 124M to 7B-class; GELU
runs on the MLP width, 4 x hidden); the full tier adds 4096 and 65536 rows. Forward (a training
forward: inputs require grad) and backward alone (replayed on a retained graph), each timed with an L2
flush before every call. fastgpt runs ``use_backend("cuda", strict=True)``.

Reported: GB/s by the byte model (docs/design.md, 'Performance targets and the byte/FLOP model') (layer norm forward 2*M*N*bytes + weights, backward
3*M*N*bytes + weights; GELU forward 2n*bytes, backward 3n*bytes; element size from the dtype) and its %
of the copy bandwidth measured in the same run. Targets: layer norm >= 1.5x eager and >= 90% (forward)
/ 80% (backward) of copy bandwidth; bias + GELU and add + layer norm >= 1.4x eager; all >= 1.0x torch.compile.
"""

import pytest

from fastgpt import registry
from fastgpt.tools.bench import op_cases as bc

BENCH_OPS = registry.names(lambda spec: "cuda" in spec.backends)  # the ops of the CUDA extension


@pytest.mark.gpu
def test_norm_gelu(run_gpu_case, op_case, impl):
    run_gpu_case(op_case, impl)


def test_norm_gelu_benchmark_code_runs_on_cpu(run_smoke, smoke_case):
    """Untimed: each implementation runs once on tiny CPU tensors and matches torch; fastgpt's cuda
    backend is refused by strict mode (never timed as a fallback) and its path runs on the reference."""
    skipped = run_smoke(smoke_case)
    primary = bc.fastgpt_impl(smoke_case.op)
    if primary == "fastgpt-cuda":
        assert "CUDA tensor" in skipped[primary], skipped[primary]
