"""The budgeted GPU check: one plan of stages, each bounded in time, results written after every stage.

    python scripts/gpu_check.py                    # on the GPU machine (scripts/gpu_check.sh calls this)
    python scripts/gpu_check.py --cpu              # the plan run: GPU stages skipped, JSON written as on a GPU

Stages run in order of value (install + info, GPU parity tests, headline benchmarks, compute-sanitizer,
then the rest). Each has its own limit; a stage also never runs past the total budget (default 540 s,
so the check ends inside a 10-minute command), and a stage whose limit ends kills its whole process
group. Before and after every stage ``<out>/gpu_check.json`` is rewritten atomically and the stage's
output appended to ``<out>/gpu_check.log``, so a run cut short (by its budget or by the machine's own
limit) still leaves every finished stage's results. ``README.md`` ("Performance") says how to read it.

No network is needed: the install is ``pip install --no-index --no-deps --no-build-isolation -e .``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JSON_NAME = "gpu_check.json"
LOG_NAME = "gpu_check.log"
TOTAL_BUDGET_S = 540.0
MIN_STAGE_S = 10.0  # a stage that would get less than this is skipped, not started
PY = sys.executable


@dataclass
class Stage:
    """One step of the plan. ``cmd`` is an argv list (run in ROOT), ``{work}`` in it is the work folder;
    ``gpu``: needs a CUDA device (skipped in the plan run); ``collect``: reads the stage's artefacts in
    the work folder into the JSON (called even when the stage failed or timed out); ``when``: run the
    stage only if this returns True given the results so far; ``extra``: runs as time allows (its
    budget is not part of the planned total)."""

    name: str
    budget_s: float
    cmd: Sequence[str]
    gpu: bool = True
    env: Dict[str, str] = field(default_factory=dict)
    collect: Optional[Callable[[str], Dict[str, Any]]] = None
    when: Optional[Callable[[Dict[str, Any]], bool]] = None
    extra: bool = False


# --------------------------------------------------------------------------------------------
# collectors: a stage's artefacts -> JSON
# --------------------------------------------------------------------------------------------


def _load_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def collect_info(work: str) -> Dict[str, Any]:
    return {"info": _load_json(os.path.join(work, "info.json"))}


def junit_counts(path: str) -> Optional[Dict[str, Any]]:
    """Counts and the failing test ids of a pytest --junitxml file (None when absent or cut short)."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    failed = []
    for case in root.iter("testcase"):
        if case.find("failure") is not None or case.find("error") is not None:
            failed.append(f"{case.get('classname')}::{case.get('name')}")
    return {**counts, "failed": failed[:50]}


def collect_junit(name: str) -> Callable[[str], Dict[str, Any]]:
    return lambda work: {"tests": junit_counts(os.path.join(work, f"{name}.xml"))}


def collect_bench(name: str) -> Callable[[str], Dict[str, Any]]:
    """The fastgpt summary (ratios, targets, roofline probes) and each case's CUDA-event figure."""

    def collect(work: str) -> Dict[str, Any]:
        data = _load_json(os.path.join(work, f"{name}.json")) or {}
        entries = [{"name": b.get("name"), "group": b.get("group"), "extra_info": b.get("extra_info")}
                   for b in data.get("benchmarks", [])]
        return {"summary": data.get("fastgpt"), "entries": entries}

    return collect


def collect_tuning(work: str) -> List[Dict[str, Any]]:
    """Every config the tuner chose in this run (FASTGPT_TUNE_LOG lines), one per kernel and shape class."""
    path = os.path.join(work, "tune.jsonl")
    chosen: Dict[str, Dict[str, Any]] = {}
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue  # a line cut by a killed stage
                chosen[f"{rec.get('kernel')} {rec.get('key')}"] = rec
    except OSError:
        pass
    return list(chosen.values())


# --------------------------------------------------------------------------------------------
# the plan
# --------------------------------------------------------------------------------------------

BENCH_ARGS = ("--benchmark-only", "-q", "-rs", "-p", "no:cacheprovider", "--fastgpt-tier", "headline")


def _bench(name: str, module: str, budget_s: float, extra: bool = False) -> Stage:
    # the module's own budget skips cases past it (listed as skipped); ours kills what overruns that
    inner = max(5, int(budget_s * 0.8) - 15)
    cmd = [PY, "-m", "pytest", f"benchmarks/{module}", *BENCH_ARGS, "--fastgpt-budget-s", str(inner),
           "--benchmark-json={work}/" + name + ".json", "--benchmark-columns=median,rounds"]
    # a few seconds of tuning per kernel and shape class: the default and what else compiles in time
    # (compiles are shared across lengths, so later classes get further down the list)
    return Stage(name, budget_s, cmd, env={"FASTGPT_TUNE_BUDGET_S": "5"}, collect=collect_bench(name), extra=extra)


def _install_failed(results: Dict[str, Any]) -> bool:
    return results.get("install", {}).get("status") != "passed"


