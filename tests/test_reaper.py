"""A QEMU that dies says why: the reaper (guests/reaper/reaper.c), the host
kernel log filter and the VM's death note.

Everything here but the last test runs without QEMU: the reaper is driven by a
small Python program that daemonizes the way ``qemu -daemonize`` does (the
parent waits on a pipe for the daemon's "initialised", the intermediate exits
at once, the daemon points its stdio at /dev/null).  The last test boots a
QEMU with ``-machine none`` under TCG (no guest: about a second) and SIGKILLs it.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import List, Optional

import pytest

from harness import ctools
from harness.errors import QEMUError
from harness.hosts.base import CommandResult
from harness.hosts.kernel_log import interesting, interesting_tail, parse_uptime, problems, strip_stamp
from harness.hosts.local import LocalHost
from harness.hosts.ssh import SSHHost
from harness.qemu.machine import VM, format_death_note, log_tail, parse_exit_status

#: seconds any wait of these tests may take
WAIT_S = 20.0

# Emulates qemu -daemonize.  argv: PIDFILE MODE, MODE "run" (initialise, then
# sleep until killed) or "fail" (the daemon exits 1 before it is initialised,
# so the parent exits 1 too).
DAEMONIZE = r"""
import os, sys, time
pidfile, mode = sys.argv[1], sys.argv[2]
r, w = os.pipe()
if os.fork() > 0:                       # the parent: never reaps the intermediate
    os.close(w)
    os._exit(0 if os.read(r, 1) == b"0" else 1)
os.close(r)
os.setsid()
if os.fork() > 0:
    os._exit(0)                         # the intermediate
fd = os.open(os.devnull, os.O_RDWR)     # the daemon
for n in range(3):
    os.dup2(fd, n)
with open(pidfile + ".tmp", "w") as fh:
    fh.write(str(os.getpid()))
os.rename(pidfile + ".tmp", pidfile)
if mode == "fail":
    time.sleep(0.1)
    os._exit(1)
