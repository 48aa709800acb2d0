"""One QEMU process on a :class:`~harness.hosts.base.Host`, driven over QMP:
the launcher of every QEMU migstall starts (guests, the virtual host's L1, the
KVM boot check, a built kernel's boot check).

API (stable; other modules and commands build on it)::

    async with VM(host, "src", args, qemu="qemu-system-x86_64",
                  runtime_dir=rd, env={"LD_PRELOAD": ...},
                  log_dir=Path("results/x.sidecars/logs")) as vm:
        await vm.cmd("query-status")                 # -> dict, timeout qmp_timeout
        ev = await vm.wait_event("MIGRATION", timeout=30,
                                 match=lambda e: e["data"]["status"] == "completed")
        vm.pid, vm.command_line, vm.log_path, vm.events, vm.path("probe.sock")
        await vm.shutdown()                          # optional; __aexit__ does it
    if vm.exit_reason == "died":                     # after shutdown
        vm.death_note("the source QEMU")             # "... was killed by signal 9 (SIGKILL); its log ends: ..."
        vm.exit_info()                               # the same, as a dict for the sidecar

    # without QMP: the virtual host's L1, from synchronous code (SyncVM)
    l1 = SyncVM(VM(LocalHost(), "l1", args, runtime_dir=workdir, with_qmp=False)).launch()
    l1.shutdown()                                    # SIGTERM, grace, SIGKILL; or l1.detach()
    # in the foreground, without QMP, for a QEMU that ends by itself (the boot checks)
    res = VM(host, "doctor", args, qemu=qemu).run(timeout)   # -> RunResult(status, timed_out, stdout, ...)

Run state (:class:`RunState`, after qemu.qmp's ``Runstate``): IDLE ->
LAUNCHING -> RUNNING -> SHUTTING_DOWN -> STOPPED, forward only.  Launching a
VM twice raises QEMUStateError (and leaves the running one alone); a QMP
command to a VM that is not RUNNING raises QEMUNotRunningError (a
QMPDisconnectedError too); both from :mod:`harness.errors`.

Phases (as in QEMU's own QEMUMachine): ``launch`` (create/choose the runtime
dir, start ``qemu -daemonize``: it returns once QEMU is initialised and its
sockets exist, no polling), ``post-launch`` (read the pidfile, connect QMP
through :meth:`Host.connect_unix`, start collecting events), ``shutdown``
(QMP ``quit``, wait for the process to exit, then :meth:`Host.stop_pid`:
SIGTERM, grace, SIGKILL) and ``post-shutdown`` (copy the VM's ``-D`` log from
the host to ``log_dir``, remove the runtime dir).  Cleanup runs in ``finally``;
a VM that fails to launch leaves no process behind.

Every QEMU gets ``-name migstall-<name>,debug-threads=on``, ``-daemonize
-pidfile``, ``-D <log> -msg timestamp=on``, ``-display none`` and QMP on
``<runtime dir>/qmp.sock`` (:meth:`VM._build_argv`, the one place that builds
them; no QMP with ``with_qmp=False``; in the foreground, :meth:`VM.run`,
neither ``-daemonize`` nor QMP, and ``timeout -s KILL`` instead of the
reaper).  The full command line (shlex-joined, with the environment prefix)
is logged and written at the top of the copied log, so it can be re-run by
hand.

Why a QEMU ended: nobody can waitpid() a daemonized QEMU, so every QEMU runs
under ``migstall-reaper <runtime dir>/<name>.exit -- [prefix] qemu ...``
(``guests/reaper/reaper.c``, staged to the host; it goes before ``prefix``,
e.g. the THP wrapper).  The reaper is QEMU's subreaper: it reaps it at once
and writes ``pid N: exited 1`` or ``pid N: killed by signal 9 (SIGKILL)``
there.  A QEMU on this machine also gets ``--lifeline <harness pid>``: if the
harness is SIGKILLed or crashes, the reaper stops its QEMU (SIGTERM, then
SIGKILL after 5 s), unless :meth:`VM.detach` marked it to outlive us
(``<name>.exit.detached``).  At post-shutdown, before the runtime dir goes, a QEMU that has exited
gets :attr:`VM.exit_status` (waiting at most ``DEFAULT_EXIT_STATUS_TIMEOUT`` for
the file); one that died without being asked to quit (``exit_reason ==
"died"``) also gets :attr:`VM.log_tail` (the last non-trace lines of its ``-D``
log, where QEMU's error messages go once it has daemonized) and
:attr:`VM.kernel_log` (:meth:`Host.kernel_log_tail` since the host uptime read
at launch: OOM kills, segfaults, KVM warnings on an SSH or virtual host).
:meth:`VM.death_note` makes one line of them for an error message.

Timeouts (seconds, overridable per VM and per call):
``DEFAULT_QMP_TIMEOUT`` for each QMP command, ``DEFAULT_LAUNCH_TIMEOUT`` for
``qemu -daemonize`` to return, ``DEFAULT_QUIT_TIMEOUT`` for the process to exit
after ``quit``, ``DEFAULT_EXIT_STATUS_TIMEOUT`` for the reaper's status file
once QEMU has exited; a foreground :meth:`VM.run` takes its own (the caller's
documented bound: ``BOOT_CHECK_TIMEOUT_S``, the kernel check's ``BOOT_TIMEOUT``).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import itertools
import logging
import os
import re
import shlex
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Collection, Coroutine, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from qemu.qmp import ExecInterruptedError, ExecuteError, QMPClient, StateError
from qemu.qmp.events import EventListener
from qemu.qmp.protocol import Runstate

from harness import ctools
from harness.errors import (HostError, QEMUError, QEMUNotRunningError, QEMUStateError, QMPCommandError,
                            QMPDisconnectedError, best_effort)
from harness.hosts.base import QUICK_COMMAND_TIMEOUT_S, Host
from harness.hosts.kernel_log import strip_stamp

log = logging.getLogger(__name__)

#: seconds one QMP command may take
DEFAULT_QMP_TIMEOUT = 30.0
#: seconds ``qemu -daemonize`` may take to initialise and return
DEFAULT_LAUNCH_TIMEOUT = 60.0
#: seconds QEMU may take to exit after QMP ``quit``
DEFAULT_QUIT_TIMEOUT = 15.0
#: seconds to connect to the QMP socket and negotiate
DEFAULT_CONNECT_TIMEOUT = 15.0
#: seconds to wait for the reaper's status file once QEMU has exited: the reaper
#: writes it right after reaping QEMU, so this only covers a loaded host's scheduling
DEFAULT_EXIT_STATUS_TIMEOUT = 5.0
#: how often that wait looks for the file, seconds
EXIT_STATUS_POLL_S = 0.05
#: non-trace lines of the -D log kept in :attr:`VM.log_tail`
LOG_TAIL_LINES = 8
#: interesting host kernel log lines kept in :attr:`VM.kernel_log`
KERNEL_LOG_LINES = 20
#: lines of each quoted in the one-line :meth:`VM.death_note`
NOTE_LOG_LINES = 3
NOTE_KERNEL_LINES = 3
#: characters of one quoted line in the death note
NOTE_LINE_CHARS = 200

#: a foreground run (:meth:`VM.run`) that failed after this share of its timeout was killed by ``timeout``
#: (GNU timeout exits 137 then; busybox's and an SSH channel's codes differ)
RUN_KILLED_SHARE = 0.98

ArgsT = Union[Sequence[str], Callable[[str], Sequence[str]]]
EventT = Dict[str, Any]

_seq = itertools.count(1)


def event_time_ns(event: Mapping[str, Any]) -> int:
    """The QMP ``timestamp`` of an event (QEMU host wall clock) in ns."""
    ts = event.get("timestamp") or {}
    return int(ts.get("seconds", 0)) * 1_000_000_000 + int(ts.get("microseconds", 0)) * 1000


# -- why a QEMU ended ---------------------------------------------------------------------
_REAPER_LINE = re.compile(r"^pid (\d+): (.+)$")
#: a trace line of the log backend: ``12345@1795588999.697039:event_name ...``
_TRACE_LINE = re.compile(r"^\d+@\d+\.\d+:\w")
#: ``-msg timestamp=on`` prefix: ``2024-05-01T10:00:00.123456Z ``
_MSG_STAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?Z\s+")


def parse_exit_status(text: str) -> Tuple[Optional[int], str]:
    """The reaper's status file -> (pid, ``exited 1`` / ``killed by signal 9 (SIGKILL)``);
    (None, "") if empty."""
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    m = _REAPER_LINE.match(line)
    return (int(m.group(1)), m.group(2).strip()) if m else (None, line)


def log_tail(text: str, lines: int = LOG_TAIL_LINES) -> List[str]:
    """The last ``lines`` non-empty lines of a QEMU ``-D`` log that are not trace lines."""
    kept = [ln.rstrip() for ln in text.splitlines() if ln.strip() and not _TRACE_LINE.match(ln)]
    return kept[-lines:] if lines > 0 else []


def _clip(line: str) -> str:
    line = " ".join(line.split())
    return line if len(line) <= NOTE_LINE_CHARS else line[:NOTE_LINE_CHARS - 3] + "..."


#: what a QMP SHUTDOWN reason from the guest means, for a death note
_GUEST_SHUTDOWN = {
    "guest-reset": "the guest reset itself (a triple fault, or a guest panic with panic=-1)",
    "guest-shutdown": "the guest powered itself off",
    "guest-panic": "the guest reported a panic (pvpanic)",
}


def shutdown_note(event: Optional[Mapping[str, Any]]) -> str:
    """Words for a QMP ``SHUTDOWN`` event: ``"after QMP SHUTDOWN guest-reset: the
    guest reset itself (...)"``; "" for None."""
    if not event:
        return ""
    data = event.get("data") or {}
    reason = str(data.get("reason", "?"))
    meaning = _GUEST_SHUTDOWN.get(reason, "") if data.get("guest") else ""
    return f"after QMP SHUTDOWN {reason}" + (f": {meaning}" if meaning else "")


