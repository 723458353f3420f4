"""Bad input raises a ValueError/TypeError that names the argument and what was expected, before any work."""

import pytest
import torch

import fastgpt


def t(*shape, dtype=torch.float32):
    return torch.randn(*shape).to(dtype)


# ---- attention ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, kwargs, exc, pattern",
    [
        ((t(2, 4, 8, 16), t(2, 4, 8, 16), [1.0]), {}, TypeError, "value must be a torch.Tensor"),
        ((t(2, 4, 8, 16), t(2, 4, 8, 16), t(2, 4, 8, 16).long()), {}, TypeError, "value must have a floating dtype"),
        ((t(2, 4, 8, 16), t(2, 4, 8, 16, dtype=torch.float16), t(2, 4, 8, 16)), {}, TypeError, "k has dtype torch.float16"),
        ((t(4, 8, 16, 1, 1), t(2, 4, 8, 16), t(2, 4, 8, 16)), {}, ValueError, "query must be 3 or 4-D"),
        ((t(2, 4, 8, 16), t(3, 4, 8, 16), t(3, 4, 8, 16)), {}, ValueError, "batch sizes differ"),
        ((t(2, 4, 8, 16), t(2, 4, 8, 32), t(2, 4, 8, 16)), {}, ValueError, "k must have q's head dim 16"),
        ((t(2, 4, 8, 16), t(2, 4, 8, 16), t(2, 4, 9, 16)), {}, ValueError, "v must have k's heads and length"),
        ((t(2, 4, 8, 16), t(2, 2, 8, 16), t(2, 2, 8, 16)), {}, ValueError, "enable_gqa=True"),
        ((t(2, 6, 8, 16), t(2, 4, 8, 16), t(2, 4, 8, 16)), {"enable_gqa": True}, ValueError, "multiple of the k/v heads"),
        ((t(1, 1, 4, 320), t(1, 1, 4, 320), t(1, 1, 4, 320)), {}, ValueError, "head dim 320 is not supported; expected at most 256"),
        ((t(1, 1, 4, 16), t(1, 1, 4, 16), t(1, 1, 4, 300)), {}, ValueError, "v head dim 300"),
        ((t(1, 1, 4, 16), t(1, 1, 4, 16), t(1, 1, 4, 16)), {"is_causal": True, "attn_mask": torch.ones(4, 4, dtype=torch.bool)}, ValueError, "either attn_mask or is_causal"),
        ((t(1, 1, 4, 16), t(1, 1, 4, 16), t(1, 1, 4, 16)), {"dropout_p": 1.5}, ValueError, "dropout_p must be in"),
        ((t(2, 4, 8, 16), t(2, 0, 8, 16), t(2, 0, 8, 16)), {"enable_gqa": True}, ValueError, "k and v have 0 heads but q has 4"),
        ((t(1, 2, 3, 16), t(1, 2, 4, 16), t(1, 2, 4, 16)), {"attn_mask": torch.ones(3, 5, dtype=torch.bool)}, ValueError,
         r"attn_mask must broadcast to \(B, Hq, Sq, Sk\) = \(1, 2, 3, 4\); got shape \(3, 5\)"),
        ((t(1, 2, 3, 16), t(1, 2, 4, 16), t(1, 2, 4, 16)), {"attn_mask": torch.ones(2, 1, 2, 3, 4, dtype=torch.bool)}, ValueError,
         "attn_mask must broadcast to"),
        ((t(2, 3, 16), t(2, 4, 16), t(2, 4, 16)), {"attn_mask": torch.ones(3, 3, 4, dtype=torch.bool)}, ValueError,
         r"attn_mask must broadcast to \(B, Sq, Sk\) = \(2, 3, 4\)"),
        ((t(1, 2, 3, 16), t(1, 2, 4, 16), t(1, 2, 4, 16)), {"attn_mask": [[True]]}, TypeError, "attn_mask must be a torch.Tensor"),
        ((t(1, 2, 3, 16), t(1, 2, 4, 16), t(1, 2, 4, 16)), {"attn_mask": torch.ones(3, 4, dtype=torch.bool, device="meta")},
         ValueError, "attn_mask is on meta but query is on cpu"),
    ],
)
def test_sdpa_bad_input(args, kwargs, exc, pattern):
    with pytest.raises(exc, match=pattern):
        fastgpt.scaled_dot_product_attention(*args, **kwargs)


