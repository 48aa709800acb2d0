"""``migstall demo-series``: the fast-write-protect series measured end to end
in the virtual host, the way a reviewer would ask for it.

Stages, each printed as it starts:

1. build stock and patched of ``patches/fast-write-protect-6.1`` (cached by
   content: a second call takes seconds).  By default only KVM's modules, for
   the Debian kernel L1 boots (``--target kvm-modules``: 48 s from an empty
   cache here); ``--target kernel`` builds two whole kernels (7 minutes here);
2. run the scenario (default ``scenarios/fwp-demo.toml``: L1 on the legacy
   MMU, an L2 of 512 MiB and one of 1 GiB whose vCPUs wait on the BQL and
   write, migrated memory compared page by page) with L1 booted on each kernel
   in turn, stock then patched, ``--repeat`` times: interleaved, so that drift
   of this machine hits both sides alike;
3. ``migstall compare`` of the two CSVs, with the HTML report;
4. the verdict in plain words, per guest size: enable, start, the ``pio``
   stall and the cost after the start, stock against patched, and how many
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
SCENARIO = REPO_ROOT / "scenarios" / "fwp-demo.toml"
VARIANTS = ("stock", "patched")
#: default interleaved rounds (issue 10: 3 repeats of each size); one round is an
#: L1 boot per kernel and both sizes on each
DEFAULT_REPEAT = 3
TARGETS = ("kvm-modules", "kernel")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo-series", help="build the fast-write-protect series and measure it against stock",
                       description="Build stock and patched kernels of patches/fast-write-protect-6.1, run a "
                                   "scenario in the virtual host on each (interleaved), compare them and write "
                                   "the HTML report.")
    p.add_argument("--repeat", type=int, default=DEFAULT_REPEAT, metavar="N",
                   help=f"interleaved stock/patched rounds (default {DEFAULT_REPEAT})")
    p.add_argument("--scenario", default=str(SCENARIO), metavar="TOML",
                   help="scenario file run on each kernel (default scenarios/fwp-demo.toml)")
    p.add_argument("--target", choices=TARGETS, default=TARGETS[0],
                   help="kvm-modules (default): Debian's kernel with the series' KVM modules; kernel: two "
                        "whole tiny kernels (migstall kernel build)")
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


def _build(target: str) -> Dict[str, Path]:
    """What ``--host virtual:`` takes per variant: a bzImage, or a kvm-modules build directory."""
    from harness import progress

    if target == "kernel":
        from harness.kernel.build import build_kernels

        return {b.variant: Path(b.bzimage) for b in build_kernels(MANIFEST, VARIANTS, None, progress.for_terminal())}
    from harness.kernel.modules import build_modules

    return {b.variant: b.out for b in build_modules(MANIFEST, VARIANTS, progress.for_terminal())}


def _run_one(scenario: str, kernel: Path, variant: str, series_id: str, out: Path) -> List[Dict[str, Any]]:
    """One ``migstall run --scenario`` with L1 on ``kernel``: the scenarios are
    loaded before L1 boots, so it boots once, on the scenario's ``l1_cmdline``."""
    from harness.commands.demo import _scenario_args
    from harness.commands.run import execute

    args = _scenario_args(scenario=scenario, host=f"virtual:{kernel}", out=str(out), kernel_variant=variant,
                          series_id=series_id)
    return execute(args)


#: (column, words, unit, scale): what the verdict compares, per guest size
_FIGURES = (
    ("kvm_enable_ms", "KVM's dirty-log enable", "ms", 1.0),
    ("dirty_log_start_ms", "QEMU's dirty-log start", "ms", 1.0),
    ("stall_pio_max_us", "worst pio stall after migrate", "ms", 1e-3),
    ("stall_write_sum_ms", "write-loop stall in the 2 s after migrate", "ms", 1.0),
    ("kvm_pf", "KVM page faults in those 2 s", "", 1.0),
)


def _values(rows: Sequence[Mapping[str, Any]], key: str, scale: float) -> List[float]:
    from harness.runtable import number

    return [v * scale for v in (number(r.get(key)) for r in rows) if v is not None]


def _fmt(v: float) -> str:
    return f"{v:.2f}" if abs(v) < 10 else f"{v:.0f}" if abs(v) >= 1000 else f"{v:.1f}"


def _about_same(stock: float, patched: float) -> bool:
    """Within 5 % of each other."""
    return 1 / 1.05 <= stock / patched <= 1.05


