"""The KVM boot check: does a guest actually boot under ``-accel kvm``?

The third step of the KVM usability check (:func:`harness.hosts.facts.check_kvm`),
in two stages:

a. a 512-byte boot sector that goes from real mode to 32-bit protected mode
   and 64-bit long mode with paging, then writes to QEMU's ``isa-debug-exit``
   port (QEMU exits with a known status): needs nothing but QEMU;
b. the guest kernel (Debian's, cached) without a root file system: it boots
   until "VFS: Unable to mount root fs" and panics, and with ``panic=-1
   -no-reboot`` QEMU exits.  This stage matters: a KVM without VMX/SVM (the
   PVM module on this project's build machine) passes (a) and hangs in (b).

Each stage is a foreground :meth:`harness.qemu.machine.VM.run` (no QMP): it
runs under ``timeout -s KILL`` on the host and gives up after
:data:`BOOT_CHECK_TIMEOUT_S`, so a hanging KVM is never waited on longer.
Everything goes through the :class:`~harness.hosts.base.Host` API (this machine,
SSH, the virtual host).
"""

from __future__ import annotations

import logging
from typing import List, Optional

from harness.errors import CommandTimeout, HostError, UserError
from harness.hosts.base import Host
from harness.qemu.machine import VM, RunResult

log = logging.getLogger(__name__)

#: seconds each stage of the KVM boot check may take.  Bare-metal KVM boots the
#: test kernel to its panic in about 1 s; the nested "virtual host" (L1 under
#: TCG) took 7.6 s (boot sector) + 35.5 s (kernel) on this project's loaded
#: 2-core machine.  The QEMU is SIGKILLed after this, so a KVM that hangs costs
#: at most this long per stage, once per process (results are cached per host).
BOOT_CHECK_TIMEOUT_S = 120.0

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


def _run_bounded(host: Host, qemu: str, args: List[str], timeout: float,
                 runtime_dir: Optional[str] = None) -> RunResult:
    """Run a short-lived QEMU in the foreground (:meth:`VM.run`: under
    ``timeout -s KILL`` on the host, so a hang is bounded even if our connection
    to the host goes away)."""
    vm = VM(host, "doctor", args, qemu=qemu, runtime_dir=runtime_dir)
    try:
        return vm.run(timeout)
    except CommandTimeout as exc:
        # `timeout` itself did not come back: the host, not QEMU, stopped answering
        raise CommandTimeout(f"{host.name} stopped answering during the KVM check (a {timeout:g} s QEMU "
                             f"run under `timeout` did not return); the host may be hung",
                             log_path=host.console_path) from exc


def _failed(res: RunResult, timeout: float) -> str:
    if res.timed_out or res.status in (124, 137, -9):
        return f"failed: no boot within {timeout:g}s (QEMU killed)"
    err = res.err_line
    return f"failed: QEMU exited {res.status}" + (f" ({err})" if err else "")


def _common_args(accel: str) -> List[str]:
    return ["-accel", accel, "-machine", "pc",
            "-cpu", "host" if accel == "kvm" else "max", "-nodefaults", "-no-user-config", "-no-reboot"]


def _boot_sector_check(host: Host, qemu: str, accel: str = "kvm", timeout: float = BOOT_CHECK_TIMEOUT_S) -> str:
    """Stage 1: boot the :func:`_boot_sector` guest; "ok (N ms)" or "failed: why"."""
    with host.runtime_dir("migstall-doctor-") as rundir:
        image = f"{rundir}/boot.img"
        host.write_bytes(image, _boot_sector())
        res = _run_bounded(host, qemu, [
            *_common_args(accel), "-m", "16",
            "-drive", f"file={image},format=raw,if=floppy,readonly=on",
            "-device", f"isa-debug-exit,iobase={_DEBUG_EXIT_PORT:#x},iosize=0x04"], timeout, rundir)
    return f"ok ({res.ms:.0f} ms)" if res.status == _BOOT_OK_STATUS else _failed(res, timeout)


def _linux_boot_check(host: Host, qemu: str, kernel: str, accel: str = "kvm",
                      timeout: float = BOOT_CHECK_TIMEOUT_S) -> str:
    """Stage 2: boot the guest kernel without a root file system.  A kernel that
    boots all the way panics with "VFS: Unable to mount root fs", and with
    ``panic=-1 -no-reboot`` QEMU then exits 0.  This is the stage that catches a
    KVM which runs firmware but hangs Linux (as on a CPU without VMX/SVM)."""
    res = _run_bounded(host, qemu, [
        *_common_args(accel), "-m", "256", "-serial", "stdio",
        "-kernel", kernel, "-append", "console=ttyS0 panic=-1 loglevel=3"], timeout)
    if res.status == 0 and "Kernel panic - not syncing: VFS" in res.stdout:
        return f"ok ({res.ms:.0f} ms)"
    if res.status == 0:
        last = [ln for ln in res.stdout.strip().splitlines() if ln.strip()][-1:] or ["no console output"]
        return f"failed: the kernel reset before mounting root ({' '.join(last[0].split())[:120]})"
    return _failed(res, timeout)


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
