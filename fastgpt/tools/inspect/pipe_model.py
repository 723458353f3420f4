"""A static model of the attention kernels' pipes: tensor cores, special-function units, FP32, HBM.

The roofline in ``fastgpt inspect`` counts tensor-core FLOPs and HBM bytes only, so every attention
forward reads ~100% of it. But the softmax's exponentials run on the special-function units (MUFU:
16 results per clock per SM on sm_80 and sm_90, ~3.9 T/s on an H100 against 989 TFLOP/s of bf16
matmul) and its max / scale / sum / rescale on the FP32 pipe (64 results per clock per SM on sm_80,
128 on sm_90). Per query-key pair the forward does 4*d matmul FLOPs and one exp2, so at d = 64 the
exps alone take as long as the matmuls on an H100 (FlashAttention-3's point).

This module counts, per tile of BLOCK_M queries x BLOCK_N keys and from each kernel's structure in
``kernels/flash_attention.py``, the MMA FLOPs, the MUFU exp2 results and the FP32 instructions (per
thread-element: one FADD / FMUL / FFMA / FMNMX = 1, one conversion to 16 bits = 1/2, since F2FP
packs two), and turns them into times per pipe for a whole launch (``tiles`` tiles). The bound is
reported two ways: the pipes overlapped (max: what a perfectly software-pipelined kernel could do)
and serialised (sum: no overlap between matmul, exp and FP32 work), each beside the HBM time. It is
a model, not a measurement: calibrate it against the first GPU run. :func:`check_sass` compares the
counts with the static instruction mix of a compiled kernel (``kernels._triton_utils.read_machine_code``).

Counted on the steady-state (unmasked) tile; the diagonal tiles' masks add selects, not counted.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Mapping

__all__ = ["Pipes", "PIPES", "TileWork", "tile_work", "launch_bound", "check_sass", "fp32_ops", "report", "report_lines", "epilogue_fp32",
           "default_configs"]


@dataclass(frozen=True)
class Pipes:
    """Per-SM, per-clock throughputs and the clock of one GPU (data-sheet boost clocks)."""

    name: str
    arch: int
    sms: int
    clock_hz: float
    tensor_flops_per_clk: int  # dense 16-bit MMA FLOPs per clock per SM
    mufu_per_clk: int  # special-function results (exp2, ...) per clock per SM
    fp32_per_clk: int  # FP32 instruction results (FADD, FMUL, FFMA, ...) per clock per SM
    hbm_bytes_per_s: float


# A100 SXM: 108 SMs x 1.41 GHz x 2048 = 312 TFLOP/s; H100 SXM: 132 x 1.83 GHz x 4096 = 989 TFLOP/s
# (an H200 has the H100's SMs and clocks and 4.8 TB/s of HBM)
PIPES: Dict[int, Pipes] = {
    80: Pipes("A100 SXM", 80, 108, 1.41e9, 2048, 16, 64, 2.0e12),
    90: Pipes("H100 SXM", 90, 132, 1.83e9, 4096, 16, 128, 3.35e12),
}

# FP32 instructions per element of the score tile, from the kernels' code:
# forward: s * qk_scale (FMUL), row max (FMNMX), s - m (FADD), row sum of p (FADD), p to 16 bits (1/2)
FWD_FP32_PER_SCORE = 4.5
# per query row and key tile: max(m_i, rowmax), m_i - m_new, l_i * alpha + rowsum (FFMA)
FWD_FP32_PER_ROW = 3
# dK/dV: s * qk_scale - lse2 (FFMA), its clamp at 0 (one select: P <= 1 whatever the rounding), dp - delta
# (FADD), p * (...) (FMUL), p and ds to 16 bits (1/2 + 1/2)
DKDV_FP32_PER_SCORE = 5.0
# dQ: as dK/dV with only ds converted
DQ_FP32_PER_SCORE = 4.5


@dataclass(frozen=True)
class TileWork:
    """Work of one BLOCK_M x BLOCK_N tile: MMA FLOPs, MUFU (exp2) results, FP32 instructions."""

    mma_flops: float
    mufu: float
    fp32: float


def tile_work(kernel: str, block_m: int, block_n: int, block_d: int, block_dv: int) -> TileWork:
    """One tile's work in ``kernel`` ("fwd" (also decode), "bwd_dkdv", "bwd_dkdv_atomic", "bwd_dq");
    block_d / block_dv are the padded head dims the kernel computes with (MMA FLOPs as
    fastgpt.kernel_report counts them)."""
    scores = block_m * block_n
    if kernel in ("fwd", "fwd_decode"):
        # QK^T and PV; p = exp2(s - m) per score and alpha = exp2(m_old - m_new) per row; acc *= alpha
        return TileWork(2.0 * scores * (block_d + block_dv), scores + block_m,
                        scores * FWD_FP32_PER_SCORE + block_m * FWD_FP32_PER_ROW + block_m * block_dv)
    if kernel in ("bwd_dkdv", "bwd_dkdv_atomic"):
        # QK^T recomputed, dO V^T, P^T dO (dV), dS^T Q (dK); p recomputed with one exp2 per score;
        # the atomic variant adds dS K (its share of dQ) from the same 16-bit dS
        atomic = block_d if kernel == "bwd_dkdv_atomic" else 0
        return TileWork(2.0 * scores * (2 * block_d + 2 * block_dv + atomic), scores, scores * DKDV_FP32_PER_SCORE)
    if kernel == "bwd_dq":
        # QK^T, dO V^T, dS K (dQ)
        return TileWork(2.0 * scores * (2 * block_d + block_dv), scores, scores * DQ_FP32_PER_SCORE)
    raise ValueError(f"kernel must be fwd, fwd_decode, bwd_dkdv, bwd_dkdv_atomic or bwd_dq; got {kernel!r}")


def launch_bound(kernel: str, block_m: int, block_n: int, block_d: int, block_dv: int, tiles: float,
                 arch: int, hbm_bytes: float = 0.0, sm_fill: float = 1.0) -> Dict[str, Any]:
    """Times (seconds) per pipe of a launch of ``tiles`` tiles on ``PIPES[arch]``, and the bounds.

    ``sm_fill`` (0..1] is the fraction of SMs the grid keeps busy (as in the roofline model). Returns
    tensor_s, mufu_s, fp32_s, hbm_s, overlapped_s = max of all, serialised_s = max(hbm, the three
    compute pipes added), bound (the pipe that sets overlapped_s) and the per-tile counts.
    """
    if arch not in PIPES:
        raise ValueError(f"arch must be one of {sorted(PIPES)}; got {arch!r}")
    if tiles < 0 or not 0 < sm_fill <= 1:
        raise ValueError(f"tiles must be >= 0 and sm_fill in (0, 1]; got {tiles}, {sm_fill}")
    p = PIPES[arch]
    w = tile_work(kernel, block_m, block_n, block_d, block_dv)
    per_s = p.sms * p.clock_hz * sm_fill
    times = {
        "tensor_s": tiles * w.mma_flops / (p.tensor_flops_per_clk * per_s),
        "mufu_s": tiles * w.mufu / (p.mufu_per_clk * per_s),
        "fp32_s": tiles * w.fp32 / (p.fp32_per_clk * per_s),
        "hbm_s": hbm_bytes / p.hbm_bytes_per_s,
    }
    bound = max(times, key=times.get)[:-2]
    return {**times, "overlapped_s": max(times.values()),
            "serialised_s": max(times["hbm_s"], times["tensor_s"] + times["mufu_s"] + times["fp32_s"]),
            "bound": bound, "tile": asdict(w)}


# SASS opcodes (base names) that the FP32 pipe executes, as the model counts them
_FP32_OPS = ("FADD", "FMUL", "FFMA", "FMNMX")


def fp32_ops(opcodes: Mapping[str, int]) -> Dict[str, float]:
    """From a Counter of full SASS opcodes: exp2 (MUFU.EX2), the FP32 pipe's instructions and the
    16-bit packs (F2FP, counted 1/2 per element in the model: 1 instruction = 2 elements)."""
    out = {"ex2": 0.0, "fp32": 0.0, "f2fp": 0.0}
    for op, n in opcodes.items():
        base = op.split(".")[0]
        if op.startswith("MUFU.EX2"):
            out["ex2"] += n
        elif base in _FP32_OPS:
            out["fp32"] += n
        elif base == "F2FP":
            out["f2fp"] += n
    return out


def epilogue_fp32(kernel: str, block_m: int, block_n: int, block_d: int, block_dv: int) -> float:
    """FP32 instructions after the tile loop, per program: the output tile's scaling (out / l, dK and
    dQ times the softmax scale) and its packing to 16 bits (1/2 per element)."""
    if kernel in ("fwd", "fwd_decode"):
        return 1.5 * block_m * block_dv
    if kernel in ("bwd_dkdv", "bwd_dkdv_atomic"):
        return block_n * block_d + 0.5 * block_n * (block_d + block_dv)
    if kernel == "bwd_dq":
        return 1.5 * block_m * block_d
    raise ValueError(f"kernel must be fwd, fwd_decode, bwd_dkdv, bwd_dkdv_atomic or bwd_dq; got {kernel!r}")


def check_sass(kernel: str, block_m: int, block_n: int, block_d: int, block_dv: int, num_warps: int,
               opcodes: Mapping[str, int]) -> Dict[str, float]:
    """Model vs the static SASS counts of a compiled kernel (per thread; one instruction handles one
    element per thread, except F2FP, two).

    ``copies`` = the code's exp2 count / the model's per tile: the tile loop's copies in the code, 2
    when the compiler keeps the kernel's unmasked and masked loops once each (4: it duplicated them,
    e.g. when pipelining; not an integer: work replicated across threads). ``fp32_ratio`` = the code's
    FP32 instructions, less the epilogue's, over copies x the model's per tile: 1 when the model
    counts what the compiler emitted (masks' selects and the loop's few scalar updates add a little).
    """
    threads = 32 * num_warps
    w = tile_work(kernel, block_m, block_n, block_d, block_dv)
    code = fp32_ops(opcodes)
    copies = code["ex2"] * threads / w.mufu
    loop_fp32 = code["fp32"] + code["f2fp"] - epilogue_fp32(kernel, block_m, block_n, block_d, block_dv) / threads
    return {"model_ex2_per_tile": w.mufu / threads, "code_ex2": code["ex2"], "copies": copies,
            "model_fp32_per_tile": w.fp32 / threads, "code_fp32_in_loops": loop_fp32,
            "fp32_ratio": loop_fp32 / (copies * w.fp32 / threads) if copies else float("nan")}


def report() -> Dict[str, Any]:
    """The per-tile bound of each kernel's default tile at d = 64 and 128 on sm_80 and sm_90, in
    clocks per tile per SM: {case: {arch: {kernel: {config, tensor, mufu, fp32, overlapped, serialised,
    bound, overlapped_x, serialised_x}}}}; the _x figures are the bounds over the tensor-core time
    (today's roofline): 1 = the matmuls set the pace, 2 = twice as long."""
    try:
        import torch

        from fastgpt.kernels import flash_attention as fa
    except ImportError:  # no triton: no kernels to model
        return {}
    out: Dict[str, Any] = {}
    for d in (64, 128):
        for arch, p in PIPES.items():
            for kernel in ("fwd", "fwd_decode", "bwd_dkdv", "bwd_dq", "bwd_dkdv_atomic"):
                c = fa.configs_for(kernel, d, torch.bfloat16, False, arch)[0]
                b = launch_bound(kernel, c.block_m, c.block_n, d, d, 1, arch)
                clk = p.sms * p.clock_hz
                out.setdefault(f"d{d}", {}).setdefault(f"sm_{arch}", {})[kernel] = {
                    "config": str(c), "tensor": round(b["tensor_s"] * clk), "mufu": round(b["mufu_s"] * clk),
                    "fp32": round(b["fp32_s"] * clk), "overlapped": round(b["overlapped_s"] * clk),
                    "serialised": round(b["serialised_s"] * clk), "bound": b["bound"],
                    # the bound relative to today's roofline (tensor cores only; these tiles are compute-bound)
                    "overlapped_x": round(b["overlapped_s"] / b["tensor_s"], 2),
                    "serialised_x": round(b["serialised_s"] / b["tensor_s"], 2)}
    return out


def default_configs() -> Dict[str, Any]:
    """{sm_XX: {kernel: {head-dim bucket: default config}}} for 16-bit inputs: what runs untuned."""
    try:
        from fastgpt.kernels import flash_attention as fa
    except ImportError:
        return {}
    return {f"sm_{arch}": fa.default_configs(arch) for arch in PIPES}


def report_lines(pipes: Mapping[str, Any]) -> List[str]:
    """`fastgpt inspect`'s table of :func:`report`: per-arch default tiles and their per-tile pipe clocks."""
    if not pipes:
        return []
    lines = ["", "pipes per default tile (static model, clocks per tile per SM; overlapped = max, serialised = sum; "
             "MUFU 16/clk, FP32 64|128/clk on sm_80|sm_90):"]
    lines.append(f"  {'case':<6}{'arch':<7}{'kernel':<16}{'default config':<40}{'tensor':>8}{'mufu':>7}{'fp32':>7}"
                 f"{'max':>7}{'sum':>7}{'max/mma':>9}{'sum/mma':>9}  bound")
    for case, by_arch in pipes.items():
        for arch, kernels in by_arch.items():
            for kernel, r in kernels.items():
                lines.append(f"  {case:<6}{arch:<7}{kernel:<16}{r['config']:<40}{r['tensor']:>8}{r['mufu']:>7}{r['fp32']:>7}"
                             f"{r['overlapped']:>7}{r['serialised']:>7}{r['overlapped_x']:>9}{r['serialised_x']:>9}  {r['bound']}")
    return lines
