"""flash-attn's attention options beyond the causal mask: sliding window, softcap, ALiBi.

One place validates them (before any launch, naming the argument) and normalises them for the custom
op, the reference and the kernels; the FLOP model counts the (query, key) pairs a window leaves.
Semantics (flash-attn's ``flash_attn_func`` docstring): query i sees key j iff
``i + Sk - Sq - left <= j <= i + Sk - Sq + right`` (-1: that side unbounded; causal means right = 0);
``softcap`` c > 0 turns the scaled score s into ``c * tanh(s / c)``; ALiBi then adds
``-slope * |i + Sk - Sq - j|`` with slopes of shape (Hq,) or (B, Hq), float32.
"""

import math
import numbers
import operator
from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor


class AttentionOptions(NamedTuple):
    """Validated options. ``window`` is (left, right) with -1 for an unbounded side and right = -1
    when causal (the causal mask is the right bound); ``softcap`` 0.0 is off."""

    causal: bool
    window: Tuple[int, int] = (-1, -1)
    softcap: float = 0.0
    alibi_slopes: Optional[Tensor] = None

    @property
    def plain(self) -> bool:
        """No window, softcap or ALiBi: what torch's own attention computes too."""
        return self.window == (-1, -1) and self.softcap == 0.0 and self.alibi_slopes is None


def _window_side(fn: str, value: object) -> int:
    if isinstance(value, bool):
        raise TypeError(f"{fn}: window_size must hold two ints (-1 for unbounded); got {value!r}")
    try:
        side = operator.index(value)
    except TypeError:
        raise TypeError(f"{fn}: window_size must hold two ints (-1 for unbounded); got {value!r}") from None
    if side < -1:
        raise ValueError(f"{fn}: window_size values must be >= -1 (-1: unbounded); got {side}")
    return side


def check_options(fn: str, q: Tensor, causal: bool, window_size: object, softcap: object,
                  alibi_slopes: object, batch: Optional[int] = None) -> AttentionOptions:
    """Validate flash-attn's options for queries q (B, Hq, Sq, D), or packed (T, Hq, D) with ``batch``
    sequences, and normalise them. Raises TypeError or ValueError naming the argument. A non-causal
    window (-1, 0) is the causal mask and becomes it."""
    if not isinstance(window_size, (tuple, list)) or len(window_size) != 2:
        raise TypeError(f"{fn}: window_size must be a (left, right) pair of ints; got {window_size!r}")
    left, right = (_window_side(fn, w) for w in window_size)
    if isinstance(softcap, bool) or not isinstance(softcap, numbers.Real):
        raise TypeError(f"{fn}: softcap must be a float (0.0: off); got {type(softcap).__name__}")
    softcap = float(softcap)
    if not math.isfinite(softcap) or softcap < 0:
        raise ValueError(f"{fn}: softcap must be finite and >= 0 (0.0: off); got {softcap}")
    if alibi_slopes is not None:
        _check_slopes(fn, q, q.shape[0] if batch is None else batch, alibi_slopes)
    causal = bool(causal)
    if not causal and left < 0 and right == 0:
        causal = True  # the same mask; the causal kernels skip the tiles above the diagonal
    if causal:
        right = -1
    return AttentionOptions(causal, (left, right), softcap, alibi_slopes)


def _check_slopes(fn: str, q: Tensor, b: int, slopes: object) -> None:
    if not isinstance(slopes, Tensor):
        raise TypeError(f"{fn}: alibi_slopes must be a torch.Tensor or None; got {type(slopes).__name__}")
    if slopes.dtype != torch.float32:
        raise TypeError(f"{fn}: alibi_slopes must be float32 (as in flash-attn); got {slopes.dtype}")
    hq = q.shape[1]
    if tuple(slopes.shape) not in ((hq,), (b, hq)):
        raise ValueError(f"{fn}: alibi_slopes must have shape (Hq,) = ({hq},) or (B, Hq) = ({b}, {hq}); "
                         f"got {tuple(slopes.shape)}")
    if slopes.device != q.device:
        raise ValueError(f"{fn}: alibi_slopes is on {slopes.device} but q is on {q.device}; expected one device")
    if slopes.requires_grad and torch.is_grad_enabled():
        raise ValueError(f"{fn}: alibi_slopes requires grad, but no gradient is computed for the slopes "
                         "(as in flash-attn); pass alibi_slopes.detach()")


def visible_pairs(sq: int, sk: int, causal: bool, window: Tuple[int, int]) -> int:
    """How many (query, key) pairs the mask leaves: query i sees keys
    [max(0, i + Sk - Sq - left), min(Sk - 1, i + Sk - Sq + right)] (right = 0 when causal)."""
    left, right = window
    diag = torch.arange(sq, dtype=torch.int64) + (sk - sq)
    if causal or right >= 0:
        hi = (diag + (0 if causal else right)).clamp(max=sk - 1)
    else:
        hi = torch.full_like(diag, sk - 1)
    lo = (diag - left).clamp(min=0) if left >= 0 else torch.zeros_like(diag)
    return int((hi - lo + 1).clamp(min=0).sum())
