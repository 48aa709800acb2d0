"""One measured run, and a matrix of them.  Always a CSV row.

Flow of one run (:func:`run_one`), every wait bounded:

1. boot the source QEMU (guest kernel + initramfs with the probe) and ask it
   what it offers (:mod:`harness.qemu.schema`); enable the trace events;
2. wait for the probe's READY (``scenario.ready_timeout_s``), read the page
   size actually obtained from ``/proc/<pid>/smaps``; start the destination
   QEMU (``-incoming defer`` + ``migrate-incoming``);
3. clock marks, then the baseline window (``scenario.baseline_s``);
4. ``KvmTracer.phase("enable")`` and QMP ``migrate``;
5. ``MIGRATION_PASS`` 1 (the stall window runs from ``MIGRATION setup`` to
   ``margin_ms`` after it), marks;
6. ``end_action = complete``: collect the probe's data (``dump`` also stops the
   loops), lift the migration's bandwidth hold (:data:`migration.HOLD_BANDWIDTH`:
   until then precopy cannot complete and pause the source guest), wait for
   ``completed``, then one mark round trip with the probe on the destination:
   the migrated guest must run there (with ``verify`` the records come from
   the destination, which answers the same way).
   ``end_action = cancel``: ``cancel_after_s`` after pass 1,
   ``KvmTracer.phase("disable")`` + ``migrate_cancel``, wait for
   ``cancelled``, then collect the probe's data;
7. shut both QEMUs down; parse the source's trace lines into
   ``dirty_log_start_ms``/``dirty_log_stop_ms``; ``dirtylog.verify``; check
   the invariants between the columns (:func:`check_invariants`).

One clock per duration: every time on the run's timeline (``_Run.t``) is the
QEMU host's wall clock, the clock of QEMU's trace lines and QMP event
timestamps.  The marks that place the guest's clock on it are stamped there too,
by the mark relay (:meth:`ProbeChannel.open_on`).  This machine's clock is used
only for waiting and for the causality check of a remote host's clock
(:func:`check_causality`).

Whatever happens (QEMU dies, no READY, migration fails, Ctrl-C), the row is
written (``status=failed`` + ``error``) with its sidecar, and no process is left.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as _dt
import logging
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable, Dict, List, Mapping, Optional, Sequence

from harness import results
from harness.errors import (GuestError, HostError, InfraError, MeasurementError, MigrationError, MigstallError,
                            QEMUError, best_effort)
from harness.guest.channel import ProbeChannel
from harness.guest.image import GuestImage, build_guest_image
from harness.hosts import kernel_log
from harness.hosts.base import Host
from harness.hosts.facts import qemu_version, resolve_accel
from harness.measure import clock as clockmod
from harness.measure import kvm_stats, qemu_trace, stalls, verify
from harness.measure.kvm_trace import KvmTiming, KvmTracer
from harness.progress import Progress
from harness.qemu import backing, dirtylog, migration, schema, stuck
from harness.qemu.machine import VM, event_time_ns
from harness.run.plan import (CONSOLE_LOG, PROBE_SOCKET, HostFacts, RunPlan, default_cpu_model, plan_run, ram_pad_kib,
                              verifying)
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

#: ms: trace lines and kprobe times have microsecond resolution; invariants between
#: durations measured by different means allow this much
INVARIANT_SLACK_MS = 0.05
#: drift allowed between the QEMU host's clock and ours, per second between the
#: marks that measured the offset and the command checked against them (L1 under
#: TCG drifted up to 53 ms between two offsets taken ~1 s apart: README "Clocks")
CLOCK_DRIFT_PER_S = 0.06
#: ms always allowed on top of the drift in the causality check
CAUSALITY_SLACK_MS = 1.0

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
    return {
        "run_id": run_id,
        "started_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "host": ctx.host_label, "kernel_variant": ctx.kernel_variant or "stock",
        "series_id": ctx.series_id, "scenario": scenario.name,
        "accel": accel or scenario.accel, "cpu_model": scenario.cpu_model,
        "guest_mem_mib": scenario.mem_mib, "vcpus": scenario.vcpus, "backing": scenario.backing,
        "dirty_log_mode": scenario.dirty_log_mode, "dirty_ring": scenario.dirty_ring or None,
        "loops": list(scenario.loop_list), "end_action": scenario.end_action,
        "repeat": scenario.repeat,
    }


class _Run:
    """State of one run; ``row`` and ``side`` fill up as it goes."""

    def __init__(self, ctx: RunContext, scenario: Scenario, image: GuestImage, run_id: str) -> None:
        self.ctx, self.sc, self.image, self.run_id = ctx, scenario, image, run_id
        self.host = ctx.host
        self.sidecar = results.sidecar_path(ctx.out, run_id)
        self.log_dir = self.sidecar.with_suffix(".logs")
        self.row: Dict[str, Any] = base_row(ctx, scenario, run_id)
        self.side: Dict[str, Any] = {"run_id": run_id, "scenario": dataclasses.asdict(scenario),
                                     "doctor": ctx.doctor, "commands": {}, "events": {}, "logs": {},
                                     "marks": [], "timeline_ns": {}, "qemu_exit": {}}
        self.vms: Dict[str, VM] = {}
        #: the QEMU command lines (set once the host facts are read)
        self.plan: Optional[RunPlan] = None
        self.records: List[Any] = []
        self.marks: List[Any] = []
        #: the run's timeline, QEMU host wall clock (ns); see the module docstring
        self.t: Dict[str, int] = {}
        #: this machine's wall clock (ns) when ``migrate`` was sent: only for check_causality
        self.migrate_sent_local_ns = 0
        #: KiB of RAM beyond the scenario's ``mem`` (TCG dirty-sync workaround; set at launch)
        self.ram_pad_kib = 0
        #: the fault-cost columns are measured (a run with a ``write`` loop)
        self.fault_cost = "write" in scenario.loop_list
        #: s from migrate to the end of the fault-cost span (0: not measured)
        self.fault_window_s = 0.0
        #: KVM's counters at the fault-cost span's ends: before, migrate, after
        self.kvm_samples: Dict[str, Optional[kvm_stats.Sample]] = {}

    @property
    def verifying(self) -> bool:
        """Migrated memory is compared: ``verify`` and a migration that completes."""
        return verifying(self.sc)

    # -- helpers ------------------------------------------------------------------------
    async def _hook(self, point: str) -> None:
        if self.ctx.hook is not None:
            await self.ctx.hook(point, self.vms)

    async def _marks(self, chan: Any, n: int, label: str) -> None:
        for _ in range(n):
            s = await chan.mark(MARK_TIMEOUT)
            self.marks.append({"id": s.id, "host_send_ns": s.host_send_ns, "host_recv_ns": s.host_recv_ns,
                               "guest_ns": s.guest_ns, "harness_send_ns": s.harness_send_ns,
                               "harness_recv_ns": s.harness_recv_ns, "label": label})

    def _host_kernel(self) -> None:
        """``host_kernel`` (``uname -r``).  Not needed to run, so a failure does not fail the
        row; but compare tells kernels apart by it, so an empty cell comes with the reason,
        logged and in the sidecar's ``host_kernel_error``."""
        try:
            release = self.host.run(["uname", "-r"], timeout=20).text.strip()
        except Exception as exc:  # noqa: BLE001  reported just below; the run goes on without it
            why = f"uname -r failed: {' '.join(str(exc).split()) or type(exc).__name__}"
        else:
            self.row["host_kernel"] = release
            if release:
                return
            why = "uname -r printed nothing"
        log.warning("%s: host_kernel left empty: %s", self.run_id, why)
        self.side["host_kernel_error"] = why

    # -- the run ---------------------------------------------------------------------------
    async def execute(self) -> None:
        sc, host = self.sc, self.host
        accel = await asyncio.to_thread(resolve_accel, host, sc.accel)
        self.row["accel"] = accel
        self.row["cpu_model"] = default_cpu_model(sc, accel)
        self._host_kernel()
        kernel = await asyncio.to_thread(host.stage, Path(self.image.kernel))
        initrd = await asyncio.to_thread(host.stage, Path(self.image.initrd))
        qemu = sc.qemu or "qemu-system-x86_64"
        qver = backing.parse_version(await asyncio.to_thread(qemu_version, host, qemu))
        prefix = await asyncio.to_thread(backing.exec_prefix, sc.backing, host)
        self.ram_pad_kib = ram_pad_kib(sc, accel, qver)
        self.side["ram_pad_kib"] = self.ram_pad_kib

        with contextlib.ExitStack() as dirs:
            src_rd = dirs.enter_context(host.runtime_dir("migstall-src-"))
            dst_rd = dirs.enter_context(host.runtime_dir("migstall-dst-"))
            mode = dirtylog.setup(sc.dirty_log_mode, sc.dirty_ring, accel, host, src_rd)
            self.side["mode"] = {"accel_opts": list(mode.accel_opts), "env": dict(mode.env),
                                 "trace_events": list(mode.trace_events)}
            facts = HostFacts(accel=accel, qemu_version=qver, kernel=kernel, initrd=initrd,
                              src_rundir=src_rd, dst_rundir=dst_rd, mode=mode, prefix=tuple(prefix))
            self.plan = plan = plan_run(sc, facts, self.image, self.run_id, src_env=self.ctx.src_env)
            src, dst = (VM(host, p.name, list(p.argv), qemu=plan.qemu, prefix=plan.prefix, runtime_dir=p.runtime_dir,
                           env=p.env, log_dir=self.log_dir, launch_timeout=plan.launch_timeout_s,
                           collect=(CONSOLE_LOG,))
                        for p in (plan.src, plan.dst))
            self.vms = {"src": src, "dst": dst}
            try:
                async with contextlib.AsyncExitStack() as stack:
                    await self._measure(stack, src, dst, mode)
            finally:
                for tag, vm in self.vms.items():
                    self.side["commands"][tag] = vm.command_line
                    self.side["events"][tag] = [{k: v for k, v in e.items()} for e in vm.events]
                    self.side["logs"][tag] = str(vm.local_log) if vm.local_log else None
                    self.side["logs"][f"{tag}-console"] = vm.collected.get(vm.path(CONSOLE_LOG))
                    self.side["qemu_exit"][tag] = vm.exit_info()
                await asyncio.to_thread(self._host_kernel_log, src.launch_uptime_s)
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
        # tracing is set up before any QEMU of the run starts and torn down after
        # both have exited (the stack unwinds in reverse): arming kprobes patches
        # kernel text, best done while no guest runs (README "The virtual host")
        tracer = stack.enter_context(KvmTracer(host))
        ready_deadline = time.monotonic() + sc.ready_timeout_s   # READY within this of the launch
        await stack.enter_async_context(src)
        await self._hook("launched")
        info = await schema.probe(src, [*schema.WANTED_TRACE_EVENTS, *mode.trace_events])
        self.qemu_info = info
        self.row["qemu_version"] = info.version
        self.side["qemu"] = info.to_json()
        self.side["traces_enabled"] = await schema.enable_traces(
            src, info, list(schema.WANTED_TRACE_EVENTS) + list(mode.trace_events))

        chan = await ProbeChannel.open_on(host, src.path(PROBE_SOCKET), log_path=src.path(CONSOLE_LOG))
        stack.push_async_callback(_aclose, chan)
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
        self.row["touched_mib"] = ready.touched_mib
        self.row["prefault_ms"] = ready.prefault_ms
        await self._hook("ready")
        page = backing.read_page_size(host, src.pid or 0, sc.mem_mib)
        self.row["page_size_kib"] = page.page_size_kib
        self.side["ram_mapping"] = page.mapping

        await stack.enter_async_context(dst)
        uri = await migration.prepare_destination(dst)

        # KVM's counters FAULT_WINDOW_S before migrate (query-stats takes the BQL:
        # read before the baseline, not inside it)
        kvm = self.row.get("accel") == "kvm"
        self.kvm_samples["before"] = await kvm_stats.sample(src) if kvm and self.fault_cost else None
        before_mono = time.monotonic()
        await self._marks(chan, MARKS_PER_BATCH, "before-baseline")
        # the baseline window is a span of time by definition; it starts when the
        # last mark's echo reached the QEMU host, and migrate is sent after it ends
        self.t["baseline_start"] = self.marks[-1]["host_recv_ns"]
        self.t["baseline_end"] = self.t["baseline_start"] + int(sc.baseline_s * 1e9)
        await asyncio.sleep(sc.baseline_s)
        if self.fault_cost:
            # the span before migrate that the fault-cost columns compare with
            await asyncio.sleep(max(0.0, before_mono + FAULT_WINDOW_S - time.monotonic()))
        # what KVM has mapped when dirty logging starts (kvm_mapped_mib)
        self.kvm_samples["migrate"] = await kvm_stats.sample(src) if kvm else None

        tracer.phase("enable")
        with prog.task(f"{sc.name} r{sc.repeat}: migration", total=None) as task:
            since = len(src.events)
            self.migrate_sent_local_ns = await migration.start(src, uri, auto_converge=self.verifying)
            migrate_mono = time.monotonic()
            await self._hook("migrating")
            try:
                pass1 = await migration.wait_pass(src, 1, timeout=min(sc.migration_timeout_s,
                                                                      migration.DEFAULT_FIRST_PASS_TIMEOUT))
            except MigrationError as exc:
                raise MigrationError(await _why_failed(src, dst, head=" ".join(str(exc).split())),
                                     src.log_path) from exc
            pass1_seen = time.monotonic()       # the event happened before we saw it
            self.t["setup"] = _status_time(src, "setup", since)
            self.t["pass1"] = event_time_ns(pass1)
            task.update(description=f"{sc.name} r{sc.repeat}: migration, pass 1")
            self.t["window_end"] = self.t["pass1"] + int(sc.margin_ms * 1e6)
            await asyncio.sleep(sc.margin_ms / 1000)   # so window_end has passed on the QEMU host too
            await self._marks(chan, MARKS_PER_BATCH, "after-window")
            try:
                q_active = await migration.query(src)
            except QEMUError as exc:
                log.warning("%s: query-migrate during the migration: %s", self.run_id, exc.one_line())
                q_active = {}
            self.side["query_migrate_active"] = q_active
            if sc.end_action == "cancel":
                await self._fault_sample(src, migrate_mono, until=pass1_seen + sc.cancel_after_s)
                await asyncio.sleep(max(0.0, pass1_seen + sc.cancel_after_s - time.monotonic()))
                tracer.phase("disable")
                q_active = await migration.query(src)
                self.side["query_migrate_active"] = q_active
                if q_active.get("status") not in ("active", "setup", "pre-switchover", "device"):
                    raise MigrationError(f"migration was {q_active.get('status')!r} at cancel time; "
                                         f"use a shorter cancel_after_s", src.log_path)
                since = len(src.events)
                await migration.cancel(src)
                end = await migration.wait_end(src, sc.migration_timeout_s)
                if end["data"]["status"] != "cancelled":
                    raise MigrationError(await _why_failed(src, dst, end["data"]["status"]), src.log_path)
                self.t["cancelling"] = _status_time(src, "cancelling", since)
                self.t["cancelled"] = event_time_ns(end)
                q = q_active
                self.records = await self._dump(chan, src)
            else:
                await self._fault_sample(src, migrate_mono)
                if not self.verifying:
                    self.records = await self._dump(chan, src)
                # with verify the loops keep writing through precopy; their records migrate with the guest
                await migration.release(src)
                task.update(description=f"{sc.name} r{sc.repeat}: migration, converging")
                end = await migration.wait_end(src, sc.migration_timeout_s)
                if end["data"]["status"] != "completed":
                    raise MigrationError(await _why_failed(src, dst, end["data"]["status"]), src.log_path)
                self.t["completed"] = event_time_ns(end)
                stop = next((e for e in src.events[since:] if e.get("event") == "STOP"), None)
                if stop is not None:        # the source guest ran until here
                    self.t["stopped"] = event_time_ns(stop)
                q = await migration.query_completed(src)
                await self._hook("completed")
                if not self.verifying:
                    await self._destination_answers(stack, dst)
                if self.verifying:
                    task.update(description=f"{sc.name} r{sc.repeat}: comparing guest RAM")
                    await self._verify(src, dst)
                    await dst.cmd("cont")
                    dchan = await ProbeChannel.open_on(host, dst.path(PROBE_SOCKET),
                                                       log_path=dst.path(CONSOLE_LOG))
                    stack.push_async_callback(_aclose, dchan)
                    self.records = await self._dump(dchan, dst)
        self.side["query_migrate"] = q
        mt = migration.times(q)
        self.row["setup_time_ms"] = mt.setup_time_ms if mt.setup_time_ms is not None else \
            (q_active.get("setup-time") if q_active else None)
        self.row["first_pass_ms"] = (self.t["pass1"] - self.t["setup"]) / 1e6
        if sc.end_action == "complete":
            self.row["total_time_ms"] = mt.total_time_ms
            self.row["downtime_ms"] = mt.downtime_ms
        timing: KvmTiming = tracer.collect()
        self.row["kvm_enable_ms"] = timing.enable_ms
        self.row["kvm_disable_ms"] = timing.disable_ms
        self.row["kvm_params"] = timing.params or None
        self.side["kvm"] = {"breakdown": timing.breakdown, "params": timing.params, "raw": timing.raw}
        self._stall_columns()
        await self._hook("measured")

    async def _fault_sample(self, src: VM, migrate_mono: float, until: Optional[float] = None) -> None:
        """End of the fault-cost span: FAULT_WINDOW_S after migrate was sent, or
        ``until`` (a cancel) if that comes first; KVM's counters then."""
        if not self.fault_cost:
            return
        end = migrate_mono + FAULT_WINDOW_S if until is None else min(until, migrate_mono + FAULT_WINDOW_S)
        await asyncio.sleep(max(0.0, end - time.monotonic()))
        self.fault_window_s = max(0.0, time.monotonic() - migrate_mono)
        self.kvm_samples["after"] = await kvm_stats.sample(src) if self.kvm_samples.get("migrate") else None

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

    async def _dump(self, chan: Any, vm: VM) -> List[Any]:
        """The probe's records; when it does not answer, the error says what the
        guest's vCPUs were doing instead (:mod:`harness.qemu.stuck`)."""
        try:
            return list(await chan.dump(DUMP_TIMEOUT))
        except GuestError as exc:
            if not vm.alive:
                raise
            raise GuestError(f"{exc.args[0]}{await self._stuck_note(vm)}", exc.log_path) from exc

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
        ranges = verify.guest_ram_ranges(self.sc.mem_mib, pad_kib=self.ram_pad_kib)
        # MIGSTALL_VERIFY_DUMP=1: both sides' versions of the differing pages go
        # into the run's log dir (verify-pages/<gpa>.src|.dst), for diagnosis
        dump = self.log_dir / "verify-pages" if os.environ.get("MIGSTALL_VERIFY_DUMP", "") not in ("", "0") else None
        # the destination's KVM rewrites the guest's pvclock wall clock when QEMU
        # restores the vCPUs: not a lost write (verify.KvmRewrite)
        rewrites = verify.pvclock_wall_clock((self.side.get("hello") or {}).get("wall_clock_gpa")) \
            if self.row.get("accel") == "kvm" else ()
        res = await verify.verify_migration(src, dst, ranges, dump_dir=dump, rewrites=rewrites)
        self.row["verify_pages"] = res.pages
        self.row["verify_mismatch_pages"] = res.mismatch_pages
        self.side["verify"] = {"ranges": [dataclasses.asdict(r) for r in ranges], **res.as_dict()}
        if not res.ok:
            qinfo = getattr(self, "qemu_info", None)
            cause = verify.known_cause(self.row.get("accel"), qinfo.version_tuple if qinfo else (), self.ram_pad_kib)
            self.side["verify"]["known_cause"] = cause
            raise MeasurementError(res.error_text() + (f" ({cause})" if cause else ""))

    def _stall_columns(self) -> None:
        cm = clockmod.fit(self.marks)
        self.side["clock"] = cm.to_json()
        self.side["clock_offset"] = check_causality(self.marks, self.migrate_sent_local_ns, self.t["setup"] or 0,
                                                    self.host.name)
        w = (self.t["setup"], self.t["window_end"])
        b = (self.t["baseline_start"], self.t["baseline_end"])
        self.row.update(stalls.columns(stalls.class_stats(self.records, cm, *w)))
        self.row["baseline_stall_max_us"] = stalls.max_in(self.records, cm, *b)
        self.side["stalls"] = stalls.per_vcpu(self.records, cm, {"window": w, "baseline": b})
        self.side["windows_ns"] = {"stall": list(w), "baseline": list(b)}
        self._precopy_columns(cm)
        mig = self.kvm_samples.get("migrate")
        if mig is not None:
            self.row["kvm_mapped_mib"] = mig.mapped_mib
        if self.fault_window_s:
            self._fault_columns(cm)

    def _precopy_columns(self, cm: clockmod.ClockMap) -> None:
        """The guest's whole loss during migration: per loop class, stalled ms per
        second from ``MIGRATION setup`` to the end of precopy (``cancelled``, or
        the source's ``STOP`` before ``completed``), against the same rate from
        the baseline's start to ``setup``.  Only where the loops ran through
        precopy: on ``cancel`` and with ``verify`` (otherwise the records are
        collected, and the loops stopped, while precopy is still held)."""
        end = self.t.get("cancelled") if self.sc.end_action == "cancel" else \
            (self.t.get("stopped") if self.verifying else None)
        setup, base = self.t.get("setup"), self.t.get("baseline_start")
        if not end or not setup or not base or end <= setup or setup <= base:
            return
        for cls in stalls.CLASSES:
            during = stalls.sum_in(self.records, cm, setup, end, cls=cls)
            before = stalls.sum_in(self.records, cm, base, setup, cls=cls)
            self.row[f"stall_{cls}_precopy_ms_per_s"] = None if during is None else during / ((end - setup) / 1e9)
            self.row[f"baseline_stall_{cls}_ms_per_s"] = None if before is None else before / ((setup - base) / 1e9)
        self.side["precopy_windows_ns"] = {"precopy": [setup, end], "baseline": [base, setup]}

    def _fault_columns(self, cm: clockmod.ClockMap) -> None:
        """Where the start's cost went: the write loops' stalled time and KVM's
        page faults in the span after migrate, against an equally long span
        right before it (README "Columns": ``stall_write_sum_ms``, ``kvm_pf``)."""
        span = int(self.fault_window_s * 1e9)
        t0 = self.t["setup"] or 0
        after, before = (t0, t0 + span), (t0 - span, t0)
        self.row["fault_window_ms"] = round(self.fault_window_s * 1e3, 1)
        self.row["stall_write_sum_ms"] = stalls.sum_in(self.records, cm, *after, cls="write")
        self.row["baseline_stall_write_sum_ms"] = stalls.sum_in(self.records, cm, *before, cls="write")
        ks = self.kvm_samples
        self.row["kvm_pf"] = kvm_stats.delta(ks.get("migrate"), ks.get("after"), "pf_taken")
        self.row["baseline_kvm_pf"] = kvm_stats.delta(ks.get("before"), ks.get("migrate"), "pf_taken")
        spans: Dict[str, float] = {}
        for name, (a, b) in (("before", ("before", "migrate")), ("after", ("migrate", "after"))):
            sa, sb = ks.get(a), ks.get(b)
            if sa is not None and sb is not None:
                spans[name] = round(sb.local_s - sa.local_s, 3)
        self.side["fault_cost"] = {
            "window_s": self.fault_window_s,
            "windows_ns": {"after": list(after), "before": list(before)},
            "counter_spans_s": spans,            # the spans the counters cover, this machine's clock
            "kvm": {k: v.to_json() for k, v in ks.items() if v is not None},
        }

    def _trace_columns(self, src: VM, mode: dirtylog.ModeSetup, accel: str, src_rd: str) -> None:
        text = src.log_text
        lines = qemu_trace.parse(text)
        self.side["trace_lines"] = [ln.raw for ln in lines]
        enabled = set(self.side.get("traces_enabled") or ())
        traced = "global_dirty_changed" in enabled
        memslots = accel == "kvm" and "kvm_set_user_memory" in enabled
        if not traced:
            log.info("QEMU %s has no global_dirty_changed trace event (before 6.1): dirty-log start "
                     "falls back to the QMP events MIGRATION setup -> MIGRATION_PASS 1",
                     self.row.get("qemu_version"))
        start = qemu_trace.dirty_log_start(lines, setup_ns=self.t["setup"] or 0, pass1_ns=self.t.get("pass1"),
                                           traced=traced, memslots=memslots)
        self.row["dirty_log_start_ms"] = start.ms
        self.row["dirty_log_start_source"] = start.source
        self.side["dirty_log_start"] = dataclasses.asdict(start)
        if self.t.get("cancelled"):
            stop = qemu_trace.dirty_log_stop(lines, cancelling_ns=self.t["cancelling"] or 0,
                                             cancelled_ns=self.t["cancelled"] or 0, traced=traced, memslots=memslots)
            self.row["dirty_log_stop_ms"] = stop.ms
            self.row["dirty_log_stop_source"] = stop.source
            self.side["dirty_log_stop"] = dataclasses.asdict(stop)
        src_pid, dst_pid = src.pid, self.vms["dst"].pid
        if accel == "kvm":
            calls = dirtylog.memslot_ioctls(dirtylog.read_shim_log(self.host, src_rd), src_pid)
            self.side["memslot_ioctls"] = [dataclasses.asdict(c) for c in calls]
            self.row["kvm_ioctl_ms"] = dirtylog.enable_ioctl_ms(calls, self.t["setup"], self.t["pass1"])
        check_invariants(self.row)
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


