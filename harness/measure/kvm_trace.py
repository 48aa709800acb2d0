"""Kernel-side timing of dirty-log enable/disable through tracefs (no bcc).

Mechanism, on any Linux host reached through the Host API (as root):

* a kprobe (``p:``) and a kretprobe (``r:``) event on each function of
  :data:`CANDIDATES` that the running kernel's ``available_filter_functions``
  lists (static functions may be inlined, and names differ by version), in a
  private event group ``migstall_<host unix seconds>_<6 hex>`` (see :func:`group_name`);
* a private tracefs *instance* (``instances/<group>``) with its own
  ring buffer, ``trace_clock`` (``mono``) and ``tracing_on``, so the global
  tracer, its buffer and its ``tracing_on`` are never touched;
* the KERNEL work's tracepoints ``kvm/kvm_migstall_*`` are enabled in the same
  instance when the running kernel has them (their lines go to the sidecar);
* ``trace_marker`` lines ``migstall-phase NAME`` split the trace into phases
  (the runner marks ``enable`` right before QMP ``migrate`` and ``disable`` right
  before ``migrate_cancel``).

Definitions (milliseconds):

* ``kvm_enable_ms``: the time KVM spends in the MMU work of enabling dirty
  logging in the ``enable`` phase: the wall time covered by calls of the
  :data:`WALKS` functions (write protection, D-bit clearing, huge page
  splitting; ``kvm_mmu_slot_apply_flags`` itself where it is not inlined; the
  5.0 and patched-series names), per thread, outermost calls only (a nested
  call is not counted twice).  ``0`` when memslot flags changed but KVM walked
  nothing (manual protect with initially-set); empty when no memslot change
  was seen at all (TCG, no tracefs).
  The memslot ioctls themselves are also timed (``_memslot_ioctls`` in the
  breakdown): calls of ``kvm_set_memslot`` (else ``__kvm_set_memory_region``)
  whose ``change`` argument (fetched by the kprobe on x86_64) is
  ``KVM_MR_FLAGS_ONLY``, i.e. one per memslot whose ``KVM_MEM_LOG_DIRTY_PAGES``
  flag QEMU toggles.  They add the dirty bitmap allocation, the memslot
  swap (SRCU synchronisation) and the TLB flush, which under nested TCG are
  dominated by CPU contention, so they are not the headline figure.
* ``kvm_disable_ms``: the same over the ``disable`` phase (cancel), where the
  walk is ``kvm_mmu_zap_collapsible_sptes`` (and 5.0's ``vmx_slot_disable_log_dirty``).
* breakdown (sidecar): per phase, per probed function: total ms (inclusive of
  callees), call count and max ms.

Setup reports every tracefs write that fails (``error STEP REASON`` lines of
the script): a failed ``mkdir`` of the instance raises :class:`HostError` (as
before); when the probe events or ``tracing_on`` cannot be switched on, tracing
is torn down and left unavailable (empty columns, a warning with the reason);
the other steps (``trace_clock``, ``buffer_size_kb``, a tracepoint) only warn.

Teardown (``__exit__``, also after errors or Ctrl-C): the instance is switched
off and removed, then every probe of our group is deleted from ``kprobe_events``
(appending ``-:group/event``; ``kprobe_events`` is never truncated, so other
users' probes survive).

Left-overs: a migstall that is SIGKILLed or loses its SSH connection never tears
down, and its probes stay armed on the host.  So setup first sweeps stale
groups: every ``migstall_*`` group (probes and instance) whose creation time,
the host's clock in its name, is more than :data:`STALE_GROUP_S` before the
host's ``date +%s``.  Groups of older migstall versions (``migstall_<8 hex>``,
no time in the name) are dated by the modification time of their instance
directory, else of their ``events/<group>`` directory, and kept when neither can
be read.  Younger groups are never touched: another migstall run may be using
them on the same host.
"""

from __future__ import annotations

