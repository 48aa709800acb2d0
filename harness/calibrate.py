"""Calibration: inject pauses of known length and check what the probe sees.

Run it first on a new host (``migstall calibrate``).  It boots the measured
guest with two vCPUs, vCPU0 running the ``pio`` loop (``outb`` to port 0x80:
an exit to QEMU that takes the BQL) and vCPU1 the ``cpu`` loop (pure
compute), waits for READY and a short baseline, then injects:

* ``sigstop`` pauses: the source QEMU process is stopped with SIGSTOP and
  resumed with SIGCONT after the requested time.  The true stopped interval is
  measured on the host with ``time.monotonic()`` right after the first and
  right before the second signal.  The guest's clocks (TSC, and so the
  probe's timestamps) keep running through it, so every loop must see a gap
  of that length.  A QMP ``stop``/``cont`` is NOT usable: it stops guest time
  too (TSC offset and kvmclock are frozen), so the guest could not see it.
* a ``bql`` hold: QMP ``pmemsave`` of a range of guest RAM into a file in the
  VM's runtime directory.  QMP commands run in QEMU's main loop with the BQL
  held, so for the whole command the ``pio`` loop, whose every ``outb`` needs
  the BQL, stalls, while the ``cpu`` loop, which never leaves the guest, does
  not.  The range is sized from a short trial ``pmemsave`` so that the hold
  lasts about ``bql_ms``; the injected length is the command's QMP round trip.

Then the probe's records are collected (``dump``), the guest clock is mapped
onto the host's with the ``mark`` samples taken around the injections
(:mod:`harness.measure.clock`), and for each injection and each loop the
detected pause is the longest recorded stall overlapping the injected
interval (widened by the clock-mapping uncertainty plus
:data:`MATCH_SLACK_MS`); 0 when no stall at or above the threshold overlaps.
"""

from __future__ import annotations

import asyncio
import datetime as _dt
import logging
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from harness import paths
from harness.errors import GuestError, UserError, best_effort
from harness.hosts.base import Host
from harness.progress import Progress

log = logging.getLogger(__name__)

DEFAULT_PAUSES_MS: Tuple[int, ...] = (50, 300, 1000)
DEFAULT_BQL_MS = 300
#: guest size and prefault: small, so that boot and READY are quick
GUEST_MEM_MIB = 1024
TOUCH_MIB = 64
#: guest kernel arguments that keep vCPU1 (the cpu loop) free of ticks and device
#: interrupts.  Under TCG the local APIC is emulated in QEMU under the BQL, so a
#: timer interrupt that reaches vCPU1 just as the BQL hold starts would block the
#: cpu loop for the whole hold (seen on this project's loaded 2-core machine).
QUIET_CPU_CMDLINE = "nohz_full=1 rcu_nocbs=1 irqaffinity=0"
#: stalls at or above this are recorded by the probe during calibration
THRESHOLD_US = 1000
#: seconds: the probe's hello after launch, READY, one mark, the dump
HELLO_TIMEOUT = 120.0
READY_TIMEOUT = 300.0
MARK_TIMEOUT = 10.0
DUMP_TIMEOUT = 60.0
#: seconds of baseline before the first injection, and of settling after each
BASELINE_S = 1.0
SETTLE_S = 0.3
#: QMP timeout of the pmemsave commands, seconds
PMEMSAVE_TIMEOUT = 60.0
#: size of the trial pmemsave that measures the copy rate, MiB
TRIAL_MIB = 32
#: pmemsave attempts after the trial, and the accepted share of the target length
BQL_ATTEMPTS = 3
BQL_ACCEPT = (0.7, 1.4)
#: extra ms on each side of an injection within which a stall counts as overlapping
MATCH_SLACK_MS = 20.0
#: ms a pause may be off by before the table flags it (the TCG test uses +-60 ms)
TOLERANCE_MS = 60.0
MAX_PAUSE_MS = 60_000


