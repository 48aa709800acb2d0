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


@pytest.fixture(scope="session")
def guest_image():
    """The default guest (Debian's kernel + the probe initramfs), built once."""
    from harness.guest.image import build_guest_image

    return build_guest_image()
