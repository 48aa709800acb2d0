"""Per-scenario, per-metric statistics and the verdict.

For every metric (all of :data:`results.METRIC_COLUMNS`; lower is better) of
every scenario present on both sides:

* ``n``, median, IQR (25th..75th percentile, linear interpolation), min, max
  of the values of the ``status=ok`` rows (failed rows are counted, never used);
* ``pct_change`` = 100 * (median_new - median_base) / median_base;
* a bootstrap 95% CI of ``ratio = median_new / median_base``: both samples
  resampled with replacement ``BOOTSTRAP_RESAMPLES`` times, percentiles 2.5 and
  97.5 of the resampled ratios; the generator is seeded with
  ``BOOTSTRAP_SEED`` for every metric, so output is deterministic;
* the two-sided Mann-Whitney U p-value (``scipy.stats.mannwhitneyu``);
* the verdict, LKP's rule (a change counts only when the two ranges separate
  and the change passes a threshold):

  - ``missing``   one side has no value for this metric;
  - ``unchanged`` |pct_change| < threshold (default 10%), or both medians are 0;
  - ``noisy``     |pct_change| >= threshold but the ranges [min, max] of the two
                  samples overlap, or a side has fewer than ``MIN_N`` values;
  - ``improved`` / ``regressed``  |pct_change| >= threshold and the ranges are
                  separated; the new median is lower / higher.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from harness import results
from harness.compare.load import ResultSet, Run, ScenarioKey, variant_label
from harness.errors import UserError

BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 20190117          # the series' posting date; any fixed value will do
DEFAULT_THRESHOLD_PCT = 10.0
MIN_N = 2

VERDICTS = ("improved", "regressed", "unchanged", "noisy", "missing")

#: short names used in scenario labels
SHORT = {
    "guest_mem_mib": "mem", "dirty_log_mode": "mode", "page_size_kib": "page",
    "dirty_ring": "ring", "qemu_version": "qemu", "end_action": "end", "cpu_model": "cpu",
}


@dataclass(frozen=True)
class Sample:
    values: Tuple[float, ...]

    @property
    def n(self) -> int:
        return len(self.values)

    def _pct(self, q: float) -> Optional[float]:
        return float(np.percentile(self.values, q)) if self.values else None

    @property
    def median(self) -> Optional[float]:
        return float(np.median(self.values)) if self.values else None

    @property
    def q1(self) -> Optional[float]:
        return self._pct(25)

    @property
    def q3(self) -> Optional[float]:
        return self._pct(75)

    @property
    def min(self) -> Optional[float]:
        return min(self.values) if self.values else None

    @property
    def max(self) -> Optional[float]:
        return max(self.values) if self.values else None


@dataclass(frozen=True)
class MetricComparison:
    metric: str
    base: Sample
    new: Sample
    pct_change: Optional[float]
    ratio: Optional[float]
    ci_low: Optional[float]
    ci_high: Optional[float]
    p_value: Optional[float]
    separated: bool
    verdict: str


@dataclass(frozen=True)
class ScenarioComparison:
    key: ScenarioKey
    label: str
    base_variant: str
    new_variant: str
    base_ok: int
    base_failed: int
    new_ok: int
    new_failed: int
    metrics: Tuple[MetricComparison, ...]
    base_runs: Tuple[Run, ...]
    new_runs: Tuple[Run, ...]


@dataclass(frozen=True)
class Comparison:
    base_label: str
    new_label: str
    threshold_pct: float
    scenarios: Tuple[ScenarioComparison, ...]
    only_base: Tuple[str, ...]       # labels of scenarios present only in BASE
    only_new: Tuple[str, ...]

    def rows(self) -> List[Tuple[ScenarioComparison, MetricComparison]]:
        return [(s, m) for s in self.scenarios for m in s.metrics]

    def count(self, verdict: str) -> int:
        return sum(1 for _, m in self.rows() if m.verdict == verdict)


def bootstrap_ratio_ci(base: Sequence[float], new: Sequence[float], *,
                       resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED,
                       level: float = 0.95) -> Tuple[Optional[float], Optional[float]]:
    """Percentile bootstrap CI of median(new)/median(base)."""
    if not base or not new:
        return None, None
    rng = np.random.default_rng(seed)
    b = np.asarray(base, dtype=float)
    n = np.asarray(new, dtype=float)
    mb = np.median(rng.choice(b, size=(resamples, b.size), replace=True), axis=1)
    mn = np.median(rng.choice(n, size=(resamples, n.size), replace=True), axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = mn / mb
    ratios = ratios[np.isfinite(ratios)]
    if ratios.size < resamples // 2:          # base median is mostly 0: ratio undefined
        return None, None
    alpha = (1 - level) / 2 * 100
    return float(np.percentile(ratios, alpha)), float(np.percentile(ratios, 100 - alpha))


def bootstrap_median_ci(values: Sequence[float], *, resamples: int = BOOTSTRAP_RESAMPLES,
                        seed: int = BOOTSTRAP_SEED, level: float = 0.95) -> Tuple[Optional[float], Optional[float]]:
    """Percentile bootstrap CI of one sample's median (used by the plots)."""
    if not values:
        return None, None
    rng = np.random.default_rng(seed)
    v = np.asarray(values, dtype=float)
    meds = np.median(rng.choice(v, size=(resamples, v.size), replace=True), axis=1)
    alpha = (1 - level) / 2 * 100
    return float(np.percentile(meds, alpha)), float(np.percentile(meds, 100 - alpha))


