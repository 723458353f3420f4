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
    "compile_plan",
    "kernel_signature",
    "jit_specialization",
    "launch_specialization",
    "normalize_specialization",
    "kernel_resources",
    "read_machine_code",
    "summarize_opcodes",
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
    times is harmless. ``FASTGPT_AUTOTUNE=0`` takes the first candidate without measuring;
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

    Mirrors what the JIT does at launch: tensors become ``*<dtype>`` pointers, with the divisibility
    hint when their address is a multiple of 16 (torch's allocations are; a view at an odd offset is
    not), ints equal to 1 become constants, ints divisible by 16 carry the divisibility hint, and the
    rest are i32 (i64 when they do not fit). Works on meta tensors (their data_ptr is the view's
    offset in bytes). The test suite checks it against triton's own binder (:func:`jit_specialization`).
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
            if value.data_ptr() % 16 == 0:
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


def jit_specialization(plan: LaunchPlan, config: Config, arch: int = 90):
    """(signature, constexprs, attrs) that triton's own JIT launcher computes for ``plan`` on ``sm_<arch>``.

    Runs the binder that ``JITFunction.run`` builds (``create_function_from_signature`` with the
    target's backend) on the plan's arguments, then ``JITFunction._pack_args``: the specialisation a
    real launch of these arguments gets (meta tensors have data_ptr 0, i.e. aligned like torch's
    allocations), without a GPU. These are triton internals (present in triton 3.3 to 3.8): returns
    None where they are missing or differ, and :func:`launch_specialization` then falls back to
    :func:`kernel_signature`.
    """
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import make_backend
        from triton.runtime.jit import create_function_from_signature

        kernel = plan.kernel
        backend = make_backend(GPUTarget("cuda", arch, 32))
        binder = create_function_from_signature(kernel.signature, kernel.params, backend)
        kwargs = plan.kwargs(config)
        bound, specialization, options = binder(**kwargs)
        _, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    except (ImportError, AttributeError, TypeError):  # another triton's internals
        return None
    return signature, constexprs, {k: v for k, v in attrs.items() if v}


def normalize_specialization(plan: LaunchPlan, specialization) -> Tuple[Dict[str, str], Dict[str, Any], Dict[str, Any]]:
    """A (signature, constexprs, attrs) triple keyed by argument name, for comparison and cache keys."""
    signature, constexprs, attrs = specialization
    names = list(plan.kernel.arg_names)

    def name(key):
        return names[key[0]] if isinstance(key, tuple) else key

    return (
        dict(signature),
        {name(k): v for k, v in constexprs.items()},
        {name(k): v for k, v in attrs.items() if v},
    )


def launch_specialization(plan: LaunchPlan, config: Config, arch: int = 90):
    """The specialisation to compile ``plan`` with: triton's JIT binder's (:func:`jit_specialization`),
    else the hand-written mirror of it (:func:`kernel_signature`), which the test suite checks against it."""
    found = jit_specialization(plan, config, arch)
    return found if found is not None else kernel_signature(plan, config)


def compile_plan(plan: LaunchPlan, config: Config, arch: int = 90, **options):
    """Compile ``plan`` with ``config`` for ``sm_<arch>`` and return triton's CompiledKernel.

    The specialisation is the one a launch of these arguments gets (:func:`launch_specialization`);
    ``options`` are extra compile options (e.g. ``maxnreg``). The result's ``.metadata.shared`` is the
    dynamic shared memory in bytes; ``.asm`` has "ttgir", "ptx" and "cubin". Read registers, spills
    and the instruction mix without a GPU with :func:`kernel_resources`.
    """
    import triton
    from triton.backends.compiler import GPUTarget

    if interpreter_active():
        raise RuntimeError("compile_plan needs a process without TRITON_INTERPRET=1")
    signature, constexprs, attrs = launch_specialization(plan, config, arch)
    src = triton.compiler.ASTSource(fn=plan.kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages, **options}
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)


def _nvidia_tool(name: str) -> Optional[str]:
    """A tool of the CUDA toolchain that the triton wheel bundles (triton/backends/nvidia/bin), or None."""
    try:
        import triton
    except ImportError:
        return None
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    return path if os.path.exists(path) else None


# "/*1e40*/   @!P0 HGMMA.64x64x16.F32.BF16 R56, gdesc[UR12], RZ ;" -> "HGMMA.64x64x16.F32.BF16"
_SASS_INSTRUCTION = re.compile(r"^\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Za-z0-9._]*)")
_RESOURCE = re.compile(r"(REG|STACK|SHARED|LOCAL):(\d+)")


def _sections(text: str, marker: str):
    """(arch, function, lines) for each function in cuobjdump output; ``marker`` starts a function."""
    arch, function, lines = 0, None, []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("arch = sm_"):
            if function is not None:
                yield arch, function, lines
            arch, function, lines = int(re.sub(r"\D", "", stripped.split("sm_")[1])), None, []
        elif stripped.startswith(marker):
            if function is not None:
                yield arch, function, lines
            function, lines = stripped[len(marker):].strip().rstrip(":").strip(), []
        elif function is not None:
            lines.append(line)
    if function is not None:
        yield arch, function, lines


