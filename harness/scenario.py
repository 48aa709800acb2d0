"""Scenarios: what one run does, as a frozen dataclass, and where they come from.

A scenario comes from command-line flags (one run) or from a TOML file that
expands to a matrix.  Either way the whole list is validated before any QEMU
starts: :func:`scenarios_from_args` first checks everything that needs no host
(:func:`check_static`), then gathers :class:`HostFacts` once and checks the rest
(:func:`validate`).  Every problem is a :class:`~harness.errors.UserError` whose
message is one line naming where (file and entry, or flag), the key, and the fix.

Scenario file format (see README "Scenario files")::

    description = "optional text"

    [defaults]                 # optional; applies to every [[scenario]]
    vcpus = 2
    repeat = 3

    [[scenario]]
    name = "small"
    mem = ["512M", "1G"]       # list-valued: mem, vcpus, backing, dirty_log_mode
    backing = ["anon", "thp"]
    touch = 256                # MiB (or "256M")

Each ``[[scenario]]`` expands to mem x vcpus x backing x dirty_log_mode x repeat
runs.  The repeat index is the outermost loop, so that the repeats of one
combination are spread over the whole run (slow drift of the host does not land
on a single combination).  Command-line flags given together with ``--scenario``
override the file's value for every entry (``make test-host`` adds
``--accel kvm`` this way).
"""

from __future__ import annotations

import argparse
import itertools
import logging
import math
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union, get_args, get_origin

from pydantic import BeforeValidator, Field, field_validator

from harness import config_schema as schema
from harness.config_schema import ConfigModel
from harness.errors import KVMUnusable, UserError
from harness import hostmem
from harness.hosts.facts import HugePool
from harness.qemu import alias

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on older Pythons only
    import tomli as tomllib

log = logging.getLogger(__name__)

BACKINGS = ("anon", "thp", "hugetlb2m", "hugetlb1g", "memfd")
ACCELS = ("auto", "kvm", "tcg")
DIRTY_LOG_MODES = ("default", "legacy", "ring")
LOOPS = ("pio", "write", "cpu")
END_ACTIONS = ("complete", "cancel")

#: smallest guest migstall boots (Debian kernel + busybox initramfs + probe)
MIN_MEM_MIB = 128
#: memory the guest keeps for its kernel and initramfs: touch_mib may not exceed mem_mib - this
GUEST_RESERVED_MIB = 64
#: QEMU's pc/q35 limit is 255 vCPUs without an IOMMU/x2APIC setup; the probe is tested far below it
MAX_VCPUS = 255
#: KVM_DIRTY_RING_MAX_ENTRIES; QEMU documents 1024 as the smallest useful ring
DIRTY_RING_MIN, DIRTY_RING_MAX = 1024, 65536
HUGETLB_PAGE_KIB = {"hugetlb2m": 2048, "hugetlb1g": 1048576}
#: cpu models that only exist with KVM
KVM_ONLY_CPU_MODELS = ("host",)


@dataclass(frozen=True)
class Scenario:
    name: str = "adhoc"
    mem_mib: int = 1024
    vcpus: int = 2
    backing: str = "anon"
    prealloc: bool = False
    accel: str = "auto"             # resolved to kvm|tcg before the run
    cpu_model: str = ""             # "" = host for kvm, max for tcg
    dirty_log_mode: str = "default"
    dirty_ring: int = 0             # entries, with dirty_log_mode = ring
    touch_mib: int = 0              # 0 = as much as the guest can spare
    loops: Tuple[str, ...] = ()     # per vCPU; () = vCPU0 pio, others write
    threshold_us: int = 50
    baseline_s: float = 2.0
    end_action: str = "complete"    # complete | cancel
    cancel_after_s: float = 1.0     # with end_action = cancel: after MIGRATION_PASS 1
    margin_ms: float = 200.0        # stall window = [migrate, first pass + margin]
    ready_timeout_s: float = 300.0
    migration_timeout_s: float = 600.0
    repeat: int = 1                 # 1-based index of this repeat
    overcommit: bool = False        # allow mem_mib > host memory
    qemu: str = ""                  # "" = qemu-system-x86_64 on the host's PATH
    guest_kernel: str = ""          # "" = Debian's linux-image, cached
    l1_cmdline: str = ""            # virtual host only: extra L1 kernel args (e.g. kvm.tdp_mmu=0)
    verify: bool = False            # hash guest RAM on both sides after a completed migration (cancel: a second one)
    alias_mib: int = 0              # > 0: guest RAM aliased onto this much host memory (harness.qemu.alias)
    alias_complete: bool = False    # an aliased guest may complete its migration (sends every alias)
    # Where the scenario came from, for error messages only (not compared):
    # "" = command-line flags, else "FILE [[scenario]] #N".
    origin: str = field(default="", compare=False)
    # Keys set by command-line flags (they override the file), for error messages.
    flag_keys: Tuple[str, ...] = field(default=(), compare=False)

    def loop_for(self, vcpu: int) -> str:
        if self.loops:
            return self.loops[min(vcpu, len(self.loops) - 1)]
        return "pio" if vcpu == 0 else "write"

    @property
    def loop_list(self) -> Tuple[str, ...]:
        return tuple(self.loop_for(i) for i in range(self.vcpus))

    def validate(self, facts: "HostFacts") -> None:
        """See :func:`validate`."""
        validate(self, facts)


