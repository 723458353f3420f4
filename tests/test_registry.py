"""The op registry (fastgpt.registry): one declaration per op, and every op list derived from it."""

import subprocess
import sys

import pytest
import torch

import fastgpt
from fastgpt import backends, cuda_ext, registry
from fastgpt.registry import OpSpec


def test_every_op_is_registered_once_in_registration_order():
    names = registry.names()
    assert len(set(names)) == len(names) > 0
    # dispatch, explain() and the public API all follow the registry
    assert tuple(backends.OP_BACKENDS) == names
    assert tuple(fastgpt.explain(as_dict=True, device="cpu")) == names
    exported = [fn.__name__ for spec in registry.all_ops() for fn in spec.functions]
    assert exported == list(fastgpt.ops.__all__)
    assert all(getattr(fastgpt, name) is getattr(fastgpt.ops, name) for name in exported)


def test_register_refuses_a_second_op_of_the_same_name():
    spec = registry.get("gelu")
    with pytest.raises(ValueError, match="already registered"):
        registry.register(spec)
    assert registry.names().count("gelu") == 1


def test_get_names_the_registered_ops_for_an_unknown_one():
    with pytest.raises(ValueError, match="unknown op 'softmax'; expected one of attention"):
        registry.get("softmax")


@pytest.mark.parametrize("spec", registry.all_ops(), ids=lambda s: s.name)
def test_each_declaration_is_complete_and_consistent(spec: OpSpec):
    assert spec.backends and set(spec.backends) <= {"cuda", "triton"}
    assert {f"fastgpt::{spec.name}_fwd", f"fastgpt::{spec.name}_bwd"} == {
        n for op in spec.custom_ops for n in (op.fwd_op._qualname, op.bwd_op._qualname)
    }
    assert ("cuda" in spec.backends) == bool(spec.cuda_ops)
    assert set(spec.cuda_ops) <= set(cuda_ext.OPS)
    assert len(spec.parity_dims) == 2 and all(len(d) == len(spec.dims) for d in spec.parity_dims)
    assert set(spec.dispatch_sizes) == {"tiny", "small", "realistic"}
    assert all(len(d) == len(spec.dims) for d in spec.dispatch_sizes.values())
    cases = spec.cases
    assert cases is not None and cases.peers and "torch-eager" in cases.peers
    for mode, dims, options in cases.smoke_shapes():
        d = dict(dims)
        assert tuple(d) == spec.dims and mode in ("fwd", "bwd", "fwd+bwd")
        kind, amount = cases.work(d, torch.float32, mode, causal=options.get("causal", False))
        assert kind in ("bytes", "flops") and amount > 0
    assert set(cases.work_model) >= ({"fwd", "bwd"} if spec.differentiable else {"fwd"})
    if not spec.differentiable:  # inference-only: the tools run its forward only
        assert all(mode == "fwd" for mode, _, _ in cases.smoke_shapes() + cases.gpu_shapes({}))


def test_the_library_never_imports_a_tool():
    code = (
        "import sys, fastgpt, fastgpt.model, fastgpt.nn, fastgpt.patching, fastgpt.cuda_ext, fastgpt.info; "
        "tools = sorted(m for m in sys.modules if m.startswith(('fastgpt.tools', 'fastgpt.app'))); print(tools); "
        "sys.exit(1 if tools else 0)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
