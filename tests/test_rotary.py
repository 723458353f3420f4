"""Rotary embeddings: the Triton kernel (kernels/rotary.py, executed by the Triton interpreter on CPU) and
the reference path against the float64 oracle (the parity rule, fastgpt.testing), with flash-attn's and
Hugging Face's semantics: both layouts, rotary_dim < head dim, views of a fused qkv, sequence offsets,
q and k in one launch, bad input, compile."""

import pytest
import torch

import fastgpt
from fastgpt import backends
from fastgpt.ops.rotary import eager_apply_rotary_pos_emb, rope_tables
from fastgpt.testing import check_against_torch

pytest.importorskip("triton", reason="triton is not installed (it is a Linux-only dependency)")

DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def flash_rotary_torch(x, cos, sin, interleaved=False):
    """flash-attn's own test reference (apply_rotary_emb_torch): x (B, S, H, D), cos/sin (B or 1, S, R/2)."""
    r = 2 * cos.shape[-1]
    if interleaved:
        cos, sin = (t.repeat_interleave(2, dim=-1)[:, :, None] for t in (cos, sin))
        x1, x2 = x[..., :r:2], x[..., 1:r:2]
        rot = torch.stack((-x2, x1), dim=-1).flatten(-2)
    else:
        cos, sin = (torch.cat((t, t), dim=-1)[:, :, None] for t in (cos, sin))
        x1, x2 = x[..., : r // 2], x[..., r // 2 : r]
        rot = torch.cat((-x2, x1), dim=-1)
    return torch.cat((x[..., :r] * cos + rot * sin, x[..., r:]), dim=-1)


def tables(s_max, r2, dtype, seed=1, device="cpu"):
    """Rotation tables rounded to ``dtype`` once; as_(x) gives them in x's dtype (float64 for the oracle)."""
    g = torch.Generator().manual_seed(seed)
    theta = torch.rand(s_max, r2, generator=g) * 6.3
    cos, sin = theta.cos().to(device, dtype), theta.sin().to(device, dtype)
    return lambda x: (cos.to(x.dtype), sin.to(x.dtype))


def leaf(*shape, seed=0, device="cpu"):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(device).requires_grad_()


def positions(offsets, b, s, device):
    if isinstance(offsets, int):
        return torch.arange(offsets, offsets + s, device=device)[None].expand(b, s)
    return offsets[:, None] + torch.arange(s, device=device)


# (B, S, H, D, rotary_dim, offsets): D not a power of two, rotary_dim < D, int and per-batch offsets
CASES = [
    (2, 5, 3, 16, 16, 0),
    (1, 7, 2, 24, 8, 3),
    (2, 4, 1, 40, 32, "tensor"),
    (1, 1, 4, 8, 4, 9),  # one decoding step
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("interleaved", [False, True], ids=["neox", "gptj"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_triton_apply_rotary_emb_matches_oracle(case, interleaved, dtype, device):
    b, s, h, d, r, offsets = case
    offsets = torch.tensor([2, 0], device=device)[:b] if offsets == "tensor" else offsets
    tab = tables(16, r // 2, dtype, device=device)
    pos = positions(offsets, b, s, device)

    def fn(x):
        cos, sin = tab(x)
        return fastgpt.apply_rotary_emb(x, cos, sin, interleaved=interleaved, seqlen_offsets=offsets)

    def torch_fn(x):
        cos, sin = tab(x)
        return flash_rotary_torch(x, cos[pos], sin[pos], interleaved)

    with fastgpt.use_backend("triton", strict=True):
        check_against_torch(f"rotary {case}", fn, torch_fn, [leaf(b, s, h, d, device=device)], dtype)
        assert backends.last_choice("rotary").backend == "triton"


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float32), ids=str)
@pytest.mark.parametrize("interleaved", [False, True], ids=["neox", "gptj"])
def test_triton_q_and_k_from_a_fused_qkv_in_one_launch(interleaved, dtype, device):
    """q and k as strided views of a fused (B, S, Hq + 2 Hk, D) projection, GQA head counts."""
    b, s, hq, hk, d = 2, 6, 4, 2, 16
    tab = tables(6, 6, dtype, device=device)  # rotary_dim 12 < 16

    def split(qkv):
        return qkv[:, :, :hq], qkv[:, :, hq : hq + hk]

    def fn(qkv):
        cos, sin = tab(qkv)
        return fastgpt.apply_rotary_emb_qk(*split(qkv), cos, sin, interleaved=interleaved, seqlen_offsets=0)

    def torch_fn(qkv):
        cos, sin = tab(qkv)
        q, k = split(qkv)
        return flash_rotary_torch(q, cos[None], sin[None], interleaved), flash_rotary_torch(k, cos[None], sin[None], interleaved)

    with fastgpt.use_backend("triton", strict=True):
        check_against_torch("rotary fused qkv", fn, torch_fn, [leaf(b, s, hq + 2 * hk, d, device=device)], dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("unsqueeze_dim", [1, 2])
@pytest.mark.parametrize("tables_kind", ["llama", "batched_unequal_halves"])
def test_triton_hf_apply_rotary_pos_emb_matches_oracle(tables_kind, unsqueeze_dim, dtype, device):
    b, s, hq, hk, d = 2, 5, 4, 2, 16
    if tables_kind == "llama":
        cos, sin = rope_tables(s, d, "cpu", torch.float32)
    else:  # arbitrary (B, S, D) tables whose halves differ: Hugging Face's formula holds exactly
        cos, sin = torch.randn(2, b, s, d, generator=torch.Generator().manual_seed(3))
    cos, sin = cos.to(device, dtype), sin.to(device, dtype)
    shape = (b, hq, s, d) if unsqueeze_dim == 1 else (b, s, hq, d)
    kshape = (b, hk, s, d) if unsqueeze_dim == 1 else (b, s, hk, d)

    def fn(q, k):
        return fastgpt.apply_rotary_pos_emb(q, k, cos.to(q.dtype), sin.to(q.dtype), unsqueeze_dim=unsqueeze_dim)

    def torch_fn(q, k):
        return eager_apply_rotary_pos_emb(q, k, cos.to(q.dtype), sin.to(q.dtype), unsqueeze_dim)

    with fastgpt.use_backend("triton", strict=True):
        check_against_torch(f"hf rotary {tables_kind}", fn, torch_fn, [leaf(*shape, device=device), leaf(*kshape, seed=1, device=device)], dtype)
        q, k = leaf(*shape, device=device), leaf(*kshape, seed=1, device=device)
        oq, ok = fastgpt.apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)
    assert oq.shape == q.shape and ok.shape == k.shape and oq.is_contiguous() and ok.is_contiguous()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_reference_path_matches_oracle(dtype):
    tab = tables(9, 4, dtype)
    with fastgpt.use_backend("reference"):
        for interleaved in (False, True):
            check_against_torch(
                "rotary ref", lambda x: fastgpt.apply_rotary_emb(x, *tab(x), interleaved=interleaved, seqlen_offsets=2),
                lambda x: flash_rotary_torch(x, *(t[None, 2:7] for t in tab(x)), interleaved), [leaf(2, 5, 3, 10)], dtype)


def test_inplace_writes_x_and_only_k_used_still_gives_gradients(device):
    x = torch.randn(1, 4, 2, 8, device=device)
    cos, sin = tables(4, 4, torch.float32, device=device)(x)
    expected = flash_rotary_torch(x, cos[None], sin[None])
    with fastgpt.use_backend("triton", strict=True):
        y = fastgpt.apply_rotary_emb(x, cos, sin, inplace=True)
        assert y is x
        torch.testing.assert_close(x, expected, rtol=1e-6, atol=1e-6)
        q, k = leaf(1, 4, 2, 8, device=device), leaf(1, 4, 1, 8, seed=1, device=device)
        _, ok = fastgpt.apply_rotary_emb_qk(q, k, cos, sin)
        ok.sum().backward()
    assert q.grad is None or not q.grad.any()
    k2 = k.detach().clone().requires_grad_()
    flash_rotary_torch(k2, cos[None], sin[None]).sum().backward()
    torch.testing.assert_close(k.grad, k2.grad, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda x, c: fastgpt.apply_rotary_emb(x[0], c, c), ValueError, "x must be 4-D"),
        (lambda x, c: fastgpt.apply_rotary_emb(x, c, c[:, :2]), ValueError, "same shape"),
        (lambda x, c: fastgpt.apply_rotary_emb(x, c.repeat(1, 3), c.repeat(1, 3)), ValueError, "rotary_dim"),
        (lambda x, c: fastgpt.apply_rotary_emb(x, c, c, seqlen_offsets=7), ValueError, "exceeds"),
        (lambda x, c: fastgpt.apply_rotary_emb(x, c, c, seqlen_offsets=-1), ValueError, "seqlen_offsets"),
        (lambda x, c: fastgpt.apply_rotary_emb(x, c, c, seqlen_offsets=torch.zeros(3, dtype=torch.long)), ValueError, "seqlen_offsets"),
        (lambda x, c: fastgpt.apply_rotary_emb(x, c.long(), c), TypeError, "cos must have a floating dtype"),
        (lambda x, c: fastgpt.apply_rotary_emb(x, c.requires_grad_(), c), ValueError, "must not require grad"),
        (lambda x, c: fastgpt.apply_rotary_emb_qk(x, x.half(), c, c), TypeError, "k has dtype"),
        (lambda x, c: fastgpt.apply_rotary_emb_qk(x, x[:, :2], c, c), ValueError, "q and k must agree"),
        (lambda x, c: fastgpt.apply_rotary_pos_emb(x, x, c, c, unsqueeze_dim=3), ValueError, "unsqueeze_dim"),
        (lambda x, c: fastgpt.apply_rotary_pos_emb(x, x, c, c), ValueError, r"\(B or 1, S, D\)"),
    ],
)
def test_bad_input_names_the_argument(call, exc, match):
    x, c = torch.randn(2, 4, 3, 8), torch.rand(6, 4)
    with fastgpt.use_backend("triton", strict=True), pytest.raises(exc, match=match):
        call(x, c)


def test_hf_float32_tables_on_bfloat16_q_promote_like_hugging_face(device):
    q, k = torch.randn(1, 2, 3, 8, dtype=torch.bfloat16, device=device), torch.randn(1, 1, 3, 8, dtype=torch.bfloat16, device=device)
    cos, sin = (t.to(device) for t in rope_tables(3, 8, "cpu", torch.float32))
    with fastgpt.use_backend("triton", strict=True):
        oq, ok = fastgpt.apply_rotary_pos_emb(q, k, cos, sin)
    eq, ek = eager_apply_rotary_pos_emb(q, k, cos, sin)
    assert oq.dtype == eq.dtype == torch.float32 and ok.dtype == torch.float32
    torch.testing.assert_close(oq, eq, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ok, ek, rtol=1e-6, atol=1e-6)
