"""Scenario files, flags and validation (no QEMU is started here)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from harness.errors import KVMUnusable, UserError
from harness.hosts.facts import HugePool
from harness.hosts.local import LocalHost
from harness.scenario import (
    HostFacts, Scenario, add_scenario_arguments, check_static, gather_host_facts,
    load_scenarios, parse_size_mib, scenarios_from_args, validate,
)

REPO = Path(__file__).resolve().parent.parent


def facts(**kw) -> HostFacts:
    """Facts of a hypothetical host (validation is a pure function of them)."""
    base = dict(mem_total_mib=24 * 1024, mem_available_mib=20 * 1024, online_cpus=2,
                hugepages={2048: HugePool(2048, 0, 0), 1048576: HugePool(1048576, 0, 0)},
                thp_mode="madvise", accel_auto="tcg", kvm_usable=False,
                kvm_reason="KVM unusable: CPU has neither vmx nor svm; run on a VMX host",
                executables={"": "/usr/bin/qemu-system-x86_64"})
    base.update(kw)
    return HostFacts(**base)


VMX = dict(mem_total_mib=256 * 1024, mem_available_mib=250 * 1024, online_cpus=32, accel_auto="kvm",
           kvm_usable=True, kvm_reason="KVM usable")


def write(tmp_path: Path, text: str, name: str = "s.toml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    add_scenario_arguments(p)
    return p


@pytest.mark.parametrize("text,mib", [(512, 512), ("512", 512), ("512M", 512), ("512MiB", 512), ("1G", 1024),
                                      ("1g", 1024), ("1.5G", 1536), ("2T", 2 * 1024 * 1024), ("4096K", 4)])
def test_sizes(text, mib):
    assert parse_size_mib(text) == mib


@pytest.mark.parametrize("text", ["1X", "", "G", "-1", "1.3M", True, [1], "12 apples"])
def test_bad_sizes(text):
    with pytest.raises(ValueError):
        parse_size_mib(text)


def test_matrix_expansion_repeat_outermost(tmp_path):
    p = write(tmp_path, """
