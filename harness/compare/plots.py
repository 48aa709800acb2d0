"""Figures for the report (matplotlib, Agg backend, PNG bytes; nothing shown).

* :func:`metrics_figure`  per scenario: BASE vs NEW per metric, every value
  plus the median with its bootstrap 95% CI;
* :func:`timeline_figure` guest stalls around migration start, from the
  sidecars, on the migration's timeline (t = 0 at ``migrate``);
* :func:`fit_figure`      dirty-log start time vs memory (mapped at start when
  the rows have ``kvm_mapped_mib``, else guest size), a linear fit in ms/GiB
  per side and its extrapolation to 2 TiB with a 95% CI, next to the original
  report's figures (about 9 s stock, 0.5 s patched at 2 TiB, native);
  :func:`fits` the same fit for ``kvm_enable_ms``;
* :func:`headline_figure` the report's first figure: per scenario, the medians
  (bootstrap 95% CI) of ``dirty_log_start_ms`` and of the start window's ``pio``
  stall, BASE vs NEW, with the ratio of medians and its CI from the comparison;
* :func:`precopy_figure`  per scenario: the guest's stalled time per second of
  precopy, per loop class, next to the same rate in the baseline window.
"""

from __future__ import annotations

import io
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from harness.compare.load import Run
from harness.compare.stats import Comparison, MetricComparison, Sample, ScenarioComparison, bootstrap_median_ci

log = logging.getLogger(__name__)

BASE_COLOR, NEW_COLOR = "#4c72b0", "#dd8452"
CLASS_COLOR = {"pio": "#c44e52", "write": "#4c72b0", "cpu": "#55a868"}
#: the original report (Message-ID 1547733331-16140-1-...): 2 TiB guest
REFERENCE_GIB = 2048.0
REFERENCE_MS = {"stock": 9000.0, "patched": 500.0}
#: preferred metric order in the per-scenario figure
PLOT_METRICS = ("dirty_log_start_ms", "kvm_enable_ms", "kvm_ioctl_ms", "setup_time_ms", "first_pass_ms",
                "stall_pio_max_us", "stall_write_max_us", "stall_cpu_max_us", "baseline_stall_max_us",
                # where the start's cost went (a lazy write protect moves it to the first writes)
                "stall_write_sum_ms", "kvm_pf",
                "dirty_log_stop_ms", "kvm_disable_ms", "downtime_ms", "total_time_ms")
#: per loop class: (stalled ms per s of precopy, the same rate in the baseline window); these
#: have their own figure (:func:`precopy_figure`), not a panel of :func:`metrics_figure`
PRECOPY_PAIRS = tuple((f"stall_{c}_precopy_ms_per_s", f"baseline_stall_{c}_ms_per_s") for c in CLASS_COLOR)
PRECOPY_METRICS = tuple(m for pair in PRECOPY_PAIRS for m in pair)
#: the headline figure: (metric, panel title, divisor to its unit)
HEADLINE_START = ("dirty_log_start_ms", "dirty-log start (ms)", 1.0)
HEADLINE_PIO = ("stall_pio_max_us", "pio stall in the start window (ms)", 1000.0)


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


# --- per scenario: BASE vs NEW -------------------------------------------------------------

def metrics_figure(sc: ScenarioComparison, max_metrics: int = 8) -> Optional[bytes]:
    mets = {m.metric: m for m in sc.metrics if (m.base.n or m.new.n) and m.metric not in PRECOPY_METRICS}
    order = [m for m in PLOT_METRICS if m in mets] + [m for m in mets if m not in PLOT_METRICS]
    order = order[:max_metrics]
    if not order:
        return None
    cols = min(4, len(order))
    rows = math.ceil(len(order) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.8 * rows), squeeze=False)
    for ax in axes.flat[len(order):]:
        ax.set_visible(False)
    for ax, name in zip(axes.flat, order):
        _sample_panel(ax, mets[name])
    fig.suptitle(f"{sc.label}: median and bootstrap 95% CI (diamond), all runs (dots)", fontsize=10)
    fig.tight_layout()
    return _png(fig)


