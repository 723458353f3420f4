"""One module per op family; importing this package registers every ``fastgpt::`` custom op."""

from fastgpt.ops.attention import attention, flash_attn_func, scaled_dot_product_attention
from fastgpt.ops.gelu import bias_gelu, gelu
from fastgpt.ops.layer_norm import add_layer_norm, layer_norm

__all__ = [
    "attention",
    "scaled_dot_product_attention",
    "flash_attn_func",
    "layer_norm",
    "add_layer_norm",
    "gelu",
    "bias_gelu",
]
