"""harness.results.load: results CSVs -> one typed pandas DataFrame; bad files rejected in one line."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from harness import results
from harness.errors import UserError

FIX = Path(__file__).parent / "fixtures" / "compare"


def test_types_of_the_fixture_frame():
    df = results.load(FIX / "stock.csv")
    assert list(df.columns) == list(results.COLUMNS) + ["source"]
    assert len(df) == 17
    for c in results.METRIC_COLUMNS + ("repeat", "touched_mib", "prefault_ms"):
        assert df[c].dtype == np.float64, c
    for c in results.SCENARIO_COLUMNS:
        assert isinstance(df[c].dtype, pd.CategoricalDtype) and df[c].cat.ordered, c
    assert isinstance(df["kernel_variant"].dtype, pd.CategoricalDtype)
    assert isinstance(df["status"].dtype, pd.CategoricalDtype)
    assert str(df["started_at"].dtype).startswith("datetime64") and str(df["started_at"].dt.tz) == "UTC"
    # numbers in scenario keys are numbers, sorted by value
    assert list(df["guest_mem_mib"].cat.categories) == [512, 1024, 2048]
    assert (df["guest_mem_mib"] == 512).sum() == 6          # 5 ok + 1 failed
    # empty is missing: a failed row has NaN metrics, an ok row NaN error
    failed = df[df["status"] == "failed"].iloc[0]
    assert math.isnan(failed["dirty_log_start_ms"]) and "READY" in failed["error"]
    assert df.loc[df["status"] == "ok", "error"].isna().all()
    assert df.loc[0, "dirty_log_start_ms"] == 28.245 and df.loc[0, "setup_time_ms"] == 37.504
    assert df.loc[0, "started_at"] == pd.Timestamp("2026-11-25T01:01:00Z")
    assert df["source"].iloc[0] == str(FIX / "stock.csv")
    assert df.attrs["sources"] == [str(FIX / "stock.csv")]


def test_numbers_are_parsed_as_python_does(tmp_path):
    """Exactly Python's float() of the CSV text (compare's statistics depend on it)."""
    import csv

    df = results.load([FIX / "stock.csv", FIX / "patched.csv"])
    texts = []
    for name in ("stock.csv", "patched.csv"):
        with open(FIX / name, newline="") as fh:
            texts += [r["first_pass_ms"] for r in csv.DictReader(fh)]
    want = [float(t) if t else math.nan for t in texts]
    got = df["first_pass_ms"].tolist()
    assert len(got) == len(want)
    assert all((math.isnan(a) and math.isnan(b)) or a == b for a, b in zip(got, want))


def test_notebook_use(tmp_path):
    """The README's three lines."""
    d = tmp_path / "results"
    d.mkdir()
    for name in ("stock.csv", "patched.csv"):
        (d / name).write_bytes((FIX / name).read_bytes())
    df = results.load(str(d) + "/")
    med = df[df.status == "ok"].groupby(["kernel_variant", "guest_mem_mib"], observed=True).dirty_log_start_ms.median()
    assert med[("stock", 1024)] > 10 * med[("patched", 1024)]
    assert list(med.index.get_level_values(1)[:3]) == [512, 1024, 2048]


def test_older_schema_gains_columns_newer_keeps_its_own(tmp_path):
    old = tmp_path / "old.csv"
    old.write_text("run_id,started_at,scenario,guest_mem_mib,dirty_log_start_ms,status,error\n"
                   "r1,2026-01-01T00:00:00+00:00,s,512,12.5,ok,\nr2,,s,512,,failed,boom\n")
    new = tmp_path / "new.csv"
    results.append_rows(new, [{"run_id": "r3", "scenario": "s", "guest_mem_mib": 512, "status": "ok",
                               "dirty_log_start_ms": 3.25}])
    text = new.read_text().splitlines()
    new.write_text(text[0] + ",future_column\n" + text[1] + ",hello\n")
    df = results.load([old, new])
    assert len(df) == 3 and "verify_pages" in df.columns and df["verify_pages"].isna().all()
    assert df["dirty_log_start_ms"].tolist()[0::2] == [12.5, 3.25]
    assert df["future_column"].tolist()[2] == "hello" and pd.isna(df["future_column"].iloc[0])
    assert list(df.columns[-2:]) == ["future_column", "source"]


