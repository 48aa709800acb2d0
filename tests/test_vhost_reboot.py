"""A scenario's ``l1_cmdline`` on the virtual host, and reboots.

In a module of its own, so that its L1 never runs beside test_vhost.py's
module-wide one: two L1s under TCG share the 2 cores, and a boot then took
over 240 s (issue 16).

Slow (`make test-slow`): two L1 boots, about 56 s.  `make test` checks that a
scenario's ``l1_cmdline`` reaches L1 in test_vhost_cli.py.
"""

from __future__ import annotations

import os
import shutil

import pytest

from harness.hosts.local import LocalHost
from harness.hosts.virtual import VirtualHost

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None or shutil.which("sshd") is None
                                 and not os.path.exists("/usr/sbin/sshd"),
                                 reason="needs qemu-system-x86 and openssh-server")]


def _alive(pid: int) -> bool:
    return LocalHost().pid_alive(pid)      # a zombie counts as gone


def test_l1_cmdline_and_reboot():
    """kvm.tdp_mmu=0 (the legacy MMU) reaches L1's command line (for Debian's
    modular KVM too); configure() reboots only on a change; every boot reports
    its init stages."""
    kernel = os.environ.get("MIGSTALL_TEST_L1_KERNEL") or "debian"
    with VirtualHost(kernel=kernel, cmdline_extra="kvm.tdp_mmu=0") as vh:
        vh.start()
        assert set(vh.boot_stages) >= {"init", "modules", "kvm-pin", "network", "sshd", "ready"}, vh.boot_stages
        assert vh.run(["cat", "/sys/module/kvm/parameters/tdp_mmu"]).text.strip() == "N"
        assert vh.configure("kvm.tdp_mmu=0") is False          # unchanged: no reboot
        first = vh.pid
        assert vh.configure("") is True
        second = vh.pid
        assert second != first and not _alive(first)
        assert vh.run(["cat", "/sys/module/kvm/parameters/tdp_mmu"]).text.strip() == "Y"
    assert not _alive(first) and not _alive(second)
