"""Tile configs of the flash-attention kernels (:mod:`fastgpt.kernels.flash_attention`): plain data per
kernel, head-dim bucket, dtype and GPU architecture, and the functions that pick a call's candidates.

Kept apart from the kernels so the tuning space can be read (and changed from evidence: the tuner's
log and `fastgpt inspect`) without reading the kernels.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from ._triton_utils import Config, interpreter_active, next_pow2

__all__ = [
    "CONFIGS",
    "CONFIGS_FP32",
    "CONFIGS_SM90",
    "ARCH_CONFIGS",
    "DECODE_CONFIGS",
    "DECODE_MAX_SQ",
    "INTERPRETER_CONFIGS",
    "head_dim_bucket",
    "configs_for",
    "default_configs",
]

# --------------------------------------------------------------------------------------------
# configs: (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel and head-dim bucket
# --------------------------------------------------------------------------------------------
# BLOCK_M counts query rows and BLOCK_N key rows in every kernel: the forward and dQ kernels keep a
# BLOCK_M tile of queries and loop over BLOCK_N keys; the dK/dV kernel keeps BLOCK_N keys and loops
# over BLOCK_M queries. The bucket is the padded head dim max(pow2(D), pow2(Dv), 16).
#
# Chosen from triton's compile for sm_80 and sm_90 (shared memory from the compiled kernel,
# registers and spills from the cubin, see fastgpt.tools.inspect.compiling.kernel_resources): for 16-bit inputs every
# config here is spill-free on both at D = bucket, S = 1024, and the first (the default, what runs
# untuned) also at S = 300 with D = 40, 80, 96; each list holds one that fits the 99 KiB of
# sm_86 / sm_89. The dK/dV kernel holds dK, dV (fp32) and K, V in registers for its whole loop,
# so its key tile shrinks as the head dim grows. (`fastgpt inspect` found its 4-warp 32x128 tile at
# 255 registers and spilling at D = 24 on both archs; 8 warps hold the same tile in ~200, no spills.)

C = Config
CONFIGS: Dict[str, Dict[int, Tuple[Config, ...]]] = {
    "fwd": {
        16: (C(128, 64, 4, 3), C(128, 128, 8, 3), C(64, 64, 4, 3)),
        32: (C(128, 64, 4, 3), C(128, 128, 8, 3), C(64, 64, 4, 3)),
        64: (C(128, 64, 4, 3), C(128, 128, 8, 3), C(64, 64, 4, 2)),
        128: (C(128, 64, 8, 3), C(128, 64, 8, 2), C(64, 64, 4, 3)),
        256: (C(64, 64, 8, 2), C(64, 32, 8, 2), C(32, 64, 4, 2)),
    },
    "bwd_dkdv": {
        16: (C(32, 128, 8, 3), C(64, 128, 8, 3), C(32, 64, 4, 2)),
        32: (C(32, 128, 8, 3), C(64, 128, 8, 3), C(32, 64, 4, 2)),
        64: (C(32, 128, 8, 2), C(16, 128, 8, 2), C(32, 64, 4, 2)),
        128: (C(16, 64, 8, 2), C(32, 64, 8, 2), C(32, 32, 4, 2)),
        256: (C(32, 32, 8, 1), C(16, 32, 4, 1)),
    },
    # the dK/dV kernel that also adds dQ by atomics (deterministic=False): a (BLOCK_M, D) float32 dQ tile
    # and its addresses on top, so smaller tiles; every one spill-free on sm_80 and sm_90 with GQA at
    # D = 24, 40, 64, 80, 96, 128, 256 (32x128 at bucket 64 spills on sm_80, 32x32 at 256 by 8 bytes)
    "bwd_dkdv_atomic": {
        16: (C(32, 128, 8, 3), C(64, 128, 8, 3)),
        32: (C(32, 128, 8, 3), C(64, 128, 8, 3)),
        64: (C(16, 128, 8, 2), C(16, 128, 8, 3), C(16, 64, 8, 2)),
        128: (C(16, 64, 8, 2), C(32, 32, 8, 2)),
        256: (C(16, 32, 8, 1), C(32, 16, 8, 1)),
    },
    "bwd_dq": {
        16: (C(128, 32, 4, 3), C(128, 64, 8, 3), C(64, 32, 4, 2)),
        32: (C(128, 32, 4, 3), C(128, 64, 8, 3), C(64, 32, 4, 2)),
        64: (C(128, 32, 8, 3), C(128, 64, 8, 3), C(64, 64, 4, 3), C(64, 32, 4, 2)),
        128: (C(128, 32, 8, 2), C(64, 64, 4, 2), C(64, 32, 4, 2)),
        256: (C(64, 32, 8, 2), C(32, 32, 4, 2), C(16, 32, 4, 1)),
    },
}
# sm_90 (H100 / H200, 228 KiB of shared memory per SM): larger tiles for the GPT head dims, first the
# ones `compile_plan` found spill-free there with triton 3.6 and 3.8 (d=128: forward 128x128 w8 s3 at
# 250-255 registers and 225 KiB shared; dQ 64x128 w8 at 250-254), which spill 40-64 bytes on sm_80,
# then the sm_80 list. The dK/dV tile 32x128 w8 (249 registers at d=128) spills 16 bytes with GQA
# (its group loop), so 16x128 is the default and 32x128 a candidate that the tuner measures where it
# does not spill. Not yet timed on a GPU: the tuner's log (FASTGPT_TUNE_LOG, scripts/gpu_check.py's
# JSON) is the evidence to reorder them by.
CONFIGS_SM90: Dict[str, Dict[int, Tuple[Config, ...]]] = {
    "fwd": {
        64: (C(128, 128, 8, 3), C(128, 64, 4, 3), C(128, 64, 8, 3), C(64, 64, 4, 2)),
        128: (C(128, 128, 8, 3), C(128, 64, 8, 3), C(128, 128, 8, 2), C(128, 64, 8, 2), C(64, 64, 4, 3)),
    },
    "bwd_dkdv": {
        64: (C(32, 128, 8, 2), C(64, 128, 8, 2), C(64, 128, 8, 3), C(16, 128, 8, 2), C(32, 64, 4, 2)),
        128: (C(16, 128, 8, 2), C(32, 128, 8, 2), C(16, 64, 8, 2), C(32, 64, 8, 2), C(32, 32, 4, 2)),
    },
    "bwd_dkdv_atomic": {
        64: (C(32, 128, 8, 2), C(16, 128, 8, 2), C(32, 64, 8, 2), C(16, 128, 8, 3)),
        128: (C(16, 128, 8, 2), C(16, 64, 8, 2), C(32, 32, 8, 2)),
    },
    "bwd_dq": {
        64: (C(64, 128, 8, 2), C(128, 64, 8, 3), C(128, 32, 8, 3), C(128, 128, 8, 2), C(64, 64, 4, 3), C(64, 32, 4, 2)),
        128: (C(64, 128, 8, 2), C(128, 64, 8, 2), C(128, 32, 8, 2), C(64, 64, 4, 2), C(64, 32, 4, 2)),
    },
}
# the 16-bit candidate lists per compute capability (major * 10 + minor); others take CONFIGS
ARCH_CONFIGS: Dict[int, Dict[str, Dict[int, Tuple[Config, ...]]]] = {90: CONFIGS_SM90}
# float32 inputs take exact fp32 dots, which run on CUDA cores (FMA) and hold their operands in
# registers: small tiles. This path is for exactness, not speed (use 16-bit inputs for speed).
# Some dK/dV candidates spill on sm_90 (255 registers; up to 536 B of stack at bucket 64, 112 B at
# 128; a few bytes on sm_80): `fastgpt inspect` lists them as notes. The 16-bit CONFIGS have none.
CONFIGS_FP32: Dict[str, Dict[int, Tuple[Config, ...]]] = {
    "fwd": {
        16: (C(32, 32, 4, 2),),
        32: (C(32, 32, 4, 2),),
        64: (C(32, 32, 4, 2),),
        128: (C(32, 64, 8, 2),),
        256: (C(32, 32, 8, 1), C(16, 32, 4, 1)),
    },
    "bwd_dkdv": {
        16: (C(32, 64, 8, 2), C(32, 32, 4, 2)),
        32: (C(32, 64, 8, 2), C(32, 32, 4, 2)),
        64: (C(32, 64, 8, 2), C(32, 32, 4, 2)),
        128: (C(32, 32, 8, 2), C(16, 32, 4, 2)),
        256: (C(16, 32, 8, 1), C(16, 16, 4, 1)),
    },
    "bwd_dq": {
        16: (C(32, 32, 4, 2), C(64, 32, 8, 2)),
        32: (C(32, 32, 4, 2), C(64, 32, 8, 2)),
        64: (C(32, 32, 4, 2), C(64, 32, 8, 2)),
        128: (C(32, 16, 4, 2),),
        256: (C(32, 16, 8, 1), C(16, 16, 4, 1)),
    },
}
# Decoding (a few queries over a long KV cache): a 128-row query tile would be 127/128 padding, so
# forward calls with Sq <= DECODE_MAX_SQ take 16-row tiles ("fwd_decode"; `fastgpt inspect` models
# 16x64 at the roofline where 128x64 reached 30-58% for one query).
DECODE_MAX_SQ = 16
DECODE_CONFIGS: Dict[int, Tuple[Config, ...]] = {
    16: (C(16, 64, 4, 2), C(16, 128, 4, 2)),
    32: (C(16, 64, 4, 2), C(16, 128, 4, 2)),
    64: (C(16, 64, 4, 2), C(16, 128, 4, 2)),
    128: (C(16, 64, 4, 2), C(16, 32, 4, 3)),
    256: (C(16, 32, 4, 2), C(16, 64, 4, 1)),
}
# The interpreter runs one small config (tuning there would take minutes). BLOCK_M != BLOCK_N on
# purpose: the CPU tests then cover the causal tile bounds with unequal tiles.
INTERPRETER_CONFIGS: Dict[str, Config] = {
    "fwd": C(32, 16, 4, 1),
    "fwd_decode": C(16, 32, 4, 1),
    "bwd_dkdv": C(16, 32, 4, 1),
    "bwd_dq": C(32, 16, 4, 1),
}
del C


def head_dim_bucket(d: int, dv: int) -> int:
    """The padded head dim the kernels use for q/k head dim ``d`` and v head dim ``dv``."""
    return max(16, next_pow2(d), next_pow2(dv))


def configs_for(kernel: str, bucket: int, dtype: torch.dtype = torch.float16,
                interpreter: Optional[bool] = None, arch: Optional[int] = None) -> Tuple[Config, ...]:
    """Candidate configs of ``kernel`` ("fwd", "fwd_decode", "bwd_dkdv", "bwd_dkdv_atomic", "bwd_dq") for
    a head-dim bucket, the input dtype and the GPU's compute capability ``arch`` (e.g. 90; None: the
    generic list); the single interpreter config when ``interpreter`` (default: TRITON_INTERPRET is on).
    "fwd_decode" is the forward kernel with the short-query tiles, "bwd_dkdv_atomic" the dK/dV kernel
    that also adds dQ (its own 16-bit lists; the dK/dV kernel's interpreter and float32 tiles)."""
    if interpreter if interpreter is not None else interpreter_active():
        return (INTERPRETER_CONFIGS["bwd_dkdv" if kernel == "bwd_dkdv_atomic" else kernel],)
    if dtype == torch.float32:
        same = {"fwd_decode": "fwd", "bwd_dkdv_atomic": "bwd_dkdv"}
        return CONFIGS_FP32[same.get(kernel, kernel)][bucket]  # its tiles are small already
    if kernel == "fwd_decode":
        return DECODE_CONFIGS[bucket]
    return ARCH_CONFIGS.get(arch, {}).get(kernel, {}).get(bucket) or CONFIGS[kernel][bucket]


def default_configs(arch: Optional[int] = None, dtype: torch.dtype = torch.bfloat16) -> Dict[str, Dict[int, str]]:
    """{kernel: {bucket: default config}} on ``arch`` (what runs untuned): for `fastgpt inspect`."""
    return {kernel: {bucket: str(configs_for(kernel, bucket, dtype, False, arch)[0]) for bucket in sorted(CONFIGS["fwd"])}
            for kernel in ("fwd", "fwd_decode", "bwd_dkdv", "bwd_dkdv_atomic", "bwd_dq")}
