"""Shared fixtures.

``no_leftover_processes`` is autouse: after every test, pass or fail, no QEMU,
sshd or dropbear that migstall started may still be running.

The test series' kernels (stock and patched, tiny config) are built in the
background from the start of the session, at ``nice 19``, when a selected test
needs them (one that uses the ``built_kernels`` fixture: the compiling tests of
test_kernel_build.py and test_vhost_cli.py, all ``slow``, so `make test-slow`).
Those modules run last, and ``kernel_prebuild`` waits for that build.  A cold
stock build is about 900 CPU-seconds (7-8 minutes on 2 idle cores); beside the
TCG tests it took 1480 CPU-seconds and ended 20 minutes into the session
(2026-12-04, CI runs 56-57: 28-30 minutes for a cold `make test`), which is why
`make test` (CI, 20 minutes cold) no longer compiles kernels.
``MIGSTALL_TEST_PREBUILD=0`` turns this off.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Optional

import pytest

from harness import paths, procs

REPO = Path(__file__).resolve().parent.parent
TEST_SERIES = REPO / "patches" / "migstall-dirtylog-tracepoints" / "series.toml"
#: test modules that use the test series' kernels: they run last, after the prebuild
KERNEL_MODULES = ("test_kernel_build.py", "test_vhost_cli.py")
#: the longest a cold build may take (2 cores, busy): 45 min, as test_kernel_build's BUILD_TIMEOUT
PREBUILD_TIMEOUT = 45 * 60

#: this session's mark on every process it starts (see harness.procs): a second test run
#: on the same machine does not count our processes as its leftovers, nor we theirs
SESSION = os.environ.setdefault(procs.SESSION_ENV, uuid.uuid4().hex)

_prebuild: Optional[subprocess.Popen] = None
_prebuild_log: Optional[Path] = None


def pytest_collection_modifyitems(session, config, items):
    """Kernel-using modules last (stable sort: the rest keep their order)."""
    items.sort(key=lambda it: Path(str(it.fspath)).name in KERNEL_MODULES)


def pytest_collection_finish(session):
    global _prebuild, _prebuild_log
    if os.environ.get("MIGSTALL_TEST_PREBUILD", "1") == "0" or session.config.option.collectonly:
        return
    if not any("built_kernels" in getattr(it, "fixturenames", ()) for it in session.items):
        return
    if not Path("/usr/src/linux-source-6.1.tar.xz").is_file():
        return
    _prebuild_log = paths.cache_dir("logs") / f"test-prebuild-{time.strftime('%Y%m%dT%H%M%S')}.log"
    _prebuild_log.parent.mkdir(parents=True, exist_ok=True)
    with open(_prebuild_log, "wb") as log:
        _prebuild = subprocess.Popen(
            ["nice", "-n", "19", sys.executable, "-m", "harness", "kernel", "build", "--manifest",
             str(TEST_SERIES), "--variant", "both", "--config", "tiny"],
            cwd=REPO, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            env={**os.environ, "CI": "true"}, start_new_session=True)


def pytest_sessionfinish(session, exitstatus):
    """An interrupted session stops the build (its artifacts are renamed into
    place only when complete, so nothing half-written stays in the cache)."""
    if _prebuild is not None and _prebuild.poll() is None:
        os.killpg(_prebuild.pid, signal.SIGTERM)
        try:
            _prebuild.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(_prebuild.pid, signal.SIGKILL)
            _prebuild.wait()


@pytest.fixture(scope="session")
def kernel_prebuild():
    """Wait for the background build of the test series' kernels (if one runs);
    the tests then find them in the cache."""
    if _prebuild is None:
        return
    try:
        rc = _prebuild.wait(timeout=PREBUILD_TIMEOUT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the background kernel build did not finish in {PREBUILD_TIMEOUT} s (log: {_prebuild_log})")
    # a failed prebuild is reported by the tests' own build, which shows the error
    if rc != 0:
        print(f"background kernel build exited {rc} (log: {_prebuild_log})", file=sys.stderr)


@pytest.fixture(scope="session")
def built_kernels(kernel_prebuild):
    """A test that needs the test series' kernels compiled (slow: see the module docstring)."""


@pytest.fixture(autouse=True)
def no_leftover_processes():
    before = {pid for pid, _ in procs.leftovers(SESSION)}
    yield
    after = [(pid, cmd) for pid, cmd in procs.leftovers(SESSION) if pid not in before]
    assert not after, f"processes left running by this test: {after}"


@pytest.fixture(scope="session")
def guest_image():
    """The default guest (Debian's kernel + the probe initramfs), built once."""
    from harness.guest.image import build_guest_image

    return build_guest_image()