if mode == "stubborn":                  # a daemon that ignores SIGTERM
    import signal
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
os.write(w, b"0")
os.close(w)
time.sleep(60)
"""


@pytest.fixture(scope="module")
def reaper() -> str:
    return str(ctools.reaper())


def _reap(reaper: str, status: Path, *argv: str, env: Optional[dict] = None) -> subprocess.CompletedProcess:
    return subprocess.run([reaper, str(status), "--", *argv], capture_output=True, text=True,
                          timeout=WAIT_S, env=env)


def _wait_file(path: Path, timeout: float = WAIT_S) -> str:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} did not appear within {timeout:g}s"
        time.sleep(0.02)
    return path.read_text()


def _gone(pid: int) -> bool:
    """No process and no zombie: someone reaped it."""
    return not os.path.exists(f"/proc/{pid}")


# -- the reaper ---------------------------------------------------------------------------
def test_reaper_records_the_signal_that_killed_the_daemon(reaper, tmp_path):
    status, pidfile = tmp_path / "vm.exit", tmp_path / "vm.pid"
    t0 = time.monotonic()
    # captured stdout/stderr: returns only because the reaper lets go of them too
    res = _reap(reaper, status, sys.executable, "-c", DAEMONIZE, str(pidfile), "run")
    assert res.returncode == 0, res.stderr
    assert time.monotonic() - t0 < 10
    pid = int(pidfile.read_text())
    try:
        assert not status.exists()             # the daemon still runs
    finally:
        os.kill(pid, signal.SIGKILL)
    assert _wait_file(status) == f"pid {pid}: killed by signal 9 (SIGKILL)\n"
    assert _gone(pid)                          # reaped at once: no zombie
    assert not list(tmp_path.glob("*.tmp"))


def test_reaper_daemon_that_fails_to_initialise(reaper, tmp_path):
    status, pidfile = tmp_path / "vm.exit", tmp_path / "vm.pid"
    res = _reap(reaper, status, sys.executable, "-c", DAEMONIZE, str(pidfile), "fail")
    assert res.returncode == 1                 # the parent's status, relayed
    pid = int(pidfile.read_text())
    # the daemon's exit, not the intermediate's 0 reaped after it
    assert _wait_file(status) == f"pid {pid}: exited 1\n"


def test_reaper_shell_double_fork_killed(reaper, tmp_path):
    status, pidfile = tmp_path / "sh.exit", tmp_path / "sh.pid"
    script = '(sleep 30 </dev/null >/dev/null 2>&1 & echo $! > "$1"); exit 0'
    res = _reap(reaper, status, "sh", "-c", script, "sh", str(pidfile))
    assert res.returncode == 0, res.stderr
    pid = int(_wait_file(pidfile).strip() or 0)
    os.kill(pid, signal.SIGKILL)
    assert _wait_file(status) == f"pid {pid}: killed by signal 9 (SIGKILL)\n"


@pytest.mark.parametrize("script, code, line", [
    ("exit 0", 0, "exited 0"),
    ("exit 3", 3, "exited 3"),
    ("kill -SEGV $$", 128 + 11, "killed by signal 11 (SIGSEGV)"),
    ("kill -TERM $$", 128 + 15, "killed by signal 15 (SIGTERM)"),
])
def test_reaper_relays_the_launch_status(reaper, tmp_path, script, code, line):
    status = tmp_path / "x.exit"
    res = _reap(reaper, status, "sh", "-c", script)
    assert res.returncode == code
    if code > 128:
        assert line.split("(")[1].rstrip(")") in res.stderr
    pid, text = parse_exit_status(_wait_file(status))
    assert text.startswith(line) and pid is not None and pid > 0     # ", core dumped" may follow


def test_reaper_exec_failure(reaper, tmp_path):
    status = tmp_path / "x.exit"
    res = _reap(reaper, status, str(tmp_path / "no-such-qemu"), "-daemonize")
    assert res.returncode == 127
    assert "cannot run" in res.stderr and "no-such-qemu" in res.stderr
    assert parse_exit_status(_wait_file(status))[1] == "exited 127"


def _owned_daemon(reaper: str, tmp_path: Path, mode: str = "run"):
    """A stand-in harness (``sleep``) and a daemon started under ``--lifeline`` its pid."""
    owner = subprocess.Popen(["sleep", "120"])
    status, pidfile = tmp_path / "vm.exit", tmp_path / "vm.pid"
    res = subprocess.run([reaper, "--lifeline", str(owner.pid), str(status), "--",
                          sys.executable, "-c", DAEMONIZE, str(pidfile), mode],
                         capture_output=True, text=True, timeout=WAIT_S)
    assert res.returncode == 0, res.stderr
    return owner, status, int(pidfile.read_text())


def _wait_gone(pid: int, timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while not _gone(pid):
        assert time.monotonic() < deadline, f"pid {pid} still there after {timeout:g}s"
        time.sleep(0.02)


@pytest.mark.parametrize("mode, line", [("run", "killed by signal 15 (SIGTERM)"),
                                        ("stubborn", "killed by signal 9 (SIGKILL)")])
def test_reaper_lifeline_stops_the_daemon_when_its_owner_dies(reaper, tmp_path, mode, line):
    """A harness SIGKILLed mid-run leaves no QEMU: SIGTERM, then SIGKILL 5 s later."""
    owner, status, pid = _owned_daemon(reaper, tmp_path, mode)
    try:
        assert not status.exists()
        owner.kill()
        owner.wait(WAIT_S)
        t0 = time.monotonic()
        _wait_gone(pid)
        took = time.monotonic() - t0
        assert took < 3 if mode == "run" else 4.5 < took < 10, took
        assert _wait_file(status) == f"pid {pid}: {line}\n"
    finally:
        owner.kill()
        if not _gone(pid):
            os.kill(pid, signal.SIGKILL)


def test_reaper_lifeline_spares_a_detached_daemon(reaper, tmp_path):
    owner, status, pid = _owned_daemon(reaper, tmp_path)
    try:
        (tmp_path / "vm.exit.detached").touch()      # what VM.detach() leaves
        owner.kill()
        owner.wait(WAIT_S)
        # nothing to wait for when nothing happens: give the reaper the time it
        # needs to see its owner gone (a poll wake-up, well under 1 s)
        time.sleep(1.0)
        assert not _gone(pid) and not status.exists()
    finally:
        owner.kill()
        os.kill(pid, signal.SIGKILL)
    assert _wait_file(status) == f"pid {pid}: killed by signal 9 (SIGKILL)\n"


def test_reaper_lifeline_of_a_process_already_gone(reaper, tmp_path):
    owner = subprocess.Popen(["true"])
    owner.wait(WAIT_S)
    status, pidfile = tmp_path / "vm.exit", tmp_path / "vm.pid"
    res = subprocess.run([reaper, "--lifeline", str(owner.pid), str(status), "--",
                          sys.executable, "-c", DAEMONIZE, str(pidfile), "run"],
                         capture_output=True, text=True, timeout=WAIT_S)
    # the launcher is stopped with everything else (143 = SIGTERM), unless it was quicker
    assert res.returncode in (0, 128 + signal.SIGTERM), res.stderr
    assert "killed by signal" in _wait_file(status)      # written when nothing is left
    if pidfile.exists():
        _wait_gone(int(pidfile.read_text()))


def test_reaper_usage(reaper, tmp_path):
    res = subprocess.run([reaper, "--lifeline", "x1", str(tmp_path / "x"), "--", "true"],
                         capture_output=True, text=True, timeout=WAIT_S)
    assert res.returncode == 2 and "--lifeline wants a pid" in res.stderr
    res = subprocess.run([reaper, str(tmp_path / "x")], capture_output=True, text=True, timeout=WAIT_S)
    assert res.returncode == 2 and "usage" in res.stderr
    res = subprocess.run([reaper, str(tmp_path / "x"), "sh", "-c", "true"], capture_output=True, text=True,
                         timeout=WAIT_S)
    assert res.returncode == 2


def test_reaper_leaves_argv_env_and_signals_alone(reaper, tmp_path):
    probe = 'printf "%s|" "$FOO" "$@"; grep -E "^Sig(Ign|Blk):" /proc/$$/status | tr "\\n" "|"'
    env = dict(os.environ, FOO="bar baz")
    direct = subprocess.run(["sh", "-c", probe, "sh", "a", "b c"], capture_output=True, text=True,
                            timeout=WAIT_S, env=env)
    reaped = _reap(reaper, tmp_path / "x.exit", "sh", "-c", probe, "sh", "a", "b c", env=env)
    assert reaped.returncode == 0, reaped.stderr
    assert reaped.stdout.startswith("bar baz|a|b c|")
    assert reaped.stdout == direct.stdout


# -- kernel log ---------------------------------------------------------------------------
DMESG = """\
[    0.000000] Linux version 6.1.0-18-amd64
[    2.100000] kvm_amd: Nested Virtualization enabled
[   10.000000] random: crng init done
[  123.400000] qemu-system-x86 invoked oom-killer: gfp_mask=0x140cca(GFP_HIGHUSER_MOVABLE|__GFP_COMP), order=0
[  123.400100] CPU: 1 PID: 812 Comm: qemu-system-x86 Not tainted 6.1.0-18-amd64 #1
[  123.400200] Call Trace:
[  123.400300]  <TASK>
[  123.410000] Out of memory: Killed process 812 (qemu-system-x86) total-vm:3000000kB, anon-rss:1000000kB
[  123.420000] oom_reaper: reaped process 812 (qemu-system-x86), now anon-rss:0kB
[  130.000000] eth0: link up
"""


def test_kernel_log_since_and_interesting():
    got = interesting_tail(DMESG, since_s=100.0)
    assert [strip_stamp(x).split(":")[0] for x in got] == [
        "qemu-system-x86 invoked oom-killer", "Call Trace", "Out of memory", "oom_reaper"]
    assert got[0].startswith("[  123.400000] ")          # prefix kept
    every = interesting_tail(DMESG)
    assert "kvm_amd: Nested Virtualization enabled" in strip_stamp(every[0])
    assert interesting_tail(DMESG, since_s=200.0) == []
    assert len(interesting_tail(DMESG, lines=2)) == 2
    assert interesting_tail(DMESG, lines=2)[-1].endswith("now anon-rss:0kB")


def test_kernel_log_unstamped_lines():
    text = ("[   5.0] kvm: old\n[  50.0] traps: qemu-system-x86[900] general protection fault ip:1 sp:2\n"
            "segfault at 0 ip 0000 sp 0000 error 4 in qemu-system-x86_64\n")
    got = interesting_tail(text, since_s=10.0)
    assert len(got) == 2 and got[1].startswith("segfault")   # goes with the last stamped line
    nostamp = "kvm: something\nWARNING: CPU: 0 PID: 1 at arch/x86/kvm/x86.c:1 foo\nhello\n"
    assert interesting_tail(nostamp, since_s=1e9) == nostamp.splitlines()[:2]


@pytest.mark.parametrize("line, want", [
    ("[  1.0] BUG: kernel NULL pointer dereference, address: 0000000000000000", True),
    ("[  1.0] Oops: 0000 [#1] PREEMPT SMP NOPTI", True),
    ("[  1.0] ------------[ cut here ]------------", True),
    ("[  1.0] qemu-system-x86[1234]: segfault at 8 ip 00005634 sp 00007ffd error 4", True),
    ("[  1.0] debug: nothing to see", False),
    ("[  1.0] EXT4-fs (vda): mounted filesystem", False),
])
def test_kernel_log_interesting(line, want):
    assert interesting(line) is want


@pytest.mark.parametrize("line, fails", [
    ("[  1.0] WARNING: CPU: 1 PID: 812 at arch/x86/kvm/mmu/mmu.c:6100 kvm_mmu_zap_all+0x5/0x10 [kvm]", True),
    ("[  1.0] BUG: kernel NULL pointer dereference, address: 0000000000000000", True),
    ("[  1.0] watchdog: BUG: soft lockup - CPU#1 stuck for 22s! [qemu-system-x86:1]", True),
    ("[  1.0] Oops: 0000 [#1] PREEMPT SMP NOPTI", True),
    ("[  1.0] KVM: internal error: emulation failure", True),
    ("[  1.0] kvm_amd: kvm_set_msr_common failed", True),
    # KVM's informational line whenever a guest touches an MSR it does not emulate
    ("[  1.0] kvm [664]: vcpu0, guest rIP: 0xffffffffaf07e744 Unhandled WRMSR(0xc0010007) = 0xffff", False),
    ("[  1.0] kvm_amd: Nested Virtualization enabled", False),
    ("[  1.0] Out of memory: Killed process 812 (qemu-system-x86)", False),
])
def test_kernel_log_problems(line, fails):
    assert problems([line]) == ([line] if fails else [])


def test_parse_uptime():
    assert parse_uptime("123.45 200.00\n") == 123.45
    assert parse_uptime("") is None and parse_uptime("x y") is None
    assert LocalHost().uptime_s() > 0
    assert LocalHost().kernel_log_tail() == []


class _FakeSSH(SSHHost):
    """An SSHHost whose commands are answered from a table (no connection)."""

    def __init__(self, answers: dict) -> None:
        super().__init__("fake.invalid", connect=False)
        self.answers = answers
        self.calls: List[tuple] = []

    def run(self, argv, *, timeout=60.0, input=None, check=True, env=None):
        self.calls.append((tuple(argv), timeout))
        ans = self.answers[argv[0]]
        if isinstance(ans, BaseException):
            raise ans
        return CommandResult(tuple(argv), ans[0], ans[1].encode(), ans[2].encode())


def test_ssh_kernel_log_tail():
    host = _FakeSSH({"dmesg": (0, DMESG, ""), "cat": (0, "100.5 3.0\n", "")})
    assert host.uptime_s() == 100.5
    got = host.kernel_log_tail(since_s=host.uptime_s(), lines=3)
    assert len(got) == 3 and "Out of memory" in got[1]
    assert all(argv == ("dmesg",) and 0 < t <= 60 for argv, t in host.calls if argv[0] == "dmesg")
    assert _FakeSSH({"dmesg": (1, "", "dmesg: klogctl: Operation not permitted")}).kernel_log_tail() == []
    assert _FakeSSH({"dmesg": OSError("gone")}).kernel_log_tail() == []
    assert _FakeSSH({"cat": OSError("gone")}).uptime_s() is None


# -- the death note -------------------------------------------------------------------------
QEMU_LOG = """\
2024-05-01T10:00:00.100000Z qemu-system-x86_64: warning: host doesn't support requested feature
12345@1795588999.697039:kvm_set_user_memory Slot#0 flags=0x1 gpa=0x0 size=0x8000000 ua=0x7f errno=0
12345@1795588999.697100:global_dirty_changed dirty log 0x1

