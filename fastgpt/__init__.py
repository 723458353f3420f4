"""fastgpt: fast GPT training and inference kernels for PyTorch.

Functional ops (drop-ins for the torch / flash-attn functions of the same role)::

    fastgpt.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False,
                                         scale=None, enable_gqa=False)      # (B, H, S, D)
    fastgpt.flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False,
                            window_size=(-1, -1), softcap=0.0, alibi_slopes=None)  # (B, S, H, D)
    fastgpt.attention(q, k, v, causal=False, scale=None, return_lse=False, window_size=(-1, -1),
                      softcap=0.0, alibi_slopes=None)  # (B, H, S, D)
    fastgpt.layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5)
    fastgpt.add_layer_norm(x, residual, weight, bias, eps=1e-5)  # (layer_norm(x + residual), x + residual)
    fastgpt.gelu(x, approximate="none")
    fastgpt.bias_gelu(x, bias, approximate="none")

Backends: ``fastgpt.explain()`` tells which backend each op uses here and why;
``with fastgpt.use_backend("reference"):`` forces one; ``FASTGPT_BACKEND`` and ``FASTGPT_STRICT`` set
them from the environment. Importing fastgpt compiles nothing.
"""

__version__ = "0.1.0"

from fastgpt import ops as _ops
from fastgpt.backends import BackendUnavailableError, FallbackWarning, explain, use_backend
from fastgpt.ops import *  # noqa: F401,F403  (every registered op's public functions)

__all__ = [
    "__version__",
    *_ops.__all__,
    "explain",
    "use_backend",
    "BackendUnavailableError",
    "FallbackWarning",
]

# Heavier parts load on first use, so `import fastgpt` stays cheap.
_LAZY = {
    "GPT": "fastgpt.model",
    "GPTConfig": "fastgpt.model",
    # the module is not named fastgpt/patch.py: importing it would rebind fastgpt.patch to the module
    "patch": "fastgpt.patching",
    "unpatch": "fastgpt.patching",
    "nn": "fastgpt.nn",
}


def __getattr__(name):
    module_name = _LAZY.get(name)
    if module_name is None:
        raise AttributeError(f"module 'fastgpt' has no attribute {name!r}")
    import importlib

    module = importlib.import_module(module_name)
    value = module if module_name == f"fastgpt.{name}" else getattr(module, name)
    globals()[name] = value
    return value
