"""Migrated memory verified page by page (issue 9).

After a completed migration the source QEMU is stopped (``postmigrate``) and
the destination, started with ``-S``, stays paused after the incoming
migration.  Then every 4 KiB page of guest RAM is hashed on both sides and the
hashes are compared::

    ranges = guest_ram_ranges(sc.mem_mib)
    check_ranges(ranges, await qemu_ram_ranges(src))       # optional cross-check
    result = await verify_migration(src, dst, ranges)      # hashes src, then dst
    if not result.ok:
        raise MigrationError(result.error_text(), src.log_path)
    side["verify"] = result.as_dict()                      # seconds per side, GiB/s

How one side is hashed (:func:`hash_guest_ram`): on the VM's host a FIFO is
made in the VM's runtime dir (``mkfifo``) and ``migstall-ramhash``
(``guests/ramhash/ramhash.c``, built by :func:`harness.ctools.ramhash`) is
started on it through :meth:`Host.open_stream`; it opens the FIFO read-write
(so QEMU's open for writing can never block), says ``RAMHASH`` and then writes
one little-endian u64 per page to its standard output, which is the stream's
socket.  The harness then sends QMP ``pmemsave {val: gpa, size, filename: fifo}``
for each range in turn, so guest RAM flows QEMU -> FIFO -> hasher and never
lands in a file; meanwhile it reads the hashes.  ``pmemsave`` runs in QEMU's
main loop with the BQL held; both guests are paused, so that costs nothing.
Closing the stream (any error, Ctrl-C) stops the hasher at once (its ``-w``).
If the hasher is gone while QEMU is blocked opening the FIFO, one more
``migstall-ramhash -n 0 FIFO`` on the host opens and closes it as a reader, so
QEMU's ``pmemsave`` fails with an I/O error instead of hanging in ``open``.

Which memory (:func:`guest_ram_ranges`, q35 as migstall runs it, QEMU 7.2
``hw/i386/pc_q35.c``): RAM below 4 GiB is ``lowmem = 0x80000000`` (2 GiB) when
``ram_size >= 0xb0000000`` (2816 MiB), else all of RAM is below 4 GiB
(``lowmem = 0xb0000000`` is then larger than RAM; ``max-ram-below-4g`` left
at its default, 4 GiB, changes nothing); the rest is mapped at 4 GiB.  Checked
on QEMU 7.2 with ``info mtree -f``: 2815 MiB is all below 4 GiB (RAM up to
0xafefffff); 3 GiB is [0, 2 GiB) and [4 GiB, 5 GiB).  Compared are:

* ``ram-below-640k``  [0, 0xa0000)
* ``ram-below-4g``    [0x100000, lowmem)
* ``ram-above-4g``    [4 GiB, 4 GiB + ram_size - lowmem)  (only when RAM is split)

Not compared: the legacy hole [0xa0000, 0x100000) (96 pages), because what
``pmemsave`` reads there depends on chipset state (SMRAM, PAM: VGA window,
option ROMs, BIOS shadow) rather than being the main RAM block; the other RAM
blocks (``pc.bios``, ``pc.rom``, option ROMs, device RAM such as VGA memory,
ACPI tables in fw_cfg blobs) are not guest RAM and are not compared either.
On an AMD vCPU, QEMU >= 7.1 moves ``ram-above-4g`` to 1 TiB when the highest
guest-physical address in use (RAM above 4 GiB + hotplug memory + the 64-bit
PCI hole) would reach the HyperTransport window at 0xfd00000000, i.e. for
guests of roughly 950 GiB and more: pass ``above_4g_start`` then, or use
:func:`qemu_ram_ranges`/:func:`check_ranges`, which read QEMU's own map.

On a difference (:func:`verify_migration`) the first :data:`MAX_EXAMINED`
differing pages are read back from both paused sides (QMP ``pmemsave`` of 4 KiB
into a file) and compared word by word (:func:`diff_page`: how many u64 words
differ, which bits, whether only x86 PTE accessed/dirty bits) into
:attr:`VerifyResult.page_diffs`, the sidecar's ``verify.page_diffs``; with
``dump_dir`` both versions are kept as files (``MIGSTALL_VERIFY_DUMP=1`` on a
run: the run's log dir, ``verify-pages/``).  :func:`known_cause` names a setup
where differences are expected: TCG with QEMU < 9.0 (issue 9, a QEMU bug).

Written by the destination's KVM, not lost (:class:`KvmRewrite`): when QEMU
restores a migrated vCPU it writes the kvmclock wall-clock MSR back
(``kvm_put_msrs``, once per vCPU), and on each such write KVM's
``kvm_write_wall_clock()`` rewrites the guest's pvclock wall-clock structure
(``struct pvclock_wall_clock``: version, sec, nsec; 12 bytes) in guest RAM,
the version 2 higher each time and the boot time as the new VM's clock sees
it, even while the destination is paused.  It is excused only if its version
is even on both sides and higher on the destination.  Linux places it (``wall_clock``, first in
``.bss..decrypted``) at a 2 MiB-aligned physical address, so every KVM
migration of a kvmclock guest differs in that one page.  The probe reports
where it is (``hello.wall_clock_gpa``); a differing page that is equal on both
sides outside such a structure is listed in ``VerifyResult.rewritten`` and not
counted; any other byte of that page that differs still counts.

Timeouts (seconds): :data:`DEFAULT_START_TIMEOUT` for the hasher to start and
open the FIFO; hashing one side within :func:`hash_timeout_s` (``HASH_TIMEOUT_BASE_S``
+ ``HASH_TIMEOUT_PER_GIB_S`` per GiB hashed, see there for the measurement);
host commands (``mkfifo``, ``rm``) within the host's ``DEFAULT_COMMAND_TIMEOUT``.

The hashes of one side are held in memory: 8 bytes per 4 KiB page (2 MiB per
GiB of guest RAM, 4 GiB for a 2 TiB guest).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from harness import ctools
from harness.errors import HostError, MeasurementError, QEMUError, UserError, best_effort
from harness.hosts.base import Host, HostStream
from harness.qemu.machine import VM

log = logging.getLogger(__name__)

PAGE = 4096
HASH_BYTES = 8
MiB = 1 << 20
GiB = 1 << 30
FOUR_GIB = 4 * GiB

#: q35 (QEMU 7.2 pc_q35_init): RAM of this size or more is split at LOWMEM_SPLIT
LOWMEM_SPLIT_THRESHOLD = 0xB0000000
LOWMEM_SPLIT = 0x80000000
#: the legacy hole that is not compared: VGA window, option ROMs, BIOS shadow
LEGACY_HOLE = (0xA0000, 0x100000)

#: seconds for migstall-ramhash to start on the host and open the FIFO
#: (an SSH exec on the nested virtual host under TCG takes a few seconds at worst)
DEFAULT_START_TIMEOUT = 30.0
#: hashing one side may take HASH_TIMEOUT_BASE_S + HASH_TIMEOUT_PER_GIB_S per GiB.
#: Measured on this project's 2-core machine (benchmarks/verify_hash.py, 1 GiB of
#: random bytes): the hasher alone reading a cached file 5.0 GiB/s (0.20 s/GiB),
#: through a pipe 2.9 GiB/s, QEMU 7.2 pmemsave -> FIFO -> hasher of a paused TCG
#: guest 1.4 GiB/s (0.73 s/GiB; 1.2-1.6 GiB/s for never-touched RAM).  The nested
#: virtual host under TCG is 10-30x slower: up to ~22 s/GiB.  120 s/GiB leaves a
#: factor ~5 on top of that; the base covers the QMP round trips and a loaded host.
HASH_TIMEOUT_BASE_S = 30.0
HASH_TIMEOUT_PER_GIB_S = 120.0
#: seconds for the "open and close the FIFO as a reader" clean-up after a failure
UNBLOCK_TIMEOUT = 15.0
#: the hasher's first 8 bytes on its output (its -r)
READY_LINE = b"RAMHASH\n"
#: mismatches listed in a VerifyResult
MAX_LISTED = 64
#: of those, how many are read back from both sides and compared word by word
#: (:func:`examine_pages`); 2 QMP pmemsave of 4 KiB each
MAX_EXAMINED = 64
#: the accessed (bit 5) and dirty (bit 6) bits of an x86 page-table entry
PTE_ACCESSED_DIRTY = 0x60


def hash_timeout_s(nbytes: int) -> float:
    """Seconds one side's hashing of ``nbytes`` of guest RAM may take."""
    return HASH_TIMEOUT_BASE_S + HASH_TIMEOUT_PER_GIB_S * nbytes / GiB


