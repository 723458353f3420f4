"""Building the CPU emulator of csrc/: the unmodified kernels compiled as C++20 by g++ with
``cuda_shim.h`` force-included, linked with ``emu_runtime.cpp`` into a shared library cached under
``$FASTGPT_CACHE_DIR/cuda_emu/<hash of sources and flags>``; ``build(mutations=...)`` compiles a
variant with planted bugs (textual edits to the kernel sources)."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional, Sequence, Tuple

HERE = Path(__file__).resolve().parent


def _csrc() -> Path:
    """csrc/ of the source checkout or of the installed package (fastgpt.cuda_ext knows where)."""
    from fastgpt import cuda_ext

    return cuda_ext.source_dir()
KERNEL_SOURCES = ("layer_norm.cu", "gelu.cu")
CXXFLAGS = (
    "-std=c++20",
    "-O2",
    "-fPIC",
    "-fvisibility=hidden",
    "-fno-strict-aliasing",  # the kernels move packs through uint4, as CUDA code does
    "-Wall",
    "-Wno-unknown-pragmas",
    # the torch extension build compiles the kernels with these: keep the emulator as strict
    "-D__CUDA_NO_HALF_OPERATORS__",
    "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-D__CUDA_NO_HALF2_OPERATORS__",
)

Mutation = Tuple[str, str, str]  # (file in csrc/, text that must occur exactly once, replacement)


class EmulatorError(RuntimeError):
    """A kernel misbehaved under the emulator (deadlock, bad shuffle mask, bad launch) or returned an error."""


def cache_dir() -> Path:
    return Path(os.environ.get("FASTGPT_CACHE_DIR") or Path.home() / ".cache" / "fastgpt")


def cuda_include_dir() -> Optional[Path]:
    """A directory with cuda_fp16.h / cuda_bf16.h / cuda_runtime_api.h: the CUDA toolkit, else pip's nvidia wheels."""
    candidates = []
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append(Path(os.environ[var]) / "include")
    candidates.append(Path("/usr/local/cuda/include"))
    for site in map(Path, sys.path):
        nvidia = site / "nvidia"
        if nvidia.is_dir():
            candidates.extend(sorted(nvidia.glob("*/include")))
    for c in candidates:
        if (c / "cuda_fp16.h").exists() and (c / "cuda_bf16.h").exists() and (c / "cuda_runtime_api.h").exists():
            return c
    return None


def unavailable_reason() -> Optional[str]:
    """Why the emulator cannot be built here, or None."""
    if sys.platform != "linux":
        return f"the CUDA emulator needs Linux (got {sys.platform})"
    if shutil.which(os.environ.get("CXX", "g++")) is None:
        return "g++ not found (the CUDA emulator compiles the kernels with the host C++ compiler)"
    if _ninja() is None:
        return "ninja not found (pip install ninja)"
    if cuda_include_dir() is None:
        return "CUDA headers not found (set CUDA_HOME, or install the CUDA toolkit or the nvidia-cuda-runtime wheel)"
    return None


def _ninja() -> Optional[str]:
    path = shutil.which("ninja")
    if path is None:
        try:
            import ninja  # type: ignore[import-not-found]

            path = str(Path(ninja.BIN_DIR) / "ninja")
        except ImportError:
            return None
    return path


def _mutated_sources(mutations: Sequence[Mutation], into: Path) -> Path:
    """A copy of csrc/ with each mutation applied (each `old` text must occur exactly once)."""
    src = into / "csrc"
    shutil.copytree(_csrc(), src)
    for name, old, new in mutations:
        path = src / name
        text = path.read_text()
        count = text.count(old)
        if count != 1:
            raise ValueError(f"mutation of {name}: {old!r} occurs {count} times; expected exactly once")
        path.write_text(text.replace(old, new))
    return src


def _fingerprint(source_dir: Path, flags: Sequence[str], cxx: str, include: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(source_dir.iterdir()) + sorted(HERE.glob("*.[ch]*")):
        if path.suffix in (".cu", ".cuh", ".h", ".cpp"):
            h.update(path.name.encode())
            h.update(path.read_bytes())
    h.update("\0".join([*flags, cxx, str(include)]).encode())
    return h.hexdigest()[:16]


def build(mutations: Sequence[Mutation] = (), verbose: bool = False) -> Path:
    """Compile the emulator (cached by a hash of every source and flag); returns the library's path."""
    reason = unavailable_reason()
    if reason:
        raise EmulatorError(reason)
    cxx = os.environ.get("CXX", "g++")
    include = cuda_include_dir()
    with tempfile.TemporaryDirectory(prefix="fastgpt-emu-src-") as tmp:
        source_dir = _mutated_sources(mutations, Path(tmp)) if mutations else _csrc()
        flags = list(CXXFLAGS) + [f"-I{include}", f"-I{HERE}", f"-I{source_dir}"]
        key = _fingerprint(source_dir, CXXFLAGS, cxx, include)
        out_dir = cache_dir() / "cuda_emu" / key
        lib = out_dir / "libfastgpt_cuda_emu.so"
        if lib.exists():
            return lib
        # build in a private directory, then move it into place: concurrent builders never see half a library
        work = Path(tempfile.mkdtemp(prefix=f"{key}.", dir=_mkdir(out_dir.parent)))
        if mutations:
            shutil.copytree(source_dir, work / "csrc")
            source_dir = work / "csrc"
            flags[-1] = f"-I{source_dir}"
        objects = []
        lines = [
            f"cxx = {cxx}",
            f"flags = {' '.join(flags)}",
            "rule cxx",
            "  command = $cxx $flags $extra -c $in -o $out",
            "  description = CXX $out",
            "rule link",
            "  command = $cxx -shared $in -o $out -Wl,-Bsymbolic -Wl,--no-undefined -lpthread",
            "  description = LINK $out",
            f"build emu_runtime.o: cxx {HERE / 'emu_runtime.cpp'}",
        ]
        objects.append("emu_runtime.o")
        for name in KERNEL_SOURCES:
            obj = name.replace(".cu", ".o")
            lines += [f"build {obj}: cxx {source_dir / name}", f"  extra = -x c++ -include {HERE / 'cuda_shim.h'}"]
            objects.append(obj)
        lines.append(f"build {lib.name}: link {' '.join(objects)}")
        (work / "build.ninja").write_text("\n".join(lines) + "\n")
        proc = subprocess.run([_ninja(), "-C", str(work)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise EmulatorError(f"building the CUDA emulator failed:\n{proc.stdout}\n{proc.stderr}")
        if verbose:
            print(proc.stdout)
        try:
            os.replace(work, out_dir)
        except OSError:  # another process finished first
            shutil.rmtree(work, ignore_errors=True)
        if not lib.exists():
            raise EmulatorError(f"building the CUDA emulator left no {lib} (a stale {out_dir}? remove it)")
        return lib


def _mkdir(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p
