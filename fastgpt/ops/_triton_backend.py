"""The triton backend as the element-wise and row-wise ops see it (RMSNorm, rotary, SwiGLU): which
calls a kernel module in ``fastgpt.kernels`` takes, and loading it only when it serves a call."""

import functools
import importlib
import importlib.util
from typing import Callable, Optional

from torch import Tensor

from fastgpt import backends


@functools.lru_cache(maxsize=None)
def _present(module: str) -> bool:
    """Looked up once: find_spec costs tens of microseconds, and this runs on every GPU call."""
    return importlib.util.find_spec(f"fastgpt.kernels.{module}") is not None


def kernels(module: str):
    """``fastgpt.kernels.<module>`` (imports triton on first use)."""
    return importlib.import_module(f"fastgpt.kernels.{module}")


def constraint(module: str, x: Tensor) -> Callable[[str], Optional[str]]:
    """Why the kernels of ``module`` cannot take a call on x (for backends.select), or None."""

    def why_not(backend: str) -> Optional[str]:
        if backend != "triton":
            return None
        if not _present(module):
            return f"the triton {module} kernels are not part of this build"
        return kernels(module).unsupported_reason(x)

    return why_not


def choose(op: str, module: str, x: Tensor) -> str:
    """The backend for one call of ``op`` on x ("triton" or "reference"); empty tensors need no kernel."""
    if x.numel() == 0:
        return "reference"
    return backends.select(op, x.device, constraint(module, x))