def read_machine_code(path: str, sass: bool = True) -> Dict[Tuple[int, str], Dict[str, Any]]:
    """Resource usage and static instruction counts of every kernel in a cubin or a fat binary (.so).

    Runs the triton wheel's ``cuobjdump -res-usage`` and ``-sass``. Keys are (arch, mangled kernel
    name), e.g. (90, "_attn_fwd_kernel"); values hold ``registers``, ``stack`` (bytes of stack frame per
    thread: where spilled registers go), ``local`` (other local memory, bytes per thread),
    ``static_shared`` (bytes) and ``opcodes`` (a Counter of full SASS opcodes, modifiers included,
    e.g. "LDG.E.128.CONSTANT": static counts in the code, not executed counts; None without ``sass``,
    which skips the disassembly, the slow part). Raises FileNotFoundError when cuobjdump is missing.
    """
    import collections
    import subprocess

    tool = _nvidia_tool("cuobjdump")
    if tool is None:
        raise FileNotFoundError("cuobjdump not found in the triton wheel (triton/backends/nvidia/bin)")
    found: Dict[Tuple[int, str], Dict[str, Any]] = {}
    res = subprocess.run([tool, "-res-usage", path], capture_output=True, text=True, check=True).stdout
    for arch, function, lines in _sections(res, "Function "):
        values = dict((k, int(v)) for k, v in _RESOURCE.findall(" ".join(lines)))
        found[(arch, function)] = {
            "registers": values.get("REG", 0),
            "stack": values.get("STACK", 0),
            "local": values.get("LOCAL", 0),
            "static_shared": values.get("SHARED", 0),
            "opcodes": collections.Counter() if sass else None,
        }
    if not sass:
        return found
    text = subprocess.run([tool, "-sass", path], capture_output=True, text=True, check=True).stdout
    for arch, function, lines in _sections(text, "Function : "):
        entry = found.setdefault((arch, function), {"registers": 0, "stack": 0, "local": 0, "static_shared": 0,
                                                    "opcodes": collections.Counter()})
        for line in lines:
            m = _SASS_INSTRUCTION.match(line)
            if m:
                entry["opcodes"][m.group(1)] += 1
    return found


def _access_bits(opcode: str) -> int:
    """Width in bits of one global/local memory access (LDG.E.128 -> 128, LDG.E.U16 -> 16, LDG.E -> 32)."""
    parts = set(opcode.split("."))
    for bits, names in ((128, {"128"}), (64, {"64"}), (16, {"U16", "S16"}), (8, {"U8", "S8"})):
        if parts & names:
            return bits
    return 32


def summarize_opcodes(opcodes) -> Dict[str, Any]:
    """The instruction mix that matters, from a Counter of SASS opcodes (static counts).

    ``hmma`` (Ampere-style tensor-core MMA), ``hgmma`` (Hopper warpgroup MMA), ``ffma``, ``mufu``
    (special-function unit: exp2, rcp, rsqrt, tanh, ...) with a per-function breakdown, ``stl`` /
    ``ldl`` (local memory stores and loads: register spills), and global memory accesses by width in
    bits: ``ldg`` (loads, the cp.async LDGSTS included) and ``stg`` (stores), e.g. {128: 8, 16: 2}.
    """
    out: Dict[str, Any] = {"hmma": 0, "hgmma": 0, "ffma": 0, "mufu": 0, "mufu_by_function": {}, "stl": 0, "ldl": 0,
                           "ldg": {}, "stg": {}}
    for opcode, n in opcodes.items():
        base = opcode.split(".")[0]
        if base in ("HMMA", "HGMMA", "FFMA"):
            out[base.lower()] += n
        elif base == "MUFU":
            out["mufu"] += n
            fn = opcode.split(".")[1] if "." in opcode else "?"
            out["mufu_by_function"][fn] = out["mufu_by_function"].get(fn, 0) + n
        elif base in ("STL", "LDL"):
            out[base.lower()] += n
        elif base in ("LDG", "LDGSTS", "STG"):
            key = "stg" if base == "STG" else "ldg"
            bits = _access_bits(opcode)
            out[key][bits] = out[key].get(bits, 0) + n
    return out


def kernel_resources(compiled, arch: int, sass: bool = True) -> Dict[str, Any]:
    """Registers, stack (spills), shared memory and instruction mix of a :func:`compile_plan` result.

    Reads the cubin triton produced (what would run) with :func:`read_machine_code`: ``registers``
    per thread, ``stack`` / ``local`` bytes per thread (a Triton kernel's stack frame holds spilled
    registers), ``shared`` (triton's dynamic shared memory plus the cubin's static shared memory,
    bytes per block), and with ``sass`` the keys of :func:`summarize_opcodes` (``stl`` / ``ldl``
    count local-memory stores / loads: spills). No GPU needed. (``arch`` is the target compiled for;
    a triton cubin holds one kernel for it.)
    """
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        found = read_machine_code(f.name, sass=sass)
    if len(found) != 1:  # a triton cubin holds its one kernel (and no arch header: the key's arch is 0)
        raise RuntimeError(f"expected one kernel in the cubin; cuobjdump lists {sorted(found)}")
    (_, function), info = next(iter(found.items()))
    return {
        "function": function,
        "registers": info["registers"],
        "stack": info["stack"],
        "local": info["local"],
        "shared": int(compiled.metadata.shared) + info["static_shared"],
        **(summarize_opcodes(info["opcodes"]) if sass else {}),
    }


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)
