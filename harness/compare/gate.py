"""The regression gate: ``--fail-on METRIC:+PCT`` (repeatable).

A gate trips when, in any compared scenario, METRIC's median grew by more than
PCT percent **and** the two samples' ranges [min, max] are separated (every new
value above every base value), with at least ``stats.MIN_N`` values on each
side.  Pure noise (overlapping ranges) never trips it.  Metrics are "lower is
better", so only ``+PCT`` makes sense.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import List, Sequence

from harness import results
from harness.compare.stats import MIN_N, Comparison
from harness.compare.table import fmt_num, fmt_pct

_SPEC = re.compile(r"^(?P<metric>[a-z0-9_]+):\+(?P<pct>\d+(\.\d+)?)%?$")


@dataclass(frozen=True)
class GateSpec:
    metric: str
    pct: float

    def __str__(self) -> str:
        return f"{self.metric}:+{self.pct:g}%"


def parse_spec(text: str) -> GateSpec:
    """``METRIC:+PCT`` -> GateSpec.  ValueError (argparse turns it into exit 2)."""
    m = _SPEC.match(text.strip())
    if not m:
        raise ValueError(f"--fail-on {text!r}: expected METRIC:+PCT, e.g. dirty_log_start_ms:+10")
    metric, pct = m.group("metric"), float(m.group("pct"))
    if metric not in results.METRIC_COLUMNS:
        raise ValueError(f"--fail-on {text!r}: unknown metric {metric!r}; choose from "
                         f"{', '.join(results.METRIC_COLUMNS)}")
    if pct <= 0:
        raise ValueError(f"--fail-on {text!r}: the percentage must be > 0")
    return GateSpec(metric, pct)


def evaluate(cmp: Comparison, specs: Sequence[GateSpec]) -> List[str]:
    """One line per violation (empty: the gate passes)."""
    failures = []
    for spec in specs:
        for sc, m in cmp.rows():
            if m.metric != spec.metric or m.pct_change is None:
                continue
            if m.base.n < MIN_N or m.new.n < MIN_N or not m.separated:
                continue
            if m.pct_change > spec.pct:
                failures.append(
                    f"{spec.metric} regressed {fmt_pct(m.pct_change)} (> +{spec.pct:g}%) in "
                    f"'{sc.label}': median {fmt_num(m.base.median)} -> {fmt_num(m.new.median)}, "
                    f"ranges separated (n={m.base.n}/{m.new.n})")
    return failures
