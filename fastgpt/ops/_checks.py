"""Input validation shared by the public ops: errors name the argument and what was expected.

All checks run before any computation or kernel launch, so a bad call never half-runs.
"""

import operator
from typing import Iterable, Optional, Sequence, Tuple

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
HALF_DTYPES = (torch.float16, torch.bfloat16)


def _dtype_names(dtypes: Iterable[torch.dtype]) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def check_tensor(fn: str, name: str, t: object, *, ndim: Optional[Iterable[int]] = None, min_ndim: int = 0) -> Tensor:
    """t must be a floating-point tensor (float16, bfloat16, float32, float64) of an accepted rank."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor; got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{fn}: {name} must have a floating dtype ({_dtype_names(FLOAT_DTYPES)}); got {t.dtype}")
    if ndim is not None:
        ndim = tuple(ndim)
        if t.dim() not in ndim:
            want = " or ".join(str(n) for n in ndim)
            raise ValueError(f"{fn}: {name} must be {want}-D; got shape {tuple(t.shape)}")
    if t.dim() < min_ndim:
        raise ValueError(f"{fn}: {name} must have at least {min_ndim} dims; got shape {tuple(t.shape)}")
    return t


def check_int_shape(fn: str, name: str, value: object) -> Tuple[int, ...]:
    """An int or a list/tuple/torch.Size of ints, as torch's shape arguments (a str or 8.9 is not one)."""
    try:
        if isinstance(value, (list, tuple)):
            return tuple(operator.index(s) for s in value)
        return (operator.index(value),)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"{fn}: {name} must be an int or a sequence of ints; got {value!r}") from None


def check_broadcastable(fn: str, name: str, t: object, shape: Sequence[int], dims: str) -> None:
    """t is a tensor that broadcasts to ``shape`` (named ``dims``, e.g. "(B, H, Sq, Sk)")."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor; got {type(t).__name__}")
    if t.dim() > len(shape) or any(a != b and a != 1 for a, b in zip(reversed(t.shape), reversed(shape))):
        raise ValueError(
            f"{fn}: {name} must broadcast to {dims} = {tuple(shape)}; got shape {tuple(t.shape)}"
        )


def check_same_device(fn: str, **tensors: Optional[Tensor]) -> None:
    items = [(n, t) for n, t in tensors.items() if t is not None]
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.device != first.device:
            raise ValueError(f"{fn}: {name} is on {t.device} but {first_name} is on {first.device}; expected one device")


def check_same_dtype(fn: str, **tensors: Optional[Tensor]) -> None:
    items = [(n, t) for n, t in tensors.items() if t is not None]
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.dtype != first.dtype:
            raise TypeError(f"{fn}: {name} has dtype {t.dtype} but {first_name} has {first.dtype}; expected the same dtype")


def check_residual(fn: str, x: Tensor, residual: Tensor) -> None:
    """A fused residual add's second operand: a tensor of x's shape, dtype and device."""
    check_tensor(fn, "residual", residual)
    check_same_dtype(fn, x=x, residual=residual)
    check_same_device(fn, x=x, residual=residual)
    if residual.shape != x.shape:
        raise ValueError(f"{fn}: residual must have x's shape {tuple(x.shape)}; got {tuple(residual.shape)}")


def check_param_dtype(fn: str, name: str, p: Optional[Tensor], x: Tensor) -> None:
    """A norm's weight/bias: x's dtype, or float32 when x is float16/bfloat16 (autocast's layout)."""
    if p is None:
        return
    if p.dtype == x.dtype or (x.dtype in HALF_DTYPES and p.dtype == torch.float32):
        return
    allowed = f"{x.dtype}" + (" or torch.float32" if x.dtype in HALF_DTYPES else "")
    raise TypeError(f"{fn}: {name} has dtype {p.dtype}; expected {allowed} (x has {x.dtype})")


def check_approximate(fn: str, approximate: object) -> str:
    if approximate not in ("none", "tanh"):
        raise ValueError(f"{fn}: approximate must be 'none' or 'tanh'; got {approximate!r}")
    return approximate  # type: ignore[return-value]


def is_compiling() -> bool:
    """True while torch.compile traces: the ops then skip Python-side side effects (warnings)."""
    compiler = getattr(torch, "compiler", None)
    if compiler is not None and hasattr(compiler, "is_compiling"):
        return compiler.is_compiling()
    return False
