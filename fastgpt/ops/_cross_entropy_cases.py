"""The registry's tooling entries (:class:`fastgpt.registry.OpCases`) of the two cross-entropy ops.

Dims: ``T`` tokens, ``V`` vocabulary, ``D`` hidden size (linear cross-entropy). The class indices are
not an input of the benchmark harness (it differentiates every input): each case's target is drawn
from a fixed seed inside the op's closures, with every 7th token set to ignore_index (padding).
"""

from typing import Callable, Dict, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from fastgpt.registry import OpCases, element_size, passes

IGNORE = -100
_targets_cache: Dict[Tuple[int, int, str], Tensor] = {}


def case_target(t: int, v: int, device) -> Tensor:
    """The fixed target of a (T, V) case on ``device`` (every 7th token ignored)."""
    key = (t, v, str(device))
    target = _targets_cache.get(key)
    if target is None:
        _targets_cache.clear()  # one case at a time: do not keep big targets of earlier cases
        g = torch.Generator().manual_seed(1234)
        target = torch.randint(0, v, (t,), generator=g)
        target[::7] = IGNORE
        target = _targets_cache[key] = target.to(device)
    return target


def _scalar_upstream(randn):
    return [randn(1).detach().reshape(())]


# ---- cross_entropy: bytes (memory-bound) ----------------------------------------------------


def cross_entropy_bytes(t: int, v: int, dtype: torch.dtype, *, backward: bool = False) -> int:
    """Forward (with a gradient needed): read the logits, write dlogits, 2*T*V*e; backward: read
    dlogits and write the scaled gradient, 2*T*V*e (the targets and per-row losses are negligible)."""
    return 2 * t * v * element_size(dtype)


def cross_entropy_cases(fn: Callable) -> OpCases:
    def work(d, dtype, mode, causal=False):
        return "bytes", float(sum(cross_entropy_bytes(d["T"], d["V"], dtype, backward=p == "bwd") for p in passes(mode)))

    def inputs(case, randn):
        return [randn(case.d["T"], case.d["V"], scale=2.0)], _scalar_upstream(randn)

    def eager(case, device):
        return lambda z: F.cross_entropy(z, case_target(z.shape[0], z.shape[1], z.device))

    def call(case):
        return lambda z: fn(z, case_target(z.shape[0], z.shape[1], z.device))

    def targets(mode, dims, vs, pct):
        vs("eager", ("torch-eager",), 1.0)
        vs("torch.compile", ("torch-compile",), 1.0)

    return OpCases(
        gpu_shapes=lambda tier: [("fwd+bwd", (("T", 8192), ("V", v)), {}) for v in (50304, 128256)],
        smoke_shapes=lambda: [("fwd+bwd", (("T", 7), ("V", 300)), {}), ("fwd", (("T", 7), ("V", 300)), {})],
        inputs=inputs,
        eager=eager,
        call=call,
        work=work,
        work_model={
            "fwd": "bytes = 2*T*V*e [read logits, write dlogits: the gradient is computed in the forward]",
            "bwd": "bytes = 2*T*V*e [read dlogits, write them scaled by the upstream gradient]",
        },
        peers=("torch-eager", "torch-compile"),
        targets=targets,
    )


# ---- linear_cross_entropy: FLOPs (three matmuls) --------------------------------------------


def linear_cross_entropy_flops(t: int, v: int, d: int, mode: str) -> float:
    """2*T*V*D for the logits (forward) and 4*T*V*D for dx and dweight (backward): 6*T*V*D in all.
    (fastgpt computes all three matmuls in its forward when a gradient is needed.)"""
    return float(sum(2 * t * v * d * (1 if p == "fwd" else 2) for p in passes(mode)))


def linear_cross_entropy_cases(fn: Callable) -> OpCases:
    def work(d, dtype, mode, causal=False):
        return "flops", linear_cross_entropy_flops(d["T"], d["V"], d["D"], mode)

    def inputs(case, randn):
        t, v, d = case.d["T"], case.d["V"], case.d["D"]
        return [randn(t, d), randn(v, d, scale=d ** -0.5)], _scalar_upstream(randn)

    def eager(case, device):
        return lambda x, w: F.cross_entropy(x @ w.t(), case_target(x.shape[0], w.shape[0], x.device))

    def call(case):
        return lambda x, w: fn(x, w, case_target(x.shape[0], w.shape[0], x.device))

    def targets(mode, dims, vs, pct):
        vs("eager", ("torch-eager",), 1.0)

    return OpCases(
        # GPT-2's vocabulary at its width, Llama-3's at 4096 (Liger-Kernel's benchmark shape)
        gpu_shapes=lambda tier: [("fwd+bwd", (("T", 8192), ("V", v), ("D", d)), {}) for v, d in ((50304, 768), (128256, 4096))],
        smoke_shapes=lambda: [("fwd+bwd", (("T", 7), ("V", 300), ("D", 16)), {}), ("fwd", (("T", 7), ("V", 300), ("D", 16)), {})],
        inputs=inputs,
        eager=eager,
        call=call,
        work=work,
        work_model={
            "fwd": "flops = 2*T*V*D [logits]; fastgpt also computes dx and dweight here when a gradient is needed",
            "bwd": "flops = 4*T*V*D [dx, dweight] (fastgpt: only scales the gradients of its forward)",
            "fwd+bwd": "flops = 6*T*V*D",
        },
        peers=("torch-eager", "torch-compile"),
        targets=targets,
    )