#: keys that may be lists in a file; each list is one axis of the matrix
MATRIX_KEYS = ("mem", "vcpus", "backing", "dirty_log_mode")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_SIZE_RE = re.compile(r"^(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?$", re.IGNORECASE)
_SIZE_FACTOR = {"": 1.0, "K": 1 / 1024, "M": 1.0, "G": 1024.0, "T": 1024.0 * 1024}


def parse_size_mib(value: Any) -> int:
    """``512`` / ``"512"`` / ``"512M"`` / ``"1G"`` / ``"1.5GiB"`` -> MiB.  Plain numbers are MiB.

    Raises ValueError with a short reason (callers wrap it into a UserError)."""
    if isinstance(value, bool):
        raise ValueError("not a size")
    if isinstance(value, int):
        mib = float(value)
    elif isinstance(value, float):
        mib = value
    elif isinstance(value, str):
        m = _SIZE_RE.match(value.strip())
        if not m:
            raise ValueError("not a size")
        mib = float(m.group(1)) * _SIZE_FACTOR[m.group(2).upper()]
    else:
        raise ValueError("not a size")
    if not math.isfinite(mib) or mib < 0:
        raise ValueError("not a size")
    if mib != int(mib):
        raise ValueError("not a whole number of MiB")
    return int(mib)


# --- the schema: one [defaults] / [[scenario]] table / the command-line flags ------

def _size(value: Any) -> int:
    try:
        return parse_size_mib(value)
    except ValueError as exc:
        shown = f"{value!r}" if not isinstance(value, (int, float)) else f"{value}"
        why = "" if str(exc) == "not a size" else f" ({exc})"
        raise ValueError(f"{shown} is not a size{why}; use MiB (512) or a suffix M/G/T (512M, 1G)") from None


def _loops(value: Any) -> Tuple[str, ...]:
    if isinstance(value, str):
        items = [v.strip() for v in value.split(",")]
    elif isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        items = [v.strip() for v in value]
    else:
        raise ValueError(f"{value!r} is not a list such as [\"pio\", \"write\"]; fix the value")
    if not items or any(not v for v in items):
        raise ValueError(f"{value!r} has an empty item; "
                         f"give one loop per vCPU from {', '.join(LOOPS)}, e.g. pio,write")
    return tuple(items)


def _axis(value: Any) -> List[Any]:
    """A matrix key: one value, or a list of them (one axis of the matrix)."""
    if isinstance(value, list):
        if not value:
            raise ValueError("is an empty list; give at least one value")
        return value
    return [value]


Size = Annotated[int, BeforeValidator(_size)]
Loops = Annotated[Tuple[str, ...], BeforeValidator(_loops)]
SizeAxis = Annotated[List[Size], BeforeValidator(_axis)]
IntAxis = Annotated[List[int], BeforeValidator(_axis)]
StrAxis = Annotated[List[str], BeforeValidator(_axis)]


def _key(flag: Optional[str], metavar: Optional[str], description: str, field: Optional[str] = None) -> Any:
    """A scenario key: its command-line flag (None: file only) and the flag's
    metavar, its help text (``migstall run --help``) and its :class:`Scenario`
    field (default: the key's own name)."""
    return Field(default=None, description=description,
                 json_schema_extra={"flag": flag, "metavar": metavar, "field": field})


