"""The run's plan (harness.run.plan): scenario + host facts -> QEMU argv, without QEMU."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from harness.guest.image import GuestImage
from harness.qemu.dirtylog import ModeSetup
from harness.run.plan import HostFacts, RunPlan, plan_run
from harness.scenario import Scenario

IMAGE = GuestImage(kernel=Path("/cache/vmlinuz"), initrd=Path("/cache/initrd"), kernel_release="6.1.0",
                   channel="virtio")
CMDLINE = ("console=ttyS0,115200 loglevel=4 panic=-1 tsc=reliable pci=noearly cryptomgr.notests "
           "nohz_full=1 rcu_nocbs=1 irqaffinity=0 migstall.channel=virtio migstall.touch_mib=0 "
           "migstall.loops=pio,write migstall.threshold_us=50")


def facts(**kw) -> HostFacts:
    base = dict(accel="tcg", qemu_version=(7, 2, 22), kernel="/h/vmlinuz", initrd="/h/initrd",
                src_rundir="/run/s", dst_rundir="/run/d", mode=ModeSetup())
    return HostFacts(**{**base, **kw})


def guest(rundir: str) -> list:
    return ["-kernel", "/h/vmlinuz", "-initrd", "/h/initrd", "-append", CMDLINE, "-no-reboot",
            "-chardev", f"file,id=migstall-console,path={rundir}/console.log", "-serial", "chardev:migstall-console",
            "-chardev", f"socket,id=migstall-probe,path={rundir}/probe.sock,server=on,wait=off",
            "-device", "virtio-serial-pci,id=migstall-vser",
            "-device", "virtserialport,bus=migstall-vser.0,chardev=migstall-probe,name=migstall.0"]


def test_tcg_verify_plan_on_old_qemu():
    """TCG + verify on QEMU 7.2: 8 KiB of RAM padding, the destination paused (-S)."""
    plan = plan_run(Scenario(name="x", mem_mib=512, accel="tcg", verify=True), facts(), IMAGE, "r1",
                    src_env={"X": "1"})
    machine = ["-accel", "tcg,thread=multi", "-cpu", "max", "-machine", "q35,memory-backend=migstall-ram",
               "-smp", "2", "-m", "524296K", "-object", "memory-backend-ram,id=migstall-ram,size=524296K",
               "-nodefaults", "-no-user-config"]
    assert list(plan.src.argv) == machine + guest("/run/s")
    assert list(plan.dst.argv) == machine + guest("/run/d") + ["-incoming", "defer", "-S"]
    assert (plan.src.name, plan.dst.name) == ("r1-src", "r1-dst")
    assert plan.src.env == {"X": "1"} and plan.dst.env == {}
    assert (plan.accel, plan.cpu_model, plan.ram_pad_kib, plan.verifying) == ("tcg", "max", 8, True)
    assert plan.qemu == "qemu-system-x86_64" and plan.launch_timeout_s == 300.0


def test_cancel_verify_plans_a_second_destination():
    """cancel + verify: the cancelled migration's destination runs as it comes; a
    second one (its own runtime directory, paused by -S) receives the migration
    that completes and whose memory is compared.  The padding applies."""
    sc = Scenario(name="x", mem_mib=512, accel="tcg", verify=True, end_action="cancel")
    plan = plan_run(sc, facts(dst_again_rundir="/run/d2"), IMAGE, "r1")
    assert plan.verifying and plan.ram_pad_kib == 8
    assert plan.dst.argv[-2:] == ("-incoming", "defer")
    assert plan.dst_again is not None and plan.dst_again.name == "r1-dst2"
    assert plan.dst_again.argv[-3:] == ("-incoming", "defer", "-S")
    assert "path=/run/d2/probe.sock" in " ".join(plan.dst_again.argv)
    assert list(plan.dst_again.argv[:-3]) == [a.replace("/run/d/", "/run/d2/") for a in plan.dst.argv[:-2]]
    with pytest.raises(ValueError, match="dst_again_rundir"):
        plan_run(sc, facts(), IMAGE, "r1")
    # without verify, or with complete, there is no second destination
    assert plan_run(dataclasses.replace(sc, verify=False), facts(), IMAGE, "r1").dst_again is None
    assert plan_run(dataclasses.replace(sc, end_action="complete"), facts(), IMAGE, "r1").dst_again is None


def test_kvm_legacy_plan():
    """KVM: the mode's accel options and env on both sides; no padding, no -S without verify."""
    mode = ModeSetup(accel_opts=("dirty-ring-size=4096",), env={"LD_PRELOAD": "/h/shim.so"})
    sc = Scenario(name="k", mem_mib=1024, vcpus=2, backing="memfd", prealloc=True, accel="kvm",
                  qemu="/opt/qemu", verify=False)
    plan = plan_run(sc, facts(accel="kvm", qemu_version=(9, 2, 0), mode=mode, prefix=("/h/wrap",)), IMAGE, "r2")
    assert list(plan.src.argv[:6]) == ["-accel", "kvm,dirty-ring-size=4096", "-cpu", "host",
                                       "-machine", "q35,memory-backend=migstall-ram"]
    assert "memory-backend-memfd,id=migstall-ram,size=1024M,share=on,prealloc=on" in plan.src.argv
    assert plan.dst.argv[-2:] == ("-incoming", "defer")
    assert plan.src.env == plan.dst.env == {"LD_PRELOAD": "/h/shim.so"}
    assert (plan.cpu_model, plan.ram_pad_kib, plan.verifying, plan.prefix) == ("host", 0, False, ("/h/wrap",))
    assert plan.qemu == "/opt/qemu" and plan.launch_timeout_s == 310.0     # + 10 s per GiB prealloc
    assert plan.src.path("probe.sock") == "/run/s/probe.sock"


def test_plan_is_frozen():
    plan = plan_run(Scenario(name="x", accel="tcg"), facts(), IMAGE, "r3")
    assert isinstance(plan, RunPlan)
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.accel = "kvm"  # type: ignore[misc]
