"""Build and load the CUDA extension from ``csrc/`` (the ``cuda`` backend of layer norm and GELU).

:func:`load` returns ``torch.ops.fastgpt_cuda``, whose ops have the signatures and output
conventions of fastgpt's custom ops (see ``fastgpt/ops/layer_norm.py`` and ``gelu.py``)::

    layer_norm_fwd(x, weight?, bias?, eps) -> (y, mean, rstd)
    layer_norm_bwd(dy, x, weight?, mean, rstd, need_weight_grad, need_bias_grad) -> (dx, dweight, dbias)
    add_layer_norm_fwd(x, residual, weight?, bias?, eps) -> (y, s, mean, rstd)
    add_layer_norm_bwd(dy, dsum?, s, weight?, mean, rstd, need_weight_grad, need_bias_grad) -> (dx, dweight, dbias)
    gelu_fwd(x, approximate) -> y ;  gelu_bwd(dy, x, approximate) -> dx
    bias_gelu_fwd(x, bias, approximate) -> y ;  bias_gelu_bwd(dy, x, bias, approximate) -> (dx, dbias)

Where the library comes from, in order:

1. an ahead-of-time build made by ``FASTGPT_BUILD_CUDA=1 pip install --no-build-isolation -e .``
   (``fastgpt/_cuda_<key>*.so``, where the key hashes the sources, torch's version and its CUDA
   version, so a stale build is never loaded);
2. a just-in-time build with ``torch.utils.cpp_extension`` and ninja into
   ``$FASTGPT_CACHE_DIR/cuda_ext/<key>`` (default ``~/.cache/fastgpt``; the key also covers the
   architecture list), compiled on first use with a message, reused afterwards.

Architectures: ``TORCH_CUDA_ARCH_LIST`` if set, else sm_80 and sm_90 plus any visible GPU that
neither runs. Importing this module compiles nothing and imports no build tooling; :func:`status`
never compiles either. It needs nvcc for the just-in-time build (``CUDA_HOME``, ``nvcc`` on PATH,
or ``/usr/local/cuda``) but no GPU: the extension builds and loads on a CPU-only machine (its ops
then reject every tensor, all being CPU tensors).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Optional, Tuple

import torch

__all__ = ["NAMESPACE", "OPS", "status", "load", "library_path", "source_dir", "cuda_home", "arch_list", "aot_module_name", "jit_build_dir"]

NAMESPACE = "fastgpt_cuda"
SOURCES = ("bindings.cpp", "layer_norm.cu", "gelu.cu")
HEADERS = ("common.cuh", "fastgpt_cuda.h")
DEFAULT_ARCHS = ("8.0", "9.0")
# Host code: -O2 is enough (the host side is launch logic); device code: -O3 (ptxas' default).
# -fvisibility=hidden keeps the kernels' C entry points private to the library.
CXX_FLAGS = ("-O2",)
NVCC_FLAGS = ("-O3", "-Xcompiler", "-fvisibility=hidden", "-lineinfo")

_lock = threading.Lock()
_ops = None
_error: Optional[str] = None
_origin: Optional[str] = None


# --------------------------------------------------------------------------------------------
# where things are
# --------------------------------------------------------------------------------------------


def source_dir() -> Path:
    """csrc/: the source checkout's (editable install) if present, else the installed data package."""
    checkout = Path(__file__).resolve().parent.parent / "csrc"
    if (checkout / SOURCES[0]).exists():
        return checkout
    spec = importlib.util.find_spec("fastgpt.csrc")
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            if (Path(location) / SOURCES[0]).exists():
                return Path(location)
    raise FileNotFoundError("fastgpt's CUDA sources (csrc/, installed as fastgpt.csrc) were not found")


def cache_dir() -> Path:
    return Path(os.environ.get("FASTGPT_CACHE_DIR") or Path.home() / ".cache" / "fastgpt")


def cuda_home() -> Optional[Path]:
    """The CUDA toolkit: CUDA_HOME, CUDA_PATH, the toolkit of the nvcc on PATH, or /usr/local/cuda.

    A candidate must hold nvcc *and* the runtime headers: an nvcc wrapper script in /usr/local/bin
    would otherwise make /usr/local the toolkit, where linking fails on -lcudart. The path is
    resolved, so /usr/local/cuda and the versioned folder it points to give the same build key.
    """
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(nvcc).resolve().parent.parent))
    candidates.append("/usr/local/cuda")
    for c in candidates:
        if c and (Path(c) / "bin" / "nvcc").exists() and (Path(c) / "include" / "cuda_runtime.h").exists():
            return Path(c).resolve()
    return None


