"""The measurements of ``fastgpt bench``: every GPU case and GPT step, or on a CPU the dispatch
overhead of each op and a small GPT step; each as a (label, thunk) pair run by :func:`run_work`."""

import sys

import torch

from fastgpt import backends
from fastgpt.tools.bench import dispatch_cases as dc
from fastgpt.tools.bench import gpt_steps as gs
from fastgpt.tools.bench import op_cases as bc
from fastgpt.tools.bench import timing as _timing


def gpu_work(ops, tier, device, roofline, quick, records, skipped, gpt_rows):
    """(label, thunk) pairs: every GPU measurement, in order."""
    work = []
    fastgpt_missing = {}

    def op_case(case, impl):
        def run():
            primary = bc.fastgpt_impl(case.op)
            if case.op in fastgpt_missing and impl != primary:
                skipped.append({"group": case.group, "impl": impl, "reason": f"not measured: fastgpt cannot run {case.op} here"})
                return
            try:
                prepared = bc.prepare(case, impl, device)
            except bc.Unavailable as exc:
                skipped.append({"group": case.group, "impl": impl, "reason": str(exc)})
                if impl == primary:
                    fastgpt_missing[case.op] = str(exc)
                return
            kwargs = {"rep_ms": 40.0, "warmup_ms": 10.0} if quick else {}
            records.append(bc.measure(prepared, roofline, **kwargs))

        return run

    for op in ops:
        if op == "gpt":
            continue
        for case in bc.gpu_cases(op, tier):
            for impl in bc.impls_for(op):
                work.append((f"{case.group} {impl}", op_case(case, impl)))
    if "gpt" in ops:
        impls = ["fastgpt", "torch-eager"] + ([] if quick else ["torch-compile"])
        name = torch.cuda.get_device_name(device)

        def gpt(impl):
            def run():
                try:
                    step = gs.prepare_gpt_step(impl, device, config=gs.GPT2_124M, batch=8, amp_dtype=torch.bfloat16)
                except bc.Unavailable as exc:
                    skipped.append({"group": "gpt2-124m train step", "impl": impl, "reason": str(exc)})
                    return
                with step.context():
                    timing = _timing.time_cuda(step.step, flush_l2=False, warmup_ms=100, rep_ms=500 if quick else 1000, min_reps=5, max_reps=30, device=device)
                rec = gs.gpt_record(step, timing, timing.median_ms, roofline, name)
                records.append(rec)
                gpt_rows.append(rec)
                del step
                torch.cuda.empty_cache()

            return run

        for impl in impls:
            work.append((f"gpt2-124m train step {impl}", gpt(impl)))
    return work


def cpu_work(ops, quick, roofline, records, skipped, gpt_rows):
    """(label, thunk) pairs: the dispatch overhead of each op and a small GPT step, on the host clock."""
    sizes = ("tiny", "realistic") if quick else ("tiny", "small", "realistic")
    work = []

    def dispatch(case):
        def run():
            torch_call, fast_call = dc.dispatch_pair(case)
            error = dc.check_dispatch_pair(case, torch_call, fast_call)
            with backends.use_backend("reference", strict=True):
                # larger cases get more rounds: on a shared machine their minima settle more slowly
                budget = (1.0 if case.size == "realistic" else 0.3) if quick else (2.0 if case.size == "realistic" else 1.0)
                cmp = _timing.compare_cpu(torch_call, fast_call, budget_s=budget)
            unit, limit = case.target()
            opcase = dc.dispatch_work_case(case)
            rec = {
                "op": case.op,
                "mode": case.mode,
                "shape": f"{case.size} {case.shape_label}",
                "group": case.group,
                "impl": "fastgpt-reference",
                "ms": cmp.b.min_ms,
                "torch_ms": cmp.a.min_ms,
                "peers_ms": {"torch": cmp.a.min_ms},
                "overhead_us": cmp.overhead_us,
                "overhead_pct": cmp.overhead_pct,
                "paired_overhead_us": cmp.paired_overhead_us,
                "target": f"overhead <= {limit:g} {'us' if unit == 'us' else '%'}",
                "meets_target": case.meets_target(cmp.overhead_us, cmp.overhead_pct),
                "timing": {"torch": cmp.a.as_dict(), "fastgpt": cmp.b.as_dict()},
                "check_rel_error": error,
                **bc.metrics(opcase, cmp.b.min_ms, roofline),
            }
            records.append(rec)

        return run

    for case in dc.dispatch_cases(sizes, [op for op in ops if op != "gpt"]):
        work.append((case.group, dispatch(case)))
    if "gpt" in ops:

        def gpt():
            cpu = torch.device("cpu")
            kwargs = dict(config=gs.GPT_CPU_SMALL, batch=12, amp_dtype=None, optimizer=False)
            try:
                fast = gs.prepare_gpt_step("fastgpt", cpu, **kwargs)
            except bc.Unavailable as exc:
                skipped.append({"group": "gpt small step (cpu)", "impl": "fastgpt", "reason": str(exc)})
                return
            plain = gs.prepare_gpt_step("torch-eager", cpu, **kwargs)
            with backends.use_backend("reference", strict=True):
                cmp = _timing.compare_cpu(plain.step, fast.step, budget_s=1.0 if quick else 3.0, batch_s=0.0)
            rec = gs.gpt_record(fast, cmp.b, cmp.b.min_ms, roofline, "cpu")
            rec.update(
                impl="fastgpt-reference",
                torch_ms=cmp.a.min_ms,
                peers_ms={"torch": cmp.a.min_ms},
                overhead_us=cmp.overhead_us,
                overhead_pct=cmp.overhead_pct,
                first_loss_torch=plain.first_loss,
            )
            records.append(rec)
            gpt_rows.append(rec)

        work.append(("gpt small step (cpu)", gpt))
    return work


def run_work(work, *, progress: bool, on_gpu: bool):
    """Run every (label, thunk); return the errors (one broken case must not hide every other figure)."""
    from tqdm import tqdm

    bar = tqdm(work, desc="fastgpt bench", unit="case", file=sys.stderr, disable=None if progress else True, dynamic_ncols=True)
    errors = []
    for label, thunk in bar:
        bar.set_postfix_str(label[:60], refresh=False)
        try:
            thunk()
        except Exception as exc:
            errors.append({"case": label, "error": f"{type(exc).__name__}: {exc}"})
            if on_gpu:
                torch.cuda.empty_cache()
    bc.release()
    return errors
