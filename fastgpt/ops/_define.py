"""One definition per op, two ways to call it: a torch custom op for torch.compile, a thin path for eager.

``torch.library.custom_op`` is what lets ``torch.compile(fullgraph=True)`` trace fastgpt (opaque op,
fake impl for shapes, registered autograd), but its Python dispatcher costs 15-25 us per call in eager
mode, more than a small layer norm takes. So :class:`FastgptOp` registers the custom ops and calls them
only while torch.compile traces; in eager mode it calls the same forward through a plain
``torch.autograd.Function`` when a gradient is needed (about 5 us), or directly when none is.
Both paths run the same forward/backward functions and the same backward formula, so they cannot
disagree; the compile tests exercise one, every other test the other.
"""

from typing import Callable, Sequence

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from fastgpt.ops._checks import is_compiling


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
                output = forward(*args)
                setup_context(ctx, args, output)
                if non_differentiable:
                    ctx.mark_non_differentiable(*(output[i] for i in non_differentiable))
                return output

            @staticmethod
            @once_differentiable
            def backward(ctx, *grads):
                return backward(ctx, backward_op, *grads)

        Eager.__name__ = Eager.__qualname__ = f"{name}_eager"
        self._eager = Eager

    def __call__(self, *args):
        if is_compiling():
            return self.fwd_op(*args)
        if torch.is_grad_enabled() and any(isinstance(a, Tensor) and a.requires_grad for a in args):
            return self._eager.apply(*args)
        return self.forward(*args)
