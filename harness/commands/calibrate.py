"""``migstall calibrate``: inject pauses of known length, print what the probe saw."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

from harness.calibrate import DEFAULT_BQL_MS, DEFAULT_PAUSES_MS, READY_TIMEOUT, TOLERANCE_MS, calibrate, parse_pauses
from harness.errors import UserError
from harness.hosts.factory import HOST_HELP, open_host, parse_host_spec
from harness.progress import for_terminal


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("calibrate", help="check the probe: inject SIGSTOP pauses and a BQL hold, report detection",
                       description="Boot the guest (vCPU0 pio loop, vCPU1 cpu loop), stop the QEMU process "
                                   "with SIGSTOP/SIGCONT for each --pause-ms, hold the BQL with a sized QMP "
                                   "pmemsave, and report injected vs detected pause per loop.")
    p.add_argument("--pause-ms", default=",".join(map(str, DEFAULT_PAUSES_MS)), metavar="MS,MS,..",
                   help="SIGSTOP pauses to inject, ms (default %(default)s)")
    p.add_argument("--bql-ms", type=int, default=DEFAULT_BQL_MS, metavar="MS",
                   help="target length of the BQL-only hold, ms; 0 skips it (default %(default)s)")
    p.add_argument("--accel", default="auto", choices=("auto", "kvm", "tcg"), help="default auto")
    p.add_argument("--json", action="store_true", help="print the list of points as JSON")
    p.add_argument("--host", default="local", metavar="SPEC", help=HOST_HELP)
    p.add_argument("--qemu", default="", metavar="PATH", help="QEMU binary (default qemu-system-x86_64 on PATH)")
    p.add_argument("--guest-kernel", default=None, metavar="PATH", help="guest kernel (default Debian's, cached)")
    p.add_argument("--ready-timeout", type=float, default=READY_TIMEOUT, metavar="S",
                   help="seconds to wait for the probe's READY (default %(default)s)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    pauses = parse_pauses(args.pause_ms)
    if not 0 <= args.bql_ms <= 10_000:
        raise UserError(f"--bql-ms {args.bql_ms} is out of range; give 0..10000 (0 skips the BQL hold)")
    parse_host_spec(args.host)
    with open_host(args.host) as host:
        result = asyncio.run(calibrate(host, pauses, bql_ms=args.bql_ms, accel=args.accel, qemu=args.qemu,
                                       guest_kernel=args.guest_kernel, ready_timeout=args.ready_timeout,
                                       progress=for_terminal()))
    if args.json:
        print(json.dumps(result.to_list(), indent=1))
        return 0
    print(f"accel {result.accel} ({result.accel_reason}); QEMU {result.qemu_version}; guest {result.guest_kernel}; "
          f"stall threshold {result.threshold_us} us; clock uncertainty {result.clock['uncertainty_us']:.0f} us")
    print(f"{'kind':<8} {'loop':<5} {'vCPU':>4} {'injected ms':>12} {'detected ms':>12} {'error ms':>9}  note")
    for p in result.points:
        if p.kind == "bql" and p.loop != "pio":
            note = "ok (not BQL-bound)" if p.detected_ms < p.injected_ms / 2 else "UNEXPECTED: saw the BQL hold"
        elif abs(p.error_ms) <= TOLERANCE_MS:
            note = "ok"
        else:
            note = f"off by more than {TOLERANCE_MS:g} ms"
        print(f"{p.kind:<8} {p.loop:<5} {p.vcpu:>4} {p.injected_ms:>12.1f} {p.detected_ms:>12.1f} "
              f"{p.error_ms:>9.1f}  {note}")
    print(f"logs: {result.log_dir}")
    sys.stdout.flush()
    return 0
