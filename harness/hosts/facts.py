"""What migstall knows about a host: one layer of host facts.

Every fact is read through the :class:`~harness.hosts.base.Host` API, so the
same code describes this machine, a host over SSH and the virtual host:

* the CPU (:class:`CpuInfo`: vendor, model, the flags of interest, vmx/svm);
* whether KVM is usable (:class:`KvmStatus`, :func:`check_kvm`), the loaded kvm
  modules and their parameters (:data:`KVM_PARAMS`, the one list of them);
* hugepage pools (:class:`HugePool`), the THP mode, memory (:class:`Memory`),
  online CPUs, the host kernel;
* QEMU (:func:`find_qemu`, :func:`qemu_version`);
* the accelerator policy: ``--accel auto|kvm|tcg`` -> ``kvm|tcg``
  (:func:`choose_accel`, :func:`resolve_accel`).

:func:`gather` reads them all into one :class:`Facts` (what ``migstall doctor``
renders).

Usable KVM means three things, checked in this order, each only when the
previous one passed (so a host without VMX/SVM is answered at once and never
hung on):

1. the CPU shows ``vmx`` or ``svm`` in /proc/cpuinfo;
2. ``/dev/kvm`` opens read-write;
3. a guest actually boots under ``-accel kvm``
   (:func:`harness.qemu.bootcheck.boot_check`, bounded in time).

Caches: the KVM check (which may boot a guest) runs once per Host object and
QEMU binary (:func:`kvm_status`), and an ``auto`` fallback to tcg is logged once
per Host object (:func:`resolve_accel`).  Both caches are weak per Host object
(they go with it) and :func:`reset_caches` empties them (for tests).
"""

from __future__ import annotations

import logging
import re
import weakref
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from harness.errors import HostError, KVMUnusable, UserError
from harness.hosts.base import QUICK_COMMAND_TIMEOUT_S, Host
from harness.qemu.bootcheck import BOOT_CHECK_TIMEOUT_S, boot_check

log = logging.getLogger(__name__)

DEFAULT_QEMU = "qemu-system-x86_64"


@dataclass(frozen=True)
class KvmParam:
    """A KVM module parameter (``/sys/module/<module>/parameters/<name>``)."""

    module: str
    name: str
    #: also recorded in each run's ``kvm_params`` column (harness.measure.kvm_trace)
    recorded: bool = False

    @property
    def key(self) -> str:
        """``module.name``, as reported and recorded."""
        return f"{self.module}.{self.name}"

    @property
    def sys_path(self) -> str:
        return f"/sys/module/{self.module}/parameters/{self.name}"


#: The KVM module parameters migstall reads (absent ones are skipped): all of
#: them in ``migstall doctor``, the ``recorded`` ones in every results row.
KVM_PARAMS: Tuple[KvmParam, ...] = (
    KvmParam("kvm", "tdp_mmu", recorded=True),
    KvmParam("kvm", "eager_page_split", recorded=True),
    KvmParam("kvm", "nx_huge_pages"),
    KvmParam("kvm", "halt_poll_ns"),
    # patches/fast-write-protect-6.1's run-time switch: absent on other kernels, so the
    # column tells which behaviour a patched kernel's row measured
    KvmParam("kvm", "fast_write_protect", recorded=True),
    KvmParam("kvm_intel", "ept", recorded=True),
    KvmParam("kvm_intel", "pml", recorded=True),
    KvmParam("kvm_intel", "nested"),
    KvmParam("kvm_intel", "enable_shadow_vmcs"),
    KvmParam("kvm_intel", "unrestricted_guest"),
    KvmParam("kvm_intel", "eptad"),
    KvmParam("kvm_amd", "npt", recorded=True),
    KvmParam("kvm_amd", "nested", recorded=True),
    KvmParam("kvm_amd", "avic"),
)
#: the parameters recorded in the ``kvm_params`` column
RECORDED_KVM_PARAMS: Tuple[KvmParam, ...] = tuple(p for p in KVM_PARAMS if p.recorded)

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


@dataclass(frozen=True)
class Memory:
    total_mib: int
    available_mib: int


