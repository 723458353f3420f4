"""``fastgpt bench``: a parity check and the benchmarks of every op available on this machine.

    fastgpt bench [--ops OP ...] [--quick] [--full] [--json PATH] [--plot PATH] [--threads N] [--tier TIER]

On a GPU: each op's kernel (strict: a missing kernel is reported, never timed as a fallback) against
its peers (eager PyTorch, torch SDPA's backends, torch.compile, flash-attn / liger-kernel when
installed), CUDA-event medians with an L2 flush, GB/s or TFLOP/s and their % of the copy bandwidth /
bf16 matmul measured in the same run, and the GPT-2 124M training step. On a CPU-only machine: which
GPU backends are unavailable and why, then what can be measured here: fastgpt's dispatch overhead on
the reference path against calling torch directly, and a small GPT step.

Leads with a short summary (what ran, the parity verdicts, the overhead or target verdicts, one line
on the static report); ``--full`` adds the tables (op, shape, fastgpt time, best peer and its time,
speed-up, % of roofline, parity max error), which a GPU run always prints. Writes every figure with
the device and versions as JSON (``--json``) and a speed-up chart as a PNG (``--plot``). Exit status 1 when a parity check fails or a case raises (the others still run), else 0.

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
    parser.add_argument("--full", action="store_true", help="print every table after the summary (always on a GPU; all figures are in --json)")
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


# --------------------------------------------------------------------------------------------
# the run, in named steps
# --------------------------------------------------------------------------------------------


def _environment(args):
    """What this machine offers, as a user's process sees it (before the interpreter is switched on)."""
    import torch

    from fastgpt import info as info_mod
    from fastgpt.tools.bench.parity import enable_interpreter

    on_gpu = torch.cuda.is_available()
    env = info_mod.collect()
    unavailable = _gpu_backend_status(env["ops"])
    if not on_gpu:
        unavailable["cuda extension"] = env["cuda_extension"]["reason"]
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    return {
        "on_gpu": on_gpu,
        "env": env,
        "unavailable": unavailable,
        "interp_note": enable_interpreter(on_gpu),
        "device": device,
        "dev": _device_info(device),
        "ops": list(args.ops or OP_CHOICES),
        "tier": "quick" if args.quick else (args.tier or "default"),
    }


def _print_header(run, args) -> None:
    import fastgpt

    env, dev, on_gpu = run["env"], run["dev"], run["on_gpu"]
    print(f"fastgpt bench {fastgpt.__version__}: torch {env['torch']} (CUDA {env['torch_cuda']}), triton {env['triton']}, python {env['python']}")
    print(f"device: {dev['name']} ({dev['type']})" + (f", sm_{dev['capability'].replace('.', '')}" if on_gpu else ""))
    if run["unavailable"]:
        print("GPU backends unavailable here (fastgpt.explain):")
        for backend, reason in run["unavailable"].items():
            print(f"  {backend:<14} {reason}")
    if not on_gpu:
        print(f"no CUDA device (torch.cuda.is_available() is False): every op runs its plain-torch reference; "
              f"measuring fastgpt's dispatch overhead against calling torch directly ({args.threads} torch thread(s))")
    if run["interp_note"]:
        print(run["interp_note"])


def _measure(run, args) -> None:
    """The parity check, the roofline probe and every measurement; results go into ``run``."""
    from fastgpt.tools.bench import parity, runs
    from fastgpt.tools.bench import timing as _timing

    on_gpu, device, ops = run["on_gpu"], run["device"], run["ops"]
    records, skipped, gpt_rows = [], [], []
    run.update(records=records, skipped=skipped, gpt_rows=gpt_rows)
    with _timing.cpu_threads(None if on_gpu else args.threads):
        run["parity"] = parity.check_ops(ops, device, on_gpu)
        roofline = run["roofline"] = _timing.probe_roofline(device, quick=args.quick)
        if on_gpu:
            work = runs.gpu_work(ops, run["tier"], device, roofline, args.quick, records, skipped, gpt_rows)
        else:
            work = runs.cpu_work(ops, args.quick, roofline, records, skipped, gpt_rows)
        run["errors"] = runs.run_work(work, progress=not args.no_progress, on_gpu=on_gpu)


