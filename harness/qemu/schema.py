"""What a given QEMU offers, asked over QMP (never parsed from ``--help``).

* version: ``query-version``;
* QMP events: ``query-qmp-schema`` (entities with ``meta-type: event``);
* trace events: ``trace-event-get-state`` per name (an event the binary was
  built without is answered with an error, and absent from the result; so are
  all of them when QEMU has no such command).

The runner uses this to pick its measurement definitions: where
``global_dirty_changed`` is missing (QEMU < 6.1) ``dirty_log_start_ms`` falls
back to QMP ``migrate`` -> ``MIGRATION_PASS`` 1 (see README, "What it
measures"), and ``dirty_log_start_source`` says which definition was used.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Dict, FrozenSet, Iterable, List, Tuple

from harness.errors import QMPCommandError

log = logging.getLogger(__name__)

#: QEMU trace events the measurements use, when this QEMU has them
WANTED_TRACE_EVENTS: Tuple[str, ...] = (
    "global_dirty_changed",          # memory_global_dirty_log_start/stop entry (QEMU >= 6.1)
    "kvm_set_user_memory",           # after each KVM_SET_USER_MEMORY_REGION ioctl
    "migration_bitmap_sync_start",   # first bitmap sync after dirty-log start
    "migration_bitmap_sync_end",
    "kvm_clear_dirty_log",           # manual-protect mode: deferred clearing
)


@dataclass(frozen=True)
class QemuInfo:
    version: str                                  # "7.2.22"
    version_tuple: Tuple[int, int, int]
    package: str
    qmp_events: FrozenSet[str] = field(default_factory=frozenset)
    trace_events: Dict[str, bool] = field(default_factory=dict)   # name -> currently enabled

    def has_trace(self, name: str) -> bool:
        return name in self.trace_events

    def has_event(self, name: str) -> bool:
        return name in self.qmp_events

    def to_json(self) -> Dict[str, object]:
        return {"version": self.version, "package": self.package,
                "qmp_events": sorted(self.qmp_events), "trace_events": dict(self.trace_events)}


async def probe(vm, wanted: Iterable[str] = WANTED_TRACE_EVENTS) -> QemuInfo:
    """Ask the running QEMU ``vm`` (a :class:`harness.qemu.machine.VM`)."""
    ver = await vm.cmd("query-version")
    q = ver.get("qemu", {})
    vt = (int(q.get("major", 0)), int(q.get("minor", 0)), int(q.get("micro", 0)))
    schema = await vm.cmd("query-qmp-schema")
    events = frozenset(e["name"] for e in schema if e.get("meta-type") == "event")
    traces: Dict[str, bool] = {}
    for name in wanted:
        try:
            got: List[dict] = await vm.cmd("trace-event-get-state", {"name": name})
        except QMPCommandError as exc:
            # QEMU answered: without the command at all (CommandNotFound), or without this
            # event (GenericError "unknown event").  A QEMU that went away or did not answer
            # in time is not a missing event: that propagates.
            log.info("trace-event-get-state %s: %s (%s)", name, exc.desc, exc.error_class)
            if exc.error_class == "CommandNotFound":
                break
            continue
        for item in got:
            traces[item["name"]] = item.get("state") == "enabled"
    return QemuInfo(version="%d.%d.%d" % vt, version_tuple=vt, package=str(ver.get("package", "")),
                    qmp_events=events, trace_events=traces)


async def enable_traces(vm, info: QemuInfo, names: Iterable[str]) -> List[str]:
    """Enable the given trace events that this QEMU has; return those enabled."""
    done = []
    for name in names:
        if info.has_trace(name):
            await vm.cmd("trace-event-set-state", {"name": name, "enable": True})
            done.append(name)
    return done