# -- which memory --------------------------------------------------------------------------
@dataclass(frozen=True)
class RamRange:
    """``size`` bytes of guest RAM at guest-physical address ``gpa`` (both 4 KiB aligned)."""
    name: str
    gpa: int
    size: int

    @property
    def end(self) -> int:
        return self.gpa + self.size

    @property
    def pages(self) -> int:
        return self.size // PAGE

    def __str__(self) -> str:
        return f"{self.name} [{self.gpa:#x}, {self.end:#x})"


def guest_ram_ranges(mem_mib: int, *, above_4g_start: int = FOUR_GIB, pad_kib: int = 0) -> Tuple[RamRange, ...]:
    """The main-RAM ranges of a q35 guest with ``mem_mib`` MiB (see the module
    docstring for the layout and what is left out).  ``above_4g_start``: where
    QEMU maps RAM above 4 GiB (1 TiB for the AMD relocation of very large guests).
    ``pad_kib``: RAM added beyond ``mem_mib`` (:func:`tcg_ram_pad_kib`)."""
    if int(mem_mib) != mem_mib or mem_mib < 1:
        raise UserError(f"guest memory {mem_mib!r} MiB: need a whole number of MiB >= 1")
    ram = int(mem_mib) * MiB + pad_kib * 1024
    lowmem = LOWMEM_SPLIT if ram >= LOWMEM_SPLIT_THRESHOLD else ram
    below = min(ram, lowmem)
    out = [RamRange("ram-below-640k", 0, min(below, LEGACY_HOLE[0]))]
    if below > LEGACY_HOLE[1]:
        out.append(RamRange("ram-below-4g", LEGACY_HOLE[1], below - LEGACY_HOLE[1]))
    if ram > below:
        out.append(RamRange("ram-above-4g", above_4g_start, ram - below))
    return tuple(r for r in out if r.size > 0)