2024-05-01T10:00:01.000000Z qemu-system-x86_64: terminating on signal 15 from pid 1 (init)
12345@1795589000.000000:migration_bitmap_sync_start
"""


def test_parse_exit_status():
    assert parse_exit_status("pid 42: killed by signal 9 (SIGKILL)\n") == (42, "killed by signal 9 (SIGKILL)")
    assert parse_exit_status("pid 7: exited 1\n") == (7, "exited 1")
    assert parse_exit_status("") == (None, "")
    assert parse_exit_status("garbage\n") == (None, "garbage")


def test_log_tail_skips_trace_lines():
    tail = log_tail(QEMU_LOG)
    assert len(tail) == 2 and tail[-1].endswith("terminating on signal 15 from pid 1 (init)")
    assert log_tail(QEMU_LOG, 1) == tail[-1:]
    assert log_tail("") == []


def test_format_death_note():
    kern = ["[  123.410000] Out of memory: Killed process 812 (qemu-system-x86) total-vm:3000000kB"]
    note = format_death_note("the source QEMU", "killed by signal 9 (SIGKILL)", log_tail(QEMU_LOG), kern)
    assert note.startswith("the source QEMU was killed by signal 9 (SIGKILL); its log ends: ")
    assert "qemu-system-x86_64: terminating on signal 15" in note and "2024-05-01T" not in note
    assert note.endswith("; host kernel: Out of memory: Killed process 812 (qemu-system-x86) total-vm:3000000kB")
    assert "\n" not in note
    assert format_death_note("QEMU x", "exited 1") == "QEMU x exited with status 1"
    assert format_death_note("QEMU x", "") == "QEMU x had exited unexpectedly (no exit status recorded)"
    long = format_death_note("q", "exited 1", ["x" * 1000])
    assert len(long) < 300 and long.endswith("...")
    # a guest that reset itself under -no-reboot: QEMU exits 0 after SHUTDOWN
    reset = {"event": "SHUTDOWN", "data": {"guest": True, "reason": "guest-reset"}}
    assert format_death_note("QEMU x", "exited 0", ["Broken pipe"], shutdown=reset) == (
        "QEMU x exited with status 0 after QMP SHUTDOWN guest-reset: the guest reset itself "
        "(a triple fault, or a guest panic with panic=-1); its log ends: Broken pipe")
    host = {"event": "SHUTDOWN", "data": {"guest": False, "reason": "host-qmp-quit"}}
    assert format_death_note("QEMU x", "exited 0", shutdown=host) == \
        "QEMU x exited with status 0 after QMP SHUTDOWN host-qmp-quit"


def test_vm_death_note_and_exit_info():
    vm = VM(LocalHost(), "t-src", [])
    vm.exit_reason, vm.exit_status, vm.exit_pid, vm.pid = "died", "killed by signal 9 (SIGKILL)", 5, 5
    vm.log_tail = log_tail(QEMU_LOG)
    assert vm.death_note().startswith("QEMU t-src was killed by signal 9 (SIGKILL); its log ends:")
    assert vm.death_note("the source QEMU").startswith("the source QEMU was killed")
    info = vm.exit_info()
    assert info["exit_status"] == "killed by signal 9 (SIGKILL)" and info["exit_reason"] == "died"
    assert info["log_tail"] == vm.log_tail and info["host_kernel_log"] == []


def test_vm_waits_for_the_status_file(tmp_path):
    vm = VM(LocalHost(), "t", [], runtime_dir=str(tmp_path), exit_status_timeout=WAIT_S)
    vm.pid = 99

    def write_later() -> None:
        time.sleep(0.3)
        (tmp_path / "t.exit.tmp").write_text("pid 99: exited 2\n")
        (tmp_path / "t.exit.tmp").rename(tmp_path / "t.exit")

    writer = threading.Thread(target=write_later)
    writer.start()
    t0 = time.monotonic()
    vm._read_exit_status(vm.exit_status_timeout)
    writer.join()
    assert vm.exit_status == "exited 2" and vm.exit_pid == 99
    assert 0.2 < time.monotonic() - t0 < WAIT_S
    late = VM(LocalHost(), "late", [], runtime_dir=str(tmp_path))
    t0 = time.monotonic()
    late._read_exit_status(0.2)                    # bounded: nobody writes it
    assert late.exit_status == "" and time.monotonic() - t0 < 5


# -- a real QEMU ------------------------------------------------------------------------------
needs_qemu = pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="needs qemu-system-x86")
NONE_MACHINE = ["-machine", "none", "-accel", "tcg", "-nodefaults", "-no-user-config"]


@needs_qemu
def test_sigkilled_qemu_says_so(tmp_path):
    async def scenario() -> VM:
        vm = VM(LocalHost(), "reapertest-src", NONE_MACHINE, log_dir=tmp_path, launch_timeout=60)
        async with vm:
            assert Path(vm.argv[0]).name == ctools.reaper().name
            assert vm.argv[1:5] == ["--lifeline", str(os.getpid()), vm.exit_status_path, "--"]
            await vm.cmd("query-status")
            vm.host.signal(vm.pid, signal.SIGKILL)
            with pytest.raises(QEMUError):
                await vm.wait_event("NEVER", timeout=WAIT_S)
        return vm

    vm = asyncio.run(scenario())
    assert vm.exit_reason == "died"
    assert vm.exit_status == "killed by signal 9 (SIGKILL)" and vm.exit_pid == vm.pid
    note = vm.death_note("the source QEMU")
    assert note.startswith("the source QEMU was killed by signal 9 (SIGKILL)"), note
    assert vm.exit_info()["exit_status"] == "killed by signal 9 (SIGKILL)"
    assert _gone(vm.pid)


@needs_qemu
def test_expected_exit_is_not_a_death(tmp_path, caplog):
    """A cancelled migration's destination exits by itself: after ``expect_exit`` that is
    recorded as "exited", with no warning and no death note."""
    async def scenario() -> VM:
        vm = VM(LocalHost(), "reapertest-dst", NONE_MACHINE, log_dir=tmp_path, launch_timeout=60)
        async with vm:
            await vm.cmd("query-status")
            vm.expect_exit("the migration was cancelled")
            vm.host.signal(vm.pid, signal.SIGTERM)
            assert await asyncio.to_thread(vm.host.wait_pid_exit, vm.pid, WAIT_S)
        return vm

    with caplog.at_level("WARNING", logger="harness.qemu.machine"):
        vm = asyncio.run(scenario())
    assert vm.exit_reason == "exited" and not vm.log_tail
    assert not [r for r in caplog.records if r.levelname == "WARNING"], caplog.text
    assert _gone(vm.pid)


# A harness that launches a QEMU, prints its pid, then waits to be killed.  Its
# runtime dir is under the test's tmp_path: killed, it cannot remove one of its own.
OWNER = r"""
import asyncio, os, sys, time
from harness.hosts.local import LocalHost
from harness.qemu.machine import VM
async def main():
    rundir = os.path.join(sys.argv[1], "run")
    os.mkdir(rundir, 0o700)
    vm = VM(LocalHost(), "lifeline", sys.argv[2:], log_dir=sys.argv[1], runtime_dir=rundir, launch_timeout=60)
    await vm.launch()
    print(vm.pid, flush=True)
    await asyncio.sleep(3600)