def format_death_note(what: str, status: str, log_lines: Sequence[str] = (),
                      kernel_lines: Sequence[str] = (), shutdown: Optional[Mapping[str, Any]] = None) -> str:
    """One line: how ``what`` ended (a reaper status), why if it was told to
    (a QMP ``SHUTDOWN`` event, ``shutdown``), the last lines of its log, the
    host kernel's last interesting lines (time stamps dropped)."""
    if status.startswith("exited "):
        head = f"{what} exited with status {status[len('exited '):]}"
    elif status.startswith("killed by "):
        head = f"{what} was {status}"
    elif status:
        head = f"{what} ended: {status}"
    else:
        head = f"{what} had exited unexpectedly (no exit status recorded)"
    why = shutdown_note(shutdown)
    parts = [head + (f" {why}" if why else "")]
    tail = [_clip(_MSG_STAMP.sub("", ln)) for ln in list(log_lines)[-NOTE_LOG_LINES:]]
    if tail:
        parts.append("its log ends: " + " | ".join(tail))
    kern = [_clip(strip_stamp(ln)) for ln in list(kernel_lines)[-NOTE_KERNEL_LINES:]]
    if kern:
        parts.append("host kernel: " + " | ".join(kern))
    return "; ".join(parts)


class RunState(enum.Enum):
    """Where a :class:`VM` is in its life, after qemu.qmp's ``Runstate`` (IDLE,
    CONNECTING, RUNNING, DISCONNECTING) with the process's ends added.  It only
    moves forward: a VM is launched once.

    IDLE -> LAUNCHING (:meth:`VM.launch`, :meth:`VM.run`) -> RUNNING (its pid
    known, QMP connected when it has QMP) -> SHUTTING_DOWN (:meth:`VM.shutdown`)
    -> STOPPED (the process stopped and cleaned up, or let go by
    :meth:`VM.detach`).  A failed launch goes to STOPPED too."""

    IDLE = "idle"
    LAUNCHING = "launching"
    RUNNING = "running"
    SHUTTING_DOWN = "shutting-down"
    STOPPED = "stopped"


