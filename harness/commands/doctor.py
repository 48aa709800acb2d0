"""``migstall doctor [--json] [--host SPEC] [--qemu PATH]``: what this host can do.

Exit status 0 whenever the report could be made (KVM being unusable is a
finding, not an error); ``--require-kvm`` turns "KVM unusable" into exit 2.
"""

from __future__ import annotations

import argparse
import sys

from harness.doctor import doctor
from harness.errors import KVMUnusable
from harness.hosts.factory import HOST_HELP, open_host, parse_host_spec


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("doctor", help="check this host: KVM, CPU, QEMU, memory, hugepages",
                       description="Report whether KVM is usable (CPU flag, /dev/kvm, a guest boots), the CPU, "
                                   "kvm module parameters, QEMU, the host kernel, memory and hugepage pools.")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--host", default="local", metavar="SPEC", help=HOST_HELP)
    p.add_argument("--qemu", default="", metavar="PATH", help="QEMU binary to report and boot-check (default on PATH)")
    p.add_argument("--require-kvm", action="store_true", help="exit 2 when KVM is not usable")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    parse_host_spec(args.host)
    with open_host(args.host) as host:
        report = doctor(host, args.qemu)
    print(report.to_json() if args.json else report.to_text())
    sys.stdout.flush()
    if args.require_kvm and not report.kvm_usable:
        raise KVMUnusable(f"{report.kvm_reason}; {report.kvm_fix}")
    return 0
