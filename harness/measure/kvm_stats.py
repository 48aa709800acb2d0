"""KVM's own counters for one QEMU, through QMP ``query-stats`` (QEMU >= 7.1
on Linux >= 5.14; nothing under TCG).

The fault-cost columns (README "Columns": ``kvm_pf``, ``kvm_mapped_mib``) need two of them: how
many page faults the guest's vCPUs took (``pf_taken``: every fault KVM handled,
``pf_fast`` the ones its lockless fast path fixed) in a span, and how much
memory KVM had mapped when dirty logging started (``pages_4k``/``pages_2m``/
``pages_1g``), the denominator of a per-GiB figure.  A :class:`Sample` holds
both, read at one moment; :func:`delta` subtracts two.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

from harness.errors import QEMUError, QMPCommandError
from harness.qemu.machine import VM

log = logging.getLogger(__name__)

#: per-vCPU counters read (summed over the vCPUs)
VCPU_STATS = ("pf_taken", "pf_fast", "pf_fixed", "pf_spurious", "exits")
#: per-VM gauges read
VM_STATS = ("pages_4k", "pages_2m", "pages_1g")
#: KiB per page of each VM_STATS gauge
PAGE_KIB = {"pages_4k": 4, "pages_2m": 2048, "pages_1g": 1024 * 1024}
#: seconds for one query-stats (it takes QEMU's BQL; a QEMU busy starting dirty
#: logging holds it for up to a few hundred ms here: README "Virtual host")
QUERY_TIMEOUT = 10.0


@dataclass(frozen=True)
class Sample:
    #: this machine's time.monotonic() when the reply arrived
    local_s: float
    vcpu: Dict[str, int] = field(default_factory=dict)
    vm: Dict[str, int] = field(default_factory=dict)

    @property
    def mapped_mib(self) -> Optional[float]:
        if not all(k in self.vm for k in VM_STATS):
            return None
        return sum(self.vm[k] * PAGE_KIB[k] for k in VM_STATS) / 1024

    def to_json(self) -> Dict[str, Any]:
        return {"vcpu": dict(self.vcpu), "vm": dict(self.vm)}


def _values(reply: Any, names: tuple) -> Dict[str, int]:
    """Sum each named integer stat over the entries of a query-stats reply."""
    out: Dict[str, int] = {}
    for entry in reply or []:
        for stat in entry.get("stats", []):
            if stat.get("name") in names and isinstance(stat.get("value"), int):
                out[stat["name"]] = out.get(stat["name"], 0) + int(stat["value"])
    return out


async def sample(vm: VM) -> Optional[Sample]:
    """KVM's counters of ``vm`` now; None where QEMU has none to give (TCG, an
    older QEMU or kernel) or cannot answer (logged: the columns stay empty)."""
    try:
        vcpu = await vm.cmd("query-stats", {"target": "vcpu",
                                            "providers": [{"provider": "kvm", "names": list(VCPU_STATS)}]},
                            timeout=QUERY_TIMEOUT)
        vms = await vm.cmd("query-stats", {"target": "vm",
                                           "providers": [{"provider": "kvm", "names": list(VM_STATS)}]},
                           timeout=QUERY_TIMEOUT)
    except QMPCommandError as exc:          # QEMU without query-stats, or without these stats
        log.info("no KVM stats from %s: %s", vm.name, exc)
        return None
    except QEMUError as exc:                # gone, or no answer in time: not a missing feature
        log.warning("no KVM stats from %s: %s", vm.name, exc)
        return None
    got = Sample(time.monotonic(), _values(vcpu, VCPU_STATS), _values(vms, VM_STATS))
    return got if got.vcpu else None


def delta(a: Optional[Sample], b: Optional[Sample], name: str) -> Optional[int]:
    """Counter ``name`` at ``b`` minus at ``a``; None unless both have it."""
    if a is None or b is None or name not in a.vcpu or name not in b.vcpu:
        return None
    return b.vcpu[name] - a.vcpu[name]
