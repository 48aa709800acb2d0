"""The self-contained HTML report (``--report DIR`` -> ``DIR/index.html``).

Every image is a PNG embedded as a ``data:image/png;base64,...`` URI, the style
is inline, and there is no script: the file opens offline and loads nothing
from the network.
"""

from __future__ import annotations

import base64
import html
import logging
from pathlib import Path
from typing import List, Optional, Sequence

from harness.compare import plots, provenance, table
from harness.compare.load import ResultSet
from harness.compare.stats import BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED, MIN_N, Comparison
from harness.errors import UserError
from harness.results import COLUMNS, atomic_write_text

log = logging.getLogger(__name__)

_CSS = """
body{font-family:sans-serif;margin:1.5em;color:#222;max-width:1200px}
h1{font-size:1.4em}h2{font-size:1.15em;border-bottom:1px solid #ccc;margin-top:1.6em}
table.cmp,table.kv{border-collapse:collapse;font-size:.85em}
table.cmp td,table.cmp th,table.kv td,table.kv th{border:1px solid #ccc;padding:2px 6px;text-align:right}
table.cmp td:nth-child(-n+2),table.kv td:first-child{text-align:left}
tr.improved td:last-child{color:#1a7f37;font-weight:bold}
tr.regressed td:last-child{color:#cf222e;font-weight:bold}
tr.noisy td:last-child{color:#9a6700}
.gate-fail{color:#cf222e;font-weight:bold}.gate-pass{color:#1a7f37;font-weight:bold}
img{max-width:100%;border:1px solid #eee;margin:.4em 0}
code{background:#f4f4f4;padding:0 3px}
table.prov td,table.prov th{text-align:left;vertical-align:top}
table.prov tr.diff td{background:#fff1c2}table.prov tr.diff td:nth-child(2)::after{content:" \\2260"}
p.note{color:#9a6700}
"""


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _img(png: Optional[bytes], alt: str) -> str:
    if not png:
        return ""
    return f"<img alt='{html.escape(alt)}' src='{data_uri(png)}'>"


def _section(title: str, cmp: Comparison, base: ResultSet, new: ResultSet, plots_on: bool) -> List[str]:
    out = [f"<h2>{html.escape(title)}</h2>", "<ul>"]
    out += [f"<li>{html.escape(line)}</li>" for line in table.summary_lines(cmp)]
    out.append("</ul>")
    out.append(table.html_table(cmp))
    if not plots_on:
        return out
    fit_png, fits = plots.fit_figure(cmp)
    if fit_png:
        out.append("<h3>Dirty-log start vs memory</h3>")
        out.append(_img(fit_png, "dirty-log start vs memory"))
    if fits:
        out.append("<table class='kv'><tr><th>metric</th><th>side</th><th>runs</th><th>x</th>"
                   "<th>slope ms/GiB (95% CI)</th><th>at 2 TiB, s (95% CI)</th><th>measured GiB</th></tr>")
        for f in fits:
            out.append(
                f"<tr><td><code>{f.metric}</code></td><td>{f.side}</td><td>{f.n}</td><td>{f.basis}</td>"
                f"<td>{f.slope_ms_per_gib:.3f} ({f.slope_ci[0]:.3f}..{f.slope_ci[1]:.3f})</td>"
                f"<td>{f.at_2tib_ms / 1000:.2f} ({f.at_2tib_ci[0] / 1000:.2f}..{f.at_2tib_ci[1] / 1000:.2f})</td>"
                f"<td>{f.gib_range[0]:.3g}..{f.gib_range[1]:.3g}</td></tr>")
        out.append("</table>")
        out.append("<p>x is the memory KVM had mapped when logging started (<code>kvm_mapped_mib</code>, "
                   "QEMU's <code>query-stats</code>) when every run has it, else the guest's size.  A fit "
                   "needs 3 runs on at least two sizes.</p>")
    if fit_png or fits:
        out.append("<p>Reference: the original report measured about 9 s (stock) and 0.5 s (patched) "
                   "for a 2 TiB guest on bare-metal Linux 5.0 with QEMU 3.1.  Figures from another host, "
                   "and above all from a nested (virtual) host, are not native figures: compare the sides "
                   "of one host, and the extrapolations only as a trend.</p>")
    for sc in cmp.scenarios:
        out.append(f"<h3>{html.escape(sc.label)}</h3>")
        out.append(_img(plots.metrics_figure(sc), f"{sc.label}: metrics"))
        out.append(_img(plots.precopy_figure(sc), f"{sc.label}: stalled ms per s, precopy vs baseline"))
        out.append(_img(plots.timeline_figure(sc), f"{sc.label}: stall timeline"))
    return out


