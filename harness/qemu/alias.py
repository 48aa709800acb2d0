"""Aliased guest RAM (``alias_mib``): a large guest on a small host.

The cost of starting dirty logging follows the number of memslot pages and
mapped SPTEs, not the number of distinct host pages behind them.  So a guest
of ``mem`` MiB can be built on ``alias_mib`` MiB of host memory: one shared
file (on tmpfs, ``/dev/shm``) is mapped by ``mem / alias_mib``
``memory-backend-file,share=on`` objects, and each of them is the RAM BAR
(BAR 2) of one ``ivshmem-plain`` PCI device.  Every BAR is one KVM memslot;
all of them point at the same host pages.

Why ivshmem BARs, and not boot RAM plus ``pc-dimm`` s (README "Aliased guests"):

* the guest kernel must never use aliased memory as its own RAM (a write at
  one address shows up at every alias).  A BAR is not "System RAM": the kernel
  neither allocates from it nor builds a ``struct page`` array for it
  (64 bytes per 4 KiB page: 32 GiB of guest RAM for a 2 TiB guest, which a
  pc-dimm, even left offline, costs as soon as ACPI hotplug adds it);
* the probe maps a BAR through ``/sys/bus/pci/devices/*/resource2_wc``, which
  ``CONFIG_STRICT_DEVMEM`` allows (``/dev/mem`` of hotplugged "System RAM" it
  forbids), in windows, so the guest's own page tables stay small;
* QEMU migrates such a BAR as RAM with dirty logging: ``ivshmem-plain`` calls
  ``vmstate_register_ram()`` on its memory region (a migratable RAM block,
  hence in the dirty-log start and in every bitmap sync) when ``master=on``;
  with ``master=off`` it registers a migration blocker instead.

Limits, checked before anything starts (:func:`check`):

* a PCI BAR is a power of two: ``alias_mib`` must be one;
* ``mem`` must be a multiple of ``alias_mib`` (each device aliases the whole
  file; a remainder would need a second, smaller file);
* the devices sit on q35's root bus, slots 2..30 with 8 functions each:
  :data:`MAX_DEVICES`;
* KVM: one memslot per device plus the machine's own (:data:`BASE_MEMSLOTS`)
  within :data:`KVM_MIN_USER_MEMSLOTS`, and one memslot at most
  :data:`KVM_MAX_SLOT_MIB`;
* guest physical address bits: the BARs sit above 4 GiB, naturally aligned
  (:func:`address_bits_needed`); TCG's ``-cpu max`` has 40 bits (1 TiB), KVM's
  ``-cpu host`` the host's.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Iterator, List, Tuple

from harness.errors import best_effort
from harness.hosts.base import QUICK_COMMAND_TIMEOUT_S, Host

log = logging.getLogger(__name__)

#: RAM the guest kernel gets for itself (kernel, initramfs, probe, the probe's
#: window page tables): the Debian guest boots in 128 MiB; 256 leaves room
OWN_RAM_MIB = 256
#: q35 root-bus slots the alias devices use (slot 0 is the host bridge, 1 is
#: left for the auto-placed virtio-serial, 31 is the ICH9) and functions per slot
FIRST_SLOT, LAST_SLOT, FUNCTIONS = 2, 30, 8
MAX_DEVICES = (LAST_SLOT - FIRST_SLOT + 1) * FUNCTIONS
#: x86 KVM_USER_MEM_SLOTS of the kernels the series targets (509 since Linux 4.2; 32764 in 6.x)
KVM_MIN_USER_MEMSLOTS = 509
#: memslots of a q35 guest besides the aliases (low/high RAM, BIOS, option ROMs, VGA windows), with slack
BASE_MEMSLOTS = 16
#: KVM_MEM_MAX_NR_PAGES of 5.x/6.1 kernels: (2^31 - 1) pages of 4 KiB per memslot
KVM_MAX_SLOT_MIB = ((1 << 31) - 1) * 4 // 1024
#: smallest alias: a 2 MiB page (hugetlb alignment; below it nothing is gained)
MIN_ALIAS_MIB = 2
#: guest physical address bits of TCG's -cpu max in QEMU 7.2 (TCG_PHYS_ADDR_BITS)
TCG_PHYS_BITS = 40
#: the memory backend ids and the device ids (``alias<N>``)
BACKEND_PREFIX = "migstall-alias"
#: the shared file's name in the run's shm directory
ALIAS_FILE = "alias-ram"
#: where the shared file lives on the QEMU host: tmpfs, so its pages are memory
SHM_DIR = "/dev/shm"
#: QEMU's q35 default 64-bit PCI hole (32 GiB); the plan widens it to hold the BARs
Q35_HOLE64_DEFAULT_MIB = 32 * 1024


@dataclass(frozen=True)
class AliasLayout:
    """How an aliased guest's RAM is laid out."""

    mem_mib: int                 #: aliased guest RAM (the ``guest_mem_mib`` column)
    alias_mib: int               #: host memory behind it: the shared file
    own_mib: int = OWN_RAM_MIB   #: the guest kernel's own RAM (not aliased)

    @property
    def devices(self) -> int:
        return self.mem_mib // self.alias_mib

    @property
    def memslots(self) -> int:
        return self.devices + BASE_MEMSLOTS

    def addresses(self) -> List[str]:
        """PCI ``addr`` of each device: slot.function, slots from FIRST_SLOT."""
        return [f"{FIRST_SLOT + i // FUNCTIONS:#04x}.{i % FUNCTIONS}" for i in range(self.devices)]


