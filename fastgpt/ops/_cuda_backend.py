"""The cuda backend as the norm and GELU ops see it: which calls it takes, and where its ops live."""

from typing import Callable, Optional

import torch
from torch import Tensor

from fastgpt import backends


def ops():
    """The extension's op namespace (built just in time on first use; see fastgpt.cuda_ext)."""
    from fastgpt import cuda_ext

    return cuda_ext.load()


def constraint(x: Tensor) -> Callable[[str], Optional[str]]:
    """Why the cuda kernels cannot take x (for backends.select), or None."""

    def why_not(backend: str) -> Optional[str]:
        if backend == "cuda" and x.dtype == torch.float64:
            return "the cuda kernels take float16, bfloat16 and float32 (got float64)"
        return None

    return why_not


def choose(op: str, x: Tensor) -> str:
    """The backend for one call of a norm/GELU op on x; empty tensors need no kernel.

    Choosing ``cuda`` loads the extension (compiling it on first use); if that fails, the failure
    is reported like any other fallback (one warning, or an error in strict mode) and the
    reference serves the call.
    """
    if x.numel() == 0:
        return "reference"
    backend = backends.select(op, x.device, constraint(x))
    if backend == "cuda":
        try:
            ops()
        except RuntimeError as exc:
            backends.report_fallback(op, "cuda", str(exc))
            return "reference"
    return backend
