"""Find processes migstall started on this machine.

Every QEMU, sshd, dropbear and RAM hasher that migstall starts carries the token
``migstall`` in its command line (``-name migstall-...``, a path in a
``migstall-`` runtime directory, ...).  Tests use :func:`leftovers` to prove
nothing survives them.

A test session marks what it starts: it sets :data:`SESSION_ENV` in its own
environment, which every process it starts inherits (daemonized ones too).
``leftovers(session=...)`` then leaves out processes that carry *another*
session's mark, so two test runs on one machine (two clones, a developer's
``make test`` beside CI) do not report each other's sshd or QEMU.  Processes
with no mark (started through an SSH session, whose environment sshd builds
afresh) are still counted.
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


def leftovers(session: Optional[str] = None) -> List[Tuple[int, str]]:
    """(pid, cmdline) of live watched processes that carry the token.
    Processes marked by a test session other than ``session`` (default: this
    process's own :data:`SESSION_ENV`, if it has one) are left out."""
    if session is None:
        session = os.environ.get(SESSION_ENV)
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
            if session is not None and _session_of(entry) not in (None, session):
                continue
            found.append((int(entry), cmd))
    return found
