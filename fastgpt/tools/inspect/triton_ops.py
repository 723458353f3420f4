"""The Triton element-wise and row-wise kernels for ``fastgpt inspect`` (every op whose registry entry
has ``report_launches``: RMSNorm, SwiGLU, rotary, cross-entropy): their launch plans as the launchers
build them (on meta tensors), compiled for sm_80 / sm_90 in the compile workers, read like the
attention kernels, and a byte model (the op's minimum bytes from its registry entry, plus what a
multi-pass kernel reads twice; one launch per pass, no tiling overhead to model)."""

from __future__ import annotations

import time
from typing import Any, Dict, List, Sequence, Tuple

from fastgpt import registry
from fastgpt.tools.inspect.model import HIDDEN, QUICK_HIDDEN, ROWS


def op_cases(quick: bool) -> List[Dict[str, Any]]:
    """One case per op and shape: (ROWS, width_factor x hidden) for the ops read at the model's hidden
    sizes, plus each op's ``report_shapes`` (wide rows, vocabularies) outside ``quick``."""
    hidden = QUICK_HIDDEN if quick else HIDDEN
    cases = []
    for spec in registry.all_ops():
        if spec.report_launches is None:
            continue
        width = spec.cases.width_factor if spec.cases else 1
        shapes = [(ROWS, width * h) for h in hidden] if spec.report_hidden else []
        if not quick or not spec.report_hidden:
            shapes += list(spec.report_shapes)
        for rows, cols in shapes:
            cases.append({"name": f"{rows}x{cols}", "op": spec.name, "rows": rows, "cols": cols, "dtype": "bfloat16"})
    return cases


def _launches(case: Dict[str, Any]):
    """[(pass, LaunchPlan, reread_bytes)] of one case (in a compile worker: imports triton)."""
    import torch

    return registry.get(case["op"]).report_launches(case["rows"], case["cols"], getattr(torch, case["dtype"]))


def compile_case(case: Dict[str, Any], arch: int, use_cache: bool = True) -> List[Dict[str, Any]]:
    """Worker: each pass's launch compiled for sm_<arch> and read (cached like the attention compiles)."""
    from dataclasses import asdict

    from fastgpt.tools.inspect.compile_jobs import _cache_get, _cache_put, _job_key
    from fastgpt.tools.inspect.compiling import compile_plan, kernel_resources

    out = []
    for pass_, plan, reread in _launches(case):
        config = plan.configs[0]
        key = _job_key(plan, config, arch) + "-sass"
        found = _cache_get("triton", key) if use_cache else None
        if found is None:
            start = time.perf_counter()
            found = kernel_resources(compile_plan(plan, config, arch), arch)
            found["compile_s"] = round(time.perf_counter() - start, 2)
            if use_cache:
                _cache_put("triton", key, found)
        vector = not plan.constexprs.get("INTERLEAVED", False)  # 16-byte accesses along contiguous rows
        out.append({"pass": pass_, "kernel": f"{case['op']}_{plan.name}", "config": asdict(config), "grid": list(plan.grid(config)),
                    "resources": found, "vector_path": vector, "extra_bytes": reread})
    return out


def op_part(quick: bool, workers, use_cache: bool, gpus: Sequence[Any], make_row, finish_case) -> Tuple[list, list, list]:
    """(cases, rows, errors) of the report for these kernels; ``make_row`` / ``finish_case`` are the
    report's own row and roofline helpers."""
    cases = op_cases(quick)
    archs = sorted({g.arch for g in gpus})
    tasks = [("triton_op", ["compile_case", case, arch, use_cache]) for case in cases for arch in archs]
    results = dict(zip([(c["name"], c["op"], a) for c in cases for a in archs], workers.run(tasks)))
    out_cases, rows, errors = [], [], []
    for case in cases:
        spec = registry.get(case["op"])
        d = dict(zip(spec.dims, (case["rows"], case["cols"])))
        import torch

        launched = {r["pass"] for arch in archs for r in results[(case["name"], case["op"], arch)].get("ok", ())}
        for pass_ in [p for p in ("fwd", "bwd") if p in launched or not launched]:
            _, min_bytes = spec.cases.work(d, getattr(torch, case["dtype"]), pass_)
            case_out = {"op": case["op"], "pass": pass_, "case": case["name"], "source": "triton", "dtype": case["dtype"],
                        "shape": {"rows": case["rows"], "cols": case["cols"]}, "min_bytes": min_bytes, "useful_flops": 0.0,
                        "gpus": {}}  # fmt: skip
            for gpu in gpus:
                found = results[(case["name"], case["op"], gpu.arch)]
                if "error" in found:
                    errors.append(f"{case['op']} {case['name']} does not compile for sm_{gpu.arch}: {found['error']}")
                    continue
                gpu_rows = []
                for r in (x for x in found["ok"] if x["pass"] == pass_):
                    c = r["config"]
                    config = f"M{c['block_m']} N{c['block_n']} w{c['num_warps']}"
                    row = make_row(gpu, "triton", case["name"], case["op"], pass_, r["kernel"], config, True, case["dtype"],
                                   32 * c["num_warps"], r["grid"], r["resources"], "memory", r["vector_path"])
                    moved = min_bytes + r["extra_bytes"]
                    row.update(hbm_bytes=moved, tiled_bytes=moved, exec_flops=0.0)
                    gpu_rows.append(row)
                finish_case(case_out, gpu, gpu_rows, gpu.tensor_flops)
                rows += gpu_rows
            out_cases.append(case_out)
    return out_cases, rows, errors
