"""What is benchmarked: op cases and the implementations they are compared with.

Shared by the pytest-benchmark suites in ``benchmarks/`` and by ``fastgpt bench`` so both measure the
same thing the same way. The **GPU op cases** (:class:`OpCase`, :func:`gpu_cases`): each fastgpt op on
realistic shapes (from its registry entry, :class:`fastgpt.registry.OpCases`), against its peers
(eager PyTorch, every torch SDPA backend, torch.compile of the eager code, flash-attn and
liger-kernel when installed). fastgpt runs *strict* on its GPU backend: a call that would fall back
raises, and the case is reported unavailable with the reason; a fallback is never timed. Beside
this module: :mod:`~fastgpt.tools.bench.dispatch_cases` (CPU dispatch overhead),
:mod:`~fastgpt.tools.bench.gpt_steps` (GPT training steps) and :mod:`~fastgpt.tools.bench.compare`
(speed-ups and targets).

Before anything is timed, :func:`prepare` runs the implementation once and compares its outputs (and
gradients) with torch's own result: a benchmark that compares different computations fails instead of
reporting a number. That check is deliberately loose (it is not the parity rule; the test suite and
``fastgpt bench``'s parity check are).
"""

from __future__ import annotations

import contextlib
import importlib
import math
from dataclasses import dataclass
from typing import Callable, ContextManager, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from fastgpt import backends, registry
from fastgpt.tools.bench import timing as _timing

__all__ = [
    "OPS",
    "TIERS",
    "Unavailable",
    "OpCase",
    "gpu_cases",
    "smoke_cases",
    "impls_for",
    "fastgpt_impl",
    "Prepared",
    "prepare",
    "measure",
    "work_of",
    "metrics",
    "release",
    "set_compile_limits",
]

OPS = registry.names()
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_SHORT = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


class Unavailable(Exception):
    """This implementation cannot run this case here; ``str(exc)`` says why (the skip reason)."""


# --------------------------------------------------------------------------------------------
# tiers: how many shapes. "default" is what `pytest benchmarks` runs; gpu_check.sh bounds it by time.
# --------------------------------------------------------------------------------------------

TIERS: Dict[str, Dict[str, tuple]] = {
    "quick": {
        "attn_seqlens": (1024, 4096),
        "attn_head_dims": (128,),
        "attn_causal": (True,),
        "attn_modes": ("fwd", "fwd+bwd"),
        "attn_compile_seqlens": (),
        "attn_eager_max_seqlen": (4096,),
        "norm_rows": (16384,),
        "norm_hidden": (768, 4096),
        "norm_compile_hidden": (),
        "gelu_approximate": ("none",),
    },
    "default": {
        "attn_seqlens": (512, 1024, 2048, 4096, 8192, 16384),
        "attn_head_dims": (128, 64),
        "attn_causal": (True, False),
        "attn_modes": ("fwd", "fwd+bwd"),
        "attn_compile_seqlens": (4096,),
        "attn_eager_max_seqlen": (4096,),
        "norm_rows": (16384,),
        "norm_hidden": (768, 1024, 2048, 4096, 8192),
        "norm_compile_hidden": (768, 4096),
        "gelu_approximate": ("none",),
    },
    # scripts/gpu_check.py's headline run, within its minutes: attention against the SDPA backends
    # (torch.compile of eager attention is the default tier's), GPT-2 small's widths (GELU at 4 x 768)
    "headline": {
        "attn_seqlens": (1024, 2048, 4096, 8192),
        "attn_head_dims": (128, 64),
        "attn_causal": (True, False),
        "attn_modes": ("fwd", "fwd+bwd"),
        "attn_compile_seqlens": (),
        "attn_eager_max_seqlen": (4096,),
        "norm_rows": (16384,),
        "norm_hidden": (768, 4096),
        "norm_compile_hidden": (768,),
        "gelu_approximate": ("none",),
    },
    "full": {
        "attn_seqlens": (512, 1024, 2048, 4096, 8192, 16384),
        "attn_head_dims": (128, 64),
        "attn_causal": (True, False),
        "attn_modes": ("fwd", "fwd+bwd"),
        "attn_compile_seqlens": (512, 1024, 2048, 4096, 8192),
        "attn_eager_max_seqlen": (8192,),
        "norm_rows": (4096, 16384, 65536),
        "norm_hidden": (768, 1024, 2048, 4096, 8192),
        "norm_compile_hidden": (768, 1024, 2048, 4096, 8192),
        "gelu_approximate": ("none", "tanh"),
    },
}


