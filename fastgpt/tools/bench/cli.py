"""``fastgpt bench``: a parity check and the benchmarks of every op available on this machine.

    fastgpt bench [--ops OP ...] [--quick] [--json PATH] [--plot PATH] [--threads N] [--tier TIER]

On a GPU: each op's kernel (strict: a missing kernel is reported, never timed as a fallback) against
its peers (eager PyTorch, torch SDPA's backends, torch.compile, flash-attn / liger-kernel when
installed), CUDA-event medians with an L2 flush, GB/s or TFLOP/s and their % of the copy bandwidth /
bf16 matmul measured in the same run, and the GPT-2 124M training step. On a CPU-only machine: which
GPU backends are unavailable and why, then what can be measured here: fastgpt's dispatch overhead on
the reference path against calling torch directly, and a small GPT step.

Prints a table (op, shape, fastgpt time, best peer and its time, speed-up, % of roofline, parity max
error), writes every figure with the device and versions as JSON (``--json``) and a speed-up chart as a
PNG (``--plot``). Exit status 1 when a parity check fails or a case raises (the others still run), else 0.

This module's top level imports only argparse and the op registry: the ``fastgpt`` CLI imports it to
build its parser.
"""

import argparse

from fastgpt import registry

OP_CHOICES = registry.names() + ("gpt",)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ops", nargs="+", choices=OP_CHOICES, metavar="OP", help=f"ops to run (default: all of {', '.join(OP_CHOICES)})")
    parser.add_argument("--quick", action="store_true", help="a few shapes per op, no torch.compile peers, short timings")
    parser.add_argument("--tier", choices=("quick", "default", "full"), default=None, help="shape set on a GPU (default: default; --quick means quick)")
    parser.add_argument("--json", metavar="PATH", help="write every figure, the device and versions as JSON to PATH")
    parser.add_argument("--plot", metavar="PATH", help="write a PNG of the speed-up per op and size to PATH (needs matplotlib)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for CPU timings (default 1: steadier on a shared machine)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


# --------------------------------------------------------------------------------------------
# the static report (compiled machine code) for machines without a GPU
# --------------------------------------------------------------------------------------------


def static_report_hook(quick: bool) -> dict:
    """The static report (``fastgpt inspect``'s) for machines without a GPU.

    Where no GPU can time the kernels, the next best evidence is their machine code compiled for
    sm_80 / sm_90 (registers, spills, shared memory, occupancy, vector loads, MMA) and the roofline
    time a byte/FLOP model gives on an H100 and an A100: ``fastgpt.tools.inspect.report.bench_summary(quick)``,
    a dict with ``"rows"`` (one flat dict per op, shape and GPU), ``"text"`` (the roofline table and any
    problem, preformatted) and ``"problems"``. It compiles the Triton kernels (cached under
    $FASTGPT_CACHE_DIR/kernel_report) but not the CUDA extension (it reads it when it is built).
    """
    import importlib

    try:
        report = importlib.import_module("fastgpt.tools.inspect.report")
    except ModuleNotFoundError as exc:
        if exc.name != "fastgpt.tools.inspect.report":
            raise
        return {"available": False, "reason": "fastgpt.tools.inspect.report (`fastgpt inspect`) is not part of this build yet"}
    summary = getattr(report, "bench_summary", None)
    if summary is None:
        return {"available": False, "reason": "fastgpt.tools.inspect.report has no bench_summary(quick) yet"}
    try:
        return {"available": True, **summary(quick=quick)}
    except Exception as exc:  # the report needs nvcc / triton's compiler; its failure must not sink the bench
        return {"available": False, "reason": f"fastgpt.tools.inspect.report.bench_summary failed: {type(exc).__name__}: {exc}"}


# --------------------------------------------------------------------------------------------
# parity
# --------------------------------------------------------------------------------------------


def run_parity(op: str, backend: str, device, dtype, *, tiny: bool = False) -> dict:
    """The parity rule (docs/design.md, 'Parity rule'; fastgpt.testing.check_against_torch) for ``op`` on ``backend``, strict."""
    from fastgpt import backends, testing

    from fastgpt.tools.bench import op_cases as bc

    spec = registry.get(op)
    tiny_dims, dims = spec.parity_dims  # lengths and widths that are not multiples of a block
    # the same op formulations and inputs as the benchmarks (causal attention: Sq == Sk, so torch's
    # mask is fastgpt's); check_against_torch rounds the float32 inputs to ``dtype``
    case = bc.OpCase(op, "fwd+bwd", tuple(zip(spec.dims, tiny_dims if tiny else dims)), "float32", causal=True)
    inputs, _ = bc._inputs(case, device)
    row = {"op": op, "backend": backend, "dtype": str(dtype).replace("torch.", ""), "device": str(device)}
    try:
        with backends.use_backend(backend, strict=True):
            results = testing.check_against_torch(op, bc._fastgpt_fn(case), bc._torch_fn(case, device), inputs, dtype)
    except backends.BackendUnavailableError as exc:
        return {**row, "ok": None, "unavailable": str(exc)}
    except AssertionError as exc:
        return {**row, "ok": False, "failure": str(exc)}
    worst = max(results, key=lambda p: p.error / max(p.bound, 1e-30))
    return {
        **row,
        "ok": True,
        "max_error": max(p.error for p in results),
        "worst": str(worst),
        "checks": [str(p) for p in results],
    }


# --------------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------------


def _maybe_enable_interpreter(on_gpu: bool) -> str:
    """On a CPU-only machine, let the Triton attention kernel run its parity check in the interpreter.

    TRITON_INTERPRET must be set before triton is imported; nothing has imported it yet in a fresh
    ``fastgpt bench`` process. Returns a note for the report.
    """
    import importlib.util
    import os
    import sys

    if on_gpu:
        return ""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return "TRITON_INTERPRET=1: the Triton kernels run in the interpreter for the parity check"
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed: the Triton kernels cannot be checked here"
    if "triton" in sys.modules:
        return "triton was imported before TRITON_INTERPRET could be set: the Triton kernels are not checked here"
    os.environ["TRITON_INTERPRET"] = "1"
    return "TRITON_INTERPRET=1 set by fastgpt bench: the Triton kernels run in the interpreter for the parity check"


def _device_info(device) -> dict:
    import torch

    if device.type != "cuda":
        import platform

        return {"type": "cpu", "name": platform.processor() or platform.machine(), "threads_available": torch.get_num_threads()}
    props = torch.cuda.get_device_properties(device)
    return {
        "type": "cuda",
        "name": props.name,
        "capability": f"{props.major}.{props.minor}",
        "memory_gib": round(props.total_memory / 2**30, 1),
        "sms": props.multi_processor_count,
    }


def _gpu_backend_status(explain: dict) -> dict:
    """{backend: reason} for every GPU backend that cannot serve the typical call here."""
    out = {}
    for row in explain.values():
        for backend, state in row["candidates"].items():
            if state != "available":
                out.setdefault(backend, state)
    return out


def _gpu_work(ops, tier, device, roofline, quick, records, skipped, gpt_rows):
    """(label, thunk) pairs: every GPU measurement, in order."""
    import torch

    from fastgpt.tools.bench import op_cases as bc
    from fastgpt.tools.bench import timing as _timing

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
                    step = bc.prepare_gpt_step(impl, device, config=bc.GPT2_124M, batch=8, amp_dtype=torch.bfloat16)
                except bc.Unavailable as exc:
                    skipped.append({"group": "gpt2-124m train step", "impl": impl, "reason": str(exc)})
                    return
                with step.context():
                    timing = _timing.time_cuda(step.step, flush_l2=False, warmup_ms=100, rep_ms=500 if quick else 1000, min_reps=5, max_reps=30, device=device)
                rec = bc.gpt_record(step, timing, timing.median_ms, roofline, name)
                records.append(rec)
                gpt_rows.append(rec)
                del step
                torch.cuda.empty_cache()

            return run

        for impl in impls:
            work.append((f"gpt2-124m train step {impl}", gpt(impl)))
    return work


def _cpu_work(ops, quick, roofline, records, skipped, gpt_rows):
    """(label, thunk) pairs: the dispatch overhead of each op and a small GPT step, on the host clock."""
    import torch

    from fastgpt.tools.bench import op_cases as bc
    from fastgpt import backends
    from fastgpt.tools.bench import timing as _timing

    sizes = ("tiny", "realistic") if quick else ("tiny", "small", "realistic")
    work = []

    def dispatch(case):
        def run():
            torch_call, fast_call = bc.dispatch_pair(case)
            error = bc.check_dispatch_pair(case, torch_call, fast_call)
            with backends.use_backend("reference", strict=True):
                # larger cases get more rounds: on a shared machine their minima settle more slowly
                budget = (1.0 if case.size == "realistic" else 0.3) if quick else (2.0 if case.size == "realistic" else 1.0)
                cmp = _timing.compare_cpu(torch_call, fast_call, budget_s=budget)
            unit, limit = case.target()
            opcase = bc.dispatch_work_case(case)
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

    for case in bc.dispatch_cases(sizes, [op for op in ops if op != "gpt"]):
        work.append((case.group, dispatch(case)))
    if "gpt" in ops:

        def gpt():
            cpu = torch.device("cpu")
            kwargs = dict(config=bc.GPT_CPU_SMALL, batch=12, amp_dtype=None, optimizer=False)
            try:
                fast = bc.prepare_gpt_step("fastgpt", cpu, **kwargs)
            except bc.Unavailable as exc:
                skipped.append({"group": "gpt small step (cpu)", "impl": "fastgpt", "reason": str(exc)})
                return
            plain = bc.prepare_gpt_step("torch-eager", cpu, **kwargs)
            with backends.use_backend("reference", strict=True):
                cmp = _timing.compare_cpu(plain.step, fast.step, budget_s=1.0 if quick else 3.0, batch_s=0.0)
            rec = bc.gpt_record(fast, cmp.b, cmp.b.min_ms, roofline, "cpu")
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


def _rows(records, parity, on_gpu):
    """The table rows (and the JSON's "results"): one per case fastgpt ran."""
    from fastgpt.tools.bench import op_cases as bc

    par = {p["op"]: p for p in parity if p.get("primary")}
    rows = []
    if on_gpu:
        for c in bc.compare_records([r for r in records if "ms" in r]):
            m = c["metric"]
            p = par.get(c["op"], {})
            rows.append(
                {
                    "op": c["op"],
                    "mode": c["mode"],
                    "shape": c["shape"],
                    "fastgpt_impl": c["impl"],
                    "fastgpt_ms": c["ms"],
                    "best_peer": c["best_peer"],
                    "best_peer_ms": c["best_peer_ms"],
                    "speedup_vs_best": c["speedup_vs_best"],
                    "peers_ms": c["peers_ms"],
                    "speedup_vs": c["speedup_vs"],
                    "metric": m,
                    "pct_of_roofline": m.get("pct_of_copy_bandwidth", m.get("pct_of_matmul")),
                    "parity_max_error": p.get("max_error"),
                    "targets": c["targets"],
                }
            )
        return rows
    for r in records:
        if "ms" not in r:
            continue
        p = par.get(r["op"], {})
        torch_ms = r["torch_ms"]
        rows.append(
            {
                "op": r["op"],
                "mode": r["mode"],
                "shape": r["shape"],
                "fastgpt_impl": r["impl"],
                "fastgpt_ms": r["ms"],
                "best_peer": "torch",
                "best_peer_ms": torch_ms,
                "speedup_vs_best": torch_ms / r["ms"],
                "peers_ms": r["peers_ms"],
                "speedup_vs": {"torch": torch_ms / r["ms"]},
                "metric": {k: r[k] for k in ("GB/s", "TFLOP/s", "pct_of_copy_bandwidth", "pct_of_matmul", "tokens_per_s") if k in r and r[k] is not None},
                "pct_of_roofline": r.get("pct_of_copy_bandwidth", r.get("pct_of_matmul")),
                "parity_max_error": p.get("max_error"),
                "overhead_us": r["overhead_us"],
                "overhead_pct": r["overhead_pct"],
                "target": r.get("target"),
                "meets_target": r.get("meets_target"),
            }
        )
    return rows


def _fmt_time(ms) -> str:
    if ms is None:
        return "-"
    if ms < 1:
        return f"{ms * 1e3:.1f} us"
    if ms < 1e3:
        return f"{ms:.3f} ms"
    return f"{ms / 1e3:.2f} s"


def _fmt_num(x, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def format_table(rows, on_gpu: bool) -> str:
    """The printed table; the JSON holds every figure, this is the digest."""
    head = ["op", "mode", "shape", "fastgpt", "best peer", "peer time", "speed-up", "% roofline", "parity err"]
    head += ["targets"] if on_gpu else ["overhead", "target"]
    lines = []
    for r in rows:
        cells = [
            r["op"],
            r["mode"],
            r["shape"],
            _fmt_time(r["fastgpt_ms"]),
            r["best_peer"] or "-",
            _fmt_time(r["best_peer_ms"]),
            _fmt_num(r["speedup_vs_best"], ".2f") + ("x" if r["speedup_vs_best"] is not None else ""),
            _fmt_num(r["pct_of_roofline"], ".1f"),
            _fmt_num(r["parity_max_error"], ".1e"),
        ]
        if on_gpu:
            cells.append("; ".join(f"{t['target']}: {t['value']:.2f} {'ok' if t['ok'] else 'MISS'}" for t in r["targets"]) or "-")
        else:
            cells += [f"{r['overhead_us']:+.1f} us {r['overhead_pct']:+.1f}%", f"{r['target'] or '-'} {'ok' if r.get('meets_target') else 'MISS' if r.get('target') else ''}"]
        lines.append(cells)
    widths = [max(len(str(c)) for c in col) for col in zip(head, *lines)] if lines else [len(h) for h in head]
    fmt = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    out = [fmt(head), fmt(["-" * w for w in widths])]
    out += [fmt(c) for c in lines]
    return "\n".join(out)


def write_plot(rows, path: str, title: str, on_gpu: bool) -> None:
    """A horizontal bar per (op, mode, shape): the speed-up against the best peer (GPU) or torch (CPU)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r["speedup_vs_best"] is not None]
    labels = [f"{r['op']} {r['mode']} {r['shape']}" for r in rows]
    values = [r["speedup_vs_best"] for r in rows]
    ops = sorted({r["op"] for r in rows})
    cmap = plt.get_cmap("tab10")
    colours = [cmap(ops.index(r["op"]) % 10) for r in rows]
    fig, ax = plt.subplots(figsize=(10, max(2.5, 0.28 * len(rows) + 1.5)))
    y = list(range(len(rows)))[::-1]
    ax.barh(y, values, color=colours)
    ax.set_yticks(y)
    ax.set_yticklabels(labels, fontsize=7)
    ax.axvline(1.0, color="black", linewidth=0.8)
    if not on_gpu:
        ax.axvline(1 / 1.05, color="grey", linestyle="--", linewidth=0.8, label="5% overhead")
        ax.legend(loc="lower right", fontsize=7)
        ax.set_xlabel("torch time / fastgpt time (1.0 = no dispatch overhead)")
    else:
        ax.set_xlabel("best peer time / fastgpt time (above 1: fastgpt faster)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(args: argparse.Namespace) -> int:
    import datetime
    import json
    import sys
    import time

    start = time.perf_counter()
    import torch

    import fastgpt
    from fastgpt import info as info_mod

    on_gpu = torch.cuda.is_available()
    # what this machine offers, as a user's process sees it (before the interpreter is switched on)
    env = info_mod.collect()
    explain = env["ops"]
    unavailable = _gpu_backend_status(explain)
    if not on_gpu:
        unavailable["cuda extension"] = env["cuda_extension"]["reason"]
    interp_note = _maybe_enable_interpreter(on_gpu)

    from fastgpt.tools.bench import op_cases as bc
    from fastgpt import backends
    from fastgpt.tools.bench import timing as _timing

    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    ops = list(args.ops or OP_CHOICES)
    tier = "quick" if args.quick else (args.tier or "default")
    dev = _device_info(device)
    print(f"fastgpt bench {fastgpt.__version__}: torch {env['torch']} (CUDA {env['torch_cuda']}), triton {env['triton']}, python {env['python']}")
    print(f"device: {dev['name']} ({dev['type']})" + (f", sm_{dev['capability'].replace('.', '')}" if on_gpu else ""))
    if unavailable:
        print("GPU backends unavailable here (fastgpt.explain):")
        for backend, reason in unavailable.items():
            print(f"  {backend:<14} {reason}")
    if not on_gpu:
        print(f"no CUDA device (torch.cuda.is_available() is False): every op runs its plain-torch reference; "
              f"measuring fastgpt's dispatch overhead against calling torch directly ({args.threads} torch thread(s))")
    if interp_note:
        print(interp_note)

    threads = _timing.cpu_threads(None if on_gpu else args.threads)
    records, skipped, gpt_rows, parity = [], [], [], []
    with threads:
        # parity: the benchmarked path of each op (strict GPU backend on a GPU, the reference on a CPU),
        # plus the Triton kernel under the interpreter on a CPU when it can run there
        dtype = torch.bfloat16 if on_gpu else torch.float32
        for op in ops:
            if op == "gpt":
                continue
            backend = registry.OP_BACKENDS[op][0] if on_gpu else "reference"
            parity.append({**run_parity(op, backend, device, dtype), "primary": True})
            if not on_gpu and "triton" in registry.OP_BACKENDS[op] and backends.backend_unavailable_reason("triton", device) is None:
                parity.append({**run_parity(op, "triton", device, torch.float32, tiny=True), "primary": False, "note": "Triton interpreter"})
        roofline = _timing.probe_roofline(device, quick=args.quick)
        if on_gpu:
            work = _gpu_work(ops, tier, device, roofline, args.quick, records, skipped, gpt_rows)
        else:
            work = _cpu_work(ops, args.quick, roofline, records, skipped, gpt_rows)
        from tqdm import tqdm

        bar = tqdm(work, desc="fastgpt bench", unit="case", file=sys.stderr, disable=True if args.no_progress else None, dynamic_ncols=True)
        errors = []
        for label, thunk in bar:
            bar.set_postfix_str(label[:60], refresh=False)
            try:
                thunk()
            except Exception as exc:  # one broken case must not hide every other figure
                errors.append({"case": label, "error": f"{type(exc).__name__}: {exc}"})
                if on_gpu:
                    torch.cuda.empty_cache()
        bc.release()

    rows = _rows(records, parity, on_gpu)
    print()
    print("parity (fastgpt.testing rule: max|out - ref64| <= 2 max|torch - ref64| + atol, 3x for gradients):")
    for p in parity:
        state = "ok" if p["ok"] else ("unavailable" if p["ok"] is None else "FAILS")
        detail = p.get("worst") or p.get("unavailable") or p.get("failure", "")
        note = f" [{p['note']}]" if p.get("note") else ""
        print(f"  {p['op']:<15} {p['backend']:<9} {p['dtype']:<8} {state:<11} {detail}{note}")
    print()
    print(f"roofline probe ({roofline.device}): copy {roofline.copy_gbps:,.1f} GB/s, "
          f"{roofline.matmul_dtype} matmul {roofline.matmul_tflops:,.3f} TFLOP/s ({roofline.method})")
    print()
    print(format_table(rows, on_gpu))
    if skipped:
        reasons = {}
        for s in skipped:
            reasons.setdefault(f"{s['impl']}: {s['reason']}", 0)
            reasons[f"{s['impl']}: {s['reason']}"] += 1
        print("\nnot measured:")
        for reason, n in reasons.items():
            print(f"  [{n}] {reason}")
    if on_gpu:
        note = "GPU times: CUDA-event medians, L2 flushed before each call; speed-up = best peer time / fastgpt time"
    else:
        clock = "this thread's CPU time" if args.threads == 1 else "wall clock"
        note = (f"CPU times: {clock}, minimum over alternating torch/fastgpt rounds (the machine may be shared); "
                "fastgpt runs its plain-torch reference here, so these rows measure dispatch overhead, not kernels; "
                "% roofline is against one thread's DRAM copy bandwidth / matmul, so cache-resident sizes can exceed 100")
    print(note)
    for e in errors:
        print(f"ERROR in {e['case']}: {e['error']}")

    static = None
    if not on_gpu:
        static = static_report_hook(args.quick)
        print("\nstatic report (compiled machine code; stands in for GPU timings on this machine):")
        if static.get("available"):
            for line in static.get("text", []) or [str(r) for r in static.get("rows", [])]:
                print(f"  {line}")
        else:
            print(f"  not available: {static['reason']}")

    elapsed = time.perf_counter() - start
    report = {
        "tool": "fastgpt bench",
        "fastgpt": fastgpt.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "elapsed_s": round(elapsed, 2),
        "quick": bool(args.quick),
        "tier": tier if on_gpu else ("quick" if args.quick else "default"),
        "ops": ops,
        "device": dev,
        "versions": {k: env[k] for k in ("fastgpt", "python", "platform", "torch", "torch_cuda", "triton", "transformers")},
        "backends": explain,
        "gpu_backends_unavailable": unavailable,
        "cpu_threads": None if on_gpu else args.threads,
        "timing": note,
        "work_model": _timing.WORK_MODEL,
        "roofline": roofline.as_dict(),
        "parity": parity,
        "results": rows,
        "records": records,
        "gpt": gpt_rows,
        "skipped": skipped,
        "errors": errors,
        "static_report": static,
        "notes": [n for n in (interp_note,) if n],
    }
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2, default=str)
        print(f"\nwrote {args.json}")
    if args.plot:
        title = f"fastgpt {fastgpt.__version__} on {dev['name']} ({'GPU' if on_gpu else 'CPU reference path: dispatch overhead'}), torch {env['torch']}"
        write_plot(rows, args.plot, title, on_gpu)
        print(f"wrote {args.plot}")
    print(f"fastgpt bench finished in {elapsed:.1f} s")
    failed = [p for p in parity if p["ok"] is False]
    return 1 if failed or errors else 0
