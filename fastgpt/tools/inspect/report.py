"""``fastgpt inspect``: every kernel compiled for sm_80 and sm_90, its machine code read, and a roofline model.

    fastgpt inspect [--quick] [--json PATH] [--plot PATH] [--jobs N] [--no-cache] [--only triton|cuda] [--no-progress]

No GPU is needed. For a table of standard shapes (GPT-2 small to 8B-class) it takes each launch
exactly as fastgpt's launchers would make it, reads what the GPU toolchain made of it, and models
what that implies on an H100 and an A100:

* **Triton attention** (kernels/flash_attention.py): the launch plans the launcher itself builds
  (``example_plans`` on meta tensors), each tuning candidate, compiled with ``triton.compile`` for
  sm_80 and sm_90 with the specialisation triton's JIT launcher computes for those arguments (16-byte
  divisibility of pointers and strides, ints equal to 1 as constants; see
  ``compiling.launch_specialization``). Compiles run in a pool of processes without
  TRITON_INTERPRET, and their readings are cached under ``$FASTGPT_CACHE_DIR/kernel_report``, keyed by
  the kernel's source hash, the specialisation, the config, the architecture and triton's version.
* **Triton row-wise kernels** (RMSNorm, SwiGLU, rotary, cross-entropy: every op whose registry entry
  has ``report_launches``): each kernel module's ``example_plans`` (the launcher's own plan functions
  on meta tensors) compiled the same way, one config per launch (these kernels are not tuned); see
  ``triton_ops``.
* **CUDA layer norm / GELU** (csrc/): the kernels the C++ launchers pick (vector or scalar path, block
  and grid) come from running those launchers in a dry run of the CPU emulator of the test suite
  (fastgpt/tools/cuda_emu: the unmodified csrc/ compiled for the host; no kernel runs, the pointers are fake
  and aligned like torch's allocations, the device has the GPU's SM count); registers, stack and
  shared memory and the SASS of those kernels come from the CUDA extension that
  ``fastgpt.cuda_ext`` built for sm_80 and sm_90 (built once if it is missing; not compiled again here).

Read from the machine code (``cuobjdump -res-usage`` / ``-sass`` of the triton wheel): registers per
thread, stack bytes and STL/LDL instructions (spills), shared memory, tensor-core MMA instructions
(HMMA, Hopper's HGMMA), MUFU (exp2, rcp, rsqrt, ...), global loads and stores by width
(LDG.E.128 vs narrower). Derived: theoretical occupancy from the per-SM limits (registers with their
allocation granularity, shared memory with the 1 KiB reserved per block, threads, blocks), and a
byte/FLOP model per call: the minimum HBM bytes (docs/design.md, 'Performance targets and the byte/FLOP model'; each op's registry entry), the bytes
the tiling requests (K/V re-read once per query tile, partial-sum rows, extra passes over wide rows),
the HBM bytes after a simple L2 model, and the roofline time and fraction that implies.

What it proves: the kernels compile for real GPUs (not only under the interpreter), fit the
register file and shared memory, do not spill, use the tensor cores and 128-bit accesses where they
should. What it does not: every time and fraction in the report is a *model*, not a measurement.
Latency, pipelining, bank conflicts, L2 behaviour beyond the simple model, clocks and the tuner's
choice are only seen by running on a GPU (``fastgpt bench``, ``scripts/gpu_check.sh``).

Exit status 1 when a default config has a problem (a spill, a block that does not fit, no MMA, no
128-bit accesses on a vector path, a kernel that does not compile), else 0.

This module builds the report and holds the CLI; the GPU table (``gpus``), the Triton compiles
(``compile_jobs``, ``compiling``), the CUDA launches (``launches``), the byte/FLOP model (``model``) and
the tables/plot (``output``) are its neighbours in ``fastgpt.tools.inspect``. Its top level imports
only the standard library, the op registry and those modules: the ``fastgpt`` CLI imports it to build
its parser.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict
from typing import Any, Dict, List, Optional, Sequence

from fastgpt.tools.inspect.gpus import CONSUMER_SMEM_PER_BLOCK, GPUS, Gpu, occupancy  # noqa: F401
from fastgpt.tools.inspect.model import ATTENTION_CASES, CUDA_CASES, CUDA_OPS, TILING_MODEL, _attention_model, _attention_work, _cuda_cases, _cuda_min_bytes, _cuda_model  # noqa: F401
from fastgpt.tools.inspect.compile_jobs import _Workers, compile_attention  # noqa: F401
from fastgpt.tools.inspect.launches import Unavailable, _cuda_vector_path, _load_emulator, cuda_launches, cuda_machine_code  # noqa: F401
from fastgpt.tools.inspect.output import _widths, format_report, write_plot  # noqa: F401
from fastgpt.tools.inspect import pipe_model
from fastgpt.tools.inspect import triton_ops

__all__ = [
    "GPUS",
    "Gpu",
    "occupancy",
    "ATTENTION_CASES",
    "CUDA_CASES",
    "build_report",
    "bench_summary",
    "compile_attention",
    "cuda_launches",
    "cuda_machine_code",
    "launch_problems",
    "launch_notes",
    "Unavailable",
    "format_report",
    "write_plot",
    "add_arguments",
    "main",
]


# --------------------------------------------------------------------------------------------
# checks (shared by the report and the tests)
# --------------------------------------------------------------------------------------------


def launch_problems(row: Dict[str, Any]) -> List[str]:
    """What is wrong with one compiled launch on one GPU (a row of the report), each message naming
    the kernel, its config and the figure. Checks: one block fits; no spills (stack frame, local
    memory, STL/LDL instructions) in 16-bit attention and CUDA kernels (the exact-fp32 attention path
    may spill a little: it holds its operands in registers); tensor-core MMA in the attention dot
    kernels on 16-bit inputs; 128-bit global loads and stores on the CUDA kernels' vector paths; no
    atomics except in the kernels named ``*_atomic`` (the opt-in non-deterministic attention backward).
    Disassembly-based checks are skipped for rows whose SASS was not read."""
    where = f"{row['kernel']} [{row['config']}] on {row['gpu']} (sm_{row['arch']}) for {row['case']}"
    problems = []
    if row["blocks_per_sm"] == 0:
        problems.append(f"{where}: one block does not fit: {row['shared']} B shared memory (limit {row['smem_limit']}), "
                        f"{row['registers']} registers x {row['threads']} threads")
    local_traffic = (row["stl"] or 0) + (row["ldl"] or 0)
    if (local_traffic or row["stack"] or row["local"]) and (row["source"] == "cuda" or row["dtype"] != "float32"):
        sass = f"{row['stl']} STL / {row['ldl']} LDL instructions, " if row["stl"] is not None else ""
        problems.append(f"{where}: spills registers: {sass}{row['stack']} B stack per thread at {row['registers']} registers")
    if row["role"] == "mma" and row["dtype"] != "float32" and row["hmma"] is not None and row["hmma"] + row["hgmma"] == 0:
        problems.append(f"{where}: no tensor-core MMA (0 HMMA, 0 HGMMA) for {row['dtype']} inputs")
    if row.get("atomics") and not row["kernel"].endswith("_atomic"):
        problems.append(f"{where}: {row['atomics']} atomic instructions (ATOM/RED) in a kernel that must be deterministic")
    if row.get("vector_path") and row["ldg"] is not None:
        for kind in ("ldg", "stg"):
            widths = row[kind]
            if not widths.get(128):
                problems.append(f"{where}: no 128-bit {kind.upper()} on the 16-byte vector path "
                                f"({_widths(widths) or 'no global ' + kind.upper()})")
    return problems


def launch_notes(row: Dict[str, Any]) -> List[str]:
    """Findings that are tolerated by design (listed, not failed): spills on the exact-fp32 attention
    path, and a default config that does not fit the 99 KiB per block of sm_86 / sm_89."""
    where = f"{row['kernel']} [{row['config']}] on {row['gpu']} (sm_{row['arch']}) for {row['case']}"
    notes = []
    local_traffic = (row["stl"] or 0) + (row["ldl"] or 0)
    if (local_traffic or row["stack"]) and row["source"] == "triton" and row["dtype"] == "float32":
        sass = f"{row['stl']} STL / {row['ldl']} LDL instructions, " if row["stl"] is not None else ""
        notes.append(f"{where}: spills on the exact-fp32 path: {sass}{row['stack']} B stack at {row['registers']} registers")
    return notes


# --------------------------------------------------------------------------------------------
# the report
# --------------------------------------------------------------------------------------------


def _row(gpu: Gpu, source: str, case_name: str, op: str, pass_: str, kernel: str, config: str, default: bool, dtype: str,
         threads: int, grid: Sequence[int], res: Dict[str, Any], role: str, vector_path: Optional[bool]) -> Dict[str, Any]:
    occ = occupancy(gpu, threads, res["registers"], res["shared"])
    return {
        "gpu": gpu.key, "arch": gpu.arch, "source": source, "case": case_name, "op": op, "pass": pass_, "kernel": kernel,
        "config": config, "default": default, "dtype": dtype, "threads": threads, "grid": list(grid),
        "registers": res["registers"], "stack": res["stack"], "local": res.get("local", 0),
        "shared": res["shared"], "smem_limit": gpu.smem_per_block, **occ,
        # from the disassembly (None where it was not read: the non-default tuning candidates)
        "stl": res.get("stl"), "ldl": res.get("ldl"), "hmma": res.get("hmma"), "hgmma": res.get("hgmma"), "atomics": res.get("atomics"),
        "ffma": res.get("ffma"), "mufu": res.get("mufu"), "mufu_by_function": res.get("mufu_by_function"),
        "ldg": {int(k): v for k, v in res["ldg"].items()} if "ldg" in res else None,
        "stg": {int(k): v for k, v in res["stg"].items()} if "stg" in res else None,
        "role": role, "vector_path": vector_path, "compile_s": res.get("compile_s"),
    }  # fmt: skip


def _finish_case(case_out: Dict[str, Any], gpu: Gpu, rows: List[Dict[str, Any]], peak: float) -> None:
    """Adds the case's model time, ideal time and fraction of roofline on ``gpu`` from its default launches."""
    model_s = 0.0
    for r in rows:
        programs = math.prod(r["grid"])
        r["sm_fill"] = min(1.0, programs / gpu.sms)  # a launch of fewer programs than SMs leaves SMs idle
        r["model_us"] = 1e6 * max(r["hbm_bytes"] / gpu.hbm_bytes_per_s, r["exec_flops"] / peak) / r["sm_fill"]
        if r["default"]:
            model_s += r["model_us"] * 1e-6
    t_bytes = case_out["min_bytes"] / gpu.hbm_bytes_per_s
    t_flops = case_out["useful_flops"] / peak
    ideal = max(t_bytes, t_flops)
    case_out["gpus"][gpu.key] = {
        "ideal_us": 1e6 * ideal, "model_us": 1e6 * model_s, "fraction": ideal / model_s if model_s else None,
        "bound": "compute" if t_flops >= t_bytes else "memory",
        "hbm_bytes": sum(r["hbm_bytes"] for r in rows if r["default"]),
        "tiled_bytes": sum(r["tiled_bytes"] for r in rows if r["default"]),
        "exec_flops": sum(r["exec_flops"] for r in rows if r["default"]),
        "peak_flops": peak, "hbm_bytes_per_s": gpu.hbm_bytes_per_s,
    }  # fmt: skip


