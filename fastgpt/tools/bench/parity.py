"""The parity check of ``fastgpt bench``: each op's benchmarked path against the float64 reference
(the parity rule, docs/design.md, 'Parity rule'; :func:`fastgpt.testing.check_against_torch`)."""

import torch

from fastgpt import backends, registry, testing
from fastgpt.tools.bench import op_cases as bc


def run_parity(op: str, backend: str, device, dtype, *, tiny: bool = False) -> dict:
    """The parity rule (docs/design.md, 'Parity rule'; fastgpt.testing.check_against_torch) for ``op`` on ``backend``, strict."""
    spec = registry.get(op)
    tiny_dims, dims = spec.parity_dims  # lengths and widths that are not multiples of a block
    # the same op formulations and inputs as the benchmarks (causal attention: Sq == Sk, so torch's
    # mask is fastgpt's); check_against_torch rounds the float32 inputs to ``dtype``
    mode = "fwd+bwd" if spec.differentiable else "fwd"
    case = bc.OpCase(op, mode, tuple(zip(spec.dims, tiny_dims if tiny else dims)), "float32", causal=True)
    inputs, _ = bc._inputs(case, device)
    row = {"op": op, "backend": backend, "dtype": str(dtype).replace("torch.", ""), "device": str(device)}
    try:
        with backends.use_backend(backend, strict=True):
            results = testing.check_against_torch(op, bc._fastgpt_fn(case), bc._torch_fn(case, device), inputs, dtype,
                                                  gradients=spec.differentiable)
    except backends.BackendUnavailableError as exc:
        return {**row, "ok": None, "unavailable": str(exc)}
    except AssertionError as exc:
        return {**row, "ok": False, "failure": str(exc)}
    worst = max(results, key=lambda p: p.error / max(p.bound, 1e-30))
    return {
        **row,
        "ok": True,
        "max_error": max(p.error for p in results),
        "worst": str(worst),
        "checks": [str(p) for p in results],
    }


def check_ops(ops, device, on_gpu: bool):
    """The benchmarked path of each op (its strict GPU backend on a GPU, the reference on a CPU), plus
    the Triton kernels under the interpreter on a CPU where they can run there."""
    parity = []
    dtype = torch.bfloat16 if on_gpu else torch.float32
    for op in ops:
        if op == "gpt":
            continue
        backend = registry.OP_BACKENDS[op][0] if on_gpu else "reference"
        parity.append({**run_parity(op, backend, device, dtype), "primary": True})
        if not on_gpu and "triton" in registry.OP_BACKENDS[op] and backends.backend_unavailable_reason("triton", device) is None:
            parity.append({**run_parity(op, "triton", device, torch.float32, tiny=True), "primary": False, "note": "Triton interpreter"})
    return parity


def enable_interpreter(on_gpu: bool) -> str:
    """On a CPU-only machine, let the Triton attention kernel run its parity check in the interpreter.

    TRITON_INTERPRET must be set before triton is imported; nothing has imported it yet in a fresh
    ``fastgpt bench`` process. Returns a note for the report.
    """
    import importlib.util
    import os
    import sys

    if on_gpu:
        return ""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return "TRITON_INTERPRET=1: the Triton kernels run in the interpreter for the parity check"
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed: the Triton kernels cannot be checked here"
    if "triton" in sys.modules:
        return "triton was imported before TRITON_INTERPRET could be set: the Triton kernels are not checked here"
    os.environ["TRITON_INTERPRET"] = "1"
    return "TRITON_INTERPRET=1 set by fastgpt bench: the Triton kernels run in the interpreter for the parity check"