@dataclass(frozen=True)
class RunResult:
    """How a foreground QEMU (:meth:`VM.run`) ended."""

    status: int           #: its exit status; 137 when ``timeout`` killed it
    timed_out: bool       #: it was still running at the timeout and was killed
    stdout: str           #: what it wrote on its standard output (``-serial stdio``)
    stderr: str           #: its standard error
    ms: float             #: how long it ran, milliseconds

    @property
    def err_line(self) -> str:
        """The last line of its standard error, without ``-msg timestamp=on``'s stamp."""
        lines = [ln for ln in self.stderr.strip().splitlines() if ln.strip()]
        return _MSG_STAMP.sub("", lines[-1]).strip() if lines else ""


class VM:
    """A QEMU process; an async context manager (see the module docstring).
    :attr:`runstate` is its :class:`RunState`."""

    def __init__(self, host: Host, name: str, args: ArgsT, *,
                 qemu: str = "qemu-system-x86_64",
                 prefix: Sequence[str] = (),
                 runtime_dir: Optional[str] = None,
                 env: Optional[Mapping[str, str]] = None,
                 log_dir: Optional[Path] = None,
                 collect: Sequence[str] = (),
                 with_qmp: bool = True,
                 qmp_timeout: float = DEFAULT_QMP_TIMEOUT,
                 launch_timeout: float = DEFAULT_LAUNCH_TIMEOUT,
                 quit_timeout: float = DEFAULT_QUIT_TIMEOUT,
                 exit_status_timeout: float = DEFAULT_EXIT_STATUS_TIMEOUT) -> None:
        """``args`` are the machine-specific QEMU arguments, or a function of
        the runtime dir returning them.  ``prefix`` goes before the QEMU
        binary (e.g. a THP-disabling exec wrapper), after the reaper.  ``env``
        is added to the environment of QEMU (e.g. ``LD_PRELOAD``).  ``collect``
        names more files in the runtime dir (e.g. the guest console log)
        copied to ``log_dir`` as ``<name>-<file>`` at post-shutdown;
        :attr:`collected` maps their host paths to the copies.
        ``with_qmp=False``: no QMP monitor of ours and no client (the virtual
        host's L1, which has its own monitor for ``migstall vhost status``);
        :meth:`shutdown` then stops QEMU with SIGTERM (QEMU exits cleanly),
        SIGKILL after the grace.  ``exit_status_timeout``: see
        ``DEFAULT_EXIT_STATUS_TIMEOUT``."""
        self.host = host
        self.name = name
        self.qemu = qemu
        self.with_qmp = with_qmp
        self._state = RunState.IDLE
        self.prefix = tuple(prefix)
        self._args = args
        self.env: Dict[str, str] = dict(env or {})
        self.log_dir = Path(log_dir) if log_dir else None
        self.collect = tuple(collect)
        self.collected: Dict[str, str] = {}
        self.qmp_timeout = qmp_timeout
        self.launch_timeout = launch_timeout
        self.quit_timeout = quit_timeout
        self.exit_status_timeout = exit_status_timeout
        self._given_rundir = runtime_dir
        self.runtime_dir: Optional[str] = runtime_dir
        self._stack = contextlib.ExitStack()
        self.pid: Optional[int] = None
        self.argv: List[str] = []
        self.qmp: Optional[QMPClient] = None
        self.events: List[EventT] = []          # every QMP event, in order
        self._waiters: "set[asyncio.Event]" = set()
        self._tasks: List[asyncio.Task] = []
        self._listener: Optional[EventListener] = None
        self._dead = False
        self.local_log: Optional[Path] = None   # the copied -D log, after shutdown
        self.log_text: str = ""                 # its content, after shutdown
        # "quit" | "terminated" (no QMP: SIGTERM) | "died" (exited on its own) | "killed" (no exit
        # after quit, or killed at a foreground run's timeout) | "exited" (a foreground run ended by
        # itself, or a QEMU ended after :meth:`expect_exit`)
        self.exit_reason: str = ""
        self.expected_exit: str = ""            # why it may exit on its own (:meth:`expect_exit`)
        # after shutdown (see the module docstring):
        self.exit_status: str = ""             # "exited 1" | "killed by signal 9 (SIGKILL)" | "" unknown
        self.exit_pid: Optional[int] = None     # the pid the reaper reported it for
        self.log_tail: List[str] = []           # when it died: last non-trace lines of the -D log
        self.kernel_log: List[str] = []         # when it died: the host's interesting kernel lines
        self.launch_uptime_s: Optional[float] = None   # host uptime just before launch

    # -- run state -------------------------------------------------------------------
    @property
    def runstate(self) -> RunState:
        return self._state

    def _require(self, allowed: Collection[RunState], operation: str) -> None:
        """QEMUStateError unless the run state is one of ``allowed``."""
        if self._state not in allowed:
            raise QEMUStateError(f"QEMU {self.name}: cannot {operation} a VM that is {self._state.value} "
                                 f"(a VM is launched once)", state=self._state.name, operation=operation)

    # -- paths --------------------------------------------------------------------
    def path(self, name: str) -> str:
        """A path inside this VM's runtime dir on the host."""
        if self.runtime_dir is None:
            raise QEMUError(f"VM {self.name}: no runtime dir before launch")
        return f"{self.runtime_dir}/{name}"

    @property
    def log_path(self) -> str:
        """The ``-D`` log on the host (``local_log`` is the copy after shutdown)."""
        return self.path(f"{self.name}.log")

    @property
    def exit_status_path(self) -> str:
        """Where the reaper writes how QEMU ended."""
        return self.path(f"{self.name}.exit")

    @property
    def command_line(self) -> str:
        envs = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(self.env.items()))
        cmd = shlex.join(self.argv)
        return f"env {envs} {cmd}" if envs else cmd

    # -- phases --------------------------------------------------------------------
    async def __aenter__(self) -> "VM":
        self._require((RunState.IDLE,), "launch")   # before the try: a running VM is not cleaned up
        try:
            await self.launch()
        except BaseException:
            if self.pid is not None and not self.exit_reason:
                with best_effort(f"VM {self.name}: checking whether pid {self.pid} is alive", log):
                    if not self.host.pid_alive(self.pid):
                        self.exit_reason = "died"   # it started, then exited during the launch
            await self._cleanup()
            raise
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.shutdown()

    def _build_argv(self, head: Sequence[str], *, daemonize: bool = True) -> List[str]:
        """The one place that builds a QEMU command line: ``head`` (the reaper,
        or a foreground run's ``timeout``), ``prefix``, QEMU with the common
        arguments, then the machine's."""
        if callable(self._args):
            assert self.runtime_dir is not None   # launch() made it
            args = self._args(self.runtime_dir)
        else:
            args = self._args
        daemon = ["-daemonize", "-pidfile", self.path(f"{self.name}.pid")] if daemonize else []
        qmp = (["-chardev", f"socket,id=qmp,path={self.path('qmp.sock')},server=on,wait=off",
                "-mon", "chardev=qmp,mode=control"] if self.with_qmp and daemonize else [])
        return [*head, *self.prefix, self.qemu,
                "-name", f"migstall-{self.name},debug-threads=on",
                *daemon,
                "-D", self.log_path, "-msg", "timestamp=on",
                *qmp,
                "-display", "none",
                *[str(a) for a in args]]

    def _make_runtime_dir(self) -> None:
        if self.runtime_dir is None:
            self.runtime_dir = self._stack.enter_context(self.host.runtime_dir(f"migstall-{self.name}-"))

    async def launch(self) -> None:
        """launch + post-launch; QEMUStateError unless the VM is IDLE."""
        self._require((RunState.IDLE,), "launch")
        self._state = RunState.LAUNCHING
        self._make_runtime_dir()
        reaper, self.launch_uptime_s = await asyncio.to_thread(self._prepare_host)
        self.argv = self._build_argv([reaper, *self._lifeline(), self.exit_status_path, "--"])
        log.info("VM %s: %s", self.name, self.command_line)
        fut = asyncio.ensure_future(asyncio.to_thread(self.host.run, self.argv, timeout=self.launch_timeout,
                                                      check=False, env=self.env or None))
        try:
            res = await asyncio.shield(fut)
        except asyncio.CancelledError:
            # interrupted while QEMU initialises: let it finish so its pid is known and it can be stopped;
            # whatever ends it (another cancel included), the cancel is re-raised below
            with best_effort(f"VM {self.name}: the launch, finishing after the cancel", log,
                             catch=(BaseException,)):
                await fut
            self._read_pid_quietly()
            raise
        except HostError as exc:
            self._read_pid_quietly()
            raise QEMUError(f"QEMU {self.name} did not start: {exc.one_line()}", self.log_path) from exc
        if res.returncode != 0:
            err = (res.stderr or res.stdout).decode(errors="replace").strip()
            self._read_pid_quietly()
            # once daemonizing, QEMU reports errors in its -D log, not on stderr
            detail = err.splitlines()[-1] if err else self._log_note() or "no output"
            raise QEMUError(f"QEMU {self.name} failed to start (exit {res.returncode}): {detail}", self.log_path)
        self._read_pid_quietly()
        if self.pid is None:
            raise QEMUError(f"QEMU {self.name} started but wrote no pidfile", self.log_path)
        log.info("VM %s: pid %d", self.name, self.pid)
        if self.with_qmp:
            await self._connect_qmp()
        self._state = RunState.RUNNING

    def _lifeline(self) -> List[str]:
        """``--lifeline <our pid>`` for a QEMU on this machine: if this process
        dies without stopping it (SIGKILL, a crash), the reaper stops QEMU
        (SIGTERM, SIGKILL 5 s later), so nothing the harness started outlives
        it.  A QEMU on another machine has no pid of ours to watch (an SSH
        host's QEMU is left to the next run's leftover check; the virtual
        host's L2 QEMUs go down with L1)."""
        from harness.hosts.local import LocalHost

        if not isinstance(self.host, LocalHost):
            return []
        # a runtime dir of the caller's may hold the mark of an earlier, detached QEMU
        Path(f"{self.exit_status_path}.detached").unlink(missing_ok=True)
        return ["--lifeline", str(os.getpid())]

    def run(self, timeout: float) -> RunResult:
        """The foreground mode, without QMP, for a QEMU that ends by itself (the
        KVM boot check, a kernel's boot check): start QEMU (not daemonized, so
        its exit status and ``-serial stdio`` are ours), wait for it to exit,
        and say how it ended.  The -D log is read into :attr:`log_text` (and
        copied to ``log_dir``), the runtime dir removed.

        It runs under ``timeout -s KILL <timeout>`` on the host, so a hang is
        bounded even if the connection to the host goes away, and under
        ``setpriv --pdeathsig KILL`` where the host has it (util-linux; not
        busybox, as in the virtual host's L1): if ``timeout`` itself is killed
        (Ctrl-C makes subprocess SIGKILL it), QEMU dies with it instead of
        hanging on unsupervised.  CommandTimeout if ``timeout`` itself does
        not come back within ``timeout`` + ``QUICK_COMMAND_TIMEOUT_S`` (the
        host stopped answering).  QEMUStateError unless the VM is IDLE."""
        self._require((RunState.IDLE,), "run")
        self._state = RunState.LAUNCHING
        try:
            self._make_runtime_dir()
            guard = ["setpriv", "--pdeathsig", "KILL"]
            probe = self.host.run([*guard, "true"], check=False, timeout=QUICK_COMMAND_TIMEOUT_S)
            if probe.returncode != 0:   # busybox setpriv has no --pdeathsig
                guard = []
            self.argv = self._build_argv(["timeout", "-s", "KILL", f"{timeout:g}", *guard], daemonize=False)
            log.info("VM %s: %s", self.name, self.command_line)
            self._state = RunState.RUNNING
            t0 = time.monotonic()
            res = self.host.run(self.argv, check=False, timeout=timeout + QUICK_COMMAND_TIMEOUT_S,
                                env=self.env or None)
            ms = (time.monotonic() - t0) * 1000
            timed_out = ms >= timeout * 1000 * RUN_KILLED_SHARE and res.returncode != 0
            self.exit_reason = "killed" if timed_out else "exited"
            self.exit_status = "killed by signal 9 (SIGKILL)" if timed_out else f"exited {res.returncode}"
            log.info("VM %s: %s after %.0f ms", self.name, self.exit_status, ms)
            return RunResult(status=137 if timed_out else res.returncode, timed_out=timed_out,
                             stdout=res.text, stderr=res.stderr.decode(errors="replace"), ms=ms)
        finally:
            self._state = RunState.SHUTTING_DOWN
            try:
                self._fetch_log()
            finally:
                self._close_stack()

    def detach(self) -> Optional[int]:
        """Let a running QEMU without QMP go on running when this process ends
        (``migstall vhost up``): the VM is STOPPED to us and nothing is
        stopped or removed.  Needs a runtime dir given by the caller (one of
        ours would be removed).  Returns the pid."""
        self._require((RunState.RUNNING,), "detach")
        if self.qmp is not None or self._given_rundir is None:
            raise QEMUStateError(f"QEMU {self.name}: only a VM without QMP, in a runtime dir of the caller's, "
                                 f"can be detached", state=self._state.name, operation="detach")
        # tell the reaper's lifeline that this QEMU is meant to outlive us
        self.host.write_bytes(f"{self.exit_status_path}.detached", b"")
        self._close_stack()
        log.info("VM %s: pid %s left running", self.name, self.pid)
        return self.pid

    def _prepare_host(self) -> Tuple[str, Optional[float]]:
        """The reaper staged on the host, and the host's uptime (the kernel log's clock)."""
        return self.host.stage(ctools.reaper()), self.host.uptime_s()

    def _log_note(self) -> str:
        """The last lines of the -D log on the host, one line (for a launch error); "" if none."""
        # QEMU creates its -D log only once it has something to write: no file is routine
        with best_effort(f"VM {self.name}: reading its -D log", log, level=logging.DEBUG):
            text = self.host.read_bytes(self.log_path).decode(errors="replace")
            return " | ".join(_clip(_MSG_STAMP.sub("", ln)) for ln in log_tail(text, NOTE_LOG_LINES))
        return ""

    def _read_pid_quietly(self) -> None:
        """The pidfile, if QEMU wrote one (it does not when it fails to start: logged at debug)."""
        with best_effort(f"VM {self.name}: reading its pidfile", log, level=logging.DEBUG):
            self.pid = int(self.host.read_bytes(self.path(f"{self.name}.pid")).decode().strip())

    async def _connect_qmp(self) -> None:
        client = QMPClient(f"migstall-{self.name}")
        try:
            sock = await asyncio.to_thread(self.host.connect_unix, self.path("qmp.sock"))
            await asyncio.wait_for(client.connect(sock), DEFAULT_CONNECT_TIMEOUT)
        except (asyncio.TimeoutError, Exception) as exc:
            # disconnect() re-raises what ended the connection, which is raised below anyway
            with best_effort(f"VM {self.name}: QMP disconnect after the failed connect", log,
                             level=logging.DEBUG):
                await asyncio.wait_for(client.disconnect(), 5)
            raise QEMUError(f"QEMU {self.name}: cannot connect QMP: {exc or type(exc).__name__}",
                            self.log_path) from exc
        self.qmp = client
        self._listener = EventListener()
        client.register_listener(self._listener)
        self._tasks.append(asyncio.create_task(self._pump(), name=f"{self.name}-events"))
        self._tasks.append(asyncio.create_task(self._watch(), name=f"{self.name}-runstate"))

    def _wake(self) -> None:
        for waiter in self._waiters:
            waiter.set()

    async def _pump(self) -> None:
        assert self._listener is not None
        async for event in self._listener:
            ev = dict(event)
            ev["_recv_ns"] = time.time_ns()
            self.events.append(ev)
            self._wake()

    async def _watch(self) -> None:
        assert self.qmp is not None
        while True:
            state = await self.qmp.runstate_changed()
            if state in (Runstate.DISCONNECTING, Runstate.IDLE):
                self._dead = True
                self._wake()
                return

    # -- QMP ---------------------------------------------------------------------
    async def cmd(self, command: str, args: Optional[Mapping[str, Any]] = None,
                  timeout: Optional[float] = None) -> Any:
        """Run a QMP command.  QMPCommandError when QEMU answers with an error
        (its ``error_class``), QMPDisconnectedError when QMP is not connected or
        goes away first, QEMUError on a timeout or anything else; all QEMUError.
        QEMUNotRunningError (a QMPDisconnectedError) when the VM is not
        RUNNING (never launched, or shut down); QEMUStateError when it has no QMP."""
        if self._state is not RunState.RUNNING:
            raise QEMUNotRunningError(f"QEMU {self.name}: QMP is not connected ({command}): the VM is "
                                      f"{self._state.value}", self.log_path if self.runtime_dir else None,
                                      state=self._state.name, operation=command)
        if not self.with_qmp:
            raise QEMUStateError(f"QEMU {self.name} was launched without QMP ({command})", self.log_path,
                                 state=self._state.name, operation=command)
        if self.qmp is None or self.qmp.runstate != Runstate.RUNNING:
            raise QMPDisconnectedError(f"QEMU {self.name}: QMP is not connected ({command}); "
                                       f"{self._process_note()}", self.log_path, command=command)
        t = self.qmp_timeout if timeout is None else timeout
        try:
            return await asyncio.wait_for(self.qmp.execute(command, dict(args) if args else None), t)
        except asyncio.TimeoutError as exc:
            raise QEMUError(f"QEMU {self.name}: QMP {command} timed out after {t:g}s", self.log_path) from exc
        except asyncio.CancelledError:
            raise
        except ExecuteError as exc:
            raise QMPCommandError(f"QEMU {self.name}: QMP {command} failed: {exc}; {self._process_note()}",
                                  self.log_path, command=command, error_class=exc.error_class,
                                  desc=exc.error.error.desc) from exc
        except (ExecInterruptedError, StateError, ConnectionError, EOFError) as exc:
            # the connection ended (or was ending) before QEMU answered
            raise QMPDisconnectedError(f"QEMU {self.name}: QMP {command} failed: {exc}; {self._process_note()}",
                                       self.log_path, command=command) from exc
        except Exception as exc:
            raise QEMUError(f"QEMU {self.name}: QMP {command} failed: {exc}; {self._process_note()}",
                            self.log_path) from exc

    def _process_note(self) -> str:
        if self.pid is not None and not self.host.pid_alive(self.pid):
            return "its process had exited"
        return "its process had not exited yet"

    @property
    def alive(self) -> bool:
        return self.pid is not None and self.host.pid_alive(self.pid)

    async def wait_event(self, name: str, timeout: float, *,
                         match: Optional[Callable[[EventT], bool]] = None,
                         since: int = 0) -> EventT:
        """The first event ``name`` (at index >= ``since`` in :attr:`events`)
        that ``match`` accepts.  QEMUError if QMP goes away or on timeout."""
        deadline = time.monotonic() + timeout

        def find() -> Optional[EventT]:
            for ev in self.events[since:]:
                if ev.get("event") == name and (match is None or match(ev)):
                    return ev
            return None

        while True:
            ev = find()
            if ev is not None:
                return ev
            if self._state in (RunState.IDLE, RunState.STOPPED):
                raise QEMUNotRunningError(f"QEMU {self.name}: no {name} event, and the VM is {self._state.value}",
                                          self.log_path if self.runtime_dir else None,
                                          state=self._state.name, operation=name)
            if self._dead or self.qmp is None:
                raise QMPDisconnectedError(f"QEMU {self.name}: QMP closed while waiting for {name}; "
                                           f"{self._process_note()}", self.log_path, command=name)
            left = deadline - time.monotonic()
            if left <= 0:
                raise QEMUError(f"QEMU {self.name}: no {name} event within {timeout:g}s", self.log_path)
            # asyncio.wait, not wait_for: on Python < 3.12 wait_for swallows a
            # cancellation that arrives as the inner wait completes, and this loop
            # then waited out the whole timeout.  migration.wait_pass cancels the
            # waiter it no longer needs as soon as the other one's event arrives,
            # which wakes both: a CI run lost 120 s there (fault_window_ms 120307).
            waiter = asyncio.Event()
            self._waiters.add(waiter)
            woken = asyncio.ensure_future(waiter.wait())
            try:
                await asyncio.wait({woken}, timeout=left)
            finally:
                woken.cancel()
                self._waiters.discard(waiter)

    # -- shutdown ------------------------------------------------------------------
    async def shutdown(self) -> None:
        """shutdown + post-shutdown; idempotent, never raises for a dead QEMU."""
        if self._state is RunState.STOPPED:
            return
        self._state = RunState.SHUTTING_DOWN
        try:
            if self.pid is not None and not self.exit_reason and not self.host.pid_alive(self.pid):
                if self.expected_exit:
                    self.exit_reason = "exited"
                    log.debug("VM %s: pid %d exited, as expected: %s", self.name, self.pid, self.expected_exit)
                    return
                self.exit_reason = "died"        # before we asked it to quit
                log.warning("VM %s: pid %d had already exited", self.name, self.pid)
            if not self.with_qmp:
                # nothing to ask: _cleanup's stop_pid sends SIGTERM (QEMU exits cleanly), SIGKILL after the grace
                self.exit_reason = self.exit_reason or "terminated"
                return
            asked = False
            if self.qmp is not None and self.qmp.runstate == Runstate.RUNNING:
                try:
                    await asyncio.wait_for(self.qmp.execute("quit"), min(self.qmp_timeout, 10))
                    asked = True
                    self.exit_reason = self.exit_reason or "quit"
                except Exception as exc:      # noqa: BLE001  a QEMU that is exiting (or gone) cannot answer
                    log.debug("VM %s: quit got no answer: %s", self.name, exc or type(exc).__name__)
            if self.pid is not None:
                exited = await asyncio.to_thread(self.host.wait_pid_exit, self.pid, self.quit_timeout)
                if not exited:
                    log.warning("VM %s: pid %d did not exit after quit; killing", self.name, self.pid)
                    self.exit_reason = self.exit_reason or "killed"
                elif not asked and not self.exit_reason:
                    # exited without being asked: its QMP socket closes before /proc shows it gone,
                    # so the check above can still see it alive
                    self.exit_reason = "exited" if self.expected_exit else "died"
                    if not self.expected_exit:
                        log.warning("VM %s: pid %d exited on its own", self.name, self.pid)
        finally:
            await self._cleanup()

    @property
    def shutdown_event(self) -> Optional[EventT]:
        """The QMP ``SHUTDOWN`` that says why QEMU ended: the first the guest
        asked for, else the first (a later ``host-qmp-quit`` is our cleanup)."""
        shutdowns = [e for e in self.events if e.get("event") == "SHUTDOWN"]
        return next((e for e in shutdowns if (e.get("data") or {}).get("guest")), shutdowns[0] if shutdowns else None)

    def death_note(self, what: Optional[str] = None) -> str:
        """One line on how QEMU ended, for an error message: ``"<what> was killed
        by signal 9 (SIGKILL); its log ends: ...; host kernel: ..."``.  ``what``
        defaults to ``"QEMU <name>"``.  Complete after :meth:`shutdown`."""
        return format_death_note(what or f"QEMU {self.name}", self.exit_status, self.log_tail, self.kernel_log,
                                 self.shutdown_event)

    def exit_info(self) -> Dict[str, Any]:
        """How QEMU ended, JSON-able (for the sidecar); complete after :meth:`shutdown`."""
        return {"exit_reason": self.exit_reason, "exit_status": self.exit_status, "exit_pid": self.exit_pid,
                "shutdown": shutdown_note(self.shutdown_event) or None,
                "pid": self.pid, "log_tail": list(self.log_tail), "host_kernel_log": list(self.kernel_log),
                "host_uptime_at_launch_s": self.launch_uptime_s}

    def expect_exit(self, why: str) -> None:
        """Say that this QEMU may now end by itself (an incoming migration's destination once the
        migration is cancelled): :meth:`shutdown` then records ``exit_reason`` "exited", not
        "died", and logs no warning."""
        self.expected_exit = why

    async def kill(self) -> None:
        """Stop the process at once (fault injection, emergency)."""
        if self.pid is not None:
            await asyncio.to_thread(self.host.stop_pid, self.pid, 2.0)

    async def _cleanup(self) -> None:
        try:
            if self.pid is not None:
                with best_effort(f"VM {self.name}: stopping pid {self.pid}", log):
                    await asyncio.to_thread(self.host.stop_pid, self.pid)   # the hard kill, if still needed
            # cleanup goes on whatever happens (a cancel included): disconnect() re-raises what
            # ended the connection (EOFError once QEMU has quit), and the tasks were cancelled
            if self.qmp is not None:
                with best_effort(f"VM {self.name}: QMP disconnect", log, level=logging.DEBUG,
                                 catch=(BaseException,)):
                    await asyncio.wait_for(self.qmp.disconnect(), 5)
            for task in self._tasks:
                task.cancel()
            for task in self._tasks:
                with best_effort(f"VM {self.name}: task {task.get_name()}", log, level=logging.DEBUG,
                                 catch=(BaseException,)):
                    await task
            self._tasks.clear()
            try:
                await asyncio.to_thread(self._post_mortem)
            finally:
                self._fetch_log()
                if self.exit_reason == "died":
                    self.log_tail = log_tail(self.log_text)
                    log.warning("VM %s: %s", self.name, self.death_note())
        finally:
            self._close_stack()

    def _close_stack(self) -> None:
        """The end of every path: remove the runtime dir if it is ours; STOPPED."""
        try:
            self._stack.close()
        finally:
            if self._given_rundir is None:
                self.runtime_dir = None
            self._state = RunState.STOPPED

    def _post_mortem(self) -> None:
        """Read how an exited QEMU ended (the runtime dir still exists); never raises."""
        if self.pid is None or self.runtime_dir is None or not self.argv:
            return
        try:
            if self.host.pid_alive(self.pid):
                return                      # stop_pid could not end it: nothing to read
            self._read_exit_status(self.exit_status_timeout)
            if self.exit_reason == "died":
                self.kernel_log = self.host.kernel_log_tail(since_s=self.launch_uptime_s, lines=KERNEL_LOG_LINES)
        except Exception as exc:            # noqa: BLE001  diagnostics only
            log.warning("VM %s: cannot tell how QEMU ended: %s", self.name, exc)

    def _read_exit_status(self, timeout: float) -> None:
        """Wait at most ``timeout`` s for the reaper's status file (polled every
        :data:`EXIT_STATUS_POLL_S`: on a remote host there is no event to wait on)."""
        deadline = time.monotonic() + timeout
        while True:
            text = ""
            # not there yet (polled until the deadline); anything else ends the wait: _post_mortem logs it
            with contextlib.suppress(OSError, HostError):
                text = self.host.read_bytes(self.exit_status_path).decode(errors="replace")
            pid, status = parse_exit_status(text)
            if status:
                self.exit_pid, self.exit_status = pid, status
                if pid is not None and pid != self.pid:
                    log.warning("VM %s: the reaper reported pid %d, QEMU's pidfile says %s",
                                self.name, pid, self.pid)
                return
            if time.monotonic() >= deadline:
                log.warning("VM %s: no exit status from the reaper within %gs (%s)",
                            self.name, timeout, self.exit_status_path)
                return
            time.sleep(EXIT_STATUS_POLL_S)

    def _fetch_log(self) -> None:
        if self.runtime_dir is None:
            return
        text = ""
        # QEMU creates its -D log only once it has something to write: no file is routine
        with best_effort(f"VM {self.name}: reading its -D log", log, level=logging.DEBUG):
            text = self.host.read_bytes(self.log_path).decode(errors="replace")
        header = f"# migstall VM {self.name} on {self.host.name}; re-run with:\n# {self.command_line}\n"
        self.log_text = text
        if self.log_dir is not None and self.argv:
            with contextlib.suppress(OSError):
                self.log_dir.mkdir(parents=True, exist_ok=True)
                dest = self.log_dir / f"{self.name}.log"
                dest.write_text(header + text)
                self.local_log = dest
                self.collected[self.log_path] = str(dest)
            for name in self.collect:
                with best_effort(f"VM {self.name}: collecting {name}", log):
                    data = self.host.read_bytes(self.path(name))
                    extra = self.log_dir / f"{self.name}-{name}"
                    extra.write_bytes(data)
                    self.collected[self.path(name)] = str(extra)