def test_text_in_a_number_column_is_missing(tmp_path):
    p = tmp_path / "r.csv"
    p.write_text("run_id,status,dirty_log_start_ms,setup_time_ms\nr1,ok,abc,5\nr2,ok, 7.5 ,inf\n")
    df = results.load(p)
    assert math.isnan(df["dirty_log_start_ms"][0]) and df["dirty_log_start_ms"][1] == 7.5
    assert df["setup_time_ms"][0] == 5.0 and math.isinf(df["setup_time_ms"][1])


@pytest.mark.parametrize("quoted", [False, True])
def test_blank_records_are_skipped(tmp_path, quoted):
    p = tmp_path / "r.csv"
    err = '"a, quoted\nerror"' if quoted else "plain error"
    p.write_text("run_id,status,dirty_log_start_ms,error\n\nr1,ok,1.5,\n,,,\n  \nr2,failed,," + err + "\n\n")
    df = results.load(p)
    assert df["run_id"].tolist() == ["r1", "r2"]
    assert df["error"][1] == ("a, quoted\nerror" if quoted else "plain error")


@pytest.mark.parametrize("body,needle", [
    (b"", "empty file, not a migstall results CSV"),
    (b"mem,time\n512,10\n", "not a migstall results CSV (no run_id/status column)"),
    (b"run_id,status,scenario\nr1,ok,s\n", "not a migstall results CSV (no metric column)"),
    (b"run_id,status,dirty_log_start_ms\nr1,ok,1\nr2,ok\n", "line 3 has 2 fields, the header 3"),
    (b"run_id,status,dirty_log_start_ms\nr1,ok,1,4\n", "line 2 has 4 fields, the header 3"),
    (b'run_id,status,dirty_log_start_ms\n"r\n1",ok,1\nr2,"ok"\n', "line 3 has 2 fields, the header 3"),
    (b"\xff\xfe\x00run_id\x00\x9c", "not text (not UTF-8)"),
    (b"run_id,status,dirty_log_start_ms\n", "no result rows"),
])
def test_bad_files_are_one_line_user_errors(tmp_path, body, needle):
    p = tmp_path / "bad.csv"
    p.write_bytes(body)
    with pytest.raises(UserError) as exc:
        results.load(p)
    msg = exc.value.one_line()
    assert needle in msg and str(p) in msg and "\n" not in str(exc.value)


def test_paths_and_directories(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        results.load(tmp_path / "missing.csv")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no migstall results CSV"):
        results.load(tmp_path / "empty")
    d = tmp_path / "res"
    (d / "sub").mkdir(parents=True)
    (d / "sub" / "stock.csv").write_bytes((FIX / "stock.csv").read_bytes())
    (d / "comparison.csv").write_text("scenario,metric\nx,y\n")          # not results: skipped
    (d / ".hidden.csv").write_bytes((FIX / "stock.csv").read_bytes())     # hidden: skipped
    df = results.load(d)
    assert len(df) == 17 and df.attrs["sources"] == [str(d / "sub" / "stock.csv")]


def test_a_broken_results_csv_in_a_directory_is_an_error_other_csvs_are_skipped(tmp_path):
    from harness import results
    from harness.errors import UserError

    good = tmp_path / "runs.csv"
    results.append_rows(good, [{"run_id": "r1", "scenario": "s", "status": "ok"}])
    (tmp_path / "comparison.csv").write_text("metric,ratio\nx,1.0\n")
    assert len(results.load(tmp_path)) == 1                       # the comparison CSV is skipped
    broken = tmp_path / "more.csv"
    broken.write_text(good.read_text().splitlines()[0] + "\nr2,too,few\n")
    with pytest.raises(UserError, match="more.csv"):
        results.load(tmp_path)
