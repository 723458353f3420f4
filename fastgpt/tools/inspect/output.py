"""``fastgpt inspect``'s output: the launch, roofline and candidate tables, and the plot."""

from __future__ import annotations

from typing import Any, Dict, List

from fastgpt.tools.inspect import pipe_model


def _widths(widths: Dict[int, int]) -> str:
    return " ".join(f"{n}x{b}b" for b, n in sorted(widths.items(), reverse=True))


# --------------------------------------------------------------------------------------------
# output: table, plot, bench summary
# --------------------------------------------------------------------------------------------


def _kb(n: float) -> str:
    return f"{n / 1024:.0f}" if n >= 1024 else f"{n / 1024:.1f}"


def _mix(row: Dict[str, Any]) -> str:
    if row["role"] == "mma":
        return f"HGMMA {row['hgmma']}" if row["hgmma"] else f"HMMA {row['hmma']}"
    return _widths(row["ldg"]) or "-"


def _short_kernel(name: str, width: int = 44) -> str:
    return name if len(name) <= width else name[: width - 1] + "~"


def format_report(report: Dict[str, Any], *, launches: bool = True, candidates: bool = True) -> List[str]:
    """The terminal tables: launches (default configs), the roofline model per op, tuning candidates,
    then problems, notes and what was unavailable."""
    lines = ["fastgpt inspect: " + report["disclaimer"] + "."]
    gpus = {g["key"]: g for g in report["gpus"]}
    keys = [g["key"] for g in report["gpus"]]
    by = {}
    for r in report["rows"]:
        by.setdefault((r["case"], r["op"], r["pass"], r["kernel"], r["config"]), {})[r["gpu"]] = r
    arch = "/".join(f"sm_{gpus[k]['arch']}" for k in keys)
    lines += _launch_table(by, keys, arch) if launches else []
    lines += _roofline_table(report, keys)
    lines += pipe_model.report_lines(report.get("pipes"))  # MUFU / FP32 pipes per tile
    if candidates:
        lines += _candidate_table(report, by, keys, gpus)
    for title, items in (("problems (default configs)", report["problems"]), ("notes", report["notes"])):
        if items:
            lines.append("")
            lines.append(f"{title}:")
            lines += [f"  {p}" for p in items]
    for part, reason in report["unavailable"].items():
        lines.append(f"not available ({part}): {reason}")
    t = report.get("timing", {})
    tri = t.get("triton")
    if tri:
        lines.append("")
        lines.append(f"{tri['launch_configs']} attention launch configs: {tri['compiles']} compiles "
                     f"({tri['cached']} cached) on {tri['workers']} worker(s) in {tri['seconds']} s; CUDA part {t.get('cuda_s', '-')} s")
    return lines


def _launch_table(by, keys, arch) -> List[str]:
    lines = [""]
    lines.append(f"launches (default config; pairs are {arch}, i.e. {'/'.join(keys)}):")
    head = (f"{'op':<19}{'case':<21}{'kernel':<45}{'config / block':<20}{'grid':>14}{'regs':>9}{'STL+LDL':>8}{'smem KB':>10}"
            f"{'occupancy':>11}  {'MMA / global loads (sm_90)':<28}{'MUFU':>6}")
    lines += [head, "-" * len(head)]
    for (case, op, pass_, kernel, config), per in by.items():
        first = next(per[k] for k in keys if k in per)
        if not first["default"]:
            continue
        pair = [per.get(k) for k in keys]
        regs = "/".join(str(r["registers"]) if r else "-" for r in pair)
        spill = "/".join(str((r["stl"] or 0) + (r["ldl"] or 0)) if r else "-" for r in pair)
        smem = "/".join(_kb(r["shared"]) if r else "-" for r in pair)
        occ = "/".join(f"{r['occupancy']:.0%}" if r else "-" for r in pair)
        grid = "/".join("x".join(str(g) for g in r["grid"] if g != 1) or "1" if r else "-" for r in pair)
        lines.append(f"{op + ' ' + pass_:<19}{case:<21}{_short_kernel(kernel):<45}{config[:19]:<20}{grid:>14}{regs:>9}{spill:>8}{smem:>10}"
                     f"{occ:>11}  {_mix(first):<28}{first['mufu']:>6}")
    return lines


