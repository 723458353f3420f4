"""fastgpt against each peer measured in the same run, and the performance targets of each case."""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

from fastgpt.tools.bench.op_cases import OPS, _cases, fastgpt_impl


def _targets(op: str, mode: str, shape: Dict[str, int], fast: Dict[str, object], peers: Dict[str, float]) -> List[Dict[str, object]]:
    """The targets (docs/design.md, 'Performance targets and the byte/FLOP model') of one case, measured."""
    ms = float(fast["ms"])  # type: ignore[arg-type]
    out: List[Dict[str, object]] = []

    def vs(name: str, peer_ms: Optional[float], limit: float) -> None:
        if peer_ms is not None:
            out.append({"target": f">= {limit}x {name}", "value": peer_ms / ms, "ok": peer_ms / ms >= limit})

    if op == "gpt":
        vs("eager (plain torch modules)", peers.get("torch-eager"), 1.3)
        vs("torch.compile (plain torch modules)", peers.get("torch-compile"), 1.0)
        return out

    def vs_peers(name: str, impls: Sequence[str], limit: float) -> None:
        times = [peers[i] for i in impls if i in peers]
        vs(name, min(times) if times else None, limit)

    def pct(metric: str, limit: float, label: str) -> None:
        value = fast.get(metric)
        if value is not None:
            out.append({"target": f">= {limit:.0f}% of {label}", "value": value, "ok": float(value) >= limit})  # type: ignore[arg-type]

    _cases(op).targets(mode, shape, vs_peers, pct)
    return out


def compare_records(records: Sequence[Dict[str, object]]) -> List[Dict[str, object]]:
    """One row per case that fastgpt ran: its time, each peer's, the speed-ups and the targets.

    ``speedup_vs[peer]`` is peer time / fastgpt time (above 1: fastgpt is faster). Records are
    grouped by their ``group`` (one case); the fastgpt record is the one whose impl starts with
    "fastgpt" (the first GPU backend of the op when several ran).
    """
    groups: Dict[str, List[Dict[str, object]]] = {}
    for r in records:
        groups.setdefault(str(r["group"]), []).append(r)
    rows = []
    for group, recs in groups.items():
        fast = [r for r in recs if str(r["impl"]).startswith("fastgpt")]
        if not fast:
            continue
        op = str(fast[0]["op"])
        primary = fastgpt_impl(op) if op in OPS else "fastgpt"
        f = next((r for r in fast if r["impl"] == primary), fast[0])
        peers = {str(r["impl"]): float(r["ms"]) for r in recs if r is not f}  # type: ignore[arg-type]
        speedups = {name: t / float(f["ms"]) for name, t in peers.items()}  # type: ignore[arg-type]
        best = min(peers, key=peers.get) if peers else None  # type: ignore[arg-type]
        rows.append(
            {
                "group": group,
                "op": f["op"],
                "mode": f["mode"],
                "shape": f["shape"],
                "impl": f["impl"],
                "ms": f["ms"],
                "peers_ms": peers,
                "speedup_vs": speedups,
                "best_peer": best,
                "best_peer_ms": peers.get(best) if best else None,
                "speedup_vs_best": speedups.get(best) if best else None,
                "metric": {k: f[k] for k in ("GB/s", "TFLOP/s", "pct_of_copy_bandwidth", "pct_of_matmul", "tokens_per_s", "mfu_pct") if k in f},
                "targets": _targets(str(f["op"]), str(f["mode"]), dict(f.get("dims") or {}), f, peers),  # type: ignore[arg-type]
            }
        )
    return rows
