"""migstall compare: golden tables, the verdict rule, the gate, bad input.

Fixtures: tests/fixtures/compare/ (generate.py writes them deterministically;
the expected_* files are the golden outputs; MIGSTALL_REGOLD=1 rewrites them).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from harness import cli, results
from harness.compare import gate, load, stats, table

FIX = Path(__file__).parent / "fixtures" / "compare"
REPO = Path(__file__).resolve().parent.parent


def _cli(*args, cwd=FIX, timeout=120):
    """The real command line, in a subprocess."""
    return subprocess.run([sys.executable, "-m", "harness", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "PYTHONPATH": str(REPO)})


def _golden(name: str, got: str) -> None:
    path = FIX / name
    if os.environ.get("MIGSTALL_REGOLD"):
        path.write_text(got)
    assert got == path.read_text(), f"{name} differs; rerun with MIGSTALL_REGOLD=1 if intended"


def test_golden_markdown_and_csv(tmp_path):
    md, csv_out = tmp_path / "cmp.md", tmp_path / "cmp.csv"
    proc = _cli("compare", "stock.csv", "patched.csv", "--markdown", str(md), "--csv", str(csv_out))
    assert proc.returncode == 0, proc.stderr
    assert "dirty_log_start_ms" in proc.stdout and "improved" in proc.stdout
    _golden("expected_comparison.md", md.read_text())
    _golden("expected_comparison.csv", csv_out.read_text())


def test_tcg_stall_metrics_are_called_noise(tmp_path):
    """issue 12: a compare of TCG rows says its stall metrics are host scheduling noise;
    a KVM compare (the golden files) does not."""
    for name in ("stock.csv", "patched.csv"):
        text = (FIX / name).read_text()
        (tmp_path / name).write_text(text.replace(",kvm,", ",tcg,"))
    cmp = stats.compare(load.load(str(tmp_path / "stock.csv"), "stock"),
                        load.load(str(tmp_path / "patched.csv"), "patched"))
    (note,) = [line for line in table.summary_lines(cmp) if line.startswith("TCG scenarios")]
    assert "sweep mem=512 mode=legacy ring=0" in note and "host scheduling noise" in note
    kvm = stats.compare(load.load(str(FIX / "stock.csv"), "stock"), load.load(str(FIX / "patched.csv"), "patched"))
    assert not [line for line in table.summary_lines(kvm) if line.startswith("TCG")]


def test_comparison_content():
    cmp = stats.compare(load.load(str(FIX / "stock.csv"), "stock"), load.load(str(FIX / "patched.csv"), "patched"))
    labels = [s.label for s in cmp.scenarios]
    assert labels == ["sweep mem=512 mode=legacy ring=0", "sweep mem=1024 mode=legacy ring=0",
                      "sweep mem=2048 mode=legacy ring=0"]
    assert cmp.only_base == ("sweep mem=1024 mode=ring ring=4096 (1 runs, 0 failed)",) and cmp.only_new == ()
    by = {(s.label.split()[1], m.metric): (s, m) for s, m in cmp.rows()}
    for mem in ("mem=512", "mem=1024", "mem=2048"):
        s, m = by[(mem, "dirty_log_start_ms")]
        assert m.verdict == "improved" and m.separated and m.pct_change < -80
        assert m.ci_low <= m.ratio <= m.ci_high
        assert 0 < m.p_value < 0.05
        assert m.base.n == m.new.n == 5                      # the failed run is not a number
        _, tot = by[(mem, "total_time_ms")]
        assert tot.verdict == "unchanged"
    s512, _ = by[("mem=512", "dirty_log_start_ms")]
    assert (s512.base_failed, s512.new_failed) == (1, 1)
    # metrics never measured on either side are not listed
    assert not any(m.metric == "kvm_disable_ms" for _, m in cmp.rows())
    # deterministic: the same inputs give the same numbers
    again = stats.compare(load.load(str(FIX / "stock.csv"), "stock"), load.load(str(FIX / "patched.csv"), "patched"))
    assert table.to_csv(again) == table.to_csv(cmp)


@pytest.mark.parametrize("base,new,verdict", [
    ([10, 11, 12], [10.5, 11, 11.5], "unchanged"),     # < threshold
    ([10, 11, 12], [13, 14, 15], "regressed"),         # +27%, ranges separate
    ([10, 11, 12], [7, 8, 9], "improved"),
    ([10, 11, 30], [12, 14, 16], "noisy"),             # +27% but ranges overlap
    ([10], [20], "noisy"),                             # fewer than MIN_N values
    ([0, 0], [0, 0], "unchanged"),
    ([0, 0, 0], [5, 6, 7], "regressed"),               # from 0: infinite change, separated
    ([], [1, 2], "missing"),
])
def test_verdict_rule(base, new, verdict):
    assert stats.compare_metric("dirty_log_start_ms", base, new, 10.0).verdict == verdict


def test_gate_trips_on_20pct_regression():
    proc = _cli("compare", "gate_base.csv", "gate_regressed.csv", "--fail-on", "dirty_log_start_ms:+10", "--quiet")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "gate failed: dirty_log_start_ms regressed +" in proc.stderr


def test_gate_passes_on_noise():
    proc = _cli("compare", "gate_base.csv", "gate_noise.csv", "--fail-on", "dirty_log_start_ms:+10",
                "--fail-on", "setup_time_ms:+5", "--quiet")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "gate passed" not in proc.stdout  # --quiet


def test_gate_against_stored_baseline(capsys):
    rc = cli.main(["compare", str(FIX / "gate_regressed.csv"), "--baseline", str(FIX / "gate_base.csv"),
                   "--fail-on", "dirty_log_start_ms:+10", "--quiet"])
    assert rc == 1
    assert "gate failed" in capsys.readouterr().err
    # BASE NEW plus a baseline: the gate uses baseline vs NEW
    rc = cli.main(["compare", str(FIX / "gate_regressed.csv"), str(FIX / "gate_noise.csv"), "--baseline",
                   str(FIX / "gate_base.csv"), "--fail-on", "dirty_log_start_ms:+10", "--quiet"])
    assert rc == 0


def test_gate_spec_parsing():
    assert gate.parse_spec("dirty_log_start_ms:+10") == gate.GateSpec("dirty_log_start_ms", 10.0)
    assert gate.parse_spec("stall_pio_max_us:+2.5%").pct == 2.5
    for bad in ("dirty_log_start_ms:10", "nosuch:+10", "dirty_log_start_ms:+0", "x"):
        with pytest.raises(ValueError):
            gate.parse_spec(bad)


def _one_line_exit2(args, capsys):
    with pytest.raises(SystemExit) as exc:  # argparse errors
        cli.main(args)
    return exc.value.code


@pytest.mark.parametrize("args,needle", [
    (["missing.csv", "patched.csv"], "no such file"),
    (["schemaless.csv", "patched.csv"], "not a migstall results CSV"),
    (["stock.csv", "other.csv"], "no common scenario"),
    (["stock.csv", "binary.csv"], "not text"),
    (["stock.csv", "emptydir"], "holds no migstall results CSV"),
    (["stock.csv", "empty.csv"], "empty file"),
    (["stock.csv"], "needs BASE and NEW"),
    (["stock.csv", "patched.csv", "--base-variant", "nosuch"], "no rows with kernel_variant='nosuch'"),
])
def test_bad_input_one_line_exit_2(args, needle, tmp_path, capsys, monkeypatch):
    for name in ("stock.csv", "patched.csv", "schemaless.csv", "other.csv"):
        (tmp_path / name).write_bytes((FIX / name).read_bytes())
    (tmp_path / "binary.csv").write_bytes(b"\xff\xfe\x00run_id\x00\x9c")
    (tmp_path / "empty.csv").write_bytes(b"")
    (tmp_path / "emptydir").mkdir()
    monkeypatch.chdir(tmp_path)
    rc = cli.main(["compare", *args, "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2
    assert needle in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


@pytest.mark.parametrize("flag", [["--fail-on", "bogus:+5"], ["--threshold", "abc"]])
def test_bad_flags_exit_2(flag, capsys):
    code = _one_line_exit2(["compare", str(FIX / "stock.csv"), str(FIX / "patched.csv"), *flag], capsys)
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1


def test_bad_input_through_subprocess():
    proc = _cli("compare", "schemaless.csv", "patched.csv")
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "schemaless.csv" in proc.stderr and proc.stdout == ""


def test_results_directory_and_variant_filter(tmp_path):
    d = tmp_path / "res"
    d.mkdir()
    for name in ("stock.csv", "patched.csv"):
        (d / name).write_bytes((FIX / name).read_bytes())
    (d / "comparison.csv").write_text("scenario,metric\nx,y\n")   # not a results CSV: skipped in a dir
    rs = load.load(str(d))
    assert {r.get("kernel_variant") for r in rs.runs} == {"stock", "patched"}
    cmp = stats.compare(rs.filter_variant("stock"), rs.filter_variant("patched"))
    assert len(cmp.scenarios) == 3


def test_sidecar_location(tmp_path):
    rs = load.load(str(FIX / "stock.csv"))
    run = next(r for r in rs.runs if r.run_id == "stock-1024-1")
    assert run.sidecar_file() == FIX / "stock.sidecars" / "stock-1024-1.json"
    # without the column: results.sidecar_path
    out = tmp_path / "x.csv"
    results.append_rows(out, [{"run_id": "r1", "status": "ok", "dirty_log_start_ms": 1}])
    results.atomic_write_json(results.sidecar_path(out, "r1"), {"timeline": {"stalls": []}})
    (run2,) = load.load(str(out)).runs
    assert run2.sidecar_file() == results.sidecar_path(out, "r1")


def test_failed_row_without_run_facts_joins_its_scenario(tmp_path):
    """A run that failed before QEMU answered has no qemu_version/page size: still counted."""
    rows = []
    for variant, base in (("stock", 60.0), ("patched", 6.0)):
        out = tmp_path / f"{variant}.csv"
        ok = [dict(run_id=f"{variant}{i}", status="ok", scenario="s", host="h", kernel_variant=variant,
                   qemu_version="7.2.0", page_size_kib=4, accel="kvm", guest_mem_mib=512,
                   dirty_log_start_ms=base + i) for i in range(3)]
        bad = results.failed_row(dict(run_id=f"{variant}-f", scenario="s", host="h", kernel_variant=variant,
                                      accel="kvm", guest_mem_mib=512), "boot of the kernel never came back")
        results.append_rows(out, ok + [bad])
        rows.append(out)
    cmp = stats.compare(load.load(str(rows[0])), load.load(str(rows[1])))
    (sc,) = cmp.scenarios
    assert (sc.base_failed, sc.new_failed, sc.base_ok, sc.new_ok) == (1, 1, 3, 3)
    assert cmp.only_base == cmp.only_new == ()


def _old_bootstrap_ratio_ci(base, new, resamples=stats.BOOTSTRAP_RESAMPLES, seed=stats.BOOTSTRAP_SEED):
    """The implementation before scipy.stats.bootstrap (the golden outputs were made with it)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    b, n = np.asarray(base, dtype=float), np.asarray(new, dtype=float)
    mb = np.median(rng.choice(b, size=(resamples, b.size), replace=True), axis=1)
    mn = np.median(rng.choice(n, size=(resamples, n.size), replace=True), axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = mn / mb
    ratios = ratios[np.isfinite(ratios)]
    if ratios.size < resamples // 2:
        return None, None
    return float(np.percentile(ratios, 2.5)), float(np.percentile(ratios, 97.5))


@pytest.mark.parametrize("nb,nn", [(5, 5), (2, 7), (1, 6), (6, 1), (1, 1), (40, 100), (3, 3)])
def test_bootstrap_through_scipy_draws_what_it_always_drew(nb, nn):
    import numpy as np

    rng = np.random.default_rng(nb * 100 + nn)
    base = np.round(rng.uniform(50, 70, nb), 3).tolist()
    new = np.round(rng.uniform(4, 8, nn), 3).tolist()
    assert stats.bootstrap_ratio_ci(base, new) == _old_bootstrap_ratio_ci(base, new)
    zero = [0.0] * nb
    assert stats.bootstrap_ratio_ci(zero, new) == _old_bootstrap_ratio_ci(zero, new) == (None, None)


@pytest.mark.parametrize("nb,nn", [(2000, 2000), (101, 350), (1001, 6)])
def test_large_sample_bootstrap_has_the_resampling_distribution(nb, nn):
    """Above RESAMPLE_MAX_N the resample medians come from the order statistics' exact
    distribution; the CI agrees with brute-force resampling within Monte Carlo error."""
    import numpy as np

    rng = np.random.default_rng(nb + nn)
    base = np.round(rng.lognormal(3.0, 0.3, nb), 1)        # rounded: ties, as real columns have
    new = np.round(rng.lognormal(2.5, 0.4, nn), 1)
    lo, hi = stats.bootstrap_ratio_ci(base, new)
    assert (lo, hi) == stats.bootstrap_ratio_ci(base, new)   # deterministic
    brute = [_old_bootstrap_ratio_ci(base, new, resamples=4000, seed=s) for s in (1, 2)]
    width = hi - lo
    for blo, bhi in brute:
        assert abs(blo - lo) < 0.15 * width and abs(bhi - hi) < 0.15 * width, (lo, hi, blo, bhi)
    mlo, mhi = stats.bootstrap_median_ci(base)
    assert mlo <= np.median(base) <= mhi


def test_summary_from_groupby_matches_numpy():
    import numpy as np

    cmp = stats.compare(load.load(str(FIX / "stock.csv")), load.load(str(FIX / "patched.csv")))
    for _, m in cmp.rows():
        for s in (m.base, m.new):
            ref = stats.Sample.of(s.values)
            assert (s.n, s.median, s.min, s.max) == (ref.n, ref.median, ref.min, ref.max)
            assert np.isclose(s.q1, ref.q1, rtol=1e-12) and np.isclose(s.q3, ref.q3, rtol=1e-12)


def test_large_comparison_is_quick_and_deterministic(tmp_path):
    """6 sizes x 150 repeats a side through the whole pipeline (the benchmark's generator)."""
    import time

    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import compare_large
    finally:
        sys.path.pop(0)
    stock, patched = compare_large.generate(tmp_path, 150)
    t = time.perf_counter()
    cmp = stats.compare(load.load(str(stock)), load.load(str(patched)))
    elapsed = time.perf_counter() - t
    assert len(cmp.scenarios) == 6 and all(s.base_ok + s.base_failed == 150 for s in cmp.scenarios)
    by = {(s.label, m.metric): m for s, m in cmp.rows()}
    assert all(by[(s.label, "dirty_log_start_ms")].verdict == "improved" for s in cmp.scenarios)
    assert table.to_csv(stats.compare(load.load(str(stock)), load.load(str(patched)))) == table.to_csv(cmp)
    assert elapsed < 20, elapsed          # generous: the machine is shared; the benchmark measures


@pytest.mark.parametrize("kind", ["normal", "ties", "separated", "equal_medians"])
@pytest.mark.parametrize("nb,nn", [(9, 9), (9, 40), (120, 75), (2000, 2000)])
def test_mann_whitney_without_scipy_stats_is_scipys_float(kind, nb, nn):
    """Above 8 values per side the p-value is computed without scipy.stats: bit for bit the same."""
    from scipy.stats import mannwhitneyu

    rng = np.random.default_rng(nb * 7 + nn)
    if kind == "normal":
        base, new = rng.normal(100, 10, nb), rng.normal(103, 10, nn)
    elif kind == "ties":
        base, new = rng.integers(0, 5, nb).astype(float), rng.integers(0, 6, nn).astype(float)
    elif kind == "separated":
        base, new = rng.normal(0, 1, nb), rng.normal(50, 1, nn)
    else:
        base, new = np.arange(nb, dtype=float), np.arange(nn, dtype=float) + (nb - nn) / 2
    want = float(mannwhitneyu(new, base, alternative="two-sided").pvalue)
    assert stats._mann_whitney_normal_p(new, base) == want
    assert stats.mann_whitney_p(base, new) == want
