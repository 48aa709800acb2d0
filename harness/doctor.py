"""Host capability check.  INTERFACE; the full report is filled in by the core work.

Usable KVM means: the CPU shows vmx or svm, /dev/kvm opens, and a guest boots.
"""

from __future__ import annotations

from harness.hosts.base import Host


def resolve_accel(host: Host, requested: str) -> str:
    """Turn ``auto|kvm|tcg`` into ``kvm|tcg``.  ``kvm`` on a host without usable
    KVM raises KVMUnusable (exit 2) naming what is missing."""
    return "tcg" if requested == "auto" else requested
