"""Series manifests: ``patches/<name>/series.toml``.

The schema is data (:data:`SCHEMA`): every table, its keys, their types and
whether they are required.  Unknown tables or keys are a :class:`UserError`
naming the key and the allowed ones, so a typo never silently changes a build.

Example::

    name = "migstall-dirtylog-tracepoints"
    description = "tracepoints around KVM dirty-log enable/disable"

    [base]                          # exactly one of git (+ ref), path (+ ref), debian_source
    debian_source = "linux-source-6.1"

    [series]                        # exactly one of message_id, mbox, patch_dir
    mbox = "series.mbox"            # relative to this file
    patches = 2                     # required with message_id; checked when given
    # lore_url = "https://lore.kernel.org/all"   # with message_id: a lore mirror for b4

    [build]
    config = "tiny"                 # tiny | defconfig | distro | PATH (relative to this file)
    fragments = ["kvm-host", "tracing", "virtual-host"]

    [toolchain]
    compiler = "gcc"                # tuxmake toolchain: gcc, gcc-8, clang, ...
    qemu = "7.2"                    # the QEMU of the era (informational)

    [verify]                        # what the patched kernel must show when booted
    events = ["kvm/kvm_migstall_dirty_log_enable"]
    markers = { "/sys/module/kvm/parameters/migstall_dirtylog_tracepoints" = "Y" }
"""

from __future__ import annotations

import sys
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple

from harness.errors import UserError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

#: table -> key -> (type, required, description).  "" is the top level.
SCHEMA: Dict[str, Dict[str, Tuple[type, bool, str]]] = {
    "": {
        "name": (str, True, "short name of the series"),
        "description": (str, True, "one line"),
        "base": (dict, True, "the tree the series applies to"),
        "series": (dict, True, "the patches"),
        "build": (dict, False, "base config and fragments"),
        "toolchain": (dict, False, "compiler and QEMU of the era"),
        "verify": (dict, False, "what the booted patched kernel exposes"),
    },
    "base": {
        "git": (str, False, "git URL to shallow-clone"),
        "ref": (str, False, "tag, branch or commit (with git or a git path)"),
        "path": (str, False, "a local kernel tree (git or plain)"),
        "debian_source": (str, False, "a Debian source package, e.g. linux-source-6.1"),
    },
    "series": {
        "message_id": (str, False, "cover letter Message-ID, fetched with b4 am"),
        "mbox": (str, False, "a local mbox file"),
        "patch_dir": (str, False, "a directory of *.patch files (git format-patch)"),
        "patches": (int, False, "expected number of patches (without the cover letter)"),
        "title": (str, False, "the series title"),
        "link": (str, False, "where the series was posted"),
        "lore_url": (str, False, "with message_id: the public-inbox b4 fetches from "
                                 "(default: b4.midmask from git config, else https://lore.kernel.org/all)"),
    },
    "build": {
        "config": (str, False, "tiny | defconfig | distro | PATH"),
        "fragments": (list, False, "harness fragment names or PATHs of kconfig fragments"),
    },
    "toolchain": {
        "compiler": (str, False, "tuxmake toolchain name (gcc, gcc-8, clang, ...)"),
        "qemu": (str, False, "QEMU version of the era (informational)"),
        "notes": (str, False, "free text"),
    },
    "verify": {
        "events": (list, False, "tracefs events SYSTEM/NAME the patched kernel exposes"),
        "markers": (dict, False, "PATH = expected content, read on the booted patched kernel"),
    },
}

DEFAULT_FRAGMENTS = ("kvm-host", "tracing", "virtual-host")


@dataclass(frozen=True)
class BaseSpec:
    kind: str                       # git | path | debian
    git: Optional[str] = None
    ref: Optional[str] = None
    path: Optional[Path] = None
    debian_source: Optional[str] = None

    def describe(self) -> str:
        if self.kind == "git":
            return f"{self.git} {self.ref}"
        if self.kind == "path":
            return f"{self.path}" + (f" {self.ref}" if self.ref else "")
        return f"debian:{self.debian_source}"


@dataclass(frozen=True)
class SeriesSpec:
    kind: str                       # message_id | mbox | patch_dir
    message_id: Optional[str] = None
    mbox: Optional[Path] = None
    patch_dir: Optional[Path] = None
    patches: Optional[int] = None
    title: str = ""
    link: str = ""
    lore_url: Optional[str] = None  # message_id only: where b4 looks the Message-ID up


@dataclass(frozen=True)
class Manifest:
    path: Path
    name: str
    description: str
    base: BaseSpec
    series: SeriesSpec
    config: str = "tiny"
    fragments: Tuple[str, ...] = DEFAULT_FRAGMENTS
    compiler: Optional[str] = None
    qemu: Optional[str] = None
    toolchain_notes: str = ""
    events: Tuple[str, ...] = ()
    markers: Tuple[Tuple[str, str], ...] = field(default_factory=tuple)

    @property
    def directory(self) -> Path:
        return self.path.parent


def _check_table(where: str, table: Mapping[str, Any], path: Path) -> None:
    schema = SCHEMA[where]
    label = f"[{where}]" if where else "the top level"
    for key, value in table.items():
        if key not in schema:
            allowed = ", ".join(sorted(schema))
            raise UserError(f"{path}: unknown key '{key}' in {label}; allowed keys: {allowed}")
        typ = schema[key][0]
        ok = isinstance(value, typ) and not (typ is int and isinstance(value, bool))
        if not ok:
            raise UserError(f"{path}: '{key}' in {label} must be a {typ.__name__}, "
                            f"not {type(value).__name__}; fix the manifest")
    for key, (_typ, required, doc) in schema.items():
        if required and key not in table:
            raise UserError(f"{path}: missing '{key}' in {label} ({doc}); add it to the manifest")


