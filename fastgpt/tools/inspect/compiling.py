"""Offline compilation of the Triton kernels' launch plans (no GPU needed) and reading their machine code.

For ``fastgpt inspect`` and the compile tests: :func:`compile_plan` compiles a
:class:`fastgpt.kernels._triton_utils.LaunchPlan` for a GPU target (``GPUTarget("cuda", 90, 32)``);
run it in a process *without* TRITON_INTERPRET. :func:`read_machine_code` and
:func:`kernel_resources` read registers, spills, shared memory and the instruction mix from the
cubin / SASS. Moved out of the kernels' runtime launch code, which never needs it.
"""

from __future__ import annotations

import os
import re
from typing import Any, Dict, Optional, Tuple

import torch

from fastgpt.kernels._triton_utils import Config, LaunchPlan, interpreter_active

__all__ = [
    "compile_plan",
    "kernel_signature",
    "jit_specialization",
    "launch_specialization",
    "normalize_specialization",
    "kernel_resources",
    "read_machine_code",
    "summarize_opcodes",
]


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
    ``ldl`` (local memory stores and loads: register spills), ``atomics`` (ATOM, ATOMG, ATOMS, RED,
    REDG: atomic read-modify-writes, whose order, and so float sums, vary run to run), and global
    memory accesses by width in bits: ``ldg`` (loads, the cp.async LDGSTS included) and ``stg``
    (stores), e.g. {128: 8, 16: 2}.
    """
    out: Dict[str, Any] = {"hmma": 0, "hgmma": 0, "ffma": 0, "mufu": 0, "mufu_by_function": {}, "stl": 0, "ldl": 0,
                           "atomics": 0, "ldg": {}, "stg": {}}
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
        elif base in ("ATOM", "ATOMG", "ATOMS", "RED", "REDG"):
            out["atomics"] += n
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