def read_memory(host: Host) -> Memory:
    """MemTotal and MemAvailable of /proc/meminfo, MiB (0 when unknown)."""
    mem = read_meminfo(host)
    return Memory(mem.get("MemTotal", 0) // 1024, mem.get("MemAvailable", 0) // 1024)


def phys_address_bits(host: Host) -> int:
    """The CPU's physical address bits (``address sizes`` of /proc/cpuinfo); 0 if unknown."""
    m = re.search(r"^address sizes\s*:\s*(\d+) bits physical", _read_text(host, "/proc/cpuinfo") or "", re.M)
    return int(m.group(1)) if m else 0


def free_mib(host: Host, path: str) -> int:
    """Free MiB of the filesystem holding ``path`` (``df``); -1 if unknown."""
    res = host.run(["df", "-Pk", path], check=False, timeout=QUICK_COMMAND_TIMEOUT_S)
    lines = res.text.splitlines() if res.returncode == 0 else []
    fields = lines[-1].split() if len(lines) >= 2 else []
    return int(fields[3]) // 1024 if len(fields) >= 4 and fields[3].isdigit() else -1


def online_cpus(host: Host) -> int:
    text = (_read_text(host, "/sys/devices/system/cpu/online") or "").strip()
    count = 0
    for part in filter(None, text.split(",")):
        lo, _, hi = part.partition("-")
        count += int(hi or lo) - int(lo) + 1
    return count or 1


def host_kernel(host: Host) -> str:
    """The host kernel's release (/proc/sys/kernel/osrelease); "" when unreadable."""
    return (_read_text(host, "/proc/sys/kernel/osrelease") or "").strip()


@dataclass(frozen=True)
class HugePool:
    """One hugepage pool (/sys/kernel/mm/hugepages/hugepages-<page_kib>kB)."""

    page_kib: int
    total: int
    free: int
    reserved: int = 0
    surplus: int = 0


def hugepage_pools(host: Host) -> List[HugePool]:
    pools = []

    def num(d: str, name: str) -> int:
        text = (_read_text(host, f"{d}/{name}") or "0").strip()
        return int(text) if text.isdigit() else 0

    for entry in _ls(host, "/sys/kernel/mm/hugepages"):
        m = re.fullmatch(r"hugepages-(\d+)kB", entry)
        if not m:
            continue
        d = f"/sys/kernel/mm/hugepages/{entry}"
        pools.append(HugePool(int(m.group(1)), num(d, "nr_hugepages"), num(d, "free_hugepages"),
                              num(d, "resv_hugepages"), num(d, "surplus_hugepages")))
    return sorted(pools, key=lambda p: p.page_kib)


def thp_mode(host: Host) -> str:
    """always | madvise | never, or "" when the host has no THP."""
    text = _read_text(host, "/sys/kernel/mm/transparent_hugepage/enabled") or ""
    m = re.search(r"\[(\w+)\]", text)
    return m.group(1) if m else ""


def kvm_params(host: Host) -> Dict[str, str]:
    """``module.param -> value`` for the parameters in :data:`KVM_PARAMS` that exist."""
    out = {}
    for param in KVM_PARAMS:
        value = _read_text(host, param.sys_path)
        if value is not None:
            out[param.key] = value.strip()
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


#: :func:`kvm_status`'s cache: Host object -> QEMU path ("" = none found) -> status.
#: One check per Host object and QEMU: a matrix of 40 scenarios boots the test
#: guest once.  Weak: an entry goes with its Host.  Emptied by :func:`reset_caches`.
_kvm_cache: "weakref.WeakKeyDictionary[Host, Dict[str, KvmStatus]]" = weakref.WeakKeyDictionary()
#: the Host objects whose ``auto`` -> tcg fallback :func:`resolve_accel` has logged
_fallback_said: "weakref.WeakSet[Host]" = weakref.WeakSet()


def reset_caches() -> None:
    """Forget every cached KVM check and logged fallback (for tests)."""
    _kvm_cache.clear()
    _fallback_said.clear()


def kvm_status(host: Host, qemu: Optional[str] = None) -> KvmStatus:
    """:func:`check_kvm`, remembered per host object and QEMU binary."""
    per_host = _kvm_cache.setdefault(host, {})
    key = qemu or find_qemu(host)   # "" and the resolved default share one check
    if key not in per_host:
        per_host[key] = check_kvm(host, key or None)
    return per_host[key]


# --- the accelerator policy -----------------------------------------------------------

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


# --- everything at once ---------------------------------------------------------------

@dataclass(frozen=True)
class Facts:
    """All the facts of one host (:func:`gather`)."""

    host: str                       # the Host's name
    cpu: CpuInfo
    kvm: KvmStatus
    kvm_modules: Tuple[str, ...]
    kvm_params: Dict[str, str]      # module.param -> value
    qemu_path: str                  # "" when not found
    qemu_version: str               # first line of --version; "" when unknown
    host_kernel: str
    online_cpus: int
    memory: Memory
    hugepages: Tuple[HugePool, ...]  # by page size
    thp_mode: str                   # always | madvise | never | "" (no THP)
    phys_bits: int = 0              # the CPU's physical address bits (0: unknown)
    shm_avail_mib: int = -1         # free MiB in /dev/shm, where aliased guest RAM goes (-1: unknown)

    @property
    def accel_auto(self) -> str:
        """What ``--accel auto`` picks on this host."""
        return "kvm" if self.kvm.usable else "tcg"


def gather(host: Host, qemu: str = "") -> Facts:
    """Everything migstall knows about ``host``, with ``qemu`` ("" = on PATH) as
    its QEMU.  Never hangs: the only long step is the KVM boot check (cached per
    host, see :func:`kvm_status`), bounded by :data:`BOOT_CHECK_TIMEOUT_S`."""
    cpu = read_cpu(host)
    qemu_path = find_qemu(host, qemu)
    status = kvm_status(host, qemu_path or None)
    memory = read_memory(host)
    return Facts(
        host=getattr(host, "name", "host"),
        cpu=cpu,
        kvm=status,
        kvm_modules=tuple(loaded_kvm_modules(host)),
        kvm_params=kvm_params(host),
        qemu_path=qemu_path,
        qemu_version=qemu_version(host, qemu_path) if qemu_path else "",
        host_kernel=host_kernel(host),
        online_cpus=online_cpus(host),
        memory=memory,
        hugepages=tuple(hugepage_pools(host)),
        thp_mode=thp_mode(host),
        phys_bits=phys_address_bits(host),
        shm_avail_mib=free_mib(host, "/dev/shm"),
    )
