"""What is benchmarked: op cases, the implementations they are compared with, GPT training steps.

Shared by the pytest-benchmark suites in ``benchmarks/`` and by ``fastgpt bench`` so both measure the
same thing the same way. Three families:

* **GPU op cases** (:class:`OpCase`, :func:`gpu_cases`): each fastgpt op on realistic shapes, against
  its peers (eager PyTorch, every torch SDPA backend, torch.compile of the eager code, flash-attn and
  liger-kernel when installed). fastgpt runs *strict* on its GPU backend: a call that would fall back
  raises, and the case is reported unavailable with the reason; a fallback is never timed.
* **CPU dispatch cases** (:class:`DispatchCase`, :func:`dispatch_cases`): each fastgpt op forced onto
  the reference path against the torch function it wraps, on the host clock, to measure what fastgpt's
  validation and dispatch add per call.
* **GPT training steps** (:func:`prepare_gpt_step`): ``fastgpt.GPT`` against the same model built from
  plain torch modules (:class:`fastgpt._nanogpt.NanoGPT`, nanoGPT's code), eager and compiled.

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
from typing import Callable, ContextManager, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastgpt import _timing, backends
from fastgpt._nanogpt import NanoGPT

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
    "compare_records",
    "work_of",
    "metrics",
    "DispatchCase",
    "dispatch_cases",
    "dispatch_pair",
    "dispatch_work_case",
    "GPT2_124M",
    "GPT_CPU_SMALL",
    "prepare_gpt_step",
    "gpt_record",
    "GptStep",
    "GPT_IMPLS",
    "check_dispatch_pair",
    "release",
    "set_compile_limits",
]

OPS = ("attention", "layer_norm", "add_layer_norm", "gelu", "bias_gelu")
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
ATTN_TOKENS = 16384  # batch * seqlen held constant across lengths, as FlashAttention's benchmarks do
ATTN_HIDDEN = 2048  # heads = 2048 / head_dim


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
        if self.op == "attention":
            s += " causal" if self.causal else ""
        if self.op in ("gelu", "bias_gelu") and self.approximate != "none":
            s += f" {self.approximate}"
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
    cases: List[OpCase] = []
    if op == "attention":
        for d in t["attn_head_dims"]:
            for causal in t["attn_causal"]:
                for s in t["attn_seqlens"]:
                    for mode in t["attn_modes"]:
                        dims = (("B", max(1, ATTN_TOKENS // s)), ("H", ATTN_HIDDEN // d), ("S", s), ("D", d))
                        cases.append(OpCase(op, mode, dims, causal=causal, tier=tier))
        return cases
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; expected one of {', '.join(OPS)}")
    approximations = t["gelu_approximate"] if op in ("gelu", "bias_gelu") else ("none",)
    for m in t["norm_rows"]:
        for n in t["norm_hidden"]:
            width = 4 * n if op in ("gelu", "bias_gelu") else n
            for approximate in approximations:
                for mode in ("fwd", "bwd"):
                    cases.append(OpCase(op, mode, (("M", m), ("N", width)), approximate=approximate, tier=tier))
    return cases


def smoke_cases(op: str) -> List[OpCase]:
    """Tiny float32 cases that run the whole benchmark code path on a CPU (nothing is timed).

    The modes are those of the GPU cases; attention is kept to two cases because the Triton
    interpreter takes seconds per call.
    """
    if op == "attention":
        dims = (("B", 1), ("H", 2), ("S", 33), ("D", 16))
        return [OpCase(op, "fwd+bwd", dims, "float32", True, tier="smoke"), OpCase(op, "fwd", dims, "float32", False, tier="smoke")]
    width = 64 if op in ("gelu", "bias_gelu") else 48
    return [OpCase(op, mode, (("M", 7), ("N", width)), "float32", approximate="tanh", tier="smoke") for mode in ("fwd", "bwd")]


# --------------------------------------------------------------------------------------------
# inputs and the torch formulation of each op
# --------------------------------------------------------------------------------------------


def _inputs(case: OpCase, device: torch.device, seed: int = 0) -> Tuple[List[Tensor], List[Tensor]]:
    """(inputs, upstream gradients): every floating input requires grad."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    dt = case.torch_dtype

    def randn(*shape: int, scale: float = 1.0, shift: float = 0.0) -> Tensor:
        t = torch.randn(*shape, generator=g, dtype=torch.float32) * scale + shift
        return t.to(device=device, dtype=dt).requires_grad_(True)

    d = case.d
    if case.op == "attention":
        shape = (d["B"], d["H"], d["S"], d["D"])
        inputs = [randn(*shape), randn(*shape), randn(*shape)]
        upstream = [randn(*shape).detach()]
    elif case.op == "layer_norm":
        inputs = [randn(d["M"], d["N"]), randn(d["N"], scale=0.1, shift=1.0), randn(d["N"], scale=0.1)]
        upstream = [randn(d["M"], d["N"]).detach()]
    elif case.op == "add_layer_norm":
        inputs = [randn(d["M"], d["N"]), randn(d["M"], d["N"]), randn(d["N"], scale=0.1, shift=1.0), randn(d["N"], scale=0.1)]
        upstream = [randn(d["M"], d["N"]).detach(), randn(d["M"], d["N"]).detach()]
    elif case.op == "gelu":
        inputs = [randn(d["M"], d["N"])]
        upstream = [randn(d["M"], d["N"]).detach()]
    elif case.op == "bias_gelu":
        inputs = [randn(d["M"], d["N"]), randn(d["N"], scale=0.1)]
        upstream = [randn(d["M"], d["N"]).detach()]
    else:
        raise ValueError(f"unknown op {case.op!r}")
    return inputs, upstream