def _config_str(c: Dict[str, Any], kernel: str) -> str:
    if kernel in ("bwd_preprocess", "bwd_dq_convert"):
        return f"M{c['block_m']} w{c['num_warps']}"
    if kernel == "decode_combine":
        return f"w{c['num_warps']}"
    return f"M{c['block_m']} N{c['block_n']} w{c['num_warps']} s{c['num_stages']}"


def _attention_part(quick: bool, jobs: Optional[int], use_cache: bool, progress: bool, workers=None):
    cases = [c for c in ATTENTION_CASES if c.get("quick") or not quick]
    records, stats = compile_attention(cases, default_only=quick, jobs=jobs, use_cache=use_cache, progress=progress, workers=workers)
    out_cases, rows, errors = [], [], []
    by_name = {c["name"]: c for c in cases}
    for case in cases:
        for pass_ in case["passes"]:
            recs = [r for r in records if r["case"] == case["name"] and r["pass"] == pass_]
            min_bytes, useful = _attention_work(case, pass_)
            shape = {k: case[k] for k in ("b", "hq", "hk", "sq", "sk", "d", "causal")}
            op = case.get("op", "attention")
            case_out = {"op": op, "pass": pass_, "case": case["name"], "source": "triton", "dtype": case["dtype"],
                        "shape": shape, "min_bytes": min_bytes, "useful_flops": useful, "gpus": {}, "launches": []}
            for gpu in GPUS:
                peak = gpu.fp32_flops if case["dtype"] == "float32" else gpu.tensor_flops
                gpu_rows = []
                for r in recs:
                    arch = str(gpu.arch)
                    config = _config_str(r["config"], r["kernel"])
                    if arch not in r["resources"]:
                        errors.append(f"{r['kernel']} [{config}] for {case['name']} does not compile for sm_{arch}: {r['error'][arch]}")
                        continue
                    row = _row(gpu, "triton", case["name"], op, pass_, r["kernel"], config, r["default"], case["dtype"],
                               32 * r["config"]["num_warps"], r["grid"], r["resources"][arch],
                               "memory" if r["kernel"] in ("bwd_preprocess", "bwd_dq_convert", "decode_combine") else "mma", None)
                    resident = gpu.sms * row["blocks_per_sm"]
                    row.update(_attention_model(r, by_name[r["case"]], resident, gpu))
                    gpu_rows.append(row)
                _finish_case(case_out, gpu, gpu_rows, peak)
                rows += gpu_rows
            out_cases.append(case_out)
    return out_cases, rows, errors, stats