@dataclass(frozen=True)
class Injection:
    kind: str            # sigstop | bql
    injected_ms: float
    start_ns: int        # host wall clock (time.time_ns), for placing on the timeline
    end_ns: int
    detail: Dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class CalibrationPoint:
    injected_ms: float
    detected_ms: float
    accel: str
    kind: str            # sigstop | bql
    loop: str            # pio | cpu
    vcpu: int

    @property
    def error_ms(self) -> float:
        return self.detected_ms - self.injected_ms


@dataclass(frozen=True)
class CalibrationResult:
    points: Tuple[CalibrationPoint, ...]
    accel: str
    accel_reason: str
    qemu_version: str
    guest_kernel: str
    clock: Dict[str, Any]
    injections: Tuple[Injection, ...]
    threshold_us: int
    log_dir: str
    marks: Tuple[Any, ...] = ()       # the MarkSamples the clock map was fitted on
    records: Tuple[Any, ...] = ()     # the probe's LoopRecords

    def to_list(self) -> List[Dict[str, Any]]:
        """The JSON report: ``[{injected_ms, detected_ms, accel, kind, loop, vcpu}, ...]``."""
        return [{k: (round(v, 3) if isinstance(v, float) else v) for k, v in asdict(p).items()}
                for p in self.points]


def parse_pauses(text: str) -> Tuple[int, ...]:
    """``"50,300,1000"`` -> (50, 300, 1000); UserError for anything else."""
    out = []
    for item in text.split(","):
        item = item.strip()
        if not item.isdigit() or not 1 <= int(item) <= MAX_PAUSE_MS:
            raise UserError(f"--pause-ms {text!r}: {item!r} is not a pause in ms; "
                            f"give comma-separated integers in 1..{MAX_PAUSE_MS}, e.g. 50,300,1000")
        out.append(int(item))
    return tuple(out)


def match(injections: Sequence[Injection], records: Sequence[Any], clock: Any, accel: str,
          slack_ms: float = MATCH_SLACK_MS) -> List[CalibrationPoint]:
    """One point per injection and vCPU loop: the longest stall overlapping it."""
    tol_ns = int(getattr(clock, "uncertainty_ns", 0) + slack_ms * 1e6)
    points = []
    for inj in injections:
        lo, hi = inj.start_ns - tol_ns, inj.end_ns + tol_ns
        for rec in sorted(records, key=lambda r: r.cpu):
            best = 0
            for t_ns, dur_ns in rec.stalls:
                s0 = clock.to_host(t_ns)
                if s0 < hi and s0 + dur_ns > lo:
                    best = max(best, dur_ns)
            points.append(CalibrationPoint(round(inj.injected_ms, 3), round(best / 1e6, 3), accel,
                                           inj.kind, rec.cls, rec.cpu))
    return points