def _causal_mask(s: int, device: torch.device) -> Tensor:
    return torch.ones(s, s, dtype=torch.bool, device=device).tril()


def eager_attention(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor]) -> Tensor:
    """Attention as plain torch writes it: the (S, S) scores and probabilities are materialised."""
    s = torch.matmul(q, k.transpose(-2, -1)) * (q.shape[-1] ** -0.5)
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    return torch.matmul(torch.softmax(s, dim=-1), v)


def _torch_fn(case: OpCase, device: torch.device) -> Callable:
    """The op written in eager PyTorch (the "torch-eager" peer, and what torch.compile compiles)."""
    if case.op == "attention":
        mask = _causal_mask(case.d["S"], device) if case.causal else None
        return lambda q, k, v: eager_attention(q, k, v, mask)
    if case.op == "layer_norm":
        return lambda x, w, b: F.layer_norm(x, (x.shape[-1],), w, b)
    if case.op == "add_layer_norm":

        def add_layer_norm(x: Tensor, r: Tensor, w: Tensor, b: Tensor) -> Tuple[Tensor, Tensor]:
            s = x + r
            return F.layer_norm(s, (s.shape[-1],), w, b), s

        return add_layer_norm
    approximate = case.approximate
    if case.op == "gelu":
        return lambda x: F.gelu(x, approximate=approximate)
    if case.op == "bias_gelu":
        return lambda x, b: F.gelu(x + b, approximate=approximate)
    raise ValueError(f"unknown op {case.op!r}")


def _expected_fn(case: OpCase, device: torch.device) -> Callable:
    """What every implementation's result is checked against: torch's default path for the op."""
    if case.op == "attention":
        causal = case.causal
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return _torch_fn(case, device)


def _fastgpt_fn(case: OpCase) -> Callable:
    import fastgpt

    if case.op == "attention":
        causal = case.causal
        return lambda q, k, v: fastgpt.scaled_dot_product_attention(q, k, v, is_causal=causal)
    if case.op == "layer_norm":
        return lambda x, w, b: fastgpt.layer_norm(x, (x.shape[-1],), w, b)
    if case.op == "add_layer_norm":
        return lambda x, r, w, b: fastgpt.add_layer_norm(x, r, w, b)
    approximate = case.approximate
    if case.op == "gelu":
        return lambda x: fastgpt.gelu(x, approximate)
    if case.op == "bias_gelu":
        return lambda x, b: fastgpt.bias_gelu(x, b, approximate)
    raise ValueError(f"unknown op {case.op!r}")


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
    return f"fastgpt-{backend or backends.OP_BACKENDS[op][0]}"


