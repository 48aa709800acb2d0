"""Host capability check (``migstall doctor``) and accelerator choice.

Usable KVM means three things, checked in this order, each only when the
previous one passed (so a host without VMX/SVM is answered at once and never
hung on):

1. the CPU shows ``vmx`` or ``svm`` in /proc/cpuinfo;
2. ``/dev/kvm`` opens read-write;
3. a guest actually boots under ``-accel kvm`` (:mod:`harness.qemu.bootcheck`:
   a boot sector, then the guest kernel; each stage bounded in time).

Everything is read through the :class:`~harness.hosts.base.Host` API, so the
same check works on this machine, over SSH and inside the virtual host.
"""

from __future__ import annotations

import json
import logging
import re
import weakref
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Tuple

from harness.errors import HostError, KVMUnusable, UserError
from harness.hosts.base import QUICK_COMMAND_TIMEOUT_S, Host
from harness.qemu.bootcheck import BOOT_CHECK_TIMEOUT_S, boot_check

log = logging.getLogger(__name__)

DEFAULT_QEMU = "qemu-system-x86_64"

#: module parameters reported, per module (absent ones are skipped)
KVM_PARAMS = {
    "kvm": ("tdp_mmu", "eager_page_split", "nx_huge_pages", "halt_poll_ns"),
    "kvm_intel": ("ept", "pml", "nested", "enable_shadow_vmcs", "unrestricted_guest", "eptad"),
    "kvm_amd": ("npt", "nested", "avic"),
}
#: CPU flags that matter here (the whole list is long and not needed)
CPU_FLAGS_OF_INTEREST = ("vmx", "svm", "ept", "ept_ad", "vpid", "npt", "pdpe1gb", "pse", "hypervisor",
                         "constant_tsc", "nonstop_tsc", "tsc_known_freq")

# --- reading the host --------------------------------------------------------------

def _read_text(host: Host, path: str) -> Optional[str]:
    try:
        return host.read_bytes(path).decode(errors="replace")
    except (OSError, HostError):
        return None


def _ls(host: Host, path: str) -> List[str]:
    res = host.run(["ls", "-1", path], check=False, timeout=QUICK_COMMAND_TIMEOUT_S)
    return res.text.split() if res.returncode == 0 else []


@dataclass(frozen=True)
class CpuInfo:
    vendor: str
    model: str
    flags: Tuple[str, ...]          # the flags of interest that are present
    has_vmx: bool
    has_svm: bool


def read_cpu(host: Host) -> CpuInfo:
    text = _read_text(host, "/proc/cpuinfo") or ""
    fields: Dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            break  # the first processor is enough
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    flags = set(fields.get("flags", "").split())
    return CpuInfo(vendor=fields.get("vendor_id", ""), model=fields.get("model name", ""),
                   flags=tuple(f for f in CPU_FLAGS_OF_INTEREST if f in flags),
                   has_vmx="vmx" in flags, has_svm="svm" in flags)


def read_meminfo(host: Host) -> Dict[str, int]:
    """/proc/meminfo in KiB (hugepage counts as numbers)."""
    out: Dict[str, int] = {}
    for line in (_read_text(host, "/proc/meminfo") or "").splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            out[key.strip()] = int(parts[0])
    return out


def online_cpus(host: Host) -> int:
    text = (_read_text(host, "/sys/devices/system/cpu/online") or "").strip()
    count = 0
    for part in filter(None, text.split(",")):
        lo, _, hi = part.partition("-")
        count += int(hi or lo) - int(lo) + 1
    return count or 1


@dataclass(frozen=True)
class HugepagePool:
    page_kib: int
    total: int
    free: int
    reserved: int
    surplus: int


def hugepage_pools(host: Host) -> List[HugepagePool]:
    pools = []

    def num(d: str, name: str) -> int:
        text = (_read_text(host, f"{d}/{name}") or "0").strip()
        return int(text) if text.isdigit() else 0

    for entry in _ls(host, "/sys/kernel/mm/hugepages"):
        m = re.fullmatch(r"hugepages-(\d+)kB", entry)
        if not m:
            continue
        d = f"/sys/kernel/mm/hugepages/{entry}"
        pools.append(HugepagePool(int(m.group(1)), num(d, "nr_hugepages"), num(d, "free_hugepages"),
                                  num(d, "resv_hugepages"), num(d, "surplus_hugepages")))
    return sorted(pools, key=lambda p: p.page_kib)