def _median_ci(sample: Sample) -> Tuple[float, float, float]:
    """(median, CI low, CI high) of a sample with values: the comparison's median and the
    bootstrap CI of :func:`~harness.compare.stats.bootstrap_median_ci`."""
    lo, hi = bootstrap_median_ci(sample.values)
    med = sample.median
    assert med is not None and lo is not None and hi is not None   # the sample has values
    return med, lo, hi


def _sample_panel(ax: Any, m: MetricComparison) -> None:
    """One metric, BASE vs NEW: every value (dots) and the median with its CI (diamond)."""
    for x, sample, color in ((0, m.base, BASE_COLOR), (1, m.new, NEW_COLOR)):
        if not sample.n:
            continue
        jitter = np.linspace(-0.12, 0.12, sample.n) if sample.n > 1 else np.zeros(1)
        ax.scatter(x + jitter, sample.values, s=14, color=color, alpha=0.6, zorder=2)
        med, lo, hi = _median_ci(sample)
        ax.errorbar([x + 0.3], [med], yerr=[[med - lo], [hi - med]], fmt="D", color="black",
                    capsize=4, markersize=5, zorder=3)
    ax.set_xticks([0, 1], ["base", "new"])
    ax.set_xlim(-0.5, 1.6)
    ax.set_ylim(bottom=0)
    ax.set_title(f"{m.metric}\n{m.verdict}", fontsize=9)
    ax.tick_params(labelsize=8)


def precopy_figure(sc: ScenarioComparison) -> Optional[bytes]:
    """Per loop class with data: stalled ms per s of precopy and the same rate in the baseline
    window (the noise floor), BASE vs NEW, one row per class with a shared y axis."""
    mets = {m.metric: m for m in sc.metrics if m.base.n or m.new.n}
    rows = [pair for pair in PRECOPY_PAIRS if any(p in mets for p in pair)]
    if not rows:
        return None
    fig, axes = plt.subplots(len(rows), 2, figsize=(8.0, 2.8 * len(rows)), squeeze=False)
    for r, pair in enumerate(rows):
        for c, name in enumerate(pair):
            ax = axes[r, c]
            if name in mets:
                _sample_panel(ax, mets[name])
            else:
                ax.set_title(f"{name}\nnot measured", fontsize=9)
                ax.set_xticks([])
                ax.tick_params(labelsize=8)
        top = max(ax.get_ylim()[1] for ax in axes[r]) * 1.08   # one scale per class: precopy vs baseline
        for ax in axes[r]:
            ax.set_ylim(0, top)
    fig.suptitle(f"{sc.label}:\nguest stalled ms per s, precopy vs baseline window", fontsize=10)
    fig.tight_layout()
    return _png(fig)


# --- guest-stall timeline --------------------------------------------------------------------

@dataclass(frozen=True)
class Timeline:
    """Stalls and events of one run, in ms relative to ``migrate`` being sent."""

    stalls: Tuple[Tuple[float, float, str, int], ...]   # (t_ms, dur_ms, cls, vcpu)
    events: Tuple[Tuple[float, str], ...] = ()            # (t_ms, name)


def _num(d: Dict[str, Any], *names: str) -> Optional[float]:
    for n in names:
        v = d.get(n)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            return float(v)
    return None


#: events that may come long after the start of migration; they do not stretch the window
_LATE_EVENTS = ("completed", "cancelled")
_RUNNER_EVENTS = (("pass1", "MIGRATION_PASS 1"), ("window_end", "stall window end"),
                  ("cancel_sent", "migrate_cancel"), ("cancelled", "cancelled"), ("completed", "completed"))