def impls_for(op: str) -> List[str]:
    """Every implementation of ``op`` that is benchmarked, fastgpt's first (one per GPU backend)."""
    names = [fastgpt_impl(op, b) for b in backends.OP_BACKENDS[op]]
    if op == "attention":
        return names + list(_SDPA_BACKENDS) + ["torch-eager", "torch-compile", "flash-attn"]
    extra = ["liger"] if op == "layer_norm" else []
    return names + ["torch-eager", "torch-compile"] + extra


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
        if impl == "sdpa-math":
            _check_materialised(case, t)
        causal = case.causal
        return (lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal)), (lambda: sdpa_kernel(member))
    if impl == "torch-eager":
        if case.op == "attention":
            _check_materialised(case, t)
        return _torch_fn(case, device), contextlib.nullcontext
    if impl == "torch-compile":
        if case.tier == "smoke":
            raise Unavailable("torch.compile is not exercised by the CPU smoke run (minutes of C++ compile per shape)")
        if case.op == "attention":
            _check_materialised(case, t)
            if case.d["S"] not in t["attn_compile_seqlens"]:
                raise Unavailable(f"torch.compile of eager attention is measured at S in {t['attn_compile_seqlens'] or 'none'} in the {case.tier} tier (compile time)")
        elif case.d["N"] // (4 if case.op in ("gelu", "bias_gelu") else 1) not in t["norm_compile_hidden"]:
            raise Unavailable(f"torch.compile is measured at hidden sizes {t['norm_compile_hidden'] or 'none'} in the {case.tier} tier (compile time)")
        set_compile_limits()
        return torch.compile(_torch_fn(case, device), dynamic=False, fullgraph=True), contextlib.nullcontext
    if impl == "flash-attn":
        fa = _optional_module("flash_attn", "flash-attn")
        causal = case.causal

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
    """("bytes", n) for the memory-bound ops or ("flops", n) for attention, per :data:`_timing.WORK_MODEL`."""
    d, dt = case.d, case.torch_dtype
    modes = ("fwd", "bwd") if case.mode == "fwd+bwd" else (case.mode,)
    if case.op == "attention":
        return "flops", _timing.attention_flops(d["B"], d["H"], d["S"], d["S"], d["D"], causal=case.causal, mode=case.mode)
    total = 0
    for mode in modes:
        bwd = mode == "bwd"
        if case.op == "layer_norm":
            total += _timing.layer_norm_bytes(d["M"], d["N"], dt, dt, dt, backward=bwd)
        elif case.op == "add_layer_norm":
            total += _timing.add_layer_norm_bytes(d["M"], d["N"], dt, dt, dt, backward=bwd)
        elif case.op == "gelu":
            total += _timing.gelu_bytes(d["M"] * d["N"], dt, backward=bwd)
        elif case.op == "bias_gelu":
            total += _timing.bias_gelu_bytes(d["M"] * d["N"], d["N"], dt, dt, backward=bwd)
    return "bytes", float(total)


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
    """Time a prepared case (CUDA events on a GPU, the host clock on a CPU) and return its record."""
    case = prepared.case
    with prepared.context():
        if prepared.device.type == "cuda":
            timing = _timing.time_cuda(prepared.fn, flush_l2=True, device=prepared.device, setup=prepared.setup, **timer_kwargs)
            ms = timing.median_ms
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
        **metrics(case, ms, roofline),
    }


# --------------------------------------------------------------------------------------------
# comparisons: fastgpt against each peer measured in the same run, and the DESIGN.md targets
# --------------------------------------------------------------------------------------------


