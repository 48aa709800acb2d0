"""``migstall doctor``'s report: the host facts, rendered as text and JSON.

The facts themselves (CPU, KVM usability and module parameters, hugepages, THP,
memory, QEMU) and the accelerator policy live in :mod:`harness.hosts.facts`; the
KVM boot check in :mod:`harness.qemu.bootcheck`.  This module turns
:class:`~harness.hosts.facts.Facts` into the report's flat shape
(:class:`DoctorReport`: the ``--json`` output and the doctor part of each run's
sidecar) and its text.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Dict, Tuple

from harness import hostmem
from harness.hosts import facts as hostfacts
from harness.hosts.base import Host
from harness.hosts.facts import HugePool
from harness.qemu import alias


#: scenarios/seed-2t.toml's guest: 2 TiB aliased onto 32 GiB
SEED_MEM_MIB, SEED_ALIAS_MIB = 2 * 1024 * 1024, 32 * 1024


@dataclass(frozen=True)
class DoctorReport:
    host: str
    kvm_usable: bool
    kvm_reason: str
    kvm_fix: str
    kvm_checks: Dict[str, str]
    cpu_vendor: str
    cpu_model: str
    cpu_flags: Tuple[str, ...]
    kvm_modules: Tuple[str, ...]
    kvm_params: Dict[str, str]
    qemu_path: str
    qemu_version: str
    host_kernel: str
    online_cpus: int
    mem_total_mib: int
    mem_available_mib: int
    hugepages: Tuple[HugePool, ...]
    thp_mode: str
    accel_auto: str = field(default="tcg")
    phys_bits: int = 0                  # physical address bits of the CPU (0: unknown)
    shm_avail_mib: int = -1             # free MiB in /dev/shm (aliased guests' RAM; -1: unknown)
    #: the largest aliased guest this host fits (harness.hostmem.largest_fit): mem, alias, estimate MiB
    alias_fit: Dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True)

    def to_text(self) -> str:
        """The human-readable report (``migstall doctor`` without ``--json``)."""
        yes = lambda b: "yes" if b else "no"  # noqa: E731
        lines = [
            f"host            {self.host}  (kernel {self.host_kernel}, {self.online_cpus} CPUs)",
            f"KVM usable      {yes(self.kvm_usable)}: {self.kvm_reason}",
        ]
        if self.kvm_fix:
            lines.append(f"  fix           {self.kvm_fix}")
        lines += [
            f"  checks        cpu flag {self.kvm_checks['cpu_flag']}, /dev/kvm {self.kvm_checks['dev_kvm']}, "
            f"boot {self.kvm_checks['boot']}",
            f"--accel auto    {self.accel_auto}",
            f"CPU             {self.cpu_vendor} {self.cpu_model}",
            f"  flags         {' '.join(self.cpu_flags) or '-'}  "
            f"(vmx/svm {'present' if {'vmx', 'svm'} & set(self.cpu_flags) else 'absent'})",
            f"kvm modules     {' '.join(self.kvm_modules) or 'none loaded'}",
            f"kvm params      {' '.join(f'{k}={v}' for k, v in sorted(self.kvm_params.items())) or '-'}",
            f"QEMU            {self.qemu_path or 'not found'}  {self.qemu_version}",
            f"memory          {self.mem_total_mib} MiB total, {self.mem_available_mib} MiB available",
            f"THP             {self.thp_mode or 'absent'}",
        ]
        for pool in self.hugepages:
            size = f"{pool.page_kib // 1024} MiB" if pool.page_kib < 1048576 else f"{pool.page_kib // 1048576} GiB"
            lines.append(f"hugepages {size:<6}{pool.total} total, {pool.free} free")
        if not self.hugepages:
            lines.append("hugepages       no pools")
        shm = f"{self.shm_avail_mib} MiB free in /dev/shm" if self.shm_avail_mib >= 0 else "/dev/shm unknown"
        lines.append(f"aliased guests  {self.phys_bits or '?'} physical address bits, {shm}")
        fit = self.alias_fit
        if fit:
            lines.append(f"  largest fit   {fit['mem_mib'] // 1024} GiB aliased onto {fit['alias_mib']} MiB "
                         f"({self.accel_auto}, 4 KiB pages): needs about {fit['needs_mib']} MiB of the "
                         f"{self.mem_available_mib} available ('migstall run --check' for a scenario's estimate)")
        seed = hostmem.estimate(alias.AliasLayout(SEED_MEM_MIB, SEED_ALIAS_MIB), kvm=True)
        why = [w for w, bad in (
            (f"{self.mem_available_mib} MiB available", seed.total_mib > self.mem_available_mib),
            (f"{self.shm_avail_mib} MiB free in /dev/shm", 0 <= self.shm_avail_mib < SEED_ALIAS_MIB),
            (f"{self.phys_bits} address bits", 0 < self.phys_bits < 42),
            ("no usable KVM", not self.kvm_usable)) if bad]
        lines.append(f"  seed-2t       2 TiB on 32 GiB (KVM) needs about {seed.total_mib} MiB: "
                     + ("fits here" if not why else f"not here ({', '.join(why)})"))
        return "\n".join(lines)


def from_facts(facts: hostfacts.Facts) -> DoctorReport:
    """The report of already gathered facts."""
    status = facts.kvm
    return DoctorReport(
        host=facts.host,
        kvm_usable=status.usable,
        kvm_reason=status.reason,
        kvm_fix=status.fix,
        kvm_checks={"cpu_flag": status.cpu_flag, "dev_kvm": status.dev_kvm, "boot": status.boot},
        cpu_vendor=facts.cpu.vendor,
        cpu_model=facts.cpu.model,
        cpu_flags=facts.cpu.flags,
        kvm_modules=facts.kvm_modules,
        kvm_params=facts.kvm_params,
        qemu_path=facts.qemu_path,
        qemu_version=facts.qemu_version,
        host_kernel=facts.host_kernel,
        online_cpus=facts.online_cpus,
        mem_total_mib=facts.memory.total_mib,
        mem_available_mib=facts.memory.available_mib,
        hugepages=facts.hugepages,
        thp_mode=facts.thp_mode,
        accel_auto=facts.accel_auto,
        phys_bits=facts.phys_bits,
        shm_avail_mib=facts.shm_avail_mib,
        alias_fit=_alias_fit(facts),
    )


def _alias_fit(facts: hostfacts.Facts) -> Dict[str, int]:
    """The largest aliased guest the host fits, as the report keeps it; {} if none."""
    kvm = facts.accel_auto == "kvm"
    bits = facts.phys_bits if kvm else alias.TCG_PHYS_BITS
    fit = hostmem.largest_fit(facts.memory.available_mib, facts.shm_avail_mib, bits, kvm=kvm)
    if fit is None:
        return {}
    return {"mem_mib": fit.mem_mib, "alias_mib": fit.alias_mib, "needs_mib": fit.estimate.total_mib}


def doctor(host: Host, qemu: str = "") -> DoctorReport:
    """Everything migstall needs to know about ``host`` (:func:`harness.hosts.facts.gather`).
    Never hangs: the only long step is the KVM boot check, bounded by
    :data:`harness.qemu.bootcheck.BOOT_CHECK_TIMEOUT_S`."""
    return from_facts(hostfacts.gather(host, qemu))
