"""``fastgpt inspect``: every kernel compiled for sm_80 and sm_90, its machine code read, and a roofline model.

    fastgpt inspect [--quick] [--json PATH] [--plot PATH] [--jobs N] [--no-cache] [--only triton|cuda] [--no-progress]

No GPU is needed. For a table of standard shapes (GPT-2 small to 8B-class) it takes each launch
exactly as fastgpt's launchers would make it, reads what the GPU toolchain made of it, and models
what that implies on an H100 and an A100:

* **Triton attention** (kernels/flash_attention.py): the launch plans the launcher itself builds
  (``example_plans`` on meta tensors), each tuning candidate, compiled with ``triton.compile`` for
  sm_80 and sm_90 with the specialisation triton's JIT launcher computes for those arguments (16-byte
  divisibility of pointers and strides, ints equal to 1 as constants; see
  ``_triton_utils.launch_specialization``). Compiles run in a pool of processes without
  TRITON_INTERPRET, and their readings are cached under ``$FASTGPT_CACHE_DIR/kernel_report``, keyed by
  the kernel's source hash, the specialisation, the config, the architecture and triton's version.
* **CUDA layer norm / GELU** (csrc/): the kernels the C++ launchers pick (vector or scalar path, block
  and grid) come from running those launchers in a dry run of the CPU emulator of the test suite
  (tests/cuda_emu: the unmodified csrc/ compiled for the host; no kernel runs, the pointers are fake
  and aligned like torch's allocations, the device has the GPU's SM count); registers, stack and
  shared memory and the SASS of those kernels come from the CUDA extension that
  ``fastgpt.cuda_ext`` built for sm_80 and sm_90 (built once if it is missing; not compiled again here).

Read from the machine code (``cuobjdump -res-usage`` / ``-sass`` of the triton wheel): registers per
thread, stack bytes and STL/LDL instructions (spills), shared memory, tensor-core MMA instructions
(HMMA, Hopper's HGMMA), MUFU (exp2, rcp, rsqrt, ...), global loads and stores by width
(LDG.E.128 vs narrower). Derived: theoretical occupancy from the per-SM limits (registers with their
allocation granularity, shared memory with the 1 KiB reserved per block, threads, blocks), and a
byte/FLOP model per call: the minimum HBM bytes (DESIGN.md section 5, ``fastgpt._timing``), the bytes
the tiling requests (K/V re-read once per query tile, partial-sum rows, extra passes over wide rows),
the HBM bytes after a simple L2 model, and the roofline time and fraction that implies.

What it proves: the kernels compile for real GPUs (not only under the interpreter), fit the
register file and shared memory, do not spill, use the tensor cores and 128-bit accesses where they
should. What it does not: every time and fraction in the report is a *model*, not a measurement.
Latency, pipelining, bank conflicts, L2 behaviour beyond the simple model, clocks and the tuner's
choice are only seen by running on a GPU (``fastgpt bench``, ``scripts/gpu_check.sh``).

Exit status 1 when a default config has a problem (a spill, a block that does not fit, no MMA, no
128-bit accesses on a vector path, a kernel that does not compile), else 0.

This module's top level imports only the standard library: the ``fastgpt`` CLI imports it to build
its parser.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from fastgpt import pipe_model  # issue 19 hook

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

READER_VERSION = 1  # bump when what is read from a compiled kernel changes (invalidates the cache)

# --------------------------------------------------------------------------------------------
# the GPUs modelled
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Gpu:
    """Per-SM limits (CUDA programming guide, compute capability tables) and data-sheet peaks."""

    key: str
    name: str
    arch: int  # compute capability x 10: the sm_XX the kernels are compiled for
    sms: int
    hbm_bytes_per_s: float
    tensor_flops: float  # dense bf16/fp16 tensor-core FLOP/s
    fp32_flops: float  # FP32 FMA FLOP/s on the CUDA cores (the exact-fp32 attention path)
    l2_bytes: int
    smem_per_sm: int  # bytes of shared memory an SM gives to blocks (largest carve-out)
    smem_per_block: int  # the most one block may use (opt-in)
    regs_per_sm: int = 65536
    max_regs_per_thread: int = 255
    reg_alloc_unit: int = 256  # registers are allocated per warp in units of 256
    smem_reserved_per_block: int = 1024  # the runtime reserves 1 KiB per block (sm_80 and later)
    smem_alloc_unit: int = 128
    threads_per_sm: int = 2048
    blocks_per_sm: int = 32


GPUS: Tuple[Gpu, ...] = (
    Gpu("H100", "H100 SXM", 90, 132, 3.35e12, 990e12, 67e12, 50 * 2**20, 228 * 1024, 227 * 1024),
    Gpu("A100", "A100 SXM", 80, 108, 2.0e12, 312e12, 19.5e12, 40 * 2**20, 164 * 1024, 163 * 1024),
)
CONSUMER_SMEM_PER_BLOCK = 99 * 1024  # sm_86 / sm_89 (RTX 30xx / 40xx, A10, L4, L40): 99 KiB per block


def occupancy(gpu: Gpu, threads: int, registers: int, shared: int) -> Dict[str, Any]:
    """Theoretical occupancy of a kernel on ``gpu`` (the CUDA occupancy calculator's arithmetic).

    ``threads`` per block, ``registers`` per thread, ``shared`` bytes of shared memory per block
    (static + dynamic). Returns blocks and warps per SM, occupancy (resident warps / 64) and the
    limiting resource; 0 blocks when one block does not fit.
    """
    warps = -(-threads // 32)
    if threads > 1024 or registers > gpu.max_regs_per_thread or shared > gpu.smem_per_block:
        why = "threads" if threads > 1024 else ("registers" if registers > gpu.max_regs_per_thread else "shared memory")
        return {"blocks_per_sm": 0, "warps_per_sm": 0, "occupancy": 0.0, "limiter": f"{why}: one block does not fit"}
    regs_per_warp = -(-max(registers, 1) * 32 // gpu.reg_alloc_unit) * gpu.reg_alloc_unit
    smem_per_block = -(-(shared + gpu.smem_reserved_per_block) // gpu.smem_alloc_unit) * gpu.smem_alloc_unit
    limits = {
        "registers": (gpu.regs_per_sm // regs_per_warp) // warps,
        "shared memory": gpu.smem_per_sm // smem_per_block,
        "threads": gpu.threads_per_sm // (warps * 32),
        "blocks": gpu.blocks_per_sm,
    }
    limiter = min(limits, key=lambda k: limits[k])
    blocks = limits[limiter]
    max_warps = gpu.threads_per_sm // 32
    return {"blocks_per_sm": blocks, "warps_per_sm": blocks * warps, "occupancy": blocks * warps / max_warps, "limiter": limiter}


# --------------------------------------------------------------------------------------------
# the shapes
# --------------------------------------------------------------------------------------------

# Attention (B, Hq, Hk, Sq, Sk, D): head dims 64 / 128 / 256, causal and not, forward and backward,
# GQA, and a decode step (one query, a long KV cache). "quick" cases make up `--quick`.
ATTENTION_CASES: Tuple[Dict[str, Any], ...] = (
    dict(name="gpt2-small", b=8, hq=12, hk=12, sq=1024, sk=1024, d=64, causal=True, dtype="bfloat16", passes=("fwd", "bwd"), quick=True),
    dict(name="d64-full", b=8, hq=16, hk=16, sq=1024, sk=1024, d=64, causal=False, dtype="bfloat16", passes=("fwd", "bwd")),
    dict(name="llama3-8b-gqa", b=1, hq=32, hk=8, sq=8192, sk=8192, d=128, causal=True, dtype="bfloat16", passes=("fwd", "bwd"), quick=True),
    dict(name="d128-full", b=2, hq=32, hk=32, sq=4096, sk=4096, d=128, causal=False, dtype="bfloat16", passes=("fwd", "bwd")),
    dict(name="d256-causal", b=1, hq=16, hk=16, sq=4096, sk=4096, d=256, causal=True, dtype="bfloat16", passes=("fwd", "bwd"), quick=True),
    dict(name="d256-full", b=1, hq=16, hk=16, sq=4096, sk=4096, d=256, causal=False, dtype="bfloat16", passes=("fwd", "bwd")),
    dict(name="decode-gqa-b8", b=8, hq=32, hk=8, sq=1, sk=8192, d=128, causal=True, dtype="bfloat16", passes=("fwd",), quick=True),
    dict(name="decode-gqa-b1", b=1, hq=32, hk=8, sq=1, sk=8192, d=128, causal=True, dtype="bfloat16", passes=("fwd",), quick=True),
    # the exact-fp32 path (CUDA-core FMA, small tiles): GPT-2 small, and the two buckets whose candidate
    # lists the test suite leaves to this report (it compiles every fp32 candidate of bucket 32 only)
    dict(name="gpt2-small-fp32", b=8, hq=12, hk=12, sq=1024, sk=1024, d=64, causal=True, dtype="float32", passes=("fwd", "bwd")),
    dict(name="d128-fp32", b=1, hq=16, hk=16, sq=2048, sk=2048, d=128, causal=True, dtype="float32", passes=("fwd", "bwd")),
    dict(name="d256-fp32", b=1, hq=16, hk=16, sq=2048, sk=2048, d=256, causal=True, dtype="float32", passes=("fwd", "bwd")),
)

# Layer norm / GELU on x (rows, cols): 8 x 1024 tokens; hidden 768 (GPT-2 small) .. 8192 (70B-class);
# GELU on the MLP's 4 x hidden; two wide rows that take the multi-pass kernels.
ROWS = 8 * 1024
HIDDEN = (768, 1024, 1600, 2048, 4096, 8192)
QUICK_HIDDEN = (768, 4096)
CUDA_OPS = ("layer_norm", "add_layer_norm", "gelu", "bias_gelu")


def _cuda_cases(quick: bool) -> List[Dict[str, Any]]:
    hidden = QUICK_HIDDEN if quick else HIDDEN
    cases = []
    for op in CUDA_OPS:
        widths = [4 * h for h in hidden] if "gelu" in op else list(hidden)
        shapes = [(ROWS, n) for n in widths]
        if not quick and "layer_norm" in op:
            shapes += [(ROWS, 16384), (1024, 65536)]  # the backward's / the forward's multi-pass kernels
        for rows, cols in shapes:
            for pass_ in ("fwd", "bwd"):
                cases.append(dict(name=f"{rows}x{cols}", op=op, pass_=pass_, rows=rows, cols=cols, dtype="bfloat16"))
    return cases


CUDA_CASES = _cuda_cases(False)

# --------------------------------------------------------------------------------------------
# caches
# --------------------------------------------------------------------------------------------


def _cache_dir() -> Path:
    from fastgpt.cuda_ext import cache_dir

    return cache_dir() / "kernel_report"


def _cache_get(kind: str, key: str) -> Optional[Any]:
    path = _cache_dir() / kind / f"{key}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _cache_put(kind: str, key: str, value: Any) -> None:
    path = _cache_dir() / kind / f"{key}.json"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(value))
        os.replace(tmp, path)  # atomic: concurrent writers never leave half a file
    except OSError:
        pass  # a read-only cache only costs time


# --------------------------------------------------------------------------------------------
# Triton attention: launch plans and compiles (in worker processes without TRITON_INTERPRET)
# --------------------------------------------------------------------------------------------


_WORKER_TASKS: Dict[str, Any] = {}  # name -> function: what a compile worker may run (filled below)


def _case_plans(case: Dict[str, Any]):
    """[(pass, LaunchPlan)] of one attention case, as the launcher builds them (on meta tensors)."""
    import torch

    from fastgpt.kernels import flash_attention as fa

    dtype = getattr(torch, case["dtype"])
    dv = case.get("dv", case["d"])
    off = case.get("q_offset", 0)  # q as a view that starts `off` elements into its storage (e.g. a fused QKV)
    q = torch.empty(case["b"], case["hq"], case["sq"], case["d"] + off, dtype=dtype, device="meta")[..., off:]
    k = torch.empty(case["b"], case["hk"], case["sk"], case["d"], dtype=dtype, device="meta")
    v = torch.empty(case["b"], case["hk"], case["sk"], dv, dtype=dtype, device="meta")
    plans = fa.example_plans(q, k, v, case["causal"], arch=case.get("config_arch"))  # issue 19: per-arch config lists
    out = [("fwd", plans[0])]
    if "bwd" in case["passes"]:
        out += [("bwd", p) for p in plans[1:]]
    return out


def _job_key(plan, config, arch: int) -> str:
    import triton

    from fastgpt.kernels._triton_utils import launch_specialization, normalize_specialization

    sig, constexprs, attrs = normalize_specialization(plan, launch_specialization(plan, config, arch))
    source = getattr(plan.kernel, "cache_key", None) or hashlib.sha256(plan.kernel.src.encode()).hexdigest()
    payload = [READER_VERSION, triton.__version__, source, sig, constexprs, attrs, asdict(config), arch]
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=repr).encode()).hexdigest()[:32]


def _enumerate_attention(cases: Sequence[Dict[str, Any]], archs: Sequence[int], default_only: bool) -> List[Dict[str, Any]]:
    """Worker: one record per (case, pass, launch, config) with the cache key of each arch's compile."""
    records = []
    for case in cases:
        for pass_, plan in _case_plans(case):
            for i, config in enumerate(plan.configs):
                if default_only and i > 0:
                    break
                records.append({
                    "case": case["name"], "pass": pass_, "kernel": plan.name, "config_index": i, "default": i == 0,
                    "config": asdict(config), "grid": list(plan.grid(config)),
                    "block_d": plan.constexprs.get("BLOCK_D"), "block_dv": plan.constexprs.get("BLOCK_DV", plan.constexprs.get("BLOCK_D")),
                    "keys": {str(a): _job_key(plan, config, a) for a in archs},
                })  # fmt: skip
    return records


def _compile_job(case: Dict[str, Any], kernel: str, config_index: int, arch: int, options: Optional[Dict[str, Any]] = None,
                 sass: bool = True) -> Dict[str, Any]:
    """Worker: compile one launch for sm_<arch> and read its machine code (kernel_resources)."""
    from fastgpt.kernels._triton_utils import compile_plan, kernel_resources

    plan = next(p for _, p in _case_plans(case) if p.name == kernel)
    start = time.perf_counter()
    compiled = compile_plan(plan, plan.configs[config_index], arch, **(options or {}))
    found = kernel_resources(compiled, arch, sass=sass)
    found["compile_s"] = round(time.perf_counter() - start, 2)
    return found


def _check_specializations(cases: Sequence[Dict[str, Any]], archs: Sequence[int] = (80, 90)) -> Dict[str, Any]:
    """Worker: for every launch and config of ``cases``, the specialisation triton's JIT binder computes
    against ``_triton_utils.kernel_signature`` (the fallback used where triton's internals differ).
    Returns whether the binder was usable, how many were compared, the mismatches, and for each
    case which arguments of the first launch carry the 16-byte divisibility hint."""
    from fastgpt.kernels._triton_utils import jit_specialization, kernel_signature, normalize_specialization

    checked, mismatches, divisible = 0, [], {}
    for case in cases:
        for _, plan in _case_plans(case):
            for config in plan.configs:
                for arch in archs:
                    jit = jit_specialization(plan, config, arch)
                    if jit is None:
                        return {"available": False, "checked": checked, "mismatches": mismatches, "divisible": divisible}
                    a = normalize_specialization(plan, jit)
                    b = normalize_specialization(plan, kernel_signature(plan, config))
                    checked += 1
                    if a != b:
                        diff = {part: {k: (x.get(k), y.get(k)) for k in set(x) | set(y) if x.get(k) != y.get(k)}
                                for part, x, y in zip(("signature", "constexprs", "attrs"), a, b)}
                        mismatches.append(f"{case['name']} {plan.name} [{config}] sm_{arch}: (JIT, kernel_signature) differ in {diff}")
        first = _case_plans(case)[0][1]
        divisible[case["name"]] = sorted(normalize_specialization(first, jit_specialization(first, first.configs[0], 90))[2])
    return {"available": True, "checked": checked, "mismatches": mismatches, "divisible": divisible}


_WORKER_TASKS.update(enumerate=_enumerate_attention, compile=_compile_job, check_specialization=_check_specializations)


class _Workers:
    """Worker processes for Triton compiles: ``python -c`` children running :func:`_worker_main`.

    Plain subprocesses rather than multiprocessing: they start without TRITON_INTERPRET in their
    environment (so triton compiles instead of interpreting, even when the caller runs under the
    interpreter, as the test suite does), and nothing re-imports the caller's ``__main__``. Tasks
    and results are JSON lines; a worker that dies is replaced and its task reported as failed.
    """

    def __init__(self, jobs: Optional[int] = None):
        import tempfile

        self.jobs = max(1, jobs or min(2, os.cpu_count() or 1))
        self._tmp = tempfile.TemporaryDirectory(prefix="fastgpt-inspect-")
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        # triton's own cache would only duplicate ours (and fill ~/.triton with kernels for GPUs not here)
        env["TRITON_CACHE_DIR"] = os.path.join(self._tmp.name, "triton")
        root = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        self._env = env
        self._count = 0
        self._procs = [self._start() for _ in range(self.jobs)]  # they import torch while the caller goes on

    def _start(self):
        import subprocess

        self._count += 1
        log = open(os.path.join(self._tmp.name, f"worker{self._count}.log"), "w+")
        proc = subprocess.Popen(
            [sys.executable, "-c", "from fastgpt.kernel_report import _worker_main; _worker_main()"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, env=self._env, text=True, bufsize=1,
        )
        proc.log = log  # type: ignore[attr-defined]
        return proc

    @staticmethod
    def _log_tail(proc) -> str:
        proc.log.flush()
        proc.log.seek(0)
        return proc.log.read()[-2000:].strip()

    def run(self, tasks: Sequence[Tuple[str, list]], on_result=None) -> List[Dict[str, Any]]:
        """Run (function name, args) tasks on the workers; [{"ok": result} or {"error": message}] in order."""
        import queue
        import threading

        pending: "queue.Queue[int]" = queue.Queue()
        for i in range(len(tasks)):
            pending.put(i)
        results: List[Optional[Dict[str, Any]]] = [None] * len(tasks)
        lock = threading.Lock()

        def drive(slot: int) -> None:
            while True:
                try:
                    i = pending.get_nowait()
                except queue.Empty:
                    return
                proc = self._procs[slot]
                try:
                    proc.stdin.write(json.dumps(tasks[i]) + "\n")
                    proc.stdin.flush()
                    line = proc.stdout.readline()
                except (BrokenPipeError, OSError):
                    line = ""
                if line:
                    results[i] = json.loads(line)
                else:  # the worker died (a compiler crash): report it and replace the worker
                    proc.wait()
                    results[i] = {"error": f"compile worker exited with status {proc.returncode}: {self._log_tail(proc)}"}
                    with lock:
                        self._procs[slot] = self._start()
                if on_result is not None:
                    with lock:
                        on_result()

        threads = [threading.Thread(target=drive, args=(slot,), daemon=True) for slot in range(len(self._procs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return results  # type: ignore[return-value]

    def close(self) -> None:
        for proc in self._procs:
            try:
                proc.stdin.close()
                proc.wait(timeout=30)
            except Exception:  # noqa: BLE001 - a stuck worker is killed; nothing else to do
                proc.kill()
            proc.log.close()
        self._procs = []
        self._tmp.cleanup()

    def __enter__(self) -> "_Workers":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _worker_main() -> None:
    """A compile worker: JSON tasks on stdin, one JSON result line each on stdout (see _Workers)."""
    protocol = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # anything else printed goes to the log, not into the protocol
    os.environ.pop("TRITON_INTERPRET", None)
    import torch

    torch.set_num_threads(1)
    for line in sys.stdin:
        name, args = json.loads(line)
        try:
            result = {"ok": _WORKER_TASKS[name](*args)}
        except Exception as exc:  # noqa: BLE001 - reported to the parent, which decides
            result = {"error": f"{type(exc).__name__}: {str(exc).strip()[:4000]}"}
        protocol.write(json.dumps(result) + "\n")
        protocol.flush()


def compile_attention(
    cases: Sequence[Dict[str, Any]],
    *,
    default_only: bool = False,
    archs: Sequence[int] = (80, 90),
    sass: str = "default",
    jobs: Optional[int] = None,
    use_cache: bool = True,
    progress: bool = False,
    options: Optional[Dict[str, Any]] = None,
    workers: Optional[_Workers] = None,
) -> Tuple[List[Dict[str, Any]], Dict[str, Any]]:
    """Compile every launch of ``cases`` (every tuning candidate, or only the default) for ``archs``.

    Returns the records of :func:`_enumerate_attention`, each with ``resources[str(arch)]`` (see
    ``_triton_utils.kernel_resources``) or ``error[str(arch)]`` (the compiler's message), and
    statistics. ``sass`` says whose disassembly is read ("default" configs, "all", "none"; the
    resource usage is read for all). ``options`` are extra compile options (e.g. ``{"maxnreg": 64}``).
    Identical specialisations compile once; results are cached unless ``use_cache`` is False.
    """
    start = time.perf_counter()
    own = workers is None
    workers = workers or _Workers(jobs)
    try:
        found = workers.run([("enumerate", [list(cases), list(archs), default_only])])[0]
        if "error" in found:
            raise RuntimeError(f"enumerating the attention launches failed: {found['error']}")
        records = found["ok"]
        by_name = {c["name"]: c for c in cases}
        results: Dict[str, Any] = {}
        todo: Dict[str, Tuple[str, list]] = {}
        for r in records:
            read = sass == "all" or (sass == "default" and r["default"])
            for arch in archs:
                key = f"{r['keys'][str(arch)]}-{'sass' if read else 'res'}"
                if options:
                    key += "-" + hashlib.sha256(json.dumps(options, sort_keys=True).encode()).hexdigest()[:8]
                r.setdefault("_keys", {})[str(arch)] = key
                if key in results or key in todo:
                    continue
                cached = _cache_get("triton", key) if use_cache else None
                if cached is not None:
                    results[key] = cached
                else:
                    todo[key] = ("compile", [by_name[r["case"]], r["kernel"], r["config_index"], arch, options, read])
        # largest first (the widest heads' forward kernels) so that the workers end together
        order = sorted(todo, key=lambda k: (-todo[k][1][0]["d"], todo[k][1][1] != "fwd"))
        bar = _progress(len(order), "compiling attention kernels", progress)
        outcomes = workers.run([todo[k] for k in order], on_result=lambda: bar.update(1))
        bar.close()
        for key, outcome in zip(order, outcomes):
            if "ok" in outcome:
                results[key] = {"resources": outcome["ok"]}
                if use_cache:
                    _cache_put("triton", key, results[key])
            else:  # a config that does not compile is a finding, not a crash
                results[key] = {"error": outcome["error"]}
    finally:
        if own:
            workers.close()
    for r in records:
        keys = r.pop("_keys")
        r["resources"], r["error"] = {}, {}
        for arch in archs:
            found = results[keys[str(arch)]]
            if "resources" in found:
                r["resources"][str(arch)] = found["resources"]
            else:
                r["error"][str(arch)] = found["error"]
    stats = {"launch_configs": len(records), "compiles": len(todo), "cached": len(results) - len(todo),
             "seconds": round(time.perf_counter() - start, 1), "workers": workers.jobs}
    return records, stats


def _progress(total: int, desc: str, enabled: bool):
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        enabled = False
    if not enabled or total == 0:

        class _Null:
            def update(self, n: int) -> None:
                pass

            def close(self) -> None:
                pass

        return _Null()
    return tqdm(total=total, desc=desc, unit="kernel", file=sys.stderr, dynamic_ncols=True)


# --------------------------------------------------------------------------------------------
# CUDA kernels: launches from the C++ launchers (emulator dry run), machine code from the build
# --------------------------------------------------------------------------------------------


class Unavailable(RuntimeError):
    """A part of the report cannot be made on this machine (the message says why)."""


_emulator = None


def _load_emulator():
    """The CPU emulator of csrc/ (tests/cuda_emu of the source checkout), built and loaded once."""
    global _emulator
    if _emulator is not None:
        return _emulator
    import importlib.util

    init = Path(__file__).resolve().parent.parent / "tests" / "cuda_emu" / "__init__.py"
    if not init.exists():
        raise Unavailable("the CUDA launch plans come from the emulator in the source checkout's tests/cuda_emu, "
                          "which this installation does not have")
    module = sys.modules.get("cuda_emu")
    if module is None or Path(getattr(module, "__file__", "")).resolve() != init:
        spec = importlib.util.spec_from_file_location("fastgpt_cuda_emu", init, submodule_search_locations=[str(init.parent)])
        module = importlib.util.module_from_spec(spec)
        sys.modules["fastgpt_cuda_emu"] = module
        spec.loader.exec_module(module)
    reason = module.unavailable_reason()
    if reason:
        raise Unavailable(f"the CUDA emulator (launch plans) cannot be built: {reason}")
    _emulator = module.load()
    return _emulator


def cuda_launches(op: str, pass_: str, rows: int, cols: int, dtype: str, gpu: Gpu, *, misalign: bool = False) -> Tuple[List[Dict[str, Any]], int]:
    """The launches csrc/'s launcher makes for ``op`` (layer_norm, add_layer_norm, gelu, bias_gelu) on
    x (rows, cols) on ``gpu``: [{"kernel", "grid", "block"}], and the workspace bytes the op allocates."""
    import re

    import torch

    emu = _load_emulator()
    lines, workspace = emu.dry_run_launches(f"{op}_{pass_}", rows, cols, getattr(torch, dtype), misalign=misalign,
                                            sms=gpu.sms, threads_per_sm=gpu.threads_per_sm)
    launches = []
    for line in lines:
        m = re.match(r"(.+) grid=\((\d+),(\d+),(\d+)\) block=\((\d+),(\d+),(\d+)\)$", line)
        if m is None:
            raise RuntimeError(f"unexpected launch log line: {line!r}")
        nums = [int(x) for x in m.groups()[1:]]
        launches.append({"kernel": m.group(1).strip(), "grid": nums[:3], "block": nums[3:]})
    return launches, workspace


def _normalize_kernel_name(name: str) -> str:
    """'void fastgpt::(anonymous namespace)::gelu_kernel<__half, 8, true>(FgGeluArgs)' -> 'gelu_kernel<__half,8,true>'."""
    name = name.strip()
    if name.startswith("void "):
        name = name[5:]
    depth, end = 0, len(name)
    for i, ch in enumerate(name):  # drop the parameter list: the first '(' outside template brackets
        depth += ch == "<"
        depth -= ch == ">"
        if ch == "(" and depth == 0 and i > 0 and not name[:i].endswith("::"):
            end = i
            break
    name = name[:end]
    head, sep, args = name.partition("<")
    head = head.rsplit("::", 1)[-1]
    return (head + sep + args).replace(" ", "")


def _demangle(names: Sequence[str]) -> Dict[str, str]:
    import shutil
    import subprocess

    tool = shutil.which("c++filt") or shutil.which("cu++filt")
    if tool is None:
        cuda = os.environ.get("CUDA_HOME") or "/usr/local/cuda"
        candidate = Path(cuda) / "bin" / "cu++filt"
        tool = str(candidate) if candidate.exists() else None
    if tool is None:
        raise Unavailable("c++filt not found (binutils): needed to match the CUDA kernels' mangled names")
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True, check=True).stdout.splitlines()
    return dict(zip(names, out))


def _cuda_library(build: bool = True) -> Path:
    from fastgpt import cuda_ext

    lib = cuda_ext.library_path()
    if lib is None and not build:
        raise Unavailable("the CUDA extension is not built yet (`fastgpt inspect` builds it, once, for sm_80 and sm_90)")
    if lib is None:
        if cuda_ext.cuda_home() is None:
            raise Unavailable("the CUDA extension is not built and nvcc was not found (set CUDA_HOME)")
        try:
            cuda_ext.load()  # compiles csrc/ for sm_80 and sm_90 once (cached), as the first CUDA use would
        except RuntimeError as exc:
            raise Unavailable(str(exc)) from exc
        lib = cuda_ext.library_path()
        if lib is None:
            raise Unavailable("the CUDA extension was built but its library was not found")
    return lib


def cuda_machine_code(build: bool = True, use_cache: bool = True) -> Tuple[Dict[Tuple[int, str], Dict[str, Any]], str]:
    """{(arch, normalized kernel name): resources} of the built CUDA extension, and its path (cached by
    content). ``build``: compile the extension first if it is not built (else raise Unavailable)."""
    from fastgpt.kernels._triton_utils import read_machine_code, summarize_opcodes

    lib = _cuda_library(build)
    digest = hashlib.sha256(lib.read_bytes()).hexdigest()[:32]
    key = f"{digest}-{READER_VERSION}"
    cached = _cache_get("cuda", key) if use_cache else None
    if cached is None:
        import collections

        found = read_machine_code(str(lib))
        names = _demangle(sorted({fn for _, fn in found}))
        cached = []
        for (arch, fn), info in found.items():
            opcodes = collections.Counter(info.pop("opcodes"))
            cached.append({"arch": arch, "name": _normalize_kernel_name(names[fn]), "mangled": fn, **info,
                           **summarize_opcodes(opcodes)})
        _cache_put("cuda", key, cached)
    table = {}
    for entry in cached:
        entry = dict(entry)
        for k in ("ldg", "stg"):  # JSON keys are strings
            entry[k] = {int(b): n for b, n in entry[k].items()}
        table[(entry["arch"], entry["name"])] = entry
    return table, str(lib)


_CUDA_SIZES = {"float": 4, "__half": 2, "__nv_bfloat16": 2}


def _template_args(kernel: str) -> List[str]:
    return [a.strip() for a in kernel[kernel.index("<") + 1 : kernel.rindex(">")].split(",")] if "<" in kernel else []


def _cuda_vector_path(kernel: str) -> Optional[bool]:
    """Whether a csrc kernel instance is its 16-byte vector path: VEC * sizeof(T) == 16, with T the
    first template argument and VEC the first integer one (None: the kernel has no VEC parameter)."""
    args = _template_args(kernel)
    ints = [a for a in args if a.lstrip("-").isdigit()]
    if not args or not ints or args[0] not in _CUDA_SIZES:
        return None
    return int(ints[0]) * _CUDA_SIZES[args[0]] == 16


# --------------------------------------------------------------------------------------------
# the byte / FLOP model
# --------------------------------------------------------------------------------------------

TILING_MODEL = {
    "tiled bytes": "global-memory bytes the kernel's loops request: each tile load and store counted every time it "
                   "happens (K/V once per query tile, Q/dO once per key tile, each pass over a wide row, partial-sum rows)",
    "hbm bytes": "tiled bytes after a simple L2 model: data re-read by programs that are resident at the same time, "
                 "or whose working set in flight fits in half the L2, is fetched from HBM once",
    "exec flops": "tensor-core FLOPs the tiles execute (full BLOCK_M x BLOCK_N x padded-head-dim tiles, masked "
                  "elements included); 0 for the memory-bound ops",
    "min bytes / useful flops": "fastgpt._timing's work model (DESIGN.md section 5): every input read and every "
                                "output written once; attention FLOPs 4*B*H*Sq*Sk*D, halved when causal, backward 2.5x",
    "model time": "per launch max(hbm bytes / HBM bandwidth, exec flops / peak) / SM fill, where SM fill = "
                  "min(1, programs / SMs) (a grid smaller than the GPU leaves SMs idle); launches of one op add up",
    "ideal time": "max(min bytes / HBM bandwidth, useful flops / peak)",
    "fraction of roofline": "ideal time / model time: what the tiling and launch structure leave of the roofline, "
                            "before any latency, pipelining or clock effect (a model, not a measurement)",
    "occupancy": "resident warps / 64 from registers (allocated per warp in units of 256), shared memory (+1 KiB "
                 "reserved per block), threads and blocks per SM",
}


def _reused(sharers: int, group_bytes: float, resident: int, gpu: Gpu) -> bool:
    """Whether data read by ``sharers`` consecutive programs comes from HBM once: they are all resident
    together (they read it at about the same time), or the groups in flight fit in half the L2."""
    if resident <= 0:
        return False
    if sharers <= resident:
        return True
    return (resident / sharers + 1) * group_bytes <= gpu.l2_bytes / 2


def _attention_model(rec: Dict[str, Any], case: Dict[str, Any], resident: int, gpu: Gpu) -> Dict[str, float]:
    """Tiled bytes, HBM bytes and executed FLOPs of one attention launch (see TILING_MODEL).

    The loop bounds are the kernels' own (kernels/flash_attention.py): the forward and dQ kernels
    visit key tiles [0, hi) per query tile (hi = the causal bound), the dK/dV kernel query tiles
    [m_lo, Sq) per key tile for each query head of its GQA group.
    """
    b, hq, hk, sq, sk, d = (case[k] for k in ("b", "hq", "hk", "sq", "sk", "d"))
    dv = case.get("dv", d)
    e = 4 if case["dtype"] == "float32" else 2
    group, off, causal = hq // hk, sk - sq, case["causal"]
    bm, bn = rec["config"]["block_m"], rec["config"]["block_n"]
    bd, bdv = rec["block_d"], rec["block_dv"]
    kernel = rec["kernel"]
    if kernel == "bwd_preprocess":
        nbytes = b * hq * sq * (2 * dv * e + 4 + 8)  # read O, dO, lse; write delta, lse2
        return {"tiled_bytes": nbytes, "hbm_bytes": nbytes, "exec_flops": 0.0}
    if kernel in ("fwd", "bwd_dq"):
        n_m = -(-sq // bm)
        key_rows = key_tiles = 0
        for t in range(n_m):
            m0 = t * bm
            hi = max(min(sk, m0 + bm + off), 0) if causal else sk
            tiles = -(-hi // bn)
            key_tiles += tiles
            key_rows += min(tiles * bn, sk)
        if kernel == "fwd":
            own = sq * (d * e + dv * e + 4)  # Q read, O and lse written
            flops_per_tile = 2 * bm * bn * (bd + bdv)
        else:
            own = sq * ((d + dv) * e + 8 + d * e)  # Q, dO, lse2, delta read, dQ written
            flops_per_tile = 2 * bm * bn * (2 * bd + bdv)
        kv_tiled = key_rows * (d + dv) * e
        heads = b * hq
        kv_once = b * hk * sk * (d + dv) * e
        hit = _reused(group * n_m, sk * (d + dv) * e, resident, gpu)
        return {"tiled_bytes": heads * (own + kv_tiled), "hbm_bytes": heads * own + (kv_once if hit else heads * kv_tiled),
                "exec_flops": float(heads * key_tiles * flops_per_tile)}
    if kernel == "bwd_dkdv":
        n_n = -(-sk // bn)
        q_rows = q_tiles = 0
        for j in range(n_n):
            m_lo = max(j * bn - off, 0) // bm * bm if causal else 0
            rows = max(sq - m_lo, 0)
            q_rows += rows
            q_tiles += -(-rows // bm)
        own = sk * (d + dv) * e * 2  # K, V read, dK, dV written
        per_q_row = (d + dv) * e + 8  # Q, dO, lse2, delta
        q_tiled = group * q_rows * per_q_row
        q_once = b * hq * sq * per_q_row
        hit = _reused(n_n, group * sq * per_q_row, resident, gpu)
        return {"tiled_bytes": b * hk * (own + q_tiled), "hbm_bytes": b * hk * own + (q_once if hit else b * hk * q_tiled),
                "exec_flops": float(b * hk * group * q_tiles * 2 * bm * bn * (2 * bd + 2 * bdv))}
    raise ValueError(f"no byte model for attention kernel {kernel!r}")


def _attention_work(case: Dict[str, Any], pass_: str) -> Tuple[float, float]:
    """(min bytes, useful FLOPs) of an attention pass: fastgpt._timing's FLOP convention; every input
    read and output written once."""
    from fastgpt import _timing

    b, hq, hk, sq, sk, d = (case[k] for k in ("b", "hq", "hk", "sq", "sk", "d"))
    dv = case.get("dv", d)
    e = 4 if case["dtype"] == "float32" else 2
    if case["causal"] and sq not in (1, sk):
        raise ValueError("the FLOP convention covers causal attention with Sq == Sk (or a one-query decode step)")
    causal = case["causal"] and sq == sk and sq > 1  # one query sees every key (bottom-right causal)
    kv = b * hk * sk * (d + dv) * e
    if pass_ == "fwd":
        min_bytes = b * hq * sq * (d * e + dv * e + 4) + kv
    else:  # read Q, O, dO, lse, K, V; write dQ, dK, dV
        min_bytes = b * hq * sq * (2 * d * e + 2 * dv * e + 4) + 2 * kv
    return float(min_bytes), _timing.attention_flops(b, hq, sq, sk, d, causal=causal, mode=pass_)


def _cuda_min_bytes(case: Dict[str, Any]) -> float:
    import torch

    from fastgpt import _timing

    dtype = getattr(torch, case["dtype"])
    m, n, bwd = case["rows"], case["cols"], case["pass_"] == "bwd"
    op = case["op"]
    if op == "layer_norm":
        return float(_timing.layer_norm_bytes(m, n, dtype, dtype, dtype, backward=bwd))
    if op == "add_layer_norm":
        return float(_timing.add_layer_norm_bytes(m, n, dtype, dtype, dtype, backward=bwd))
    if op == "gelu":
        return float(_timing.gelu_bytes(m * n, dtype, backward=bwd))
    return float(_timing.bias_gelu_bytes(m * n, n, dtype, dtype, backward=bwd))


def _cuda_model(launch: Dict[str, Any], case: Dict[str, Any], workspace: int, resident_blocks: int, gpu: Gpu) -> Dict[str, float]:
    """Tiled and HBM bytes of one csrc launch (see TILING_MODEL), from what each kernel reads and writes.

    x and the gradients are (rows, cols) in x's dtype (e bytes), parameters (cols,) in the same
    dtype, mean/rstd float32 per row, partial-sum rows float32 (the workspace, written once by the
    main kernel and read once by column_sums_kernel).
    """
    m, n = case["rows"], case["cols"]
    e = 4 if case["dtype"] == "float32" else 2
    p = e
    mn = m * n * e
    residual = case["op"] == "add_layer_norm"
    bwd = case["pass_"] == "bwd"
    name = launch["kernel"].split("<")[0]
    rows_per_block = launch["block"][1]
    row_iterations = -(-m // rows_per_block)  # blocks x grid-stride steps: each re-reads the parameters (from L2)
    if name == "layer_norm_fwd_kernel":
        once = mn * (2 + (2 if residual else 0)) + 8 * m  # x (+ residual, sum) and y; mean, rstd
        return {"tiled_bytes": once + row_iterations * 2 * n * p, "hbm_bytes": once + 2 * n * p}
    if name == "layer_norm_fwd_big_kernel":
        # pass 1 reads x (+ residual, writes the sum); passes 2 and 3 re-read the row (x or the sum)
        once = mn * (2 + (2 if residual else 0)) + 8 * m
        rereads = 2 * mn
        hit = resident_blocks * n * e <= gpu.l2_bytes / 2  # the rows in flight stay in L2 between passes
        return {"tiled_bytes": once + rereads + m * 2 * n * p, "hbm_bytes": once + (0 if hit else rereads) + 2 * n * p}
    if name == "layer_norm_bwd_kernel":
        once = mn * (3 + (1 if residual else 0)) + 8 * m + workspace  # dy, x (+ dsum) read, dx written; partials
        return {"tiled_bytes": once + row_iterations * 2 * n * p, "hbm_bytes": once + n * p}
    if name == "layer_norm_bwd_big_kernel":
        once = mn * (3 + (1 if residual else 0)) + 8 * m
        rereads = 2 * mn  # the second pass reads x and dy again
        hit = resident_blocks * 2 * n * e <= gpu.l2_bytes / 2
        return {"tiled_bytes": once + rereads + m * 2 * n * p, "hbm_bytes": once + (0 if hit else rereads) + n * p}
    if name == "layer_norm_bwd_params_kernel":
        col_blocks = launch["grid"][0]
        nbytes = 2 * mn + workspace  # x and dy read a third time (column-wise), partials written
        return {"tiled_bytes": nbytes + 8 * m * col_blocks, "hbm_bytes": nbytes + 8 * m}
    if name == "column_sums_kernel":
        outputs = 2 if "layer_norm" in case["op"] else 1
        nbytes = workspace + outputs * n * p
        return {"tiled_bytes": nbytes, "hbm_bytes": nbytes}
    if name == "gelu_kernel":
        nbytes = (3 if bwd else 2) * mn
        return {"tiled_bytes": nbytes, "hbm_bytes": nbytes}
    if name == "bias_gelu_kernel":
        bias_reads = launch["grid"][1] * launch["block"][1]  # each thread loads its bias pack once
        nbytes = (3 if bwd else 2) * mn + (workspace if bwd else 0)
        return {"tiled_bytes": nbytes + bias_reads * n * p, "hbm_bytes": nbytes + n * p}
    raise ValueError(f"no byte model for CUDA kernel {launch['kernel']!r}: add one to fastgpt/kernel_report.py")


# --------------------------------------------------------------------------------------------
# checks (shared by the report and the tests)
# --------------------------------------------------------------------------------------------


def launch_problems(row: Dict[str, Any]) -> List[str]:
    """What is wrong with one compiled launch on one GPU (a row of the report), each message naming
    the kernel, its config and the figure. Checks: one block fits; no spills (stack frame, local
    memory, STL/LDL instructions) in 16-bit attention and CUDA kernels (the exact-fp32 attention path
    may spill a little: it holds its operands in registers); tensor-core MMA in the attention dot
    kernels on 16-bit inputs; 128-bit global loads and stores on the CUDA kernels' vector paths.
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


def _widths(widths: Dict[int, int]) -> str:
    return " ".join(f"{n}x{b}b" for b, n in sorted(widths.items(), reverse=True))


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
        "stl": res.get("stl"), "ldl": res.get("ldl"), "hmma": res.get("hmma"), "hgmma": res.get("hgmma"),
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
    if kernel == "bwd_preprocess":
        return f"M{c['block_m']} w{c['num_warps']}"
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
            case_out = {"op": "attention", "pass": pass_, "case": case["name"], "source": "triton", "dtype": case["dtype"],
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
                    row = _row(gpu, "triton", case["name"], "attention", pass_, r["kernel"], config, r["default"], case["dtype"],
                               32 * r["config"]["num_warps"], r["grid"], r["resources"][arch],
                               "memory" if r["kernel"] == "bwd_preprocess" else "mma", None)
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
    from fastgpt import _timing

    report["versions"] = {"fastgpt": fastgpt.__version__, "python": platform.python_version(), "torch": torch.__version__,
                          "triton": triton_version}
    report["gpus"] = [asdict(g) for g in GPUS]
    report["work_model"] = _timing.WORK_MODEL
    report["tiling_model"] = TILING_MODEL
    report["pipes"], report["default_configs"] = pipe_model.report(), pipe_model.default_configs()  # issue 19 hook
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
            report["cases"] = cases + report["cases"]
            report["rows"] = rows + report["rows"]
            report["problems"] += errors
            report["timing"]["triton"] = stats
    finally:
        if workers is not None:
            workers.close()
    for row in report["rows"]:
        (report["problems"] if row["default"] else report["notes"]).extend(launch_problems(row))
        report["notes"].extend(launch_notes(row))
    report["elapsed_s"] = round(time.perf_counter() - start, 1)
    return report


# --------------------------------------------------------------------------------------------
# output: table, plot, bench summary
# --------------------------------------------------------------------------------------------


def _kb(n: float) -> str:
    return f"{n / 1024:.0f}" if n >= 1024 else f"{n / 1024:.1f}"


def _mix(row: Dict[str, Any]) -> str:
    if row["role"] == "mma":
        return f"HGMMA {row['hgmma']}" if row["hgmma"] else f"HMMA {row['hmma']}"
    return _widths(row["ldg"]) or "-"


def _short_kernel(name: str, width: int = 44) -> str:
    return name if len(name) <= width else name[: width - 1] + "~"


def format_report(report: Dict[str, Any], *, launches: bool = True, candidates: bool = True) -> List[str]:
    """The terminal tables: launches (default configs), the roofline model per op, tuning candidates,
    then problems, notes and what was unavailable."""
    lines = ["fastgpt inspect: " + report["disclaimer"] + "."]
    gpus = {g["key"]: g for g in report["gpus"]}
    keys = [g["key"] for g in report["gpus"]]
    by = {}
    for r in report["rows"]:
        by.setdefault((r["case"], r["op"], r["pass"], r["kernel"], r["config"]), {})[r["gpu"]] = r
    arch = "/".join(f"sm_{gpus[k]['arch']}" for k in keys)
    lines += _launch_table(by, keys, arch) if launches else []
    lines += _roofline_table(report, keys)
    lines += pipe_model.report_lines(report.get("pipes"))  # issue 19 hook: MUFU / FP32 pipes per tile
    if candidates:
        lines += _candidate_table(report, by, keys, gpus)
    for title, items in (("problems (default configs)", report["problems"]), ("notes", report["notes"])):
        if items:
            lines.append("")
            lines.append(f"{title}:")
            lines += [f"  {p}" for p in items]
    for part, reason in report["unavailable"].items():
        lines.append(f"not available ({part}): {reason}")
    t = report.get("timing", {})
    tri = t.get("triton")
    if tri:
        lines.append("")
        lines.append(f"{tri['launch_configs']} attention launch configs: {tri['compiles']} compiles "
                     f"({tri['cached']} cached) on {tri['workers']} worker(s) in {tri['seconds']} s; CUDA part {t.get('cuda_s', '-')} s")
    return lines


def _launch_table(by, keys, arch) -> List[str]:
    lines = [""]
    lines.append(f"launches (default config; pairs are {arch}, i.e. {'/'.join(keys)}):")
    head = (f"{'op':<19}{'case':<16}{'kernel':<45}{'config / block':<20}{'grid':>14}{'regs':>9}{'STL+LDL':>8}{'smem KB':>10}"
            f"{'occupancy':>11}  {'MMA / global loads (sm_90)':<28}{'MUFU':>6}")
    lines += [head, "-" * len(head)]
    for (case, op, pass_, kernel, config), per in by.items():
        first = next(per[k] for k in keys if k in per)
        if not first["default"]:
            continue
        pair = [per.get(k) for k in keys]
        regs = "/".join(str(r["registers"]) if r else "-" for r in pair)
        spill = "/".join(str((r["stl"] or 0) + (r["ldl"] or 0)) if r else "-" for r in pair)
        smem = "/".join(_kb(r["shared"]) if r else "-" for r in pair)
        occ = "/".join(f"{r['occupancy']:.0%}" if r else "-" for r in pair)
        grid = "/".join("x".join(str(g) for g in r["grid"] if g != 1) or "1" if r else "-" for r in pair)
        lines.append(f"{op + ' ' + pass_:<19}{case:<16}{_short_kernel(kernel):<45}{config[:19]:<20}{grid:>14}{regs:>9}{spill:>8}{smem:>10}"
                     f"{occ:>11}  {_mix(first):<28}{first['mufu']:>6}")
    return lines


def _roofline_table(report, keys) -> List[str]:
    lines = [""]
    lines.append("roofline model per op (static: minimum bytes and FLOPs vs what the tiling moves; not a timing):")
    head = f"{'op':<19}{'case':<16}{'min MB':>9}{'HBM MB':>9}{'tiled MB':>10}{'GFLOP':>9}"
    for k in keys:
        head += f"  {k + ' ideal/model us':>22}{'frac':>6}"
    lines += [head, "-" * len(head)]
    for c in report["cases"]:
        g0 = c["gpus"].get(keys[0], {})
        line = (f"{c['op'] + ' ' + c['pass']:<19}{c['case']:<16}{c['min_bytes'] / 1e6:>9.1f}{g0.get('hbm_bytes', 0) / 1e6:>9.1f}"
                f"{g0.get('tiled_bytes', 0) / 1e6:>10.1f}{c['useful_flops'] / 1e9:>9.1f}")
        for k in keys:
            g = c["gpus"].get(k)
            if g and g["fraction"] is not None:
                line += f"  {g['ideal_us']:>10.1f}/{g['model_us']:<11.1f}{g['fraction']:>6.0%}"
            else:
                line += f"  {'-':>22}{'-':>6}"
        lines.append(line)
    return lines


def _candidate_table(report, by, keys, gpus) -> List[str]:
    if all(r["default"] for r in report["rows"]):
        return []
    lines = ["", "tuning candidates (attention; * = default): registers, shared KB, occupancy, stack bytes (spills) per arch"]
    head = f"{'kernel':<16}{'case':<18}{'config':<22}" + "".join(f"{'sm_' + str(gpus[k]['arch']):>32}" for k in keys)
    lines += [head, "-" * len(head)]
    for (case, op, pass_, kernel, config), per in by.items():
        if op != "attention":
            continue
        cells = ""
        for k in keys:
            r = per.get(k)
            cells += (f"{r['registers']:>8} {_kb(r['shared']):>6} {r['occupancy']:>6.0%} {r['stack']:>5}   "
                      if r else f"{'does not compile':>32}")
        star = "*" if next(per[k] for k in keys if k in per)["default"] else " "
        lines.append(f"{kernel:<16}{case:<18}{star + config:<22}{cells}")
    return lines


def write_plot(report: Dict[str, Any], path: str) -> None:
    """A PNG of the modelled fraction of roofline per op and shape (one bar per GPU), labelled as a model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = [c for c in report["cases"] if c["gpus"]]
    labels = [f"{c['op']} {c['pass']}  {c['case']}" for c in cases]
    keys = [g["key"] for g in report["gpus"]]
    fig, ax = plt.subplots(figsize=(9, max(4, 0.19 * len(cases) + 1.5)))
    height = 0.8 / len(keys)
    for i, k in enumerate(keys):
        values = [100 * (c["gpus"].get(k, {}).get("fraction") or 0) for c in cases]
        ax.barh([y + i * height for y in range(len(cases))], values, height, label=k)
    ax.set_yticks([y + height * (len(keys) - 1) / 2 for y in range(len(cases))])
    ax.set_yticklabels(labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("modelled % of roofline = ideal time / model time (static model, not a measurement)")
    ax.set_xlim(0, 105)
    ax.axvline(100, color="gray", linewidth=0.5)
    ax.legend(loc="lower right")
    ax.set_title("fastgpt inspect: sm_80 / sm_90 machine code and a byte/FLOP model", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


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
    parser.add_argument("--only", choices=("triton", "cuda"), help="only the Triton attention kernels or only the CUDA kernels")
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
