"""Which backend serves which op on which tensor, and why. The only dispatch logic in fastgpt.

Backends:

* ``cuda``: the C++/CUDA extension built from ``csrc/`` (layer norm, GELU and their fused variants).
* ``triton``: Triton kernels in ``fastgpt.kernels`` (flash attention). On CUDA tensors, or on CPU
  tensors when ``TRITON_INTERPRET=1`` was set before triton was imported (the Triton interpreter:
  slow, but it executes the real kernel code; that is how the CPU test suite proves the kernels).
* ``reference``: plain torch (:mod:`fastgpt.reference`); always available.

What is requested comes from, in order: the innermost :func:`use_backend` block, the environment
variable ``FASTGPT_BACKEND`` (``auto|cuda|triton|reference``), else ``auto``. ``auto`` takes, for CUDA
tensors, the first GPU backend of the op that can serve the call, else the reference; CPU tensors get
the reference (the Triton interpreter runs only when ``triton`` is forced). Strict mode (``FASTGPT_STRICT=1`` or
``use_backend(..., strict=True)``) turns every fallback into :class:`BackendUnavailableError`;
otherwise each distinct fallback is reported once with a :class:`FallbackWarning`.

:func:`use_backend` blocks are per thread (and per asyncio task): a ``contextvars.ContextVar`` holds an
immutable tuple of the active blocks, and each block removes exactly its own entry when it exits, so
one thread's blocks never change another's, and blocks that exit out of order (generators, manual
``__exit__``) leave the right state. A new thread starts with no block (FASTGPT_BACKEND / auto).
Autograd runs the backward of CUDA ops on its own worker thread: the eager ops capture the state of
the forward (:func:`capture`) and run their backward under it (:func:`run_under`), so the backward
makes the same choice as the forward. (A torch.compile'd backward runs under the context of the
thread that called ``.backward()``: torch copies it to its autograd threads.)
"""

import contextlib
import contextvars
import importlib.util
import os
import shutil
import sys
import threading
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch

from fastgpt import registry

__all__ = [
    "BACKENDS",
    "OP_BACKENDS",
    "BackendUnavailableError",
    "FallbackWarning",
    "Choice",
    "use_backend",
    "requested_backend",
    "strict_mode",
    "select",
    "report_fallback",
    "explain",
    "backend_unavailable_reason",
    "reset_warnings",
    "capture",
    "run_under",
    "check_env",
]

BACKENDS = ("auto", "cuda", "triton", "reference")

# GPU backends that implement each op, in the order ``auto`` tries them: filled by each op's
# registry entry (fastgpt.registry.OpSpec.backends) when fastgpt.ops is imported.
OP_BACKENDS: Dict[str, Tuple[str, ...]] = registry.OP_BACKENDS


class BackendUnavailableError(RuntimeError):
    """Raised in strict mode when the call would otherwise fall back to a slower backend."""


class FallbackWarning(UserWarning):
    """Emitted once per distinct fallback (op, requested backend, reason) outside strict mode."""


@dataclass(frozen=True)
class Choice:
    op: str
    backend: str
    reason: str


class _Block:
    """One active use_backend block; compared by identity, so each block removes only itself."""

    __slots__ = ("name", "strict")

    def __init__(self, name: str, strict: bool) -> None:
        self.name, self.strict = name, strict


_lock = threading.Lock()
# the active blocks of this thread / task, innermost last (an immutable tuple: never mutated in place)
_blocks: contextvars.ContextVar[Tuple[_Block, ...]] = contextvars.ContextVar("fastgpt_backend_blocks", default=())
_warned: set = set()
_last_choice: Dict[str, Tuple[str, str]] = {}  # op -> (backend, reason) of its latest call


# The environment is read on every call (a script may set it after importing fastgpt), but each
# distinct raw value is parsed once: this runs for every op call.
_parsed_env: Dict[Tuple[str, Optional[str]], object] = {}


def _env_backend() -> str:
    raw = os.environ.get("FASTGPT_BACKEND")
    if raw is None:
        return "auto"
    key = ("FASTGPT_BACKEND", raw)
    value = _parsed_env.get(key)
    if value is None:
        value = raw.strip().lower() or "auto"
        if value not in BACKENDS:
            raise ValueError(f"FASTGPT_BACKEND must be one of {', '.join(BACKENDS)}; got {raw!r}")
        _parsed_env[key] = value
    return value  # type: ignore[return-value]


