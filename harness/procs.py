"""Find processes migstall started on this machine.

Every QEMU, sshd, dropbear and RAM hasher that migstall starts carries the token
``migstall`` in its command line (``-name migstall-...``, a path in a
``migstall-`` runtime directory, ...).  Tests use :func:`leftovers` to prove
nothing survives them.
"""

from __future__ import annotations

import os
from typing import List, Tuple

TOKEN = "migstall"
WATCHED = ("qemu-system", "sshd", "dropbear", "migstall-ramhash")


def leftovers() -> List[Tuple[int, str]]:
    """(pid, cmdline) of live watched processes that carry the token."""
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
            found.append((int(entry), cmd))
    return found
