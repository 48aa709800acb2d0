"""Aliased guests (harness.qemu.alias, harness.hostmem): validation, the host
memory estimate, the QEMU arguments and ``run --check``.  No QEMU is started."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from harness import hostmem
from harness.errors import UserError
from harness.hosts.facts import HugePool
from harness.qemu.alias import MAX_DEVICES, AliasLayout
from harness.scenario import HostFacts, Scenario, check_static, load_scenarios, validate

REPO = Path(__file__).resolve().parent.parent
MIGSTALL = REPO / ".venv" / "bin" / "migstall"
VMX = dict(accel_auto="kvm", kvm_usable=True, kvm_reason="KVM usable", online_cpus=8)
TCG16 = dict(mem_mib=16384, alias_mib=512, backing="memfd", end_action="cancel", accel="tcg")
SEED = dict(mem_mib=2 * 1024 * 1024, alias_mib=32768, backing="memfd", end_action="cancel", accel="kvm",
            dirty_log_mode="legacy", vcpus=4)


def facts(**kw) -> HostFacts:
    """A hypothetical host: this machine's size (24 GiB, 2 CPUs, TCG) unless told."""
    base = dict(mem_total_mib=24 * 1024, mem_available_mib=20 * 1024, online_cpus=2,
                hugepages={2048: HugePool(2048, 0, 0)}, thp_mode="madvise", accel_auto="tcg", kvm_usable=False,
                kvm_reason="no KVM", executables={"": "/usr/bin/qemu-system-x86_64"}, phys_bits=48,
                shm_avail_mib=12 * 1024)
    return HostFacts(**{**base, **kw})


def sc(**kw) -> Scenario:
    return Scenario(**{**TCG16, **kw})


@pytest.mark.parametrize("kw, words", [
    (dict(alias_mib=500), "--alias-mib 500 MiB is not a power of two"),
    (dict(alias_mib=1), "not a power of two of at least 2 MiB"),
    (dict(mem_mib=16000), "--mem 16000 MiB is not a multiple of alias_mib 512 MiB (each alias device maps the "
                          "whole shared file); give mem 16384M or 15872M"),
    (dict(alias_mib=64), "needs 256 alias devices for 16384 MiB, more than the 232 PCI functions of q35's root bus"
                         " (slots 2-30 x 8); give alias_mib 128 or more"),
    (dict(alias_mib=16 * 1024 * 1024, mem_mib=16 * 1024 * 1024), "larger than one KVM memslot"),
    (dict(backing="anon"), "--backing 'anon' cannot back aliased RAM"),
    (dict(prealloc=True), "--prealloc would make QEMU fault in every alias"),
    (dict(verify=True), "--verify does not apply to an aliased guest"),
    (dict(end_action="complete"), "--end complete would send every alias (16384 MiB) to the destination; "
                                  "use end cancel"),
    (dict(alias_mib=0, alias_complete=True), "--alias-complete is set without alias_mib"),
    (dict(touch_mib=20000), "--touch 20000 MiB does not fit the 16384 MiB of aliased RAM"),
    (dict(mem_mib=4 * 1024 * 1024, alias_mib=32768), "need 43 guest physical address bits, TCG's -cpu max has 40"),
])
def test_static_checks(kw, words):
    with pytest.raises(UserError) as ei:
        check_static(sc(**kw))
    msg = str(ei.value)
    assert words in msg and "\n" not in msg and "; " in msg


def test_complete_when_explicitly_wanted():
    check_static(sc(end_action="complete", alias_complete=True))
    check_static(sc(touch_mib=16384))


def test_file_defaults_to_cancel_and_memfd(tmp_path):
    p = tmp_path / "a.toml"
    p.write_text('[[scenario]]\nname = "a"\nmem = "16G"\nalias_mib = 512\n'
                 '[[scenario]]\nname = "b"\nmem = "1G"\n')
    a, b = load_scenarios(p)
    assert (a.end_action, a.backing, a.alias_mib) == ("cancel", "memfd", 512)
    assert (b.end_action, b.backing, b.alias_mib) == ("complete", "anon", 0)
    p.write_text('[[scenario]]\nname = "a"\nmem = "16G"\nalias_mib = "512M"\nend = "complete"\n')
    with pytest.raises(UserError, match=r"\[\[scenario\]\] #1 \(a\): end complete would send every alias"):
        check_static(load_scenarios(p)[0])


def test_estimate_figures():
    """The README's figures: 2 TiB on 32 GiB under KVM, 4 KiB and 2 MiB mappings; the TCG test's 16 GiB."""
    seed4k = hostmem.estimate(AliasLayout(2 << 20, 32768), kvm=True)
    seed2m = hostmem.estimate(AliasLayout(2 << 20, 32768), kvm=True, mapping_kib=2048)
    tcg = hostmem.estimate(AliasLayout(16384, 512), kvm=False)
    assert dict(seed4k.items) == {"alias_ram": 32768, "dst_alias_ram": 64, "own_ram": 512, "qemu": 512,
                                  "host_page_tables": 4096, "kvm_sptes": 4304, "kvm_rmaps": 8216,
                                  "kvm_page_track": 2048, "dirty_bitmaps": 704}
    assert seed4k.total_mib == 53224 and seed2m.total_mib == 44841
    assert dict(tcg.items)["kvm_rmaps"] == 0 and tcg.total_mib == 1638
    # complete: the destination's file fills up
    assert hostmem.estimate(AliasLayout(16384, 512), kvm=False, complete=True).total_mib == 1638 - 64 + 512