def thp_mode(host: Host) -> str:
    text = _read_text(host, "/sys/kernel/mm/transparent_hugepage/enabled") or ""
    m = re.search(r"\[(\w+)\]", text)
    return m.group(1) if m else ""


def kvm_params(host: Host) -> Dict[str, str]:
    """``module.param -> value`` for the parameters in :data:`KVM_PARAMS` that exist."""
    out = {}
    for module, names in KVM_PARAMS.items():
        for name in names:
            value = _read_text(host, f"/sys/module/{module}/parameters/{name}")
            if value is not None:
                out[f"{module}.{name}"] = value.strip()
    return out


def loaded_kvm_modules(host: Host) -> List[str]:
    return [m for m in _ls(host, "/sys/module") if m == "kvm" or m.startswith("kvm_")]


def find_qemu(host: Host, qemu: str = "") -> str:
    """Resolve ``qemu`` ("" = qemu-system-x86_64 on PATH) to an executable path on
    the host; "" when there is none.  No shell interpolation: the name is $1."""
    name = qemu or DEFAULT_QEMU
    if "/" in name:
        res = host.run(["test", "-f", name, "-a", "-x", name], check=False, timeout=QUICK_COMMAND_TIMEOUT_S)
        return name if res.returncode == 0 else ""
    res = host.run(["sh", "-c", 'command -v -- "$1"', "sh", name], check=False, timeout=QUICK_COMMAND_TIMEOUT_S)
    path = res.text.strip()  # a shell builtin or alias would not start with "/"
    return path if res.returncode == 0 and path.startswith("/") else ""


def qemu_version(host: Host, qemu: str) -> str:
    """The first line of ``qemu --version`` (QMP query-version is used where a QEMU runs)."""
    res = host.run([qemu, "--version"], check=False, timeout=QUICK_COMMAND_TIMEOUT_S)
    line = res.text.strip().splitlines()[:1]
    return line[0] if res.returncode == 0 and line else ""


# --- KVM ------------------------------------------------------------------------------

@dataclass(frozen=True)
class KvmStatus:
    usable: bool
    reason: str            # "KVM usable" or "KVM unusable: <what is missing>"
    fix: str               # what to do about it ("" when usable)
    cpu_flag: str          # ok | missing
    dev_kvm: str           # ok | missing | cannot open: ... | skipped
    boot: str              # ok (<ms> ms) | failed: ... | skipped: ...


def check_kvm(host: Host, qemu: Optional[str] = None, boot_timeout: float = BOOT_CHECK_TIMEOUT_S) -> KvmStatus:
    """The three-step check of the module docstring (no caching; see :func:`kvm_status`)."""
    cpu = read_cpu(host)
    if not (cpu.has_vmx or cpu.has_svm):
        return KvmStatus(False, "KVM unusable: CPU has neither vmx nor svm",
                         "run on an Intel VMX or AMD SVM host (for nested, give the L1 VM -cpu host or max), "
                         "or use --accel tcg", "missing", "skipped", "skipped")
    if not host.exists("/dev/kvm"):
        return KvmStatus(False, "KVM unusable: /dev/kvm does not exist",
                         "load the module (modprobe kvm_intel or kvm_amd) and enable virtualization in the firmware",
                         "ok", "missing", "skipped")
    res = host.run(["sh", "-c", ": <>/dev/kvm"], check=False, timeout=QUICK_COMMAND_TIMEOUT_S)
    if res.returncode != 0:
        err = " ".join(res.stderr.decode(errors="replace").split())
        return KvmStatus(False, "KVM unusable: /dev/kvm cannot be opened read-write",
                         "add your user to the kvm group (or run as root)", "ok", f"cannot open: {err}", "skipped")
    qemu = qemu or find_qemu(host)
    if not qemu:
        return KvmStatus(False, "KVM unverified: qemu-system-x86_64 not found for the boot check",
                         "install qemu-system-x86 (make setup) or pass --qemu PATH", "ok", "ok", "skipped: no QEMU")
    boot = boot_check(host, qemu, "kvm", boot_timeout)
    if not boot.startswith("ok"):
        return KvmStatus(False, f"KVM unusable: a test guest does not boot under -accel kvm ({boot[8:]})",
                         "see 'migstall doctor' and the host's dmesg; use --accel tcg meanwhile", "ok", "ok", boot)
    return KvmStatus(True, "KVM usable", "", "ok", "ok", boot)