import logging
import re
import secrets
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from harness import sh
from harness.errors import HostError
from harness.hosts.base import Host
from harness.hosts.facts import RECORDED_KVM_PARAMS

log = logging.getLogger(__name__)

TRACEFS_CANDIDATES = ("/sys/kernel/tracing", "/sys/kernel/debug/tracing")
#: anchor functions for kvm_enable_ms / kvm_disable_ms, first available wins
ANCHORS = ("kvm_set_memslot", "__kvm_set_memory_region")
#: the MMU work of a dirty-log flag change: kvm_enable_ms/kvm_disable_ms are the
#: time covered by these (outermost calls; nested ones are not counted twice)
WALKS = (
    "kvm_mmu_slot_apply_flags",
    "vmx_slot_enable_log_dirty", "vmx_slot_disable_log_dirty", "kvm_mmu_write_protect_all_pages",
    "kvm_mmu_slot_remove_write_access", "kvm_mmu_slot_leaf_clear_dirty",
    "kvm_mmu_slot_largepage_remove_write_access", "kvm_mmu_slot_set_dirty",
    "kvm_mmu_slot_try_split_huge_pages", "kvm_mmu_zap_collapsible_sptes",
    "kvm_tdp_mmu_wrprot_slot", "kvm_tdp_mmu_clear_dirty_slot",
    # patches/fast-write-protect-6.1: the roots write-protected at enable
    "kvm_mmu_write_protect_all",
)
#: functions probed when available_filter_functions lists them
CANDIDATES = (
    # memslot ioctl path
    "kvm_set_memslot", "__kvm_set_memory_region",
    "kvm_arch_commit_memory_region", "kvm_mmu_slot_apply_flags",
    # 6.x MMU walks
    "kvm_mmu_slot_remove_write_access", "kvm_mmu_slot_leaf_clear_dirty",
    "kvm_tdp_mmu_wrprot_slot", "kvm_tdp_mmu_clear_dirty_slot",
    "kvm_mmu_slot_try_split_huge_pages", "kvm_mmu_zap_collapsible_sptes",
    # 5.0 (VMX/PML) names, and the series' fast write protect
    "vmx_slot_enable_log_dirty", "vmx_slot_disable_log_dirty",
    "kvm_mmu_slot_largepage_remove_write_access", "kvm_mmu_slot_set_dirty",
    "kvm_mmu_write_protect_all_pages",
    # patches/fast-write-protect-6.1 (the 6.1 forward-port)
    "kvm_mmu_write_protect_all",
    # dirty log harvesting
    "kvm_vm_ioctl_clear_dirty_log", "kvm_vm_ioctl_get_dirty_log",
)
#: seconds for one tracefs command on the host
TRACE_CMD_TIMEOUT = 60.0
#: per-CPU ring buffer of the instance, KiB
BUFFER_KB = 8192
#: enum kvm_mr_change value of a flags-only memslot update (dirty-log on/off)
KVM_MR_FLAGS_ONLY = 3
#: age (host clock) after which setup removes another migstall run's tracefs
#: group as left over: far longer than any run holds its tracer (the tracer
#: lives from the migration's start to its cancel, minutes at most)
STALE_GROUP_S = 6 * 3600
#: the group (and instance) of the probes a virtual host keeps armed for its whole
#: life (:func:`keeper_init_script`); the stale-group sweep never matches it
KEEP_GROUP = "migstall_keep"
#: per-CPU ring buffer of that instance, KiB: it never records (tracing_on stays 0)
KEEP_BUFFER_KB = 4
#: event group prefix; a group is ``migstall_<unix seconds>_<6 hex>``.  tracefs
#: allows letters, digits and ``_`` in group names, at most 63 characters
GROUP_PREFIX = "migstall_"

_LINE_RE = re.compile(r"^\s*(?P<task>.+?)-(?P<pid>\d+)\s+(?:\(\s*[\d-]+\)\s+)?\[(?P<cpu>\d+)\]\s+"
                      r"(?:(?P<flags>[^\s:]{4,6})\s+)?(?P<ts>\d+\.\d+):\s+(?P<event>[\w.]+):\s?(?P<rest>.*)$")