_STRICT_VALUES = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False, "": False}


def _env_strict() -> bool:
    raw = os.environ.get("FASTGPT_STRICT")
    if raw is None:
        return False
    value = _STRICT_VALUES.get(raw.strip().lower())
    if value is None:
        raise ValueError(f"FASTGPT_STRICT must be one of 1, 0, true, false, yes, no, on, off (or empty); got {raw!r}")
    return value


def check_env() -> None:
    """Raise ValueError (one line, naming the variable) if FASTGPT_BACKEND or FASTGPT_STRICT is invalid."""
    _env_backend()
    _env_strict()


def requested_backend() -> str:
    """The backend requested right now: innermost use_backend block, else FASTGPT_BACKEND, else auto."""
    blocks = _blocks.get()
    return blocks[-1].name if blocks else _env_backend()


def strict_mode() -> bool:
    """True when fallbacks raise: FASTGPT_STRICT=1 or an enclosing use_backend(..., strict=True)."""
    return any(block.strict for block in _blocks.get()) or _env_strict()


@contextlib.contextmanager
def use_backend(name: str, strict: bool = False) -> Iterator[None]:
    """Force a backend (``auto``, ``cuda``, ``triton`` or ``reference``) for the ops called in a block.

    With ``strict=True`` a call that the backend cannot serve raises :class:`BackendUnavailableError`
    instead of falling back. Blocks nest; the innermost wins (strictness is kept from any enclosing
    strict block). The setting is per thread and per asyncio task (see the module docstring).
    """
    if name not in BACKENDS:
        raise ValueError(f"use_backend: name must be one of {', '.join(BACKENDS)}; got {name!r}")
    if not isinstance(strict, bool):
        raise TypeError(f"use_backend: strict must be a bool; got {type(strict).__name__}")
    block = _Block(name, strict)
    _blocks.set(_blocks.get() + (block,))
    try:
        yield
    finally:
        # remove this block only: an inner block may still be open (exits out of order)
        _blocks.set(tuple(b for b in _blocks.get() if b is not block))


def capture() -> Tuple[_Block, ...]:
    """The active use_backend blocks of this thread, for :func:`run_under` (an op's forward saves it)."""
    return _blocks.get()


def run_under(state: Tuple[_Block, ...], fn: Callable, *args):
    """``fn(*args)`` under the use_backend state that :func:`capture` returned (an op's backward, which
    autograd may run on another thread), then this thread's own state again. (A plain function: a
    generator-based context manager would cost microseconds per backward.)"""
    token = _blocks.set(state)
    try:
        return fn(*args)
    finally:
        _blocks.reset(token)


def reset_warnings() -> None:
    """Forget which fallbacks were already reported (for tests)."""
    with _lock:
        _warned.clear()


def reset_last_choices() -> None:
    """Forget every op's :func:`last_choice` (for tests: a later check then sees only later calls)."""
    with _lock:
        _last_choice.clear()


# --------------------------------------------------------------------------------------------
# availability of a backend for a device, independent of the op's own constraints
# --------------------------------------------------------------------------------------------


# True when TRITON_INTERPRET is set: the kernels' own test (importing it does not import triton)
from fastgpt.kernels._triton_utils import interpreter_active as triton_interpreter_enabled  # noqa: E402


def _triton_importable() -> Optional[str]:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    return None


def backend_unavailable_reason(backend: str, device: torch.device) -> Optional[str]:
    """Why ``backend`` cannot run on ``device`` at all, or None if it can (the op may still decline)."""
    if backend == "reference":
        return None
    if backend == "triton":
        reason = _triton_importable()
        if reason:
            return reason
        if device.type == "cuda":
            return None
        if device.type == "cpu" and triton_interpreter_enabled():
            return None
        if device.type == "cpu":
            return "triton needs a CUDA tensor (or TRITON_INTERPRET=1 to run the interpreter on cpu)"
        return f"triton does not run on {device.type} tensors"
    if backend == "cuda":
        if device.type != "cuda":
            return f"the cuda backend needs a CUDA tensor; got a {device.type} tensor"
        from fastgpt import cuda_ext

        ok, reason = cuda_ext.status()
        return None if ok else reason
    raise ValueError(f"unknown backend {backend!r}")


