"""Fast checks of the virtual-host parts that need no L1: host specs, the
dirty-log shim (against this machine's /dev/kvm: only capability ioctls, no
guest runs), mode verification, and trace parsing."""

from __future__ import annotations

import csv
import os
import shutil
import subprocess

import pytest

from harness.errors import MigrationError, UserError
from harness.hosts.factory import parse_host_spec
from harness.hosts.local import LocalHost
from harness.measure.kvm_trace import parse_calls, summarize
from harness.qemu import dirtylog


@pytest.mark.parametrize("spec,kind", [("local", "local"), ("ssh://root@10.0.0.1:2222", "ssh"),
                                       ("ssh://box", "ssh"), ("virtual", "virtual"),
                                       ("virtual:debian", "virtual"), ("vhost", "vhost")])
def test_host_specs(spec, kind):
    assert parse_host_spec(spec).kind == kind


@pytest.mark.parametrize("spec", ["", "remote", "ssh://", "ssh://u@h:0", "ssh://u@h:70000", "ssh://a b",
                                  "virtual:/no/such/bzImage"])
def test_bad_host_specs(spec):
    with pytest.raises(UserError):
        parse_host_spec(spec)


@pytest.mark.parametrize("mode", ["legacy", "ring"])
def test_kvm_only_modes_refused_under_tcg(mode, tmp_path):
    with pytest.raises(UserError, match="needs KVM"):
        dirtylog.setup(mode, 4096, "tcg", LocalHost(), str(tmp_path))
    assert dirtylog.setup("default", 0, "tcg", LocalHost(), str(tmp_path)) == dirtylog.ModeSetup()
    with pytest.raises(UserError):
        dirtylog.setup("ring", 1000, "kvm", LocalHost(), str(tmp_path))


@pytest.mark.skipif(not os.access("/dev/kvm", os.R_OK | os.W_OK) or shutil.which("qemu-system-x86_64") is None,
                    reason="needs /dev/kvm (capability checks only) and QEMU")
def test_shim_hides_manual_protect(tmp_path):
    mode = dirtylog.setup("legacy", 0, "kvm", LocalHost(), str(tmp_path))
    qmp = b'{"execute":"qmp_capabilities"}\n{"execute":"quit"}\n'
    # -machine none: KVM initialises (capabilities, VM fd) but no guest code ever runs
    subprocess.run(["qemu-system-x86_64", "-name", "migstall-shimcheck", "-accel", "kvm", "-machine", "none",
                    "-nodefaults", "-display", "none", "-qmp", "stdio"], input=qmp, capture_output=True,
                   timeout=60, env={**os.environ, **mode.env})
    log = (tmp_path / dirtylog.SHIM_LOG).read_text()
    assert "hid KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2" in log
    assert "enable_cap cap=168" not in log
    dirtylog.verify("legacy", "kvm", "", LocalHost(), str(tmp_path))


def _log(tmp_path, text):
    (tmp_path / dirtylog.SHIM_LOG).write_text(text)


def test_verify_rejects_unproven_modes(tmp_path):
    host, rd = LocalHost(), str(tmp_path)
    dirtylog.verify("ring", "tcg", "", host, rd)                 # nothing to prove without KVM
    with pytest.raises(MigrationError, match="never loaded"):
        dirtylog.verify("legacy", "kvm", "", host, rd)
    _log(tmp_path, "migstall-shim pid=1 loaded hide_manual=0\n"
                   "migstall-shim pid=1 enable_cap cap=168 args0=0x3 fd=11 ret=0\n")
    dirtylog.verify("default", "kvm", "", host, rd)
    with pytest.raises(MigrationError, match="legacy"):
        dirtylog.verify("legacy", "kvm", "", host, rd)
    with pytest.raises(MigrationError, match="ring"):
        dirtylog.verify("ring", "kvm", "", host, rd)
    _log(tmp_path, "migstall-shim pid=1 loaded hide_manual=1\n"
                   "migstall-shim pid=1 hid KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 fd=10 kernel_answer=3 answered=0\n")
    dirtylog.verify("legacy", "kvm", "", host, rd)
    with pytest.raises(MigrationError, match="KVM_CLEAR_DIRTY_LOG"):
        dirtylog.verify("legacy", "kvm", "1@1.0:kvm_clear_dirty_log slot#1 start 0x0 size 0x40", host, rd)
    with pytest.raises(MigrationError, match="default"):
        dirtylog.verify("default", "kvm", "", host, rd)
    _log(tmp_path, "migstall-shim pid=1 loaded hide_manual=0\n"
                   "migstall-shim pid=1 enable_cap cap=192 args0=0x10000 fd=11 ret=0\n")
    dirtylog.verify("ring", "kvm", "", host, rd)


