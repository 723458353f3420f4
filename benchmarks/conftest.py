"""pytest-benchmark setup for fastgpt's benchmark suites.

    pytest benchmarks --benchmark-only                      # measure (GPU suites need a CUDA device)
    pytest benchmarks --benchmark-only --benchmark-json=out.json
    pytest benchmarks --benchmark-disable                   # CI: run the benchmark code once, time nothing

Which number is the truth: on a GPU, ``extra_info["ms"]`` of each benchmark, the CUDA-event median
of :func:`fastgpt.tools.bench.timing.time_cuda` (warm-up, an L2 flush before every call, median). pytest-benchmark's
own columns time the same call on the host clock with a ``torch.cuda.synchronize()`` after it, so they
include launch latency; they are kept for pytest-benchmark's tooling (``--benchmark-compare``), not
for the figures we report. On the CPU, the dispatch suite's truth is the interleaved comparison in
the fastgpt benchmark's ``extra_info`` (``overhead_us``, ``overhead_pct``: minima of alternating rounds);
the pytest-benchmark columns there are per-call host times of each callable on its own.

Each case's implementations share a benchmark group, so they print side by side. Ratios to every
peer measured in the same session are added to the fastgpt entries of ``--benchmark-json`` and printed
at the end of the run, with the targets (docs/design.md, 'Performance targets and the byte/FLOP model') they meet or miss; the JSON also carries the
roofline probe and the byte/FLOP model under the top-level key ``fastgpt``.

Options: ``--fastgpt-tier quick|default|full`` (how many shapes), ``--fastgpt-budget-s SECONDS`` (per
module; items past it skip with that reason), ``--fastgpt-threads N`` (torch threads for CPU timings,
default 1, so that other load on a shared machine disturbs the figures less).
"""

from __future__ import annotations

import datetime
import os
import sys
import time
from typing import Callable, Dict, List, Optional

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    # the CPU smoke run executes the Triton attention kernel through the interpreter, which must be
    # switched on before anything imports triton (as in tests/conftest.py)
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("triton was imported before benchmarks/conftest.py could set TRITON_INTERPRET=1")
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from fastgpt.tools.bench import op_cases as bc  # noqa: E402
from fastgpt.tools.bench import compare as cmp_
from fastgpt.tools.bench import timing as _timing  # noqa: E402
from fastgpt.testing import reset_backend_state  # noqa: E402

NO_CUDA_REASON = "no CUDA device (torch.cuda.is_available() is False)"
TRUTH = (
    "extra_info.ms is the figure: CUDA-event median, L2 flushed before each call (fastgpt.tools.bench.timing.time_cuda); "
    "pytest-benchmark's stats are host wall clock of call + synchronize"
)

# every record measured in this session (fastgpt and peers); the ratios are computed from these
RECORDS: List[Dict[str, object]] = []
DISPATCH: List[Dict[str, object]] = []
GPT: List[Dict[str, object]] = []
_ROOFLINE: Dict[str, _timing.Roofline] = {}


def pytest_addoption(parser):
    group = parser.getgroup("fastgpt", "fastgpt benchmarks")
    group.addoption(
        "--fastgpt-tier",
        choices=sorted(bc.TIERS),
        default=os.environ.get("FASTGPT_BENCH_TIER", "default"),
        help="shapes to benchmark: quick, default or full (env FASTGPT_BENCH_TIER)",
    )
    group.addoption(
        "--fastgpt-budget-s",
        type=float,
        default=float(os.environ["FASTGPT_BENCH_BUDGET_S"]) if os.environ.get("FASTGPT_BENCH_BUDGET_S") else None,
        help="time budget per benchmark module in seconds; later items skip saying so (env FASTGPT_BENCH_BUDGET_S)",
    )
    group.addoption(
        "--fastgpt-threads",
        type=int,
        default=int(os.environ.get("FASTGPT_BENCH_THREADS", "1")),
        help="torch threads for the CPU timings (default 1; env FASTGPT_BENCH_THREADS)",
    )


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason=NO_CUDA_REASON)
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_generate_tests(metafunc):
    """Parametrise (op_case, impl) from the module's BENCH_OPS in the chosen tier, impl varying fastest."""
    if "op_case" in metafunc.fixturenames:
        tier = metafunc.config.getoption("--fastgpt-tier")
        params = [
            pytest.param(case, impl, id=f"{case.id}-{impl}")
            for op in metafunc.module.BENCH_OPS
            for case in bc.gpu_cases(op, tier)
            for impl in bc.impls_for(op)
        ]
        metafunc.parametrize(("op_case", "impl"), params)
    if "smoke_case" in metafunc.fixturenames:
        params = [pytest.param(case, id=case.id) for op in metafunc.module.BENCH_OPS for case in bc.smoke_cases(op)]
        metafunc.parametrize("smoke_case", params)


@pytest.fixture(autouse=True)
def _fresh_backend_state(monkeypatch):
    """Benchmarks choose their backend explicitly; the environment must not change it."""
    reset_backend_state(monkeypatch)
    yield


