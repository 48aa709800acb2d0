"""One QEMU process on a :class:`~harness.hosts.base.Host`, driven over QMP.

API (stable; other modules and commands build on it)::

    async with VM(host, "src", args, qemu="qemu-system-x86_64",
                  runtime_dir=rd, env={"LD_PRELOAD": ...},
                  log_dir=Path("results/x.sidecars/logs")) as vm:
        await vm.cmd("query-status")                 # -> dict, timeout qmp_timeout
        ev = await vm.wait_event("MIGRATION", timeout=30,
                                 match=lambda e: e["data"]["status"] == "completed")
        vm.pid, vm.command_line, vm.log_path, vm.events, vm.path("probe.sock")
        await vm.shutdown()                          # optional; __aexit__ does it

Phases (as in QEMU's own QEMUMachine): ``launch`` (create/choose the runtime
dir, start ``qemu -daemonize``: it returns once QEMU is initialised and its
sockets exist, no polling), ``post-launch`` (read the pidfile, connect QMP
through :meth:`Host.connect_unix`, start collecting events), ``shutdown``
(QMP ``quit``, wait for the process to exit, then :meth:`Host.stop_pid`:
SIGTERM, grace, SIGKILL) and ``post-shutdown`` (copy the VM's ``-D`` log from
the host to ``log_dir``, remove the runtime dir).  Cleanup runs in ``finally``;
a VM that fails to launch leaves no process behind.

Every QEMU gets ``-name migstall-<name>``, ``-daemonize -pidfile``,
``-D <log> -msg timestamp=on`` and QMP on ``<runtime dir>/qmp.sock``.  The
full command line (shlex-joined, with the environment prefix) is logged and
written at the top of the copied log, so it can be re-run by hand.

Timeouts (seconds, overridable per VM and per call):
``DEFAULT_QMP_TIMEOUT`` for each QMP command, ``DEFAULT_LAUNCH_TIMEOUT`` for
``qemu -daemonize`` to return, ``DEFAULT_QUIT_TIMEOUT`` for the process to exit
after ``quit``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import shlex
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Union

from qemu.qmp import QMPClient
from qemu.qmp.events import EventListener
from qemu.qmp.protocol import Runstate

from harness.errors import HostError, QEMUError
from harness.hosts.base import Host

log = logging.getLogger(__name__)

#: seconds one QMP command may take
DEFAULT_QMP_TIMEOUT = 30.0
#: seconds ``qemu -daemonize`` may take to initialise and return
DEFAULT_LAUNCH_TIMEOUT = 60.0
#: seconds QEMU may take to exit after QMP ``quit``
DEFAULT_QUIT_TIMEOUT = 15.0
#: seconds to connect to the QMP socket and negotiate
DEFAULT_CONNECT_TIMEOUT = 15.0

ArgsT = Union[Sequence[str], Callable[[str], Sequence[str]]]
EventT = Dict[str, Any]

_seq = itertools.count(1)


def event_time_ns(event: Mapping[str, Any]) -> int:
    """The QMP ``timestamp`` of an event (QEMU host wall clock) in ns."""
    ts = event.get("timestamp") or {}
    return int(ts.get("seconds", 0)) * 1_000_000_000 + int(ts.get("microseconds", 0)) * 1000


class VM:
    """A QEMU process; an async context manager (see the module docstring)."""

    def __init__(self, host: Host, name: str, args: ArgsT, *,
                 qemu: str = "qemu-system-x86_64",
                 prefix: Sequence[str] = (),
                 runtime_dir: Optional[str] = None,
                 env: Optional[Mapping[str, str]] = None,
                 log_dir: Optional[Path] = None,
                 collect: Sequence[str] = (),
                 qmp_timeout: float = DEFAULT_QMP_TIMEOUT,
                 launch_timeout: float = DEFAULT_LAUNCH_TIMEOUT,
                 quit_timeout: float = DEFAULT_QUIT_TIMEOUT) -> None:
        """``args`` are the machine-specific QEMU arguments, or a function of
        the runtime dir returning them.  ``prefix`` goes before the QEMU
        binary (e.g. a THP-disabling exec wrapper).  ``env`` is added to the
        environment of QEMU (e.g. ``LD_PRELOAD``).  ``collect`` names more files
        in the runtime dir (e.g. the guest console log) copied to ``log_dir``
        as ``<name>-<file>`` at post-shutdown; :attr:`collected` maps their host
        paths to the copies."""
        self.host = host
        self.name = name
        self.qemu = qemu
        self.prefix = tuple(prefix)
        self._args = args
        self.env: Dict[str, str] = dict(env or {})
        self.log_dir = Path(log_dir) if log_dir else None
        self.collect = tuple(collect)
        self.collected: Dict[str, str] = {}
        self.qmp_timeout = qmp_timeout
        self.launch_timeout = launch_timeout
        self.quit_timeout = quit_timeout
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
        self.exit_reason: str = ""             # "quit" | "died" (exited on its own) | "killed"

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
    def command_line(self) -> str:
        envs = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(self.env.items()))
        cmd = shlex.join(self.argv)
        return f"env {envs} {cmd}" if envs else cmd

    # -- phases --------------------------------------------------------------------
    async def __aenter__(self) -> "VM":
        try:
            await self.launch()
        except BaseException:
            await self._cleanup()
            raise
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.shutdown()

    def _build_argv(self) -> List[str]:
        args = self._args(self.runtime_dir) if callable(self._args) else self._args
        return [*self.prefix, self.qemu,
                "-name", f"migstall-{self.name},debug-threads=on",
                "-daemonize", "-pidfile", self.path(f"{self.name}.pid"),
                "-D", self.log_path, "-msg", "timestamp=on",
                "-chardev", f"socket,id=qmp,path={self.path('qmp.sock')},server=on,wait=off",
                "-mon", "chardev=qmp,mode=control",
                "-display", "none",
                *[str(a) for a in args]]

    async def launch(self) -> None:
        """launch + post-launch."""
        if self.runtime_dir is None:
            self.runtime_dir = self._stack.enter_context(self.host.runtime_dir(f"migstall-{self.name}-"))
        self.argv = self._build_argv()
        log.info("VM %s: %s", self.name, self.command_line)
        fut = asyncio.ensure_future(asyncio.to_thread(self.host.run, self.argv, timeout=self.launch_timeout,
                                                      check=False, env=self.env or None))
        try:
            res = await asyncio.shield(fut)
        except asyncio.CancelledError:
            # interrupted while QEMU initialises: let it finish so its pid is known and it can be stopped
            with contextlib.suppress(BaseException):
                await fut
            self._read_pid_quietly()
            raise
        except HostError as exc:
            self._read_pid_quietly()
            raise QEMUError(f"QEMU {self.name} did not start: {exc.one_line()}", self.log_path) from exc
        if res.returncode != 0:
            err = (res.stderr or res.stdout).decode(errors="replace").strip()
            self._read_pid_quietly()
            raise QEMUError(f"QEMU {self.name} failed to start (exit {res.returncode}): "
                            f"{err.splitlines()[-1] if err else 'no output'}", self.log_path)
        self._read_pid_quietly()
        if self.pid is None:
            raise QEMUError(f"QEMU {self.name} started but wrote no pidfile", self.log_path)
        log.info("VM %s: pid %d", self.name, self.pid)
        await self._connect_qmp()

    def _read_pid_quietly(self) -> None:
        with contextlib.suppress(Exception):
            self.pid = int(self.host.read_bytes(self.path(f"{self.name}.pid")).decode().strip())

    async def _connect_qmp(self) -> None:
        client = QMPClient(f"migstall-{self.name}")
        try:
            sock = await asyncio.to_thread(self.host.connect_unix, self.path("qmp.sock"))
            await asyncio.wait_for(client.connect(sock), DEFAULT_CONNECT_TIMEOUT)
        except (asyncio.TimeoutError, Exception) as exc:
            with contextlib.suppress(Exception):
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
        """Run a QMP command; QEMUError on error, disconnect or timeout."""
        if self.qmp is None or self.qmp.runstate != Runstate.RUNNING:
            raise QEMUError(f"QEMU {self.name}: QMP is not connected ({command}); "
                            f"{self._death_note()}", self.log_path)
        t = self.qmp_timeout if timeout is None else timeout
        try:
            return await asyncio.wait_for(self.qmp.execute(command, dict(args) if args else None), t)
        except asyncio.TimeoutError as exc:
            raise QEMUError(f"QEMU {self.name}: QMP {command} timed out after {t:g}s", self.log_path) from exc
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            raise QEMUError(f"QEMU {self.name}: QMP {command} failed: {exc}; {self._death_note()}",
                            self.log_path) from exc

    def _death_note(self) -> str:
        if self.pid is not None and not self.host.pid_alive(self.pid):
            return "QEMU process has exited"
        return "QEMU process is alive"

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
            if self._dead or self.qmp is None:
                raise QEMUError(f"QEMU {self.name}: QMP closed while waiting for {name}; "
                                f"{self._death_note()}", self.log_path)
            left = deadline - time.monotonic()
            if left <= 0:
                raise QEMUError(f"QEMU {self.name}: no {name} event within {timeout:g}s", self.log_path)
            waiter = asyncio.Event()
            self._waiters.add(waiter)
            try:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(waiter.wait(), left)
            finally:
                self._waiters.discard(waiter)

    # -- shutdown ------------------------------------------------------------------
    async def shutdown(self) -> None:
        """shutdown + post-shutdown; idempotent, never raises for a dead QEMU."""
        try:
            if self.pid is not None and not self.exit_reason and not self.host.pid_alive(self.pid):
                self.exit_reason = "died"        # before we asked it to quit
                log.warning("VM %s: pid %d had already exited", self.name, self.pid)
            if self.qmp is not None and self.qmp.runstate == Runstate.RUNNING:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self.qmp.execute("quit"), min(self.qmp_timeout, 10))
                    self.exit_reason = self.exit_reason or "quit"
            if self.pid is not None:
                exited = await asyncio.to_thread(self.host.wait_pid_exit, self.pid, self.quit_timeout)
                if not exited:
                    log.warning("VM %s: pid %d did not exit after quit; killing", self.name, self.pid)
                    self.exit_reason = self.exit_reason or "killed"
        finally:
            await self._cleanup()

    async def kill(self) -> None:
        """Stop the process at once (fault injection, emergency)."""
        if self.pid is not None:
            await asyncio.to_thread(self.host.stop_pid, self.pid, 2.0)

    async def _cleanup(self) -> None:
        try:
            if self.pid is not None:
                with contextlib.suppress(Exception):
                    await asyncio.to_thread(self.host.stop_pid, self.pid)
            if self.qmp is not None:
                with contextlib.suppress(BaseException):
                    await asyncio.wait_for(self.qmp.disconnect(), 5)
            for task in self._tasks:
                task.cancel()
            for task in self._tasks:
                with contextlib.suppress(BaseException):
                    await task
            self._tasks.clear()
            self._fetch_log()
        finally:
            self._stack.close()
            if self._given_rundir is None:
                self.runtime_dir = None

    def _fetch_log(self) -> None:
        if self.runtime_dir is None:
            return
        text = ""
        with contextlib.suppress(Exception):
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
                with contextlib.suppress(Exception):
                    data = self.host.read_bytes(self.path(name))
                    extra = self.log_dir / f"{self.name}-{name}"
                    extra.write_bytes(data)
                    self.collected[self.path(name)] = str(extra)
