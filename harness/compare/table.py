"""Render a :class:`Comparison`: markdown, CSV and a rich table.

All three use the same cells so that they agree; output is deterministic
(fixed formatting, scenario and metric order from the inputs' schema).
"""

from __future__ import annotations

import csv
import io
import math
from typing import List, Optional, Sequence

from harness import results
from harness.compare.stats import Comparison, MetricComparison, ScenarioComparison

HEADERS = ("scenario", "metric", "n base/new", "failed base/new", "base median [IQR]",
           "new median [IQR]", "change", "ratio 95% CI", "p (MWU)", "verdict")


def fmt_num(v: Optional[float]) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    a = abs(v)
    if a >= 1000:
        return f"{v:.0f}"
    if a >= 100:
        return f"{v:.1f}"
    if a >= 1 or a == 0:
        return f"{v:.2f}"
    return f"{v:.3f}"


def fmt_pct(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:+.1f}%"


def fmt_ci(lo: Optional[float], hi: Optional[float]) -> str:
    return "-" if lo is None or hi is None else f"{lo:.3f}..{hi:.3f}"


def fmt_p(p: Optional[float]) -> str:
    if p is None:
        return "-"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def _median_iqr(s) -> str:
    if not s.n:
        return "-"
    return f"{fmt_num(s.median)} [{fmt_num(s.q1)}..{fmt_num(s.q3)}]"


def cells(sc: ScenarioComparison, m: MetricComparison) -> List[str]:
    return [sc.label, m.metric, f"{m.base.n}/{m.new.n}", f"{sc.base_failed}/{sc.new_failed}",
            _median_iqr(m.base), _median_iqr(m.new), fmt_pct(m.pct_change),
            fmt_ci(m.ci_low, m.ci_high), fmt_p(m.p_value), m.verdict]


def summary_lines(cmp: Comparison) -> List[str]:
    lines = [f"BASE: {cmp.base_label}", f"NEW:  {cmp.new_label}"]
    variants = sorted({(s.base_variant, s.new_variant) for s in cmp.scenarios})
    for b, n in variants:
        lines.append(f"variants: {b}  ->  {n}")
    failed_b = sum(s.base_failed for s in cmp.scenarios)
    failed_n = sum(s.new_failed for s in cmp.scenarios)
    lines.append(f"scenarios compared: {len(cmp.scenarios)}; failed runs (not used): "
                 f"BASE {failed_b}, NEW {failed_n}")
    if cmp.only_base:
        lines.append(f"only in BASE (not compared): {', '.join(cmp.only_base)}")
    if cmp.only_new:
        lines.append(f"only in NEW (not compared): {', '.join(cmp.only_new)}")
    counts = ", ".join(f"{v} {cmp.count(v)}" for v in ("improved", "regressed", "unchanged", "noisy", "missing")
                       if cmp.count(v))
    lines.append(f"verdicts (threshold {cmp.threshold_pct:g}%, lower is better): {counts or 'none'}")
    tcg = [s.label for s in cmp.scenarios
           if dict(s.key).get("accel") == "tcg" and any("stall" in m.metric for m in s.metrics)]
    if tcg:
        lines.append(f"TCG scenarios ({', '.join(tcg)}): their stall metrics are host scheduling noise "
                     "(every vCPU is a host thread), not KVM's behaviour")
    return lines


def _md_escape(s: str) -> str:
    return s.replace("|", "\\|")


def to_markdown(cmp: Comparison) -> str:
    out = [f"- {_md_escape(line)}" for line in summary_lines(cmp)]
    out.append("")
    out.append("| " + " | ".join(HEADERS) + " |")
    out.append("|" + "|".join("---" for _ in HEADERS) + "|")
    for sc, m in cmp.rows():
        c = cells(sc, m)
        c[-1] = f"**{c[-1]}**" if c[-1] in ("improved", "regressed") else c[-1]
        out.append("| " + " | ".join(_md_escape(x) for x in c) + " |")
    return "\n".join(out) + "\n"


CSV_COLUMNS = results.SCENARIO_COLUMNS + (
    "metric", "base_variant", "new_variant", "base_failed", "new_failed",
    "base_n", "base_median", "base_q1", "base_q3", "base_min", "base_max",
    "new_n", "new_median", "new_q1", "new_q3", "new_min", "new_max",
    "pct_change", "ratio", "ratio_ci_low", "ratio_ci_high", "p_value", "separated", "verdict",
)


def _g(v: Optional[float]) -> str:
    if v is None or not math.isfinite(v):
        return ""
    return f"{v:.6g}"


def to_csv(cmp: Comparison) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    for sc, m in cmp.rows():
        key = dict(sc.key)
        row: List[object] = [key.get(c, "") for c in results.SCENARIO_COLUMNS]
        row += [m.metric, sc.base_variant, sc.new_variant, sc.base_failed, sc.new_failed]
        for s in (m.base, m.new):
            row += [s.n, _g(s.median), _g(s.q1), _g(s.q3), _g(s.min), _g(s.max)]
        row += [_g(m.pct_change), _g(m.ratio), _g(m.ci_low), _g(m.ci_high), _g(m.p_value),
                int(m.separated), m.verdict]
        w.writerow(row)
    return buf.getvalue()


_STYLE = {"improved": "bold green", "regressed": "bold red", "noisy": "yellow", "unchanged": "", "missing": "dim"}


def to_rich(cmp: Comparison):
    """A rich Table (the command prints it)."""
    from rich.table import Table

    table = Table(title="migstall compare", title_justify="left", caption="\n".join(summary_lines(cmp)),
                  caption_justify="left")
    for h in HEADERS:
        table.add_column(h, justify="right" if h not in ("scenario", "metric", "verdict") else "left")
    last = None
    for sc, m in cmp.rows():
        c = cells(sc, m)
        if sc.label == last:
            c[0] = ""
        last = sc.label
        style = _STYLE.get(m.verdict, "")
        c[-1] = f"[{style}]{c[-1]}[/]" if style else c[-1]
        table.add_row(*c)
    return table


def html_table(cmp: Comparison) -> str:
    import html

    parts = ["<table class='cmp'><thead><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in HEADERS)
             + "</tr></thead><tbody>"]
    for sc, m in cmp.rows():
        c = [html.escape(x) for x in cells(sc, m)]
        parts.append(f"<tr class='{m.verdict}'>" + "".join(f"<td>{x}</td>" for x in c) + "</tr>")
    parts.append("</tbody></table>")
    return "\n".join(parts)


def gate_lines(failures: Sequence[str]) -> List[str]:
    return [f"GATE FAILED: {f}" for f in failures]
