"""This machine."""

from __future__ import annotations

import contextlib
import errno
import os
import select
import shutil
import socket
import subprocess
from pathlib import Path
from typing import Iterator, Mapping, Optional, Sequence

from harness.errors import CommandTimeout, HostError
from harness.hosts.base import DEFAULT_COMMAND_TIMEOUT, DEFAULT_CONNECT_TIMEOUT, CommandResult, Host
from harness.paths import new_runtime_dir


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
