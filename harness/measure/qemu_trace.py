"""QEMU trace lines -> dirty_log_start_ms / dirty_log_stop_ms.

Input: the source QEMU's ``-D`` log with the ``log`` trace backend and
``-msg timestamp=on``; trace lines look like::

    12345@1795588999.697039:global_dirty_changed bitmask 0x1
    12345@1795588999.702311:kvm_set_user_memory AddrSpace#0 Slot#1 flags=0x1 gpa=0x0 ...

``sec.usec`` is QEMU's wall clock (gettimeofday), the same clock as QMP event
timestamps.

Definitions (README "What it measures" repeats them; ``*_source`` names the
one used):

``dirty_log_start_ms``
  * ``trace:global_dirty_changed->kvm_set_user_memory`` (KVM): from the first
    ``global_dirty_changed`` after ``migrate`` whose bitmask has the migration
    bit (0x1), i.e. the entry of ``memory_global_dirty_log_start()``, to the last
    ``kvm_set_user_memory`` with ``flags & 0x1`` (``KVM_MEM_LOG_DIRTY_PAGES``)
    before the first ``migration_bitmap_sync_start`` that follows (each fires
    when one memslot ioctl has returned);
  * ``trace:global_dirty_changed->migration_bitmap_sync_start`` (TCG, which has
    no memslot ioctls, or no such lines): to the first
    ``migration_bitmap_sync_start`` after ``global_dirty_changed``; dirty-log
    start is over by then (``ram_init_bitmaps``);
  * ``qmp:migrate->MIGRATION_PASS1`` (QEMU without ``global_dirty_changed``,
    before 6.1): from the host sending QMP ``migrate`` to the QMP timestamp of
    ``MIGRATION_PASS`` 1, an upper bound that includes the rest of setup.

``dirty_log_stop_ms`` (cancel only)
  * ``trace:global_dirty_changed->kvm_set_user_memory``: from the first
    ``global_dirty_changed`` without the migration bit after ``migrate_cancel``
    (entry of ``memory_global_dirty_log_stop()``) to the last
    ``kvm_set_user_memory`` without ``flags & 0x1`` before ``MIGRATION cancelled``;
  * ``trace:global_dirty_changed->MIGRATION(cancelled)`` (TCG): to the QMP
    timestamp of ``MIGRATION {status: cancelled}``, emitted by
    ``migrate_fd_cleanup`` right after the cleanup that stops dirty logging;
  * ``qmp:migrate_cancel->MIGRATION(cancelled)``: fallback without the trace event.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

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
    return Span(max(0.0, (end - start) / 1e6), source, start, end, [l.raw for l in lines])


def dirty_log_start(lines: Sequence[TraceLine], *, migrate_sent_ns: int,
                    pass1_ns: Optional[int]) -> Optional[Span]:
    """See the module docstring.  All times on the QEMU host's wall clock."""
    t0 = next((l for l in lines if l.event == "global_dirty_changed" and l.t_ns >= migrate_sent_ns - 1_000_000
               and (l.int_arg(_BITMASK) or 0) & GLOBAL_DIRTY_MIGRATION), None)
    if t0 is not None:
        sync = next((l for l in lines if l.event == "migration_bitmap_sync_start" and l.t_ns >= t0.t_ns), None)
        limit = sync.t_ns if sync else (pass1_ns if pass1_ns else None)
        slots = [l for l in lines if l.event == "kvm_set_user_memory" and l.t_ns >= t0.t_ns
                 and (limit is None or l.t_ns <= limit)
                 and (l.int_arg(_FLAGS) or 0) & KVM_MEM_LOG_DIRTY_PAGES]
        if slots:
            return _span(t0.t_ns, slots[-1].t_ns, "trace:global_dirty_changed->kvm_set_user_memory",
                         [t0, *slots] + ([sync] if sync else []))
        if sync is not None:
            return _span(t0.t_ns, sync.t_ns, "trace:global_dirty_changed->migration_bitmap_sync_start", [t0, sync])
    if pass1_ns is not None:
        return _span(migrate_sent_ns, pass1_ns, "qmp:migrate->MIGRATION_PASS1")
    return None


def dirty_log_stop(lines: Sequence[TraceLine], *, cancel_sent_ns: int,
                   cancelled_ns: Optional[int]) -> Optional[Span]:
    t0 = next((l for l in lines if l.event == "global_dirty_changed" and l.t_ns >= cancel_sent_ns - 1_000_000
               and not (l.int_arg(_BITMASK) or 0) & GLOBAL_DIRTY_MIGRATION), None)
    if t0 is not None:
        slots = [l for l in lines if l.event == "kvm_set_user_memory" and l.t_ns >= t0.t_ns
                 and (cancelled_ns is None or l.t_ns <= cancelled_ns)
                 and not (l.int_arg(_FLAGS) or 0) & KVM_MEM_LOG_DIRTY_PAGES]
        if slots:
            return _span(t0.t_ns, slots[-1].t_ns, "trace:global_dirty_changed->kvm_set_user_memory", [t0, *slots])
        if cancelled_ns is not None:
            return _span(t0.t_ns, cancelled_ns, "trace:global_dirty_changed->MIGRATION(cancelled)", [t0])
    if cancelled_ns is not None:
        return _span(cancel_sent_ns, cancelled_ns, "qmp:migrate_cancel->MIGRATION(cancelled)")
    return None
