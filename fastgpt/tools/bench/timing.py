"""Timing, the byte/FLOP model and the roofline probe behind ``fastgpt bench`` and ``benchmarks/``.

Three things live here, shared by the pytest-benchmark suites and the CLI so both report the same figures:

* **The work model** (docs/design.md, 'Performance targets and the byte/FLOP model'): how many bytes
  a memory-bound op must move and how many FLOPs attention performs (each op's formula is in its
  module, :mod:`fastgpt.ops`, and its registry entry). Element sizes come from the dtype (2 for bfloat16, never 4). Every figure
  in a report is ``work / measured time``; :data:`WORK_MODEL` is the text stated in the JSON.
* **Timers.** :func:`time_cuda` has ``triton.testing.do_bench`` semantics (warm-up, a CUDA event
  pair around each call, the median; an L2 flush before each call for memory-bound ops) without
  importing triton. :func:`time_cpu` and :func:`compare_cpu` are for CPU figures on a shared, noisy
  machine: batches of calls, many rounds, the minimum (noise only ever adds time) and the median,
  on the thread's CPU-time clock when torch is single-threaded (see :func:`_host_clock`).
* **The roofline probe** (:func:`probe_roofline`): the device's measured copy bandwidth and bf16
  matmul throughput, so each result is also a percentage of what this machine can actually do.

Import cost: torch and fastgpt's op modules (for their work models).
"""

from __future__ import annotations

import contextlib
import gc
import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

__all__ = [
    "WORK_MODEL",
    "element_size",
    "layer_norm_bytes",
    "add_layer_norm_bytes",
    "gelu_bytes",
    "bias_gelu_bytes",
    "copy_bytes",
    "attention_flops",
    "matmul_flops",
    "gpt_flops_per_token",
    "nominal_peak_tflops",
    "Timing",
    "time_cuda",
    "time_cpu",
    "compare_cpu",
    "CpuComparison",
    "cpu_threads",
    "Roofline",
    "probe_roofline",
]

# --------------------------------------------------------------------------------------------
# the work model
# --------------------------------------------------------------------------------------------

from fastgpt import registry  # noqa: E402
from fastgpt.ops.attention import attention_flops  # noqa: E402,F401  (each op's work model lives in its module)
from fastgpt.ops.gelu import bias_gelu_bytes, gelu_bytes  # noqa: E402,F401
from fastgpt.ops.layer_norm import add_layer_norm_bytes, layer_norm_bytes  # noqa: E402,F401
from fastgpt.registry import element_size  # noqa: E402,F401

# the model in words, stated in every JSON report: each op's (from its registry entry), then the rest
WORK_MODEL: Dict[str, str] = {
    **{f"{spec.name} {mode}": text for spec in registry.all_ops() if spec.cases for mode, text in spec.cases.work_model.items()},
    "copy": "bytes = 2 * tensor bytes (read + write)",
    "matmul": "flops = 2*M*N*K",
    "gpt step": "flops/token = 6*params(non-embedding) + 12*n_layer*n_embd*T (PaLM appendix B, as nanoGPT); MFU = achieved / peak",
    "statistics": "mean/rstd (8 bytes per row) are not counted: under 1% of the traffic for N >= 768",
}


def copy_bytes(numel: int, dtype: torch.dtype) -> int:
    """A device-to-device copy reads and writes every byte once."""
    return 2 * numel * element_size(dtype)


def matmul_flops(m: int, n: int, k: int) -> float:
    return 2.0 * m * n * k


def gpt_flops_per_token(n_params: int, n_layer: int, n_embd: int, seq_len: int) -> float:
    """Training FLOPs per token of a GPT (PaLM appendix B, as nanoGPT's estimate_mfu)."""
    return 6.0 * n_params + 12.0 * n_layer * n_embd * seq_len


# dense bf16 tensor-core peaks from the vendor data sheets (no sparsity), matched on the device name
_NOMINAL_BF16_TFLOPS = (
    ("H200", 989.4),
    ("H100 SXM", 989.4),
    ("H100 80GB HBM3", 989.4),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.4),
    ("GH200", 989.4),
    ("A100", 312.0),
    ("A10G", 70.0),
    ("L40S", 362.0),
    ("L4", 121.0),
    ("RTX 4090", 165.2),
    ("RTX 3090", 71.0),
)


