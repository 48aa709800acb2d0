"""Find processes migstall started on this machine.

Every QEMU, sshd, dropbear and RAM hasher that migstall starts carries the token
``migstall`` in its command line (``-name migstall-...``, a path in a
``migstall-`` runtime directory, ...).  Tests use :func:`leftovers` to prove
nothing survives them.

A test session marks what it starts: it sets :data:`SESSION_ENV` in its own
environment, which every process it starts inherits (daemonized ones too).
``leftovers()`` then leaves out processes that belong to another test run, so
two suites on one machine (two clones, a developer's ``make test`` beside CI)
do not report each other's sshd or QEMU.  A process belongs to the first of
these found walking up from it through its parents: this process (the
session's pytest), a :data:`SESSION_ENV` mark (ours or another session's), or
another pytest process (sshd overwrites its own environment with its process
title, so its mark cannot be read).  A process for which none is found
(daemonized, or started through an SSH session, whose environment sshd builds
afresh) counts as ours: the check errs towards reporting.
"""

from __future__ import annotations

import os
from typing import List, Optional, Tuple

TOKEN = "migstall"
WATCHED = ("qemu-system", "sshd", "dropbear", "migstall-ramhash")
#: environment variable a test session sets to mark the processes it starts
SESSION_ENV = "MIGSTALL_TEST_SESSION"


def _session_of(pid: str) -> Optional[str]:
    """The :data:`SESSION_ENV` value a process was started with; None when it has
    none or its environment is unreadable (another user's process)."""
    key = SESSION_ENV.encode() + b"="
    try:
        with open(f"/proc/{pid}/environ", "rb") as fh:
            env = fh.read().split(b"\0")
    except OSError:
        return None
    for item in env:
        if item.startswith(key):
            return item[len(key):].decode(errors="replace")
    return None


def _ppid(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return int(fh.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return 0


def _is_pytest(pid: int) -> bool:
    """A pytest run: ``pytest``/``py.test`` as the program, or ``python -m pytest``
    (a mere argument that mentions pytest, such as a path under
    ``/tmp/pytest-of-USER``, does not count)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            argv = fh.read().split(b"\0")
    except OSError:
        return False
    if os.path.basename(argv[0]) in (b"pytest", b"py.test"):
        return True
    return any(a == b"-m" and b == b"pytest" for a, b in zip(argv, argv[1:]))


def _ours(pid: int, session: str, me: int) -> bool:
    """Whether ``pid`` belongs to the test run of ``session`` whose pytest is
    ``me`` (the walk described in the module docstring)."""
    start = pid
    for _ in range(64):  # deeper than any real process tree
        if pid <= 1:
            break
        if pid == me:
            return True
        mark = _session_of(str(pid))
        if mark is not None:
            return mark == session
        if pid != start and _is_pytest(pid):
            return False
        pid = _ppid(pid)
    return True


def leftovers(session: Optional[str] = None) -> List[Tuple[int, str]]:
    """(pid, cmdline) of live watched processes that carry the token, leaving
    out those of another test run when ``session`` (default: this process's own
    :data:`SESSION_ENV`) is set."""
    if session is None:
        session = os.environ.get(SESSION_ENV)
    me = os.getpid()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                argv = fh.read().split(b"\0")
            with open(f"/proc/{entry}/stat") as fh:
                state = fh.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state == "Z" or not argv or not argv[0]:
            continue
        exe = os.path.basename(argv[0].decode(errors="replace"))
        cmd = b" ".join(argv).decode(errors="replace")
        if any(exe.startswith(w) for w in WATCHED) and TOKEN in cmd:
            if session is not None and not _ours(int(entry), session, me):
                continue
            found.append((int(entry), cmd))
    return found