class ScenarioTable(ConfigModel):
    """One ``[defaults]`` or ``[[scenario]]`` table, or the scenario flags of one run.
    Every key is optional (None: not given); lists are matrix axes.  The order is
    that of ``migstall run --help``."""

    name: Optional[str] = _key("--name", None, "scenario name written to the CSV (default: adhoc)")
    mem: Optional[SizeAxis] = _key(
        "--mem", "SIZE", "guest memory: MiB (512) or with a suffix (512M, 1G); default 1G", "mem_mib")
    vcpus: Optional[IntAxis] = _key(
        "--vcpus", "N", "vCPUs (default 2; at most the host's CPUs without --overcommit)")
    backing: Optional[StrAxis] = _key(
        "--backing", "KIND", f"guest RAM backing: {'|'.join(BACKINGS)} (default anon)")
    prealloc: Optional[bool] = _key("--prealloc", None, "preallocate guest RAM in QEMU")
    accel: Optional[str] = _key("--accel", "ACCEL", "auto|kvm|tcg (default auto: kvm where usable, else tcg)")
    cpu_model: Optional[str] = _key(
        "--cpu-model", "MODEL", "QEMU -cpu model (default host under kvm, max under tcg)")
    dirty_log_mode: Optional[StrAxis] = _key(
        "--dirty-log-mode", "MODE",
        "default (QEMU's choice) | legacy (no manual protect) | ring (needs --dirty-ring); kvm only except default")
    dirty_ring: Optional[int] = _key(
        "--dirty-ring", "N", "dirty ring entries per vCPU with --dirty-log-mode ring (power of two, 1024..65536)")
    touch: Optional[Size] = _key(
        "--touch", "MIB", "MiB the probe prefaults (default 0 = as much as the guest can spare)", "touch_mib")
    loops: Optional[Loops] = _key(
        "--loops", "L,L,..",
        "loop per vCPU: pio,write,cpu (default pio for vCPU0, write for the rest; the last repeats)")
    threshold_us: Optional[int] = _key("--threshold-us", "US", "record guest gaps at or above this (default 50)")
    baseline_s: Optional[float] = _key("--baseline-s", "S", "baseline window before migrate (default 2)")
    end: Optional[str] = _key(
        "--end", "END", "complete|cancel: let migration finish, or migrate_cancel (default complete)", "end_action")
    cancel_after_s: Optional[float] = _key(
        "--cancel-after-s", "S", "with --end cancel: seconds after the first pass (default 1)")
    margin_ms: Optional[float] = _key(
        "--margin-ms", "MS", "stall window ends this long after the first pass (default 200)")
    repeat: Optional[int] = _key("--repeat", "N", "runs of each scenario (default 1)")
    overcommit: Optional[bool] = _key(
        "--overcommit", None, "allow more guest memory or vCPUs than the host has")
    verify: Optional[bool] = _key(
        "--verify", None, "after a completed migration, compare guest RAM on both sides page by page "
        "(the write loops keep writing until the source stops); with --end cancel, the cancelled migration "
        "is followed by a second one, to a new destination, that completes and is compared")
    alias_mib: Optional[Size] = _key(
        "--alias-mib", "MIB", "alias the guest's RAM (mem) onto this much host memory: one shared file, "
        "mapped mem/alias times as ivshmem BARs (a power of two; mem a multiple of it); default 0 = no aliasing")
    alias_complete: Optional[bool] = _key(
        "--alias-complete", None, "let an aliased guest's migration complete (it sends every alias); "
        "aliased guests end with cancel otherwise")
    qemu: Optional[str] = _key("--qemu", "PATH", "QEMU binary on the host (default qemu-system-x86_64 on PATH)")
    guest_kernel: Optional[str] = _key(
        "--guest-kernel", "PATH", "guest kernel (default Debian's linux-image, cached)")
    ready_timeout_s: Optional[float] = _key(
        "--ready-timeout", "S", "seconds to wait for the probe's READY (default 300)")
    migration_timeout_s: Optional[float] = _key(
        "--migration-timeout", "S", "seconds a migration may take (default 600)")
    l1_cmdline: Optional[str] = _key(
        None, None, "virtual host only: extra L1 kernel arguments (e.g. kvm.tdp_mmu=0); file only")

    @field_validator("repeat")
    @classmethod
    def _repeat_positive(cls, value: Optional[int]) -> Optional[int]:
        if value is not None and value < 1:
            raise ValueError(f"{value} is below 1; give the number of repeats (1 or more)")
        return value

    def given(self) -> Dict[str, Any]:
        """The keys set in this table, with their (converted) values."""
        return {k: getattr(self, k) for k in self.model_fields_set}


class ScenarioFile(ConfigModel):
    """A scenario TOML file (see the module docstring)."""

    description: Optional[str] = Field(default=None, description="optional text")
    defaults: Optional[ScenarioTable] = Field(default=None, description="applies to every [[scenario]]")
    scenario: Optional[List[ScenarioTable]] = Field(default=None, description="the scenarios")


def _extra(key: str, name: str) -> Any:
    extra = ScenarioTable.model_fields[key].json_schema_extra
    return extra.get(name) if isinstance(extra, dict) else None


#: TOML key -> (Scenario field, command-line flag or None): read off the model
_KEYS: Dict[str, Tuple[str, Optional[str]]] = {
    k: (_extra(k, "field") or k, _extra(k, "flag")) for k in ScenarioTable.model_fields}


