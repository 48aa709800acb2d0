"""A host reached over SSH (paramiko).

Security and robustness rules:

* Host keys are checked against a known_hosts file with ``RejectPolicy``: an
  unknown host or a changed key is refused (:class:`HostKeyMismatch`, exit 2,
  naming the file and the fix).  There is no AutoAddPolicy anywhere.
* Public-key authentication only (a key file, or the agent when none is given).
* Remote commands are argument lists joined with :func:`shlex.join`.
* Timeouts (seconds; all overridable per instance):
  connect (TCP + SSH banner) :data:`DEFAULT_SSH_CONNECT_TIMEOUT`,
  authentication :data:`DEFAULT_SSH_AUTH_TIMEOUT`, every command
  :data:`~harness.hosts.base.DEFAULT_COMMAND_TIMEOUT` unless the caller passes one,
  channel open :data:`DEFAULT_CHANNEL_TIMEOUT`, the server's answer to an exec
  request :data:`DEFAULT_EXEC_REPLY_TIMEOUT` (capped by the command's timeout),
  the kill after a timeout :data:`DEFAULT_KILL_TIMEOUT`.  A command's timeout
  covers the exec request, writing its ``input`` and reading its output.
* No command outlives its :meth:`SSHHost.run`: without a pty nothing signals a
  remote process when its channel closes, so ``run`` starts the command as
  ``echo <marker><pid> >&2; exec <argv>``.  sshd makes the login shell a session
  leader, ``exec`` keeps its pid, so that pid is also the process group of the
  command and its children.  The marker line is removed from stderr (stdout is
  untouched; exit statuses are the command's own).  On a timeout, or any
  exception (Ctrl-C included) before the command has exited, ``run`` sends
  SIGKILL to that process group over a new channel.  Processes that leave the
  group on purpose (``qemu -daemonize``, ``setsid``) are not touched: their
  callers track them by pidfile.
* Files move over SFTP; :meth:`SSHHost.stage` caches by content hash in
  ``~/.cache/migstall/stage`` on the remote host.
* :meth:`SSHHost.connect_unix` opens a ``direct-streamlocal@openssh.com`` channel
  to a unix socket on the remote host (OpenSSH's ``ssh -L local:/remote.sock``)
  and bridges it to one end of a local :func:`socket.socketpair`, so asyncio
  (qemu.qmp) gets a real socket.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import posixpath
import re
import select
import shlex
import socket
import threading
import time
from pathlib import Path
from typing import Iterator, List, Mapping, Optional, Sequence

import paramiko
from paramiko.common import cMSG_CHANNEL_OPEN
from paramiko.message import Message

from harness.errors import CommandTimeout, HostError, HostKeyMismatch, SSHError, UserError, best_effort
from harness.hosts.base import (DEFAULT_COMMAND_TIMEOUT, DEFAULT_CONNECT_TIMEOUT, DEFAULT_KERNEL_LOG_TIMEOUT,
                                DEFAULT_STREAM_CLOSE_TIMEOUT, CommandResult, Host, HostStream)
from harness.hosts.kernel_log import console_note, interesting_tail

log = logging.getLogger(__name__)

#: TCP connect + SSH banner, seconds
DEFAULT_SSH_CONNECT_TIMEOUT = 20.0
#: authentication, seconds
DEFAULT_SSH_AUTH_TIMEOUT = 20.0
#: opening a channel (session, SFTP, unix socket forward), seconds
DEFAULT_CHANNEL_TIMEOUT = 20.0
#: the server's answer to an exec request, seconds (never more than the command's own timeout);
#: paramiko's ``exec_command`` itself would wait for ever
DEFAULT_EXEC_REPLY_TIMEOUT = 20.0
#: killing a timed-out or interrupted command's process group (new channel, exec, kill), seconds
DEFAULT_KILL_TIMEOUT = 10.0
#: keepalive interval, seconds
KEEPALIVE_S = 15
#: how long :meth:`SSHHost.reconnect` keeps trying by default, seconds
DEFAULT_RECONNECT_TIMEOUT = 300.0
#: a clock offset measurement is reused for this long, seconds
CLOCK_CACHE_S = 10.0

_CHUNK = 65536
#: how often the command loop looks at the send window while ``input`` is pending, seconds
_SEND_POLL_S = 0.02


def _exec_bounded(chan: paramiko.Channel, command: str, timeout: float) -> bool:
    """``chan.exec_command(command)``, waiting at most ``timeout`` seconds for the
    server's answer.  False when it did not come: the channel is then closed
    (which also wakes and ends the worker thread).  Rejections raise as in paramiko.

    paramiko waits for the answer with a bare ``Event.wait()``, so the request
    runs in a short-lived worker thread that this thread joins with a timeout.
    """
    failure: List[BaseException] = []

    def request() -> None:
        try:
            chan.exec_command(command)
        except BaseException as exc:      # noqa: BLE001  handed to the caller below
            failure.append(exc)

    worker = threading.Thread(target=request, name="ssh-exec", daemon=True)
    worker.start()
    timed_out = True
    try:
        worker.join(timeout)
        timed_out = worker.is_alive()
    finally:
        if timed_out:
            chan.close()              # sets the channel's event: exec_command raises and the worker ends
            worker.join(1.0)
    if timed_out:
        return False
    if failure:
        raise failure[0]
    return True


def _streamlocal_channel(transport: paramiko.Transport, path: str, timeout: float) -> paramiko.Channel:
    """Open a ``direct-streamlocal@openssh.com`` channel (OpenSSH PROTOCOL 2.4).

    paramiko's ``open_channel`` only knows the tcpip/x11 payloads, so this
    mirrors it with the streamlocal payload: socket path, reserved string,
    reserved uint32.  The only use of paramiko's private members: pinned to the
    major versions tested (pyproject.toml) and run against a real OpenSSH sshd by
    ``tests/test_ssh.py`` (``test_qmp_over_streamlocal_forwards``).
    """
    if not transport.is_active():
        raise SSHError("SSH session not active")
    kind = "direct-streamlocal@openssh.com"
    with transport.lock:
        window_size = transport._sanitize_window_size(None)
        max_packet_size = transport._sanitize_packet_size(None)
        chanid = transport._next_channel()
        m = Message()
        m.add_byte(cMSG_CHANNEL_OPEN)
        m.add_string(kind)
        m.add_int(chanid)
        m.add_int(window_size)
        m.add_int(max_packet_size)
        m.add_string(path)
        m.add_string("")
        m.add_int(0)
        chan = paramiko.Channel(chanid)
        transport._channels.put(chanid, chan)
        transport.channel_events[chanid] = event = threading.Event()
        transport.channels_seen[chanid] = True
        chan._set_transport(transport)
        chan._set_window(window_size, max_packet_size)
    transport._send_user_message(m)
    if not event.wait(timeout):
        raise SSHError(f"timed out after {timeout:g}s opening a forward to {path}")
    opened = transport._channels.get(chanid)
    if opened is None:
        exc = transport.get_exception()
        raise SSHError(f"the server refused a forward to {path}: {exc or 'channel open failed'}")
    return opened


class _Pump:
    """Copies bytes both ways between a paramiko channel and a local socket."""

    def __init__(self, chan: paramiko.Channel, sock: socket.socket, label: str) -> None:
        self.chan, self.sock = chan, sock
        self.thread = threading.Thread(target=self._run, name=f"ssh-pump {label}", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        chan, sock = self.chan, self.sock
        try:
            while True:
                readable, _, _ = select.select([chan, sock], [], [], 1.0)
                if chan in readable:
                    data = chan.recv(_CHUNK)
                    if not data:
                        break
                    sock.sendall(data)
                if sock in readable:
                    data = sock.recv(_CHUNK)
                    if not data:
                        break
                    chan.sendall(data)
                if chan.closed:
                    break
        except (OSError, EOFError, paramiko.SSHException) as exc:
            log.debug("pump %s ended: %s", self.thread.name, exc)
        finally:
            self.close()

    def close(self) -> None:
        # called twice (by the pump and by its stream), often on a connection already gone
        with best_effort(f"{self.thread.name}: closing the channel", log, level=logging.DEBUG):
            self.chan.close()
        with best_effort(f"{self.thread.name}: shutting the socket down", log, level=logging.DEBUG):
            self.sock.shutdown(socket.SHUT_RDWR)
        with best_effort(f"{self.thread.name}: closing the socket", log, level=logging.DEBUG):
            self.sock.close()


class _SSHStream(HostStream):
    """A remote process (``echo <marker>$$; exec argv``) whose stdin/stdout
    channel is pumped to a local socket.  Closing the socket closes the channel,
    so the process reads end of file; its process group is killed if it has not
    exited within :data:`DEFAULT_STREAM_CLOSE_TIMEOUT`."""

    def __init__(self, host: "SSHHost", argv: tuple, sock: socket.socket, chan: paramiko.Channel,
                 pgid: Optional[int], pump: _Pump) -> None:
        self.host, self.argv, self.sock, self.chan, self.pgid, self.pump = host, argv, sock, chan, pgid, pump
        self._err = bytearray()

    def stderr_text(self) -> str:
        with best_effort(f"reading the stderr of {self.argv[0]} on {self.host.name}", log, level=logging.DEBUG):
            while self.chan.recv_stderr_ready():
                self._err += self.chan.recv_stderr(_CHUNK)
        return bytes(self._err).decode(errors="replace")

    def _wait_exit(self) -> None:
        # the pump sees end of file and closes the channel; sshd then closes the process's stdin
        self.pump.thread.join(DEFAULT_STREAM_CLOSE_TIMEOUT)
        self.pump.close()
        try:
            if self.pgid is not None and not self.host.wait_pid_exit(self.pgid, DEFAULT_STREAM_CLOSE_TIMEOUT):
                self.host._kill_group(self.pgid, self.argv[0])
        except Exception as exc:        # noqa: BLE001  closing runs in cleanup paths: report, never raise
            log.warning("cannot check that %s on %s has exited: %s", self.argv[0], self.host.name, exc)


class SSHHost(Host):
    """A remote Linux host over SSH.  Use as a context manager."""

    def __init__(self, hostname: str, *, user: str = "root", port: int = 22,
                 key_file: Optional[str] = None, known_hosts: Optional[str] = None,
                 name: Optional[str] = None,
                 connect_timeout: float = DEFAULT_SSH_CONNECT_TIMEOUT,
                 auth_timeout: float = DEFAULT_SSH_AUTH_TIMEOUT,
                 connect: bool = True) -> None:
        self.hostname, self.user, self.port = hostname, user, int(port)
        self.key_file = key_file
        self.known_hosts = known_hosts or os.path.expanduser("~/.ssh/known_hosts")
        self.name = name or (f"ssh://{user}@{hostname}" + (f":{port}" if int(port) != 22 else ""))
        self.connect_timeout, self.auth_timeout = connect_timeout, auth_timeout
        self._client: Optional[paramiko.SSHClient] = None
        self._sftp: Optional[paramiko.SFTPClient] = None
        self._pumps: List[_Pump] = []
        self._lock = threading.Lock()
        self._remote_home: Optional[str] = None
        self._date = "date"
        self._clock: Optional[tuple] = None     # (monotonic time measured, offset)
        if connect:
            self.connect()

    # -- connection -----------------------------------------------------------------
    @property
    def _known_hosts_key(self) -> str:
        return self.hostname if self.port == 22 else f"[{self.hostname}]:{self.port}"

    def connect(self) -> None:
        """Connect and authenticate.  HostKeyMismatch for unknown/changed keys."""
        if not os.path.exists(self.known_hosts):
            raise UserError(f"known_hosts file {self.known_hosts} does not exist; create it with "
                            f"'ssh-keyscan -p {self.port} {self.hostname} >> {self.known_hosts}' after "
                            f"checking the key, or point MIGSTALL_SSH_KNOWN_HOSTS at another file")
        if self.key_file and not os.path.exists(self.key_file):
            raise UserError(f"SSH key file {self.key_file} does not exist; pass an existing private key "
                            f"with MIGSTALL_SSH_KEY")
        client = paramiko.SSHClient()
        client.load_host_keys(self.known_hosts)
        client.set_missing_host_key_policy(paramiko.RejectPolicy())
        fix_hint = f"ssh-keygen -R '{self._known_hosts_key}' -f {self.known_hosts}"
        try:
            client.connect(self.hostname, port=self.port, username=self.user,
                           key_filename=self.key_file, look_for_keys=False,
                           allow_agent=self.key_file is None,
                           timeout=self.connect_timeout, banner_timeout=self.connect_timeout,
                           auth_timeout=self.auth_timeout, channel_timeout=DEFAULT_CHANNEL_TIMEOUT)
        except paramiko.BadHostKeyException as exc:
            client.close()
            raise HostKeyMismatch(
                f"host key of {self._known_hosts_key} does not match the one pinned in {self.known_hosts}; "
                f"if the host was legitimately re-keyed, remove the old entry ({fix_hint}) and add the "
                f"verified new key") from exc
        except paramiko.AuthenticationException as exc:
            client.close()
            raise SSHError(f"SSH authentication as {self.user}@{self.hostname}:{self.port} failed "
                           f"(key {self.key_file or 'from agent'}): {exc}") from exc
        except paramiko.SSHException as exc:
            client.close()
            if "not found in known_hosts" in str(exc):
                raise HostKeyMismatch(
                    f"host {self._known_hosts_key} has no key in {self.known_hosts}; verify its key and add "
                    f"it (ssh-keyscan -p {self.port} {self.hostname} >> {self.known_hosts})") from exc
            raise SSHError(f"SSH connection to {self.hostname}:{self.port} failed: {exc}") from exc
        except (OSError, EOFError) as exc:
            client.close()
            raise SSHError(f"cannot connect to {self.hostname}:{self.port}: {exc}") from exc
        transport = client.get_transport()
        assert transport is not None
        transport.set_keepalive(KEEPALIVE_S)
        self._client = client
        log.info("connected to %s", self.name)

    def reconnect(self, timeout: float = DEFAULT_RECONNECT_TIMEOUT) -> None:
        """Drop the connection and connect again, retrying until ``timeout``
        (e.g. while the host reboots).  A host-key mismatch is not retried."""
        self._disconnect()
        deadline = time.monotonic() + timeout
        delay = 0.5
        while True:
            try:
                self.connect()
                return
            except HostKeyMismatch:
                raise
            except SSHError as exc:
                if time.monotonic() + delay > deadline:
                    raise SSHError(f"{self.name} did not come back within {timeout:g}s: {exc}") from exc
                log.debug("reconnect to %s: %s; retrying", self.name, exc)
                # no event tells us sshd is back on a remote machine: back off and retry
                time.sleep(delay)
                delay = min(delay * 2, 5.0)

    def lost_note(self) -> str:
        """See :meth:`Host.lost_note`: with a :attr:`console_path` (a VM's serial
        console on this machine) and the SSH connection gone, the console's last
        interesting lines (panics, Oopses, lockups, RCU stalls), else its last line."""
        transport = self._client.get_transport() if self._client is not None else None
        if transport is not None and transport.is_active():
            return ""
        if not self.console_path:
            return ""
        return console_note(Path(self.console_path), self.name)

    def _transport(self) -> paramiko.Transport:
        if self._client is None:
            raise SSHError(f"not connected to {self.name}")
        transport = self._client.get_transport()
        if transport is None or not transport.is_active():
            raise SSHError(f"the SSH connection to {self.name} is closed")
        return transport

    def _sftp_client(self) -> paramiko.SFTPClient:
        with self._lock:
            if self._sftp is None:
                try:
                    self._sftp = paramiko.SFTPClient.from_transport(self._transport(),
                                                                    window_size=None, max_packet_size=None)
                except paramiko.SSHException as exc:
                    raise SSHError(f"cannot open SFTP on {self.name}: {exc}") from exc
                assert self._sftp is not None
                self._sftp.get_channel().settimeout(DEFAULT_COMMAND_TIMEOUT)
            return self._sftp

    # -- commands ------------------------------------------------------------------------
    def _open_exec(self, command: str, exec_timeout: float, what: str,
                   open_timeout: float = DEFAULT_CHANNEL_TIMEOUT) -> paramiko.Channel:
        """A new session channel running the shell string ``command``.  Opening
        waits at most ``open_timeout`` s (SSHError), the server's answer to the
        exec request at most ``exec_timeout`` s (CommandTimeout)."""
        try:
            chan = self._transport().open_session(timeout=open_timeout)
        except paramiko.SSHException as exc:
            raise SSHError(f"cannot open an SSH session on {self.name}: {exc}") from exc
        try:
            started = _exec_bounded(chan, command, exec_timeout)
        except (OSError, EOFError, paramiko.SSHException) as exc:
            chan.close()
            raise SSHError(f"{what} on {self.name}: SSH channel failed: {exc}") from exc
        except BaseException:
            chan.close()
            raise
        if not started:
            raise CommandTimeout(f"{what} on {self.name}: the server did not answer the exec request "
                                 f"within {exec_timeout:g}s (if it started, it could not be killed)")
        return chan

    def _kill_group(self, pgid: Optional[int], what: str) -> None:
        """SIGKILL the process group ``pgid`` on the host, over a new channel, all
        within :data:`DEFAULT_KILL_TIMEOUT`.  Never raises (it runs while another
        exception propagates): failures are logged."""
        if pgid is None or pgid <= 1:
            log.warning("%s on %s: its remote pid is unknown, so it cannot be killed", what, self.name)
            return
        log.info("killing %s on %s (process group %d)", what, self.name, pgid)
        # the login shell's builtin kill: bash, dash and busybox ash all take `-KILL -N`;
        # an external procps kill needs `--` before a negative pid, hence the fallback
        command = f"kill -KILL -{pgid} 2>/dev/null || kill -KILL -- -{pgid}"
        deadline = time.monotonic() + DEFAULT_KILL_TIMEOUT
        try:
            # half the budget to open the channel, half for the exec answer; kill itself gets what is left
            chan = self._open_exec(command, DEFAULT_KILL_TIMEOUT / 2, "kill",
                                   open_timeout=DEFAULT_KILL_TIMEOUT / 2)
        except Exception as exc:  # noqa: BLE001  runs while another error propagates: log, never raise
            log.warning("cannot kill %s on %s (process group %d): %s", what, self.name, pgid, exc)
            return
        try:
            chan.shutdown_write()
            if not chan.status_event.wait(max(deadline - time.monotonic(), 0.0)):
                log.warning("killing %s on %s (process group %d) did not finish within %gs",
                            what, self.name, pgid, DEFAULT_KILL_TIMEOUT)
            elif chan.recv_exit_status() != 0:
                log.debug("process group %d on %s was already gone", pgid, self.name)
        except Exception as exc:  # noqa: BLE001  runs while another error propagates: log, never raise
            log.warning("cannot kill %s on %s (process group %d): %s", what, self.name, pgid, exc)
        finally:
            chan.close()

    def run(self, argv: Sequence[str], *, timeout: float = DEFAULT_COMMAND_TIMEOUT,
            input: Optional[bytes] = None, check: bool = True,
            env: Optional[Mapping[str, str]] = None) -> CommandResult:
        """Run ``argv`` on the host.  ``timeout`` bounds the exec request (at most
        :data:`DEFAULT_EXEC_REPLY_TIMEOUT` of it), writing ``input`` and reading the
        output; on expiry, or any exception before the command exits, its process
        group is killed (see the module docstring) and the exception propagates."""
        argv = tuple(str(a) for a in argv)
        full = argv if not env else ("env", *(f"{k}={v}" for k, v in env.items()), *argv)
        command = shlex.join(full)
        log.debug("%s$ %s", self.name, command)
        # the login shell reports its pid on stderr, then becomes the command (same pid)
        marker = f"migstall-pid.{os.urandom(6).hex()}="
        pid_line = re.compile(re.escape(marker.encode()) + rb"([0-9]+)\n")
        deadline = time.monotonic() + timeout
        chan = self._open_exec(f"echo {marker}$$ >&2; exec {command}",
                               min(timeout, DEFAULT_EXEC_REPLY_TIMEOUT), argv[0])
        out, err = bytearray(), bytearray()
        pending = memoryview(input or b"")
        pgid: Optional[int] = None
        finished = False

        def take_pid() -> None:
            nonlocal pgid
            if pgid is None:
                match = pid_line.search(err)
                if match:
                    pgid = int(match.group(1))
                    del err[match.start():match.end()]

        try:
            if not pending:
                chan.shutdown_write()
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise CommandTimeout(f"{argv[0]} on {self.name} did not finish within {timeout:g}s")
                # input goes as far as the send window allows, interleaved with reading, so a
                # command that writes while it reads cannot deadlock us
                chan.settimeout(remaining)
                while pending and chan.send_ready():
                    try:
                        sent = chan.send(bytes(pending[:_CHUNK]))
                    except OSError:
                        if not chan.closed:
                            raise
                        sent = 0
                    # 0: the channel is closed (the command exited without reading it all): drop the rest
                    pending = pending[sent:] if sent > 0 else pending[:0]
                    if not pending:
                        chan.shutdown_write()
                select.select([chan], [], [], min(remaining, _SEND_POLL_S if pending else 1.0))
                while chan.recv_ready():
                    out += chan.recv(_CHUNK)
                while chan.recv_stderr_ready():
                    err += chan.recv_stderr(_CHUNK)
                take_pid()
                if chan.exit_status_ready() and not chan.recv_ready() and not chan.recv_stderr_ready():
                    if chan.eof_received or chan.closed:
                        break
                    # exit status can precede the last data/EOF; wait for them a little
                    select.select([chan], [], [], min(max(deadline - time.monotonic(), 0), 0.05))
                    if not chan.recv_ready() and not chan.recv_stderr_ready():
                        break
            code = chan.recv_exit_status()
            finished = True
        except (OSError, EOFError, paramiko.SSHException) as exc:
            raise SSHError(f"{argv[0]} on {self.name}: SSH channel failed: {exc}") from exc
        finally:
            try:
                if not finished:
                    # the channel that failed may not give its stderr: the failure itself propagates
                    with best_effort(f"{argv[0]} on {self.name}: reading the rest of stderr", log,
                                     level=logging.DEBUG):
                        while chan.recv_stderr_ready():
                            err += chan.recv_stderr(_CHUNK)
                    take_pid()
                    self._kill_group(pgid, argv[0])
            finally:
                chan.close()
        if pgid is None:
            log.debug("%s on %s: no pid line on stderr (login shell not POSIX?)", argv[0], self.name)
        result = CommandResult(argv, code, bytes(out), bytes(err))
        if check and code != 0:
            tail = bytes(err).decode(errors="replace").strip().splitlines()[-1:] or [""]
            raise HostError(f"{' '.join(argv[:3])} on {self.name} exited {code}: {tail[0]}")
        return result

    # -- files --------------------------------------------------------------------------
    @contextlib.contextmanager
    def runtime_dir(self, prefix: str = "migstall-") -> Iterator[str]:
        path = self.run(["mktemp", "-d", f"/tmp/{prefix}XXXXXXXX"]).text.strip()
        try:
            self.run(["chmod", "700", path])
            yield path
        finally:
            with best_effort(f"removing {path} on {self.name}", log):
                self.run(["rm", "-rf", "--", path], timeout=DEFAULT_COMMAND_TIMEOUT)

    def read_bytes(self, path: str) -> bytes:
        try:
            with self._sftp_client().open(path, "rb") as fh:
                fh.prefetch()
                return fh.read()
        except OSError as exc:
            raise HostError(f"cannot read {path} on {self.name}: {exc}") from exc

    def write_bytes(self, path: str, data: bytes, mode: int = 0o600) -> None:
        sftp = self._sftp_client()
        try:
            with sftp.open(path, "wb") as fh:
                fh.set_pipelined(True)
                fh.chmod(mode)
                fh.write(data)
        except OSError as exc:
            raise HostError(f"cannot write {path} on {self.name}: {exc}") from exc

    def exists(self, path: str) -> bool:
        try:
            self._sftp_client().stat(path)
            return True
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise HostError(f"cannot stat {path} on {self.name}: {exc}") from exc

    def _stage_dir(self) -> str:
        if self._remote_home is None:
            self._remote_home = self._sftp_client().normalize(".")
        path = posixpath.join(self._remote_home, ".cache", "migstall", "stage")
        self.run(["mkdir", "-p", path])
        return path

    def stage(self, local_path: Path) -> str:
        local_path = Path(local_path)
        digest = hashlib.sha256()
        with open(local_path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
        remote = posixpath.join(self._stage_dir(), f"{digest.hexdigest()[:20]}-{local_path.name}")
        sftp = self._sftp_client()
        size = local_path.stat().st_size
        with contextlib.suppress(FileNotFoundError):
            if sftp.stat(remote).st_size == size:
                log.debug("stage %s: cached at %s", local_path, remote)
                return remote
        tmp = f"{remote}.part{os.getpid()}"
        try:
            sftp.put(str(local_path), tmp, confirm=True)
            sftp.chmod(tmp, 0o755 if os.access(local_path, os.X_OK) else 0o644)
            sftp.posix_rename(tmp, remote)
        except OSError as exc:
            with best_effort(f"removing {tmp} on {self.name}", log, level=logging.DEBUG):  # often never created
                sftp.remove(tmp)
            raise HostError(f"cannot stage {local_path} to {self.name}:{remote}: {exc}") from exc
        log.debug("staged %s -> %s", local_path, remote)
        return remote

    def fetch(self, host_path: str, local_path: Path) -> None:
        try:
            self._sftp_client().get(host_path, str(local_path))
        except OSError as exc:
            raise HostError(f"cannot fetch {host_path} from {self.name}: {exc}") from exc

    # -- processes and sockets -------------------------------------------------------------
    def connect_unix(self, path: str, timeout: float = DEFAULT_CONNECT_TIMEOUT) -> socket.socket:
        try:
            chan = _streamlocal_channel(self._transport(), path, timeout)
        except SSHError as exc:
            raise HostError(f"cannot connect to {path} on {self.name}: {exc}") from exc
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self._pumps = [p for p in self._pumps if p.thread.is_alive()]
        self._pumps.append(_Pump(chan, theirs, path))
        return ours

    def open_stream(self, argv: Sequence[str], timeout: float = DEFAULT_CONNECT_TIMEOUT) -> HostStream:
        """See :class:`_SSHStream`.  ``timeout`` bounds the exec request and the
        wait for the remote pid (a marker line the login shell prints on stdout
        before it becomes the command)."""
        argv = tuple(str(a) for a in argv)
        marker = f"migstall-pid.{os.urandom(6).hex()}="
        pid_line = re.compile(re.escape(marker.encode()) + rb"([0-9]+)\n")
        deadline = time.monotonic() + timeout
        chan = self._open_exec(f"echo {marker}$$; exec {shlex.join(argv)}",
                               min(timeout, DEFAULT_EXEC_REPLY_TIMEOUT), argv[0])
        out = bytearray()
        try:
            while True:
                match = pid_line.search(out)
                if match:
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    raise CommandTimeout(f"{argv[0]} on {self.name}: no pid within {timeout:g}s of its start")
                chan.settimeout(left)
                data = chan.recv(_CHUNK)
                if not data:
                    raise HostError(f"{argv[0]} on {self.name} exited at once: "
                                    f"{chan.recv_stderr(_CHUNK).decode(errors='replace').strip()[-300:]}")
                out += data
        except (OSError, EOFError, paramiko.SSHException) as exc:
            chan.close()
            raise SSHError(f"{argv[0]} on {self.name}: SSH channel failed: {exc}") from exc
        except BaseException:
            chan.close()
            raise
        chan.settimeout(None)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        theirs.sendall(bytes(out[match.end():]))     # what the command wrote after the marker
        pump = _Pump(chan, theirs, argv[0])
        self._pumps = [p for p in self._pumps if p.thread.is_alive()]
        self._pumps.append(pump)
        return _SSHStream(self, argv, ours, chan, int(match.group(1)), pump)

    def pid_alive(self, pid: int) -> bool:
        res = self.run(["cat", f"/proc/{int(pid)}/stat"], check=False)
        if res.returncode != 0:
            return False
        return res.text.rsplit(")", 1)[-1].split()[:1] != ["Z"]

    def signal(self, pid: int, sig: int) -> None:
        self.run(["kill", f"-{int(sig)}", str(int(pid))], check=False)

    def wait_pid_exit(self, pid: int, timeout: float) -> bool:
        """Waits on the remote side.  A remote non-child process offers no event a
        POSIX shell can wait on, so the remote loop checks /proc every 50 ms."""
        script = ('i=0; while [ -e "/proc/$1" ] && ! grep -q "^[0-9]* (.*) Z" "/proc/$1/stat" 2>/dev/null; do '
                  'i=$((i+1)); [ "$i" -gt "$2" ] && exit 1; sleep 0.05; done; exit 0')
        ticks = max(1, int(timeout / 0.05))
        try:
            res = self.run(["sh", "-c", script, "sh", str(int(pid)), str(ticks)],
                           timeout=timeout + DEFAULT_COMMAND_TIMEOUT, check=False)
        except CommandTimeout:
            return False
        return res.returncode == 0

    # -- diagnostics ------------------------------------------------------------------------
    def kernel_log_tail(self, since_s: Optional[float] = None, lines: int = 20) -> List[str]:
        """``dmesg`` on the host, filtered by :func:`~harness.hosts.kernel_log.interesting_tail`
        (busybox ``dmesg`` has no ``--since``: ``since_s`` is compared with each
        line's seconds-since-boot prefix).  [] when dmesg fails (not root under
        ``kernel.dmesg_restrict``) or the host does not answer."""
        try:
            res = self.run(["dmesg"], timeout=DEFAULT_KERNEL_LOG_TIMEOUT, check=False)
        except Exception as exc:       # noqa: BLE001  diagnostics only: never fail a run for them
            log.debug("cannot read the kernel log of %s: %s", self.name, exc)
            return []
        if res.returncode != 0:
            log.debug("dmesg on %s exited %d: %s", self.name, res.returncode,
                      res.stderr.decode(errors="replace").strip()[-200:])
            return []
        return interesting_tail(res.text, since_s, lines)

    # -- clock --------------------------------------------------------------------------
    def clock_offset_s(self, samples: int = 5, max_age_s: float = CLOCK_CACHE_S) -> float:
        """Remote wall clock minus ours, from the sample with the smallest round trip
        (its midpoint is the best estimate of when the remote clock was read).
        A measurement younger than ``max_age_s`` is reused (callers ask often)."""
        now = time.monotonic()
        if self._clock is not None and now - self._clock[0] < max_age_s:
            return self._clock[1]
        best: Optional[tuple] = None
        for _ in range(samples):
            t0 = time.time()
            text = self.run([self._date, "+%s.%N"], timeout=10).text.strip()
            t1 = time.time()
            if "N" in text and self._date == "date":
                # busybox date has no %N (and busybox sh prefers its applets): use GNU date
                self._date = "/usr/bin/date"
                continue
            try:
                remote = float(text)
            except ValueError as exc:
                raise HostError(f"cannot read the clock of {self.name}: date printed {text!r}") from exc
            rtt = t1 - t0
            if best is None or rtt < best[0]:
                best = (rtt, remote - (t0 + t1) / 2)
        assert best is not None
        log.debug("clock offset of %s: %.6f s (rtt %.1f ms)", self.name, best[1], best[0] * 1e3)
        self._clock = (time.monotonic(), best[1])
        return best[1]

    # -- lifecycle --------------------------------------------------------------------------
    def _disconnect(self) -> None:
        self._clock = None
        for pump in self._pumps:
            pump.close()
        self._pumps = []
        if self._sftp is not None:
            with best_effort(f"closing the SFTP session to {self.name}", log, level=logging.DEBUG):
                self._sftp.close()
            self._sftp = None
        if self._client is not None:
            with best_effort(f"closing the SSH connection to {self.name}", log, level=logging.DEBUG):
                self._client.close()
            self._client = None

    def close(self) -> None:
        self._disconnect()