def _timing_note(on_gpu: bool, threads: int) -> str:
    if on_gpu:
        return "GPU times: CUDA-event medians, L2 flushed before each call; speed-up = best peer time / fastgpt time"
    clock = "this thread's CPU time" if threads == 1 else "wall clock"
    return (f"CPU times: {clock}, minimum over alternating torch/fastgpt rounds (the machine may be shared); "
            "fastgpt runs its plain-torch reference here, so these rows measure dispatch overhead, not kernels; "
            "% roofline is against one thread's DRAM copy bandwidth / matmul, so cache-resident sizes can exceed 100")


def _report(run, args, elapsed: float) -> dict:
    """Every figure, the device and versions: the JSON document."""
    import datetime

    import fastgpt
    from fastgpt.tools.bench import timing as _timing

    env, on_gpu = run["env"], run["on_gpu"]
    return {
        "tool": "fastgpt bench",
        "fastgpt": fastgpt.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "elapsed_s": round(elapsed, 2),
        "quick": bool(args.quick),
        "tier": run["tier"] if on_gpu else ("quick" if args.quick else "default"),
        "ops": run["ops"],
        "device": run["dev"],
        "versions": {k: env[k] for k in ("fastgpt", "python", "platform", "torch", "torch_cuda", "triton", "transformers")},
        "backends": env["ops"],
        "gpu_backends_unavailable": run["unavailable"],
        "cpu_threads": None if on_gpu else args.threads,
        "timing": run["note"],
        "work_model": _timing.WORK_MODEL,
        "roofline": run["roofline"].as_dict(),
        "parity": run["parity"],
        "results": run["rows"],
        "records": run["records"],
        "gpt": run["gpt_rows"],
        "skipped": run["skipped"],
        "errors": run["errors"],
        "static_report": run["static"],
        "notes": [n for n in (run["interp_note"],) if n],
    }


def main(args: argparse.Namespace) -> int:
    import json
    import time

    from fastgpt.tools.bench import output

    start = time.perf_counter()
    run = _environment(args)
    _print_header(run, args)
    _measure(run, args)
    on_gpu = run["on_gpu"]
    run["rows"] = output.rows_of(run["records"], run["parity"], on_gpu)
    run["note"] = _timing_note(on_gpu, args.threads)
    run["static"] = None if on_gpu else static_report_hook(args.quick)

    print()
    summary = output.summary_lines(run["ops"], run["parity"], run["rows"], run["records"], run["skipped"], run["errors"], run["static"], on_gpu)
    print("\n".join(summary))
    if args.full or on_gpu:
        print("\n".join(output.detail_lines(run["parity"], run["rows"], run["roofline"], run["skipped"], run["note"], run["static"], on_gpu)))
    else:
        print("  the tables: fastgpt bench --full (every figure: --json PATH)")
    for e in run["errors"]:
        print(f"ERROR in {e['case']}: {e['error']}")

    elapsed = time.perf_counter() - start
    report = _report(run, args, elapsed)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2, default=str)
        print(f"\nwrote {args.json}")
    if args.plot:
        import fastgpt

        dev = run["dev"]
        title = f"fastgpt {fastgpt.__version__} on {dev['name']} ({'GPU' if on_gpu else 'CPU reference path: dispatch overhead'}), torch {run['env']['torch']}"
        output.write_plot(run["rows"], args.plot, title, on_gpu)
        print(f"wrote {args.plot}")
    print(f"fastgpt bench finished in {elapsed:.1f} s")
    failed = [p for p in run["parity"] if p["ok"] is False]
    return 1 if failed or run["errors"] else 0
