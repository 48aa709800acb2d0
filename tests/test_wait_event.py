"""VM.wait_event and migration.wait_pass without QEMU: the event bookkeeping
only (a VM object that was never launched, events fed by hand)."""

from __future__ import annotations

import asyncio
import time

import pytest

from harness.hosts.local import LocalHost
from harness.qemu import migration
from harness.qemu.machine import VM, RunState


@pytest.mark.parametrize("yields", range(8))
def test_wait_pass_returns_when_its_event_arrives(yields):
    """MIGRATION_PASS 1 wakes both of wait_pass's waiters; the one it no longer
    needs is cancelled while the next event (MIGRATION active, a few loop turns
    later) sets its new waiter.  On Python < 3.12 asyncio.wait_for swallowed
    that cancellation and the waiter sat out its whole timeout (CI: 120 s)."""
    async def main() -> float:
        vm = VM(LocalHost(), "wait-pass", [])
        vm.qmp = object()          # wait_event only checks that QMP is there
        vm._state = RunState.RUNNING   # and that the VM is running (as if launched)

        async def arrive() -> None:
            await asyncio.sleep(0.01)
            vm.events.append({"event": "MIGRATION_PASS", "data": {"pass": 1}})
            vm._wake()
            for _ in range(yields):
                await asyncio.sleep(0)
            vm.events.append({"event": "MIGRATION", "data": {"status": "active"}})
            vm._wake()

        feeder = asyncio.ensure_future(arrive())
        t0 = time.monotonic()
        ev = await migration.wait_pass(vm, 1, timeout=5)
        took = time.monotonic() - t0
        await feeder
        assert ev["data"]["pass"] == 1
        return took

    assert asyncio.run(main()) < 1.0
