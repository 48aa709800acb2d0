"""``migstall run``: run scenarios, append one CSV row per run, print a table.

``--scenario FILE`` (a TOML matrix) or flags for one run (see
``harness.scenario.add_scenario_arguments``).  Everything is validated, and
``--out`` checked writable, before any QEMU starts.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as _dt
import logging
from pathlib import Path
from typing import Any, Dict, List, Mapping, Sequence

from harness import results
from harness.hosts.factory import HOST_HELP, open_host, parse_host_spec
from harness.progress import for_terminal

log = logging.getLogger(__name__)

TABLE_COLUMNS = (
    ("scenario", "scenario"), ("repeat", "rep"), ("accel", "accel"), ("guest_mem_mib", "mem"),
    ("backing", "backing"), ("page_size_kib", "pageK"), ("touched_mib", "touched"),
    ("dirty_log_start_ms", "dl_start_ms"), ("setup_time_ms", "setup_ms"), ("first_pass_ms", "pass1_ms"),
    ("kvm_enable_ms", "kvm_en_ms"), ("stall_pio_max_us", "pio_max_us"), ("stall_write_max_us", "write_max_us"),
    ("baseline_stall_max_us", "base_max_us"), ("total_time_ms", "total_ms"), ("downtime_ms", "down_ms"),
    ("dirty_log_stop_ms", "dl_stop_ms"), ("status", "status"),
)


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
    add_scenario_arguments(p)
    p.set_defaults(func=run)


def _cell(v: Any) -> str:
    s = "" if v is None else str(v)
    return s if s else "-"


def format_table(rows: Sequence[Mapping[str, Any]], columns=TABLE_COLUMNS) -> str:
    norm = [{k: results._fmt(r.get(k)) for k, _ in columns} for r in rows]
    heads = [h for _, h in columns]
    widths = [max(len(h), *(len(_cell(n[k])) for n in norm)) if norm else len(h) for (k, _), h in zip(columns, heads)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(heads, widths))]
    for n in norm:
        lines.append("  ".join(_cell(n[k]).rjust(w) for (k, _), w in zip(columns, widths)))
    for r in rows:
        if r.get("status") != results.STATUS_OK:
            lines.append(f"{r.get('run_id')}: {r.get('error')}")
    return "\n".join(lines)


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
        except Exception as exc:  # the report is context for the sidecar, not a precondition
            log.info("doctor report unavailable: %s", exc)
        ctx = runner.RunContext(host=host, out=out, host_label=getattr(host, "name", args.host),
                                kernel_variant=args.kernel_variant, series_id=args.series_id,
                                progress=prog, doctor=doctor)
        return asyncio.run(runner.run_matrix(ctx, scenarios))


def run(args: argparse.Namespace) -> int:
    rows = execute(args)
    print(format_table(rows))
    print(f"results: {args.out}")
    return 0 if all(r.get("status") == results.STATUS_OK for r in rows) else 1
