"""The measured guest: kernel + initramfs, and the QEMU arguments that boot it.

The initramfs holds busybox-static, the probe (``guests/probe/probe.c``,
compiled here with the host's gcc ``-static -O2 -pthread``), ``guests/init``
as ``/init`` and the kernel modules the probe channel needs.  It is cached in
``paths.cache_dir("initramfs")`` under a hash of all of those inputs (plus the
compiler version and this module's layout version): the same inputs give the
same path and no work; a changed input gives a new image.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import struct
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import List, Mapping, Optional

from harness import paths
from harness.errors import HostError, UserError
from harness.guest import cpio
from harness.guest.kernel import GuestKernel, get_guest_kernel
from harness.progress import Progress
from harness.scenario import Scenario

log = logging.getLogger(__name__)

GUESTS_DIR = paths.REPO_ROOT / "guests"
PROBE_SOURCE = GUESTS_DIR / "probe" / "probe.c"
INIT_SCRIPT = GUESTS_DIR / "init"
CFLAGS = ("-static", "-O2", "-pthread", "-Wall")
#: seconds to compile the probe
COMPILE_TIMEOUT = 180.0
#: name of the virtio-serial port and the QEMU ids of the channel and console
PORT_NAME = "migstall.0"
CHANNEL_ID = "migstall-probe"
CONSOLE_ID = "migstall-console"
VSER_ID = "migstall-vser"
#: bump when the initramfs layout changes
_LAYOUT_VERSION = 1


@dataclass(frozen=True)
class GuestImage:
    kernel: Path
    initrd: Path
    kernel_release: str
    channel: str  # "virtio" | "serial"


def _busybox() -> Path:
    found = shutil.which("busybox") or ("/bin/busybox" if os.path.exists("/bin/busybox") else None)
    if not found:
        raise UserError("busybox not found; install busybox-static (make setup does)")
    path = Path(found).resolve()
    if _is_dynamic(path):
        raise UserError(f"{path} is dynamically linked and cannot run in the guest; "
                        "install busybox-static (apt-get install busybox-static)")
    return path


def _is_dynamic(elf: Path) -> bool:
    """True if the ELF file has a PT_INTERP program header."""
    with open(elf, "rb") as fh:
        head = fh.read(64)
        if head[:4] != b"\x7fELF" or head[4] != 2:
            return True
        phoff, = struct.unpack_from("<Q", head, 0x20)
        phentsize, phnum = struct.unpack_from("<HH", head, 0x36)
        fh.seek(phoff)
        table = fh.read(phentsize * phnum)
    return any(struct.unpack_from("<I", table, i * phentsize)[0] == 3 for i in range(phnum))


def _gcc_version() -> str:
    gcc = shutil.which("gcc")
    if not gcc:
        raise UserError("gcc not found: it compiles the guest probe; install gcc and libc6-dev "
                        "(make setup does)")
    try:
        out = subprocess.run([gcc, "--version"], capture_output=True, timeout=30, check=True)
    except (subprocess.SubprocessError, OSError) as exc:
        raise HostError(f"gcc --version failed: {exc}") from exc
    return out.stdout.decode(errors="replace").splitlines()[0]


def _input_key(kernel: GuestKernel, busybox: Path, gcc: str) -> str:
    h = hashlib.sha256()

    def add(label: str, data: bytes) -> None:
        h.update(label.encode() + b"\0" + str(len(data)).encode() + b"\0" + data)

    add("layout", str(_LAYOUT_VERSION).encode())
    add("cflags", " ".join(CFLAGS).encode())
    add("gcc", gcc.encode())
    add("probe.c", PROBE_SOURCE.read_bytes())
    add("init", INIT_SCRIPT.read_bytes())
    add("busybox", busybox.read_bytes())
    for m in kernel.modules:
        add("module:" + m.name, m.read_bytes())
    return h.hexdigest()


def _compile_probe(out: Path, log_path: Path) -> None:
    argv = ["gcc", *CFLAGS, "-o", str(out), str(PROBE_SOURCE)]
    log.info("compiling the probe: %s", " ".join(argv))
    try:
        proc = subprocess.run(argv, capture_output=True, timeout=COMPILE_TIMEOUT)
    except subprocess.TimeoutExpired as exc:
        raise HostError(f"compiling the probe took more than {COMPILE_TIMEOUT:g}s") from exc
    log_path.write_bytes(b"$ " + " ".join(argv).encode() + b"\n" + proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise HostError("compiling the guest probe failed (is libc6-dev installed? "
                        "static glibc comes with it)", log_path=log_path)


def build_initramfs(kernel: GuestKernel, progress: Progress = Progress()) -> Path:
    """The cached initramfs for ``kernel``'s modules; built if missing."""
    busybox = _busybox()
    key = _input_key(kernel, busybox, _gcc_version())
    cache = paths.cache_dir("initramfs")
    target = cache / f"initramfs-{key[:20]}.cpio.gz"
    if target.is_file():
        log.debug("initramfs cached: %s", target)
        return target
    with progress.task("building the guest initramfs"), \
            tempfile.TemporaryDirectory(prefix="build-", dir=cache) as tmpname:
        tmp = Path(tmpname)
        probe = tmp / "probe"
        _compile_probe(probe, cache / f"initramfs-{key[:20]}.compile.log")
        entries = [
            cpio.Entry("init", 0o755, source=INIT_SCRIPT),
            cpio.Entry("bin/busybox", 0o755, source=busybox),
            cpio.Entry("bin/sh", target="busybox"),
            cpio.Entry("bin/probe", 0o755, source=probe),
            cpio.Entry("dev", 0o755, is_dir=True),
            cpio.Entry("proc", 0o755, is_dir=True),
            cpio.Entry("sys", 0o755, is_dir=True),
            cpio.Entry("tmp", 0o1777, is_dir=True),
        ]
        entries += [cpio.Entry(f"lib/modules/{m.name}", 0o644, source=m) for m in kernel.modules]
        data = cpio.write_cpio(entries)
        part = tmp / "initramfs.part"
        part.write_bytes(data)
        (cache / f"initramfs-{key[:20]}.json").write_text(json.dumps({
            "key": key, "kernel_release": kernel.release, "kernel_origin": kernel.origin,
            "modules": [m.name for m in kernel.modules], "busybox": str(busybox),
        }, indent=1) + "\n")
        os.replace(part, target)
    log.info("built initramfs %s (%d bytes)", target, target.stat().st_size)
    return target