def test_sdpa_device_mismatch_names_the_argument():
    q = t(1, 1, 4, 16)
    k = torch.empty(1, 1, 4, 16, device="meta")
    with pytest.raises(ValueError, match="k is on meta but q is on cpu"):
        fastgpt.scaled_dot_product_attention(q, k, q)


def test_flash_attn_func_bad_input():
    with pytest.raises(ValueError, match="q must be 4-D"):
        fastgpt.flash_attn_func(t(8, 2, 16), t(8, 2, 16), t(8, 2, 16))
    with pytest.raises(ValueError, match="number of q heads \\(3\\) must be a multiple of the k/v heads \\(2\\)"):
        fastgpt.flash_attn_func(t(1, 8, 3, 16), t(1, 8, 2, 16), t(1, 8, 2, 16))


def test_good_attn_masks_are_accepted():
    q, k = t(2, 2, 3, 16), t(2, 2, 4, 16)
    for shape in [(3, 4), (1, 3, 4), (2, 1, 3, 1), (2, 2, 3, 4)]:
        mask = torch.rand(*shape) > 0.2
        torch.testing.assert_close(
            fastgpt.scaled_dot_product_attention(q, k, k, attn_mask=mask),
            torch.nn.functional.scaled_dot_product_attention(q, k, k, attn_mask=mask),
        )


def test_head_dim_0_gives_what_torch_gives():
    """Every score is 0: the output is the mean of v (empty when v's head dim is 0 too), no ZeroDivisionError."""
    sdpa = torch.nn.functional.scaled_dot_product_attention
    for dv in (0, 5):
        q = t(1, 2, 3, 0).requires_grad_()
        k, v = t(1, 2, 4, 0), t(1, 2, 4, dv).requires_grad_()
        for fn in (fastgpt.scaled_dot_product_attention, fastgpt.attention):
            out = fn(q, k, v)
            torch.testing.assert_close(out, sdpa(q, k, v))
            out.sum().backward()
            torch.testing.assert_close(v.grad, torch.full_like(v, 3 / 4))
            v.grad = None


def test_zero_heads_everywhere_gives_an_empty_output():
    q, k = t(1, 0, 3, 8), t(1, 0, 4, 8)
    assert fastgpt.scaled_dot_product_attention(q, k, k).shape == (1, 0, 3, 8)
    assert fastgpt.attention(q, k, k).shape == (1, 0, 3, 8)


def test_attention_bad_input():
    with pytest.raises(ValueError, match="batch sizes differ"):
        fastgpt.attention(t(1, 2, 4, 8), t(2, 2, 4, 8), t(2, 2, 4, 8))


# ---- layer norm -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call, exc, pattern",
    [
        (lambda: fastgpt.layer_norm(t(4, 8), (16,)), ValueError, r"normalized_shape \(16,\) must equal the trailing dims of x"),
        (lambda: fastgpt.layer_norm(t(4, 8), (4, 8, 1)), ValueError, "normalized_shape"),
        (lambda: fastgpt.layer_norm(t(4, 8), (8,), t(7)), ValueError, r"weight must have shape \(8,\)"),
        (lambda: fastgpt.layer_norm(t(4, 8), (8,), None, t(9)), ValueError, r"bias must have shape \(8,\)"),
        (lambda: fastgpt.layer_norm(t(4, 8).long(), (8,)), TypeError, "x must have a floating dtype"),
        (lambda: fastgpt.layer_norm(t(4, 8), (8,), t(8, dtype=torch.float16)), TypeError, "weight has dtype torch.float16; expected torch.float32"),
        (lambda: fastgpt.layer_norm(t(4, 8, dtype=torch.bfloat16), (8,), t(8, dtype=torch.float16)), TypeError, "expected torch.bfloat16 or torch.float32"),
        (lambda: fastgpt.layer_norm("x", (8,)), TypeError, "x must be a torch.Tensor"),
        (lambda: fastgpt.layer_norm(t(4, 8, 8), "88"), TypeError, "normalized_shape must be an int or a sequence of ints; got '88'"),
        (lambda: fastgpt.layer_norm(t(4, 8), (8.9,)), TypeError, r"normalized_shape must be an int or a sequence of ints; got \(8.9,\)"),
        (lambda: fastgpt.layer_norm(t(4, 8), 8.0), TypeError, "normalized_shape must be an int"),
        (lambda: fastgpt.layer_norm(t(4, 8), None), TypeError, "normalized_shape must be an int"),
        (lambda: fastgpt.layer_norm(t(4, 8), (8,), torch.empty(8, device="meta")), ValueError, "weight is on meta but x is on cpu"),
        (lambda: fastgpt.add_layer_norm(t(4, 8), t(4, 9), None, None), ValueError, r"residual must have x's shape \(4, 8\)"),
        (lambda: fastgpt.add_layer_norm(t(4, 8), t(4, 8, dtype=torch.float64), None, None), TypeError, "residual has dtype torch.float64"),
        (lambda: fastgpt.add_layer_norm(t(4, 8), t(4, 8), t(4), None), ValueError, r"weight must have shape \(8,\)"),
    ],
)
def test_layer_norm_bad_input(call, exc, pattern):
    with pytest.raises(exc, match=pattern):
        call()