def _targets(op: str, mode: str, shape: Dict[str, int], fast: Dict[str, object], peers: Dict[str, float]) -> List[Dict[str, object]]:
    """The DESIGN.md section 5 targets that apply to one case, each with its measured value."""
    ms = float(fast["ms"])  # type: ignore[arg-type]
    out: List[Dict[str, object]] = []

    def vs(name: str, peer_ms: Optional[float], limit: float) -> None:
        if peer_ms is not None:
            out.append({"target": f">= {limit}x {name}", "value": peer_ms / ms, "ok": peer_ms / ms >= limit})

    sdpa = [t for n, t in peers.items() if n.startswith("sdpa-")]
    if op == "attention":
        vs("torch SDPA (best backend)", min(sdpa) if sdpa else None, 1.0 if mode == "fwd" else 0.9)
        if shape.get("S") == 4096:
            vs("eager attention", peers.get("torch-eager"), 5.0)
    elif op == "layer_norm":
        vs("eager", peers.get("torch-eager"), 1.5)
        pct = fast.get("pct_of_copy_bandwidth")
        if pct is not None:
            limit = 90.0 if mode == "fwd" else 80.0
            out.append({"target": f">= {limit:.0f}% of copy bandwidth", "value": pct, "ok": float(pct) >= limit})  # type: ignore[arg-type]
    elif op == "gpt":
        vs("eager (plain torch modules)", peers.get("torch-eager"), 1.3)
        vs("torch.compile (plain torch modules)", peers.get("torch-compile"), 1.0)
    else:
        if op in ("bias_gelu", "add_layer_norm"):
            vs("eager", peers.get("torch-eager"), 1.4)
        vs("torch.compile", peers.get("torch-compile"), 1.0)
    return out


def compare_records(records: Sequence[Dict[str, object]]) -> List[Dict[str, object]]:
    """One row per case that fastgpt ran: its time, each peer's, the speed-ups and the targets.

    ``speedup_vs[peer]`` is peer time / fastgpt time (above 1: fastgpt is faster). Records are
    grouped by their ``group`` (one case); the fastgpt record is the one whose impl starts with
    "fastgpt" (the first GPU backend of the op when several ran).
    """
    groups: Dict[str, List[Dict[str, object]]] = {}
    for r in records:
        groups.setdefault(str(r["group"]), []).append(r)
    rows = []
    for group, recs in groups.items():
        fast = [r for r in recs if str(r["impl"]).startswith("fastgpt")]
        if not fast:
            continue
        op = str(fast[0]["op"])
        primary = fastgpt_impl(op) if op in OPS else "fastgpt"
        f = next((r for r in fast if r["impl"] == primary), fast[0])
        peers = {str(r["impl"]): float(r["ms"]) for r in recs if r is not f}  # type: ignore[arg-type]
        speedups = {name: t / float(f["ms"]) for name, t in peers.items()}  # type: ignore[arg-type]
        best = min(peers, key=peers.get) if peers else None  # type: ignore[arg-type]
        rows.append(
            {
                "group": group,
                "op": f["op"],
                "mode": f["mode"],
                "shape": f["shape"],
                "impl": f["impl"],
                "ms": f["ms"],
                "peers_ms": peers,
                "speedup_vs": speedups,
                "best_peer": best,
                "best_peer_ms": peers.get(best) if best else None,
                "speedup_vs_best": speedups.get(best) if best else None,
                "metric": {k: f[k] for k in ("GB/s", "TFLOP/s", "pct_of_copy_bandwidth", "pct_of_matmul", "tokens_per_s", "mfu_pct") if k in f},
                "targets": _targets(str(f["op"]), str(f["mode"]), dict(f.get("dims") or {}), f, peers),  # type: ignore[arg-type]
            }
        )
    return rows


# --------------------------------------------------------------------------------------------
# CPU dispatch overhead: fastgpt on the reference path against the torch function it wraps
# --------------------------------------------------------------------------------------------

