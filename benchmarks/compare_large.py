#!/usr/bin/env python3
"""Benchmark (not a test): ``migstall compare`` on two large results CSVs.

    .venv/bin/python benchmarks/compare_large.py [--repeats 2000] [--runs 3] [--keep DIR]

Writes, in a temporary directory, ``stock.csv`` and ``patched.csv``: 6 guest
sizes (512 MiB .. 16 GiB) x ``--repeats`` runs each (default 2000, so 12,000
rows per file), every column of a real KVM row filled with plausible values
(1 % of the rows failed), then runs the real command line,
``python -m harness compare stock.csv patched.csv --csv OUT``, with its table
going to a file (as in a pipe), ``--runs`` times.  Prints the wall time and the
child's CPU time (user + sys: less disturbed by other load than wall time) and
peak RSS of each run, the best of them and the load average (the machine is
shared: wall time includes waiting for a CPU), and, from one more run under
``-X importtime``, the share of the time spent importing modules.  Target (issue 12): at most
3 s and 300 MB on the 2-core build machine.  It prints whether the target was
met and never fails on it (exit 1 only if compare itself fails).
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from harness import results  # noqa: E402

SIZES_MIB = (512, 1024, 2048, 4096, 8192, 16384)
TARGET_S, TARGET_MB = 3.0, 300.0


def _rows(variant: str, repeats: int, seed: int) -> List[Dict[str, str]]:
    rng = np.random.default_rng(seed)
    per_gib = 56.0 if variant == "stock" else 3.5
    rows = []
    for rep in range(1, repeats + 1):
        for mem in SIZES_MIB:
            gib = mem / 1024
            start = (2.0 + per_gib * gib) * rng.uniform(0.9, 1.1)
            row = dict(
                run_id=f"{variant}-{mem}-{rep}", started_at=f"2026-12-01T{rep % 24:02d}:{rep % 60:02d}:00+00:00",
                host="virtual:debian", host_kernel=f"6.1.0-migstall-{variant}-1a2b3c4d", kernel_variant=variant,
                series_id="1a2b3c4d5e6f", scenario="sweep", qemu_version="7.2.22", accel="kvm",
                cpu_model="host", guest_mem_mib=mem, vcpus=2, backing="anon", page_size_kib=4,
                dirty_log_mode="legacy", dirty_ring=None, loops="pio+write", end_action="complete",
                touched_mib=int(mem * 0.7), repeat=rep,
                dirty_log_start_ms=start, setup_time_ms=float(round(start + 8 * rng.uniform(0.8, 1.2))),
                first_pass_ms=start + 30 * rng.uniform(0.9, 1.1), kvm_enable_ms=start * 0.9,
                stall_pio_max_us=1000 * start + rng.uniform(200, 400), stall_pio_p99_us=rng.uniform(150, 250),
                stall_pio_count=float(rng.integers(3, 10)),
                stall_write_max_us=700 * start + rng.uniform(300, 500), stall_write_p99_us=rng.uniform(100, 300),
                stall_write_count=float(rng.integers(0, 40)),
                baseline_stall_max_us=rng.uniform(150, 350), total_time_ms=2300 * gib * rng.uniform(0.9, 1.1),
                downtime_ms=70 * rng.uniform(0.75, 1.25), prefault_ms=400 * gib * rng.uniform(0.9, 1.1),
                dirty_log_start_source="trace:global_dirty_changed->kvm_set_user_memory",
                kvm_params="kvm.eager_page_split=Y;kvm.tdp_mmu=Y;kvm_amd.nested=1;kvm_amd.npt=Y",
                sidecar=f"{variant}.sidecars/{variant}-{mem}-{rep}.json", status="ok",
            )
            if rng.random() < 0.01:
                row = results.failed_row(row, f"guest never became READY within 300s (log: /tmp/x/{rep}.log)",
                                         row["sidecar"])
            rows.append(row)
    return rows


def generate(directory: Path, repeats: int) -> List[Path]:
    """Write stock.csv and patched.csv (``6 * repeats`` rows each) into ``directory``."""
    paths = []
    for variant, seed in (("stock", 1), ("patched", 2)):
        path = directory / f"{variant}.csv"
        with open(path, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=results.COLUMNS, lineterminator="\n")
            w.writeheader()
            w.writerows(results.normalize_row(r) for r in _rows(variant, repeats, seed))
        paths.append(path)
    return paths


def _one(paths: List[Path], workdir: Path) -> tuple:
    """Run compare in a fresh child (so ru_maxrss is its own) and return (seconds, peak MB)."""
    code = (
        "import resource, subprocess, sys, time\n"
        "t = time.perf_counter()\n"
        "with open(sys.argv[1], 'w') as out:\n"
        "    rc = subprocess.call(sys.argv[2:], stdout=out)\n"
        "dt = time.perf_counter() - t\n"
        "ru = resource.getrusage(resource.RUSAGE_CHILDREN)\n"
        "print(rc, dt, ru.ru_utime + ru.ru_stime, ru.ru_maxrss)\n"
    )
    cmd = [sys.executable, "-m", "harness", "compare", str(paths[0]), str(paths[1]),
           "--csv", str(workdir / "comparison.csv")]
    proc = subprocess.run([sys.executable, "-c", code, str(workdir / "table.txt"), *cmd], cwd=REPO,
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    if proc.returncode != 0 or not proc.stdout.strip():
        raise SystemExit(f"benchmark driver failed: {proc.stderr.strip()}")
    rc, dt, cpu, kib = proc.stdout.split()
    if int(rc) != 0:
        raise SystemExit(f"compare exited {rc}: {proc.stderr.strip()}")
    return float(dt), float(cpu), int(kib) / 1024.0


def _import_share(paths: List[Path], workdir: Path) -> tuple:
    """One more run under ``-X importtime``: (seconds spent importing, wall seconds of that run,
    the slowest top-level imports).  Separate from the timed runs, which it would slow down."""
    cmd = [sys.executable, "-X", "importtime", "-m", "harness", "compare", str(paths[0]), str(paths[1]),
           "--csv", str(workdir / "comparison.csv")]
    t = time.perf_counter()
    with open(workdir / "table.txt", "w") as out:
        proc = subprocess.run(cmd, cwd=REPO, stdout=out, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    dt = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"compare -X importtime exited {proc.returncode}")
    top = []
    for line in proc.stderr.splitlines():          # "import time: self | cumulative | name"
        parts = line.split("|")
        if len(parts) == 3 and parts[1].strip().isdigit() and not parts[2][1:].startswith(" "):
            top.append((int(parts[1]) / 1e6, parts[2].strip()))
    return sum(s for s, _ in top), dt, sorted(top, reverse=True)[:4]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=2000, help="runs per guest size and variant (default 2000)")
    ap.add_argument("--runs", type=int, default=3, help="times to run compare (default 3)")
    ap.add_argument("--keep", type=Path, metavar="DIR", help="write the CSVs here and keep them")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="migstall-bench-compare-") as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        t = time.perf_counter()
        paths = generate(work, args.repeats)
        print(f"generated 2 x {len(SIZES_MIB) * args.repeats} rows ({len(SIZES_MIB)} sizes x {args.repeats} "
              f"repeats) in {time.perf_counter() - t:.1f} s: {paths[0].stat().st_size / 1e6:.1f} MB + "
              f"{paths[1].stat().st_size / 1e6:.1f} MB")
        figures = []
        for i in range(args.runs):
            dt, cpu, mb = _one(paths, work)
            figures.append((dt, cpu, mb))
            print(f"run {i + 1}: {dt:.2f} s wall, {cpu:.2f} s CPU, peak RSS {mb:.0f} MB")
        imp, imp_wall, slowest = _import_share(paths, work)
        print(f"imports: {imp:.2f} s of {imp_wall:.2f} s wall ({100 * imp / imp_wall:.0f} %) in one more run under "
              f"-X importtime; slowest: {', '.join(f'{name} {sec:.2f} s' for sec, name in slowest)}")
        best_t = min(f[0] for f in figures)
        best_cpu = min(f[1] for f in figures)
        max_mb = max(f[2] for f in figures)
        ok = best_t <= TARGET_S and max_mb <= TARGET_MB
        load = os.getloadavg()[0]
        print(f"compare 2 x {len(SIZES_MIB) * args.repeats} rows: best {best_t:.2f} s wall ({best_cpu:.2f} s CPU), "
              f"peak RSS {max_mb:.0f} MB; load average {load:.2f} on {os.cpu_count()} CPUs")
        print(f"target (issue 12): <= {TARGET_S:g} s wall and <= {TARGET_MB:g} MB; measured {best_t:.2f} s and "
              f"{max_mb:.0f} MB: {'met' if ok else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
