"""Dirty-log modes: default (QEMU's choice), legacy (no manual protect), ring.

* ``default``: whatever QEMU picks.  QEMU >= 5.1 on Linux >= 5.7 enables
  ``KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`` with ``INITIALLY_SET``, so enabling dirty
  logging write-protects nothing; the cost moves to ``KVM_CLEAR_DIRTY_LOG``.
* ``legacy``: the classic bitmap without manual protect (QEMU 3.1 on Linux 5.0).
  An ``LD_PRELOAD`` shim (``guests/legacy-shim/shim.c``, built here with the host
  gcc, cached, staged to the host) answers 0 to
  ``KVM_CHECK_EXTENSION(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2)``.
* ``ring``: ``-accel kvm,dirty-ring-size=N`` (N = the scenario's ``dirty_ring``,
  default :data:`DEFAULT_RING_SIZE`).  QEMU then never uses manual protect.

Proof (:func:`verify`): with KVM the same shim is preloaded in every mode, in
observe-only mode except for ``legacy``, into both QEMUs; each logs the dirty-log
capability checks/enables it makes, and its first ``KVM_CLEAR_DIRTY_LOG``, to the
one file ``<source runtime dir>/dirtylog-shim.log`` on the host.  Every line
carries ``pid=N``; verify reads the source QEMU's lines (its pidfile pid: QEMU's
``-daemonize`` forks twice, and the shim logs a ``forked`` line in each child)
and requires the destination QEMU's lines to show the same mode:

* ``legacy``  needs a ``hid KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`` line, no successful
  ``enable_cap cap=168``, and no ``KVM_CLEAR_DIRTY_LOG`` seen by the shim (its
  ``first clear_dirty_log`` line or a non-zero ``exit ... clear_dirty_log=M``)
  nor, where QEMU has that trace event, a ``kvm_clear_dirty_log`` trace line;
* ``ring``    needs a successful ``enable_cap cap=192`` (``KVM_CAP_DIRTY_LOG_RING``);
* ``default`` needs no hiding and no ring; when the kernel offered manual protect
  (``check_extension cap=168 ... ret=R`` with R > 0) a successful
  ``enable_cap cap=168`` with ``args0`` = R & 0x3 (0x3 = ENABLE|INITIALLY_SET on
  Linux >= 5.7); when it did not, default is the classic bitmap.
  :func:`describe` records which (``default_effective``) for the sidecar.

A run whose log does not prove its mode fails with :class:`MigrationError`.
Under TCG there is no KVM, so only ``default`` is accepted (UserError otherwise).

Test only, the negative control of the memory verification
(:mod:`harness.measure.verify`): ``setup(..., drop_dirty=N)`` makes the shim
clear every N-th set bit of what ``KVM_GET_DIRTY_LOG`` returns (see
``guests/legacy-shim/shim.c``), so a migration under it loses dirty pages that
the guest keeps writing, and the verification must find them.  It needs KVM and
a bitmap mode (``default`` or ``legacy``; the dirty ring never calls
``KVM_GET_DIRTY_LOG``).  The shim logs ``drop_dirty slot=... dropped=...``
lines and totals on its exit line.  Never use it for a measurement.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from harness import ctools
from harness.errors import MigrationError, UserError
from harness.hosts.base import Host

log = logging.getLogger(__name__)

MODES = ("default", "legacy", "ring")
#: dirty ring entries when the scenario gives none (power of two, >= 1024 on x86)
DEFAULT_RING_SIZE = 4096
SHIM_LOG = "dirtylog-shim.log"
#: environment variable of the shim's drop_dirty (test only, see the module docstring)
DROP_DIRTY_ENV = "MIGSTALL_SHIM_DROP_DIRTY"

CAP_MANUAL_PROTECT2 = 168
CAP_DIRTY_LOG_RING = 192


@dataclass(frozen=True)
class ModeSetup:
    accel_opts: Tuple[str, ...] = ()          # appended to -accel kvm,...  e.g. ("dirty-ring-size=4096",)
    env: Dict[str, str] = field(default_factory=dict)   # e.g. LD_PRELOAD of the legacy shim
    trace_events: Tuple[str, ...] = ()        # extra QEMU trace events that prove the mode


def validate(mode: str, accel: str) -> None:
    """UserError for combinations that cannot work (checked before anything starts)."""
    if mode not in MODES:
        raise UserError(f"unknown dirty_log_mode {mode!r}; use one of {', '.join(MODES)}")
    if accel == "tcg" and mode != "default":
        raise UserError(f"dirty_log_mode {mode!r} needs KVM, but this run uses TCG; use dirty_log_mode "
                        f"'default' or run with --accel kvm on a KVM host (or --host virtual)")


def setup(mode: str, dirty_ring: int, accel: str, host: Host, runtime_dir: str, *,
          drop_dirty: int = 0) -> ModeSetup:
    """What QEMU needs for ``mode`` on ``host``.  Raises UserError for combinations
    that cannot work (e.g. legacy/ring under tcg).

    ``drop_dirty`` (TEST ONLY, the verification's negative control): N >= 1 makes
    the shim clear every N-th dirty bit KVM_GET_DIRTY_LOG returns, so the
    migration loses dirty pages (see the module docstring); 0, the default, is off."""
    validate(mode, accel)
    if drop_dirty < 0 or int(drop_dirty) != drop_dirty:
        raise UserError(f"drop_dirty {drop_dirty!r}: use 0 (off) or N >= 1 (clear every N-th dirty bit)")
    if drop_dirty and accel != "kvm":
        raise UserError("drop_dirty needs KVM (it edits KVM_GET_DIRTY_LOG bitmaps); this run uses "
                        f"{accel}: run with --accel kvm on a KVM host (or --host virtual)")
    if drop_dirty and mode == "ring":
        raise UserError("drop_dirty has no effect with dirty_log_mode 'ring' (the dirty ring does not use "
                        "KVM_GET_DIRTY_LOG); use 'default' or 'legacy'")
    if accel != "kvm":
        return ModeSetup()
    shim = host.stage(ctools.dirtylog_shim())
    env = {"LD_PRELOAD": shim, "MIGSTALL_SHIM_LOG": f"{runtime_dir}/{SHIM_LOG}"}
    if drop_dirty:
        env[DROP_DIRTY_ENV] = str(int(drop_dirty))
        log.warning("dirty-log shim: dropping every %d-th dirty bit of KVM_GET_DIRTY_LOG (test only: "
                    "this migration loses dirty pages on purpose)", int(drop_dirty))
    if mode == "legacy":
        env["MIGSTALL_SHIM_HIDE_MANUAL"] = "1"
        return ModeSetup(env=env, trace_events=("kvm_clear_dirty_log",))
    if mode == "ring":
        size = dirty_ring or DEFAULT_RING_SIZE
        if size & (size - 1) or size < 1024:
            raise UserError(f"dirty_ring {size} is not a power of two >= 1024; use e.g. 4096")
        return ModeSetup(accel_opts=(f"dirty-ring-size={size}",), env=env,
                         trace_events=("kvm_dirty_ring_reaper", "kvm_dirty_ring_reap"))
    return ModeSetup(env=env, trace_events=("kvm_clear_dirty_log",))


_LINE_RE = re.compile(r"^migstall-shim pid=(\d+) (.*)$", re.M)
_PRESENT_RE = re.compile(r"^(?:loaded|forked ppid=\d+) hide_manual=\d")
_CHECK_RE = re.compile(r"^check_extension cap=(\d+) fd=\d+ ret=(-?\d+)")
_HID_RE = re.compile(r"^hid KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 fd=\d+ kernel_answer=(-?\d+)")
_ENABLE_RE = re.compile(r"^enable_cap cap=(\d+) args0=(\S+) fd=\d+ ret=(-?\d+)")
_FIRST_CLEAR_RE = re.compile(r"^first clear_dirty_log ")
_EXIT_RE = re.compile(r"^exit get_dirty_log=\d+ clear_dirty_log=(\d+)")
_DROP_RE = re.compile(r"^drop_dirty slot=\S+ fd=\d+ set=\d+ dropped=(\d+)")
_DROP_EXIT_RE = re.compile(r"^exit .* drop_dirty_dropped=(\d+)")

MANUAL_ENABLE = 0x1          # KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE
MANUAL_INITIALLY_SET = 0x2   # KVM_DIRTY_LOG_INITIALLY_SET


@dataclass(frozen=True)
class ShimView:
    """What the shim lines of one QEMU process (or of the whole log, ``pid`` None) show."""
    pid: Optional[int]
    lines: Tuple[str, ...] = ()
    offered: Optional[int] = None        # kernel's answer to CHECK_EXTENSION(168); None: never asked
    hidden: bool = False                 # the shim answered 0 to that check
    enables: Tuple[Tuple[int, int, int], ...] = ()   # (cap, args0, ret) of KVM_ENABLE_CAP
    clear_dirty_log: int = 0             # KVM_CLEAR_DIRTY_LOG calls the shim saw (>= 1 once any)

    @property
    def manual_args(self) -> Optional[int]:
        """args0 of the successful KVM_ENABLE_CAP(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2), if any."""
        ok = [a for c, a, r in self.enables if c == CAP_MANUAL_PROTECT2 and r == 0]
        return ok[-1] if ok else None

    @property
    def ring_on(self) -> bool:
        return any(c == CAP_DIRTY_LOG_RING and r == 0 for c, _, r in self.enables)

    @property
    def effective(self) -> str:
        """The dirty-log variant this QEMU ran: ``ring``, ``manual-protect[+initially-set]``, ``bitmap``."""
        if not self.lines:
            return "unknown"
        if self.ring_on:
            return "ring"
        args = self.manual_args
        if args is None:
            return "bitmap"
        return "manual-protect+initially-set" if args & MANUAL_INITIALLY_SET else "manual-protect"

    @property
    def mode(self) -> str:
        """The dirty-log mode these lines show (for messages)."""
        if self.ring_on:
            return "ring"
        if self.hidden and self.manual_args is None:
            return "legacy"
        return "default"

    def seen(self) -> str:
        """The capability lines, for messages."""
        keep = [ln for ln in self.lines if not _PRESENT_RE.match(ln) and not _EXIT_RE.match(ln)]
        return "; ".join(keep[-6:]) if keep else "no capability checks or enables"


def _parse_int(text: str) -> int:
    try:
        return int(text, 0)
    except ValueError:
        return -1


def shim_views(text: str) -> Dict[int, ShimView]:
    """The log's lines grouped by pid (the text after ``pid=N``)."""
    by_pid: Dict[int, List[str]] = {}
    for pid, rest in _LINE_RE.findall(text):
        by_pid.setdefault(int(pid), []).append(rest.strip())
    return {pid: _view(pid, lines) for pid, lines in by_pid.items()}


def _view(pid: Optional[int], lines: List[str]) -> ShimView:
    offered: Optional[int] = None
    hidden = False
    enables: List[Tuple[int, int, int]] = []
    clears = 0
    for line in lines:
        if m := _CHECK_RE.match(line):
            if int(m.group(1)) == CAP_MANUAL_PROTECT2:
                offered = max(offered or 0, int(m.group(2)))
        elif m := _HID_RE.match(line):
            hidden = True
            offered = max(offered or 0, int(m.group(1)))
        elif m := _ENABLE_RE.match(line):
            enables.append((int(m.group(1)), _parse_int(m.group(2)), int(m.group(3))))
        elif _FIRST_CLEAR_RE.match(line):
            clears = max(clears, 1)
        elif m := _EXIT_RE.match(line):
            clears = max(clears, int(m.group(1)))
    return ShimView(pid, tuple(lines), offered, hidden, tuple(enables), clears)


def _select(text: str, pid: Optional[int]) -> ShimView:
    """The view of ``pid``; with ``pid`` None, of every line in the log."""
    if pid is None:
        return _view(None, [rest.strip() for _, rest in _LINE_RE.findall(text)])
    return shim_views(text).get(pid, ShimView(pid))


def dropped_dirty_bits(text: str, pid: Optional[int] = None) -> int:
    """How many dirty bits the shim's drop_dirty cleared, from its log text (of
    process ``pid``, or all): the exit line's total once the process has exited,
    else at least the sum of its ``drop_dirty`` lines (the first calls only)."""
    lines = [rest.strip() for p, rest in _LINE_RE.findall(text) if pid is None or int(p) == pid]
    logged = sum(int(m.group(1)) for line in lines if (m := _DROP_RE.match(line)))
    at_exit = sum(int(m.group(1)) for line in lines if (m := _DROP_EXIT_RE.match(line)))
    return max(logged, at_exit)


_MEMSLOT_RE = re.compile(r"^memslot_flags slot=(\w+) flags=(\w+)->(\w+) ret=(-?\d+) dur_ns=(\d+) end_ns=(\d+)")
#: KVM_MEM_LOG_DIRTY_PAGES
LOG_DIRTY_PAGES = 0x1


@dataclass(frozen=True)
class MemslotIoctl:
    """One flags-only KVM_SET_USER_MEMORY_REGION the shim timed."""
    slot: int
    old_flags: int
    new_flags: int
    ret: int
    dur_ns: int          # CLOCK_MONOTONIC around the real ioctl
    end_ns: int          # CLOCK_REALTIME at its return (the clock of QEMU's trace lines)

    @property
    def enables_logging(self) -> bool:
        return bool(self.new_flags & LOG_DIRTY_PAGES) and not self.old_flags & LOG_DIRTY_PAGES


def memslot_ioctls(text: str, pid: Optional[int]) -> List[MemslotIoctl]:
    """The flags-only memslot ioctls in shim log ``text`` of process ``pid``
    (every process's when None), in log order."""
    out = []
    for p, rest in _LINE_RE.findall(text):
        m = _MEMSLOT_RE.match(rest.strip())
        if m and (pid is None or int(p) == pid):
            out.append(MemslotIoctl(int(m.group(1), 0), int(m.group(2), 0), int(m.group(3), 0),
                                    int(m.group(4)), int(m.group(5)), int(m.group(6))))
    return out


def enable_ioctl_ms(calls: Sequence[MemslotIoctl], start_ns: int, end_ns: int) -> Optional[float]:
    """``kvm_ioctl_ms``: the summed durations of the ioctls that turned dirty
    logging on and returned within [start_ns, end_ns] (QEMU host wall clock);
    None when there were none (no shim, or no memslot to log)."""
    picked = [c.dur_ns for c in calls if c.enables_logging and c.ret == 0 and start_ns <= c.end_ns <= end_ns]
    return sum(picked) / 1e6 if picked else None


def read_shim_log(host: Host, runtime_dir: str) -> str:
    path = f"{runtime_dir}/{SHIM_LOG}"
    if not host.exists(path):
        return ""
    return host.read_bytes(path).decode(errors="replace")


def _check(mode: str, view: ShimView, who: str, where: str) -> None:
    """MigrationError unless ``view`` (one QEMU's shim lines) proves ``mode``."""
    bad = f"dirty-log mode {mode!r} did not take effect in the {who}"
    if mode == "legacy":
        if not view.hidden or view.manual_args is not None or view.ring_on:
            what = ("enabled manual protect" if view.manual_args is not None else
                    "enabled the dirty ring" if view.ring_on else "never asked for manual protect")
            raise MigrationError(f"{bad}: QEMU {what} (it shows mode {view.mode!r}: {view.seen()}; see {where})")
        if view.clear_dirty_log:
            raise MigrationError(f"{bad}: QEMU issued KVM_CLEAR_DIRTY_LOG (seen by the shim; see {where})")
    elif mode == "ring":
        if not view.ring_on:
            raise MigrationError(f"{bad}: no successful KVM_ENABLE_CAP(KVM_CAP_DIRTY_LOG_RING) "
                                 f"(it shows mode {view.mode!r}: {view.seen()}; see {where})")
    else:
        if view.hidden or view.ring_on:
            raise MigrationError(f"dirty-log mode 'default' was altered in the {who} (manual protect hidden "
                                 f"or ring on; it shows mode {view.mode!r}: {view.seen()}; see {where})")
        wanted = (view.offered or 0) & (MANUAL_ENABLE | MANUAL_INITIALLY_SET)
        if wanted and view.manual_args != wanted:
            raise MigrationError(f"{bad}: the kernel offered KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 "
                                 f"(answer {view.offered}) but there is no successful enable_cap cap=168 "
                                 f"args0={wanted:#x} (seen: {view.seen()}; see {where})")


def verify(mode: str, accel: str, trace_text: str, host: Host, runtime_dir: str, *,
           src_pid: Optional[int] = None, dst_pid: Optional[int] = None) -> None:
    """Raise MigrationError if the run did not actually use ``mode``.

    ``src_pid``/``dst_pid``: the pids of the source and destination QEMU (from
    their pidfiles); the source's lines must prove ``mode``, and so must the
    destination's when ``dst_pid`` is given.  ``src_pid`` None: the log holds
    one QEMU's lines and all of them count.  ``trace_text`` is the source QEMU's
    trace log."""
    if accel != "kvm":
        return
    text = read_shim_log(host, runtime_dir)
    where = f"{runtime_dir}/{SHIM_LOG} on {host.name}"
    if not any(_PRESENT_RE.match(rest) for _, rest in _LINE_RE.findall(text)):
        raise MigrationError(f"dirty-log mode {mode!r} unproven: the shim never loaded into QEMU "
                             f"(no log at {where}; is LD_PRELOAD honoured?)")
    clears = [ln for ln in trace_text.splitlines() if "kvm_clear_dirty_log" in ln]
    roles = [("source QEMU", src_pid)] + ([("destination QEMU", dst_pid)] if dst_pid is not None else [])
    for role, pid in roles:
        view = _select(text, pid)
        who = role if pid is None else f"{role} (pid {pid})"
        if not view.lines:
            raise MigrationError(f"dirty-log mode {mode!r} unproven: no shim lines from the {who} "
                                 f"(pids in the log: {sorted(shim_views(text)) or 'none'}; see {where})")
        log.info("dirty-log mode %s, %s: effective=%s offered=%s manual_args=%s ring=%s hidden=%s "
                 "clear_dirty_log(shim)=%d", mode, who, view.effective, view.offered,
                 None if view.manual_args is None else hex(view.manual_args), view.ring_on, view.hidden,
                 view.clear_dirty_log)
        _check(mode, view, who, where)
        if mode == "default" and view.effective == "bitmap":
            log.info("dirty-log mode default, %s: the kernel does not offer KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 "
                     "(answer: %s); default == the classic bitmap here", who,
                     "never asked" if view.offered is None else view.offered)
    log.info("dirty-log mode %s: %d kvm_clear_dirty_log trace lines from the source QEMU", mode, len(clears))
    if mode == "legacy" and clears:
        raise MigrationError(f"dirty-log mode 'legacy' did not take effect: QEMU issued "
                             f"KVM_CLEAR_DIRTY_LOG ({len(clears)} kvm_clear_dirty_log trace lines)")


def describe(mode: str, accel: str, host: Host, runtime_dir: str, *,
             src_pid: Optional[int] = None, dst_pid: Optional[int] = None) -> Dict[str, object]:
    """What the shim log shows, for the sidecar's ``mode``: the variant each QEMU
    ran (``effective``; ``default_effective`` with mode ``default``) and the log's
    last lines.  Empty without KVM (no shim)."""
    if accel != "kvm":
        return {}
    text = read_shim_log(host, runtime_dir)
    effective = {"src": _select(text, src_pid).effective}
    if dst_pid is not None:
        effective["dst"] = _select(text, dst_pid).effective
    out: Dict[str, object] = {"effective": effective, "shim_log": text.splitlines()[-50:]}
    if mode == "default":
        out["default_effective"] = effective["src"]
    return out
