"""Launch machinery shared by fastgpt's Triton kernels: configs, launch plans, tuning, offline compiles.

A kernel module describes each launch as a :class:`LaunchPlan` (kernel, runtime arguments,
compile-time arguments, candidate :class:`Config` s, grid) built by one function that the module's
own launcher uses. Everything else works from that plan, so nothing restates the arguments:

* :func:`launch` runs a plan, picking its config with :func:`pick_config` (a benchmark over the
  candidates on the first call of each tuning key, cached for the process);
* :func:`compile_plan` compiles a plan for a GPU target (``GPUTarget("cuda", 90, 32)``) without a GPU,
  for the static kernel report and the compile test (run it in a process *without* TRITON_INTERPRET).

Why not ``triton.autotune``: it keys on exact argument values, so a KV-cache decode, whose key length
grows by one each step, would re-benchmark every step. Our key rounds lengths to powers of two.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import Any, Callable, Dict, Hashable, Optional, Tuple

import torch

__all__ = [
    "Config",
    "LaunchPlan",
    "interpreter_active",
    "next_pow2",
    "length_bucket",
    "launch",
    "pick_config",
    "compile_plan",
    "kernel_signature",
    "kernel_resources",
    "ceil_div",
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


# --------------------------------------------------------------------------------------------
# offline compilation (no GPU needed): for `fastgpt inspect` and the compile test
# --------------------------------------------------------------------------------------------

_TRITON_DTYPE = {
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.float32: "fp32",
    torch.float64: "fp64",
    torch.int32: "i32",
    torch.int64: "i64",
}


def kernel_signature(plan: LaunchPlan, config: Config):
    """(signature, constexprs, attrs) of ``plan`` for ``triton.compiler.ASTSource`` (triton >= 3.3).

    Mirrors what the JIT does at launch: tensors become ``*<dtype>`` pointers (16-byte aligned, as
    torch allocates), ints equal to 1 become constants, ints divisible by 16 carry the divisibility
    hint, and the rest are i32 (i64 when they do not fit). Works on meta tensors.
    """
    kernel = plan.kernel
    values = {**plan.args, **plan.constexprs, **plan.meta(config)}
    names = list(kernel.arg_names)
    missing = [n for n in names if n not in values]
    if missing:
        raise ValueError(f"{plan.name}: no value for kernel arguments {missing}")
    constexpr_names = {names[i] for i in kernel.constexprs}
    signature, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(names):
        value = values[name]
        if name in constexpr_names:
            signature[name] = "constexpr"
            constexprs[name] = value
        elif isinstance(value, torch.Tensor):
            signature[name] = "*" + _TRITON_DTYPE[value.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif value is None:
            signature[name] = "constexpr"
            constexprs[name] = None
        elif isinstance(value, bool):
            signature[name] = "i1"
        elif isinstance(value, int):
            if value == 1:
                signature[name] = "constexpr"
                constexprs[name] = 1
            else:
                signature[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
                if value % 16 == 0:
                    attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            raise TypeError(f"{plan.name}: cannot type argument {name}={value!r}")
    return signature, constexprs, attrs


def compile_plan(plan: LaunchPlan, config: Config, arch: int = 90):
    """Compile ``plan`` with ``config`` for ``sm_<arch>`` and return triton's CompiledKernel.

    The result's ``.metadata`` has ``shared`` (bytes of shared memory) and, once its binary is
    loaded on a device, ``n_regs`` / ``n_spills``; ``.asm`` has "ttgir", "ptx" and "cubin". Without a
    GPU, read registers and spills with :func:`kernel_resources`.
    """
    import triton
    from triton.backends.compiler import GPUTarget

    if interpreter_active():
        raise RuntimeError("compile_plan needs a process without TRITON_INTERPRET=1")
    signature, constexprs, attrs = kernel_signature(plan, config)
    src = triton.compiler.ASTSource(fn=plan.kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)


def _nvidia_tool(name: str) -> Optional[str]:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    return path if os.path.exists(path) else None


def kernel_resources(compiled, arch: int) -> Dict[str, int]:
    """Registers, spills, stack and shared memory of a :func:`compile_plan` result, without a GPU.

    Re-assembles the PTX with triton's bundled ``ptxas -v`` (registers, spill stores/loads in bytes,
    stack) and reads the cubin's SASS with ``cuobjdump`` (count of HGMMA = Hopper warpgroup MMA,
    HMMA = Ampere-style MMA, FFMA). ``shared`` is triton's dynamic shared memory in bytes.
    Keys whose tool is missing are left out.
    """
    import re
    import subprocess
    import tempfile

    found = {"shared": int(compiled.metadata.shared)}
    ptxas = _nvidia_tool("ptxas")
    if ptxas:
        gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
        with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
            f.write(compiled.asm["ptx"])
            f.flush()
            cmd = [ptxas, "-v", f"--gpu-name={gpu}", f.name, "-o", os.devnull]
            text = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr
        patterns = {
            "registers": r"Used (\d+) registers",
            "stack": r"(\d+) bytes stack frame",
            "spill_stores": r"(\d+) bytes spill stores",
            "spill_loads": r"(\d+) bytes spill loads",
        }
        for key, pattern in patterns.items():
            m = re.search(pattern, text)
            if m:
                found[key] = int(m.group(1))
    cuobjdump = _nvidia_tool("cuobjdump")
    if cuobjdump:
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(compiled.asm["cubin"])
            f.flush()
            sass = subprocess.run([cuobjdump, "-sass", f.name], capture_output=True, text=True, check=True).stdout
        # SASS lines look like "/*1e40*/   @!P0 HGMMA.64x64x16.F32 R56, gdesc[UR12], RZ ;"
        opcodes = re.findall(r"^\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9]*)", sass, flags=re.MULTILINE)
        for name in ("HGMMA", "HMMA", "FFMA"):
            found[name.lower()] = opcodes.count(name)
    return found


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)
