"""Backend dispatch: auto choice, forcing, strict mode, one-time warnings, explain()."""

import threading
import warnings

import pytest
import torch

import fastgpt
from fastgpt import backends
from fastgpt.backends import BackendUnavailableError, FallbackWarning

HAS_CUDA = torch.cuda.is_available()


def _x():
    return torch.randn(4, 8)


def _fallback_warnings(record):
    return [w for w in record if issubclass(w.category, FallbackWarning)]


@pytest.mark.skipif(HAS_CUDA, reason="checks the CPU-only machine's report")
def test_explain_reports_reference_for_every_op_with_the_reason(capsys):
    assert fastgpt.explain() is None
    printed = capsys.readouterr().out
    for op in backends.OP_BACKENDS:
        line = next(line for line in printed.splitlines() if line.strip().startswith(op + " "))
        assert "reference" in line and "no CUDA device" in line
    plan = fastgpt.explain(as_dict=True)
    assert set(plan) == set(backends.OP_BACKENDS)
    for op, row in plan.items():
        assert row["backend"] == "reference" and row["reason"]
        assert set(row["candidates"]) == set(backends.OP_BACKENDS[op])


def test_explain_follows_a_forced_backend():
    with fastgpt.use_backend("reference"):
        plan = fastgpt.explain(as_dict=True)
    assert all(row["backend"] == "reference" and "requested" in row["reason"] for row in plan.values())


def test_auto_on_cpu_uses_reference_and_says_so_once():
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        fastgpt.gelu(_x())
        fastgpt.layer_norm(_x(), (8,))
    found = _fallback_warnings(record)
    assert len(found) == 1 and "cpu tensors run the plain-torch reference" in str(found[0].message)
    assert backends.last_choice("gelu").backend == "reference"


def test_forced_backend_that_cannot_serve_warns_once_and_falls_back():
    x = _x()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        with fastgpt.use_backend("cuda"):
            y1 = fastgpt.gelu(x)
            y2 = fastgpt.gelu(x)
    found = _fallback_warnings(record)
    assert len(found) == 1, [str(w.message) for w in found]
    assert "cuda backend unavailable" in str(found[0].message)
    torch.testing.assert_close(y1, torch.nn.functional.gelu(x))
    torch.testing.assert_close(y2, y1)


def test_op_without_the_forced_backend_is_named():
    with pytest.raises(BackendUnavailableError, match="layer_norm has no triton backend"):
        with fastgpt.use_backend("triton", strict=True):
            fastgpt.layer_norm(_x(), (8,))
    with pytest.raises(BackendUnavailableError, match="attention has no cuda backend"):
        with fastgpt.use_backend("cuda", strict=True):
            q = torch.randn(1, 1, 4, 16)
            fastgpt.attention(q, q, q)


def test_triton_on_cpu_without_the_interpreter_is_a_fallback(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q = torch.randn(1, 2, 5, 16)
    with pytest.raises(BackendUnavailableError, match="TRITON_INTERPRET=1"):
        with fastgpt.use_backend("triton", strict=True):
            fastgpt.attention(q, q, q)
    with pytest.warns(FallbackWarning, match="triton backend unavailable"):
        with fastgpt.use_backend("triton"):
            out = fastgpt.attention(q, q, q)
    with fastgpt.use_backend("reference"):
        torch.testing.assert_close(out, fastgpt.attention(q, q, q))


@pytest.mark.skipif(HAS_CUDA, reason="on a GPU machine auto serves CUDA tensors without falling back")
def test_strict_env_makes_the_cpu_fallback_an_error(monkeypatch):
    monkeypatch.setenv("FASTGPT_STRICT", "1")
    with pytest.raises(BackendUnavailableError, match="strict mode"):
        fastgpt.gelu(_x())
    # an explicit request for the reference is not a fallback, even in strict mode
    with fastgpt.use_backend("reference"):
        fastgpt.gelu(_x())


def test_env_backend_is_honoured_and_validated(monkeypatch):
    monkeypatch.setenv("FASTGPT_BACKEND", "reference")
    assert backends.requested_backend() == "reference"
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        fastgpt.gelu(_x())
    assert not _fallback_warnings(record)
    assert backends.last_choice("gelu").reason == "requested"
    monkeypatch.setenv("FASTGPT_BACKEND", "gpu")
    with pytest.raises(ValueError, match="FASTGPT_BACKEND must be one of"):
        fastgpt.gelu(_x())


def test_use_backend_nests_validates_and_restores():
    assert backends.requested_backend() == "auto" and not backends.strict_mode()
    with fastgpt.use_backend("triton", strict=True):
        with fastgpt.use_backend("reference"):
            assert backends.requested_backend() == "reference"
            assert backends.strict_mode(), "strictness of an enclosing block is kept"
        assert backends.requested_backend() == "triton"
    assert backends.requested_backend() == "auto" and not backends.strict_mode()
    with pytest.raises(ValueError, match="name must be one of"):
        with fastgpt.use_backend("fast"):
            pass


def test_backend_choice_is_seen_by_other_threads():
    """Autograd runs CUDA backward on its own thread: the forced backend must be visible there."""
    seen = []
    with fastgpt.use_backend("reference", strict=True):
        th = threading.Thread(target=lambda: seen.append((backends.requested_backend(), backends.strict_mode())))
        th.start()
        th.join()
    assert seen == [("reference", True)]


def test_backward_uses_the_same_backend_as_forward():
    x = torch.randn(4, 8, requires_grad=True)
    with fastgpt.use_backend("reference"):
        y = fastgpt.layer_norm(x, (8,))
        y.sum().backward()
    assert backends.last_choice("layer_norm") == backends.Choice("layer_norm", "reference", "requested")


def test_empty_tensors_need_no_backend():
    with fastgpt.use_backend("cuda", strict=True):
        assert fastgpt.gelu(torch.empty(0, 8)).shape == (0, 8)
        q = torch.empty(2, 1, 0, 16)
        assert fastgpt.attention(q, q, q).shape == (2, 1, 0, 16)


def test_a_cuda_build_failure_is_a_reported_fallback(monkeypatch):
    """If the extension cannot be built or loaded, the call falls back with a warning (strict: raises)."""
    from fastgpt import cuda_ext
    from fastgpt.ops import _cuda_backend

    def broken():
        raise RuntimeError("the fastgpt CUDA extension is unavailable: planted build failure")

    monkeypatch.setattr(backends, "select", lambda op, device, constraint=None: "cuda")
    monkeypatch.setattr(cuda_ext, "load", broken)
    x = _x()
    with pytest.warns(FallbackWarning, match="planted build failure"):
        assert _cuda_backend.choose("gelu", x) == "reference"
    monkeypatch.setenv("FASTGPT_STRICT", "1")
    with pytest.raises(BackendUnavailableError, match="planted build failure"):
        _cuda_backend.choose("gelu", x)
