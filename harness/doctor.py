"""Host capability check (``migstall doctor``) and accelerator choice.

Usable KVM means three things, checked in this order, each only when the
previous one passed (so a host without VMX/SVM is answered at once and never
hung on):

1. the CPU shows ``vmx`` or ``svm`` in /proc/cpuinfo;
2. ``/dev/kvm`` opens read-write;
3. a guest actually boots under ``-accel kvm``, in two stages:
   a. a 512-byte boot sector that goes from real mode to 32-bit protected mode
      and 64-bit long mode with paging, then writes to QEMU's ``isa-debug-exit``
      port (QEMU exits with a known status): needs nothing but QEMU;
   b. the guest kernel (Debian's, cached) without a root file system: it boots
      until "VFS: Unable to mount root fs" and panics, and with ``panic=-1
      -no-reboot`` QEMU exits.  This stage matters: a KVM without VMX/SVM (the
      PVM module on this project's build machine) passes (a) and hangs in (b).
   Each stage runs under ``timeout -s KILL`` on the host and gives up after
   :data:`BOOT_CHECK_TIMEOUT_S`, so a hanging KVM is never waited on longer.

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

from harness.errors import CommandTimeout, HostError, KVMUnusable, UserError
from harness.hosts.base import Host

log = logging.getLogger(__name__)

#: seconds each stage of the KVM boot check may take.  Bare-metal KVM boots the
#: test kernel to its panic in about 1 s; the nested "virtual host" (L1 under
#: TCG) took 7.6 s (boot sector) + 35.5 s (kernel) on this project's loaded
#: 2-core machine.  The QEMU is SIGKILLed after this, so a KVM that hangs costs
#: at most this long per stage, once per process (results are cached per host).
BOOT_CHECK_TIMEOUT_S = 120.0
#: seconds for small host commands (qemu --version, sh -c ...)
QUICK_COMMAND_TIMEOUT_S = 20.0
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

# isa-debug-exit makes QEMU exit with (value << 1) | 1; the boot sector writes 0x31.
_DEBUG_EXIT_PORT = 0xF4
_BOOT_OK_STATUS = (0x31 << 1) | 1


def _boot_sector() -> bytes:
    """A BIOS boot sector that proves the guest can run real, protected and long mode.

    Assembly (loaded at 0x7c00 by the BIOS)::

        cli
        lgdt  [gdtr]                ; flat 32-bit code/data and 64-bit code
        mov   eax, cr0 ; or al, 1 ; mov cr0, eax
        jmp   0x08:pm32
      pm32: (bits 32)
        mov   ax, 0x10 ; mov ds, ax ; mov es, ax ; mov ss, ax
        ; identity-map the first 2 MiB with one 2 MiB page at 0x1000/0x2000/0x3000
        mov   edi, 0x1000 ; xor eax, eax ; mov ecx, 0xc00 ; rep stosd
        mov   dword [0x1000], 0x2003   ; PML4[0] -> PDPT
        mov   dword [0x2000], 0x3003   ; PDPT[0] -> PD
        mov   dword [0x3000], 0x0083   ; PD[0]   -> 2 MiB page, RW|P|PS
        mov   eax, cr4 ; or eax, 0x20 ; mov cr4, eax          ; PAE
        mov   eax, 0x1000 ; mov cr3, eax
        mov   ecx, 0xc0000080 ; rdmsr ; or eax, 0x100 ; wrmsr  ; EFER.LME
        mov   eax, cr0 ; or eax, 0x80000000 ; mov cr0, eax     ; paging -> long mode
        jmp   0x18:lm64
      lm64: (bits 64)
        mov   al, 0x31 ; out 0xf4, al
        hlt ; jmp $-1
    """
    base = 0x7C00
    code = bytearray()
    # 16-bit part
    code += b"\xfa"                                  # cli
    lgdt_fix = len(code) + 3
    code += b"\x0f\x01\x16\x00\x00"                  # lgdt [disp16]  (patched)
    code += b"\x0f\x20\xc0"                          # mov eax, cr0
    code += b"\x0c\x01"                              # or al, 1
    code += b"\x0f\x22\xc0"                          # mov cr0, eax
    jmp32_fix = len(code) + 2
    code += b"\x66\xea\x00\x00\x00\x00\x08\x00"      # jmp dword 0x08:pm32 (patched)
    pm32 = len(code)
    # 32-bit part
    code += b"\x66\xb8\x10\x00"                      # mov ax, 0x10
    code += b"\x8e\xd8\x8e\xc0\x8e\xd0"              # mov ds/es/ss, ax
    code += b"\xbf\x00\x10\x00\x00"                  # mov edi, 0x1000
    code += b"\x31\xc0"                              # xor eax, eax
    code += b"\xb9\x00\x0c\x00\x00"                  # mov ecx, 0xc00
    code += b"\xf3\xab"                              # rep stosd
    code += b"\xc7\x05\x00\x10\x00\x00\x03\x20\x00\x00"  # mov dword [0x1000], 0x2003
    code += b"\xc7\x05\x00\x20\x00\x00\x03\x30\x00\x00"  # mov dword [0x2000], 0x3003
    code += b"\xc7\x05\x00\x30\x00\x00\x83\x00\x00\x00"  # mov dword [0x3000], 0x83
    code += b"\x0f\x20\xe0\x83\xc8\x20\x0f\x22\xe0"  # cr4 |= PAE
    code += b"\xb8\x00\x10\x00\x00\x0f\x22\xd8"      # cr3 = 0x1000
    code += b"\xb9\x80\x00\x00\xc0\x0f\x32"          # rdmsr EFER
    code += b"\x0d\x00\x01\x00\x00\x0f\x30"          # or eax, LME ; wrmsr
    code += b"\x0f\x20\xc0\x0d\x00\x00\x00\x80\x0f\x22\xc0"  # cr0 |= PG
    jmp64_fix = len(code) + 1
    code += b"\xea\x00\x00\x00\x00\x18\x00"          # jmp far 0x18:lm64 (patched)
    lm64 = len(code)
    # 64-bit part
    code += b"\xb0\x31\xe6" + bytes([_DEBUG_EXIT_PORT])  # mov al, 0x31 ; out 0xf4, al
    code += b"\xf4\xeb\xfd"                          # hlt ; jmp back to hlt
    # GDT: null, 32-bit code, data, 64-bit code
    while len(code) % 8:
        code += b"\x00"
    gdt = len(code)
    code += bytes(8)
    code += bytes.fromhex("ffff0000009acf00")        # 0x08: code32, base 0, 4 GiB
    code += bytes.fromhex("ffff00000092cf00")        # 0x10: data, base 0, 4 GiB
    code += bytes.fromhex("0000000000982000")        # 0x18: code64 (L=1)
    gdtr = len(code)
    code += (4 * 8 - 1).to_bytes(2, "little") + (base + gdt).to_bytes(4, "little")
    code[lgdt_fix:lgdt_fix + 2] = (base + gdtr).to_bytes(2, "little")
    code[jmp32_fix:jmp32_fix + 4] = (base + pm32).to_bytes(4, "little")
    code[jmp64_fix:jmp64_fix + 4] = (base + lm64).to_bytes(4, "little")
    assert len(code) <= 510
    return bytes(code) + bytes(510 - len(code)) + b"\x55\xaa"


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


def _run_bounded(host: Host, argv: List[str], timeout: float) -> Tuple[int, str, str, float]:
    """Run a short-lived QEMU under ``timeout -s KILL`` on the host (so a hang is
    bounded even if our connection to the host goes away): (status, stdout,
    last stderr line, ms)."""
    import time

    log.info("KVM check: %s", " ".join(argv))
    t0 = time.monotonic()
    # setpriv --pdeathsig (util-linux; absent from busybox hosts such as the L1
    # VM): if `timeout` itself is killed (Ctrl-C makes subprocess SIGKILL it),
    # QEMU dies with it instead of hanging on unsupervised.
    guard = ["setpriv", "--pdeathsig", "KILL"]
    probe = host.run([*guard, "true"], check=False, timeout=QUICK_COMMAND_TIMEOUT_S)
    if probe.returncode != 0:   # busybox setpriv has no --pdeathsig
        guard = []
    try:
        res = host.run(["timeout", "-s", "KILL", f"{timeout:g}", *guard, *argv],
                       check=False, timeout=timeout + QUICK_COMMAND_TIMEOUT_S)
    except CommandTimeout as exc:
        # `timeout` itself did not come back: the host, not QEMU, stopped answering
        raise CommandTimeout(f"{host.name} stopped answering during the KVM check (a {timeout:g} s QEMU "
                             f"run under `timeout` did not return); the host may be hung",
                             log_path=host.console_path) from exc
    ms = (time.monotonic() - t0) * 1000
    if ms >= timeout * 1000 * 0.98 and res.returncode != 0:
        return 137, res.text, "", ms          # killed by timeout (GNU: 137; busybox/ssh: other codes)
    err = res.stderr.decode(errors="replace").strip().splitlines()
    return res.returncode, res.text, (err[-1] if err else ""), ms


def _failed(status: int, err: str, timeout: float) -> str:
    if status in (124, 137, -9):
        return f"failed: no boot within {timeout:g}s (QEMU killed)"
    return f"failed: QEMU exited {status}" + (f" ({err})" if err else "")


def _common_args(accel: str) -> List[str]:
    return ["-name", "migstall-doctor", "-accel", accel, "-machine", "pc",
            "-cpu", "host" if accel == "kvm" else "max", "-nodefaults", "-no-user-config",
            "-display", "none", "-no-reboot"]


def _boot_sector_check(host: Host, qemu: str, accel: str = "kvm", timeout: float = BOOT_CHECK_TIMEOUT_S) -> str:
    """Stage 1: boot the :func:`_boot_sector` guest; "ok (N ms)" or "failed: why"."""
    with host.runtime_dir("migstall-doctor-") as rundir:
        image = f"{rundir}/boot.img"
        host.write_bytes(image, _boot_sector())
        status, _, err, ms = _run_bounded(host, [
            qemu, *_common_args(accel), "-m", "16",
            "-drive", f"file={image},format=raw,if=floppy,readonly=on",
            "-device", f"isa-debug-exit,iobase={_DEBUG_EXIT_PORT:#x},iosize=0x04"], timeout)
    return f"ok ({ms:.0f} ms)" if status == _BOOT_OK_STATUS else _failed(status, err, timeout)


def _linux_boot_check(host: Host, qemu: str, kernel: str, accel: str = "kvm",
                      timeout: float = BOOT_CHECK_TIMEOUT_S) -> str:
    """Stage 2: boot the guest kernel without a root file system.  A kernel that
    boots all the way panics with "VFS: Unable to mount root fs", and with
    ``panic=-1 -no-reboot`` QEMU then exits 0.  This is the stage that catches a
    KVM which runs firmware but hangs Linux (as on a CPU without VMX/SVM)."""
    status, out, err, ms = _run_bounded(host, [
        qemu, *_common_args(accel), "-m", "256", "-serial", "stdio",
        "-kernel", kernel, "-append", "console=ttyS0 panic=-1 loglevel=3"], timeout)
    if status == 0 and "Kernel panic - not syncing: VFS" in out:
        return f"ok ({ms:.0f} ms)"
    if status == 0:
        last = [ln for ln in out.strip().splitlines() if ln.strip()][-1:] or ["no console output"]
        return f"failed: the kernel reset before mounting root ({' '.join(last[0].split())[:120]})"
    return _failed(status, err, timeout)


def _guest_kernel_on(host: Host) -> Optional[str]:
    """The default guest kernel (fetched once, cached), staged on ``host``; None if unavailable."""
    from harness.guest.kernel import get_guest_kernel

    try:
        return host.stage(get_guest_kernel().image)
    except (UserError, HostError) as exc:
        log.warning("KVM boot check: no guest kernel (%s); checking with the boot sector only", exc)
        return None


def boot_check(host: Host, qemu: str, accel: str = "kvm", timeout: float = BOOT_CHECK_TIMEOUT_S,
               kernel: Optional[str] = None) -> str:
    """Both stages; "ok (...)" or "failed: ...".  ``kernel``: a path on the host
    (default: Debian's guest kernel, staged)."""
    first = _boot_sector_check(host, qemu, accel, timeout)
    if not first.startswith("ok"):
        return first.replace("failed: ", "failed: boot sector: ", 1)
    kernel = kernel or _guest_kernel_on(host)
    if kernel is None:
        return f"{first}; linux boot not checked (no guest kernel)"
    second = _linux_boot_check(host, qemu, kernel, accel, timeout)
    if not second.startswith("ok"):
        return second.replace("failed: ", "failed: linux: ", 1)
    return f"ok (boot sector {first[4:-1]}, linux {second[4:-1]})"


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