def timeline_from_sidecar(data: Dict[str, Any]) -> Optional[Timeline]:
    """Normalise a sidecar into a :class:`Timeline` (t = 0: ``migrate`` sent).

    Layouts understood:

    1. the runner's (:mod:`harness.runner`): ``timeline_ns`` (host wall-clock ns of
       ``migrate_sent``, ``pass1``, ...), ``stalls`` = per vCPU ``{"cpu", "cls",
       "stalls": [{"host_ns", "guest_ns", "dur_us"}]}`` (guest times already placed
       on the host clock through the marks), ``dirty_log_start`` = ``{"start_ns",
       "end_ns", ...}``;
    2. a normalised ``timeline``: ``{"stalls": [{"t_ms", "dur_ms"|"dur_us", "cls",
       "vcpu"}], "events": [{"t_ms", "name"}]}``.
    """
    tns = data.get("timeline_ns")
    t0 = _num(tns, "migrate_sent") if isinstance(tns, dict) else None
    if isinstance(tns, dict) and t0 is not None and isinstance(data.get("stalls"), list):
        stalls = []
        for vc in data["stalls"]:
            if not isinstance(vc, dict) or not isinstance(vc.get("stalls"), list):
                continue
            for st in vc["stalls"]:
                h, dur = (_num(st, "host_ns"), _num(st, "dur_us")) if isinstance(st, dict) else (None, None)
                if h is not None and dur is not None:
                    stalls.append(((h - t0) / 1e6, dur / 1000.0, str(vc.get("cls", "?")), int(vc.get("cpu") or 0)))
        events = [(0.0, "migrate")]
        for key, name in _RUNNER_EVENTS:
            t = _num(tns, key)
            if t is not None:
                events.append(((t - t0) / 1e6, name))
        dls = data.get("dirty_log_start")
        dls_end = _num(dls, "end_ns") if isinstance(dls, dict) else None
        if dls_end is not None:
            events.append(((dls_end - t0) / 1e6, "dirty-log started"))
        return Timeline(tuple(stalls), tuple(events))
    tl = data.get("timeline")
    if isinstance(tl, dict) and isinstance(tl.get("stalls"), list):
        stalls = []
        for s in tl["stalls"]:
            if not isinstance(s, dict):
                continue
            t = _num(s, "t_ms")
            dur = _num(s, "dur_ms")
            dur_us = _num(s, "dur_us")
            if dur is None and dur_us is not None:
                dur = dur_us / 1000.0
            if t is None or dur is None:
                continue
            stalls.append((t, dur, str(s.get("cls", "?")), int(s.get("vcpu", s.get("cpu", 0)) or 0)))
        tl_events = tuple((float(e["t_ms"]), str(e.get("name", "?"))) for e in tl.get("events", [])
                          if isinstance(e, dict) and _num(e, "t_ms") is not None)
        return Timeline(tuple(stalls), tl_events)
    return None


def load_timeline(run: Run) -> Optional[Timeline]:
    path = run.sidecar_file()
    if path is None:
        return None
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        log.warning("sidecar %s unreadable: %s", path, exc)
        return None
    return timeline_from_sidecar(data) if isinstance(data, dict) else None


