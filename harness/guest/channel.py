"""The harness side of the probe channel (see docs/probe-protocol.md).

:class:`ProbeChannel` wraps a connected stream socket in asyncio streams.
:meth:`ProbeChannel.open_on` is the normal way in: it runs the mark relay
(``guests/markrelay``) on the QEMU host through ``Host.open_stream``, so that
every mark is stamped with the QEMU host's own clock, the clock of QEMU's trace
lines and QMP event timestamps (README "Clocks"), whichever machine runs the
harness.  :meth:`ProbeChannel.open` takes any connected socket (then marks are
stamped with this machine's clock).  The
guest sends JSON lines; the harness sends text commands.  Every wait has a
timeout and raises :class:`~harness.errors.GuestError` saying what it awaited
and for how long; a probe ``error`` line raises GuestError with the probe's
message; end of file raises GuestError("guest closed the channel").
Raw lines are logged at debug level.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Tuple

from harness.errors import GuestError, HostError
from harness.hosts.base import Host, HostStream
from harness.progress import Task

log = logging.getLogger(__name__)

#: the protocol version this module speaks
PROTO = 1
#: longest line accepted from the guest (a dump of many stalls is one line)
MAX_LINE = 256 * 1024 * 1024
#: default timeout of :meth:`ProbeChannel.mark`, seconds
MARK_TIMEOUT = 5.0
#: default timeout of :meth:`ProbeChannel.close`, seconds
CLOSE_TIMEOUT = 5.0
#: seconds for the mark relay to start and connect (an SSH exec to the nested
#: virtual host under TCG answers in well under 1 s; see Host.open_stream)
RELAY_START_TIMEOUT = 20.0


@dataclass(frozen=True)
class ReadyInfo:
    touched_mib: int
    prefault_ms: float
    loops: Tuple[str, ...]
    pio_method: str = "outb"    # "devport" where outb faults (nested SVM under TCG)
    #: aliased guests: what the probe found and mapped (devices, bar_mib, total_mib, window_mib, first_gpa)
    alias: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class MarkSample:
    """One clock-alignment mark: the QEMU host's wall clock (ns) when it was
    sent to the guest and when the echo came back (stamped by the mark relay on
    that host; without a relay, this machine's ``time.time_ns()``), and the
    guest clock (ns) when the probe read it.  ``harness_send_ns`` and
    ``harness_recv_ns`` are this machine's clock around the same exchange:
    with a relay they bound the offset between the two machines' clocks
    (:attr:`offset_bounds_ns`)."""

    id: int
    host_send_ns: int
    host_recv_ns: int
    guest_ns: int
    harness_send_ns: int = 0
    harness_recv_ns: int = 0

    @property
    def offset_bounds_ns(self) -> Tuple[int, int]:
        """(lo, hi): the QEMU host's clock minus this machine's lies in between
        (the relay stamped after our send and before our receipt)."""
        return (self.host_recv_ns - self.harness_recv_ns, self.host_send_ns - self.harness_send_ns)

    @property
    def rtt_ns(self) -> int:
        return self.host_recv_ns - self.host_send_ns

    @property
    def offset_ns(self) -> int:
        """host time - guest time, assuming the guest read it at mid round trip."""
        return (self.host_send_ns + self.host_recv_ns) // 2 - self.guest_ns


@dataclass(frozen=True)
class LoopRecord:
    """One vCPU's measure loop.  ``stalls`` holds (t_ns, dur_ns): start of the
    gap on the guest clock and its length; ``hist_log2us[k]`` counts gaps in
    [2^k, 2^(k+1)) us (bucket 0 also holds gaps under 1 us); ``dropped``
    counts stalls that did not fit in the probe's buffer."""

    cpu: int
    cls: str
    threshold_us: int
    iters: int
    stalls: Tuple[Tuple[int, int], ...]
    hist_log2us: Tuple[int, ...]
    dropped: int
    #: aliased write loops: window changes inside the loop and their time, left out of the gaps
    remaps: int = 0
    remap_ns: int = 0


class ProbeChannel:
    """Use :meth:`open`; then :meth:`wait_hello`, :meth:`wait_ready`, any
    number of :meth:`mark`, :meth:`dump`, and finally :meth:`close`."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 log_path: Optional[str] = None) -> None:
        self._reader = reader
        self._writer = writer
        self._log_path = log_path
        self._next_mark = 1
        self._closed = False
        self._stream: Optional[HostStream] = None
        self.relay: Optional[Dict[str, Any]] = None
        self.hello: Optional[Dict[str, Any]] = None

    @classmethod
    async def open_on(cls, host: Host, socket_path: str, log_path: Optional[str] = None,
                      timeout: float = RELAY_START_TIMEOUT) -> "ProbeChannel":
        """The probe channel at ``socket_path`` on ``host``, through the mark relay
        running there (see the module docstring).  HostError if the relay does not
        start and connect within ``timeout`` (with its own error message)."""
        from harness import ctools

        relay = await asyncio.to_thread(host.stage, await asyncio.to_thread(ctools.markrelay))
        stream = await asyncio.to_thread(host.open_stream, [relay, socket_path], timeout)
        try:
            chan = await cls.open(stream.sock, log_path)
            chan._stream = stream
            try:
                ev = await chan._event(asyncio.get_running_loop().time() + timeout, "mark relay's start", timeout)
            except GuestError as exc:
                err = (await asyncio.to_thread(stream.stderr_text)).strip()
                raise HostError(f"the mark relay on {host.name} did not connect to {socket_path}: "
                                f"{err.splitlines()[-1] if err else exc}") from exc
            if ev.get("ev") != "relay":
                raise HostError(f"the mark relay on {host.name} sent {str(ev)[:200]} instead of its start line")
            chan.relay = ev
            return chan
        except BaseException:
            await asyncio.to_thread(stream.close)
            raise

    @classmethod
    async def open(cls, sock: socket.socket, log_path: Optional[str] = None) -> "ProbeChannel":
        """Wrap a connected socket.  ``log_path`` (e.g. the guest console log)
        is attached to the GuestErrors raised."""
        sock.setblocking(False)
        reader, writer = await asyncio.open_unix_connection(sock=sock, limit=MAX_LINE)
        return cls(reader, writer, log_path)

    # -- internals -------------------------------------------------------------------
    def _error(self, msg: str) -> GuestError:
        return GuestError(msg, log_path=self._log_path)

    async def _event(self, deadline: float, what: str, timeout: float) -> Dict[str, Any]:
        """The next JSON event before ``deadline`` (loop time)."""
        loop = asyncio.get_running_loop()
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise self._error(f"timed out after {timeout:g}s waiting for the probe's {what}")
            try:
                raw = await asyncio.wait_for(self._reader.readline(), remaining)
            except asyncio.TimeoutError:
                raise self._error(f"timed out after {timeout:g}s waiting for the probe's {what}") from None
            except (asyncio.LimitOverrunError, ValueError) as exc:
                raise self._error(f"probe line too long while waiting for its {what}") from exc
            except OSError as exc:
                raise self._error(f"probe channel failed while waiting for its {what}: {exc}") from exc
            if not raw:
                raise self._error(f"guest closed the channel while the harness waited for its {what}")
            if not raw.endswith(b"\n"):
                raise self._error(f"guest closed the channel in the middle of a line "
                                  f"while the harness waited for its {what}")
            line = raw.decode(errors="replace").strip()
            log.debug("probe> %s", line if len(line) <= 2000 else line[:2000] + "...")
            if not line:
                continue
            try:
                ev = json.loads(line)
            except ValueError:
                log.warning("ignoring a non-JSON line from the probe: %.200s", line)
                continue
            if not isinstance(ev, dict) or "ev" not in ev:
                log.warning("ignoring a probe line without 'ev': %.200s", line)
                continue
            if ev["ev"] == "error":
                raise self._error(f"guest probe error: {ev.get('msg', '(no message)')}")
            return ev

    async def _send(self, text: str, what: str, timeout: float) -> None:
        log.debug("probe< %s", text)
        try:
            self._writer.write(text.encode() + b"\n")
            await asyncio.wait_for(self._writer.drain(), timeout)
        except asyncio.TimeoutError:
            raise self._error(f"timed out after {timeout:g}s sending {what} to the probe") from None
        except OSError as exc:
            raise self._error(f"cannot send {what} to the probe: {exc}") from exc

    # -- protocol ----------------------------------------------------------------------
    async def wait_hello(self, timeout: float) -> Dict[str, Any]:
        """The probe's ``hello`` (sent once it has calibrated its clock and
        opened the channel, i.e. seconds after boot)."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            ev = await self._event(deadline, "hello", timeout)
            if ev["ev"] == "hello":
                if ev.get("proto") != PROTO:
                    raise self._error(f"probe speaks protocol {ev.get('proto')}, the harness {PROTO}; "
                                      "rebuild the guest image")
                self.hello = ev
                return ev
            log.warning("ignoring probe event %r before hello", ev["ev"])

    async def wait_ready(self, timeout: float, task: Optional[Task] = None) -> ReadyInfo:
        """Wait for READY.  ``prefault`` lines update ``task`` (completed in
        percent, so create it with total=100)."""
        deadline = asyncio.get_running_loop().time() + timeout
        last = "no prefault progress yet"
        while True:
            ev = await self._event(deadline, f"READY ({last})", timeout)
            kind = ev["ev"]
            if kind == "prefault":
                done, total = int(ev.get("done_mib", 0)), int(ev.get("total_mib", 0))
                last = f"prefaulted {done} of {total} MiB"
                if task is not None and total > 0:
                    task.update(completed=100.0 * done / total, description=f"prefault {done}/{total} MiB")
            elif kind == "ready":
                if task is not None:
                    task.update(completed=100.0)
                try:
                    return ReadyInfo(int(ev["touched_mib"]), float(ev["prefault_ms"]),
                                     tuple(str(x) for x in ev["loops"]),
                                     str(ev.get("pio_method", "outb")),
                                     {str(k): int(v) for k, v in (ev.get("alias") or {}).items()})
                except (KeyError, TypeError, ValueError) as exc:
                    raise self._error(f"malformed READY from the probe: {ev}") from exc
            elif kind == "hello":
                self.hello = ev
            else:
                log.warning("ignoring probe event %r while waiting for READY", kind)

    async def mark(self, timeout: float = MARK_TIMEOUT) -> MarkSample:
        """Send a mark with this machine's time and wait for its echo."""
        mark_id = self._next_mark
        self._next_mark += 1
        deadline = asyncio.get_running_loop().time() + timeout
        send_ns = time.time_ns()
        await self._send(f"mark {mark_id} {send_ns}", f"mark {mark_id}", timeout)
        while True:
            ev = await self._event(deadline, f"echo of mark {mark_id}", timeout)
            recv_ns = time.time_ns()
            if ev["ev"] == "mark" and ev.get("id") == mark_id:
                try:
                    if "relay_recv_ns" in ev:   # stamped on the QEMU host
                        return MarkSample(mark_id, int(ev["host_ns"]), int(ev["relay_recv_ns"]),
                                          int(ev["guest_ns"]), send_ns, recv_ns)
                    return MarkSample(mark_id, send_ns, recv_ns, int(ev["guest_ns"]), send_ns, recv_ns)
                except (KeyError, TypeError, ValueError) as exc:
                    raise self._error(f"malformed mark echo from the probe: {str(ev)[:300]}") from exc
            log.warning("ignoring probe event %s while waiting for mark %d", ev, mark_id)

    async def dump(self, timeout: float) -> List[LoopRecord]:
        """Stop the loops and collect every vCPU's record (the probe stays up)."""
        deadline = asyncio.get_running_loop().time() + timeout
        await self._send("dump", "dump", timeout)
        records: List[LoopRecord] = []
        while True:
            ev = await self._event(deadline, f"dump (got {len(records)} vCPU records so far)", timeout)
            if ev["ev"] == "stalls":
                try:
                    records.append(LoopRecord(
                        cpu=int(ev["cpu"]), cls=str(ev["cls"]), threshold_us=int(ev["threshold_us"]),
                        iters=int(ev["iters"]),
                        stalls=tuple((int(t), int(d)) for t, d in ev["stalls"]),
                        hist_log2us=tuple(int(n) for n in ev["hist_log2us"]),
                        dropped=int(ev["dropped"]), remaps=int(ev.get("remaps", 0)),
                        remap_ns=int(ev.get("remap_ns", 0))))
                except (KeyError, TypeError, ValueError) as exc:
                    raise self._error(f"malformed stalls record from the probe: {str(ev)[:300]}") from exc
            elif ev["ev"] == "end":
                return records
            else:
                log.warning("ignoring probe event %r during dump", ev["ev"])

    async def quit(self, timeout: float = CLOSE_TIMEOUT) -> None:
        """Ask the probe to exit (the guest then powers off)."""
        await self._send("quit", "quit", timeout)

    async def close(self) -> None:
        """Close the socket (and stop the relay).  Idempotent; never raises."""
        if self._closed:
            return
        self._closed = True
        self._writer.close()
        try:
            await asyncio.wait_for(self._writer.wait_closed(), CLOSE_TIMEOUT)
        except (asyncio.TimeoutError, OSError):
            pass
        if self._stream is not None:
            await asyncio.to_thread(self._stream.close)

    async def __aenter__(self) -> "ProbeChannel":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