# ---- gelu -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call, exc, pattern",
    [
        (lambda: fastgpt.gelu(t(4), "erf"), ValueError, "approximate must be 'none' or 'tanh'; got 'erf'"),
        (lambda: fastgpt.gelu(t(4).int()), TypeError, "x must have a floating dtype"),
        (lambda: fastgpt.bias_gelu(t(4, 8), t(7)), ValueError, r"bias must have shape \(8,\)"),
        (lambda: fastgpt.bias_gelu(t(4, 8), t(2, 8)), ValueError, "bias must be 1-D"),
        (lambda: fastgpt.bias_gelu(t(4, 8), t(8, dtype=torch.float64)), TypeError, "bias has dtype torch.float64"),
        (lambda: fastgpt.bias_gelu(t(4, 8), t(8), "fast"), ValueError, "approximate must be"),
    ],
)
def test_gelu_bad_input(call, exc, pattern):
    with pytest.raises(exc, match=pattern):
        call()


def test_bad_input_raises_before_any_backend_is_chosen(monkeypatch):
    """Validation happens before dispatch: a bad call never reaches backends.select."""
    from fastgpt import backends

    def boom(*a, **k):
        raise AssertionError("dispatch reached")

    monkeypatch.setattr(backends, "select", boom)
    with pytest.raises(ValueError):
        fastgpt.layer_norm(t(4, 8), (16,))
    with pytest.raises(ValueError):
        fastgpt.scaled_dot_product_attention(t(1, 4, 8, 16), t(1, 2, 8, 16), t(1, 2, 8, 16))
    with pytest.raises(TypeError):
        fastgpt.layer_norm(t(4, 8, 8), "88")
    with pytest.raises(ValueError):
        q = t(1, 1, 4, 16)
        fastgpt.scaled_dot_product_attention(q, q, q, attn_mask=torch.ones(4, 4, device="meta", dtype=torch.bool))


def test_layer_norm_takes_torch_size_arguments():
    x = t(2, 3, 8)
    for shape in (8, [8], (3, 8), torch.Size([3, 8]), x.shape[1:]):
        want = torch.nn.functional.layer_norm(x, (shape,) if isinstance(shape, int) else shape)
        torch.testing.assert_close(fastgpt.layer_norm(x, shape), want)


# ---- environment ----------------------------------------------------------------------------


@pytest.mark.parametrize("raw, strict", [("1", True), ("TRUE", True), (" yes ", True), ("On", True),
                                         ("0", False), ("false", False), ("No", False), ("off", False), ("", False)])
def test_fastgpt_strict_accepts_the_documented_values(monkeypatch, raw, strict):
    from fastgpt import backends

    monkeypatch.setenv("FASTGPT_STRICT", raw)
    assert backends.strict_mode() is strict


@pytest.mark.parametrize("raw", ["2", "strict", "enabled", "-1", "y"])
def test_fastgpt_strict_rejects_other_values(monkeypatch, raw):
    monkeypatch.setenv("FASTGPT_STRICT", raw)
    with pytest.raises(ValueError, match=f"FASTGPT_STRICT must be one of .*; got {raw!r}"):
        fastgpt.gelu(t(4, 8))


@pytest.mark.parametrize("var, raw", [("FASTGPT_BACKEND", "bogus"), ("FASTGPT_STRICT", "2")])
def test_fastgpt_info_reports_a_bad_variable_in_one_line(monkeypatch, capsys, var, raw):
    import argparse

    from fastgpt import info

    monkeypatch.setenv(var, raw)
    assert info.main(argparse.Namespace(json=None)) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1 and captured.err.startswith(f"fastgpt info: {var} must be one of")