def is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def address_bits_needed(layout: AliasLayout) -> int:
    """Guest physical address bits the BARs need: above 4 GiB (q35 keeps guest
    RAM below 4 GiB at this ``own_mib``), each BAR aligned to its size."""
    base_mib = max(4096, layout.alias_mib)       # the first BAR: 4 GiB rounded up to the BAR's alignment
    top_mib = base_mib + layout.mem_mib
    bits = 0
    while (1 << bits) < top_mib:
        bits += 1
    return bits + 20


def check(mem_mib: int, alias_mib: int) -> List[Tuple[str, str, str]]:
    """Problems of an aliased layout, as (key, problem, fix); [] if none."""
    out: List[Tuple[str, str, str]] = []
    if alias_mib < MIN_ALIAS_MIB or not is_power_of_two(alias_mib):
        lo = 1 << max(alias_mib.bit_length() - 1, 1)
        out.append(("alias_mib", f"{alias_mib} MiB is not a power of two of at least {MIN_ALIAS_MIB} MiB "
                    "(each alias is a PCI BAR, and BAR sizes are powers of two)",
                    f"give a power of two such as {max(lo, MIN_ALIAS_MIB)} or {max(lo * 2, MIN_ALIAS_MIB)}"))
        return out
    if alias_mib > KVM_MAX_SLOT_MIB:
        out.append(("alias_mib", f"{alias_mib} MiB is larger than one KVM memslot ({KVM_MAX_SLOT_MIB} MiB, "
                    "KVM_MEM_MAX_NR_PAGES)", "give a smaller alias_mib"))
        return out
    if mem_mib % alias_mib:
        down, up = mem_mib // alias_mib * alias_mib, (mem_mib // alias_mib + 1) * alias_mib
        out.append(("mem", f"{mem_mib} MiB is not a multiple of alias_mib {alias_mib} MiB (each alias "
                    "device maps the whole shared file)",
                    f"give mem {up}M" + (f" or {down}M" if down else "") + ", or another alias_mib"))
        return out
    layout = AliasLayout(mem_mib, alias_mib)
    if layout.devices > MAX_DEVICES:
        need = alias_mib
        while mem_mib // need > MAX_DEVICES:
            need *= 2
        out.append(("alias_mib", f"{alias_mib} MiB needs {layout.devices} alias devices for {mem_mib} MiB, "
                    f"more than the {MAX_DEVICES} PCI functions of q35's root bus (slots {FIRST_SLOT}-"
                    f"{LAST_SLOT} x {FUNCTIONS})", f"give alias_mib {need} or more"))
    elif layout.memslots > KVM_MIN_USER_MEMSLOTS:
        out.append(("alias_mib", f"{layout.devices} alias memslots plus the machine's {BASE_MEMSLOTS} exceed "
                    f"x86 KVM's {KVM_MIN_USER_MEMSLOTS} user memslots (KVM_USER_MEM_SLOTS)",
                    "give a larger alias_mib"))
    return out


def hole64_mib(layout: AliasLayout) -> int:
    """Size of q35's 64-bit PCI hole (``q35-pcihost.pci-hole64-size``) that holds
    every alias BAR with the first one's alignment: at least QEMU's default."""
    need = layout.mem_mib + layout.alias_mib
    need = -(-need // 1024) * 1024                 # QEMU rounds the hole's end to 1 GiB
    return max(Q35_HOLE64_DEFAULT_MIB, need)


def qemu_args(layout: AliasLayout, path: str) -> List[str]:
    """The alias backends and devices: ``memory-backend-file,share=on`` objects
    on the one file ``path``, each the BAR of an ``ivshmem-plain,master=on``
    (master: QEMU migrates the BAR as RAM; otherwise it blocks migration)."""
    args = ["-global", f"q35-pcihost.pci-hole64-size={hole64_mib(layout)}M"]
    path_opt = path.replace(",", ",,")
    for i, addr in enumerate(layout.addresses()):
        backend = f"{BACKEND_PREFIX}{i}"
        args += ["-object", f"memory-backend-file,id={backend},size={layout.alias_mib}M,mem-path={path_opt},"
                            "share=on"]
        multi = ",multifunction=on" if addr.endswith(".0") else ""
        args += ["-device", f"ivshmem-plain,id=alias{i},memdev={backend},master=on,bus=pcie.0,addr={addr}{multi}"]
    return args


@contextlib.contextmanager
def shm_dir(host: Host, prefix: str) -> Iterator[str]:
    """A fresh directory in :data:`SHM_DIR` on ``host`` for one QEMU's shared
    file (QEMU creates the file at its first backend, the others open it);
    removed with the file on exit, once that QEMU is gone, unless
    :func:`release` removed it earlier."""
    path = host.run(["mktemp", "-d", f"{SHM_DIR}/{prefix}XXXXXX"], timeout=QUICK_COMMAND_TIMEOUT_S).text.strip()
    try:
        yield path
    finally:
        release(host, path)


def release(host: Host, directory: str) -> None:
    """Remove a :func:`shm_dir` directory and its shared file, also as soon as
    its QEMU has mapped every alias, that is once QEMU has launched: tmpfs
    keeps the pages while a mapping holds them and frees them when that QEMU
    exits, so a harness killed later (SIGKILL: no ``finally`` runs; the reaper
    stops the QEMU) leaves nothing in /dev/shm.  Idempotent; a failure is
    logged, not raised."""
    if not directory.startswith(f"{SHM_DIR}/"):
        raise ValueError(f"not a shared-file directory under {SHM_DIR}: {directory!r}")
    with best_effort(f"removing {directory} (aliased guest RAM)", log):
        host.run(["rm", "-rf", "--", directory], timeout=QUICK_COMMAND_TIMEOUT_S)
