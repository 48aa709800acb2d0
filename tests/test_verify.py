"""Migrated memory verified page by page (harness/measure/verify.py, guests/ramhash).

Without QEMU: the hasher against a numpy reference of its documented hash, its
streaming, error and abort paths; the q35 RAM layout; compare/error_text; the
dirty-log shim's drop_dirty against a fake KVM (an LD_PRELOAD library answering
the memslot and dirty-log ioctls), so it runs without /dev/kvm.

With QEMU (TCG, paused, no guest: about a second each): guest RAM backed by a
file of random bytes, hashed through pmemsave -> FIFO -> hasher; two QEMUs whose
files differ in two bytes give exactly those two pages, at their GPAs.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import List, Optional

import numpy as np
import pytest

from harness import ctools, procs
from harness.errors import MeasurementError, UserError
from harness.hosts.local import LocalHost
from harness.measure import verify
from harness.measure.verify import RamHashes, RamRange
from harness.qemu import dirtylog
from harness.qemu.machine import VM

PAGE = 4096
MiB = 1 << 20
#: seconds any wait of these tests may take
WAIT_S = 30.0

# the documented hash (guests/ramhash/ramhash.c header)
K1, K2, K3 = 0x9E3779B97F4A7C15, 0xD6E8FEB86659FD93, 0xA0761D6478BD642F
LANE0, SEED = 0x243F6A8885A308D3, 0x13198A2E03707344


def ref_hashes(data: bytes) -> bytes:
    """numpy reference of migstall-ramhash's page hash (whole pages only)."""
    u = np.uint64
    w = np.frombuffer(data, dtype="<u8").reshape(-1, PAGE // 8)
    n = w.shape[0]
    with np.errstate(over="ignore"):
        s = np.tile(np.array([(LANE0 + j * K1) % (1 << 64) for j in range(8)], dtype=np.uint64), (n, 1))
        for i in range(0, PAGE // 8, 8):
            x = (s ^ w[:, i:i + 8]) * u(K1)
            s = x ^ (x >> u(29))
        h = np.full(n, SEED, dtype=np.uint64)
        for j in range(8):
            h = (h ^ s[:, j]) * u(K2)
            h ^= h >> u(32)
        h ^= h >> u(29)
        h *= u(K3)
        h ^= h >> u(32)
    return h.astype("<u8").tobytes()


@pytest.fixture(scope="module")
def ramhash() -> str:
    return str(ctools.ramhash())


def _run(ramhash: str, *args: str, data: Optional[bytes] = None, timeout: float = WAIT_S
         ) -> subprocess.CompletedProcess:
    return subprocess.run([ramhash, *args], input=data, capture_output=True, timeout=timeout,
                          stdin=None if data is not None else subprocess.DEVNULL)


def _hashes(out: bytes) -> List[int]:
    return list(np.frombuffer(out, dtype="<u8"))


# -- the hasher -------------------------------------------------------------------------------
def test_ramhash_matches_the_documented_hash(ramhash):
    rng = np.random.default_rng(1)
    data = rng.integers(0, 256, size=300 * PAGE, dtype=np.uint8).tobytes()   # more than one 1 MiB buffer
    res = _run(ramhash, data=data)
    assert res.returncode == 0, res.stderr
    assert res.stdout == ref_hashes(data)


def test_ramhash_identical_pages_equal_one_flipped_byte_differs(ramhash):
    rng = np.random.default_rng(2)
    page = rng.integers(0, 256, size=PAGE, dtype=np.uint8).tobytes()
    flips = [0, 1, 7, 8, 511, 2048, 4095]
    pages = [page, bytes(PAGE), page, bytes(PAGE)]
    for off in flips:
        for bit in (0, 7):
            p = bytearray(page)
            p[off] ^= 1 << bit
            pages.append(bytes(p))
    swapped = bytearray(page)                  # two words of different lanes swapped
    swapped[0:8], swapped[8:16] = page[8:16], page[0:8]
    pages.append(bytes(swapped))
    res = _run(ramhash, data=b"".join(pages))
    assert res.returncode == 0, res.stderr
    h = _hashes(res.stdout)
    assert len(h) == len(pages)
    assert h[0] == h[2] and h[1] == h[3]       # identical pages hash equal, wherever they are
    assert h[0] != h[1]
    assert len(set(h[4:]) | {h[0]}) == len(h) - 3      # every altered page differs from the original and each other


def _peak_rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:"))


def test_ramhash_streams_from_a_fifo_with_writers_in_turn(ramhash, tmp_path):
    """80 MiB through a FIFO, written by three writers one after the other (as
    pmemsave calls do); constant memory: the hasher's peak RSS stays far below it."""
    fifo = tmp_path / "ram.fifo"
    os.mkfifo(fifo, 0o600)
    rng = np.random.default_rng(3)
    block = rng.integers(0, 256, size=4 * MiB, dtype=np.uint8).tobytes()
    parts = [block * 12, block[: 2 * MiB] * 16, block[:PAGE]]        # 48 MiB, 32 MiB, a page
    total = sum(map(len, parts))
    proc = subprocess.Popen([ramhash, "-n", str(total), "-t", "20", "-r", str(fifo)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    chunks: List[bytes] = []
    reader = threading.Thread(target=lambda: chunks.extend(iter(lambda: proc.stdout.read(1 << 16), b"")))
    reader.start()
    try:
        for n, part in enumerate(parts):
            if n == len(parts) - 1:         # 80 MiB hashed, the last page still to come: it is still running
                time.sleep(0.2)
                rss = _peak_rss_kib(proc.pid)
            with open(fifo, "wb") as fh:     # would block without a reader: -r said it has one
                for i in range(0, len(part), 1 << 20):
                    fh.write(part[i:i + (1 << 20)])
        assert proc.wait(WAIT_S) == 0, proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        reader.join(WAIT_S)
    out = b"".join(chunks)
    assert out[:8] == verify.READY_LINE
    expect = ref_hashes(block) * 12 + ref_hashes(block[: 2 * MiB]) * 16 + ref_hashes(block[:PAGE])
    assert out[8:] == expect and len(out[8:]) == total // PAGE * 8
    assert rss < 8 * 1024, f"peak RSS {rss} KiB after 80 MiB"


def test_ramhash_short_final_page_is_rejected(ramhash):
    data = bytes(range(256)) * 16 * 3 + b"x" * 100
    res = _run(ramhash, data=data)
    assert res.returncode == 1
    assert b"partial page of 100 bytes" in res.stderr and b"after 3 whole pages" in res.stderr
    assert len(res.stdout) == 3 * 8                       # the whole pages before it


def test_ramhash_input_shorter_than_n(ramhash, tmp_path):
    f = tmp_path / "short.bin"
    f.write_bytes(bytes(2 * PAGE))
    res = _run(ramhash, "-n", str(4 * PAGE), str(f))
    assert res.returncode == 1 and b"input ended after 8192 of 16384 bytes" in res.stderr


@pytest.mark.parametrize("args, message", [
    (["-n", "4097"], b"not a multiple of 4096"),
    (["-n", "-4096"], b"not a multiple of 4096"),
    (["-t", "soon"], b"not a number of seconds"),
    (["-w"], b"INPUT must be a path"),
    (["a", "b", "c"], b"usage"),
])
def test_ramhash_usage(ramhash, args, message):
    res = _run(ramhash, *args, data=b"")
    assert res.returncode == 2 and message in res.stderr


def test_ramhash_fifo_needs_n(ramhash, tmp_path):
    fifo = tmp_path / "f"
    os.mkfifo(fifo)
    res = _run(ramhash, str(fifo))
    assert res.returncode == 2 and b"give its length with -n" in res.stderr


def test_ramhash_output_file(ramhash, tmp_path):
    f, out = tmp_path / "in.bin", tmp_path / "out.bin"
    data = os.urandom(5 * PAGE)
    f.write_bytes(data)
    res = _run(ramhash, str(f), str(out))
    assert res.returncode == 0 and res.stdout == b""
    assert out.read_bytes() == ref_hashes(data)


def test_ramhash_idle_timeout(ramhash, tmp_path):
    fifo = tmp_path / "f"
    os.mkfifo(fifo)
    t0 = time.monotonic()
    res = _run(ramhash, "-n", str(PAGE), "-t", "0.3", str(fifo))
    assert res.returncode == 3 and b"no input for 0.3 s" in res.stderr
    assert time.monotonic() - t0 < 5


def test_ramhash_aborts_when_stdin_closes(ramhash, tmp_path):
    fifo = tmp_path / "f"
    os.mkfifo(fifo)
    proc = subprocess.Popen([ramhash, "-n", str(PAGE), "-w", str(fifo)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        proc.stdin.write(b"ignored\n")
        proc.stdin.flush()
        time.sleep(0.2)
        assert proc.poll() is None                 # bytes on stdin do not stop it
        proc.stdin.close()
        assert proc.wait(WAIT_S) == 4
        assert b"aborted" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_ramhash_n0_unblocks_a_writer_stuck_in_open(ramhash, tmp_path):
    """The clean-up after a failure: a writer blocked opening the FIFO (as QEMU's
    pmemsave would be with no hasher left) gets its open back, then EPIPE."""
    fifo = tmp_path / "f"
    os.mkfifo(fifo)
    got: dict = {}

    def writer() -> None:
        fd = os.open(fifo, os.O_WRONLY)            # blocks: no reader
        got["opened"] = True
        try:
            time.sleep(0.2)                        # the reader has come and gone
            os.write(fd, b"x" * PAGE)
        except BrokenPipeError:
            got["epipe"] = True
        finally:
            os.close(fd)

    t = threading.Thread(target=writer, daemon=True)
    t.start()
    time.sleep(0.2)
    assert "opened" not in got
    assert _run(ramhash, "-n", "0", str(fifo)).returncode == 0
    t.join(WAIT_S)
    assert got == {"opened": True, "epipe": True}


# -- ranges ------------------------------------------------------------------------------------
def _spans(ranges):
    return [(r.name, hex(r.gpa), hex(r.end)) for r in ranges]


def test_guest_ram_ranges_q35():
    assert _spans(verify.guest_ram_ranges(64)) == [
        ("ram-below-640k", "0x0", "0xa0000"), ("ram-below-4g", "0x100000", "0x4000000")]
    # 2815 MiB < 0xb0000000: all below 4 GiB; 2816 MiB splits at 2 GiB
    assert _spans(verify.guest_ram_ranges(2815))[-1] == ("ram-below-4g", "0x100000", "0xaff00000")
    assert _spans(verify.guest_ram_ranges(2816))[1:] == [
        ("ram-below-4g", "0x100000", "0x80000000"), ("ram-above-4g", "0x100000000", "0x130000000")]
    assert _spans(verify.guest_ram_ranges(3072))[2] == ("ram-above-4g", "0x100000000", "0x140000000")
    big = verify.guest_ram_ranges(2 << 20, above_4g_start=1 << 40)        # 2 TiB, AMD relocation
    assert big[-1].gpa == 1 << 40 and sum(r.size for r in big) == (2 << 40) - 0x60000
    assert _spans(verify.guest_ram_ranges(1)) == [("ram-below-640k", "0x0", "0xa0000")]
    assert sum(r.pages for r in verify.guest_ram_ranges(64)) == 64 * MiB // PAGE - 96
    with pytest.raises(UserError):
        verify.guest_ram_ranges(0)


MTREE_3G = """\
FlatView #0
 AS "I/O", root: io
 Root memory region: io
  0000000000000000-0000000000000007 (prio 0, i/o): dma-chan

FlatView #1
 AS "memory", root: system
 AS "cpu-memory-0", root: system
 Root memory region: system
  0000000000000000-00000000000bffff (prio 0, ram): pc.ram
  00000000000c0000-00000000000dffff (prio 1, rom): pc.rom
  00000000000e0000-00000000000fffff (prio 0, rom): pc.bios @0000000000020000
  0000000000100000-000000007fffffff (prio 0, ram): pc.ram @0000000000100000
  00000000fec00000-00000000fec00fff (prio 0, i/o): ioapic
  00000000fffc0000-00000000ffffffff (prio 0, rom): pc.bios
  0000000100000000-000000013fffffff (prio 0, ram): pc.ram @0000000080000000
"""


def test_parse_ram_flatview_and_check_ranges():
    got = verify.parse_ram_flatview(MTREE_3G)
    assert [(r.name, r.gpa, r.end) for r in got] == [
        ("pc.ram", 0, 0xC0000), ("pc.ram", 0x100000, 0x80000000), ("pc.ram", 1 << 32, 0x140000000)]
    verify.check_ranges(verify.guest_ram_ranges(3072), got)
    with pytest.raises(MeasurementError, match="ram-above-4g"):
        verify.check_ranges(verify.guest_ram_ranges(4096), got)
    with pytest.raises(ValueError):
        verify.parse_ram_flatview("FlatView #0\n AS \"I/O\", root: io\n")


# -- compare ----------------------------------------------------------------------------------
RANGES = (RamRange("ram-below-640k", 0, 0xA0000), RamRange("ram-below-4g", 0x100000, 0x300000))


def _pages(ranges) -> int:
    return sum(r.pages for r in ranges)


def test_compare_equal():
    h = os.urandom(_pages(RANGES) * 8)
    res = verify.compare(RANGES, h, bytes(h))
    assert res.ok and res.pages == 160 + 768 and res.mismatch_pages == 0 and res.error_text() == ""
    assert res.src_seconds is None and res.seconds_per_gib() is None


def test_compare_mismatches_name_their_gpa_and_range():
    a = bytearray(os.urandom(_pages(RANGES) * 8))
    b = bytearray(a)
    for page in (5, 160, 161, 927):           # 160 is the first page of ram-below-4g
        b[page * 8] ^= 0xFF
    res = verify.compare(RANGES, RamHashes(bytes(a), 0.5, 0), RamHashes(bytes(b), 0.25, 0))
    assert not res.ok and res.mismatch_pages == 4
    assert [(m["gpa"], m["range"]) for m in res.first_mismatches] == [
        ("0x5000", "ram-below-640k"), ("0x100000", "ram-below-4g"), ("0x101000", "ram-below-4g"),
        ("0x3ff000", "ram-below-4g")]
    m = res.first_mismatches[0]
    assert m["src_hash"] == f"{int.from_bytes(a[40:48], 'little'):#018x}" and m["src_hash"] != m["dst_hash"]
    assert res.error_text() == "migrated memory differs: 4 pages (first at GPA 0x5000)"
    assert res.src_seconds == 0.5 and res.dst_seconds == 0.25
    assert res.seconds_per_gib() == pytest.approx(0.5 / (928 * PAGE / (1 << 30)))
    d = res.as_dict()
    assert d["mismatch_pages"] == 4 and len(d["first_mismatches"]) == 4 and d["pages"] == 928


def test_compare_lists_at_most_64():
    a = bytes(_pages(RANGES) * 8)
    b = b"\x01" * len(a)
    res = verify.compare(RANGES, a, b)
    assert res.mismatch_pages == 928 and len(res.first_mismatches) == verify.MAX_LISTED
    assert res.error_text() == "migrated memory differs: 928 pages (first at GPA 0x0)"


def test_compare_rejects_wrong_lengths():
    with pytest.raises(ValueError, match="destination hashes"):
        verify.compare(RANGES, bytes(928 * 8), bytes(927 * 8))


def _page(words) -> bytearray:
    """A 4 KiB page of u64 words: ``words`` maps word index -> value, the rest 0."""
    page = bytearray(PAGE)
    for i, v in words.items():
        page[i * 8:i * 8 + 8] = v.to_bytes(8, "little")
    return page


def test_diff_page_data_words():
    """Issue 9 as seen under TCG: a kernel counter the source advanced after the page was sent."""
    src = _page({0x828 // 8: 0xFFFEE1E0, 3: 7})
    dst = _page({0x828 // 8: 0xFFFEE1A1, 3: 7})
    d = verify.diff_page(0x1045000, bytes(src), bytes(dst))
    assert d["gpa"] == "0x1045000" and d["words"] == 1 and d["kind"] == "data"
    assert d["first_words"] == [{"offset": "0x828", "src": "0x00000000fffee1e0", "dst": "0x00000000fffee1a1"}]
    assert d["src_only_bits"] == f"{0xFFFEE1E0 & ~0xFFFEE1A1:#x}"
    assert d["dst_only_bits"] == f"{0xFFFEE1A1 & ~0xFFFEE1E0:#x}"


def test_diff_page_pte_accessed_dirty_only():
    """Present page-table entries that differ only in bits 5 (A) and 6 (D)."""
    pte = 0x0000000012345067 & ~0x60        # present, rw, user; A/D clear
    src = _page({0: pte | 0x60, 1: pte | 0x20, 2: 0x8000000000000001})
    dst = _page({0: pte, 1: pte, 2: 0x8000000000000001})
    d = verify.diff_page(0x1000, bytes(src), bytes(dst))
    assert d["kind"] == "pte-accessed-dirty" and d["words"] == 2
    assert d["src_only_bits"] == "0x60" and d["dst_only_bits"] == "0x0"
    # an A bit on a non-present entry is not a PTE update
    d = verify.diff_page(0x1000, bytes(_page({0: 0x20})), bytes(_page({})))
    assert d["kind"] == "data"
    # equal pages, and at most max_words listed
    assert verify.diff_page(0, bytes(PAGE), bytes(PAGE))["words"] == 0
    many = verify.diff_page(0, bytes(_page({i: i + 1 for i in range(20)})), bytes(PAGE), max_words=3)
    assert many["words"] == 20 and len(many["first_words"]) == 3


def test_verify_result_page_diffs_in_the_sidecar():
    res = verify.VerifyResult(10, 1, ({"gpa": "0x1000", "range": "r", "src_hash": "0x1", "dst_hash": "0x2"},))
    assert "page_diffs" not in res.as_dict()
    import dataclasses
    res = dataclasses.replace(res, page_diffs=({"gpa": "0x1000", "words": 1, "kind": "data"},))
    assert res.as_dict()["page_diffs"] == [{"gpa": "0x1000", "words": 1, "kind": "data"}]


def test_known_cause_tcg_before_qemu_9():
    assert "QEMU < 9.0" in verify.known_cause("tcg", (7, 2, 22))
    assert "03bfc2188f06" in verify.known_cause("tcg", (8, 2, 0))
    assert verify.known_cause("tcg", (9, 0, 0)) is None
    assert verify.known_cause("kvm", (7, 2, 22)) is None
    assert verify.known_cause("tcg", ()) is None
    # with the workaround applied the bug does not explain a difference
    assert verify.known_cause("tcg", (7, 2, 22), pad_kib=8) is None


def test_tcg_ram_pad_only_where_the_bug_is_and_padding_works():
    assert verify.tcg_ram_pad_kib("tcg", (7, 2, 22), "anon") == 8
    assert verify.tcg_ram_pad_kib("tcg", (), "memfd") == 8          # unknown version: assume affected
    assert verify.tcg_ram_pad_kib("tcg", (9, 0, 0), "anon") == 0
    assert verify.tcg_ram_pad_kib("kvm", (7, 2, 22), "anon") == 0
    assert verify.tcg_ram_pad_kib("tcg", (7, 2, 22), "hugetlb2m") == 0
    # the padded page is compared too
    assert verify.guest_ram_ranges(512, pad_kib=8)[-1].end == 512 * MiB + 8192


def test_memory_args_padding():
    from harness.qemu import backing

    args = backing.memory_args("anon", 512, False, pad_kib=8)
    assert args[:2] == ["-m", "524296K"] and "size=524296K" in args[-1]
    assert backing.memory_args("anon", 512, False)[:2] == ["-m", "512M"]
    with pytest.raises(ValueError):
        backing.memory_args("anon", 512, False, pad_kib=4)


# -- the dirty-log shim's drop_dirty (no KVM needed) ---------------------------------------------
FAKE_KVM = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdarg.h>
#include <stdint.h>
#include <string.h>
/* answers the memslot and dirty-log ioctls like KVM would, with an all-ones bitmap */
int ioctl(int fd, unsigned long req, ...)
{
    va_list ap; void *arg;
    va_start(ap, req); arg = va_arg(ap, void *); va_end(ap);
    if (req == 0x4020AE46UL || req == 0x40A0AE49UL)
        return 0;
    if (req == 0x4010AE42UL) {
        struct { uint32_t slot, pad; uint64_t *bm; } *d = arg;
        memset(d->bm, 0xff, 2 * sizeof(uint64_t));      /* the test's slots are <= 128 pages */
        return 0;
    }
    int (*real)(int, unsigned long, ...) = dlsym(RTLD_NEXT, "ioctl");
    return real(fd, req, arg);
}
"""

DRIVER = r"""
import ctypes, json, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
class Region(ctypes.Structure):
    _fields_ = [("slot", ctypes.c_uint32), ("flags", ctypes.c_uint32), ("gpa", ctypes.c_uint64),
                ("size", ctypes.c_uint64), ("uaddr", ctypes.c_uint64)]
class Log(ctypes.Structure):
    _fields_ = [("slot", ctypes.c_uint32), ("pad", ctypes.c_uint32), ("bm", ctypes.c_void_p)]
out = []
for region in (Region(1, 1, 0, 100 * 4096, 0), Region(0x10002, 1, 0, 128 * 4096, 0)):
    assert libc.ioctl(7, 0x4020AE46, ctypes.addressof(region)) == 0
for slot in (1, 1, 0x10002, 5):
    bm = (ctypes.c_uint64 * 2)()
    log = Log(slot, 0, ctypes.addressof(bm))
    assert libc.ioctl(7, 0x4010AE42, ctypes.addressof(log)) == 0
    out.append([bm[0], bm[1]])
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def fake_kvm(tmp_path_factory) -> str:
    src = tmp_path_factory.mktemp("fakekvm") / "fakekvm.c"
    src.write_text(FAKE_KVM)
    return str(ctools.compile_c(src, "migstall-test-fakekvm.so", ["-O2", "-Wall", "-shared", "-fPIC"], ["-ldl"]))


def _drive(tmp_path: Path, fake_kvm: str, drop: Optional[str]) -> tuple:
    shim = str(ctools.dirtylog_shim())
    env = {**os.environ, "LD_PRELOAD": f"{shim} {fake_kvm}", "MIGSTALL_SHIM_LOG": str(tmp_path / "shim.log")}
    env.pop(dirtylog.DROP_DIRTY_ENV, None)
    if drop is not None:
        env[dirtylog.DROP_DIRTY_ENV] = drop
    res = subprocess.run([sys.executable, "-c", DRIVER], capture_output=True, text=True, env=env, timeout=WAIT_S)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout), (tmp_path / "shim.log").read_text()


def _ones(n: int) -> List[int]:
    return [i for i in range(128) if i < n]


def _set_bits(words: List[int]) -> List[int]:
    return [i for i in range(128) if (words[i // 64] >> (i % 64)) & 1]


def test_shim_drop_dirty_clears_every_nth_set_bit(tmp_path, fake_kvm):
    out, text = _drive(tmp_path, fake_kvm, "3")
    # slot 1 has 100 pages: set bits 1..100 of the running count; every 3rd (count 3, 6, ...) cleared
    first = _set_bits(out[0])
    assert [i for i in range(100) if i not in first] == list(range(2, 100, 3))          # 33 dropped
    assert all(i in first for i in range(100, 128))       # past the slot: not pages, left alone
    # the count runs on over calls: the second call's bit 0 is set bit 101 -> 101 % 3 != 0
    second = _set_bits(out[1])
    assert [i for i in range(100) if i not in second] == [i for i in range(100) if (101 + i) % 3 == 0]
    assert len(_set_bits(out[2])) == 128 - len([i for i in range(128) if (201 + i) % 3 == 0])
    assert out[3] == [2 ** 64 - 1] * 2                    # unknown slot: nothing dropped, said once
    assert "loaded hide_manual=0 drop_dirty=3" in text
    assert "drop_dirty slot=0x1 fd=7 set=100 dropped=33 every=3" in text
    assert "drop_dirty slot=0x10002 fd=7 set=128" in text
    assert text.count("drop_dirty unknown slot=0x5") == 1
    dropped = 33 + 33 + 43
    assert f"drop_dirty_seen=328 drop_dirty_dropped={dropped}" in text
    assert dirtylog.dropped_dirty_bits(text) == dropped


def test_shim_drop_dirty_one_drops_all(tmp_path, fake_kvm):
    out, text = _drive(tmp_path, fake_kvm, "1")
    assert out[0] == [0, (2 ** 64 - 1) & ~((1 << 36) - 1)] and out[2] == [0, 0]


@pytest.mark.parametrize("drop", [None, "0", "x"])
def test_shim_without_drop_dirty_changes_nothing(tmp_path, fake_kvm, drop):
    out, text = _drive(tmp_path, fake_kvm, drop)
    assert out == [[2 ** 64 - 1] * 2] * 4
    assert "drop_dirty=0" in text and "drop_dirty slot" not in text
    assert ("drop_dirty ignored" in text) == (drop == "x")
    assert dirtylog.dropped_dirty_bits(text) == 0


def test_dirtylog_setup_drop_dirty(tmp_path):
    host = LocalHost()
    env = dirtylog.setup("legacy", 0, "kvm", host, str(tmp_path), drop_dirty=8).env
    assert env[dirtylog.DROP_DIRTY_ENV] == "8" and env["MIGSTALL_SHIM_HIDE_MANUAL"] == "1"
    assert dirtylog.DROP_DIRTY_ENV in dirtylog.setup("default", 0, "kvm", host, str(tmp_path), drop_dirty=1).env
    assert dirtylog.DROP_DIRTY_ENV not in dirtylog.setup("default", 0, "kvm", host, str(tmp_path)).env
    with pytest.raises(UserError, match="needs KVM"):
        dirtylog.setup("default", 0, "tcg", host, str(tmp_path), drop_dirty=4)
    with pytest.raises(UserError, match="ring"):
        dirtylog.setup("ring", 0, "kvm", host, str(tmp_path), drop_dirty=4)
    with pytest.raises(UserError):
        dirtylog.setup("default", 0, "kvm", host, str(tmp_path), drop_dirty=-1)


# -- a real QEMU (TCG, paused) -------------------------------------------------------------------
def _file_backed(path: Path, mem_mib: int) -> List[str]:
    return ["-machine", "q35,memory-backend=ram", "-accel", "tcg", "-m", f"{mem_mib}M",
            "-object", f"memory-backend-file,id=ram,size={mem_mib}M,mem-path={path},share=off",
            "-S", "-nodefaults", "-no-user-config"]


def _ramhashers() -> List[int]:
    return [pid for pid, cmd in procs.leftovers() if "migstall-ramhash" in cmd]


def test_hash_guest_ram_real_qemu(tmp_path):
    mem = 64
    rng = np.random.default_rng(9)
    image = rng.integers(0, 256, size=mem * MiB, dtype=np.uint8).tobytes()
    a, b = tmp_path / "a.ram", tmp_path / "b.ram"
    a.write_bytes(image)
    changed = bytearray(image)
    changed[0x1234] ^= 0x01                     # ram-below-640k: GPA == file offset below 4 GiB
    changed[0x2345678] ^= 0x80                  # ram-below-4g
    b.write_bytes(bytes(changed))
    ranges = verify.guest_ram_ranges(mem)

    async def main():
        host = LocalHost()
        async with VM(host, "verify-a", _file_backed(a, mem)) as va, \
                VM(host, "verify-b", _file_backed(b, mem)) as vb:
            verify.check_ranges(ranges, await verify.qemu_ram_ranges(va))
            h1 = await verify.hash_guest_ram(va, ranges)
            h2 = await verify.hash_guest_ram(va, ranges, timeout=60)
            res = await verify.verify_migration(va, vb, ranges, dump_dir=tmp_path / "pages")
            return h1, h2, res

    h1, h2, res = asyncio.run(main())
    assert h1.pages == mem * MiB // PAGE - 96 == res.pages
    assert h1.hashes == h2.hashes
    assert h1.hashes == b"".join(ref_hashes(image[r.gpa:r.end]) for r in ranges)    # exactly the RAM bytes
    assert 0 < h1.seconds < 30 and h1.nbytes == sum(r.size for r in ranges)
    assert res.mismatch_pages == 2
    assert [(m["gpa"], m["range"]) for m in res.first_mismatches] == [
        ("0x1000", "ram-below-640k"), ("0x2345000", "ram-below-4g")]
    assert res.error_text() == "migrated memory differs: 2 pages (first at GPA 0x1000)"
    assert res.src_seconds is not None and res.dst_seconds is not None
    # both differing pages read back from each side: exactly the flipped bit, and the files
    word = lambda data, off: f"{int.from_bytes(data[off & ~7:(off & ~7) + 8], 'little'):#018x}"  # noqa: E731
    assert [(d["gpa"], d["words"], d["kind"]) for d in res.page_diffs] == [
        ("0x1000", 1, "data"), ("0x2345000", 1, "data")]
    assert res.page_diffs[0]["first_words"] == [{"offset": "0x230", "src": word(image, 0x1234),
                                                 "dst": word(changed, 0x1234)}]
    assert res.page_diffs[1]["first_words"][0]["offset"] == "0x678"
    assert (tmp_path / "pages" / "0x1000.src").read_bytes() == image[0x1000:0x2000]
    assert (tmp_path / "pages" / "0x2345000.dst").read_bytes() == bytes(changed[0x2345000:0x2346000])
    assert res.as_dict()["page_diffs"][1]["gpa"] == "0x2345000"
    assert not _ramhashers()


def test_kvm_rewrite_excused_only_where_nothing_else_differs(tmp_path):
    """Two paused QEMUs whose RAM differs in a pvclock wall clock at a 2 MiB
    boundary (as the destination's KVM leaves it: version 2 -> 4, a later
    boot time), in a second "rewrite" page that also differs elsewhere, and in
    an ordinary page: only the first is excused."""
    mem = 64
    image = bytearray(np.random.default_rng(5).integers(0, 256, size=mem * MiB, dtype=np.uint8).tobytes())
    wc, other = 0x1600000, 0x2400000                     # 2 MiB-aligned, as Linux places wall_clock
    image[wc:wc + 12] = (2).to_bytes(4, "little") + (0x6b1164b2).to_bytes(4, "little") + bytes(4)
    image = bytes(image)
    a, b = tmp_path / "a.ram", tmp_path / "b.ram"
    a.write_bytes(image)
    changed = bytearray(image)
    changed[wc:wc + 12] = (4).to_bytes(4, "little") + (0x6b1164e7).to_bytes(4, "little") + bytes(4)
    changed[other:other + 4] = b"\xff\xff\xff\xff"
    changed[other + 100] ^= 1                            # outside the structure: still a loss
    changed[0x3000000] ^= 1
    b.write_bytes(bytes(changed))
    ranges = verify.guest_ram_ranges(mem)
    rewrites = verify.pvclock_wall_clock(wc) + (verify.KvmRewrite("other", other, 12),)

    async def main():
        host = LocalHost()
        async with VM(host, "verify-a", _file_backed(a, mem)) as va, \
                VM(host, "verify-b", _file_backed(b, mem)) as vb:
            return await verify.verify_migration(va, vb, ranges, rewrites=rewrites)

    res = asyncio.run(main())
    assert res.mismatch_pages == 2, res.as_dict()
    assert [m["gpa"] for m in res.first_mismatches] == ["0x2400000", "0x3000000"]
    assert [(d["gpa"], d["rewrite"], d["words"]) for d in res.rewritten] == [("0x1600000", "pvclock-wall-clock", 1)]
    assert res.as_dict()["rewritten_by_kvm"][0]["gpa"] == "0x1600000"
    assert not _ramhashers()


def test_kvm_rewrite_helpers():
    assert verify.pvclock_wall_clock(None) == () and verify.pvclock_wall_clock(-1) == ()
    (wc,) = verify.pvclock_wall_clock(0x16600000)
    assert (wc.page, wc.size) == (0x16600000, 12)
    with pytest.raises(ValueError):
        verify.KvmRewrite("x", 0x1ffa, 12)                 # crosses a page
    p1, p2 = bytes(PAGE), bytearray(PAGE)
    p2[4:8] = b"\x01\x02\x03\x04"
    assert verify.equal_outside(p1, bytes(p2), [verify.KvmRewrite("x", 0x5000, 12)])
    # a wall clock rewritten by KVM: versions even, higher on the destination
    src, dst = bytearray(PAGE), bytearray(PAGE)
    src[0:4], dst[0:4] = (2).to_bytes(4, "little"), (6).to_bytes(4, "little")
    assert verify._rewritten_like_kvm(bytes(src), bytes(dst), wc)
    dst[0:4] = (5).to_bytes(4, "little")                 # odd: mid-update, not KVM's finished write
    assert not verify._rewritten_like_kvm(bytes(src), bytes(dst), wc)
    assert verify.pvclock_wall_clock("junk") == () and verify.pvclock_wall_clock(0x1ffa) == ()
    p2[12] = 1
    assert not verify.equal_outside(p1, bytes(p2), [verify.KvmRewrite("x", 0x5000, 12)])
    ranges = verify.guest_ram_ranges(64)
    assert verify.page_index(ranges, 0) == 0 and verify.page_index(ranges, 0x100000) == 160
    assert verify.page_index(ranges, 0xa0000) is None


def test_q35_split_layout_matches_qemu():
    """3 GiB (>= 0xb0000000) is split at 2 GiB; QEMU's own map agrees (no hashing)."""
    async def main():
        async with VM(LocalHost(), "verify-3g", ["-machine", "q35", "-accel", "tcg", "-m", "3072M", "-S",
                                                 "-nodefaults", "-no-user-config"]) as vm:
            return await verify.qemu_ram_ranges(vm)

    reported = asyncio.run(main())
    verify.check_ranges(verify.guest_ram_ranges(3072), reported)
    assert any(r.gpa == 1 << 32 and r.size == 1 << 30 for r in reported)
    with pytest.raises(MeasurementError):
        verify.check_ranges((RamRange("x", 0x80000000, PAGE),), reported)     # the PCI hole


def test_hash_refuses_a_running_guest():
    async def main():
        async with VM(LocalHost(), "verify-run", ["-machine", "q35", "-accel", "tcg", "-m", "16M",
                                                  "-nodefaults", "-no-user-config"]) as vm:
            with pytest.raises(MeasurementError, match="is running"):
                await verify.hash_guest_ram(vm, verify.guest_ram_ranges(16))

    asyncio.run(main())


def test_hash_timeout_leaves_qemu_usable_and_no_hasher():
    """A side that cannot finish in time: QEMUError, the hasher is stopped, and
    QEMU (whose pmemsave then fails on the closed FIFO) answers QMP again."""
    from harness.errors import QEMUError

    async def main():
        async with VM(LocalHost(), "verify-late", ["-machine", "q35", "-accel", "tcg", "-m", "512M", "-S",
                                                   "-nodefaults", "-no-user-config"]) as vm:
            with pytest.raises((QEMUError, MeasurementError)) as exc:
                await verify.hash_guest_ram(vm, verify.guest_ram_ranges(512), timeout=0.02)
            t0 = time.monotonic()
            status = await vm.cmd("query-status", timeout=20)
            return exc.value, status, time.monotonic() - t0, _ramhashers()

    err, status, waited, hashers = asyncio.run(main())
    assert "timed out" in str(err) or "took more than" in str(err)
    assert status["status"] == "prelaunch" and waited < 20
    assert hashers == []


def test_verify_after_a_real_migration(tmp_path):
    """The whole flow on TCG: a paused source whose RAM holds random bytes is
    migrated to a destination started with -S; afterwards, neither running,
    both sides hash equal."""
    from harness.qemu import migration

    mem = 64
    image = tmp_path / "src.ram"
    image.write_bytes(np.random.default_rng(11).bytes(mem * MiB))
    ranges = verify.guest_ram_ranges(mem)
    dst_args = ["-machine", "q35,memory-backend=ram", "-accel", "tcg", "-m", f"{mem}M",
                "-object", f"memory-backend-ram,id=ram,size={mem}M", "-S", "-nodefaults", "-no-user-config",
                *migration.INCOMING_ARGS]

    async def main():
        host = LocalHost()
        async with VM(host, "verify-src", _file_backed(image, mem)) as src, \
                VM(host, "verify-dst", dst_args) as dst:
            uri = await migration.prepare_destination(dst)
            await migration.start(src, uri)
            await migration.release(src)
            await migration.wait_end(src, 60)
            states = ((await src.cmd("query-status"))["status"], (await dst.cmd("query-status"))["status"])
            return states, await verify.verify_migration(src, dst, ranges)

    states, res = asyncio.run(main())
    # the source: finish-migrate, then postmigrate; the -S destination takes on the
    # source's state from before the migration (prelaunch here, paused after a running guest)
    assert states[0] in ("finish-migrate", "postmigrate") and states[1] == "prelaunch", states
    assert res.ok and res.pages == mem * MiB // PAGE - 96, res.first_mismatches
    assert res.src_seconds is not None and res.dst_seconds is not None