# One check per Host object and QEMU: a matrix of 40 scenarios boots the test guest once.
_kvm_cache: "weakref.WeakKeyDictionary[Host, Dict[str, KvmStatus]]" = weakref.WeakKeyDictionary()
_fallback_said: "weakref.WeakSet[Host]" = weakref.WeakSet()


def kvm_status(host: Host, qemu: Optional[str] = None) -> KvmStatus:
    """:func:`check_kvm`, remembered per host object and QEMU binary."""
    per_host = _kvm_cache.setdefault(host, {})
    key = qemu or find_qemu(host)   # "" and the resolved default share one check
    if key not in per_host:
        per_host[key] = check_kvm(host, key or None)
    return per_host[key]


@dataclass(frozen=True)
class AccelChoice:
    accel: str            # kvm | tcg
    reason: str           # one line; says so when auto fell back to tcg


def choose_accel(host: Host, requested: str, qemu: Optional[str] = None) -> AccelChoice:
    """``auto|kvm|tcg`` -> :class:`AccelChoice`; ``kvm`` without usable KVM -> KVMUnusable."""
    if requested == "tcg":
        return AccelChoice("tcg", "tcg requested")
    if requested not in ("auto", "kvm"):
        raise UserError(f"--accel {requested!r} is unknown; use auto, kvm or tcg")
    status = kvm_status(host, qemu)
    if status.usable:
        return AccelChoice("kvm", "KVM usable" + (" (auto)" if requested == "auto" else ""))
    if requested == "kvm":
        raise KVMUnusable(f"--accel kvm: {status.reason}; {status.fix}")
    return AccelChoice("tcg", f"--accel auto: falling back to tcg ({status.reason})")


def resolve_accel(host: Host, requested: str) -> str:
    """Turn ``auto|kvm|tcg`` into ``kvm|tcg``.  ``kvm`` on a host without usable
    KVM raises KVMUnusable (exit 2) naming what is missing.  A fallback of
    ``auto`` to tcg is logged (WARNING, once per host); :func:`choose_accel`
    returns the reason for callers that print it themselves."""
    choice = choose_accel(host, requested)
    if requested == "auto" and choice.accel == "tcg" and host not in _fallback_said:
        _fallback_said.add(host)
        log.warning("%s", choice.reason)
    return choice.accel


# --- the report -----------------------------------------------------------------------

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
    hugepages: Tuple[HugepagePool, ...]
    thp_mode: str
    accel_auto: str = field(default="tcg")

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True)


def doctor(host: Host, qemu: str = "") -> DoctorReport:
    """Everything migstall needs to know about ``host``.  Never hangs: the only
    long step is the KVM boot check, bounded by :data:`BOOT_CHECK_TIMEOUT_S`."""
    cpu = read_cpu(host)
    qemu_path = find_qemu(host, qemu)
    status = kvm_status(host, qemu_path or None)
    mem = read_meminfo(host)
    return DoctorReport(
        host=getattr(host, "name", "host"),
        kvm_usable=status.usable,
        kvm_reason=status.reason,
        kvm_fix=status.fix,
        kvm_checks={"cpu_flag": status.cpu_flag, "dev_kvm": status.dev_kvm, "boot": status.boot},
        cpu_vendor=cpu.vendor,
        cpu_model=cpu.model,
        cpu_flags=cpu.flags,
        kvm_modules=tuple(loaded_kvm_modules(host)),
        kvm_params=kvm_params(host),
        qemu_path=qemu_path,
        qemu_version=qemu_version(host, qemu_path) if qemu_path else "",
        host_kernel=(_read_text(host, "/proc/sys/kernel/osrelease") or "").strip(),
        online_cpus=online_cpus(host),
        mem_total_mib=mem.get("MemTotal", 0) // 1024,
        mem_available_mib=mem.get("MemAvailable", 0) // 1024,
        hugepages=tuple(hugepage_pools(host)),
        thp_mode=thp_mode(host),
        accel_auto="kvm" if status.usable else "tcg",
    )
