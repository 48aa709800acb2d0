"""`migstall run --host virtual[:KERNEL]`: the CLI boots its own L1, runs one
legacy-mode KVM scenario in it and stops it (about 2 minutes alone)."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import shutil

import pytest

from harness import procs

pytestmark = pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None or not os.path.exists("/usr/sbin/sshd"),
                                reason="needs qemu-system-x86 and openssh-server")
REPO = Path(__file__).resolve().parent.parent


def _l1_kernel() -> str:
    """$MIGSTALL_TEST_L1_KERNEL (``debian`` or a bzImage with KVM built in), else Debian's kernel."""
    return os.environ.get("MIGSTALL_TEST_L1_KERNEL") or "debian"


def _l1_processes():
    """L1 VMs booted by `--host virtual` (their workdir is a /tmp/migstall-l1-* dir)."""
    return [(pid, cmd) for pid, cmd in procs.leftovers() if "migstall-l1" in cmd and "/migstall-l1-" in cmd]


def test_cli_run_host_virtual_legacy(tmp_path):
    """`migstall run --host virtual:KERNEL` boots its own L1 and stops it."""
    before = {pid for pid, _ in _l1_processes()}
    out = tmp_path / "one.csv"
    spec = "virtual" if _l1_kernel() == "debian" else f"virtual:{_l1_kernel()}"
    proc = subprocess.run([sys.executable, "-m", "harness", "run", "--host", spec, "--accel", "kvm",
                           "--dirty-log-mode", "legacy", "--mem", "512M", "--touch", "128",
                           "--baseline-s", "0.5", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=900, env={**os.environ, "CI": "true"})
    with open(out, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 1, proc.stderr[-2000:]
    row = rows[0]
    assert row["status"] == "ok", row["error"]
    assert row["accel"] == "kvm" and row["host"].startswith("virtual")
    assert float(row["kvm_enable_ms"]) > 0
    assert proc.returncode == 0
    assert [p for p, _ in _l1_processes() if p not in before] == []