def _roofline_table(report, keys) -> List[str]:
    lines = [""]
    lines.append("roofline model per op (static: minimum bytes and FLOPs vs what the tiling moves; not a timing):")
    head = f"{'op':<19}{'case':<21}{'min MB':>9}{'HBM MB':>9}{'tiled MB':>10}{'GFLOP':>9}{'exec GFLOP':>11}"
    for k in keys:
        head += f"  {k + ' ideal/model us':>22}{'frac':>6}"
    lines += [head, "-" * len(head)]
    for c in report["cases"]:
        g0 = c["gpus"].get(keys[0], {})
        line = (f"{c['op'] + ' ' + c['pass']:<19}{c['case']:<21}{c['min_bytes'] / 1e6:>9.1f}{g0.get('hbm_bytes', 0) / 1e6:>9.1f}"
                f"{g0.get('tiled_bytes', 0) / 1e6:>10.1f}{c['useful_flops'] / 1e9:>9.1f}{g0.get('exec_flops', 0) / 1e9:>11.1f}")
        for k in keys:
            g = c["gpus"].get(k)
            if g and g["fraction"] is not None:
                line += f"  {g['ideal_us']:>10.1f}/{g['model_us']:<11.1f}{g['fraction']:>6.0%}"
            else:
                line += f"  {'-':>22}{'-':>6}"
        lines.append(line)
    return lines


def _candidate_table(report, by, keys, gpus) -> List[str]:
    if all(r["default"] for r in report["rows"]):
        return []
    lines = ["", "tuning candidates (attention; * = default): registers, shared KB, occupancy, stack bytes (spills) per arch"]
    head = f"{'kernel':<16}{'case':<18}{'config':<22}" + "".join(f"{'sm_' + str(gpus[k]['arch']):>32}" for k in keys)
    lines += [head, "-" * len(head)]
    for (case, op, pass_, kernel, config), per in by.items():
        if op != "attention":
            continue
        cells = ""
        for k in keys:
            r = per.get(k)
            cells += (f"{r['registers']:>8} {_kb(r['shared']):>6} {r['occupancy']:>6.0%} {r['stack']:>5}   "
                      if r else f"{'does not compile':>32}")
        star = "*" if next(per[k] for k in keys if k in per)["default"] else " "
        lines.append(f"{kernel:<16}{case:<18}{star + config:<22}{cells}")
    return lines


def write_plot(report: Dict[str, Any], path: str) -> None:
    """A PNG of the modelled fraction of roofline per op and shape (one bar per GPU), labelled as a model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = [c for c in report["cases"] if c["gpus"]]
    labels = [f"{c['op']} {c['pass']}  {c['case']}" for c in cases]
    keys = [g["key"] for g in report["gpus"]]
    fig, ax = plt.subplots(figsize=(9, max(4, 0.19 * len(cases) + 1.5)))
    height = 0.8 / len(keys)
    for i, k in enumerate(keys):
        values = [100 * (c["gpus"].get(k, {}).get("fraction") or 0) for c in cases]
        ax.barh([y + i * height for y in range(len(cases))], values, height, label=k)
    ax.set_yticks([y + height * (len(keys) - 1) / 2 for y in range(len(cases))])
    ax.set_yticklabels(labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("modelled % of roofline = ideal time / model time (static model, not a measurement)")
    ax.set_xlim(0, 105)
    ax.axvline(100, color="gray", linewidth=0.5)
    ax.legend(loc="lower right")
    ax.set_title("fastgpt inspect: sm_80 / sm_90 machine code and a byte/FLOP model", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
