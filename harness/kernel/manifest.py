"""Series manifests: ``patches/<name>/series.toml``.

The schema is data (:class:`ManifestFile` and its tables, pydantic models of
:mod:`harness.config_schema`): every table, its keys, their types and whether
they are required.  Unknown tables or keys are a :class:`UserError` naming the
key (with a "did you mean"), so a typo never silently changes a build.

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
from typing import Dict, List, Optional, Sequence, Tuple, Union

from pydantic import Field

from harness import config_schema as schema
from harness.config_schema import ConfigModel, optional
from harness.errors import UserError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

class BaseTable(ConfigModel):
    """``[base]``: the tree the series applies to."""

    git: Optional[str] = optional("git URL to shallow-clone")
    ref: Optional[str] = optional("tag, branch or commit (with git or a git path)")
    path: Optional[str] = optional("a local kernel tree (git or plain)")
    debian_source: Optional[str] = optional("a Debian source package, e.g. linux-source-6.1")


class SeriesTable(ConfigModel):
    """``[series]``: the patches."""

    message_id: Optional[str] = optional("cover letter Message-ID, fetched with b4 am")
    mbox: Optional[str] = optional("a local mbox file")
    patch_dir: Optional[str] = optional("a directory of *.patch files (git format-patch)")
    patches: Optional[int] = optional("expected number of patches (without the cover letter)")
    title: Optional[str] = optional("the series title")
    link: Optional[str] = optional("where the series was posted")
    lore_url: Optional[str] = optional("with message_id: the public-inbox b4 fetches from "
                                    "(default: b4.midmask from git config, else https://lore.kernel.org/all)")


class BuildTable(ConfigModel):
    """``[build]``: base config and fragments."""

    config: Optional[str] = optional("tiny | defconfig | distro | PATH")
    fragments: Optional[List[str]] = optional("harness fragment names or PATHs of kconfig fragments")


class ToolchainTable(ConfigModel):
    """``[toolchain]``: compiler and QEMU of the era."""

    compiler: Optional[str] = optional("tuxmake toolchain name (gcc, gcc-8, clang, ...)")
    qemu: Optional[str] = optional("QEMU version of the era (informational)")
    notes: Optional[str] = optional("free text")


class VerifyTable(ConfigModel):
    """``[verify]``: what the booted patched kernel exposes."""

    events: Optional[List[str]] = optional("tracefs events SYSTEM/NAME the patched kernel exposes")
    markers: Optional[Dict[str, str]] = optional("PATH = expected content, read on the booted patched kernel")


class ManifestFile(ConfigModel):
    """``series.toml`` as written (paths still relative to the file)."""

    name: str = Field(description="short name of the series")
    description: str = Field(description="one line")
    base: BaseTable = Field(description="the tree the series applies to")
    series: SeriesTable = Field(description="the patches")
    build: BuildTable = Field(default_factory=BuildTable, description="base config and fragments")
    toolchain: ToolchainTable = Field(default_factory=ToolchainTable, description="compiler and QEMU of the era")
    verify: VerifyTable = Field(default_factory=VerifyTable, description="what the booted patched kernel exposes")


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


def _one_of(where: str, table: ConfigModel, keys: Tuple[str, ...], path: Path) -> str:
    present = [k for k in keys if getattr(table, k) is not None]
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
    doc = schema.validate(ManifestFile, data, str(path))

    b = doc.base
    kind = _one_of("base", b, ("git", "path", "debian_source"), path)
    if kind == "debian_source" and b.ref is not None:
        raise UserError(f"{path}: [base] ref does not apply to debian_source; remove it")
    if kind == "git" and b.ref is None:
        raise UserError(f"{path}: [base] git needs a ref (tag, branch or commit); add ref = \"...\"")
    base = BaseSpec(kind="debian" if kind == "debian_source" else kind, git=b.git, ref=b.ref,
                    path=_rel(path, b.path) if b.path is not None and kind == "path" else None,
                    debian_source=b.debian_source)

    s = doc.series
    skind = _one_of("series", s, ("message_id", "mbox", "patch_dir"), path)
    if skind == "message_id" and s.patches is None:
        raise UserError(f"{path}: [series] message_id needs patches = N (the expected count); add it")
    if s.patches is not None and s.patches < 1:
        raise UserError(f"{path}: [series] patches must be >= 1; fix the count")
    msgid = s.message_id
    if msgid is not None:
        msgid = msgid.strip().strip("<>")
        if not msgid or any(c.isspace() for c in msgid):
            raise UserError(f"{path}: [series] message_id {s.message_id!r} is not a Message-ID; "
                            f"fix it (e.g. 1547733331-16140-1-git-send-email-ann.zhuangyanying@huawei.com)")
    lore_url = s.lore_url
    if lore_url is not None:
        if skind != "message_id":
            raise UserError(f"{path}: [series] lore_url applies only to message_id, not {skind}; remove it")
        lore_url = check_lore_url(lore_url, f"{path}: [series] lore_url")
    series = SeriesSpec(kind=skind, message_id=msgid, lore_url=lore_url,
                        mbox=_rel(path, s.mbox) if s.mbox is not None and skind == "mbox" else None,
                        patch_dir=_rel(path, s.patch_dir) if s.patch_dir is not None and skind == "patch_dir"
                        else None,
                        patches=s.patches, title=s.title or "", link=s.link or "")
    if series.mbox is not None and not series.mbox.is_file():
        raise UserError(f"{path}: series mbox {series.mbox} does not exist; fix [series] mbox")
    if series.patch_dir is not None and not series.patch_dir.is_dir():
        raise UserError(f"{path}: series patch_dir {series.patch_dir} does not exist; fix [series] patch_dir")

    build, tc, verify = doc.build, doc.toolchain, doc.verify
    fragments = build.fragments if build.fragments is not None else list(DEFAULT_FRAGMENTS)
    events = verify.events or []
    if not all(e.count("/") == 1 for e in events):
        raise UserError(f"{path}: [verify] events must be strings SYSTEM/NAME, e.g. \"kvm/kvm_exit\"; fix the manifest")
    markers = verify.markers or {}
    if not all(k.startswith("/") for k in markers):
        raise UserError(f"{path}: [verify] markers must map absolute paths to strings; fix the manifest")
    return Manifest(path=path, name=doc.name, description=doc.description, base=base, series=series,
                    config=build.config if build.config is not None else "tiny", fragments=tuple(fragments),
                    compiler=tc.compiler, qemu=tc.qemu, toolchain_notes=tc.notes or "",
                    events=tuple(events), markers=tuple(sorted(markers.items())))


#: the variants a manifest builds, in build order
VARIANTS = ("stock", "patched")


def build_request(manifest: "Union[Manifest, str, Path]", variants: Sequence[str]) -> "Tuple[Manifest, List[str]]":
    """The manifest (loaded if given as a path) and the variants in build order,
    stock first; UserError for a variant that is not one of :data:`VARIANTS`."""
    if not isinstance(manifest, Manifest):
        manifest = load_manifest(manifest)
    for v in variants:
        if v not in VARIANTS:
            raise UserError(f"variant {v} is not one of stock, patched, both")
    return manifest, sorted(set(variants), key=VARIANTS.index)
