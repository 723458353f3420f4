"""Shapes shared by the row-wise ops' registry entries (layer norm, GELU and their fused variants).

The benchmark tiers (``fastgpt.tools.bench.op_cases.TIERS``) give row counts and hidden sizes; a
row-wise op is benchmarked on (rows, width_factor * hidden), forward and backward separately.
"""

from typing import Any, Dict, List, Mapping, Sequence, Tuple

Shape = Tuple[str, Tuple[Tuple[str, int], ...], Dict[str, Any]]


def rowwise_gpu_shapes(tier: Mapping[str, tuple], width_factor: int = 1, approximations: Sequence[str] = ("none",)) -> List[Shape]:
    out: List[Shape] = []
    for m in tier["norm_rows"]:
        for n in tier["norm_hidden"]:
            for approximate in approximations:
                for mode in ("fwd", "bwd"):
                    out.append((mode, (("M", m), ("N", width_factor * n)), {"approximate": approximate}))
    return out


def rowwise_smoke_shapes(width: int, approximate: str = "none") -> List[Shape]:
    """Tiny float32 cases, forward and backward (GELU's run its tanh form)."""
    return [(mode, (("M", 7), ("N", width)), {"approximate": approximate}) for mode in ("fwd", "bwd")]


# the CPU dispatch-overhead sizes. tiny: pure per-call overhead; small: nanoGPT's CPU example
# (B=12, T=64, n_embd=128); realistic: GPT-2 small widths on a CPU batch (B*T = 2048 rows of 768)
NORM_DISPATCH_SIZES = {"tiny": (8, 64), "small": (768, 128), "realistic": (2048, 768)}
MLP_DISPATCH_SIZES = {"tiny": (8, 64), "small": (768, 512), "realistic": (2048, 3072)}