def _cuda_part(quick: bool, build: bool = True, use_cache: bool = True):
    table, lib = cuda_machine_code(build, use_cache)
    out_cases, rows, errors = [], [], []
    for case in _cuda_cases(quick):
        case_out = {"op": case["op"], "pass": case["pass_"], "case": case["name"], "source": "cuda", "dtype": case["dtype"],
                    "shape": {"rows": case["rows"], "cols": case["cols"]}, "min_bytes": _cuda_min_bytes(case),
                    "useful_flops": 0.0, "gpus": {}}  # fmt: skip
        for gpu in GPUS:
            try:
                launches, workspace = cuda_launches(case["op"], case["pass_"], case["rows"], case["cols"], case["dtype"], gpu)
            except Unavailable:
                raise
            except Exception as exc:  # noqa: BLE001 - a launcher that rejects a standard shape is a finding
                errors.append(f"{case['op']} {case['pass_']} {case['name']} on {gpu.key}: the launcher failed: {type(exc).__name__}: {exc}")
                continue
            gpu_rows = []
            for launch in launches:
                name = launch["kernel"].replace(" ", "")
                res = table.get((gpu.arch, name))
                if res is None:
                    errors.append(f"{launch['kernel']} (launched for {case['op']} {case['pass_']} {case['name']}) is not in "
                                  f"{lib} for sm_{gpu.arch}")
                    continue
                threads = launch["block"][0] * launch["block"][1] * launch["block"][2]
                config = f"block {'x'.join(map(str, launch['block']))}"
                row = _row(gpu, "cuda", case["name"], case["op"], case["pass_"], launch["kernel"], config, True, case["dtype"],
                           threads, launch["grid"], {**res, "shared": res["static_shared"]}, "memory",
                           _cuda_vector_path(launch["kernel"]))
                row["block"] = launch["block"]
                resident = min(math.prod(launch["grid"]), gpu.sms * row["blocks_per_sm"])
                row.update(_cuda_model(launch, case, workspace, resident, gpu), exec_flops=0.0)
                row["workspace"] = workspace
                gpu_rows.append(row)
            _finish_case(case_out, gpu, gpu_rows, gpu.tensor_flops)
            rows += gpu_rows
        out_cases.append(case_out)
    return out_cases, rows, errors, lib


