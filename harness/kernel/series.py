"""The patch series: fetched with ``b4 am`` by Message-ID, or a local mbox or
patch directory.

The result is always one mbox file; its sha256 is the series hash that names
the builds (``LOCALVERSION=-migstall-<variant>-<hash8>``).

By Message-ID: ``b4 am`` looks the thread up on lore (or on ``[series]
lore_url`` / ``--lore-url``, else the ``b4.midmask`` of the user's git config)
and picks the series' messages: the cover letter and the latest revision of
each patch.  The series mbox is those messages as they were posted, byte for
byte from the thread (``t.mbox.gz``): trailers that reviewers add later do not
change it, and the same series posted from an mbox hashes the same.  It is
cached by Message-ID in ``cache_dir("kernel-series")``.  b4 runs with
migstall's git identity (it needs one) and its log is ``<cache>/b4.log``.
A Message-ID the server does not know, or a thread without patches, is a
UserError; a server error, no answer in time or no route to the server is an
infrastructure error with that log.
"""

from __future__ import annotations

import email
import email.parser
import email.policy
import gzip
import hashlib
import logging
import mailbox
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

from harness import paths
from harness.paths import file_lock
from harness.errors import KernelBuildInfraError, UserError
from harness.kernel.manifest import SeriesSpec
from harness.kernel.run import run
from harness.progress import Progress

log = logging.getLogger(__name__)

#: timeout of ``b4 am`` (one lore query plus the thread download), seconds; also of
#: each HTTP request for the thread as posted.  ``--fetch-timeout`` overrides it.
B4_TIMEOUT = 300.0
#: timeout of the TCP connect that tells "cannot reach the server" from other b4 failures, seconds
PROBE_TIMEOUT = 10.0
#: timeout of ``git config`` reads, seconds
GIT_CONFIG_TIMEOUT = 30.0
#: b4's own default ``b4.midmask``: lore's index of all lists
DEFAULT_MIDMASK = "https://lore.kernel.org/all/%s"
#: the identity b4 runs with: b4 0.12 needs user.name/user.email from git config
#: even though ``b4 am`` adds no Signed-off-by (without them it exits 1, silently)
B4_IDENTITY = (("user.name", "migstall"), ("user.email", "migstall@localhost"))

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
            body = (payload if isinstance(payload, bytes) else b"").decode(errors="replace")
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


#: the format of a cached Message-ID series: "msgid2" holds the messages as posted
#: (cover letter included); "msgid" entries (b4's rewritten output) are not reused,
#: since they hash differently
MSGID_CACHE_FORMAT = "msgid2"


def message_id_cache(msgid: str) -> Path:
    """The cache directory of the series fetched by ``msgid``."""
    return paths.cache_dir("kernel-series",
                           f"{MSGID_CACHE_FORMAT}-" + hashlib.sha256(msgid.encode()).hexdigest()[:16])


def _b4_env(midmask: Optional[str], scratch: Path) -> Dict[str, str]:
    """The environment of ``b4 am``: the user's, plus migstall's identity and
    (when given) ``b4.midmask`` as command-scope git config (GIT_CONFIG_COUNT,
    git >= 2.31), so they apply to every ``git config`` b4 runs and override
    the user's files without touching them.  b4 gets a private cache dir."""
    env = dict(os.environ)
    try:
        n = int(env.get("GIT_CONFIG_COUNT", "0") or "0")
    except ValueError:
        n = 0
    items = list(B4_IDENTITY) + ([("b4.midmask", midmask)] if midmask else [])
    for i, (key, value) in enumerate(items, start=n):
        env[f"GIT_CONFIG_KEY_{i}"] = key
        env[f"GIT_CONFIG_VALUE_{i}"] = value
    env["GIT_CONFIG_COUNT"] = str(n + len(items))
    env["GIT_TERMINAL_PROMPT"] = "0"
    env["XDG_CACHE_HOME"] = str(scratch / "b4-cache")
    return env


def _effective_midmask(env: Mapping[str, str], wanted: Optional[str], cwd: Path) -> str:
    """The ``b4.midmask`` b4 will use with ``env`` (checked to be ``wanted``
    when given); also checks up front that git gives b4 an identity (b4 0.12
    exits 1 silently without user.email).  Either fails only where git
    ignores GIT_CONFIG_COUNT (older than 2.31)."""
    # in b4's own working directory (outside any repository): a repository's
    # local config must not change what is read here but not for b4
    proc = run(["git", "config", "--get-regexp", r"^(user\.email|b4\.midmask)$"], env=env, check=False,
               timeout=GIT_CONFIG_TIMEOUT, cwd=cwd)
    found: Dict[str, str] = {}
    for line in proc.stdout.splitlines():           # the last value wins, as for b4
        key, _, value = line.partition(" ")
        found[key.lower()] = value.strip()
    if not found.get("user.email"):
        raise UserError("b4 needs a git identity and this git ignores the one migstall passes (GIT_CONFIG_COUNT, "
                        "git >= 2.31); set git config --global user.name NAME and user.email ADDR, or upgrade git")
    if wanted is not None and found.get("b4.midmask") != wanted:
        raise UserError(f"this git ignores the lore URL migstall passes to b4 (GIT_CONFIG_COUNT, git >= 2.31); "
                        f"set git config --global b4.midmask '{wanted}' instead, or upgrade git")
    return found.get("b4.midmask") or DEFAULT_MIDMASK