def _one_of(where: str, table: Mapping[str, Any], keys: Tuple[str, ...], path: Path) -> str:
    present = [k for k in keys if k in table]
    if len(present) != 1:
        got = ", ".join(present) if present else "none"
        raise UserError(f"{path}: [{where}] needs exactly one of {', '.join(keys)} (got {got}); fix the manifest")
    return present[0]


def check_lore_url(value: str, where: str) -> str:
    """A public-inbox URL (``https://lore.kernel.org/all`` or a mirror): http(s),
    a host, no query.  Returned without a trailing slash; b4 then looks up
    ``<url>/<Message-ID>/t.mbox.gz``.  Raises UserError naming ``where``."""
    url = value.strip()
    parts = urllib.parse.urlsplit(url) if url and not any(c.isspace() for c in url) else None
    if (parts is None or parts.scheme not in ("http", "https") or not parts.hostname
            or parts.query or parts.fragment):
        raise UserError(f"{where} {value!r} is not an http(s) URL of a public inbox; "
                        f"use one like https://lore.kernel.org/all")
    if "%" in url:
        raise UserError(f"{where} {value!r} contains '%' (b4 expands it); "
                        f"give the inbox URL without it, like https://lore.kernel.org/all")
    try:
        _ = parts.port          # urllib parses the port only when asked for it
    except ValueError as exc:
        raise UserError(f"{where} {value!r} has a bad port ({exc}); "
                        f"use a URL like https://lore.kernel.org/all") from exc
    return url.rstrip("/")


def _rel(path: Path, value: str) -> Path:
    p = Path(value).expanduser()
    return p if p.is_absolute() else (path.parent / p)


def load_manifest(path: "str | Path") -> Manifest:
    """Parse and validate a manifest.  Raises UserError (exit 2) on any problem."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"manifest {path} does not exist; pass --manifest patches/<name>/series.toml")
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not valid TOML ({' '.join(str(exc).split())}); fix the syntax") from exc
    path = path.resolve()
    _check_table("", data, path)
    for table in ("base", "series", "build", "toolchain", "verify"):
        if table in data:
            _check_table(table, data[table], path)

    b = data["base"]
    kind = _one_of("base", b, ("git", "path", "debian_source"), path)
    if kind == "debian_source" and "ref" in b:
        raise UserError(f"{path}: [base] ref does not apply to debian_source; remove it")
    if kind == "git" and "ref" not in b:
        raise UserError(f"{path}: [base] git needs a ref (tag, branch or commit); add ref = \"...\"")
    base = BaseSpec(kind="debian" if kind == "debian_source" else kind, git=b.get("git"), ref=b.get("ref"),
                    path=_rel(path, b["path"]) if kind == "path" else None,
                    debian_source=b.get("debian_source"))

    s = data["series"]
    skind = _one_of("series", s, ("message_id", "mbox", "patch_dir"), path)
    if skind == "message_id" and "patches" not in s:
        raise UserError(f"{path}: [series] message_id needs patches = N (the expected count); add it")
    if "patches" in s and s["patches"] < 1:
        raise UserError(f"{path}: [series] patches must be >= 1; fix the count")
    msgid = s.get("message_id")
    if msgid is not None:
        msgid = msgid.strip().strip("<>")
        if not msgid or any(c.isspace() for c in msgid):
            raise UserError(f"{path}: [series] message_id {s['message_id']!r} is not a Message-ID; "
                            f"fix it (e.g. 1547733331-16140-1-git-send-email-ann.zhuangyanying@huawei.com)")
    lore_url = s.get("lore_url")
    if lore_url is not None:
        if skind != "message_id":
            raise UserError(f"{path}: [series] lore_url applies only to message_id, not {skind}; remove it")
        lore_url = check_lore_url(lore_url, f"{path}: [series] lore_url")
    series = SeriesSpec(kind=skind, message_id=msgid, lore_url=lore_url,
                        mbox=_rel(path, s["mbox"]) if skind == "mbox" else None,
                        patch_dir=_rel(path, s["patch_dir"]) if skind == "patch_dir" else None,
                        patches=s.get("patches"), title=s.get("title", ""), link=s.get("link", ""))
    if series.mbox is not None and not series.mbox.is_file():
        raise UserError(f"{path}: series mbox {series.mbox} does not exist; fix [series] mbox")
    if series.patch_dir is not None and not series.patch_dir.is_dir():
        raise UserError(f"{path}: series patch_dir {series.patch_dir} does not exist; fix [series] patch_dir")

    build = data.get("build", {})
    fragments = build.get("fragments", list(DEFAULT_FRAGMENTS))
    if not all(isinstance(f, str) for f in fragments):
        raise UserError(f"{path}: [build] fragments must be a list of strings; fix the manifest")
    tc = data.get("toolchain", {})
    verify = data.get("verify", {})
    events = verify.get("events", [])
    if not all(isinstance(e, str) and e.count("/") == 1 for e in events):
        raise UserError(f"{path}: [verify] events must be strings SYSTEM/NAME, e.g. \"kvm/kvm_exit\"; fix the manifest")
    markers = verify.get("markers", {})
    if not all(isinstance(v, str) and k.startswith("/") for k, v in markers.items()):
        raise UserError(f"{path}: [verify] markers must map absolute paths to strings; fix the manifest")
    return Manifest(path=path, name=data["name"], description=data["description"], base=base, series=series,
                    config=build.get("config", "tiny"), fragments=tuple(fragments),
                    compiler=tc.get("compiler"), qemu=tc.get("qemu"), toolchain_notes=tc.get("notes", ""),
                    events=tuple(events), markers=tuple(sorted(markers.items())))
