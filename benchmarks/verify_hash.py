#!/usr/bin/env python3
"""Benchmark (not a test): how fast guest RAM is hashed for the page-by-page verification.

    .venv/bin/python benchmarks/verify_hash.py [--mib 1024] [--repeats 3] [--no-qemu]

Makes a file of random bytes (``--mib``, default 1 GiB) in a temporary
directory, then times ``migstall-ramhash`` (guests/ramhash/ramhash.c) on it:

* ``file``: the hasher reading the file (warm page cache): the hash itself plus
  read(2), no pipe;
* ``pipe``: ``cat FILE | migstall-ramhash``: through a pipe, as from a FIFO;
* ``qemu``: what the verification does (:func:`harness.measure.verify.hash_guest_ram`):
  a paused TCG q35 QEMU whose guest RAM is that file (``memory-backend-file``,
  ``share=off``), QMP ``pmemsave`` -> FIFO -> hasher.  It starts QEMU: on a
  shared machine run the script under the machine's VM lock.

Each prints GiB/s and seconds per GiB (best of ``--repeats``).  Target: the
``qemu`` path above 1 GiB/s.  It prints whether the target was met and never
fails on it (exit 1 only if a step fails).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, List

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from harness import ctools  # noqa: E402
from harness.hosts.local import LocalHost  # noqa: E402
from harness.measure import verify  # noqa: E402
from harness.qemu.machine import VM  # noqa: E402

log = logging.getLogger("verify_hash")
TARGET_GIB_S = 1.0
GiB = 1 << 30


def _best(repeats: int, once: Callable[[], float]) -> float:
    return min(once() for _ in range(repeats))


def _report(what: str, nbytes: int, seconds: float) -> float:
    gib = nbytes / GiB
    rate = gib / seconds
    print(f"{what:5s}: {rate:6.2f} GiB/s   {seconds / gib:6.3f} s per GiB   ({gib:.2f} GiB in {seconds:.3f} s)")
    return rate


def _timed_run(argv: List[str], **kw) -> float:
    t0 = time.monotonic()
    res = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=600, **kw)
    if res.returncode != 0:
        raise SystemExit(f"{argv[0]} failed: {res.stderr.decode(errors='replace').strip()}")
    return time.monotonic() - t0


def _qemu_once(path: Path, mib: int) -> float:
    ranges = verify.guest_ram_ranges(mib)
    args = ["-machine", "q35,memory-backend=ram", "-accel", "tcg", "-m", f"{mib}M",
            "-object", f"memory-backend-file,id=ram,size={mib}M,mem-path={path},share=off",
            "-S", "-nodefaults", "-no-user-config"]

    async def main() -> float:
        async with VM(LocalHost(), "bench-verify", args) as vm:
            h = await verify.hash_guest_ram(vm, ranges)
            return h.seconds * (mib << 20) / h.nbytes      # per the file's size, for comparison

    return asyncio.run(main())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=1024, help="size of the RAM image, MiB")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-qemu", action="store_true", help="skip the QEMU pmemsave path")
    a = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    binary = str(ctools.ramhash())
    nbytes = a.mib << 20
    with tempfile.TemporaryDirectory(prefix="migstall-bench-verify-") as tmp:
        path = Path(tmp) / "ram.bin"
        import numpy as np

        rng = np.random.default_rng(0)
        with open(path, "wb") as fh:
            for _ in range(a.mib // 64):
                fh.write(rng.bytes(64 << 20))
            fh.write(rng.bytes((a.mib % 64) << 20))
        _timed_run([binary, str(path)])          # warm the page cache
        _report("file", nbytes, _best(a.repeats, lambda: _timed_run([binary, str(path)])))
        _report("pipe", nbytes, _best(a.repeats, lambda: _timed_run(
            ["sh", "-c", 'cat "$1" | "$2"', "sh", str(path), binary])))
        if not a.no_qemu:
            rate = _report("qemu", nbytes, _best(a.repeats, lambda: _qemu_once(path, a.mib)))
            print(f"target {TARGET_GIB_S:g} GiB/s through QEMU: {'met' if rate >= TARGET_GIB_S else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