def nominal_peak_tflops(device_name: str) -> Optional[float]:
    """Data-sheet dense bf16 TFLOP/s for a GPU name, or None when unknown (MFU is then omitted)."""
    for key, value in _NOMINAL_BF16_TFLOPS:
        if key.lower() in device_name.lower():
            return value
    return None


# --------------------------------------------------------------------------------------------
# timers
# --------------------------------------------------------------------------------------------


@dataclass
class Timing:
    """Per-call times in milliseconds over ``n`` measured calls; ``median_ms`` is the reported figure."""

    median_ms: float
    min_ms: float
    p20_ms: float
    p80_ms: float
    n: int
    method: str

    def as_dict(self) -> Dict[str, object]:
        return asdict(self)


def _summarise(times_ms: Sequence[float], method: str) -> Timing:
    xs = sorted(times_ms)
    q = statistics.quantiles(xs, n=5) if len(xs) >= 2 else [xs[0]] * 4
    return Timing(statistics.median(xs), xs[0], q[0], q[3], len(xs), method)


_L2_FLUSH_BYTES = 256 * 2**20  # larger than any L2 in service (H100/H200: 50 MiB); triton uses the same
_flush_buffers: Dict[str, torch.Tensor] = {}


def _flush_buffer(device: torch.device) -> torch.Tensor:
    key = str(device)
    if key not in _flush_buffers:
        _flush_buffers[key] = torch.empty(_L2_FLUSH_BYTES // 4, dtype=torch.int32, device=device)
    return _flush_buffers[key]


def time_cuda(
    fn: Callable[[], object],
    *,
    flush_l2: bool = True,
    warmup_ms: float = 25.0,
    rep_ms: float = 100.0,
    min_reps: int = 10,
    max_reps: int = 1000,
    device: Optional[torch.device] = None,
    setup: Optional[Callable[[], object]] = None,
) -> Timing:
    """GPU time of ``fn()`` with CUDA events: ``triton.testing.do_bench`` semantics.

    A first call (compilation, autotuning, allocator warm-up) and a short estimate set the number of
    warm-up and measured calls (``warmup_ms`` / ``rep_ms`` of GPU time). Each measured call is
    bracketed by its own event pair; ``setup()`` (when given: e.g. the forward whose backward is
    timed) runs before each call, outside the events. With ``flush_l2`` a 256 MiB buffer is zeroed
    before each call (after ``setup``, outside the events), so a memory-bound op cannot be served from
    L2 and report more bandwidth than HBM gives. The zeroing also keeps the GPU busy while the host
    enqueues the call, so host launch latency does not enter the figure of a kernel that is slower
    than its launch. Returns the median (and spread) in milliseconds.
    """
    device = device or torch.device("cuda", torch.cuda.current_device())
    cache = _flush_buffer(device) if flush_l2 else None

    def prologue() -> None:
        if setup is not None:
            setup()
        if cache is not None:
            cache.zero_()

    prologue()
    fn()
    torch.cuda.synchronize(device)
    estimate_ms = 0.0
    for _ in range(5):
        prologue()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize(device)
        estimate_ms += start.elapsed_time(end) / 5
    estimate_ms = max(estimate_ms, 1e-3)
    n_warmup = max(1, int(warmup_ms / estimate_ms))
    n_rep = min(max_reps, max(min_reps, int(rep_ms / estimate_ms)))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n_rep)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n_rep)]
    for _ in range(n_warmup):
        if setup is not None:
            setup()
        fn()
    for i in range(n_rep):
        prologue()
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize(device)
    times = [s.elapsed_time(e) for s, e in zip(starts, ends)]
    method = f"cuda events, median of {n_rep} after {n_warmup} warm-up" + (", L2 flushed before each call" if flush_l2 else "")
    return _summarise(times, method)


def cuda_peak_mib(fn: Callable[[], object], device: torch.device, setup: Optional[Callable[[], object]] = None) -> float:
    """MiB the caching allocator holds at most during one ``fn()`` beyond what was allocated before it
    (after ``setup()``): the op's own working memory plus its outputs (how the linear cross-entropy's
    target, peak memory <= 25% of eager's, is read). One untimed call; the L2 flush buffer is allocated
    before, so it is not counted."""
    if setup is not None:
        setup()
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


