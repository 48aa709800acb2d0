"""The host memory an aliased scenario needs, estimated before anything starts.

An aliased guest (:mod:`harness.qemu.alias`) needs little RAM for its data, but
the host kernel, KVM and QEMU still keep structures per guest page.  Each is
counted here with its size per 4 KiB guest page (P pages) or per mapped page
(M: P at 4 KiB mappings, P/512 at 2 MiB), read from the sources of the
kernels the series targets (5.0 and 6.1) and QEMU 7.2:

* ``alias_ram``: ``alias_mib``, the shared file on the source, fully touched;
* ``dst_alias_ram``: the destination's own file holds what it received:
  ``alias_mib`` with ``complete``; with ``cancel`` (held at 1 MiB/s until
  then) at most :data:`DST_ALIAS_CANCEL_MIB`;
* ``own_ram``: the guest kernel's own RAM, source and destination;
* ``qemu``: :data:`QEMU_BASE_MIB` per QEMU process besides guest RAM;
* ``host_page_tables``: 8 x M, the source QEMU's page tables (KVM, or TCG,
  faults each alias page into QEMU's mapping of that alias);
* ``kvm_sptes``: 8.4 x M, KVM's leaf SPTEs, their upper levels (1/512) and
  one ``struct kvm_mmu_page`` (~200 B) per 512;
* ``kvm_rmaps``: 2 x (8 x P + 8 x P/512 + 4 x P/512), per memslot on source
  and destination: the 4 KiB rmap array (allocated whatever the mapping size),
  the 2 MiB one and ``lpage_info``.  Not allocated with 6.x's TDP MMU; always
  with 5.0 and the legacy MMU;
* ``kvm_page_track``: 2 x 2 x P, ``gfn_track`` (an u16 per page, source and
  destination): always in 5.0, in 6.1 only with shadow paging;
* ``dirty_bitmaps``: 11 bits x P.  Source: KVM's dirty bitmap and its copy
  buffer (2), QEMU's KVMSlot bitmap (1), ``ram_list.dirty_memory`` (3
  clients), the migration bitmap (1); destination: ``dirty_memory`` (3) and
  ``receivedmap`` (1).

The KVM items are counted only under KVM, and always at their largest (rmaps
and page tracking as in 5.0), so the estimate is an upper bound for 6.1.
:func:`estimate` returns them with their total; :mod:`harness.scenario`
compares the total with the host's ``MemAvailable`` and ``migstall run
--check`` prints it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

from harness.qemu.alias import MAX_DEVICES, MIN_ALIAS_MIB, AliasLayout, address_bits_needed

MIB = 1 << 20
PAGE = 4096
#: a QEMU process besides guest RAM: code, TCG's translation buffer in use, heap
QEMU_BASE_MIB = 256
#: with ``cancel`` the destination gets what precopy sends at the 1 MiB/s hold
#: (migration.HOLD_BANDWIDTH) before the cancel: a few MiB; counted generously
DST_ALIAS_CANCEL_MIB = 64
#: bytes per mapped page: leaf SPTE + upper levels (8/512) + kvm_mmu_page (~200/512)
SPTE_BYTES = 8 + 8 / 512 + 200 / 512
#: bytes per 4 KiB page of one memslot's rmaps and lpage_info (4 KiB level, 2 MiB level, disallow_lpage)
RMAP_BYTES = 8 + 8 / 512 + 4 / 512
#: gfn_track: an unsigned short per 4 KiB page
PAGE_TRACK_BYTES = 2
#: dirty bitmaps, bits per 4 KiB page (source 7, destination 4)
BITMAP_BITS = 11
#: bytes of the host's page-table entry per mapped page
PTE_BYTES = 8


@dataclass(frozen=True)
class Estimate:
    """Host memory needed, by item (MiB, rounded up), and the total."""

    items: Tuple[Tuple[str, int], ...]
    mapping_kib: int
    kvm: bool

    @property
    def total_mib(self) -> int:
        return sum(v for _, v in self.items)

    def text(self) -> str:
        parts = ", ".join(f"{k} {v}" for k, v in self.items if v)
        return f"{self.total_mib} MiB ({parts})"


def _mib(nbytes: float) -> int:
    return int(-(-nbytes // MIB))


def estimate(layout: AliasLayout, *, kvm: bool, mapping_kib: int = 4, complete: bool = False) -> Estimate:
    """The host memory a run of an aliased guest needs (source and destination
    on one host, as ``migstall run`` starts them).  ``mapping_kib``: the page
    size KVM and the host map guest RAM with (4, or 2048 with 2 MiB pages)."""
    pages = layout.mem_mib * MIB // PAGE
    mapped = pages * PAGE // (mapping_kib * 1024)
    items = [
        ("alias_ram", layout.alias_mib),
        ("dst_alias_ram", layout.alias_mib if complete else min(layout.alias_mib, DST_ALIAS_CANCEL_MIB)),
        ("own_ram", 2 * layout.own_mib),
        ("qemu", 2 * QEMU_BASE_MIB),
        ("host_page_tables", _mib(PTE_BYTES * mapped)),
        ("kvm_sptes", _mib(SPTE_BYTES * mapped) if kvm else 0),
        ("kvm_rmaps", _mib(2 * RMAP_BYTES * pages) if kvm else 0),
        ("kvm_page_track", _mib(2 * PAGE_TRACK_BYTES * pages) if kvm else 0),
        ("dirty_bitmaps", _mib(BITMAP_BITS * pages / 8)),
    ]
    return Estimate(tuple(items), mapping_kib, kvm)


@dataclass(frozen=True)
class Fit:
    """The largest aliased guest a host fits (:func:`largest_fit`)."""

    mem_mib: int
    alias_mib: int
    estimate: Estimate


def largest_fit(available_mib: int, shm_avail_mib: int, phys_bits: int, *, kvm: bool) -> Optional[Fit]:
    """The largest aliased guest (4 KiB pages, ``cancel``) whose estimate fits
    ``available_mib``: its alias the largest power of two that fits half of it
    and ``shm_avail_mib`` (-1: unknown), its size limited by the devices and
    ``phys_bits`` (0: unknown).  None if not even the smallest fits."""
    room = available_mib // 2 if shm_avail_mib < 0 else min(available_mib // 2, shm_avail_mib)
    alias_mib = MIN_ALIAS_MIB
    while alias_mib * 2 <= room:
        alias_mib *= 2
    best: Optional[Fit] = None
    for devices in range(1, MAX_DEVICES + 1):
        layout = AliasLayout(devices * alias_mib, alias_mib)
        if phys_bits and address_bits_needed(layout) > phys_bits:
            break
        est = estimate(layout, kvm=kvm)
        if est.total_mib > available_mib:
            break
        best = Fit(layout.mem_mib, alias_mib, est)
    return best
