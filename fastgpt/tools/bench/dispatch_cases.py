"""CPU dispatch cases: each fastgpt op forced onto the reference path against the torch function it
wraps, on the host clock, to measure what fastgpt's validation and dispatch add per call."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Sequence, Tuple

import torch

from fastgpt import backends, registry
from fastgpt.tools.bench.op_cases import OPS, OpCase, _as_tuple, _expected_fn, _fastgpt_fn, _inputs, _rel_error


# per op (its registry entry): tiny: pure per-call overhead; small: nanoGPT's CPU example;
# realistic: GPT-2 small widths on a CPU batch
DISPATCH_SIZES: Dict[str, Dict[str, Tuple[int, ...]]] = {s.name: dict(s.dispatch_sizes) for s in registry.all_ops()}
DISPATCH_MODES = ("fwd-nograd", "fwd+bwd")
# the targets: a few microseconds per call where the op itself takes microseconds, under 5%
# where it does real work (nanoGPT's CPU example and GPT-2-small widths)
OVERHEAD_TARGETS = {"tiny": ("us", 5.0), "small": ("pct", 5.0), "realistic": ("pct", 5.0)}


@dataclass(frozen=True)
class DispatchCase:
    op: str
    size: str
    mode: str

    @property
    def dims(self) -> Tuple[int, ...]:
        return DISPATCH_SIZES[self.op][self.size]

    @property
    def shape_label(self) -> str:
        spec = registry.get(self.op)
        return "x".join(f"{n}{v}" for n, v in zip(spec.dims, self.dims)) + (" causal" if spec.causal else "")

    @property
    def group(self) -> str:
        return f"dispatch {self.op} {self.mode} {self.size} {self.shape_label} fp32"

    @property
    def id(self) -> str:
        return f"{self.op}-{self.mode.replace('+', '_')}-{self.size}"

    def target(self) -> Tuple[str, float]:
        return OVERHEAD_TARGETS[self.size]

    def meets_target(self, overhead_us: float, overhead_pct: float) -> bool:
        unit, limit = self.target()
        return (overhead_us if unit == "us" else overhead_pct) <= limit


def dispatch_work_case(case: DispatchCase) -> OpCase:
    """The :class:`OpCase` with the same op, shape and direction, for the work model (GB/s, TFLOP/s)."""
    mode = "fwd" if case.mode == "fwd-nograd" else "fwd+bwd"
    spec = registry.get(case.op)
    return OpCase(case.op, mode, tuple(zip(spec.dims, case.dims)), "float32", causal=spec.causal, tier="smoke")


def dispatch_cases(sizes: Sequence[str] = ("tiny", "small", "realistic"), ops: Sequence[str] = OPS) -> List[DispatchCase]:
    return [DispatchCase(op, size, mode) for op in ops for size in sizes for mode in DISPATCH_MODES
            if mode == "fwd-nograd" or registry.get(op).differentiable]  # inference-only ops: no backward


def dispatch_pair(case: DispatchCase, seed: int = 0) -> Tuple[Callable[[], object], Callable[[], object]]:
    """(torch call, fastgpt call): zero-argument closures over the same float32 CPU tensors.

    The torch call is the function fastgpt wraps (:func:`_expected_fn`: F.layer_norm, F.gelu, torch's
    SDPA, ...), the fastgpt call the public op (:func:`_fastgpt_fn`), on :func:`_inputs` of the case's
    work shape. The caller runs the fastgpt one inside ``use_backend("reference", strict=True)``.
    "fwd-nograd" calls the op under ``torch.no_grad()``; "fwd+bwd" runs the forward with inputs that
    require grad and ``torch.autograd.grad`` of the outputs (no .grad accumulation, the same for both).
    """
    work = dispatch_work_case(case)
    cpu = torch.device("cpu")
    inputs, upstream = _inputs(work, cpu, seed)
    torch_op, fast_op = _expected_fn(work, cpu), _fastgpt_fn(work)
    if case.mode != "fwd+bwd":
        inputs = [t.detach() for t in inputs]

        def nograd(op: Callable) -> Callable[[], object]:
            def call():
                with torch.no_grad():
                    return op(*inputs)

            return call

        return nograd(torch_op), nograd(fast_op)

    def with_backward(op: Callable) -> Callable[[], object]:
        def call():
            return torch.autograd.grad(_as_tuple(op(*inputs)), inputs, upstream)

        return call

    return with_backward(torch_op), with_backward(fast_op)


def check_dispatch_pair(case: DispatchCase, torch_call: Callable[[], object], fast_call: Callable[[], object]) -> float:
    """Run both once (fastgpt on the strict reference path) and return the relative difference.

    Raises AssertionError when they differ by more than float32 round-off: the two timed calls would
    not compute the same thing.
    """
    a = _as_tuple(torch_call())
    with backends.use_backend("reference", strict=True):
        b = _as_tuple(fast_call())
    if len(a) != len(b):
        raise AssertionError(f"{case.group}: torch returns {len(a)} tensors, fastgpt {len(b)}")
    error = max(_rel_error(y, x) for x, y in zip(a, b))
    if not error <= 1e-4:
        raise AssertionError(f"{case.group}: fastgpt differs from torch by {error:.2e} (relative); expected float32 round-off")
    return error
