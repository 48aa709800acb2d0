"""Boot methods: how a host gets into a test kernel exactly once.

Each method is a small class with four steps, all through the Host API
(argv lists, timeouts):

* :meth:`BootMethod.open`     connect to / start the host;
* :meth:`BootMethod.install`  put the kernel artifacts on the host (once per variant);
* :meth:`BootMethod.boot`     boot into it once, wait for SSH (bounded by the
  night's ``boot_timeout_s``), and return;
* :meth:`BootMethod.restore`  return the host to its default kernel.

Methods:

``kexec`` (default, bare metal)
    install: bzImage to ``/boot/vmlinuz-<release>``, modules tarball/dir
    extracted under ``/lib/modules/<release>``, ``depmod``, an initramfs with
    ``update-initramfs`` or ``dracut`` when present (``initramfs = "auto"``).
    boot: ``kexec -l /boot/vmlinuz-<release> [--initrd=...] --reuse-cmdline
    [--append=EXTRA]``, then ``kexec -e`` (detached, so the SSH command returns).
    Nothing persistent changes: the next real reboot (watchdog, power cycle)
    runs the default kernel, so a kernel that hangs is left behind by a reboot.
``grub-reboot``
    install as kexec, then ``update-grub``; boot: ``grub-reboot
    '<submenu id>><entry id>'`` (a one-time entry; needs ``GRUB_DEFAULT=saved``)
    and ``systemctl reboot``.  The next reboot falls back to the default entry.
``virtual``
    the virtual host (an L1 VM under TCG): "install" is nothing (the bzImage stays
    here and needs ``CONFIG_KVM=y``); boot is :meth:`VirtualHost.reboot` with the
    kernel; restore reboots into the kernel it was started with.

A reboot is detected by ``/proc/sys/kernel/random/boot_id`` changing, so a
reconnect that reaches the old system (before the kexec happened) is not
mistaken for the new one.
"""

from __future__ import annotations

import abc
import logging
import re
import shutil
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Optional

from harness.errors import HostError, SSHError, UserError
from harness.hosts.base import Host
from harness.nightly.config import HostConfig
from harness.progress import Progress

log = logging.getLogger(__name__)

BOOT_ID = "/proc/sys/kernel/random/boot_id"
#: seconds for update-initramfs / dracut / update-grub on the host
INSTALL_TIMEOUT = 900.0
#: seconds a detached reboot/kexec command is delayed, so that our SSH command returns first
DETACH_DELAY_S = 2
#: seconds to wait, while the old system is still up, for the connection to drop
DROP_WAIT_S = 10


@dataclass(frozen=True)
class Artifact:
    """One kernel variant ready to install."""

    variant: str
    bzimage: Path
    release: str = ""                 # expected uname -r ("" = unknown)
    modules: Optional[Path] = None    # tarball of lib/modules/<release>/ or that directory
    series_id: str = ""               # series hash (hash8 is checked in uname -r)


@dataclass(frozen=True)
class Installed:
    kernel: str                       # path on the host (or local path for virtual)
    initrd: str = ""
    grub_entry: str = ""


def verify_release(release: str, art: Artifact) -> None:
    """``uname -r`` must be the variant's kernel: exact when known, else it must carry
    ``migstall-<variant>`` and the series hash8."""
    if art.release:
        if release != art.release:
            raise HostError(f"booted {release!r}, expected {art.release!r} for variant {art.variant}")
        return
    if f"migstall-{art.variant}" not in release:
        raise HostError(f"booted {release!r}, which does not carry 'migstall-{art.variant}'")
    if art.series_id and art.series_id[:8] not in release:
        raise HostError(f"booted {release!r}, which does not carry the series hash {art.series_id[:8]}")


class BootMethod(abc.ABC):
    name = "?"

    def __init__(self, cfg: HostConfig, boot_timeout_s: float, progress: Optional[Progress] = None) -> None:
        self.cfg = cfg
        self.boot_timeout_s = boot_timeout_s
        self.progress = progress or Progress()
        self._installed: Dict[str, Installed] = {}

    @abc.abstractmethod
    def open(self) -> Host: ...

    @abc.abstractmethod
    def _install(self, host: Host, art: Artifact) -> Installed: ...

    @abc.abstractmethod
    def _boot(self, host: Host, art: Artifact, inst: Installed) -> None: ...

    @abc.abstractmethod
    def restore(self, host: Host, default_release: str) -> None: ...

    def install(self, host: Host, art: Artifact) -> Installed:
        if art.variant not in self._installed:
            self._installed[art.variant] = self._install(host, art)
        return self._installed[art.variant]

    def boot(self, host: Host, art: Artifact) -> str:
        """Install if needed, boot once, verify; returns ``uname -r``."""
        inst = self.install(host, art)
        self._boot(host, art, inst)
        release = host.run(["uname", "-r"], timeout=30).text.strip()
        verify_release(release, art)
        return release

    def close(self, host: Host) -> None:
        host.close()


# --- SSH hosts: kexec and grub-reboot ---------------------------------------------------------

