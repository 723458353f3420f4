"""Output rounding shared by the element-wise and row-wise Triton kernels.

A GPU rounds float32 to bfloat16 to nearest (even); Triton's CPU interpreter truncates (rounds toward
zero) whatever rounding mode is asked for. Kernels cast their outputs with :func:`cast_out` and pass
``RTNE_IN_SOFTWARE=interpreter_active()``: under the interpreter the float32 value is rounded to
nearest-even by integer arithmetic first (the truncating cast is then exact), so interpreter runs
round like the GPU and the parity tests hold them to the same bound. On a GPU the flag is False and
the branch is not compiled.
"""

import triton
import triton.language as tl


@triton.jit
def cast_out(x, dtype: tl.constexpr, RTNE_IN_SOFTWARE: tl.constexpr):
    """float32 ``x`` as ``dtype``, rounded to nearest-even (see the module docstring)."""
    if RTNE_IN_SOFTWARE and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)
