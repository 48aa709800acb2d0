"""SSHHost against a real OpenSSH sshd on 127.0.0.1 (started and stopped here)."""

from __future__ import annotations

import asyncio
import json
import os
import select
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import List, Tuple

import paramiko
import pytest
from qemu.qmp import EventListener, QMPClient

from harness.errors import CommandTimeout, HostError, HostKeyMismatch
from harness.hosts import ssh as ssh_mod
from harness.hosts.factory import open_host, parse_host_spec
from harness.hosts.ssh import SSHHost

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"
SFTP_SERVER = "/usr/lib/openssh/sftp-server"

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists(SSHD),
                                reason="needs root and openssh-server")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _keygen(path: Path, comment: str) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
                   check=True, timeout=30)


class Sshd:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.port = _free_port()
        self.host_key = tmp / "ssh_host_ed25519_key"
        self.client_key = tmp / "id_ed25519"
        _keygen(self.host_key, "migstall-test-host")
        _keygen(self.client_key, "migstall-test-client")
        (tmp / "authorized_keys").write_text((tmp / "id_ed25519.pub").read_text())
        self.known_hosts = tmp / "known_hosts"
        pub = (tmp / "ssh_host_ed25519_key.pub").read_text().split()
        self.known_hosts.write_text(f"[127.0.0.1]:{self.port} {pub[0]} {pub[1]}\n")
        self.config = tmp / "sshd_config"
        self.config.write_text("\n".join([
            f"ListenAddress 127.0.0.1:{self.port}",
            f"HostKey {self.host_key}",
            f"AuthorizedKeysFile {tmp}/authorized_keys",
            f"PidFile {tmp}/sshd.pid",
            "PermitRootLogin prohibit-password",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "UsePAM no",
            "StrictModes no",
            "UseDNS no",
            "AllowStreamLocalForwarding yes",
            f"Subsystem sftp {SFTP_SERVER}",
            "",
        ]))
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)   # privilege separation dir
        self.log = tmp / "sshd.log"
        self.proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(self.config)],
                                     stdout=subprocess.DEVNULL, stderr=open(self.log, "wb"))
        # readiness event: sshd writes its PidFile once the listening socket is bound
        deadline = time.monotonic() + 20
        while not (tmp / "sshd.pid").exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"sshd did not start: {self.log.read_text()}")
            time.sleep(0.02)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def host(self, **kw) -> SSHHost:
        return SSHHost("127.0.0.1", port=self.port, key_file=str(self.client_key),
                       known_hosts=str(self.known_hosts), **kw)


@pytest.fixture(scope="module")
def sshd():
    tmp = Path(tempfile.mkdtemp(prefix="migstall-sshd-"))
    server = None
    try:
        server = Sshd(tmp)
        yield server
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def test_run_argv_quoting_env_and_status(sshd):
    with sshd.host() as host:
        res = host.run(["printf", "%s|", "a b", "$HOME", "'q'", ";rm -rf /"])
        assert res.text == "a b|$HOME|'q'|;rm -rf /|"
        assert host.run(["sh", "-c", 'echo "$X"'], env={"X": "y z"}).text == "y z\n"
        assert host.run(["cat"], input=b"\x00\x01data").stdout == b"\x00\x01data"
        res = host.run(["sh", "-c", "echo oops >&2; exit 3"], check=False)
        assert res.returncode == 3 and res.stderr == b"oops\n"
        with pytest.raises(HostError, match="exited 3"):
            host.run(["sh", "-c", "exit 3"])
        t0 = time.monotonic()
        with pytest.raises(CommandTimeout):
            host.run(["sleep", "30.101"], timeout=1)
        assert time.monotonic() - t0 < 10
        assert _gone("30.101")



