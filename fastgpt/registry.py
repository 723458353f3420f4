"""The op registry: one :class:`OpSpec` per op, declared in that op's module (``fastgpt/ops/*.py``).

Everything that iterates over ops reads it: dispatch (:mod:`fastgpt.backends`), ``explain()``, the
CUDA extension's op list, ``fastgpt.patch``, ``fastgpt bench``, ``pytest benchmarks``, ``fastgpt
inspect``, the parity check and the CUDA emulator's dry run. Adding an op is its own module in
``fastgpt/ops/`` (with its ``register(OpSpec(...))``), its kernel file(s), and one import in
``fastgpt/ops/__init__.py``; see docs/design.md, 'Adding an op'.

The registry is filled at import time (importing :mod:`fastgpt` imports every op module); lookups
are dict lookups, so dispatch pays nothing for it per call.
"""

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

__all__ = ["OpSpec", "OpCases", "register", "get", "all_ops", "names", "cuda_op_names", "element_size", "passes", "OP_BACKENDS"]

Dims = Tuple[Tuple[str, int], ...]


@dataclass(frozen=True)
class OpCases:
    """How the tools exercise an op: inputs at named sizes, its peers, its work and its targets.

    Plain functions of the op's module (they import no tool). ``case`` is the tools' op case: it has
    ``d`` (dims as a dict), ``dims``, ``mode``, ``causal``, ``approximate`` and ``torch_dtype``.

    * ``gpu_shapes(tier)``: the benchmark cases of a tier (a dict of shape lists, see
      ``fastgpt.tools.bench.op_cases.TIERS``), as ``(mode, dims, options)`` with options the case's
      ``causal`` / ``approximate``, most important first.
    * ``smoke_shapes()``: tiny float32 cases that run the benchmark code on a CPU, same form.
    * ``inputs(case, randn)``: ``(inputs, upstream gradients)``; ``randn(*shape, scale=, shift=)``
      makes one input that requires grad.
    * ``eager(case, device)``: the op in eager PyTorch (the ``torch-eager`` peer, what torch.compile
      compiles, the parity check's baseline); ``expected(case, device)``: what every implementation's
      result is checked against (default: ``eager``); ``call(case)``: the fastgpt call.
    * ``work(dims, dtype, mode, causal=False)``: ``("bytes" | "flops", amount)`` the op must move or
      compute (``mode`` "fwd", "bwd" or "fwd+bwd"); ``work_model``: that model in words, per pass.
    * ``peers``: the implementations fastgpt is benchmarked against, fastgpt's own excluded.
    * ``targets(mode, dims, fast, peers, vs)``: the performance targets of one case (docs/design.md,
      'Performance targets and the byte/FLOP model'); ``vs(label, peer_ms, limit)`` records one.
    * ``width_factor``: the benchmarked width over the model's hidden size (GELU's MLP: 4).
    """

    gpu_shapes: Callable[[Mapping[str, tuple]], List[Tuple[str, Dims, Dict[str, Any]]]]
    smoke_shapes: Callable[[], List[Tuple[str, Dims, Dict[str, Any]]]]
    inputs: Callable[..., Tuple[list, list]]
    eager: Callable[..., Callable]
    call: Callable[..., Callable]
    work: Callable[..., Tuple[str, float]]
    work_model: Mapping[str, str]
    peers: Tuple[str, ...]
    targets: Callable[..., None]
    expected: Optional[Callable[..., Callable]] = None
    width_factor: int = 1


