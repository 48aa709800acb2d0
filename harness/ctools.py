"""Small C helpers that QEMU runs with on the host, compiled here on first use.

* ``guests/nothp/nothp.c``: exec wrapper that disables THP (``--backing anon``);
* ``guests/legacy-shim/shim.c``: the LD_PRELOAD shim of the ``legacy`` dirty-log mode;
* ``guests/kvm-pin/kvm-pin.c``: holds an idle KVM VM in the virtual host (see there);
* ``guests/markrelay/markrelay.c``: the probe channel's relay on the QEMU host,
  which stamps the clock marks with that host's clock (see there);
* ``guests/reaper/reaper.c``: the exec prefix of every QEMU; it reaps the
  daemonized QEMU and writes how it ended (exit status or signal) to a file;
* ``guests/ramhash/ramhash.c``: hashes guest RAM per 4 KiB page as QEMU's
  ``pmemsave`` streams it through a FIFO (:mod:`harness.measure.verify`).

Each is built with the host gcc into ``cache_dir("tools")``, named by a hash of
its source and flags, so an edit rebuilds it and nothing else does.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import subprocess
from pathlib import Path
from typing import Sequence

from harness.errors import HostError, UserError
from harness.paths import REPO_ROOT, cache_dir, file_lock

log = logging.getLogger(__name__)

#: seconds one helper may take to compile
COMPILE_TIMEOUT = 120.0

NOTHP_SOURCE = REPO_ROOT / "guests" / "nothp" / "nothp.c"
SHIM_SOURCE = REPO_ROOT / "guests" / "legacy-shim" / "shim.c"
KVM_PIN_SOURCE = REPO_ROOT / "guests" / "kvm-pin" / "kvm-pin.c"
REAPER_SOURCE = REPO_ROOT / "guests" / "reaper" / "reaper.c"
MARKRELAY_SOURCE = REPO_ROOT / "guests" / "markrelay" / "markrelay.c"
RAMHASH_SOURCE = REPO_ROOT / "guests" / "ramhash" / "ramhash.c"


def compile_c(source: Path, out_name: str, flags: Sequence[str], libs: Sequence[str] = ()) -> Path:
    """Compile ``source`` once; return the cached binary."""
    src = Path(source).read_bytes()
    digest = hashlib.sha256(src + b"\0" + " ".join([*flags, *libs]).encode()).hexdigest()[:16]
    stem, dot, ext = out_name.partition(".")
    out = cache_dir("tools") / f"{stem}-{digest}{dot}{ext}"
    with file_lock(out.with_name(out.name + ".lock")):
        if out.exists():
            return out
        gcc = shutil.which("gcc")
        if gcc is None:
            raise UserError(f"gcc not found; migstall compiles {Path(source).name} with it: "
                            "install gcc and libc6-dev (make setup does)")
        tmp = out.with_name(out.name + ".tmp")
        argv = [gcc, *flags, "-o", str(tmp), str(source), *libs]
        log.info("compiling %s: %s", Path(source).name, " ".join(argv))
        try:
            subprocess.run(argv, check=True, capture_output=True, timeout=COMPILE_TIMEOUT)
        except subprocess.CalledProcessError as exc:
            raise HostError(f"compiling {source} failed: {exc.stderr.decode(errors='replace')[-300:]}") from exc
        except subprocess.TimeoutExpired as exc:
            raise HostError(f"compiling {source} took more than {COMPILE_TIMEOUT:g}s") from exc
        tmp.replace(out)
    return out


def nothp_wrapper() -> Path:
    return compile_c(NOTHP_SOURCE, "migstall-nothp", ["-static", "-Os"])


def dirtylog_shim() -> Path:
    return compile_c(SHIM_SOURCE, "migstall-dirtylog-shim.so", ["-O2", "-Wall", "-shared", "-fPIC"], ["-ldl"])


def kvm_pin() -> Path:
    return compile_c(KVM_PIN_SOURCE, "migstall-kvm-pin", ["-static", "-Os", "-Wall"])


def markrelay() -> Path:
    return compile_c(MARKRELAY_SOURCE, "migstall-markrelay", ["-static", "-O2", "-Wall"])


def reaper() -> Path:
    return compile_c(REAPER_SOURCE, "migstall-reaper", ["-static", "-Os", "-Wall"])


def ramhash() -> Path:
    return compile_c(RAMHASH_SOURCE, "migstall-ramhash", ["-static", "-O2", "-Wall"])
