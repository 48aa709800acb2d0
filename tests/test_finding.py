"""What ``migstall demo`` says its rows show (harness.finding), and the run/demo table (harness.runtable)."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from harness import finding, results, runtable

FIX = Path(__file__).parent / "fixtures" / "compare"

#: the KVM row of issue 12, as the runner returns it (numbers, not text)
KVM_ROW = dict(run_id="r-kvm", host="virtual:debian", scenario="demo-kvm-legacy", accel="kvm", repeat=1,
               guest_mem_mib=512, backing="anon", page_size_kib=4, touched_mib=256, dirty_log_mode="legacy",
               loops="pio", dirty_log_start_ms=21.5, setup_time_ms=45.0, first_pass_ms=47.125,
               kvm_enable_ms=13.3, stall_pio_max_us=31012.345, baseline_stall_max_us=1311.0,
               total_time_ms=18567.0, downtime_ms=1550.0, status="ok")
TCG_ROW = dict(run_id="r-tcg", host="local", scenario="demo", accel="tcg", repeat=1, guest_mem_mib=512,
               dirty_log_mode="default", loops="pio+write", dirty_log_start_ms=0.424, setup_time_ms=15,
               stall_pio_max_us=12257.68, stall_write_max_us=20129.558, baseline_stall_max_us=28023.658,
               total_time_ms=938, downtime_ms=222, status="ok")
FAILED_ROW = dict(run_id="r-bad", host="local", scenario="demo", accel="tcg", repeat=2, status="failed",
                  error="guest never became READY within 300s (log: /tmp/x/r-bad-src.log)")


def test_the_kvm_finding_in_plain_words():
    lines = finding.finding_lines([KVM_ROW])
    assert lines[0] == ("KVM (virtual host, legacy dirty log): dirty-log start 21.5 ms; the vCPU waiting on "
                        "the BQL stalled 31.0 ms, against 1.3 ms in the baseline; KVM spent 13.3 ms "
                        "write-protecting.")
    assert lines[1].startswith("  That stall is 24x the baseline's longest and at least as long as the dirty-log start")
    assert len(lines) == 2


def test_two_vcpus_name_both_stalls():
    """The demo's KVM row has a pio and a write vCPU: the line names both stalls."""
    (first, _) = finding.finding_lines([dict(KVM_ROW, stall_write_max_us=18012.0)])
    assert ("the vCPU waiting on the BQL stalled 31.0 ms, against 1.3 ms in the baseline; "
            "the writing vCPU stalled 18.0 ms; KVM spent 13.3 ms") in first


def test_csv_rows_say_the_same():
    """Rows read back from a CSV (text) give the same lines as the runner's rows."""
    text_row = {k: results._fmt(v) for k, v in KVM_ROW.items()}
    assert finding.finding_lines([text_row]) == finding.finding_lines([KVM_ROW])


def test_tcg_rows_test_the_plumbing_only():
    (line,) = finding.finding_lines([TCG_ROW])
    assert line.startswith("TCG (this machine, 1 run): dirty-log start 0.42 ms; these rows test the plumbing only")
    assert "host scheduling noise (the baseline alone has stalls up to 28.0 ms)" in line


def test_order_repeats_and_failures():
    rows = [TCG_ROW, dict(TCG_ROW, run_id="r2", dirty_log_start_ms=0.5), FAILED_ROW,
            KVM_ROW, dict(KVM_ROW, run_id="k2", dirty_log_start_ms=23.5, kvm_enable_ms=14.3)]
    lines = finding.finding_lines(rows)
    assert lines[0].startswith("KVM (virtual host, legacy dirty log, medians of 2 runs): dirty-log start 22.5 ms")
    assert "KVM spent 13.8 ms write-protecting" in lines[0]
    assert lines[2].startswith("TCG (this machine, 2 runs): median dirty-log start 0.46 ms")
    assert lines[-1] == "1 run failed (errors above)."


@pytest.mark.parametrize("change,needle", [
    (dict(stall_pio_max_us=2000.0), "within 3x of the baseline's longest: no stall stands out"),
    (dict(stall_pio_max_us=None, loops="write", stall_write_max_us=9712.3),
     "the writing vCPU stalled 9.7 ms, against 1.3 ms in the baseline"),
    (dict(dirty_log_mode="default", kvm_enable_ms=0.0), "KVM walked nothing at enable (dirty bits initially set)"),
    (dict(dirty_log_mode="ring", kvm_enable_ms=2.25), "KVM (virtual host, dirty ring): "),
    (dict(host="local"), "KVM (this machine, legacy dirty log)"),
    (dict(stall_pio_max_us=15000.0), "That stall is 11x the baseline's longest, but shorter than the dirty-log start."),
])
def test_kvm_variants(change, needle):
    assert needle in "\n".join(finding.finding_lines([dict(KVM_ROW, **change)]))


