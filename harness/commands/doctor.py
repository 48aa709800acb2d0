"""``migstall doctor [--json] [--host SPEC] [--qemu PATH]``: what this host can do.

Exit status 0 whenever the report could be made (KVM being unusable is a
finding, not an error); ``--require-kvm`` turns "KVM unusable" into exit 2.
"""

from __future__ import annotations

import argparse
import sys

from harness.doctor import DoctorReport, doctor
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


def _text(r: DoctorReport) -> str:
    yes = lambda b: "yes" if b else "no"  # noqa: E731
    lines = [
        f"host            {r.host}  (kernel {r.host_kernel}, {r.online_cpus} CPUs)",
        f"KVM usable      {yes(r.kvm_usable)}: {r.kvm_reason}",
    ]
    if r.kvm_fix:
        lines.append(f"  fix           {r.kvm_fix}")
    lines += [
        f"  checks        cpu flag {r.kvm_checks['cpu_flag']}, /dev/kvm {r.kvm_checks['dev_kvm']}, "
        f"boot {r.kvm_checks['boot']}",
        f"--accel auto    {r.accel_auto}",
        f"CPU             {r.cpu_vendor} {r.cpu_model}",
        f"  flags         {' '.join(r.cpu_flags) or '-'}  "
        f"(vmx/svm {'present' if {'vmx', 'svm'} & set(r.cpu_flags) else 'absent'})",
        f"kvm modules     {' '.join(r.kvm_modules) or 'none loaded'}",
        f"kvm params      {' '.join(f'{k}={v}' for k, v in sorted(r.kvm_params.items())) or '-'}",
        f"QEMU            {r.qemu_path or 'not found'}  {r.qemu_version}",
        f"memory          {r.mem_total_mib} MiB total, {r.mem_available_mib} MiB available",
        f"THP             {r.thp_mode or 'absent'}",
    ]
    for pool in r.hugepages:
        size = f"{pool.page_kib // 1024} MiB" if pool.page_kib < 1048576 else f"{pool.page_kib // 1048576} GiB"
        lines.append(f"hugepages {size:<6}{pool.total} total, {pool.free} free")
    if not r.hugepages:
        lines.append("hugepages       no pools")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    parse_host_spec(args.host)
    with open_host(args.host) as host:
        report = doctor(host, args.qemu)
    print(report.to_json() if args.json else _text(report))
    sys.stdout.flush()
    if args.require_kvm and not report.kvm_usable:
        raise KVMUnusable(f"{report.kvm_reason}; {report.kvm_fix}")
    return 0
