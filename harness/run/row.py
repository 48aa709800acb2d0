"""Observations -> the run's CSV row, and the checks between its figures.

:func:`derive` is pure: it reads an :class:`~harness.run.observe.Observations`
and returns a :class:`Row` (one field per :data:`harness.results.COLUMNS`, in
order) and the sidecar entries computed with it (per-vCPU stalls, the
windows).  A column whose observations were not reached stays None (empty in
the CSV): a failed run's row is derived the same way, then
:func:`harness.results.failed_row` keeps its identity and info columns.

:func:`check_causality` and :func:`check_invariants` are the relations a sound
run satisfies; the session runs them where the run's data allow, and a broken
one fails the run (MeasurementError).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from harness import results
from harness.errors import MeasurementError
from harness.measure import kvm_stats, stalls, threads
from harness.measure.clock import ClockMap
from harness.qemu import dirtylog, migration
from harness.run.observe import Identity, Observations
from harness.run.plan import default_cpu_model
from harness.scenario import Scenario

#: ms: trace lines and kprobe times have microsecond resolution; invariants between
#: durations measured by different means allow this much
INVARIANT_SLACK_MS = 0.05
#: drift allowed between the QEMU host's clock and ours, per second between the
#: marks that measured the offset and the command checked against them (L1 under
#: TCG drifted up to 53 ms between two offsets taken ~1 s apart: README "Clocks")
CLOCK_DRIFT_PER_S = 0.06
#: ms always allowed on top of the drift in the causality check
CAUSALITY_SLACK_MS = 1.0


@dataclass(frozen=True)
class Row:
    """One CSV row, typed; the fields are :data:`harness.results.COLUMNS` in order
    (checked below and by tests/test_run_row.py).  None: empty in the CSV."""
    run_id: str
    started_at: str
    host: str
    host_kernel: Optional[str] = None
    kernel_variant: str = "stock"
    series_id: str = ""
    scenario: str = ""
    qemu_version: Optional[str] = None
    accel: str = ""
    cpu_model: str = ""
    guest_mem_mib: Optional[int] = None
    alias_mib: Optional[int] = None
    vcpus: Optional[int] = None
    backing: str = ""
    page_size_kib: Optional[int] = None
    dirty_log_mode: str = ""
    dirty_ring: Optional[int] = None
    loops: Tuple[str, ...] = ()
    end_action: str = ""
    touched_mib: Optional[int] = None
    repeat: Optional[int] = None
    dirty_log_start_ms: Optional[float] = None
    setup_time_ms: Optional[float] = None
    first_pass_ms: Optional[float] = None
    kvm_enable_ms: Optional[float] = None
    kvm_ioctl_ms: Optional[float] = None
    kvm_disable_ms: Optional[float] = None
    stall_pio_max_us: Optional[float] = None
    stall_pio_p99_us: Optional[float] = None
    stall_pio_count: Optional[int] = None
    stall_write_max_us: Optional[float] = None
    stall_write_p99_us: Optional[float] = None
    stall_write_count: Optional[int] = None
    stall_cpu_max_us: Optional[float] = None
    stall_cpu_p99_us: Optional[float] = None
    stall_cpu_count: Optional[int] = None
    baseline_stall_max_us: Optional[float] = None
    total_time_ms: Optional[float] = None
    downtime_ms: Optional[float] = None
    dirty_log_stop_ms: Optional[float] = None
    stall_write_sum_ms: Optional[float] = None
    baseline_stall_write_sum_ms: Optional[float] = None
    kvm_pf: Optional[int] = None
    baseline_kvm_pf: Optional[int] = None
    stall_pio_precopy_ms_per_s: Optional[float] = None
    stall_write_precopy_ms_per_s: Optional[float] = None
    stall_cpu_precopy_ms_per_s: Optional[float] = None
    baseline_stall_pio_ms_per_s: Optional[float] = None
    baseline_stall_write_ms_per_s: Optional[float] = None
    baseline_stall_cpu_ms_per_s: Optional[float] = None
    prefault_ms: Optional[float] = None
    dirty_log_start_source: Optional[str] = None
    dirty_log_stop_source: Optional[str] = None
    kvm_params: Optional[Mapping[str, str]] = None
    verify_pages: Optional[int] = None
    verify_mismatch_pages: Optional[int] = None
    fault_window_ms: Optional[float] = None
    kvm_mapped_mib: Optional[float] = None
    before_vcpu_wait_ms: Optional[float] = None
    before_vcpu_blocked_ms: Optional[float] = None
    window_vcpu_wait_ms: Optional[float] = None
    window_vcpu_blocked_ms: Optional[float] = None
    sidecar: Optional[str] = None
    status: Optional[str] = None
    error: Optional[str] = None

    def to_dict(self) -> Dict[str, Any]:
        """The row as :func:`harness.results.append_rows` takes it (``loops`` a list)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["loops"] = list(self.loops)
        return out


