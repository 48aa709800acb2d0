"""``migstall compare BASE NEW [...]``: statistics, verdicts, report, regression gate."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from harness.compare import stats
from harness.compare.gate import parse_spec


def _gate(text: str):
    try:
        return parse_spec(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _threshold(text: str) -> float:
    try:
        v = float(text.rstrip("%"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--threshold {text!r}: give a percentage such as 10") from None
    if not 0 < v < 1000:
        raise argparse.ArgumentTypeError(f"--threshold {text!r}: must be between 0 and 1000")
    return v


def register(sub) -> None:
    p = sub.add_parser(
        "compare", help="compare results (stock vs patched, or against a stored baseline)",
        description="Compare results CSVs or results directories, scenario by scenario. "
                    "INPUTS: BASE NEW [NEW...] (first is BASE), or NEW... with --baseline PATH. "
                    "Exit 0, 1 when a --fail-on gate trips, 2 on bad input.")
    p.add_argument("inputs", nargs="+", metavar="CSV_OR_DIR",
                   help="BASE then NEW (results CSVs or directories); NEW alone with --baseline")
    p.add_argument("--baseline", metavar="PATH", action="append",
                   help="stored baseline results (CSV or dir); the gate compares NEW against it")
    p.add_argument("--threshold", type=_threshold, default=stats.DEFAULT_THRESHOLD_PCT, metavar="PCT",
                   help=f"smallest change of medians that counts (default {stats.DEFAULT_THRESHOLD_PCT:g}%%)")
    p.add_argument("--fail-on", type=_gate, action="append", default=[], metavar="METRIC:+PCT",
                   help="exit 1 if METRIC regresses by more than PCT%% with separated ranges (repeatable)")
    p.add_argument("--metrics", metavar="LIST", help="comma-separated metrics (default: all measured)")
    p.add_argument("--base-variant", metavar="NAME", help="use only BASE rows with this kernel_variant")
    p.add_argument("--new-variant", metavar="NAME", help="use only NEW rows with this kernel_variant")
    p.add_argument("--report", type=Path, metavar="DIR", help="write a self-contained HTML report to DIR/index.html")
    p.add_argument("--markdown", type=Path, metavar="FILE", help="write the table as markdown")
    p.add_argument("--csv", type=Path, metavar="FILE", help="write the comparison as CSV")
    p.add_argument("--quiet", action="store_true", help="do not print the table")
    p.set_defaults(func=main)


def main(args) -> int:
    from harness.compare import api, table
    from harness.errors import UserError

    if args.baseline:
        base_specs, new_specs = ([args.inputs[0]], args.inputs[1:]) if len(args.inputs) > 1 else ([], args.inputs)
    else:
        if len(args.inputs) < 2:
            raise UserError("compare needs BASE and NEW (or NEW with --baseline PATH); "
                            "e.g. migstall compare results/stock.csv results/patched.csv")
        base_specs, new_specs = [args.inputs[0]], args.inputs[1:]
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()] if args.metrics else None
    out = api.run(base_specs, new_specs, baseline=args.baseline, threshold_pct=args.threshold,
                  metrics=metrics, gates=args.fail_on, base_variant=args.base_variant,
                  new_variant=args.new_variant, report_dir=args.report, markdown=args.markdown,
                  csv_out=args.csv)
    if not args.quiet:
        from rich.console import Console

        console = Console(width=None if sys.stdout.isatty() else 200)
        console.print(table.to_rich(out.comparison))
        if out.baseline_comparison is not None:
            console.print(table.to_rich(out.baseline_comparison))
        for path in out.written:
            print(f"wrote {path}")
    for line in out.gate_failures:
        print(f"migstall: gate failed: {line}", file=sys.stderr)
    if args.fail_on and not out.gate_failures and not args.quiet:
        print(f"gate passed: {', '.join(str(g) for g in args.fail_on)}")
    return out.exit_code
