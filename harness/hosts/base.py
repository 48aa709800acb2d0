"""The host contract.

Everything the runner does on the machine that runs QEMU goes through this
interface, so that the same code drives this machine, a bare-metal host over
SSH, and the nested "virtual host".

Rules every implementation keeps:
* commands are argument lists (never shell strings built by interpolation);
* every call that can block takes a timeout, with the defaults below;
* :meth:`runtime_dir` directories are 0700 and removed on exit;
* :meth:`connect_unix` returns a real connected ``socket.socket`` that asyncio
  (qemu.qmp) can use, whatever the transport;
* :meth:`open_stream` runs a process on the host whose standard input and
  output are such a socket (a :class:`HostStream`, closed with the process).
"""

from __future__ import annotations

import abc
import contextlib
import logging
import signal as _signal
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Mapping, Optional, Sequence

from harness.errors import UserError, best_effort
from harness.hosts.kernel_log import parse_uptime

log = logging.getLogger(__name__)

#: default timeout of one host command, seconds
DEFAULT_COMMAND_TIMEOUT = 60.0
#: default timeout to connect to a unix socket on the host, seconds
DEFAULT_CONNECT_TIMEOUT = 10.0
#: default grace between SIGTERM and SIGKILL when stopping a process, seconds
DEFAULT_KILL_GRACE = 5.0
#: reading the host's uptime or kernel log (diagnostics after a QEMU died), seconds
DEFAULT_KERNEL_LOG_TIMEOUT = 15.0
#: seconds a :class:`HostStream` process may take to exit once its input is closed
#: (the mark relay exits at once; 5 s covers an SSH round trip to a busy nested host)
DEFAULT_STREAM_CLOSE_TIMEOUT = 5.0
#: seconds for small host commands (ls, qemu --version, sh -c ...) of the host
#: facts (harness.hosts.facts) and the KVM boot check's set-up
QUICK_COMMAND_TIMEOUT_S = 20.0


@dataclass(frozen=True)
class CommandResult:
    argv: tuple
    returncode: int
    stdout: bytes
    stderr: bytes

    @property
    def text(self) -> str:
        return self.stdout.decode(errors="replace")


