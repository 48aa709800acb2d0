"""Shared fixtures.

``no_leftover_processes`` is autouse: after every test, pass or fail, no QEMU,
sshd or dropbear that migstall started may still be running.
"""

from __future__ import annotations

import pytest

from harness import procs


@pytest.fixture(autouse=True)
def no_leftover_processes():
    before = {pid for pid, _ in procs.leftovers()}
    yield
    after = [(pid, cmd) for pid, cmd in procs.leftovers() if pid not in before]
    assert not after, f"processes left running by this test: {after}"