def timeline_figure(sc: ScenarioComparison, max_span_ms: float = 20000.0) -> Optional[bytes]:
    """Two panels (BASE, NEW): one line per run and vCPU, every stall a bar at its start on
    the migration's timeline, events as dotted lines.  The window is 0 .. the latest stall
    end or event after ``migrate`` (capped at ``max_span_ms``), with a quarter before 0."""
    sides = []
    for label, runs in (("base", sc.base_runs), ("new", sc.new_runs)):
        loaded = [(r, load_timeline(r)) for r in runs if r.ok]
        sides.append((label, [(r, t) for r, t in loaded if t is not None]))
    if not any(tls for _, tls in sides):
        return None
    # the window: from before `migrate` to a little after the stall window ends
    focus = [e[0] for _, tls in sides for _, t in tls for e in t.events
             if e[1] not in _LATE_EVENTS and 0 <= e[0] <= max_span_ms]
    if not focus:
        focus = [s[0] + s[1] for _, tls in sides for _, t in tls for s in t.stalls if 0 <= s[0] <= max_span_ms]
    span = max(focus + [10.0]) * 1.3
    lo, hi = -0.3 * span, span
    fig, axes = plt.subplots(2, 1, figsize=(10, 5.2), sharex=True, squeeze=False)
    for ax, (label, tls) in zip(axes[:, 0], sides):
        yticks, ylabels = [], []
        y = 0
        seen_events: Dict[str, List[float]] = {}
        for run, tl in tls:
            vcpus = sorted({s[3] for s in tl.stalls}) or [0]
            for v in vcpus:
                bars = [(s[0], max(s[1], (hi - lo) / 2000)) for s in tl.stalls if s[3] == v]
                colors = [CLASS_COLOR.get(s[2], "#8172b2") for s in tl.stalls if s[3] == v]
                if bars:
                    ax.broken_barh(bars, (y - 0.35, 0.7), facecolors=colors)
                yticks.append(y)
                ylabels.append(f"r{run.get('repeat') or '?'} vcpu{v}")
                y += 1
            for t, name in tl.events:
                if lo <= t <= hi:
                    seen_events.setdefault(name, []).append(t)
        for i, (name, ts) in enumerate(sorted(seen_events.items(), key=lambda kv: np.median(kv[1]))):
            t = float(np.median(ts))       # median over the runs
            ax.axvline(t, color="grey", linestyle=":", linewidth=1)
            ax.text(t, (y - 0.4) * (1.0 if i % 2 == 0 else 0.5), f" {name}", rotation=90, fontsize=7,
                    va="top", color="dimgrey")
        ax.axvline(0, color="black", linewidth=1)
        ax.set_yticks(yticks, ylabels, fontsize=7)
        ax.set_ylim(-1, max(y, 1))
        ax.set_ylabel(f"{label}\n({len(tls)} runs)", fontsize=8)
        if not tls:
            ax.text(0.5, 0.5, "no sidecar with stalls", transform=ax.transAxes, ha="center")
    axes[-1, 0].set_xlim(lo, hi)
    axes[-1, 0].set_xlabel("ms since 'migrate' was sent (host clock)")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in CLASS_COLOR.values()]
    axes[0, 0].legend(handles, list(CLASS_COLOR), fontsize=7, loc="upper right", title="stall class",
                      title_fontsize=7)
    fig.suptitle(f"{sc.label}: guest stalls around migration start", fontsize=10)
    fig.tight_layout()
    return _png(fig)


# --- dirty-log start vs guest memory ----------------------------------------------------------

#: the metrics fitted against memory: the start as QEMU sees it (the original report's 9 s and
#: 0.5 s are this), and KVM's own share of it
FIT_METRICS = ("dirty_log_start_ms", "kvm_enable_ms")
#: x of a fit: the memory KVM had mapped at start when every point has it (``kvm_mapped_mib``,
#: from ``query-stats``; what the write protect walks), else the guest's size
FIT_BASIS_MAPPED, FIT_BASIS_GUEST = "mapped GiB", "guest GiB"


@dataclass(frozen=True)
class Fit:
    side: str
    n: int
    slope_ms_per_gib: float
    slope_ci: Tuple[float, float]
    intercept_ms: float
    at_2tib_ms: float
    at_2tib_ci: Tuple[float, float]
    gib_range: Tuple[float, float]
    points: Tuple[Tuple[float, float], ...] = field(default=(), repr=False)
    metric: str = "dirty_log_start_ms"
    basis: str = FIT_BASIS_GUEST


