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
import re
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Hashable, Optional, Tuple

import torch

__all__ = [
    "Config",
    "LaunchPlan",
    "interpreter_active",
    "interpreter_problem",
    "next_pow2",
    "length_bucket",
    "launch",
    "pick_config",
    "tuning_log",
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


def _version(dist: str) -> Optional[Tuple[int, ...]]:
    from importlib import metadata

    try:
        return tuple(int(p) for p in re.findall(r"\d+", metadata.version(dist))[:2])
    except metadata.PackageNotFoundError:
        return None


def interpreter_problem() -> Optional[str]:
    """Why Triton's CPU interpreter cannot run here, or None. Reads versions without importing triton.

    triton 3.6's interpreter fails on numpy 2.4 ("TypeError: only 0-dimensional arrays can be
    converted to Python scalars"; measured with 2.4.1; 2.3.5 and 2.2.6 run the kernels); triton 3.8's
    works with numpy 2.4. Only the interpreter needs this: GPU runs of triton 3.6 take any numpy."""
    triton, numpy = _version("triton"), _version("numpy")
    if triton is not None and numpy is not None and triton < (3, 7) and numpy >= (2, 4):
        return (f"triton {'.'.join(map(str, triton))}'s interpreter (TRITON_INTERPRET=1) needs numpy < 2.4; "
                f"numpy {'.'.join(map(str, numpy))} is installed: pip install 'numpy<2.4'")
    return None


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


TUNE_BUDGET_S = 20.0  # default time to tune one kernel for one shape class, compiles included


def _tune_budget_s() -> float:
    raw = os.environ.get("FASTGPT_TUNE_BUDGET_S", "").strip()
    try:
        value = float(raw) if raw else TUNE_BUDGET_S
    except ValueError:
        raise ValueError(f"FASTGPT_TUNE_BUDGET_S must be a number of seconds; got {raw!r}") from None
    if value <= 0:
        raise ValueError(f"FASTGPT_TUNE_BUDGET_S must be positive; got {raw!r}")
    return value


def _spills(compiled) -> int:
    """Registers spilled by a launched kernel (triton's CompiledKernel reads it when it loads the binary)."""
    return int(getattr(compiled, "n_spills", 0) or 0)


def pick_config(plan: LaunchPlan) -> Config:
    """The plan's config: the only candidate, or the fastest one for ``plan.tune_key`` (measured once).

    Candidates are tried in order (the first is the default) within ``FASTGPT_TUNE_BUDGET_S`` seconds
    per kernel and shape class (default 20; the first candidate is always measured). Each is compiled
    and launched once first: those that do not fit the device (shared memory, registers) are skipped,
    and those whose compiled kernel spills registers are measured only if no candidate is spill-free.
    The kernels write their outputs without accumulating into them, so running a candidate several
    times is harmless (except the atomic dK/dV kernel's dQ sums: flash_attention.backward zeroes them
    after this). ``FASTGPT_AUTOTUNE=0`` takes the first candidate without measuring;
    ``FASTGPT_TUNE_LOG`` (1: stderr, else a file path) logs each choice (:func:`tuning_log`).
    """
    if len(plan.configs) == 1 or os.environ.get("FASTGPT_AUTOTUNE", "1").strip() == "0":
        return plan.configs[0]
    key = (plan.name, plan.tune_key)
    with _tune_lock:
        best = _tuned.get(key)
    if best is not None:
        return best
    import triton.testing

    budget, start = _tune_budget_s(), time.monotonic()
    skip = _out_of_resources_errors()
    timings: Dict[Config, float] = {}
    skipped: Dict[str, str] = {}
    spilling = []
    for config in plan.configs:
        if timings and time.monotonic() - start > budget:
            skipped[str(config)] = "tuning budget spent"
            continue
        try:
            compiled = plan.kernel[plan.grid(config)](**plan.kwargs(config))  # compiles; a first run
        except skip as e:
            skipped[str(config)] = f"does not fit this device ({type(e).__name__})"
            continue
        if _spills(compiled):
            skipped[str(config)] = f"spills {_spills(compiled)} registers"
            spilling.append(config)
            continue
        timings[config] = triton.testing.do_bench(lambda: _run(plan, config), warmup=5, rep=20)
    if not timings:  # nothing spill-free: the fastest of the spilling ones
        for config in spilling:
            timings[config] = triton.testing.do_bench(lambda: _run(plan, config), warmup=5, rep=20)
            skipped.pop(str(config))
    if not timings:
        raise RuntimeError(f"{plan.name}: no config fits this device ({', '.join(str(c) for c in plan.configs)})")
    best = min(timings, key=timings.get)
    with _tune_lock:
        _tuned[key] = best
    _log_choice(plan, best, timings, skipped, time.monotonic() - start)
    return best


_tuning_log = []


def tuning_log():
    """The choices :func:`pick_config` made in this process, one dict per kernel and shape class:
    kernel, key, arch, chosen and default config, timings_ms per measured candidate, skipped ones
    with the reason, tuning_s."""
    with _tune_lock:
        return list(_tuning_log)


def _log_choice(plan: LaunchPlan, best: Config, timings, skipped, seconds: float) -> None:
    import json
    import sys

    arch = None
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        arch = f"sm_{major}{minor}"
    record = {"kernel": plan.name, "key": repr(plan.tune_key), "arch": arch, "chosen": str(best),
              "default": str(plan.configs[0]), "timings_ms": {str(c): round(t, 5) for c, t in timings.items()},
              "skipped": skipped, "tuning_s": round(seconds, 2)}
    with _tune_lock:
        _tuning_log.append(record)
    target = os.environ.get("FASTGPT_TUNE_LOG", "").strip()
    if target in ("", "0"):
        return
    if target == "1":
        print(f"fastgpt tune: {plan.name} {record['key']} on {arch}: {best} "
              f"({len(timings)} measured, {len(skipped)} skipped, {seconds:.1f} s)", file=sys.stderr)
        return
    with open(target, "a", encoding="utf-8") as f:  # one line per choice: concurrent processes may append
        f.write(json.dumps(record) + "\n")


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
