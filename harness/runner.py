"""One measured run, and a matrix of them.  Always a CSV row.

A run goes in stages, each timed into the sidecar's ``stages``
(:class:`~harness.run.observe.Stages`, after tuxmake's ``Build.run()``):

* the **plan** (:mod:`harness.run.plan`): the host facts are read (accel,
  QEMU version, staged guest kernel, runtime dirs, dirty-log shim), then a
  pure function gives both QEMUs' argv (:class:`~harness.run.plan.RunPlan`);
* the **session** (:class:`_Run`, below) drives QEMU and the probe and
  records what it sees as frozen :class:`~harness.run.observe.Observations`
  (the :class:`~harness.run.observe.Timeline`, marks, records, QMP answers,
  KVM timing, the trace's dirty-log bounds);
* the **row** (:mod:`harness.run.row`): a pure function of the observations,
  a :class:`~harness.run.row.Row` whose fields are the CSV columns.

The session, every wait bounded:

1. boot: the source QEMU (guest kernel + initramfs with the probe); ask it
   what it offers (:mod:`harness.qemu.schema`); enable the trace events;
2. ready: wait for the probe's READY (``scenario.ready_timeout_s``), read the
   page size actually obtained from ``/proc/<pid>/smaps``;
3. baseline: start the destination QEMU (``-incoming defer`` +
   ``migrate-incoming``); clock marks, then the baseline window
   (``scenario.baseline_s``);
4. migration: ``KvmTracer.phase("enable")`` and QMP ``migrate``;
   ``MIGRATION_PASS`` 1 (the stall window runs from ``MIGRATION setup`` to
   ``margin_ms`` after it), marks;
   ``end_action = complete``: collect the probe's data (``dump`` also stops the
   loops), lift the migration's bandwidth hold (:data:`migration.HOLD_BANDWIDTH`:
   until then precopy cannot complete and pause the source guest), wait for
   ``completed``, then one mark round trip with the probe on the destination:
   the migrated guest must run there (with ``verify`` guest RAM is compared
   first, and the records come from the destination, which answers the same way).
   ``end_action = cancel``: ``cancel_after_s`` after pass 1,
   ``KvmTracer.phase("disable")`` + ``migrate_cancel``, wait for
   ``cancelled``, then collect the probe's data (with ``verify``: first migrate
   again, to a second destination, let that complete and compare guest RAM;
   the records then come from that destination);
5. collection: KVM's timing; shut both QEMUs down, keep their logs;
6. verification: the clock check (:func:`~harness.run.row.check_causality`,
   before the shutdown); parse the source's trace lines into
   ``dirty_log_start_ms``/``dirty_log_stop_ms``; check the invariants between
   the columns (:func:`~harness.run.row.check_invariants`); ``dirtylog.verify``;
   the host's kernel log.

One clock per duration: every time on the run's timeline (``_Run.t``, a
:class:`~harness.run.observe.Timeline`) is the QEMU host's wall clock, the
clock of QEMU's trace lines and QMP event timestamps.  The marks that place
the guest's clock on it are stamped there too, by the mark relay
(:meth:`ProbeChannel.open_on`).  This machine's clock is used only for waiting
and for the causality check of a remote host's clock.

Whatever happens (QEMU dies, no READY, migration fails, Ctrl-C), the row is
written (``status=failed`` + ``error``, derived from what was observed up to
then) with its sidecar, and no process is left.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as _dt
import logging
import os
import posixpath
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable, Dict, List, Optional, Sequence, Tuple

from harness import results
from harness.errors import (GuestError, HostError, InfraError, MeasurementError, MigrationError, MigstallError,
                            QEMUError, best_effort)
from harness.guest.channel import ProbeChannel
from harness.guest.image import GuestImage, build_guest_image
from harness.hosts import kernel_log
from harness.hosts.base import Host
from harness.hosts.facts import qemu_version, resolve_accel
from harness.measure import clock as clockmod
from harness.measure import kvm_stats, qemu_trace, threads, verify
from harness.measure.kvm_trace import KvmTiming, KvmTracer
from harness.progress import Progress
from harness.qemu import alias, backing, dirtylog, migration, schema, stuck
from harness.qemu.machine import VM, event_time_ns
from harness.run.observe import Identity, Mark, MigrationEnd, Observations, Stages, Timeline
from harness.run.plan import CONSOLE_LOG, PROBE_SOCKET, HostFacts, RunPlan, plan_run, ram_pad_kib, verify_after_cancel
from harness.run.row import Derived, check_causality, check_invariants, derive, identity_columns
from harness.scenario import Scenario

log = logging.getLogger(__name__)

#: seconds for a ``mark`` round trip
MARK_TIMEOUT = 10.0
#: seconds for the probe's ``dump`` reply
DUMP_TIMEOUT = 60.0
#: s after ``migrate`` over which the fault-cost columns sum the write loops'
#: stalled time and count KVM's page faults, against as long a span before it
#: (cut short by an earlier cancel).  2 s: the span the series' review asks for
FAULT_WINDOW_S = 2.0
#: interesting host kernel log lines kept in the sidecar per run
HOST_KERNEL_LOG_LINES = 100
#: marks taken before the baseline and after the stall window
MARKS_PER_BATCH = 3

#: test seam: ``await hook(point, vms)`` at named points ("migrating", ...)
Hook = Callable[[str, Dict[str, VM]], Awaitable[None]]


@dataclass
class RunContext:
    host: Host
    out: Path
    host_label: str = "local"
    kernel_variant: str = ""
    series_id: str = ""
    progress: Progress = field(default_factory=Progress)
    doctor: Optional[Dict[str, Any]] = None
    hook: Optional[Hook] = None
    #: test seam: extra environment of the source QEMU only (e.g. the shim's
    #: MIGSTALL_SHIM_DROP_DIRTY, the negative control of --verify)
    src_env: Dict[str, str] = field(default_factory=dict)
    guest_kernel: Optional[str] = None    # overrides the scenario's (CLI --guest-kernel)




def new_run_id(scenario: Scenario) -> str:
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return f"{stamp}-{scenario.name}-r{scenario.repeat}-{uuid.uuid4().hex[:6]}"


def base_row(ctx: RunContext, scenario: Scenario, run_id: str, accel: str = "") -> Dict[str, Any]:
    """The identity columns of a run of ``scenario`` (a failed row's, before it started)."""
    return identity_columns(_identity(ctx, scenario, run_id), accel)


def _identity(ctx: RunContext, scenario: Scenario, run_id: str) -> Identity:
    return Identity(run_id=run_id, started_at=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                    host=ctx.host_label, kernel_variant=ctx.kernel_variant, series_id=ctx.series_id,
                    scenario=scenario)


def read_host_kernel(host: Host, run_id: str) -> Tuple[Optional[str], Optional[str]]:
    """``host_kernel`` (``uname -r``) and, when it is missing or empty, why.  Not
    needed to run, so a failure does not fail the row; but compare tells kernels
    apart by it, so an empty cell comes with the reason (logged here; the caller
    keeps it in the sidecar's ``host_kernel_error``)."""
    release: Optional[str] = None
    try:
        release = host.run(["uname", "-r"], timeout=20).text.strip()
    except Exception as exc:  # noqa: BLE001  reported just below; the run goes on without it
        why = f"uname -r failed: {' '.join(str(exc).split()) or type(exc).__name__}"
    else:
        if release:
            return release, None
        why = "uname -r printed nothing"
    log.warning("%s: host_kernel left empty: %s", run_id, why)
    return release, why


class _Run:
    """The session of one run: it drives the QEMUs and the probe through the
    stages and records what it sees in ``obs`` (frozen :class:`Observations`,
    replaced as they grow) and the sidecar's raw material in ``side``; the row
    is derived from ``obs`` (:func:`harness.run.row.derive`)."""

    def __init__(self, ctx: RunContext, scenario: Scenario, image: GuestImage, run_id: str) -> None:
        self.ctx, self.sc, self.image, self.run_id = ctx, scenario, image, run_id
        self.host = ctx.host
        self.sidecar = results.sidecar_path(ctx.out, run_id)
        self.log_dir = self.sidecar.with_suffix(".logs")
        self.obs = Observations(identity=_identity(ctx, scenario, run_id))
        self.side: Dict[str, Any] = {"run_id": run_id, "scenario": dataclasses.asdict(scenario),
                                     "doctor": ctx.doctor, "commands": {}, "events": {}, "logs": {},
                                     "marks": [], "timeline_ns": {}, "qemu_exit": {}}
        self.stages = Stages()
        self.vms: Dict[str, VM] = {}
        #: the QEMU command lines (set once the host facts are read)
        self.plan: Optional[RunPlan] = None
        self.qemu_info: Optional[schema.QemuInfo] = None
        #: the fault-cost columns are measured (a run with a ``write`` loop)
        self.fault_cost = "write" in scenario.loop_list

    @property
    def verifying(self) -> bool:
        """Migrated memory is compared: ``verify`` and a migration that completes."""
        return self.obs.verifying

    @property
    def t(self) -> Timeline:
        """The run's timeline, QEMU host wall clock (ns); see the module docstring."""
        return self.obs.timeline

    def _observe(self, **changes: Any) -> None:
        self.obs = dataclasses.replace(self.obs, **changes)

    def _at(self, **points: int) -> None:
        """Points reached on the timeline."""
        self._observe(timeline=dataclasses.replace(self.obs.timeline, **points))

    def _derive_checked(self, **changes: Any) -> Derived:
        """Observe ``changes`` and derive the row from them: a derivation that
        fails fails the run here, and the changes are not kept (the failed
        row is derived without them)."""
        before = self.obs
        self._observe(**changes)
        try:
            return derive(self.obs)
        except Exception:
            self.obs = before
            raise

    def derived(self) -> Derived:
        """The row as far as the run got; never raises (a row is always written)."""
        try:
            return derive(self.obs)
        except Exception:  # a bug in a derivation: the row is still written, without the figures
            log.exception("%s: cannot derive the row's figures", self.run_id)
            return derive(Observations(identity=self.obs.identity, accel=self.obs.accel,
                                       host_kernel=self.obs.host_kernel, qemu_version=self.obs.qemu_version))

    # -- helpers ------------------------------------------------------------------------
    async def _hook(self, point: str) -> None:
        if self.ctx.hook is not None:
            await self.ctx.hook(point, self.vms)

    async def _marks(self, chan: ProbeChannel, n: int, label: str) -> None:
        for _ in range(n):
            s = await chan.mark(MARK_TIMEOUT)
            self._observe(marks=(*self.obs.marks, Mark.of(s, label)))

    def _host_kernel(self) -> None:
        release, why = read_host_kernel(self.host, self.run_id)
        self._observe(host_kernel=release)
        if why:
            self.side["host_kernel_error"] = why

    # -- the run ---------------------------------------------------------------------------
    async def execute(self) -> None:
        sc, host = self.sc, self.host
        self.stages.start("plan")
        accel = await asyncio.to_thread(resolve_accel, host, sc.accel)
        self._observe(accel=accel)
        self._host_kernel()
        kernel = await asyncio.to_thread(host.stage, Path(self.image.kernel))
        initrd = await asyncio.to_thread(host.stage, Path(self.image.initrd))
        qemu = sc.qemu or "qemu-system-x86_64"
        qver = backing.parse_version(await asyncio.to_thread(qemu_version, host, qemu))
        prefix = await asyncio.to_thread(backing.exec_prefix, sc.backing, host)
        self._observe(ram_pad_kib=ram_pad_kib(sc, accel, qver))
        self.side["ram_pad_kib"] = self.obs.ram_pad_kib

        with contextlib.ExitStack() as dirs:
            src_rd = dirs.enter_context(host.runtime_dir("migstall-src-"))
            dst_rd = dirs.enter_context(host.runtime_dir("migstall-dst-"))
            # cancel + verify: a second destination for the migration that completes
            again_rd = dirs.enter_context(host.runtime_dir("migstall-dst2-")) if verify_after_cancel(sc) else ""
            # aliased RAM: each side's shared file on tmpfs, removed once its QEMU is gone
            src_alias = dst_alias = ""
            if sc.alias_mib:
                src_alias = f"{dirs.enter_context(alias.shm_dir(host, 'migstall-alias-src-'))}/{alias.ALIAS_FILE}"
                dst_alias = f"{dirs.enter_context(alias.shm_dir(host, 'migstall-alias-dst-'))}/{alias.ALIAS_FILE}"
                self.side["alias"] = {"src_path": src_alias, "dst_path": dst_alias,
                                      "devices": sc.mem_mib // sc.alias_mib, "own_ram_mib": alias.OWN_RAM_MIB}
            mode = dirtylog.setup(sc.dirty_log_mode, sc.dirty_ring, accel, host, src_rd)
            self.side["mode"] = {"accel_opts": list(mode.accel_opts), "env": dict(mode.env),
                                 "trace_events": list(mode.trace_events)}
            facts = HostFacts(accel=accel, qemu_version=qver, kernel=kernel, initrd=initrd,
                              src_rundir=src_rd, dst_rundir=dst_rd, dst_again_rundir=again_rd, mode=mode,
                              prefix=tuple(prefix),
                              src_alias_path=src_alias, dst_alias_path=dst_alias)
            self.plan = plan = plan_run(sc, facts, self.image, self.run_id, src_env=self.ctx.src_env)
            planned = {"src": plan.src, "dst": plan.dst, **({"dst2": plan.dst_again} if plan.dst_again else {})}
            self.vms = {tag: VM(host, p.name, list(p.argv), qemu=plan.qemu, prefix=plan.prefix,
                                runtime_dir=p.runtime_dir, env=p.env, log_dir=self.log_dir,
                                launch_timeout=plan.launch_timeout_s, collect=(CONSOLE_LOG,))
                        for tag, p in planned.items()}
            src, dst = self.vms["src"], self.vms["dst"]
            try:
                async with contextlib.AsyncExitStack() as stack:
                    await self._measure(stack, src, dst, mode)
                    self.stages.start("collection")     # the QEMUs exit and leave their logs
            finally:
                for tag, vm in self.vms.items():
                    self.side["commands"][tag] = vm.command_line
                    self.side["events"][tag] = [{k: v for k, v in e.items()} for e in vm.events]
                    self.side["logs"][tag] = str(vm.local_log) if vm.local_log else None
                    self.side["logs"][f"{tag}-console"] = vm.collected.get(vm.path(CONSOLE_LOG))
                    self.side["qemu_exit"][tag] = vm.exit_info()
                await asyncio.to_thread(self._host_kernel_log, src.launch_uptime_s)
            self.stages.start("verification")
            self._trace_columns(src, mode, accel, src_rd)
            if self.side["host_kernel_log"]["problems"]:
                bad = self.side["host_kernel_log"]["problems"]
                raise HostError(f"the kernel log of {host.name} gained {len(bad)} problem line(s) during the run "
                                f"(a kernel under test must stay clean): {kernel_log.strip_stamp(bad[0])[:200]}")

    def _host_kernel_log(self, since_s: Optional[float]) -> None:
        """The host's kernel log lines since the source QEMU's launch
        (:meth:`Host.kernel_log_tail`; nothing on the local host) and those of
        them that fail the run (:func:`kernel_log.problems`) into the sidecar."""
        lines = self.host.kernel_log_tail(since_s=since_s, lines=HOST_KERNEL_LOG_LINES) \
            if since_s is not None else []
        self.side["host_kernel_log"] = {"since_uptime_s": since_s, "lines": lines,
                                        "problems": kernel_log.problems(lines)}

    async def _measure(self, stack: contextlib.AsyncExitStack, src: VM, dst: VM, mode: dirtylog.ModeSetup) -> None:
        sc, host, prog = self.sc, self.host, self.ctx.progress
        self.stages.start("boot")
        # tracing is set up before any QEMU of the run starts and torn down after
        # both have exited (the stack unwinds in reverse): arming kprobes patches
        # kernel text, best done while no guest runs (README "The virtual host")
        tracer = stack.enter_context(KvmTracer(host))
        ready_deadline = time.monotonic() + sc.ready_timeout_s   # READY within this of the launch
        await stack.enter_async_context(src)
        if sc.alias_mib:        # QEMU has mapped its shared file: from now on nothing of it is left in /dev/shm
            await asyncio.to_thread(alias.release, host, posixpath.dirname(self.side["alias"]["src_path"]))
        await self._hook("launched")
        info = await schema.probe(src, [*schema.WANTED_TRACE_EVENTS, *mode.trace_events])
        self.qemu_info = info
        self._observe(qemu_version=info.version)
        self.side["qemu"] = info.to_json()
        self.side["traces_enabled"] = await schema.enable_traces(
            src, info, list(schema.WANTED_TRACE_EVENTS) + list(mode.trace_events))

        chan = await ProbeChannel.open_on(host, src.path(PROBE_SOCKET), log_path=src.path(CONSOLE_LOG))
        stack.push_async_callback(_aclose, chan)
        self.stages.start("ready")
        try:
            hello = await chan.wait_hello(max(0.0, ready_deadline - time.monotonic()))
            self.side["hello"] = _jsonable(hello)
            with prog.task(f"{sc.name} r{sc.repeat}: prefault", total=100) as task:
                ready = await chan.wait_ready(max(0.0, ready_deadline - time.monotonic()), task)
        except GuestError as exc:
            if time.monotonic() < ready_deadline:
                raise
            note = await self._stuck_note(src)
            raise GuestError(f"guest never became READY within {sc.ready_timeout_s:g}s of its start "
                             f"({' '.join(str(exc).split())}){note}", exc.log_path) from exc
        self._observe(touched_mib=ready.touched_mib, prefault_ms=ready.prefault_ms)
        await self._threads(src, "ready")     # the loops run from here
        if ready.alias:
            self.side.setdefault("alias", {})["probe"] = dict(ready.alias)
        await self._hook("ready")
        page = backing.read_page_size(host, src.pid or 0, sc.alias_mib or sc.mem_mib,
                                      path_part=alias.ALIAS_FILE if sc.alias_mib else "")
        self._observe(page_size_kib=page.page_size_kib)
        self.side["ram_mapping"] = page.mapping

        self.stages.start("baseline")
        await stack.enter_async_context(dst)
        if sc.alias_mib:
            await asyncio.to_thread(alias.release, host, posixpath.dirname(self.side["alias"]["dst_path"]))
        uri = await migration.prepare_destination(dst)

        # KVM's counters FAULT_WINDOW_S before migrate (query-stats takes the BQL:
        # read before the baseline, not inside it)
        kvm = self.obs.accel == "kvm"
        self._sample("before", await kvm_stats.sample(src) if kvm and self.fault_cost else None)
        before_mono = time.monotonic()
        await self._marks(chan, MARKS_PER_BATCH, "before-baseline")
        # the baseline window is a span of time by definition; it starts when the
        # last mark's echo reached the QEMU host, and migrate is sent after it ends
        baseline_start = self.obs.marks[-1].host_recv_ns
        self._at(baseline_start=baseline_start, baseline_end=baseline_start + int(sc.baseline_s * 1e9))
        await self._hook("baseline")
        await asyncio.sleep(sc.baseline_s)
        if self.fault_cost:
            # the span before migrate that the fault-cost columns compare with
            await asyncio.sleep(max(0.0, before_mono + FAULT_WINDOW_S - time.monotonic()))
        # what KVM has mapped when dirty logging starts (kvm_mapped_mib)
        self._sample("migrate", await kvm_stats.sample(src) if kvm else None)
        await self._threads(src, "migrate")

        self.stages.start("migration")
        tracer.phase("enable")
        with prog.task(f"{sc.name} r{sc.repeat}: migration", total=None) as task:
            since = len(src.events)
            self._observe(migrate_sent_local_ns=await migration.start(src, uri, auto_converge=self.verifying))
            migrate_mono = time.monotonic()
            await self._hook("migrating")
            try:
                pass1 = await migration.wait_pass(src, 1, timeout=min(sc.migration_timeout_s,
                                                                      migration.DEFAULT_FIRST_PASS_TIMEOUT))
            except MigrationError as exc:
                raise MigrationError(await _why_failed(src, dst, head=" ".join(str(exc).split())),
                                     src.log_path) from exc
            pass1_seen = time.monotonic()       # the event happened before we saw it
            pass1_ns = event_time_ns(pass1)
            self._at(setup=_status_time(src, "setup", since), pass1=pass1_ns,
                     window_end=pass1_ns + int(sc.margin_ms * 1e6))
            task.update(description=f"{sc.name} r{sc.repeat}: migration, pass 1")
            await asyncio.sleep(sc.margin_ms / 1000)   # so window_end has passed on the QEMU host too
            await self._threads(src, "window_end")
            await self._marks(chan, MARKS_PER_BATCH, "after-window")
            try:
                q_active = await migration.query(src)
            except QEMUError as exc:
                log.warning("%s: query-migrate during the migration: %s", self.run_id, exc.one_line())
                q_active = {}
            self.side["query_migrate_active"] = q_active
            if sc.end_action == "cancel":
                # the cancel waits for the fault-cost span to end: cut short by an early cancel
                # (a fast start reaches pass 1 sooner), spans of two kernels would not compare
                cancel_at = pass1_seen + sc.cancel_after_s
                if self.fault_cost:
                    cancel_at = max(cancel_at, migrate_mono + FAULT_WINDOW_S)
                await self._fault_sample(src, migrate_mono, until=cancel_at)
                await asyncio.sleep(max(0.0, cancel_at - time.monotonic()))
                tracer.phase("disable")
                q_active = await migration.query(src)
                self.side["query_migrate_active"] = q_active
                if q_active.get("status") not in ("active", "setup", "pre-switchover", "device"):
                    raise MigrationError(f"migration was {q_active.get('status')!r} at cancel time; "
                                         f"use a shorter cancel_after_s (with a write loop the cancel waits "
                                         f"at least {FAULT_WINDOW_S:g} s after migrate)", src.log_path)
                since = len(src.events)
                dst.expect_exit("the migration was cancelled, so the incoming one fails")
                await migration.cancel(src)
                end = await migration.wait_end(src, sc.migration_timeout_s)
                if end["data"]["status"] != "cancelled":
                    raise MigrationError(await _why_failed(src, dst, end["data"]["status"]), src.log_path)
                self._at(cancelling=_status_time(src, "cancelling", since), cancelled=event_time_ns(end))
                q = q_active
                if self.verifying:
                    # the loops keep writing; their records migrate with the guest
                    await self._migrate_again_verified(stack, src, self.vms["dst2"], tracer, task)
                else:
                    await self._dump(chan, src)
            else:
                await self._fault_sample(src, migrate_mono)
                if not self.verifying:
                    await self._dump(chan, src)
                # with verify the loops keep writing through precopy; their records migrate with the guest
                await migration.release(src)
                task.update(description=f"{sc.name} r{sc.repeat}: migration, converging")
                end = await migration.wait_end(src, sc.migration_timeout_s)
                if end["data"]["status"] != "completed":
                    raise MigrationError(await _why_failed(src, dst, end["data"]["status"]), src.log_path)
                self._at(completed=event_time_ns(end))
                stop = next((e for e in src.events[since:] if e.get("event") == "STOP"), None)
                if stop is not None:        # the source guest ran until here
                    self._at(stopped=event_time_ns(stop))
                q = await migration.query_completed(src)
                await self._hook("completed")
                if not self.verifying:
                    await self._destination_answers(stack, dst)
                if self.verifying:
                    await self._verify_and_collect(stack, src, dst, task)
        if sc.alias_mib:
            # what the source QEMU holds after prefault and migration (its peak): read at the
            # end, not during the run, as smaps_rollup walks the page tables of every alias mapping
            self.side["alias"]["src_memory"] = await asyncio.to_thread(backing.process_memory, host, src.pid or 0)
        self.side["query_migrate"] = q
        self._observe(migration=MigrationEnd(query=q, query_active=q_active))
        self.stages.start("collection")
        timing: KvmTiming = tracer.collect()
        self._observe(kvm=timing)
        self.side["kvm"] = {"breakdown": timing.breakdown, "params": timing.params, "raw": timing.raw}
        with self.stages.within("verification"):
            self._check_clocks()
        await self._hook("measured")

    async def _migrate_again_verified(self, stack: contextlib.AsyncExitStack, src: VM, dst: VM,
                                      tracer: KvmTracer, task: Any) -> None:
        """``cancel`` + ``verify``: after the cancel (whose destination has
        exited), migrate the still-writing guest again, to a second destination,
        let that migration complete and compare guest RAM.  Dirty logging was
        started, stopped and started again: every write since must still reach
        the destination.  The row's figures stay those of the cancelled
        migration; the second one is in the sidecar's ``verify_migration``."""
        sc = self.sc
        tracer.phase("again")       # its KVM work is neither the measured enable nor the cancel's disable
        task.update(description=f"{sc.name} r{sc.repeat}: migrating again, to compare guest RAM")
        await stack.enter_async_context(dst)
        uri = await migration.prepare_destination(dst)
        since = len(src.events)
        await migration.start(src, uri, auto_converge=True)
        await migration.release(src)
        end = await migration.wait_end(src, sc.migration_timeout_s, since=since)
        if end["data"]["status"] != "completed":
            raise MigrationError("the second migration (after the cancel, to compare guest RAM): "
                                 + await _why_failed(src, dst, end["data"]["status"]), src.log_path)
        q = await migration.query_completed(src)
        self.side["verify_migration"] = {"query_migrate": q, "setup_ns": _status_time(src, "setup", since),
                                         "completed_ns": event_time_ns(end)}
        await self._verify_and_collect(stack, src, dst, task)

    async def _verify_and_collect(self, stack: contextlib.AsyncExitStack, src: VM, dst: VM, task: Any) -> None:
        """After a completed migration with ``verify``: compare guest RAM (both
        sides paused), resume the destination and collect the probe's records there."""
        sc = self.sc
        task.update(description=f"{sc.name} r{sc.repeat}: comparing guest RAM")
        with self.stages.within("verification"):
            await self._verify(src, dst)
        await dst.cmd("cont")
        dchan = await ProbeChannel.open_on(self.host, dst.path(PROBE_SOCKET), log_path=dst.path(CONSOLE_LOG))
        stack.push_async_callback(_aclose, dchan)
        await self._dump(dchan, dst)

    async def _threads(self, vm: VM, point: str) -> None:
        """The source QEMU's threads' scheduler statistics at ``point`` (:mod:`harness.measure.threads`)."""
        got = await asyncio.to_thread(threads.sample, self.host, vm.pid)
        self._observe(thread_samples={**self.obs.thread_samples, point: got})

    def _sample(self, point: str, sample: Optional[kvm_stats.Sample]) -> None:
        self._observe(kvm_samples={**self.obs.kvm_samples, point: sample})

    async def _fault_sample(self, src: VM, migrate_mono: float, until: Optional[float] = None) -> None:
        """End of the fault-cost span: FAULT_WINDOW_S after migrate was sent, or
        ``until`` (a cancel) if that comes first; KVM's counters then."""
        if not self.fault_cost:
            return
        end = migrate_mono + FAULT_WINDOW_S if until is None else min(until, migrate_mono + FAULT_WINDOW_S)
        await asyncio.sleep(max(0.0, end - time.monotonic()))
        self._observe(fault_window_s=max(0.0, time.monotonic() - migrate_mono))
        self._sample("after", await kvm_stats.sample(src) if self.obs.kvm_samples.get("migrate") else None)

    async def _destination_answers(self, stack: contextlib.AsyncExitStack, dst: VM) -> None:
        """A completed migration must leave a running guest: the probe on the
        destination echoes one mark (the records came from the source).  A
        guest that does not answer fails the run, saying what its vCPUs do."""
        dchan = await ProbeChannel.open_on(self.host, dst.path(PROBE_SOCKET), log_path=dst.path(CONSOLE_LOG))
        stack.push_async_callback(_aclose, dchan)
        try:
            s = await dchan.mark(MARK_TIMEOUT)
        except GuestError as exc:
            if not dst.alive:
                raise
            raise GuestError(f"the migrated guest does not answer on the destination "
                             f"({exc.args[0]}){await self._stuck_note(dst)}", exc.log_path) from exc
        self.side["destination_mark"] = {"round_trip_ms": (s.harness_recv_ns - s.harness_send_ns) / 1e6,
                                         "guest_ns": s.guest_ns}

    async def _dump(self, chan: ProbeChannel, vm: VM) -> None:
        """The probe's records; when it does not answer, the error says what the
        guest's vCPUs were doing instead (:mod:`harness.qemu.stuck`)."""
        with self.stages.within("collection"):
            try:
                records = tuple(await chan.dump(DUMP_TIMEOUT))
            except GuestError as exc:
                if not vm.alive:
                    raise
                raise GuestError(f"{exc.args[0]}{await self._stuck_note(vm)}", exc.log_path) from exc
        self._observe(records=records)

    async def _stuck_note(self, vm: VM) -> str:
        """``"; <what its vCPUs do>"`` for an error about a guest that did not
        answer in time (:mod:`harness.qemu.stuck`, kept in the sidecar's
        ``stuck``); "" when its QEMU is gone."""
        if not vm.alive:
            return ""
        snap = await stuck.snapshot(vm)
        self.side["stuck"] = {"vm": vm.name, **snap}
        text = stuck.summary(snap)
        return f"; {text}" if text else ""

    async def _verify(self, src: VM, dst: VM) -> None:
        """Hash guest RAM on both sides (both paused: the source by the
        completed migration, the destination by -S) and compare page by page
        (:mod:`harness.measure.verify`); a difference fails the run."""
        ranges = verify.guest_ram_ranges(self.sc.mem_mib, pad_kib=self.obs.ram_pad_kib)
        # MIGSTALL_VERIFY_DUMP=1: both sides' versions of the differing pages go
        # into the run's log dir (verify-pages/<gpa>.src|.dst), for diagnosis
        dump = self.log_dir / "verify-pages" if os.environ.get("MIGSTALL_VERIFY_DUMP", "") not in ("", "0") else None
        # the destination's KVM rewrites the guest's pvclock wall clock when QEMU
        # restores the vCPUs: not a lost write (verify.KvmRewrite)
        rewrites = verify.pvclock_wall_clock((self.side.get("hello") or {}).get("wall_clock_gpa")) \
            if self.obs.accel == "kvm" else ()
        res = await verify.verify_migration(src, dst, ranges, dump_dir=dump, rewrites=rewrites)
        self._observe(verify_pages=res.pages, verify_mismatch_pages=res.mismatch_pages)
        self.side["verify"] = {"ranges": [dataclasses.asdict(r) for r in ranges], **res.as_dict()}
        if not res.ok:
            qinfo = self.qemu_info
            cause = verify.known_cause(self.obs.accel, qinfo.version_tuple if qinfo else (), self.obs.ram_pad_kib)
            self.side["verify"]["known_cause"] = cause
            raise MeasurementError(res.error_text() + (f" ({cause})" if cause else ""))

    def _check_clocks(self) -> None:
        """Place the guest's clock on the timeline (the marks' fit) and check
        the QEMU host's clock against ours (:func:`check_causality`): the stall
        columns are derived only when this passed."""
        marks = [m.to_json() for m in self.obs.marks]
        cm = clockmod.fit(marks)
        self.side["clock"] = cm.to_json()
        self._observe(clock=cm)
        self.side["clock_offset"] = offset = check_causality(marks, self.obs.migrate_sent_local_ns,
                                                             self.t.setup or 0, self.host.name)
        self._derive_checked(clock_offset=offset)

    def _trace_columns(self, src: VM, mode: dirtylog.ModeSetup, accel: str, src_rd: str) -> None:
        """The source's trace (read once its QEMU exited): the dirty-log start
        and stop, the memslot ioctls; then the invariants between the row's
        figures and the mode's own check (:func:`dirtylog.verify`)."""
        text = src.log_text
        lines = qemu_trace.parse(text)
        self.side["trace_lines"] = [ln.raw for ln in lines]
        enabled = set(self.side.get("traces_enabled") or ())
        traced = "global_dirty_changed" in enabled
        memslots = accel == "kvm" and "kvm_set_user_memory" in enabled
        if not traced:
            log.info("QEMU %s has no global_dirty_changed trace event (before 6.1): dirty-log start "
                     "falls back to the QMP events MIGRATION setup -> MIGRATION_PASS 1", self.obs.qemu_version)
        start = qemu_trace.dirty_log_start(lines, setup_ns=self.t.setup or 0, pass1_ns=self.t.pass1,
                                           traced=traced, memslots=memslots)
        self._observe(dirty_log_start=start)
        self.side["dirty_log_start"] = dataclasses.asdict(start)
        if self.t.cancelled:
            stop = qemu_trace.dirty_log_stop(lines, cancelling_ns=self.t.cancelling or 0,
                                             cancelled_ns=self.t.cancelled or 0, traced=traced, memslots=memslots)
            self._observe(dirty_log_stop=stop)
            self.side["dirty_log_stop"] = dataclasses.asdict(stop)
        src_pid, dst_pid = src.pid, self.vms["dst"].pid
        changes: Dict[str, Any] = {}
        if accel == "kvm":
            calls = dirtylog.memslot_ioctls(dirtylog.read_shim_log(self.host, src_rd), src_pid)
            self.side["memslot_ioctls"] = [dataclasses.asdict(c) for c in calls]
            changes["memslot_ioctls"] = tuple(calls)
        check_invariants(self._derive_checked(**changes).row.to_dict())
        self.side["mode"].update(dirtylog.describe(self.sc.dirty_log_mode, accel, self.host, src_rd,
                                                   src_pid=src_pid, dst_pid=dst_pid))
        dirtylog.verify(self.sc.dirty_log_mode, accel, text, self.host, src_rd, src_pid=src_pid, dst_pid=dst_pid)


def _status_time(vm: VM, status: str, since: int) -> int:
    """QMP timestamp (QEMU host clock, ns) of the first ``MIGRATION {status}``
    event at index >= ``since``; MeasurementError if QEMU sent none."""
    for ev in vm.events[since:]:
        if ev.get("event") == "MIGRATION" and ev.get("data", {}).get("status") == status:
            return event_time_ns(ev)
    raise MeasurementError(f"QEMU {vm.name} sent no MIGRATION {{status: {status}}} event; "
                           f"its migration timeline cannot be anchored")


async def _why_failed(src: VM, dst: VM, status: str = "", head: str = "") -> str:
    """One line on a migration that ended ``status``: QEMU's error-desc, and whether the destination died."""
    parts = [head or f"migration {status}"]
    with best_effort("asking the source why the migration ended", log):
        desc = (await migration.query(src)).get("error-desc")
        if desc:
            parts.append(f"source says: {desc}")
    if dst.pid is not None and not dst.alive:
        parts.append("the destination QEMU has exited")
    return "; ".join(parts)


async def _aclose(chan: Any) -> None:
    close = getattr(chan, "close", None)
    if close is None:
        return
    res = close()
    if asyncio.iscoroutine(res):
        with best_effort(f"closing {type(chan).__name__}", log):
            await asyncio.wait_for(res, 5)


def _jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    if isinstance(obj, dict):
        return obj
    return getattr(obj, "__dict__", str(obj))


def _local_log(exc: BaseException, vms: Dict[str, VM]) -> None:
    """Point an InfraError at the local copy of its log (the host's runtime dir is gone)."""
    if not isinstance(exc, InfraError):
        return
    for vm in vms.values():
        if exc.log_path and exc.log_path in vm.collected:
            exc.log_path = vm.collected[exc.log_path]
            return
    for vm in vms.values():
        if vm.local_log and (not exc.log_path or exc.log_path.endswith(f"/{vm.name}.log")):
            exc.log_path = str(vm.local_log)
            return


def _lost_note(host: Host) -> str:
    """:meth:`Host.lost_note`, never raising (the row is being written)."""
    try:
        return host.lost_note()
    except Exception as exc:   # noqa: BLE001  a diagnostic only: the row must still be written
        log.warning("cannot tell why %s stopped answering: %s", host.name, exc)
        return ""


async def run_one(ctx: RunContext, scenario: Scenario, image: GuestImage) -> Dict[str, Any]:
    """Run ``scenario`` once; append its row to ``ctx.out`` and write its sidecar.

    Returns the row.  Never raises for a failed run (the row says
    ``status=failed``), except ``asyncio.CancelledError`` / KeyboardInterrupt,
    which are re-raised after the failed row is written."""
    run_id = new_run_id(scenario)
    run = _Run(ctx, scenario, image, run_id)
    t0 = time.monotonic()
    error: Optional[BaseException] = None
    try:
        await run.execute()
        run.stages.stop()
        derived = run.derived()
        row = dataclasses.replace(derived.row, status=results.STATUS_OK, sidecar=str(run.sidecar)).to_dict()
    except (Exception, asyncio.CancelledError, KeyboardInterrupt) as exc:
        error = exc
        if isinstance(exc, (asyncio.CancelledError, KeyboardInterrupt)):
            exc_for_row: Any = "interrupted (Ctrl-C); the run was stopped and cleaned up"
        else:
            _local_log(exc, run.vms)
            exc_for_row = exc.one_line() if isinstance(exc, MigstallError) else " ".join(str(exc).split())
            for tag, word in (("src", "source"), ("dst", "destination")):
                vm = run.vms.get(tag)
                if vm is not None and vm.exit_reason == "died" and f"{word} QEMU" not in exc_for_row:
                    exc_for_row += f"; {vm.death_note(f'the {word} QEMU')}"
            if not exc_for_row:
                exc_for_row = type(exc).__name__
            lost = _lost_note(ctx.host)
            if lost and lost not in exc_for_row:
                exc_for_row += f"; {lost}"
            if not isinstance(exc, MigstallError):
                log.exception("run %s failed unexpectedly", run_id)
        run.stages.stop()
        derived = run.derived()
        measured = derived.row.to_dict()
        row = results.failed_row(measured, exc_for_row, sidecar=str(run.sidecar))
        run.side["measured"] = {k: v for k, v in measured.items() if k in results.METRIC_COLUMNS and v is not None}
    run.side.update(derived.side)
    run.side["row"] = row
    run.side["timeline_ns"] = run.t.to_json()
    run.side["marks"] = [m.to_json() for m in run.obs.marks]
    run.side["stages"] = run.stages.to_json()
    run.side["wall_s"] = round(time.monotonic() - t0, 3)
    if error is not None:
        run.side["error"] = {"type": type(error).__name__, "message": str(error)}
    results.atomic_write_json(run.sidecar, run.side)
    results.append_rows(ctx.out, [row])
    if isinstance(error, (asyncio.CancelledError, KeyboardInterrupt)):
        raise error
    return row


def build_image(ctx: RunContext, kernel: Optional[str] = None) -> GuestImage:
    return build_guest_image(kernel=Path(kernel) if kernel else None, progress=ctx.progress)


async def run_matrix(ctx: RunContext, scenarios: Sequence[Scenario],
                     image: Optional[GuestImage] = None) -> List[Dict[str, Any]]:
    """Run every scenario in order (each writes its row).  The guest image is
    built once (per guest kernel) before the first run."""
    rows = []
    images: Dict[str, GuestImage] = {}
    for sc in scenarios:
        kernel = ctx.guest_kernel or sc.guest_kernel or ""
        if image is not None:
            img = image
        elif kernel not in images:
            try:
                images[kernel] = await asyncio.to_thread(build_image, ctx, kernel)
            except MigstallError as exc:
                row = results.failed_row(base_row(ctx, sc, new_run_id(sc)), exc)
                results.append_rows(ctx.out, [row])
                rows.append(row)
                continue
            img = images[kernel]
        else:
            img = images[kernel]
        try:
            if await asyncio.to_thread(ctx.host.configure, sc.l1_cmdline):
                log.info("host rebooted for l1_cmdline %r", sc.l1_cmdline)
        except MigstallError as exc:
            row = results.failed_row(base_row(ctx, sc, new_run_id(sc)), exc)
            results.append_rows(ctx.out, [row])
            rows.append(row)
            continue
        rows.append(await run_one(ctx, sc, img))
    return rows
