"""The guest kernel: Debian's ``linux-image`` package, fetched and cached, or a
user-supplied bzImage (``--guest-kernel PATH``).

Default: the package that ``linux-image-amd64`` depends on (e.g.
``linux-image-6.1.0-56-amd64``) is fetched with ``apt-get download`` and
unpacked with ``dpkg-deb -x``; only the bzImage, its config and the modules
the probe channel needs (virtio-pci and virtio-console, with their
dependencies, in load order) are kept in ``paths.cache_dir("guest-kernel",
PACKAGE)``.  A ``meta.json`` written last marks a complete entry, so a second
call does no work beyond one ``apt-cache`` lookup (and none at all when apt
cannot be asked, if a cached kernel exists).

A user-supplied kernel gets no modules: the probe channel is virtio-serial
when the kernel's config (``config-RELEASE`` next to the image, or the build
tree's ``.config``) shows virtio-pci and virtio-console built in, else the
second serial port (ttyS1).
"""

from __future__ import annotations

import functools
import json
import logging
import lzma
import os
import shutil
import struct
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from harness import paths
from harness.paths import file_lock
from harness.errors import HostError, UserError
from harness.progress import Progress

log = logging.getLogger(__name__)

#: meta packages tried in order; each depends on one versioned linux-image package
META_PACKAGES = ("linux-image-amd64", "linux-image-virtual", "linux-image-generic")
#: modules the virtio probe channel needs (when not built in)
CHANNEL_MODULES = ("virtio_pci", "virtio_console")
#: config symbols that must be y (built in) or m (then CHANNEL_MODULES are loaded)
CHANNEL_CONFIG = ("CONFIG_VIRTIO_PCI", "CONFIG_VIRTIO_CONSOLE")
#: timeouts, seconds
APT_QUERY_TIMEOUT = 60.0
APT_DOWNLOAD_TIMEOUT = 900.0
UNPACK_TIMEOUT = 600.0
_META_VERSION = 1


@dataclass(frozen=True)
class GuestKernel:
    image: Path                     # the bzImage
    release: str                    # uname -r
    modules: Tuple[Path, ...]       # .ko files to insmod, in load order
    channel: str                    # "virtio" | "serial"
    origin: str                     # "debian:PACKAGE=VERSION" or the user's path


# --------------------------------------------------------------------------- bzImage

