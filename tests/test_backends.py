"""Backend dispatch: auto choice, forcing, strict mode, one-time warnings, explain()."""

import sys
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


def _state():
    return backends.requested_backend(), backends.strict_mode()


def test_use_backend_blocks_are_per_thread():
    """Issue 17: A in use_backend("triton"), B in use_backend("reference", strict=True); A exits first."""
    a_in, a_out, b_in = threading.Barrier(2), threading.Event(), threading.Event()
    seen = {}

    def thread_a():
        with fastgpt.use_backend("triton"):
            seen["a_inside"] = _state()
            a_in.wait()  # B has entered its block too
        a_out.set()
        b_in.wait()
        seen["a_after"] = _state()

    def thread_b():
        with fastgpt.use_backend("reference", strict=True):
            a_in.wait()
            a_out.wait()  # A has left its block
            seen["b_after_a_left"] = _state()
        b_in.set()

    threads = [threading.Thread(target=thread_a), threading.Thread(target=thread_b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert seen == {
        "a_inside": ("triton", False),
        "b_after_a_left": ("reference", True),
        "a_after": ("auto", False),
    }
    assert _state() == ("auto", False), "the main thread never saw either block"


def test_a_new_thread_starts_without_the_blocks_of_its_parent():
    seen = []
    with fastgpt.use_backend("reference", strict=True):
        th = threading.Thread(target=lambda: seen.append(_state()))
        th.start()
        th.join()
    assert seen == [("auto", False)]


def test_blocks_that_exit_out_of_order_restore_exactly_their_own_change():
    outer, inner = fastgpt.use_backend("reference", strict=True), fastgpt.use_backend("triton")
    outer.__enter__()
    inner.__enter__()
    assert _state() == ("triton", True), "strictness of the enclosing block is kept"
    outer.__exit__(None, None, None)
    assert _state() == ("triton", False), "the inner block is still open; the outer one's strictness is gone"
    inner.__exit__(None, None, None)
    assert _state() == ("auto", False)


def test_a_generator_exiting_its_block_late_does_not_undo_the_callers_block():
    def gen():
        with fastgpt.use_backend("triton", strict=True):
            yield _state()

    g = gen()
    assert next(g) == ("triton", True)
    with fastgpt.use_backend("reference"):
        g.close()  # the generator's block exits inside the caller's
        assert _state() == ("reference", False)
    assert _state() == ("auto", False)


def test_nested_strictness_is_kept_until_the_strict_block_exits():
    with fastgpt.use_backend("reference", strict=True):
        with fastgpt.use_backend("auto"):
            with pytest.raises(BackendUnavailableError):
                fastgpt.gelu(_x()) if not HAS_CUDA else backends.report_fallback("gelu", "GPU", "planted")
        assert _state() == ("reference", True)
    with fastgpt.use_backend("auto"):
        with fastgpt.use_backend("reference", strict=True):
            pass
        assert _state() == ("auto", False), "an inner strict block does not leak strictness outwards"
    with pytest.raises(TypeError, match="strict must be a bool"):
        with fastgpt.use_backend("auto", strict="no"):
            pass


def _run_on_another_thread(fn):
    """Run fn on a fresh thread (as autograd's worker thread runs a CUDA backward); re-raise its error."""
    errors = []

    def target():
        try:
            fn()
        except BaseException as exc:  # noqa: BLE001 - handed back to the test
            errors.append(exc)

    th = threading.Thread(target=target)
    th.start()
    th.join()
    if errors:
        raise errors[0]


def test_a_backward_on_another_thread_runs_under_the_forwards_use_backend(monkeypatch):
    """The eager ops capture the forward's blocks; the backward, run on a thread that has none, uses them."""
    from fastgpt.ops import _define

    monkeypatch.setattr(_define, "TORCH_SHORTCUT", False)  # the custom-op path, with fastgpt's backward
    seen = []
    real_select = backends.select

    def spy(op, device, constraint=None):
        seen.append((op, *_state()))
        return real_select(op, device, constraint)

    monkeypatch.setattr(backends, "select", spy)
    x = torch.randn(4, 8, requires_grad=True)
    with fastgpt.use_backend("reference", strict=True):
        y = fastgpt.layer_norm(x, (8,))
    seen.clear()
    _run_on_another_thread(lambda: y.sum().backward())
    assert seen == [("layer_norm", "reference", True)]
    assert x.grad is not None and _state() == ("auto", False)

def test_an_attention_backward_on_another_thread_runs_the_forwards_kernel(device, monkeypatch):
    """The Triton kernel (the interpreter on CPU) chosen in the forward also runs the backward that
    another thread executes, with no block of its own (autograd's worker thread, for CUDA tensors)."""
    pytest.importorskip("triton", reason="triton is not installed")
    from fastgpt.kernels import flash_attention as fa

    launched = []
    real_launch = fa.launch
    monkeypatch.setattr(fa, "launch", lambda plan: (launched.append(plan.name), real_launch(plan))[1])
    q = torch.randn(1, 2, 8, 16, device=device, requires_grad=True)
    with fastgpt.use_backend("triton", strict=True):
        out = fastgpt.attention(q, q, q, causal=True, return_lse=True)[0]
    launched.clear()
    _run_on_another_thread(lambda: out.sum().backward())
    assert {"bwd_preprocess", "bwd_dkdv", "bwd_dq"} <= set(launched), launched
    assert backends.last_choice("attention") == backends.Choice("attention", "triton", "requested")


def test_backward_uses_the_same_backend_as_forward():
    x = torch.randn(4, 8, requires_grad=True)
    with fastgpt.use_backend("reference"):
        y = fastgpt.layer_norm(x, (8,))
        y.sum().backward()
    assert backends.last_choice("layer_norm") == backends.Choice("layer_norm", "reference", "requested")


def _warned_at(call):
    """Run call() (which must be written on one line with its own line number returned) and return
    where its one FallbackWarning was attributed, and the line the call was made from."""
    backends.reset_warnings()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        line = call()
    found = _fallback_warnings(record)
    assert len(found) == 1, [str(w.message) for w in found]
    return (found[0].filename, found[0].lineno), (__file__, line)


def test_fallback_warnings_name_the_callers_line(monkeypatch):
    """Issue 17: every FallbackWarning named fastgpt/ops/_define.py; it must name this file and line."""
    from fastgpt.ops import _define

    x = torch.randn(4, 8)
    # torch-shortcut path (auto on cpu tensors: the cpu notice)
    got, want = _warned_at(lambda: (fastgpt.layer_norm(x, (8,)), sys._getframe().f_lineno)[1])
    assert got == want
    monkeypatch.setattr(_define, "TORCH_SHORTCUT", False)
    with fastgpt.use_backend("cuda"):  # a fallback that is not the cpu notice, from inside the op
        # eager path without autograd (the op's forward called directly)
        got, want = _warned_at(lambda: (fastgpt.layer_norm(x, (8,)), sys._getframe().f_lineno)[1])
        assert got == want
        # eager path through the autograd.Function (torch's frames sit between fastgpt's)
        xg = x.clone().requires_grad_()
        got, want = _warned_at(lambda: (fastgpt.layer_norm(xg, (8,)), sys._getframe().f_lineno)[1])
        assert got == want
        # the registered custom op (what torch.compile calls), called directly
        got, want = _warned_at(lambda: (torch.ops.fastgpt.layer_norm_fwd(x, None, None, 1e-5), sys._getframe().f_lineno)[1])
        assert got == want
        # attention's torch fallback (dense mask), from the public function
        q = torch.randn(1, 1, 4, 8)
        m = torch.ones(4, 4, dtype=torch.bool)
        got, want = _warned_at(lambda: (fastgpt.scaled_dot_product_attention(q, q, q, attn_mask=m), sys._getframe().f_lineno)[1])
        assert got == want


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
