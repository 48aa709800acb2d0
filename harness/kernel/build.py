"""Build stock and patched kernels from one manifest; cache by content.

Public API (used by the CLI, the virtual host and the nightly run)::

    build_kernel(manifest, variant, config=None, progress=None, *, source=None,
                 builder="auto", jobs=None) -> KernelBuild
    build_kernels(manifest, variants=("stock", "patched"), ..., lore_url=None,
                  fetch_timeout=B4_TIMEOUT) -> list[KernelBuild]
    list_builds() -> list[dict]            # metadata of every cached build

A build is identified by a sha256 over its inputs (base tree id, series tree
id, config digest, toolchain, LOCALVERSION, recipe version): the same inputs
give the cached artifacts back (``cached=True``) without running anything.

Layout in ``cache_dir("kernel-builds")``:

* ``<key16>/out/``   bzImage, config, System.map, modules.tar.xz (if modules),
                     build.log, metadata.json; created as ``.out-*`` and renamed,
                     so ``out/`` is complete or absent;
* ``<key16>/tree/``  for the first stock build of a (base, config, toolchain):
                     sources hard-linked from the base repo, objects in
                     ``tree/.b`` (``O=.b``); ``stock-objects/<objkey>`` points
                     at it and it is kept for reuse.

The patched variant reuses the stock objects: the stock tree is moved aside,
a copy of it is made AT THE SAME PATH (kbuild command lines and tools/objtool
record absolute paths, so a copy elsewhere would rebuild everything), the
files the series changes are written as new inodes (the base is never
written), the kernel is rebuilt (only what the series touches is compiled,
then vmlinux is relinked), and the stock tree is put back.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import resource
import shlex
import shutil
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

from harness import paths
from harness.paths import file_lock, sha256_file
from harness.errors import KernelBuildInfraError, UserError
from harness.kernel.apply import apply_series
from harness.kernel.config import ConfigPlan, missing_options, resolve_config
from harness.kernel.manifest import VARIANTS, BaseSpec, Manifest, build_request
from harness.kernel.run import git, run, run_logged
from harness.kernel.series import B4_TIMEOUT, Series, load_series
from harness.kernel.source import SourceTree, prepare_source
from harness.kernel.toolchain import Toolchain, resolve_toolchain, tuxmake_path
from harness.progress import Progress
from harness.results import atomic_write_json

log = logging.getLogger(__name__)

#: bump when the build recipe changes in a way that changes artifacts
RECIPE = 2
#: timeout of one kernel build (cold, defconfig, slow shared machine), seconds
BUILD_TIMEOUT = 4 * 3600.0
OBJDIR = ".b"
ARCH = "x86_64"


@dataclass(frozen=True)
class KernelBuild:
    variant: str                 # stock | patched
    release: str                 # `uname -r` of the built kernel
    bzimage: Path
    metadata: Path               # metadata.json next to the artifacts
    duration_s: float            # wall time of the build that produced the artifacts
    cached: bool                 # True: nothing was built by this call
    config: Path                 # the final .config
    system_map: Path
    modules: Optional[Path]      # modules.tar.xz, if the config has modules
    build_log: Path
    series_hash: str             # sha256 of the series mbox
    key: str                     # cache key

    def as_json(self) -> dict:
        return {"variant": self.variant, "release": self.release, "bzimage": str(self.bzimage),
                "metadata": str(self.metadata), "duration_s": round(self.duration_s, 1),
                "cached": self.cached}


@dataclass(frozen=True)
class _Plan:
    manifest: Manifest
    config: ConfigPlan
    toolchain: Toolchain
    jobs: int


def localversion(variant: str, series: Series) -> str:
    return f"-migstall-{variant}-{series.hash8}"






def _tree_id(source: SourceTree, commit: str) -> str:
    return git(["rev-parse", f"{commit}^{{tree}}"], repo=source.repo).stdout.strip()


def _key(plan: _Plan, tree_id: str, lv: str) -> str:
    inputs = {"recipe": RECIPE, "arch": ARCH, "tree": tree_id, "config": plan.config.digest,
              "toolchain": plan.toolchain.as_dict(), "localversion": lv}
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def _stock_objects_key(plan: _Plan, base_tree: str) -> str:
    """Where a patched build looks for the stock objects: same base, config, toolchain."""
    inputs = {"recipe": RECIPE, "arch": ARCH, "tree": base_tree, "config": plan.config.digest,
              "toolchain": plan.toolchain.as_dict()}
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]


# -- trees ------------------------------------------------------------------------

def _link_tree(src: Path, dst: Path) -> None:
    """Hard-link the work tree of ``src`` (without .git) into ``dst``."""
    dst.mkdir(parents=True)
    entries = [src / e for e in sorted(os.listdir(src)) if e not in (".git", OBJDIR)]
    if entries:
        run(["cp", "-al", *entries, dst], timeout=600)


def _write_changes(source: SourceTree, base: str, patched: str, tree: Path) -> List[str]:
    """Make ``tree`` (a hard-linked base) the patched tree: changed files become
    new inodes (the base is never written), deleted files are removed."""
    out = git(["diff", "--name-status", "-z", "--no-renames", base, patched], repo=source.repo).stdout
    fields = out.split("\0")
    changed = []
    for status, rel in zip(fields[0::2], fields[1::2]):
        if not rel:
            continue
        target = tree / rel
        if status.startswith("D"):
            target.unlink(missing_ok=True)
        else:
            mode = git(["ls-tree", patched, "--", rel], repo=source.repo).stdout.split()[0]
            blob = subprocess.run(["git", "-C", str(source.repo), "cat-file", "blob", f"{patched}:{rel}"],
                                  capture_output=True, check=True, timeout=60).stdout
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.migstall-tmp")
            tmp.write_bytes(blob)
            os.chmod(tmp, 0o755 if mode == "100755" else 0o644)
            os.replace(tmp, target)
        changed.append(f"{status} {rel}")
    return changed


# -- builders ---------------------------------------------------------------------

def _tuxmake_argv(plan: _Plan, tree: Path, outdir: Path, lv: str) -> List[str]:
    tc = plan.toolchain
    argv = [tuxmake_path() or "tuxmake", "--runtime", tc.runtime, "--target-arch", ARCH,
            "--directory", str(tree), "--build-dir", str(tree / OBJDIR), "--output-dir", str(outdir),
            "--jobs", str(plan.jobs), "--kconfig", plan.config.base]
    if tc.runtime != "null" or tc.compiler != "gcc":
        argv += ["--toolchain", tc.compiler]
    for frag in plan.config.fragments:
        argv += ["--kconfig-add", str(frag)]
    # tuxmake's default KCFLAGS (-ffile-prefix-map=<abs build dir>/=) would put
    # the build dir's absolute path into every command line, so a copied object
    # tree would rebuild everything; kbuild's paths are relative here (O=.b).
    argv += ["--environment", "KCFLAGS=", f"LOCALVERSION={lv}", "config", "kernel", "modules"]
    return argv


def _make_cmds(plan: _Plan, tree: Path, lv: str) -> List[List[str]]:
    make = ["make", "-C", str(tree), f"O={OBJDIR}", f"ARCH={ARCH}", f"-j{plan.jobs}", f"LOCALVERSION={lv}"]
    if plan.toolchain.compiler != "gcc":
        make.append(f"CC={plan.toolchain.compiler}")
    cmds: List[List[str]] = []
    if Path(plan.config.base).is_file():
        cmds.append(["cp", plan.config.base, str(tree / OBJDIR / ".config")])
    else:
        cmds.append(make + [plan.config.base])
    if plan.config.fragments:
        cmds.append(["env", f"ARCH={ARCH}", str(tree / "scripts/kconfig/merge_config.sh"), "-m", "-O",
                     str(tree / OBJDIR), str(tree / OBJDIR / ".config"), *map(str, plan.config.fragments)])
    cmds.append(make + ["olddefconfig"])
    cmds.append(make + ["bzImage", "modules"])
    return cmds


def _collect(plan: _Plan, tree: Path, outdir: Path) -> Dict[str, Path]:
    obj = tree / OBJDIR
    arts: Dict[str, Path] = {}
    bz = obj / "arch/x86/boot/bzImage"
    if not bz.is_file():
        raise KernelBuildInfraError("the build finished but produced no bzImage")
    for name, src in (("bzImage", bz), ("config", obj / ".config"), ("System.map", obj / "System.map")):
        dst = outdir / name
        if not dst.exists():
            shutil.copy2(src, dst)
        arts[name] = dst
    tux_meta = outdir / "metadata.json"
    if tux_meta.exists():
        tux_meta.rename(outdir / "tuxmake-metadata.json")
    mods = sorted(outdir.glob("modules.tar*"))
    if mods:
        arts["modules"] = mods[0]
    elif plan.toolchain.builder == "make" and "CONFIG_MODULES=y" in (obj / ".config").read_text():
        inst = obj / "modinstall"
        shutil.rmtree(inst, ignore_errors=True)
        run(["make", "-C", tree, f"O={OBJDIR}", f"ARCH={ARCH}", "INSTALL_MOD_STRIP=1",
             f"INSTALL_MOD_PATH={inst}", "modules_install"], timeout=1800)
        if (inst / "lib").is_dir():
            run(["tar", "-cJf", outdir / "modules.tar.xz", "-C", inst, "lib"], timeout=1800)
            arts["modules"] = outdir / "modules.tar.xz"
    return arts


# -- the pipeline -----------------------------------------------------------------

def _plan(manifest: Manifest, config: Optional[str], builder: str, jobs: Optional[int]) -> _Plan:
    cfg = resolve_config(config or manifest.config, manifest.fragments, manifest.directory)
    tc = resolve_toolchain(manifest.compiler, builder)
    return _Plan(manifest, cfg, tc, jobs or os.cpu_count() or 2)


def _from_out(out: Path, cached: bool) -> KernelBuild:
    meta = json.loads((out / "metadata.json").read_text())
    mods = out / meta["artifacts"]["modules"]["file"] if "modules" in meta["artifacts"] else None
    return KernelBuild(variant=meta["variant"], release=meta["release"], bzimage=out / "bzImage",
                       metadata=out / "metadata.json", duration_s=float(meta["duration_s"]), cached=cached,
                       config=out / "config", system_map=out / "System.map", modules=mods,
                       build_log=out / "build.log", series_hash=meta["series"]["sha256"], key=meta["cache_key"])


def _reproducer(manifest: Manifest, variant: str, config_label: str, source: Optional[BaseSpec]) -> str:
    argv = ["migstall", "kernel", "build", "--manifest", str(manifest.path), "--variant", variant,
            "--config", config_label]
    if source is not None:
        argv += ["--source", source.describe().replace(" ", "#") if source.kind == "git"
                 else (f"debian:{source.debian_source}" if source.kind == "debian" else str(source.path))]
    return shlex.join(argv)


def _objects_tree(root: Path, objkey: str) -> Optional[Path]:
    """The stock object tree for (base, config, toolchain), if one was built.
    A patched build interrupted before restoring it is repaired here."""
    pointer = root / "stock-objects" / objkey
    if not pointer.is_symlink():
        return None
    tree = Path(os.readlink(pointer))
    keep = tree.with_name(tree.name + ".stock-keep")
    if keep.is_dir():
        shutil.rmtree(tree, ignore_errors=True)
        os.rename(keep, tree)
    return tree if (tree / OBJDIR / ".config").is_file() else None


def _set_objects_tree(root: Path, objkey: str, tree: Path) -> None:
    pointer = root / "stock-objects" / objkey
    pointer.parent.mkdir(parents=True, exist_ok=True)
    tmp_link = pointer.with_name(f".{objkey}-{uuid.uuid4().hex[:6]}")
    os.symlink(tree, tmp_link)
    os.replace(tmp_link, pointer)


def _build_one(plan: _Plan, variant: str, src: SourceTree, series: Series, commit: str,
               progress: Progress, source_override: Optional[BaseSpec]) -> KernelBuild:
    """Build one variant, or return it from the cache.

    Object reuse: the first stock build for a (base, config, toolchain) leaves
    its tree in place and ``stock-objects/<objkey>`` points at it.  Later stock
    builds (other series, so other LOCALVERSIONs) rebuild in it; a patched
    build moves it aside, builds in a copy AT THE SAME PATH (kbuild and
    tools/objtool record absolute paths, so only the same path reuses
    objects), then puts the stock tree back.
    """
    lv = localversion(variant, series)
    tree_id = _tree_id(src, commit)
    base_tree = _tree_id(src, src.commit)
    key = _key(plan, tree_id, lv)
    objkey = _stock_objects_key(plan, base_tree)
    root = paths.cache_dir("kernel-builds")
    bdir = root / key[:16]
    out = bdir / "out"
    with file_lock(root / f"objects-{objkey}.lock"):
        if (out / "metadata.json").is_file():
            return _from_out(out, cached=True)
        objects = _objects_tree(root, objkey)
        started = time.time()
        t0 = time.monotonic()
        ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        keep: Optional[Path] = None
        fresh = objects is None
        tree = bdir / "tree" if fresh else objects
        assert tree is not None
        changed: List[str] = []
        with progress.task(f"{variant}: preparing the tree"):
            if fresh:
                shutil.rmtree(tree, ignore_errors=True)
                _link_tree(src.repo, tree)
                (tree / OBJDIR).mkdir()
            elif variant == "patched":
                keep = tree.with_name(tree.name + ".stock-keep")
                os.rename(tree, keep)
                _link_tree(src.repo, tree)
                run(["cp", "-a", keep / OBJDIR, tree / OBJDIR], timeout=1800)
            if commit != src.commit:
                changed = _write_changes(src, src.commit, commit, tree)
        bdir.mkdir(parents=True, exist_ok=True)
        tmp_out = bdir / f".out-{uuid.uuid4().hex[:8]}"
        tmp_out.mkdir()
        logs = paths.cache_dir("kernel-builds", "logs")
        # tuxmake writes its own build.log into the output dir; its console goes next to it
        build_log = tmp_out / ("tuxmake-console.log" if plan.toolchain.builder == "tuxmake" else "build.log")
        deadline = time.monotonic() + BUILD_TIMEOUT
        ok = False
        try:
            if plan.toolchain.builder == "tuxmake":
                cmds = [_tuxmake_argv(plan, tree, tmp_out, lv)]
            else:
                cmds = _make_cmds(plan, tree, lv)
            with open(build_log, "w") as logfh, progress.task(
                    f"{variant}: building {src.version}{lv} ({plan.toolchain.builder}, -j{plan.jobs})"):
                for argv in cmds:
                    rc = run_logged(argv, logfh, tree, deadline, "kernel build", BUILD_TIMEOUT)
                    if rc != 0:
                        kept = logs / f"{key[:16]}-{variant}-{int(started)}.log"
                        logfh.flush()
                        with open(kept, "wb") as fh:
                            for part in dict.fromkeys((build_log, tmp_out / "build.log")):
                                if part.is_file():
                                    fh.write(part.read_bytes())
                        if rc < 0:
                            raise KernelBuildInfraError(f"{variant} kernel build was killed by signal {-rc}",
                                                        log_path=kept)
                        raise UserError(f"{variant} kernel build failed ({argv[0]} exited {rc}); "
                                        f"see the log {kept}")
            arts = _collect(plan, tree, tmp_out)
            duration = time.monotonic() - t0
            ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
            release = (tree / OBJDIR / "include/config/kernel.release").read_text().strip()
            final_config = arts["config"].read_text()
            meta = {
                "schema": 1, "variant": variant, "release": release, "localversion": lv,
                "cache_key": key, "duration_s": round(duration, 2),
                # CPU seconds of the build's processes: on a shared machine, cpu_s / jobs
                # estimates the wall time the same build takes on idle cores
                "cpu_s": round(cpu, 1), "load_avg_at_end": list(os.getloadavg()),
                "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
                "incremental": not fresh, "objects_tree": str(tree),
                "manifest": {"path": str(plan.manifest.path), "name": plan.manifest.name,
                             "sha256": sha256_file(plan.manifest.path)},
                "base": {"kind": src.kind, "description": src.description, "ref": src.ref,
                         "commit": src.commit, "tree": base_tree, "version": src.version},
                "series": {"kind": series.kind, "origin": series.origin, "sha256": series.sha256,
                           "count": series.count, "subjects": list(series.subjects),
                           "applied": variant == "patched"},
                "source": {"commit": commit, "tree": tree_id, "changed_files": changed},
                "config": {"label": plan.config.label, "base": plan.config.base,
                           "fragments": [{"path": str(f), "sha256": sha256_file(f)} for f in plan.config.fragments],
                           "digest": plan.config.digest,
                           "dropped_options": missing_options(plan.config, final_config)},
                "toolchain": plan.toolchain.as_dict(), "jobs": plan.jobs,
                "host": {"machine": platform.machine(), "node": platform.node(), "kernel": platform.release()},
                "commands": [shlex.join(c) for c in cmds],
                "reproducer": _reproducer(plan.manifest, variant, plan.config.label, source_override),
                "artifacts": {name: {"file": p.name, "sha256": sha256_file(p), "bytes": p.stat().st_size}
                              for name, p in arts.items()},
            }
            atomic_write_json(tmp_out / "metadata.json", meta)
            shutil.rmtree(out, ignore_errors=True)
            os.rename(tmp_out, out)
            ok = True
        finally:
            shutil.rmtree(tmp_out, ignore_errors=True)
            if keep is not None:                       # put the stock objects back
                shutil.rmtree(tree, ignore_errors=True)
                os.rename(keep, tree)
            elif fresh and (variant == "patched" or not ok):
                shutil.rmtree(tree, ignore_errors=True)
        if fresh and variant == "stock":
            _set_objects_tree(root, objkey, tree)
        log.info("%s build %s done in %.1fs", variant, release, duration)
        return _from_out(out, cached=False)


def build_kernels(manifest: Union[Manifest, str, Path], variants: Sequence[str] = VARIANTS,
                  config: Optional[str] = None, progress: Optional[Progress] = None, *,
                  source: Optional[BaseSpec] = None, builder: str = "auto",
                  jobs: Optional[int] = None, lore_url: Optional[str] = None,
                  fetch_timeout: float = B4_TIMEOUT) -> List[KernelBuild]:
    """Build (or fetch from the cache) the given variants, stock first.

    ``lore_url`` (checked, see :func:`harness.kernel.manifest.check_lore_url`)
    overrides the manifest's ``[series] lore_url``; ``fetch_timeout`` bounds
    fetching a series by Message-ID (``b4 am``).  The series is read before
    the base tree is prepared, so a series that cannot be had costs nothing."""
    progress = progress or Progress()
    manifest, ordered = build_request(manifest, variants)
    plan = _plan(manifest, config, builder, jobs)          # bad input is rejected here, before any work
    series = load_series(manifest.series, progress, lore_url=lore_url, timeout=fetch_timeout)
    src = prepare_source(source or manifest.base, progress)
    patched = apply_series(src, series, progress) if "patched" in variants else None
    builds = []
    for v in ordered:
        commit = src.commit if v == "stock" else patched
        assert commit is not None
        builds.append(_build_one(plan, v, src, series, commit, progress, source))
    return builds


def build_kernel(manifest: Union[Manifest, str, Path], variant: str, config: Optional[str] = None,
                 progress: Optional[Progress] = None, *, source: Optional[BaseSpec] = None,
                 builder: str = "auto", jobs: Optional[int] = None, lore_url: Optional[str] = None,
                 fetch_timeout: float = B4_TIMEOUT) -> KernelBuild:
    """One variant.  The patched variant reuses stock objects when a stock build
    with the same base, config and toolchain is cached."""
    return build_kernels(manifest, (variant,), config, progress, source=source, builder=builder, jobs=jobs,
                         lore_url=lore_url, fetch_timeout=fetch_timeout)[0]


def list_builds() -> List[dict]:
    """Metadata of every complete cached build, newest first."""
    root = paths.cache_dir("kernel-builds")
    found = []
    for meta in root.glob("*/out/metadata.json"):
        try:
            data = json.loads(meta.read_text())
        except (OSError, ValueError):
            continue
        found.append({"variant": data.get("variant"), "release": data.get("release"),
                      "manifest": data.get("manifest", {}).get("name"),
                      "config": data.get("config", {}).get("label"),
                      "bzimage": str(meta.parent / "bzImage"), "metadata": str(meta),
                      "duration_s": data.get("duration_s"), "started": data.get("started")})
    found.sort(key=lambda d: d.get("started") or "", reverse=True)
    return found
