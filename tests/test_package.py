"""Packaging and the CLI: what a new user touches first."""

import json
import subprocess
import sys

import pytest
import torch

import fastgpt


def run(*args, env=None):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300, env=env)


def test_import_compiles_and_loads_nothing_heavy():
    code = (
        "import sys, fastgpt\n"
        "heavy = [m for m in sys.modules if m.split('.')[0] in ('triton', 'transformers', 'matplotlib')"
        " or m in ('torch.utils.cpp_extension', 'fastgpt.kernels.flash_attention', 'fastgpt.model')]\n"
        "print(heavy)\n"
    )
    result = run("-c", code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_kernels_folder_is_installed_as_fastgpt_kernels():
    import fastgpt.kernels

    assert fastgpt.kernels.__file__.replace("\\", "/").endswith("kernels/__init__.py")
    assert "/fastgpt/kernels" not in fastgpt.kernels.__file__.replace("\\", "/"), "kernels/ lives at the top level"


def test_public_api_is_complete():
    for name in [
        "scaled_dot_product_attention",
        "flash_attn_func",
        "attention",
        "layer_norm",
        "add_layer_norm",
        "gelu",
        "bias_gelu",
        "rms_norm",
        "add_rms_norm",
        "swiglu",
        "apply_rotary_emb",
        "apply_rotary_emb_qk",
        "apply_rotary_pos_emb",
        "explain",
        "use_backend",
        "__version__",
    ]:
        assert hasattr(fastgpt, name), name
        if callable(getattr(fastgpt, name)):
            assert getattr(fastgpt, name).__doc__, f"{name} has no docstring"


def test_cli_info_prints_versions_devices_and_backends():
    result = run("-m", "fastgpt.cli", "info")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert f"fastgpt {fastgpt.__version__}" in out and f"torch {torch.__version__}" in out
    assert "nvcc:" in out and "CUDA_HOME:" in out
    for op in ("attention", "layer_norm", "add_layer_norm", "gelu", "bias_gelu"):
        assert op in out


def test_cli_info_json(tmp_path):
    path = tmp_path / "info.json"
    result = run("-m", "fastgpt.cli", "info", "--json", str(path))
    assert result.returncode == 0, result.stderr
    info = json.loads(path.read_text())
    assert info["fastgpt"] == fastgpt.__version__
    assert set(info["ops"]) == set(fastgpt.registry.names())  # every registered op
    assert info["cuda_available"] == torch.cuda.is_available()
    stdout_only = run("-m", "fastgpt.cli", "info", "--json", "-")
    assert json.loads(stdout_only.stdout)["torch"] == torch.__version__


def test_cli_without_command_prints_help():
    result = run("-m", "fastgpt.cli")
    assert result.returncode == 2 and "info" in result.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only machine's report")
def test_console_script_explain_one_liner():
    result = run("-c", "import fastgpt; fastgpt.explain()")
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith("  ")]
    assert len(lines) == len(fastgpt.registry.names()) and all("reference" in line and "no CUDA device" in line for line in lines)
