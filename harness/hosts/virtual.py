"""The virtual host: an L1 VM under TCG with nested KVM, driven as an SSHHost.

L1 runs under QEMU TCG with ``-cpu max`` (SVM with nested paging), the kernel of
the user's choice (Debian's, with the KVM modules inserted, or a migstall-built
bzImage with ``CONFIG_KVM=y``), and the initramfs of :mod:`harness.hosts.l1image`
(QEMU, busybox, OpenSSH).  A fresh sshd host key and client key are generated for
each VM and pinned in a per-VM known_hosts file; sshd is reached through QEMU
user networking (``hostfwd`` on ``127.0.0.1:<free port>``).  From then on
everything is plain :class:`~harness.hosts.ssh.SSHHost`.

L1's QEMU is a :class:`~harness.qemu.machine.VM` without QMP client, driven
through :class:`~harness.qemu.machine.SyncVM` (the launcher of every QEMU:
``-name migstall-l1``, ``-daemonize`` under the reaper, its ``-D`` log
``l1.log`` and pidfile ``l1.pid`` in the work dir, the command line logged and
kept in ``l1.cmdline``; stopped with SIGTERM, then SIGKILL).  L1 keeps its own
QMP monitor, ``qmp.sock``, for ``migstall vhost status``.

Boot completion is an event: L1's init writes ``MIGSTALL-L1-READY`` on its second
serial port, a unix socket this process reads (with a timeout,
:data:`DEFAULT_L1_BOOT_TIMEOUT`), while also watching the QEMU process's pidfd.

Limits: nested KVM under TCG is slow (roughly 10x bare metal per GiB for the
dirty-log walks); L1 memory is ``l2 + QEMU + initramfs`` (:data:`DEFAULT_L1_MEM_MIB`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

from harness.errors import HostError, QEMUError, UserError, best_effort
from harness.hosts.l1image import (FAILED_LINE, READY_LINE, STAGE_LINE, L1Image, build_l1_image, keys_archive,
                                   resolve_kernel)
from harness.hosts.local import LocalHost
from harness.hosts.ssh import SSHHost
from harness.paths import new_runtime_dir
from harness.progress import Progress
from harness.qemu.machine import VM, SyncVM

log = logging.getLogger(__name__)

#: L1 RAM: a 1 GiB L2 plus QEMU, the ~150 MiB initramfs and page tables
DEFAULT_L1_MEM_MIB = 3072
#: L1 vCPUs.  One, so that QEMU's multi-threaded TCG runs L1 on a single thread.
#: With 2 L1 vCPUs the emulated host lost L2 guests under nested page-fault load
#: (an L2 that reset itself, a destination vCPU found at the reset vector, L1
#: kernel-text patches that another vCPU kept executing stale): the soak of
#: ``scenarios/vhost-verify.toml`` passed 1 of 6 runs with 2 L1 vCPUs and 6 of 6
#: with one (2026-12-04; README "Soak").  Two L2 vCPUs are then overcommitted on it.
DEFAULT_L1_SMP = 1
#: L1 boot (kernel + initramfs unpack + modules + arming the tracer's kprobes + sshd)
#: under TCG, seconds.  Measured on this project's 2-core machine with nothing else
#: running: 12 s before the kprobes were armed at boot, 21-23 s with them (init
#: stage "tracing" takes about 13 s); 5x that.  The 240 s timeouts seen in CI were
#: a second L1 booting beside the first, which the tests no longer do.
DEFAULT_L1_BOOT_TIMEOUT = 120.0
#: QEMU -daemonize returns once initialised
QEMU_START_TIMEOUT = 60.0
BASE_CMDLINE = "console=ttyS0 panic=-1 loglevel=4"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _keygen(path: Path, comment: str) -> None:
    try:
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
                       check=True, capture_output=True, timeout=30)
    except FileNotFoundError as exc:
        raise UserError("ssh-keygen not found; install openssh-client (make setup)") from exc


class VirtualHost(SSHHost):
    """An L1 VM under TCG with nested KVM.  ``start()`` boots it; ``close()`` stops it."""

    def __init__(self, kernel: str = "debian", *, mem_mib: int = DEFAULT_L1_MEM_MIB, smp: int = DEFAULT_L1_SMP,
                 cmdline_extra: str = "", qemu: str = "qemu-system-x86_64", progress: Optional[Progress] = None,
                 boot_timeout: float = DEFAULT_L1_BOOT_TIMEOUT, workdir: Optional[Path] = None) -> None:
        self.kernel_choice = kernel or "debian"
        self.mem_mib, self.smp = int(mem_mib), int(smp)
        self.cmdline_extra = cmdline_extra.strip()
        self.qemu = qemu
        self.progress = progress or Progress()
        self.boot_timeout = boot_timeout
        self._own_workdir = workdir is None
        #: (console size, copy) of the last :func:`keep_console`
        self._kept_console: Optional[Tuple[int, Optional[Path]]] = None
        self.workdir = Path(workdir) if workdir else new_runtime_dir("migstall-l1-")
        self.workdir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.workdir, 0o700)
        self.pid: Optional[int] = None
        self._l1: Optional[SyncVM] = None        # L1's QEMU while it is ours to stop
        self.image: Optional[L1Image] = None
        self.boot_s: Optional[float] = None
        #: seconds after the L1 QEMU started at which its init reached each stage
        self.boot_stages: Dict[str, float] = {}
        self._local = LocalHost()
        super().__init__("127.0.0.1", user="root", port=0, key_file=str(self.workdir / "id_ed25519"),
                         known_hosts=str(self.workdir / "known_hosts"), name="virtual", connect=False)

    # -- paths ----------------------------------------------------------------------
    @property
    def console_log(self) -> Path:
        return self.workdir / "console.log"

    @property
    def qemu_log(self) -> Path:
        """L1 QEMU's ``-D`` log (the VM's ``<name>.log``)."""
        return self.workdir / "l1.log"

    @property
    def console_path(self) -> Optional[str]:   # type: ignore[override]
        return str(self.console_log)

    @property
    def qmp_socket(self) -> Path:
        """L1's own QMP monitor (for debugging a stuck L1: ``migstall vhost status``)."""
        return self.workdir / "qmp.sock"

    @property
    def cmdline(self) -> str:
        return " ".join(x for x in (BASE_CMDLINE, self.cmdline_extra) if x)

    # -- lifecycle --------------------------------------------------------------------
    def start(self) -> "VirtualHost":
        try:
            self._boot()
        except BaseException:
            self.close()
            raise
        return self

    def _ensure_keys(self) -> None:
        if not (self.workdir / "id_ed25519").exists():
            _keygen(self.workdir / "id_ed25519", "migstall-l1-client")
        if not (self.workdir / "ssh_host_ed25519_key").exists():
            _keygen(self.workdir / "ssh_host_ed25519_key", "migstall-l1-host")

    def _boot(self) -> None:
        t0 = time.monotonic()
        with self.progress.task("virtual host: preparing L1 image") as task:
            kernel = resolve_kernel(self.kernel_choice)
            self.image = build_l1_image(kernel, self.qemu)
            self._ensure_keys()
            task.update(description="virtual host: L1 image ready")
        if self.name == "virtual" or self.name.startswith("virtual:"):   # not a caller-given label
            self.name = f"virtual:{kernel.label}"
        initrd = self.workdir / "l1-initrd.cpio"
        shutil.copyfile(self.image.initrd, initrd)
        with open(initrd, "ab") as fh:
            fh.write(keys_archive(self.workdir / "ssh_host_ed25519_key", self.workdir / "id_ed25519.pub"))
        self.port = _free_port()
        hostpub = (self.workdir / "ssh_host_ed25519_key.pub").read_text().split()
        Path(self.known_hosts).write_text(f"[127.0.0.1]:{self.port} {hostpub[0]} {hostpub[1]}\n")
        ready_sock = self.workdir / "ready.sock"
        args = [
            "-machine", "q35", "-accel", "tcg", "-cpu", "max",
            "-smp", str(self.smp), "-m", f"{self.mem_mib}M",
            "-kernel", str(kernel.image), "-initrd", str(initrd), "-append", self.cmdline,
            "-nodefaults", "-no-user-config", "-no-reboot",
            "-serial", f"file:{self.console_log}",
            "-chardev", f"socket,id=ready,path={ready_sock},server=on,wait=off",
            "-serial", "chardev:ready",
            "-qmp", f"unix:{self.qmp_socket},server=on,wait=off",
            "-netdev", f"user,id=n0,hostfwd=tcp:127.0.0.1:{self.port}-:22",
            "-device", "virtio-net-pci,netdev=n0,romfile=",
        ]
        vm = VM(self._local, "l1", args, qemu=self.qemu, runtime_dir=str(self.workdir), with_qmp=False,
                launch_timeout=QEMU_START_TIMEOUT)
        self._keep_console()                # a reboot: the previous L1's console may tell why
        self._kept_console = None
        # the previous L1's files; a stale exit status would be read as this L1's
        for p in (ready_sock, Path(vm.path("l1.pid")), Path(vm.exit_status_path), self.qemu_log,
                  self.console_log, self.qmp_socket):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        with self.progress.task(f"virtual host: booting L1 ({kernel.label}, TCG)") as task:
            self._l1 = SyncVM(vm)
            try:
                self._l1.launch()           # a failed launch leaves no process behind
            finally:
                if vm.argv:
                    with best_effort("keeping L1's command line", log):
                        (self.workdir / "l1.cmdline").write_text(vm.command_line + "\n")
            self.pid = vm.pid
            release = self._wait_ready(ready_sock)
            task.update(description=f"virtual host: L1 {release} up; connecting")
            self.connect()
        self.boot_s = time.monotonic() - t0
        log.info("L1 (%s, %s) ready in %.1f s (stages: %s), ssh on 127.0.0.1:%d", kernel.label, release,
                 self.boot_s, self.boot_stages, self.port)

    def _wait_ready(self, ready_sock: Path) -> str:
        assert self.pid is not None
        sock = self._local.connect_unix(str(ready_sock))
        pidfd = os.pidfd_open(self.pid)
        t0 = time.monotonic()
        deadline = t0 + self.boot_timeout
        buf = b""
        self.boot_stages = {}
        try:
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise HostError(f"L1 did not boot within {self.boot_timeout:g}s ({self._boot_stage_note()})",
                                    log_path=self.console_log)
                waitables: List[Union[socket.socket, int]] = [sock, pidfd]
                readable, _, _ = select.select(waitables, [], [], remaining)
                if sock in readable:
                    chunk = sock.recv(4096)
                    if not chunk:
                        raise HostError("L1 QEMU closed its ready channel", log_path=self.console_log)
                    buf += chunk
                    for line in buf.decode(errors="replace").split("\n")[:-1]:   # whole lines only
                        if line.startswith(STAGE_LINE):
                            name = (line[len(STAGE_LINE):].split() or ["?"])[0]
                            if name not in self.boot_stages:
                                self.boot_stages[name] = round(time.monotonic() - t0, 1)
                                log.debug("L1 boot stage %s at %.1f s", name, self.boot_stages[name])
                        if line.startswith(READY_LINE):
                            self.boot_stages["ready"] = round(time.monotonic() - t0, 1)
                            return line[len(READY_LINE):].strip()
                        if line.startswith(FAILED_LINE):
                            raise HostError(f"L1 boot failed: {line[len(FAILED_LINE):].strip()}",
                                            log_path=self.console_log)
                elif pidfd in readable:
                    raise QEMUError(f"L1 QEMU exited during boot ({self._boot_stage_note()})",
                                    log_path=self.console_log)
        finally:
            sock.close()
            os.close(pidfd)

    def _boot_stage_note(self) -> str:
        """Where a boot that did not finish was: the last stage L1's init reported
        (seconds after QEMU started), else the last line of the kernel console."""
        if self.boot_stages:
            name, at = list(self.boot_stages.items())[-1]
            done = ", ".join(f"{k} {v:g}s" for k, v in self.boot_stages.items())
            return f"last stage reached: init's {name} at {at:g}s; stages: {done}"
        try:
            lines = [ln for ln in self.console_log.read_text(errors="replace").splitlines() if ln.strip()]
        except OSError:
            lines = []
        last = lines[-1].strip()[:160] if lines else "nothing on the console"
        return f"still in the kernel, before init; the console's last line: {last!r}"

    def stop(self) -> None:
        """Close SSH, then stop L1's QEMU (:meth:`SyncVM.shutdown`: SIGTERM, QEMU
        exits cleanly, then SIGKILL)."""
        self._disconnect()
        l1, self._l1 = self._l1, None
        self.pid = None
        if l1 is not None:
            l1.shutdown()

    def reboot(self, kernel: Optional[str] = None, cmdline_extra: Optional[str] = None,
               timeout: Optional[float] = None) -> None:
        """Restart L1, optionally with another kernel and/or extra command line."""
        self.stop()
        if kernel is not None:
            self.kernel_choice = kernel
        if cmdline_extra is not None:
            self.cmdline_extra = cmdline_extra.strip()
        if timeout is not None:
            self.boot_timeout = timeout
        self.start()

    supports_l1_cmdline = True
    #: L1's one vCPU is migstall's choice (DEFAULT_L1_SMP), not the user's hardware: the
    #: default two L2 vCPUs (``pio`` beside ``write``) share it without ``--overcommit``.
    #: Their baselines rise with it (README "Soak"), which is why stalls are read
    #: against the row's own baseline.
    vcpus_beyond_cpus_ok = True

    def configure(self, l1_cmdline: str = "") -> bool:
        """Make L1 run with ``l1_cmdline`` (a scenario's setting); reboots only when
        it differs.  Returns True if L1 was rebooted."""
        if l1_cmdline.strip() == self.cmdline_extra and self.pid is not None:
            return False
        self.reboot(cmdline_extra=l1_cmdline)
        return True

    def lost_note(self) -> str:
        """:meth:`SSHHost.lost_note`, naming the kept copy of L1's console
        (:func:`keep_console`): the console in the work dir goes with L1."""
        note = super().lost_note()
        if note:
            kept = self._keep_console()
            if kept is not None:
                note = note.replace(f"({self.console_log})", f"(kept as {kept})", 1)
        return note

    def _keep_console(self) -> Optional[Path]:
        """:func:`keep_console`, once per console content (a copy made for a
        failed row's note is not made again when L1 is removed)."""
        try:
            size = self.console_log.stat().st_size
        except OSError:
            return None
        if self._kept_console is not None and self._kept_console[0] == size:
            return self._kept_console[1]
        kept = keep_console(self.workdir)
        self._kept_console = (size, kept) if kept is not None else None
        return kept

    def close(self) -> None:
        try:
            self.stop()
        finally:
            if self._own_workdir:
                self._keep_console()
                shutil.rmtree(self.workdir, ignore_errors=True)

    # -- state for `migstall vhost` ------------------------------------------------------
    def state(self) -> Dict[str, Any]:
        return {"pid": self.pid, "port": self.port, "key_file": self.key_file, "known_hosts": self.known_hosts,
                "workdir": str(self.workdir), "kernel": self.kernel_choice, "cmdline": self.cmdline,
                "console_log": str(self.console_log), "qmp_socket": str(self.qmp_socket), "name": self.name}

    def detach(self) -> Dict[str, Any]:
        """Leave L1 running (for ``migstall vhost up``); returns its state."""
        st = self.state()
        self._disconnect()
        if self._l1 is not None:
            self._l1.detach()
            self._l1 = None
        self.pid = None
        self._own_workdir = False
        (self.workdir / "state.json").write_text(json.dumps(st, indent=2) + "\n")
        return st


