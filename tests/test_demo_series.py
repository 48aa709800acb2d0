"""migstall demo-series: bad input is refused before any build; the summary's words."""

from __future__ import annotations

import subprocess
import sys

import pytest

from harness.commands.demo_series import summary_lines


@pytest.mark.parametrize("argv, needle", [
    (["--repeat", "0"], "--repeat 0 must be at least 1"),
    (["--scenario", "/nonexistent.toml"], "--scenario /nonexistent.toml: no such file"),
])
def test_bad_input_exits_2_before_building(argv, needle, tmp_path):
    res = subprocess.run([sys.executable, "-m", "harness", "demo-series", "--out", str(tmp_path / "o"), *argv],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2, res.stderr
    assert needle in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_bad_scenario_content_exits_2_before_building(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[[scenario]]\nname = "x"\nmemory = "512M"\n')
    res = subprocess.run([sys.executable, "-m", "harness", "demo-series", "--scenario", str(bad),
                          "--out", str(tmp_path / "o")], capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "unknown key 'memory'" in res.stderr, res.stderr
    assert not (tmp_path / "o").exists()


def test_existing_results_are_not_appended_to(tmp_path):
    (tmp_path / "stock.csv").write_text("x\n")
    res = subprocess.run([sys.executable, "-m", "harness", "demo-series", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "stock.csv exists" in res.stderr


def test_summary_lines():
    ok = {"status": "ok", "verify_pages": 130976, "verify_mismatch_pages": 0, "kvm_enable_ms": 45.3,
          "dirty_log_start_ms": 65.4}
    lines = summary_lines({
        "stock": [ok, dict(ok, kvm_enable_ms=67.1, dirty_log_start_ms=141.4)],
        "patched": [dict(ok, kvm_enable_ms=1.5, dirty_log_start_ms=21.1),
                    {"status": "failed", "run_id": "r2", "error": "the guest reset itself"}],
    })
    assert lines[0] == ("stock: 2 of 2 runs ok; 2 with migrated memory verified equal; KVM enable median 56.2 ms; "
                        "dirty-log start median 103.4 ms")
    assert lines[1].startswith("patched: 1 of 2 runs ok; 1 with migrated memory verified equal; KVM enable median 1.5")
    assert lines[2] == "  patched r2: the guest reset itself"