TRACE = """\
# tracer: nop
#
  sshd-90  [000] .....   100.000000: tracing_mark_write: migstall-phase enable
 qemu-system-x86-201  [001] .....   100.100000: kvm_set_memslot__e: (kvm_set_memslot+0x0/0x500 [kvm])
 qemu-system-x86-201  [001] .....   100.101000: kvm_tdp_mmu_wrprot_slot__e: (kvm_tdp_mmu_wrprot_slot+0x0/0x100 [kvm])
 qemu-system-x86-201  [000] .....   100.121000: kvm_tdp_mmu_wrprot_slot__r: (kvm_arch_commit_memory_region+0x1/0x2 [kvm] <- kvm_tdp_mmu_wrprot_slot)
 qemu-system-x86-201  [000] .....   100.130000: kvm_set_memslot__r: (__kvm_set_memory_region+0x1/0x2 [kvm] <- kvm_set_memslot)
 qemu-system-x86-201  [000] .....   100.200000: kvm_set_memslot__e: (kvm_set_memslot+0x0/0x500 [kvm])
 qemu-system-x86-201  [000] .....   100.205000: kvm_set_memslot__r: (__kvm_set_memory_region+0x1/0x2 [kvm] <- kvm_set_memslot)
  sshd-91  [001] .....   101.000000: tracing_mark_write: migstall-phase disable
 qemu-system-x86-201  [001] .....   101.100000: kvm_set_memslot__e: (kvm_set_memslot+0x0/0x500 [kvm])
 qemu-system-x86-201  [001] .....   101.112500: kvm_set_memslot__r: (__kvm_set_memory_region+0x1/0x2 [kvm] <- kvm_set_memslot)
"""  # noqa: E501  ftrace's lines as the kernel writes them


def test_trace_pairing_and_phases():
    calls, markers = parse_calls(TRACE)
    assert [m[1] for m in markers] == ["enable", "disable"]
    enable, disable, breakdown = summarize(calls, "kvm_set_memslot")
    assert enable == pytest.approx(20.0)           # the MMU walk (write protection)
    assert disable == pytest.approx(0.0)           # a flag change without a walk
    assert breakdown["enable"]["kvm_tdp_mmu_wrprot_slot"]["ms"] == pytest.approx(20.0)
    assert breakdown["enable"]["kvm_set_memslot"]["calls"] == 2
    assert breakdown["enable"]["_memslot_ioctls"]["ms"] == pytest.approx(35.0)
    assert summarize(calls, None)[:2] == (None, None)


def test_only_flags_only_memslot_changes_count():
    trace = """\
  sshd-90  [000] .....   100.000000: tracing_mark_write: migstall-phase enable
 qemu-system-x86-201  [001] .....   100.100000: kvm_set_memslot__e: (kvm_set_memslot+0x0/0x500 [kvm]) change=3
 qemu-system-x86-201  [001] .....   100.110000: kvm_set_memslot__r: (__kvm_set_memory_region+0x1/0x2 [kvm] <- kvm_set_memslot)
 qemu-system-x86-305  [000] .....   100.500000: kvm_set_memslot__e: (kvm_set_memslot+0x0/0x500 [kvm]) change=0
 qemu-system-x86-305  [000] .....   100.900000: kvm_set_memslot__r: (__kvm_set_memory_region+0x1/0x2 [kvm] <- kvm_set_memslot)
"""  # noqa: E501  ftrace's lines as the kernel writes them
    calls, _ = parse_calls(trace)
    enable, disable, breakdown = summarize(calls, "kvm_set_memslot")
    assert enable == pytest.approx(0.0) and disable is None
    assert breakdown["enable"]["_memslot_ioctls"]["ms"] == pytest.approx(10.0)
    assert breakdown["enable"]["kvm_set_memslot"]["calls"] == 2
    assert breakdown["enable"]["kvm_set_memslot[flags_only]"]["calls"] == 1
    from harness.measure.kvm_trace import change_fetcharg
    assert change_fetcharg("6.1.0-56-amd64", "x86_64") == "change=%cx:u32"
    assert change_fetcharg("5.10.0", "x86_64") == "change=%r9:u32"
    assert change_fetcharg("5.0.0", "x86_64") == "" and change_fetcharg("6.1", "aarch64") == ""


def test_walk_time_merges_nested_calls():
    from harness.measure.kvm_trace import Call, walk_time_ms
    calls = [Call("kvm_mmu_slot_remove_write_access", 1, 10.0, 10.030, "enable"),
             Call("kvm_tdp_mmu_wrprot_slot", 1, 10.001, 10.029, "enable"),      # nested: not twice
             Call("kvm_mmu_slot_try_split_huge_pages", 1, 10.050, 10.060, "enable")]
    assert walk_time_ms(calls) == pytest.approx(40.0)


def test_row_host_label_leaves_the_kernel_to_host_kernel(tmp_path):
    """Stock and patched runs in the virtual host share the ``host`` column (L1's
    kernel is in ``host_kernel``), so compare pairs them: with the kernel in the
    label, `make demo-series` found "no common scenario" (2026-12-04)."""
    from harness import results
    from harness.commands.run import row_host_label
    from harness.compare import api

    assert row_host_label("virtual:6.1.192-migstall-patched-82dd1d4b") == "virtual"
    assert row_host_label("virtual:debian") == "virtual"
    assert row_host_label("vhost") == "vhost" and row_host_label("local") == "local"
    base = {c: "" for c in results.COLUMNS}
    base.update(scenario="fwp", host="virtual", accel="kvm", guest_mem_mib="512", vcpus="1", backing="anon",
                page_size_kib="4", dirty_log_mode="legacy", loops="write", end_action="complete", status="ok")
    paths = []
    for variant, enable in (("stock", ("103.2", "98.9")), ("patched", ("0.73", "0.82"))):
        path = tmp_path / f"{variant}.csv"
        with open(path, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(results.COLUMNS))
            w.writeheader()
            for i, ms in enumerate(enable):
                w.writerow({**base, "run_id": f"{variant}-{i}", "repeat": str(i + 1),
                            "host_kernel": f"6.1.192-migstall-{variant}-82dd1d4b",
                            "kernel_variant": variant, "kvm_enable_ms": ms})
        paths.append(path)
    outcome = api.run([str(paths[0])], [str(paths[1])])
    assert outcome.comparison is not None