def _scalar_type(key: str) -> Any:
    t = ScenarioTable.model_fields[key].annotation
    if get_origin(t) is Union:
        t = next(a for a in get_args(t) if a is not type(None))
    if get_origin(t) is Annotated:
        t = get_args(t)[0]
    if get_origin(t) in (list, List):
        t = get_args(t)[0]
    return t


def _flag_label(key: str) -> str:
    return _KEYS[key][1] or key if key in _KEYS else key


def _from_flags(flags: Mapping[str, Any]) -> Dict[str, Any]:
    """Command-line values (strings) checked by the same model as a file's table.

    A number flag is converted first (``--vcpus 2``); what does not look like one
    stays a string and fails the model's strict type check, naming the flag."""
    raw: Dict[str, Any] = {}
    for key, value in flags.items():
        kind = _scalar_type(key) if key in _KEYS else None
        if isinstance(value, str) and kind is int and re.fullmatch(r"-?\d+", value.strip()):
            value = int(value)
        elif isinstance(value, str) and kind is float:
            try:
                value = float(value)
            except ValueError:
                pass            # reported by the model: --baseline-s 'x' is not a number
        raw[key] = value
    return schema.validate(ScenarioTable, raw, None, label=_flag_label).given()


# --- where a problem is: names the file/entry or the flag ----------------------

def _key_name(s_origin: str, flag_keys: Sequence[str], key: str) -> str:
    flag = _KEYS[key][1] if key in _KEYS else None
    if (not s_origin or key in flag_keys) and flag:
        return flag
    return key


def _err(s: Scenario, key: str, problem: str, fix: str) -> UserError:
    where = f"{s.origin}: " if s.origin and key not in s.flag_keys else ""
    return UserError(f"{where}{_key_name(s.origin, s.flag_keys, key)} {problem}; {fix}")


# --- building Scenario objects from checked tables ------------------------------

def _expand(given: Mapping[str, Any], origin: str, flag_keys: Sequence[str]) -> List[Scenario]:
    """One checked entry (defaults | entry | flags) -> the list of its matrix scenarios."""
    values = dict(given)
    if values.get("alias_mib"):         # README "Aliased guests": what an aliased guest does unless told
        values.setdefault("end", "cancel")          # it measures the start, then cancels
        values.setdefault("backing", ["memfd"])     # its RAM is one shared tmpfs file
    repeats = values.pop("repeat", 1)
    axis_keys = [k for k in MATRIX_KEYS if k in values]
    base = {_KEYS[k][0]: v for k, v in values.items() if k not in axis_keys}
    out = []
    for r in range(1, repeats + 1):
        for combo in itertools.product(*(values[k] for k in axis_keys)):
            fields = dict(base)
            fields.update({_KEYS[k][0]: v for k, v in zip(axis_keys, combo)})
            out.append(Scenario(**fields, repeat=r, origin=origin, flag_keys=tuple(flag_keys)))
    return out


def _read_toml(path: Path) -> Dict[str, Any]:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"scenario file {path} does not exist; check the path given to --scenario") from None
    except IsADirectoryError:
        raise UserError(f"scenario file {path} is a directory; give a .toml file to --scenario") from None
    except OSError as exc:
        raise UserError(f"scenario file {path} cannot be read ({exc.strerror}); check its permissions") from None
    try:
        return tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text; save the scenario file as UTF-8 TOML") from None
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"{path} is not valid TOML: {' '.join(str(exc).split())}; fix the syntax there") from None


def load_scenarios(path: Any, overrides: Optional[Mapping[str, Any]] = None) -> List[Scenario]:
    """Read a scenario TOML file and expand it (see the module docstring).

    ``overrides`` maps TOML keys to values given as command-line flags; they
    replace the file's value (a list included) in every entry.  Only types and
    names are checked here; run :func:`check_static` / :func:`validate` next.
    """
    path = Path(path)
    doc = schema.validate(ScenarioFile, _read_toml(path), str(path))
    flags = _from_flags(overrides or {})
    if not doc.scenario:
        raise UserError(f"{path} has no [[scenario]] entries; add at least one [[scenario]] table")
    defaults = doc.defaults.given() if doc.defaults is not None else {}
    out: List[Scenario] = []
    for i, entry in enumerate(doc.scenario, 1):
        given = {**defaults, **entry.given()}
        given.setdefault("name", f"{path.stem}-{i}")
        for key in ("guest_kernel",):  # local paths: relative to the file
            value = given.get(key)
            if key not in flags and value and not os.path.isabs(value):
                given[key] = str((path.parent / value))
        given.update(flags)
        origin = f"{path} [[scenario]] #{i}"
        if "name" not in flags:
            origin += f" ({given['name']})"
        out.extend(_expand(given, origin, tuple(flags)))
    return out


