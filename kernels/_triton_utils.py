"""Launch machinery shared by fastgpt's Triton kernels: configs, launch plans, tuning, offline compiles.

A kernel module describes each launch as a :class:`LaunchPlan` (kernel, runtime arguments,
compile-time arguments, candidate :class:`Config` s, grid) built by one function that the module's
own launcher uses. Everything else works from that plan, so nothing restates the arguments:

* :func:`launch` runs a plan, picking its config with :func:`pick_config` (a benchmark over the
  candidates on the first call of each tuning key, cached for the process);
* ``fastgpt.tools.inspect.compiling`` compiles a plan for a GPU target without a GPU and reads its
  machine code (the static kernel report; not part of the runtime).

Why not ``triton.autotune``: it keys on exact argument values, so a KV-cache decode, whose key length
grows by one each step, would re-benchmark every step. Our key rounds lengths to powers of two.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import Any, Callable, Dict, Hashable, Tuple

__all__ = [
    "Config",
    "LaunchPlan",
    "interpreter_active",
    "next_pow2",
    "length_bucket",
    "launch",
    "pick_config",
    "ceil_div",
    "on_device",
]


@dataclass(frozen=True)
class Config:
    """One tuning point: tile sizes (passed as the constexprs BLOCK_M / BLOCK_N), warps, stages."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int

    @property
    def meta(self) -> Dict[str, int]:
        return {"BLOCK_M": self.block_m, "BLOCK_N": self.block_n}

    def __str__(self) -> str:
        return f"BLOCK_M={self.block_m} BLOCK_N={self.block_n} warps={self.num_warps} stages={self.num_stages}"


@dataclass(frozen=True)
class LaunchPlan:
    """Everything needed to launch (or compile) one kernel call.

    ``args`` holds the runtime arguments by name (tensors, ints, floats) and ``constexprs`` the
    compile-time ones except BLOCK_M / BLOCK_N, which come from the chosen :class:`Config`.
    ``grid(config)`` gives the launch grid; ``tune_key`` identifies calls that share a best config.
    """

    name: str
    kernel: Any
    args: Dict[str, Any]
    constexprs: Dict[str, Any]
    configs: Tuple[Config, ...]
    grid: Callable[[Config], Tuple[int, ...]]
    tune_key: Hashable = None

    def meta(self, config: Config) -> Dict[str, int]:
        """The config's tile constexprs that this kernel takes (a kernel may have BLOCK_M only)."""
        names = getattr(self.kernel, "arg_names", None)
        return {k: v for k, v in config.meta.items() if names is None or k in names}

    def kwargs(self, config: Config) -> Dict[str, Any]:
        """Keyword arguments of ``kernel[grid](**kwargs)`` for ``config``."""
        return {**self.args, **self.constexprs, **self.meta(config), "num_warps": config.num_warps,
                "num_stages": config.num_stages}


def interpreter_active() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1 before import)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip() not in ("", "0")


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def length_bucket(n: int) -> int:
    """A sequence length rounded up to a power of two (at least 64): the tuning-key granularity."""
    return max(64, next_pow2(n))


# --------------------------------------------------------------------------------------------
# launching and tuning
# --------------------------------------------------------------------------------------------

_tuned: Dict[Hashable, Config] = {}
_tune_lock = threading.Lock()


def _run(plan: LaunchPlan, config: Config) -> None:
    plan.kernel[plan.grid(config)](**plan.kwargs(config))


def _out_of_resources_errors() -> Tuple[type, ...]:
    errors = []
    try:
        from triton.runtime.errors import OutOfResources

        errors.append(OutOfResources)
    except ImportError:  # pragma: no cover - every triton we support has it
        pass
    try:
        from triton.runtime.errors import PTXASError  # triton >= 3.2

        errors.append(PTXASError)
    except ImportError:
        pass
    return tuple(errors)


def pick_config(plan: LaunchPlan) -> Config:
    """The plan's config: the only candidate, or the fastest one for ``plan.tune_key`` (measured once).

    Candidates that do not fit the device (shared memory, registers) are skipped. The kernels write
    their outputs without accumulating into them, so running a candidate several times is harmless.
    ``FASTGPT_AUTOTUNE=0`` takes the first candidate without measuring.
    """
    if len(plan.configs) == 1 or os.environ.get("FASTGPT_AUTOTUNE", "1").strip() == "0":
        return plan.configs[0]
    key = (plan.name, plan.tune_key)
    with _tune_lock:
        best = _tuned.get(key)
    if best is not None:
        return best
    import triton.testing

    skip = _out_of_resources_errors()
    timings = {}
    for config in plan.configs:
        try:
            timings[config] = triton.testing.do_bench(lambda: _run(plan, config), warmup=5, rep=20)
        except skip:
            continue
    if not timings:
        raise RuntimeError(f"{plan.name}: no config fits this device ({', '.join(str(c) for c in plan.configs)})")
    best = min(timings, key=timings.get)
    with _tune_lock:
        _tuned[key] = best
    return best


def launch(plan: LaunchPlan) -> Config:
    """Run ``plan`` with its chosen config; returns the config used."""
    config = pick_config(plan)
    _run(plan, config)
    return config


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def on_device(t):
    """Triton launches on the current CUDA device: a context that makes it ``t``'s (a no-op on cpu)."""
    import contextlib

    import torch

    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()
