"""dirtylog.verify/describe against synthetic shim logs holding a source and a
destination QEMU, as the runner produces them (one log, both QEMUs daemonized:
``loaded`` in the launcher's pid, ``forked`` in each child, the KVM lines in the
pidfile pid).  The shim against a real QEMU: tests/test_vhost_parts.py and
test_shim_daemonized below."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, Optional

import pytest

from harness.errors import MigrationError
from harness.hosts.local import LocalHost
from harness.qemu import dirtylog

SRC, DST = 200, 300
OFFER = "check_extension cap=168 fd=11 ret=3"
NO_OFFER = "check_extension cap=168 fd=11 ret=0"
ENABLE = "enable_cap cap=168 args0=0x3 fd=12 ret=0"
HID = "hid KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 fd=11 kernel_answer=3 answered=0"
RING = "enable_cap cap=192 args0=0x10000 fd=12 ret=0"


def _qemu(pid: int, hide: int, *lines: str) -> str:
    """One daemonized QEMU's lines: launcher pid-2, intermediate pid-1, QEMU pid."""
    out = [f"migstall-shim pid={pid - 2} loaded hide_manual={hide}",
           f"migstall-shim pid={pid - 1} forked ppid={pid - 2} hide_manual={hide}",
           f"migstall-shim pid={pid - 1} exit get_dirty_log=0 clear_dirty_log=0",
           f"migstall-shim pid={pid} forked ppid={pid - 1} hide_manual={hide}"]
    out += [f"migstall-shim pid={pid} {line}" for line in lines]
    return "\n".join(out) + "\n"


def _verify(tmp_path: Path, text: str, mode: str, trace: str = "") -> None:
    (tmp_path / dirtylog.SHIM_LOG).write_text(text)
    dirtylog.verify(mode, "kvm", trace, LocalHost(), str(tmp_path), src_pid=SRC, dst_pid=DST)


def _describe(tmp_path: Path, mode: str) -> Dict[str, object]:
    return dirtylog.describe(mode, "kvm", LocalHost(), str(tmp_path), src_pid=SRC, dst_pid=DST)


def test_default_manual_protect_offered_and_enabled(tmp_path: Path) -> None:
    _verify(tmp_path, _qemu(SRC, 0, OFFER, ENABLE, "first clear_dirty_log fd=12")
            + _qemu(DST, 0, OFFER, ENABLE), "default")
    d = _describe(tmp_path, "default")
    assert d["default_effective"] == "manual-protect+initially-set"
    assert d["effective"] == {"src": "manual-protect+initially-set", "dst": "manual-protect+initially-set"}


@pytest.mark.parametrize("src_lines,seen", [
    ((OFFER,), "no successful enable_cap cap=168 args0=0x3"),
    ((OFFER, "enable_cap cap=168 args0=0x3 fd=12 ret=-22"), "ret=-22"),
    ((OFFER, "enable_cap cap=168 args0=0x1 fd=12 ret=0"), "args0=0x1"),
])
def test_default_offered_but_not_enabled_fails(tmp_path: Path, src_lines: tuple, seen: str) -> None:
    with pytest.raises(MigrationError, match=f"source QEMU \\(pid {SRC}\\).*answer 3") as exc:
        _verify(tmp_path, _qemu(SRC, 0, *src_lines) + _qemu(DST, 0, OFFER, ENABLE), "default")
    assert seen in str(exc.value)


def test_default_not_offered_is_bitmap(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="harness.qemu.dirtylog"):
        _verify(tmp_path, _qemu(SRC, 0, NO_OFFER) + _qemu(DST, 0, NO_OFFER), "default")
    assert "default == the classic bitmap here" in caplog.text
    assert _describe(tmp_path, "default")["default_effective"] == "bitmap"


