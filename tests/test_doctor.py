"""migstall doctor and the accelerator choice, on this machine and against real QEMU.

This machine has a /dev/kvm but no vmx/svm CPU flag (a Linux guest hangs under
-accel kvm): doctor must say so at once, auto must fall back to tcg, and kvm
must be refused with exit 2.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from harness import doctor
from harness.hosts import facts
from harness.qemu import bootcheck
from harness.errors import KVMUnusable
from harness.hosts.local import LocalHost

REPO = Path(__file__).resolve().parent.parent
MIGSTALL = REPO / ".venv" / "bin" / "migstall"
HAS_VIRT = facts.read_cpu(LocalHost()).has_vmx or facts.read_cpu(LocalHost()).has_svm
no_virt_only = pytest.mark.skipif(HAS_VIRT, reason="this host has vmx/svm")


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(MIGSTALL), *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "CI": "true"})


@pytest.fixture(scope="module")
def report() -> doctor.DoctorReport:
    with LocalHost() as host:
        return doctor.doctor(host)


def test_report_contents(report):
    d = json.loads(report.to_json())
    assert d["cpu_vendor"] in ("GenuineIntel", "AuthenticAMD", "HygonGenuine") or d["cpu_vendor"]
    assert d["host_kernel"] == os.uname().release
    assert d["qemu_path"].endswith("qemu-system-x86_64") and d["qemu_version"].startswith("QEMU emulator version")
    assert d["mem_total_mib"] > 0 and 0 < d["mem_available_mib"] <= d["mem_total_mib"]
    assert d["thp_mode"] in ("always", "madvise", "never")
    sizes = {p["page_kib"] for p in d["hugepages"]}
    assert {p.split("hugepages-")[1][:-2] for p in os.listdir("/sys/kernel/mm/hugepages")} == {str(s) for s in sizes}
    for key, value in d["kvm_params"].items():
        module, name = key.split(".")
        assert Path(f"/sys/module/{module}/parameters/{name}").read_text().strip() == value
    assert set(d["kvm_checks"]) == {"cpu_flag", "dev_kvm", "boot"}


@no_virt_only
def test_kvm_unusable_here_at_once():
    t0 = time.monotonic()
    status = facts.check_kvm(LocalHost())
    assert time.monotonic() - t0 < 2
    assert not status.usable
    assert status.reason == "KVM unusable: CPU has neither vmx nor svm"
    assert (status.cpu_flag, status.dev_kvm, status.boot) == ("missing", "skipped", "skipped")


@no_virt_only
def test_resolve_accel_here():
    host = LocalHost()
    assert facts.resolve_accel(host, "tcg") == "tcg"
    assert facts.resolve_accel(host, "auto") == "tcg"
    choice = facts.choose_accel(host, "auto")
    assert choice.accel == "tcg" and "falling back to tcg" in choice.reason and "vmx" in choice.reason
    with pytest.raises(KVMUnusable) as exc:
        facts.resolve_accel(host, "kvm")
    assert exc.value.exit_code == 2
    assert "neither vmx nor svm" in exc.value.one_line() and "--accel tcg" in exc.value.one_line()


@no_virt_only
def test_cli_doctor():
    r = cli("doctor")
    assert r.returncode == 0, r.stderr
    assert "KVM usable      no: KVM unusable: CPU has neither vmx nor svm" in r.stdout
    assert "--accel auto    tcg" in r.stdout
    j = cli("doctor", "--json")
    d = json.loads(j.stdout)
    assert d["kvm_usable"] is False and d["kvm_reason"] == "KVM unusable: CPU has neither vmx nor svm"
    k = cli("doctor", "--require-kvm")
    assert k.returncode == 2 and k.stderr.count("\n") == 1 and "neither vmx nor svm" in k.stderr


def test_cli_doctor_bad_host():
    r = cli("doctor", "--host", "bogus://x")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr


def test_boot_sector_reaches_long_mode_under_tcg():
    """The boot check's first stage, proven on real QEMU (TCG here)."""
    host = LocalHost()
    result = bootcheck._boot_sector_check(host, facts.find_qemu(host), "tcg", timeout=30)
    assert result.startswith("ok"), result


