"""Probe stall records -> the stall columns.

A *stall* is one gap >= ``threshold_us`` between two iterations of a measure
loop, recorded by the probe as (guest start time, duration).  Guest times are
placed on the host's wall clock with a :class:`~harness.measure.clock.ClockMap`.

* The *window* of a run is [QMP ``migrate`` sent, ``MIGRATION_PASS`` 1 +
  ``margin_ms``].  A stall counts when it overlaps the window.
* Per loop class (``pio``, ``write``, ``cpu``), over every vCPU running it:
  ``max_us`` (longest stall), ``p99_us`` (99th percentile, nearest rank, of the
  durations of the counted stalls), ``count`` (number of counted stalls).  A
  class that ran but had no gap >= threshold in the window gets 0/0/0; a class
  no vCPU ran gets empty cells.
* ``baseline_stall_max_us``: longest stall, any class, overlapping the baseline
  window (the ``baseline_s`` before migration, while nothing happens), so that
  host noise is visible next to the migration figures.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

from harness.measure.clock import ClockMap

CLASSES = ("pio", "write", "cpu")


@dataclass(frozen=True)
class ClassStats:
    max_us: Optional[float]
    p99_us: Optional[float]
    count: Optional[int]


def _a(rec: Any, name: str) -> Any:
    return rec[name] if isinstance(rec, dict) else getattr(rec, name)


def p99(values: Sequence[float]) -> float:
    if not values:
        return 0.0
    s = sorted(values)
    return s[max(0, math.ceil(0.99 * len(s)) - 1)]


def in_window(records: Sequence[Any], clock: ClockMap, w0_ns: int, w1_ns: int) -> List[Tuple[int, str, int, int]]:
    """(cpu, class, host_start_ns, dur_ns) of every stall overlapping [w0, w1]."""
    out = []
    for rec in records:
        for t_ns, dur_ns in _a(rec, "stalls"):
            h = clock.to_host(int(t_ns))
            if h < w1_ns and h + int(dur_ns) > w0_ns:
                out.append((int(_a(rec, "cpu")), str(_a(rec, "cls")), h, int(dur_ns)))
    return out


def class_stats(records: Sequence[Any], clock: ClockMap, w0_ns: int, w1_ns: int) -> Dict[str, ClassStats]:
    present = {str(_a(r, "cls")) for r in records}
    hits = in_window(records, clock, w0_ns, w1_ns)
    out = {}
    for cls in CLASSES:
        if cls not in present:
            out[cls] = ClassStats(None, None, None)
            continue
        durs = [d / 1000 for _, c, _, d in hits if c == cls]
        out[cls] = ClassStats(max(durs) if durs else 0.0, p99(durs), len(durs))
    return out


def max_in(records: Sequence[Any], clock: ClockMap, w0_ns: int, w1_ns: int) -> float:
    durs = [d for _, _, _, d in in_window(records, clock, w0_ns, w1_ns)]
    return max(durs) / 1000 if durs else 0.0


def sum_in(records: Sequence[Any], clock: ClockMap, w0_ns: int, w1_ns: int, cls: str) -> Optional[float]:
    """ms the loops of class ``cls`` spent stalled inside [w0, w1] (each stall
    clipped to the window); None when no loop of that class ran."""
    if not any(str(_a(r, "cls")) == cls for r in records):
        return None
    total = sum(min(h + d, w1_ns) - max(h, w0_ns) for _, c, h, d in in_window(records, clock, w0_ns, w1_ns)
                if c == cls)
    return total / 1e6


def columns(stats: Dict[str, ClassStats]) -> Dict[str, Any]:
    row: Dict[str, Any] = {}
    for cls, st in stats.items():
        row[f"stall_{cls}_max_us"] = st.max_us
        row[f"stall_{cls}_p99_us"] = st.p99_us
        row[f"stall_{cls}_count"] = st.count
    return row


def per_vcpu(records: Sequence[Any], clock: ClockMap, windows: Dict[str, Tuple[int, int]]) -> List[Dict[str, Any]]:
    """Sidecar detail: per vCPU, every stall on the host timeline and per-window maxima."""
    out = []
    for rec in records:
        stalls = [{"host_ns": clock.to_host(int(t)), "guest_ns": int(t), "dur_us": int(d) / 1000}
                  for t, d in _a(rec, "stalls")]
        item: Dict[str, Any] = {
            "cpu": _a(rec, "cpu"), "cls": _a(rec, "cls"), "threshold_us": _a(rec, "threshold_us"),
            "iters": _a(rec, "iters"), "dropped": _a(rec, "dropped"),
            "hist_log2us": list(_a(rec, "hist_log2us")), "stalls": stalls,
        }
        remaps = rec.get("remaps", 0) if isinstance(rec, dict) else getattr(rec, "remaps", 0)
        if remaps:      # an aliased write loop's window changes, left out of its gaps (probe protocol)
            item["remaps"] = remaps
            item["remap_ns"] = rec.get("remap_ns", 0) if isinstance(rec, dict) else getattr(rec, "remap_ns", 0)
        for wname, (w0, w1) in windows.items():
            durs = [s["dur_us"] for s in stalls if s["host_ns"] < w1 and s["host_ns"] + s["dur_us"] * 1000 > w0]
            item[f"{wname}_max_us"] = max(durs) if durs else 0.0
            item[f"{wname}_count"] = len(durs)
        out.append(item)
    return out
