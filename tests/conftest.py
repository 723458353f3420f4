"""Test-suite setup.

On a machine without a CUDA device the Triton interpreter is switched on *before* anything imports
triton, so tests that force the ``triton`` backend execute the real kernel code on CPU tensors.
Tests marked ``gpu`` are skipped, with the reason, when no CUDA device is present.
"""

import os
import sys

import torch

if not torch.cuda.is_available():
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("triton was imported before tests/conftest.py could set TRITON_INTERPRET=1")
    os.environ.setdefault("TRITON_INTERPRET", "1")
    from fastgpt.kernels._triton_utils import interpreter_problem  # noqa: E402 (imports no triton)

    if interpreter_problem():
        raise RuntimeError(interpreter_problem())

import pytest  # noqa: E402

from fastgpt import backends  # noqa: E402
from fastgpt.testing import reset_backend_state  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    # the CPU suite runs small shapes: one thread is faster than two that spin-wait on each other on
    # a loaded 2-core machine (a 10x32 layer norm: 6 us vs 15 ms), and it makes float sums repeatable
    torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="no CUDA device (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _fresh_backend_state(monkeypatch):
    """Each test starts with auto dispatch, strict off, and no fallback already reported."""
    reset_backend_state(monkeypatch)
    yield
    backends.reset_warnings()


@pytest.fixture
def device():
    return torch.device("cuda" if HAS_CUDA else "cpu")