def linear_fit(points: Sequence[Tuple[float, float]], side: str, x0: float = REFERENCE_GIB, *,
               metric: str = "dirty_log_start_ms", basis: str = FIT_BASIS_GUEST) -> Optional[Fit]:
    """OLS y = a + b x; 95% CIs from Student's t (slope, and the mean prediction at x0)."""
    if len(points) < 3 or len({p[0] for p in points}) < 2:
        return None
    from scipy.stats import t as student_t

    x = np.array([p[0] for p in points])
    y = np.array([p[1] for p in points])
    n = x.size
    xbar = x.mean()
    sxx = float(((x - xbar) ** 2).sum())
    b = float(((x - xbar) * (y - y.mean())).sum() / sxx)
    a = float(y.mean() - b * xbar)
    resid = y - (a + b * x)
    s = math.sqrt(float((resid ** 2).sum()) / (n - 2)) if n > 2 else 0.0
    tq = float(student_t.ppf(0.975, n - 2))
    se_b = s / math.sqrt(sxx)
    pred = a + b * x0
    se_pred = s * math.sqrt(1.0 / n + (x0 - xbar) ** 2 / sxx)
    return Fit(side, n, b, (b - tq * se_b, b + tq * se_b), a, pred,
               (pred - tq * se_pred, pred + tq * se_pred), (float(x.min()), float(x.max())),
               tuple(points), metric, basis)


def fit_points_frame(rows: Any, metric: str = "dirty_log_start_ms",
                     basis: str = FIT_BASIS_GUEST) -> List[Tuple[float, float]]:
    """(GiB, ``metric``) of a results frame's ok rows that have both, sorted; GiB of
    ``kvm_mapped_mib`` for :data:`FIT_BASIS_MAPPED`, else of ``guest_mem_mib``."""
    if rows is None or not len(rows):
        return []
    ok = rows[rows["status"] == "ok"]
    import pandas as pd

    column = "kvm_mapped_mib" if basis == FIT_BASIS_MAPPED else "guest_mem_mib"
    if column not in ok or metric not in ok:
        return []
    mib = pd.to_numeric(ok[column].astype(object), errors="coerce").to_numpy(dtype=float)
    y = ok[metric].to_numpy(dtype=float)
    keep = np.isfinite(mib) & np.isfinite(y) & (mib > 0)
    return sorted(zip((mib[keep] / 1024.0).tolist(), y[keep].tolist()))


def fit_basis(frames: Sequence[Any], metric: str) -> str:
    """:data:`FIT_BASIS_MAPPED` when every ok row with ``metric`` also has ``kvm_mapped_mib``
    (QEMU >= 7.1 with KVM's binary stats), else :data:`FIT_BASIS_GUEST`.  One basis per
    fit: mixing mapped and guest sizes in one line would bend it."""
    guest = sum(len(fit_points_frame(f, metric, FIT_BASIS_GUEST)) for f in frames)
    mapped = sum(len(fit_points_frame(f, metric, FIT_BASIS_MAPPED)) for f in frames)
    return FIT_BASIS_MAPPED if guest and mapped == guest else FIT_BASIS_GUEST


def _sides(cmp: Comparison) -> Tuple[Tuple[str, List[Any]], Tuple[str, List[Any]]]:
    """(``base``, its rows per compared scenario), (``new``, the same)."""
    return (("base", [sc.base_rows for sc in cmp.scenarios]), ("new", [sc.new_rows for sc in cmp.scenarios]))


def _side_points(cmp: Comparison, metric: str) -> Tuple[str, List[Tuple[str, List[Tuple[float, float]]]]]:
    """The basis (mapped or guest GiB), chosen once for both sides so their slopes compare,
    and per side (``base``, ``new``) the (GiB, ``metric``) points of the compared scenarios' runs."""
    sides = _sides(cmp)
    basis = fit_basis([f for _, frames in sides for f in frames], metric)
    return basis, [(name, sorted(p for rows in frames for p in fit_points_frame(rows, metric, basis)))
                   for name, frames in sides]


def fits(cmp: Comparison, metric: str = "dirty_log_start_ms") -> List[Fit]:
    """Per side, ``metric`` against memory (:func:`linear_fit`; sides without enough runs left out)."""
    basis, data = _side_points(cmp, metric)
    found = (linear_fit(pts, name, metric=metric, basis=basis) for name, pts in data)
    return [f for f in found if f is not None]


