"""End to end: migstall nightly against the virtual host (slow; `make test-slow`).

1. the kernel pipeline builds (or takes from its cache) stock and patched kernels
   of patches/migstall-dirtylog-tracepoints;
2. the virtual host boots its default kernel (Debian's), then "reboots" into
   stock (uname -r verified), runs the scenario; into patched, runs it;
3. it is returned to its default kernel; compare + report + gate;
4. a second nightly resumes: every run already has an ok row, nothing runs.

Budget on 2 shared cores: kernel builds ~4 min each when not cached, each L1
boot 1-3 min under TCG, each run ~1 min.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from harness import cli, results

REPO = Path(__file__).resolve().parent.parent
MANIFEST = REPO / "patches" / "migstall-dirtylog-tracepoints" / "series.toml"

pytestmark = pytest.mark.slow


def test_nightly_virtual_host_end_to_end(tmp_path, capsys):
    (tmp_path / "scen.toml").write_text("""
[[scenario]]
name = "nightly-e2e"
mem = "512M"
vcpus = 1          # the tiny L1 kernel may bring up one CPU only; keep L2 from oversubscribing it
touch = 256
accel = "kvm"
dirty_log_mode = "legacy"
baseline_s = 0.5
repeat = 2
""")
    (tmp_path / "nightly.toml").write_text(f"""
scenarios = "scen.toml"
out = "res"
manifest = "{MANIFEST}"
variants = ["stock", "patched"]
fail_on = ["dirty_log_start_ms:+400"]
interleave = false
boot_timeout_s = 600
restore_default = true

[[host]]
name = "ci-virtual"
virtual = "debian"
""")
    t0 = time.monotonic()
    rc = cli.main(["nightly", "--config", str(tmp_path / "nightly.toml")])
    out = capsys.readouterr()
    wall = time.monotonic() - t0
    print(out.out, out.err, f"wall {wall:.0f}s")
    assert "boots: stock 6.1" in out.out and "patched 6.1" in out.out, out.out + out.err
    for variant in ("stock", "patched"):
        rows = results.read_rows(tmp_path / "res" / "ci-virtual" / f"{variant}.csv")
        assert len(rows) == 2, rows
        for row in rows:
            assert row["status"] == "ok", row["error"]
            assert row["kernel_variant"] == variant and row["accel"] == "kvm"
            assert re.search(rf"-migstall-{variant}-[0-9a-f]{{8}}$", row["host_kernel"]), row["host_kernel"]
            assert Path(row["sidecar"]).is_file()
    report = tmp_path / "res" / "report" / "index.html"
    assert report.is_file() and "data:image/png;base64," in report.read_text()
    md = (tmp_path / "res" / "report" / "comparison.md").read_text()
    assert "dirty_log_start_ms" in md
    assert rc == 0, out.err
    # resume: nothing left to do, no host started
    t1 = time.monotonic()
    assert cli.main(["nightly", "--config", str(tmp_path / "nightly.toml")]) == 0
    assert "ran 0, skipped 4" in capsys.readouterr().out
    assert time.monotonic() - t1 < 60


def test_nightly_boot_that_never_comes_back(tmp_path, capsys):
    """A test kernel that panics at boot (no such init): failed rows, host back on its default."""
    (tmp_path / "scen.toml").write_text("""
[[scenario]]
name = "nightly-noboot"
mem = "512M"
accel = "kvm"
repeat = 1
""")
    (tmp_path / "nightly.toml").write_text(f"""
scenarios = "scen.toml"
out = "res"
manifest = "{MANIFEST}"
variants = ["patched"]
boot_timeout_s = 300

[[host]]
name = "ci-virtual"
virtual = "debian"
cmdline_extra = "rdinit=/migstall-no-such-init init=/migstall-no-such-init"
""")
    rc = cli.main(["nightly", "--config", str(tmp_path / "nightly.toml")])
    out = capsys.readouterr()
    print(out.out, out.err)
    assert rc == 1
    (row,) = results.read_rows(tmp_path / "res" / "ci-virtual" / "patched.csv")
    assert row["status"] == "failed" and "booting patched on ci-virtual failed" in row["error"]
    kept = re.search(r"\(log: ([^)]+)\)", row["error"])
    assert kept and Path(kept.group(1)).is_file() and str(tmp_path) in kept.group(1)   # L1 console kept
    assert "default 6.1.0-" in out.out and "failed 1" in out.out
    assert "could not return" not in out.out
