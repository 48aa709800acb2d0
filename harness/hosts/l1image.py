"""The virtual host's L1 kernel and initramfs.

The L1 initramfs (built with :mod:`harness.guest.cpio`, cached by content hash)
holds everything the runner drives over SSH inside L1:

* busybox (``/bin/busybox`` + applet links), with busybox ``init`` as PID 1;
* OpenSSH ``sshd`` and ``sftp-server`` (unix-socket forwarding for QMP), GNU ``date``
  (nanoseconds for clock alignment);
* QEMU (``qemu-system-x86_64``) with the shared libraries ``ldd`` resolves and its
  firmware (``/usr/share/seabios``, the x86 ROMs of ``/usr/share/qemu``);
* for Debian's kernel: the KVM modules (irqbypass, kvm, ccp, kvm-amd; kvm and
  kvm-amd those of a ``--target kvm-modules`` build when one is given) and the
  virtio-net NIC driver (a migstall-built kernel has them built in), loaded by
  ``/etc/init.d/rcS`` with the ``MODULE.param=value`` arguments of the kernel
  command line (as modprobe would);
* ``migstall-kvm-pin`` (``guests/kvm-pin``), which rcS starts to hold one idle
  KVM VM for L1's lifetime: without it, an L2 QEMU exiting can hang L1 under
  multi-threaded TCG (the reason is in the C file);
* ``/etc/init.d/rcS`` (``harness/sh/l1_rcS.sh``): mounts, modules, the probe
  keeper, network (QEMU user net), sshd, then one line ``MIGSTALL-L1-READY
  <release>`` (or ``MIGSTALL-L1-FAILED <why>``) on the second serial port, which
  the host reads as the boot-complete event.

Keys are NOT in the cached image: each VM gets a small second cpio archive
(fresh sshd host key + the client's public key) appended to it, which the kernel
unpacks over the first.
"""

from __future__ import annotations

import hashlib
import logging
import lzma
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Sequence, Tuple

from harness import ctools, sh
from harness.errors import HostError, UserError
from harness.guest.cpio import Entry, file_entry, write_cpio
from harness.measure import kvm_trace
from harness.paths import cache_dir, file_lock

log = logging.getLogger(__name__)

#: Debian's kernel package used for L1 when ``virtual:debian`` (same one the guest uses)
DEBIAN_KERNEL_PACKAGE = "linux-image-6.1.0-56-amd64"
#: modules Debian's kernel needs in L1 (dependencies are added from their modinfo)
DEBIAN_L1_MODULES = ("irqbypass", "kvm", "ccp", "kvm_amd", "virtio_pci", "virtio_net")
#: timeout for apt-get download / dpkg-deb, seconds
DOWNLOAD_TIMEOUT = 600.0
READY_LINE = "MIGSTALL-L1-READY"
FAILED_LINE = "MIGSTALL-L1-FAILED"
#: L1's init reports each stage of its boot on the ready port, so a slow or stuck
#: boot says where it was (the kernel's own stages are on the console log)
STAGE_LINE = "MIGSTALL-L1-STAGE"

SSHD = "/usr/sbin/sshd"
SFTP_SERVER = "/usr/lib/openssh/sftp-server"
EXTRA_BINARIES = ("/usr/bin/date",)
QEMU_SHARE_FILES = ("kvmvapic.bin", "linuxboot.bin", "linuxboot_dma.bin", "multiboot.bin",
                    "multiboot_dma.bin", "pvh.bin", "qboot.rom", "sgabios.bin")
FIRMWARE_DIRS = ("/usr/share/seabios", "/usr/lib/ipxe/qemu")


@dataclass(frozen=True)
class L1Kernel:
    """The kernel L1 boots."""

    image: Path                                  # bzImage / vmlinuz
    release: str                                 # uname -r
    label: str                                   # "debian", or the bzImage's release
    modules: Tuple[Tuple[str, Path], ...] = ()   # (name, .ko) in load order; () = KVM built in


@dataclass(frozen=True)
class L1Image:
    initrd: Path
    kernel: L1Kernel
    digest: str


# -- kernels -------------------------------------------------------------------------------



