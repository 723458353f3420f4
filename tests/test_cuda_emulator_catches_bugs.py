"""The CUDA emulator cannot pass vacuously: kernels with planted bugs fail under it.

One extra emulator build compiles csrc/ with a few textual edits, each of the form
``FASTGPT_EMU_BUG(k) ? <bug> : <original code>``, so every planted bug lives in the same library and
is switched on at run time. With no bug switched on, that build passes the same checks (so each
failure below is the bug's doing); with bug k on, the parity check fails or the emulator reports
the misuse:

1. a warp reduction that skips its first butterfly stage (a wrong shuffle offset);
2. a warp reduction with __shfl_down_sync where every lane needs the total (a wrong shuffle lane:
   only lane 0 ends with the sum);
3. the row reduction reads the other warps' partial sums without the __syncthreads that should
   precede the read (a read-before-barrier race);
4. the row reduction reuses one shared buffer for consecutive reductions (a write-after-read race:
   a warp running ahead overwrites partials another warp has not read yet);
5. rows past the end return early, before the shuffles their warp still needs (undefined behaviour
   on a GPU: the emulator reports the exited lanes named in the shuffle mask);
6. GELU's ragged tail writes one element past the end (an off-by-one: the emulator places every
   tensor between poisoned guard bytes and reports the write);
7. the backward folds the dweight/dbias sums of a block's rows without the __syncthreads between
   one row handing its sums over through shared memory and the other reading them.

The races are caught deterministically: the scheduler resumes threads in a fixed order, and shared
memory starts every block poisoned (NaN), so a read that is not ordered after the write by a
barrier sees poison or a stale value on every run, under each schedule that runs the reader first
(listed per bug below). That is why the emulated parity suite runs its main cases under two
opposite schedules (forward round robin, reverse greedy).
"""

from __future__ import annotations

import pytest
import torch

from fastgpt.tools import cuda_emu
from fastgpt.tools.cuda_emu.parity import check_gelu, check_layer_norm

MUTATIONS = [
    (
        "common.cuh",
        "for (int offset = group >> 1; offset > 0; offset >>= 1) {",
        "for (int offset = FASTGPT_EMU_BUG(1) ? group >> 2 : group >> 1; offset > 0; offset >>= 1) {",
    ),
    (
        "common.cuh",
        "v[k] += __shfl_xor_sync(kFullMask, v[k], offset);",
        "v[k] += FASTGPT_EMU_BUG(2) ? __shfl_down_sync(kFullMask, v[k], offset) : __shfl_xor_sync(kFullMask, v[k], offset);",
    ),
    (
        "common.cuh",
        "    __syncthreads();\n    const int warps_per_row",
        "    if (!FASTGPT_EMU_BUG(3)) __syncthreads();\n    const int warps_per_row",
    ),
    ("common.cuh", "phase ^= 1;", "phase ^= FASTGPT_EMU_BUG(4) ? 0 : 1;"),
    (
        "layer_norm.cu",
        "    const bool active = row < a.rows;\n    const int64_t off = row * n;\n    const T* __restrict__ x =",
        "    const bool active = row < a.rows;\n    if (FASTGPT_EMU_BUG(5) && !active) return;\n"
        "    const int64_t off = row * n;\n    const T* __restrict__ x =",
    ),
    ("gelu.cu", "if (VEC > 1 && packs * VEC + t < n)", "if (VEC > 1 && packs * VEC + t < n + FASTGPT_EMU_BUG(6))"),
    (
        "layer_norm.cu",
        "    __syncthreads();\n    if (ty < h) {",
        "    if (!FASTGPT_EMU_BUG(7)) __syncthreads();\n    if (ty < h) {",
    ),
]

# (bug, rows, cols, dtype): a shape whose kernel path contains the planted bug
#   768 float32: 64 threads per row (warp shuffles, then a shared-memory step across 2 warps)
#   256 float32: 16 threads per row (shuffles only; every lane uses its own total)
#   4096 float32: 256 threads per row (8 warps combine through shared memory)
#   33 float32 (scalar path): 8 threads per row, 16 rows per block, so 3 rows leave lanes idle
#   256 float32 backward: 16 threads per row, 32 rows per block fold their parameter sums
CASES = [
    (1, 3, 768, torch.float32),
    (2, 3, 256, torch.float32),
    (3, 3, 4096, torch.float32),
    (4, 3, 4096, torch.float32),
    (5, 3, 33, torch.float32),
    (7, 65, 256, torch.float32),
]
SCHEDULES = [("forward", False), ("reverse", False), ("forward", True), ("reverse", True)]


@pytest.fixture(scope="module")
def buggy():
    reason = cuda_emu.unavailable_reason()
    if reason:
        pytest.skip(reason)
    emu = cuda_emu.load(MUTATIONS)
    yield emu
    emu.plant_bug(0)
    emu.configure()


@pytest.mark.parametrize("schedule", SCHEDULES, ids=lambda s: f"{s[0]}{'-greedy' if s[1] else ''}")
def test_mutated_build_without_bugs_passes(buggy, schedule):
    buggy.plant_bug(0)
    buggy.configure(sms=2, threads_per_sm=256, order=schedule[0], greedy=schedule[1])
    for _, rows, cols, dtype in CASES:
        check_layer_norm(buggy, rows, cols, dtype)


def _bug_cases():
    for bug, rows, cols, dtype in CASES:
        for order, greedy in SCHEDULES:
            # A race shows under the schedules that run its reader before its writer: bug 4 needs a
            # warp that runs ahead of another's reads (greedy; round robin advances the warps in
            # lockstep), bug 7 a low row reading before the high rows write (forward rank order).
            if (bug == 4 and not greedy) or (bug == 7 and order == "reverse"):
                continue
            yield pytest.param(bug, rows, cols, dtype, order, greedy, id=f"bug{bug}-{order}{'-greedy' if greedy else ''}")


@pytest.mark.parametrize("bug, rows, cols, dtype, order, greedy", list(_bug_cases()))
def test_planted_bug_is_caught(buggy, bug, rows, cols, dtype, order, greedy):
    buggy.configure(sms=2, threads_per_sm=256, order=order, greedy=greedy)
    buggy.plant_bug(bug)
    try:
        with pytest.raises((AssertionError, cuda_emu.EmulatorError)) as caught:
            check_layer_norm(buggy, rows, cols, dtype)
    finally:
        buggy.plant_bug(0)
    if bug == 5:
        assert caught.type is cuda_emu.EmulatorError and "exited" in str(caught.value)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_out_of_bounds_write_is_caught(buggy, dtype):
    buggy.configure(sms=2, threads_per_sm=256)
    check_gelu(buggy, (2, 7), dtype, "none")
    buggy.plant_bug(6)
    try:
        with pytest.raises(cuda_emu.EmulatorError, match="wrote outside y"):
            check_gelu(buggy, (2, 7), dtype, "none")
    finally:
        buggy.plant_bug(0)
