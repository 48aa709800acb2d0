"""scripts/soak's summary (the soak itself boots VMs and is not a test)."""

from __future__ import annotations

import importlib.machinery
import importlib.util
from pathlib import Path

from harness import results

SOAK = Path(__file__).resolve().parent.parent / "scripts" / "soak"


def _soak_module():
    loader = importlib.machinery.SourceFileLoader("migstall_soak", str(SOAK))
    spec = importlib.util.spec_from_loader(loader.name, loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def test_summary_counts_failures_and_each_scenario(tmp_path, capsys):
    csv_path = tmp_path / "soak.csv"
    rows = [{"run_id": f"r{i}", "scenario": name, "status": status, "error": error}
            for i, (name, status, error) in enumerate([
                ("legacy-128", "ok", ""), ("legacy-128", "failed", "timed out after 10s waiting for mark 4"),
                ("default-128", "ok", ""), ("default-128", "failed", "timed out after 12s waiting for mark 7")])]
    results.append_rows(csv_path, rows)
    assert _soak_module().summarize(csv_path) == 1
    out = capsys.readouterr().out
    assert "soak: 2/4 runs ok (50 %)" in out
    assert "soak: legacy-128 1/2 ok, default-128 1/2 ok" in out
    # the two timeouts differ only in their numbers: one group
    assert "soak: 2 x timed out after Ns waiting for mark N" in out
