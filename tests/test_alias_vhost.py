"""Aliased guests in the virtual host (slow: ``make test-slow``): the cost of
enabling dirty logging follows the guest's size, not the host memory behind
it, as on a real host.

Legacy dirty-log mode (KVM write-protects every mapped page at enable), one
L2 vCPU running the pio loop only (README "Long write-fault storms break the
emulated host"), a 2 GiB and an 8 GiB guest both aliased onto 512 MiB of L1's
memory, every page touched.  Each run ends with ``cancel``.

Issue 11 asks for ``kvm_enable_ms`` of the 8 GiB guest to be at least 4x that
of the 2 GiB one.  The walk also covers what the guest kernel mapped of its own
256 MiB in both runs, and on a real host 4x the pages did not cost 4x either:
KVM's own selftest in this L1 gave 22.8 ms at 256 MiB and 88.6 ms at 1 GiB
(3.9x; shared/notes/dirty-log-facts.md).  So the test asks for 3.5x, and for
the cost per mapped GiB (``kvm_mapped_mib``, own RAM included) of the two
runs to agree within 30 %: the cost follows the mapped size.
"""

from __future__ import annotations

import asyncio
import csv
import os
import re
import shutil
from pathlib import Path

import pytest

from harness.scenario import Scenario

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None or shutil.which("sshd") is None
                       and not os.path.exists("/usr/sbin/sshd"), reason="needs qemu-system-x86 and openssh-server"),
]

ALIAS_MIB = 512
#: every page of 8 GiB is touched through L2's nested page faults: allow an hour
READY_TIMEOUT_S = 3600.0
_LOG_ON = re.compile(r"kvm_set_user_memory (?:AddrSpace#\d+ )?Slot#\d+ "
                     r"flags=0x([0-9a-f]+) gpa=0x([0-9a-f]+) size=0x([0-9a-f]+)")


def _alias_slots_logged(trace_lines, alias_mib: int) -> int:
    """Distinct alias memslots (size alias_mib) whose dirty logging was turned on."""
    gpas = {m.group(2) for m in map(_LOG_ON.search, trace_lines)
            if m and int(m.group(1), 16) & 1 and int(m.group(3), 16) == alias_mib << 20}
    return len(gpas)


def test_enable_cost_follows_the_aliased_size(tmp_path):
    import json

    from harness import runner
    from harness.hosts.virtual import VirtualHost

    out = tmp_path / "alias-vhost.csv"
    common = dict(alias_mib=ALIAS_MIB, backing="memfd", accel="kvm", dirty_log_mode="legacy", vcpus=1,
                  loops=("pio",), end_action="cancel", cancel_after_s=0.5, baseline_s=0.5,
                  ready_timeout_s=READY_TIMEOUT_S, migration_timeout_s=600.0)
    scenarios = [Scenario(name=f"alias-{g}g", mem_mib=g * 1024, **common) for g in (2, 8)]
    with VirtualHost(kernel=os.environ.get("MIGSTALL_TEST_L1_KERNEL") or "debian") as vh:
        vh.start()
        ctx = runner.RunContext(host=vh, out=out, host_label=vh.name)
        asyncio.run(runner.run_matrix(ctx, scenarios))
    with open(out, newline="") as fh:
        rows = {r["scenario"]: r for r in csv.DictReader(fh)}
    for name, row in rows.items():
        assert row["status"] == "ok", f"{name}: {row['error']}"
        assert row["alias_mib"] == str(ALIAS_MIB) and row["dirty_log_mode"] == "legacy"
        assert float(row["touched_mib"]) >= 0.95 * float(row["guest_mem_mib"])
        assert row["dirty_log_start_source"] == "trace:global_dirty_changed->kvm_set_user_memory"
        side = json.loads(Path(row["sidecar"]).read_text())
        # the dirty-log start covered every alias memslot
        assert _alias_slots_logged(side["trace_lines"], ALIAS_MIB) == int(row["guest_mem_mib"]) // ALIAS_MIB
        assert float(row["kvm_mapped_mib"]) >= 0.95 * float(row["guest_mem_mib"])
    small, big = (float(rows[f"alias-{g}g"]["kvm_enable_ms"]) for g in (2, 8))
    assert small > 0 and big >= 3.5 * small, (small, big)
    per_gib = [float(rows[f"alias-{g}g"]["kvm_enable_ms"]) / float(rows[f"alias-{g}g"]["kvm_mapped_mib"]) * 1024
               for g in (2, 8)]
    assert 1 / 1.3 <= per_gib[1] / per_gib[0] <= 1.3, per_gib
