"""The interesting tail of a host's kernel log (``dmesg``), for error messages.

When a QEMU dies on a virtual or SSH host, the reason is often in that host's
kernel log: the OOM killer, a segfault, a KVM warning, an oops.
:func:`interesting_tail` keeps the lines that say so, after a boot-time mark.

Lines are matched by content, not by syslog level (busybox ``dmesg`` in the
virtual host has neither ``--level`` nor ``--since``).  Time: a line's
``[  123.456789]`` prefix is seconds since boot (the printk clock), compared
with ``since_s``, a reading of ``/proc/uptime`` taken before the event (the
two clocks agree to well under a second without suspend).  Lines without the
prefix (continuations, or a kernel without ``CONFIG_PRINTK_TIME``) go with the
last line that had one; in a log with no prefix at all every line counts.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import List, Optional

#: printk's time prefix, ``[  123.456789] `` (seconds since boot)
_STAMP = re.compile(r"^\s*\[\s*(\d+(?:\.\d+)?)\]\s?")
#: what makes a kernel line worth showing next to a dead QEMU
_INTERESTING = re.compile(
    r"out of memory|oom[-_ ]?kill|oom_reaper|killed process|invoked oom"
    r"|segfault|general protection|\btraps?:|\bkvm|call trace|\boops\b"
    r"|\bWARNING:|\bBUG:|cut here|\bhung_task|blocked for more than|soft lockup|hard lockup"
    r"|kernel panic|detected stalls",
    re.IGNORECASE)
#: lines returned by default
DEFAULT_KERNEL_LOG_LINES = 20
#: what in a host's kernel log makes a run's figures untrustworthy (README
#: "When a run fails"): a WARN, a BUG (also a soft lockup's "BUG: soft lockup"),
#: an Oops, a GPF or panic, or KVM reporting an error.  KVM's informational
#: lines ("kvm [pid]: vcpu0, guest rIP: ... Unhandled WRMSR", printed whenever a
#: guest probes an MSR KVM does not emulate) are not problems.
_PROBLEM = re.compile(
    r"\bWARNING:|\bBUG:|kernel BUG|\bOops\b|general protection fault|kernel panic"
    r"|\bkvm\w*\b.*\b(error|failed|internal)\b",
    re.IGNORECASE)


def interesting(line: str) -> bool:
    """Whether a kernel log line (with or without its time prefix) is worth showing."""
    return bool(_INTERESTING.search(line))


def problems(lines: List[str]) -> List[str]:
    """The lines of ``lines`` (kernel log lines) that fail a run on that host."""
    return [line for line in lines if _PROBLEM.search(line)]


def interesting_tail(text: str, since_s: Optional[float] = None,
                     lines: int = DEFAULT_KERNEL_LOG_LINES) -> List[str]:
    """The last ``lines`` interesting lines of ``dmesg`` output ``text``, time
    prefix kept, only those stamped at or after ``since_s`` seconds since boot
    when it is given (see the module docstring)."""
    rows = [line.rstrip() for line in text.splitlines() if line.strip()]
    stamped = any(_STAMP.match(line) for line in rows)
    keep = since_s is None or not stamped
    out: List[str] = []
    for line in rows:
        m = _STAMP.match(line)
        if m and since_s is not None:
            keep = float(m.group(1)) >= since_s
        if keep and interesting(line):
            out.append(line)
    return out[-lines:] if lines > 0 else []


#: how much of the end of a console log :func:`console_note` reads, bytes
CONSOLE_TAIL_BYTES = 64 * 1024
#: interesting console lines :func:`console_note` names
CONSOLE_NOTE_LINES = 3


def console_note(path: Path, name: str, lines: int = CONSOLE_NOTE_LINES) -> str:
    """``"<name> stopped answering; its console ends: ... | ..."``: the last
    ``lines`` interesting lines of the serial console log at ``path`` (a VM
    that ran a kernel), time stamps dropped; its last line if none is
    interesting; "" if the log cannot be read."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - CONSOLE_TAIL_BYTES))
            text = fh.read().decode(errors="replace")
    except OSError:
        return ""
    picked = [strip_stamp(ln) for ln in interesting_tail(text, lines=lines)]
    if not picked:
        rest = [ln.strip() for ln in text.splitlines() if ln.strip()]
        picked = rest[-1:]
    if not picked:
        return f"{name} stopped answering; its console ({path}) is empty"
    clipped = [ln if len(ln) <= 200 else ln[:197] + "..." for ln in picked]
    return f"{name} stopped answering; its console ({path}) ends: " + " | ".join(clipped)


def strip_stamp(line: str) -> str:
    """``[  123.456] Out of memory: ...`` -> ``Out of memory: ...``."""
    return _STAMP.sub("", line, count=1).strip()


def parse_uptime(text: str) -> Optional[float]:
    """Seconds since boot from ``/proc/uptime`` text; None if unreadable."""
    try:
        return float(text.split()[0])
    except (IndexError, ValueError):
        return None