@dataclass(frozen=True)
class OpSpec:
    """One op: everything fastgpt and its tools need to know about it, in one place.

    * ``name``: the op's name (dispatch, ``explain()``, custom ops ``fastgpt::{name}_fwd/_bwd``).
    * ``functions``: its public functions (``fastgpt.ops`` and ``fastgpt`` export them by name).
    * ``backends``: the GPU backends that implement it, in the order ``auto`` tries them (the
      reference always serves as the fallback); each call's constraint (why a backend declines it)
      lives with the op's dispatch code.
    * ``custom_ops``: its :class:`fastgpt.ops._define.FastgptOp` objects (forward/backward, fakes and
      autograd formula).
    * ``cuda_ops``: the ops it needs from the CUDA extension (``torch.ops.fastgpt_cuda``); these are
      also the launches the CUDA emulator can dry-run and ``fastgpt inspect`` reads.
    * ``patchable``: ``fastgpt.patch`` can swap it into a model.
    * ``dims``: names of its shape parameters (``("M", "N")`` for the row-wise ops).
    * ``parity_dims``: ``(tiny, default)`` dims of ``fastgpt bench``'s parity check (lengths and
      widths that are not multiples of a block).
    * ``dispatch_sizes``: dims of the CPU dispatch-overhead cases by size (tiny, small, realistic).
    * ``causal``: the op takes a causal flag (its dispatch cases are causal).
    * ``report_shapes``: extra (rows, cols) that ``fastgpt inspect`` reads (multi-pass kernels).
    * ``cases``: how the tools make inputs, peers, work and targets (:class:`OpCases`).
    * ``report_cases`` / ``report_plans``: Triton ops other than attention: the cases ``fastgpt
      inspect`` compiles (dicts like its attention cases, with ``op``) and ``report_plans(case)``,
      their launches as ``[(pass, LaunchPlan)]`` on meta tensors (imports the kernel module lazily).
    * ``report_launches(rows, cols, dtype)``: a row-wise Triton op's launches for ``fastgpt inspect``
      at (rows, cols), built by its kernel module on meta tensors (imported lazily), as ``[(pass,
      LaunchPlan, reread_bytes)]``; ``reread_bytes`` is what a multi-pass kernel reads a second time,
      counted as HBM traffic. Inspect reads it at the model's hidden sizes (times ``cases.width_factor``)
      plus ``report_shapes``, or at ``report_shapes`` only when ``report_hidden`` is False.
    * ``differentiable``: the op has a gradient (False: inference-only; its tools run "fwd" only,
      its ``_bwd`` custom op raises, and its work model has no "bwd").
    """

    name: str
    functions: Tuple[Callable, ...]
    backends: Tuple[str, ...]
    custom_ops: Tuple[Any, ...] = ()
    cuda_ops: Tuple[str, ...] = ()
    patchable: bool = False
    dims: Tuple[str, ...] = ("M", "N")
    parity_dims: Tuple[Tuple[int, ...], Tuple[int, ...]] = ((), ())
    dispatch_sizes: Mapping[str, Tuple[int, ...]] = field(default_factory=dict)
    causal: bool = False
    report_shapes: Tuple[Tuple[int, int], ...] = ()
    cases: Optional[OpCases] = None
    differentiable: bool = True
    report_cases: Tuple[Dict[str, Any], ...] = ()
    report_plans: Optional[Callable[[Dict[str, Any]], List[Tuple[str, Any]]]] = None
    report_launches: Optional[Callable[[int, int, Any], List[Tuple[str, Any, float]]]] = None
    report_hidden: bool = True


_SPECS: Dict[str, OpSpec] = {}

# op -> its GPU backends in auto order: what dispatch reads on every call (backends.OP_BACKENDS)
OP_BACKENDS: Dict[str, Tuple[str, ...]] = {}


def register(spec: OpSpec) -> OpSpec:
    """Add ``spec`` (once per op name; the op modules call this at import) and return it."""
    if spec.name in _SPECS:
        raise ValueError(f"op {spec.name!r} is already registered")
    _SPECS[spec.name] = spec
    OP_BACKENDS[spec.name] = spec.backends
    return spec


def get(name: str) -> OpSpec:
    """The spec of op ``name``; ValueError naming the registered ops when there is none."""
    spec = _SPECS.get(name)
    if spec is None:
        raise ValueError(f"unknown op {name!r}; expected one of {', '.join(_SPECS)}")
    return spec


def all_ops() -> Tuple[OpSpec, ...]:
    """Every registered op, in registration order."""
    return tuple(_SPECS.values())


def names(where: Optional[Callable[[OpSpec], bool]] = None) -> Tuple[str, ...]:
    """The registered op names (those for which ``where(spec)`` holds), in registration order."""
    return tuple(s.name for s in _SPECS.values() if where is None or where(s))


def cuda_op_names() -> Tuple[str, ...]:
    """Every op the CUDA extension must provide, in registration order."""
    return tuple(op for s in _SPECS.values() for op in s.cuda_ops)



def element_size(dtype: Any) -> int:
    """Bytes per element of ``dtype`` (bfloat16 is 2): the only element size the byte models use."""
    import torch

    return torch.empty((), dtype=dtype).element_size()


def passes(mode: str) -> Tuple[str, ...]:
    """The passes a benchmark mode runs: "fwd+bwd" is both, "fwd" and "bwd" themselves."""
    return ("fwd", "bwd") if mode == "fwd+bwd" else (mode,)
