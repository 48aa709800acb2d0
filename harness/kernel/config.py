"""Kernel configuration: a base config plus kconfig fragments.

Base configs (:data:`BASE_CONFIGS`): ``tiny`` (``make tinyconfig``),
``defconfig``, ``distro`` (the running kernel's ``/boot/config-$(uname -r)``)
or a PATH to a config file.  Fragments are the harness's named fragments in
``harness/kernel/fragments/<name>.config`` or PATHs (relative to the
manifest).  The harness fragments:

* ``kvm-host``: KVM, KVM_INTEL, KVM_AMD built in (plus SMP, THP);
* ``tracing``: FTRACE, FUNCTION_GRAPH_TRACER, KPROBE_EVENTS (KPROBES needs MODULES on 6.1);
* ``virtual-host``: serial console, initramfs, devtmpfs, virtio (pci, console,
  net, blk, rng) and what QEMU and sshd need inside the L1 VM (UNIX, INET,
  EVENTFD, SIGNALFD, TIMERFD, EPOLL, FUTEX, SHMEM/TMPFS (memfd), UNIX98_PTYS,
  MULTIUSER, POSIX timers, AIO, advise syscalls, file locking).

After the build, :func:`missing_options` lists fragment options that kconfig
dropped (unmet dependencies); they are recorded in metadata.json.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from harness.errors import UserError

FRAGMENT_DIR = Path(__file__).resolve().parent / "fragments"
#: named base configs -> the kconfig target tuxmake/make understands
BASE_CONFIGS = {"tiny": "tinyconfig", "defconfig": "defconfig", "distro": None}


@dataclass(frozen=True)
class ConfigPlan:
    label: str                        # tiny | defconfig | distro | the path
    base: str                         # kconfig target (tinyconfig) or an absolute config file path
    fragments: Tuple[Path, ...]
    digest: str                       # sha256 over the base and every fragment's contents

    def describe(self) -> str:
        names = "+".join(f.stem for f in self.fragments)
        return f"{self.label}+{names}" if names else self.label


def harness_fragments() -> List[str]:
    return sorted(p.stem for p in FRAGMENT_DIR.glob("*.config"))


def _distro_config() -> Path:
    release = os.uname().release
    cand = Path("/boot") / f"config-{release}"
    if not cand.is_file():
        raise UserError(f"--config distro: {cand} does not exist on this machine; "
                        f"use --config tiny|defconfig|PATH")
    return cand


def resolve_config(config: str, fragments: Sequence[str], relative_to: Optional[Path] = None) -> ConfigPlan:
    """Validate the config choice and fragments (UserError on bad input)."""
    h = hashlib.sha256()
    if config in BASE_CONFIGS:
        target = BASE_CONFIGS[config]
        if target is None:
            path = _distro_config()
            base, label = str(path), "distro"
            h.update(b"file\0" + path.read_bytes())
        else:
            base, label = target, config
            h.update(f"target\0{target}".encode())
    else:
        path = Path(config).expanduser()
        if not path.is_absolute() and relative_to is not None and not path.exists():
            path = relative_to / path
        if not path.is_file():
            raise UserError(f"config {config} is neither tiny, defconfig, distro nor an existing file; fix --config")
        base, label = str(path.resolve()), str(path)
        h.update(b"file\0" + path.read_bytes())
    resolved: List[Path] = []
    for frag in fragments:
        cand = FRAGMENT_DIR / f"{frag}.config"
        if "/" not in frag and cand.is_file():
            p = cand
        else:
            p = Path(frag).expanduser()
            if not p.is_absolute() and relative_to is not None:
                p = relative_to / p
            if not p.is_file():
                raise UserError(f"kconfig fragment '{frag}' not found; use one of "
                                f"{', '.join(harness_fragments())} or a path to a .config fragment")
        resolved.append(p.resolve())
        h.update(b"\0frag\0" + p.read_bytes())
    return ConfigPlan(label, base, tuple(resolved), h.hexdigest())


_LINE = re.compile(r"^(CONFIG_\w+)=(.*)$")
_UNSET = re.compile(r"^# (CONFIG_\w+) is not set$")


def parse_config(text: str) -> Dict[str, str]:
    out: Dict[str, str] = {}
    for line in text.splitlines():
        m = _LINE.match(line.strip())
        if m:
            out[m.group(1)] = m.group(2)
            continue
        m = _UNSET.match(line.strip())
        if m:
            out[m.group(1)] = "n"
    return out


def missing_options(plan: ConfigPlan, final_config: str) -> List[str]:
    """Fragment settings that did not survive into the final .config."""
    final = parse_config(final_config)
    missing = []
    for frag in plan.fragments:
        for key, want in parse_config(frag.read_text()).items():
            if final.get(key, "n") != want:
                missing.append(f"{key}={want}")
    return missing
