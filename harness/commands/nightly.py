"""``migstall nightly --config nightly.toml``: boot each kernel variant on each host, run, compare."""

from __future__ import annotations

import sys
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser(
        "nightly", help="unattended stock-vs-patched runs on bare-metal (or virtual) hosts, with a report",
        description="For each [[host]] and kernel variant: install, boot once (kexec / grub-reboot / virtual), "
                    "verify uname -r, run the scenario matrix, then compare, write the report and gate. "
                    "Exit 0; 1 when a gate tripped or a run failed; 2 on bad input.")
    p.add_argument("--config", required=True, type=Path, metavar="FILE", help="nightly.toml")
    p.add_argument("--host", action="append", metavar="NAME",
                   help="run only this [[host]] of the config (repeatable; a CI matrix runs one per job); "
                        "its report goes to <report>/<NAME>")
    p.add_argument("--check", action="store_true", help="validate the config and exit")
    p.set_defaults(func=main)


def select_hosts(cfg, names):
    import dataclasses

    from harness.errors import UserError

    known = [h.name for h in cfg.hosts]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise UserError(f"--host {unknown[0]!r} is not a [[host]] of {cfg.path}; choose from {', '.join(known)}")
    hosts = tuple(h for h in cfg.hosts if h.name in names)
    report = cfg.report / "-".join(h.name for h in hosts)
    return dataclasses.replace(cfg, hosts=hosts, report=report)


def main(args) -> int:
    from harness.nightly.config import load_config
    from harness.progress import for_terminal

    cfg = load_config(args.config)
    if args.host:
        cfg = select_hosts(cfg, args.host)
    if args.check:
        print(f"{args.config}: ok ({len(cfg.hosts)} host(s), variants {', '.join(cfg.variants)}, "
              f"{len(cfg.scenario_list)} run(s) per variant per host)")
        return 0
    from harness.nightly.run import run_nightly

    out = run_nightly(cfg, for_terminal())
    for h in out.hosts:
        print(f"{h.name}: default {h.default_release or '?'}; boots: {', '.join(h.boots) or 'none'}; "
              f"ran {h.ran}, skipped {h.skipped} (already done), failed {h.failed}")
        for e in h.errors:
            print(f"  error: {e}")
    for d in out.report_dirs:
        print(f"report: {d / 'index.html'}")
    for m in out.markdown:
        print(f"markdown: {m}")
    if out.compare_error:
        print(f"migstall: compare: {out.compare_error}", file=sys.stderr)
    for g in out.gate_failures:
        print(f"migstall: gate failed: {g}", file=sys.stderr)
    return out.exit_code
