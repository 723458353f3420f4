"""Where fastgpt's CPU dispatch overhead goes: a ladder of ever more of fastgpt's path, per op.

    python benchmarks/profile_dispatch.py [--size tiny|small|realistic] [--rounds 3] [--threads 1]

For each op and direction (forward under no_grad; forward + backward) it times, against calling the
torch function directly (interleaved rounds, minimum; see fastgpt.tools.bench.timing.compare_cpu):

* ``autograd.Function floor`` (fwd+bwd only): a minimal Python ``torch.autograd.Function`` around the
  same aten kernels: what any Python-level custom autograd costs, whatever fastgpt does;
* ``op object``: the op's FastgptOp object (``fastgpt.ops.<module>._<op>``) called with the 2-D / 4-D
  inputs it takes (backend selection, the reference forward/backward, the eager autograd.Function);
* ``public function``: ``fastgpt.<op>`` (adds input validation, reshapes/views, defaults).

The step from one rung to the next is what that layer costs. Not a test: run it by hand.
"""

from __future__ import annotations

import argparse
import importlib
import sys

import torch
import torch.nn.functional as F

import fastgpt
from fastgpt.tools.bench import op_cases as bc
from fastgpt.tools.bench import dispatch_cases as dc
from fastgpt import backends
from fastgpt.tools.bench import timing as _timing


def _module(name: str):
    return importlib.import_module(f"fastgpt.ops.{name}")


class _LayerNormFloor(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, b):
        y, mean, rstd = torch.native_layer_norm(x, [x.shape[-1]], w, b, 1e-5)
        ctx.save_for_backward(x, w, mean, rstd)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, w, mean, rstd = ctx.saved_tensors
        return torch.ops.aten.native_layer_norm_backward(dy, x, [x.shape[-1]], mean, rstd, w, w, [True, True, True])


class _GeluFloor(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch._C._nn.gelu(x)

    @staticmethod
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        return torch.ops.aten.gelu_backward(dy, x)


def ladder(op: str, size: str, grad: bool):
    """[(rung name, callable)] and the torch baseline, over the inputs of DispatchCase(op, size)."""
    g = torch.Generator().manual_seed(0)
    dims = dc.DISPATCH_SIZES[op][size]

    def r(*shape):
        return torch.randn(*shape, generator=g).requires_grad_(grad)

    if op == "attention":
        q, k, v = r(*dims), r(*dims), r(*dims)
        inputs = [q, k, v]
        scale = dims[-1] ** -0.5
        torch_fn = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)  # noqa: E731
        rungs = [
            ("op object", lambda: _module("attention")._attention(q, k, v, True, scale, False)[0]),
            ("public function", lambda: fastgpt.scaled_dot_product_attention(q, k, v, is_causal=True)),
        ]
    elif op == "layer_norm":
        m, n = dims
        x, w, b = r(m, n), r(n), r(n)
        inputs = [x, w, b]
        torch_fn = lambda: F.layer_norm(x, (n,), w, b)  # noqa: E731
        rungs = [
            ("autograd.Function floor", lambda: _LayerNormFloor.apply(x, w, b)),
            ("op object", lambda: _module("layer_norm")._layer_norm(x, w, b, 1e-5)[0]),
            ("public function", lambda: fastgpt.layer_norm(x, (n,), w, b)),
        ]
    elif op == "add_layer_norm":
        m, n = dims
        x, res, w, b = r(m, n), r(m, n), r(n), r(n)
        inputs = [x, res, w, b]

        def torch_fn():
            s = x + res
            return F.layer_norm(s, (n,), w, b), s

        rungs = [
            ("op object", lambda: _module("layer_norm")._add_layer_norm(x, res, w, b, 1e-5)[:2]),
            ("public function", lambda: fastgpt.add_layer_norm(x, res, w, b)),
        ]
    elif op == "gelu":
        m, n = dims
        x = r(m, n)
        inputs = [x]
        torch_fn = lambda: F.gelu(x)  # noqa: E731
        rungs = [
            ("autograd.Function floor", lambda: _GeluFloor.apply(x)),
            ("op object", lambda: _module("gelu")._gelu(x, "none")),
            ("public function", lambda: fastgpt.gelu(x)),
        ]
    else:
        m, n = dims
        x, b = r(m, n), r(n)
        inputs = [x, b]
        torch_fn = lambda: F.gelu(x + b)  # noqa: E731
        rungs = [
            ("op object", lambda: _module("gelu")._bias_gelu(x, b, "none")),
            ("public function", lambda: fastgpt.bias_gelu(x, b)),
        ]
    if not grad:
        rungs = [(name, fn) for name, fn in rungs if "floor" not in name]

        def nograd(fn):
            def call():
                with torch.no_grad():
                    return fn()

            return call

        return nograd(torch_fn), [(name, nograd(fn)) for name, fn in rungs]
    with torch.no_grad():
        outs = torch_fn()
    outs = outs if isinstance(outs, tuple) else (outs,)
    upstream = [torch.randn(o.shape, generator=g) for o in outs]

    def with_grad(fn):
        def call():
            o = fn()
            o = tuple(o) if isinstance(o, (tuple, list)) else (o,)
            return torch.autograd.grad(o, inputs, upstream[: len(o)])

        return call

    return with_grad(torch_fn), [(name, with_grad(fn)) for name, fn in rungs]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=("tiny", "small", "realistic"), default="tiny")
    parser.add_argument("--rounds", type=int, default=3, help="repeat each comparison, keep the best (default 3)")
    parser.add_argument("--budget", type=float, default=0.5, help="seconds per comparison (default 0.5)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--ops", nargs="+", default=list(bc.OPS))
    args = parser.parse_args(argv)
    print(f"torch {torch.__version__}, {args.threads} thread(s), size {args.size}; overhead = rung - torch (min of interleaved rounds)")
    print(f"{'op':<15} {'mode':<11} {'rung':<24} {'torch':>10} {'rung time':>10} {'overhead':>10} {'step':>9}")
    with _timing.cpu_threads(args.threads), backends.use_backend("reference", strict=True):
        for op in args.ops:
            for grad in (False, True):
                base, rungs = ladder(op, args.size, grad)
                previous = 0.0
                for name, fn in rungs:
                    best = None
                    for _ in range(args.rounds):
                        c = _timing.compare_cpu(base, fn, budget_s=args.budget)
                        if best is None or c.overhead_us < best.overhead_us:
                            best = c
                    mode = "fwd+bwd" if grad else "fwd-nograd"
                    print(
                        f"{op:<15} {mode:<11} {name:<24} {best.a.min_ms * 1e3:>8.1f}us {best.b.min_ms * 1e3:>8.1f}us "
                        f"{best.overhead_us:>8.1f}us {best.overhead_us - previous:>+8.1f}us"
                    )
                    previous = best.overhead_us
    return 0


if __name__ == "__main__":
    sys.exit(main())