asyncio.run(main())
"""


@needs_qemu
def test_sigkilled_harness_leaves_no_qemu(tmp_path):
    """DEVELOPERS: nothing left running.  A harness killed with SIGKILL runs no
    cleanup at all; the reaper's lifeline stops its QEMU."""
    owner = subprocess.Popen([sys.executable, "-c", OWNER, str(tmp_path), *NONE_MACHINE],
                             stdout=subprocess.PIPE, text=True, cwd=str(Path(__file__).resolve().parent.parent))
    try:
        assert owner.stdout is not None
        pid = int(owner.stdout.readline())           # QEMU is up
        assert LocalHost().pid_alive(pid)
    finally:
        owner.kill()
        owner.wait(WAIT_S)
    _wait_gone(pid)


@needs_qemu
def test_quit_qemu_exits_0_and_bad_device_names_its_error(tmp_path):
    async def scenario() -> tuple:
        # composes with an exec prefix (the THP wrapper of --backing anon): the reaper goes first
        ok = VM(LocalHost(), "reapertest-ok", NONE_MACHINE, log_dir=tmp_path, prefix=(str(ctools.nothp_wrapper()),))
        async with ok:
            await ok.cmd("query-status")
            assert Path(ok.argv[ok.argv.index("--") + 1]).name == ctools.nothp_wrapper().name
        bad = VM(LocalHost(), "reapertest-bad", [*NONE_MACHINE, "-device", "no-such-device-model"],
                 log_dir=tmp_path)
        with pytest.raises(QEMUError) as info:
            async with bad:
                pass
        return ok, bad, info.value

    ok, bad, exc = asyncio.run(scenario())
    assert ok.exit_reason == "quit" and ok.exit_status == "exited 0" and ok.exit_pid == ok.pid
    assert ok.death_note() == "QEMU reapertest-ok exited with status 0 after QMP SHUTDOWN host-qmp-quit"
    assert "failed to start (exit 1)" in str(exc)
    assert "no-such-device-model" in str(exc)    # from its -D log: QEMU's stderr is there
    if bad.exit_reason == "died":             # its pidfile was written before the error
        assert bad.exit_status == "exited 1"
        assert "no-such-device-model" in bad.death_note(), (bad.death_note(), bad.log_text)


