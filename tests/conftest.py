"""Test-suite setup.

On a machine without a CUDA device the Triton interpreter is switched on *before* anything imports
triton, so tests that force the ``triton`` backend execute the real kernel code on CPU tensors.
Tests marked ``gpu`` are skipped, with the reason, when no CUDA device is present; with one, a
FallbackWarning in them is an error (unless also marked ``fallback_ok``).
"""

import os
import random
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
        # a GPU test that silently ran the reference would pass as a kernel test: a fallback is an
        # error there (tests that expect one catch it with pytest.warns, or are marked fallback_ok)
        # (the notice that CPU tensors run the reference ops stays ignored, as in pyproject.toml)
        strict = pytest.mark.filterwarnings("error::fastgpt.backends.FallbackWarning",
                                            "ignore:fastgpt. cpu tensors:fastgpt.backends.FallbackWarning")
        for item in items:
            if "gpu" in item.keywords and "fallback_ok" not in item.keywords:
                item.add_marker(strict)
        return
    skip = pytest.mark.skip(reason="no CUDA device (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _fresh_backend_state(monkeypatch):
    """Each test starts with auto dispatch, strict off, no fallback already reported, and torch's and
    Python's global random generators seeded (a test's unseeded draws are the same in any order)."""
    random.seed(0)
    torch.manual_seed(0)
    reset_backend_state(monkeypatch)
    yield
    backends.reset_warnings()
    backends.reset_last_choices()


@pytest.fixture
def device():
    return torch.device("cuda" if HAS_CUDA else "cpu")