class SyncVM:
    """A :class:`VM` without QMP for synchronous code (the virtual host's L1).

    Each phase (:meth:`launch`, :meth:`shutdown`) runs the VM's own coroutine
    in a private event loop on a worker thread, so it works whether or not the
    caller's thread runs an event loop; the VM holds nothing of a loop between
    phases, since it has no QMP client.  An interrupt (Ctrl-C) while a phase
    runs waits for the phase to end before it propagates: a launch under way
    then leaves a pid that :meth:`shutdown` can stop."""

    def __init__(self, vm: VM) -> None:
        if vm.with_qmp:
            raise QEMUStateError(f"QEMU {vm.name}: SyncVM drives a VM without QMP (with_qmp=False)",
                                 state=vm.runstate.name, operation="SyncVM")
        self.vm = vm

    def launch(self) -> "SyncVM":
        """launch + post-launch; a failed launch leaves no process (as ``async with VM``)."""
        self._call(self.vm.__aenter__, "launch")
        return self

    def shutdown(self) -> None:
        """SIGTERM, grace, SIGKILL, post-shutdown; idempotent."""
        self._call(self.vm.shutdown, "shutdown")

    def detach(self) -> Optional[int]:
        """:meth:`VM.detach`."""
        return self.vm.detach()

    def _call(self, phase: Callable[[], Coroutine[Any, Any, Any]], what: str) -> None:
        failed: List[BaseException] = []

        def work() -> None:
            try:
                asyncio.run(phase())
            except BaseException as exc:   # noqa: BLE001  handed to the caller's thread below
                failed.append(exc)

        worker = threading.Thread(target=work, name=f"migstall-{self.vm.name}-{what}")
        worker.start()
        try:
            worker.join()
        except BaseException:
            # interrupted: let the phase end (a second interrupt ends this wait), then propagate
            worker.join()
            if failed:
                log.warning("VM %s: %s failed after the interrupt: %s", self.vm.name, what, failed[0])
            raise
        if failed:
            raise failed[0]