def _unpacked_debian_package(package: str = DEBIAN_KERNEL_PACKAGE) -> Path:
    """``apt-get download`` + ``dpkg-deb -x`` into the cache, once."""
    root = cache_dir("debian-kernel")
    dest = root / package
    with file_lock(root / f".{package}.lock"):
        if (dest / "boot").is_dir():
            return dest
        with tempfile.TemporaryDirectory(dir=root, prefix=".dl-") as tmp:
            try:
                subprocess.run(["apt-get", "download", package], cwd=tmp, check=True, capture_output=True,
                               timeout=DOWNLOAD_TIMEOUT)
                deb = next(Path(tmp).glob("*.deb"))
                subprocess.run(["dpkg-deb", "-x", str(deb), str(Path(tmp) / "x")], check=True,
                               capture_output=True, timeout=DOWNLOAD_TIMEOUT)
            except FileNotFoundError as exc:
                raise UserError("apt-get/dpkg-deb not found; virtual:debian needs a Debian/Ubuntu machine, "
                                "or pass virtual:/path/to/bzImage") from exc
            except (subprocess.CalledProcessError, subprocess.TimeoutExpired, StopIteration) as exc:
                err = getattr(exc, "stderr", b"") or b""
                raise HostError(f"cannot download {package}: {err.decode(errors='replace').strip()[-200:]}") from exc
            os.replace(Path(tmp) / "x", dest)
    return dest


def _modinfo_depends(ko: Path) -> List[str]:
    data = ko.read_bytes()
    m = re.search(rb"\x00depends=([^\x00]*)\x00", data)
    if not m or not m.group(1):
        return []
    return [d.decode().replace("-", "_") for d in m.group(1).split(b",") if d]


def _resolve_modules(moddir: Path, wanted: Sequence[str]) -> Tuple[Tuple[str, Path], ...]:
    index: Dict[str, Path] = {}
    for ko in moddir.rglob("*.ko*"):
        name = ko.name.split(".ko")[0].replace("-", "_")
        index[name] = ko
    order: List[Tuple[str, Path]] = []
    seen = set()

    def visit(name: str) -> None:
        if name in seen:
            return
        seen.add(name)
        if name not in index:
            raise HostError(f"module {name} not found under {moddir}")
        ko = index[name]
        if ko.suffix == ".xz":
            # per kernel release (moddir is lib/modules/<release>), written atomically
            plain = cache_dir("l1", "modules", moddir.name) / f"{name}.ko"
            if not plain.exists():
                tmp = plain.with_name(f".{plain.name}.{os.getpid()}.tmp")
                tmp.write_bytes(lzma.decompress(ko.read_bytes()))
                os.replace(tmp, plain)
            ko = plain
        for dep in _modinfo_depends(ko):
            visit(dep)
        order.append((name, ko))

    for name in wanted:
        visit(name.replace("-", "_"))
    return tuple(order)


def debian_kernel() -> L1Kernel:
    root = _unpacked_debian_package()
    vmlinuz = next((root / "boot").glob("vmlinuz-*"))
    release = vmlinuz.name[len("vmlinuz-"):]
    modules = _resolve_modules(root / "lib" / "modules" / release, DEBIAN_L1_MODULES)
    return L1Kernel(vmlinuz, release, "debian", modules)


def bzimage_release(path: Path) -> str:
    """The release string from a bzImage header (setup header ``kernel_version``)."""
    data = Path(path).read_bytes()[:0x10000]
    if len(data) < 0x210 or data[0x202:0x206] != b"HdrS":
        raise UserError(f"{path} is not a bzImage (no 'HdrS' setup header); pass a kernel's arch/x86/boot/bzImage")
    off = int.from_bytes(data[0x20E:0x210], "little") + 0x200
    return data[off:off + 200].split(b"\0")[0].split(b" ")[0].decode(errors="replace")


def bzimage_kernel(path: str) -> L1Kernel:
    p = Path(path)
    release = bzimage_release(p)
    return L1Kernel(p, release, release)