class HostStream(abc.ABC):
    """A process on a host, its standard input and output bridged to :attr:`sock`
    (a connected local ``socket.socket``, usable by asyncio).  A context manager:
    :meth:`close` closes the socket, waits for the process to exit (it sees end of
    file) at most :data:`DEFAULT_STREAM_CLOSE_TIMEOUT`, then kills it."""

    sock: socket.socket
    argv: tuple
    _closed: bool = False

    def close(self) -> None:
        """Idempotent; never raises."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self._wait_exit()

    @abc.abstractmethod
    def _wait_exit(self) -> None:
        """After the socket closed: wait for the process to exit (it reads end of
        file), at most DEFAULT_STREAM_CLOSE_TIMEOUT, then kill it.  Never raises."""

    @abc.abstractmethod
    def stderr_text(self) -> str:
        """What the process wrote on standard error so far (for error messages)."""

    def __enter__(self) -> "HostStream":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Host(abc.ABC):
    """A machine that runs QEMU.  Use as a context manager."""

    #: short identifier written to the ``host`` column, e.g. ``local``
    name: str = "host"
    #: where to look when the host stops answering (a VM's serial console log), if known
    console_path: Optional[str] = None

    # -- commands ---------------------------------------------------------------
    @abc.abstractmethod
    def run(self, argv: Sequence[str], *, timeout: float = DEFAULT_COMMAND_TIMEOUT,
            input: Optional[bytes] = None, check: bool = True,
            env: Optional[Mapping[str, str]] = None) -> CommandResult:
        """Run ``argv`` to completion.  Raises CommandTimeout, or HostError
        when ``check`` and the exit status is non-zero."""

    # -- files --------------------------------------------------------------------
    @abc.abstractmethod
    @contextlib.contextmanager
    def runtime_dir(self, prefix: str = "migstall-") -> Iterator[str]:
        """A fresh 0700 directory on the host, removed on exit."""

    @abc.abstractmethod
    def read_bytes(self, path: str) -> bytes: ...

    @abc.abstractmethod
    def write_bytes(self, path: str, data: bytes, mode: int = 0o600) -> None: ...

    @abc.abstractmethod
    def exists(self, path: str) -> bool: ...

    @abc.abstractmethod
    def stage(self, local_path: Path) -> str:
        """Make a local file available on the host; return its path there.
        Remote hosts cache by content hash, so staging twice copies once."""

    @abc.abstractmethod
    def fetch(self, host_path: str, local_path: Path) -> None:
        """Copy a file from the host to this machine."""

    # -- processes and sockets -------------------------------------------------------
    @abc.abstractmethod
    def connect_unix(self, path: str, timeout: float = DEFAULT_CONNECT_TIMEOUT):
        """A connected ``socket.socket`` to the unix socket ``path`` on the host."""

    @abc.abstractmethod
    def open_stream(self, argv: Sequence[str], timeout: float = DEFAULT_CONNECT_TIMEOUT) -> HostStream:
        """Start ``argv`` on the host with its standard input and output on a
        local socket (see :class:`HostStream`); ``timeout`` bounds the start."""

    @abc.abstractmethod
    def pid_alive(self, pid: int) -> bool: ...

    @abc.abstractmethod
    def signal(self, pid: int, sig: int) -> None: ...

    @abc.abstractmethod
    def wait_pid_exit(self, pid: int, timeout: float) -> bool:
        """Wait until ``pid`` has exited; False on timeout."""

    def stop_pid(self, pid: int, grace: float = DEFAULT_KILL_GRACE) -> None:
        """SIGTERM, wait ``grace`` seconds, then SIGKILL.  Never raises if gone."""
        if not self.pid_alive(pid):
            return
        with best_effort(f"SIGTERM to pid {pid} on {self.name}", log):
            self.signal(pid, _signal.SIGCONT)  # a SIGSTOPped process cannot die of SIGTERM
            self.signal(pid, _signal.SIGTERM)
        if self.wait_pid_exit(pid, grace):
            return
        with best_effort(f"SIGKILL to pid {pid} on {self.name}", log):
            self.signal(pid, _signal.SIGKILL)
        self.wait_pid_exit(pid, grace)

    # -- per-scenario host settings ------------------------------------------------------
    #: whether :meth:`configure` accepts a kernel command line (the virtual host does)
    supports_l1_cmdline: bool = False
    #: whether a guest may have more vCPUs than the host has CPUs without ``--overcommit``:
    #: only where migstall itself chose the host's CPU count (the virtual host's L1)
    vcpus_beyond_cpus_ok: bool = False

    def configure(self, l1_cmdline: str = "") -> bool:
        """Apply a scenario's host settings before its run; True if the host
        was rebooted.  Only the virtual host can change its kernel command line."""
        if l1_cmdline.strip():
            raise UserError(f"l1_cmdline {l1_cmdline!r} needs --host virtual; drop it for --host {self.name}")
        return False

    # -- clock ------------------------------------------------------------------------
    def clock_offset_s(self) -> float:
        """Host wall clock minus this machine's wall clock, in seconds."""
        return 0.0

    def uptime_s(self) -> Optional[float]:
        """Seconds since the host booted (``/proc/uptime``), the clock of its
        kernel log's time stamps; None if unreadable.  Bounded by
        :data:`DEFAULT_KERNEL_LOG_TIMEOUT`."""
        try:
            return parse_uptime(self.run(["cat", "/proc/uptime"], timeout=DEFAULT_KERNEL_LOG_TIMEOUT).text)
        except Exception as exc:       # noqa: BLE001  diagnostics only: never fail a run for them
            log.debug("cannot read the uptime of %s: %s", self.name, exc)
            return None

    # -- diagnostics --------------------------------------------------------------------
    def kernel_log_tail(self, since_s: Optional[float] = None, lines: int = 20) -> List[str]:
        """The last ``lines`` interesting lines of the host's kernel log (OOM
        kills, segfaults, general protection faults, KVM messages, WARNING/BUG/
        Oops/Call Trace; see :mod:`harness.hosts.kernel_log`), those stamped
        at or after ``since_s`` (an :meth:`uptime_s` reading) when it is given,
        time prefix kept.  [] where migstall cannot read that log.  Never raises;
        bounded by :data:`DEFAULT_KERNEL_LOG_TIMEOUT`."""
        return []

    def lost_note(self) -> str:
        """Words on why this host stopped answering, for a failed row: "" while
        it answers, or where nothing is known.  A VM host (the virtual host)
        names the last interesting lines of its serial console (panics, Oopses,
        lockups) from :attr:`console_path`, which is readable when the VM is not."""
        return ""

    # -- lifecycle ----------------------------------------------------------------------
    def close(self) -> None:  # noqa: B027  a default, not abstract: LocalHost holds no connection
        """Release connections.  Idempotent."""

    def __enter__(self) -> "Host":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
