"""One module per op; importing this package registers every op (:mod:`fastgpt.registry`) and its
``fastgpt::`` custom ops, and exports the ops' public functions.

Adding an op: its module here and its name in ``_OP_MODULES`` (docs/design.md, 'Adding an op').
"""

import importlib

from fastgpt import registry

_OP_MODULES = ("attention", "varlen_attention", "layer_norm", "gelu", "cross_entropy", "decode_attention", "rms_norm", "swiglu", "rotary")  # registration order: explain(), bench and reports follow it

for _name in _OP_MODULES:
    importlib.import_module(f"fastgpt.ops.{_name}")

# the public functions of every registered op (this rebinds fastgpt.ops.attention etc. to the
# functions of those names, as ``from fastgpt.ops.attention import attention`` always did)
__all__ = []
for _spec in registry.all_ops():
    for _fn in _spec.functions:
        globals()[_fn.__name__] = _fn
        __all__.append(_fn.__name__)
del _name, _spec, _fn
