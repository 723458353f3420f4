"""torch.compile(fullgraph=True) traces the Llama-family ops (RMSNorm, rotary, SwiGLU) and matches eager;
torch.library.opcheck of their custom ops (schema, fake impl, autograd registration)."""

import pytest
import torch

import fastgpt
from fastgpt.ops.rotary import rope_tables

EPS = 1e-6


def llama_block(x, r, w, gu, q, k, cos, sin):
    y, s = fastgpt.add_rms_norm(x, r, w, EPS)
    y = fastgpt.rms_norm(y, y.shape[-1], w, EPS, weight_offset=1.0) + fastgpt.rms_norm(s, 24, w, EPS, cast_before_weight=True)
    gate, up = gu.chunk(2, dim=-1)
    m = fastgpt.swiglu(gate, up)
    oq, ok = fastgpt.apply_rotary_pos_emb(q, k, cos, sin)
    fq = fastgpt.apply_rotary_emb(q.transpose(1, 2), cos[0, :, :4], sin[0, :, :4], interleaved=True, seqlen_offsets=0)
    return (y * s).sum() + m.square().sum() + (oq * oq).sum() + ok.sum() + fq.square().sum()


@pytest.mark.slow
def test_compile_fullgraph_llama_ops_match_eager():
    torch._dynamo.reset()

    def inputs():
        g = torch.Generator().manual_seed(0)
        shapes = [(5, 24), (5, 24), (24,), (3, 5, 2 * 16), (2, 4, 6, 16), (2, 2, 6, 16)]
        return [torch.randn(*s, generator=g, requires_grad=True) for s in shapes] + list(rope_tables(6, 16, "cpu", torch.float32))

    eager_in, compiled_in = inputs(), inputs()
    eager = llama_block(*eager_in)
    eager.backward()
    out = torch.compile(llama_block, fullgraph=True, dynamic=False)(*compiled_in)
    out.backward()
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-4)
    for a, b in zip(compiled_in[:6], eager_in[:6]):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-5)


def test_custom_ops_pass_torch_library_opcheck():
    g = torch.Generator().manual_seed(1)

    def r(*s):
        return torch.randn(*s, generator=g, requires_grad=True)

    x, res, w = r(6, 16), r(6, 16), r(16)
    q, k = r(2, 5, 4, 8), r(2, 5, 2, 8)
    cos, sin = torch.rand(1, 5, 4), torch.rand(1, 5, 4)
    qkv = r(2, 5, 3, 4, 8)
    cases = [
        (torch.ops.fastgpt.rms_norm_fwd.default, (x, w, EPS, 0.0, True)),
        (torch.ops.fastgpt.rms_norm_fwd.default, (x, None, EPS, 0.0, False)),
        (torch.ops.fastgpt.add_rms_norm_fwd.default, (x, res, w, EPS, 1.0, False)),
        (torch.ops.fastgpt.swiglu_fwd.default, (x, res)),
        (torch.ops.fastgpt.rotary_fwd.default, (q, k, cos, sin, cos, sin, False, False)),
        (torch.ops.fastgpt.rotary_fwd.default, (qkv[:, :, 0], None, cos[..., :2], sin[..., :2], cos[..., 2:], sin[..., 2:], True, True)),
    ]
    utils = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_static")
    for op, args in cases:
        with fastgpt.use_backend("reference"):
            torch.library.opcheck(op, args, test_utils=utils)
