"""KVM's modules for Debian's kernel, stock and patched, from a series manifest.

A whole kernel (:mod:`harness.kernel.build`) takes 3-4 minutes to build on this
2-core machine and 9 or more on slower ones.  A series that only changes KVM
can be measured without one: L1 boots the Debian kernel the virtual host
already uses (``harness.hosts.l1image.DEBIAN_KERNEL_PACKAGE``) and loads KVM
modules built from that kernel's own source, with or without the series.  This
module builds them (19 s for kvm, kvm-amd and kvm-intel here) and caches them by
content; ``migstall kernel build --target kvm-modules`` and ``--host
virtual:<out dir>`` use it.

The kit, fetched once per kernel package version with ``apt-get download``:

* ``linux-headers-<release>`` and ``linux-headers-<abi>-common`` (the config,
  ``Module.symvers`` and headers the kernel was built with) and
  ``linux-kbuild-6.1`` (modpost, fixdep, objtool);
* the KVM sources of ``linux-source-6.1`` **of the kernel's exact version**
  (``arch/x86/kvm``, ``virt/kvm`` and KVM's headers), so stock modules are
  Debian's own code, built again here.

Both variants are built the same way (unsigned, so both taint the kernel the
same way: ``module verification failed ... tainting kernel``); they differ
only by the series.  A series that changes a file outside :data:`SOURCE_PATHS`
is rejected before any work: it needs a whole kernel (``--target kernel``).
A header in :data:`SOURCE_PATHS` may change only what KVM's modules use
(``struct kvm_arch``, say); the built-in kernel keeps its unpatched copy.

Layout in ``cache_dir("kvm-modules")``::

    kit-<version>/           headers, kbuild and KVM sources (``.ready`` when complete)
    <key16>/out/             kvm.ko, kvm-amd.ko, kvm-intel.ko (debug info
                             stripped), build.log, metadata.json; written as
                             ``.out-*`` and renamed, so complete or absent
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Dict, List, Optional, Sequence, Tuple

from harness import paths
from harness.errors import CommandTimeout, HostError, KernelBuildInfraError, UserError
from harness.kernel.manifest import VARIANTS, Manifest, build_request
from harness.kernel.run import git, run, run_logged
from harness.kernel.series import B4_TIMEOUT, Series, load_series
from harness.progress import Progress
from harness.results import atomic_write_json

log = logging.getLogger(__name__)

TARGET = "kvm-modules"
#: bump when the recipe changes in a way that changes the modules
RECIPE = 1
#: the source files a series may change (directories end with "/")
SOURCE_PATHS = ("arch/x86/kvm/", "virt/kvm/", "arch/x86/include/asm/kvm_host.h",
                "arch/x86/include/asm/kvm_page_track.h", "include/linux/kvm_host.h",
                "include/linux/kvm_types.h", "include/trace/events/kvm.h")
#: the modules built; L1 loads kvm and kvm_amd, kvm-intel is built so that a
#: series' Intel-only code (PML, say) is compiled too
MODULES = ("kvm", "kvm-amd", "kvm-intel")
#: ``apt-get download`` of the kit: 14 MB of headers and 140 MB of source, 2 s
#: here from the package mirror; generous for a slow mirror
DOWNLOAD_TIMEOUT = 900.0
#: unpacking the kit (dpkg-deb, then KVM's files out of the source tarball): 8 s here
UNPACK_TIMEOUT = 600.0
#: the modules' build: 19 s here on 2 cores, so 30x margin for a slow, busy machine
BUILD_TIMEOUT = 600.0
COMPILER = "gcc-12"          # what Debian 12's kernel was built with (its headers' Makefile says so)


@dataclass(frozen=True)
class ModulesBuild:
    """KVM modules for one Debian kernel release; ``out`` is what ``--host
    virtual:<out>`` takes."""

    variant: str                 # stock | patched
    release: str                 # `uname -r` of the Debian kernel they load into
    out: Path
    modules: Tuple[Tuple[str, Path], ...]   # (module name with "_", .ko) as L1 loads them
    metadata: Path
    duration_s: float
    cached: bool
    series_id: str = ""

    def as_json(self) -> Dict[str, object]:
        return {"target": TARGET, "variant": self.variant, "release": self.release, "out": str(self.out),
                "modules": {n: str(p) for n, p in self.modules}, "metadata": str(self.metadata),
                "duration_s": self.duration_s, "cached": self.cached}


@dataclass(frozen=True)
class _Kit:
    root: Path                   # kit-<version>/
    release: str
    version: str                 # the Debian package version, e.g. 6.1.192-2

    @property
    def headers(self) -> str:
        return f"usr/src/linux-headers-{self.release}"

    @property
    def common(self) -> str:
        abi = self.release.rsplit("-", 1)[0]
        return f"usr/src/linux-headers-{abi}-common"


# -- reading a build back ------------------------------------------------------------------

def is_modules_dir(path: Path) -> bool:
    meta = Path(path) / "metadata.json"
    if not meta.is_file():
        return False
    try:
        return json.loads(meta.read_text()).get("target") == TARGET
    except (OSError, ValueError):
        return False


def load_build(out: Path, *, cached: bool = True) -> ModulesBuild:
    """A finished build's ``out`` directory (as ``--host virtual:<out>`` names it)."""
    out = Path(out)
    meta_path = out / "metadata.json"
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{out} is not a kvm-modules build (no readable metadata.json); "
                        f"build one with `migstall kernel build --target kvm-modules`") from exc
    if meta.get("target") != TARGET:
        raise UserError(f"{out} is not a kvm-modules build (its metadata.json says target "
                        f"{meta.get('target')!r}); pass a bzImage or `migstall kernel build --target kvm-modules`'s "
                        f"output directory")
    mods = tuple((m["name"], out / m["file"]) for m in meta.get("modules", []))
    missing = [str(p) for _, p in mods if not p.is_file()]
    if missing or not mods:
        raise UserError(f"{out}: modules missing ({', '.join(missing) or 'none listed'}); build it again")
    series = meta.get("series") or {}
    return ModulesBuild(variant=meta["variant"], release=meta["release"], out=out, modules=mods,
                        metadata=meta_path, duration_s=float(meta.get("duration_s", 0.0)), cached=cached,
                        series_id=str(series.get("sha256", "")) if meta["variant"] == "patched" else "")