@contextlib.contextmanager
def cpu_threads(n: Optional[int]) -> Iterator[None]:
    """Run a block with ``torch.set_num_threads(n)`` (None: leave as is), restoring the count after."""
    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def _no_gc() -> Iterator[None]:
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _host_clock() -> Tuple[Callable[[], float], str]:
    """The clock for host timings: this thread's CPU time when torch runs single-threaded, else wall time.

    With one torch thread every CPU op (and, for CPU tensors, the autograd backward) runs on the
    calling thread, so its CPU time is the work done, without the time the thread spent descheduled
    while other processes held the core: on a shared machine that is most of the noise. With more
    threads the work is spread over torch's pool, and only the wall clock sees all of it.
    """
    if torch.get_num_threads() == 1:
        return time.thread_time, "thread CPU time (1 torch thread)"
    return time.perf_counter, f"wall clock ({torch.get_num_threads()} torch threads)"


def _calibrate(fn: Callable[[], object], batch_s: float) -> int:
    """Calls per batch so that one batch takes about ``batch_s`` seconds (at least 1)."""
    clock, _ = _host_clock()
    fn()
    k = 1
    while True:
        t0 = clock()
        for _ in range(k):
            fn()
        dt = clock() - t0
        if dt >= batch_s / 4 or k >= 1 << 16:
            return max(1, min(1 << 16, int(math.ceil(k * batch_s / max(dt, 1e-9)))))
        k *= 4


def _batch_ms(fn: Callable[[], object], k: int, clock: Callable[[], float] = time.perf_counter) -> float:
    t0 = clock()
    for _ in range(k):
        fn()
    return (clock() - t0) * 1e3 / k


def time_cpu(
    fn: Callable[[], object],
    *,
    budget_s: float = 0.3,
    batch_s: float = 2e-3,
    min_rounds: int = 5,
    setup: Optional[Callable[[], object]] = None,
) -> Timing:
    """Host time per call of ``fn()``: batches of about ``batch_s``, rounds until ``budget_s`` is spent.

    ``min_ms`` (the fastest batch) is the figure least disturbed by other processes on a shared
    machine; ``median_ms`` shows how noisy the machine was. With ``setup`` every call is its own
    batch and ``setup()`` runs before it, outside the clock.
    """
    clock, clock_name = _host_clock()
    with _no_gc():
        if setup is not None:
            times: List[float] = []
            deadline = time.perf_counter() + budget_s
            while len(times) < min_rounds or time.perf_counter() < deadline:
                setup()
                t0 = clock()
                fn()
                times.append((clock() - t0) * 1e3)
            return _summarise(times, f"{clock_name}, {len(times)} calls each after its setup, gc off")
        k = _calibrate(fn, batch_s)
        times = []
        deadline = time.perf_counter() + budget_s
        while len(times) < min_rounds or time.perf_counter() < deadline:
            times.append(_batch_ms(fn, k, clock))
    return _summarise(times, f"{clock_name}, {len(times)} batches of {k} calls, gc off")


@dataclass
class CpuComparison:
    """Two callables timed in alternation (A B A B ...), so machine noise hits both alike.

    ``overhead_us`` / ``overhead_pct`` compare the minima (the least disturbed batches);
    ``paired_overhead_us`` is the median of the per-round differences, a second, independent estimate.
    """

    a: Timing
    b: Timing
    overhead_us: float
    overhead_pct: float
    paired_overhead_us: float
    rounds: int
    calls_per_batch: int
    threads: int
    extra: Dict[str, object] = field(default_factory=dict)

    def as_dict(self) -> Dict[str, object]:
        return asdict(self)


def compare_cpu(
    fn_a: Callable[[], object],
    fn_b: Callable[[], object],
    *,
    budget_s: float = 1.0,
    batch_s: float = 2e-3,
    min_rounds: int = 7,
) -> CpuComparison:
    """Time ``fn_b`` against the baseline ``fn_a`` on the host, interleaved; overhead = b - a.

    Both get the same number of calls per batch (calibrated on the slower), batches alternate
    A, B, A, B for ``budget_s`` in total, garbage collection is off while timing.
    """
    clock, clock_name = _host_clock()
    with _no_gc():
        k = min(_calibrate(fn_a, batch_s), _calibrate(fn_b, batch_s))
        ta: List[float] = []
        tb: List[float] = []
        deadline = time.perf_counter() + budget_s
        while len(ta) < min_rounds or time.perf_counter() < deadline:
            ta.append(_batch_ms(fn_a, k, clock))
            tb.append(_batch_ms(fn_b, k, clock))
    method = f"{clock_name}, {len(ta)} alternating rounds of {k} calls each, gc off"
    a, b = _summarise(ta, method), _summarise(tb, method)
    overhead_ms = b.min_ms - a.min_ms
    paired = statistics.median(y - x for x, y in zip(ta, tb))
    return CpuComparison(
        a=a,
        b=b,
        overhead_us=overhead_ms * 1e3,
        overhead_pct=100.0 * overhead_ms / a.min_ms if a.min_ms > 0 else float("nan"),
        paired_overhead_us=paired * 1e3,
        rounds=len(ta),
        calls_per_batch=k,
        threads=torch.get_num_threads(),
    )


