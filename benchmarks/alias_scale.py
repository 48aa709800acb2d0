"""Benchmark (not a test): aliased guests of growing size in the virtual host.

For each size (default 1, 2, 4 and 8 GiB, all aliased onto 512 MiB of L1's
memory; legacy dirty-log mode, one L2 vCPU running pio, every page touched,
``cancel``) prints the prefault time, ``kvm_enable_ms``,
``dirty_log_start_ms``, the host memory used (L1's ``MemAvailable`` right after the source QEMU
launched minus at READY, and the source QEMU's ``Pss`` at the end)
and the estimate of :mod:`harness.hostmem`; then a least-squares fit of
``dirty_log_start_ms`` and ``kvm_enable_ms`` in ms/GiB and its extrapolation
to 2 TiB.  The rows go to ``--out`` (a results CSV), so that ``migstall
compare`` fits them too (its dirty-log-start plot extrapolates each scenario
group to 2 TiB).

    .venv/bin/python benchmarks/alias_scale.py [--sizes 1,2,4,8] [--alias-mib 512] [--kernel debian|BZIMAGE]
                                                [--out results/alias-scale.csv]
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness import hostmem, runner  # noqa: E402
from harness.hosts import facts as hostfacts  # noqa: E402
from harness.hosts.virtual import VirtualHost  # noqa: E402
from harness.qemu.alias import AliasLayout  # noqa: E402
from harness.scenario import Scenario  # noqa: E402

TWO_TIB_GIB = 2048


def fit(xs: List[float], ys: List[float]) -> tuple:
    """Least squares y = a + b x: (a, b)."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else 0.0
    return my - b * mx, b


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1,2,4,8", help="guest sizes, GiB (default 1,2,4,8)")
    ap.add_argument("--alias-mib", type=int, default=512)
    ap.add_argument("--kernel", default="debian", help="L1 kernel: debian or a bzImage")
    ap.add_argument("--out", default="", help="results CSV to keep (default: a temporary one)")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    out = Path(args.out) if args.out else Path(f"/tmp/migstall-alias-scale-{int(time.time())}.csv")
    used: Dict[str, int] = {}
    t0 = time.monotonic()

    with VirtualHost(kernel=args.kernel) as vh:
        vh.start()
        before: Dict[str, int] = {}

        async def hook(point: str, vms: Dict[str, Any]) -> None:
            name = next(iter(vms.values())).name if vms else ""
            avail = hostfacts.read_memory(vh).available_mib
            if point == "launched":
                before[name] = avail
            elif point == "ready":
                used[name.rsplit("-", 1)[0]] = before.get(name, avail) - avail

        scenarios = [Scenario(name=f"alias-{g}g", mem_mib=g * 1024, alias_mib=args.alias_mib, backing="memfd",
                              accel="kvm", dirty_log_mode="legacy", vcpus=1, loops=("pio",), end_action="cancel",
                              cancel_after_s=0.5, baseline_s=0.5, ready_timeout_s=3600.0) for g in sizes]
        ctx = runner.RunContext(host=vh, out=out, host_label=vh.name, hook=hook)
        asyncio.run(runner.run_matrix(ctx, scenarios))
    with open(out, newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["scenario"].startswith("alias-")][-len(sizes):]

    print(f"aliased guests in the virtual host, onto {args.alias_mib} MiB, legacy mode ({out})")
    print(f"{'GiB':>5} {'prefault s':>10} {'kvm_enable_ms':>14} {'dirty_log_start_ms':>19} "
          f"{'L1 used MiB':>12} {'src Pss MiB':>12} {'estimate MiB':>13}  status")
    pts = []
    for g, row in zip(sizes, rows):
        est = hostmem.estimate(AliasLayout(g * 1024, args.alias_mib), kvm=True).total_mib
        pss = ""
        if row["sidecar"] and Path(row["sidecar"]).exists():
            mem = json.loads(Path(row["sidecar"]).read_text()).get("alias", {}).get("src_memory", {})
            pss = f"{mem['Pss'] / 1024:.0f}" if "Pss" in mem else ""
        l1 = next((v for k, v in used.items() if f"alias-{g}g" in k), None)
        print(f"{g:>5} {float(row['prefault_ms'] or 0) / 1000:>10.1f} {row['kvm_enable_ms'] or '-':>14} "
              f"{row['dirty_log_start_ms'] or '-':>19} {l1 if l1 is not None else '-':>12} {pss or '-':>12} "
              f"{est:>13}  {row['status']} {row['error'][:80]}")
        if row["status"] == "ok":
            pts.append((g, float(row["dirty_log_start_ms"]), float(row["kvm_enable_ms"] or 0)))
    if len(pts) >= 2:
        for label, idx in (("dirty_log_start_ms", 1), ("kvm_enable_ms", 2)):
            a, b = fit([p[0] for p in pts], [p[idx] for p in pts])
            print(f"fit {label}: {b:.2f} ms/GiB + {a:.1f} ms -> {(a + b * TWO_TIB_GIB) / 1000:.1f} s at 2 TiB")
    print(f"total {time.monotonic() - t0:.0f} s")
    return 0 if len(pts) == len(sizes) else 1


if __name__ == "__main__":
    sys.exit(main())