def check_invariants(row: Dict[str, Any]) -> None:
    """Relations that hold between a row's durations by construction; one that
    breaks means a figure is wrong (MeasurementError names it):

    * ``dirty_log_start_ms >= kvm_enable_ms``: the kernel's walk happens inside
      the memslot ioctls that the start spans;
    * ``dirty_log_start_ms <= setup_time_ms + 1``: the start is part of the
      migration thread's setup (QEMU reports whole ms);
    * ``first_pass_ms >= dirty_log_start_ms``: pass 1 follows the start."""
    start = row.get("dirty_log_start_ms")
    if start is None:
        return
    slack = INVARIANT_SLACK_MS
    kvm, setup, first = row.get("kvm_enable_ms"), row.get("setup_time_ms"), row.get("first_pass_ms")
    broken = []
    if kvm is not None and start + slack < kvm:
        broken.append(f"dirty_log_start_ms {start:.3f} < kvm_enable_ms {kvm:.3f}")
    if setup is not None and start > float(setup) + 1 + slack:
        broken.append(f"dirty_log_start_ms {start:.3f} > setup_time_ms {setup} + 1")
    if first is not None and first + slack < start:
        broken.append(f"first_pass_ms {first:.3f} < dirty_log_start_ms {start:.3f}")
    if broken:
        raise MeasurementError("invariant broken: " + "; ".join(broken))