def test_linux_boot_check_under_tcg():
    """The second stage boots the real guest kernel to its root-mount panic."""
    host = LocalHost()
    result = bootcheck.boot_check(host, facts.find_qemu(host), "tcg", timeout=90)
    assert result.startswith("ok (boot sector"), result


@no_virt_only
def test_boot_check_of_this_kvm_fails_in_bounded_time():
    """This machine's KVM runs firmware but hangs Linux: the check must give up
    after its timeout and leave nothing running (the autouse fixture checks)."""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        pytest.skip("no /dev/kvm here")
    host = LocalHost()
    t0 = time.monotonic()
    result = bootcheck.boot_check(host, facts.find_qemu(host), "kvm", timeout=5)
    elapsed = time.monotonic() - t0
    assert result.startswith("failed"), result
    assert elapsed < 5 * 2 + 15, elapsed


@pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/usr/sbin/sshd"), reason="needs root and sshd")
def test_doctor_over_ssh_matches_local(report, tmp_path):
    """Every read goes through the Host API: over SSH (a real sshd on
    127.0.0.1, from test_ssh) the report describes the same machine."""
    import shutil
    import tempfile

    from test_ssh import Sshd

    tmp = Path(tempfile.mkdtemp(prefix="migstall-sshd-doctor-"))
    server = None
    try:
        server = Sshd(tmp)
        with server.host() as host:
            remote = doctor.doctor(host)
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    for key in ("cpu_vendor", "cpu_model", "cpu_flags", "kvm_usable", "kvm_reason", "kvm_params", "kvm_modules",
                "qemu_path", "qemu_version", "host_kernel", "mem_total_mib", "thp_mode", "online_cpus"):
        assert getattr(remote, key) == getattr(report, key), key
    assert [p.page_kib for p in remote.hugepages] == [p.page_kib for p in report.hugepages]


class OverlayHost(LocalHost):
    """This machine, with some files replaced by a fixture tree: to exercise the
    parsing of an Intel VMX host's /proc and /sys on any machine.  Commands still
    run for real."""

    name = "overlay"

    def __init__(self, root: Path, hidden=()) -> None:
        self.root, self.hidden = root, set(hidden)

    def _map(self, path: str) -> str:
        p = self.root / path.lstrip("/")
        return str(p) if p.exists() else path

    def read_bytes(self, path: str) -> bytes:
        if path in self.hidden:
            raise FileNotFoundError(path)
        return super().read_bytes(self._map(path))

    def exists(self, path: str) -> bool:
        return path not in self.hidden and super().exists(self._map(path))


def test_vmx_host_without_dev_kvm(tmp_path):
    cpuinfo = ("processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) Gold 6248\n"
               "flags\t\t: fpu vme pse vmx ept vpid ept_ad pdpe1gb constant_tsc\n\nprocessor\t: 1\n")
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc" / "cpuinfo").write_text(cpuinfo)
    params = tmp_path / "sys" / "module" / "kvm_intel" / "parameters"
    params.mkdir(parents=True)
    for name, value in (("ept", "Y"), ("pml", "Y"), ("nested", "N")):
        (params / name).write_text(value + "\n")
    host = OverlayHost(tmp_path, hidden={"/dev/kvm"})
    cpu = facts.read_cpu(host)
    assert (cpu.vendor, cpu.has_vmx, cpu.has_svm) == ("GenuineIntel", True, False)
    assert {"vmx", "ept", "pdpe1gb"} <= set(cpu.flags)
    got = facts.kvm_params(host)
    assert (got["kvm_intel.ept"], got["kvm_intel.pml"], got["kvm_intel.nested"]) == ("Y", "Y", "N")
    status = facts.check_kvm(host)
    assert not status.usable and status.reason == "KVM unusable: /dev/kvm does not exist"
    assert "modprobe kvm_intel" in status.fix and status.cpu_flag == "ok"