@needs_qemu
@pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/usr/sbin/sshd"), reason="needs root and openssh-server")
def test_sigkilled_qemu_over_ssh_says_so(tmp_path):
    """The same through SSHHost (as on an SSH or the virtual host): the reaper is
    staged, the launch's SSH channel ends, status and kernel log are read remotely."""
    from test_ssh import Sshd            # the real sshd on 127.0.0.1 of test_ssh.py

    server = Sshd(tmp_path)
    try:
        with server.host() as host:
            async def scenario() -> VM:
                vm = VM(host, "reapertest-ssh", NONE_MACHINE, launch_timeout=60)
                t0 = time.monotonic()
                async with vm:
                    assert time.monotonic() - t0 < 30      # the channel saw EOF: no launch timeout
                    assert "/.cache/migstall/stage/" in vm.argv[0]
                    await vm.cmd("query-status")
                    host.signal(vm.pid, signal.SIGKILL)
                    with pytest.raises(QEMUError):
                        await vm.wait_event("NEVER", timeout=WAIT_S)
                return vm

            vm = asyncio.run(scenario())
    finally:
        server.stop()
    assert vm.launch_uptime_s is not None and vm.launch_uptime_s > 0
    assert vm.exit_reason == "died" and vm.exit_pid == vm.pid
    assert vm.death_note().startswith("QEMU reapertest-ssh was killed by signal 9 (SIGKILL)"), vm.death_note()
    assert _gone(vm.pid)


