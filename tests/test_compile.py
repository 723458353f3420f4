"""torch.compile(fullgraph=True) traces every fastgpt op (custom ops with fake impls) and matches eager."""

import pytest
import torch

import fastgpt


def every_op(x, residual, w, b, q, k, v):
    y = fastgpt.layer_norm(x, (x.shape[-1],), w, b)
    y2, s = fastgpt.add_layer_norm(y, residual, w, b)
    z = fastgpt.gelu(y2, "tanh") + fastgpt.bias_gelu(s, b) + fastgpt.gelu(s)
    a = fastgpt.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    a2 = fastgpt.flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True, deterministic=False)
    a3, lse = fastgpt.attention(q, k, v, return_lse=True)
    return z.square().sum() + a.square().sum() + a2.square().sum() + a3.sum() + lse.sum()


@pytest.mark.slow
def test_compile_fullgraph_every_op_matches_eager():
    torch._dynamo.reset()

    def inputs():
        g = torch.Generator().manual_seed(0)
        shapes = [(3, 5, 32), (3, 5, 32), (32,), (32,), (2, 4, 9, 16), (2, 2, 13, 16), (2, 2, 13, 16)]
        return [torch.randn(*s, generator=g, requires_grad=True) for s in shapes]

    eager_in, compiled_in = inputs(), inputs()
    eager = every_op(*eager_in)
    eager.backward()
    compiled_fn = torch.compile(every_op, fullgraph=True, dynamic=False)
    out = compiled_fn(*compiled_in)
    out.backward()
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-4)
    for a, b in zip(compiled_in, eager_in):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-5)


def test_custom_ops_pass_torch_library_opcheck():
    """torch.library.opcheck: schema, fake impl, autograd registration agree with the real impl."""
    opcheck = getattr(torch.library, "opcheck", None)
    if opcheck is None:
        pytest.skip("torch.library.opcheck needs torch >= 2.4")
    g = torch.Generator().manual_seed(1)

    def r(*s):
        return torch.randn(*s, generator=g, requires_grad=True)

    q, k, v = r(1, 4, 5, 8), r(1, 2, 7, 8), r(1, 2, 7, 8)
    x, res, w, b = r(6, 16), r(6, 16), r(16), r(16)
    cases = [
        (torch.ops.fastgpt.attention_fwd.default, (q, k, v, True, 0.3, False)),
        (torch.ops.fastgpt.attention_fwd.default, (q, k, v, False, 0.3, True)),
        (torch.ops.fastgpt.attention_fwd.default, (q, k, v, True, 0.3, True, False)),  # deterministic=False
        # sliding window, softcap and ALiBi slopes (B, Hq)
        (torch.ops.fastgpt.attention_fwd.default, (q, k, v, False, 0.3, False, True, 2, 1, 5.0, torch.rand(1, 4, generator=g))),
        (torch.ops.fastgpt.layer_norm_fwd.default, (x, w, b, 1e-5)),
        (torch.ops.fastgpt.layer_norm_fwd.default, (x, None, None, 1e-5)),
        (torch.ops.fastgpt.add_layer_norm_fwd.default, (x, res, w, None, 1e-5)),
        (torch.ops.fastgpt.gelu_fwd.default, (x, "tanh")),
        (torch.ops.fastgpt.bias_gelu_fwd.default, (x, b, "none")),
    ]
    for op, args in cases:
        with fastgpt.use_backend("reference"):
            opcheck(op, args, test_utils=("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_static"))
