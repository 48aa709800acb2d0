"""The host-facts layer (harness.hosts.facts) and doctor's rendering of it.

No QEMU is started: the KVM check here always stops at the CPU flag (the
overlay host's cpuinfo has neither vmx nor svm)."""

from __future__ import annotations

import json
from pathlib import Path

from harness import doctor
from harness.hosts import facts
from harness.hosts.local import LocalHost
from harness.scenario import Scenario, gather_host_facts


class NoVirtHost(LocalHost):
    """This machine, with a /proc/cpuinfo that has neither vmx nor svm."""

    name = "novirt"

    def __init__(self, root: Path) -> None:
        self.root = root

    def read_bytes(self, path: str) -> bytes:
        if path == "/proc/cpuinfo":
            return (self.root / "cpuinfo").read_bytes()
        return super().read_bytes(path)


def _novirt(tmp_path: Path) -> NoVirtHost:
    (tmp_path / "cpuinfo").write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: Test CPU\n"
                                      "flags\t\t: fpu pse pdpe1gb constant_tsc\n\n")
    return NoVirtHost(tmp_path)


def test_one_list_of_kvm_params():
    keys = [p.key for p in facts.KVM_PARAMS]
    assert len(keys) == len(set(keys))
    # the kvm_params column keeps the parameters it always recorded, plus the series' switch
    assert sorted(p.key for p in facts.RECORDED_KVM_PARAMS) == sorted(
        ["kvm.tdp_mmu", "kvm.eager_page_split", "kvm.fast_write_protect", "kvm_intel.pml", "kvm_intel.ept",
         "kvm_amd.npt", "kvm_amd.nested"])
    assert facts.KVM_PARAMS[0].sys_path == "/sys/module/kvm/parameters/tdp_mmu"


def test_kvm_status_is_cached_per_host_and_resettable(tmp_path):
    host = _novirt(tmp_path)
    facts.reset_caches()
    first = facts.kvm_status(host)
    assert not first.usable and first.reason == "KVM unusable: CPU has neither vmx nor svm"
    assert facts.kvm_status(host) is first
    assert host in facts._kvm_cache
    assert facts.resolve_accel(host, "auto") == "tcg" and host in facts._fallback_said
    facts.reset_caches()
    assert host not in facts._kvm_cache and host not in facts._fallback_said
    assert facts.kvm_status(host) is not first


def test_gather_and_doctor_report(tmp_path):
    host = _novirt(tmp_path)
    f = facts.gather(host)
    assert f.cpu.vendor == "AuthenticAMD" and f.cpu.flags == ("pdpe1gb", "pse", "constant_tsc")
    assert f.accel_auto == "tcg" and not f.kvm.usable
    assert f.memory.total_mib > 0 and f.online_cpus >= 1
    assert f.hugepages == tuple(facts.hugepage_pools(host))
    r = doctor.from_facts(f)
    d = json.loads(r.to_json())
    assert d["host"] == "novirt" and d["accel_auto"] == "tcg" and d["cpu_model"] == "Test CPU"
    assert d["kvm_checks"] == {"cpu_flag": "missing", "dev_kvm": "skipped", "boot": "skipped"}
    for pool in d["hugepages"]:
        assert set(pool) == {"page_kib", "total", "free", "reserved", "surplus"}
    text = r.to_text()
    assert "KVM usable      no: KVM unusable: CPU has neither vmx nor svm" in text
    assert "--accel auto    tcg" in text and "(vmx/svm absent)" in text


def test_validation_uses_the_same_pools(tmp_path):
    host = _novirt(tmp_path)
    v = gather_host_facts(host, [Scenario()])
    assert v.hugepages == {p.page_kib: p for p in facts.hugepage_pools(host)}
    assert v.accel_auto == "tcg" and "neither vmx nor svm" in v.kvm_reason