def list_builds() -> List[dict]:
    """Metadata of every complete cached kvm-modules build, newest first (the
    keys of :func:`harness.kernel.build.list_builds`, with ``out`` for ``bzimage``)."""
    found = []
    for meta in paths.cache_dir("kvm-modules").glob("*/out/metadata.json"):
        try:
            data = json.loads(meta.read_text())
        except (OSError, ValueError):
            continue
        found.append({"target": TARGET, "variant": data.get("variant"), "release": data.get("release"),
                      "manifest": data.get("manifest", {}).get("name"), "out": str(meta.parent),
                      "metadata": str(meta), "duration_s": data.get("duration_s"), "started": data.get("started")})
    found.sort(key=lambda d: d.get("started") or "", reverse=True)
    return found


# -- the kit -------------------------------------------------------------------------------

def _apt_version(package: str) -> str:
    try:
        out = subprocess.run(["apt-cache", "show", "--no-all-versions", package], capture_output=True,
                             text=True, timeout=60)
    except FileNotFoundError as exc:
        raise UserError("apt-cache not found; --target kvm-modules needs a Debian machine") from exc
    except subprocess.TimeoutExpired as exc:
        raise CommandTimeout(f"apt-cache show {package} did not finish within 60s") from exc
    m = re.search(r"^Version: (\S+)$", out.stdout, re.M)
    if out.returncode != 0 or not m:
        raise HostError(f"apt knows no package {package} (apt-cache show: {out.stderr.strip()[-200:]}); "
                        f"run `apt-get update`")
    return m.group(1)


