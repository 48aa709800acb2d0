"""A deterministic initramfs writer (cpio "newc", optionally gzip-compressed).

Used for both the measured guest's initramfs and the virtual host's L1
initramfs.  Entries are sorted and timestamps zeroed, so the same inputs give
the same bytes and content-hash caching works.
"""

from __future__ import annotations

import gzip
import io
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, Optional, Union


@dataclass(frozen=True)
class Entry:
    """One archive member.  Exactly one of ``data``, ``source``, ``target`` or
    ``is_dir`` describes it."""

    path: str                       # inside the archive, no leading '/'
    mode: int = 0o644               # permission bits
    data: Optional[bytes] = None    # file contents
    source: Optional[Path] = None   # file contents from this local file
    target: Optional[str] = None    # symlink target
    is_dir: bool = False


def _header(ino: int, mode: int, nlink: int, size: int, name: bytes) -> bytes:
    fields = (ino, mode, 0, 0, nlink, 0, size, 0, 0, 0, 0, len(name) + 1, 0)
    return b"070701" + b"".join(b"%08X" % f for f in fields)


def _pad(n: int) -> bytes:
    return b"\0" * ((4 - n % 4) % 4)


def write_cpio(entries: Iterable[Entry], compress: bool = True) -> bytes:
    """Return the archive bytes.  Parent directories are added automatically."""
    by_path: Dict[str, Entry] = {}
    for e in entries:
        p = e.path.strip("/")
        by_path[p] = Entry(p, e.mode, e.data, e.source, e.target, e.is_dir)
    for p in list(by_path):
        parts = p.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            d = "/".join(parts[:i])
            by_path.setdefault(d, Entry(d, 0o755, is_dir=True))
    out = io.BytesIO()
    for ino, p in enumerate(sorted(by_path), start=1):
        e = by_path[p]
        if e.is_dir:
            mode, body = stat.S_IFDIR | e.mode, b""
        elif e.target is not None:
            mode, body = stat.S_IFLNK | 0o777, e.target.encode()
        else:
            body = e.data if e.data is not None else Path(e.source).read_bytes()  # type: ignore[arg-type]
            mode = stat.S_IFREG | e.mode
        name = p.encode()
        out.write(_header(ino, mode, 2 if e.is_dir else 1, len(body), name))
        out.write(name + b"\0" + _pad(110 + len(name) + 1))
        out.write(body + _pad(len(body)))
    trailer = b"TRAILER!!!"
    out.write(_header(0, 0, 1, 0, trailer) + trailer + b"\0" + _pad(110 + len(trailer) + 1))
    raw = out.getvalue()
    if not compress:
        return raw
    return gzip.compress(raw, compresslevel=6, mtime=0)


def file_entry(path: str, source: Union[str, Path], mode: Optional[int] = None) -> Entry:
    """An entry copying a local file, keeping its executable bit unless ``mode``."""
    src = Path(source)
    if mode is None:
        mode = 0o755 if os.access(src, os.X_OK) else 0o644
    return Entry(path, mode, source=src)
