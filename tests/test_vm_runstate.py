"""A VM's run state (no QEMU started): launching twice, or a QMP command to a
VM that is not running, is an error with a clear name; the foreground and
QMP-less modes build their command lines in the one place.

A fake host stands in for QEMU: "launching" starts ``sleep`` in its own
session and writes its pid to the pidfile, as ``qemu -daemonize`` would.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
from pathlib import Path
from typing import List, Mapping, Optional, Sequence

import pytest

from harness import ctools
from harness.errors import QEMUError, QEMUNotRunningError, QEMUStateError, QMPDisconnectedError
from harness.hosts.base import CommandResult
from harness.hosts.local import LocalHost
from harness.qemu.machine import VM, RunState, SyncVM


class FakeQEMUHost(LocalHost):
    """Runs every QEMU command line as ``sleep`` (daemonized: pidfile written),
    or, in the foreground, answers with ``status``."""

    def __init__(self, status: int = 0, stdout: bytes = b"") -> None:
        self.status, self.stdout = status, stdout
        self.started: List["subprocess.Popen[bytes]"] = []
        self.argvs: List[List[str]] = []

    def run(self, argv: Sequence[str], *, timeout: float = 60.0, input: Optional[bytes] = None,
            check: bool = True, env: Optional[Mapping[str, str]] = None) -> CommandResult:
        argv = [str(a) for a in argv]
        if "fake-qemu" not in argv:
            return super().run(argv, timeout=timeout, input=input, check=check, env=env)
        self.argvs.append(argv)
        if "-daemonize" in argv:
            proc = subprocess.Popen(["sleep", "60"], start_new_session=True)
            self.started.append(proc)
            Path(argv[argv.index("-pidfile") + 1]).write_text(f"{proc.pid}\n")
            return CommandResult(tuple(argv), 0, b"", b"")
        return CommandResult(tuple(argv), self.status, self.stdout, b"2026-01-01T00:00:00.000000Z qemu: oops\n")

    def cleanup(self) -> None:
        for proc in self.started:
            if proc.poll() is None:
                proc.kill()
            proc.wait()


@pytest.fixture
def host(monkeypatch):
    monkeypatch.setattr(ctools, "reaper", lambda: Path("/bin/true"))   # no C compiler needed
    fake = FakeQEMUHost()
    yield fake
    fake.cleanup()


def vm_on(host: FakeQEMUHost, tmp_path: Path, **kw) -> VM:
    return VM(host, "t", ["-m", "16"], qemu="fake-qemu", runtime_dir=str(tmp_path), with_qmp=False,
              exit_status_timeout=0.1, **kw)


def test_a_new_vm_is_idle_and_takes_no_command(tmp_path):
    vm = VM(LocalHost(), "t", [], runtime_dir=str(tmp_path))
    assert vm.runstate is RunState.IDLE
    with pytest.raises(QEMUNotRunningError, match="QMP is not connected .*idle") as info:
        asyncio.run(vm.cmd("query-status"))
    err = info.value
    # a not-running VM is also what callers already handle as a QEMU that went away
    assert isinstance(err, QMPDisconnectedError) and isinstance(err, QEMUStateError)
    assert (err.state, err.operation, err.command) == ("IDLE", "query-status", "query-status")


def test_launching_twice_is_an_error(host, tmp_path):
    async def scenario() -> None:
        vm = vm_on(host, tmp_path)
        await vm.launch()
        assert vm.runstate is RunState.RUNNING and vm.alive
        with pytest.raises(QEMUStateError, match="cannot launch a VM that is running") as info:
            await vm.launch()
        assert (info.value.state, info.value.operation) == ("RUNNING", "launch")
        with pytest.raises(QEMUStateError):
            async with vm:
                pass
        assert vm.alive, "a second launch must not stop the running VM"
        with pytest.raises(QEMUStateError, match="without QMP"):
            await vm.cmd("query-status")
        await vm.shutdown()
        assert vm.runstate is RunState.STOPPED and not vm.alive
        assert vm.exit_reason == "terminated"
        await vm.shutdown()                          # idempotent
        with pytest.raises(QEMUNotRunningError, match="stopped"):
            await vm.cmd("query-status")
        with pytest.raises(QEMUNotRunningError):
            await vm.wait_event("STOP", timeout=1)
        with pytest.raises(QEMUStateError, match="cannot launch a VM that is stopped"):
            await vm.launch()

    asyncio.run(scenario())
    assert len(host.argvs) == 1


def test_the_qmp_less_command_line(host, tmp_path):
    vm = vm_on(host, tmp_path, prefix=["wrapper"])
    SyncVM(vm).launch().shutdown()
    argv = host.argvs[0]
    # a QEMU on this machine is tied to us: the reaper stops it if we die
    assert argv[:6] == [str(Path("/bin/true").resolve()), "--lifeline", str(os.getpid()),
                        f"{tmp_path}/t.exit", "--", "wrapper"]
    assert argv[6:10] == ["fake-qemu", "-name", "migstall-t,debug-threads=on", "-daemonize"]
    assert "-D" in argv and "-mon" not in argv and argv[-2:] == ["-m", "16"]
    assert vm.command_line == " ".join(argv)


def test_sync_vm_detach_leaves_it_running(host, tmp_path):
    sync = SyncVM(vm_on(host, tmp_path)).launch()
    pid = sync.detach()
    assert pid is not None and sync.vm.runstate is RunState.STOPPED and LocalHost().pid_alive(pid)
    assert (tmp_path / "t.exit.detached").exists()   # the reaper's lifeline spares it
    sync.shutdown()                                  # STOPPED: nothing more to do
    assert LocalHost().pid_alive(pid)
    with pytest.raises(QEMUStateError):
        sync.launch()


def test_sync_vm_needs_a_vm_without_qmp(tmp_path):
    with pytest.raises(QEMUStateError):
        SyncVM(VM(LocalHost(), "t", [], runtime_dir=str(tmp_path)))


def test_a_launch_that_fails_ends_stopped(tmp_path, monkeypatch):
    monkeypatch.setattr(ctools, "reaper", lambda: Path("/bin/false"))   # as if QEMU exited 1
    vm = VM(LocalHost(), "t", [], qemu="/nonexistent/qemu", runtime_dir=str(tmp_path), with_qmp=False,
            exit_status_timeout=0.1)
    with pytest.raises(QEMUError, match="failed to start"):
        SyncVM(vm).launch()
    assert vm.runstate is RunState.STOPPED


@pytest.mark.parametrize("status", [99, 1])
def test_foreground_run(tmp_path, monkeypatch, status):
    host = FakeQEMUHost(status=status, stdout=b"console\n")
    vm = VM(host, "t", ["-m", "16"], qemu="fake-qemu", runtime_dir=str(tmp_path))
    res = vm.run(timeout=30)
    assert (res.status, res.timed_out, res.stdout, res.err_line) == (status, False, "console\n", "qemu: oops")
    assert vm.runstate is RunState.STOPPED and vm.exit_reason == "exited"
    argv = host.argvs[0]
    assert argv[:4] == ["timeout", "-s", "KILL", "30"]
    assert "-daemonize" not in argv and "-pidfile" not in argv and "-mon" not in argv and "-D" in argv
    with pytest.raises(QEMUStateError):
        vm.run(timeout=30)