class _Session:
    """One calibration guest and the injections into it."""

    def __init__(self, host: Host, vm: Any, chan: Any) -> None:
        self.host, self.vm, self.chan = host, vm, chan
        self.marks: List[Any] = []
        self.injections: List[Injection] = []

    async def marks_batch(self, n: int) -> None:
        for _ in range(n):
            self.marks.append(await self.chan.mark(MARK_TIMEOUT))

    async def sigstop(self, pause_ms: int) -> Injection:
        pid = self.vm.pid
        off = int(self.host.clock_offset_s() * 1e9)
        await asyncio.to_thread(self.host.signal, pid, signal.SIGSTOP)
        t0, w0 = time.monotonic(), time.time_ns()
        try:
            # the pause is a span of time by definition: nothing to wait for
            await asyncio.sleep(pause_ms / 1000)
        finally:
            t1, w1 = time.monotonic(), time.time_ns()
            await asyncio.to_thread(self.host.signal, pid, signal.SIGCONT)
        inj = Injection("sigstop", (t1 - t0) * 1000, w0 + off, w1 + off, {"requested_ms": pause_ms})
        log.info("calibrate: SIGSTOP held %.1f ms (requested %d)", inj.injected_ms, pause_ms)
        return inj

    async def _pmemsave(self, size: int, path: str) -> Tuple[float, int, int]:
        off = int(self.host.clock_offset_s() * 1e9)
        w0, t0 = time.time_ns(), time.monotonic()
        try:
            await self.vm.cmd("pmemsave", {"val": 0, "size": size, "filename": path},
                              timeout=PMEMSAVE_TIMEOUT)
        finally:
            t1, w1 = time.monotonic(), time.time_ns()
            with best_effort(f"removing {path} on {self.host.name}", log):
                await asyncio.to_thread(self.host.run, ["rm", "-f", path], timeout=30, check=False)
        return (t1 - t0) * 1000, w0 + off, w1 + off

    async def bql_hold(self, target_ms: float, mem_mib: int) -> Injection:
        """A pmemsave sized to last about ``target_ms``.  The copy rate (page
        cache writes: it varies with the host's load) is measured with a
        :data:`TRIAL_MIB` trial; each further attempt is sized from the rate of
        the previous one, until one lasts within :data:`BQL_ACCEPT` of the
        target (at most :data:`BQL_ATTEMPTS`).  The last attempt is the
        injection; earlier ones are separate, earlier holds and do not overlap it."""
        path = self.vm.path("pmemsave.bin")
        limit = ((mem_mib - 1) << 20) & ~0xFFF
        size = TRIAL_MIB << 20
        attempts = []
        ms, w0, w1 = await self._pmemsave(size, path)
        attempts.append((size, round(ms, 3)))
        for _ in range(BQL_ATTEMPTS):
            rate = size / max(ms, 0.1)                      # bytes per ms
            size = int(min(max(rate * target_ms, 1 << 20), limit)) & ~0xFFF
            await asyncio.sleep(SETTLE_S)
            ms, w0, w1 = await self._pmemsave(size, path)
            attempts.append((size, round(ms, 3)))
            if BQL_ACCEPT[0] * target_ms <= ms <= BQL_ACCEPT[1] * target_ms or size == limit:
                break
        log.info("calibrate: pmemsave of %d MiB held the BQL %.1f ms (attempts: %s)", size >> 20, ms,
                 ", ".join(f"{b >> 20} MiB {t:.1f} ms" for b, t in attempts))
        return Injection("bql", ms, w0, w1, {"pmemsave_bytes": size, "attempts": attempts, "target_ms": target_ms})


def _save_console(host: Host, vm: Any, log_dir: Path) -> None:
    """Copy the guest console log next to the VM log (the runtime dir goes away)."""
    with best_effort(f"copying the guest console log to {log_dir}", log):
        log_dir.mkdir(parents=True, exist_ok=True)
        (log_dir / "console.log").write_bytes(host.read_bytes(vm.path("console.log")))


async def _inject(host: Host, vm: Any, chan: Any, sc: Any, pauses_ms: Sequence[int], bql_ms: float,
                  ready_timeout: float, progress: Progress) -> Tuple["_Session", List[Any]]:
    """READY, baseline, the injections, the dump."""
    await chan.wait_hello(HELLO_TIMEOUT)
    with progress.task("calibrate: guest prefault", total=100) as task:
        ready = await chan.wait_ready(ready_timeout, task)
    if tuple(ready.loops[:2]) != ("pio", "cpu"):
        raise GuestError(f"probe runs loops {ready.loops}, calibration needs pio,cpu", vm.log_path)
    s = _Session(host, vm, chan)
    await s.marks_batch(3)
    await asyncio.sleep(BASELINE_S)   # a baseline is a span of time by definition
    with progress.task("calibrate: injecting pauses", total=len(pauses_ms) + (bql_ms > 0)) as task:
        for p in pauses_ms:
            await s.marks_batch(2)
            s.injections.append(await s.sigstop(p))
            await asyncio.sleep(SETTLE_S)
            await s.marks_batch(2)
            task.update(advance=1)
        if bql_ms > 0:
            await s.marks_batch(2)
            s.injections.append(await s.bql_hold(bql_ms, sc.mem_mib))
            await asyncio.sleep(SETTLE_S)
            await s.marks_batch(2)
            task.update(advance=1)
    records = await chan.dump(DUMP_TIMEOUT)
    return s, list(records)


