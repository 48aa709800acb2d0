"""Kernel-side timing of dirty-log enable/disable through tracefs.

INTERFACE (used by the runner; the implementation is filled in by the
virtual-host work).  Works on any Linux host through the Host API: kprobe /
kretprobe events on the memslot and MMU-walk functions that
``available_filter_functions`` lists, and trace_marker phase markers so the
runner can attribute time to the enable (migration start) and disable
(cancel) phases.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional

from harness.hosts.base import Host


@dataclass(frozen=True)
class KvmTiming:
    enable_ms: Optional[float]                 # kvm_enable_ms column
    disable_ms: Optional[float]                # kvm_disable_ms column
    breakdown: Dict[str, Dict[str, float]] = field(default_factory=dict)  # phase -> function -> ms
    params: Dict[str, str] = field(default_factory=dict)                  # kvm module params
    raw: str = ""                              # trace text, for the sidecar


class KvmTracer:
    """Context manager: sets tracing up on enter, tears it down on exit (also on error)."""

    def __init__(self, host: Host) -> None:
        self.host = host

    def available(self) -> bool:
        return False

    def __enter__(self) -> "KvmTracer":
        return self

    def __exit__(self, *exc) -> None:
        pass

    def phase(self, name: str) -> None:
        """Mark the start of a phase (``enable`` before migrate, ``disable`` before cancel)."""

    def collect(self) -> KvmTiming:
        return KvmTiming(None, None)