# --- validation ---------------------------------------------------------------

@dataclass(frozen=True)
class HostFacts:
    """What validation needs to know about the host (see :func:`gather_host_facts`)."""

    mem_total_mib: int
    mem_available_mib: int
    online_cpus: int
    hugepages: Mapping[int, HugePool]     # page size in KiB -> pool
    thp_mode: str                         # always | madvise | never | "" (no THP)
    accel_auto: str                       # what "auto" resolves to here: kvm | tcg
    kvm_usable: bool
    kvm_reason: str                       # one line: why KVM is (un)usable
    executables: Mapping[str, str]        # scenario.qemu ("" = default) -> resolved path, "" if missing
    supports_l1_cmdline: bool = False     # the host can boot with a scenario's l1_cmdline
    phys_bits: int = 0                    # the CPU's physical address bits (0: unknown)
    shm_avail_mib: int = -1               # free MiB in /dev/shm, where aliased RAM goes (-1: unknown)
    vcpus_beyond_cpus_ok: bool = False    # the host's CPU count is migstall's choice (the virtual host's L1)


def check_static(s: Scenario) -> None:
    """Checks that need no host: names, ranges, combinations.  Raises UserError."""
    if not _NAME_RE.match(s.name):
        raise _err(s, "name", f"{s.name!r} is not a usable name",
                   "use up to 64 letters, digits, '.', '_' or '-' (it names result files)")
    if s.mem_mib < MIN_MEM_MIB:
        raise _err(s, "mem", f"{s.mem_mib} MiB is below the {MIN_MEM_MIB} MiB minimum",
                   f"give at least {MIN_MEM_MIB}M (e.g. 512M or 1G)")
    if s.vcpus < 1:
        raise _err(s, "vcpus", f"{s.vcpus} is not a vCPU count", "give 1 or more vCPUs (e.g. 2)")
    if s.vcpus > MAX_VCPUS:
        raise _err(s, "vcpus", f"{s.vcpus} is above QEMU's {MAX_VCPUS}", f"give at most {MAX_VCPUS} vCPUs")
    for key, given, allowed in (("backing", s.backing, BACKINGS), ("accel", s.accel, ACCELS),
                                ("dirty_log_mode", s.dirty_log_mode, DIRTY_LOG_MODES),
                                ("end", s.end_action, END_ACTIONS)):
        if given not in allowed:
            raise _err(s, key, f"{given!r} is unknown", f"use one of {', '.join(allowed)}")
    for loop in s.loops:
        if loop not in LOOPS:
            raise _err(s, "loops", f"has unknown loop {loop!r}", f"use {', '.join(LOOPS)} (one per vCPU)")
    if len(s.loops) > s.vcpus:
        raise _err(s, "loops", f"names {len(s.loops)} loops for {s.vcpus} vCPUs",
                   "give at most one loop per vCPU (the last one repeats)")
    page_kib = HUGETLB_PAGE_KIB.get(s.backing)
    if page_kib and s.mem_mib * 1024 % page_kib:
        raise _err(s, "mem", f"{s.mem_mib} MiB is not a multiple of the {page_kib // 1024} MiB page of {s.backing}",
                   f"round it to a multiple of {page_kib // 1024}M")
    if s.alias_mib or s.alias_complete:
        _check_alias(s)
    elif s.touch_mib < 0 or s.touch_mib > s.mem_mib - GUEST_RESERVED_MIB:
        raise _err(s, "touch", f"{s.touch_mib} MiB does not fit a {s.mem_mib} MiB guest",
                   f"touch at most mem - {GUEST_RESERVED_MIB} MiB ({s.mem_mib - GUEST_RESERVED_MIB}), "
                   "or 0 for as much as fits")
    if s.dirty_log_mode == "ring":
        if not s.dirty_ring:
            raise _err(s, "dirty_ring", "is missing for dirty_log_mode ring",
                       f"give the ring size in entries, a power of two in {DIRTY_RING_MIN}..{DIRTY_RING_MAX} "
                       "(e.g. 4096)")
    if s.dirty_ring:
        if s.dirty_log_mode != "ring":
            raise _err(s, "dirty_ring", f"{s.dirty_ring} needs dirty_log_mode ring",
                       "add --dirty-log-mode ring (dirty_log_mode = \"ring\"), or drop the ring size")
        if not (DIRTY_RING_MIN <= s.dirty_ring <= DIRTY_RING_MAX) or s.dirty_ring & (s.dirty_ring - 1):
            raise _err(s, "dirty_ring", f"{s.dirty_ring} is not a valid ring size",
                       f"give a power of two in {DIRTY_RING_MIN}..{DIRTY_RING_MAX} (e.g. 4096)")
    if s.accel == "tcg":
        _check_tcg(s, "accel")
    if not 1 <= s.threshold_us <= 1_000_000:
        raise _err(s, "threshold_us", f"{s.threshold_us} is out of range", "give 1..1000000 microseconds (default 50)")
    for key, value, lo in (("baseline_s", s.baseline_s, 0.0), ("cancel_after_s", s.cancel_after_s, 0.0),
                           ("margin_ms", s.margin_ms, 0.0)):
        if not math.isfinite(value) or value < lo:
            raise _err(s, key, f"{value:g} is negative or not finite", "give 0 or more")
    for key, value in (("ready_timeout_s", s.ready_timeout_s), ("migration_timeout_s", s.migration_timeout_s)):
        if not math.isfinite(value) or value <= 0:
            raise _err(s, key, f"{value:g} is not a positive number of seconds", "give a timeout above 0")
    if s.repeat < 1:
        raise _err(s, "repeat", f"{s.repeat} is below 1", "give the number of repeats (1 or more)")
    if s.guest_kernel:
        p = Path(s.guest_kernel)
        if not p.is_file():
            raise _err(s, "guest_kernel", f"{s.guest_kernel} does not exist or is not a file",
                       "give the path of a bzImage/vmlinuz, or drop it to use Debian's kernel")
        if not os.access(p, os.R_OK):
            raise _err(s, "guest_kernel", f"{s.guest_kernel} is not readable", "fix its permissions")