def build_report(*, quick: bool = False, jobs: Optional[int] = None, use_cache: bool = True, progress: bool = False,
                 parts: Sequence[str] = ("triton", "cuda"), build_cuda: bool = True) -> Dict[str, Any]:
    """Everything ``fastgpt inspect`` reports, as plain data (what ``--json`` writes).

    ``cases``: one per op, pass and shape, with the minimum bytes and useful FLOPs and, per GPU, the
    ideal and model times and the fraction of roofline; ``rows``: one per launch, config and GPU,
    with what the machine code says and the launch's byte/FLOP model; ``problems``: what
    :func:`launch_problems` finds in the default configs (and compile errors); ``notes``: the same
    for the other tuning candidates and tolerated findings (:func:`launch_notes`); ``unavailable``:
    parts that could not be made here, and why. ``build_cuda``: build the CUDA extension (once,
    cached) when it is not built yet, else report the CUDA part unavailable.
    """
    start = time.perf_counter()
    report: Dict[str, Any] = {"tool": "fastgpt inspect", "quick": bool(quick), "cases": [], "rows": [], "problems": [],
                              "notes": [], "unavailable": {}, "timing": {}}
    import platform

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    import torch

    import fastgpt
    from fastgpt.tools.bench import timing as _timing

    report["versions"] = {"fastgpt": fastgpt.__version__, "python": platform.python_version(), "torch": torch.__version__,
                          "triton": triton_version}
    report["gpus"] = [asdict(g) for g in GPUS]
    report["work_model"] = _timing.WORK_MODEL
    report["tiling_model"] = TILING_MODEL
    report["pipes"], report["default_configs"] = pipe_model.report(), pipe_model.default_configs()
    report["disclaimer"] = ("static figures: compiled machine code read without a GPU, and a byte/FLOP model; "
                            "no time or fraction here was measured")
    workers = None
    try:
        if "triton" in parts:
            if triton_version is None:
                report["unavailable"]["triton"] = "triton is not installed"
            else:
                workers = _Workers(jobs)  # the workers start up while the CUDA part runs here
        if "cuda" in parts:
            t = time.perf_counter()
            try:
                cases, rows, errors, lib = _cuda_part(quick, build_cuda, use_cache)
                report["cases"] += cases
                report["rows"] += rows
                report["problems"] += errors
                report["cuda_library"] = lib
            except Unavailable as exc:
                report["unavailable"]["cuda"] = str(exc)
            report["timing"]["cuda_s"] = round(time.perf_counter() - t, 1)
        if workers is not None:
            cases, rows, errors, stats = _attention_part(quick, jobs, use_cache, progress, workers)
            t = time.perf_counter()
            op_cases, op_rows, op_errors = triton_ops.op_part(quick, workers, use_cache, GPUS, _row, _finish_case)
            report["cases"] = cases + op_cases + report["cases"]
            report["rows"] = rows + op_rows + report["rows"]
            report["problems"] += errors + op_errors
            report["timing"]["triton"] = stats
            report["timing"]["triton_ops_s"] = round(time.perf_counter() - t, 1)
    finally:
        if workers is not None:
            workers.close()
    for row in report["rows"]:
        (report["problems"] if row["default"] else report["notes"]).extend(launch_problems(row))
        report["notes"].extend(launch_notes(row))
    report["elapsed_s"] = round(time.perf_counter() - start, 1)
    return report