def _boot_id(host: Host) -> str:
    return host.read_bytes(BOOT_ID).decode().strip()


def wait_rebooted(host, old_boot_id: str, timeout: float) -> None:
    """Reconnect until the host answers with a new boot id (bounded by ``timeout``)."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise SSHError(f"{host.name} did not come back with a new boot within {timeout:g}s")
        host.reconnect(timeout=left)
        try:
            if _boot_id(host) != old_boot_id:
                return
            # still the old system (the detached kexec/reboot has not happened yet):
            # wait for the connection to drop, bounded
            host.run(["sleep", str(DROP_WAIT_S)], timeout=DROP_WAIT_S + 30, check=False)
        except (SSHError, HostError) as exc:
            log.debug("%s: connection dropped while waiting for the reboot: %s", host.name, exc)


def _modules_tar(modules: Path, release: str) -> Path:
    """A tarball of ``lib/modules/<release>/`` (the given tarball, or one made from a dir)."""
    if modules.is_file():
        return modules
    tmp = Path(tempfile.mkdtemp(prefix="migstall-modules-")) / f"modules-{release}.tar"
    with tarfile.open(tmp, "w") as tar:
        tar.add(str(modules), arcname=f"lib/modules/{release or modules.name}")
    return tmp


class SSHBoot(BootMethod):
    """Shared install for kexec and grub-reboot."""

    #: where the kernel is installed on the host ("/"; tests install into a scratch root)
    root = "/"

    def open(self) -> Host:
        from harness.hosts.factory import open_host

        return open_host(self.cfg.ssh, ssh_key=self.cfg.key, known_hosts=self.cfg.known_hosts)

    def _release(self, art: Artifact) -> str:
        if art.release:
            return art.release
        from harness.hosts.l1image import bzimage_release

        return bzimage_release(art.bzimage)

    def _install(self, host: Host, art: Artifact) -> Installed:
        release = self._release(art)
        with self.progress.task(f"{self.cfg.name}: installing {art.variant} ({release})"):
            staged = host.stage(art.bzimage)
            root = self.root.rstrip("/")
            kernel = f"{root}/boot/vmlinuz-{release}"
            host.run(["install", "-D", "-m", "0644", staged, kernel], timeout=120)
            if art.modules is not None:
                tar = _modules_tar(art.modules, release)
                try:
                    staged_mods = host.stage(tar)
                    # --keep-directory-symlink: on merged-/usr systems /lib is a symlink; never replace it
                    host.run(["tar", "-x", "-f", staged_mods, "-C", self.root, "--no-same-owner",
                              "--keep-directory-symlink"], timeout=600)
                finally:
                    if tar != art.modules:           # a temporary tarball made from a directory
                        shutil.rmtree(tar.parent, ignore_errors=True)
                host.run(["depmod", "-a", "-b", self.root, release], timeout=600)
            initrd = ""
            if self.cfg.initramfs == "auto":
                initrd = f"{root}/boot/initrd.img-{release}"
                if host.run(["sh", "-c", "command -v update-initramfs"], check=False, timeout=30).returncode == 0:
                    host.run(["update-initramfs", "-c", "-k", release], timeout=INSTALL_TIMEOUT)
                elif host.run(["sh", "-c", "command -v dracut"], check=False, timeout=30).returncode == 0:
                    host.run(["dracut", "-f", initrd, release], timeout=INSTALL_TIMEOUT)
                else:
                    initrd = ""
        return Installed(kernel=kernel, initrd=initrd)

    def _reboot_detached(self, host: Host, argv_text: str) -> None:
        """Run a fixed reboot command a moment after our SSH command returns."""
        assert argv_text in ("kexec -e", "systemctl reboot")
        host.run(["sh", "-c", f"sync; (sleep {DETACH_DELAY_S}; {argv_text}) </dev/null >/dev/null 2>&1 &"],
                 timeout=60)

    def restore(self, host: Host, default_release: str) -> None:
        try:
            current = host.run(["uname", "-r"], timeout=30).text.strip()
        except (SSHError, HostError):
            from harness.hosts.ssh import SSHHost

            if not isinstance(host, SSHHost):   # only an SSH connection can be made again
                raise
            host.reconnect(timeout=self.boot_timeout_s)
            current = host.run(["uname", "-r"], timeout=30).text.strip()
        if current == default_release:
            return
        old = _boot_id(host)
        self._reboot_detached(host, "systemctl reboot")
        wait_rebooted(host, old, self.boot_timeout_s)
        now = host.run(["uname", "-r"], timeout=30).text.strip()
        if now != default_release:
            raise HostError(f"{self.cfg.name} came back with {now!r}, not its default {default_release!r}")


class KexecBoot(SSHBoot):
    name = "kexec"

    def _boot(self, host: Host, art: Artifact, inst: Installed) -> None:
        argv = ["kexec", "-l", inst.kernel, "--reuse-cmdline"]
        if inst.initrd:
            argv.append(f"--initrd={inst.initrd}")
        if self.cfg.cmdline_extra:
            argv.append(f"--append={self.cfg.cmdline_extra}")
        host.run(argv, timeout=120)
        old = _boot_id(host)
        with self.progress.task(f"{self.cfg.name}: kexec into {art.variant}"):
            self._reboot_detached(host, "kexec -e")
            wait_rebooted(host, old, self.boot_timeout_s)


_SUBMENU = re.compile(r"^\s*submenu\s+'[^']*'.*\$menuentry_id_option\s+'([^']+)'", re.M)


def grub_entry(grub_cfg: str, release: str) -> str:
    """``'<submenu id>><entry id>'`` of the (non-recovery) entry for ``release``."""
    entry = re.search(r"^\s*menuentry\s+'[^']*'.*\$menuentry_id_option\s+'(gnulinux-" + re.escape(release)
                      + r"-advanced-[^']+)'", grub_cfg, re.M)
    if not entry:
        raise HostError(f"no GRUB entry for {release} in grub.cfg after update-grub")
    sub = _SUBMENU.search(grub_cfg)
    return f"{sub.group(1)}>{entry.group(1)}" if sub else entry.group(1)


class GrubRebootBoot(SSHBoot):
    name = "grub-reboot"

    def _install(self, host: Host, art: Artifact) -> Installed:
        inst = super()._install(host, art)
        default = host.read_bytes("/etc/default/grub").decode(errors="replace")
        if not re.search(r"^\s*GRUB_DEFAULT=[\"']?saved", default, re.M):
            raise UserError(f"{self.cfg.name}: grub-reboot needs GRUB_DEFAULT=saved in /etc/default/grub "
                            f"(then update-grub); or use boot = 'kexec'")
        host.run(["update-grub"], timeout=INSTALL_TIMEOUT)
        cfg = host.read_bytes("/boot/grub/grub.cfg").decode(errors="replace")
        return Installed(inst.kernel, inst.initrd, grub_entry(cfg, self._release(art)))

    def _boot(self, host: Host, art: Artifact, inst: Installed) -> None:
        host.run(["grub-reboot", inst.grub_entry], timeout=60)
        old = _boot_id(host)
        with self.progress.task(f"{self.cfg.name}: rebooting into {art.variant} (grub-reboot)"):
            self._reboot_detached(host, "systemctl reboot")
            wait_rebooted(host, old, self.boot_timeout_s)


# --- the virtual host ------------------------------------------------------------------------

class VirtualBoot(BootMethod):
    """The CI stand-in for a bare-metal host."""

    name = "virtual"

    def __init__(self, cfg: HostConfig, boot_timeout_s: float, progress: Optional[Progress] = None) -> None:
        super().__init__(cfg, boot_timeout_s, progress)
        self.default_kernel = cfg.virtual or "debian"
        self.workdir: Optional[Path] = None

    def open(self) -> Host:
        from harness.hosts.virtual import DEFAULT_L1_MEM_MIB, VirtualHost
        from harness.paths import new_runtime_dir

        # our own workdir: a failed boot must not take the pinned keys with it
        self.workdir = new_runtime_dir("migstall-nightly-l1-")
        host = VirtualHost(kernel=self.default_kernel, mem_mib=self.cfg.l1_mem_mib or DEFAULT_L1_MEM_MIB,
                           progress=self.progress, boot_timeout=self.boot_timeout_s, workdir=self.workdir)
        host.name = self.cfg.name
        host.start()
        return host

    def _install(self, host: Host, art: Artifact) -> Installed:
        from harness.hosts.l1image import bzimage_release
        from harness.kernel.modules import load_build

        if art.bzimage.is_dir():
            load_build(art.bzimage)           # a kvm-modules build for Debian's kernel, or UserError
        else:
            bzimage_release(art.bzimage)      # a real bzImage, or UserError
        return Installed(kernel=str(art.bzimage))

    def _boot(self, host: Host, art: Artifact, inst: Installed) -> None:
        host.reboot(kernel=inst.kernel, cmdline_extra=self.cfg.cmdline_extra,  # type: ignore[attr-defined]
                    timeout=self.boot_timeout_s)

    def restore(self, host: Host, default_release: str) -> None:
        if (getattr(host, "pid", None) is not None
                and host.run(["uname", "-r"], timeout=30).text.strip() == default_release):
            return
        host.reboot(kernel=self.default_kernel, cmdline_extra="", timeout=self.boot_timeout_s)  # type: ignore[attr-defined]

    def close(self, host: Host) -> None:
        try:
            host.close()
        finally:
            if self.workdir is not None:
                shutil.rmtree(self.workdir, ignore_errors=True)


METHODS: Dict[str, Callable[[HostConfig, float, Optional[Progress]], BootMethod]] = {
    "kexec": KexecBoot, "grub-reboot": GrubRebootBoot, "virtual": VirtualBoot}


def for_host(cfg: HostConfig, boot_timeout_s: float, progress: Optional[Progress] = None) -> BootMethod:
    return METHODS[cfg.boot](cfg, boot_timeout_s, progress)