def fit_figure(cmp: Comparison) -> Tuple[Optional[bytes], List[Fit]]:
    """Log-log plot of ``dirty_log_start_ms``: measured points, the fits, their 2 TiB
    extrapolation with CI, and the original report's reference figures.  Uses the runs of the
    compared scenarios.  Returns the PNG and the fits of every :data:`FIT_METRICS` metric."""
    all_fits = [f for m in FIT_METRICS for f in fits(cmp, m)]
    start_fits = {f.side: f for f in all_fits if f.metric == "dirty_log_start_ms"}
    colors = {"base": BASE_COLOR, "new": NEW_COLOR}
    basis, data = _side_points(cmp, "dirty_log_start_ms")
    if not any(pts for _, pts in data):
        return None, all_fits
    fig, ax = plt.subplots(figsize=(8, 5))
    for name, pts in data:
        if not pts:
            continue
        color = colors[name]
        ax.scatter([p[0] for p in pts], [max(p[1], 1e-3) for p in pts], s=16, color=color, alpha=0.7,
                   label=f"{name}: measured ({len(pts)} runs)", zorder=3)
        fit = start_fits.get(name)
        if fit is None:
            continue
        xs = np.geomspace(min(fit.gib_range[0], 0.25), REFERENCE_GIB, 200)
        ax.plot(xs, np.clip(fit.intercept_ms + fit.slope_ms_per_gib * xs, 1e-3, None), color=color,
                label=f"{name}: fit {fit.slope_ms_per_gib:.2f} ms/GiB -> {fit.at_2tib_ms / 1000:.2f} s at 2 TiB")
        lo, hi = fit.at_2tib_ci
        ax.errorbar([REFERENCE_GIB], [max(fit.at_2tib_ms, 1e-3)],
                    yerr=[[max(fit.at_2tib_ms, 1e-3) - max(lo, 1e-3)], [max(hi, 1e-3) - max(fit.at_2tib_ms, 1e-3)]],
                    fmt="o", color=color, markerfacecolor="white", capsize=5, zorder=4)
    for label, ms, marker in (("stock", REFERENCE_MS["stock"], "*"), ("patched", REFERENCE_MS["patched"], "P")):
        ax.scatter([REFERENCE_GIB * 1.08], [ms], marker=marker, s=140, color="black", zorder=5,
                   label=f"original report, {label}: ~{ms / 1000:g} s at 2 TiB (native 5.0)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(f"memory ({basis})")
    ax.set_ylabel("dirty-log start (ms)")
    ax.set_title(f"dirty_log_start_ms vs {basis}; linear fit, extrapolated to 2 TiB (95% CI)", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    return _png(fig), all_fits


# --- the headline: dirty-log start and the start's pio stall, per scenario --------------------

def _has_values(m: Optional[MetricComparison]) -> bool:
    return m is not None and bool(m.base.n or m.new.n)


def headline_notes(cmp: Comparison) -> List[str]:
    """What the headline figure leaves out, one sentence each (scenarios without pio stalls)."""
    start, pio = HEADLINE_START[0], HEADLINE_PIO[0]
    notes = []
    lacking = []
    for sc in cmp.scenarios:
        mets = {m.metric: m for m in sc.metrics}
        m = mets.get(pio)
        if not _has_values(m):
            lacking.append(sc.label)
        elif m is not None and (not m.base.n or not m.new.n):
            side = "base" if not m.base.n else "new"
            notes.append(f"{sc.label}: no {pio} on the {side} side; its pio stall is shown for the other side only.")
    if lacking and len(lacking) == len(cmp.scenarios):
        notes.insert(0, f"No scenario has {pio} data (no vCPU ran the pio loop, or it was not compared): "
                        "the headline shows dirty-log start only.")
    elif lacking:
        notes.insert(0, f"No {pio} data for {', '.join(lacking)}: dirty-log start only for "
                        f"{'it' if len(lacking) == 1 else 'them'}.")
    if not any(_has_values({m.metric: m for m in sc.metrics}.get(start)) for sc in cmp.scenarios):
        notes.insert(0, f"No scenario has {start} data on either side.")
    return notes


def _variants(labels: Sequence[str], limit: int = 70) -> str:
    text = " + ".join(dict.fromkeys(labels))
    return text if len(text) <= limit else text[:limit - 3] + "..."


def headline_figure(cmp: Comparison) -> Optional[bytes]:
    """One horizontal bar pair (BASE, NEW) per scenario and panel: the median with its bootstrap
    95% CI (whiskers), and the comparison's ratio of medians NEW/BASE with its 95% CI as text.
    Panels: ``dirty_log_start_ms``; ``stall_pio_max_us`` in ms, left out when no scenario has
    it (a scenario without it says "no pio data" in its row; see :func:`headline_notes`)."""
    from harness.compare.table import fmt_ci

    scs = cmp.scenarios
    per_sc = [{m.metric: m for m in sc.metrics} for sc in scs]
    panels = [p for p in (HEADLINE_START, HEADLINE_PIO) if any(_has_values(ms.get(p[0])) for ms in per_sc)]
    if not scs or not panels:
        return None
    off, height = 0.19, 0.36
    fig, axes = plt.subplots(1, len(panels), figsize=(3.0 + 5.0 * len(panels), 1.4 + 0.8 * len(scs)),
                             sharey=True, squeeze=False)
    for ax, (metric, title, div) in zip(axes[0], panels):
        his = [0.0]
        texts: List[Tuple[int, str]] = []
        for i, mets in enumerate(per_sc):
            m = mets.get(metric)
            if m is None or not _has_values(m):
                ax.text(0, i, " no pio data" if metric == HEADLINE_PIO[0] else " no data", va="center",
                        fontsize=8, color="dimgrey")
                continue
            for dy, sample, color in ((-off, m.base, BASE_COLOR), (off, m.new, NEW_COLOR)):
                if not sample.n:
                    ax.text(0, i + dy, " no data", va="center", fontsize=7, color="dimgrey")
                    continue
                med, lo, hi = (v / div for v in _median_ci(sample))
                ax.barh([i + dy], [med], height=height, color=color, alpha=0.85, zorder=2)
                ax.errorbar([med], [i + dy], xerr=[[med - lo], [hi - med]], fmt="none", ecolor="black",
                            capsize=3, linewidth=1, zorder=3)
                his.append(hi)
            if m.ratio is not None:
                texts.append((i, f"new/base {m.ratio:.3g}\n(CI {fmt_ci(m.ci_low, m.ci_high)})\n{m.verdict}"))
        right = max(his) * 1.5 or 1.0
        for i, text in texts:
            ax.text(max(his) * 1.03, i, text, va="center", fontsize=7)
        ax.set_xlim(0, right)
        ax.set_title(title, fontsize=10)
        ax.grid(True, axis="x", alpha=0.3)
        ax.tick_params(labelsize=8)
    axes[0, 0].set_yticks(range(len(scs)), [sc.label for sc in scs], fontsize=8)
    axes[0, 0].set_ylim(len(scs) - 0.5, -0.5)          # first scenario on top
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in (BASE_COLOR, NEW_COLOR)]
    fig.legend(handles, [f"base: {_variants([sc.base_variant for sc in scs])}",
                         f"new: {_variants([sc.new_variant for sc in scs])}"],
               fontsize=8, loc="lower center", ncol=2, frameon=False)
    fig.suptitle("Median per scenario (bar), bootstrap 95% CI (whiskers);\n"
                 "new/base: ratio of medians, its 95% CI and the verdict", fontsize=10)
    fig.tight_layout(rect=(0, 0.06 if len(scs) > 2 else 0.1, 1, 1))
    return _png(fig)
