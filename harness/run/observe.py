"""What one run observed, as frozen values, and how long each stage took.

The session (:class:`harness.runner._Run`) starts with an :class:`Observations`
that holds only the run's identity and replaces it (``dataclasses.replace``)
as it learns more: the resolved accelerator, the probe's READY, the
:class:`Timeline`, the marks and records, QEMU's ``query-migrate``, KVM's
timing and counters, the trace's dirty-log bounds.  A field left at its
default was not reached (the run failed before); :func:`harness.run.row.derive`
reads the observations and nothing else.

:class:`Stages` times the stages into the sidecar's ``stages`` (stage name ->
seconds), as tuxmake's ``Build.run()`` times validate/prepare/build/collect.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Tuple

from harness.measure import kvm_stats, threads
from harness.measure.clock import ClockMap
from harness.measure.kvm_trace import KvmTiming
from harness.measure.qemu_trace import Span
from harness.qemu.dirtylog import MemslotIoctl
from harness.scenario import Scenario

#: the stages of a run, in order (the sidecar's ``stages`` keeps this order)
STAGES = ("plan", "boot", "ready", "baseline", "migration", "collection", "verification")


@dataclass(frozen=True)
class Timeline:
    """The run's timeline: QEMU host wall clock (ns), the clock of QEMU's trace
    lines and QMP event timestamps; None: not reached."""
    #: the baseline window: from the last mark's echo before it, ``baseline_s`` long
    baseline_start: Optional[int] = None
    baseline_end: Optional[int] = None
    #: ``MIGRATION setup``, ``MIGRATION_PASS 1``; the stall window ends ``margin_ms`` after pass 1
    setup: Optional[int] = None
    pass1: Optional[int] = None
    window_end: Optional[int] = None
    #: ``end_action = cancel``: ``MIGRATION cancelling`` and ``cancelled``
    cancelling: Optional[int] = None
    cancelled: Optional[int] = None
    #: ``end_action = complete``: ``MIGRATION completed``; the source's ``STOP`` before it
    completed: Optional[int] = None
    stopped: Optional[int] = None

    def to_json(self) -> Dict[str, int]:
        """The sidecar's ``timeline_ns``: the points reached."""
        return {f.name: v for f in dataclasses.fields(self) if (v := getattr(self, f.name)) is not None}


@dataclass(frozen=True)
class Mark:
    """One mark round trip (:meth:`ProbeChannel.mark`) and the batch it was in."""
    id: int
    host_send_ns: int
    host_recv_ns: int
    guest_ns: int
    harness_send_ns: int
    harness_recv_ns: int
    label: str

    @classmethod
    def of(cls, sample: Any, label: str) -> "Mark":
        return cls(id=sample.id, host_send_ns=sample.host_send_ns, host_recv_ns=sample.host_recv_ns,
                   guest_ns=sample.guest_ns, harness_send_ns=sample.harness_send_ns,
                   harness_recv_ns=sample.harness_recv_ns, label=label)

    def to_json(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Identity:
    """Who the run is: the columns known before it starts."""
    run_id: str
    started_at: str
    host: str
    kernel_variant: str
    series_id: str
    scenario: Scenario


@dataclass(frozen=True)
class MigrationEnd:
    """QEMU's account of the migration once it ended (``query-migrate``)."""
    #: at the end (``completed``: query_completed; ``cancelled``: during it)
    query: Mapping[str, Any]
    #: during it, after the stall window ({} when that query failed)
    query_active: Mapping[str, Any]


@dataclass(frozen=True)
class Observations:
    identity: Identity
    accel: Optional[str] = None            #: resolved: kvm | tcg
    host_kernel: Optional[str] = None      #: ``uname -r``; None: not read
    qemu_version: Optional[str] = None
    touched_mib: Optional[int] = None      #: the probe's READY
    prefault_ms: Optional[float] = None
    page_size_kib: Optional[int] = None    #: of the guest RAM mapping (smaps)
    ram_pad_kib: int = 0
    timeline: Timeline = Timeline()
    marks: Tuple[Mark, ...] = ()
    #: this machine's wall clock (ns) when ``migrate`` was sent: only for the causality check
    migrate_sent_local_ns: int = 0
    #: the probe's records
    records: Tuple[Any, ...] = ()
    #: KVM's counters at the fault-cost span's ends: before, migrate, after
    kvm_samples: Mapping[str, Optional[kvm_stats.Sample]] = field(default_factory=dict)
    #: the source QEMU's threads (scheduler statistics) at READY, migrate and the stall window's end
    thread_samples: Mapping[str, Optional[threads.Sample]] = field(default_factory=dict)
    #: s from migrate to the end of the fault-cost span (0: not measured)
    fault_window_s: float = 0.0
    migration: Optional[MigrationEnd] = None
    kvm: Optional[KvmTiming] = None
    #: the marks' fit, and the clock check that passed (None: not reached)
    clock: Optional[ClockMap] = None
    clock_offset: Optional[Mapping[str, Any]] = None
    #: migrated memory compared: pages, differing pages
    verify_pages: Optional[int] = None
    verify_mismatch_pages: Optional[int] = None
    #: the source's trace, read after its QEMU exited
    dirty_log_start: Optional[Span] = None
    dirty_log_stop: Optional[Span] = None
    memslot_ioctls: Optional[Tuple[MemslotIoctl, ...]] = None

    @property
    def scenario(self) -> Scenario:
        return self.identity.scenario

    @property
    def verifying(self) -> bool:
        """Migrated memory is compared (``verify``; after ``cancel``, that of a second migration)."""
        return self.scenario.verify


class Stages:
    """Seconds per stage, for the sidecar's ``stages``.

    :meth:`start` ends the current top-level stage and starts the next one
    (boot, then READY, ...); :meth:`within` runs a block as another stage
    inside the current one (the probe's dump during the migration counts as
    collection), which pauses the outer stage meanwhile, so the figures add up
    to at most the run's wall time.  A stage entered twice adds up."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._seconds: Dict[str, float] = {}
        self._stack: List[Tuple[str, float]] = []    # (stage, since)

    def _add(self, name: str, now: float, since: float) -> None:
        self._seconds[name] = self._seconds.get(name, 0.0) + max(0.0, now - since)

    def start(self, name: str) -> None:
        now = self._clock()
        if self._stack:
            self._close_top(now)
        self._stack.append((name, now))

    def _close_top(self, now: float) -> None:
        name, since = self._stack.pop()
        self._add(name, now, since)

    @contextlib.contextmanager
    def within(self, name: str) -> Iterator[None]:
        now = self._clock()
        if self._stack:
            outer, since = self._stack[-1]
            self._add(outer, now, since)
        self._stack.append((name, now))
        depth = len(self._stack)
        try:
            yield
        finally:
            now = self._clock()
            while len(self._stack) >= depth:
                self._close_top(now)
            if self._stack:
                self._stack[-1] = (self._stack[-1][0], now)

    def stop(self) -> None:
        """End every open stage (the run ended, or failed in the current one)."""
        now = self._clock()
        while self._stack:
            self._close_top(now)

    @property
    def current(self) -> Optional[str]:
        return self._stack[-1][0] if self._stack else None

    def to_json(self) -> Dict[str, float]:
        known = [s for s in STAGES if s in self._seconds] + [s for s in self._seconds if s not in STAGES]
        return {s: round(self._seconds[s], 3) for s in known}