#: the tracefs scripts (harness/sh/kvm_trace_*.sh), run as ``sh -c SCRIPT sh ARGS...``:
#: the shared functions (remove_group, put) and then the script itself
_SETUP = sh.script("kvm_trace_lib.sh") + sh.script("kvm_trace_setup.sh")
_TEARDOWN = sh.script("kvm_trace_lib.sh") + sh.script("kvm_trace_teardown.sh")

#: exit status of _SETUP when the probe events or tracing_on cannot be switched
#: on (3: the instance cannot be created)
_SETUP_NOT_ON = 4


def group_name(host_time: int) -> str:
    """A fresh event group/instance name holding its creation time (host clock)."""
    return f"{GROUP_PREFIX}{host_time}_{secrets.token_hex(3)}"


@dataclass(frozen=True)
class KvmTiming:
    enable_ms: Optional[float]                 # kvm_enable_ms column
    disable_ms: Optional[float]                # kvm_disable_ms column
    breakdown: Dict[str, Any] = field(default_factory=dict)  # phase -> function -> {ms, calls, max_ms}; "_meta"
    params: Dict[str, str] = field(default_factory=dict)                  # kvm module params
    raw: str = ""                              # trace text, for the sidecar


@dataclass(frozen=True)
class Call:
    func: str
    pid: int
    start_s: float
    end_s: float
    phase: str
    change: Optional[int] = None      # kvm_set_memslot's enum kvm_mr_change, when fetched

    @property
    def ms(self) -> float:
        return (self.end_s - self.start_s) * 1e3


_CHANGE_RE = re.compile(r"\bchange=(-?\w+)")


def parse_calls(text: str) -> Tuple[List[Call], List[Tuple[float, str]]]:
    """Pair ``FUNC__e``/``FUNC__r`` events per (thread, function) into calls and
    attribute each call to the phase whose marker precedes its entry."""
    open_calls: Dict[Tuple[int, str], List[Tuple[float, str, Optional[int]]]] = defaultdict(list)
    calls: List[Call] = []
    markers: List[Tuple[float, str]] = []
    phase = "setup"
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        m = _LINE_RE.match(line)
        if not m:
            continue
        ts, event, pid = float(m.group("ts")), m.group("event"), int(m.group("pid"))
        if event == "tracing_mark_write":
            words = m.group("rest").split()
            if len(words) >= 2 and words[0] == "migstall-phase":
                phase = words[1]
                markers.append((ts, phase))
            continue
        if event.endswith("__e"):
            ch = _CHANGE_RE.search(m.group("rest"))
            change = int(ch.group(1), 0) if ch else None
            open_calls[(pid, event[:-3])].append((ts, phase, change))
        elif event.endswith("__r"):
            func = event[:-3]
            if open_calls[(pid, func)]:
                start, ph, change = open_calls[(pid, func)].pop()
                calls.append(Call(func, pid, start, ts, ph, change))
    return calls, markers


def _anchor_calls(calls: List[Call], anchor: str, phase: str) -> List[Call]:
    """The anchor's calls in ``phase``; when the change type was fetched, only
    KVM_MR_FLAGS_ONLY ones (dirty-log flag toggles; not e.g. the destination
    QEMU's slot creation/deletion that may run at the same time)."""
    mine = [c for c in calls if c.func == anchor and c.phase == phase]
    if any(c.change is not None for c in mine):
        mine = [c for c in mine if c.change == KVM_MR_FLAGS_ONLY]
    return mine