def build_plan() -> List[Stage]:
    """The GPU check's stages, in order of value. The budgets of all but the extra stages (and the
    fallback install) add up to at most the total of 540 s."""
    pip = [PY, "-m", "pip", "install", "--no-index", "--no-deps", "--no-build-isolation", "-e", "."]
    sanitizer = shutil.which("compute-sanitizer") or os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"),
                                                                  "bin", "compute-sanitizer")
    return [
        # the AOT build (sm_80 and sm_90: the H200 checks that both compile); ninja runs 16 jobs
        Stage("install", 120, pip, env={"FASTGPT_BUILD_CUDA": "1", "MAX_JOBS": "16"}),
        Stage("install_plain", 30, pip, when=_install_failed),  # no extension: tests then JIT-build it
        Stage("info", 20, [PY, "-m", "fastgpt.cli", "info", "--json", "{work}/info.json"], gpu=False,
              collect=collect_info),
        Stage("gpu_tests", 130, [PY, "-m", "pytest", "-m", "gpu", "-q", "-rs", "-p", "no:cacheprovider", "-n", "8",
                                 "--junitxml={work}/gpu_tests.xml", "tests"], collect=collect_junit("gpu_tests")),
        _bench("bench_attention", "test_bench_attention.py", 110),
        _bench("bench_norm_gelu", "test_bench_norm_gelu.py", 40),
        _bench("bench_gpt", "test_bench_gpt.py", 50),
        Stage("sanitizer", 40, [sanitizer, "--tool", "memcheck", "--error-exitcode", "1", PY, "-m", "pytest", "-q",
                                "-x", "-p", "no:cacheprovider", "--junitxml={work}/sanitizer.xml",
                                "tests/test_cuda_gpu.py", "-k", "not 4097 and not 65536 and not 8192"],
              env={"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}, collect=collect_junit("sanitizer")),
        # the rest, as time allows: the attention variants (atomic backward; window, softcap), every
        # attention candidate timed, then the CLI's report
        _bench("bench_attention_atomic", "test_bench_attention_atomic.py", 60, extra=True),
        _bench("bench_attention_window", "test_bench_attention_window.py", 60, extra=True),
        Stage("tune_sweep", 120, [PY, "scripts/gpu_check.py", "--tune-sweep"], env={"FASTGPT_TUNE_BUDGET_S": "60"},
              extra=True),
        Stage("fastgpt_bench", 60, [PY, "-m", "fastgpt.cli", "bench", "--quick", "--no-progress", "--json",
                                    "{work}/fastgpt_bench.json"], extra=True,
              collect=lambda work: {"report": _load_json(os.path.join(work, "fastgpt_bench.json"))}),
    ]


# --------------------------------------------------------------------------------------------
# running it
# --------------------------------------------------------------------------------------------


def _write_json(path: str, data: Dict[str, Any]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1, default=str)
    os.replace(tmp, path)  # readers never see a half-written file


def _run_stage(stage: Stage, limit_s: float, work: str, log) -> Dict[str, Any]:
    cmd = [part.replace("{work}", work) for part in stage.cmd]
    env = {**os.environ, **stage.env, "FASTGPT_TUNE_LOG": os.path.join(work, "tune.jsonl")}
    log.write(f"\n== {stage.name} (limit {limit_s:.0f} s): {' '.join(cmd)}\n")
    log.flush()
    start = time.monotonic()
    try:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    except OSError as e:  # e.g. compute-sanitizer missing
        return {"status": "failed", "error": str(e), "seconds": 0.0}
    try:
        rc = proc.wait(timeout=limit_s)
        status = "passed" if rc == 0 else "failed"
    except subprocess.TimeoutExpired:
        # the whole process group: pytest-xdist workers and compilers too. SIGINT first lets pytest
        # write its junit / benchmark JSON for what finished
        for sig, grace in ((signal.SIGINT, 5), (signal.SIGKILL, 5)):
            try:
                os.killpg(proc.pid, sig)
                rc = proc.wait(timeout=grace)
                break
            except (ProcessLookupError, subprocess.TimeoutExpired):
                continue
        status, rc = "timeout", proc.poll()
    seconds = round(time.monotonic() - start, 1)
    log.write(f"== {stage.name}: {status} (rc {rc}) after {seconds} s\n")
    return {"status": status, "rc": rc, "seconds": seconds}


def run_plan(stages: Sequence[Stage], out_dir: str, total_budget_s: float = TOTAL_BUDGET_S, gpu: bool = True,
             on_write: Optional[Callable[[Dict[str, Any]], None]] = None, work: Optional[str] = None) -> Dict[str, Any]:
    """Run ``stages`` in order; rewrite the JSON (and call ``on_write`` with it) before and after each.

    ``gpu=False`` is the plan run: GPU stages are recorded as skipped, the others run. Returns the
    final results dict (also in ``<out_dir>/gpu_check.json``)."""
    os.makedirs(out_dir, exist_ok=True)
    work = work or tempfile.mkdtemp(prefix="gpu_check_")
    json_path, log_path = os.path.join(out_dir, JSON_NAME), os.path.join(out_dir, LOG_NAME)
    t0 = time.monotonic()
    results: Dict[str, Any] = {
        "schema": 1,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "mode": "gpu" if gpu else "plan",
        "total_budget_s": total_budget_s,
        "plan": [{"name": s.name, "budget_s": s.budget_s, "gpu": s.gpu, "extra": s.extra} for s in stages],
        "stages": {},
        "tuning": [],
        "elapsed_s": 0.0,
        "complete": False,
    }

    def write() -> None:
        results["elapsed_s"] = round(time.monotonic() - t0, 1)
        info = results["stages"].get("info", {}).get("info") or {}
        if info:
            results["gpu"] = (info.get("devices") or [{}])[0].get("name", "none")
            results["versions"] = {k: info.get(k) for k in ("fastgpt", "python", "torch", "torch_cuda", "triton")}
        results["tuning"] = collect_tuning(work)
        _write_json(json_path, results)
        if on_write is not None:
            on_write(json.loads(json.dumps(results, default=str)))

    with open(log_path, "a", encoding="utf-8") as log:
        for stage in stages:
            left = total_budget_s - (time.monotonic() - t0)
            if not gpu and stage.gpu:
                entry = {"status": "skipped", "reason": "plan run: no GPU"}
            elif stage.when is not None and not stage.when(results["stages"]):
                entry = {"status": "skipped", "reason": "not needed"}
            elif left < MIN_STAGE_S:
                entry = {"status": "skipped", "reason": f"total budget spent ({left:.0f} s left)"}
            else:
                results["stages"][stage.name] = {"status": "running", "budget_s": stage.budget_s}
                write()
                entry = _run_stage(stage, min(stage.budget_s, left), work, log)
                if stage.collect is not None:
                    entry.update(stage.collect(work))
            results["stages"][stage.name] = {"budget_s": stage.budget_s, **entry}
            log.flush()
            write()
        results["complete"] = True
        write()
    return results


def tune_sweep() -> None:
    """Tune the attention kernels at S = 4096 (16K tokens, hidden 2048), d = 64 and 128, causal and not,
    bf16, forward and backward, within FASTGPT_TUNE_BUDGET_S per kernel: the tuning log is the evidence
    for the default configs (kernels/flash_attention_configs.py)."""
    import torch

    from fastgpt.kernels import flash_attention as fa

    s = 4096
    for d in (64, 128):
        for causal in (True, False):
            q, k, v, dout = (torch.randn(16384 // s, 2048 // d, s, d, device="cuda", dtype=torch.bfloat16) for _ in range(4))
            out, lse = torch.empty_like(q), torch.empty(q.shape[:3], device="cuda")
            fa.forward(q, k, v, out, lse, causal, d**-0.5)
            grads = [torch.empty_like(t) for t in (q, k, v)]
            fa.backward(dout, q, k, v, out, lse, None, *grads, causal, d**-0.5)
            torch.cuda.synchronize()
            print(f"tuned d={d} causal={causal}", flush=True)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", default=os.environ.get("OUT_DIR", "benchmarks/results"))
    parser.add_argument("--total-budget-s", type=float, default=float(os.environ.get("GPU_CHECK_BUDGET_S", TOTAL_BUDGET_S)))
    parser.add_argument("--cpu", action="store_true", help="plan run: skip the GPU stages (no CUDA device needed)")
    parser.add_argument("--only", default="", help="comma-separated stage names to run (default: all)")
    parser.add_argument("--tune-sweep", action="store_true", help=argparse.SUPPRESS)  # the tune_sweep stage
    args = parser.parse_args(argv)
    if args.tune_sweep:
        tune_sweep()
        return 0
    if args.total_budget_s <= 0:
        parser.error("--total-budget-s must be positive")
    stages = build_plan()
    if args.only:
        wanted = set(args.only.split(","))
        unknown = wanted - {s.name for s in stages}
        if unknown:
            parser.error(f"--only: unknown stages {sorted(unknown)}")
        stages = [s for s in stages if s.name in wanted]
    if not args.cpu:
        import torch

        if not torch.cuda.is_available():
            parser.error("no CUDA device: run on a GPU machine, or pass --cpu for the plan run")
    results = run_plan(stages, args.out_dir, args.total_budget_s, gpu=not args.cpu)
    bad = [n for n, s in results["stages"].items() if s["status"] in ("failed", "timeout") and n != "install"]
    print(f"gpu_check: {results['elapsed_s']} s; " + ", ".join(f"{n} {s['status']}" for n, s in results["stages"].items()))
    print(f"gpu_check: wrote {os.path.join(args.out_dir, JSON_NAME)} and {LOG_NAME}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
