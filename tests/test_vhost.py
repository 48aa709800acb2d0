"""The virtual host: an L1 VM under TCG with nested KVM, driven over SSH.

One L1 boot is shared by the module (``vhost`` fixture).  L1 runs Debian's
kernel with the KVM modules; ``MIGSTALL_TEST_L1_KERNEL`` (a bzImage from
``migstall kernel build``, with KVM and ACPI built in) overrides.  Runtime alone
on 2 idle cores: about 4 minutes in `make test`.
"""

from __future__ import annotations

import asyncio
import csv
import dataclasses
import os
import shutil
from pathlib import Path

import pytest

from harness.hosts.virtual import VirtualHost
from harness import scenario
from harness.scenario import Scenario

pytestmark = pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None or shutil.which("sshd") is None
                                and not os.path.exists("/usr/sbin/sshd"),
                                reason="needs qemu-system-x86 and openssh-server")

REPO = Path(__file__).resolve().parent.parent


def _l1_kernel() -> str:
    """$MIGSTALL_TEST_L1_KERNEL (``debian`` or a bzImage with KVM built in), else Debian's kernel."""
    return os.environ.get("MIGSTALL_TEST_L1_KERNEL") or "debian"


def _alive(pid) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False



@pytest.fixture(scope="module")
def vhost():
    vh = VirtualHost(kernel=_l1_kernel())
    try:
        vh.start()
        yield vh
    finally:
        pid = vh.pid
        vh.close()
        assert pid is None or not _alive(pid), "L1 left running"