def build_guest_image(kernel: Optional[Path] = None, progress: Progress = Progress()) -> GuestImage:
    """Kernel (``kernel`` = a bzImage, else Debian's, cached) and initramfs."""
    gk = get_guest_kernel(kernel, progress)
    initrd = build_initramfs(gk, progress)
    return GuestImage(gk.image, initrd, gk.release, gk.channel)


def _opt(path: str) -> str:
    """Escape a value for a QEMU comma-separated option list."""
    return path.replace(",", ",,")


#: probe parameters a caller may add (docs/probe-protocol.md)
EXTRA_PROBE_PARAMS = ("write_mib", "max_stalls", "clock")


def kernel_cmdline(image: GuestImage, scenario: Scenario,
                   probe_params: Optional[Mapping[str, object]] = None) -> str:
    extra = dict(probe_params or {})
    unknown = sorted(set(extra) - set(EXTRA_PROBE_PARAMS))
    if unknown:
        raise ValueError(f"unknown probe parameters {unknown}; known: {EXTRA_PROBE_PARAMS}")
    quiet = []
    if scenario.vcpus > 1:
        # vCPU0 does the housekeeping (interrupts, RCU callbacks, the probe's
        # control thread); the others run one loop each without a periodic
        # tick.  Under TCG every interrupt a vCPU takes needs QEMU's BQL, so a
        # ticking cpu loop would see BQL holds it has no part in.
        cpus = "1" if scenario.vcpus == 2 else f"1-{scenario.vcpus - 1}"
        quiet = [f"nohz_full={cpus}", f"rcu_nocbs={cpus}", "irqaffinity=0"]
    return " ".join([
        "console=ttyS0,115200", "loglevel=4", "panic=-1",
        # a reliable TSC keeps the guest kernel off the hpet (MMIO, which
        # takes QEMU's BQL under TCG) for its own timekeeping
        "tsc=reliable",
        # boot time, measured in the virtual host (L2 under nested KVM, Debian
        # 6.1 guest kernel, printk times): the early PCI scans of the AGP/GART
        # aperture checks took 6.5 s and go with pci=noearly (q35 needs none of
        # the early quirks); the crypto self-tests about 1 s.  Time to /init
        # went from 27 s to 19 s.  Neither touches what a run measures.
        "pci=noearly", "cryptomgr.notests",
        *quiet,
        f"migstall.channel={image.channel}",
        f"migstall.touch_mib={scenario.touch_mib}",
        f"migstall.loops={','.join(scenario.loop_list)}",
        f"migstall.threshold_us={scenario.threshold_us}",
        # aliased RAM: the probe touches the ivshmem BARs (harness.qemu.alias), not its own memory
        *([f"migstall.alias={scenario.mem_mib // scenario.alias_mib}"] if scenario.alias_mib else []),
        *(f"migstall.{k}={v}" for k, v in sorted(extra.items())),
    ])


def guest_qemu_args(image: GuestImage, *, kernel: str, initrd: str, channel_socket: str,
                    console_log: str, scenario: Scenario,
                    probe_params: Optional[Mapping[str, object]] = None) -> List[str]:
    """QEMU arguments booting ``image``: kernel, initrd and command line; the
    guest console (ttyS0) into ``console_log``; the probe channel as a chardev
    unix socket server (``server=on,wait=off``) at ``channel_socket``.
    ``kernel`` and ``initrd`` are paths on the QEMU host.  ``-no-reboot`` makes
    a guest panic (``panic=-1``) or reboot end QEMU instead of looping.
    ``probe_params`` adds probe parameters (``write_mib``: the write loop
    cycles over only that many MiB, so that a migration can converge under
    TCG; ``max_stalls``; ``clock``).

    The same arguments (with the destination's own socket and log) must be
    used on the migration destination so the device models match.
    """
    args = [
        "-kernel", kernel, "-initrd", initrd, "-append", kernel_cmdline(image, scenario, probe_params),
        "-no-reboot",
        "-chardev", f"file,id={CONSOLE_ID},path={_opt(console_log)}",
        "-serial", f"chardev:{CONSOLE_ID}",
        "-chardev", f"socket,id={CHANNEL_ID},path={_opt(channel_socket)},server=on,wait=off",
    ]
    if image.channel == "virtio":
        args += ["-device", f"virtio-serial-pci,id={VSER_ID}",
                 "-device", f"virtserialport,bus={VSER_ID}.0,chardev={CHANNEL_ID},name={PORT_NAME}"]
    else:
        args += ["-serial", f"chardev:{CHANNEL_ID}"]
    return args
