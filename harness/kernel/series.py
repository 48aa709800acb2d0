"""The patch series: fetched with ``b4 am`` by Message-ID, or a local mbox or
patch directory.

The result is always one mbox file; its sha256 is the series hash that names
the builds (``LOCALVERSION=-migstall-<variant>-<hash8>``).  Series fetched by
Message-ID are cached by Message-ID in ``cache_dir("kernel-series")``, so the
hash stays stable once fetched.
"""

from __future__ import annotations

import email
import email.policy
import hashlib
import logging
import mailbox
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

from harness import paths
from harness.errors import KernelBuildInfraError, UserError
from harness.kernel.manifest import SeriesSpec
from harness.kernel.run import run
from harness.progress import Progress

log = logging.getLogger(__name__)

#: timeout of ``b4 am`` (one lore query plus the thread download), seconds
B4_TIMEOUT = 300.0

_NUMBERED = re.compile(r"\[[^\]]*?PATCH[^\]]*?\b(\d+)/(\d+)\s*\]", re.I)


@dataclass(frozen=True)
class Series:
    kind: str                     # message_id | mbox | patch_dir
    origin: str                   # Message-ID or the local path
    mbox: Path                    # the series as fetched/given (its sha256 is the series hash)
    sha256: str
    count: int
    subjects: Tuple[str, ...]
    am_mbox: Path                 # the patches only (cover letters dropped), for git am

    @property
    def hash8(self) -> str:
        return self.sha256[:8]


def _subject(msg: mailbox.mboxMessage) -> str:
    return " ".join(str(msg.get("Subject", "")).split())


def read_patches(mbox: Path) -> List[str]:
    """Subjects of the patches in ``mbox``, cover letters (0/N, no diff) left out."""
    subjects = []
    box = mailbox.mbox(str(mbox), create=False)
    try:
        for msg in box:
            subject = _subject(msg)
            m = _NUMBERED.search(subject)
            if m and int(m.group(1)) == 0:
                continue
            payload = msg.get_payload(decode=True) if not msg.is_multipart() else b""
            body = (payload or b"").decode(errors="replace")
            if "\ndiff --git " not in body and not body.startswith("diff --git ") and "\n+++ " not in body:
                continue
            subjects.append(subject)
    finally:
        box.close()
    return subjects


_SEPARATOR = re.compile(rb"^From [^\n]*\d{4}\r?\n", re.M)


def _is_patch(raw: bytes) -> bool:
    msg = email.message_from_bytes(raw, policy=email.policy.compat32)
    m = _NUMBERED.search(" ".join(str(msg.get("Subject", "")).split()))
    if m and int(m.group(1)) == 0:
        return False
    body = raw.split(b"\n\n", 1)[-1]
    return b"\ndiff --git " in body or b"\n+++ " in body


def patches_only(mbox: Path, digest: str) -> Path:
    """An mbox without cover letters (git am stops at a message with no diff)."""
    data = mbox.read_bytes()
    starts = [m.start() for m in _SEPARATOR.finditer(data)]
    if not starts or starts[0] != 0:
        return mbox
    chunks = [data[a:b] for a, b in zip(starts, starts[1:] + [len(data)])]
    kept = [c for c in chunks if _is_patch(c)]
    if len(kept) == len(chunks):
        return mbox
    target = paths.cache_dir("kernel-series", "am-" + digest[:16]) / "patches.mbx"
    if not target.is_file():
        tmp = target.with_name(".patches.mbx.tmp")
        tmp.write_bytes(b"".join(kept))
        tmp.replace(target)
    return target


def _from_message_id(spec: SeriesSpec, progress: Progress) -> Tuple[Path, str]:
    msgid = spec.message_id or ""
    cache = paths.cache_dir("kernel-series", "msgid-" + hashlib.sha256(msgid.encode()).hexdigest()[:16])
    target = cache / "series.mbx"
    if target.is_file():
        return target, msgid
    if shutil.which("b4") is None:
        raise UserError("b4 is not installed, so the series cannot be fetched by Message-ID; "
                        "install it ('apt-get install b4' or 'pip install b4') or use [series] mbox")
    tmp = Path(tempfile.mkdtemp(prefix=".b4-", dir=cache))
    try:
        with progress.task(f"b4 am {msgid}"):
            argv = ["b4", "am", "--no-cover", "-o", tmp, "-n", "series", msgid]
            proc = run(argv, cwd=tmp, check=False, timeout=B4_TIMEOUT)
        logpath = cache / "b4.log"
        logpath.write_text(f"$ {' '.join(map(str, argv))}\n{proc.stdout}\n{proc.stderr}")
        got = tmp / "series.mbx"
        if proc.returncode != 0 or not got.is_file() or got.stat().st_size == 0:
            text = proc.stdout + proc.stderr
            if re.search(r"not found|no messages|Looking up .* 404", text, re.I) and "Connection" not in text:
                raise UserError(f"b4 found no series with Message-ID {msgid}; fix [series] message_id "
                                f"(log: {logpath})")
            raise KernelBuildInfraError(f"b4 am {msgid} failed (no network to lore.kernel.org?)",
                                        log_path=logpath)
        got.replace(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target, msgid


def _from_patch_dir(spec: SeriesSpec) -> Tuple[Path, str]:
    pdir = Path(spec.patch_dir or "")
    files = sorted(p for p in pdir.iterdir() if p.suffix in (".patch", ".diff", ".eml") and p.is_file())
    if not files:
        raise UserError(f"patch_dir {pdir} has no *.patch files; fix [series] patch_dir")
    data = b""
    for f in files:
        body = f.read_bytes()
        if not body.startswith(b"From "):
            raise UserError(f"{f} is not a git format-patch file (no 'From ' line); regenerate it with git format-patch")
        data += body if body.endswith(b"\n") else body + b"\n"
    digest = hashlib.sha256(data).hexdigest()
    cache = paths.cache_dir("kernel-series", "dir-" + digest[:16])
    target = cache / "series.mbx"
    if not target.is_file():
        tmp = cache / ".series.mbx.tmp"
        tmp.write_bytes(data)
        tmp.replace(target)
    return target, str(pdir)


def load_series(spec: SeriesSpec, progress: Optional[Progress] = None) -> Series:
    """Fetch or read the series, check its patch count, hash it."""
    progress = progress or Progress()
    if spec.kind == "message_id":
        mbox, origin = _from_message_id(spec, progress)
    elif spec.kind == "patch_dir":
        mbox, origin = _from_patch_dir(spec)
    else:
        mbox, origin = Path(spec.mbox or ""), str(spec.mbox)
    try:
        subjects = read_patches(mbox)
    except (OSError, mailbox.Error) as exc:
        raise UserError(f"{mbox} is not a readable mbox ({exc}); regenerate it with git format-patch --stdout") from exc
    if not subjects:
        raise UserError(f"{mbox} contains no patches; regenerate it with git format-patch --stdout")
    if spec.patches is not None and len(subjects) != spec.patches:
        raise UserError(f"series {origin} has {len(subjects)} patches but the manifest says {spec.patches}; "
                        f"fix [series] patches (or the series)")
    digest = hashlib.sha256(mbox.read_bytes()).hexdigest()
    return Series(spec.kind, origin, mbox, digest, len(subjects), tuple(subjects), patches_only(mbox, digest))