class _Log:
    """Where the suites put what they measured (read back by the summary and the JSON hook)."""

    records = RECORDS
    dispatch = DISPATCH
    gpt = GPT


@pytest.fixture(scope="session")
def bench_log() -> _Log:
    return _Log()


@pytest.fixture(scope="module")
def budget(request):
    """``check()`` skips the current item once this module has used its time budget."""
    limit: Optional[float] = request.config.getoption("--fastgpt-budget-s")
    start = time.perf_counter()
    name = request.module.__name__

    class Budget:
        def check(self) -> None:
            if limit is not None and time.perf_counter() - start > limit:
                pytest.skip(f"the {limit:.0f} s time budget of {name} is spent (--fastgpt-budget-s)")

    yield Budget()
    bc.release()
    if HAS_CUDA:
        torch.cuda.empty_cache()


@pytest.fixture(scope="session")
def tier(request) -> str:
    return request.config.getoption("--fastgpt-tier")


@pytest.fixture(scope="session")
def threads(request) -> int:
    return request.config.getoption("--fastgpt-threads")


@pytest.fixture(autouse=True)
def _torch_threads(threads):
    """Every benchmark (and its set-up) runs with --fastgpt-threads torch threads (default 1): on a
    shared 2-core machine, torch's multi-threaded CPU kernels spend most of their time waiting for a
    core another process holds, which makes CPU figures meaningless."""
    with _timing.cpu_threads(threads):
        yield


def roofline_for(device: torch.device) -> _timing.Roofline:
    """The roofline probe of ``device``, measured once per session (on first use)."""
    key = str(device)
    if key not in _ROOFLINE:
        _ROOFLINE[key] = _timing.probe_roofline(device)
    return _ROOFLINE[key]


@pytest.fixture
def cuda_device() -> torch.device:
    if not HAS_CUDA:
        pytest.skip(NO_CUDA_REASON)
    return torch.device("cuda", torch.cuda.current_device())


@pytest.fixture(scope="session")
def gpu_roofline() -> _timing.Roofline:
    """The roofline probe of the GPU (copy bandwidth, bf16 matmul), measured once per session, on first use."""
    if not HAS_CUDA:
        pytest.skip(NO_CUDA_REASON)
    return roofline_for(torch.device("cuda", torch.cuda.current_device()))


def _sync_call(fn: Callable[[], object], device: torch.device) -> Callable[[], None]:
    def call() -> None:
        fn()
        torch.cuda.synchronize(device)

    return call


def _flush_setup(device: torch.device, before: Optional[Callable[[], None]]) -> Callable[[], None]:
    buf = _timing._flush_buffer(device)

    def setup() -> None:
        if before is not None:
            before()  # the forward of a backward-only case
        buf.zero_()
        torch.cuda.synchronize(device)  # all of it must finish before pytest-benchmark starts its clock

    return setup


@pytest.fixture
def run_gpu_case(benchmark, budget, cuda_device, gpu_roofline):
    """``run(case, impl)``: prepare, measure with CUDA events, record, and feed pytest-benchmark."""

    def run(case: bc.OpCase, impl: str) -> None:
        budget.check()
        benchmark.group = case.group
        try:
            prepared = bc.prepare(case, impl, cuda_device)
        except bc.Unavailable as exc:
            pytest.skip(f"{impl}: {exc}")
        info = {"impl": impl, "op": case.op, "mode": case.mode, "shape": case.shape_label, "dtype": case.dtype}
        rounds = 1
        if benchmark.enabled:
            record = bc.measure(prepared, gpu_roofline)
            record["truth"] = TRUTH
            RECORDS.append(record)
            info.update(record)
            rounds = max(3, min(50, int(50.0 / max(float(record["ms"]), 1e-3))))
        benchmark.extra_info.update(info)
        with prepared.context():
            benchmark.pedantic(
                _sync_call(prepared.fn, cuda_device),
                setup=_flush_setup(cuda_device, prepared.setup),
                rounds=rounds,
                warmup_rounds=1 if benchmark.enabled else 0,
            )

    return run


@pytest.fixture
def run_smoke():
    """``run(case)``: the benchmark code path of one case on the CPU, untimed (CI's --benchmark-disable).

    Every implementation is built and run once and checked against torch (prepare's check), or
    reported unavailable; fastgpt's GPU backend, which cannot run on CPU tensors (except Triton
    under the interpreter), is also run on the reference backend so the rest of its path is
    exercised; the measuring, work model and ratio code run on the results.
    """

    def run(case: bc.OpCase) -> Dict[str, str]:
        cpu = torch.device("cpu")
        ran: Dict[str, bc.Prepared] = {}
        skipped: Dict[str, str] = {}
        for impl in bc.impls_for(case.op):
            try:
                ran[impl] = bc.prepare(case, impl, cpu)
            except bc.Unavailable as exc:
                skipped[impl] = str(exc)
        assert "torch-eager" in ran, f"the eager peer must run on the CPU: {skipped.get('torch-eager')}"
        primary = bc.fastgpt_impl(case.op)
        if primary not in ran:
            assert "strict" in skipped[primary], skipped[primary]  # refused by strict mode, never a fallback
            ran[primary] = bc.prepare(case, primary, cpu, backend_override="reference")
        records = []
        for impl, prepared in ran.items():
            with prepared.context():
                if prepared.setup is not None:
                    prepared.setup()
                prepared.fn()
            if impl == "fastgpt-triton":
                continue  # the interpreter takes seconds per call: run once, not timed
            record = bc.measure(prepared, None, budget_s=0.0, batch_s=0.0, min_rounds=2)
            assert record["ms"] > 0 and ("GB/s" in record or "TFLOP/s" in record)
            records.append(record)
        if primary in ran and not any(r["impl"] == primary for r in records):
            records.append({**records[0], "impl": primary})
        rows = cmp_.compare_records(records)
        assert len(rows) == 1 and rows[0]["impl"] == primary and rows[0]["speedup_vs"], rows
        return skipped

    return run