def modules_kernel(out: str) -> L1Kernel:
    """Debian's kernel with the KVM modules of a ``migstall kernel build --target
    kvm-modules`` output directory in place of its own."""
    from harness.kernel.modules import load_build

    build = load_build(Path(out))
    base = debian_kernel()
    if build.release != base.release:
        raise UserError(f"{out}: KVM modules for {build.release}, but the virtual host boots {base.release}; "
                        f"build them again (migstall kernel build --target kvm-modules)")
    ours = dict(build.modules)
    modules = tuple((name, ours.get(name, ko)) for name, ko in base.modules)
    return L1Kernel(base.image, base.release, f"debian+kvm-{build.variant}", modules)


def resolve_kernel(kernel: str) -> L1Kernel:
    """``debian``, a bzImage path, or a kvm-modules build directory (:func:`modules_kernel`)."""
    if kernel in ("", "debian"):
        return debian_kernel()
    return modules_kernel(kernel) if Path(kernel).is_dir() else bzimage_kernel(kernel)


# -- the initramfs --------------------------------------------------------------------------

def _ldd(binaries: Iterable[str]) -> List[str]:
    libs: Dict[str, None] = {}
    for binary in binaries:
        out = subprocess.run(["ldd", binary], capture_output=True, text=True, timeout=60)
        if out.returncode != 0:
            if "not a dynamic executable" in (out.stdout + out.stderr):
                continue
            raise HostError(f"ldd {binary} failed: {out.stderr.strip()}")
        for line in out.stdout.splitlines():
            line = line.strip()
            m = re.match(r"\S+ => (/\S+)", line) or re.match(r"(/\S+) \(0x", line)
            if m:
                libs[m.group(1)] = None
    return list(libs)


def _busybox_entries() -> List[Entry]:
    bb = shutil.which("busybox") or "/bin/busybox"
    entries = [file_entry("bin/busybox", bb, 0o755)]
    applets = subprocess.run([bb, "--list-full"], capture_output=True, text=True, timeout=30, check=True).stdout.split()
    for path in applets:
        if path.strip("/") != "bin/busybox":
            entries.append(Entry(path, target="/bin/busybox"))
    return entries


INITTAB = """::sysinit:/etc/init.d/rcS
::shutdown:/bin/umount -a -r
"""

SSHD_CONFIG = f"""Port 22
HostKey /etc/ssh/ssh_host_ed25519_key
AuthorizedKeysFile /etc/ssh/authorized_keys
PidFile /run/sshd.pid
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
UseDNS no
PrintMotd no
PrintLastLog no
AllowStreamLocalForwarding yes
AllowTcpForwarding yes
ClientAliveInterval 30
MaxSessions 64
MaxStartups 64
Subsystem sftp {SFTP_SERVER}
"""

PASSWD = """root:x:0:0:root:/root:/bin/sh
sshd:x:100:65534:sshd:/run/sshd:/bin/false
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
"""
GROUP = "root:x:0:\nnogroup:x:65534:\n"


def rcs_script() -> str:
    """L1's ``/etc/init.d/rcS``: ``harness/sh/l1_rcS.sh`` with its ``@KEEPER@`` line
    replaced by :func:`~harness.measure.kvm_trace.keeper_init_script` (values baked in)."""
    text = sh.script("l1_rcS.sh")
    if text.count("\n@KEEPER@\n") != 1:
        raise ValueError("l1_rcS.sh needs exactly one @KEEPER@ line")
    return text.replace("\n@KEEPER@\n", "\n" + kvm_trace.keeper_init_script())


