"""Guest RAM backing: QEMU memory-backend arguments, and the page size obtained.

| backing     | QEMU object                                              | pages                 |
|-------------|----------------------------------------------------------|-----------------------|
| `anon`      | `memory-backend-ram` (private anonymous), THP disabled   | 4 KiB                 |
| `thp`       | `memory-backend-ram`; QEMU madvises MADV_HUGEPAGE        | 2 MiB where THP can   |
| `hugetlb2m` | `memory-backend-memfd,hugetlb=on,hugetlbsize=2M`         | 2 MiB (hugetlb pool)  |
| `hugetlb1g` | `memory-backend-memfd,hugetlb=on,hugetlbsize=1G`         | 1 GiB (hugetlb pool)  |
| `memfd`     | `memory-backend-memfd,share=on` (shmem)                  | 4 KiB unless shmem THP|

`prealloc` adds `prealloc=on` (QEMU touches every page before the guest starts).
The backend is attached with ``-machine memory-backend=`` (QEMU >= 5.0) or, for
older QEMUs, as the single NUMA node (``-numa node,memdev=``): :func:`attach_args`.

Why a wrapper for `anon`: QEMU (7.2 and others) calls ``madvise(MADV_HUGEPAGE)`` on
every RAM block it allocates (``ram_block_add``), and memory-backend-ram has no
property to stop that, so on a host whose THP mode is ``madvise`` or ``always``
"plain" anonymous guest RAM gets 2 MiB pages.  ``prctl(PR_SET_THP_DISABLE)``
overrides MADV_HUGEPAGE and survives ``execve``, so for `anon` QEMU is started
through a tiny static exec wrapper (``guests/nothp/nothp.c``, compiled by
:mod:`harness.ctools` and staged on the host) that sets it and execs QEMU.

The page size actually obtained is read after prefault from
``/proc/<qemu pid>/smaps`` on the host (:func:`page_size_obtained`): the guest
RAM mapping is the largest one at least ``mem_mib`` long; its
``KernelPageSize`` (hugetlb) or its ``AnonHugePages``/``ShmemPmdMapped`` share
(THP) decide ``page_size_kib``.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from harness import ctools
from harness.errors import UserError
from harness.hosts.base import Host

log = logging.getLogger(__name__)

MEM_ID = "migstall-ram"



def memory_args(backing: str, mem_mib: int, prealloc: bool, pad_kib: int = 0) -> List[str]:
    """QEMU arguments for guest RAM (``-m`` plus the backend object).

    The backend is attached with ``-machine memory-backend=``; the caller's
    ``-machine`` option must not set another one.  ``pad_kib``: RAM beyond
    ``mem_mib`` (a multiple of 8 KiB, QEMU's ``-m`` granularity), only for the
    TCG dirty-sync workaround (:func:`harness.measure.verify.tcg_ram_pad_kib`)."""
    if pad_kib % 8 or pad_kib < 0:
        raise ValueError(f"RAM padding of {pad_kib} KiB: need a multiple of 8 KiB")
    size = f"{mem_mib}M" if not pad_kib else f"{mem_mib * 1024 + pad_kib}K"
    opts = [f"id={MEM_ID}", f"size={size}"]
    if backing in ("anon", "thp"):
        obj = "memory-backend-ram"
    elif backing == "memfd":
        obj = "memory-backend-memfd"
        opts.append("share=on")
    elif backing in ("hugetlb2m", "hugetlb1g"):
        obj = "memory-backend-memfd"
        opts += ["hugetlb=on", "hugetlbsize=" + ("2M" if backing == "hugetlb2m" else "1G")]
    else:
        raise UserError(f"unknown backing {backing!r}; use anon, thp, hugetlb2m, hugetlb1g or memfd")
    if prealloc:
        opts.append("prealloc=on")
    return ["-m", size, "-object", ",".join([obj] + opts)]


#: first QEMU with ``-machine memory-backend=`` (older ones attach it as a NUMA node)
MACHINE_MEMORY_BACKEND_SINCE = (5, 0)


def attach_args(qemu_version: Tuple[int, ...], machine: str = "q35") -> List[str]:
    """``-machine`` (and for QEMU < 5.0 ``-numa``) arguments attaching the backend.
    ``qemu_version`` = () when unknown (assume a current QEMU)."""
    if qemu_version and tuple(qemu_version[:2]) < MACHINE_MEMORY_BACKEND_SINCE:
        return ["-machine", machine, "-numa", f"node,memdev={MEM_ID}"]
    return ["-machine", f"{machine},memory-backend={MEM_ID}"]


def parse_version(text: str) -> Tuple[int, ...]:
    """``QEMU emulator version 7.2.22 (Debian ...)`` -> (7, 2, 22); () if none."""
    m = re.search(r"version\s+(\d+)\.(\d+)(?:\.(\d+))?", text)
    return tuple(int(g) for g in m.groups() if g is not None) if m else ()


def exec_prefix(backing: str, host: Host) -> Tuple[str, ...]:
    """Argv prefix for QEMU with this backing on ``host`` (``anon``: the wrapper)."""
    if backing != "anon":
        return ()
    return (host.stage(ctools.nothp_wrapper()),)


@dataclass(frozen=True)
class PageInfo:
    page_size_kib: Optional[int]        # the page size most of guest RAM is mapped with
    mapping: Dict[str, str] = field(default_factory=dict)   # the smaps entry, for the sidecar


_HDR = re.compile(r"^([0-9a-f]+)-([0-9a-f]+)\s+(\S+)\s+\S+\s+\S+\s+\S+\s*(.*)$")


def parse_smaps(text: str) -> List[Dict[str, str]]:
    maps: List[Dict[str, str]] = []
    cur: Optional[Dict[str, str]] = None
    for line in text.splitlines():
        m = _HDR.match(line)
        if m:
            cur = {"range": f"{m.group(1)}-{m.group(2)}", "perms": m.group(3), "path": m.group(4).strip(),
                   "bytes": str(int(m.group(2), 16) - int(m.group(1), 16))}
            maps.append(cur)
        elif cur is not None and ":" in line:
            k, v = line.split(":", 1)
            cur[k.strip()] = v.strip()
    return maps


def _kb(entry: Dict[str, str], key: str) -> int:
    v = entry.get(key, "0").split()
    return int(v[0]) if v and v[0].isdigit() else 0


def page_size_obtained(smaps_text: str, mem_mib: int, path_part: str = "") -> PageInfo:
    """Pick the guest RAM mapping from smaps text and say which page size backs it.
    ``path_part``: only mappings of a file whose path contains it (an aliased
    guest's shared file: ``mem_mib`` is then the alias size)."""
    want = mem_mib * 1024 * 1024
    # guest RAM is read-write and not executable (TCG's code buffer is rwx)
    cands = [m for m in parse_smaps(smaps_text)
             if int(m["bytes"]) >= want and m["perms"].startswith("rw") and "x" not in m["perms"]
             and path_part in m["path"]]
    if not cands:
        return PageInfo(None)
    ram = min(cands, key=lambda m: int(m["bytes"]))
    kps = _kb(ram, "KernelPageSize")
    if kps > 4:
        return PageInfo(kps, ram)
    rss = _kb(ram, "Rss")
    huge = _kb(ram, "AnonHugePages") + _kb(ram, "ShmemPmdMapped") + _kb(ram, "FilePmdMapped")
    size = 2048 if rss and huge * 2 >= rss else kps or 4
    return PageInfo(size, ram)


def read_page_size(host: Host, pid: int, mem_mib: int, path_part: str = "") -> PageInfo:
    try:
        text = host.read_bytes(f"/proc/{pid}/smaps").decode(errors="replace")
    except Exception as exc:  # noqa: BLE001  gone, or not permitted
        log.warning("cannot read /proc/%d/smaps: %s", pid, exc)
        return PageInfo(None)
    return page_size_obtained(text, mem_mib, path_part)


#: /proc/<pid>/status and smaps_rollup fields :func:`process_memory` keeps (KiB)
MEMORY_FIELDS = ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem", "Pss", "Pss_Anon", "Pss_File", "Pss_Shmem")


def parse_memory(status_text: str, rollup_text: str) -> Dict[str, int]:
    """The :data:`MEMORY_FIELDS` found in ``/proc/<pid>/status`` and ``smaps_rollup`` text, KiB."""
    out: Dict[str, int] = {}
    for line in (status_text + "\n" + rollup_text).splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if key in MEMORY_FIELDS and parts and parts[0].isdigit():
            out[key] = int(parts[0])
    return out


def process_memory(host: Host, pid: int) -> Dict[str, int]:
    """A QEMU's memory, KiB: ``VmHWM``/``VmRSS`` and the ``Rss*`` of its status,
    the ``Pss*`` of its smaps_rollup.  The Rss counters count a page once per
    mapping of it, so an aliased guest's shared file counts once per alias
    there; ``Pss`` shares each page among its mappings and counts it once.
    {} when unreadable (the QEMU is gone)."""
    try:
        status = host.read_bytes(f"/proc/{pid}/status").decode(errors="replace")
        rollup = host.read_bytes(f"/proc/{pid}/smaps_rollup").decode(errors="replace")
    except Exception as exc:  # noqa: BLE001  gone, or not permitted: a diagnostic only
        log.warning("cannot read the memory of process %d: %s", pid, exc)
        return {}
    return parse_memory(status, rollup)
