"""Faults on a real QEMU: each gives a failed row with an error, and no process
is left (the autouse fixture in conftest.py checks that after every test)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness import procs, results, runner
from harness.hosts.local import LocalHost
from harness.scenario import Scenario

REPO = Path(__file__).resolve().parent.parent
SMALL = dict(mem_mib=512, vcpus=2, accel="tcg", touch_mib=200, baseline_s=0.5,
             ready_timeout_s=240.0, migration_timeout_s=120.0)


def _mine(run_id: str):
    return [p for p, cmd in procs.leftovers() if run_id in cmd]


def test_destination_killed_mid_migration(tmp_path, guest_image):
    out = tmp_path / "f.csv"
    seen = {}

    async def kill_destination(point, vms):
        if point == "migrating":
            dst = vms["dst"]
            seen["dst_pid"] = dst.pid
            dst.host.signal(dst.pid, signal.SIGKILL)

    ctx = runner.RunContext(host=LocalHost(), out=out, hook=kill_destination)
    row = asyncio.run(runner.run_one(ctx, Scenario(name="fault-dst", **SMALL), guest_image))
    assert seen.get("dst_pid")
    (got,) = results.read_rows(out)
    assert got["status"] == "failed"
    assert "migration" in got["error"].lower(), got["error"]
    assert got["guest_mem_mib"] == "512" and got["dirty_log_start_ms"] == ""
    assert Path(got["sidecar"]).is_file()
    assert not _mine(row["run_id"])


def test_destination_guest_that_does_not_run_fails_the_row(tmp_path, guest_image):
    """A migration that completes but leaves no running guest is a failure: the
    destination's probe must echo a mark, and the error says what its vCPUs do
    (here the destination is paused by QMP ``stop`` right after ``completed``)."""
    out = tmp_path / "f.csv"

    async def stop_destination(point, vms):
        if point == "completed":
            await vms["dst"].cmd("stop")

    ctx = runner.RunContext(host=LocalHost(), out=out, hook=stop_destination)
    row = asyncio.run(runner.run_one(ctx, Scenario(name="fault-dst-stopped", **SMALL), guest_image))
    (got,) = results.read_rows(out)
    assert got["status"] == "failed"
    assert "the migrated guest does not answer on the destination" in got["error"], got["error"]
    assert "QEMU paused; vCPU0 " in got["error"] and "RIP 0x" in got["error"], got["error"]
    side = json.loads(Path(got["sidecar"]).read_text())
    stuck = side["stuck"]
    assert stuck["status"] == "paused" and len(stuck["vcpus"]) == 2 and "RIP=" in stuck["registers"]
    assert [set(a) for a in stuck["lapic"]] == [{"isr", "irr", "text"}] * 2, stuck.get("lapic")
    assert not _mine(row["run_id"])


def test_guest_never_ready_times_out(tmp_path, guest_image):
    out = tmp_path / "f.csv"
    sc = Scenario(name="fault-ready", **{**SMALL, "ready_timeout_s": 1.0})
    t0 = time.monotonic()
    row = asyncio.run(runner.run_one(runner.RunContext(host=LocalHost(), out=out), sc, guest_image))
    assert time.monotonic() - t0 < 60
    (got,) = results.read_rows(out)
    assert got["status"] == "failed"
    assert "READY" in got["error"] or "hello" in got["error"], got["error"]
    # and what the guest was doing instead (harness.qemu.stuck): TCG, no KVM counters
    assert "QEMU running; vCPU0 " in got["error"] and "RIP 0x" in got["error"], got["error"]
    # the stages up to the one that failed are timed
    side = json.loads(Path(got["sidecar"]).read_text())
    stages = side["stages"]
    assert set(stages) == {"plan", "boot", "ready"} and stages["boot"] + stages["ready"] >= 1.0, stages
    assert not _mine(row["run_id"])


@pytest.mark.parametrize("sig,sigint_ignored", [(signal.SIGINT, False), (signal.SIGTERM, False),
                                                (signal.SIGTERM, True), (signal.SIGHUP, False)],
                         ids=["SIGINT", "SIGTERM", "SIGTERM-with-SIGINT-ignored", "SIGHUP"])
def test_sigint_cleans_up_and_writes_failed_row(tmp_path, sig, sigint_ignored):
    """Ctrl-C, and SIGTERM the same way: everything stopped, the row written.
    SIGTERM works too where SIGINT is ignored, as in a background job of a
    non-interactive shell (``cmd &`` in a script).  SIGHUP (the terminal went
    away) too: it used to kill migstall at once and leave its VMs running."""
    out = tmp_path / "int.csv"
    env = dict(os.environ, CI="true")
    argv = [sys.executable, "-m", "harness", "-v", "run", "--name", "sigint", "--accel", "tcg", "--mem", "512M",
            "--touch", "200", "--out", str(out)]
    if sigint_ignored:        # started the way a script's `cmd &` is: SIGINT ignored, inherited over exec
        argv = ["sh", "-c", 'trap "" INT; exec "$@"', "sh", *argv]
    # SIGHUP as a terminal would deliver it: default disposition in the child even when
    # this suite runs under nohup (an ignored SIGHUP is inherited, and migstall keeps it so)
    hup_default = (lambda: signal.signal(signal.SIGHUP, signal.SIG_DFL)) if sig == signal.SIGHUP else None
    proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=hup_default)
    try:
        # wait until the source QEMU runs (its pid is logged), then interrupt
        deadline = time.monotonic() + 120
        for line in proc.stderr:
            if "-src: pid" in line or time.monotonic() > deadline:
                break
        proc.send_signal(sig)
        rc = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert rc == 130
    (got,) = results.read_rows(out)
    assert got["status"] == "failed" and "interrupted" in got["error"]
    assert not [p for p, cmd in procs.leftovers() if "-sigint-" in cmd]


def test_source_qemu_dies(tmp_path, guest_image):
    out = tmp_path / "f.csv"

    async def kill_source(point, vms):
        if point == "ready":
            src = vms["src"]
            src.host.signal(src.pid, signal.SIGKILL)

    ctx = runner.RunContext(host=LocalHost(), out=out, hook=kill_source)
    t0 = time.monotonic()
    row = asyncio.run(runner.run_one(ctx, Scenario(name="fault-src", **SMALL), guest_image))
    assert time.monotonic() - t0 < 120
    (got,) = results.read_rows(out)
    assert got["status"] == "failed" and got["error"], got
    assert got["touched_mib"] != ""          # what was measured before the fault is kept
    assert not _mine(row["run_id"])