def test_console_note_names_the_panic(tmp_path):
    from harness.hosts.kernel_log import console_note

    log = tmp_path / "console.log"
    log.write_text("[    1.0] booting\n"
                   "[  102.7] rcu: INFO: rcu_preempt detected stalls on CPUs/tasks:\n"
                   "[  103.0] BUG: kernel NULL pointer dereference, address: 0000000000000008\n"
                   "[  103.1] RIP: 0010:update_curr+0x1c/0x1f0\n"
                   "[  103.2] Kernel panic - not syncing: Fatal exception in interrupt\n")
    note = console_note(log, "virtual:debian")
    assert note == (f"virtual:debian stopped answering; its console ({log}) ends: "
                    "rcu: INFO: rcu_preempt detected stalls on CPUs/tasks: | "
                    "BUG: kernel NULL pointer dereference, address: 0000000000000008 | "
                    "Kernel panic - not syncing: Fatal exception in interrupt")
    quiet = tmp_path / "quiet.log"
    quiet.write_text("migstall-init: sshd up\n")
    assert console_note(quiet, "l1").endswith("ends: migstall-init: sshd up")
    assert console_note(tmp_path / "missing.log", "l1") == ""


def test_ssh_host_lost_note_only_when_the_connection_is_gone(tmp_path):
    from harness.hosts.ssh import SSHHost

    log = tmp_path / "console.log"
    log.write_text("[  5.0] watchdog: BUG: soft lockup - CPU#1 stuck for 26s! [sh:325]\n")
    host = SSHHost("127.0.0.1", port=1, name="virtual", connect=False)
    assert host.lost_note() == ""                          # no console known
    host.console_path = str(log)
    assert host.lost_note().endswith("ends: watchdog: BUG: soft lockup - CPU#1 stuck for 26s! [sh:325]")


def test_keep_console(tmp_path, monkeypatch):
    from harness.hosts import virtual

    monkeypatch.setenv("MIGSTALL_CACHE", str(tmp_path / "cache"))
    work = tmp_path / "work"
    work.mkdir()
    assert virtual.keep_console(work) is None
    (work / "console.log").write_text("Kernel panic\n")
    kept = virtual.keep_console(work)
    assert kept is not None and kept.read_text() == "Kernel panic\n" and kept.parent.name == "logs"
