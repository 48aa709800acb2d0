"""QEMU trace lines -> dirty_log_start_ms / dirty_log_stop_ms.

Input: the source QEMU's ``-D`` log with the ``log`` trace backend and
``-msg timestamp=on``; trace lines look like::

    12345@1795588999.697039:global_dirty_changed bitmask 0x1
    12345@1795588999.702311:kvm_set_user_memory AddrSpace#0 Slot#1 flags=0x1 gpa=0x0 ...

``sec.usec`` is QEMU's wall clock (gettimeofday), the same clock as QMP event
timestamps.

Every duration here is on that one clock: the anchors are QEMU's own QMP
event timestamps (``MIGRATION {status: setup}``, ``MIGRATION_PASS``,
``MIGRATION {status: cancelling|cancelled}``), never the time at which the
harness sent a command (on a remote or virtual host that is another machine's
clock).

Definitions (README "What it measures" repeats them; ``*_source`` names the
one used):

``dirty_log_start_ms``
  * ``trace:global_dirty_changed->kvm_set_user_memory`` (KVM): from the first
    ``global_dirty_changed`` at or after ``MIGRATION setup`` whose bitmask has
    the migration bit (0x1), i.e. the entry of
    ``memory_global_dirty_log_start()``, to the last ``kvm_set_user_memory``
    with ``flags & 0x1`` (``KVM_MEM_LOG_DIRTY_PAGES``) before the first
    ``migration_bitmap_sync_start`` that follows (each fires when one memslot
    ioctl has returned);
  * ``trace:global_dirty_changed->migration_bitmap_sync_start`` (TCG, which has
    no memslot ioctls): to the first ``migration_bitmap_sync_start`` after
    ``global_dirty_changed``; dirty-log start is over by then
    (``ram_init_bitmaps``);
  * ``qmp:MIGRATION(setup)->MIGRATION_PASS1``: only for a QEMU without the
    ``global_dirty_changed`` trace event (before 6.1): from the QMP timestamp of
    ``MIGRATION setup`` to that of ``MIGRATION_PASS`` 1, an upper bound that
    includes the rest of setup.

  With a QEMU that has the trace events there is no fallback: lines that exist
  but cannot be matched raise :class:`~harness.errors.MeasurementError`, which
  fails the row with the reason.

``dirty_log_stop_ms`` (cancel only)
  * ``trace:global_dirty_changed->kvm_set_user_memory``: from the first
    ``global_dirty_changed`` without the migration bit at or after ``MIGRATION
    cancelling`` (entry of ``memory_global_dirty_log_stop()``) to the last
    ``kvm_set_user_memory`` without ``flags & 0x1`` before ``MIGRATION cancelled``;
  * ``trace:global_dirty_changed->MIGRATION(cancelled)`` (TCG): to the QMP
    timestamp of ``MIGRATION {status: cancelled}``, emitted by
    ``migrate_fd_cleanup`` right after the cleanup that stops dirty logging;
  * ``qmp:MIGRATION(cancelling)->MIGRATION(cancelled)``: a QEMU without the event.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

from harness.errors import MeasurementError

_LINE = re.compile(r"^(\d+)@(\d+)\.(\d{1,9}):([A-Za-z0-9_]+)\s?(.*)$")
_FLAGS = re.compile(r"flags[=\s]+(0x[0-9a-fA-F]+|\d+)")
_BITMASK = re.compile(r"bitmask[=\s]+(0x[0-9a-fA-F]+|\d+)")

GLOBAL_DIRTY_MIGRATION = 0x1
KVM_MEM_LOG_DIRTY_PAGES = 0x1


@dataclass(frozen=True)
class TraceLine:
    tid: int
    t_ns: int
    event: str
    args: str
    raw: str

    def int_arg(self, pattern: "re.Pattern[str]") -> Optional[int]:
        m = pattern.search(self.args)
        return int(m.group(1), 0) if m else None


def parse(text: str, events: Optional[Sequence[str]] = None) -> List[TraceLine]:
    """Trace lines of ``text`` (other log lines are skipped), optionally only ``events``."""
    out = []
    for raw in text.splitlines():
        m = _LINE.match(raw)
        if not m:
            continue
        frac = m.group(3)
        ns = int(m.group(2)) * 1_000_000_000 + int(frac.ljust(9, "0"))
        ev = m.group(4)
        if events is None or ev in events:
            out.append(TraceLine(int(m.group(1)), ns, ev, m.group(5), raw))
    return out


@dataclass(frozen=True)
class Span:
    ms: float
    source: str
    start_ns: int
    end_ns: int
    lines: List[str] = field(default_factory=list)


def _span(start: int, end: int, source: str, lines: Sequence[TraceLine] = ()) -> Span:
    return Span(max(0.0, (end - start) / 1e6), source, start, end, [ln.raw for ln in lines])


def _migration_bit(line: TraceLine) -> bool:
    return bool((line.int_arg(_BITMASK) or 0) & GLOBAL_DIRTY_MIGRATION)


def _logging(line: TraceLine) -> bool:
    return bool((line.int_arg(_FLAGS) or 0) & KVM_MEM_LOG_DIRTY_PAGES)


def _at(ns: int) -> str:
    return f"{ns / 1e9:.6f}"


def dirty_log_start(lines: Sequence[TraceLine], *, setup_ns: int, pass1_ns: Optional[int],
                    traced: bool, memslots: bool) -> Span:
    """See the module docstring.  ``setup_ns``/``pass1_ns``: QMP timestamps of
    ``MIGRATION setup`` and ``MIGRATION_PASS`` 1.  ``traced``: QEMU has (and we
    enabled) ``global_dirty_changed``; ``memslots``: the accelerator has memslot
    ioctls (KVM) and ``kvm_set_user_memory`` is enabled, so they must be seen.
    Raises MeasurementError when the lines cannot be matched."""
    if not traced:
        if pass1_ns is None:
            raise MeasurementError("no MIGRATION_PASS 1 event: dirty-log start cannot be bounded")
        return _span(setup_ns, pass1_ns, "qmp:MIGRATION(setup)->MIGRATION_PASS1")
    starts = [ln for ln in lines if ln.event == "global_dirty_changed" and _migration_bit(ln)]
    t0 = next((ln for ln in starts if ln.t_ns >= setup_ns), None)
    if t0 is None:
        seen = f"; the log has {len(starts)} at {', '.join(_at(ln.t_ns) for ln in starts[:3])}" if starts else \
            "; the log has none"
        raise MeasurementError(f"no global_dirty_changed with the migration bit at or after MIGRATION setup "
                               f"({_at(setup_ns)}){seen}")
    if pass1_ns is not None and t0.t_ns > pass1_ns:
        raise MeasurementError(f"global_dirty_changed ({_at(t0.t_ns)}) comes after MIGRATION_PASS 1 "
                               f"({_at(pass1_ns)}): not this migration's dirty-log start")
    sync = next((ln for ln in lines if ln.event == "migration_bitmap_sync_start" and ln.t_ns >= t0.t_ns), None)
    limit = sync.t_ns if sync else pass1_ns
    slots = [ln for ln in lines if ln.event == "kvm_set_user_memory" and ln.t_ns >= t0.t_ns
             and (limit is None or ln.t_ns <= limit) and _logging(ln)]
    if slots:
        return _span(t0.t_ns, slots[-1].t_ns, "trace:global_dirty_changed->kvm_set_user_memory",
                     [t0, *slots] + ([sync] if sync else []))
    if memslots:
        raise MeasurementError(f"no kvm_set_user_memory with KVM_MEM_LOG_DIRTY_PAGES between global_dirty_changed "
                               f"({_at(t0.t_ns)}) and the first bitmap sync"
                               + (f" ({_at(sync.t_ns)})" if sync else " (none seen)"))
    if sync is None:
        raise MeasurementError(f"no migration_bitmap_sync_start after global_dirty_changed ({_at(t0.t_ns)})")
    return _span(t0.t_ns, sync.t_ns, "trace:global_dirty_changed->migration_bitmap_sync_start", [t0, sync])


def dirty_log_stop(lines: Sequence[TraceLine], *, cancelling_ns: int, cancelled_ns: int,
                   traced: bool, memslots: bool) -> Span:
    """See the module docstring; the QMP timestamps of ``MIGRATION cancelling``
    and ``cancelled`` bound the search."""
    if not traced:
        return _span(cancelling_ns, cancelled_ns, "qmp:MIGRATION(cancelling)->MIGRATION(cancelled)")
    t0 = next((ln for ln in lines if ln.event == "global_dirty_changed" and ln.t_ns >= cancelling_ns
               and ln.t_ns <= cancelled_ns and not _migration_bit(ln)), None)
    if t0 is None:
        raise MeasurementError(f"no global_dirty_changed without the migration bit between MIGRATION cancelling "
                               f"({_at(cancelling_ns)}) and cancelled ({_at(cancelled_ns)})")
    slots = [ln for ln in lines if ln.event == "kvm_set_user_memory" and t0.t_ns <= ln.t_ns <= cancelled_ns
             and not _logging(ln)]
    if slots:
        return _span(t0.t_ns, slots[-1].t_ns, "trace:global_dirty_changed->kvm_set_user_memory", [t0, *slots])
    if memslots:
        raise MeasurementError(f"no kvm_set_user_memory clearing KVM_MEM_LOG_DIRTY_PAGES between "
                               f"global_dirty_changed ({_at(t0.t_ns)}) and MIGRATION cancelled ({_at(cancelled_ns)})")
    return _span(t0.t_ns, cancelled_ns, "trace:global_dirty_changed->MIGRATION(cancelled)", [t0])