[defaults]
repeat = 2
touch = "128M"
[[scenario]]
name = "m"
mem = ["512M", "1G"]
backing = ["anon", "thp"]
dirty_log_mode = "default"
[[scenario]]
vcpus = [1, 2]
""")
    ss = load_scenarios(p)
    assert len(ss) == 2 * 2 * 2 + 2 * 2
    first = [(s.mem_mib, s.backing, s.repeat) for s in ss[:8]]
    assert first == [(512, "anon", 1), (512, "thp", 1), (1024, "anon", 1), (1024, "thp", 1),
                     (512, "anon", 2), (512, "thp", 2), (1024, "anon", 2), (1024, "thp", 2)]
    assert all(s.touch_mib == 128 for s in ss)
    assert ss[8].name == "s-2" and [s.vcpus for s in ss[8:]] == [1, 2, 1, 2]
    for s in ss:
        validate(s, facts())


def test_flags_override_file(tmp_path):
    p = write(tmp_path, '[[scenario]]\nname = "o"\nmem = ["512M", "1G"]\naccel = "auto"\n')
    args = parser().parse_args(["--scenario", str(p), "--mem", "768", "--accel", "tcg", "--repeat", "3"])
    ss = scenarios_from_args(args, LocalHost())
    assert [(s.mem_mib, s.accel, s.repeat) for s in ss] == [(768, "tcg", 1), (768, "tcg", 2), (768, "tcg", 3)]


def test_flags_only_defaults():
    ss = scenarios_from_args(parser().parse_args([]), LocalHost())
    assert len(ss) == 1 and ss[0] == Scenario()


def test_flags_full():
    args = parser().parse_args(["--name", "x1", "--mem", "1G", "--vcpus", "2", "--backing", "thp", "--prealloc",
                                "--accel", "tcg", "--cpu-model", "max", "--touch", "300", "--loops", "pio,cpu",
                                "--threshold-us", "100", "--baseline-s", "0.5", "--end", "cancel",
                                "--cancel-after-s", "0.5", "--ready-timeout", "60"])
    (s,) = scenarios_from_args(args, LocalHost())
    assert (s.name, s.mem_mib, s.backing, s.prealloc, s.touch_mib, s.loops, s.threshold_us, s.end_action,
            s.ready_timeout_s) == ("x1", 1024, "thp", True, 300, ("pio", "cpu"), 100, "cancel", 60.0)


def test_shipped_scenario_files_are_valid():
    files = sorted((REPO / "scenarios").glob("*.toml"))
    assert any(f.name == "host.toml" for f in files)
    for f in files:
        ss = load_scenarios(f)
        assert ss, f
        for s in ss:
            check_static(s)
    # the VMX matrix validates on a big KVM host, and refuses this machine's KVM
    big = facts(**VMX, hugepages={1048576: HugePool(1048576, 128, 128)})
    for s in load_scenarios(REPO / "scenarios" / "host.toml", overrides={"accel": "kvm"}):
        validate(s, big)
        with pytest.raises(KVMUnusable, match="neither vmx nor svm"):
            validate(s, facts(online_cpus=8))


@pytest.mark.parametrize("text,needle", [
    ("[[scenario]]\nmem = 512\nbogus = 1\n", "unknown key 'bogus' in [[scenario]] #1"),
    ("[[scenario]]\nmemory = 512\n", "did you mean 'mem'"),
    ("[defaults]\nvcpu = 2\n[[scenario]]\n", "unknown key 'vcpu' in [defaults]"),
    ("[[scenarios]]\nmem = 1\n", "unknown key 'scenarios' in the top level"),
    ("[[scenario]]\nmem = 512\nvcpus = \"two\"\n", "vcpus 'two' is not an integer"),
    ("[[scenario]]\nprealloc = 1\n", "prealloc 1 is not true or false"),
    ("[[scenario]]\nmem = \"1X\"\n", "mem '1X' is not a size"),
    ("[[scenario]]\nmem = []\n", "mem is an empty list"),
    ("[[scenario]]\nloops = [1, 2]\n", "loops [1, 2] is not a list"),
    ("[[scenario]]\nvcpus = true\n", "vcpus True is not an integer"),
    ("[[scenario]\nmem = 1\n", "is not valid TOML"),
    ("mem = 512\n", "unknown key 'mem' in the top level"),
    ("[defaults]\nmem = 512\n", "has no [[scenario]] entries"),
    ("scenario = 3\n", "scenario 3 is not an array of tables"),
])
def test_file_errors_name_file_and_key(tmp_path, text, needle):
    p = write(tmp_path, text)
    with pytest.raises(UserError) as exc:
        load_scenarios(p)
    msg = exc.value.one_line()
    assert needle in msg and str(p) in msg, msg
    assert "\n" not in str(exc.value)


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_scenarios(tmp_path / "nope.toml")


def _bad(**kw) -> Scenario:
    return Scenario(**kw)


@pytest.mark.parametrize("s,f,needle", [
    (_bad(mem_mib=64), facts(), "below the 128 MiB minimum"),
    (_bad(vcpus=0), facts(), "--vcpus 0 is not a vCPU count"),
    (_bad(vcpus=300), facts(), "above QEMU's 255"),
    (_bad(vcpus=4), facts(), "exceeds the host's 2 CPUs"),
    (_bad(backing="bogus"), facts(), "--backing 'bogus' is unknown"),
    (_bad(dirty_log_mode="fast"), facts(), "--dirty-log-mode 'fast' is unknown"),
    (_bad(end_action="stop"), facts(), "--end 'stop' is unknown"),
    (_bad(accel="xen"), facts(), "--accel 'xen' is unknown"),
    (_bad(loops=("pio", "spin")), facts(), "unknown loop 'spin'"),
    (_bad(loops=("pio", "cpu", "cpu")), facts(), "3 loops for 2 vCPUs"),
    (_bad(backing="hugetlb2m", mem_mib=1024), facts(), "needs 1024 free 2 MiB hugepages"),
    (_bad(backing="hugetlb2m", mem_mib=1024), facts(hugepages={2048: HugePool(2048, 600, 600)}),
     "the pool has 600 free"),
    (_bad(backing="hugetlb1g", mem_mib=1024), facts(hugepages={}), "does not offer"),
    (_bad(backing="hugetlb1g", mem_mib=1536), facts(), "not a multiple of the 1024 MiB page"),
    (_bad(mem_mib=100000 * 1024), facts(), "more than the host's"),
    (_bad(backing="thp"), facts(thp_mode="never"), "thp needs transparent hugepages"),
    (_bad(qemu="/nonexistent"), facts(executables={"/nonexistent": ""}), "--qemu /nonexistent does not exist"),
    (_bad(), facts(executables={"": ""}), "not on the host's PATH"),
    (_bad(guest_kernel="/nonexistent/bzImage"), facts(), "--guest-kernel /nonexistent/bzImage does not exist"),
    (_bad(dirty_log_mode="ring"), facts(**VMX), "--dirty-ring is missing"),
    (_bad(dirty_log_mode="ring", dirty_ring=1000), facts(**VMX), "not a valid ring size"),
    (_bad(dirty_ring=4096), facts(**VMX), "needs dirty_log_mode ring"),
    (_bad(dirty_log_mode="ring", dirty_ring=4096, accel="tcg"), facts(**VMX), "ring needs KVM, but --accel tcg"),
    (_bad(dirty_log_mode="legacy"), facts(), "legacy needs KVM, but there is no usable KVM"),
    (_bad(cpu_model="host", accel="tcg"), facts(), "'host' needs KVM"),
    (_bad(touch_mib=1000, mem_mib=1024), facts(), "--touch 1000 MiB does not fit a 1024 MiB guest"),
    (_bad(threshold_us=0), facts(), "--threshold-us 0 is out of range"),
    (_bad(baseline_s=-1), facts(), "--baseline-s -1 is negative"),
    (_bad(ready_timeout_s=0), facts(), "--ready-timeout 0 is not a positive"),
    (_bad(name="a b/c"), facts(), "is not a usable name"),
])
def test_validation_errors(s, f, needle):
    with pytest.raises(UserError) as exc:
        validate(s, f)
    assert needle in exc.value.one_line(), exc.value.one_line()


def test_kvm_requested_but_unusable_is_kvmunusable():
    with pytest.raises(KVMUnusable, match="--accel kvm: KVM unusable: CPU has neither vmx nor svm"):
        validate(Scenario(accel="kvm"), facts())


def test_valid_on_vmx_host():
    for s in (Scenario(accel="kvm", dirty_log_mode="legacy", mem_mib=16384, vcpus=4),
              Scenario(accel="auto", dirty_log_mode="ring", dirty_ring=4096),
              Scenario(backing="hugetlb1g", mem_mib=4096)):
        validate(s, facts(**VMX, hugepages={1048576: HugePool(1048576, 8, 8)}))


def test_overcommit_allows_big_guests():
    validate(Scenario(mem_mib=100000 * 1024, overcommit=True, vcpus=4), facts())


def test_virtual_host_takes_two_vcpus_on_its_one_cpu():
    """The virtual host's L1 has one vCPU by migstall's choice: the default two L2
    vCPUs need no --overcommit there, and only there (issue 16's command)."""
    from harness.hosts.local import LocalHost
    from harness.hosts.virtual import VirtualHost

    assert VirtualHost.vcpus_beyond_cpus_ok and not LocalHost.vcpus_beyond_cpus_ok
    validate(Scenario(vcpus=2), facts(online_cpus=1, vcpus_beyond_cpus_ok=True))
    with pytest.raises(UserError, match="vcpus 2 exceeds the host's 1 CPUs.*add --overcommit"):
        validate(Scenario(vcpus=2), facts(online_cpus=1))


def test_file_errors_point_at_entry(tmp_path):
    p = write(tmp_path, '[[scenario]]\nname = "ok"\n[[scenario]]\nname = "bad"\nmem = 64\n')
    ss = load_scenarios(p)
    check_static(ss[0])
    with pytest.raises(UserError) as exc:
        check_static(ss[1])
    assert exc.value.one_line().startswith(f"{p} [[scenario]] #2 (bad): mem 64 MiB is below")


def test_whole_matrix_validated_before_return(tmp_path):
    # the bad entry is last: nothing may be returned
    p = write(tmp_path, '[[scenario]]\nmem = ["512M", "1G"]\n[[scenario]]\nbacking = "hugetlb1g"\n')
    with pytest.raises(UserError, match=r"#2 .*hugetlb1g needs"):
        scenarios_from_args(parser().parse_args(["--scenario", str(p)]), LocalHost())


def test_gather_host_facts_here():
    f = gather_host_facts(LocalHost(), [Scenario()])
    assert f.mem_total_mib > 1024 and f.online_cpus >= 1
    assert f.executables[""].endswith("qemu-system-x86_64")
    assert f.accel_auto in ("kvm", "tcg")
