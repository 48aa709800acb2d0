"""``migstall demo``: the small default scenario here, then (where local KVM is
unusable) one KVM scenario inside the virtual host, in legacy dirty-log mode.

Prints a short table and the CSV path.  The virtual-host part is best effort:
if it cannot be started, one line says why and the exit status stays 0.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import logging
from pathlib import Path
from typing import Any, Dict, List

from harness import results
from harness.commands.run import format_table
from harness.errors import MigstallError, UserError
from harness.hosts.factory import open_host
from harness.paths import REPO_ROOT

log = logging.getLogger(__name__)

DEMO_SCENARIO = REPO_ROOT / "scenarios" / "demo.toml"
#: the KVM scenario run in the virtual host (legacy mode: the kernel write-protects at enable).
#: One L2 vCPU: L1 has two emulated CPUs, and with two busy L2 vCPUs the migration
#: thread's ioctls would mostly measure L1's CPU contention.  (With two, pio + write, a
#: demo run timed out waiting for the probe's dump: README "Soak".)
VIRTUAL_FLAGS = {"name": "demo-kvm-legacy", "mem": "512M", "vcpus": "1", "accel": "kvm",
                 "dirty_log_mode": "legacy", "touch": "256", "baseline_s": "1", "repeat": "1"}


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
    from harness.doctor import kvm_status

    with open_host("local") as host:
        return bool(kvm_status(host).usable)


def run(args: argparse.Namespace) -> int:
    out = Path(args.out) if args.out else Path("results") / f"demo-{_dt.datetime.now():%Y%m%d-%H%M%S}.csv"
    results.check_writable(out)
    rows = _execute(out, "local", scenario=str(DEMO_SCENARIO), repeat=args.repeat)
    print(format_table(rows))
    print(f"results: {out}")
    if args.no_virtual:
        return 0
    try:
        if _local_kvm_usable():
            return 0
    except MigstallError as exc:
        log.info("local KVM check failed: %s", exc)
    try:
        vrows = _execute(out, "virtual", **VIRTUAL_FLAGS)
    except UserError as exc:
        print(f"virtual host: not available ({exc.one_line()}); the KVM scenario was skipped")
        return 0
    except MigstallError as exc:
        print(f"virtual host: could not run the KVM scenario ({exc.one_line()})")
        return 0
    print()
    print("KVM in the virtual host (legacy dirty-log mode):")
    print(format_table(vrows))
    print(f"results: {out}")
    return 0
