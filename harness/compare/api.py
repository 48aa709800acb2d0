"""One call that does what ``migstall compare`` does (used by the command and by nightly)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence

from harness.compare import gate as gate_mod
from harness.compare import load, stats, table
from harness.errors import UserError
from harness import results
from harness.results import atomic_write_text


@dataclass(frozen=True)
class Outcome:
    comparison: stats.Comparison
    base: load.ResultSet
    new: load.ResultSet
    baseline_comparison: Optional[stats.Comparison] = None
    gate_failures: Sequence[str] = ()
    written: Sequence[Path] = field(default_factory=tuple)

    @property
    def exit_code(self) -> int:
        return 1 if self.gate_failures else 0


def run(base_specs: Sequence[str], new_specs: Sequence[str], *, baseline: Optional[Sequence[str]] = None,
        threshold_pct: float = stats.DEFAULT_THRESHOLD_PCT, metrics: Optional[Sequence[str]] = None,
        gates: Sequence[gate_mod.GateSpec] = (), base_variant: Optional[str] = None,
        new_variant: Optional[str] = None, report_dir: Optional[Path] = None,
        markdown: Optional[Path] = None, csv_out: Optional[Path] = None,
        title: str = "migstall: stock vs patched") -> Outcome:
    """Load, compare, gate and write the requested outputs.

    With ``base_specs`` empty and a ``baseline``, the baseline is the BASE.
    The gate applies to baseline-vs-NEW when a baseline is given, else to BASE-vs-NEW.
    """
    for p, opt in ((markdown, "--markdown"), (csv_out, "--csv")):
        if p is not None:
            results.check_output_path(Path(p), opt)
    new = load.load(new_specs, label=" ".join(new_specs)).filter_variant(new_variant)
    baseline_rs = load.load(baseline, label=f"baseline {' '.join(baseline)}") if baseline else None
    if base_specs:
        base = load.load(base_specs, label=" ".join(base_specs)).filter_variant(base_variant)
    elif baseline_rs is not None:
        base = baseline_rs
    else:
        raise UserError("nothing to compare against; give BASE and NEW, or NEW with --baseline PATH")
    cmp = stats.compare(base, new, threshold_pct=threshold_pct, metrics=metrics)
    bcmp = None
    if baseline_rs is not None and base is not baseline_rs:
        bcmp = stats.compare(baseline_rs, new, threshold_pct=threshold_pct, metrics=metrics)
    gated = bcmp if bcmp is not None else cmp
    failures = gate_mod.evaluate(gated, gates)
    written: List[Path] = []
    if markdown is not None:
        text = table.to_markdown(cmp)
        if bcmp is not None:
            text += "\n## Stored baseline vs NEW\n\n" + table.to_markdown(bcmp)
        atomic_write_text(Path(markdown), text)
        written.append(Path(markdown))
    if csv_out is not None:
        atomic_write_text(Path(csv_out), table.to_csv(cmp))
        written.append(Path(csv_out))
    if report_dir is not None:
        from harness.compare import report      # matplotlib: imported only when a report is asked for

        written.append(report.write_report(
            Path(report_dir), cmp, base, new, gate_failures=failures, gate_specs=[str(g) for g in gates],
            baseline=(bcmp, baseline_rs, new) if bcmp is not None else None, title=title))
    return Outcome(cmp, base, new, bcmp, tuple(failures), tuple(written))
