"""This machine."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import shutil
import socket
import subprocess
from pathlib import Path
from typing import Iterator, List, Mapping, Optional, Sequence

from harness.errors import CommandTimeout, HostError
from harness.hosts.base import (DEFAULT_COMMAND_TIMEOUT, DEFAULT_CONNECT_TIMEOUT, DEFAULT_STREAM_CLOSE_TIMEOUT,
                                CommandResult, Host, HostStream)
from harness.hosts.kernel_log import parse_uptime
from harness.paths import new_runtime_dir

log = logging.getLogger(__name__)


class _LocalStream(HostStream):
    def __init__(self, argv: tuple, sock: socket.socket, proc: "subprocess.Popen[bytes]") -> None:
        self.argv, self.sock, self.proc = argv, sock, proc
        self._err = b""

    def stderr_text(self) -> str:
        if self.proc.poll() is not None and self.proc.stderr is not None and not self.proc.stderr.closed:
            self._err += self.proc.stderr.read()
            self.proc.stderr.close()
        return self._err.decode(errors="replace")

    def _wait_exit(self) -> None:
        try:
            self.proc.wait(DEFAULT_STREAM_CLOSE_TIMEOUT)
        except subprocess.TimeoutExpired:
            log.warning("%s did not exit within %gs of its input closing; killing it",
                        self.argv[0], DEFAULT_STREAM_CLOSE_TIMEOUT)
            self.proc.kill()
            self.proc.wait()
        err = self.stderr_text().strip()
        if self.proc.returncode not in (0, -9) and err:
            log.warning("%s exited %s: %s", self.argv[0], self.proc.returncode, err.splitlines()[-1])


class LocalHost(Host):
    name = "local"

    def run(self, argv: Sequence[str], *, timeout: float = DEFAULT_COMMAND_TIMEOUT,
            input: Optional[bytes] = None, check: bool = True,
            env: Optional[Mapping[str, str]] = None) -> CommandResult:
        argv = tuple(str(a) for a in argv)
        full_env = None if env is None else {**os.environ, **env}
        try:
            proc = subprocess.run(argv, input=input, capture_output=True, timeout=timeout,
                                  env=full_env, stdin=None if input is not None else subprocess.DEVNULL)
        except subprocess.TimeoutExpired as exc:
            raise CommandTimeout(f"{argv[0]} did not finish within {timeout:g}s") from exc
        except FileNotFoundError as exc:
            raise HostError(f"{argv[0]}: command not found") from exc
        result = CommandResult(argv, proc.returncode, proc.stdout, proc.stderr)
        if check and proc.returncode != 0:
            tail = proc.stderr.decode(errors="replace").strip().splitlines()[-1:] or [""]
            raise HostError(f"{' '.join(argv[:3])} exited {proc.returncode}: {tail[0]}")
        return result

    @contextlib.contextmanager
    def runtime_dir(self, prefix: str = "migstall-") -> Iterator[str]:
        path = new_runtime_dir(prefix)
        try:
            yield str(path)
        finally:
            shutil.rmtree(path, ignore_errors=True)

    def read_bytes(self, path: str) -> bytes:
        return Path(path).read_bytes()

    def write_bytes(self, path: str, data: bytes, mode: int = 0o600) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)

    def exists(self, path: str) -> bool:
        return os.path.exists(path)

    def stage(self, local_path: Path) -> str:
        return str(Path(local_path).resolve())

    def fetch(self, host_path: str, local_path: Path) -> None:
        shutil.copyfile(host_path, local_path)

    def connect_unix(self, path: str, timeout: float = DEFAULT_CONNECT_TIMEOUT) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except OSError as exc:
            sock.close()
            raise HostError(f"cannot connect to {path}: {exc.strerror or exc}") from exc
        sock.settimeout(None)
        return sock

    def open_stream(self, argv: Sequence[str], timeout: float = DEFAULT_CONNECT_TIMEOUT) -> HostStream:
        argv = tuple(str(a) for a in argv)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            proc = subprocess.Popen(argv, stdin=theirs.fileno(), stdout=theirs.fileno(), stderr=subprocess.PIPE,
                                    start_new_session=True)
        except OSError as exc:
            ours.close()
            raise HostError(f"{argv[0]}: cannot start: {exc.strerror or exc}") from exc
        finally:
            theirs.close()
        return _LocalStream(argv, ours, proc)

    def pid_alive(self, pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        # a zombie child of ours is dead for our purposes
        try:
            with open(f"/proc/{pid}/stat") as fh:
                return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
        except OSError:
            return False

    def signal(self, pid: int, sig: int) -> None:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass

    def wait_pid_exit(self, pid: int, timeout: float) -> bool:
        """Event-driven: waits on a pidfd (Linux >= 5.3)."""
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            return True
        except OSError as exc:
            if exc.errno != errno.ENOSYS:
                raise
            raise HostError("pidfd_open is unavailable; migstall needs Linux >= 5.3") from exc
        try:
            ready, _, _ = select.select([pidfd], [], [], timeout)
            if not ready:
                return False
            with contextlib.suppress(ChildProcessError, OSError):
                os.waitpid(pid, os.WNOHANG)  # reap if it was our child
            return True
        finally:
            os.close(pidfd)

    # -- diagnostics ------------------------------------------------------------------------
    def uptime_s(self) -> Optional[float]:
        try:
            return parse_uptime(Path("/proc/uptime").read_text())
        except OSError:
            return None

    def kernel_log_tail(self, since_s: Optional[float] = None, lines: int = 20) -> List[str]:
        """Always []: this machine's kernel log is not migstall's to read (in a
        sandbox or container it belongs to the machine outside, if it is
        readable at all, and it mixes in everything else the machine runs)."""
        return []
