"""Exception hierarchy.

Every error migstall raises derives from :class:`MigstallError`.  Two branches
decide the exit code and what the user is told:

* :class:`UserError` (exit 2): bad input.  The message is one line naming the
  problem and the fix.  Raised before any process is started wherever possible.
* :class:`InfraError` (exit 1): something we started or depend on failed.  It
  carries the path of the log that explains it.

Subclasses keep their cause (``raise X(...) from exc``).

QMP failures keep their meaning: :class:`QMPCommandError` (QEMU answered with
an error; ``error_class`` such as ``CommandNotFound``) and
:class:`QMPDisconnectedError` (QEMU went away before it answered) are both
:class:`QEMUError`, so ``except QEMUError`` still catches them.
:class:`QEMUStateError` is a programming error in the use of a
:class:`~harness.qemu.machine.VM`: an operation its run state does not allow
(launching it twice); :class:`QEMUNotRunningError`, a QMP command to a VM that
is not running (never launched, shutting down or shut down), is also a
:class:`QMPDisconnectedError`.

:func:`best_effort` is for cleanup and diagnostics that must not raise: it logs
what failed instead of dropping it silently.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Iterator, Optional, Tuple, Type, Union


class MigstallError(Exception):
    """Root of all migstall errors."""

    exit_code = 1

    def one_line(self) -> str:
        return " ".join(str(self).split())


class UserError(MigstallError):
    """Bad input: the user can fix it.  Exit code 2."""

    exit_code = 2


class InfraError(MigstallError):
    """Infrastructure failure.  Exit code 1; ``log_path`` points at the evidence."""

    exit_code = 1

    def __init__(self, message: str, log_path: Optional[Union[str, Path]] = None):
        super().__init__(message)
        self.log_path = str(log_path) if log_path is not None else None

    def one_line(self) -> str:
        msg = super().one_line()
        if self.log_path and self.log_path not in msg:
            msg += f" (log: {self.log_path})"
        return msg


# --- infrastructure failures -------------------------------------------------

class HostError(InfraError):
    """A command or file operation on a host failed."""


class CommandTimeout(HostError):
    """A host command did not finish within its timeout."""


class SSHError(HostError):
    """SSH connection, authentication or channel failure."""


class QEMUError(InfraError):
    """QEMU failed to start, died, or a QMP command failed."""


class QMPCommandError(QEMUError):
    """QEMU answered a QMP command with an error.  ``error_class`` is QMP's
    class (``CommandNotFound``, ``GenericError``, ``DeviceNotFound``, ...),
    ``desc`` QEMU's own text.  QEMU is alive and still answering."""

    def __init__(self, message: str, log_path: Optional[Union[str, Path]] = None, *,
                 command: str, error_class: str, desc: str):
        super().__init__(message, log_path)
        self.command = command
        self.error_class = error_class
        self.desc = desc


class QMPDisconnectedError(QEMUError):
    """QMP is not connected, or the connection went away before QEMU answered
    (QEMU exited or is exiting).  Whether an interrupted command took effect is
    unknown.  ``command``: the command or event it was waiting for."""

    def __init__(self, message: str, log_path: Optional[Union[str, Path]] = None, *,
                 command: Optional[str] = None):
        super().__init__(message, log_path)
        self.command = command


class QEMUStateError(QEMUError):
    """An operation that a VM's run state does not allow, such as launching a
    VM that was already launched.  ``state``: the run state's name (``IDLE``,
    ``LAUNCHING``, ``RUNNING``, ``SHUTTING_DOWN``, ``STOPPED``); ``operation``:
    what was asked (``launch``, a QMP command, an event waited for)."""

    def __init__(self, message: str, log_path: Optional[Union[str, Path]] = None, *,
                 state: str, operation: str):
        super().__init__(message, log_path)
        self.state = state
        self.operation = operation


class QEMUNotRunningError(QEMUStateError, QMPDisconnectedError):
    """A QMP command (or an event wait) for a VM that is not running: never
    launched, still launching, shutting down or shut down.  Also a
    :class:`QMPDisconnectedError` (QMP is not connected), as it was before the
    run state existed; ``command`` is the ``operation``."""

    def __init__(self, message: str, log_path: Optional[Union[str, Path]] = None, *,
                 state: str, operation: str):
        super().__init__(message, log_path, state=state, operation=operation)
        self.command = operation


class GuestError(InfraError):
    """The guest or its probe misbehaved (no READY, bad protocol, ...)."""


class MigrationError(InfraError):
    """Migration failed or did not progress in time."""


class MeasurementError(InfraError):
    """A run's figures cannot be trusted: trace lines that do not match the
    migration they belong to, a broken invariant between columns, clocks that
    contradict the order of events.  The row is failed with the reason."""


class KernelBuildInfraError(InfraError):
    """The build machinery itself failed (not the user's series or config)."""


# --- user errors with a specific meaning --------------------------------------

class HostKeyMismatch(UserError):
    """An SSH host key does not match the pinned known_hosts entry."""


class KVMUnusable(UserError):
    """KVM was requested but is not usable on this host."""


# --- best effort ----------------------------------------------------------------

@contextlib.contextmanager
def best_effort(what: str, logger: logging.Logger, *, level: int = logging.WARNING,
                catch: Tuple[Type[BaseException], ...] = (Exception,)) -> Iterator[None]:
    """Run the block; if it raises one of ``catch``, log ``"<what> failed:
    <exc>"`` at ``level`` (with the traceback when ``logger`` is at DEBUG) and
    carry on.  For cleanup and diagnostics that must never raise.

    ``catch`` is ``Exception`` by default, so KeyboardInterrupt, SystemExit and
    asyncio.CancelledError pass through.  ``level=logging.DEBUG`` is for a
    failure that is routine there (closing what is already closed)."""
    try:
        yield
    except catch as exc:
        logger.log(level, "%s failed: %s", what, str(exc) or type(exc).__name__,
                   exc_info=exc if logger.isEnabledFor(logging.DEBUG) else None)
