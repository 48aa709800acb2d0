"""Calibration on a real TCG guest: SIGSTOP pauses and a BQL-only hold.

One guest is booted for the module (about 15-25 s on 2 busy cores): three
300 ms SIGSTOP pauses and a ~300 ms pmemsave BQL hold are injected.  On a
quiet machine each pause is detected within ~10 ms; when the host is busy
(CI neighbours, other VMs) the vCPU threads may wait for a CPU after SIGCONT,
which the guest rightly sees as a longer pause, so the +-60 ms check applies to
the median of the three, and no pause may be under-detected.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import subprocess
from pathlib import Path

import pytest

from harness.calibrate import CalibrationResult, calibrate, match, parse_pauses, Injection
from harness.errors import UserError
from harness.hosts.local import LocalHost

REPO = Path(__file__).resolve().parent.parent
TOLERANCE_MS = 60.0


@pytest.fixture(scope="module")
def result() -> CalibrationResult:
    with LocalHost() as host:
        return asyncio.run(calibrate(host, [300, 300, 300], bql_ms=300, accel="tcg"))


def points(result, kind, loop):
    return [p for p in result.points if p.kind == kind and p.loop == loop]


def test_sigstop_300ms_detected_within_60ms(result):
    for loop in ("pio", "cpu"):
        pts = points(result, "sigstop", loop)
        assert len(pts) == 3
        for p in pts:
            assert 290 <= p.injected_ms <= 400, p      # the host's own measure of the stop
            assert p.detected_ms >= p.injected_ms - TOLERANCE_MS, p
            assert p.accel == "tcg"
        errors = [p.detected_ms - p.injected_ms for p in pts]
        assert abs(statistics.median(errors)) <= TOLERANCE_MS, pts


def test_bql_hold_seen_by_pio_not_by_cpu(result):
    (pio,) = points(result, "bql", "pio")
    (cpu,) = points(result, "bql", "cpu")
    assert pio.injected_ms >= 100, pio                 # the hold really lasted
    assert abs(pio.detected_ms - pio.injected_ms) <= TOLERANCE_MS, pio
    assert cpu.detected_ms < pio.injected_ms / 2, cpu  # compute never needs the BQL


def test_json_shape(result):
    rows = result.to_list()
    assert len(rows) == 8
    for r in rows:
        assert {"injected_ms", "detected_ms", "accel", "kind", "loop"} <= set(r)
        json.dumps(r)
    # the uncertainty (best half round trip + largest residual) grows with the host's
    # load (README "Clocks"; 32 ms in a loaded CI run, <1 ms idle).  It is not bounded
    # by the round trips alone: a TCG guest's clock is not linear against the host's
    # (a CI run here: 7.4 ms of residual with a 2.25 ms round-trip limit; CI runs 55 and
    # 80: 383 and 797 ms, the guest's TSC a fifth or more off the host's clock between
    # two batches of marks, beyond what the fit corrected then: clock.MAX_SKEW; CI run
    # 83: 360 ms at a fitted slope of 0.973, the gain not steady), and the fit reports
    # that honestly instead of hiding it.  So no upper bound here: how linear a TCG
    # guest's clock is depends on the host of the day (README "A TCG guest's clock
    # runs fast"), not on the JSON; the pauses are checked by the detection tests above
    c = result.clock
    assert c["uncertainty_us"] >= c["best_half_rtt_us"], c


def test_match_picks_overlapping_stall_only():
    class Rec:
        cpu, cls = 0, "pio"
        stalls = ((1_000_000_000, 50_000_000), (5_000_000_000, 300_000_000), (9_000_000_000, 900_000_000))

    class Clock:
        uncertainty_ns = 0

        @staticmethod
        def to_host(t):
            return t + 100

    inj = Injection("sigstop", 300.0, 5_000_000_100, 5_300_000_100)
    (p,) = match([inj], [Rec()], Clock(), "tcg")
    assert p.detected_ms == 300.0
    far = Injection("sigstop", 10.0, 20_000_000_000, 20_010_000_000)
    (q,) = match([far], [Rec()], Clock(), "tcg")
    assert q.detected_ms == 0.0


def test_pause_parsing():
    assert parse_pauses("50,300,1000") == (50, 300, 1000)
    for bad in ("", "0", "fifty", "50,,300", "-5", "100000"):
        with pytest.raises(UserError):
            parse_pauses(bad)


def test_cli_bad_pause_is_exit_2():
    r = subprocess.run([str(REPO / ".venv/bin/migstall"), "calibrate", "--pause-ms", "abc"],
                       capture_output=True, text=True, timeout=60, env={**os.environ, "CI": "true"})
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
