"""Which builder, runtime and compiler a build uses; decided before any work.

* builder ``tuxmake`` (default when installed) or ``make`` (plain kbuild),
  behind the same interface in :mod:`harness.kernel.build`;
* runtime ``null`` (this machine's compiler) when the manifest's compiler is
  installed here, else ``docker``/``podman`` with tuxmake's image for that
  toolchain (e.g. ``tuxmake/x86_64_gcc-8``) when a container engine WORKS
  (``docker info`` answers: a client binary alone is not enough);
* otherwise a :class:`UserError` naming what to install.

Old kernels (5.0-rc2 for the seed series) do not build with gcc 12; they need
gcc-8, which Debian 12 does not ship, so the container path is the way.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from harness.errors import UserError

log = logging.getLogger(__name__)

#: how long ``docker info`` / ``podman info`` may take to answer, seconds
ENGINE_PROBE_TIMEOUT = 20.0
BUILDERS = ("auto", "tuxmake", "make")


@dataclass(frozen=True)
class Toolchain:
    builder: str          # tuxmake | make
    runtime: str          # null | docker | podman
    compiler: str         # gcc, gcc-8, clang, ...
    version: str          # first line of `CC --version` (null runtime) or the container image

    def as_dict(self) -> dict:
        return {"builder": self.builder, "runtime": self.runtime, "compiler": self.compiler,
                "version": self.version}


def tuxmake_path() -> Optional[str]:
    here = Path(sys.executable).parent / "tuxmake"
    if here.exists():
        return str(here)
    return shutil.which("tuxmake")


def working_engine() -> Optional[str]:
    """``docker`` or ``podman`` if its engine answers, else None."""
    for engine in ("podman", "docker"):
        exe = shutil.which(engine)
        if not exe:
            continue
        try:
            proc = subprocess.run([exe, "info"], stdin=subprocess.DEVNULL, capture_output=True,
                                  timeout=ENGINE_PROBE_TIMEOUT)
        except (subprocess.TimeoutExpired, OSError):
            log.info("%s info did not answer", engine)
            continue
        if proc.returncode == 0:
            return engine
        log.info("%s is installed but its engine does not run: %s", engine,
                 proc.stderr.decode(errors="replace").strip()[:200])
    return None


def _cc_version(cc: str) -> str:
    try:
        out = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return (out.splitlines() or ["unknown"])[0]


def resolve_toolchain(compiler: Optional[str], builder: str = "auto") -> Toolchain:
    """Decide how to build, or raise UserError naming what to install."""
    if builder not in BUILDERS:
        raise UserError(f"builder {builder} is not one of {', '.join(BUILDERS)}")
    cc = compiler or "gcc"
    tux = tuxmake_path()
    if shutil.which(cc):
        if builder == "tuxmake" and not tux:
            raise UserError("tuxmake is not installed; pip install tuxmake (or use the make builder)")
        chosen = "make" if builder == "make" or not tux else "tuxmake"
        return Toolchain(chosen, "null", cc, _cc_version(cc))
    engine = working_engine()
    if engine and tux and builder != "make":
        return Toolchain("tuxmake", engine, cc, f"tuxmake/x86_64_{cc}")
    what = []
    if not engine:
        what.append("a working container engine (apt-get install podman, or docker with its daemon running: "
                    "'docker info' must succeed)")
    if not tux:
        what.append("tuxmake (pip install tuxmake)")
    raise UserError(f"toolchain {cc} is not installed here and cannot be pulled: install "
                    f"{' and '.join(what)} so tuxmake can use the tuxmake/x86_64_{cc} image, "
                    f"or install {cc} itself")
