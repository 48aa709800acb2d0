"""Live migration over QMP between two :class:`~harness.qemu.machine.VM` s.

* The destination is started with ``-incoming defer`` (:data:`INCOMING_ARGS`);
  :func:`prepare_destination` turns the ``events`` capability on and issues
  ``migrate-incoming`` on a unix socket in the destination's runtime dir.
* :func:`start` turns ``events`` on at the source, lifts the default 32 MiB/s
  bandwidth cap, and sends ``migrate``; it returns the host time just before
  the command was written.
* ``MIGRATION {status}`` and ``MIGRATION_PASS {pass}`` events are collected by
  the VM itself with their QMP timestamps (QEMU host wall clock).
* :func:`wait_end` waits for ``completed``/``failed``/``cancelled``;
  :func:`cancel` sends ``migrate_cancel``; :func:`query` returns
  ``query-migrate`` (``setup-time``, ``total-time``, ``downtime`` in ms).

Default timeouts are documented per function; failures raise MigrationError.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from harness.errors import MigrationError, QEMUError
from harness.qemu.machine import VM, event_time_ns

log = logging.getLogger(__name__)

INCOMING_ARGS = ("-incoming", "defer")
#: bytes/s; QEMU's default (32 MiB/s) would make every run bandwidth-bound
MAX_BANDWIDTH = 8 << 30
#: bytes/s while the harness still needs the source guest.  Migration starts
#: held at this rate so that precopy cannot converge, and so complete, before
#: the probe's data is collected (or ``migrate_cancel`` is sent): on a fast
#: host an unheld migration of a small guest completes within milliseconds of
#: pass 1, and a completed source guest is paused.  Dirty-log start and pass 1
#: happen in setup, before any byte is rate-limited, so the measured columns
#: are unaffected; :func:`release` lifts the limit.
HOLD_BANDWIDTH = 1 << 20
#: seconds to wait for MIGRATION_PASS 1 after ``migrate``
DEFAULT_FIRST_PASS_TIMEOUT = 120.0
END_STATES = ("completed", "failed", "cancelled")


def uri_for(dst: VM) -> str:
    return f"unix:{dst.path('migrate.sock')}"


async def set_events(vm: VM) -> None:
    await vm.cmd("migrate-set-capabilities",
                 {"capabilities": [{"capability": "events", "state": True}]})


async def prepare_destination(dst: VM) -> str:
    """Enable events and listen; return the URI the source must use."""
    await set_events(dst)
    uri = uri_for(dst)
    await dst.cmd("migrate-incoming", {"uri": uri})
    return uri


async def start(src: VM, uri: str, auto_converge: bool = False) -> int:
    """Send ``migrate``; return the local wall time (ns) just before sending it.
    ``auto_converge``: QEMU throttles the vCPUs when precopy does not converge
    (used when the guest keeps writing until the end, as with ``verify``)."""
    await set_events(src)
    if auto_converge:
        await src.cmd("migrate-set-capabilities",
                      {"capabilities": [{"capability": "auto-converge", "state": True}]})
    await src.cmd("migrate-set-parameters", {"max-bandwidth": HOLD_BANDWIDTH})
    sent = time.time_ns()
    try:
        await src.cmd("migrate", {"uri": uri})
    except QEMUError as exc:
        raise MigrationError(f"migrate was refused: {exc.one_line()}", src.log_path) from exc
    return sent


async def release(src: VM) -> None:
    """Lift the hold of :func:`start`: the migration runs at full speed and converges."""
    await src.cmd("migrate-set-parameters", {"max-bandwidth": MAX_BANDWIDTH})


def _status_is(*states: str):
    return lambda ev: ev.get("data", {}).get("status") in states


async def wait_pass(src: VM, n: int = 1, timeout: float = DEFAULT_FIRST_PASS_TIMEOUT) -> Dict[str, Any]:
    """The MIGRATION_PASS event with ``pass == n``; MigrationError if the
    migration ends first or nothing arrives within ``timeout``."""
    import asyncio

    want = asyncio.ensure_future(src.wait_event("MIGRATION_PASS", timeout,
                                                match=lambda e: e.get("data", {}).get("pass") == n))
    end = asyncio.ensure_future(src.wait_event("MIGRATION", timeout, match=_status_is("failed", "cancelled")))
    try:
        done, _ = await asyncio.wait({want, end}, return_when=asyncio.FIRST_COMPLETED)
        if want in done and not want.exception():
            return want.result()
        if end in done and not end.exception():
            raise MigrationError(f"migration {end.result()['data']['status']} before pass {n}", src.log_path)
        exc = (want if want in done else end).exception()
        raise MigrationError(f"no MIGRATION_PASS {n}: {exc}", src.log_path) from exc
    finally:
        for f in (want, end):
            f.cancel()
        # how the two cancelled waits end is not news; a cancellation of this task
        # arriving meanwhile still propagates out of gather (a bare except
        # BaseException around each await swallowed it)
        await asyncio.gather(want, end, return_exceptions=True)


async def wait_end(src: VM, timeout: float, since: int = 0) -> Dict[str, Any]:
    """The MIGRATION event with a final status (completed/failed/cancelled), at
    index >= ``since`` of the source's events (a second migration's end)."""
    try:
        return await src.wait_event("MIGRATION", timeout, match=_status_is(*END_STATES), since=since)
    except QEMUError as exc:
        raise MigrationError(f"migration did not end: {exc.one_line()}", src.log_path) from exc


async def cancel(src: VM) -> int:
    """Send ``migrate_cancel``; return the local wall time (ns) before sending."""
    sent = time.time_ns()
    await src.cmd("migrate_cancel")
    return sent


async def query(vm: VM) -> Dict[str, Any]:
    return await vm.cmd("query-migrate")


#: QEMU (7.2 at least) sets ``completed`` (and sends its event) before the
#: migration thread computes total-time and downtime; there is no event for the
#: latter, so a query right after the event may read 0.  Re-query this often,
#: this many times (bounded: 2 s), then fall back to event times.
STATS_RETRY_S = 0.05
STATS_RETRIES = 40


async def query_completed(vm: VM) -> Dict[str, Any]:
    """``query-migrate`` after ``completed``, once total-time is published.

    If it never is, ``total-time`` is taken from the QMP timestamps of
    ``MIGRATION setup`` -> ``completed`` and ``downtime`` from ``STOP`` ->
    ``completed`` (both marked in ``_migstall_derived``)."""
    import asyncio

    q: Dict[str, Any] = {}
    for _ in range(STATS_RETRIES):
        q = await query(vm)
        if q.get("status") != "completed" or q.get("total-time"):
            return q
        await asyncio.sleep(STATS_RETRY_S)
    st = {e["status"]: e["t_ns"] for e in statuses(vm)}
    stop = [event_time_ns(e) for e in vm.events if e.get("event") == "STOP"]
    if "setup" in st and "completed" in st:
        q = dict(q)
        q["total-time"] = round((st["completed"] - st["setup"]) / 1e6)
        if stop:
            q["downtime"] = round((st["completed"] - stop[-1]) / 1e6)
        q["_migstall_derived"] = "total-time/downtime from QMP event timestamps"
    return q


def statuses(vm: VM) -> List[Dict[str, Any]]:
    """(status, QMP timestamp ns) of every MIGRATION event so far."""
    return [{"status": e["data"]["status"], "t_ns": event_time_ns(e)}
            for e in vm.events if e.get("event") == "MIGRATION"]


def passes(vm: VM) -> List[Dict[str, Any]]:
    return [{"pass": e["data"]["pass"], "t_ns": event_time_ns(e)}
            for e in vm.events if e.get("event") == "MIGRATION_PASS"]


@dataclass(frozen=True)
class MigrationTimes:
    setup_time_ms: Optional[float]
    total_time_ms: Optional[float]
    downtime_ms: Optional[float]
    status: str


def times(q: Dict[str, Any]) -> MigrationTimes:
    def g(k: str) -> Optional[float]:
        v = q.get(k)
        return float(v) if v is not None else None
    return MigrationTimes(g("setup-time"), g("total-time"), g("downtime"), str(q.get("status", "")))
