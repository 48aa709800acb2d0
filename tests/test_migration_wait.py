"""harness.qemu.migration.wait_pass with a stand-in event source (no QEMU)."""

from __future__ import annotations

import asyncio

import pytest

from harness.errors import MigrationError
from harness.qemu import migration


class Events:
    """wait_event() answers from a dict of ready events; the rest wait until cancelled."""

    def __init__(self, ready):
        self.ready = ready
        self.log_path = "/dev/null"
        self.waits = 0

    async def wait_event(self, name, timeout, match=None):
        self.waits += 1
        if name in self.ready and (match is None or match(self.ready[name])):
            return self.ready[name]
        await asyncio.sleep(3600)


def test_first_pass_returned():
    ev = {"event": "MIGRATION_PASS", "data": {"pass": 1}}
    assert asyncio.run(migration.wait_pass(Events({"MIGRATION_PASS": ev}))) == ev


def test_cancelled_migration_is_an_error():
    src = Events({"MIGRATION": {"data": {"status": "cancelled"}}})
    with pytest.raises(MigrationError, match="migration cancelled before pass 1"):
        asyncio.run(migration.wait_pass(src))


def test_cancelling_the_caller_propagates():
    """A cancelled caller must see CancelledError, not a wait that swallowed it."""
    async def main():
        task = asyncio.ensure_future(migration.wait_pass(Events({})))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert task.cancelled()
    asyncio.run(asyncio.wait_for(main(), 10))
