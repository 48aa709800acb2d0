"""Guest clock -> host wall clock, from ``mark`` samples.

Each sample is (host_send_ns, host_recv_ns, guest_ns): the host wrote
``mark`` at ``host_send_ns``, the probe read it at guest time ``guest_ns`` and
the echo arrived at ``host_recv_ns``.  The guest's reading happened somewhere in
[send, recv], so the best point estimate is the midpoint with an error of at
most half the round trip.

:func:`fit` returns ``host = mid_ref + slope * (guest - guest_ref) + offset``
from the *tight* samples only: those whose round trip is within
:data:`RTT_FACTOR` x the fastest one (or the fastest + :data:`RTT_SLACK_NS`).
A mark the guest answered late (its channel thread waited for a vCPU, the host
was busy) says little about where the guest clock is; one such sample used to
tilt the slope and widen the uncertainty by its whole round trip (170 ms seen
in CI, issue 16).  The slope is the median of the slopes between pairs of
tight samples at least :data:`MIN_PAIR_NS` of guest time apart (Theil-Sen),
when the samples span at least :data:`MIN_SPAN_NS`, and it stays within
:data:`MAX_SKEW` of 1 (else 1 is used); the offset is the median of the
samples' offsets at that slope.  A median, unlike a least-squares line, is not
bent by one sample that sits off the others (a guest clock that stepped, a mark
answered while the host stalled right after the guest read its clock): at most
that sample's own residual grows.
``uncertainty_ns`` = smallest half round trip + the largest residual of a
tight sample: every mapped time is within that of the truth (plus drift
outside the sampled interval).  A sample's guest reading lies somewhere in its
round trip, so on a linear guest clock each residual stays within half the
tight limit (``rtt_limit_ns``) and the line's own error: the uncertainty
scales with how fast the channel answered, which on a loaded 2-core host
running TCG guests is tens of ms (issue 16: 32 ms in a CI run with the
test kernels building beside it, under 1 ms on the same host idle).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from statistics import median
from typing import Any, Dict, List, Optional, Sequence, Tuple

log = logging.getLogger(__name__)

MIN_SPAN_NS = 500_000_000
#: pairs of samples closer than this in guest time (ns) give no slope: two marks
#: of one batch (about 1 ms apart) would turn round-trip noise into slope noise
MIN_PAIR_NS = 100_000_000
#: the largest guest-clock rate error the fit corrects; beyond it the slope is taken
#: as 1.  It was 1 %, then 5 % (a TCG guest ran 1.5 % fast in an idle calibration;
#: CI run 55: 383 ms of residual), then 20 %.  On 2026-12-05 TCG guests here ran
#: 23-29 % fast while their loops spun (demo rows fitted slopes 0.81-0.83; CI runs
#: 80-81 failed test_calibrate with 782-797 ms of residual at a slope forced to 1),
#: after this machine's two CPUs' TSCs had drifted about 0.2 us apart: QEMU 7.2's
#: TCG rdtsc is host ticks plus an offset that it raises whenever a read comes out
#: below the previous one, and two vCPU threads reading the TSC on two CPUs hit
#: that all the time (README "Clocks").  The median slope cannot be bent that far
#: by one bad sample, so the bound only rejects nonsense
MAX_SKEW = 0.5
#: a sample is tight when its round trip is within this factor of the fastest ...
RTT_FACTOR = 3.0
#: ... or within this of it (ns): sub-millisecond round trips vary by more than 3x
RTT_SLACK_NS = 2_000_000


@dataclass(frozen=True)
class ClockMap:
    slope: float
    guest_ref_ns: int
    host_ref_ns: int
    uncertainty_ns: int
    samples: int
    used: int = 0         # tight samples the map was fitted on
    #: the largest round trip a tight sample could have (ns): how good the channel was
    rtt_limit_ns: int = 0
    #: half the fastest round trip (ns), the first term of ``uncertainty_ns``
    best_half_rtt_ns: int = 0

    def to_host(self, guest_ns: int) -> int:
        return int(self.host_ref_ns + self.slope * (guest_ns - self.guest_ref_ns))

    def to_json(self) -> Dict[str, Any]:
        return {"slope": self.slope, "guest_ref_ns": self.guest_ref_ns, "host_ref_ns": self.host_ref_ns,
                "uncertainty_us": self.uncertainty_ns / 1000, "samples": self.samples, "used": self.used,
                "rtt_limit_us": self.rtt_limit_ns / 1000, "best_half_rtt_us": self.best_half_rtt_ns / 1000}


def _get(s: Any, name: str) -> int:
    return int(s[name] if isinstance(s, dict) else getattr(s, name))


def rtt_limit(samples: Sequence[Any]) -> float:
    """The round trip (ns) up to which a sample is tight: RTT_FACTOR x the fastest, or RTT_SLACK_NS more."""
    rtts = [_get(s, "host_recv_ns") - _get(s, "host_send_ns") for s in samples]
    return max(RTT_FACTOR * min(rtts), min(rtts) + RTT_SLACK_NS)


def tight(samples: Sequence[Any]) -> List[Any]:
    """The samples whose round trip is within RTT_FACTOR x (or RTT_SLACK_NS of) the fastest."""
    if not samples:
        return []
    limit = rtt_limit(samples)
    return [s for s in samples if _get(s, "host_recv_ns") - _get(s, "host_send_ns") <= limit]


def theil_sen(pts: Sequence[Tuple[float, float, float]]) -> Optional[float]:
    """The median slope (host ns per guest ns) over pairs of ``(guest_ns, host_mid_ns,
    half_rtt)`` points at least MIN_PAIR_NS of guest time apart; None without such a pair.
    (scipy.stats.theilslopes takes every pair, close ones included, and costs a
    scipy import on every run for a few dozen points.)"""
    slopes = [(b[1] - a[1]) / (b[0] - a[0]) for i, a in enumerate(pts) for b in pts[i + 1:]
              if abs(b[0] - a[0]) >= MIN_PAIR_NS]
    return median(slopes) if slopes else None


def fit(samples: Sequence[Any]) -> ClockMap:
    """``samples``: objects or dicts with host_send_ns, host_recv_ns, guest_ns."""
    if not samples:
        raise ValueError("no mark samples: cannot place guest times on the host timeline")
    used = tight(samples)
    pts = [(_get(s, "guest_ns"), (_get(s, "host_send_ns") + _get(s, "host_recv_ns")) / 2,
            (_get(s, "host_recv_ns") - _get(s, "host_send_ns")) / 2) for s in used]
    g_ref = pts[0][0]
    slope = 1.0
    span = max(p[0] for p in pts) - min(p[0] for p in pts)
    if len(pts) >= 2 and span >= MIN_SPAN_NS:
        est = theil_sen(pts)
        if est is not None and abs(est - 1.0) <= MAX_SKEW:
            slope = est
        elif est is not None:
            log.warning("guest clock rate %.4f x this host's is beyond %.0f %%: mapped with slope 1",
                        1 / est, MAX_SKEW * 100)
    best_half_rtt = min(p[2] for p in pts)
    h_ref = median(p[1] - slope * (p[0] - g_ref) for p in pts)
    resid = max(abs(p[1] - (h_ref + slope * (p[0] - g_ref))) for p in pts)
    return ClockMap(slope, g_ref, int(h_ref), int(best_half_rtt + resid), len(samples), len(pts),
                    int(rtt_limit(samples)), int(best_half_rtt))