_FLAT_HEADER = re.compile(r'^\s*AS "memory"', re.M)
_FLAT_LINE = re.compile(r"^\s*([0-9a-f]+)-([0-9a-f]+) \(prio -?\d+, (\w+)\): (\S+)", re.M)


def parse_ram_flatview(text: str) -> Tuple[RamRange, ...]:
    """The ``ram`` entries of the flat view of the ``memory`` address space in
    the output of HMP ``info mtree -f`` (``rom``, ``romd``, ``i/o`` dropped),
    named by their memory region (``pc.ram``, or a memory backend's id)."""
    for view in text.split("FlatView #"):
        if _FLAT_HEADER.search(view):
            return tuple(RamRange(name, int(lo, 16), int(hi, 16) + 1 - int(lo, 16))
                         for lo, hi, kind, name in _FLAT_LINE.findall(view) if kind == "ram")
    raise ValueError("no flat view of address space \"memory\" in the info mtree -f output")


async def qemu_ram_ranges(vm: VM) -> Tuple[RamRange, ...]:
    """What QEMU maps as RAM in the guest-physical address space (HMP
    ``info mtree -f`` over QMP, bounded by the VM's QMP timeout)."""
    text = await vm.cmd("human-monitor-command", {"command-line": "info mtree -f"})
    try:
        return parse_ram_flatview(str(text))
    except ValueError as exc:
        raise QEMUError(f"QEMU {vm.name}: {exc}", vm.log_path) from exc


def check_ranges(ranges: Sequence[RamRange], reported: Sequence[RamRange]) -> None:
    """MeasurementError unless every range lies inside RAM that QEMU reports
    (:func:`qemu_ram_ranges`): hashing anything else would compare device or
    ROM reads, not migrated RAM."""
    spans = sorted((r.gpa, r.end) for r in reported)
    merged: List[List[int]] = []
    for lo, hi in spans:
        if merged and lo <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], hi)
        else:
            merged.append([lo, hi])
    for r in ranges:
        if not any(lo <= r.gpa and r.end <= hi for lo, hi in merged):
            have = ", ".join(f"[{lo:#x}, {hi:#x})" for lo, hi in merged) or "none"
            raise MeasurementError(f"RAM range {r} is not RAM in QEMU's memory map (RAM there: {have}); "
                                   f"the computed q35 layout does not match this QEMU")


# -- hashing one side ------------------------------------------------------------------------
@dataclass(frozen=True)
class RamHashes:
    """One side's page hashes: ``hashes`` holds one little-endian u64 per 4 KiB
    page, the ranges' pages in order.  ``seconds``: wall time from the first
    ``pmemsave`` to the last hash (this machine's monotonic clock), i.e. QEMU's
    copy, the FIFO and the hashing, not the start of the hasher."""
    hashes: bytes
    seconds: float
    nbytes: int

    @property
    def pages(self) -> int:
        return len(self.hashes) // HASH_BYTES

    @property
    def seconds_per_gib(self) -> float:
        return self.seconds / (self.nbytes / GiB) if self.nbytes else 0.0


def _check_aligned(ranges: Sequence[RamRange]) -> None:
    if not ranges:
        raise UserError("no RAM ranges to hash")
    for r in ranges:
        if r.gpa % PAGE or r.size % PAGE or r.size <= 0:
            raise UserError(f"RAM range {r} is not a non-empty run of whole 4 KiB pages")


