"""``fastgpt bench``'s output: the summary it leads with, the full tables (``--full``), the plot."""

from typing import Dict, List, Optional

from fastgpt.tools.bench import compare as cmp_

def rows_of(records, parity, on_gpu):
    """The table rows (and the JSON's "results"): one per case fastgpt ran."""
    par = {p["op"]: p for p in parity if p.get("primary")}
    rows = []
    if on_gpu:
        for c in cmp_.compare_records([r for r in records if "ms" in r]):
            m = c["metric"]
            p = par.get(c["op"], {})
            rows.append(
                {
                    "op": c["op"],
                    "mode": c["mode"],
                    "shape": c["shape"],
                    "fastgpt_impl": c["impl"],
                    "fastgpt_ms": c["ms"],
                    "best_peer": c["best_peer"],
                    "best_peer_ms": c["best_peer_ms"],
                    "speedup_vs_best": c["speedup_vs_best"],
                    "peers_ms": c["peers_ms"],
                    "speedup_vs": c["speedup_vs"],
                    "metric": m,
                    "pct_of_roofline": m.get("pct_of_copy_bandwidth", m.get("pct_of_matmul")),
                    "parity_max_error": p.get("max_error"),
                    "targets": c["targets"],
                }
            )
        return rows
    for r in records:
        if "ms" not in r:
            continue
        p = par.get(r["op"], {})
        torch_ms = r["torch_ms"]
        rows.append(
            {
                "op": r["op"],
                "mode": r["mode"],
                "shape": r["shape"],
                "fastgpt_impl": r["impl"],
                "fastgpt_ms": r["ms"],
                "best_peer": "torch",
                "best_peer_ms": torch_ms,
                "speedup_vs_best": torch_ms / r["ms"],
                "peers_ms": r["peers_ms"],
                "speedup_vs": {"torch": torch_ms / r["ms"]},
                "metric": {k: r[k] for k in ("GB/s", "TFLOP/s", "pct_of_copy_bandwidth", "pct_of_matmul", "tokens_per_s") if k in r and r[k] is not None},
                "pct_of_roofline": r.get("pct_of_copy_bandwidth", r.get("pct_of_matmul")),
                "parity_max_error": p.get("max_error"),
                "overhead_us": r["overhead_us"],
                "overhead_pct": r["overhead_pct"],
                "target": r.get("target"),
                "meets_target": r.get("meets_target"),
            }
        )
    return rows


def _fmt_time(ms) -> str:
    if ms is None:
        return "-"
    if ms < 1:
        return f"{ms * 1e3:.1f} us"
    if ms < 1e3:
        return f"{ms:.3f} ms"
    return f"{ms / 1e3:.2f} s"