assert tuple(f.name for f in dataclasses.fields(Row)) == results.COLUMNS, "Row and results.COLUMNS disagree"


@dataclass(frozen=True)
class Derived:
    row: Row
    #: sidecar entries computed with the row (``stalls``, ``windows_ns``, ``precopy_windows_ns``, ``fault_cost``)
    side: Mapping[str, Any]


def identity_columns(ident: Identity, accel: str = "") -> Dict[str, Any]:
    """The columns known before the run (also a failed row's, before it started)."""
    sc = ident.scenario
    return {
        "run_id": ident.run_id, "started_at": ident.started_at,
        "host": ident.host, "kernel_variant": ident.kernel_variant or "stock",
        "series_id": ident.series_id, "scenario": sc.name,
        "accel": accel or sc.accel, "cpu_model": sc.cpu_model,
        "guest_mem_mib": sc.mem_mib, "alias_mib": sc.alias_mib or None, "vcpus": sc.vcpus, "backing": sc.backing,
        "dirty_log_mode": sc.dirty_log_mode, "dirty_ring": sc.dirty_ring or None,
        "loops": list(sc.loop_list), "end_action": sc.end_action,
        "repeat": sc.repeat,
    }


def derive(obs: Observations) -> Derived:
    """The row and its sidecar entries from what the run observed."""
    sc = obs.scenario
    cols = identity_columns(obs.identity)
    side: Dict[str, Any] = {}
    if obs.accel is not None:
        cols["accel"] = obs.accel
        cols["cpu_model"] = default_cpu_model(sc, obs.accel)
    if obs.host_kernel is not None:
        cols["host_kernel"] = obs.host_kernel
    if obs.qemu_version is not None:
        cols["qemu_version"] = obs.qemu_version
    if obs.touched_mib is not None or obs.prefault_ms is not None:
        cols["touched_mib"], cols["prefault_ms"] = obs.touched_mib, obs.prefault_ms
    if obs.page_size_kib is not None:
        cols["page_size_kib"] = obs.page_size_kib
    if obs.verify_pages is not None:
        cols["verify_pages"], cols["verify_mismatch_pages"] = obs.verify_pages, obs.verify_mismatch_pages
    if obs.migration is not None:
        cols.update(_migration_columns(obs, sc))
    if obs.kvm is not None:
        cols["kvm_enable_ms"] = obs.kvm.enable_ms
        cols["kvm_disable_ms"] = obs.kvm.disable_ms
        cols["kvm_params"] = obs.kvm.params or None
    if obs.clock is not None and obs.clock_offset is not None:
        cols.update(_stall_columns(obs, obs.clock, side))
    if obs.thread_samples:
        cols.update(_thread_columns(obs, side))
    if obs.dirty_log_start is not None:
        cols["dirty_log_start_ms"] = obs.dirty_log_start.ms
        cols["dirty_log_start_source"] = obs.dirty_log_start.source
    if obs.dirty_log_stop is not None:
        cols["dirty_log_stop_ms"] = obs.dirty_log_stop.ms
        cols["dirty_log_stop_source"] = obs.dirty_log_stop.source
    if obs.memslot_ioctls is not None:
        cols["kvm_ioctl_ms"] = dirtylog.enable_ioctl_ms(obs.memslot_ioctls, obs.timeline.setup or 0,
                                                        obs.timeline.pass1 or 0)
    cols["loops"] = tuple(cols["loops"])
    return Derived(Row(**cols), side)


def _migration_columns(obs: Observations, sc: Scenario) -> Dict[str, Any]:
    """QEMU's own figures (``query-migrate``) and pass 1 on the timeline."""
    assert obs.migration is not None
    q, q_active = obs.migration.query, obs.migration.query_active
    t = obs.timeline
    mt = migration.times(dict(q))
    cols: Dict[str, Any] = {
        "setup_time_ms": mt.setup_time_ms if mt.setup_time_ms is not None else
        (q_active.get("setup-time") if q_active else None),
        "first_pass_ms": ((t.pass1 or 0) - (t.setup or 0)) / 1e6,
    }
    if sc.end_action == "complete":
        cols["total_time_ms"] = mt.total_time_ms
        cols["downtime_ms"] = mt.downtime_ms
    return cols


