"""Build and load the CUDA extension from ``csrc/`` (the ``cuda`` backend).

Placeholder until the CUDA kernels land (issue 7): :func:`status` reports the backend as unavailable
with the reason, so dispatch falls back to the reference and ``fastgpt.explain()`` says why.
"""

from typing import Tuple

import torch


def status() -> Tuple[bool, str]:
    """(available, reason) for the cuda backend, without compiling anything."""
    if not torch.cuda.is_available():
        return False, "no CUDA device (torch.cuda.is_available() is False)"
    return False, "the CUDA extension is not part of this build yet"


def load():
    """Build (if needed) and load the extension; returns the op namespace."""
    raise RuntimeError("the CUDA extension is not part of this build yet")