def _entries(kernel: L1Kernel, qemu: str) -> List[Entry]:
    qemu_path = shutil.which(qemu) or qemu
    if not os.path.exists(qemu_path):
        raise UserError(f"QEMU binary {qemu} not found; install qemu-system-x86 (make setup) or pass --qemu")
    for tool in (SSHD, SFTP_SERVER):
        if not os.path.exists(tool):
            raise UserError(f"{tool} not found; install openssh-server (make setup)")
    entries: List[Entry] = _busybox_entries()
    entries.append(Entry("init", target="/bin/busybox"))
    binaries = [qemu_path, SSHD, SFTP_SERVER, *[b for b in EXTRA_BINARIES if os.path.exists(b)]]
    entries.append(file_entry("usr/bin/qemu-system-x86_64", qemu_path, 0o755))
    entries.append(file_entry(SSHD.lstrip("/"), SSHD, 0o755))
    entries.append(file_entry(SFTP_SERVER.lstrip("/"), SFTP_SERVER, 0o755))
    entries.append(file_entry("usr/sbin/migstall-kvm-pin", ctools.kvm_pin(), 0o755))
    for b in EXTRA_BINARIES:
        if os.path.exists(b):
            entries.append(file_entry(b.lstrip("/"), b, 0o755))
    for lib in _ldd(binaries):
        entries.append(file_entry(lib.lstrip("/"), os.path.realpath(lib), 0o755))
    for name in QEMU_SHARE_FILES:
        src = Path("/usr/share/qemu") / name
        if src.exists():
            entries.append(file_entry(f"usr/share/qemu/{name}", src.resolve(), 0o644))
    for d in FIRMWARE_DIRS:
        for src in sorted(Path(d).glob("*")) if os.path.isdir(d) else []:
            if src.is_file():
                entries.append(file_entry(str(src).lstrip("/"), src.resolve(), 0o644))
    mod_lines = []
    for name, ko in kernel.modules:
        dest = f"lib/modules/{kernel.release}/{ko.name}"
        entries.append(file_entry(dest, ko, 0o644))
        mod_lines.append(f"{name} /{dest}\n")
    if mod_lines:
        entries.append(Entry("etc/migstall/modules", 0o644, data="".join(mod_lines).encode()))
    entries += [
        Entry("etc/init.d/rcS", 0o755, data=rcs_script().encode()),
        Entry("etc/inittab", 0o644, data=INITTAB.encode()),
        Entry("etc/ssh/sshd_config", 0o644, data=SSHD_CONFIG.encode()),
        Entry("etc/passwd", 0o644, data=PASSWD.encode()),
        Entry("etc/group", 0o644, data=GROUP.encode()),
        Entry("etc/hostname", 0o644, data=b"migstall-l1\n"),
        Entry("root", 0o700, is_dir=True),
        Entry("proc", 0o755, is_dir=True), Entry("sys", 0o755, is_dir=True),
        Entry("dev", 0o755, is_dir=True), Entry("run", 0o755, is_dir=True),
        Entry("tmp", 0o1777, is_dir=True), Entry("var/log", 0o755, is_dir=True),
    ]
    return entries


def _digest(entries: Sequence[Entry], kernel: L1Kernel) -> str:
    h = hashlib.sha256(b"migstall-l1-v1\0" + kernel.release.encode())
    for e in sorted(entries, key=lambda e: e.path):
        h.update(e.path.encode() + b"\0" + str(e.mode).encode() + b"\0")
        if e.source is not None:
            st = Path(e.source).stat()
            # content identity by (path, size, mtime): hashing ~100 MB on every boot is wasteful
            h.update(f"{Path(e.source).resolve()}:{st.st_size}:{st.st_mtime_ns}".encode())
        elif e.data is not None:
            h.update(hashlib.sha256(e.data).digest())
        elif e.target is not None:
            h.update(b"->" + e.target.encode())
    return h.hexdigest()[:24]


def build_l1_image(kernel: L1Kernel, qemu: str = "qemu-system-x86_64") -> L1Image:
    """The cached L1 initramfs for ``kernel`` (rebuilt when any input changes)."""
    entries = _entries(kernel, qemu)
    digest = _digest(entries, kernel)
    out_dir = cache_dir("l1")
    out = out_dir / f"l1-{digest}.cpio"
    with file_lock(out_dir / ".build.lock"):
        if not out.exists():
            log.info("building L1 initramfs %s", out)
            data = write_cpio(entries, compress=False)   # uncompressed: unpacking is faster under TCG
            tmp = out.with_suffix(".tmp")
            tmp.write_bytes(data)
            os.replace(tmp, out)
    return L1Image(out, kernel, digest)


def keys_archive(host_key: Path, authorized_pub: Path) -> bytes:
    """The per-VM cpio appended to the cached image."""
    return write_cpio([
        Entry("etc/ssh/ssh_host_ed25519_key", 0o600, data=Path(host_key).read_bytes()),
        Entry("etc/ssh/authorized_keys", 0o644, data=Path(authorized_pub).read_bytes()),
    ], compress=False)