def bzimage_release(path: Path) -> str:
    """The kernel release string embedded in an x86 bzImage; UserError if the
    file is not one."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(0x1000)
            if len(head) < 0x210 or head[0x202:0x206] != b"HdrS":
                if head[:4] == b"\x7fELF":
                    raise UserError(f"guest kernel {path} is an ELF vmlinux, not a bzImage; "
                                    "pass the bzImage (arch/x86/boot/bzImage or /boot/vmlinuz-*)")
                raise UserError(f"guest kernel {path} is not an x86 kernel image (no bzImage header); "
                                "pass a bzImage (arch/x86/boot/bzImage or /boot/vmlinuz-*)")
            (ver_off,) = struct.unpack_from("<H", head, 0x20E)
            if not ver_off:
                return "unknown"
            fh.seek(ver_off + 0x200)
            text = fh.read(256).split(b"\0", 1)[0].decode(errors="replace")
    except OSError as exc:
        raise UserError(f"cannot read guest kernel {path}: {exc.strerror or exc}; "
                        "pass a readable bzImage") from exc
    return text.split(" ", 1)[0] or "unknown"


def _config_values(config: Path, symbols: Sequence[str]) -> Dict[str, str]:
    values = {s: "n" for s in symbols}
    for line in config.read_text(errors="replace").splitlines():
        key, sep, val = line.partition("=")
        if sep and key in values:
            values[key] = val.strip()
    return values


def _find_config(image: Path, release: str) -> Optional[Path]:
    candidates = [image.parent / f"config-{release}", image.parent / ".config"]
    # a build tree: arch/x86/boot/bzImage -> ../../../.config
    if len(image.resolve().parents) > 3:
        candidates.append(image.resolve().parents[3] / ".config")
    return next((c for c in candidates if c.is_file()), None)


def user_kernel(path: Path) -> GuestKernel:
    """A user-supplied bzImage.  No modules; virtio channel only if built in."""
    path = Path(path).expanduser()
    if not path.exists():
        raise UserError(f"guest kernel {path} does not exist; pass the path of a bzImage "
                        "or leave --guest-kernel out to use Debian's")
    if not path.is_file():
        raise UserError(f"guest kernel {path} is not a file; pass the path of a bzImage")
    release = bzimage_release(path)
    channel = "serial"
    config = _find_config(path, release)
    if config is not None:
        vals = _config_values(config, CHANNEL_CONFIG)
        if all(v == "y" for v in vals.values()):
            channel = "virtio"
    log.info("guest kernel %s (release %s), probe channel %s%s", path, release, channel,
             f" (from {config})" if config else " (no config found)")
    return GuestKernel(path.resolve(), release, (), channel, str(path))


# ------------------------------------------------------------------ Debian package

def _run(argv: Sequence[str], timeout: float, cwd: Optional[Path] = None) -> str:
    log.debug("running %s", " ".join(argv))
    try:
        proc = subprocess.run(list(argv), cwd=cwd, capture_output=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)
    except FileNotFoundError as exc:
        raise UserError(f"{argv[0]} not found: the default guest kernel comes from apt; "
                        "run on Debian/Ubuntu or pass --guest-kernel PATH") from exc
    except subprocess.TimeoutExpired as exc:
        raise HostError(f"{' '.join(argv[:2])} did not finish within {timeout:g}s") from exc
    if proc.returncode != 0:
        tail = proc.stderr.decode(errors="replace").strip().splitlines()[-1:] or [""]
        raise HostError(f"{' '.join(argv[:3])} exited {proc.returncode}: {tail[0]}")
    return proc.stdout.decode(errors="replace")


@functools.lru_cache(maxsize=None)
def resolve_package() -> str:
    """The versioned linux-image package the distribution's meta package names."""
    for meta in META_PACKAGES:
        try:
            out = _run(["apt-cache", "depends", meta], APT_QUERY_TIMEOUT)
        except HostError:
            continue
        for line in out.splitlines():
            kind, _, dep = line.strip().partition(":")
            dep = dep.strip()
            if kind.lstrip("|") == "Depends" and dep.startswith("linux-image-") and "<" not in dep:
                return dep
    raise UserError("apt knows no linux-image package (tried " + ", ".join(META_PACKAGES)
                    + "); run `apt-get update` or pass --guest-kernel PATH")


def _modinfo_depends(ko: Path) -> List[str]:
    """The ``depends=`` field of a module's .modinfo ELF section."""
    data = ko.read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2:
        return []
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)

    def section(i: int) -> Tuple[int, int, int]:
        name, _typ, _flags, _addr, off, size = struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize)
        return name, off, size

    _, stroff, _ = section(shstrndx)
    for i in range(shnum):
        name, off, size = section(i)
        if data[stroff + name:].split(b"\0", 1)[0] == b".modinfo":
            for item in data[off:off + size].split(b"\0"):
                if item.startswith(b"depends="):
                    return [d for d in item[8:].decode().split(",") if d]
    return []


def _decompressed(src: Path, dst: Path) -> None:
    if src.name.endswith(".ko"):
        shutil.copyfile(src, dst)
    elif src.name.endswith(".ko.xz"):
        dst.write_bytes(lzma.decompress(src.read_bytes()))
    elif src.name.endswith(".ko.zst"):
        with open(dst, "wb") as out:
            subprocess.run(["zstd", "-dc", str(src)], stdout=out, check=True, timeout=60)
    else:
        raise HostError(f"unsupported module compression: {src}")


def _module_index(moddir: Path) -> Dict[str, Path]:
    index: Dict[str, Path] = {}
    for p in (moddir / "kernel").rglob("*.ko*"):
        name = p.name.split(".ko", 1)[0].replace("-", "_")
        index[name] = p
    return index


def _load_order(wanted: Sequence[str], index: Dict[str, Path], tmp: Path) -> List[str]:
    """Modules in dependency order (dependencies first)."""
    order: List[str] = []
    seen: set = set()

    def visit(name: str) -> None:
        name = name.replace("-", "_")
        if name in seen:
            return
        seen.add(name)
        if name not in index:
            raise KeyError(name)
        plain = tmp / f"{name}.ko"
        _decompressed(index[name], plain)
        for dep in _modinfo_depends(plain):
            visit(dep)
        order.append(name)

    for w in wanted:
        visit(w)
    return order


def _entry_complete(entry: Path) -> Optional[GuestKernel]:
    meta_path = entry / "meta.json"
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        return None
    if meta.get("version") != _META_VERSION:
        return None
    mods = tuple(entry / "modules" / m for m in meta["modules"])
    image = entry / "vmlinuz"
    if not image.is_file() or not all(m.is_file() for m in mods):
        return None
    return GuestKernel(image, meta["release"], mods, meta["channel"], meta["origin"])