DISPATCH_SIZES: Dict[str, Dict[str, Tuple[int, ...]]] = {
    # tiny: pure per-call overhead; small: nanoGPT's CPU example (B=12, T=64, n_embd=128, 4 heads);
    # realistic: GPT-2 small widths on a CPU batch (B*T = 2048 rows of 768; attention B=4, T=256)
    "layer_norm": {"tiny": (8, 64), "small": (768, 128), "realistic": (2048, 768)},
    "add_layer_norm": {"tiny": (8, 64), "small": (768, 128), "realistic": (2048, 768)},
    "gelu": {"tiny": (8, 64), "small": (768, 512), "realistic": (2048, 3072)},
    "bias_gelu": {"tiny": (8, 64), "small": (768, 512), "realistic": (2048, 3072)},
    "attention": {"tiny": (1, 2, 16, 16), "small": (12, 4, 64, 32), "realistic": (4, 12, 256, 64)},
}
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
        names = "BHSD" if self.op == "attention" else "MN"
        return "x".join(f"{n}{v}" for n, v in zip(names, self.dims)) + (" causal" if self.op == "attention" else "")

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
    if case.op == "attention":
        dims = tuple(zip("BHSD", case.dims))
        return OpCase(case.op, mode, dims, "float32", causal=True, tier="smoke")
    return OpCase(case.op, mode, tuple(zip("MN", case.dims)), "float32", tier="smoke")


def dispatch_cases(sizes: Sequence[str] = ("tiny", "small", "realistic"), ops: Sequence[str] = OPS) -> List[DispatchCase]:
    return [DispatchCase(op, size, mode) for op in ops for size in sizes for mode in DISPATCH_MODES]


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


# --------------------------------------------------------------------------------------------
# GPT training steps: fastgpt.GPT against nanoGPT's plain-torch model (fastgpt._nanogpt)
# --------------------------------------------------------------------------------------------

GPT2_124M = dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50304, dropout=0.0, bias=True)
# nanoGPT's CPU example (config/train_shakespeare_char.py with the README's CPU overrides)
GPT_CPU_SMALL = dict(n_layer=4, n_head=4, n_embd=128, block_size=64, vocab_size=65, dropout=0.0, bias=True)
GPT_IMPLS = ("fastgpt", "fastgpt-compile", "torch-eager", "torch-compile")


def _gpt_module():
    try:
        return importlib.import_module("fastgpt.model")
    except ModuleNotFoundError as exc:
        if exc.name != "fastgpt.model":
            raise
        raise Unavailable("fastgpt.model does not exist yet (fastgpt.GPT is being written)") from None


def _adamw(model: nn.Module, device: torch.device) -> torch.optim.Optimizer:
    """nanoGPT's optimizer for either model: decay on 2-D parameters, fused on CUDA where available."""
    import inspect

    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    fused = device.type == "cuda" and "fused" in inspect.signature(torch.optim.AdamW).parameters
    return torch.optim.AdamW(groups, lr=6e-4, betas=(0.9, 0.95), **({"fused": True} if fused else {}))


@dataclass
class GptStep:
    """One training step of one implementation, ready to time; ``step()`` returns the loss."""

    impl: str
    step: Callable[[], Tensor]
    context: Callable[[], ContextManager]
    tokens: int
    flops_per_step: float
    n_params: int
    first_loss: float
    description: str
    label: str = ""


