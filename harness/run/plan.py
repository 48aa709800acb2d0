"""The plan of one run: scenario + host facts -> the QEMU command lines.

Pure: everything that needs the host (the accelerator it can use, the QEMU
version, the staged guest kernel, the runtime directories, the dirty-log mode's
shim) is gathered first into :class:`HostFacts`; :func:`plan_run` only computes.
So the argv of a scenario can be tested without QEMU (tests/test_run_plan.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Mapping, Optional, Sequence, Tuple

from harness.guest.image import GuestImage, guest_qemu_args
from harness.measure import verify
from harness.qemu import alias, backing, dirtylog, migration
from harness.scenario import Scenario

#: seconds ``qemu -daemonize`` may take to return: generous, because a nested
#: host under TCG starts QEMU slowly, plus 10 s per GiB with prealloc (QEMU
#: touches all guest RAM before it returns)
LAUNCH_TIMEOUT_BASE = 300.0
LAUNCH_TIMEOUT_PER_PREALLOC_GIB = 10.0

#: the runtime directory's files the plan names (guest console, probe channel)
CONSOLE_LOG = "console.log"
PROBE_SOCKET = "probe.sock"


def launch_timeout_s(scenario: Scenario) -> float:
    extra = LAUNCH_TIMEOUT_PER_PREALLOC_GIB * scenario.mem_mib / 1024 if scenario.prealloc else 0.0
    return LAUNCH_TIMEOUT_BASE + extra


@dataclass(frozen=True)
class HostFacts:
    """What the plan needs to know about the QEMU host, read before planning."""
    accel: str                         #: resolved: "kvm" | "tcg"
    qemu_version: Tuple[int, ...]      #: () when unknown
    kernel: str                        #: the guest kernel, staged on the host
    initrd: str                        #: the guest initramfs, staged on the host
    src_rundir: str                    #: runtime directories on the host
    dst_rundir: str
    mode: dirtylog.ModeSetup           #: the dirty-log mode's accel options, env, trace events
    prefix: Tuple[str, ...] = ()       #: QEMU's exec prefix (backing.exec_prefix)
    #: aliased guests: each side's shared file on the host (tmpfs), "" otherwise
    src_alias_path: str = ""
    dst_alias_path: str = ""
    #: ``cancel`` + ``verify``: the runtime directory of the second destination
    dst_again_rundir: str = ""


@dataclass(frozen=True)
class VMPlan:
    """One QEMU: its name, arguments (after the binary) and environment."""
    name: str
    argv: Tuple[str, ...]
    env: Mapping[str, str]
    runtime_dir: str

    def path(self, name: str) -> str:
        return f"{self.runtime_dir}/{name}"


@dataclass(frozen=True)
class RunPlan:
    accel: str
    cpu_model: str                     #: the ``cpu_model`` column: the scenario's, or the accel's default
    qemu: str                          #: the QEMU binary
    qemu_version: Tuple[int, ...]
    prefix: Tuple[str, ...]
    launch_timeout_s: float
    #: KiB of RAM beyond the scenario's ``mem`` (TCG dirty-sync workaround)
    ram_pad_kib: int
    #: migrated memory is compared (``verify``)
    verifying: bool
    mode: dirtylog.ModeSetup
    src: VMPlan
    dst: VMPlan
    #: ``cancel`` + ``verify``: the destination of the second migration, the one
    #: that completes and whose memory is compared (paused by ``-S`` until then)
    dst_again: Optional[VMPlan] = None


def verifying(scenario: Scenario) -> bool:
    """Migrated memory is compared (``verify``).  With ``end = "cancel"`` the
    cancelled migration is followed by a second one that completes, and that
    one's memory is compared: dirty logging stopped and started again must
    still catch every write."""
    return scenario.verify


def verify_after_cancel(scenario: Scenario) -> bool:
    """``cancel`` + ``verify``: a second migration, to a second destination, completes and is compared."""
    return scenario.verify and scenario.end_action == "cancel"


def ram_pad_kib(scenario: Scenario, accel: str, qemu_version: Sequence[int]) -> int:
    """Verified TCG guests on QEMU < 9.0 get 8 KiB more RAM, which steers QEMU
    around its dirty-sync bug (verify.tcg_ram_pad_kib; README "Migrated memory verified")."""
    return verify.tcg_ram_pad_kib(accel, qemu_version, scenario.backing) if verifying(scenario) else 0


def default_cpu_model(scenario: Scenario, accel: str) -> str:
    return scenario.cpu_model or ("host" if accel == "kvm" else "max")


def accel_args(accel: str, scenario: Scenario, mode: dirtylog.ModeSetup) -> List[str]:
    if accel == "kvm":
        return ["-accel", ",".join(["kvm", *mode.accel_opts]), "-cpu", scenario.cpu_model or "host"]
    return ["-accel", "tcg,thread=multi", "-cpu", scenario.cpu_model or "max"]


def memory_args(scenario: Scenario, pad_kib: int, alias_path: str) -> List[str]:
    """Guest RAM: the scenario's backing; for an aliased guest the kernel's own
    RAM (alias.OWN_RAM_MIB) plus the alias devices on the file ``alias_path``."""
    sc = scenario
    if not sc.alias_mib:
        return backing.memory_args(sc.backing, sc.mem_mib, sc.prealloc, pad_kib)
    if not alias_path:
        raise ValueError("an aliased scenario needs the path of its shared file")
    layout = alias.AliasLayout(sc.mem_mib, sc.alias_mib)
    return [*backing.memory_args(sc.backing, layout.own_mib, False), *alias.qemu_args(layout, alias_path)]


def plan_run(scenario: Scenario, facts: HostFacts, image: GuestImage, run_id: str,
             src_env: Optional[Mapping[str, str]] = None) -> RunPlan:
    """The QEMU command lines of a run of ``scenario`` on a host with ``facts``.

    Both sides get the same machine (the device models must match); the
    destination adds ``-incoming defer`` and, when RAM is compared, ``-S``
    (it stays paused after the migration until compared).  ``src_env``: extra
    environment of the source QEMU only (a test seam, e.g. the shim's drop-dirty)."""
    sc, mode = scenario, facts.mode
    check = verifying(sc)
    pad = ram_pad_kib(sc, facts.accel, facts.qemu_version)

    def common(rundir: str, alias_path: str) -> List[str]:
        return [*accel_args(facts.accel, sc, mode),
                *backing.attach_args(facts.qemu_version),
                "-smp", str(sc.vcpus),
                *memory_args(sc, pad, alias_path),
                "-nodefaults", "-no-user-config",
                *guest_qemu_args(image, kernel=facts.kernel, initrd=facts.initrd,
                                 channel_socket=f"{rundir}/{PROBE_SOCKET}",
                                 console_log=f"{rundir}/{CONSOLE_LOG}", scenario=sc)]

    again = verify_after_cancel(sc)
    if again and not facts.dst_again_rundir:
        raise ValueError("cancel + verify needs dst_again_rundir (the second destination's runtime directory)")
    # the destination whose memory is compared stays paused (-S) until then
    paused = ["-S"] if check and not again else []
    src = VMPlan(f"{run_id}-src", tuple(common(facts.src_rundir, facts.src_alias_path)),
                 {**mode.env, **(src_env or {})}, facts.src_rundir)
    dst = VMPlan(f"{run_id}-dst", tuple(common(facts.dst_rundir, facts.dst_alias_path) + list(migration.INCOMING_ARGS)
                                        + paused),
                 dict(mode.env), facts.dst_rundir)
    dst_again = VMPlan(f"{run_id}-dst2", tuple(common(facts.dst_again_rundir, facts.dst_alias_path)
                                               + list(migration.INCOMING_ARGS) + ["-S"]),
                       dict(mode.env), facts.dst_again_rundir) if again else None
    return RunPlan(accel=facts.accel, cpu_model=default_cpu_model(sc, facts.accel),
                   qemu=sc.qemu or "qemu-system-x86_64", qemu_version=facts.qemu_version, prefix=facts.prefix,
                   launch_timeout_s=launch_timeout_s(sc), ram_pad_kib=pad, verifying=check, mode=mode,
                   src=src, dst=dst, dst_again=dst_again)