def _pids_with(marker: str) -> list:
    """Processes on this machine (the test sshd's too) whose command line holds ``marker``."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as fh:
                    cmdline = fh.read()
            except OSError:
                continue
            if marker.encode() in cmdline.split(b"\0"):
                found.append(int(entry))
    return found


def _gone(marker: str, timeout: float = 5.0) -> bool:
    """True when every process with ``marker`` has exited within ``timeout`` (a
    pidfd becomes readable when its process exits; SIGKILL is not instant).
    Survivors are killed here, so a failing test still leaves nothing behind."""
    deadline = time.monotonic() + timeout
    survivors = []
    for pid in _pids_with(marker):
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            continue
        try:
            readable, _, _ = select.select([fd], [], [], max(deadline - time.monotonic(), 0))
            if not readable:
                survivors.append(pid)
                os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        finally:
            os.close(fd)
    return not survivors


def _raw_exec(host: SSHHost, argv: list) -> tuple:
    """What plain paramiko exec (the old SSHHost.run) reports: (exit status, stdout)."""
    chan = host._transport().open_session(timeout=10)
    try:
        chan.settimeout(10)
        chan.exec_command(shlex.join(argv))
        chan.shutdown_write()
        out = b""
        while True:
            data = chan.recv(65536)
            if not data:
                break
            out += data
        assert chan.status_event.wait(10)
        return chan.recv_exit_status(), out
    finally:
        chan.close()


def test_run_timeout_kills_the_remote_process_group(sshd):
    with sshd.host() as host:
        with pytest.raises(CommandTimeout):
            host.run(["sleep", "30.123"], timeout=1)
        assert _gone("30.123")
        # children in the command's process group go too (the trailing `:` keeps sh as their parent)
        with pytest.raises(CommandTimeout):
            host.run(["sh", "-c", "sleep 30.124 & sleep 30.125; :"], timeout=1)
        assert _gone("30.124") and _gone("30.125")
        assert host.run(["true"]).returncode == 0       # the connection is still usable


def test_run_interrupted_kills_the_remote_process(sshd, monkeypatch):
    real_select = select.select
    start = time.monotonic()

    def interrupting_select(*args, **kw):
        if time.monotonic() - start > 0.5:
            raise KeyboardInterrupt
        return real_select(*args, **kw)

    with sshd.host() as host:
        monkeypatch.setattr(ssh_mod, "select", type("S", (), {"select": staticmethod(interrupting_select)}))
        start = time.monotonic()
        with pytest.raises(KeyboardInterrupt):
            host.run(["sleep", "30.126"], timeout=20)
        monkeypatch.undo()
        assert _gone("30.126")


def test_run_exit_codes_and_output_unchanged(sshd):
    cases = [
        ["printf", "a\\000b\\377\\r\\nend"],          # binary stdout, no trailing newline
        ["sh", "-c", "printf out; printf err >&2; exit 3"],
        ["sh", "-c", "exit 255"],
        ["sh", "-c", "kill -TERM $$"],                  # killed by a signal
        ["sh", "-c", "sleep 0.2 & echo started"],       # a child outliving the command
        ["no-such-command-migstall"],
    ]
    with sshd.host() as host:
        for argv in cases:
            res = host.run(argv, check=False)
            assert (res.returncode, res.stdout) == _raw_exec(host, argv), argv
            assert b"migstall-pid" not in res.stderr, argv
        res = host.run(["sh", "-c", "printf out; printf err >&2; exit 3"], check=False)
        assert (res.returncode, res.stdout, res.stderr) == (3, b"out", b"err")
        assert host.run(["printf", "\\000\\001"]).stdout == b"\x00\x01"
        assert _gone("0.2")


def test_run_stdin(sshd):
    with sshd.host() as host:
        assert host.run(["cat"], input=b"\x00\x01data").stdout == b"\x00\x01data"
        assert host.run(["cat"], input=b"").stdout == b""
        assert host.run(["cat"]).stdout == b""                  # stdin closed, no input
        big = os.urandom(6 << 20)                               # more than paramiko's 2 MiB windows
        assert host.run(["cat"], input=big, timeout=60).stdout == big
        assert host.run(["wc", "-c"], input=big, timeout=60).text.split() == [str(len(big))]
        # a command that exits without reading its input
        assert host.run(["true"], input=big, timeout=60).returncode == 0


def test_exec_request_without_answer_times_out(sshd, monkeypatch):
    def unanswered(self, command):
        # the request is never sent: paramiko's bare wait for the answer only ends on close
        self._event_pending()
        self._wait_for_event()

    with sshd.host() as host:
        monkeypatch.setattr(paramiko.Channel, "exec_command", unanswered)
        t0 = time.monotonic()
        with pytest.raises(CommandTimeout, match="exec request"):
            host.run(["true"], timeout=1)
        assert time.monotonic() - t0 < 5
        monkeypatch.setattr(ssh_mod, "DEFAULT_EXEC_REPLY_TIMEOUT", 0.5)
        t0 = time.monotonic()
        with pytest.raises(CommandTimeout, match="within 0.5s"):
            host.run(["true"], timeout=60)
        assert time.monotonic() - t0 < 5
        monkeypatch.undo()
        assert host.run(["echo", "ok"]).text == "ok\n"
        assert not [t for t in threading.enumerate() if t.name == "ssh-exec"]


def test_files_stage_fetch_runtime_dir(sshd, tmp_path):
    with sshd.host() as host:
        with host.runtime_dir() as rdir:
            assert oct(os.stat(rdir).st_mode & 0o777) == "0o700"
            assert "migstall-" in rdir
            host.write_bytes(f"{rdir}/f", b"hello", mode=0o600)
            assert host.read_bytes(f"{rdir}/f") == b"hello"
            assert host.exists(f"{rdir}/f") and not host.exists(f"{rdir}/nope")
            host.fetch(f"{rdir}/f", tmp_path / "back")
            assert (tmp_path / "back").read_bytes() == b"hello"
        assert not os.path.exists(rdir)
        src = tmp_path / "blob.bin"
        src.write_bytes(os.urandom(300_000))
        staged = host.stage(src)
        assert Path(staged).read_bytes() == src.read_bytes()
        mtime = os.stat(staged).st_mtime_ns
        assert host.stage(src) == staged            # cached by content: not copied again
        assert os.stat(staged).st_mtime_ns == mtime
        src.write_bytes(b"changed")
        assert host.stage(src) != staged


def test_connect_unix_forwarding(sshd, tmp_path):
    path = str(tmp_path / "echo.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(1)

    def serve():
        conn, _ = server.accept()
        with conn:
            while True:
                data = conn.recv(65536)
                if not data:
                    break
                conn.sendall(data.upper())

    th = threading.Thread(target=serve, daemon=True)
    th.start()
    try:
        with sshd.host() as host:
            sock = host.connect_unix(path)
            assert isinstance(sock, socket.socket)
            sock.settimeout(10)
            payload = b"qmp-" * 50_000
            sock.sendall(payload)
            got = b""
            while len(got) < len(payload):
                got += sock.recv(65536)
            assert got == payload.upper()
            sock.close()
            with pytest.raises(HostError):
                host.connect_unix(str(tmp_path / "missing.sock"))
    finally:
        server.close()
        th.join(5)


def _fake_qmp(path: str, clients: int) -> Tuple[threading.Thread, List[threading.Thread]]:
    """A unix-socket QMP server for ``clients`` connections: the greeting, then the
    answer to every command (``query-status``: paused), after a STOP event once
    capabilities are negotiated.
    Returns the accepting thread and the list it fills with one thread per connection."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(clients)

    def serve(conn: socket.socket) -> None:
        decoder, buf = json.JSONDecoder(), ""
        with conn:
            conn.sendall(b'{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": ""}, '
                         b'"capabilities": []}}\n')
            while True:
                data = conn.recv(65536)
                if not data:               # the client's end closed: the forward's channel closed
                    return
                buf += data.decode()
                while buf.strip():        # qemu.qmp ends a command with no newline: split by JSON value
                    try:
                        cmd, end = decoder.raw_decode(buf.lstrip())
                    except ValueError:
                        break
                    buf = buf.lstrip()[end:]
                    ret = {"status": "paused", "running": False} if cmd["execute"] == "query-status" else {}
                    out = b""
                    if cmd["execute"] != "qmp_capabilities":
                        out += b'{"event": "STOP", "timestamp": {"seconds": 1, "microseconds": 0}}\n'
                    conn.sendall(out + json.dumps({"return": ret, "id": cmd.get("id")}).encode() + b"\n")

    def accept() -> None:
        with server:
            for _ in range(clients):
                conn, _ = server.accept()
                th = threading.Thread(target=serve, args=(conn,), daemon=True)
                th.start()
                threads.append(th)

    threads: List[threading.Thread] = []
    acceptor = threading.Thread(target=accept, daemon=True)
    acceptor.start()
    return acceptor, threads