def summarize(calls: List[Call], anchor: Optional[str]) -> Tuple[Optional[float], Optional[float], Dict]:
    breakdown: Dict[str, Dict[str, Dict[str, float]]] = {}

    def add(phase: str, key: str, c: Call) -> None:
        b = breakdown.setdefault(phase, {}).setdefault(key, {"ms": 0.0, "calls": 0, "max_ms": 0.0})
        b["ms"] = round(b["ms"] + c.ms, 4)
        b["calls"] += 1
        b["max_ms"] = round(max(b["max_ms"], c.ms), 4)

    for c in calls:
        add(c.phase, c.func, c)
    phases = {c.phase for c in calls}
    if anchor:
        for ph in phases:
            if any(c.change is not None for c in calls if c.func == anchor and c.phase == ph):
                for c in _anchor_calls(calls, anchor, ph):
                    add(ph, f"{anchor}[flags_only]", c)

    def phase_ms(phase: str) -> Optional[float]:
        if anchor is None:
            return None
        slots = _anchor_calls(calls, anchor, phase)
        if slots:
            breakdown.setdefault(phase, {})["_memslot_ioctls"] = {
                "ms": round(sum(c.ms for c in slots), 4), "calls": len(slots),
                "max_ms": round(max(c.ms for c in slots), 4)}
        walks = [c for c in calls if c.phase == phase and c.func in WALKS]
        if not slots and not walks:
            return None                       # no memslot change seen: not measured
        return round(walk_time_ms(walks), 3)  # 0.0 = flags changed, no MMU walk (e.g. initially-set)

    return phase_ms("enable"), phase_ms("disable"), breakdown


def walk_time_ms(walks: List[Call]) -> float:
    """Time covered by the walk calls, per thread, nested/overlapping calls merged."""
    total = 0.0
    by_pid: Dict[int, List[Call]] = defaultdict(list)
    for c in walks:
        by_pid[c.pid].append(c)
    for cs in by_pid.values():
        cs.sort(key=lambda c: c.start_s)
        cur_start, cur_end = cs[0].start_s, cs[0].end_s
        for c in cs[1:]:
            if c.start_s <= cur_end:
                cur_end = max(cur_end, c.end_s)
            else:
                total += cur_end - cur_start
                cur_start, cur_end = c.start_s, c.end_s
        total += cur_end - cur_start
    return total * 1e3


def change_fetcharg(release: str, machine: str) -> str:
    """kprobe fetch-arg for kvm_set_memslot's ``change`` (x86_64 calling convention):
    4th argument (%cx) from 5.17 (kvm, old, new, change), 6th (%r9) in 5.5..5.16
    (kvm, mem, old, new, as_id, change); none elsewhere."""
    if machine != "x86_64":
        return ""
    m = re.match(r"(\d+)\.(\d+)", release)
    if not m:
        return ""
    ver = (int(m.group(1)), int(m.group(2)))
    if ver >= (5, 17):
        return "change=%cx:u32"
    if ver >= (5, 5):
        return "change=%r9:u32"
    return ""