def debian_kernel(progress: Progress = Progress()) -> GuestKernel:
    """Fetch (once) and return the distribution's guest kernel."""
    try:
        package = resolve_package()
    except (UserError, HostError):
        # offline or no apt: use any kernel fetched before
        cached = sorted(paths.cache_dir("guest-kernel").glob("*/meta.json"))
        for meta_json in reversed(cached):
            got = _entry_complete(meta_json.parent)
            if got is not None:
                log.warning("apt unavailable; using the cached guest kernel %s", got.origin)
                return got
        raise
    entry = paths.cache_dir("guest-kernel", package)
    got = _entry_complete(entry)
    if got is not None:
        log.debug("guest kernel %s cached in %s", package, entry)
        return got

    with file_lock(entry / ".lock"), progress.task(f"fetching guest kernel {package}") as task:
        got = _entry_complete(entry)  # another process may have fetched it meanwhile
        if got is not None:
            return got
        with tempfile.TemporaryDirectory(prefix="fetch-", dir=entry) as tmpname:
            tmp = Path(tmpname)
            log.info("downloading %s with apt-get", package)
            _run(["apt-get", "download", package], APT_DOWNLOAD_TIMEOUT, cwd=tmp)
            debs = sorted(tmp.glob(f"{package}_*.deb"))
            if not debs:
                raise HostError(f"apt-get download {package} produced no .deb in {tmp}")
            deb = debs[-1]
            version = deb.name.split("_")[1]
            task.update(description=f"unpacking {deb.name}")
            root = tmp / "root"
            _run(["dpkg-deb", "-x", str(deb), str(root)], UNPACK_TIMEOUT)
            images = sorted((root / "boot").glob("vmlinuz-*"))
            if not images:
                raise HostError(f"{deb.name} contains no /boot/vmlinuz-*")
            image = images[-1]
            release = image.name[len("vmlinuz-"):]
            config = root / "boot" / f"config-{release}"
            moddir = next((d for d in (root / "lib" / "modules" / release,
                                       root / "usr" / "lib" / "modules" / release) if d.is_dir()), None)

            vals = _config_values(config, CHANNEL_CONFIG) if config.is_file() else {}
            channel, modules = "serial", []
            if vals and all(v in ("y", "m") for v in vals.values()):
                if all(v == "y" for v in vals.values()):
                    channel = "virtio"
                elif moddir is not None:
                    moddst = tmp / "modules"
                    moddst.mkdir()
                    try:
                        wanted = [m for m, sym in zip(CHANNEL_MODULES, CHANNEL_CONFIG) if vals[sym] == "m"]
                        modules = _load_order(wanted, _module_index(moddir), moddst)
                        channel = "virtio"
                    except KeyError as exc:
                        log.warning("module %s missing from %s; probe channel falls back to ttyS1",
                                    exc, deb.name)
            # move the pieces into place; meta.json last marks the entry complete
            final_mods = entry / "modules"
            shutil.rmtree(final_mods, ignore_errors=True)
            final_mods.mkdir()
            names = []
            for i, m in enumerate(modules if channel == "virtio" else []):
                name = f"{i:02d}-{m}.ko"
                os.replace(tmp / "modules" / f"{m}.ko", final_mods / name)
                names.append(name)
            shutil.copyfile(image, entry / "vmlinuz")
            if config.is_file():
                shutil.copyfile(config, entry / "config")
            meta = {"version": _META_VERSION, "package": package, "package_version": version,
                    "release": release, "channel": channel, "modules": names,
                    "origin": f"debian:{package}={version}"}
            tmp_meta = entry / "meta.json.tmp"
            tmp_meta.write_text(json.dumps(meta, indent=1) + "\n")
            os.replace(tmp_meta, entry / "meta.json")
    got = _entry_complete(entry)
    assert got is not None
    log.info("guest kernel %s %s cached in %s (channel %s, modules %s)", package, version, entry,
             channel, ", ".join(names) or "none")
    return got


def get_guest_kernel(path: Optional[Path] = None, progress: Progress = Progress()) -> GuestKernel:
    """``path`` (a bzImage) if given, else Debian's kernel from the cache."""
    if path is not None and str(path) != "":
        return user_kernel(Path(path))
    return debian_kernel(progress)
