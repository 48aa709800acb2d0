"""Where migstall keeps things outside the repository.

* cache:   ``$MIGSTALL_CACHE`` or ``$XDG_CACHE_HOME/migstall`` or ``~/.cache/migstall``
           (downloaded guest kernels, initramfs images, kernel sources and builds,
           fetched patch series).  Content-addressed where it matters.
* runtime: a fresh 0700 directory per VM for QMP and probe sockets
           (``$XDG_RUNTIME_DIR`` if set, else the system temp dir).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def cache_dir(*parts: str) -> Path:
    base = os.environ.get("MIGSTALL_CACHE")
    if base:
        root = Path(base)
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        root = Path(xdg) / "migstall" if xdg else Path.home() / ".cache" / "migstall"
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def new_runtime_dir(prefix: str = "migstall-") -> Path:
    """Create a private (0700) directory for sockets; the caller removes it."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    if base and not os.access(base, os.W_OK):
        base = None
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=base))
    os.chmod(path, 0o700)
    return path
