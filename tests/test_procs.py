"""harness.procs: the leftover finder, and its per-session marks."""

from __future__ import annotations

import os
import signal
import subprocess
import time
import sys

from harness import procs


#: how long an exec may take to show its argv in /proc, or a SIGKILLed process to exit
#: (microseconds on an idle host)
EXEC_TIMEOUT_S = 10.0


def _wait_dead(pid: int) -> None:
    """Until ``pid`` has exited (gone, or a zombie): a SIGKILLed process is still
    running for a moment, and the autouse leftover check would count it."""
    deadline = time.monotonic() + EXEC_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as fh:
                if fh.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return
        except OSError:
            return
        time.sleep(0.001)
    raise AssertionError(f"process {pid} still runs {EXEC_TIMEOUT_S} s after SIGKILL")


def _fake_sshd(mark):
    """A sleep whose argv[0] looks like a migstall sshd, started with ``mark``
    (None: without any session mark)."""
    env = {k: v for k, v in os.environ.items() if k != procs.SESSION_ENV}
    if mark is not None:
        env[procs.SESSION_ENV] = mark
    proc = subprocess.Popen(["sshd-migstall-fake", "60"], executable="/bin/sleep", env=env)
    # Popen returns once exec has closed the child's CLOEXEC pipe, which the kernel does
    # before it sets up the new argv: for a moment /proc/PID/cmdline is still empty
    # (CI run 84 scanned in that moment and found neither process)
    deadline = time.monotonic() + EXEC_TIMEOUT_S
    while time.monotonic() < deadline:
        with open(f"/proc/{proc.pid}/cmdline", "rb") as fh:
            if fh.read().startswith(b"sshd-migstall-fake"):
                return proc
        time.sleep(0.001)
    proc.kill()
    proc.wait()
    raise AssertionError(f"the fake sshd's argv did not show in /proc within {EXEC_TIMEOUT_S} s")


def test_other_sessions_processes_are_not_ours():
    other, unmarked = _fake_sshd("another-session"), _fake_sshd(None)
    try:
        mine = {pid for pid, _ in procs.leftovers("this-session")}
        assert other.pid not in mine
        assert unmarked.pid in mine, "a process without a mark must still count"
        assert other.pid in {pid for pid, _ in procs.leftovers("another-session")}
    finally:
        for p in (other, unmarked):
            p.kill()
            p.wait()
    assert not {other.pid, unmarked.pid} & {pid for pid, _ in procs.leftovers()}


def test_processes_under_another_pytest_are_not_ours():
    """sshd overwrites its environment with its process title, so its mark is
    unreadable: it belongs to the other pytest it runs under."""
    env = {k: v for k, v in os.environ.items() if k != procs.SESSION_ENV}
    code = ("import subprocess, sys\n"
            "p = subprocess.Popen(['sshd-migstall-fake', '60'], executable='/bin/sleep')\n"
            "print(p.pid, flush=True)\n"
            "p.wait()\n")
    # argv[0] "pytest": what another run's pytest looks like; a mere argument naming pytest
    # (a path under /tmp/pytest-of-USER) must not count, see the second parent
    parent = subprocess.Popen(["pytest", "-c", code], executable=sys.executable, env=env,
                              stdout=subprocess.PIPE, text=True)
    lookalike = subprocess.Popen([sys.executable, "-c", code, "/tmp/pytest-of-root/x"], env=env,
                                 stdout=subprocess.PIPE, text=True)
    children = []
    try:
        children = [int(parent.stdout.readline()), int(lookalike.stdout.readline())]
        mine = {pid for pid, _ in procs.leftovers("this-session")}
        assert children[0] not in mine
        assert children[1] in mine, "an argument that mentions pytest is not a pytest run"
    finally:
        for p in (parent, lookalike):
            p.kill()
            p.wait()
        for child in children:
            os.kill(child, signal.SIGKILL)
        for child in children:      # gone, or a zombie init reaps later, before the leftover check
            _wait_dead(child)
