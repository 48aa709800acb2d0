"""The base tree: a shallow clone, a local tree, or a Debian source tarball.

Every kind ends up as a git repository in ``cache_dir("kernel-src", KEY)/repo``
whose work tree is checked out at the base commit and is never modified:
builds hard-link from it, and series are applied in separate worktrees.
Preparation happens in a temporary directory renamed into place, so an
interrupted preparation leaves nothing that looks ready.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from harness import paths
from harness.paths import sha256_file
from harness.errors import KernelBuildInfraError, UserError
from harness.kernel.manifest import BaseSpec
from harness.kernel.run import git, run
from harness.progress import Progress

log = logging.getLogger(__name__)

#: timeout of a shallow clone of a full kernel tree over the network, seconds
CLONE_TIMEOUT = 3600.0
#: where Debian's linux-source-X packages put their tarball
DEBIAN_SRC_DIR = Path("/usr/src")
READY = ".migstall-ready"


@dataclass(frozen=True)
class SourceTree:
    kind: str            # git | path | debian
    description: str     # what the user asked for, e.g. "debian:linux-source-6.1"
    repo: Path           # git repository; its work tree is the base, read-only by convention
    commit: str          # base commit id
    ref: str             # the ref as given (or the package name)
    version: str         # kernel version from the Makefile, e.g. 6.1.192
    key: str             # cache key of the prepared tree




def kernel_version(tree: Path) -> str:
    fields = {}
    try:
        head = (tree / "Makefile").read_text(errors="replace").splitlines()[:12]
    except OSError:
        return "unknown"
    for line in head:
        m = re.match(r"^(VERSION|PATCHLEVEL|SUBLEVEL|EXTRAVERSION)\s*=\s*(\S*)", line)
        if m:
            fields[m.group(1)] = m.group(2)
    if "VERSION" not in fields:
        return "unknown"
    v = f"{fields['VERSION']}.{fields.get('PATCHLEVEL', '0')}"
    if fields.get("SUBLEVEL") not in (None, "", "0"):
        v += f".{fields['SUBLEVEL']}"
    return v + fields.get("EXTRAVERSION", "")


def _commit_all(repo: Path) -> str:
    """Commit the work tree as it is (ignored files included: the tree is what
    it is), with a fixed identity and date."""
    git(["add", "-A", "-f", "."], repo=repo)
    git(["commit", "-q", "--no-verify", "-m", "migstall: imported base tree"], repo=repo)
    return git(["rev-parse", "HEAD"], repo=repo).stdout.strip()


def _finish(tmp: Path, final: Path) -> None:
    (tmp / READY).write_text("ok\n")
    try:
        os.rename(tmp, final)
    except OSError as exc:
        # someone else prepared the same key meanwhile: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
        if not (final / READY).exists():
            raise KernelBuildInfraError(f"could not move the prepared tree into {final}") from exc


def _load(final: Path, kind: str, description: str, ref: str, key: str) -> SourceTree:
    repo = final / "repo"
    commit = git(["rev-parse", "HEAD"], repo=repo).stdout.strip()
    return SourceTree(kind, description, repo, commit, ref, kernel_version(repo), key)


def _tmpdir(root: Path, key: str) -> Path:
    tmp = root / f".tmp-{key}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    return tmp


def _debian(spec: BaseSpec, progress: Progress) -> SourceTree:
    pkg = spec.debian_source or ""
    tarball = None
    for ext in ("tar.xz", "tar.gz", "tar.bz2"):
        cand = DEBIAN_SRC_DIR / f"{pkg}.{ext}"
        if cand.is_file():
            tarball = cand
            break
    if tarball is None:
        raise UserError(f"Debian source package {pkg}: no {DEBIAN_SRC_DIR}/{pkg}.tar.xz; "
                        f"install it with 'apt-get install {pkg}' (or use [base] git/path)")
    root = paths.cache_dir("kernel-src")
    with progress.task(f"hashing {tarball.name}"):
        key = "deb-" + sha256_file(tarball)[:16]
    final = root / key
    if (final / READY).exists():
        return _load(final, "debian", f"debian:{pkg}", pkg, key)
    tmp = _tmpdir(root, key)
    try:
        repo = tmp / "repo"
        repo.mkdir()
        with progress.task(f"extracting {tarball.name}"):
            run(["tar", "-xf", tarball, "-C", repo, "--strip-components=1"])
        with progress.task(f"importing {pkg} into git"):
            git(["init", "-q"], repo=repo)
            _commit_all(repo)
        _finish(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return _load(final, "debian", f"debian:{pkg}", pkg, key)


_NOT_FOUND = re.compile(r"couldn't find remote ref|not our ref|no such ref|unknown revision|"
                        r"not a tree object|invalid refspec|Could not find remote branch", re.I)


def _git_url(spec: BaseSpec, progress: Progress) -> SourceTree:
    url, ref = spec.git or "", spec.ref or ""
    key = "git-" + hashlib.sha256(f"{url}\0{ref}".encode()).hexdigest()[:16]
    root = paths.cache_dir("kernel-src")
    final = root / key
    if (final / READY).exists():
        return _load(final, "git", f"{url} {ref}", ref, key)
    tmp = _tmpdir(root, key)
    try:
        repo = tmp / "repo"
        repo.mkdir()
        git(["init", "-q"], repo=repo)
        with progress.task(f"shallow clone of {url} at {ref}"):
            proc = git(["fetch", "--depth", "1", "--no-tags", url, ref], repo=repo, timeout=CLONE_TIMEOUT,
                       check=False)
        if proc.returncode != 0:
            logpath = paths.cache_dir("kernel-src", "logs") / f"{key}-fetch.log"
            logpath.write_text(proc.stderr)
            if _NOT_FOUND.search(proc.stderr):
                raise UserError(f"base ref '{ref}' does not exist in {url}; fix [base] ref in the manifest")
            raise KernelBuildInfraError(f"git fetch {url} {ref} failed (network?)", log_path=logpath)
        with progress.task(f"checking out {ref}"):
            git(["checkout", "-q", "--detach", "FETCH_HEAD"], repo=repo)
        _finish(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return _load(final, "git", f"{url} {ref}", ref, key)


def _tree_fingerprint(tree: Path) -> str:
    h = hashlib.sha256(str(tree.resolve()).encode())
    for dirpath, dirnames, filenames in os.walk(tree):
        dirnames.sort()
        for name in sorted(filenames):
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except OSError:
                continue
            h.update(f"{dirpath}/{name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _local(spec: BaseSpec, progress: Progress) -> SourceTree:
    tree = Path(spec.path or "")
    if not (tree / "Makefile").is_file() or not (tree / "Kconfig").is_file():
        raise UserError(f"base path {tree} is not a kernel tree (no Makefile/Kconfig); fix [base] path or --source")
    root = paths.cache_dir("kernel-src")
    is_git = run(["git", "-C", tree, "rev-parse", "--is-inside-work-tree"], check=False).returncode == 0
    if is_git:
        ref = spec.ref or "HEAD"
        proc = git(["rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}"], repo=tree, check=False)
        if proc.returncode != 0:
            raise UserError(f"base ref '{ref}' does not exist in {tree}; fix [base] ref in the manifest")
        commit = proc.stdout.strip()
        key = "local-" + commit[:16]
        final = root / key
        if (final / READY).exists():
            return _load(final, "path", f"{tree} {ref}", ref, key)
        tmp = _tmpdir(root, key)
        try:
            with progress.task(f"checking out {tree} at {ref}"):
                run(["git", "clone", "-q", "--shared", "--no-checkout", tree.resolve(), tmp / "repo"])
                git(["checkout", "-q", "--detach", commit], repo=tmp / "repo")
            _finish(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return _load(final, "path", f"{tree} {ref}", ref, key)
    if spec.ref:
        raise UserError(f"base path {tree} is not a git tree, so ref '{spec.ref}' cannot be used; remove ref")
    with progress.task(f"scanning {tree}"):
        key = "dir-" + _tree_fingerprint(tree)[:16]
    final = root / key
    if (final / READY).exists():
        return _load(final, "path", str(tree), "", key)
    tmp = _tmpdir(root, key)
    try:
        with progress.task(f"importing {tree} into git"):
            run(["cp", "-a", f"{tree.resolve()}/.", tmp / "repo"])
            shutil.rmtree(tmp / "repo" / ".git", ignore_errors=True)
            git(["init", "-q"], repo=tmp / "repo")
            _commit_all(tmp / "repo")
        _finish(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return _load(final, "path", str(tree), "", key)


def parse_source_option(value: str) -> BaseSpec:
    """``--source``: ``DIR``, ``debian:PKG`` or ``URL#REF``."""
    if value.startswith("debian:"):
        return BaseSpec(kind="debian", debian_source=value.split(":", 1)[1])
    if "://" in value or value.startswith("git@"):
        url, sep, ref = value.partition("#")
        if not sep or not ref:
            raise UserError(f"--source {value}: a git URL needs a ref, as URL#REF (e.g. ...linux.git#v5.0-rc2)")
        return BaseSpec(kind="git", git=url, ref=ref)
    path, sep, ref = value.partition("#")
    return BaseSpec(kind="path", path=Path(path).expanduser(), ref=ref or None)


def prepare_source(spec: BaseSpec, progress: Optional[Progress] = None) -> SourceTree:
    """Make the base tree available (cached); see the module doc."""
    progress = progress or Progress()
    if spec.kind == "debian":
        return _debian(spec, progress)
    if spec.kind == "git":
        return _git_url(spec, progress)
    if spec.kind == "path":
        return _local(spec, progress)
    raise UserError(f"unknown base kind {spec.kind}")