def check_causality(marks: Sequence[Mapping[str, Any]], migrate_sent_local_ns: int, setup_ns: int,
                    host_name: str) -> Dict[str, Any]:
    """The QEMU host's clock against ours, from the marks (each bounds the
    offset: the relay stamped after we sent and before we received), and one
    causality check: ``MIGRATION setup`` cannot precede the ``migrate`` that
    caused it.  Nothing is computed from the offset; it is recorded (median
    midpoint and spread of the per-mark estimates) and a contradiction fails
    the run (MeasurementError), since it means one of the clocks jumped."""
    bounds = [(m["host_recv_ns"] - m["harness_recv_ns"], m["host_send_ns"] - m["harness_send_ns"])
              for m in marks if m.get("harness_send_ns")]
    if not bounds:
        return {}
    mids = sorted((lo + hi) / 2 for lo, hi in bounds)
    out: Dict[str, Any] = {"offset_ms": mids[len(mids) // 2] / 1e6, "spread_ms": (mids[-1] - mids[0]) / 1e6,
                           "bounds_ms": [[lo / 1e6, hi / 1e6] for lo, hi in bounds]}
    before = [(m, lo) for m, (lo, _) in zip(marks, bounds) if m["harness_recv_ns"] <= migrate_sent_local_ns]
    if before and migrate_sent_local_ns and setup_ns:
        m, lo = before[-1]          # the last mark before migrate: the least drift since
        gap_s = (migrate_sent_local_ns - m["harness_recv_ns"]) / 1e9
        allowed_ns = (CLOCK_DRIFT_PER_S * gap_s * 1e3 + CAUSALITY_SLACK_MS) * 1e6
        earliest = migrate_sent_local_ns + lo          # on the QEMU host's clock, at the earliest
        out["setup_after_migrate_ms"] = (setup_ns - earliest) / 1e6
        if setup_ns < earliest - allowed_ns:
            raise MeasurementError(
                f"clock causality broken on {host_name}: MIGRATION setup is {(earliest - setup_ns) / 1e6:.1f} ms "
                f"before migrate could have reached QEMU (offset bounds of the last mark "
                f"{lo / 1e6:.1f} ms, allowed {allowed_ns / 1e6:.1f} ms)")
    return out


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
        row = dict(run.row, status=results.STATUS_OK, sidecar=str(run.sidecar))
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
        row = results.failed_row(run.row, exc_for_row, sidecar=str(run.sidecar))
        run.side["measured"] = {k: v for k, v in run.row.items() if k in results.METRIC_COLUMNS and v is not None}
    run.side["row"] = row
    run.side["timeline_ns"] = run.t
    run.side["marks"] = run.marks
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
