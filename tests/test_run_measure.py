"""The measurement arithmetic, on recorded inputs (no QEMU)."""

import pytest

from harness import runner
from harness.errors import MeasurementError
from harness.measure import clock, qemu_trace, stalls
from harness.qemu import backing

KVM_LOG = """\
100@1000.000000:migrate_set_state new state setup
100@1000.000100:global_dirty_changed bitmask 0x1
100@1000.002100:kvm_set_user_memory AddrSpace#0 Slot#0 flags=0x1 gpa=0x0 size=0x80000000 ua=0x7f0000000000 ret=0
100@1000.004100:kvm_set_user_memory AddrSpace#0 Slot#1 flags=0x1 gpa=0x100000000 size=0x80000000 ua=0x7f8000000000 ret=0
100@1000.005000:migration_bitmap_sync_start 
100@1000.009000:migration_bitmap_sync_end dirty_pages 1234
7@1001.000000:global_dirty_changed bitmask 0x0
7@1001.003000:kvm_set_user_memory AddrSpace#0 Slot#0 flags=0x0 gpa=0x0 size=0x80000000 ua=0x7f0000000000 ret=0
"""  # noqa: W291  QEMU's log trace backend writes a blank after an event without arguments
S = 1_000_000_000


def test_dirty_log_start_kvm_and_tcg_and_fallback():
    lines = qemu_trace.parse(KVM_LOG)
    setup = 1000 * S - 50_000                    # QMP timestamp of MIGRATION setup
    span = qemu_trace.dirty_log_start(lines, setup_ns=setup, pass1_ns=1000 * S + 9_000_000,
                                      traced=True, memslots=True)
    assert span.source == "trace:global_dirty_changed->kvm_set_user_memory" and span.ms == 4.0
    tcg = [ln for ln in lines if ln.event != "kvm_set_user_memory"]
    span = qemu_trace.dirty_log_start(tcg, setup_ns=setup, pass1_ns=None, traced=True, memslots=False)
    assert span.source == "trace:global_dirty_changed->migration_bitmap_sync_start" and span.ms == 4.9
    # a QEMU without the trace event (before 6.1): QMP events only, both on QEMU's clock
    span = qemu_trace.dirty_log_start([], setup_ns=setup, pass1_ns=1000 * S + 7_000_000,
                                      traced=False, memslots=True)
    assert span.source == "qmp:MIGRATION(setup)->MIGRATION_PASS1" and span.ms == 7.05
    stop = qemu_trace.dirty_log_stop(lines, cancelling_ns=1001 * S - 500_000, cancelled_ns=1001 * S + 5_000_000,
                                     traced=True, memslots=True)
    assert stop.source == "trace:global_dirty_changed->kvm_set_user_memory" and stop.ms == 3.0


def test_skewed_harness_clock_no_longer_falls_back():
    """The case of issue 14: the harness's "migrate sent", converted with a
    wrong offset, landed after global_dirty_changed, and the runner silently
    used migrate->MIGRATION_PASS1.  Anchored on QEMU's own MIGRATION setup the
    trace always matches; lines that cannot be matched fail loudly."""
    lines = qemu_trace.parse(KVM_LOG)
    skewed_migrate_sent = 1000 * S + 40_000_000      # 40 ms late: after every trace line
    span = qemu_trace.dirty_log_start(lines, setup_ns=1000 * S - 50_000, pass1_ns=1000 * S + 9_000_000,
                                      traced=True, memslots=True)
    assert span.source.startswith("trace:") and span.ms == 4.0
    with pytest.raises(MeasurementError, match="no global_dirty_changed with the migration bit at or after"):
        qemu_trace.dirty_log_start(lines, setup_ns=skewed_migrate_sent, pass1_ns=1000 * S + 9_000_000,
                                   traced=True, memslots=True)
    no_slots = [ln for ln in lines if ln.event != "kvm_set_user_memory"]
    with pytest.raises(MeasurementError, match="no kvm_set_user_memory"):
        qemu_trace.dirty_log_start(no_slots, setup_ns=1000 * S - 50_000, pass1_ns=1000 * S + 9_000_000,
                                   traced=True, memslots=True)


