"""The shapes ``fastgpt inspect`` reads and its byte/FLOP model: minimum HBM bytes (each op's registry
entry), the bytes the tiling requests, a simple L2 model, and the roofline time they imply
(docs/design.md, 'Performance targets and the byte/FLOP model')."""

from __future__ import annotations

from typing import Any, Dict, List, Tuple

from fastgpt import registry
from fastgpt.tools.inspect.gpus import Gpu


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
    # the opt-in non-deterministic backward (dQ by atomics in the dK/dV kernel: 5 matmuls per tile, not 7)
    dict(name="gpt2-small-atomic", b=8, hq=12, hk=12, sq=1024, sk=1024, d=64, causal=True, dtype="bfloat16", passes=("bwd",),
         deterministic=False),
    dict(name="llama3-8b-gqa-atomic", b=1, hq=32, hk=8, sq=8192, sk=8192, d=128, causal=True, dtype="bfloat16", passes=("bwd",),
         deterministic=False, quick=True),
    # the exact-fp32 path (CUDA-core FMA, small tiles): GPT-2 small, and the two buckets whose candidate
    # lists the test suite leaves to this report (it compiles every fp32 candidate of bucket 32 only)
    dict(name="gpt2-small-fp32", b=8, hq=12, hk=12, sq=1024, sk=1024, d=64, causal=True, dtype="float32", passes=("fwd", "bwd")),
    dict(name="d128-fp32", b=1, hq=16, hk=16, sq=2048, sk=2048, d=128, causal=True, dtype="float32", passes=("fwd", "bwd")),
    dict(name="d256-fp32", b=1, hq=16, hk=16, sq=2048, sk=2048, d=256, causal=True, dtype="float32", passes=("fwd", "bwd")),
    # packed sequences (flash_attn_varlen_func; VARLEN kernels): b sequences of sq tokens each, so the
    # grid, bytes and FLOPs are those of the dense case (a ragged batch only has fewer live tiles)
    dict(name="varlen-gqa", b=8, hq=32, hk=8, sq=2048, sk=2048, d=128, causal=True, dtype="bfloat16", passes=("fwd", "bwd"),
         varlen=True, quick=True),
    # flash-attn's options, each a constexpr variant of the kernels: a Mistral-style window of 4096 over
    # 16k (work ~ S x window, not S^2), Gemma-2's window and logit softcap at head dim 256, BLOOM's
    # ALiBi, Grok's softcap at 128; `--quick` (and the test suite) compiles all three options at once
    # at head dim 256, the most registers of them (the three at d=128 spill 56 B on sm_80 at 128x64 s3)
    dict(name="mistral-window-16k", b=1, hq=32, hk=8, sq=16384, sk=16384, d=128, causal=True, dtype="bfloat16",
         passes=("fwd", "bwd"), window=(4095, 0)),
    dict(name="gemma2-window-softcap", b=1, hq=16, hk=8, sq=8192, sk=8192, d=256, causal=True, dtype="bfloat16",
         passes=("fwd", "bwd"), window=(4095, 0), softcap=50.0),
    dict(name="bloom-alibi", b=4, hq=32, hk=32, sq=2048, sk=2048, d=128, causal=True, dtype="bfloat16",
         passes=("fwd", "bwd"), alibi=True),
    dict(name="grok-softcap", b=1, hq=48, hk=8, sq=8192, sk=8192, d=128, causal=True, dtype="bfloat16",
         passes=("fwd", "bwd"), softcap=30.0),
    dict(name="d256-window-softcap-alibi", b=1, hq=16, hk=8, sq=8192, sk=8192, d=256, causal=True, dtype="bfloat16",
         passes=("fwd", "bwd"), window=(4095, 0), softcap=50.0, alibi=True, quick=True),
    # other Triton ops' cases (the split-KV decode kernel), from their registry entries
    *(case for spec in registry.all_ops() for case in spec.report_cases),
)

# Layer norm / GELU on x (rows, cols): 8 x 1024 tokens; hidden 768 (GPT-2 small) .. 8192 (70B-class);
# GELU on the MLP's 4 x hidden; two wide rows that take the multi-pass kernels.
ROWS = 8 * 1024
HIDDEN = (768, 1024, 1600, 2048, 4096, 8192)
QUICK_HIDDEN = (768, 4096)
CUDA_OPS = registry.names(lambda spec: "cuda" in spec.backends)