#: backings an aliased guest can have: the shared file is on tmpfs (4 KiB pages, shmem like memfd)
ALIAS_BACKINGS = ("memfd",)


def _check_alias(s: Scenario) -> None:
    """An aliased guest (README "Aliased guests"): the layout's limits, and what does not apply to it."""
    if not s.alias_mib:
        raise _err(s, "alias_complete", "is set without alias_mib", "drop it, or give alias_mib")
    for key, problem, fix in alias.check(s.mem_mib, s.alias_mib):
        raise _err(s, key, problem, fix)
    if s.backing not in ALIAS_BACKINGS:
        raise _err(s, "backing", f"{s.backing!r} cannot back aliased RAM, which is one file shared by every alias "
                   f"(a private mapping would copy each alias)", "use backing memfd (a tmpfs file, 4 KiB pages)")
    if s.prealloc:
        raise _err(s, "prealloc", "would make QEMU fault in every alias of an aliased guest at start",
                   "drop prealloc: the probe prefaults the aliased ranges itself (touch)")
    if s.verify:
        raise _err(s, "verify", "does not apply to an aliased guest (every alias shows the same pages, "
                   "and its migration is cancelled)", "drop verify, or drop alias_mib")
    if s.end_action == "complete" and not s.alias_complete:
        raise _err(s, "end", f"complete would send every alias ({s.mem_mib} MiB) to the destination",
                   "use end cancel (the default for aliased guests), or add alias_complete = true "
                   "(--alias-complete) if you mean it")
    if s.touch_mib < 0 or s.touch_mib > s.mem_mib:
        raise _err(s, "touch", f"{s.touch_mib} MiB does not fit the {s.mem_mib} MiB of aliased RAM",
                   f"touch at most {s.mem_mib} MiB, or 0 for all of it")
    if s.accel == "tcg":
        need = alias.address_bits_needed(alias.AliasLayout(s.mem_mib, s.alias_mib))
        if need > alias.TCG_PHYS_BITS:
            raise _err(s, "mem", f"{s.mem_mib} MiB of alias BARs need {need} guest physical address bits, "
                       f"TCG's -cpu max has {alias.TCG_PHYS_BITS}", "give a smaller mem under tcg, or use kvm")


def alias_estimate(s: Scenario, accel: str) -> Optional[hostmem.Estimate]:
    """The host memory an aliased scenario needs (:mod:`harness.hostmem`); None if not aliased."""
    if not s.alias_mib:
        return None
    return hostmem.estimate(alias.AliasLayout(s.mem_mib, s.alias_mib), kvm=accel == "kvm",
                            mapping_kib=HUGETLB_PAGE_KIB.get(s.backing, 4), complete=s.end_action == "complete")


