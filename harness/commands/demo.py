"""``migstall demo``: the small default scenario here, then (where local KVM is
unusable) one KVM scenario inside the virtual host, in legacy dirty-log mode.

Prints a table per host (:mod:`harness.runtable`) and the CSV path, then what
the rows show in plain words (:func:`harness.finding.finding_lines`).  The
virtual-host part is best effort: if it cannot be started, one line says why
and the exit status stays 0.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import logging
from pathlib import Path
from typing import Any, Dict, List

from harness import results
from harness.commands.run import print_rows
from harness.errors import MigstallError, UserError
from harness.hosts.factory import open_host
from harness.paths import REPO_ROOT

log = logging.getLogger(__name__)

DEMO_SCENARIO = REPO_ROOT / "scenarios" / "demo.toml"
#: the KVM scenario run in the virtual host (legacy mode: the kernel write-protects at enable).
#: Two L2 vCPUs: one waiting on the BQL (``pio``) beside one whose stores fault once
#: dirty logging write-protects them (``write``).  They share L1's one vCPU
#: (harness/hosts/virtual.py DEFAULT_L1_SMP), which lifts the baseline stalls; the
#: finding reads the stall against the same run's baseline window.
#: ``verify``: migrated memory is compared page by page (README "Migrated memory verified").
VIRTUAL_FLAGS = {"name": "demo-kvm-legacy", "mem": "512M", "vcpus": "2", "accel": "kvm",
                 "dirty_log_mode": "legacy", "touch": "256", "baseline_s": "1", "repeat": "1",
                 "verify": True}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the small default scenario and print the results",
                       description="Run scenarios/demo.toml here (TCG where KVM is unusable), then one KVM "
                                   "scenario in the virtual host when local KVM is unusable.")
    p.add_argument("--out", metavar="CSV", help="results CSV (default results/demo-<timestamp>.csv)")
    p.add_argument("--repeat", metavar="N", help="override the demo's 3 repeats")
    p.add_argument("--no-virtual", action="store_true", help="skip the KVM scenario in the virtual host")
    p.set_defaults(func=run)


def _scenario_args(**flags: Any) -> argparse.Namespace:
    from harness.scenario import add_scenario_arguments

    parser = argparse.ArgumentParser(add_help=False)
    add_scenario_arguments(parser)
    ns = parser.parse_args([])
    for key, value in flags.items():
        setattr(ns, key, value)
    return ns


def _execute(out: Path, host: str, **flags: Any) -> List[Dict[str, Any]]:
    from harness.commands.run import execute
    from harness.scenario import scenarios_from_args

    args = argparse.Namespace(host=host, out=str(out), kernel_variant="stock", series_id="")
    return execute(args, lambda _args, h: scenarios_from_args(_scenario_args(**flags), h))


def _local_kvm_usable() -> bool:
    from harness.hosts.facts import kvm_status

    with open_host("local") as host:
        return bool(kvm_status(host).usable)


def run(args: argparse.Namespace) -> int:
    out = Path(args.out) if args.out else Path("results") / f"demo-{_dt.datetime.now():%Y%m%d-%H%M%S}.csv"
    results.check_writable(out)
    rows = _execute(out, "local", scenario=str(DEMO_SCENARIO), repeat=args.repeat)
    print_rows(rows, title="This machine (scenarios/demo.toml):")
    print(f"results: {out}")
    vrows = _virtual_rows(args, out)
    _print_finding(rows + vrows)
    return 0


def _virtual_rows(args: argparse.Namespace, out: Path) -> List[Dict[str, Any]]:
    """The KVM scenario in the virtual host, where local KVM is unusable (best effort)."""
    if args.no_virtual:
        return []
    try:
        if _local_kvm_usable():
            return []
    except MigstallError as exc:
        log.info("local KVM check failed: %s", exc)
    try:
        vrows = _execute(out, "virtual", **VIRTUAL_FLAGS)
    except UserError as exc:
        print(f"virtual host: not available ({exc.one_line()}); the KVM scenario was skipped")
        return []
    except MigstallError as exc:
        print(f"virtual host: could not run the KVM scenario ({exc.one_line()})")
        return []
    print()
    print_rows(vrows, title="KVM in the virtual host (legacy dirty-log mode):")
    print(f"results: {out}")
    return vrows


def _print_finding(rows: List[Dict[str, Any]]) -> None:
    from harness.finding import finding_lines

    lines = finding_lines(rows)
    if lines:
        print()
        print("What these runs show:")
        for line in lines:
            print(line)
