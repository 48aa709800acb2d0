"""Scenarios: what one run does, as a frozen dataclass.

Owner of validation and TOML loading: see :func:`load_scenarios` and
:meth:`Scenario.validate`.  A scenario file expands to a matrix
(mem x vcpus x backing x mode x repeat) that is fully validated before any
QEMU starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Tuple

BACKINGS = ("anon", "thp", "hugetlb2m", "hugetlb1g", "memfd")
ACCELS = ("auto", "kvm", "tcg")
DIRTY_LOG_MODES = ("default", "legacy", "ring")
LOOPS = ("pio", "write", "cpu")
END_ACTIONS = ("complete", "cancel")


@dataclass(frozen=True)
class Scenario:
    name: str = "adhoc"
    mem_mib: int = 1024
    vcpus: int = 2
    backing: str = "anon"
    prealloc: bool = False
    accel: str = "auto"             # resolved to kvm|tcg before the run
    cpu_model: str = ""             # "" = host for kvm, max for tcg
    dirty_log_mode: str = "default"
    dirty_ring: int = 0             # entries, with dirty_log_mode = ring
    touch_mib: int = 0              # 0 = as much as the guest can spare
    loops: Tuple[str, ...] = ()     # per vCPU; () = vCPU0 pio, others write
    threshold_us: int = 50
    baseline_s: float = 2.0
    end_action: str = "complete"    # complete | cancel
    cancel_after_s: float = 1.0     # with end_action = cancel: after MIGRATION_PASS 1
    margin_ms: float = 200.0        # stall window = [migrate, first pass + margin]
    ready_timeout_s: float = 300.0
    migration_timeout_s: float = 600.0
    repeat: int = 1                 # 1-based index of this repeat
    overcommit: bool = False        # allow mem_mib > host memory
    qemu: str = ""                  # "" = qemu-system-x86_64 on the host's PATH
    guest_kernel: str = ""          # "" = Debian's linux-image, cached
    l1_cmdline: str = ""            # virtual host only: extra L1 kernel args (e.g. kvm.tdp_mmu=0)

    def loop_for(self, vcpu: int) -> str:
        if self.loops:
            return self.loops[min(vcpu, len(self.loops) - 1)]
        return "pio" if vcpu == 0 else "write"

    @property
    def loop_list(self) -> Tuple[str, ...]:
        return tuple(self.loop_for(i) for i in range(self.vcpus))
