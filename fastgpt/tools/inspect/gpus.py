"""The GPUs ``fastgpt inspect`` models (per-SM limits, bandwidth, peaks) and theoretical occupancy."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Tuple


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