def _read_rows(path: Path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_l1_has_working_kvm(vhost):
    assert vhost.boot_s is not None and vhost.boot_s > 0
    assert vhost.run(["sh", "-c", ": <>/dev/kvm"]).returncode == 0
    # QEMU in L1 creates a KVM VM (KVM_CREATE_VM + vCPU setup) and quits over QMP
    qmp = b'{"execute":"qmp_capabilities"}\n{"execute":"query-kvm"}\n{"execute":"quit"}\n'
    res = vhost.run(["qemu-system-x86_64", "-name", "migstall-kvmcheck", "-accel", "kvm", "-cpu", "host",
                     "-machine", "q35", "-m", "64", "-nodefaults", "-display", "none", "-S", "-qmp", "stdio"],
                    input=qmp, timeout=120)
    assert b'"enabled": true, "present": true' in res.stdout, res.stdout
    assert abs(vhost.clock_offset_s()) < 30
    # the same SSHHost machinery: files and unix-socket forwarding
    with vhost.runtime_dir() as rd:
        vhost.write_bytes(f"{rd}/x", b"l1")
        assert vhost.read_bytes(f"{rd}/x") == b"l1"


# L2 launches and exits in a row (plus the KVM checks): before L1 held an
# idle VM (guests/kvm-pin), an L2 QEMU exiting could hang L1 for good.
# CI runs legacy and default on 512 MiB guests (128 MiB touched): two runs,
# about 100 s.  It touched 384 MiB until 2026-12-03, when an L2 reset itself
# (SHUTDOWN guest-reset) right after READY, before any migration, in 1 of 2 CI
# sweeps and 1 of 10 soak runs of that scenario: after the prefault's first
# touch of 384 MiB of nested page faults (README "Not only write storms").  The
# CLI test's 128 MiB had not failed that way; a smaller prefault makes the loss
# rarer, it does not fix it. `make test-slow` adds legacy 64 MiB on a 256 MiB guest (the
# scaling check) and uses 1 GiB guests with 768 MiB touched, the size that
# first showed the mark-echo timeout of issue 16 (about 270 s).
@pytest.mark.parametrize("mem_mib,touch_mib", [
    pytest.param(512, 128, id="512M"),
    pytest.param(1024, 768, id="1G", marks=pytest.mark.slow),
])
def test_sweep_orderings_and_legacy_row(vhost, tmp_path, mem_mib, touch_mib):
    """legacy and default with ``touch_mib`` touched through the real runner,
    and in the slow variant legacy 64 MiB first.  The small case also has a
    small guest: the write-protect walk visits every populated page-table page,
    and a guest's pages are spread over its whole physical range."""
    from harness import runner

    out = tmp_path / "sweep.csv"
    # the scenarios are scenarios/vhost-sweep.toml, which scripts/soak runs too: one L2
    # vCPU running the pio loop.  An L2 whose stores keep faulting on write-protected
    # nested page tables sometimes triple-faulted in this emulated host with two L1
    # vCPUs (QEMU 7.2's TCG SVM; README "Long write-fault storms break the emulated
    # host"); the write loop runs in CI in the CLI test (beside pio, two L2 vCPUs) and
    # the negative control, on smaller guests.
    scenarios = scenario.load_scenarios(REPO / "scenarios" / "vhost-sweep.toml")
    scaling = mem_mib > 512
    if scaling:
        small = dataclasses.replace(scenarios[0], name="legacy-64", mem_mib=256, touch_mib=64)
        scenarios = [small] + [dataclasses.replace(s, name=f"{s.dirty_log_mode}-{touch_mib}", mem_mib=mem_mib,
                                                   touch_mib=touch_mib) for s in scenarios]
    big = f"{touch_mib}"
    ctx = runner.RunContext(host=vhost, out=out, host_label=vhost.name)
    asyncio.run(runner.run_matrix(ctx, scenarios))
    rows = {r["scenario"]: r for r in _read_rows(out)}
    assert len(rows) == len(scenarios), rows
    for name, row in rows.items():
        assert row["status"] == "ok", f"{name}: {row['error']}"
        assert row["accel"] == "kvm"
        assert row["dirty_log_mode"] == name.split("-")[0]
        assert row["kvm_enable_ms"] != ""            # measured (0 = no MMU walk)
        assert "tdp_mmu" in row["kvm_params"]
        # one clock: the trace matched on QEMU's own timeline (the runner also checked the invariants)
        assert row["dirty_log_start_source"] == "trace:global_dirty_changed->kvm_set_user_memory", row
        assert row["stall_pio_max_us"] != ""
    lbig, dbig = (float(rows[n]["kvm_enable_ms"]) for n in (f"legacy-{big}", f"default-{big}"))
    assert lbig > 0 and dbig < lbig / 3, (dbig, lbig)
    if scaling:
        l64 = float(rows["legacy-64"]["kvm_enable_ms"])
        assert 0 < l64 < lbig, (l64, lbig)
    # nothing of the runs is left inside L1 (a QEMU still exiting gets 15 s)
    for line in vhost.run(["ps", "-o", "pid,stat,comm"]).text.splitlines()[1:]:
        pid, stat, comm = (line.split() + ["", "", ""])[:3]
        if comm.startswith("qemu-system") and not stat.startswith("Z"):
            assert vhost.wait_pid_exit(int(pid), 15), f"L2 QEMU {pid} left running in L1"


def test_verify_catches_lost_dirty_pages(vhost, tmp_path):
    """The negative control of --verify: the source QEMU's shim clears every
    2nd dirty bit KVM_GET_DIRTY_LOG returns, so pages the write loops dirtied
    are never sent again, and the comparison must find them and fail the run."""
    from harness import runner
    from harness.qemu import dirtylog

    out = tmp_path / "lost.csv"
    sc = Scenario(name="lost-dirty", dirty_log_mode="legacy", mem_mib=256, touch_mib=64, vcpus=1, loops=("write",),
                  accel="kvm", baseline_s=0.5, verify=True, ready_timeout_s=600, migration_timeout_s=600)
    ctx = runner.RunContext(host=vhost, out=out, host_label=vhost.name, src_env={dirtylog.DROP_DIRTY_ENV: "2"})
    asyncio.run(runner.run_matrix(ctx, [sc]))
    (row,) = _read_rows(out)
    assert row["status"] == "failed", row
    assert int(row["verify_pages"]) == 256 * 256 - 96
    # 3114 pages here; an honest legacy run in the virtual host differed in 0 or 1
    # (README "Migrated memory verified"), so the control is far above that
    assert int(row["verify_mismatch_pages"]) > 100, row
    assert row["error"].startswith("migrated memory differs: "), row["error"]