def test_nothing_succeeded():
    assert finding.finding_lines([FAILED_ROW]) == ["1 run failed (errors above).",
                                                  "No run succeeded: nothing to conclude."]
    assert finding.finding_lines([]) == ["No run succeeded: nothing to conclude."]


@pytest.mark.parametrize("ms,text", [(None, "-"), (0, "0"), (0.424, "0.42"), (1.3111, "1.3"), (21.5, "21.5"),
                                     (31.0, "31.0"), (255.952, "256"), (288595.678, "288596")])
def test_fmt_ms(ms, text):
    assert runtable.fmt_ms(ms) == text


def test_table_text_units_precision_and_errors():
    out = runtable.to_text([TCG_ROW, KVM_ROW, FAILED_ROW], title="demo")
    lines = out.splitlines()
    assert lines[0] == "demo"
    head = " ".join(" ".join(lines[1:3]).split())
    for unit in ("MiB", "KiB", "start ms", "pio stall", "max ms", "baseline", "stall ms", "downtime"):
        assert unit in head
    body = "\n".join(lines[3:])
    assert "31.0" in body and "12.3~" in body and "20.1~" in body and "28.0~" in body   # us -> ms
    assert "31.0~" not in body                                                         # KVM: no mark
    assert runtable.NOISE_NOTE in out                                                  # the TCG mark explained
    assert "31012" not in body and "12257" not in body                                # no raw us
    assert "dirty-log\nstop ms" not in out and "stop ms" not in head                   # no value: no column
    assert lines[-1] == "r-bad: guest never became READY within 300s (log: /tmp/x/r-bad-src.log)"
    assert "\x1b[" not in out


def test_tcg_stalls_are_marked_as_noise_only_when_shown():
    """issue 12: a TCG stall (seconds, on a busy host) never appears unexplained; a
    table without TCG stall values carries no note."""
    assert runtable.NOISE_NOTE not in runtable.to_text([KVM_ROW])
    assert runtable.NOISE_NOTE not in runtable.to_text([FAILED_ROW])
    out = runtable.to_text([dict(TCG_ROW, baseline_stall_max_us=7659067.0)])
    assert "7659~" in out and runtable.NOISE_NOTE in out


def test_failed_rows_are_red_on_a_terminal():
    from rich.console import Console

    buf = io.StringIO()
    Console(file=buf, force_terminal=True, color_system="standard", width=200).print(
        runtable.render([TCG_ROW, FAILED_ROW]))
    out = buf.getvalue()
    red = [line for line in out.splitlines() if "\x1b[31m" in line]
    assert any("r-bad:" in line for line in red) and any("failed" in line for line in red)
    assert not any("0.42" in line for line in red)


def test_run_prints_plain_when_not_a_tty_or_ci(capsys, monkeypatch):
    from harness.commands import run as run_cmd

    monkeypatch.delenv("CI", raising=False)
    run_cmd.print_rows([TCG_ROW, FAILED_ROW], title="t")            # capsys: not a TTY
    out = capsys.readouterr().out
    assert "\x1b[" not in out and "r-bad: guest never became READY" in out
    assert run_cmd.plain_output()
    monkeypatch.setenv("CI", "true")
    assert run_cmd.plain_output()


def test_table_from_a_results_csv():
    rows = results.read_rows(FIX / "stock.csv")
    out = runtable.to_text(rows)
    assert "stock-512-6: guest never became READY within 300s" in out
    assert "27.1" in out                  # stall_pio_max_us 27146.689 us of the first row


def test_verified_kvm_row_says_so():
    row = dict(KVM_ROW, verify_pages="130976", verify_mismatch_pages="0")
    lines = finding.finding_lines([row])
    assert lines[-1] == "  Migrated memory verified: 130976 pages equal on source and destination in the run."
    assert not any("verified" in ln for ln in finding.finding_lines([KVM_ROW]))


def test_stall_over_a_quiet_baseline_stands_out():
    row = dict(KVM_ROW, baseline_stall_max_us="0")
    lines = finding.finding_lines([row])
    assert lines[1].startswith("  That stall is where the baseline had no stall above the threshold"), lines