def _check_alias_host(s: Scenario, facts: "HostFacts", accel: str) -> None:
    """What an aliased guest needs of the host: address bits, tmpfs room, the memory estimate."""
    layout = alias.AliasLayout(s.mem_mib, s.alias_mib)
    bits = alias.address_bits_needed(layout)
    if accel == "tcg" and bits > alias.TCG_PHYS_BITS:
        raise _err(s, "mem", f"{s.mem_mib} MiB of alias BARs need {bits} guest physical address bits, "
                   f"TCG's -cpu max has {alias.TCG_PHYS_BITS}", "give a smaller mem under tcg, or use kvm")
    if accel == "kvm" and facts.phys_bits and bits > facts.phys_bits:
        raise _err(s, "mem", f"{s.mem_mib} MiB of alias BARs need {bits} guest physical address bits, the host's "
                   f"CPU has {facts.phys_bits} (-cpu host passes them on)", "give a smaller mem on this host")
    if 0 <= facts.shm_avail_mib < s.alias_mib:
        raise _err(s, "alias_mib", f"{s.alias_mib} MiB does not fit the {facts.shm_avail_mib} MiB free in "
                   f"{alias.SHM_DIR}, where the shared file goes",
                   f"free {alias.SHM_DIR}, enlarge it (mount -o remount,size=...), or give a smaller alias_mib")
    est = alias_estimate(s, accel)
    if est is not None and est.total_mib > facts.mem_available_mib and not s.overcommit:
        raise _err(s, "alias_mib", f"{s.mem_mib} MiB aliased onto {s.alias_mib} MiB needs about {est.total_mib} MiB "
                   f"of host memory, the host has {facts.mem_available_mib} MiB available "
                   f"(estimate: {est.text()})",
                   "give a smaller mem, use 2 MiB pages, or run on a larger host (--overcommit if you mean it)")


def _check_tcg(s: Scenario, because: str) -> None:
    why = "--accel tcg" if because == "accel" else "there is no usable KVM here (accel auto -> tcg)"
    if s.dirty_log_mode in ("legacy", "ring"):
        raise _err(s, "dirty_log_mode", f"{s.dirty_log_mode} needs KVM, but {why}",
                   "use dirty_log_mode default under tcg, or run on a KVM host with --accel kvm")
    if s.cpu_model in KVM_ONLY_CPU_MODELS:
        raise _err(s, "cpu_model", f"{s.cpu_model!r} needs KVM, but {why}",
                   "use --cpu-model max (or leave it empty) under tcg")


def validate(s: Scenario, facts: HostFacts) -> None:
    """Everything :func:`check_static` checks, plus what depends on the host."""
    check_static(s)
    if s.l1_cmdline.strip() and not facts.supports_l1_cmdline:
        raise _err(s, "l1_cmdline", "only the virtual host boots with a scenario's kernel command line",
                   "run with --host virtual, or drop l1_cmdline")
    accel = facts.accel_auto if s.accel == "auto" else s.accel
    if s.accel == "kvm" and not facts.kvm_usable:
        raise KVMUnusable(f"--accel kvm: {facts.kvm_reason}")
    if accel == "tcg" and s.accel == "auto":
        _check_tcg(s, "auto")
    qemu = facts.executables.get(s.qemu, "")
    if not qemu:
        if s.qemu:
            raise _err(s, "qemu", f"{s.qemu} does not exist or is not executable on the host",
                       "give the path of a qemu-system-x86_64 binary")
        raise _err(s, "qemu", "not given and qemu-system-x86_64 is not on the host's PATH",
                   "install qemu-system-x86 (make setup) or pass --qemu PATH")
    if s.vcpus > facts.online_cpus and not s.overcommit:
        if facts.vcpus_beyond_cpus_ok:
            log.info("%s: %d vCPUs share the host's %d CPU(s), which migstall chose (the virtual host's L1); "
                     "baseline stalls rise with it", s.name, s.vcpus, facts.online_cpus)
        else:
            raise _err(s, "vcpus", f"{s.vcpus} exceeds the host's {facts.online_cpus} CPUs (stalls would "
                       "measure host scheduling)", f"give at most {facts.online_cpus}, or add --overcommit")
    page_kib = HUGETLB_PAGE_KIB.get(s.backing)
    if page_kib:
        pool = facts.hugepages.get(page_kib)
        # source and destination both run on this host and both reserve their pages
        need = 2 * s.mem_mib * 1024 // page_kib
        pool_dir = f"/sys/kernel/mm/hugepages/hugepages-{page_kib}kB"
        label = "2 MiB" if page_kib == 2048 else "1 GiB"
        if pool is None:
            raise _err(s, "backing", f"{s.backing} needs {label} hugepages, which this host does not offer",
                       "use backing thp or anon" + (" (1G pages need the pdpe1gb CPU flag)" if page_kib > 2048 else ""))
        if pool.free < need:
            raise _err(s, "backing", f"{s.backing} needs {need} free {label} hugepages for a {s.mem_mib} MiB "
                       f"guest and its migration destination, the pool has {pool.free} free",
                       f"as root: echo {pool.total - pool.free + need} > {pool_dir}/nr_hugepages "
                       f"(or hugepagesz=/hugepages= on the kernel command line)")
    elif s.alias_mib:
        _check_alias_host(s, facts, accel)
    elif s.mem_mib > facts.mem_total_mib and not s.overcommit:
        raise _err(s, "mem", f"{s.mem_mib} MiB is more than the host's {facts.mem_total_mib} MiB",
                   "give a smaller size, or add --overcommit if you mean it")
    if s.backing == "thp" and facts.thp_mode not in ("always", "madvise"):
        raise _err(s, "backing",
                   f"thp needs transparent hugepages, but the host's mode is {facts.thp_mode or 'absent'!r}",
                   "as root: echo madvise > /sys/kernel/mm/transparent_hugepage/enabled, or use backing anon")