def test_invariants():
    ok = {"dirty_log_start_ms": 37.0, "kvm_enable_ms": 16.3, "setup_time_ms": 40, "first_pass_ms": 60.0}
    runner.check_invariants(ok)
    for bad, word in (({"dirty_log_start_ms": 6.155}, "< kvm_enable_ms"),
                      ({"setup_time_ms": 30}, "> setup_time_ms"),
                      ({"first_pass_ms": 20.0}, "first_pass_ms")):
        with pytest.raises(MeasurementError, match=word):
            runner.check_invariants({**ok, **bad})
    runner.check_invariants({"dirty_log_start_ms": None})


def _mark(h_send, offset_ns, rtt_out=1_000_000, rtt_back=1_000_000):
    """A relayed mark: we send at h_send (our clock); the relay (QEMU host clock
    = ours + offset) stamps it rtt_out later and the echo rtt_back after that."""
    host_send = h_send + offset_ns + rtt_out
    return {"harness_send_ns": h_send, "host_send_ns": host_send, "host_recv_ns": host_send + 100_000,
            "harness_recv_ns": h_send + rtt_out + 100_000 + rtt_back, "guest_ns": 0}


def test_causality_check_and_offset_record():
    off = -1_000_000_000                             # L1 runs 1 s behind us
    marks = [_mark(100 * S + i * 10_000_000, off) for i in range(3)]
    sent = 101 * S
    out = runner.check_causality(marks, sent, sent + off + 2_000_000, "virtual")
    assert abs(out["offset_ms"] - off / 1e6) < 2 and out["spread_ms"] < 0.01
    with pytest.raises(MeasurementError, match="causality broken on virtual"):
        runner.check_causality(marks, sent, sent + off - 200_000_000, "virtual")
    assert runner.check_causality([], sent, 0, "local") == {}


def test_clock_fit_and_stall_window():
    # guest clock = host - 5 s; round trips of 100 us
    marks = [{"host_send_ns": h, "host_recv_ns": h + 100_000, "guest_ns": h + 50_000 - 5 * S}
             for h in (10 * S, 11 * S, 12 * S)]
    cm = clock.fit(marks)
    assert abs(cm.to_host(7 * S) - 12 * S) < 1000
    assert cm.uncertainty_ns <= 60_000
    rec = {"cpu": 0, "cls": "pio", "threshold_us": 50, "iters": 1, "hist_log2us": [], "dropped": 0,
           "stalls": [(6 * S, 300_000), (7 * S, 2_000_000), (8 * S, 100_000)]}
    st = stalls.class_stats([rec], cm, 12 * S - 1000, 12 * S + 10_000_000)
    assert st["pio"].max_us == 2000.0 and st["pio"].count == 1
    assert st["write"].max_us is None          # no vCPU ran it
    assert stalls.max_in([rec], cm, 11 * S, 11 * S + 1_000_000) == 300.0
    assert stalls.p99([float(i) for i in range(1, 101)]) == 99.0


def test_clock_fit_corrects_a_guest_clock_2pct_fast():
    """A guest clock that runs 2 % fast (a TSC rate calibrated on a busy TCG
    host) is fitted, not forced to slope 1 with its drift as uncertainty."""
    marks = [{"host_send_ns": h, "host_recv_ns": h + 100_000, "guest_ns": int((h + 50_000) * 1.02) - 5 * S}
             for h in (10 * S, 11 * S, 12 * S, 13 * S, 14 * S)]
    cm = clock.fit(marks)
    assert abs(cm.slope - 1 / 1.02) < 1e-6
    assert cm.uncertainty_ns <= 60_000, cm


