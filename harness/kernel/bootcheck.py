"""Boot a built kernel under TCG and read what it exposes.

A tiny busybox initramfs (written with :mod:`harness.guest.cpio`) mounts
proc/sys/devtmpfs/tracefs, prints ``uname -r``, the requested tracefs events
and marker files, whether /dev/kvm exists, then reboots; QEMU runs with
``-no-reboot`` so the reboot ends it.  QEMU is a foreground
:meth:`harness.qemu.machine.VM.run` on this machine (``-name migstall-<name>``,
killed by ``timeout -s KILL`` after :data:`BOOT_TIMEOUT`).
"""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from harness import paths
from harness.errors import QEMUError, UserError
from harness.guest.cpio import Entry, write_cpio
from harness.hosts.local import LocalHost
from harness.progress import Progress
from harness.qemu.machine import VM

log = logging.getLogger(__name__)

#: how long a TCG boot of a tiny kernel to the end of /init may take (shared, slow machine), seconds
BOOT_TIMEOUT = 240.0
BUSYBOX = Path("/bin/busybox")
QEMU = "qemu-system-x86_64"


@dataclass(frozen=True)
class BootResult:
    release: str                          # uname -r of the running kernel
    events: Tuple[Tuple[str, bool], ...]  # (SYSTEM/NAME, present under /sys/kernel/tracing/events)
    markers: Tuple[Tuple[str, str], ...]  # (path, content) as read in the guest
    migstall_events: Tuple[str, ...]      # every kvm/*migstall* event the kernel has
    kvm: bool                             # /dev/kvm exists (KVM_AMD/INTEL probed the -cpu max vCPU)
    console: Path                         # the serial console log
    duration_s: float

    def has_event(self, name: str) -> bool:
        return dict(self.events).get(name, False)


def _init_script(events: Sequence[str], markers: Sequence[str]) -> str:
    bb = "/bin/busybox"
    lines = [
        f"#!{bb} sh",
        f"{bb} mkdir -p /proc /sys /dev /tmp",
        f"{bb} mount -t proc proc /proc",
        f"{bb} mount -t sysfs sysfs /sys",
        f"{bb} mount -t devtmpfs devtmpfs /dev 2>/dev/null",
        f"{bb} mount -t tracefs tracefs /sys/kernel/tracing 2>/dev/null",
        f"echo \"MIGSTALL-UNAME $({bb} uname -r)\"",
        "if [ -e /dev/kvm ]; then echo MIGSTALL-KVM yes; else echo MIGSTALL-KVM no; fi",
    ]
    for ev in events:
        q = shlex.quote(ev)
        lines.append(f"if [ -d /sys/kernel/tracing/events/{q} ]; then echo MIGSTALL-EVENT {q} yes; "
                     f"else echo MIGSTALL-EVENT {q} no; fi")
    lines.append(f"for e in /sys/kernel/tracing/events/kvm/*migstall*; do [ -d \"$e\" ] && "
                 f"echo \"MIGSTALL-HAS kvm/$({bb} basename $e)\"; done")
    for m in markers:
        q = shlex.quote(m)
        lines.append(f"if [ -r {q} ]; then echo \"MIGSTALL-MARKER {q} $({bb} cat {q})\"; "
                     f"else echo MIGSTALL-MARKER {q} MISSING; fi")
    lines += ["echo MIGSTALL-DONE", f"{bb} sync", f"{bb} reboot -f", f"{bb} sleep 30"]
    return "\n".join(lines) + "\n"


def make_initramfs(events: Sequence[str], markers: Sequence[str]) -> bytes:
    if not BUSYBOX.is_file():
        raise UserError(f"{BUSYBOX} is missing; install busybox-static (apt-get install busybox-static)")
    entries = [Entry("bin/busybox", 0o755, source=BUSYBOX),
               Entry("bin/sh", target="busybox"),
               Entry("init", 0o755, data=_init_script(events, markers).encode()),
               Entry("proc", is_dir=True), Entry("sys", is_dir=True), Entry("dev", is_dir=True),
               Entry("tmp", is_dir=True)]
    return write_cpio(entries)


def _parse(console: str) -> Dict[str, object]:
    events: List[Tuple[str, bool]] = []
    markers: List[Tuple[str, str]] = []
    has: List[str] = []
    out: Dict[str, object] = {"events": events, "markers": markers, "has": has, "release": None, "kvm": False,
                              "done": False}
    for raw in console.splitlines():
        line = raw.strip()
        idx = line.find("MIGSTALL-")
        if idx < 0:
            continue
        word, _, rest = line[idx:].partition(" ")
        if word == "MIGSTALL-UNAME":
            out["release"] = rest.strip()
        elif word == "MIGSTALL-KVM":
            out["kvm"] = rest.strip() == "yes"
        elif word == "MIGSTALL-EVENT":
            name, _, state = rest.rpartition(" ")
            events.append((name, state == "yes"))
        elif word == "MIGSTALL-HAS":
            has.append(rest.strip())
        elif word == "MIGSTALL-MARKER":
            path, _, value = rest.partition(" ")
            markers.append((path, value.strip()))
        elif word == "MIGSTALL-DONE":
            out["done"] = True
    return out


def boot_check(bzimage: Path, events: Sequence[str] = (), markers: Sequence[str] = (), *,
               name: str = "bootcheck", timeout: float = BOOT_TIMEOUT, memory_mb: int = 512,
               progress: Optional[Progress] = None) -> BootResult:
    """Boot ``bzimage`` under TCG; return what the running kernel reported."""
    progress = progress or Progress()
    if shutil.which(QEMU) is None:
        raise UserError(f"{QEMU} is not installed; install qemu-system-x86")
    bzimage = Path(bzimage)
    if not bzimage.is_file():
        raise UserError(f"kernel image {bzimage} does not exist; build it with migstall kernel build")
    logs = paths.cache_dir("kernel-boot")
    rundir = paths.new_runtime_dir(f"migstall-{name}-")
    console = logs / f"{name}-{int(time.time())}-{os.getpid()}.console.log"
    t0 = time.monotonic()
    try:
        initrd = rundir / "initrd.gz"
        initrd.write_bytes(make_initramfs(events, markers))
        args = ["-accel", "tcg", "-cpu", "max", "-m", str(memory_mb), "-smp", "1", "-nodefaults", "-no-reboot",
                "-serial", f"file:{console}", "-kernel", str(bzimage), "-initrd", str(initrd),
                "-append", "console=ttyS0 panic=-1 rdinit=/init"]
        vm = VM(LocalHost(), name, args, qemu=QEMU, runtime_dir=str(rundir))
        with progress.task(f"booting {bzimage.parent.name} under TCG"):
            res = vm.run(timeout)
        if res.timed_out:
            raise QEMUError(f"the kernel did not finish its boot check within {timeout:g}s", log_path=console)
        text = console.read_text(errors="replace") if console.exists() else ""
        parsed = _parse(text)
        if res.status != 0 or not parsed["done"]:
            (console.with_suffix(".qemu.log")).write_text(res.stderr + vm.log_text)
            raise QEMUError(f"boot check of {bzimage} failed (QEMU exit {res.status}, "
                            f"init {'finished' if parsed['done'] else 'did not finish'})", log_path=console)
        return BootResult(release=str(parsed["release"] or ""), events=tuple(parsed["events"]),  # type: ignore[arg-type]
                          markers=tuple(parsed["markers"]), migstall_events=tuple(parsed["has"]),  # type: ignore[arg-type]
                          kvm=bool(parsed["kvm"]), console=console, duration_s=time.monotonic() - t0)
    finally:
        shutil.rmtree(rundir, ignore_errors=True)
