"""Benchmark: cold stock and patched kernel build times and their ratio.

Builds the test series (Debian linux-source-6.1 + the dirty-log tracepoint
series, tiny config + harness fragments) in a fresh build cache, so both
builds are cold; the prepared source tree is reused from the normal cache
when present (preparing it is not the build).  The patched build reuses the
stock objects; the target is patched <= 25% of stock.

    .venv/bin/python benchmarks/kernel_build.py [--manifest FILE] [--config tiny] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--manifest", default=str(REPO / "patches/migstall-dirtylog-tracepoints/series.toml"))
    ap.add_argument("--config", default=None)
    ap.add_argument("--keep", action="store_true", help="keep the temporary cache")
    args = ap.parse_args()

    from harness import paths
    real_src = paths.cache_dir("kernel-src")
    tmp = Path(tempfile.mkdtemp(prefix="migstall-bench-kernel-"))
    os.environ["MIGSTALL_CACHE"] = str(tmp)
    if any(real_src.glob("*/.migstall-ready")) or any(real_src.glob("*/repo")):
        os.symlink(real_src, tmp / "kernel-src")
    try:
        from harness.kernel.build import build_kernel
        t0 = time.monotonic()
        stock = build_kernel(args.manifest, "stock", args.config)
        t1 = time.monotonic()
        patched = build_kernel(args.manifest, "patched", args.config)
        t2 = time.monotonic()
        ratio = patched.duration_s / stock.duration_s if stock.duration_s else float("nan")
        meta = json.loads(patched.metadata.read_text())
        smeta = json.loads(stock.metadata.read_text())
        jobs = meta.get("jobs") or os.cpu_count() or 1
        print(f"kernel build (cold, {os.cpu_count()} cpus, {meta['toolchain']['builder']}, "
              f"{meta['config']['label']} + fragments)")
        print(f"  stock    {stock.release:40} build {stock.duration_s:7.1f} s  (wall incl. source/series {t1 - t0:7.1f} s)")
        print(f"  patched  {patched.release:40} build {patched.duration_s:7.1f} s  (wall {t2 - t1:7.1f} s)")
        print(f"  ratio patched/stock = {ratio:.3f}  (target <= 0.25: {'met' if ratio <= 0.25 else 'NOT met'})")
        if "cpu_s" in smeta and "cpu_s" in meta:
            cpu_ratio = meta["cpu_s"] / smeta["cpu_s"] if smeta["cpu_s"] else float("nan")
            print(f"  cpu: stock {smeta['cpu_s']:.0f} s, patched {meta['cpu_s']:.0f} s (ratio {cpu_ratio:.3f}); "
                  f"on {jobs} idle cores about {smeta['cpu_s'] / jobs:.0f} s and {meta['cpu_s'] / jobs:.0f} s; "
                  f"load at end {smeta['load_avg_at_end'][0]:.1f} / {meta['load_avg_at_end'][0]:.1f}")
        return 0
    finally:
        if args.keep:
            print(f"  cache kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
