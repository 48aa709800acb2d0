"""Where a QEMU's vCPU threads spent a span: on a host CPU, waiting for one, or neither.

A guest loop that stalls is a host thread that did not run the loop.  The
host kernel keeps, per thread, the time it spent on a CPU and the time it was
runnable but waited on a run queue (``/proc/PID/task/TID/schedstat``:
``run_ns wait_ns slices``, CONFIG_SCHED_INFO).  Sampled at both ends of a
span, they split the span of each vCPU thread (QEMU names them ``CPU N/KVM``
or ``CPU N/TCG`` with ``-name ...,debug-threads=on``) in three:

* ``run``: on a host CPU.  For a vCPU: in the guest, in KVM, or in QEMU's
  device emulation.  A stall whose time the thread spent running happened
  inside the guest or the vCPU's own exits (a fault storm, a long exit);
* ``wait``: runnable, waiting for a host CPU: the host was busy (QEMU's other
  threads, other processes, a parallel build);
* ``blocked``: neither: the thread slept or was stopped (the BQL or another
  lock, a halted vCPU, SIGSTOP, the host itself paused).

The runner samples at READY, when ``migrate`` is sent and at the end of the
stall window.  The guest's loops start at READY, so the first span
(``before``) contains the baseline window and the start of every stall that
overlaps it; the second is the stall window (``window``).  The row keeps the largest ``wait`` and ``blocked`` of a
vCPU thread in each (README "Columns"); the sidecar keeps every thread's split
(``threads``).  Under TCG, where a stall of seconds can appear in the
baseline, the run table says which of the three it was.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Tuple

from harness.hosts.base import Host

log = logging.getLogger(__name__)

#: seconds one sample may take (one short shell command on the QEMU host; an SSH
#: round trip to the virtual host takes tens of ms here)
SAMPLE_TIMEOUT_S = 20.0

#: prints ``TID<TAB>COMM<TAB>RUN_NS WAIT_NS SLICES`` per thread of process $1;
#: a thread that exits meanwhile is skipped
_SCRIPT = ('for t in /proc/"$1"/task/*; do '
           'read -r c < "$t/comm" && read -r s < "$t/schedstat" && printf "%s\\t%s\\t%s\\n" "${t##*/}" "$c" "$s"; '
           'done 2>/dev/null; true')


@dataclass(frozen=True)
class ThreadStat:
    tid: int
    name: str
    run_ns: int
    wait_ns: int


@dataclass(frozen=True)
class Sample:
    """The threads of one process at one time (this machine's monotonic clock,
    the middle of the command that read them)."""
    mono_ns: int
    threads: Tuple[ThreadStat, ...]


def parse(text: str) -> Tuple[ThreadStat, ...]:
    out = []
    for line in text.splitlines():
        parts = line.split("\t")
        if len(parts) != 3:
            continue
        nums = parts[2].split()
        if len(nums) < 2 or not parts[0].isdigit() or not all(n.isdigit() for n in nums[:2]):
            continue
        out.append(ThreadStat(int(parts[0]), parts[1].strip(), int(nums[0]), int(nums[1])))
    return tuple(out)


def sample(host: Host, pid: Optional[int]) -> Optional[Sample]:
    """The scheduler statistics of every thread of ``pid`` on ``host``; None
    when they cannot be read (no pid, the process is gone, a kernel without
    schedstat): the split is a diagnostic, so the run goes on without it."""
    if not pid:
        return None
    t0 = time.monotonic_ns()
    try:
        res = host.run(["sh", "-c", _SCRIPT, "sh", str(pid)], timeout=SAMPLE_TIMEOUT_S, check=False)
    except Exception as exc:  # noqa: BLE001  a diagnostic: logged, and the row has no split
        log.warning("cannot read the scheduler statistics of process %d on %s: %s", pid, host.name, exc)
        return None
    t1 = time.monotonic_ns()
    threads = parse(res.text)
    if not threads:
        log.info("no scheduler statistics for process %d on %s (gone, or no CONFIG_SCHED_INFO)", pid, host.name)
        return None
    return Sample((t0 + t1) // 2, threads)


def is_vcpu(name: str) -> bool:
    """QEMU's vCPU threads: ``CPU 0/KVM``, ``CPU 1/TCG`` (``debug-threads=on``)."""
    return name.startswith("CPU ") and "/" in name


@dataclass(frozen=True)
class Split:
    """One thread over one span, ms."""
    name: str
    span_ms: float
    run_ms: float
    wait_ms: float

    @property
    def blocked_ms(self) -> float:
        return max(0.0, self.span_ms - self.run_ms - self.wait_ms)

    def to_json(self) -> Dict[str, Any]:
        return {"name": self.name, "span_ms": round(self.span_ms, 3), "run_ms": round(self.run_ms, 3),
                "wait_ms": round(self.wait_ms, 3), "blocked_ms": round(self.blocked_ms, 3)}


def split(a: Optional[Sample], b: Optional[Sample]) -> Tuple[Split, ...]:
    """Each thread present in both samples (matched by tid), over the span between them."""
    if a is None or b is None or b.mono_ns <= a.mono_ns:
        return ()
    span_ms = (b.mono_ns - a.mono_ns) / 1e6
    before = {t.tid: t for t in a.threads}
    out = []
    for t in b.threads:
        p = before.get(t.tid)
        if p is not None:
            out.append(Split(t.name, span_ms, (t.run_ns - p.run_ns) / 1e6, (t.wait_ns - p.wait_ns) / 1e6))
    return tuple(out)


def worst(splits: Tuple[Split, ...]) -> Tuple[Optional[float], Optional[float]]:
    """(largest ``wait``, largest ``blocked``) of a vCPU thread, ms; None when none was sampled."""
    vcpus = [s for s in splits if is_vcpu(s.name)]
    if not vcpus:
        return None, None
    return round(max(s.wait_ms for s in vcpus), 1), round(max(s.blocked_ms for s in vcpus), 1)


def spans(samples: Mapping[str, Optional[Sample]]) -> Dict[str, Tuple[Split, ...]]:
    """The runner's two spans (module docstring): ``before`` READY -> migrate, ``window`` migrate -> window end."""
    return {"before": split(samples.get("ready"), samples.get("migrate")),
            "window": split(samples.get("migrate"), samples.get("window_end"))}


#: a stall at least this long gets its cause said wherever a table shows it (issue 12:
#: TCG baselines of seconds must not appear unexplained)
LONG_STALL_MS = 1000.0


def why(stall_ms: float, wait_ms: Optional[float], blocked_ms: Optional[float]) -> str:
    """Plain words for a stall of ``stall_ms`` in a span where a vCPU thread
    waited at most ``wait_ms`` for a host CPU and was blocked at most
    ``blocked_ms`` (the row's ``*_vcpu_wait_ms``/``*_vcpu_blocked_ms``)."""
    if wait_ms is None or blocked_ms is None:
        return "no scheduler statistics of the vCPU threads to say why"
    figures = f"a vCPU thread waited up to {wait_ms / 1000:.2f} s for a host CPU and was blocked up to " \
              f"{blocked_ms / 1000:.2f} s"
    if wait_ms >= stall_ms / 2:
        return f"{figures}: the host's CPUs were busy with other work"
    if blocked_ms >= stall_ms / 2:
        return f"{figures}: it was blocked or stopped (a lock such as QEMU's BQL, a signal, or the host paused)"
    return f"{figures}: the vCPU threads ran, so the stall was inside the guest or its exits to QEMU/KVM"
