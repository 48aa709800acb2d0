"""Errors that keep their meaning (no QEMU started): VM.cmd maps qemu.qmp's
errors onto QMPCommandError / QMPDisconnectedError, callers tell a missing
command from a QEMU that went away, best_effort logs what it drops, and an
unreadable host kernel release is reported, not left silently empty."""

from __future__ import annotations

import asyncio
import logging
from types import SimpleNamespace
from typing import Any, Dict, List, Optional, Tuple

import pytest
from qemu.qmp import ExecInterruptedError, ExecuteError, Runstate, StateError
from qemu.qmp.message import Message
from qemu.qmp.models import ErrorResponse

from harness.errors import (HostError, MigstallError, QEMUError, QMPCommandError, QMPDisconnectedError,
                            best_effort)
from harness.hosts.local import LocalHost
from harness.qemu import schema
from harness.qemu.machine import VM, RunState


def execute_error(error_class: str, desc: str, command: str = "foo") -> ExecuteError:
    """What qemu.qmp raises when QEMU answers ``command`` with an error."""
    raw = {"error": {"class": error_class, "desc": desc}, "id": "__qmp#00001"}
    return ExecuteError(ErrorResponse(raw), Message({"execute": command}), Message(raw))


class FakeQMP:
    """Stands in for a connected QMPClient whose execute() raises ``exc``."""

    runstate = Runstate.RUNNING

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    async def execute(self, command: str, args: Optional[Dict[str, Any]] = None) -> Any:
        raise self.exc


def cmd_error(exc: BaseException, command: str = "foo") -> QEMUError:
    vm = VM(LocalHost(), "t", [], runtime_dir="/nonexistent")   # log_path needs one; nothing is started
    vm.qmp = FakeQMP(exc)  # type: ignore[assignment]
    vm._state = RunState.RUNNING   # as if launched
    with pytest.raises(QEMUError) as info:
        asyncio.run(vm.cmd(command))
    return info.value


def test_execute_error_keeps_its_class():
    exc = execute_error("CommandNotFound", "The command foo has not been found")
    err = cmd_error(exc)
    assert isinstance(err, QMPCommandError) and isinstance(err, MigstallError)
    assert (err.command, err.error_class, err.desc) == ("foo", "CommandNotFound",
                                                        "The command foo has not been found")
    assert err.__cause__ is exc
    # the message is the one VM.cmd always gave
    assert str(err) == ("QEMU t: QMP foo failed: The command foo has not been found; "
                        "its process had not exited yet")


@pytest.mark.parametrize("exc", [ExecInterruptedError("Disconnected"),
                                 StateError("QMPClient is disconnecting.", Runstate.DISCONNECTING,
                                            Runstate.RUNNING),
                                 EOFError()])
def test_a_qemu_that_went_away_is_a_disconnect(exc):
    err = cmd_error(exc)
    assert isinstance(err, QMPDisconnectedError) and not isinstance(err, QMPCommandError)
    assert err.command == "foo" and err.__cause__ is exc


def test_not_connected_is_a_disconnect():
    vm = VM(LocalHost(), "t", [], runtime_dir="/nonexistent")
    with pytest.raises(QMPDisconnectedError, match="QMP is not connected"):
        asyncio.run(vm.cmd("query-status"))


def test_other_failures_stay_plain_qemu_errors():
    err = cmd_error(ValueError("bad"))
    assert type(err) is QEMUError


class FakeVM:
    """schema.probe's view of a VM: trace-event-get-state raises ``trace_exc``
    (or answers, when None)."""

    def __init__(self, trace_exc: Optional[Exception]) -> None:
        self.trace_exc = trace_exc
        self.asked: List[str] = []

    async def cmd(self, command: str, args: Optional[Dict[str, Any]] = None) -> Any:
        if command == "query-version":
            return {"qemu": {"major": 7, "minor": 2, "micro": 0}, "package": ""}
        if command == "query-qmp-schema":
            return [{"name": "MIGRATION", "meta-type": "event"}]
        assert command == "trace-event-get-state" and args is not None
        self.asked.append(args["name"])
        if self.trace_exc is not None:
            raise self.trace_exc
        return [{"name": args["name"], "state": "disabled"}]


def qmp_error(error_class: str, desc: str) -> QMPCommandError:
    return QMPCommandError(f"QMP failed: {desc}", command="trace-event-get-state", error_class=error_class,
                           desc=desc)


def test_probe_without_the_trace_command_asks_once():
    vm = FakeVM(qmp_error("CommandNotFound", "The command trace-event-get-state has not been found"))
    info = asyncio.run(schema.probe(vm, ["a", "b", "c"]))
    assert info.trace_events == {} and vm.asked == ["a"] and info.version == "7.2.0"


