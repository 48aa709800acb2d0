"""What a demo's rows show, in plain words: a pure function from rows to lines.

``migstall demo`` prints these lines after its tables.  Per group of ``ok`` rows
(accelerator, host, dirty-log mode; medians when there are repeats):

* KVM: the dirty-log start, the longest stall of the vCPU whose loop waits on
  QEMU's BQL (``pio``; else the ``write`` loop, whose stores fault once dirty
  logging write-protects memory) against the longest stall of the baseline
  window, and the time KVM spent in its MMU walk (``kvm_enable_ms``); then
  whether that stall stands out from the baseline and is at least as long as the dirty-log start;
* TCG: that these rows test the plumbing only: under TCG every vCPU is a host
  thread, so the stall columns are host scheduling noise, not KVM's behaviour.

Failed rows are counted (their errors are printed with the table).
"""

from __future__ import annotations

import logging
import statistics
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from harness import results
from harness.runtable import fmt_ms, number

log = logging.getLogger(__name__)

#: a stall counts as standing out when it is at least this many times the baseline's longest
STANDS_OUT = 3.0

_MODE = {"legacy": "legacy dirty log", "default": "default dirty log", "ring": "dirty ring"}


@dataclass(frozen=True)
class Group:
    accel: str
    host: str
    mode: str
    rows: Tuple[Mapping[str, Any], ...]

    def median(self, column: str, scale: float = 1.0) -> Optional[float]:
        vals = [v * scale for v in (number(r.get(column)) for r in self.rows) if v is not None]
        return statistics.median(vals) if vals else None

    @property
    def where(self) -> str:
        return where(self.host)


def where(host: str) -> str:
    """``virtual:debian`` -> ``virtual host``; ``local`` -> ``this machine``; else the host."""
    host = host or "local"
    if host == "local":
        return "this machine"
    if host.startswith("virtual"):
        return "virtual host"
    return host


def _text(row: Mapping[str, Any], column: str) -> str:
    return results._fmt(row.get(column))


def _groups(rows: Sequence[Mapping[str, Any]]) -> List[Group]:
    out: Dict[Tuple[str, str, str], List[Mapping[str, Any]]] = {}
    for r in rows:
        if r.get("status") != results.STATUS_OK:
            continue
        key = (_text(r, "accel"), _text(r, "host"), _text(r, "dirty_log_mode"))
        out.setdefault(key, []).append(r)
    return [Group(a, h, m, tuple(rs)) for (a, h, m), rs in out.items()]


def _runs(g: Group) -> str:
    return "" if len(g.rows) == 1 else f", medians of {len(g.rows)} runs"


def _kvm_lines(g: Group) -> List[str]:
    mode = _MODE.get(g.mode, f"{g.mode} dirty log" if g.mode else "dirty log")
    dls = g.median("dirty_log_start_ms")
    base = g.median("baseline_stall_max_us", 1e-3)
    pio, write = g.median("stall_pio_max_us", 1e-3), g.median("stall_write_max_us", 1e-3)
    kvm = g.median("kvm_enable_ms")
    parts = [f"dirty-log start {fmt_ms(dls)} ms" if dls is not None else "dirty-log start not measured"]
    stall, who = (pio, "the vCPU waiting on the BQL") if pio is not None else (write, "the writing vCPU")
    if stall is not None:
        against = f", against {fmt_ms(base)} ms in the baseline" if base is not None else ""
        parts.append(f"{who} stalled {fmt_ms(stall)} ms{against}")
    if pio is not None and write is not None:
        parts.append(f"the writing vCPU stalled {fmt_ms(write)} ms")
    if kvm is not None:
        doing = "write-protecting" if g.mode == "legacy" else "in its MMU walk"
        parts.append(f"KVM spent {fmt_ms(kvm)} ms {doing}" if kvm else
                     "KVM walked nothing at enable (dirty bits initially set)")
    lines = [f"KVM ({g.where}, {mode}{_runs(g)}): " + "; ".join(parts) + "."]
    if stall is not None and base is not None and dls is not None:
        if stall > 0 and stall >= STANDS_OUT * base:
            times = (f"{stall / base:.0f}x the baseline's longest" if base > 0 else
                     "where the baseline had no stall above the threshold")
            if pio is not None and stall >= dls:
                lines.append(f"  That stall is {times} and at least as long as the dirty-log start: consistent "
                             "with the vCPU waiting for the BQL, which QEMU holds while it starts dirty logging.")
            elif pio is not None:
                lines.append(f"  That stall is {times}, but shorter than the dirty-log start.")
            else:
                lines.append(f"  That stall is {times}.")
        else:
            lines.append(f"  That stall is within {STANDS_OUT:g}x of the baseline's longest: "
                         "no stall stands out from the host's noise in this run.")
    lines += _verify_lines(g)
    return lines


def _verify_lines(g: Group) -> List[str]:
    """One line when the group's runs compared migrated memory (``ok`` rows: all equal)."""
    cells = [number(r.get("verify_pages")) for r in g.rows]
    pages = [p for p in cells if p is not None]
    if not pages or len(pages) < len(cells):
        return []
    each = f"{int(pages[0])} pages" if len(set(pages)) == 1 else "all pages"
    runs = "the run" if len(pages) == 1 else f"each of the {len(pages)} runs"
    return [f"  Migrated memory verified: {each} equal on source and destination in {runs}."]


def _tcg_lines(g: Group) -> List[str]:
    dls = g.median("dirty_log_start_ms")
    base = max((v for v in (number(r.get("baseline_stall_max_us")) for r in g.rows) if v is not None),
               default=None)
    noise = f" (the baseline alone has stalls up to {fmt_ms(base / 1000)} ms)" if base is not None else ""
    n = len(g.rows)
    start = f"{'median ' if n > 1 else ''}dirty-log start {fmt_ms(dls)} ms; " if dls is not None else ""
    return [f"TCG ({g.where}, {n} run{'s' if n != 1 else ''}): {start}these rows test the plumbing "
            f"only: under TCG every vCPU is a host thread, so the stall columns are host scheduling "
            f"noise{noise}, not KVM's behaviour."]


def finding_lines(rows: Sequence[Mapping[str, Any]]) -> List[str]:
    """Plain-words lines about ``rows`` (the runner's rows or CSV rows); KVM groups first."""
    lines: List[str] = []
    groups = _groups(rows)
    for g in sorted(groups, key=lambda g: (g.accel != "kvm", g.host, g.mode)):
        lines += _kvm_lines(g) if g.accel == "kvm" else _tcg_lines(g)
    failed = sum(1 for r in rows if r.get("status") != results.STATUS_OK)
    if failed:
        lines.append(f"{failed} run{'s' if failed != 1 else ''} failed (errors above).")
    if not groups:
        lines.append("No run succeeded: nothing to conclude.")
    return lines
