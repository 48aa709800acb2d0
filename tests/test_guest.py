"""The measured guest: kernel fetch, initramfs cache, and the probe over its
channel, on a real QEMU under TCG (``-accel tcg -M q35 -m 512 -smp 2``).

QEMU is started here directly (``-daemonize -pidfile``) and stopped in
``finally``; every QEMU carries ``migstall`` in its argv for the leftover check.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
from pathlib import Path
from typing import Iterator, Tuple

import pytest

from harness.errors import GuestError, UserError
from harness.guest import image as image_mod
from harness.guest.channel import ProbeChannel
from harness.guest.image import GuestImage, build_guest_image, guest_qemu_args
from harness.hosts.local import LocalHost
from harness.scenario import Scenario

#: seconds; generous because the machine is shared and TCG is slow
HELLO_TIMEOUT = 90.0
READY_TIMEOUT = 120.0
DUMP_TIMEOUT = 60.0
LAUNCH_TIMEOUT = 60.0


@contextlib.contextmanager
def running_guest(image: GuestImage, scenario: Scenario, name: str) -> Iterator[Tuple[LocalHost, str, str]]:
    """A daemonized TCG QEMU booting ``image``; yields (host, channel socket, console log)."""
    host = LocalHost()
    with host.runtime_dir(f"migstall-test-{name}-") as rd:
        sock, console, pidfile = f"{rd}/probe.sock", f"{rd}/console.log", f"{rd}/qemu.pid"
        argv = ["qemu-system-x86_64", "-name", f"migstall-test-{name}", "-accel", "tcg",
                "-M", "q35", "-cpu", "max", "-m", str(scenario.mem_mib), "-smp", str(scenario.vcpus),
                "-nodefaults", "-display", "none", "-daemonize", "-pidfile", pidfile,
                "-D", f"{rd}/qemu.log", "-msg", "timestamp=on"]
        argv += guest_qemu_args(image, kernel=str(image.kernel), initrd=str(image.initrd),
                                channel_socket=sock, console_log=console, scenario=scenario)
        pid = None
        try:
            subprocess.run(argv, check=True, timeout=LAUNCH_TIMEOUT, capture_output=True)
            pid = int(Path(pidfile).read_text())
            yield host, sock, console
        finally:
            if pid is None and Path(pidfile).exists():
                pid = int(Path(pidfile).read_text())
            if pid is not None:
                host.stop_pid(pid)


def test_missing_guest_kernel_is_user_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        build_guest_image(tmp_path / "no-such-bzImage")
    junk = tmp_path / "junk"
    junk.write_bytes(b"not a kernel" * 100)
    with pytest.raises(UserError, match="not an x86 kernel image"):
        build_guest_image(junk)


def test_image_is_cached_and_rebuilt_when_inputs_change(guest_image, tmp_path, monkeypatch):
    again = build_guest_image()
    assert again == guest_image
    assert again.initrd.stat().st_mtime_ns == guest_image.initrd.stat().st_mtime_ns
    assert guest_image.channel == "virtio"          # Debian's kernel: virtio_console as a module
    assert guest_image.kernel_release

    init = tmp_path / "init"
    init.write_bytes(image_mod.INIT_SCRIPT.read_bytes() + b"# changed\n")
    monkeypatch.setattr(image_mod, "INIT_SCRIPT", init)
    changed = build_guest_image()
    try:
        assert changed.initrd != guest_image.initrd
        assert changed.kernel == guest_image.kernel
    finally:
        for p in changed.initrd.parent.glob(changed.initrd.name.split(".")[0] + ".*"):
            p.unlink()


async def _session(sock, console: str, scenario: Scenario):
    chan = await ProbeChannel.open(sock, log_path=console)
    try:
        hello = await chan.wait_hello(HELLO_TIMEOUT)
        ready = await chan.wait_ready(READY_TIMEOUT)
        marks = [await chan.mark() for _ in range(3)]
        await asyncio.sleep(0.5)  # a short measure window
        records = await chan.dump(DUMP_TIMEOUT)
        await chan.quit()
        return hello, ready, marks, records
    finally:
        await chan.close()


def _check(scenario: Scenario, hello, ready, marks, records, channel: str) -> None:
    assert hello["vcpus"] == scenario.vcpus
    assert hello["channel"] == channel
    assert hello["clock"] in ("tsc", "mono")
    assert ready.touched_mib > 0 and ready.prefault_ms > 0
    assert ready.loops == scenario.loop_list
    for m in marks:
        assert m.host_send_ns <= m.host_recv_ns and m.guest_ns > 0
    assert marks[0].guest_ns < marks[1].guest_ns < marks[2].guest_ns
    assert [r.cpu for r in records] == list(range(scenario.vcpus))
    assert tuple(r.cls for r in records) == scenario.loop_list
    for r in records:
        assert r.iters > 0 and r.threshold_us == scenario.threshold_us
        assert sum(r.hist_log2us) == r.iters
        assert all(d >= scenario.threshold_us * 1000 - 1000 for _, d in r.stalls)
        assert [t for t, _ in r.stalls] == sorted(t for t, _ in r.stalls)


def test_probe_over_virtio_serial(guest_image):
    scenario = Scenario(mem_mib=512, vcpus=2, touch_mib=96, loops=("pio", "write"))
    with running_guest(guest_image, scenario, "virtio") as (host, sock_path, console):
        sock = host.connect_unix(sock_path)
        hello, ready, marks, records = asyncio.run(_session(sock, console, scenario))
    _check(scenario, hello, ready, marks, records, "virtio")
    assert ready.touched_mib == 96


def test_probe_over_serial_with_user_kernel(guest_image, tmp_path):
    # a bzImage without modules or config next to it: the channel falls back to ttyS1
    bz = tmp_path / "bzImage"
    shutil.copyfile(guest_image.kernel, bz)
    image = build_guest_image(bz)
    assert image.channel == "serial" and image.kernel_release == guest_image.kernel_release
    scenario = Scenario(mem_mib=512, vcpus=2, touch_mib=64, loops=("cpu",))
    with running_guest(image, scenario, "serial") as (host, sock_path, console):
        sock = host.connect_unix(sock_path)
        hello, ready, marks, records = asyncio.run(_session(sock, console, scenario))
    _check(scenario, hello, ready, marks, records, "serial")


def test_probe_errors_and_timeouts(guest_image):
    scenario = Scenario(mem_mib=512, vcpus=2, loops=("pio", "bogus"))

    async def go(sock, console):
        chan = await ProbeChannel.open(sock, log_path=console)
        try:
            with pytest.raises(GuestError, match=r"timed out after 0.2s waiting for the probe's hello"):
                await chan.wait_hello(0.2)
            with pytest.raises(GuestError, match="unknown loop 'bogus'") as info:
                await chan.wait_hello(HELLO_TIMEOUT)
            assert info.value.log_path == console
            with pytest.raises(GuestError, match="guest closed the channel"):
                await chan.wait_ready(READY_TIMEOUT)
        finally:
            await chan.close()

    with running_guest(guest_image, scenario, "error") as (host, sock_path, console):
        asyncio.run(go(host.connect_unix(sock_path), console))


def test_kernel_cmdline_carries_the_scenario(guest_image):
    scenario = Scenario(vcpus=4, touch_mib=128, loops=("pio", "cpu"), threshold_us=80)
    args = guest_qemu_args(guest_image, kernel="/k", initrd="/i", channel_socket="/r/p,s.sock",
                           console_log="/r/c.log", scenario=scenario, probe_params={"write_mib": 16})
    append = args[args.index("-append") + 1].split()
    for item in ("migstall.touch_mib=128", "migstall.loops=pio,cpu,cpu,cpu", "migstall.threshold_us=80",
                 "migstall.channel=virtio", "migstall.write_mib=16", "nohz_full=1-3", "console=ttyS0,115200"):
        assert item in append
    assert "socket,id=migstall-probe,path=/r/p,,s.sock,server=on,wait=off" in args
    assert any(a.startswith("virtserialport,") and a.endswith("name=migstall.0") for a in args)
    with pytest.raises(ValueError, match="unknown probe parameters"):
        guest_qemu_args(guest_image, kernel="/k", initrd="/i", channel_socket="/s", console_log="/c",
                        scenario=scenario, probe_params={"bogus": 1})