# -- a virtual host left running by `migstall vhost up` ------------------------------------

def vhost_dir() -> Path:
    """Where ``migstall vhost up`` keeps the running L1's keys, sockets and state."""
    from harness.paths import cache_dir

    return cache_dir("vhost") / "current"


def _is_our_l1(pid: Optional[int]) -> bool:
    if not pid or not LocalHost().pid_alive(int(pid)):
        return False
    try:
        with open(f"/proc/{int(pid)}/cmdline", "rb") as fh:
            return b"migstall-l1" in fh.read()
    except OSError:
        return False


def running_state() -> Optional[Dict[str, Any]]:
    """The state of the L1 left by ``migstall vhost up``, or None (a dead one's is ignored)."""
    st = _load_state()
    return st if st is not None and _is_our_l1(st.get("pid")) else None


def _load_state() -> Optional[Dict[str, Any]]:
    path = vhost_dir() / "state.json"
    if not path.exists():
        return None
    try:
        st = json.loads(path.read_text())
        if not isinstance(st, dict):
            raise ValueError("not an object")
    except ValueError as exc:
        raise UserError(f"virtual host state {path} is unreadable ({exc}); stop any leftover L1 "
                        f"(pkill -f migstall-l1) and remove {vhost_dir()}") from exc
    return st


