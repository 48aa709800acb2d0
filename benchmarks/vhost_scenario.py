"""Benchmark (not a test): one KVM scenario in the virtual host, 1 GiB L2.

Prints the phase times: L1 boot (TCG), L2 boot, prefault, migration, and the
measured figures (kvm_enable_ms, setup time).  Target: <= 5 min on 2 cores.

    .venv/bin/python benchmarks/vhost_scenario.py [--kernel debian|BZIMAGE] [--mode legacy|default|ring]
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness import runner  # noqa: E402
from harness.hosts.virtual import VirtualHost  # noqa: E402
from harness.scenario import Scenario  # noqa: E402

TARGET_S = 300.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kernel", default="debian")
    ap.add_argument("--mode", default="legacy", choices=("default", "legacy", "ring"))
    ap.add_argument("--touch", type=int, default=768, help="MiB the L2 probe touches (default 768)")
    args = ap.parse_args()

    t_start = time.monotonic()
    marks = {}

    async def hook(point, vms):
        marks[point] = time.monotonic()

    with tempfile.TemporaryDirectory(prefix="migstall-bench-") as tmp:
        out = Path(tmp) / "bench.csv"
        with VirtualHost(kernel=args.kernel) as vh:
            vh.start()
            l1_boot = vh.boot_s or 0.0
            sc = Scenario(name="vhost-bench", mem_mib=1024, vcpus=2, accel="kvm", dirty_log_mode=args.mode,
                          dirty_ring=4096 if args.mode == "ring" else 0, touch_mib=args.touch, baseline_s=1.0)
            ctx = runner.RunContext(host=vh, out=out, host_label=vh.name, hook=hook)
            t_run = time.monotonic()
            asyncio.run(runner.run_matrix(ctx, [sc]))
            t_end = time.monotonic()
        with open(out, newline="") as fh:
            row = list(csv.DictReader(fh))[-1]
    total = time.monotonic() - t_start
    if row["status"] != "ok":
        print(f"run failed: {row['error']}")
        return 1
    prefault_s = float(row["prefault_ms"] or 0) / 1e3
    launched, ready = marks.get("launched", t_run), marks.get("ready", t_run)
    migrating, measured = marks.get("migrating", t_end), marks.get("measured", t_end)
    print(f"virtual host ({vh.name}), 1 GiB L2, mode {args.mode}, {row['touched_mib']} MiB touched")
    print(f"  L1 boot (TCG, to sshd)     {l1_boot:7.1f} s")
    print(f"  image/stage/doctor + start {launched - t_run:7.1f} s")
    print(f"  L2 boot (to probe hello)   {max(ready - launched - prefault_s, 0):7.1f} s")
    print(f"  prefault                   {prefault_s:7.1f} s")
    print(f"  migration (migrate->done)  {measured - migrating:7.1f} s   (total_time_ms {row['total_time_ms']})")
    print(f"  kvm_enable_ms {row['kvm_enable_ms']}  setup_time_ms {row['setup_time_ms']}  "
          f"dirty_log_start_ms {row['dirty_log_start_ms']}  kvm_params {row['kvm_params']}")
    print(f"  total                      {total:7.1f} s   (target <= {TARGET_S:.0f} s: "
          f"{'met' if total <= TARGET_S else 'MISSED'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
