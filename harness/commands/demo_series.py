"""``migstall demo-series``: the fast-write-protect series measured end to end
in the virtual host, the way a reviewer would ask for it.

Stages, each printed as it starts:

1. build the stock and patched kernels of ``patches/fast-write-protect-6.1``
   (cached by content: a second call takes seconds);
2. run the scenario (default ``scenarios/fwp-verify.toml``: L1 on the legacy
   MMU, one L2 vCPU writing through precopy, migrated memory compared page by
   page) with L1 booted on each kernel in turn, stock then patched, ``--repeat``
   times: interleaved, so that drift of this machine hits both sides alike;
3. ``migstall compare`` of the two CSVs, with the HTML report;
4. a few lines in plain words: enable and start times per kernel, and how many
   runs verified their memory.

The kernels are L1's (the virtual host's), so this needs no VMX host.  On a
bare-metal host the patched kernel must be the booted host kernel: that is
``migstall nightly``'s job.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import logging
import statistics
from pathlib import Path
from typing import Any, Dict, List, Mapping, Sequence

from harness.errors import UserError
from harness.paths import REPO_ROOT

log = logging.getLogger(__name__)

MANIFEST = REPO_ROOT / "patches" / "fast-write-protect-6.1" / "series.toml"
SCENARIO = REPO_ROOT / "scenarios" / "fwp-verify.toml"
VARIANTS = ("stock", "patched")
#: default interleaved rounds: one stock and one patched run each, about 2.5 min per
#: run here (L1 boot 15 s, L2 boot, 128 MiB prefault and precopy under nested KVM)
DEFAULT_REPEAT = 2


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo-series", help="build the fast-write-protect series and measure it against stock",
                       description="Build stock and patched kernels of patches/fast-write-protect-6.1, run a "
                                   "scenario in the virtual host on each (interleaved), compare them and write "
                                   "the HTML report.")
    p.add_argument("--repeat", type=int, default=DEFAULT_REPEAT, metavar="N",
                   help=f"interleaved stock/patched rounds (default {DEFAULT_REPEAT})")
    p.add_argument("--scenario", default=str(SCENARIO), metavar="TOML",
                   help="scenario file run on each kernel (default scenarios/fwp-verify.toml)")
    p.add_argument("--out", metavar="DIR",
                   help="directory for stock.csv, patched.csv and report/ (default results/series-<timestamp>)")
    p.set_defaults(func=run)


def _check(args: argparse.Namespace) -> Path:
    """Bad input is refused here, before any build: the rounds, the scenario
    file's content (the same checks as ``migstall run``) and the output files."""
    from harness import results
    from harness.commands.demo import _scenario_args
    from harness.scenario import static_scenarios

    if args.repeat < 1:
        raise UserError(f"--repeat {args.repeat} must be at least 1; give a positive number of rounds")
    if not Path(args.scenario).is_file():
        raise UserError(f"--scenario {args.scenario}: no such file; give a scenario TOML file")
    static_scenarios(_scenario_args(scenario=args.scenario))
    out = Path(args.out) if args.out else Path("results") / f"series-{_dt.datetime.now():%Y%m%d-%H%M%S}"
    for variant in VARIANTS:
        if (out / f"{variant}.csv").exists():
            raise UserError(f"{out / (variant + '.csv')} exists; give a new --out directory")
        results.check_writable(out / f"{variant}.csv")
    return out


def _build() -> Dict[str, Path]:
    from harness import progress
    from harness.kernel.build import build_kernels

    builds = build_kernels(MANIFEST, VARIANTS, None, progress.for_terminal())
    return {b.variant: Path(b.bzimage) for b in builds}


def _run_one(scenario: str, bzimage: Path, variant: str, series_id: str, out: Path) -> List[Dict[str, Any]]:
    """One ``migstall run --scenario`` with L1 on ``bzimage``: the scenarios are
    loaded before L1 boots, so it boots once, on the scenario's ``l1_cmdline``."""
    from harness.commands.demo import _scenario_args
    from harness.commands.run import execute

    args = _scenario_args(scenario=scenario, host=f"virtual:{bzimage}", out=str(out), kernel_variant=variant,
                          series_id=series_id)
    return execute(args)


def summary_lines(rows_by_variant: Mapping[str, Sequence[Dict[str, Any]]]) -> List[str]:
    """Plain words: per kernel, ok runs, verified runs, median enable and start."""
    from harness.runtable import number

    lines = []
    for variant in VARIANTS:
        rows = rows_by_variant.get(variant, ())
        ok = [r for r in rows if r.get("status") == "ok"]
        verified = [r for r in ok if number(r.get("verify_mismatch_pages")) == 0]
        parts = [f"{variant}: {len(ok)} of {len(rows)} runs ok"]
        if any(number(r.get("verify_pages")) is not None for r in ok):
            parts.append(f"{len(verified)} with migrated memory verified equal")
        for key, label in (("kvm_enable_ms", "KVM enable"), ("dirty_log_start_ms", "dirty-log start")):
            vals = [v for v in (number(r.get(key)) for r in ok) if v is not None]
            if vals:
                parts.append(f"{label} median {statistics.median(vals):.1f} ms")
        lines.append("; ".join(parts))
        for r in rows:
            if r.get("status") != "ok":
                lines.append(f"  {variant} {r.get('run_id', '')}: {str(r.get('error', ''))[:300]}")
    lines.append("The virtual host is nested KVM under TCG: ratios carry over, absolute times do not "
                 "(README \"Reproducing the series on 6.1\").")
    return lines


def run(args: argparse.Namespace) -> int:
    from harness.commands.run import print_rows
    from harness.compare import api, table
    from harness.kernel.manifest import load_manifest

    out = _check(args)
    series_id = load_manifest(MANIFEST).name
    print(f"1/3 building stock and patched kernels ({MANIFEST.relative_to(REPO_ROOT)})")
    images = _build()
    out.mkdir(parents=True, exist_ok=True)
    rows: Dict[str, List[Dict[str, Any]]] = {v: [] for v in VARIANTS}
    for rnd in range(1, args.repeat + 1):
        for variant in VARIANTS:
            print(f"2/3 round {rnd}/{args.repeat}: {variant} kernel in the virtual host ({args.scenario})")
            got = _run_one(args.scenario, images[variant], variant, series_id, out / f"{variant}.csv")
            print_rows(got)
            rows[variant] += got
    print("3/3 comparing")
    if all(any(r.get("status") == "ok" for r in rows[v]) for v in VARIANTS):
        outcome = api.run([str(out / "stock.csv")], [str(out / "patched.csv")], report_dir=out / "report",
                          title="migstall: fast write protect (6.1), stock vs patched")
        from rich.console import Console

        Console().print(table.to_rich(outcome.comparison))
        for path in outcome.written:
            print(f"wrote {path}")
        compared = True
    else:
        print("no comparison: a kernel has no ok run (the failures are listed below)")
        compared = False
    print(f"results: {out}")
    print()
    print("What these runs show:")
    for line in summary_lines(rows):
        print(line)
    return 0 if compared else 1