async def calibrate(host: Host, pauses_ms: Sequence[int] = DEFAULT_PAUSES_MS, *,
                    bql_ms: float = DEFAULT_BQL_MS, accel: str = "auto", qemu: str = "",
                    guest_kernel: Optional[str] = None, log_dir: Optional[Path] = None,
                    ready_timeout: float = READY_TIMEOUT,
                    progress: Progress = Progress()) -> CalibrationResult:
    """Boot, inject, measure (see the module docstring).  ``bql_ms <= 0`` skips
    the BQL hold.  Raises InfraError subclasses on failure; every QEMU started
    is stopped before it returns or raises."""
    from harness.hosts.facts import choose_accel
    from harness.guest.channel import ProbeChannel
    from harness.guest.image import build_guest_image, guest_qemu_args
    from harness.measure import clock as clockmod
    from harness.qemu.machine import VM
    from harness.scenario import Scenario

    choice = await asyncio.to_thread(choose_accel, host, accel, qemu or None)
    sc = Scenario(name="calibrate", mem_mib=GUEST_MEM_MIB, vcpus=2, accel=choice.accel,
                  touch_mib=TOUCH_MIB, loops=("pio", "cpu"), threshold_us=THRESHOLD_US)
    image = await asyncio.to_thread(build_guest_image, Path(guest_kernel) if guest_kernel else None, progress)
    kernel = host.stage(Path(image.kernel))
    initrd = host.stage(Path(image.initrd))
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    log_dir = Path(log_dir) if log_dir else paths.cache_dir("logs") / f"calibrate-{stamp}"

    def args(rundir: str) -> List[str]:
        if choice.accel == "kvm":
            accel_args = ["-accel", "kvm", "-cpu", "host"]
        else:
            accel_args = ["-accel", "tcg,thread=multi", "-cpu", "max"]
        guest = list(guest_qemu_args(image, kernel=kernel, initrd=initrd, channel_socket=f"{rundir}/probe.sock",
                                     console_log=f"{rundir}/console.log", scenario=sc))
        if "-append" in guest:
            i = guest.index("-append") + 1
            if "nohz_full=" not in guest[i]:   # the image's own command line may already have it
                guest[i] = f"{guest[i]} {QUIET_CPU_CMDLINE}"
        return [*accel_args, "-machine", "q35", "-smp", str(sc.vcpus), "-m", f"{sc.mem_mib}M",
                "-nodefaults", "-no-user-config", *guest]

    vm = VM(host, f"calibrate-{stamp}", args, qemu=qemu or "qemu-system-x86_64", log_dir=log_dir)
    async with vm:
        try:
            version = (await vm.cmd("query-version")).get("qemu", {})
            # marks on the QEMU host's clock (the relay); injections are timed here and
            # moved onto it with host.clock_offset_s() (0 for this machine)
            chan = await ProbeChannel.open_on(host, vm.path("probe.sock"), log_path=str(log_dir / "console.log"))
            async with chan:
                s, records = await _inject(host, vm, chan, sc, pauses_ms, bql_ms, ready_timeout, progress)
        finally:
            _save_console(host, vm, log_dir)
    cm = clockmod.fit(s.marks)   # it keeps the tight marks only
    points = match(s.injections, records, cm, choice.accel)
    for rec in records:
        if rec.dropped:
            log.warning("calibrate: vCPU%d (%s) dropped %d stalls", rec.cpu, rec.cls, rec.dropped)
    return CalibrationResult(
        points=tuple(points), accel=choice.accel, accel_reason=choice.reason,
        qemu_version=f"{version.get('major', '?')}.{version.get('minor', '?')}.{version.get('micro', '?')}",
        guest_kernel=image.kernel_release, clock=cm.to_json(), injections=tuple(s.injections),
        threshold_us=sc.threshold_us, log_dir=str(log_dir), marks=tuple(s.marks), records=tuple(records))