def _verdict(size: int, by: Mapping[str, Sequence[Mapping[str, Any]]]) -> str:
    """The verdict sentence for one guest size ("" when a kernel has no enable figure)."""
    stock, patched = (_values(by[v], "kvm_enable_ms", 1.0) for v in VARIANTS)
    if not (stock and patched):
        return ""
    s, p = statistics.median(stock), statistics.median(patched)
    if max(patched) >= min(stock):
        return (f"Verdict: at {size} MiB no clear effect on KVM's dirty-log enable ({_fmt(s)} ms stock, "
                f"{_fmt(p)} ms patched, the ranges overlap).")
    verdict = (f"Verdict: at {size} MiB the series starts dirty logging with {_fmt(s / p) if p > 0 else 'far'}x "
               f"less KVM work ({_fmt(s)} -> {_fmt(p)} ms, every patched run below every stock run)")
    ws, wp = (_values(by[v], "stall_write_sum_ms", 1.0) for v in VARIANTS)
    if ws and wp:
        ms, mp = statistics.median(ws), statistics.median(wp)
        verdict += ("; the guest's writes stalled about as long afterwards" if mp > 0 and _about_same(ms, mp) else
                    "; the guest's writes paid for it afterwards" if mp > ms else
                    "; the guest's writes did not stall longer afterwards")
        verdict += f" ({_fmt(ms)} -> {_fmt(mp)} ms of write-loop stall in the 2 s after migrate)"
    return verdict + "."


def _figure_line(words: str, unit: str, stock: List[float], patched: List[float]) -> str:
    s, p = statistics.median(stock), statistics.median(patched)
    unit = f" {unit}" if unit else ""
    line = f"  {words}: stock {_fmt(s)}{unit}, patched {_fmt(p)}{unit} (medians)"
    if s > 0 and p > 0:
        line += (", about the same" if _about_same(s, p) else
                 f", {_fmt(s / p)}x lower" if s > p else f", {_fmt(p / s)}x higher")
    apart = max(patched) < min(stock) or max(stock) < min(patched)
    if len(stock) > 1 and len(patched) > 1:
        line += "; the ranges do not overlap" if apart else "; the ranges overlap"
    return line


def summary_lines(rows_by_variant: Mapping[str, Sequence[Dict[str, Any]]]) -> List[str]:
    """Plain words: per kernel, runs ok and verified; per guest size, stock
    against patched on each figure of :data:`_FIGURES`; then the verdict."""
    from harness.runtable import number

    lines = []
    ok: Dict[str, List[Dict[str, Any]]] = {}
    for variant in VARIANTS:
        rows = rows_by_variant.get(variant, ())
        ok[variant] = [r for r in rows if r.get("status") == "ok"]
        verified = [r for r in ok[variant] if number(r.get("verify_mismatch_pages")) == 0]
        line = f"{variant}: {len(ok[variant])} of {len(rows)} runs ok"
        if any(number(r.get("verify_pages")) is not None for r in ok[variant]):
            line += f"; {len(verified)} with migrated memory verified equal"
        lines.append(line)
        for r in rows:
            if r.get("status") != "ok":
                lines.append(f"  {variant} {r.get('run_id', '')}: {str(r.get('error', ''))[:300]}")
    sizes = sorted({int(m) for v in VARIANTS for m in (number(r.get("guest_mem_mib")) for r in ok[v])
                    if m is not None})
    verdict = ""
    for size in sizes:
        by = {v: [r for r in ok[v] if number(r.get("guest_mem_mib")) == size] for v in VARIANTS}
        lines.append(f"{size} MiB guest ({len(by['stock'])} stock, {len(by['patched'])} patched runs ok):")
        for key, words, unit, scale in _FIGURES:
            stock, patched = _values(by["stock"], key, scale), _values(by["patched"], key, scale)
            if stock and patched:
                lines.append(_figure_line(words, unit, stock, patched))
        verdict = _verdict(size, by) or verdict
    bad = [r for r in rows_by_variant.get("patched", ()) if (number(r.get("verify_mismatch_pages")) or 0) > 0]
    if bad:
        verdict = (f"Verdict: the patched kernel LOST WRITES: {len(bad)} run(s) migrated memory that differs "
                   f"from the source's; no speed-up counts until that is fixed.")
    if verdict:
        lines.append(verdict)
    lines.append("The virtual host is nested KVM under TCG: ratios carry over, absolute times do not "
                 "(README \"Reproducing the series on 6.1\").")
    return lines


def run(args: argparse.Namespace) -> int:
    from harness.commands.run import print_rows
    from harness.compare import api, table
    from harness.kernel.manifest import load_manifest

    out = _check(args)
    series_id = load_manifest(MANIFEST).name
    what = "KVM modules for Debian's kernel" if args.target == "kvm-modules" else "kernels"
    print(f"1/3 building stock and patched {what} ({MANIFEST.relative_to(REPO_ROOT)})")
    images = _build(args.target)
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