def _tier(name: str) -> Dict[str, tuple]:
    if name not in TIERS:
        raise ValueError(f"tier must be one of {', '.join(TIERS)}; got {name!r}")
    return TIERS[name]


# --------------------------------------------------------------------------------------------
# op cases
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OpCase:
    """One op, one shape, one direction.

    ``dims`` are ``(("M", m), ("N", n))`` for the row-wise ops (GELU's N is the MLP width, 4 x hidden)
    and ``(("B", b), ("H", h), ("S", s), ("D", d))`` for attention. ``mode`` is "fwd" (a training
    forward: inputs require grad), "bwd" (the backward alone, replayed on a retained graph) or
    "fwd+bwd".
    """

    op: str
    mode: str
    dims: Tuple[Tuple[str, int], ...]
    dtype: str = "bfloat16"
    causal: bool = False
    approximate: str = "none"
    tier: str = "default"

    @property
    def d(self) -> Dict[str, int]:
        return dict(self.dims)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def shape_label(self) -> str:
        s = "x".join(f"{k}{v}" for k, v in self.dims)
        s += " causal" if self.causal else ""
        s += f" {self.approximate}" if self.approximate != "none" else ""
        return s

    @property
    def group(self) -> str:
        """The pytest-benchmark group: every implementation of this case is timed side by side in it."""
        return f"{self.op} {self.mode} {self.shape_label} {_SHORT[self.dtype]}"

    @property
    def id(self) -> str:
        return self.group.replace(" ", "-").replace("+", "_")


def gpu_cases(op: str, tier: str = "default") -> List[OpCase]:
    """The GPU cases of ``op`` in ``tier``, most important first (so a time budget cuts the tail)."""
    t = _tier(tier)
    return [OpCase(op, mode, dims, tier=tier, **opts) for mode, dims, opts in _cases(op).gpu_shapes(t)]


def smoke_cases(op: str) -> List[OpCase]:
    """Tiny float32 cases that run the whole benchmark code path on a CPU (nothing is timed).

    The modes are those of the GPU cases; attention is kept to two cases because the Triton
    interpreter takes seconds per call.
    """
    return [OpCase(op, mode, dims, "float32", tier="smoke", **opts) for mode, dims, opts in _cases(op).smoke_shapes()]


def _cases(op: str) -> registry.OpCases:
    """The op's benchmark/parity cases from its registry entry (ValueError for an unknown op)."""
    cases = registry.get(op).cases
    if cases is None:
        raise ValueError(f"op {op!r} declares no benchmark cases")
    return cases


# --------------------------------------------------------------------------------------------
# inputs and the torch formulation of each op
# --------------------------------------------------------------------------------------------


def _inputs(case: OpCase, device: torch.device, seed: int = 0) -> Tuple[List[Tensor], List[Tensor]]:
    """(inputs, upstream gradients) of the op's registry entry: every floating input requires grad."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    dt = case.torch_dtype

    def randn(*shape: int, scale: float = 1.0, shift: float = 0.0) -> Tensor:
        t = torch.randn(*shape, generator=g, dtype=torch.float32) * scale + shift
        return t.to(device=device, dtype=dt).requires_grad_(True)

    return _cases(case.op).inputs(case, randn)


def _torch_fn(case: OpCase, device: torch.device) -> Callable:
    """The op written in eager PyTorch (the "torch-eager" peer, and what torch.compile compiles)."""
    return _cases(case.op).eager(case, device)


def _expected_fn(case: OpCase, device: torch.device) -> Callable:
    """What every implementation's result is checked against: torch's default path for the op."""
    cases = _cases(case.op)
    return (cases.expected or cases.eager)(case, device)


def _fastgpt_fn(case: OpCase) -> Callable:
    return _cases(case.op).call(case)


# --------------------------------------------------------------------------------------------
# implementations
# --------------------------------------------------------------------------------------------

_SDPA_BACKENDS = {
    "sdpa-flash": "FLASH_ATTENTION",
    "sdpa-cudnn": "CUDNN_ATTENTION",
    "sdpa-efficient": "EFFICIENT_ATTENTION",
    "sdpa-math": "MATH",
}


def fastgpt_impl(op: str, backend: Optional[str] = None) -> str:
    """Name of fastgpt's implementation of ``op`` on ``backend`` (default: the one auto prefers)."""
    return f"fastgpt-{backend or registry.OP_BACKENDS[op][0]}"


