"""End to end on a real QEMU under TCG: boot, prefault, migrate to a real
destination QEMU, and check the CSV row and its sidecar."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path


from harness import results, runner
from harness.hosts.local import LocalHost
from harness.scenario import Scenario

REPO = Path(__file__).resolve().parent.parent
#: small and quick: 512 MiB guest, a few hundred MiB touched, short baseline
SMALL = dict(mem_mib=512, vcpus=2, accel="tcg", touch_mib=200, baseline_s=0.5,
             ready_timeout_s=240.0, migration_timeout_s=180.0)


def _num(row, key):
    return float(row[key])


def test_run_complete_writes_ok_row(tmp_path):
    """A whole run under TCG with --verify: on QEMU < 9.0 the guest gets 8 KiB
    more RAM, which keeps QEMU's TCG dirty tracking intact (README "Migrated
    memory verified"), so migrated memory verifies equal."""
    out = tmp_path / "e2e.csv"
    proc = subprocess.run(
        [sys.executable, "-m", "harness", "run", "--name", "e2e", "--accel", "tcg", "--mem", "512M",
         "--touch", "200", "--baseline-s", "0.5", "--verify", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert str(out) in proc.stdout
    (row,) = results.read_rows(out)
    assert row["status"] == "ok", row["error"]
    assert row["accel"] == "tcg" and row["qemu_version"]
    assert _num(row, "setup_time_ms") > 0
    assert 0 <= _num(row, "dirty_log_start_ms") <= _num(row, "setup_time_ms")
    assert row["dirty_log_start_source"].startswith("trace:")
    assert _num(row, "touched_mib") > 0
    assert _num(row, "first_pass_ms") >= 0
    assert _num(row, "total_time_ms") > 0 and row["downtime_ms"] != ""
    assert row["page_size_kib"] == "4"           # anon = 4 KiB pages, THP off
    assert row["stall_pio_max_us"] != "" and row["stall_write_max_us"] != ""
    assert row["stall_cpu_max_us"] == ""         # no vCPU ran the cpu loop
    assert row["baseline_stall_max_us"] != ""
    # where the cost went: the write loop's stalled time after migrate and before it;
    # no KVM counters under TCG
    assert 2000 <= _num(row, "fault_window_ms") < 10000
    assert _num(row, "stall_write_sum_ms") >= 0 and _num(row, "baseline_stall_write_sum_ms") >= 0
    assert row["kvm_pf"] == row["baseline_kvm_pf"] == row["kvm_mapped_mib"] == ""
    # the whole precopy's loss (the loops ran through it: verify), per second, and the baseline's
    for cls in ("pio", "write"):
        assert _num(row, f"stall_{cls}_precopy_ms_per_s") >= 0 and _num(row, f"baseline_stall_{cls}_ms_per_s") >= 0
    assert row["stall_cpu_precopy_ms_per_s"] == row["baseline_stall_cpu_ms_per_s"] == ""
    side = json.loads(Path(row["sidecar"]).read_text())
    pad_pages = side["ram_pad_kib"] // 4                     # 2 on QEMU < 9.0, else 0
    assert int(row["verify_pages"]) == 512 * 256 - 96 + pad_pages and row["verify_mismatch_pages"] == "0"
    assert side["verify"]["rewritten_by_kvm"] == []          # TCG: no kvmclock, nothing rewritten
    # the probe found the kernel's kvmclock wall clock (in guest RAM: Debian's 6.1 has KALLSYMS_ALL)
    assert 0 < side["hello"]["wall_clock_gpa"] < 512 << 20
    assert set(side["commands"]) == {"src", "dst"} and "-incoming defer" in side["commands"]["dst"]
    assert any(e["event"] == "MIGRATION_PASS" for e in side["events"]["src"])
    assert any("global_dirty_changed" in line for line in side["trace_lines"])
    assert {s["cls"] for s in side["stalls"]} == {"pio", "write"}
    assert side["doctor"] is not None
    for tag in ("src", "dst"):
        assert Path(side["logs"][tag]).read_text().startswith("# migstall VM")
    # each stage timed (harness.run.observe.Stages), exclusive of the stages nested in it
    assert set(side["stages"]) == {"plan", "boot", "ready", "baseline", "migration", "collection", "verification"}
    assert all(v >= 0 for v in side["stages"].values()) and sum(side["stages"].values()) <= side["wall_s"] + 0.01
    assert side["stages"]["baseline"] >= 0.5                 # baseline_s


def test_cancel_records_dirty_log_stop(tmp_path, guest_image):
    out = tmp_path / "cancel.csv"
    # also covers --backing thp: QEMU's MADV_HUGEPAGE gives 2 MiB pages unless THP is off
    sc = Scenario(name="e2e-cancel", end_action="cancel", cancel_after_s=0.3, backing="thp", **SMALL)
    ctx = runner.RunContext(host=LocalHost(), out=out)
    row = asyncio.run(runner.run_one(ctx, sc, guest_image))
    assert row["status"] == "ok", row["error"]
    (got,) = results.read_rows(out)
    assert got["end_action"] == "cancel"
    assert float(got["dirty_log_stop_ms"]) >= 0
    assert float(got["setup_time_ms"]) > 0
    assert got["total_time_ms"] == "" and got["downtime_ms"] == ""
    # cancel_after_s 0.3 would cut the 2 s fault-cost span short: the cancel waits for its end,
    # so that a fast start and a slow one are measured over equal spans
    assert 2000 <= float(got["fault_window_ms"]) < 10000
    assert float(got["stall_write_precopy_ms_per_s"]) >= 0 and float(got["baseline_stall_pio_ms_per_s"]) >= 0
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if thp.exists() and "[never]" not in thp.read_text():
        assert got["page_size_kib"] == "2048"
    side = json.loads(Path(got["sidecar"]).read_text())
    assert side["dirty_log_stop"]["source"].startswith("trace:global_dirty_changed")
    assert [e["data"]["status"] for e in side["events"]["src"] if e["event"] == "MIGRATION"][-1] == "cancelled"


def test_cancel_then_verify_migrates_again_and_compares(tmp_path, guest_image):
    """cancel + verify: the row measures the cancelled migration (dirty-log
    start and stop); then the still-writing guest migrates again, to a second
    destination, that migration completes and guest RAM compares equal (dirty
    logging started, stopped and started again lost no write)."""
    out = tmp_path / "cancel-verify.csv"
    sc = Scenario(name="e2e-cancel-verify", end_action="cancel", cancel_after_s=0.3, verify=True, **SMALL)
    ctx = runner.RunContext(host=LocalHost(), out=out)
    row = asyncio.run(runner.run_one(ctx, sc, guest_image))
    assert row["status"] == "ok", row["error"]
    (got,) = results.read_rows(out)
    assert got["end_action"] == "cancel" and float(got["dirty_log_stop_ms"]) >= 0
    assert got["total_time_ms"] == "" and got["downtime_ms"] == ""       # the figures are the cancelled one's
    side = json.loads(Path(got["sidecar"]).read_text())
    pad_pages = side["ram_pad_kib"] // 4
    assert int(got["verify_pages"]) == 512 * 256 - 96 + pad_pages and got["verify_mismatch_pages"] == "0"
    statuses = [e["data"]["status"] for e in side["events"]["src"] if e["event"] == "MIGRATION"]
    assert statuses.index("cancelled") < statuses.index("completed"), statuses
    assert side["verify_migration"]["query_migrate"]["status"] == "completed"
    assert side["verify_migration"]["query_migrate"]["total-time"] > 0
    assert set(side["commands"]) == {"src", "dst", "dst2"} and side["commands"]["dst2"].endswith("-S")
    # the loops' records came from the second destination, with both classes' stalls
    assert {s["cls"] for s in side["stalls"]} == {"pio", "write"}
    assert side["qemu_exit"]["dst2"]["exit_status"] == "exited 0"