def test_probe_without_an_event_goes_on():
    vm = FakeVM(qmp_error("GenericError", 'unknown event "a"'))
    info = asyncio.run(schema.probe(vm, ["a", "b"]))
    assert info.trace_events == {} and vm.asked == ["a", "b"]


def test_probe_answers():
    info = asyncio.run(schema.probe(FakeVM(None), ["a"]))
    assert info.trace_events == {"a": False} and info.has_trace("a")


@pytest.mark.parametrize("exc", [QMPDisconnectedError("QEMU t: QMP trace-event-get-state failed: Disconnected"),
                                 QEMUError("QEMU t: QMP trace-event-get-state timed out after 10s")])
def test_probe_does_not_take_a_dead_qemu_for_a_missing_event(exc):
    with pytest.raises(QEMUError) as info:
        asyncio.run(schema.probe(FakeVM(exc), ["a", "b"]))
    assert info.value is exc


# -- best_effort -------------------------------------------------------------------------

LOG = logging.getLogger("migstall-test-best-effort")


def test_best_effort_logs_what_failed(caplog):
    caplog.set_level(logging.WARNING, logger=LOG.name)
    with best_effort("removing /tmp/x on local", LOG):
        raise HostError("rm exited 1: permission denied")
    (rec,) = caplog.records
    assert rec.levelno == logging.WARNING and rec.exc_info is None
    assert rec.getMessage() == "removing /tmp/x on local failed: rm exited 1: permission denied"


def test_best_effort_names_an_exception_without_text(caplog):
    caplog.set_level(logging.DEBUG, logger=LOG.name)
    with best_effort("QMP disconnect", LOG, level=logging.DEBUG):
        raise EOFError()
    (rec,) = caplog.records
    assert rec.levelno == logging.DEBUG and rec.getMessage() == "QMP disconnect failed: EOFError"
    assert rec.exc_info is not None and rec.exc_info[0] is EOFError     # the traceback at DEBUG


def test_best_effort_quiet_when_nothing_fails(caplog):
    caplog.set_level(logging.DEBUG, logger=LOG.name)
    with best_effort("nothing", LOG):
        pass
    assert caplog.records == []


@pytest.mark.parametrize("exc", [KeyboardInterrupt, SystemExit, asyncio.CancelledError])
def test_best_effort_lets_interrupts_through(exc):
    with pytest.raises(exc):
        with best_effort("x", LOG):
            raise exc()


def test_best_effort_can_take_everything_where_asked(caplog):
    caplog.set_level(logging.DEBUG, logger=LOG.name)
    with best_effort("awaiting a cancelled task", LOG, level=logging.DEBUG, catch=(BaseException,)):
        raise asyncio.CancelledError()
    assert [r.getMessage() for r in caplog.records] == ["awaiting a cancelled task failed: CancelledError"]


def test_best_effort_in_a_coroutine(caplog):
    caplog.set_level(logging.WARNING, logger=LOG.name)

    async def fails() -> None:
        await asyncio.sleep(0)
        raise OSError("gone")

    async def main() -> str:
        with best_effort("cleanup", LOG):
            await fails()
        return "went on"

    assert asyncio.run(main()) == "went on"
    assert [r.getMessage() for r in caplog.records] == ["cleanup failed: gone"]


# -- host_kernel -------------------------------------------------------------------------

def host_kernel_run(run: Any) -> Tuple[Optional[str], Optional[str]]:
    from harness.runner import read_host_kernel

    return read_host_kernel(SimpleNamespace(run=run), "r1")  # type: ignore[arg-type]


def test_host_kernel_read():
    assert host_kernel_run(lambda argv, timeout: SimpleNamespace(text="6.1.0-28-amd64\n")) == ("6.1.0-28-amd64", None)


def test_host_kernel_failure_is_logged_and_recorded(caplog):
    def run(argv, timeout):
        raise HostError("uname -r on far exited 127: uname: not found")

    caplog.set_level(logging.WARNING, logger="harness.runner")
    # no column; the reason goes to the sidecar's host_kernel_error
    assert host_kernel_run(run) == (None, "uname -r failed: uname -r on far exited 127: uname: not found")
    assert any("host_kernel left empty" in r.getMessage() for r in caplog.records)


def test_host_kernel_empty_is_recorded():
    assert host_kernel_run(lambda argv, timeout: SimpleNamespace(text="\n")) == ("", "uname -r printed nothing")