def test_validate_against_host_memory():
    validate(sc(), facts())                                     # 16 GiB on 512 MiB: this 24 GiB machine
    seed = Scenario(**SEED)
    big = dict(VMX, mem_total_mib=64 * 1024, mem_available_mib=62 * 1024, phys_bits=46, shm_avail_mib=32 * 1024)
    validate(seed, facts(**big))
    with pytest.raises(UserError) as ei:
        validate(seed, facts(**{**big, "mem_available_mib": 40 * 1024}))
    msg = str(ei.value)
    assert "2097152 MiB aliased onto 32768 MiB needs about 53224 MiB of host memory, the host has 40960 MiB" in msg
    assert "kvm_rmaps 8216" in msg
    with pytest.raises(UserError, match="need 42 guest physical address bits, the host's CPU has 39"):
        validate(seed, facts(**{**big, "phys_bits": 39}))
    with pytest.raises(UserError, match="does not fit the 16384 MiB free in /dev/shm"):
        validate(seed, facts(**{**big, "shm_avail_mib": 16384}))
    validate(Scenario(**{**SEED, "overcommit": True}), facts(**{**big, "mem_available_mib": 40 * 1024}))


@pytest.mark.skipif(not MIGSTALL.exists(), reason="no .venv/bin/migstall (make setup)")
def test_run_check_of_the_seed_scenario(tmp_path):
    """``run --check`` validates scenarios/seed-2t.toml without the host and prints its estimate."""
    env = {**os.environ, "CI": "true", "XDG_RUNTIME_DIR": str(tmp_path)}
    r = subprocess.run([str(MIGSTALL), "run", "--scenario", str(REPO / "scenarios" / "seed-2t.toml"), "--check"],
                       capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("seed-2t r1: mem 2097152 MiB, 4 vCPUs (pio+write+write+write), backing memfd, "
                               "accel kvm, dirty_log_mode legacy, end cancel; aliased onto 32768 MiB: 64 ivshmem BARs")
    assert "host memory needed about 53224 MiB" in lines[0]
    assert lines[-1] == "3 scenario(s) check out (the host is checked when they run)"
    assert not list(tmp_path.iterdir())
    bad = subprocess.run([str(MIGSTALL), "run", "--check", "--mem", "16G", "--alias-mib", "500"],
                         capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.strip().splitlines() == ["migstall: --alias-mib 500 MiB is not a power of two of at least "
                                               "2 MiB (each alias is a PCI BAR, and BAR sizes are powers of two); "
                                               "give a power of two such as 256 or 512"]


def test_largest_fit_and_doctor_lines():
    """``migstall doctor`` says the largest aliased guest the host fits, and whether seed-2t does."""
    from harness import doctor

    fit = hostmem.largest_fit(62 * 1024, 32 * 1024, 46, kvm=True)
    assert fit is not None and fit.alias_mib == 16384 and fit.estimate.total_mib <= 62 * 1024
    bigger = hostmem.estimate(AliasLayout(fit.mem_mib + fit.alias_mib, fit.alias_mib), kvm=True)
    assert bigger.total_mib > 62 * 1024 or fit.mem_mib // fit.alias_mib == MAX_DEVICES
    assert hostmem.largest_fit(100, -1, 0, kvm=True) is None
    base = dict(host="h", kvm_usable=True, kvm_reason="KVM usable", kvm_fix="",
                kvm_checks={"cpu_flag": "ok", "dev_kvm": "ok", "boot": "ok"}, cpu_vendor="GenuineIntel",
                cpu_model="x", cpu_flags=("vmx",), kvm_modules=(), kvm_params={}, qemu_path="/q",
                qemu_version="7.2", host_kernel="6.1", online_cpus=8, mem_total_mib=64 * 1024,
                mem_available_mib=62 * 1024, hugepages=(), thp_mode="madvise", accel_auto="kvm", phys_bits=46,
                shm_avail_mib=32 * 1024, alias_fit={"mem_mib": fit.mem_mib, "alias_mib": 16384, "needs_mib": 1})
    text = doctor.DoctorReport(**base).to_text()
    assert "aliased guests  46 physical address bits, 32768 MiB free in /dev/shm" in text
    assert "2 TiB on 32 GiB (KVM) needs about 53224 MiB: fits here" in text
    small = doctor.DoctorReport(**{**base, "mem_available_mib": 20 * 1024, "phys_bits": 39, "kvm_usable": False})
    assert "not here (20480 MiB available, 39 address bits, no usable KVM)" in small.to_text()
