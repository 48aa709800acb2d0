"""The measurement arithmetic, on recorded inputs (no QEMU)."""

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
"""
S = 1_000_000_000


def test_dirty_log_start_kvm_and_tcg_and_fallback():
    lines = qemu_trace.parse(KVM_LOG)
    span = qemu_trace.dirty_log_start(lines, migrate_sent_ns=1000 * S, pass1_ns=1000 * S + 9_000_000)
    assert span.source == "trace:global_dirty_changed->kvm_set_user_memory" and span.ms == 4.0
    tcg = [l for l in lines if l.event != "kvm_set_user_memory"]
    span = qemu_trace.dirty_log_start(tcg, migrate_sent_ns=1000 * S, pass1_ns=None)
    assert span.source == "trace:global_dirty_changed->migration_bitmap_sync_start" and span.ms == 4.9
    span = qemu_trace.dirty_log_start([], migrate_sent_ns=1000 * S, pass1_ns=1000 * S + 7_000_000)
    assert span.source == "qmp:migrate->MIGRATION_PASS1" and span.ms == 7.0
    stop = qemu_trace.dirty_log_stop(lines, cancel_sent_ns=1001 * S - 500_000, cancelled_ns=1001 * S + 5_000_000)
    assert stop.source == "trace:global_dirty_changed->kvm_set_user_memory" and stop.ms == 3.0


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
"""


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
