"""Aliased guests on the QEMU side: the alias devices' arguments, the run's
plan, the alias mapping in smaps and QEMU's memory.  No QEMU is started."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.guest.image import GuestImage
from harness.qemu import alias, backing
from harness.qemu.alias import AliasLayout
from harness.qemu.dirtylog import ModeSetup
from harness.run import plan
from harness.scenario import Scenario

IMAGE = GuestImage(kernel=Path("/cache/vmlinuz"), initrd=Path("/cache/initrd"), kernel_release="6.1.0",
                   channel="virtio")


def sc(**kw) -> Scenario:
    return Scenario(**{**dict(mem_mib=16384, alias_mib=512, backing="memfd", end_action="cancel", accel="tcg"),
                       **kw})


def plan_facts(**kw) -> plan.HostFacts:
    base = dict(accel="tcg", qemu_version=(7, 2, 22), kernel="/h/vmlinuz", initrd="/h/initrd",
                src_rundir="/run/s", dst_rundir="/run/d", mode=ModeSetup())
    return plan.HostFacts(**{**base, **kw})


def test_layout_and_qemu_args():
    layout = AliasLayout(16384, 512)
    args = alias.qemu_args(layout, "/dev/shm/x/alias-ram")
    assert args[:2] == ["-global", "q35-pcihost.pci-hole64-size=32768M"]
    objs = [a for a in args if a.startswith("memory-backend-file")]
    devs = [a for a in args if a.startswith("ivshmem-plain")]
    assert len(objs) == len(devs) == 32
    assert objs[0] == "memory-backend-file,id=migstall-alias0,size=512M,mem-path=/dev/shm/x/alias-ram,share=on"
    assert devs[0] == "ivshmem-plain,id=alias0,memdev=migstall-alias0,master=on,bus=pcie.0,addr=0x02.0,multifunction=on"
    assert devs[9] == "ivshmem-plain,id=alias9,memdev=migstall-alias9,master=on,bus=pcie.0,addr=0x03.1"
    assert len(set(AliasLayout(alias.MAX_DEVICES * 2, 2).addresses())) == alias.MAX_DEVICES
    assert AliasLayout(alias.MAX_DEVICES * 2, 2).addresses()[-1] == "0x1e.7"
    assert alias.hole64_mib(AliasLayout(2 << 20, 32768)) == (2 << 20) + 32768
    assert alias.address_bits_needed(AliasLayout(2 << 20, 32768)) == 42


def test_plan_of_an_aliased_guest():
    p = plan.plan_run(sc(), plan_facts(src_alias_path="/dev/shm/s/alias-ram", dst_alias_path="/dev/shm/d/alias-ram"),
                    IMAGE, "r1")
    src, dst = list(p.src.argv), list(p.dst.argv)
    assert src[src.index("-m") + 1] == "256M"
    assert "memory-backend-memfd,id=migstall-ram,size=256M,share=on" in src
    assert sum("mem-path=/dev/shm/s/alias-ram" in a for a in src) == 32
    assert sum("mem-path=/dev/shm/d/alias-ram" in a for a in dst) == 32 and not any("/s/alias" in a for a in dst)
    cmdline = src[src.index("-append") + 1]
    assert "migstall.alias=32" in cmdline.split() and "migstall.touch_mib=0" in cmdline.split()
    with pytest.raises(ValueError, match="shared file"):
        plan.plan_run(sc(), plan_facts(), IMAGE, "r1")


def test_page_size_and_memory_of_the_alias_mapping():
    smaps = ("7f0000000000-7f0020000000 rw-s 00000000 00:1a 12 /dev/shm/migstall-alias-src-x/alias-ram\n"
             "Rss:              524288 kB\nKernelPageSize:        4 kB\nShmemPmdMapped:        0 kB\n"
             "7f1000000000-7f1010000000 rw-s 00000000 00:1b 13 /memfd:migstall-ram (deleted)\n"
             "Rss:              262144 kB\nKernelPageSize:        4 kB\n")
    info = backing.page_size_obtained(smaps, 512, alias.ALIAS_FILE)
    assert info.page_size_kib == 4 and info.mapping["path"].endswith("/alias-ram")
    assert backing.page_size_obtained(smaps, 512, "nothing").page_size_kib is None
    mem = backing.parse_memory("VmHWM:\t17000000 kB\nRssShmem:\t16800000 kB\nName:\tqemu\n",
                               "Rss:  17000000 kB\nPss:  1100000 kB\nPss_Shmem:  800000 kB\n")
    assert mem == {"VmHWM": 17000000, "RssShmem": 16800000, "Pss": 1100000, "Pss_Shmem": 800000}
