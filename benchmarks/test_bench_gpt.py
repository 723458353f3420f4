"""GPT training steps: fastgpt.GPT against the same model written with plain torch modules.

GPU: GPT-2 124M (12 layers, 12 heads, 768 wide, vocabulary 50304), B = 8, T = 1024, bfloat16
autocast, AdamW (fused where torch has it); fastgpt.GPT with every op on its GPU kernel
(``use_backend("auto", strict=True)``: a missing kernel skips the case, it is never timed as a
fallback) against nanoGPT's model with torch.nn.LayerNorm / GELU / SDPA, eager and under
torch.compile (compiled during the first step, before timing). Reported: step time (CUDA-event
median), tokens/s and MFU (PaLM's 6N + 12 L C T FLOPs per token against the data-sheet bf16 peak,
and against the bf16 matmul measured in the same run). Targets: >= 1.3x eager, >= 1.0x compiled.

CPU: nanoGPT's CPU example (4 layers, 4 heads, 128 wide, B = 12, T = 64), float32, forward and
backward; fastgpt.GPT on the reference path against the plain model, timed in alternating rounds.
Both start from the same weights; their first losses must agree.
"""

import pytest
import torch

from fastgpt.tools.bench import op_cases as bc
from fastgpt.tools.bench import gpt_steps as gs
from fastgpt.tools.bench import timing as _timing


def _sync(step, device):
    def call():
        step()
        torch.cuda.synchronize(device)

    return call


@pytest.mark.gpu
@pytest.mark.parametrize("impl", gs.GPT_IMPLS)
def test_gpt2_124m_train_step(benchmark, budget, cuda_device, gpu_roofline, tier, bench_log, impl):
    budget.check()
    if impl == "fastgpt-compile" and tier != "full":
        pytest.skip("fastgpt.GPT under torch.compile is measured in the full tier (compile time)")
    if impl == "torch-compile" and tier == "quick":
        pytest.skip("torch.compile is not measured in the quick tier (compile time)")
    benchmark.group = "gpt2-124m train step B=8 T=1024 bf16"
    try:
        step = gs.prepare_gpt_step(impl, cuda_device, config=gs.GPT2_124M, batch=8, amp_dtype=torch.bfloat16)
    except bc.Unavailable as exc:
        pytest.skip(f"{impl}: {exc}")
    try:
        with step.context():
            rounds = 1
            if benchmark.enabled:
                timing = _timing.time_cuda(step.step, flush_l2=False, warmup_ms=200, rep_ms=1000, min_reps=10, max_reps=30, device=cuda_device)
                record = gs.gpt_record(step, timing, timing.median_ms, gpu_roofline, torch.cuda.get_device_name(cuda_device))
                bench_log.gpt.append(record)
                bench_log.records.append(record)
                benchmark.extra_info.update(record)
                rounds = 3
            benchmark.pedantic(_sync(step.step, cuda_device), rounds=rounds)
    finally:
        del step
        torch.cuda.empty_cache()


@pytest.mark.parametrize("impl", ["torch-eager", "fastgpt"])
def test_gpt_small_step_cpu(benchmark, budget, threads, bench_log, impl):
    budget.check()
    cpu = torch.device("cpu")
    kwargs = dict(config=gs.GPT_CPU_SMALL, batch=12, amp_dtype=None, optimizer=False)
    try:
        fast = gs.prepare_gpt_step("fastgpt", cpu, **kwargs)
    except bc.Unavailable as exc:
        pytest.skip(f"fastgpt: {exc}")
    plain = gs.prepare_gpt_step("torch-eager", cpu, **kwargs)
    # same weights, same batch, float32: the two models must compute the same loss
    assert abs(fast.first_loss - plain.first_loss) <= 1e-4 * abs(plain.first_loss), (fast.first_loss, plain.first_loss)
    step = fast if impl == "fastgpt" else plain
    benchmark.group = f"gpt step cpu {fast.description}"
    with _timing.cpu_threads(threads), step.context():
        if not benchmark.enabled:
            benchmark.pedantic(step.step)
            return
        if impl == "fastgpt":
            cmp = _timing.compare_cpu(plain.step, fast.step, budget_s=2.0, batch_s=0.0)
            record = gs.gpt_record(fast, cmp.b, cmp.b.min_ms, None, "cpu")
            record.update(torch_ms=cmp.a.min_ms, overhead_pct=cmp.overhead_pct, overhead_us=cmp.overhead_us, threads=cmp.threads)
            bench_log.gpt.append(record)
            bench_log.gpt.append({**gs.gpt_record(plain, cmp.a, cmp.a.min_ms, None, "cpu"), "threads": cmp.threads})
            benchmark.extra_info.update(record)
        benchmark.pedantic(step.step, rounds=10, warmup_rounds=1)
