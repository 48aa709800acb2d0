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
observe-only mode except for ``legacy``, and logs the dirty-log capability
checks/enables QEMU makes to ``<runtime dir>/dirtylog-shim.log`` on the host:

* ``legacy``  needs a ``hid KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`` line, no successful
  ``enable_cap cap=168``, and no ``kvm_clear_dirty_log`` QEMU trace line;
* ``ring``    needs a successful ``enable_cap cap=192`` (``KVM_CAP_DIRTY_LOG_RING``);
* ``default`` needs no hiding and no ring; when the kernel offered manual protect
  the log shows ``enable_cap cap=168`` with ``args0=0x3`` (ENABLE|INITIALLY_SET).

A run whose log does not prove its mode fails with :class:`MigrationError`.
Under TCG there is no KVM, so only ``default`` is accepted (UserError otherwise).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Dict, Tuple

from harness import ctools
from harness.errors import MigrationError, UserError
from harness.hosts.base import Host

log = logging.getLogger(__name__)

MODES = ("default", "legacy", "ring")
#: dirty ring entries when the scenario gives none (power of two, >= 1024 on x86)
DEFAULT_RING_SIZE = 4096
SHIM_LOG = "dirtylog-shim.log"

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


def setup(mode: str, dirty_ring: int, accel: str, host: Host, runtime_dir: str) -> ModeSetup:
    """What QEMU needs for ``mode`` on ``host``.  Raises UserError for combinations
    that cannot work (e.g. legacy/ring under tcg)."""
    validate(mode, accel)
    if accel != "kvm":
        return ModeSetup()
    shim = host.stage(ctools.dirtylog_shim())
    env = {"LD_PRELOAD": shim, "MIGSTALL_SHIM_LOG": f"{runtime_dir}/{SHIM_LOG}"}
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


_ENABLE_RE = re.compile(r"enable_cap cap=(\d+) args0=(\S+) fd=\d+ ret=(-?\d+)")


def read_shim_log(host: Host, runtime_dir: str) -> str:
    path = f"{runtime_dir}/{SHIM_LOG}"
    if not host.exists(path):
        return ""
    return host.read_bytes(path).decode(errors="replace")


def verify(mode: str, accel: str, trace_text: str, host: Host, runtime_dir: str) -> None:
    """Raise MigrationError if the run did not actually use ``mode``."""
    if accel != "kvm":
        return
    text = read_shim_log(host, runtime_dir)
    where = f"{runtime_dir}/{SHIM_LOG} on {host.name}"
    if "loaded" not in text:
        raise MigrationError(f"dirty-log mode {mode!r} unproven: the shim never loaded into QEMU "
                             f"(no log at {where}; is LD_PRELOAD honoured?)")
    enabled = {(int(c), a, int(r)) for c, a, r in _ENABLE_RE.findall(text)}
    manual_on = any(c == CAP_MANUAL_PROTECT2 and r == 0 for c, _, r in enabled)
    ring_on = any(c == CAP_DIRTY_LOG_RING and r == 0 for c, _, r in enabled)
    hidden = "hid KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2" in text
    clears = [l for l in trace_text.splitlines() if "kvm_clear_dirty_log" in l]
    log.info("dirty-log mode %s: manual_protect=%s ring=%s hidden=%s clear_dirty_log trace lines=%d",
             mode, manual_on, ring_on, hidden, len(clears))
    if mode == "legacy":
        if not hidden or manual_on:
            raise MigrationError(f"dirty-log mode 'legacy' did not take effect: QEMU "
                                 f"{'enabled manual protect' if manual_on else 'never asked for manual protect'}"
                                 f" (see {where})")
        if clears:
            raise MigrationError(f"dirty-log mode 'legacy' did not take effect: QEMU issued "
                                 f"KVM_CLEAR_DIRTY_LOG ({len(clears)} kvm_clear_dirty_log trace lines)")
    elif mode == "ring":
        if not ring_on:
            raise MigrationError(f"dirty-log mode 'ring' did not take effect: no successful "
                                 f"KVM_ENABLE_CAP(KVM_CAP_DIRTY_LOG_RING) (see {where})")
    else:
        if hidden or ring_on:
            raise MigrationError(f"dirty-log mode 'default' was altered (manual protect hidden or ring on; "
                                 f"see {where})")


def describe(host: Host, runtime_dir: str) -> Dict[str, object]:
    """What the shim log shows, for the sidecar."""
    text = read_shim_log(host, runtime_dir)
    return {"shim_log": text.splitlines()[-50:]}