def prepare_gpt_step(
    impl: str,
    device: torch.device,
    *,
    config: Optional[Dict[str, object]] = None,
    batch: int = 8,
    seqlen: Optional[int] = None,
    amp_dtype: Optional[torch.dtype] = torch.bfloat16,
    optimizer: bool = True,
    seed: int = 0,
) -> GptStep:
    """Build ``impl`` (``fastgpt``, ``fastgpt-compile``, ``torch-eager``, ``torch-compile``) of a GPT.

    Every implementation starts from the same weights (fastgpt.GPT initialised with ``seed``, copied
    into the plain-torch :class:`fastgpt._nanogpt.NanoGPT`) and the same batch. A step is forward (under autocast to ``amp_dtype``
    when given), backward, and with ``optimizer`` an AdamW step (fused on CUDA) and zero_grad.
    fastgpt runs with ``use_backend("auto", strict=True)``: on CUDA tensors every op must get its
    GPU kernel or the step raises (reported Unavailable); on CPU tensors ``use_backend("reference")``.
    The first step runs here (compilation happens there) and its loss is returned for cross-checks.
    """
    if impl not in GPT_IMPLS:
        raise ValueError(f"unknown GPT implementation {impl!r}; expected one of {', '.join(GPT_IMPLS)}")
    mod = _gpt_module()
    cfg = mod.GPTConfig(**(config or GPT2_124M))
    t = seqlen or cfg.block_size
    torch.manual_seed(seed)
    model: nn.Module = mod.GPT(cfg)
    n_params = model.get_num_params()
    if impl.startswith("torch"):
        plain = NanoGPT(cfg)
        plain.load_state_dict(model.state_dict())
        model = plain
    model = model.to(device).train()
    opt = _adamw(model, device) if optimizer else None
    if impl.endswith("compile"):
        set_compile_limits()
        model = torch.compile(model)
    g = torch.Generator().manual_seed(seed + 1)
    idx = torch.randint(cfg.vocab_size, (batch, t), generator=g).to(device)
    targets = torch.randint(cfg.vocab_size, (batch, t), generator=g).to(device)
    if impl.startswith("fastgpt"):
        backend = "auto" if device.type == "cuda" else "reference"
        context: Callable[[], ContextManager] = lambda: backends.use_backend(backend, strict=True)  # noqa: E731
    else:
        context = contextlib.nullcontext

    def step() -> Tensor:
        if amp_dtype is not None:
            with torch.autocast(device.type, dtype=amp_dtype):
                _, loss = model(idx, targets)
        else:
            _, loss = model(idx, targets)
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        else:
            model.zero_grad(set_to_none=True)
        return loss

    try:
        with context():
            first = float(step().detach())
    except backends.BackendUnavailableError as exc:
        raise Unavailable(str(exc)) from None
    flops = _timing.gpt_flops_per_token(n_params, cfg.n_layer, cfg.n_embd, t) * batch * t
    amp = f"{str(amp_dtype).replace('torch.', '')} autocast" if amp_dtype is not None else "float32"
    desc = f"n_layer={cfg.n_layer} n_embd={cfg.n_embd} n_head={cfg.n_head} B={batch} T={t} {amp}" + (", AdamW" if optimizer else ", fwd+bwd")
    short = {"bfloat16 autocast": "bf16", "float16 autocast": "fp16", "float32": "fp32"}.get(amp, amp)
    label = f"L{cfg.n_layer} C{cfg.n_embd} B{batch} T{t} {short}"
    return GptStep(impl, step, context, batch * t, flops, n_params, first, desc, label)


def gpt_record(step: GptStep, timing: _timing.Timing, ms: float, roofline: Optional[_timing.Roofline], device_name: str) -> Dict[str, object]:
    """Tokens/s, achieved TFLOP/s and MFU of a timed training step (``ms`` per step)."""
    tflops = step.flops_per_step / (ms * 1e-3) / 1e12
    peak = _timing.nominal_peak_tflops(device_name) if device_name != "cpu" else None
    return {
        "op": "gpt",
        "impl": step.impl,
        "group": f"gpt step {step.description}",
        "mode": "train step",
        "shape": step.label,
        "description": step.description,
        "ms": ms,
        "timing": timing.as_dict(),
        "tokens_per_step": step.tokens,
        "tokens_per_s": step.tokens / (ms * 1e-3),
        "flops_per_step": step.flops_per_step,
        "TFLOP/s": tflops,
        "mfu_pct": 100.0 * tflops / peak if peak else None,
        "mfu_peak_tflops": peak,
        "pct_of_matmul": roofline.pct_of_matmul(tflops) if roofline is not None else None,
        "first_loss": step.first_loss,
        "n_params": step.n_params,
    }