def _cuda_cases(quick: bool) -> List[Dict[str, Any]]:
    hidden = QUICK_HIDDEN if quick else HIDDEN
    cases = []
    for op in CUDA_OPS:
        spec = registry.get(op)
        width = spec.cases.width_factor if spec.cases else 1
        shapes = [(ROWS, width * h) for h in hidden]
        if not quick:
            shapes += list(spec.report_shapes)
        for rows, cols in shapes:
            for pass_ in ("fwd", "bwd"):
                cases.append(dict(name=f"{rows}x{cols}", op=op, pass_=pass_, rows=rows, cols=cols, dtype="bfloat16"))
    return cases


CUDA_CASES = _cuda_cases(False)

# --------------------------------------------------------------------------------------------
# the byte / FLOP model
# --------------------------------------------------------------------------------------------

TILING_MODEL = {
    "tiled bytes": "global-memory bytes the kernel's loops request: each tile load and store counted every time it "
                   "happens (K/V once per query tile, Q/dO once per key tile, each pass over a wide row, partial-sum rows)",
    "hbm bytes": "tiled bytes after a simple L2 model: data re-read by programs that are resident at the same time, "
                 "or whose working set in flight fits in half the L2, is fetched from HBM once",
    "exec flops": "tensor-core FLOPs the tiles execute (full BLOCK_M x BLOCK_N x padded-head-dim tiles, masked "
                  "elements included); 0 for the memory-bound ops. The deterministic backward executes 7 matmuls "
                  "per tile (dK/dV: 4, dQ: 3, S and dP recomputed); deterministic=False 5 (dQ added in the dK/dV "
                  "kernel by atomics), the 5 that the useful FLOPs count",
    "min bytes / useful flops": "each op's work model (docs/design.md, 'Performance targets and the byte/FLOP model'): every input read and every "
                                "output written once; attention FLOPs 4*B*H*Sq*Sk*D, halved when causal (with a sliding "
                                "window 4*B*H*D per visible query-key pair), backward 2.5x",
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
    visit key tiles [lo, hi) per query tile (the causal and window bounds), the dK/dV kernel query
    tiles [m_lo, m_hi) per key tile for each query head of its GQA group.
    """
    b, hq, hk, sq, sk, d = (case[k] for k in ("b", "hq", "hk", "sq", "sk", "d"))
    dv = case.get("dv", d)
    e = 4 if case["dtype"] == "float32" else 2
    group, off, causal = hq // hk, sk - sq, case["causal"]
    # the window as the launcher passes it (kernels/flash_attention.py, _feature_args): sides that never bind = Sq + Sk
    left, right = case.get("window", (-1, -1))
    left = left if left >= 0 else sq + sk
    right = 0 if causal else (right if right >= 0 else sq + sk)
    bm, bn = rec["config"]["block_m"], rec["config"]["block_n"]
    bd, bdv = rec["block_d"], rec["block_dv"]
    kernel = rec["kernel"]
    if kernel.startswith("decode_"):
        return _decode_model(rec, case)
    if kernel == "bwd_preprocess":
        nbytes = b * hq * sq * (2 * dv * e + 4 + 8)  # read O, dO, lse; write delta, lse2
        return {"tiled_bytes": nbytes, "hbm_bytes": nbytes, "exec_flops": 0.0}
    if kernel == "bwd_dq_convert":
        # the float32 dQ sums read, dQ written; plus torch's memset of that buffer before the dK/dV launch
        # (another memory-bound pass, so its bytes add to this launch's time)
        nbytes = b * hq * sq * d * (4 + 4 + e)
        return {"tiled_bytes": nbytes, "hbm_bytes": nbytes, "exec_flops": 0.0}
    if kernel in ("fwd", "bwd_dq"):
        n_m = -(-sq // bm)
        key_rows = key_tiles = 0
        for t in range(n_m):
            m0 = t * bm
            hi = max(min(sk, m0 + bm + off + right), 0)
            lo = min(max(m0 + off - left, 0) // bn * bn, hi)
            tiles = -(-(hi - lo) // bn)
            key_tiles += tiles
            key_rows += min(tiles * bn, sk - lo)
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
    if kernel in ("bwd_dkdv", "bwd_dkdv_atomic"):
        n_n = -(-sk // bn)
        q_rows = q_tiles = 0
        for j in range(n_n):
            m_hi = min(max(j * bn + bn - off + left, 0), sq)
            m_lo = min(max(j * bn - off - right, 0) // bm * bm, m_hi)
            rows = m_hi - m_lo
            q_rows += rows
            q_tiles += -(-rows // bm)
        own = sk * (d + dv) * e * 2  # K, V read, dK, dV written
        per_q_row = (d + dv) * e + 8  # Q, dO, lse2, delta
        q_tiled = group * q_rows * per_q_row
        q_once = b * hq * sq * per_q_row
        hit = _reused(n_n, group * sq * per_q_row, resident, gpu)
        model = {"tiled_bytes": b * hk * (own + q_tiled), "hbm_bytes": b * hk * own + (q_once if hit else b * hk * q_tiled),
                 "exec_flops": float(b * hk * group * q_tiles * 2 * bm * bn * (2 * bd + 2 * bdv))}
        if kernel == "bwd_dkdv_atomic":
            # + dS^T K per tile; each visited dQ row read-modify-written (float32) at L2 by the atomics, from
            # HBM once (fetched, written back) when the key tiles sharing it keep it there. The group loop
            # is each program's outer loop, so the programs in flight share one query head's rows at a time.
            red = group * q_rows * d * 4 * 2
            dq_hit = _reused(n_n, sq * d * 4, resident, gpu)
            model["tiled_bytes"] += b * hk * red
            model["hbm_bytes"] += b * hq * sq * d * 4 * 2 if dq_hit else b * hk * red
            model["exec_flops"] += float(b * hk * group * q_tiles * 2 * bm * bn * bd)
        return model
    raise ValueError(f"no byte model for attention kernel {kernel!r}")


def _decode_model(rec: Dict[str, Any], case: Dict[str, Any]) -> Dict[str, float]:
    """The split-KV decode launches (kernels/decode_attention.py), cache length sk: the split kernel
    reads each kv head's K/V once (each split its own run of key tiles) and the packed query tile once
    per split, and writes float32 partial outputs and LSEs; the combine kernel reads those back and
    writes out and lse. Nothing is re-read, so tiled and HBM bytes agree."""
    b, hq, hk, sq, sk, d = (case[k] for k in ("b", "hq", "hk", "sq", "sk", "d"))
    dv = case.get("dv", d)
    e = 4 if case["dtype"] == "float32" else 2
    splits = rec["splits"]
    partials = b * hq * sq * splits * (dv * 4 + 4)
    if rec["kernel"] == "decode_combine":
        nbytes = partials + b * hq * sq * (dv * e + 4)
        return {"tiled_bytes": nbytes, "hbm_bytes": nbytes, "exec_flops": 0.0}
    bm, bn = rec["config"]["block_m"], rec["config"]["block_n"]
    tiles = -(-sk // bn)
    nbytes = b * hk * sk * (d + dv) * e + b * hk * splits * (hq // hk) * sq * d * e + partials
    flops = b * hk * tiles * 2 * bm * bn * (rec["block_d"] + rec["block_dv"])
    return {"tiled_bytes": nbytes, "hbm_bytes": nbytes, "exec_flops": float(flops)}


def _attention_work(case: Dict[str, Any], pass_: str) -> Tuple[float, float]:
    """(min bytes, useful FLOPs) of an attention pass: fastgpt._timing's FLOP convention; every input
    read and output written once."""
    from fastgpt.tools.bench import timing as _timing

    b, hq, hk, sq, sk, d = (case[k] for k in ("b", "hq", "hk", "sq", "sk", "d"))
    dv = case.get("dv", d)
    e = 4 if case["dtype"] == "float32" else 2
    if case.get("op", "attention") != "attention":  # the decode op: its registry byte model
        import torch

        dims = {"B": b, "Hq": hq, "Hk": hk, "Sq": sq, "L": sk, "D": d}
        _, nbytes = registry.get(case["op"]).cases.work(dims, getattr(torch, case["dtype"]), pass_)
        return float(nbytes), 4.0 * b * hq * sq * sk * d
    if case["causal"] and sq not in (1, sk):
        raise ValueError("the FLOP convention covers causal attention with Sq == Sk (or a one-query decode step)")
    causal = case["causal"] and sq == sk and sq > 1  # one query sees every key (bottom-right causal)
    window = tuple(case.get("window", (-1, -1)))
    kv = b * hk * sk * (d + dv) * e
    if pass_ == "fwd":
        min_bytes = b * hq * sq * (d * e + dv * e + 4) + kv
    else:  # read Q, O, dO, lse, K, V; write dQ, dK, dV
        min_bytes = b * hq * sq * (2 * d * e + 2 * dv * e + 4) + 2 * kv
    return float(min_bytes), _timing.attention_flops(b, hq, sq, sk, d, causal=causal, mode=pass_, window=window)


def _cuda_min_bytes(case: Dict[str, Any]) -> float:
    """The bytes one pass must move: the op's byte model (its registry entry)."""
    import torch

    dims = {"M": case["rows"], "N": case["cols"]}
    _, amount = registry.get(case["op"]).cases.work(dims, getattr(torch, case["dtype"]), case["pass_"])
    return float(amount)


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
    raise ValueError(f"no byte model for CUDA kernel {launch['kernel']!r}: add one to fastgpt/tools/inspect/model.py")
