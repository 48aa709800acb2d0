"""Observations -> the typed row (harness.run.row), and the stage timer; no QEMU."""

from __future__ import annotations

import dataclasses

import pytest

from harness import results
from harness.measure.clock import ClockMap
from harness.measure.kvm_stats import Sample
from harness.measure.kvm_trace import KvmTiming
from harness.measure.qemu_trace import Span
from harness.run.observe import Identity, Mark, MigrationEnd, Observations, Stages, Timeline
from harness.run.row import Row, derive, identity_columns
from harness.scenario import Scenario

MS = 1_000_000
T0 = 1_000_000 * MS           # QEMU host clock at the baseline's start


def identity(**sc) -> Identity:
    return Identity(run_id="r1", started_at="2026-01-01T00:00:00+00:00", host="local", kernel_variant="",
                    series_id="s1", scenario=Scenario(name="x", mem_mib=512, accel="auto", **sc))


def record(cpu: int, cls: str, *stalls) -> dict:
    return {"cpu": cpu, "cls": cls, "threshold_us": 50, "iters": 1000, "dropped": 0, "hist_log2us": [],
            "stalls": list(stalls)}


def test_row_fields_are_the_csv_columns_in_order():
    assert tuple(f.name for f in dataclasses.fields(Row)) == results.COLUMNS
    assert Row.__dataclass_params__.frozen  # type: ignore[attr-defined]


def test_identity_only_row_is_the_base_row():
    """A run that failed before it learned anything: the identity columns, as before."""
    obs = Observations(identity=identity())
    row = derive(obs).row.to_dict()
    assert {k: v for k, v in row.items() if v is not None} == \
        {k: v for k, v in identity_columns(obs.identity).items() if v is not None}
    assert row["accel"] == "auto" and row["kernel_variant"] == "stock" and row["loops"] == ["pio", "write"]
    assert row["status"] is None and derive(obs).side == {}
    assert results.normalize_row(results.failed_row(row, "boom"))["error"] == "boom"


def complete_run() -> Observations:
    """A TCG run that completed: baseline, a 10 ms setup -> pass 1, 200 ms stall window."""
    setup = T0 + 2_000 * MS
    pass1 = setup + 10 * MS
    tl = Timeline(baseline_start=T0, baseline_end=T0 + 2_000 * MS, setup=setup, pass1=pass1,
                  window_end=pass1 + 200 * MS, completed=pass1 + 900 * MS)
    # guest clock == host clock; a 3 ms pio stall in the window, a 0.1 ms write stall in the baseline
    records = (record(0, "pio", (setup + 5 * MS, 3 * MS)), record(1, "write", (T0 + 100 * MS, 100_000)))
    return Observations(
        identity=identity(), accel="tcg", host_kernel="6.1.0", qemu_version="7.2.22",
        touched_mib=200, prefault_ms=812.5, page_size_kib=4, timeline=tl,
        marks=(Mark(1, T0 - 10, T0, T0 - 5, 1, 2, "before-baseline"),),
        records=records,
        migration=MigrationEnd(query={"status": "completed", "setup-time": 9, "total-time": 950, "downtime": 30},
                               query_active={"setup-time": 9}),
        kvm=KvmTiming(enable_ms=None, disable_ms=None),
        clock=ClockMap(slope=1.0, guest_ref_ns=0, host_ref_ns=0, uncertainty_ns=0, samples=1),
        clock_offset={},
        dirty_log_start=Span(ms=4.5, source="trace:global_dirty_changed->migration_bitmap_sync_start",
                             start_ns=setup + MS, end_ns=setup + MS + 4_500_000))