def test_qmp_over_streamlocal_forwards(sshd, tmp_path):
    """QMP over SSH as the runner uses it (qemu.qmp on :meth:`SSHHost.connect_unix`):
    the ``direct-streamlocal@openssh.com`` channel that ``_streamlocal_channel``
    opens through paramiko's private members, against the real OpenSSH sshd.  Two
    forwards at once on one connection, a refused one between them, and closing a
    forward's socket ends the remote connection."""
    path = str(tmp_path / "qmp.sock")
    acceptor, served = _fake_qmp(path, clients=2)

    async def session(sock: socket.socket) -> None:
        client = QMPClient("migstall-test")
        listener = EventListener()
        client.register_listener(listener)
        await asyncio.wait_for(client.connect(sock), 10)
        try:
            assert await asyncio.wait_for(client.execute("query-status"), 10) == {"status": "paused",
                                                                                  "running": False}
            event = await asyncio.wait_for(listener.get(), 10)
            assert event["event"] == "STOP"
        finally:
            await client.disconnect()

    with sshd.host() as host:
        first = host.connect_unix(path)
        with pytest.raises(HostError, match="missing.sock"):
            host.connect_unix(str(tmp_path / "missing.sock"))
        second = host.connect_unix(path)        # the connection still forwards after a refusal
        assert host.run(["echo", "ok"]).text == "ok\n"

        async def both() -> None:
            await asyncio.gather(session(first), session(second))

        asyncio.run(both())
    acceptor.join(10)
    assert not acceptor.is_alive() and len(served) == 2
    for th in served:
        th.join(10)                              # the forwards closed: the server saw end of file on both
        assert not th.is_alive()