def _download(packages: Sequence[str], dest: Path) -> None:
    try:
        proc = subprocess.run(["apt-get", "download", *packages], cwd=dest, capture_output=True, text=True,
                              timeout=DOWNLOAD_TIMEOUT)
    except FileNotFoundError as exc:
        raise UserError("apt-get not found; --target kvm-modules needs a Debian machine") from exc
    except subprocess.TimeoutExpired as exc:
        raise CommandTimeout(f"apt-get download did not finish within {DOWNLOAD_TIMEOUT:g}s") from exc
    if proc.returncode != 0:
        raise HostError(f"apt-get download {' '.join(packages)} failed: {proc.stderr.strip()[-300:]}")


def _one(directory: Path, pattern: str) -> Path:
    found = sorted(directory.glob(pattern))
    if len(found) != 1:
        raise HostError(f"expected one {pattern} in {directory}, found {len(found)}")
    return found[0]


def _kit(release: str, progress: Progress) -> _Kit:
    """Headers, kbuild and KVM's sources of the Debian kernel ``release``, once."""
    abi = release.rsplit("-", 1)[0]
    version = _apt_version(f"linux-image-{release}")
    series = ".".join(version.split(".")[:2])            # 6.1
    root = paths.cache_dir("kvm-modules")
    kit = _Kit(root / f"kit-{version}", release, version)
    with paths.file_lock(root / f".kit-{version}.lock"):
        if (kit.root / ".ready").exists():
            return kit
        shutil.rmtree(kit.root, ignore_errors=True)
        with tempfile.TemporaryDirectory(dir=root, prefix=".kit-") as tmp_s:
            tmp = Path(tmp_s)
            debs = tmp / "debs"
            debs.mkdir()
            with progress.task(f"kvm-modules: downloading headers and source of {release} ({version})"):
                _download([f"linux-headers-{release}={version}", f"linux-headers-{abi}-common={version}",
                           f"linux-kbuild-{series}", f"linux-source-{series}={version}"], debs)
            unpacked = tmp / "kit"
            with progress.task(f"kvm-modules: unpacking the kit of {release}"):
                for deb in debs.glob("*.deb"):
                    if not deb.name.startswith(f"linux-source-{series}_"):
                        run(["dpkg-deb", "-x", deb, unpacked], timeout=UNPACK_TIMEOUT)
                src = tmp / "src"
                run(["dpkg-deb", "-x", _one(debs, f"linux-source-{series}_*.deb"), src], timeout=UNPACK_TIMEOUT)
                tarball = _one(src / "usr/src", f"linux-source-{series}.tar.*")
                top = f"linux-source-{series}"
                wanted = [f"{top}/{p.rstrip('/')}" for p in SOURCE_PATHS]
                run(["tar", "-xf", tarball, "-C", tmp, *wanted], timeout=UNPACK_TIMEOUT)
                os.rename(tmp / top, unpacked / "kvm-src")
            if not (unpacked / kit.headers / ".config").is_file():
                raise HostError(f"linux-headers-{release} unpacked without a .config under {kit.headers}")
            os.rename(unpacked, kit.root)
        (kit.root / ".ready").write_text(version + "\n")
    return kit


# -- the build -----------------------------------------------------------------------------

def _changed_files(series: Series) -> List[str]:
    text = series.am_mbox.read_text(errors="replace")
    return sorted({m.group(2) for m in re.finditer(r"^diff --git a/(\S+) b/(\S+)$", text, re.M)})


def check_series(series: Series) -> List[str]:
    """The files the series changes; UserError when one is outside :data:`SOURCE_PATHS`."""
    files = _changed_files(series)
    outside = [f for f in files if not any(f == p or (p.endswith("/") and f.startswith(p))
                                           for p in SOURCE_PATHS)]
    if outside:
        raise UserError(f"series {series.origin} changes {', '.join(outside[:3])}"
                        f"{' ...' if len(outside) > 3 else ''}, outside KVM's modules; "
                        f"build a whole kernel instead (--target kernel)")
    return files


