"""``migstall run``: run scenarios, append one CSV row per run, print a table
(:mod:`harness.runtable`, with rich).

``--scenario FILE`` (a TOML matrix) or flags for one run (see
``harness.scenario.add_scenario_arguments``).  Everything is validated, and
``--out`` checked writable, before any QEMU starts.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as _dt
import logging
import os
import sys
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

from harness import results
from harness.hosts.factory import HOST_HELP, open_host, parse_host_spec
from harness.progress import for_terminal

log = logging.getLogger(__name__)

def default_out() -> Path:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("results") / f"run-{stamp}.csv"


def add_output_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", metavar="CSV", help="results CSV to append to (default results/run-<timestamp>.csv)")
    p.add_argument("--host", default="local", metavar="SPEC", help=HOST_HELP)
    p.add_argument("--kernel-variant", default="stock", metavar="NAME",
                   help="label of the host kernel under test, written to the CSV (default stock)")
    p.add_argument("--series-id", default="", metavar="ID", help="patch series id written to the CSV")


def register(sub: argparse._SubParsersAction) -> None:
    from harness.scenario import add_scenario_arguments

    p = sub.add_parser("run", help="run scenarios and append CSV rows",
                       description="Boot a guest, migrate it to a destination QEMU and measure dirty-log start, "
                                   "migration times and guest stalls; one CSV row per run.")
    add_output_arguments(p)
    p.add_argument("--check", action="store_true",
                   help="check the scenarios without the host (names, ranges, combinations, aliased-RAM limits), "
                        "print each one with the host memory an aliased one needs, and exit; starts nothing")
    add_scenario_arguments(p)
    p.set_defaults(func=run)


def plain_output() -> bool:
    """Plain tables (no colour, no box lines) when stdout is not a terminal or ``CI`` is set,
    as :func:`harness.progress.for_terminal` is silent then."""
    return bool(os.environ.get("CI")) or not sys.stdout.isatty()


def print_rows(rows: Sequence[Mapping[str, Any]], title: Optional[str] = None) -> None:
    """Print the runs' table (:mod:`harness.runtable`) and the errors of failed runs."""
    from rich.console import Console

    from harness import runtable

    if plain_output():               # no colour, no box lines, no trailing blanks: for logs and pipes
        sys.stdout.write(runtable.to_text(rows, title=title))
        sys.stdout.flush()
        return
    runtable.print_to(Console(highlight=False), rows, title=title)


def execute(args: argparse.Namespace, scenarios_loader=None) -> List[Dict[str, Any]]:
    """Shared by ``run`` and ``demo``: validate, then run.  Returns the rows."""
    from harness import runner
    from harness.scenario import static_scenarios, validate_for_host

    parse_host_spec(args.host)
    out = Path(args.out) if args.out else default_out()
    results.check_writable(out)
    args.out = str(out)
    prog = for_terminal()
    static = None if scenarios_loader else static_scenarios(args)   # bad input fails before a boot
    # a virtual host boots once, with the first scenario's l1_cmdline (the runner reboots on a change)
    first_cmdline = static[0].l1_cmdline if static else ""
    with open_host(args.host, progress=prog, l1_cmdline=first_cmdline) as host:
        scenarios = scenarios_loader(args, host) if scenarios_loader else validate_for_host(static or [], host)
        doctor = None
        try:
            from harness.doctor import doctor as doctor_report
            doctor = doctor_report(host, scenarios[0].qemu if scenarios else "").to_dict()
        except Exception as exc:  # noqa: BLE001  the report is context for the sidecar, not a precondition
            log.info("doctor report unavailable: %s", exc)
        ctx = runner.RunContext(host=host, out=out, host_label=row_host_label(getattr(host, "name", args.host)),
                                kernel_variant=args.kernel_variant, series_id=args.series_id,
                                progress=prog, doctor=doctor)
        return asyncio.run(runner.run_matrix(ctx, scenarios))


def row_host_label(name: str) -> str:
    """The ``host`` column of a row.  The virtual host's name carries L1's
    kernel (``virtual:<release>``), which the row already has in
    ``host_kernel``; in the scenario key it would keep runs on the stock and
    the patched L1 kernel from ever being compared, so the row says ``virtual``."""
    return "virtual" if name.startswith("virtual:") else name


def check_lines(scenarios: Sequence[Any]) -> List[str]:
    """``run --check``: one line per scenario; an aliased one also gets the
    host memory it needs (:mod:`harness.hostmem`; KVM's items unless it asks for tcg)."""
    from harness.qemu import alias
    from harness.scenario import alias_estimate

    out = []
    for s in scenarios:
        line = (f"{s.name} r{s.repeat}: mem {s.mem_mib} MiB, {s.vcpus} vCPUs ({'+'.join(s.loop_list)}), "
                f"backing {s.backing}, accel {s.accel}, dirty_log_mode {s.dirty_log_mode}, end {s.end_action}")
        est = alias_estimate(s, "tcg" if s.accel == "tcg" else "kvm")
        if est is not None:
            layout = alias.AliasLayout(s.mem_mib, s.alias_mib)
            line += (f"; aliased onto {s.alias_mib} MiB: {layout.devices} ivshmem BARs, "
                     f"{alias.address_bits_needed(layout)} guest physical address bits; "
                     f"host memory needed about {est.text()}")
        out.append(line)
    return out


def run(args: argparse.Namespace) -> int:
    if args.check:
        from harness.scenario import static_scenarios

        scenarios = static_scenarios(args)
        for line in check_lines(scenarios):
            print(line)
        print(f"{len(scenarios)} scenario(s) check out (the host is checked when they run)")
        return 0
    rows = execute(args)
    print_rows(rows)
    print(f"results: {args.out}")
    return 0 if all(r.get("status") == results.STATUS_OK for r in rows) else 1