async def _collect(reader: asyncio.StreamReader, nbytes: int) -> bytes:
    """Up to ``nbytes`` from the hasher (fewer if it ends early)."""
    buf = bytearray()
    while len(buf) < nbytes:
        chunk = await reader.read(min(1 << 20, nbytes - len(buf)))
        if not chunk:
            break
        buf += chunk
    return bytes(buf)


async def _unblock(host: Host, binary: str, fifo: str) -> None:
    """Open and close the FIFO as a reader (``ramhash -n 0``): a QEMU blocked in
    pmemsave's open() of it gets its open back and fails on the first write."""
    with best_effort(f"unblocking a QEMU writing to {fifo} on {host.name}", log):
        await asyncio.to_thread(host.run, [binary, "-n", "0", fifo], timeout=UNBLOCK_TIMEOUT, check=False)


async def _close(stream: HostStream, writer: Optional[asyncio.StreamWriter]) -> None:
    if writer is not None:
        writer.close()
        with best_effort("closing the hasher's socket", log, level=logging.DEBUG):  # reset if it has gone
            await asyncio.wait_for(writer.wait_closed(), 5)
    await asyncio.to_thread(stream.close)


async def hash_guest_ram(vm: VM, ranges: Sequence[RamRange], timeout: Optional[float] = None, *,
                         start_timeout: float = DEFAULT_START_TIMEOUT) -> RamHashes:
    """Hash every 4 KiB page of ``ranges`` of the paused ``vm``'s guest RAM (see
    the module docstring).  ``timeout``: seconds for the whole side once the
    hasher runs, default :func:`hash_timeout_s` of the total size.
    MeasurementError if the guest is running; QEMUError if QMP fails; HostError
    if the hasher fails (its message included)."""
    _check_aligned(ranges)
    total = sum(r.size for r in ranges)
    limit = hash_timeout_s(total) if timeout is None else float(timeout)
    status = await vm.cmd("query-status")
    if status.get("running"):
        raise MeasurementError(f"QEMU {vm.name} is running (status {status.get('status')}): its RAM can only be "
                               f"compared while it is paused", vm.log_path)
    host = vm.host
    binary = await asyncio.to_thread(host.stage, await asyncio.to_thread(ctools.ramhash))
    fifo = vm.path("ramhash.fifo")
    await asyncio.to_thread(host.run, ["rm", "-f", fifo])
    await asyncio.to_thread(host.run, ["mkfifo", "-m", "600", fifo])
    argv = [binary, "-n", str(total), "-t", f"{max(limit, 0.001):.3f}", "-r", "-w", fifo]
    log.info("verify %s: hashing %d pages (%.1f MiB) in %d range(s): %s", vm.name, total // PAGE, total / MiB,
             len(ranges), ", ".join(map(str, ranges)))
    try:
        stream = await asyncio.to_thread(host.open_stream, argv, start_timeout)
        writer: Optional[asyncio.StreamWriter] = None
        collect: Optional["asyncio.Task[bytes]"] = None
        ok = False
        try:
            stream.sock.setblocking(False)
            reader, writer = await asyncio.open_unix_connection(sock=stream.sock, limit=1 << 21)
            try:
                ready = await asyncio.wait_for(reader.readexactly(len(READY_LINE)), start_timeout)
            except (asyncio.TimeoutError, asyncio.IncompleteReadError, OSError) as exc:
                await _close(stream, writer)
                writer = None
                err = (await asyncio.to_thread(stream.stderr_text)).strip()
                raise HostError(f"migstall-ramhash on {host.name} did not open {fifo} within {start_timeout:g}s: "
                                f"{err.splitlines()[-1] if err else type(exc).__name__}", vm.log_path) from exc
            if ready != READY_LINE:
                raise HostError(f"migstall-ramhash on {host.name} sent {ready!r} instead of {READY_LINE!r}",
                                vm.log_path)
            t0 = time.monotonic()
            deadline = t0 + limit
            collect = asyncio.create_task(_collect(reader, total // PAGE * HASH_BYTES))
            for r in ranges:
                if collect.done():          # the hasher ended early: do not feed it more
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    raise QEMUError(f"QEMU {vm.name}: hashing guest RAM took more than {limit:g}s", vm.log_path)
                await vm.cmd("pmemsave", {"val": r.gpa, "size": r.size, "filename": fifo}, timeout=left)
            try:
                data = await asyncio.wait_for(asyncio.shield(collect), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                raise HostError(f"migstall-ramhash on {host.name}: hashes not complete within {limit:g}s",
                                vm.log_path) from None
            seconds = time.monotonic() - t0
            want = total // PAGE * HASH_BYTES
            if len(data) != want:
                await _close(stream, writer)
                writer = None
                err = (await asyncio.to_thread(stream.stderr_text)).strip()
                raise HostError(f"migstall-ramhash on {host.name} ended after {len(data) // HASH_BYTES} of "
                                f"{total // PAGE} pages: {err.splitlines()[-1] if err else 'no message'}",
                                vm.log_path)
            ok = True
        finally:
            if collect is not None and not collect.done():
                collect.cancel()
                # cancelled just above; the error already raised (or the result) is the news
                with best_effort(f"verify {vm.name}: the hash collector", log, level=logging.DEBUG,
                                 catch=(BaseException,)):
                    await collect
            with best_effort(f"verify {vm.name}: closing the hasher", log):
                await _close(stream, writer)
            if not ok:
                await _unblock(host, binary, fifo)
    finally:
        with best_effort(f"removing {fifo} on {host.name}", log):
            await asyncio.to_thread(host.run, ["rm", "-f", fifo], check=False)
    log.info("verify %s: %d pages hashed in %.3f s (%.2f s/GiB)", vm.name, total // PAGE, seconds,
             seconds / (total / GiB))
    return RamHashes(data, seconds, total)


# -- comparing -----------------------------------------------------------------------------
@dataclass(frozen=True)
class KvmRewrite:
    """Guest RAM that the destination's KVM writes when QEMU restores the
    migrated vCPU state (see the module docstring): ``size`` bytes at ``gpa``,
    within one page."""
    name: str
    gpa: int
    size: int

    def __post_init__(self) -> None:
        if self.size < 1 or self.gpa < 0 or (self.gpa % PAGE) + self.size > PAGE:
            raise ValueError(f"{self.name}: {self.size} bytes at {self.gpa:#x} must lie within one page")

    @property
    def page(self) -> int:
        return self.gpa - self.gpa % PAGE


#: struct pvclock_wall_clock {u32 version; u32 sec; u32 nsec;}
PVCLOCK_WALL_CLOCK_BYTES = 12


def pvclock_wall_clock(gpa: Any) -> Tuple[KvmRewrite, ...]:
    """The :class:`KvmRewrite` of the guest's kvmclock wall clock at ``gpa``
    (the probe's ``hello.wall_clock_gpa``); () when unknown (None or < 0) or
    unusable (not a number, or across a page boundary: logged)."""
    try:
        if gpa is None or int(gpa) < 0:
            return ()
        return (KvmRewrite("pvclock-wall-clock", int(gpa), PVCLOCK_WALL_CLOCK_BYTES),)
    except (TypeError, ValueError) as exc:
        log.warning("verify: the probe's wall_clock_gpa %r is not usable (%s); that page is compared whole",
                    gpa, exc)
        return ()


def _rewritten_like_kvm(src: bytes, dst: bytes, r: KvmRewrite) -> bool:
    """Whether the structure ``r`` changed the way KVM rewrites it: a pvclock
    structure's u32 version is even (stable) on both sides and higher on the
    destination (KVM adds 2 per write)."""
    off = r.gpa % PAGE
    if r.name != "pvclock-wall-clock":
        return src[off:off + r.size] != dst[off:off + r.size]
    va = int.from_bytes(src[off:off + 4], "little")
    vb = int.from_bytes(dst[off:off + 4], "little")
    return va % 2 == 0 and vb % 2 == 0 and vb > va


def equal_outside(src: bytes, dst: bytes, rewrites: Sequence[KvmRewrite]) -> bool:
    """Whether two versions of one page are equal once the bytes of
    ``rewrites`` (all in this page) are left out."""
    a, b = bytearray(src), bytearray(dst)
    for r in rewrites:
        off = r.gpa % PAGE
        a[off:off + r.size] = b[off:off + r.size] = bytes(r.size)
    return a == b


@dataclass(frozen=True)
class VerifyResult:
    """The comparison of two sides' page hashes.  ``first_mismatches``: up to
    :data:`MAX_LISTED` dicts ``{"gpa": "0x...", "range": name, "src_hash":
    "0x...", "dst_hash": "0x..."}`` in GPA order.  ``src_seconds``/``dst_seconds``:
    each side's hashing time (:attr:`RamHashes.seconds`) when known."""
    pages: int
    mismatch_pages: int
    first_mismatches: Tuple[Dict[str, str], ...] = ()
    src_seconds: Optional[float] = None
    dst_seconds: Optional[float] = None
    #: :func:`diff_page` of the first mismatching pages, read back from both sides
    page_diffs: Tuple[Dict[str, Any], ...] = ()
    #: pages that differ only in a :class:`KvmRewrite` (not in ``mismatch_pages``):
    #: its :func:`diff_page` plus ``rewrite`` (the structure's name)
    rewritten: Tuple[Dict[str, Any], ...] = ()

    @property
    def ok(self) -> bool:
        return self.mismatch_pages == 0

    @property
    def nbytes(self) -> int:
        return self.pages * PAGE

    def seconds_per_gib(self) -> Optional[float]:
        """The slower side's hashing time per GiB, if timed."""
        times = [t for t in (self.src_seconds, self.dst_seconds) if t is not None]
        if not times or not self.pages:
            return None
        return max(times) / (self.nbytes / GiB)

    def error_text(self) -> str:
        """``migrated memory differs: N pages (first at GPA 0x...)``; "" when equal."""
        if self.ok:
            return ""
        first = self.first_mismatches[0]["gpa"] if self.first_mismatches else "?"
        return f"migrated memory differs: {self.mismatch_pages} pages (first at GPA {first})"

    def as_dict(self) -> Dict[str, Any]:
        """JSON-able, for the sidecar."""
        spg = self.seconds_per_gib()
        out = {"pages": self.pages, "mismatch_pages": self.mismatch_pages,
               "first_mismatches": [dict(m) for m in self.first_mismatches],
               "src_seconds": self.src_seconds, "dst_seconds": self.dst_seconds,
               "seconds_per_gib": None if spg is None else round(spg, 4)}
        if self.page_diffs:
            out["page_diffs"] = [dict(d) for d in self.page_diffs]
        out["rewritten_by_kvm"] = [dict(d) for d in self.rewritten]
        return out


HashesT = Union[bytes, RamHashes]


def compare(ranges: Sequence[RamRange], src_hashes: HashesT, dst_hashes: HashesT) -> VerifyResult:
    """Compare two sides' hashes of ``ranges`` page by page.  Either may be the
    raw bytes or a :class:`RamHashes` (whose seconds then go into the result).
    ValueError if a side does not hold exactly one hash per page."""
    import numpy as np

    src = src_hashes.hashes if isinstance(src_hashes, RamHashes) else bytes(src_hashes)
    dst = dst_hashes.hashes if isinstance(dst_hashes, RamHashes) else bytes(dst_hashes)
    pages = sum(r.size // PAGE for r in ranges)
    for side, data in (("source", src), ("destination", dst)):
        if len(data) != pages * HASH_BYTES:
            raise ValueError(f"{side} hashes: {len(data)} bytes for {pages} pages "
                             f"(want {pages * HASH_BYTES})")
    src_seconds = src_hashes.seconds if isinstance(src_hashes, RamHashes) else None
    dst_seconds = dst_hashes.seconds if isinstance(dst_hashes, RamHashes) else None
    if src == dst:
        return VerifyResult(pages, 0, (), src_seconds=src_seconds, dst_seconds=dst_seconds)
    a = np.frombuffer(src, dtype="<u8")
    b = np.frombuffer(dst, dtype="<u8")
    bad = np.flatnonzero(a != b)
    starts = np.cumsum([0] + [r.size // PAGE for r in ranges])   # first page index of each range
    listed = []
    for idx in bad[:MAX_LISTED].tolist():
        k = int(np.searchsorted(starts, idx, side="right")) - 1
        r = ranges[k]
        listed.append({"gpa": f"{r.gpa + (idx - int(starts[k])) * PAGE:#x}", "range": r.name,
                       "src_hash": f"{int(a[idx]):#018x}", "dst_hash": f"{int(b[idx]):#018x}"})
    return VerifyResult(pages, int(bad.size), tuple(listed), src_seconds=src_seconds, dst_seconds=dst_seconds)


# -- known causes ---------------------------------------------------------------------------
#: the first QEMU release whose TCG keeps dirty tracking intact across bitmap syncs
#: (upstream 03bfc2188f06 "physmem: Fix migration dirty bitmap coherency with TCG
#: memory access", in 9.0; not in the 7.2.x stable series up to 7.2.22)
TCG_DIRTY_SYNC_FIXED_IN = (9, 0, 0)


#: RAM added to a verified TCG guest on QEMU < 9.0 (:func:`tcg_ram_pad_kib`):
#: 8 KiB, the granularity QEMU rounds ``-m`` to; anything that is not a whole
#: multiple of 256 KiB works
TCG_RAM_PAD_KIB = 8
#: backings whose RAM block can be 8 KiB longer (hugetlb ones cannot)
_PADDABLE_BACKINGS = ("anon", "thp", "memfd")


def tcg_ram_pad_kib(accel: Optional[str], qemu_version: Sequence[int], backing: str) -> int:
    """KiB of RAM to add so that QEMU < 9.0 under TCG keeps dirty tracking
    intact (0 when not needed or not possible).  The bug (:func:`known_cause`)
    is in the fast path of ``cpu_physical_memory_sync_dirty_bitmap()``, taken
    only when the RAM block's length is a multiple of 64 pages (256 KiB); a
    block 8 KiB longer takes the per-page path, which resets the vCPUs' TLB
    entries of every page it finds dirty, as QEMU 9.0's fix does.  Measured
    here: 512 MiB verified with 9-22 pages different, 512 MiB + 8 KiB with
    none (README "Migrated memory verified")."""
    if accel != "tcg" or backing not in _PADDABLE_BACKINGS:
        return 0
    if qemu_version and tuple(qemu_version[:3]) >= TCG_DIRTY_SYNC_FIXED_IN:
        return 0
    return TCG_RAM_PAD_KIB


def known_cause(accel: Optional[str], qemu_version: Sequence[int], pad_kib: int = 0) -> Optional[str]:
    """Why a difference is expected in this setup, or None.  Under TCG, QEMU
    before 9.0 loses guest writes during migration (issue 9, README "Migrated
    memory verified"): the fast path of ``cpu_physical_memory_sync_dirty_bitmap()``
    (``include/exec/ram_addr.h``) clears the migration dirty bits of a RAM block
    without ``tlb_reset_dirty_range_all()``, so a vCPU's TLB entry for a page it
    had already dirtied stays writable without the notdirty slow path, and its
    later stores never mark the page dirty again: the page is not re-sent and
    the destination keeps an older copy.  ``qemu_version``: (major, minor,
    micro), () when unknown.  ``pad_kib``: the workaround of
    :func:`tcg_ram_pad_kib` was applied, so this bug does not explain a difference."""
    if accel == "tcg" and qemu_version and tuple(qemu_version[:3]) < TCG_DIRTY_SYNC_FIXED_IN and not pad_kib:
        return ("expected under TCG with QEMU < 9.0: its dirty-bitmap sync leaves vCPU TLB entries that "
                "no longer mark pages dirty, so guest writes after a sync are lost (QEMU bug, fixed "
                "upstream by 03bfc2188f06; see README)")
    return None


# -- what differs in a page ---------------------------------------------------------------
async def read_page(vm: VM, gpa: int) -> bytes:
    """The 4 KiB page at ``gpa`` of the paused ``vm`` (QMP ``pmemsave`` into a
    file in the VM's runtime dir, read back and removed)."""
    path = vm.path(f"page-{gpa:x}.bin")
    try:
        await vm.cmd("pmemsave", {"val": gpa, "size": PAGE, "filename": path})
        data = await asyncio.to_thread(vm.host.read_bytes, path)
    finally:
        with best_effort(f"removing {path} on {vm.host.name}", log):
            await asyncio.to_thread(vm.host.run, ["rm", "-f", path], check=False)
    if len(data) != PAGE:
        raise QEMUError(f"QEMU {vm.name}: pmemsave of the page at {gpa:#x} gave {len(data)} bytes", vm.log_path)
    return data


def diff_page(gpa: int, src: bytes, dst: bytes, max_words: int = 8) -> Dict[str, Any]:
    """What differs between two versions of one page, per little-endian u64
    word: ``words`` (how many differ), ``src_only_bits``/``dst_only_bits`` (OR
    over those words of the bits set on one side only), ``kind`` and the first
    ``max_words`` words (``offset``, ``src``, ``dst``).  ``kind`` is
    ``pte-accessed-dirty`` when every differing word differs only in bits 5/6
    (x86 PTE accessed/dirty) and is a present entry on both sides, else ``data``."""
    import numpy as np

    a = np.frombuffer(src, dtype="<u8")
    b = np.frombuffer(dst, dtype="<u8")
    idx = np.flatnonzero(a != b)
    xa, xb = a[idx], b[idx]
    src_only = int(np.bitwise_or.reduce(xa & ~xb)) if idx.size else 0
    dst_only = int(np.bitwise_or.reduce(xb & ~xa)) if idx.size else 0
    ad_only = bool(idx.size) and not ((src_only | dst_only) & ~PTE_ACCESSED_DIRTY) \
        and bool(np.all(xa & 1)) and bool(np.all(xb & 1))
    return {"gpa": f"{gpa:#x}", "words": int(idx.size), "kind": "pte-accessed-dirty" if ad_only else "data",
            "src_only_bits": f"{src_only:#x}", "dst_only_bits": f"{dst_only:#x}",
            "first_words": [{"offset": f"{int(i) * 8:#x}", "src": f"{int(a[i]):#018x}", "dst": f"{int(b[i]):#018x}"}
                            for i in idx[:max_words].tolist()]}


async def examine_pages(src: VM, dst: VM, gpas: Sequence[int],
                        dump_dir: Optional[Path] = None) -> Tuple[Dict[str, Any], ...]:
    """:func:`diff_page` of each page at ``gpas``, read from both paused sides.
    ``dump_dir``: also write both versions there (``<gpa>.src``, ``<gpa>.dst``)."""
    out = []
    if dump_dir is not None:
        dump_dir.mkdir(parents=True, exist_ok=True)
    for gpa in gpas:
        a = await read_page(src, gpa)
        b = await read_page(dst, gpa)
        if dump_dir is not None:
            (dump_dir / f"{gpa:#x}.src").write_bytes(a)
            (dump_dir / f"{gpa:#x}.dst").write_bytes(b)
        out.append(diff_page(gpa, a, b))
    return tuple(out)


def page_index(ranges: Sequence[RamRange], gpa: int) -> Optional[int]:
    """The index of the page at ``gpa`` in the hashes of ``ranges``, or None."""
    base = 0
    for r in ranges:
        if r.gpa <= gpa < r.end:
            return base + (gpa - r.gpa) // PAGE
        base += r.pages
    return None


async def _excuse_rewrites(src: VM, dst: VM, ranges: Sequence[RamRange], result: VerifyResult,
                           src_h: RamHashes, dst_h: RamHashes,
                           rewrites: Sequence[KvmRewrite]) -> VerifyResult:
    """``result`` without the pages that differ only in ``rewrites`` (read
    back from both sides and compared with those bytes left out)."""
    excused: List[Dict[str, Any]] = []
    for page in sorted({r.page for r in rewrites}):
        idx = page_index(ranges, page)
        if idx is None:
            continue
        sl = slice(idx * HASH_BYTES, (idx + 1) * HASH_BYTES)
        if src_h.hashes[sl] == dst_h.hashes[sl]:
            continue
        here = [r for r in rewrites if r.page == page]
        a, b = await read_page(src, page), await read_page(dst, page)
        if equal_outside(a, b, here) and all(_rewritten_like_kvm(a, b, r) for r in here):
            excused.append({**diff_page(page, a, b), "rewrite": ",".join(r.name for r in here)})
            log.info("verify: page %#x differs only in %s, which the destination's KVM rewrites",
                     page, ", ".join(r.name for r in here))
    if not excused:
        return result
    gone = {d["gpa"] for d in excused}
    return dataclasses.replace(result, mismatch_pages=result.mismatch_pages - len(excused),
                               first_mismatches=tuple(m for m in result.first_mismatches if m["gpa"] not in gone),
                               rewritten=tuple(excused))


async def verify_migration(src: VM, dst: VM, ranges: Sequence[RamRange],
                           timeout: Optional[float] = None, *, examine: int = MAX_EXAMINED,
                           dump_dir: Optional[Path] = None,
                           rewrites: Sequence[KvmRewrite] = ()) -> VerifyResult:
    """Hash ``ranges`` on the paused source, then on the paused destination (one
    after the other, so each side's time is its own and the two QEMUs do not
    compete for the host's CPUs), and compare.  ``timeout`` per side, default
    :func:`hash_timeout_s`.  On a difference the first ``examine`` mismatching
    pages are read back from both sides (:func:`examine_pages`, also written to
    ``dump_dir`` if given) into :attr:`VerifyResult.page_diffs`; a failure to
    read them is logged and leaves the result as it is.  ``rewrites``: guest
    RAM the destination's KVM writes on restore (:func:`pvclock_wall_clock`);
    a page that differs only there is not counted (:attr:`VerifyResult.rewritten`)."""
    src_h = await hash_guest_ram(src, ranges, timeout)
    dst_h = await hash_guest_ram(dst, ranges, timeout)
    result = compare(ranges, src_h, dst_h)
    if not result.ok and rewrites:
        try:
            result = await _excuse_rewrites(src, dst, ranges, result, src_h, dst_h, rewrites)
        except (QEMUError, HostError, OSError) as exc:
            log.warning("verify: could not read the pages KVM rewrites back, so they count: %s", exc)
    if result.ok:
        log.info("verify: %d pages equal (source %.2f s, destination %.2f s)", result.pages,
                 src_h.seconds, dst_h.seconds)
        return result
    log.warning("verify: %s; first: %s", result.error_text(), result.first_mismatches[:3])
    gpas = [int(m["gpa"], 16) for m in result.first_mismatches[:max(0, examine)]]
    if gpas:
        try:
            diffs = await examine_pages(src, dst, gpas, dump_dir)
        except (QEMUError, HostError, OSError) as exc:
            log.warning("verify: could not read the differing pages back: %s", exc)
        else:
            result = dataclasses.replace(result, page_diffs=diffs)
            kinds = {k: sum(d["kind"] == k for d in diffs) for k in sorted({d["kind"] for d in diffs})}
            log.warning("verify: of %d differing pages read back: %s", len(diffs), kinds)
    return result