def _stall_columns(obs: Observations, cm: ClockMap, side: Dict[str, Any]) -> Dict[str, Any]:
    """The probe's stalls in the stall window and the baseline; the precopy and
    fault-cost columns where measured."""
    t, records = obs.timeline, obs.records
    w = (t.setup or 0, t.window_end or 0)
    b = (t.baseline_start or 0, t.baseline_end or 0)
    cols: Dict[str, Any] = dict(stalls.columns(stalls.class_stats(records, cm, *w)))
    cols["baseline_stall_max_us"] = stalls.max_in(records, cm, *b)
    side["stalls"] = stalls.per_vcpu(records, cm, {"window": w, "baseline": b})
    side["windows_ns"] = {"stall": list(w), "baseline": list(b)}
    cols.update(_precopy_columns(obs, cm, side))
    mig = obs.kvm_samples.get("migrate")
    if mig is not None:
        cols["kvm_mapped_mib"] = mig.mapped_mib
    if obs.fault_window_s:
        cols.update(_fault_columns(obs, cm, side))
    return cols


def _precopy_columns(obs: Observations, cm: ClockMap, side: Dict[str, Any]) -> Dict[str, Any]:
    """The guest's whole loss during migration: per loop class, stalled ms per
    second from ``MIGRATION setup`` to the end of precopy (``cancelled``, or
    the source's ``STOP`` before ``completed``), against the same rate from
    the baseline's start to ``setup``.  Only where the loops ran through
    precopy: on ``cancel`` and with ``verify`` (otherwise the records are
    collected, and the loops stopped, while precopy is still held)."""
    t = obs.timeline
    end = t.cancelled if obs.scenario.end_action == "cancel" else (t.stopped if obs.verifying else None)
    setup, base = t.setup, t.baseline_start
    if not end or not setup or not base or end <= setup or setup <= base:
        return {}
    cols: Dict[str, Any] = {}
    for cls in stalls.CLASSES:
        during = stalls.sum_in(obs.records, cm, setup, end, cls=cls)
        before = stalls.sum_in(obs.records, cm, base, setup, cls=cls)
        cols[f"stall_{cls}_precopy_ms_per_s"] = None if during is None else during / ((end - setup) / 1e9)
        cols[f"baseline_stall_{cls}_ms_per_s"] = None if before is None else before / ((setup - base) / 1e9)
    side["precopy_windows_ns"] = {"precopy": [setup, end], "baseline": [base, setup]}
    return cols


def _thread_columns(obs: Observations, side: Dict[str, Any]) -> Dict[str, Any]:
    """Where the source QEMU's vCPU threads spent READY -> migrate (``before``)
    and the stall window (``window``): the largest time a vCPU thread waited
    for a host CPU, and the largest it was blocked (:mod:`harness.measure.threads`)."""
    cols: Dict[str, Any] = {}
    spans = threads.spans(obs.thread_samples)
    for name, splits in spans.items():
        cols[f"{name}_vcpu_wait_ms"], cols[f"{name}_vcpu_blocked_ms"] = threads.worst(splits)
    side["threads"] = {name: [s.to_json() for s in splits] for name, splits in spans.items()}
    return cols


def _fault_columns(obs: Observations, cm: ClockMap, side: Dict[str, Any]) -> Dict[str, Any]:
    """Where the start's cost went: the write loops' stalled time and KVM's
    page faults in the span after migrate, against an equally long span
    right before it (README "Columns": ``stall_write_sum_ms``, ``kvm_pf``)."""
    span = int(obs.fault_window_s * 1e9)
    t0 = obs.timeline.setup or 0
    after, before = (t0, t0 + span), (t0 - span, t0)
    ks = obs.kvm_samples
    cols: Dict[str, Any] = {
        "fault_window_ms": round(obs.fault_window_s * 1e3, 1),
        "stall_write_sum_ms": stalls.sum_in(obs.records, cm, *after, cls="write"),
        "baseline_stall_write_sum_ms": stalls.sum_in(obs.records, cm, *before, cls="write"),
        "kvm_pf": kvm_stats.delta(ks.get("migrate"), ks.get("after"), "pf_taken"),
        "baseline_kvm_pf": kvm_stats.delta(ks.get("before"), ks.get("migrate"), "pf_taken"),
    }
    spans: Dict[str, float] = {}
    for name, (a, b) in (("before", ("before", "migrate")), ("after", ("migrate", "after"))):
        sa, sb = ks.get(a), ks.get(b)
        if sa is not None and sb is not None:
            spans[name] = round(sb.local_s - sa.local_s, 3)
    side["fault_cost"] = {
        "window_s": obs.fault_window_s,
        "windows_ns": {"after": list(after), "before": list(before)},
        "counter_spans_s": spans,            # the spans the counters cover, this machine's clock
        "kvm": {k: v.to_json() for k, v in ks.items() if v is not None},
    }
    return cols