def _headline(cmp: Comparison) -> List[str]:
    """The figure a reviewer reads first, and what it leaves out."""
    out = ["<h2>Headline: dirty-log start and the start's pio stall</h2>",
           _img(plots.headline_figure(cmp), "headline: dirty-log start and pio stall per scenario")]
    out += [f"<p class='note'>{html.escape(n)}</p>" for n in plots.headline_notes(cmp)]
    out.append(f"<p>Per scenario: the median of the ok runs on each side with its bootstrap 95% CI, for "
               f"<code>{plots.HEADLINE_START[0]}</code> and the longest <code>pio</code> stall in the stall "
               f"window (<code>{plots.HEADLINE_PIO[0]}</code>, in ms), and the ratio of medians new/base with "
               "its bootstrap 95% CI and verdict as in the tables below.</p>")
    return out


def _provenance(cmp: Comparison, base: ResultSet, new: ResultSet) -> List[str]:
    items = provenance.provenance(base, new, compared_scenarios=len(cmp.scenarios))
    out = ["<h2>Provenance</h2>",
           "<p>Distinct values per side, over all its rows (row counts in parentheses when there are "
           "several). <span style='background:#fff1c2'>Highlighted (&ne;)</span>: the values differ between "
           "the sides; the runs' counts, dates and files are not compared.</p>",
           "<table class='kv prov'><tr><th></th><th>column</th>"
           f"<th>base: {html.escape(base.label)}</th><th>new: {html.escape(new.label)}</th></tr>"]
    for it in items:
        cls = " class='diff' title='differs between the sides'" if it.differs else ""
        name = f"<code>{html.escape(it.name)}</code>" if it.name in COLUMNS else html.escape(it.name)
        out.append(f"<tr{cls}><td>{html.escape(it.group)}</td><td>{name}</td>"
                   f"<td>{html.escape(it.base_text) or '&mdash;'}</td>"
                   f"<td>{html.escape(it.new_text) or '&mdash;'}</td></tr>")
    out.append("</table>")
    return out


def write_report(directory: Path, cmp: Comparison, base: ResultSet, new: ResultSet, *,
                 gate_failures: Sequence[str] = (), gate_specs: Sequence[str] = (),
                 baseline: Optional[tuple] = None, title: str = "migstall: stock vs patched") -> Path:
    """Write ``directory/index.html``; ``baseline`` is (Comparison, base, new) of the gate."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"--report {directory}: cannot create it ({exc.strerror}); "
                        "choose a writable directory") from exc
    body = [f"<h1>{html.escape(title)}</h1>"]
    body += _headline(cmp)
    if gate_specs:
        if gate_failures:
            body.append("<p class='gate-fail'>Gate FAILED:</p><ul>")
            body += [f"<li>{html.escape(f)}</li>" for f in gate_failures]
            body.append("</ul>")
        else:
            body.append(f"<p class='gate-pass'>Gate passed: {html.escape(', '.join(gate_specs))}</p>")
    body += _provenance(cmp, base, new)
    body += _section("BASE vs NEW", cmp, base, new, plots_on=True)
    if baseline is not None:
        bcmp, bbase, bnew = baseline
        body += _section("Stored baseline vs NEW (gate)", bcmp, bbase, bnew, plots_on=False)
    body.append(
        "<h2>Method</h2><p>Per scenario (all key columns equal; failed runs counted, never used) and "
        f"metric: n, median and IQR; change of medians; bootstrap 95% CI of the ratio of medians "
        f"({BOOTSTRAP_RESAMPLES} resamples, seed {BOOTSTRAP_SEED}); two-sided Mann-Whitney U p-value. "
        f"Verdict (lower is better): a change counts only when the ranges [min, max] separate, "
        f"|change| &ge; {cmp.threshold_pct:g}% and each side has &ge; {MIN_N} values; otherwise "
        "<i>unchanged</i> (small change) or <i>noisy</i> (overlapping ranges).</p>")
    doc = ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
           f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>\n"
           + "\n".join(b for b in body if b) + "\n</body></html>\n")
    path = directory / "index.html"
    atomic_write_text(path, doc)
    log.info("report written to %s", path)
    return path
