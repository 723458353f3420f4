"""The CUDA extension compiles and links here (nvcc, no GPU needed), registers every op, and its ops
reject bad input with clear errors before any CUDA call.

The build is the just-in-time one of ``fastgpt.cuda_ext.load()`` (cached under
``$FASTGPT_CACHE_DIR``; CI uses a fresh cache, so this is a cold build for sm_80 and sm_90).
Skipped, with the reason, where nvcc or ninja is missing.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch

from fastgpt import cuda_ext


def _build_unavailable() -> str | None:
    if torch.version.cuda is None:
        return "this torch was built without CUDA"
    if cuda_ext.cuda_home() is None:
        return "nvcc not found (set CUDA_HOME to a CUDA toolkit)"
    if not cuda_ext._ninja_available():
        return "ninja not found (pip install ninja)"
    return None


@pytest.fixture(scope="module")
def ops():
    reason = _build_unavailable()
    if reason:
        pytest.skip(reason)
    # build as a user who never exported CUDA_HOME would (torch's own guess may then be wrong)
    saved = os.environ.pop("CUDA_HOME", None)
    try:
        return cuda_ext.load()
    finally:
        if saved is not None:
            os.environ["CUDA_HOME"] = saved


def test_an_nvcc_wrapper_script_is_not_taken_for_the_toolkit(tmp_path, monkeypatch):
    """/usr/local/bin/nvcc-style wrappers: the toolkit is the folder that also has the CUDA headers."""
    wrapper = tmp_path / "bin" / "nvcc"
    wrapper.parent.mkdir()
    wrapper.write_text("#!/bin/sh\nexit 1\n")
    wrapper.chmod(0o755)
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv("PATH", f"{wrapper.parent}{os.pathsep}{os.environ['PATH']}")
    home = cuda_ext.cuda_home()
    assert home != tmp_path and home != tmp_path.resolve()
    if home is not None:
        assert (home / "include" / "cuda_runtime.h").exists() and (home / "bin" / "nvcc").exists()


def test_status_never_compiles(monkeypatch):
    from torch.utils import cpp_extension

    def refuse(*args, **kwargs):
        raise AssertionError("status() must not compile")

    monkeypatch.setattr(cpp_extension, "load", refuse)
    ok, reason = cuda_ext.status()
    assert isinstance(ok, bool) and reason
    if not torch.cuda.is_available():
        assert not ok and "no CUDA device" in reason


def test_extension_builds_and_registers_every_op(ops):
    for name in cuda_ext.OPS:
        assert hasattr(ops, name), name
    schema = str(torch.ops.fastgpt_cuda.layer_norm_bwd.default._schema)
    assert "Tensor? weight" in schema and "bool need_weight_grad" in schema
    if torch.cuda.is_available():
        assert cuda_ext.status()[0]


def test_cached_build_is_reused_without_compiling(ops):
    """A new process finds the cached library: no compiler runs, no 'compiling' message."""
    code = "import fastgpt.cuda_ext as c, time; t = time.time(); c.load(); print(time.time() - t)"
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=os.environ.copy(), timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "compiling" not in proc.stderr
    assert float(proc.stdout.strip().splitlines()[-1]) < 30, f"loading the cached build took {proc.stdout}"
    assert time.perf_counter() - start < 120


def test_source_dir_and_arch_list():
    src = cuda_ext.source_dir()
    assert (src / "bindings.cpp").exists() and (src / "layer_norm.cu").exists()
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        assert cuda_ext.arch_list() == "8.0;9.0"
    assert cuda_ext.aot_module_name().startswith("fastgpt._cuda_")


# ---- bad input on the ops called directly ------------------------------------------------------------
#
# Structural checks (dtype, shape, contiguity) come before the device check, so these run on a
# CPU-only machine too: the last case of each op is "everything right but the device".

X = torch.randn(4, 8)
W = torch.randn(8)
STATS = torch.zeros(4)


def _cases():
    return [
        ("layer_norm_fwd", (X.long(), None, None, 1e-5), TypeError, "x must be float32, float16 or bfloat16; got Long"),
        ("layer_norm_fwd", (X, torch.randn(7), None, 1e-5), ValueError, r"weight must have shape \(8,\); got \[7\]"),
        ("layer_norm_fwd", (X, None, W.double(), 1e-5), TypeError, "bias must be float32, float16 or bfloat16; got Double"),
        ("layer_norm_fwd", (X.half(), W.bfloat16(), None, 1e-5), TypeError, "weight has dtype BFloat16; expected Half or float32"),
        ("layer_norm_fwd", (X.t(), None, None, 1e-5), ValueError, "x must be contiguous"),
        ("layer_norm_fwd", (torch.randn(2, 4, 8), None, None, 1e-5), ValueError, "x must be 2-D"),
        ("layer_norm_fwd", (X, W, W, 1e-5), ValueError, "x must be a CUDA tensor; got a tensor on cpu"),
        ("layer_norm_bwd", (X, X, W, STATS.double(), STATS, True, True), TypeError, "mean must be float32; got Double"),
        ("layer_norm_bwd", (torch.randn(4, 9), X, W, STATS, STATS, True, True), ValueError, r"dy must have x's shape \[4, 8\]"),
        ("layer_norm_bwd", (X, X, W, STATS, STATS, True, True), ValueError, "x must be a CUDA tensor"),
        ("add_layer_norm_fwd", (X, X.half(), W, W, 1e-5), TypeError, "residual has dtype Half but x has Float"),
        ("add_layer_norm_fwd", (X, X, W, W, 1e-5), ValueError, "x must be a CUDA tensor"),
        ("add_layer_norm_bwd", (X, torch.randn(4, 4), X, W, STATS, STATS, True, True), ValueError, "dsum must have s's shape"),
        ("add_layer_norm_bwd", (X, None, X, W, STATS, STATS, True, False), ValueError, "s must be a CUDA tensor"),
        ("gelu_fwd", (X.int(), "none"), TypeError, "x must be float32, float16 or bfloat16; got Int"),
        ("gelu_fwd", (X, "exact"), ValueError, "approximate must be 'none' or 'tanh'; got 'exact'"),
        ("gelu_fwd", (X, "tanh"), ValueError, "x must be a CUDA tensor"),
        ("gelu_bwd", (X.half(), X, "none"), TypeError, "dy has dtype Half but x has Float"),
        ("bias_gelu_fwd", (X, torch.randn(4), "none"), ValueError, r"bias must have shape \(8,\); got \[4\]"),
        ("bias_gelu_fwd", (X.bfloat16(), W.half(), "none"), TypeError, "bias has dtype Half; expected BFloat16 or float32"),
        ("bias_gelu_bwd", (X, X, W, "tanh"), ValueError, "x must be a CUDA tensor"),
    ]


@pytest.mark.parametrize("op, args, exc, pattern", _cases(), ids=lambda v: v if isinstance(v, str) and "_" in v else None)
def test_ops_reject_bad_input(ops, op, args, exc, pattern):
    with pytest.raises(exc, match=pattern):
        getattr(ops, op)(*args)


@pytest.mark.gpu
def test_expanded_gradient_is_accepted_gpu(ops):
    """dy of y.sum() is an expanded (stride-0) tensor: the backward ops take it (made contiguous)."""
    x = torch.randn(4, 8, device="cuda")
    _, mean, rstd = ops.layer_norm_fwd(x, None, None, 1e-5)
    dy = torch.ones((), device="cuda").expand(4, 8)
    dx, _, _ = ops.layer_norm_bwd(dy, x, None, mean, rstd, False, False)
    assert dx.abs().max() < 1e-5  # the gradient of sum(layer_norm(x)) is zero
    assert torch.equal(ops.gelu_bwd(dy, x, "none"), ops.gelu_bwd(dy.contiguous(), x, "none"))


@pytest.mark.gpu
def test_ops_reject_device_mismatch(ops):
    x = torch.randn(4, 8, device="cuda")
    with pytest.raises(ValueError, match="weight is on cpu but x is on cuda"):
        ops.layer_norm_fwd(x, torch.randn(8), None, 1e-5)
