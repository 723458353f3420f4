"""One definition per op, two ways to call it: a torch custom op for torch.compile, a thin path for eager.

``torch.library.custom_op`` is what lets ``torch.compile(fullgraph=True)`` trace fastgpt (opaque op,
fake impl for shapes, registered autograd), but its Python dispatcher costs 15-25 us per call in eager
mode, more than a small layer norm takes. So :class:`FastgptOp` registers the custom ops and calls them
only while torch.compile traces; in eager mode it calls the same forward through a plain
``torch.autograd.Function`` when a gradient is needed (about 5 us), or directly when none is.
Both paths run the same forward/backward functions and the same backward formula, so they cannot
disagree; the compile tests exercise one, every other test the other.

A third path skips both: when an eager call is served by the reference backend and the reference's
numerics are exactly torch's own function (float32 layer norm, GELU, non-causal or square attention
without the log-sum-exp, ...), the public function calls that torch function, with torch's autograd.
That keeps fastgpt's overhead on CPU to validation and the backend choice (:func:`reference_serves`).
"""

from typing import Callable, Optional, Sequence

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from fastgpt import backends
from fastgpt.ops._checks import is_compiling

# Tests switch the shortcut off to run the custom-op reference path in eager mode too.
TORCH_SHORTCUT = True

# dtypes whose reference computation is torch's own op (half types differ: fastgpt keeps float32
# statistics and sums where torch's CPU kernels round to the half type)
TORCH_EXACT_DTYPES = (torch.float32, torch.float64)


def reference_serves(op: str, x: Tensor, constraint: Optional[Callable[[str], Optional[str]]] = None) -> bool:
    """True when an eager (not compiled) call of ``op`` on ``x`` will be served by the reference backend.

    It runs the backend choice, so its notices (and strict-mode errors) happen here; an empty x needs
    no kernel, so no choice and no notice.
    """
    if not TORCH_SHORTCUT or is_compiling():
        return False
    return x.numel() == 0 or backends.select(op, x.device, constraint) == "reference"


class FastgptOp:
    """A forward/backward pair registered as ``fastgpt::{name}_fwd`` and ``fastgpt::{name}_bwd``.

    Args:
        name: op name; the custom ops are ``fastgpt::{name}_fwd`` / ``fastgpt::{name}_bwd``.
        forward, backward_op: the implementations (type-annotated, as custom_op requires); each picks
            its backend at run time.
        forward_fake, backward_fake: shape/dtype/stride-only versions for tracing.
        setup_context(ctx, inputs, output): saves what the backward needs (custom_op convention).
        backward(ctx, backward_op, *grads): returns one gradient per forward input, calling
            ``backward_op`` (the custom op under compile, the plain function in eager mode). A grad
            is None for an output that received no gradient (eager) or may be zeros (compiled).
        non_differentiable: indices of forward outputs that never carry a gradient (statistics).
    """

    def __init__(
        self,
        name: str,
        forward: Callable,
        backward_op: Callable,
        forward_fake: Callable,
        backward_fake: Callable,
        setup_context: Callable,
        backward: Callable,
        non_differentiable: Sequence[int] = (),
    ) -> None:
        self.name = name
        self.forward = forward
        self.backward_impl = backward_op
        self.fwd_op = torch.library.custom_op(f"fastgpt::{name}_fwd", forward, mutates_args=())
        self.fwd_op.register_fake(forward_fake)
        self.bwd_op = torch.library.custom_op(f"fastgpt::{name}_bwd", backward_op, mutates_args=())
        self.bwd_op.register_fake(backward_fake)
        bwd_op = self.bwd_op

        def compiled_backward(ctx, *grads):
            return backward(ctx, bwd_op, *grads)

        self.fwd_op.register_autograd(compiled_backward, setup_context=setup_context)

        class Eager(torch.autograd.Function):
            @staticmethod
            def forward(ctx, *args):
                # unused outputs get None, not zeros: the attention backward then skips the d(lse)
                # term entirely, and no zero tensors are allocated for statistics
                ctx.set_materialize_grads(False)
                # autograd may run the backward on its own thread (CUDA tensors), where this thread's
                # use_backend blocks are not active: the backward runs under the forward's state
                ctx.backend_state = backends.capture()
                output = forward(*args)
                setup_context(ctx, args, output)
                if non_differentiable:
                    ctx.mark_non_differentiable(*(output[i] for i in non_differentiable))
                return output

            @staticmethod
            @once_differentiable
            def backward(ctx, *grads):
                return backends.run_under(ctx.backend_state, backward, ctx, backward_op, *grads)

        Eager.__name__ = Eager.__qualname__ = f"{name}_eager"
        self._eager = Eager

    def __call__(self, *args):
        if is_compiling():
            return self.fwd_op(*args)
        if torch.is_grad_enabled() and any(isinstance(a, Tensor) and a.requires_grad for a in args):
            return self._eager.apply(*args)
        return self.forward(*args)