def _fake_probe(path: str) -> threading.Thread:
    """A unix-socket server that speaks the probe's mark protocol once."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(1)

    def serve():
        conn, _ = server.accept()
        with conn, server, conn.makefile("rwb") as fh:
            for line in fh:
                word, mid, host_ns = line.split()
                fh.write(b'{"ev":"mark","id":%s,"host_ns":%s,"guest_ns":7}\n' % (mid, host_ns))
                fh.write(b'{"ev":"stalls","stalls":"' + b"x" * 100_000 + b'"}\n')
                fh.flush()

    th = threading.Thread(target=serve, daemon=True)
    th.start()
    return th


@pytest.mark.parametrize("kind", ["local", "ssh"])
def test_mark_relay_stamps_on_the_qemu_host(sshd, tmp_path, kind):
    """The probe channel through the mark relay (Host.open_stream): marks are
    stamped by the relay, other lines pass untouched, and closing the channel
    ends the relay process."""
    import asyncio

    from harness.guest.channel import ProbeChannel
    from harness.hosts.local import LocalHost

    path = str(tmp_path / "probe.sock")
    th = _fake_probe(path)

    async def go(host):
        chan = await ProbeChannel.open_on(host, path)
        try:
            assert chan.relay["clock"] == "realtime"
            mark = await chan.mark(10)
            assert mark.harness_send_ns <= mark.host_send_ns <= mark.host_recv_ns <= mark.harness_recv_ns
            line = await chan._reader.readline()
            assert len(line) > 100_000 and line.endswith(b'"}\n')
            return chan.relay["pid"]
        finally:
            await chan.close()

    with (LocalHost() if kind == "local" else sshd.host()) as host:
        pid = asyncio.run(go(host))
        assert LocalHost().wait_pid_exit(pid, 10), "the relay outlived its channel"
    th.join(5)
    with pytest.raises(HostError, match="did not connect"):
        with LocalHost() as host:
            asyncio.run(ProbeChannel.open_on(host, str(tmp_path / "missing.sock")))


def test_processes_and_clock(sshd):
    with sshd.host() as host:
        proc = subprocess.Popen(["sleep", "60"])
        try:
            assert host.pid_alive(proc.pid)
            assert not host.wait_pid_exit(proc.pid, 0.3)
            host.signal(proc.pid, signal.SIGTERM)
            proc.wait(10)     # reap it, as its parent
            assert host.wait_pid_exit(proc.pid, 10)
            assert not host.pid_alive(proc.pid)
        finally:
            proc.kill()
            proc.wait()
        assert abs(host.clock_offset_s()) < 0.5   # same machine


def test_reconnect(sshd):
    with sshd.host() as host:
        host.reconnect(timeout=30)
        assert host.run(["true"]).returncode == 0


def test_host_key_mismatch_refused(sshd, tmp_path):
    other = tmp_path / "other_key"
    _keygen(other, "impostor")
    bad = tmp_path / "known_hosts"
    pub = (tmp_path / "other_key.pub").read_text().split()
    bad.write_text(f"[127.0.0.1]:{sshd.port} {pub[0]} {pub[1]}\n")
    with pytest.raises(HostKeyMismatch) as err:
        SSHHost("127.0.0.1", port=sshd.port, key_file=str(sshd.client_key), known_hosts=str(bad))
    msg = err.value.one_line()
    assert str(bad) in msg and "ssh-keygen -R" in msg and err.value.exit_code == 2
    empty = tmp_path / "empty_known_hosts"
    empty.write_text("")
    with pytest.raises(HostKeyMismatch, match="no key"):
        SSHHost("127.0.0.1", port=sshd.port, key_file=str(sshd.client_key), known_hosts=str(empty))


def test_factory_ssh_spec(sshd, monkeypatch):
    monkeypatch.setenv("MIGSTALL_SSH_KEY", str(sshd.client_key))
    monkeypatch.setenv("MIGSTALL_SSH_KNOWN_HOSTS", str(sshd.known_hosts))
    parse_host_spec(f"ssh://root@127.0.0.1:{sshd.port}")
    with open_host(f"ssh://root@127.0.0.1:{sshd.port}") as host:
        assert host.run(["id", "-u"]).text.strip() == "0"
        assert host.name == f"ssh://root@127.0.0.1:{sshd.port}"
