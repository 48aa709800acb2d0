"""harness.procs: the leftover finder, and its per-session marks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from harness import procs


def _fake_sshd(mark):
    """A sleep whose argv[0] looks like a migstall sshd, started with ``mark``
    (None: without any session mark)."""
    env = {k: v for k, v in os.environ.items() if k != procs.SESSION_ENV}
    if mark is not None:
        env[procs.SESSION_ENV] = mark
    return subprocess.Popen(["sshd-migstall-fake", "60"], executable="/bin/sleep", env=env)


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
    parent = subprocess.Popen([sys.executable, "-c", code, "pytest-of-another-run"], env=env,
                              stdout=subprocess.PIPE, text=True)
    try:
        child = int(parent.stdout.readline())
        assert child not in {pid for pid, _ in procs.leftovers("this-session")}
    finally:
        parent.kill()
        parent.wait()
        os.kill(child, signal.SIGKILL)