def _host(midmask: str) -> Tuple[str, int]:
    parts = urllib.parse.urlsplit(midmask.replace("%s", "x"))
    try:
        port = parts.port
    except ValueError:
        port = None
    return parts.hostname or "?", port or (443 if parts.scheme == "https" else 80)


def _reachable(midmask: str) -> Optional[str]:
    """None if a TCP connection to the server can be made, else why not."""
    host, port = _host(midmask)
    try:
        with socket.create_connection((host, port), timeout=PROBE_TIMEOUT):
            return None
    except OSError as exc:
        return str(exc) or type(exc).__name__


def _run_b4(argv: List[str], env: Mapping[str, str], cwd: Path, logpath: Path, timeout: float) -> Optional[int]:
    """Run b4 with its output going to ``logpath``; its exit status, or None
    if it did not finish within ``timeout`` (it is then killed)."""
    with open(logpath, "w") as logfh:
        logfh.write(f"$ {shlex.join(argv)}\n")
        logfh.flush()
        proc = subprocess.Popen(argv, cwd=cwd, env=dict(env), stdin=subprocess.DEVNULL, stdout=logfh,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def _b4_failure(msgid: str, rc: Optional[int], midmask: str, logpath: Path, timeout: float) -> Exception:
    """What a failed ``b4 am`` means for the user."""
    text = logpath.read_text(errors="replace")
    inbox = midmask.replace("/%s", "").replace("%s", "")
    if rc is None:
        return KernelBuildInfraError(f"b4 am {msgid} did not finish within {timeout:g}s "
                                     f"(is {inbox} answering?)", log_path=logpath)
    if re.search(r"message-id is not known|No messages found for that query", text):
        return UserError(f"{inbox} has no message with Message-ID {msgid}; fix [series] message_id "
                         f"(or lore_url / --lore-url)")
    if re.search(r"^No patches found", text, re.M):
        return UserError(f"the thread of Message-ID {msgid} on {inbox} has no patches; "
                         f"fix [series] message_id (the cover letter or a patch of the series)")
    m = re.search(r"Server returned an error: (\d+)", text)
    if m:
        return KernelBuildInfraError(f"b4 am {msgid}: {inbox} answered HTTP {m.group(1)}", log_path=logpath)
    unreachable = _reachable(midmask)
    if unreachable is not None:
        host, port = _host(midmask)
        return KernelBuildInfraError(f"b4 am {msgid} failed: cannot reach {host}:{port} ({unreachable}; "
                                     f"no network?  a mirror can be set with [series] lore_url or --lore-url)",
                                     log_path=logpath)
    lines = [ln.strip() for ln in text.splitlines()[1:] if ln.strip()]
    last = lines[-1] if lines else "no output"
    return KernelBuildInfraError(f"b4 am {msgid} exited {rc}: {last}", log_path=logpath)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Redirects are reported (as HTTPError), not followed: b4 reads the Location."""

    def redirect_request(self, req: urllib.request.Request, fp: Any, code: int, msg: str, headers: Any,
                         newurl: str) -> None:
        return None


def _thread_url(midmask: str, msgid: str, timeout: float) -> str:
    """The thread mbox URL, resolved the way b4 resolves it: under ``/all/``
    directly, elsewhere from the redirect of ``midmask % msgid``."""
    qmsgid = urllib.parse.quote_plus(msgid)
    loc = urllib.parse.urlsplit(midmask)
    if loc.path.startswith("/all/"):
        return f"{loc.scheme}://{loc.netloc}/all/{qmsgid}/t.mbox.gz"
    opener = urllib.request.build_opener(_NoRedirect)
    try:
        resp = opener.open(urllib.request.Request(midmask % qmsgid, method="HEAD"), timeout=timeout)
        resp.close()
        location = resp.headers.get("Location", "")
    except urllib.error.HTTPError as exc:
        location = exc.headers.get("Location", "") if 300 <= exc.code < 400 else ""
    if not location:
        raise KernelBuildInfraError(f"{midmask % qmsgid} did not redirect to the thread as it did for b4")
    projurl = "/".join(urllib.parse.urljoin(midmask % qmsgid, location).rstrip("/").split("/")[:-1])
    return f"{projurl}/{qmsgid}/t.mbox.gz"


def _message_id(raw: bytes) -> str:
    headers = email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(raw)
    return " ".join(str(headers.get("Message-Id", "")).split()).strip("<>")


def _posted(msgid: str, b4_out: Path, midmask: str, timeout: float, logpath: Path) -> bytes:
    """The series as it was posted: the cover letter and the patches b4 chose,
    in b4's order, each message byte for byte as the server has it.  Later
    replies (reviews, trailers) do not change it, so neither does its hash."""
    wanted = []
    cover = b4_out / "series.cover"
    if cover.is_file():
        wanted.append(_message_id(cover.read_bytes()))
    box = mailbox.mbox(str(b4_out / "series.mbx"), create=False)
    try:
        wanted += [" ".join(str(m.get("Message-Id", "")).split()).strip("<>") for m in box]
    finally:
        box.close()
    url = _thread_url(midmask, msgid, timeout)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            data = gzip.decompress(resp.read())
    except (OSError, EOFError, ValueError) as exc:   # URLError, HTTPError, timeouts, bad gzip
        with open(logpath, "a") as fh:
            fh.write(f"\nfetching {url}: {exc}\n")
        raise KernelBuildInfraError(f"b4 fetched {msgid}, but reading the thread {url} failed: {exc}",
                                    log_path=logpath) from exc
    starts = [m.start() for m in _SEPARATOR.finditer(data)]
    chunks = [data[a:b] for a, b in zip(starts, starts[1:] + [len(data)])]
    by_id: Dict[str, bytes] = {}
    for chunk in chunks:
        by_id.setdefault(_message_id(chunk), chunk)
    missing = [w for w in wanted if w not in by_id]
    if not wanted or missing or "" in wanted:
        with open(logpath, "a") as fh:
            fh.write(f"\n{url}: b4 chose {wanted}; not in the thread: {missing}\n")
        raise KernelBuildInfraError(f"the thread {url} does not hold the messages b4 chose from it "
                                    f"(it changed meanwhile?); retry", log_path=logpath)
    out = b""
    for i, w in enumerate(wanted):
        chunk = by_id[w]
        if i < len(wanted) - 1:                        # keep the mbox separators valid
            chunk += b"\n" * (2 - len(chunk) + len(chunk.rstrip(b"\n")))
        out += chunk
    return out


def _from_message_id(spec: SeriesSpec, progress: Progress, lore_url: Optional[str],
                     timeout: float) -> Tuple[Path, str]:
    """Fetch the series with ``b4 am`` (from ``lore_url`` if given, else b4's
    configured ``b4.midmask``, else lore) and cache it by Message-ID."""
    msgid = spec.message_id or ""
    cache = message_id_cache(msgid)
    target = cache / "series.mbx"
    with file_lock(cache / "fetch.lock"):
        if target.is_file():
            return target, msgid
        if shutil.which("b4") is None:
            raise UserError("b4 is not installed, so the series cannot be fetched by Message-ID; "
                            "install it ('apt-get install b4' or 'pip install b4') or use [series] mbox")
        tmp = Path(tempfile.mkdtemp(prefix=".b4-", dir=cache))
        logpath = cache / "b4.log"
        try:
            wanted = f"{lore_url}/%s" if lore_url else None
            env = _b4_env(wanted, tmp)
            midmask = _effective_midmask(env, wanted, tmp)
            out = tmp / "out"
            out.mkdir()
            argv = ["b4", "am", "--no-cache", "-o", str(out), "-n", "series", msgid]
            log.info("b4 am %s from %s (log: %s)", msgid, midmask, logpath)
            with progress.task(f"b4 am {msgid}"):
                rc = _run_b4(argv, env, tmp, logpath, timeout)
            got = out / "series.mbx"
            if rc != 0 or not got.is_file() or got.stat().st_size == 0:
                raise _b4_failure(msgid, rc, midmask, logpath, timeout)
            posted = _posted(msgid, out, midmask, timeout, logpath)
            staged = tmp / "series.mbx"
            staged.write_bytes(posted)
            staged.replace(target)
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
            raise UserError(f"{f} is not a git format-patch file (no 'From ' line); "
                            "regenerate it with git format-patch")
        data += body if body.endswith(b"\n") else body + b"\n"
    digest = hashlib.sha256(data).hexdigest()
    cache = paths.cache_dir("kernel-series", "dir-" + digest[:16])
    target = cache / "series.mbx"
    if not target.is_file():
        tmp = cache / ".series.mbx.tmp"
        tmp.write_bytes(data)
        tmp.replace(target)
    return target, str(pdir)


def load_series(spec: SeriesSpec, progress: Optional[Progress] = None, *, lore_url: Optional[str] = None,
                timeout: float = B4_TIMEOUT) -> Series:
    """Fetch or read the series, check its patch count, hash it.  ``lore_url``
    (a checked URL, see :func:`harness.kernel.manifest.check_lore_url`)
    overrides ``spec.lore_url``; ``timeout`` bounds ``b4 am`` and each HTTP
    request of a Message-ID fetch."""
    progress = progress or Progress()
    if spec.kind == "message_id":
        mbox, origin = _from_message_id(spec, progress, lore_url or spec.lore_url, timeout)
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