def _key(kit: _Kit, variant: str, series: Series, compiler: str) -> str:
    inputs = {"recipe": RECIPE, "release": kit.release, "version": kit.version, "compiler": compiler,
              "series": series.sha256 if variant == "patched" else None}
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def _compiler_version() -> str:
    try:
        out = run([COMPILER, "--version"], timeout=60).stdout
    except KernelBuildInfraError as exc:
        raise UserError(f"{COMPILER} not found; install it (apt-get install {COMPILER}; make setup does)") from exc
    return out.splitlines()[0].strip()


def _workspace(kit: _Kit, work: Path, series: Optional[Series]) -> Tuple[Path, Path]:
    """A writable tree: the kit's headers hard-linked, KVM's sources copied
    (and patched) into the headers' source tree.  Returns (objtree, M dir)."""
    run(["cp", "-al", kit.root / "usr", work / "usr"], timeout=UNPACK_TIMEOUT)
    src = work / "kvm-src"
    shutil.copytree(kit.root / "kvm-src", src)
    if series is not None:
        git(["init", "-q"], repo=src)
        git(["add", "-A"], repo=src)
        git(["commit", "-q", "-m", f"linux-source {kit.version}: KVM's files"], repo=src)
        proc = git(["am", "--committer-date-is-author-date", series.am_mbox], repo=src, check=False)
        if proc.returncode != 0:
            m = re.search(r"Patch failed at (\d+) (.*)", proc.stdout + proc.stderr)
            where = f"patch {m.group(1)} '{m.group(2).strip()}'" if m else "a patch"
            raise UserError(f"series {series.origin}: {where} does not apply to the KVM sources of "
                            f"linux-source {kit.version}; rebase the series")
        shutil.rmtree(src / ".git")
    common = work / kit.common
    for rel in SOURCE_PATHS:
        s, d = src / rel.rstrip("/"), common / rel.rstrip("/")
        if not s.exists():
            continue
        if d.is_dir():
            shutil.rmtree(d)
        elif d.exists():
            d.unlink()                 # a hard link into the kit: never written through
        d.parent.mkdir(parents=True, exist_ok=True)
        if s.is_dir():
            shutil.copytree(s, d)
        else:
            shutil.copy2(s, d)
    objtree = work / kit.headers
    makefile = objtree / "Makefile"
    makefile.unlink()
    makefile.write_text(f"include {common}/Makefile\n")
    return objtree, common / "arch/x86/kvm"


def _make(objtree: Path, mdir: Path, jobs: int, logfh: IO[str]) -> int:
    argv = ["make", "-C", str(objtree), f"M={mdir}", f"-j{jobs}", "modules"]
    return run_logged(argv, logfh, None, time.monotonic() + BUILD_TIMEOUT, "the kvm-modules build", BUILD_TIMEOUT)


