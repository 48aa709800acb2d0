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


def _row(mem, enable, start, pio_us=30000.0, write_ms=200.0, pf=1000, **kw):
    return {"status": "ok", "guest_mem_mib": mem, "verify_pages": 130976, "verify_mismatch_pages": 0,
            "kvm_enable_ms": enable, "dirty_log_start_ms": start, "stall_pio_max_us": pio_us,
            "stall_write_sum_ms": write_ms, "kvm_pf": pf, **kw}


def test_summary_lines():
    lines = summary_lines({
        "stock": [_row(512, 45.3, 65.4), _row(512, 67.1, 141.4), _row(1024, 90.0, 120.0)],
        "patched": [_row(512, 1.5, 21.1, write_ms=400.0), _row(512, 1.7, 25.0, write_ms=380.0),
                    {"status": "failed", "run_id": "r2", "error": "the guest reset itself"},
                    _row(1024, 2.0, 30.0)],
    })
    assert lines[0] == "stock: 3 of 3 runs ok; 3 with migrated memory verified equal"
    assert lines[1] == "patched: 3 of 4 runs ok; 3 with migrated memory verified equal"
    assert lines[2] == "  patched r2: the guest reset itself"
    assert lines[3] == "512 MiB guest (2 stock, 2 patched runs ok):"
    assert lines[4] == ("  KVM's dirty-log enable: stock 56.2 ms, patched 1.60 ms (medians), 35.1x lower; "
                        "the ranges do not overlap")
    assert lines[6] == "  worst pio stall after migrate: stock 30.0 ms, patched 30.0 ms (medians), about the same; " \
                       "the ranges overlap"
    assert lines[7].startswith("  write-loop stall in the 2 s after migrate: stock 200.0 ms, "
                               "patched 390.0 ms (medians), 1.95x higher")
    assert lines[9] == "1024 MiB guest (1 stock, 1 patched runs ok):"
    assert lines[-2].startswith("Verdict: at 1024 MiB the series starts dirty logging with 45.0x less KVM work "
                                "(90.0 -> 2.00 ms")
    assert "the guest's writes stalled about as long afterwards (200.0 -> 200.0 ms" in lines[-2]
    more = summary_lines({"stock": [_row(512, 45.3, 65.4)], "patched": [_row(512, 1.5, 21.1, write_ms=300.0)]})
    assert "the guest's writes paid for it afterwards (200.0 -> 300.0 ms" in more[-2]
    assert lines[-1].startswith("The virtual host is nested KVM under TCG")


def test_summary_says_lost_writes_first():
    lines = summary_lines({"stock": [_row(512, 45.3, 65.4)],
                           "patched": [_row(512, 1.5, 21.1),
                                       dict(_row(512, 1.4, 20.0), status="failed", verify_mismatch_pages=3,
                                            error="migrated memory differs: 3 pages")]})
    assert lines[-2].startswith("Verdict: the patched kernel LOST WRITES: 1 run(s)"), lines