class KvmTracer:
    """Context manager: sets tracing up on enter, tears it down on exit (also on error).

    When the host has no tracefs or we are not root there, :meth:`available` is
    False and every method is a no-op (the columns stay empty)."""

    def __init__(self, host: Host) -> None:
        self.host = host
        self.tracefs: Optional[str] = None
        self.group = ""            # set on enter, from the host's clock (group_name)
        self.functions: List[str] = []
        self.tracepoints: List[str] = []
        self.anchor: Optional[str] = None
        self.clock = ""
        self._active = False
        self._why = ""

    # -- discovery ----------------------------------------------------------------------
    def _find_tracefs(self) -> Optional[str]:
        for path in TRACEFS_CANDIDATES:
            try:
                if self.host.exists(f"{path}/kprobe_events"):
                    return path
            except HostError:
                continue
        return None

    def available(self) -> bool:
        if self.tracefs is None:
            self.tracefs = self._find_tracefs()
        if self.tracefs is None:
            self._why = "no tracefs with kprobe_events (CONFIG_KPROBE_EVENTS, mounted tracefs)"
            return False
        res = self.host.run(["id", "-u"], check=False, timeout=TRACE_CMD_TIMEOUT)
        if res.text.strip() != "0":
            self._why = "not root on the host"
            return False
        return True

    def _available_functions(self) -> List[str]:
        assert self.tracefs
        pattern = "^(" + "|".join(re.escape(f) for f in CANDIDATES) + r")( |$)"
        res = self.host.run(["grep", "-E", pattern, f"{self.tracefs}/available_filter_functions"],
                            check=False, timeout=TRACE_CMD_TIMEOUT)
        found = {line.split()[0] for line in res.text.splitlines() if line.strip()}
        return [f for f in CANDIDATES if f in found]

    def params(self) -> Dict[str, str]:
        """The KVM module parameters recorded as provenance (``kvm_params`` column;
        the list is :data:`harness.hosts.facts.RECORDED_KVM_PARAMS`), read in one command."""
        paths = [p.sys_path for p in RECORDED_KVM_PARAMS]
        res = self.host.run(["grep", "-H", ".", *paths], check=False, timeout=TRACE_CMD_TIMEOUT)
        out = {}
        for line in res.text.splitlines():
            path, _, value = line.partition(":")
            parts = path.split("/")
            if len(parts) >= 6:
                out[f"{parts[3]}.{parts[5]}"] = value.strip()
        return out

    # -- lifecycle --------------------------------------------------------------------------
    def _host_time(self) -> int:
        """The host's clock, unix seconds (the local one if the host cannot say)."""
        res = self.host.run(["date", "+%s"], check=False, timeout=TRACE_CMD_TIMEOUT)
        text = res.text.strip()
        if res.returncode == 0 and text.isdigit():
            return int(text)
        log.debug("no clock from %s (%r): naming the trace group by the local clock", self.host.name, text)
        return int(time.time())

    def __enter__(self) -> "KvmTracer":
        try:
            if not self.available():
                log.info("kernel-side timing unavailable on %s: %s", self.host.name, self._why)
                return self
            funcs = self._available_functions()
            self.anchor = next((a for a in ANCHORS if a in funcs), None)
            uname = self.host.run(["uname", "-rm"], timeout=TRACE_CMD_TIMEOUT).text.split()
            fetch = change_fetcharg(*uname[:2]) if len(uname) >= 2 else ""
            specs = [f"{f}@{fetch}" if f == "kvm_set_memslot" and fetch else f for f in funcs]
            self.group = group_name(self._host_time())
            self._active = True   # from here on, teardown must run
            assert self.tracefs   # available() found it
            res = self.host.run(["sh", "-c", _SETUP, "sh", self.tracefs, self.group, str(BUFFER_KB),
                                 str(STALE_GROUP_S), *specs],
                                check=False, timeout=TRACE_CMD_TIMEOUT)
            errors: List[str] = []
            failed: List[str] = []
            for line in res.text.splitlines():
                word, _, rest = line.partition(" ")
                if word == "probed":
                    self.functions.append(rest)
                elif word == "failed":
                    failed.append(rest)
                elif word == "tracepoint":
                    self.tracepoints.append(rest)
                elif word == "clock":
                    self.clock = rest
                elif word == "swept":
                    name, _, age = rest.partition(" ")
                    log.info("removed left-over kvm trace group %s (%s s old) from %s", name, age,
                             self.host.name)
                elif word == "error":
                    errors.append(rest)
            if failed:
                log.info("kvm trace on %s: cannot probe %s", self.host.name, failed)
            if res.returncode == _SETUP_NOT_ON:
                self._why = "; ".join(errors) or "tracing could not be switched on"
                log.warning("kernel-side timing unavailable on %s: %s", self.host.name, self._why)
                self._teardown()
                self.functions, self.tracepoints, self.anchor, self.clock = [], [], None, ""
                return self
            if res.returncode != 0:
                why = "; ".join(errors + [res.stderr.decode(errors="replace").strip()[-200:]])
                raise HostError(f"setting up tracefs on {self.host.name} failed "
                                f"(exit {res.returncode}): {why}")
            if errors:
                log.warning("kvm trace on %s: setup steps failed: %s", self.host.name, "; ".join(errors))
            if self.anchor not in self.functions:
                self.anchor = None
            log.info("kvm trace on %s: probes %s, tracepoints %s, anchor %s, clock %s", self.host.name,
                     self.functions, self.tracepoints, self.anchor, self.clock)
        except BaseException:
            self._teardown()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._teardown()

    def _teardown(self) -> None:
        if not self._active:
            return
        self._active = False
        if not self.group:
            return
        try:
            res = self.host.run(["sh", "-c", _TEARDOWN, "sh", self.tracefs or "", self.group],
                                check=False, timeout=TRACE_CMD_TIMEOUT)
            if res.returncode != 0:
                log.warning("kvm trace teardown on %s incomplete: %s", self.host.name,
                            res.stderr.decode(errors="replace").strip())
        except Exception as exc:  # noqa: BLE001  never mask the run's own error
            log.warning("kvm trace teardown on %s failed: %s", self.host.name, exc)

    # -- use --------------------------------------------------------------------------------------
    def phase(self, name: str) -> None:
        """Mark the start of a phase (``enable`` before migrate, ``disable`` before cancel)."""
        if not self._active:
            return
        self.host.run(["sh", "-c", 'echo "migstall-phase $2" > "$1"', "sh",
                       f"{self.tracefs}/instances/{self.group}/trace_marker", name], timeout=TRACE_CMD_TIMEOUT)

    def collect(self) -> KvmTiming:
        if not self._active:
            params = {}
            try:
                params = self.params()
            except HostError:
                pass
            return KvmTiming(None, None, params=params)
        params = self.params()
        raw = self.host.run(["cat", f"{self.tracefs}/instances/{self.group}/trace"],
                            timeout=TRACE_CMD_TIMEOUT).text
        calls, _ = parse_calls(raw)
        enable, disable, breakdown = summarize(calls, self.anchor)
        breakdown = dict(breakdown)
        breakdown["_meta"] = {"anchor": self.anchor, "probes": self.functions,
                              "tracepoints": self.tracepoints, "clock": self.clock}
        if self.tracepoints:
            counts: Dict[str, float] = defaultdict(float)
            for line in raw.splitlines():
                m = _LINE_RE.match(line)
                if m and m.group("event").startswith("kvm_migstall_"):
                    counts[m.group("event")] += 1
            breakdown["_tracepoints"] = dict(counts)
        return KvmTiming(enable, disable, breakdown, params, raw)