# --------------------------------------------------------------------------------------------
# selection
# --------------------------------------------------------------------------------------------

Constraint = Callable[[str], Optional[str]]


def _decline_reason(backend: str, device: torch.device, constraint: Optional[Constraint]) -> Optional[str]:
    reason = backend_unavailable_reason(backend, device)
    if reason is None and constraint is not None:
        reason = constraint(backend)
    return reason


_NOT_CUDA_REASON: Dict[Tuple[str, str], str] = {}


def _auto(op: str, device: torch.device, constraint: Optional[Constraint]) -> Tuple[str, str]:
    if device.type != "cuda":
        # the Triton interpreter is orders of magnitude slower than torch on cpu: only a forced
        # use_backend("triton") runs it
        key = (op, device.type)
        reason = _NOT_CUDA_REASON.get(key)
        if reason is None:
            reason = _NOT_CUDA_REASON[key] = f"{device.type} tensors: the GPU kernels ({', '.join(OP_BACKENDS[op])}) need CUDA tensors"
        return "reference", reason
    reasons = []
    for backend in OP_BACKENDS[op]:
        reason = _decline_reason(backend, device, constraint)
        if reason is None:
            return backend, f"auto: {backend} serves {device.type} tensors"
        reasons.append(f"{backend}: {reason}")
    return "reference", "; ".join(reasons) if reasons else f"{op} has no GPU backend"


def report_fallback(op: str, requested: str, reason: str, *, cpu_notice: bool = False) -> None:
    """A call of ``op`` cannot use ``requested``: raise in strict mode, else warn once per reason."""
    if strict_mode():
        raise BackendUnavailableError(
            f"fastgpt.{op}: the {requested} backend cannot serve this call ({reason}) and strict mode "
            "is on (FASTGPT_STRICT=1 or use_backend(..., strict=True)); "
            "use_backend('reference') runs the plain-torch implementation explicitly"
        )
    # one notice per process for cpu tensors, not one per op: on a CPU-only machine every op takes it
    key = ("cpu",) if cpu_notice else (op, requested, reason)
    if key in _warned:
        return
    with _lock:
        if key in _warned:
            return
        _warned.add(key)
    if cpu_notice:
        message = (
            "fastgpt: cpu tensors run the plain-torch reference ops (no GPU kernel serves them); "
            "fastgpt.explain() shows the backend of each op"
        )
    else:
        message = f"fastgpt.{op}: {requested} backend unavailable, using the reference ({reason})"
    warnings.warn(message, FallbackWarning, stacklevel=_caller_stacklevel())


_internal_dirs: Optional[Tuple[str, ...]] = None


def _caller_stacklevel() -> int:
    """The stacklevel for a warning issued in report_fallback that names the user's line: the first
    frame outside fastgpt (and its kernels) and torch, whose autograd and custom-op machinery sits
    between fastgpt's own frames. (warnings' skip_file_prefixes needs Python 3.12.)"""
    global _internal_dirs
    if _internal_dirs is None:
        dirs = [os.path.dirname(os.path.abspath(__file__)), os.path.dirname(os.path.abspath(torch.__file__))]
        spec = importlib.util.find_spec("fastgpt.kernels")
        dirs += list(spec.submodule_search_locations or []) if spec is not None else []
        _internal_dirs = tuple(os.path.join(d, "") for d in dirs)
    frame, level = sys._getframe(2), 2  # level 2: report_fallback's caller
    while frame.f_back is not None and frame.f_code.co_filename.startswith(_internal_dirs):
        frame, level = frame.f_back, level + 1
    return level