# --------------------------------------------------------------------------------------------
# the roofline probe
# --------------------------------------------------------------------------------------------


@dataclass
class Roofline:
    """What this device measurably does: copy bandwidth (GB/s) and matmul throughput (TFLOP/s)."""

    device: str
    copy_gbps: float
    copy_bytes: int
    matmul_tflops: float
    matmul_shape: List[int]
    matmul_dtype: str
    nominal_bf16_tflops: Optional[float]
    method: str

    def as_dict(self) -> Dict[str, object]:
        return asdict(self)

    def pct_of_copy(self, gbps: float) -> float:
        return 100.0 * gbps / self.copy_gbps

    def pct_of_matmul(self, tflops: float) -> float:
        return 100.0 * tflops / self.matmul_tflops


def probe_roofline(device: torch.device | str, *, quick: bool = False) -> Roofline:
    """Measure the copy bandwidth and matmul throughput of ``device``.

    CUDA: a 1 GiB device-to-device copy (far larger than L2, bytes read + written) and an 8192^3
    bfloat16 matmul, both timed with :func:`time_cuda`. CPU: a 256 MiB copy and a 1024^3 float32
    matmul with :func:`time_cpu`, best of the rounds (context for the CPU figures only; not a GPU roofline).
    """
    device = torch.device(device)
    if device.type == "cuda":
        numel = (256 if quick else 1024) * 2**20 // 4
        src = torch.empty(numel, dtype=torch.float32, device=device).uniform_()
        dst = torch.empty_like(src)
        t_copy = time_cuda(lambda: dst.copy_(src), flush_l2=False, device=device)
        n = 4096 if quick else 8192
        a = torch.randn(n, n, dtype=torch.bfloat16, device=device)
        b = torch.randn(n, n, dtype=torch.bfloat16, device=device)
        t_mm = time_cuda(lambda: torch.mm(a, b), flush_l2=False, device=device)
        name = torch.cuda.get_device_name(device)
        nbytes = copy_bytes(numel, torch.float32)
        result = Roofline(
            device=name,
            copy_gbps=nbytes / (t_copy.median_ms * 1e-3) / 1e9,
            copy_bytes=nbytes,
            matmul_tflops=matmul_flops(n, n, n) / (t_mm.median_ms * 1e-3) / 1e12,
            matmul_shape=[n, n, n],
            matmul_dtype="bfloat16",
            nominal_bf16_tflops=nominal_peak_tflops(name),
            method=t_copy.method,
        )
        del src, dst, a, b
        torch.cuda.empty_cache()
        return result
    numel = (64 if quick else 256) * 2**20 // 4
    src = torch.rand(numel)
    dst = torch.empty_like(src)
    t_copy = time_cpu(lambda: dst.copy_(src), budget_s=0.2 if quick else 0.5, batch_s=0.0)
    n = 512 if quick else 1024
    a, b = torch.randn(n, n), torch.randn(n, n)
    t_mm = time_cpu(lambda: torch.mm(a, b), budget_s=0.2 if quick else 0.5, batch_s=0.0)
    nbytes = copy_bytes(numel, torch.float32)
    return Roofline(
        device="cpu",
        copy_gbps=nbytes / (t_copy.min_ms * 1e-3) / 1e9,
        copy_bytes=nbytes,
        matmul_tflops=matmul_flops(n, n, n) / (t_mm.min_ms * 1e-3) / 1e12,
        matmul_shape=[n, n, n],
        matmul_dtype="float32",
        nominal_bf16_tflops=None,
        method=f"{t_copy.method.split(',')[0]}, best of {t_copy.n} copies / {t_mm.n} matmuls, {torch.get_num_threads()} thread(s)",
    )