def mann_whitney_p(base: Sequence[float], new: Sequence[float]) -> Optional[float]:
    if not base or not new:
        return None
    if len(set(base) | set(new)) == 1:
        return 1.0                     # all equal: no evidence of any difference
    from scipy.stats import mannwhitneyu

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p = float(mannwhitneyu(new, base, alternative="two-sided").pvalue)
    return p if math.isfinite(p) else None


def verdict(base: Sample, new: Sample, pct_change: Optional[float], separated: bool,
            threshold_pct: float) -> str:
    if not base.n or not new.n:
        return "missing"
    if base.median == 0 and new.median == 0:
        return "unchanged"
    change = pct_change if pct_change is not None else math.inf  # base 0, new > 0
    if abs(change) < threshold_pct:
        return "unchanged"
    if base.n < MIN_N or new.n < MIN_N or not separated:
        return "noisy"
    return "improved" if change < 0 else "regressed"


def compare_metric(metric: str, base_values: Sequence[float], new_values: Sequence[float],
                   threshold_pct: float = DEFAULT_THRESHOLD_PCT) -> MetricComparison:
    base, new = Sample(tuple(base_values)), Sample(tuple(new_values))
    pct = ratio = None
    if base.n and new.n and base.median:
        ratio = new.median / base.median
        pct = (ratio - 1.0) * 100.0
    elif base.n and new.n and base.median == 0 and new.median == 0:
        ratio, pct = 1.0, 0.0
    separated = bool(base.n and new.n and (new.max < base.min or new.min > base.max))
    lo, hi = bootstrap_ratio_ci(base.values, new.values)
    return MetricComparison(
        metric=metric, base=base, new=new, pct_change=pct, ratio=ratio, ci_low=lo, ci_high=hi,
        p_value=mann_whitney_p(base.values, new.values), separated=separated,
        verdict=verdict(base, new, pct, separated, threshold_pct),
    )


def scenario_labels(keys: Sequence[ScenarioKey]) -> Dict[ScenarioKey, str]:
    """Short, unique labels: the ``scenario`` name plus every key column whose value
    differs between the scenarios compared."""
    varying = [c for c in results.SCENARIO_COLUMNS
               if c != "scenario" and len({dict(k).get(c, "") for k in keys}) > 1]
    labels = {}
    for k in keys:
        d = dict(k)
        parts = [d.get("scenario") or ""] + [f"{SHORT.get(c, c)}={d.get(c, '')}" for c in varying]
        labels[k] = " ".join(p for p in parts if p) or "all"
    return labels


def _natural(key: ScenarioKey):
    """Sort numbers as numbers (512 before 1024), then strings."""
    out = []
    for _, v in key:
        try:
            out.append((0, float(v), ""))
        except ValueError:
            out.append((1, 0.0, v))
    return out


def _count_label(label: str, runs: Sequence[Run]) -> str:
    failed = sum(not r.ok for r in runs)
    return f"{label} ({len(runs)} runs, {failed} failed)"


def _values(runs: Sequence[Run], metric: str) -> List[float]:
    return [v for v in (r.metric(metric) for r in runs) if v is not None]


def compare(base: ResultSet, new: ResultSet, *, threshold_pct: float = DEFAULT_THRESHOLD_PCT,
            metrics: Optional[Sequence[str]] = None) -> Comparison:
    """Compare two result sets scenario by scenario.  UserError if they share none."""
    if metrics:
        unknown = [m for m in metrics if m not in results.METRIC_COLUMNS]
        if unknown:
            raise UserError(f"unknown metric {unknown[0]!r}; choose from {', '.join(results.METRIC_COLUMNS)}")
    if not (0 < threshold_pct < 1000):
        raise UserError(f"--threshold {threshold_pct:g} is out of range; give a percentage such as 10")
    wanted = tuple(metrics) if metrics else results.METRIC_COLUMNS
    b_groups, n_groups = base.by_scenario(), new.by_scenario()
    all_keys = sorted(set(b_groups) | set(n_groups), key=_natural)
    labels = scenario_labels(all_keys)
    common = [k for k in all_keys if k in b_groups and k in n_groups]
    if not common:
        raise UserError(
            f"no common scenario between {base.label} and {new.label} "
            f"(BASE has {len(b_groups)}, NEW has {len(n_groups)}; scenario keys: "
            f"{', '.join(c for c in results.SCENARIO_COLUMNS)}); compare results of the same scenarios")
    scenarios = []
    for key in common:
        b_runs, n_runs = b_groups[key], n_groups[key]
        mets = []
        for m in wanted:
            bv, nv = _values(b_runs, m), _values(n_runs, m)
            if not bv and not nv:
                continue                  # not measured on either side (e.g. kvm_* under TCG)
            mets.append(compare_metric(m, bv, nv, threshold_pct))
        scenarios.append(ScenarioComparison(
            key=key, label=labels[key],
            base_variant=variant_label(r.variant for r in b_runs),
            new_variant=variant_label(r.variant for r in n_runs),
            base_ok=sum(r.ok for r in b_runs), base_failed=sum(not r.ok for r in b_runs),
            new_ok=sum(r.ok for r in n_runs), new_failed=sum(not r.ok for r in n_runs),
            metrics=tuple(mets), base_runs=tuple(b_runs), new_runs=tuple(n_runs),
        ))
    return Comparison(
        base_label=base.label, new_label=new.label, threshold_pct=threshold_pct,
        scenarios=tuple(scenarios),
        only_base=tuple(_count_label(labels[k], b_groups[k]) for k in all_keys if k not in n_groups),
        only_new=tuple(_count_label(labels[k], n_groups[k]) for k in all_keys if k not in b_groups),
    )