def select(op: str, device: torch.device, constraint: Optional[Constraint] = None) -> str:
    """Pick the backend for one call of ``op`` on tensors on ``device``.

    ``constraint(backend)`` returns why that backend's kernel cannot take this particular call
    (dtype, head dim, ...) or None. Returns ``"cuda"``, ``"triton"`` or ``"reference"``; raises
    :class:`BackendUnavailableError` in strict mode instead of falling back. This runs on every
    call of every op, so the common cases (reference requested, cpu tensors under auto) come first.
    """
    blocks = _blocks.get()
    requested = blocks[-1].name if blocks else _env_backend()
    if requested == "reference":
        _last_choice[op] = ("reference", "requested")
        return "reference"
    if requested == "auto":
        backend, reason = _auto(op, device, constraint)
        if backend == "reference":
            report_fallback(op, "GPU", reason, cpu_notice=device.type == "cpu")
        _last_choice[op] = (backend, reason)
        return backend
    if requested in OP_BACKENDS[op]:
        reason = _decline_reason(requested, device, constraint)
    else:
        reason = f"{op} has no {requested} backend (it has: {', '.join(OP_BACKENDS[op]) or 'none'})"
    if reason is None:
        _last_choice[op] = (requested, "requested")
        return requested
    report_fallback(op, requested, reason)
    backend, auto_reason = _auto(op, device, constraint)
    _last_choice[op] = (backend, f"requested {requested} unavailable ({reason}); {auto_reason}")
    return backend


def last_choice(op: str) -> Optional[Choice]:
    """The backend the most recent call of ``op`` used, and why (None before the first call)."""
    last = _last_choice.get(op)
    return None if last is None else Choice(op, *last)


# --------------------------------------------------------------------------------------------
# explain
# --------------------------------------------------------------------------------------------


def _default_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def _plan(op: str, device: torch.device) -> Tuple[str, str, Dict[str, str]]:
    """What a typical call on ``device`` would get, without running or compiling anything."""
    candidates = {b: (_decline_reason(b, device, None) or "available") for b in OP_BACKENDS[op]}
    requested = requested_backend()
    if requested == "reference":
        return "reference", "requested (use_backend or FASTGPT_BACKEND)", candidates
    if requested != "auto":
        if candidates.get(requested) == "available":
            return requested, "requested", candidates
        why = candidates.get(requested, f"{op} has no {requested} backend")
        backend, reason = _auto(op, device, None)
        return backend, f"requested {requested} unavailable ({why}); {reason}", candidates
    backend, reason = _auto(op, device, None)
    if device.type == "cpu" and not torch.cuda.is_available():
        reason = f"no CUDA device (torch.cuda.is_available() is False); {reason}"
    return backend, reason, candidates


def explain(as_dict: bool = False, device: Optional[torch.device | str] = None):
    """Tell which backend each op uses on this machine, and why.

    For tensors on ``device`` (default: the current CUDA device if there is one, else cpu), gives per
    op the backend a typical call gets and the reason, plus every GPU backend's availability.
    Prints a table and returns None, or with ``as_dict=True`` returns
    ``{op: {"backend", "reason", "candidates": {backend: "available" | reason}}}`` without printing.
    """
    dev = torch.device(device) if device is not None else _default_device()
    plan = {}
    for op in OP_BACKENDS:
        backend, reason, candidates = _plan(op, dev)
        plan[op] = {"backend": backend, "reason": reason, "candidates": candidates, "device": str(dev)}
    if as_dict:
        return plan
    strict = "on" if strict_mode() else "off"
    print(f"fastgpt backends for {dev} tensors (requested: {requested_backend()}, strict: {strict})")
    print("\n".join(format_plan(plan)))
    return None


def format_plan(plan: Dict[str, Dict]) -> List[str]:
    """The lines of explain()'s table (``explain(as_dict=True)`` in, one indented line per op out)."""
    width = max(len(op) for op in plan)
    return [f"  {op:<{width}}  {row['backend']:<9}  {row['reason']}" for op, row in plan.items()]


def tool_status() -> Dict[str, Optional[str]]:
    """Where the CUDA toolchain is (for `fastgpt info`): nvcc on PATH, the CUDA_HOME variable, and
    the toolkit the CUDA extension would be built with (None where absent)."""
    from fastgpt import cuda_ext

    toolkit = cuda_ext.cuda_home()
    return {
        "nvcc": shutil.which("nvcc"),
        "CUDA_HOME": os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"),
        "toolkit": str(toolkit) if toolkit else None,
    }
