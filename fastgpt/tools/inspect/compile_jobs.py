"""Triton attention for ``fastgpt inspect``: the launch plans, compiled for sm_80/sm_90 in worker processes
without TRITON_INTERPRET, and the on-disk cache of what was read from them."""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple


READER_VERSION = 2  # bump when what is read from a compiled kernel changes (invalidates the cache)


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

    from fastgpt import registry
    from fastgpt.kernels import flash_attention as fa

    if case.get("op", "attention") != "attention":  # another Triton op: its registry entry makes the plans
        return registry.get(case["op"]).report_plans(case)
    dtype = getattr(torch, case["dtype"])
    dv = case.get("dv", case["d"])
    off = case.get("q_offset", 0)  # q as a view that starts `off` elements into its storage (e.g. a fused QKV)
    opts = {"window": tuple(case.get("window", (-1, -1))), "softcap": case.get("softcap", 0.0), "alibi": case.get("alibi", False)}
    if case.get("varlen"):  # packed: b sequences of sq (sk) tokens each, (tokens, heads, dim) tensors
        b, sq, sk = case["b"], case["sq"], case["sk"]
        q = torch.empty(b * sq, case["hq"], case["d"], dtype=dtype, device="meta")
        k = torch.empty(b * sk, case["hk"], case["d"], dtype=dtype, device="meta")
        v = torch.empty(b * sk, case["hk"], dv, dtype=dtype, device="meta")
        cu = torch.empty(b + 1, dtype=torch.int32, device="meta")
        plans = fa.example_plans(q, k, v, case["causal"], arch=case.get("config_arch"), seqs=fa.Seqs(cu, cu, sq, sk),
                                 deterministic=case.get("deterministic", True), **opts)
    else:
        q = torch.empty(case["b"], case["hq"], case["sq"], case["d"] + off, dtype=dtype, device="meta")[..., off:]
        k = torch.empty(case["b"], case["hk"], case["sk"], case["d"], dtype=dtype, device="meta")
        v = torch.empty(case["b"], case["hk"], case["sk"], dv, dtype=dtype, device="meta")
        plans = fa.example_plans(q, k, v, case["causal"], arch=case.get("config_arch"),  # per-arch config lists
                                 deterministic=case.get("deterministic", True), **opts)
    out = [("fwd", plans[0])] if "fwd" in case["passes"] else []
    if "bwd" in case["passes"]:
        out += [("bwd", p) for p in plans[1:]]
    return out


def _job_key(plan, config, arch: int) -> str:
    import triton

    from fastgpt.tools.inspect.compiling import launch_specialization, normalize_specialization

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
                    "splits": plan.args.get("NUM_SPLITS"), "block_d": plan.constexprs.get("BLOCK_D"), "block_dv": plan.constexprs.get("BLOCK_DV", plan.constexprs.get("BLOCK_D")),
                    "keys": {str(a): _job_key(plan, config, a) for a in archs},
                })  # fmt: skip
    return records


def _compile_job(case: Dict[str, Any], kernel: str, config_index: int, arch: int, options: Optional[Dict[str, Any]] = None,
                 sass: bool = True) -> Dict[str, Any]:
    """Worker: compile one launch for sm_<arch> and read its machine code (kernel_resources)."""
    from fastgpt.tools.inspect.compiling import compile_plan, kernel_resources

    plan = next(p for _, p in _case_plans(case) if p.name == kernel)
    start = time.perf_counter()
    compiled = compile_plan(plan, plan.configs[config_index], arch, **(options or {}))
    found = kernel_resources(compiled, arch, sass=sass)
    found["compile_s"] = round(time.perf_counter() - start, 2)
    return found


def _check_specializations(cases: Sequence[Dict[str, Any]], archs: Sequence[int] = (80, 90)) -> Dict[str, Any]:
    """Worker: for every launch and config of ``cases``, the specialisation triton's JIT binder computes
    against ``compiling.kernel_signature`` (the fallback used where triton's internals differ).
    Returns whether the binder was usable, how many were compared, the mismatches, and for each
    case which arguments of the first launch carry the 16-byte divisibility hint."""
    from fastgpt.tools.inspect.compiling import jit_specialization, kernel_signature, normalize_specialization

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


def _triton_op_task(name: str, *args):
    """Worker: a task of the element-wise / row-wise Triton kernels (fastgpt.tools.inspect.triton_ops)."""
    from fastgpt.tools.inspect import triton_ops

    return getattr(triton_ops, name)(*args)


_WORKER_TASKS.update(enumerate=_enumerate_attention, compile=_compile_job, check_specialization=_check_specializations,
                     triton_op=_triton_op_task)


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
        root = str(Path(__file__).resolve().parents[3])  # the folder that holds the fastgpt package
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        self._env = env
        self._count = 0
        self._procs = [self._start() for _ in range(self.jobs)]  # they import torch while the caller goes on

    def _start(self):
        import subprocess

        self._count += 1
        log = open(os.path.join(self._tmp.name, f"worker{self._count}.log"), "w+")
        proc = subprocess.Popen(
            [sys.executable, "-c", "from fastgpt.tools.inspect.compile_jobs import _worker_main; _worker_main()"],
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
    ``compiling.kernel_resources``) or ``error[str(arch)]`` (the compiler's message), and
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