def bench_summary(quick: bool = True) -> Dict[str, Any]:
    """The static report for ``fastgpt bench`` on a machine without a GPU: ``rows`` (one flat dict per op
    pass, shape and GPU: modelled time and fraction of roofline, worst occupancy, spills, MMA / 128-bit
    loads) and ``text`` (the roofline table and any problem, preformatted)."""
    report = build_report(quick=quick, progress=False, build_cuda=False)  # bench does not compile csrc/ for this
    rows = []
    for c in report["cases"]:
        for gpu, g in c["gpus"].items():
            launches = [r for r in report["rows"] if r["case"] == c["case"] and r["op"] == c["op"] and r["pass"] == c["pass"]
                        and r["gpu"] == gpu and r["default"]]
            rows.append({
                "op": c["op"], "pass": c["pass"], "case": c["case"], "dtype": c["dtype"], "gpu": gpu,
                "ideal_us": round(g["ideal_us"], 2), "model_us": round(g["model_us"], 2),
                "fraction_of_roofline": round(g["fraction"], 3) if g["fraction"] is not None else None, "bound": g["bound"],
                "kernels": [r["kernel"] for r in launches], "max_registers": max((r["registers"] for r in launches), default=None),
                "min_occupancy": min((r["occupancy"] for r in launches), default=None),
                "spill_instructions": sum((r["stl"] or 0) + (r["ldl"] or 0) for r in launches),
                "mma": sum((r["hmma"] or 0) + (r["hgmma"] or 0) for r in launches),
                "ldg128": sum((r["ldg"] or {}).get(128, 0) for r in launches),
            })  # fmt: skip
    text = format_report(report, launches=False, candidates=False)
    return {"rows": rows, "text": text, "problems": report["problems"], "unavailable": report["unavailable"],
            "elapsed_s": report["elapsed_s"]}


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="fewer shapes and only the default config of each kernel")
    parser.add_argument("--json", metavar="PATH", help="write every figure as JSON to PATH")
    parser.add_argument("--plot", metavar="PATH", help="write a PNG of the modelled fraction of roofline to PATH (matplotlib)")
    parser.add_argument("--jobs", type=int, default=None, help="compile processes (default: min(2, CPUs))")
    parser.add_argument("--no-cache", action="store_true", help="recompile instead of reusing $FASTGPT_CACHE_DIR/kernel_report")
    parser.add_argument("--only", choices=("triton", "cuda"), help="only the Triton kernels (attention, RMSNorm, SwiGLU, rotary, cross-entropy) or only the CUDA kernels")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _json_default(o: Any) -> Any:
    return str(o)


def main(args: argparse.Namespace) -> int:
    parts = (args.only,) if args.only else ("triton", "cuda")
    report = build_report(quick=args.quick, jobs=args.jobs, use_cache=not args.no_cache, progress=not args.no_progress, parts=parts)
    for line in format_report(report):
        print(line)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1, default=_json_default)
        print(f"wrote {args.json}")
    if args.plot:
        write_plot(report, args.plot)
        print(f"wrote {args.plot}")
    print(f"fastgpt inspect finished in {report['elapsed_s']} s")
    return 1 if report["problems"] else 0