def gather_host_facts(host: Any, scenarios: Sequence[Scenario]) -> HostFacts:
    """Read what :func:`validate` needs from ``host`` (one pass for a whole matrix).

    The KVM check (which may boot a guest) runs only if a scenario asks for
    ``auto`` or ``kvm``, once, with the first such scenario's QEMU."""
    from harness.hosts import facts as hostfacts

    mem = hostfacts.read_memory(host)
    aliased = any(s.alias_mib for s in scenarios)
    executables = {q: hostfacts.find_qemu(host, q) for q in sorted({s.qemu for s in scenarios})}
    wants_kvm = [s for s in scenarios if s.accel in ("auto", "kvm")]
    if wants_kvm:
        qemu = executables.get(wants_kvm[0].qemu, "")
        status = hostfacts.kvm_status(host, qemu or None)
        usable = status.usable
        reason = status.reason if usable else f"{status.reason}; {status.fix}"
    else:
        usable, reason = False, "not checked (every scenario asks for tcg)"
    return HostFacts(
        mem_total_mib=mem.total_mib,
        mem_available_mib=mem.available_mib,
        online_cpus=hostfacts.online_cpus(host),
        hugepages={p.page_kib: p for p in hostfacts.hugepage_pools(host)},
        thp_mode=hostfacts.thp_mode(host),
        accel_auto="kvm" if usable else "tcg",
        kvm_usable=usable,
        kvm_reason=reason,
        executables=executables,
        supports_l1_cmdline=bool(getattr(host, "supports_l1_cmdline", False)),
        vcpus_beyond_cpus_ok=bool(getattr(host, "vcpus_beyond_cpus_ok", False)),
        phys_bits=hostfacts.phys_address_bits(host) if aliased else 0,
        shm_avail_mib=hostfacts.free_mib(host, alias.SHM_DIR) if aliased else -1,
    )


# --- command line ---------------------------------------------------------------

def add_scenario_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the scenario flags to a ``run``-like parser.  Every flag defaults to
    None so that, with ``--scenario``, only the flags given override the file."""
    g = parser.add_argument_group("scenario (a file, or flags for one run; flags override the file)")
    g.add_argument("--scenario", metavar="FILE", help="scenario TOML file (a matrix; see README)")
    for key, spec in ScenarioTable.model_fields.items():
        flag = _extra(key, "flag")
        if flag is None:
            continue
        if _scalar_type(key) is bool:
            g.add_argument(flag, action="store_true", default=None, help=spec.description)
        else:
            g.add_argument(flag, metavar=_extra(key, "metavar"), help=spec.description)


def _flag_values(args: argparse.Namespace) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for key, (_, flag) in _KEYS.items():
        if flag is None:
            continue
        value = getattr(args, flag[2:].replace("-", "_"), None)
        if value is not None:
            out[key] = value
    return out


def static_scenarios(args: argparse.Namespace) -> List[Scenario]:
    """The scenario list for ``run`` (``--scenario FILE`` or flags), checked for
    everything that does not depend on the host.  Raises UserError."""
    flags = _flag_values(args)
    if getattr(args, "scenario", None):
        scenarios = load_scenarios(args.scenario, overrides=flags)
    else:
        scenarios = _expand(_from_flags(flags), "", tuple(flags))
    for s in scenarios:
        check_static(s)
    return scenarios


def validate_for_host(scenarios: Sequence[Scenario], host: Any) -> List[Scenario]:
    """Validate ``scenarios`` against ``host``'s facts (UserError, KVMUnusable included)."""
    facts = gather_host_facts(host, scenarios)
    for s in scenarios:
        validate(s, facts)
    return list(scenarios)


def scenarios_from_args(args: argparse.Namespace, host: Any) -> List[Scenario]:
    """The validated scenario list for ``run`` (``--scenario FILE`` or flags).

    Raises UserError (KVMUnusable included) before anything is started."""
    return validate_for_host(static_scenarios(args), host)