def _fmt_num(x, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def format_table(rows, on_gpu: bool) -> str:
    """The printed table; the JSON holds every figure, this is the digest."""
    head = ["op", "mode", "shape", "fastgpt", "best peer", "peer time", "speed-up", "% roofline", "parity err"]
    head += ["targets"] if on_gpu else ["overhead", "target"]
    lines = []
    for r in rows:
        cells = [
            r["op"],
            r["mode"],
            r["shape"],
            _fmt_time(r["fastgpt_ms"]),
            r["best_peer"] or "-",
            _fmt_time(r["best_peer_ms"]),
            _fmt_num(r["speedup_vs_best"], ".2f") + ("x" if r["speedup_vs_best"] is not None else ""),
            _fmt_num(r["pct_of_roofline"], ".1f"),
            _fmt_num(r["parity_max_error"], ".1e"),
        ]
        if on_gpu:
            cells.append("; ".join(f"{t['target']}: {t['value']:.2f} {'ok' if t['ok'] else 'MISS'}" for t in r["targets"]) or "-")
        else:
            cells += [f"{r['overhead_us']:+.1f} us {r['overhead_pct']:+.1f}%", f"{r['target'] or '-'} {'ok' if r.get('meets_target') else 'MISS' if r.get('target') else ''}"]
        lines.append(cells)
    widths = [max(len(str(c)) for c in col) for col in zip(head, *lines)] if lines else [len(h) for h in head]
    fmt = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    out = [fmt(head), fmt(["-" * w for w in widths])]
    out += [fmt(c) for c in lines]
    return "\n".join(out)


def write_plot(rows, path: str, title: str, on_gpu: bool) -> None:
    """A horizontal bar per (op, mode, shape): the speed-up against the best peer (GPU) or torch (CPU)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r["speedup_vs_best"] is not None]
    labels = [f"{r['op']} {r['mode']} {r['shape']}" for r in rows]
    values = [r["speedup_vs_best"] for r in rows]
    ops = sorted({r["op"] for r in rows})
    cmap = plt.get_cmap("tab10")
    colours = [cmap(ops.index(r["op"]) % 10) for r in rows]
    fig, ax = plt.subplots(figsize=(10, max(2.5, 0.28 * len(rows) + 1.5)))
    y = list(range(len(rows)))[::-1]
    ax.barh(y, values, color=colours)
    ax.set_yticks(y)
    ax.set_yticklabels(labels, fontsize=7)
    ax.axvline(1.0, color="black", linewidth=0.8)
    if not on_gpu:
        ax.axvline(1 / 1.05, color="grey", linestyle="--", linewidth=0.8, label="5% overhead")
        ax.legend(loc="lower right", fontsize=7)
        ax.set_xlabel("torch time / fastgpt time (1.0 = no dispatch overhead)")
    else:
        ax.set_xlabel("best peer time / fastgpt time (above 1: fastgpt faster)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# the summary (what ran, parity, overhead or targets, the static report) and the full details
# --------------------------------------------------------------------------------------------


def _parity_verdict(p: Dict) -> str:
    return "ok" if p["ok"] else ("unavailable" if p["ok"] is None else "FAILS")


def _names(items: List[str], most: int = 4) -> str:
    return ", ".join(items[:most]) + (f" (+{len(items) - most} more)" if len(items) > most else "")


def summary_lines(ops, parity, rows, records, skipped, errors, static: Optional[Dict], on_gpu: bool) -> List[str]:
    """A few lines a newcomer can read: what ran, the parity verdicts, the overhead (CPU) or target
    verdicts (GPU), one line on the static report (CPU), and where the full figures are."""
    out = ["summary:"]
    op_names = [o for o in ops if o != "gpt"]
    kind = "cases on the GPU" if on_gpu else "dispatch-overhead cases on the CPU (the reference path against torch)"
    ran = f"  ran: {len(op_names)} ops ({', '.join(op_names)})" + (" and a GPT step" if "gpt" in ops else "")
    n_cases = len([r for r in records if "ms" in r and r["op"] != "gpt"])
    out.append(f"{ran}; {n_cases} {kind}; {len(parity)} parity checks")
    by_verdict: Dict[str, List[str]] = {}
    for p in parity:
        name = p["op"] if p.get("primary") else f"{p['op']} on {p['backend']}" + (f" ({p['note']})" if p.get("note") else "")
        by_verdict.setdefault(_parity_verdict(p), []).append(name)
    verdicts = "; ".join(f"{v}: {', '.join(names)}" for v, names in by_verdict.items())
    out.append(f"  parity (float64 reference, fastgpt.testing rule): {verdicts or 'none run'}")
    if on_gpu:
        targets = [(r, t) for r in rows for t in r.get("targets", [])]
        missed = [f"{r['op']} {r['mode']} {r['shape']}: {t['target']}" for r, t in targets if not t["ok"]]
        out.append(f"  targets: {len(targets) - len(missed)} of {len(targets)} met" + (f"; missed: {_names(missed, 3)}" if missed else ""))
    else:
        checked = [r for r in rows if r.get("target")]
        missed = [f"{r['op']} {r['mode']} {r['shape']} ({r['overhead_us']:+.1f} us, {r['overhead_pct']:+.1f}%)" for r in checked if not r.get("meets_target")]
        out.append(f"  dispatch overhead: {len(checked) - len(missed)} of {len(checked)} cases within target "
                   f"(<= 5 us per call on tiny shapes, <= 5% otherwise)" + (f"; over: {_names(missed, 3)}" if missed else ""))
    if skipped:
        out.append(f"  not measured: {len(skipped)} (implementation, case) pairs (reasons with --full or in --json)")
    if errors:
        out.append(f"  ERRORS: {len(errors)} cases raised (see below)")
    if static is not None:
        if static.get("available"):
            problems = static.get("problems") or []
            n = len(static.get("rows") or [])
            out.append(f"  static report (machine code for sm_80/sm_90, modelled on H100/A100): {n} rows, "
                       + (f"{len(problems)} problems: {_names([str(x) for x in problems], 2)}" if problems else "no problems (no spills)"))
        else:
            out.append(f"  static report: not available: {static['reason']}")
    return out


def detail_lines(parity, rows, roofline, skipped, note: str, static: Optional[Dict], on_gpu: bool) -> List[str]:
    """The full figures: every parity check, the roofline probe, the table, what was not measured and
    why, the timing note and the static report's table."""
    out = ["", "parity (fastgpt.testing rule: max|out - ref64| <= 2 max|torch - ref64| + atol, 3x for gradients):"]
    for p in parity:
        detail = p.get("worst") or p.get("unavailable") or p.get("failure", "")
        tag = f" [{p['note']}]" if p.get("note") else ""
        out.append(f"  {p['op']:<15} {p['backend']:<9} {p['dtype']:<8} {_parity_verdict(p):<11} {detail}{tag}")
    out += ["", f"roofline probe ({roofline.device}): copy {roofline.copy_gbps:,.1f} GB/s, "
            f"{roofline.matmul_dtype} matmul {roofline.matmul_tflops:,.3f} TFLOP/s ({roofline.method})", ""]
    out.append(format_table(rows, on_gpu))
    if skipped:
        reasons: Dict[str, int] = {}
        for s in skipped:
            key = f"{s['impl']}: {s['reason']}"
            reasons[key] = reasons.get(key, 0) + 1
        out.append("\nnot measured:")
        out += [f"  [{n}] {reason}" for reason, n in reasons.items()]
    out.append(note)
    if static is not None:
        out.append("\nstatic report (compiled machine code; stands in for GPU timings on this machine):")
        if static.get("available"):
            out += [f"  {line}" for line in static.get("text", []) or [str(r) for r in static.get("rows", [])]]
        else:
            out.append(f"  not available: {static['reason']}")
    return out