#: L1 console logs kept in the cache's ``logs/`` by :func:`keep_console`
KEPT_CONSOLES = 20


def keep_console(workdir: Path) -> Optional[Path]:
    """Copy L1's console log out of ``workdir`` (about to be removed) into the
    cache's ``logs/l1-console-<time>.log``, keeping the last
    :data:`KEPT_CONSOLES`: when L1 panicked or hung, its console is the only
    record.  Returns the copy, or None if there was no console."""
    from harness.paths import cache_dir

    src = workdir / "console.log"
    try:
        if not src.is_file() or src.stat().st_size == 0:
            return None
        logs = cache_dir("logs")
        dst = logs / f"l1-console-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}.log"
        shutil.copyfile(src, dst)
        for old in sorted(logs.glob("l1-console-*.log"))[:-KEPT_CONSOLES]:
            old.unlink(missing_ok=True)
    except OSError as exc:
        log.warning("cannot keep L1's console log %s: %s", src, exc)
        return None
    log.info("L1's console log kept as %s", dst)
    return dst


def stop_running() -> Optional[int]:
    """Stop the L1 left by ``migstall vhost up`` (only if it is ours); returns its pid."""
    pid = None
    st = _load_state()
    if st is not None:
        pid = st.get("pid")
        if pid is not None and _is_our_l1(pid):
            LocalHost().stop_pid(int(pid))
    keep_console(vhost_dir())
    shutil.rmtree(vhost_dir(), ignore_errors=True)
    return pid


def attach_running() -> SSHHost:
    """An SSHHost to the L1 of ``migstall vhost up`` (closing it leaves L1 running)."""
    st = running_state()
    if st is None:
        raise UserError("--host vhost needs a running virtual host; start one with 'migstall vhost up' "
                        "(or use --host virtual to boot one for this run)")
    host = SSHHost("127.0.0.1", user="root", port=int(st["port"]), key_file=st["key_file"],
                   known_hosts=st["known_hosts"], name=st.get("name") or "virtual")
    host.console_path = st.get("console_log")
    return host