def _batches(rate: float, starts_s=(10, 11, 11.6, 12.2, 12.8, 13.4, 14.5)):
    """Marks the way a run or a calibration takes them: batches of two, 1 ms
    apart, 100 us round trips; the guest clock runs at ``rate`` x the host's."""
    out = []
    for t in starts_s:
        for k in range(2):
            h = int(t * S) + k * 1_000_000
            out.append({"host_send_ns": h, "host_recv_ns": h + 100_000,
                        "guest_ns": int((h + 50_000) * rate) - 5 * S})
    return out


def test_clock_fit_ignores_one_slow_round_trip():
    """CI run 55: one mark answered 383 ms late.  It is not tight, so it neither
    tilts the line nor widens the uncertainty."""
    marks = _batches(1.0)
    slow = marks[6]
    marks[6] = {**slow, "host_recv_ns": slow["host_send_ns"] + 766_000_000,
                "guest_ns": slow["guest_ns"] + 383_000_000}
    cm = clock.fit(marks)
    assert cm.used == len(marks) - 1
    assert abs(cm.slope - 1.0) < 1e-6
    assert cm.uncertainty_ns <= 60_000, cm


def test_clock_fit_survives_one_tight_sample_off_the_line():
    """A tight sample whose guest reading sits 50 ms off the others (the guest
    clock stepped once) moves neither the slope nor the other samples'
    residuals; only its own residual shows, honestly, in the uncertainty."""
    marks = _batches(1.03)
    marks[7] = {**marks[7], "guest_ns": marks[7]["guest_ns"] + 50_000_000}
    cm = clock.fit(marks)
    assert abs(cm.slope - 1 / 1.03) < 1e-4, cm
    good = [m for i, m in enumerate(marks) if i != 7]
    worst = max(abs(cm.to_host(m["guest_ns"]) - (m["host_send_ns"] + 50_000)) for m in good)
    assert worst < 200_000, worst
    assert 48_000_000 < cm.uncertainty_ns < 52_000_000, cm


@pytest.mark.parametrize("rate", [0.9, 1.08, 1.15])
def test_clock_fit_corrects_a_guest_clock_far_off(rate):
    """A guest clock 8-15 % off (TCG on a busy host) is fitted, not forced to
    slope 1 with seconds of drift as the uncertainty."""
    cm = clock.fit(_batches(rate))
    assert abs(cm.slope - 1 / rate) < 1e-6
    assert cm.uncertainty_ns <= 60_000, cm


def test_clock_fit_follows_a_tcg_guest_a_quarter_fast():
    """2026-12-05: TCG guests ran 23-29 % fast here while their loops spun (clock.MAX_SKEW)."""
    cm = clock.fit(_batches(1.2855))
    assert abs(cm.slope - 1 / 1.2855) < 1e-6 and cm.uncertainty_ns < 1_000_000


def test_clock_fit_keeps_slope_1_for_a_nonsense_rate():
    cm = clock.fit(_batches(3.0))
    assert cm.slope == 1.0


SMAPS = """\
7f0000000000-7f0020000000 rw-p 00000000 00:00 0 
Size:             524288 kB
KernelPageSize:        4 kB
Rss:              262144 kB
AnonHugePages:    258048 kB
7f1000000000-7f1040000000 rwxp 00000000 00:00 0 
Size:            1048576 kB
KernelPageSize:        4 kB
Rss:                1000 kB
AnonHugePages:         0 kB
"""  # noqa: W291  an anonymous mapping's line ends in a blank in /proc/PID/smaps


def test_page_size_from_smaps():
    assert backing.page_size_obtained(SMAPS, 512).page_size_kib == 2048
    assert backing.page_size_obtained(SMAPS.replace("258048", "0"), 512).page_size_kib == 4
    assert backing.memory_args("hugetlb2m", 512, True)[-1].endswith("hugetlbsize=2M,prealloc=on")