def keeper_init_script(tracefs: str = TRACEFS_CANDIDATES[0]) -> str:
    """Shell lines for a virtual host's init (L1's rcS, run after the KVM modules
    are loaded and before any KVM VM exists): arm the probes of every run once,
    in :data:`KEEP_GROUP`, and keep them armed for L1's life.

    Arming and disarming a kprobe patches kernel text (``text_poke_bp``: a
    transient ``int3``, then IPIs to every CPU).  In the virtual host that hung
    L1 for good under QEMU 7.2's multi-threaded TCG (README "The virtual
    host"): the other L1 vCPU kept executing a stale translation with the
    ``int3`` and never answered the patching CPU's IPI.  Armed here, at the
    quietest moment of L1's life (no VM, no sshd, no L2), the probes make every
    later run's own probes on the same functions join armed kprobes (the kernel
    aggregates probes at one address): enabling, disabling and removing those
    patches nothing.  The keeper's instance never records (``tracing_on`` 0)."""
    specs = [f"{f}@{change_fetcharg('6.1', 'x86_64')}" if f == "kvm_set_memslot" else f for f in CANDIDATES]
    # baked in (shell-quoted), not passed as arguments: this text runs in L1, from its initramfs
    return sh.fill(sh.script("l1_keeper.sh"), {
        "TRACEFS": tracefs, "GROUP": KEEP_GROUP, "BUFFER_KB": str(KEEP_BUFFER_KB),
        "NAMES_ERE": "^(" + "|".join(CANDIDATES) + ")( |$)", "SPECS": specs,
    })
