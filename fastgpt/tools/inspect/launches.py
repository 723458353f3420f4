"""CUDA kernels for ``fastgpt inspect``: the launches the C++ launchers make (a dry run of the CPU
emulator, :mod:`fastgpt.tools.cuda_emu`) and the machine code of the built extension."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from fastgpt.tools.inspect.gpus import Gpu
from fastgpt.tools.inspect.compile_jobs import READER_VERSION, _cache_get, _cache_put


# --------------------------------------------------------------------------------------------
# CUDA kernels: launches from the C++ launchers (emulator dry run), machine code from the build
# --------------------------------------------------------------------------------------------


class Unavailable(RuntimeError):
    """A part of the report cannot be made on this machine (the message says why)."""


_emulator = None


def _load_emulator():
    """The CPU emulator of csrc/ (fastgpt.tools.cuda_emu), built and loaded once."""
    global _emulator
    if _emulator is not None:
        return _emulator
    from fastgpt.tools import cuda_emu as module

    reason = module.unavailable_reason()
    if reason:
        raise Unavailable(f"the CUDA emulator (launch plans) cannot be built: {reason}")
    _emulator = module.load()
    return _emulator


def cuda_launches(op: str, pass_: str, rows: int, cols: int, dtype: str, gpu: Gpu, *, misalign: bool = False) -> Tuple[List[Dict[str, Any]], int]:
    """The launches csrc/'s launcher makes for ``op`` (layer_norm, add_layer_norm, gelu, bias_gelu) on
    x (rows, cols) on ``gpu``: [{"kernel", "grid", "block"}], and the workspace bytes the op allocates."""
    import re

    import torch

    emu = _load_emulator()
    lines, workspace = emu.dry_run_launches(f"{op}_{pass_}", rows, cols, getattr(torch, dtype), misalign=misalign,
                                            sms=gpu.sms, threads_per_sm=gpu.threads_per_sm)
    launches = []
    for line in lines:
        m = re.match(r"(.+) grid=\((\d+),(\d+),(\d+)\) block=\((\d+),(\d+),(\d+)\)$", line)
        if m is None:
            raise RuntimeError(f"unexpected launch log line: {line!r}")
        nums = [int(x) for x in m.groups()[1:]]
        launches.append({"kernel": m.group(1).strip(), "grid": nums[:3], "block": nums[3:]})
    return launches, workspace


def _normalize_kernel_name(name: str) -> str:
    """'void fastgpt::(anonymous namespace)::gelu_kernel<__half, 8, true>(FgGeluArgs)' -> 'gelu_kernel<__half,8,true>'."""
    name = name.strip()
    if name.startswith("void "):
        name = name[5:]
    depth, end = 0, len(name)
    for i, ch in enumerate(name):  # drop the parameter list: the first '(' outside template brackets
        depth += ch == "<"
        depth -= ch == ">"
        if ch == "(" and depth == 0 and i > 0 and not name[:i].endswith("::"):
            end = i
            break
    name = name[:end]
    head, sep, args = name.partition("<")
    head = head.rsplit("::", 1)[-1]
    return (head + sep + args).replace(" ", "")


def _demangle(names: Sequence[str]) -> Dict[str, str]:
    import shutil
    import subprocess

    tool = shutil.which("c++filt") or shutil.which("cu++filt")
    if tool is None:
        cuda = os.environ.get("CUDA_HOME") or "/usr/local/cuda"
        candidate = Path(cuda) / "bin" / "cu++filt"
        tool = str(candidate) if candidate.exists() else None
    if tool is None:
        raise Unavailable("c++filt not found (binutils): needed to match the CUDA kernels' mangled names")
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True, check=True).stdout.splitlines()
    return dict(zip(names, out))


def _cuda_library(build: bool = True) -> Path:
    from fastgpt import cuda_ext

    lib = cuda_ext.library_path()
    if lib is None and not build:
        raise Unavailable("the CUDA extension is not built yet (`fastgpt inspect` builds it, once, for sm_80 and sm_90)")
    if lib is None:
        if cuda_ext.cuda_home() is None:
            raise Unavailable("the CUDA extension is not built and nvcc was not found (set CUDA_HOME)")
        try:
            cuda_ext.load()  # compiles csrc/ for sm_80 and sm_90 once (cached), as the first CUDA use would
        except RuntimeError as exc:
            raise Unavailable(str(exc)) from exc
        lib = cuda_ext.library_path()
        if lib is None:
            raise Unavailable("the CUDA extension was built but its library was not found")
    return lib


def cuda_machine_code(build: bool = True, use_cache: bool = True) -> Tuple[Dict[Tuple[int, str], Dict[str, Any]], str]:
    """{(arch, normalized kernel name): resources} of the built CUDA extension, and its path (cached by
    content). ``build``: compile the extension first if it is not built (else raise Unavailable)."""
    from fastgpt.tools.inspect.compiling import read_machine_code, summarize_opcodes

    lib = _cuda_library(build)
    digest = hashlib.sha256(lib.read_bytes()).hexdigest()[:32]
    key = f"{digest}-{READER_VERSION}"
    cached = _cache_get("cuda", key) if use_cache else None
    if cached is None:
        import collections

        found = read_machine_code(str(lib))
        names = _demangle(sorted({fn for _, fn in found}))
        cached = []
        for (arch, fn), info in found.items():
            opcodes = collections.Counter(info.pop("opcodes"))
            cached.append({"arch": arch, "name": _normalize_kernel_name(names[fn]), "mangled": fn, **info,
                           **summarize_opcodes(opcodes)})
        _cache_put("cuda", key, cached)
    table = {}
    for entry in cached:
        entry = dict(entry)
        for k in ("ldg", "stg"):  # JSON keys are strings
            entry[k] = {int(b): n for b, n in entry[k].items()}
        table[(entry["arch"], entry["name"])] = entry
    return table, str(lib)


_CUDA_SIZES = {"float": 4, "__half": 2, "__nv_bfloat16": 2}


def _template_args(kernel: str) -> List[str]:
    return [a.strip() for a in kernel[kernel.index("<") + 1 : kernel.rindex(">")].split(",")] if "<" in kernel else []


def _cuda_vector_path(kernel: str) -> Optional[bool]:
    """Whether a csrc kernel instance is its 16-byte vector path: VEC * sizeof(T) == 16, with T the
    first template argument and VEC the first integer one (None: the kernel has no VEC parameter)."""
    args = _template_args(kernel)
    ints = [a for a in args if a.lstrip("-").isdigit()]
    if not args or not ints or args[0] not in _CUDA_SIZES:
        return None
    return int(ints[0]) * _CUDA_SIZES[args[0]] == 16
