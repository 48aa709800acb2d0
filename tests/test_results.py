"""The results CSV: schema, atomic append, failed rows."""

import os

import pytest

from harness import results
from harness.errors import UserError


def _row(**kw):
    base = {"run_id": "r1", "status": "ok", "guest_mem_mib": 512, "dirty_log_start_ms": 1.25}
    base.update(kw)
    return base


def test_append_creates_and_extends(tmp_path):
    out = tmp_path / "a.csv"
    results.append_rows(out, [_row()])
    results.append_rows(out, [_row(run_id="r2")])
    rows = results.read_rows(out)
    assert [r["run_id"] for r in rows] == ["r1", "r2"]
    assert rows[0]["dirty_log_start_ms"] == "1.25"
    assert list(rows[0]) == list(results.COLUMNS)


def test_failed_row_keeps_identity_and_error(tmp_path):
    out = tmp_path / "a.csv"
    row = results.failed_row(_row(), RuntimeError("guest never\nbecame READY"))
    results.append_rows(out, [row])
    (got,) = results.read_rows(out)
    assert got["status"] == "failed"
    assert got["error"] == "guest never became READY"
    assert got["dirty_log_start_ms"] == ""
    assert got["guest_mem_mib"] == "512"


def test_append_is_atomic_on_bad_row(tmp_path):
    out = tmp_path / "a.csv"
    results.append_rows(out, [_row()])
    before = out.read_bytes()
    with pytest.raises(ValueError):
        results.append_rows(out, [_row(run_id="r2"), {"run_id": "x", "status": "ok", "bogus": 1}])
    assert out.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_old_schema_is_extended_not_corrupted(tmp_path):
    out = tmp_path / "a.csv"
    out.write_text("run_id,status,custom\nold,ok,keep\n")
    results.append_rows(out, [_row()])
    rows = results.read_rows(out)
    assert rows[0]["custom"] == "keep" and rows[0]["run_id"] == "old"
    assert rows[1]["run_id"] == "r1" and rows[1]["custom"] == ""


def test_not_a_results_csv_is_user_error(tmp_path):
    out = tmp_path / "a.csv"
    out.write_text("x,y\n1,2\n")
    with pytest.raises(UserError):
        results.check_writable(out)


def test_unwritable_out_is_user_error(tmp_path):
    d = tmp_path / "ro"
    d.mkdir()
    os.chmod(d, 0o500)
    try:
        if os.access(d, os.W_OK):
            pytest.skip("running as a user that ignores permissions")
        with pytest.raises(UserError):
            results.check_writable(d / "x.csv")
    finally:
        os.chmod(d, 0o700)


def test_readme_lists_every_column_and_the_scenario_group():
    """README "Columns" has a row for every CSV column, and "CSV schema" names the
    scenario group (compare groups on it: an aliased guest never joins a real one)."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    table = readme.split("### Columns (", 1)[1].split("\n### ", 1)[0]
    named = {c for line in table.splitlines() if line.startswith("| `")
             for c in re.findall(r"`([a-z0-9_]+)`", line.split(" | ", 1)[0])}
    assert [c for c in results.COLUMNS if c not in named] == []
    schema = " ".join(readme.split("### CSV schema", 1)[1].split("\n### ", 1)[0].split())
    assert "SCENARIO `" + " ".join(results.SCENARIO_COLUMNS) + "`" in schema
    assert "alias_mib" in results.SCENARIO_COLUMNS