_has_device: Optional[bool] = None


def _cuda_device() -> bool:
    """torch.cuda.is_available(), asked once: status() runs on every dispatch of a CUDA tensor."""
    global _has_device
    if _has_device is None:
        _has_device = torch.cuda.is_available()
    return _has_device


def _ninja_available() -> bool:
    if shutil.which("ninja"):
        return True
    return importlib.util.find_spec("ninja") is not None


# --------------------------------------------------------------------------------------------
# build keys
# --------------------------------------------------------------------------------------------

_source_hash: Optional[str] = None


def _sources_digest() -> str:
    global _source_hash
    if _source_hash is None:
        h = hashlib.sha256()
        d = source_dir()
        for name in SOURCES + HEADERS:
            h.update(name.encode())
            h.update((d / name).read_bytes())
        _source_hash = h.hexdigest()
    return _source_hash


def _key(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def aot_module_name() -> str:
    """Module name of the ahead-of-time build: fastgpt._cuda_<hash of sources, torch and its CUDA version>."""
    return "fastgpt._cuda_" + _key(_sources_digest(), torch.__version__, str(torch.version.cuda))


def arch_list() -> str:
    """TORCH_CUDA_ARCH_LIST, else "8.0;9.0" plus the visible GPUs that neither sm_80 nor sm_90 code runs on."""
    env = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    if env:
        return env
    archs = list(DEFAULT_ARCHS)
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            major, minor = torch.cuda.get_device_capability(i)
            # sm_80 code runs on any 8.x device; sm_90 code only on 9.0
            if major != 8 and f"{major}.{minor}" not in archs:
                archs.append(f"{major}.{minor}")
    return ";".join(archs)


def jit_build_dir() -> Path:
    """Where the just-in-time build of this source tree, torch, CUDA and arch list is cached."""
    home = cuda_home()
    return cache_dir() / "cuda_ext" / _key(_sources_digest(), torch.__version__, str(torch.version.cuda), arch_list(), str(home))


def _jit_name() -> str:
    return f"{NAMESPACE}_{jit_build_dir().name}"


def _aot_library() -> Optional[Path]:
    name = aot_module_name().rsplit(".", 1)[1]
    for path in sorted(Path(__file__).resolve().parent.glob(f"{name}*.so")):
        return path
    return None


def _jit_library() -> Optional[Path]:
    path = jit_build_dir() / f"{_jit_name()}.so"
    return path if path.exists() else None


def library_path() -> Optional[Path]:
    """The built library that :func:`load` would load (ahead-of-time build first, else the cached
    just-in-time build of these sources), or None when neither exists. Never compiles. The static
    kernel report (``fastgpt inspect``) reads the kernels' machine code from it."""
    return _aot_library() or _jit_library()


# --------------------------------------------------------------------------------------------
# status and load
# --------------------------------------------------------------------------------------------


def status() -> Tuple[bool, str]:
    """(available, reason) for the cuda backend on this machine; never compiles anything.

    Available means: a CUDA device is present and the extension is loaded, built (ahead of time or
    cached), or buildable (nvcc and ninja found).
    """
    if not _cuda_device():
        return False, "no CUDA device (torch.cuda.is_available() is False)"
    if _ops is not None:
        return True, f"loaded ({_origin})"
    if _error is not None:
        return False, f"the CUDA extension failed to build or load: {_error}"
    if getattr(torch.version, "hip", None):
        return False, "this torch is a ROCm build: the kernels in csrc/ are CUDA only"
    if torch.version.cuda is None:
        return False, "this torch was built without CUDA"
    try:
        if _aot_library() is not None:
            return True, "ahead-of-time build present (loaded on first use)"
        if _jit_library() is not None:
            return True, f"cached build in {jit_build_dir()} (loaded on first use)"
    except FileNotFoundError as e:
        return False, str(e)
    home = cuda_home()
    if home is None:
        return False, (
            "nvcc not found: set CUDA_HOME to a CUDA toolkit to compile the extension on first use, or build it ahead of "
            "time with FASTGPT_BUILD_CUDA=1 pip install --no-build-isolation -e ."
        )
    if not _ninja_available():
        return False, "ninja not found (pip install ninja): needed to compile the CUDA extension"
    return True, f"will be compiled on first use with {home / 'bin' / 'nvcc'} (cached in {cache_dir() / 'cuda_ext'})"


def _required_ops() -> Tuple[str, ...]:
    """The ops the extension must register: every op's ``cuda_ops`` in fastgpt.registry."""
    from fastgpt import registry

    return registry.cuda_op_names()


def __getattr__(name: str):
    # OPS is derived from the registry on use: setup.py loads this file on its own, without fastgpt
    if name == "OPS":
        return _required_ops()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _check_ops(origin: str):
    ops = getattr(torch.ops, NAMESPACE)
    missing = [name for name in _required_ops() if not hasattr(ops, name)]
    if missing:
        raise RuntimeError(f"{origin} does not register {', '.join(NAMESPACE + '::' + m for m in missing)}")
    return ops


def _jit_build() -> Path:
    from torch.utils import cpp_extension  # heavy import: only when building

    home = cuda_home()
    if home is None:
        raise RuntimeError("nvcc not found: set CUDA_HOME to a CUDA toolkit (or build ahead of time with FASTGPT_BUILD_CUDA=1)")
    build_dir = jit_build_dir()
    build_dir.mkdir(parents=True, exist_ok=True)
    archs = arch_list()
    fresh = _jit_library() is None
    if fresh:
        print(
            f"fastgpt: compiling the CUDA extension (csrc/, for TORCH_CUDA_ARCH_LIST={archs}); this happens once and is "
            f"cached in {build_dir}",
            file=sys.stderr,
            flush=True,
        )
    saved = {k: os.environ.get(k) for k in ("TORCH_CUDA_ARCH_LIST", "CUDA_HOME")}
    os.environ["TORCH_CUDA_ARCH_LIST"] = archs  # torch reads it at build time (and needs it without a GPU)
    os.environ["CUDA_HOME"] = str(home)
    start = time.perf_counter()
    # torch computed its own CUDA_HOME when cpp_extension was first imported, from the nvcc on PATH:
    # a wrapper script in /usr/local/bin makes that /usr/local, without the CUDA headers. Build with
    # the toolkit found above, whatever torch guessed.
    saved_home = cpp_extension.CUDA_HOME
    cpp_extension.CUDA_HOME = str(home)
    try:
        src = source_dir()
        cpp_extension.load(
            name=_jit_name(),
            sources=[str(src / s) for s in SOURCES],
            extra_cflags=list(CXX_FLAGS),
            extra_cuda_cflags=list(NVCC_FLAGS),
            extra_include_paths=[str(src)],
            build_directory=str(build_dir),
            is_python_module=False,
            verbose=False,
        )
    finally:
        cpp_extension.CUDA_HOME = saved_home
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    if fresh:
        print(f"fastgpt: CUDA extension built in {time.perf_counter() - start:.0f}s", file=sys.stderr, flush=True)
    return build_dir / f"{_jit_name()}.so"


def load():
    """The extension's ops (``torch.ops.fastgpt_cuda``): the ahead-of-time build, else built just in time.

    Compiles on first use (once; then cached). Raises RuntimeError if it cannot be built or loaded,
    after which :func:`status` reports the cuda backend unavailable with that reason.
    """
    global _ops, _error, _origin
    if _ops is not None:
        return _ops
    with _lock:
        if _ops is not None:
            return _ops
        if _error is not None:
            raise RuntimeError(f"the fastgpt CUDA extension is unavailable: {_error}")
        try:
            lib = _aot_library()
            if lib is not None:
                torch.ops.load_library(str(lib))
                origin = f"ahead-of-time build {lib}"
            else:
                lib = _jit_build()  # cpp_extension.load has loaded it
                origin = f"just-in-time build {lib}"
            ops = _check_ops(origin)
        except Exception as e:  # noqa: BLE001 - any failure makes the backend unavailable, with the reason
            _error = f"{type(e).__name__}: {e}".strip()
            if len(_error) > 2000:
                _error = _error[:2000] + " ..."
            raise RuntimeError(f"the fastgpt CUDA extension is unavailable: {_error}") from e
        _origin = origin
        _ops = ops
        return _ops