def test_kernel_offering_only_enable_gets_plain_manual_protect(tmp_path: Path) -> None:
    lines = ("check_extension cap=168 fd=11 ret=1", "enable_cap cap=168 args0=0x1 fd=12 ret=0")
    _verify(tmp_path, _qemu(SRC, 0, *lines) + _qemu(DST, 0, *lines), "default")
    assert _describe(tmp_path, "default")["default_effective"] == "manual-protect"


@pytest.mark.parametrize("mode,src,dst", [
    ("default", (0, OFFER, ENABLE), (1, HID)),
    ("default", (0, OFFER, ENABLE), (0, RING)),
    ("legacy", (1, HID), (0, OFFER, ENABLE)),
    ("ring", (0, RING), (0, OFFER, ENABLE)),
])
def test_destination_in_another_mode_fails(tmp_path: Path, mode: str, src: tuple, dst: tuple) -> None:
    with pytest.raises(MigrationError, match=f"destination QEMU \\(pid {DST}\\)"):
        _verify(tmp_path, _qemu(SRC, *src) + _qemu(DST, *dst), mode)


def test_destination_lines_cannot_prove_the_source(tmp_path: Path) -> None:
    # the source's shim saw nothing dirty-log related; only the destination ran the ring
    with pytest.raises(MigrationError, match=f"'ring'.*source QEMU \\(pid {SRC}\\)"):
        _verify(tmp_path, _qemu(SRC, 0) + _qemu(DST, 0, RING), "ring")
    with pytest.raises(MigrationError, match=f"no shim lines from the source QEMU \\(pid {SRC}\\)"):
        _verify(tmp_path, _qemu(DST, 0, RING), "ring")
    with pytest.raises(MigrationError, match="never loaded"):
        _verify(tmp_path, "", "ring")


def test_legacy_ok(tmp_path: Path) -> None:
    _verify(tmp_path, _qemu(SRC, 1, HID, "exit get_dirty_log=9 clear_dirty_log=0")
            + _qemu(DST, 1, HID), "legacy")
    assert _describe(tmp_path, "legacy")["effective"] == {"src": "bitmap", "dst": "bitmap"}


@pytest.mark.parametrize("clear", ["first clear_dirty_log fd=12", "exit get_dirty_log=3 clear_dirty_log=7"])
def test_legacy_clear_dirty_log_seen_by_shim_fails(tmp_path: Path, clear: str) -> None:
    # no kvm_clear_dirty_log trace line (QEMU without that trace event): the shim's evidence decides
    with pytest.raises(MigrationError, match="KVM_CLEAR_DIRTY_LOG.*seen by the shim"):
        _verify(tmp_path, _qemu(SRC, 1, HID, clear) + _qemu(DST, 1, HID), "legacy")


def test_legacy_clear_dirty_log_trace_line_still_fails(tmp_path: Path) -> None:
    with pytest.raises(MigrationError, match="kvm_clear_dirty_log trace lines"):
        _verify(tmp_path, _qemu(SRC, 1, HID) + _qemu(DST, 1, HID), "legacy",
                trace="1@1.0:kvm_clear_dirty_log slot#1 start 0x0 size 0x40")


def test_ring_ok(tmp_path: Path) -> None:
    _verify(tmp_path, _qemu(SRC, 0, RING) + _qemu(DST, 0, RING), "ring")
    assert _describe(tmp_path, "ring")["effective"] == {"src": "ring", "dst": "ring"}
    with pytest.raises(MigrationError, match="'default' was altered"):
        _verify(tmp_path, _qemu(SRC, 0, RING) + _qemu(DST, 0, RING), "default")


def test_describe_without_kvm_is_empty(tmp_path: Path) -> None:
    assert dirtylog.describe("default", "tcg", LocalHost(), str(tmp_path)) == {}


