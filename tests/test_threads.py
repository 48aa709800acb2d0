"""Where the vCPU threads spent a span (harness.measure.threads): the parsing,
the split, the plain words, and the run table's line for a long stall; then a
real TCG run with a stall injected in its baseline, as a long stall of the
issue-12 kind would be, and what the row says about it."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import time

import pytest

from harness import runtable
from harness.hosts.local import LocalHost
from harness.measure import threads

SCHEDSTAT = ("101\tqemu-system-x86\t5000000 1000000 10\n"
             "102\tCPU 0/TCG\t900000000 50000000 300\n"
             "103\tCPU 1/TCG\t800000000 0 200\n"
             "junk line\n")


def test_parse_keeps_well_formed_lines():
    got = threads.parse(SCHEDSTAT)
    assert [t.name for t in got] == ["qemu-system-x86", "CPU 0/TCG", "CPU 1/TCG"]
    assert got[1] == threads.ThreadStat(102, "CPU 0/TCG", 900000000, 50000000)


def test_split_run_wait_blocked_and_the_worst_vcpu():
    a = threads.Sample(0, threads.parse(SCHEDSTAT))
    later = SCHEDSTAT.replace("900000000 50000000", "1100000000 850000000").replace("800000000 0", "1700000000 0")
    b = threads.Sample(1_000_000_000, threads.parse(later) + (threads.ThreadStat(104, "CPU 2/TCG", 5, 5),))
    s = {x.name: x for x in threads.split(a, b)}
    assert set(s) == {"qemu-system-x86", "CPU 0/TCG", "CPU 1/TCG"}     # 104 was not in the first sample
    assert (s["CPU 0/TCG"].run_ms, s["CPU 0/TCG"].wait_ms, s["CPU 0/TCG"].blocked_ms) == (200.0, 800.0, 0.0)
    assert (s["CPU 1/TCG"].run_ms, s["CPU 1/TCG"].wait_ms, s["CPU 1/TCG"].blocked_ms) == (900.0, 0.0, 100.0)
    assert threads.worst(tuple(s.values())) == (800.0, 100.0)        # the main thread is not a vCPU
    assert threads.split(None, b) == () and threads.worst(()) == (None, None)


def test_why_names_the_larger_part():
    assert "busy" in threads.why(2000, 1500, 100)
    assert "blocked or stopped" in threads.why(2000, 100, 1800)
    assert "inside the guest" in threads.why(2000, 100, 100)
    assert "no scheduler statistics" in threads.why(2000, None, None)


def test_table_explains_each_stall_of_a_second_or_more():
    rows = [{"scenario": "demo", "repeat": "1", "accel": "tcg", "status": "ok", "baseline_stall_max_us": "7659067",
             "before_vcpu_wait_ms": "7400", "before_vcpu_blocked_ms": "10", "stall_pio_max_us": "20000"},
            {"scenario": "demo", "repeat": "2", "accel": "tcg", "status": "ok", "baseline_stall_max_us": "3000"}]
    lines = runtable.long_stall_lines(rows)
    assert lines == ["demo r1: baseline stall of 7.66 s; from READY to migrate, a vCPU thread waited up to 7.40 s "
                     "for a host CPU and was blocked up to 0.01 s: the host's CPUs were busy with other work."]
    assert lines[0] in runtable.to_text(rows)


def test_sample_reads_this_process():
    got = threads.sample(LocalHost(), os.getpid())
    assert got is not None and any(t.tid == os.getpid() for t in got.threads)
    assert threads.sample(LocalHost(), 0) is None


def _run_with(tmp_path, guest_image, inject):
    from harness import results, runner
    from harness.scenario import Scenario

    async def hook(point, vms):
        if point == "baseline":
            await asyncio.to_thread(inject, vms["src"].pid)

    sc = Scenario(name="threads", mem_mib=512, vcpus=2, accel="tcg", touch_mib=64, baseline_s=1.0,
                  ready_timeout_s=240.0, migration_timeout_s=180.0)
    out = tmp_path / "threads.csv"
    row = asyncio.run(runner.run_one(runner.RunContext(host=LocalHost(), out=out, hook=hook), sc, guest_image))
    assert row["status"] == "ok", row["error"]
    (got,) = results.read_rows(out)
    return got


def test_a_stopped_qemu_reads_as_blocked(tmp_path, guest_image):
    """SIGSTOP of the source QEMU for 1.5 s inside the baseline window: a stall
    of about 1.5 s there, and the vCPU threads were blocked (not waiting for a
    CPU) for about as long."""
    def stop(pid):
        os.kill(pid, signal.SIGSTOP)
        time.sleep(1.5)
        os.kill(pid, signal.SIGCONT)

    row = _run_with(tmp_path, guest_image, stop)
    assert float(row["baseline_stall_max_us"]) >= 1.3e6
    blocked, wait = float(row["before_vcpu_blocked_ms"]), float(row["before_vcpu_wait_ms"])
    assert blocked >= 1300 and wait < blocked, (blocked, wait)
    assert float(row["window_vcpu_blocked_ms"]) >= 0
    (line,) = [ln for ln in runtable.long_stall_lines([row]) if "baseline" in ln]
    assert "blocked or stopped" in line


def _can_run_realtime() -> bool:
    return all(shutil.which(t) for t in ("chrt", "taskset", "prlimit")) and \
        subprocess.run(["prlimit", "--rttime=1000000", "chrt", "-f", "10", "true"], capture_output=True).returncode == 0


@pytest.mark.skipif(not _can_run_realtime(), reason="needs chrt, taskset and prlimit, and the right to use SCHED_FIFO")
def test_a_busy_host_reads_as_waiting(tmp_path, guest_image):
    """The source QEMU's threads confined to one CPU on which a real-time hog
    spins for 1.5 s inside the baseline window: the vCPU threads were runnable
    and waited for that CPU (the kernel leaves 5 % of each second to other
    classes, so the loops see gaps of up to 0.95 s, not one of 1.5 s)."""
    def hog(pid):
        subprocess.run(["taskset", "-a", "-p", "-c", "0", str(pid)], check=True, capture_output=True)
        # stopped from here (CPU 1): a timer on CPU 0 could not preempt the hog.  RLIMIT_RTTIME
        # kills it anyway after 3 s of real-time CPU should this process die first
        spin = subprocess.Popen(["prlimit", "--rttime=2500000:3000000", "chrt", "-f", "10", "taskset", "-c", "0",
                                 "sh", "-c", "while :; do :; done"], stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            time.sleep(1.5)
        finally:
            spin.kill()
            spin.wait(timeout=30)

    row = _run_with(tmp_path, guest_image, hog)
    assert float(row["baseline_stall_max_us"]) >= 0.5e6
    wait, blocked = float(row["before_vcpu_wait_ms"]), float(row["before_vcpu_blocked_ms"])
    assert wait >= 1000 and wait > blocked, (wait, blocked)
    assert "busy" in threads.why(1500, wait, blocked)