def _build_one(manifest: Manifest, kit: _Kit, variant: str, series: Series, compiler: str,
               jobs: int, progress: Progress) -> ModulesBuild:
    key = _key(kit, variant, series, compiler)
    bdir = paths.cache_dir("kvm-modules") / key[:16]
    out = bdir / "out"
    with paths.file_lock(bdir.parent / f".{key[:16]}.lock"):
        if (out / "metadata.json").is_file():
            return load_build(out, cached=True)
        t0 = time.monotonic()
        bdir.mkdir(parents=True, exist_ok=True)
        tmp_out = bdir / f".out-{uuid.uuid4().hex[:8]}"
        tmp_out.mkdir()
        work = Path(tempfile.mkdtemp(dir=bdir, prefix=".work-"))
        try:
            objtree, mdir = _workspace(kit, work, series if variant == "patched" else None)
            build_log = tmp_out / "build.log"
            with open(build_log, "w") as logfh, progress.task(
                    f"{variant}: building KVM's modules for {kit.release} (-j{jobs})"):
                rc = _make(objtree, mdir, jobs, logfh)
            if rc != 0:
                kept = paths.cache_dir("kvm-modules", "logs") / f"{key[:16]}-{variant}-{int(time.time())}.log"
                shutil.copyfile(build_log, kept)
                if rc < 0:
                    raise KernelBuildInfraError(f"{variant} kvm-modules build was killed by signal {-rc}",
                                                log_path=kept)
                raise UserError(f"{variant} kvm-modules build failed (make exited {rc}); see the log {kept}")
            mods = []
            for name in MODULES:
                ko = mdir / f"{name}.ko"
                if not ko.is_file():
                    raise KernelBuildInfraError(f"the build finished but produced no {ko.name}",
                                                log_path=build_log)
                run(["strip", "--strip-debug", "-o", tmp_out / ko.name, ko], timeout=120)
                mods.append({"name": name.replace("-", "_"), "file": ko.name,
                             "sha256": paths.sha256_file(tmp_out / ko.name)})
            duration = time.monotonic() - t0
            meta = {
                "schema": 1, "target": TARGET, "variant": variant, "release": kit.release, "cache_key": key,
                "duration_s": round(duration, 2),
                "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - duration)),
                "kernel": {"package": f"linux-image-{kit.release}", "version": kit.version},
                "source": {"package": f"linux-source-{'.'.join(kit.version.split('.')[:2])}",
                           "version": kit.version, "paths": list(SOURCE_PATHS)},
                "manifest": {"path": str(manifest.path), "name": manifest.name,
                             "sha256": paths.sha256_file(manifest.path)},
                "series": {"kind": series.kind, "origin": series.origin, "sha256": series.sha256,
                           "count": series.count, "subjects": list(series.subjects),
                           "applied": variant == "patched",
                           "changed_files": _changed_files(series) if variant == "patched" else []},
                "compiler": compiler, "jobs": jobs,
                "modules": mods,
                "markers": [list(m) for m in manifest.markers] if variant == "patched" else [],
                "reproducer": f"migstall kernel build --manifest {manifest.path} --variant {variant} "
                              f"--target {TARGET}",
            }
            atomic_write_json(tmp_out / "metadata.json", meta)
            shutil.rmtree(out, ignore_errors=True)
            os.rename(tmp_out, out)
        finally:
            shutil.rmtree(tmp_out, ignore_errors=True)
            shutil.rmtree(work, ignore_errors=True)
        log.info("%s kvm-modules for %s built in %.1fs: %s", variant, kit.release, duration, out)
        return load_build(out, cached=False)


def build_modules(manifest: "Manifest | str | Path", variants: Sequence[str] = VARIANTS,
                  progress: Optional[Progress] = None, *, release: Optional[str] = None,
                  jobs: Optional[int] = None, lore_url: Optional[str] = None,
                  fetch_timeout: float = B4_TIMEOUT) -> List[ModulesBuild]:
    """Build (or fetch from the cache) KVM's modules for Debian's kernel
    ``release`` (default: the virtual host's), stock first."""
    progress = progress or Progress()
    manifest, ordered = build_request(manifest, variants)
    if manifest.base.kind != "debian" or not (manifest.base.debian_source or "").startswith("linux-source-"):
        raise UserError(f"{manifest.path}: --target {TARGET} builds against Debian's kernel, so [base] must be "
                        f"debian_source = \"linux-source-X.Y\" (it is {manifest.base.describe()})")
    if release is None:
        from harness.hosts.l1image import DEBIAN_KERNEL_PACKAGE

        release = DEBIAN_KERNEL_PACKAGE[len("linux-image-"):]
    want = manifest.base.debian_source[len("linux-source-"):]          # type: ignore[index]
    if not release.startswith(want + "."):
        raise UserError(f"{manifest.path}: the base is linux-source-{want} but the kernel is {release}; "
                        f"--target {TARGET} needs the same kernel series")
    series = load_series(manifest.series, progress, lore_url=lore_url, timeout=fetch_timeout)
    if "patched" in variants:
        check_series(series)                     # before any download
    compiler = _compiler_version()
    jobs = jobs or os.cpu_count() or 1
    kit = _kit(release, progress)
    return [_build_one(manifest, kit, v, series, compiler, jobs, progress)
            for v in ordered]