def test_readme_defines_every_column():
    from pathlib import Path

    from harness.results import COLUMNS

    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    core = text.split("<!-- section:core:begin -->")[1].split("<!-- section:core:end -->")[0]
    missing = [c for c in COLUMNS if f"`{c}`" not in core]
    assert not missing, f"README 'What it measures' lacks: {missing}"


HMP_REGISTERS = """\
CPU#0
RAX=0000000000000000 RBX=ffffffff82a13940 RCX=0000000000000001 RDX=0000000000bcc6d5
RIP=ffffffff81c3a1ae RFL=00000246 [---Z-P-] CPL=0 II=0 A20=1 SMM=0 HLT=1
CPU#1
RAX=0000000000000001 RBX=00007f0000000000 RCX=0000000000000001 RDX=0000000000000000
RIP=0000559a3c6b1234 RFL=00000202 [-------] CPL=3 II=0 A20=1 SMM=0 HLT=0
"""


def test_stuck_guest_summary():
    """What a probe timeout's error says about the guest (harness.qemu.stuck)."""
    from harness.qemu import stuck

    cpus = stuck.parse_registers(HMP_REGISTERS)
    assert cpus == [{"rip": "0xffffffff81c3a1ae", "halted": True, "cpl": 0},
                    {"rip": "0x0000559a3c6b1234", "halted": False, "cpl": 3}]
    snap = {"status": "running", "vcpus": cpus,
            "per_s": {"/machine/unattached/device[0]": {"exits": 3, "pf_taken": 0, "halt_exits": 3},
                      "/machine/unattached/device[1]": {"exits": 41000, "pf_taken": 40000, "halt_exits": 0}}}
    assert stuck.summary(snap) == (
        "QEMU running; vCPU0 halted, RIP 0xffffffff81c3a1ae (3 exits/s, 0 pf_taken/s, 3 halt_exits/s); "
        "vCPU1 in user space, RIP 0x0000559a3c6b1234 (41000 exits/s, 40000 pf_taken/s, 0 halt_exits/s)")
    # seen in the virtual host: a destination whose vCPU was reset after the migration
    reset = {"status": "running", "vcpus": [{"rip": "0x000000000000fff0", "halted": False, "cpl": 0}]}
    assert stuck.summary(reset) == \
        "QEMU running; vCPU0 at the reset vector (reset since it last ran the guest's code), RIP 0x000000000000fff0"
    assert stuck.summary({"incomplete": "QMP is not connected"}) == "no vCPU state: QMP is not connected"


#: HMP ``info lapic 1`` of QEMU 7.2 (the layout verified against a real QEMU; vectors set here)
HMP_LAPIC = ("dumping local APIC state for CPU 1 \r\n\r\n"
             "LVTT\t 0x000400ec active-hi edge                 tsc-deadline Fixed  (vec 236)\r\n"
             "ESR\t 0x00000000\r\nISR\t (none)\r\nIRR\t 34 236(level) \r\n\r\n"
             "APR 0x00 TPR 0x00 DFR 0x0f LDR 0x00 PPR 0x00\r\n")


def test_stuck_guest_local_apic():
    """A halted vCPU with an interrupt pending in its local APIC (a lost wake-up)
    says so in the row's error."""
    from harness.qemu import stuck

    assert stuck.parse_lapic(HMP_LAPIC) == {"isr": [], "irr": [34, 236]}
    assert stuck.parse_lapic("ISR\t 48 \r\nIRR\t (none)\r\n") == {"isr": [48], "irr": []}
    snap = {"status": "running", "vcpus": [{"rip": "0xffffffff81c3a1ae", "halted": True, "cpl": 0}] * 2,
            "lapic": [stuck.parse_lapic("ISR\t (none)\nIRR\t (none)\n"), stuck.parse_lapic(HMP_LAPIC)]}
    assert stuck.summary(snap) == ("QEMU running; vCPU0 halted, RIP 0xffffffff81c3a1ae; "
                                   "vCPU1 halted, RIP 0xffffffff81c3a1ae, IRR 34 236")