def test_complete_run_row():
    d = derive(complete_run())
    row = d.row
    assert (row.accel, row.cpu_model, row.host_kernel, row.qemu_version) == ("tcg", "max", "6.1.0", "7.2.22")
    assert (row.touched_mib, row.prefault_ms, row.page_size_kib) == (200, 812.5, 4)
    assert (row.setup_time_ms, row.first_pass_ms, row.total_time_ms, row.downtime_ms) == (9.0, 10.0, 950.0, 30.0)
    assert (row.stall_pio_max_us, row.stall_pio_count) == (3000.0, 1)
    assert (row.stall_write_max_us, row.stall_write_count) == (0, 0)      # ran, no stall in the window
    assert row.stall_cpu_max_us is None                                  # no vCPU ran it
    assert row.baseline_stall_max_us == 100.0
    assert (row.dirty_log_start_ms, row.dirty_log_start_source) == (4.5, "trace:global_dirty_changed->"
                                                                      "migration_bitmap_sync_start")
    assert row.kvm_ioctl_ms is None and row.kvm_params is None and row.fault_window_ms is None
    assert row.stall_pio_precopy_ms_per_s is None                       # neither cancel nor verify
    assert d.side["windows_ns"] == {"stall": [T0 + 2_000 * MS, T0 + 2_210 * MS], "baseline": [T0, T0 + 2_000 * MS]}
    assert {s["cls"] for s in d.side["stalls"]} == {"pio", "write"}
    normalized = results.normalize_row(dataclasses.replace(row, status="ok").to_dict())
    assert normalized["loops"] == "pio+write" and normalized["dirty_ring"] == ""


def test_stall_columns_wait_for_the_clock_check():
    """Before the clock check passed (or when it failed) no stall column is derived, as
    before: nor the fault-cost and mapped-memory ones, whose samples were already taken."""
    samples = {"before": Sample(1.0, {"pf_taken": 1}), "migrate": Sample(3.0, {"pf_taken": 2}, {"pages_4k": 256}),
               "after": Sample(5.0, {"pf_taken": 3})}
    obs = dataclasses.replace(complete_run(), clock_offset=None, fault_window_s=2.0, kvm_samples=samples)
    row = derive(obs).row
    assert row.stall_pio_max_us is None and row.baseline_stall_max_us is None and derive(obs).side == {}
    assert row.fault_window_ms is None and row.kvm_pf is None and row.kvm_mapped_mib is None
    assert derive(dataclasses.replace(obs, clock_offset={})).row.fault_window_ms == 2000.0
    assert row.first_pass_ms == 10.0 and row.touched_mib == 200


def test_fault_and_precopy_columns():
    """A verified run with a write loop: the fault-cost span and the precopy rates."""
    base = complete_run()
    tl = dataclasses.replace(base.timeline, stopped=base.timeline.setup + 500 * MS)  # type: ignore[operator]
    setup = tl.setup or 0
    records = (record(0, "pio"), record(1, "write", (setup + 100 * MS, 2 * MS), (setup - 300 * MS, MS)))
    samples = {"before": Sample(1.0, {"pf_taken": 10}), "migrate": Sample(3.0, {"pf_taken": 15}),
               "after": Sample(5.0, {"pf_taken": 115})}
    obs = dataclasses.replace(base, identity=identity(verify=True), timeline=tl, records=records,
                              kvm_samples=samples, fault_window_s=2.0)
    d = derive(obs)
    assert (d.row.fault_window_ms, d.row.kvm_pf, d.row.baseline_kvm_pf) == (2000.0, 100, 5)
    assert (d.row.stall_write_sum_ms, d.row.baseline_stall_write_sum_ms) == (2.0, 1.0)
    assert d.row.stall_write_precopy_ms_per_s == pytest.approx(4.0)     # 2 ms over 0.5 s
    assert d.row.baseline_stall_write_ms_per_s == pytest.approx(0.5)    # 1 ms over 2 s
    assert d.side["fault_cost"]["counter_spans_s"] == {"before": 2.0, "after": 2.0}
    assert d.side["precopy_windows_ns"]["precopy"] == [setup, setup + 500 * MS]


def test_timeline_json_has_the_points_reached():
    tl = Timeline(setup=5, pass1=7)
    assert tl.to_json() == {"setup": 5, "pass1": 7}
    with pytest.raises(dataclasses.FrozenInstanceError):
        tl.setup = 6  # type: ignore[misc]


def test_stages_time_each_stage():
    now = [0.0]
    st = Stages(clock=lambda: now[0])
    st.start("boot")
    now[0] = 2.0
    st.start("migration")
    now[0] = 3.0
    with st.within("collection"):      # pauses the migration
        now[0] = 3.5
    now[0] = 5.0
    st.start("collection")
    now[0] = 6.0
    st.stop()
    assert st.to_json() == {"boot": 2.0, "migration": 2.5, "collection": 1.5}
    assert st.current is None
