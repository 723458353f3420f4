"""CPU dispatch overhead: every fastgpt op on the reference path against calling the torch function directly.

fastgpt validates its inputs and picks a backend on every call before running the same torch
computation the plain function runs (``F.layer_norm``, ``F.gelu``, ``F.gelu(x + b)``, ``x + r`` then
``F.layer_norm``, ``F.scaled_dot_product_attention``). This suite measures what that costs per call, with
``use_backend("reference", strict=True)`` forced, float32, at three sizes: tiny (pure overhead; target
at most 5 us), small (nanoGPT's CPU example) and realistic (GPT-2-small widths), both with a target
under 5%, forward only under ``torch.no_grad()`` and forward + backward.

The figure is the fastgpt benchmark's ``extra_info``: torch and fastgpt timed in alternating rounds,
overhead = difference of the minima (noise from other processes only ever adds time), plus the median
of the per-round differences as a second estimate. Torch runs single-threaded by default
(``--fastgpt-threads``), timed on the thread's CPU-time clock, so time spent descheduled on a shared
machine is not counted. The pytest-benchmark columns time each callable alone (wall clock).
Where the overhead goes, layer by layer: ``python benchmarks/profile_dispatch.py``.
"""

import contextlib

import pytest

from fastgpt.tools.bench import dispatch_cases as dc
from fastgpt import backends
from fastgpt.tools.bench import timing as _timing

CASES = [pytest.param(case, impl, id=f"{case.id}-{impl}") for case in dc.dispatch_cases() for impl in ("torch", "fastgpt")]


@pytest.mark.parametrize(("case", "impl"), CASES)
def test_dispatch_overhead(benchmark, budget, threads, bench_log, case, impl):
    budget.check()
    torch_call, fast_call = dc.dispatch_pair(case)
    check_error = dc.check_dispatch_pair(case, torch_call, fast_call)
    benchmark.group = case.group
    benchmark.extra_info.update({"impl": impl, "op": case.op, "mode": case.mode, "size": case.size, "shape": case.shape_label})
    call = fast_call if impl == "fastgpt" else torch_call
    context = backends.use_backend("reference", strict=True) if impl == "fastgpt" else contextlib.nullcontext()
    with _timing.cpu_threads(threads), context:
        if not benchmark.enabled:
            benchmark.pedantic(call)
            return
        if impl == "fastgpt":
            cmp = _timing.compare_cpu(torch_call, fast_call, budget_s=2.0 if case.size == "realistic" else 1.0)
            unit, limit = case.target()
            row = {
                "op": case.op,
                "mode": case.mode,
                "size": case.size,
                "shape": case.shape_label,
                "torch_us": cmp.a.min_ms * 1e3,
                "fastgpt_us": cmp.b.min_ms * 1e3,
                "torch_median_us": cmp.a.median_ms * 1e3,
                "fastgpt_median_us": cmp.b.median_ms * 1e3,
                "overhead_us": cmp.overhead_us,
                "overhead_pct": cmp.overhead_pct,
                "paired_overhead_us": cmp.paired_overhead_us,
                "target": f"<= {limit:g} {'us' if unit == 'us' else '%'}",
                "meets_target": case.meets_target(cmp.overhead_us, cmp.overhead_pct),
                "threads": cmp.threads,
                "rounds": cmp.rounds,
                "calls_per_round": cmp.calls_per_batch,
                "check_rel_error": check_error,
            }
            bench_log.dispatch.append(row)
            benchmark.extra_info.update(row)
        k = _timing._calibrate(call, 2e-3)
        benchmark.pedantic(call, rounds=20, iterations=k, warmup_rounds=1)
