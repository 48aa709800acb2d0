"""Dirty-log modes: default (QEMU's choice), legacy (no manual protect), ring.

INTERFACE (used by the runner; the implementation is filled in by the
virtual-host work).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Sequence, Tuple

from harness.hosts.base import Host


@dataclass(frozen=True)
class ModeSetup:
    accel_opts: Tuple[str, ...] = ()          # appended to -accel kvm,...  e.g. ("dirty-ring-size=4096",)
    env: Dict[str, str] = field(default_factory=dict)   # e.g. LD_PRELOAD of the legacy shim
    trace_events: Tuple[str, ...] = ()        # extra QEMU trace events that prove the mode


def setup(mode: str, dirty_ring: int, accel: str, host: Host, runtime_dir: str) -> ModeSetup:
    """What QEMU needs for ``mode`` on ``host``.  Raises UserError for combinations
    that cannot work (e.g. legacy/ring under tcg)."""
    return ModeSetup()


def verify(mode: str, accel: str, trace_text: str, host: Host, runtime_dir: str) -> None:
    """Raise MigrationError if the run did not actually use ``mode``."""