def impls_for(op: str) -> List[str]:
    """Every implementation of ``op`` that is benchmarked, fastgpt's first (one per GPU backend)."""
    names = [fastgpt_impl(op, b) for b in registry.OP_BACKENDS[op]]
    return names + list(_cases(op).peers)


def set_compile_limits(n: int = 256) -> None:
    """Let dynamo keep one compiled graph per benchmarked shape (its default limit is 8 per function).

    Past the limit dynamo would silently run the function eagerly, and the "torch-compile" figure
    would be eager's. Where this torch has the option, hitting the limit is made an error instead.
    """
    import torch._dynamo

    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(int(getattr(cfg, name)), n))
    for name in ("fail_on_recompile_limit_hit", "fail_on_cache_limit_hit"):
        if hasattr(cfg, name):
            setattr(cfg, name, True)


def _optional_module(name: str, dist: str) -> object:
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise Unavailable(f"{dist} is not installed ({exc})") from None


def _impl(case: OpCase, impl: str, device: torch.device, backend_override: Optional[str]) -> Tuple[Callable, Callable[[], ContextManager]]:
    """(forward function, context factory) for one implementation; raises Unavailable with the reason."""
    t = TIERS.get(case.tier, TIERS["default"])
    if impl.startswith("fastgpt-"):
        backend = backend_override or impl[len("fastgpt-") :]
        return _fastgpt_fn(case), lambda: backends.use_backend(backend, strict=True)
    if impl in _SDPA_BACKENDS:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        member = getattr(SDPBackend, _SDPA_BACKENDS[impl], None)
        if member is None:
            raise Unavailable(f"torch {torch.__version__} has no SDPBackend.{_SDPA_BACKENDS[impl]}")
        if "S" not in case.d:  # another op's eager formulation through SDPA (decode: SDPA on the same cache)
            return _torch_fn(case, device), (lambda: sdpa_kernel(member))
        if impl == "sdpa-math":
            _check_materialised(case, t)
        causal = case.causal
        return (lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal)), (lambda: sdpa_kernel(member))
    if impl == "torch-eager":
        if "S" in case.d:  # attention: the eager peer materialises the S x S scores
            _check_materialised(case, t)
        return _torch_fn(case, device), contextlib.nullcontext
    if impl == "torch-compile":
        if case.tier == "smoke":
            raise Unavailable("torch.compile is not exercised by the CPU smoke run (minutes of C++ compile per shape)")
        if "S" in case.d:
            _check_materialised(case, t)
            if case.d["S"] not in t["attn_compile_seqlens"]:
                raise Unavailable(f"torch.compile of eager attention is measured at S in {t['attn_compile_seqlens'] or 'none'} in the {case.tier} tier (compile time)")
        elif "N" in case.d and case.d["N"] // _cases(case.op).width_factor not in t["norm_compile_hidden"]:
            raise Unavailable(f"torch.compile is measured at hidden sizes {t['norm_compile_hidden'] or 'none'} in the {case.tier} tier (compile time)")
        set_compile_limits()
        return torch.compile(_torch_fn(case, device), dynamic=False, fullgraph=True), contextlib.nullcontext
    if impl == "flash-attn":
        fa = _optional_module("flash_attn", "flash-attn")
        causal = case.causal
        if "L" in case.d:  # decode over a KV cache: (B, S, H, D) already, the whole cache attended
            return (lambda q, k_cache, v_cache: fa.flash_attn_with_kvcache(q, k_cache, v_cache, causal=causal)), contextlib.nullcontext
        if "Smax" in case.d:  # packed sequences: flash-attn's varlen function on the same cu_seqlens
            from fastgpt.ops.varlen_attention import mix_tensors

            b, smax = case.d["B"], case.d["Smax"]

            def varlen(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
                cu, _ = mix_tensors(b, smax, str(q.device))
                return fa.flash_attn_varlen_func(q, k, v, cu, cu, smax, smax, causal=causal)

            return varlen, contextlib.nullcontext

        def flash(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            # flash-attn's layout is (B, S, H, D): transposed views, no copies (last dim contiguous)
            return fa.flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal).transpose(1, 2)

        return flash, contextlib.nullcontext
    if impl == "liger":
        mod = _optional_module("liger_kernel.ops.layer_norm", "liger-kernel")
        fn = getattr(mod, "LigerLayerNormFunction", None)
        if fn is None:
            raise Unavailable("liger_kernel.ops.layer_norm has no LigerLayerNormFunction in this version")
        return (lambda x, w, b: fn.apply(x, w, b, 1e-5)), contextlib.nullcontext
    raise ValueError(f"unknown implementation {impl!r} for {case.op}")


def _check_materialised(case: OpCase, tier: Dict[str, tuple]) -> None:
    s, limit = case.d["S"], tier["attn_eager_max_seqlen"][0]
    if s > limit:
        gib = case.d["B"] * case.d["H"] * s * s * _timing.element_size(case.torch_dtype) / 2**30
        raise Unavailable(
            f"materialises the S x S scores ({gib:.1f} GiB per tensor at S={s}); measured up to S={limit} in the {case.tier} tier"
        )


# --------------------------------------------------------------------------------------------
# prepare (build, run once, check) and measure
# --------------------------------------------------------------------------------------------

# max|result - torch's float32 result| / max|torch's float32 result|: loose, it only has to tell a
# different computation (a wrong mask, a missing input) from rounding in the case's dtype
TOLERANCE = {"float32": 1e-3, "float16": 1e-2, "bfloat16": 5e-2}


def _as_tuple(x) -> Tuple[Tensor, ...]:
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def _rel_error(a: Tensor, b: Tensor) -> float:
    """max|a - b| / max|b|: the loose "same computation" check (nan counts as a mismatch)."""
    if a.shape != b.shape:
        return float("inf")
    a64, b64 = a.detach().double(), b.detach().double()
    err = float((a64 - b64).abs().max()) if a.numel() else 0.0
    scale = float(b64.abs().max()) if b.numel() else 0.0
    return err / max(scale, 1e-12) if not math.isnan(err) else float("inf")


@dataclass
class _State:
    key: Tuple
    inputs: List[Tensor]
    upstream: List[Tensor]
    expected_out: Tuple[Tensor, ...]
    expected_grads: Optional[Tuple[Tensor, ...]]


_state_cache: Dict[str, _State] = {}


def _state(case: OpCase, device: torch.device) -> _State:
    """Inputs and torch's expected results (float32), built once per case (only the latest is kept)."""
    key = (case.op, case.dims, case.dtype, case.causal, case.approximate, case.mode != "fwd", str(device))
    cached = _state_cache.get("latest")
    if cached is not None and cached.key == key:
        return cached
    _state_cache.clear()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    inputs, upstream = _inputs(case, device)
    # the expectation is computed in float32 from the same (rounded) inputs, so that a peer's own
    # half-precision error does not count against it (nor another peer's)
    ref_inputs = [t.detach().float().requires_grad_(True) for t in inputs]
    fn = _expected_fn(case, device)
    out = _as_tuple(fn(*ref_inputs))
    grads = torch.autograd.grad(out, ref_inputs, [u.float() for u in upstream]) if case.mode != "fwd" else None
    state = _State(key, inputs, upstream, tuple(o.detach() for o in out), grads)
    del ref_inputs, out
    _state_cache["latest"] = state
    return state


def release() -> None:
    """Drop the cached inputs (call between op families to give memory back)."""
    _state_cache.clear()


@dataclass
class Prepared:
    """A case ready to time: ``fn()`` runs one call of the measured work, inside ``context()``.

    When ``setup`` is set (the backward-only cases: it runs the forward), every timer calls it before
    each call of ``fn``, outside the timed region.
    """

    case: OpCase
    impl: str
    fn: Callable[[], object]
    context: Callable[[], ContextManager]
    check_error: float
    device: torch.device
    setup: Optional[Callable[[], None]] = None  # run before every call, outside the timed region


def prepare(case: OpCase, impl: str, device: torch.device, *, backend_override: Optional[str] = None) -> Prepared:
    """Build ``impl`` for ``case``, run it once (compiling/autotuning there), check it, return the timed call.

    Raises :class:`Unavailable` (with the reason) when the implementation cannot run here: a
    library that is not installed, an SDPA backend that declines the shape, a fastgpt backend that
    strict mode refuses (never a timed fallback), out of memory. Raises AssertionError when the
    implementation's result differs from torch's by more than :data:`TOLERANCE` (relative to the
    largest magnitude): the benchmark would compare different computations.
    """
    fn, context = _impl(case, impl, device, backend_override)
    state = _state(case, device)
    inputs, upstream = state.inputs, state.upstream
    try:
        with context():
            out = _as_tuple(fn(*inputs))
            grads = torch.autograd.grad(out, inputs, upstream) if case.mode != "fwd" else None
    except backends.BackendUnavailableError as exc:
        raise Unavailable(str(exc)) from None
    except torch.cuda.OutOfMemoryError:
        _state_cache.clear()
        torch.cuda.empty_cache()
        raise Unavailable("out of memory on this device") from None
    except Exception as exc:
        # fastgpt's own errors are failures; a peer that cannot run here (an SDPA backend declining
        # the shape, torch.compile without a working compiler, a library's own limits) is reported
        # as unavailable with its message, since that is not a figure fastgpt can be compared with
        if impl.startswith("fastgpt"):
            raise
        text = str(exc).strip()
        first = text.splitlines()[0][:300] if text else ""
        verb = "torch declined" if impl in _SDPA_BACKENDS else f"{impl} failed here"
        raise Unavailable(f"{verb}: {type(exc).__name__}: {first}") from None
    errors = [_rel_error(o, e) for o, e in zip(out, state.expected_out)]
    if grads is not None and state.expected_grads is not None:
        errors += [_rel_error(g, e) for g, e in zip(grads, state.expected_grads)]
    if len(out) != len(state.expected_out):
        errors.append(float("inf"))
    error = max(errors)
    tol = TOLERANCE[case.dtype]
    if not error <= tol:
        raise AssertionError(
            f"{impl} on {case.group}: result differs from torch's by {error:.3e} (relative to the largest "
            f"magnitude; allowed {tol:.0e}): the benchmark would compare different computations"
        )
    del out, grads
    if case.mode == "fwd":

        def call():
            return fn(*inputs)

    elif case.mode == "fwd+bwd":

        def call():
            return torch.autograd.grad(_as_tuple(fn(*inputs)), inputs, upstream)

    else:
        # bwd: a fresh forward before every call, outside the timed region (the timers' ``setup``),
        # then the backward exactly as training runs it (no retain_graph: torch.compile's backward
        # donates its buffers and refuses to run twice on one graph)
        graph: Dict[str, Tuple[Tensor, ...]] = {}

        def setup() -> None:
            graph["out"] = _as_tuple(fn(*inputs))

        def call():
            return torch.autograd.grad(graph.pop("out"), inputs, upstream)

        return Prepared(case, impl, call, context, error, device, setup=setup)

    return Prepared(case, impl, call, context, error, device)


def work_of(case: OpCase) -> Tuple[str, float]:
    """("bytes", n) for the memory-bound ops or ("flops", n) for attention: the op's registry model."""
    return _cases(case.op).work(case.d, case.torch_dtype, case.mode, causal=case.causal)


def metrics(case: OpCase, ms: float, roofline: Optional[_timing.Roofline]) -> Dict[str, float]:
    """Achieved GB/s or TFLOP/s for ``ms`` per call, and its % of the measured roofline."""
    kind, amount = work_of(case)
    out: Dict[str, float] = {}
    if kind == "bytes":
        out["bytes"] = amount
        out["GB/s"] = amount / (ms * 1e-3) / 1e9
        if roofline is not None:
            out["pct_of_copy_bandwidth"] = roofline.pct_of_copy(out["GB/s"])
    else:
        out["flops"] = amount
        out["TFLOP/s"] = amount / (ms * 1e-3) / 1e12
        if roofline is not None:
            out["pct_of_matmul"] = roofline.pct_of_matmul(out["TFLOP/s"])
    return out


def measure(prepared: Prepared, roofline: Optional[_timing.Roofline] = None, **timer_kwargs) -> Dict[str, object]:
    """Time a prepared case (CUDA events on a GPU, the host clock on a CPU) and return its record; on a
    GPU it also holds ``cuda_peak_mib``, the allocator's peak over one call (see timing.cuda_peak_mib)."""
    case = prepared.case
    memory = {}
    with prepared.context():
        if prepared.device.type == "cuda":
            timing = _timing.time_cuda(prepared.fn, flush_l2=True, device=prepared.device, setup=prepared.setup, **timer_kwargs)
            ms = timing.median_ms
            memory["cuda_peak_mib"] = _timing.cuda_peak_mib(prepared.fn, prepared.device, prepared.setup)
        else:
            timing = _timing.time_cpu(prepared.fn, setup=prepared.setup, **timer_kwargs)
            ms = timing.min_ms
    return {
        "op": case.op,
        "mode": case.mode,
        "shape": case.shape_label,
        "dims": dict(case.dims),
        "dtype": case.dtype,
        "causal": case.causal,
        "group": case.group,
        "impl": prepared.impl,
        "ms": ms,
        "timing": timing.as_dict(),
        "check_rel_error": prepared.check_error,
        **memory,
        **metrics(case, ms, roofline),
    }