def check_invariants(row: Mapping[str, Any]) -> None:
    """Relations that hold between a row's durations by construction; one that
    breaks means a figure is wrong (MeasurementError names it):

    * ``dirty_log_start_ms >= kvm_enable_ms``: the kernel's walk happens inside
      the memslot ioctls that the start spans;
    * ``dirty_log_start_ms <= setup_time_ms + 1``: the start is part of the
      migration thread's setup (QEMU reports whole ms);
    * ``first_pass_ms >= dirty_log_start_ms``: pass 1 follows the start."""
    start = row.get("dirty_log_start_ms")
    if start is None:
        return
    slack = INVARIANT_SLACK_MS
    kvm, setup, first = row.get("kvm_enable_ms"), row.get("setup_time_ms"), row.get("first_pass_ms")
    broken = []
    if kvm is not None and start + slack < kvm:
        broken.append(f"dirty_log_start_ms {start:.3f} < kvm_enable_ms {kvm:.3f}")
    if setup is not None and start > float(setup) + 1 + slack:
        broken.append(f"dirty_log_start_ms {start:.3f} > setup_time_ms {setup} + 1")
    if first is not None and first + slack < start:
        broken.append(f"first_pass_ms {first:.3f} < dirty_log_start_ms {start:.3f}")
    if broken:
        raise MeasurementError("invariant broken: " + "; ".join(broken))


def check_causality(marks: Sequence[Mapping[str, Any]], migrate_sent_local_ns: int, setup_ns: int,
                    host_name: str) -> Dict[str, Any]:
    """The QEMU host's clock against ours, from the marks (each bounds the
    offset: the relay stamped after we sent and before we received), and one
    causality check: ``MIGRATION setup`` cannot precede the ``migrate`` that
    caused it.  Nothing is computed from the offset; it is recorded (median
    midpoint and spread of the per-mark estimates) and a contradiction fails
    the run (MeasurementError), since it means one of the clocks jumped."""
    bounds = [(m["host_recv_ns"] - m["harness_recv_ns"], m["host_send_ns"] - m["harness_send_ns"])
              for m in marks if m.get("harness_send_ns")]
    if not bounds:
        return {}
    mids = sorted((lo + hi) / 2 for lo, hi in bounds)
    out: Dict[str, Any] = {"offset_ms": mids[len(mids) // 2] / 1e6, "spread_ms": (mids[-1] - mids[0]) / 1e6,
                           "bounds_ms": [[lo / 1e6, hi / 1e6] for lo, hi in bounds]}
    before = [(m, lo) for m, (lo, _) in zip(marks, bounds) if m["harness_recv_ns"] <= migrate_sent_local_ns]
    if before and migrate_sent_local_ns and setup_ns:
        m, lo = before[-1]          # the last mark before migrate: the least drift since
        gap_s = (migrate_sent_local_ns - m["harness_recv_ns"]) / 1e9
        allowed_ns = (CLOCK_DRIFT_PER_S * gap_s * 1e3 + CAUSALITY_SLACK_MS) * 1e6
        earliest = migrate_sent_local_ns + lo          # on the QEMU host's clock, at the earliest
        out["setup_after_migrate_ms"] = (setup_ns - earliest) / 1e6
        if setup_ns < earliest - allowed_ns:
            raise MeasurementError(
                f"clock causality broken on {host_name}: MIGRATION setup is {(earliest - setup_ns) / 1e6:.1f} ms "
                f"before migrate could have reached QEMU (offset bounds of the last mark "
                f"{lo / 1e6:.1f} ms, allowed {allowed_ns / 1e6:.1f} ms)")
    return out


def marks_json(obs: Observations) -> List[Dict[str, Any]]:
    return [m.to_json() for m in obs.marks]

