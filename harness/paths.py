"""Where migstall keeps things outside the repository.

* cache:   ``$MIGSTALL_CACHE`` or ``$XDG_CACHE_HOME/migstall`` or ``~/.cache/migstall``
           (downloaded guest kernels, initramfs images, kernel sources and builds,
           fetched patch series).  Content-addressed where it matters.
* runtime: a fresh 0700 directory per VM for QMP and probe sockets
           (``$XDG_RUNTIME_DIR`` if set, else the system temp dir).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

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


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created if missing), so that
    concurrent migstall processes fill a cache entry once."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