# --------------------------------------------------------------------------------------------
# reporting: ratios into the JSON and a summary at the end of the run
# --------------------------------------------------------------------------------------------


def _session_summary(config) -> Dict[str, object]:
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "tier": config.getoption("--fastgpt-tier"),
        "timing": TRUTH,
        "cpu_threads": config.getoption("--fastgpt-threads"),
        "work_model": _timing.WORK_MODEL,
        "roofline": {k: r.as_dict() for k, r in _ROOFLINE.items()},
        "comparisons": cmp_.compare_records(RECORDS),
        "dispatch_overhead": DISPATCH,
        "gpt": GPT,
    }


def pytest_benchmark_update_json(config, benchmarks, output_json):
    summary = _session_summary(config)
    by_group = {row["group"]: row for row in summary["comparisons"]}  # type: ignore[index]
    for entry in output_json.get("benchmarks", []):
        info = entry.get("extra_info", {})
        row = by_group.get(info.get("group"))
        if row is not None and info.get("impl") == row["impl"]:
            info["speedup_vs"] = row["speedup_vs"]
            info["best_peer"] = row["best_peer"]
            info["targets"] = row["targets"]
    output_json["fastgpt"] = summary


def _fmt_ms(ms: Optional[float]) -> str:
    if ms is None:
        return "-"
    return f"{ms * 1e3:.1f} us" if ms < 1 else f"{ms:.3f} ms"


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    rows = cmp_.compare_records(RECORDS)
    write = terminalreporter.write_line
    if rows:
        terminalreporter.section("fastgpt vs peers (CUDA-event medians; speed-up = peer time / fastgpt time)")
        if _ROOFLINE:
            for r in _ROOFLINE.values():
                write(f"roofline probe on {r.device}: copy {r.copy_gbps:.0f} GB/s, bf16 matmul {r.matmul_tflops:.0f} TFLOP/s")
        for row in rows:
            metric = row["metric"]
            if "GB/s" in metric:
                perf = f"{metric['GB/s']:.0f} GB/s ({metric.get('pct_of_copy_bandwidth', float('nan')):.0f}% copy)"
            elif "TFLOP/s" in metric:
                perf = f"{metric['TFLOP/s']:.0f} TFLOP/s ({metric.get('pct_of_matmul', float('nan')):.0f}% matmul)"
            elif "tokens_per_s" in metric:
                perf = f"{metric['tokens_per_s']:,.0f} tok/s"
            else:
                perf = ""
            best = f"{row['best_peer']} {row['speedup_vs_best']:.2f}x" if row["best_peer"] else "no peer ran"
            targets = "; ".join(f"{t['target']}: {t['value']:.2f} {'ok' if t['ok'] else 'MISS'}" for t in row["targets"])
            write(f"{row['group']:<48} {_fmt_ms(row['ms']):>11}  {perf:<28} vs best {best:<24} {targets}")
    if DISPATCH:
        terminalreporter.section("fastgpt CPU dispatch overhead (reference path vs calling torch; min of interleaved rounds)")
        write(f"{'op':<15} {'mode':<11} {'size':<10} {'shape':<22} {'torch':>10} {'fastgpt':>10} {'overhead':>10} {'%':>7}  target")
        for d in DISPATCH:
            write(
                f"{d['op']:<15} {d['mode']:<11} {d['size']:<10} {d['shape']:<22} {d['torch_us']:>8.1f}us {d['fastgpt_us']:>8.1f}us "
                f"{d['overhead_us']:>8.1f}us {d['overhead_pct']:>6.1f}%  {d['target']} {'ok' if d['meets_target'] else 'MISS'}"
            )
        write(f"(torch threads: {DISPATCH[0]['threads']}; a shared machine is noisy: the minimum over alternating rounds is reported)")
    if GPT:
        terminalreporter.section("GPT training step")
        for g in GPT:
            mfu = f"  MFU {g['mfu_pct']:.1f}%" if g.get("mfu_pct") is not None else ""
            write(f"{g['impl']:<16} {g['description']:<60} {_fmt_ms(g['ms']):>11}  {g['tokens_per_s']:,.0f} tok/s{mfu}")