def _read_pid(path: Path, timeout: float = 30.0) -> Optional[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().strip():
            return int(path.read_text())
        time.sleep(0.1)
    return None


@pytest.mark.skipif(not os.access("/dev/kvm", os.R_OK | os.W_OK) or shutil.which("qemu-system-x86_64") is None,
                    reason="needs /dev/kvm (capability checks only) and QEMU")
@pytest.mark.parametrize("mode", ["default", "legacy"])
def test_shim_daemonized(tmp_path: Path, mode: str) -> None:
    """A -daemonize'd QEMU (as the runner starts it): the pidfile pid's own lines prove the mode."""
    setup = dirtylog.setup(mode, 0, "kvm", LocalHost(), str(tmp_path))
    pidfile = tmp_path / "qemu.pid"
    subprocess.run(["qemu-system-x86_64", "-name", "migstall-shimcheck", "-accel", "kvm", "-machine", "none",
                    "-nodefaults", "-display", "none", "-daemonize", "-pidfile", str(pidfile),
                    "-qmp", f"unix:{tmp_path}/qmp.sock,server=on,wait=off"],
                   capture_output=True, timeout=60, env={**os.environ, **setup.env}, check=True)
    pid = _read_pid(pidfile)
    assert pid is not None
    try:
        dirtylog.verify(mode, "kvm", "", LocalHost(), str(tmp_path), src_pid=pid)
        text = (tmp_path / dirtylog.SHIM_LOG).read_text()
        assert f"pid={pid} forked" in text and f"pid={pid} loaded" not in text
    finally:
        _stop(pid)


def _stop(pid: int) -> None:
    """SIGTERM, then SIGKILL after 10 s; returns once the process is gone."""
    deadline = time.monotonic() + 10
    sig = signal.SIGTERM
    while True:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        if time.monotonic() > deadline:
            sig = signal.SIGKILL
        else:
            sig = 0
        time.sleep(0.1)


_MEMSLOT_SCRIPT = r"""
import ctypes, fcntl, mmap, os, struct
KVM_CREATE_VM, KVM_SET_USER_MEMORY_REGION = 0xAE01, 0x4020AE46
kvm = os.open("/dev/kvm", os.O_RDWR)
vm = fcntl.ioctl(kvm, KVM_CREATE_VM, 0)
mem = mmap.mmap(-1, 2 << 20)
addr = ctypes.addressof(ctypes.c_char.from_buffer(mem))
for flags in (0, 1, 0):   # create the slot, dirty logging on, off
    fcntl.ioctl(vm, KVM_SET_USER_MEMORY_REGION, struct.pack("IIQQQ", 0, flags, 0, 2 << 20, addr))
"""


@pytest.mark.skipif(not os.access("/dev/kvm", os.R_OK | os.W_OK), reason="needs /dev/kvm (a VM with no vCPU)")
def test_shim_times_flags_only_memslot_ioctls(tmp_path: Path) -> None:
    """kvm_ioctl_ms: the shim times the memslot ioctls that only switch dirty
    logging (a real KVM VM fd, no vCPU, so it runs without VMX/SVM too)."""
    setup = dirtylog.setup("default", 0, "kvm", LocalHost(), str(tmp_path))
    t0 = time.time_ns()
    proc = subprocess.run([sys.executable, "-c", _MEMSLOT_SCRIPT], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **setup.env})
    t1 = time.time_ns()
    assert proc.returncode == 0, proc.stderr
    calls = dirtylog.memslot_ioctls((tmp_path / dirtylog.SHIM_LOG).read_text(), None)
    assert [(c.slot, c.old_flags, c.new_flags, c.ret) for c in calls] == [(0, 0, 1, 0), (0, 1, 0, 0)]
    assert all(0 < c.dur_ns < 10**9 and t0 <= c.end_ns <= t1 for c in calls)
    assert [c.enables_logging for c in calls] == [True, False]
    ms = dirtylog.enable_ioctl_ms(calls, t0, t1)
    assert ms == calls[0].dur_ns / 1e6
    assert dirtylog.enable_ioctl_ms(calls, t1, t1 + 1) is None       # none returned in that span
