"""Per-scenario, per-metric statistics and the verdict.

For every metric (all of :data:`results.METRIC_COLUMNS`; lower is better) of
every scenario present on both sides:

* ``n``, median, IQR (25th..75th percentile, linear interpolation), min, max
  of the values of the ``status=ok`` rows (failed rows are counted, never used),
  from one ``groupby`` over the scenario keys of :func:`harness.results.load`'s frame;
* ``pct_change`` = 100 * (median_new - median_base) / median_base;
* a percentile bootstrap 95% CI of ``ratio = median_new / median_base``: both
  samples resampled with replacement ``BOOTSTRAP_RESAMPLES`` times, percentiles
  2.5 and 97.5 of the resampled ratios; the generator is seeded with
  ``BOOTSTRAP_SEED`` for every metric, so output is deterministic.  When both
  samples have at most ``RESAMPLE_MAX_N`` values the resamples are drawn by
  ``scipy.stats.bootstrap``; above that, drawing n values per resample costs
  O(resamples x n) per metric (2000 x 2000 for a 2000-repeat sweep), so each
  resample's median is drawn directly from its exact distribution: the k-th
  smallest of n values drawn with replacement from the sorted sample x is
  ``x[floor(n * U)]`` with ``U ~ Beta(k, n + 1 - k)`` (and the (k+1)-th, for an
  even n, ``U + (1 - U) * Beta(1, n - k)``): the same bootstrap distribution,
  O(resamples) per metric;
* the two-sided Mann-Whitney U p-value (``scipy.stats.mannwhitneyu``; when both samples
  have more than 8 values, its normal approximation is computed here to the same float,
  so that a large comparison does not import ``scipy.stats``);
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

import logging
import math
import warnings
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from harness import results
from harness.compare.load import ResultSet, Run, ScenarioKey, runs_of, variant_label
from harness.errors import UserError

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)

BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 20190117          # the series' posting date; any fixed value will do
#: up to this many values per side the bootstrap resamples the values (scipy.stats.bootstrap)
RESAMPLE_MAX_N = 100
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
    """The values of one metric on one side, with their summary (None when empty)."""

    values: Tuple[float, ...]
    median: Optional[float] = None
    q1: Optional[float] = None
    q3: Optional[float] = None
    min: Optional[float] = None
    max: Optional[float] = None

    def __post_init__(self) -> None:
        """``Sample(values)`` alone computes the summary (compare passes the groupby's)."""
        if self.values and self.median is None:
            v = np.asarray(self.values, dtype=float)
            q1, q3 = np.percentile(v, [25, 75])
            for name, value in (("median", np.median(v)), ("q1", q1), ("q3", q3), ("min", v.min()),
                                ("max", v.max())):
                object.__setattr__(self, name, float(value))

    @classmethod
    def of(cls, values: Sequence[float]) -> "Sample":
        return cls(tuple(float(x) for x in values))

    @property
    def n(self) -> int:
        return len(self.values)


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
    base_set: Optional[ResultSet] = field(default=None, repr=False, compare=False)
    base_index: Tuple[int, ...] = field(default=(), repr=False, compare=False)
    new_set: Optional[ResultSet] = field(default=None, repr=False, compare=False)
    new_index: Tuple[int, ...] = field(default=(), repr=False, compare=False)

    @cached_property
    def base_rows(self) -> "pd.DataFrame":
        """This scenario's BASE rows (ok first, then failed)."""
        return self.base_set.frame.iloc[list(self.base_index)] if self.base_set is not None else None

    @cached_property
    def new_rows(self) -> "pd.DataFrame":
        return self.new_set.frame.iloc[list(self.new_index)] if self.new_set is not None else None

    @cached_property
    def base_runs(self) -> Tuple[Run, ...]:
        return runs_of(self.base_rows) if self.base_set is not None else ()

    @cached_property
    def new_runs(self) -> Tuple[Run, ...]:
        return runs_of(self.new_rows) if self.new_set is not None else ()


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


def _scipy_bootstrap(data: Tuple[np.ndarray, ...], statistic: Callable[..., np.ndarray], resamples: int,
                     seed: int) -> np.ndarray:
    """The bootstrap distribution of ``statistic`` from ``scipy.stats.bootstrap`` (one batch,
    so the draws are ``resamples x n`` indices per sample, in the order of ``data``)."""
    from scipy.stats import bootstrap

    kwargs = dict(n_resamples=resamples, method="percentile", vectorized=True, paired=False, batch=None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")        # a degenerate distribution is handled by the caller
        try:
            res = bootstrap(data, statistic, rng=np.random.default_rng(seed), **kwargs)
        except TypeError:                      # scipy < 1.15 calls the generator random_state
            res = bootstrap(data, statistic, random_state=np.random.default_rng(seed), **kwargs)
    return np.asarray(res.bootstrap_distribution, dtype=float)


def _median_draws(sorted_values: np.ndarray, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """Medians of ``resamples`` bootstrap resamples of a sorted sample, drawn from their exact
    distribution through the order statistics of uniforms (O(resamples), not O(resamples x n))."""
    n = sorted_values.size
    if n == 1:
        return np.full(resamples, sorted_values[0])
    k = (n + 1) // 2                                        # 1-based rank of the (lower) middle value
    u = rng.beta(k, n + 1 - k, size=resamples)             # U_(k) of n uniforms
    lo = sorted_values[np.minimum((u * n).astype(np.int64), n - 1)]
    if n % 2:
        return lo
    u2 = u + (1.0 - u) * rng.beta(1, n - k, size=resamples)   # U_(k+1) given U_(k)
    hi = sorted_values[np.minimum((u2 * n).astype(np.int64), n - 1)]
    return (lo + hi) / 2.0


def _median_of(x: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.median(x, axis=axis)


def _ratio_of_medians(base: np.ndarray, new: np.ndarray, axis: int = -1) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.median(new, axis=axis) / np.median(base, axis=axis)


def _bootstrap_medians(values: np.ndarray, resamples: int, rng: np.random.Generator) -> np.ndarray:
    return _median_draws(np.sort(values), resamples, rng)


def bootstrap_ratio_ci(base: Sequence[float], new: Sequence[float], *,
                       resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED,
                       level: float = 0.95) -> Tuple[Optional[float], Optional[float]]:
    """Percentile bootstrap CI of median(new)/median(base) (see the module docstring)."""
    b = np.asarray(base, dtype=float)
    n = np.asarray(new, dtype=float)
    if not b.size or not n.size:
        return None, None
    if max(b.size, n.size) <= RESAMPLE_MAX_N:
        if b.size >= 2 and n.size >= 2:
            ratios = _scipy_bootstrap((b, n), _ratio_of_medians, resamples, seed)
        elif b.size >= 2:            # a single value resamples to itself (and draws nothing)
            with np.errstate(divide="ignore", invalid="ignore"):
                ratios = n[0] / _scipy_bootstrap((b,), _median_of, resamples, seed)
        elif n.size >= 2:
            ratios = _scipy_bootstrap((n,), _median_of, resamples, seed) / b[0] if b[0] else \
                np.full(resamples, np.nan)
        else:
            with np.errstate(divide="ignore", invalid="ignore"):
                ratios = np.full(resamples, n[0] / b[0] if b[0] else np.nan)
    else:
        rng = np.random.default_rng(seed)
        mb = _bootstrap_medians(b, resamples, rng)
        mn = _bootstrap_medians(n, resamples, rng)
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
    v = np.asarray(values, dtype=float)
    if not v.size:
        return None, None
    if v.size == 1:
        return float(v[0]), float(v[0])
    if v.size <= RESAMPLE_MAX_N:
        meds = _scipy_bootstrap((v,), _median_of, resamples, seed)
    else:
        meds = _bootstrap_medians(v, resamples, np.random.default_rng(seed))
    alpha = (1 - level) / 2 * 100
    return float(np.percentile(meds, alpha)), float(np.percentile(meds, 100 - alpha))


def mann_whitney_p(base: Sequence[float], new: Sequence[float]) -> Optional[float]:
    b, n = np.asarray(base, dtype=float), np.asarray(new, dtype=float)
    if not b.size or not n.size:
        return None
    both = np.concatenate([b, n])
    if (both == both[0]).all():
        return 1.0                     # all equal: no evidence of any difference
    if min(b.size, n.size) > 8 and np.isfinite(both).all():
        p = _mann_whitney_normal_p(n, b)    # scipy.stats costs ~1 s to import; scipy.special a fraction
    else:
        from scipy.stats import mannwhitneyu

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            p = float(mannwhitneyu(n, b, alternative="two-sided").pvalue)
    return p if math.isfinite(p) else None


def _mann_whitney_normal_p(x: np.ndarray, y: np.ndarray) -> float:
    """Two-sided Mann-Whitney U p-value of x against y from the normal approximation with
    tie correction and continuity correction: what ``scipy.stats.mannwhitneyu(x, y,
    alternative="two-sided")`` computes ("auto" picks it when both samples have more than
    8 values), without importing ``scipy.stats``.

    Every intermediate up to the standard deviation is a sum of integers or half-integers
    far below 2**53, so exact in any order; the last steps are the same IEEE operations
    and ``scipy.special.ndtr``, hence the same float (tests compare them bit for bit)."""
    from scipy.special import ndtr

    n1, n2 = x.size, y.size
    both = np.concatenate([x, y])
    order = np.argsort(both, kind="stable")
    ordered = both[order]
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])   # first position of each tie block
    counts = np.diff(np.r_[starts, ordered.size])
    mid_rank = starts + (counts + 1) / 2.0                  # 1-based average rank of each block
    ranks = np.empty(ordered.size, dtype=float)
    ranks[order] = np.repeat(mid_rank, counts)
    r1 = ranks[:n1].sum()
    u1 = r1 - n1 * (n1 + 1) / 2
    u = max(u1, n1 * n2 - u1)
    t = counts.astype(float)
    tie_term = (t ** 3 - t).sum()
    n = n1 + n2
    s = np.sqrt(n1 * n2 / 12 * ((n + 1) - tie_term / (n * (n - 1))))
    with np.errstate(divide="ignore", invalid="ignore"):
        z = (u - n1 * n2 / 2 - 0.5) / s
    return float(np.clip(ndtr(-z) * 2, 0.0, 1.0))


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


def compare_metric(metric: str, base_values: Union[Sample, Sequence[float]],
                   new_values: Union[Sample, Sequence[float]],
                   threshold_pct: float = DEFAULT_THRESHOLD_PCT) -> MetricComparison:
    base = base_values if isinstance(base_values, Sample) else Sample.of(base_values)
    new = new_values if isinstance(new_values, Sample) else Sample.of(new_values)
    pct = ratio = None
    separated = False
    if base.n and new.n:
        # a Sample with values has its summary
        assert base.median is not None and base.min is not None and base.max is not None
        assert new.median is not None and new.min is not None and new.max is not None
        if base.median:
            ratio = new.median / base.median
            pct = (ratio - 1.0) * 100.0
        elif new.median == 0:
            ratio, pct = 1.0, 0.0
        separated = bool(new.max < base.min or new.min > base.max)
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


def _count_label(label: str, rs: ResultSet, positions: np.ndarray) -> str:
    failed = int((~rs.ok_mask[positions]).sum())
    return f"{label} ({len(positions)} runs, {failed} failed)"


#: per (scenario group, metric): n, median, q1, q3, min, max
_Summary = Dict[Tuple[int, str], Tuple[int, float, float, float, float, float]]


@dataclass(frozen=True)
class _Side:
    """One side's ok rows of the compared metrics, grouped by scenario, with their summary."""

    gid: Dict[ScenarioKey, int]
    summary: _Summary
    values: Dict[Tuple[int, str], np.ndarray]

    def sample(self, key: ScenarioKey, metric: str) -> Sample:
        g = self.gid[key]
        st = self.summary.get((g, metric))
        if st is None:
            return Sample(())
        _, med, q1, q3, lo, hi = st
        return Sample(tuple(self.values[(g, metric)].tolist()), med, q1, q3, lo, hi)


def _side(rs: ResultSet, wanted: Sequence[str]) -> _Side:
    """Group the ok rows by scenario key; summarize every metric with one groupby."""
    gid_of_row = np.full(len(rs.frame), -1, dtype=np.int64)
    gid: Dict[ScenarioKey, int] = {}
    for i, (key, pos) in enumerate(rs.groups.items()):
        gid[key] = i
        gid_of_row[pos] = i
    ok = rs.frame.loc[rs.ok_mask, list(wanted)].astype("float64")
    ok = ok.where(np.isfinite(ok.to_numpy()), np.nan)    # inf is not a measurement
    ok["_g"] = gid_of_row[rs.ok_mask]
    grouped = ok.groupby("_g", sort=True)[list(wanted)]
    count, median = grouped.count(), grouped.median()
    lo, hi = grouped.min(), grouped.max()
    quart = grouped.quantile([0.25, 0.75])
    q1 = quart.xs(0.25, level=1).reindex(count.index)
    q3 = quart.xs(0.75, level=1).reindex(count.index)
    summary: _Summary = {}
    values: Dict[Tuple[int, str], np.ndarray] = {}
    groups = np.asarray(count.index)
    order = np.argsort(ok["_g"].to_numpy(), kind="stable")
    bounds = np.searchsorted(ok["_g"].to_numpy()[order], np.append(groups, groups.max() + 1 if groups.size else 0))
    for m in wanted:
        col = ok[m].to_numpy()[order]
        cnt, med, a, b, c, d = (t[m].to_numpy() for t in (count, median, q1, q3, lo, hi))
        for i, g in enumerate(groups):
            if cnt[i]:
                summary[(int(g), m)] = (int(cnt[i]), float(med[i]), float(a[i]), float(b[i]),
                                        float(c[i]), float(d[i]))
                v = col[bounds[i]:bounds[i + 1]]
                values[(int(g), m)] = v[~np.isnan(v)]
    return _Side(gid, summary, values)


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
    b_groups, n_groups = base.groups, new.groups
    all_keys = sorted(set(b_groups) | set(n_groups), key=_natural)
    labels = scenario_labels(all_keys)
    common = [k for k in all_keys if k in b_groups and k in n_groups]
    if not common:
        raise UserError(
            f"no common scenario between {base.label} and {new.label} "
            f"(BASE has {len(b_groups)}, NEW has {len(n_groups)}; scenario keys: "
            f"{', '.join(c for c in results.SCENARIO_COLUMNS)}); compare results of the same scenarios")
    b_side, n_side = _side(base, wanted), _side(new, wanted)
    scenarios = []
    for key in common:
        b_pos, n_pos = b_groups[key], n_groups[key]
        b_ok, n_ok = int(base.ok_mask[b_pos].sum()), int(new.ok_mask[n_pos].sum())
        mets = []
        for m in wanted:
            bs, ns = b_side.sample(key, m), n_side.sample(key, m)
            if not bs.n and not ns.n:
                continue                  # not measured on either side (e.g. kvm_* under TCG)
            mets.append(compare_metric(m, bs, ns, threshold_pct))
        scenarios.append(ScenarioComparison(
            key=key, label=labels[key],
            base_variant=variant_label(base.variants_at(b_pos)),
            new_variant=variant_label(new.variants_at(n_pos)),
            base_ok=b_ok, base_failed=len(b_pos) - b_ok, new_ok=n_ok, new_failed=len(n_pos) - n_ok,
            metrics=tuple(mets), base_set=base, base_index=tuple(b_pos.tolist()),
            new_set=new, new_index=tuple(n_pos.tolist()),
        ))
    log.debug("compared %d scenarios, %d metrics", len(scenarios), sum(len(s.metrics) for s in scenarios))
    return Comparison(
        base_label=base.label, new_label=new.label, threshold_pct=threshold_pct,
        scenarios=tuple(scenarios),
        only_base=tuple(_count_label(labels[k], base, b_groups[k]) for k in all_keys if k not in n_groups),
        only_new=tuple(_count_label(labels[k], new, n_groups[k]) for k in all_keys if k not in b_groups),
    )
