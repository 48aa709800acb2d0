"""Load results CSVs (files or results directories) for comparison.

Reading is :func:`harness.results.load` (one typed ``pandas.DataFrame``); this
module groups its rows.  The column groups come from :mod:`harness.results` and
nowhere else:

* scenario key  = :data:`results.SCENARIO_COLUMNS` (rows with equal values are
  repeats of one scenario; ``repeat``, ids and metrics are not part of it);
* variant       = :data:`results.VARIANT_COLUMNS` (kernel under test);
* metrics       = :data:`results.METRIC_COLUMNS` (numbers, lower is better).

Bad input is a :class:`UserError` with one line: an unreadable path, a file
that is not a migstall results CSV (no ``run_id``/``status`` header, or no
metric column), a directory without any results CSV.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from harness import results
from harness.errors import UserError

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

log = logging.getLogger(__name__)

ScenarioKey = Tuple[Tuple[str, str], ...]
Variant = Tuple[str, str, str]


def cell_text(value: Any) -> str:
    """A value of the frame as text, as the CSV has it ("" for empty)."""
    if value is None:
        return ""
    if hasattr(value, "isoformat"):                      # pandas Timestamp (NaT is a float-like NA)
        try:
            return "" if value != value else value.isoformat()
        except (TypeError, ValueError):
            return ""
    try:
        if value != value:                               # NaN, NaT, pd.NA
            return ""
    except (TypeError, ValueError):
        return ""
    return results.key_text(value)


@dataclass(frozen=True)
class Run:
    """One row of a results CSV, with the file it came from (a view of a frame row)."""

    source: Path
    values: Mapping[str, Any]

    def get(self, column: str) -> str:
        return cell_text(self.values.get(column))

    @property
    def run_id(self) -> str:
        return self.get("run_id")

    @property
    def ok(self) -> bool:
        return self.get("status") == results.STATUS_OK

    @property
    def scenario_key(self) -> ScenarioKey:
        return tuple((c, self.get(c).strip()) for c in results.SCENARIO_COLUMNS)

    @property
    def variant(self) -> Variant:
        return tuple(self.get(c).strip() for c in results.VARIANT_COLUMNS)  # type: ignore[return-value]

    def metric(self, name: str) -> Optional[float]:
        """The metric as a float, None when empty/unparsable/not finite or the run failed."""
        if not self.ok:
            return None
        value = self.values.get(name)
        if isinstance(value, str):
            try:
                value = float(value.strip())
            except ValueError:
                return None
        if value is None or isinstance(value, bool):
            return None
        try:
            value = float(value)
        except (TypeError, ValueError):
            return None
        return value if math.isfinite(value) else None

    def sidecar_file(self) -> Optional[Path]:
        """Where this run's sidecar JSON is: the ``sidecar`` column (absolute, or
        relative to the CSV's directory), else :func:`results.sidecar_path`."""
        return sidecar_file(self.source, self.get("sidecar").strip(), self.run_id)


def sidecar_file(source: Path, column: str, run_id: str) -> Optional[Path]:
    candidates: List[Path] = []
    if column:
        p = Path(column)
        candidates += [p] if p.is_absolute() else [Path(source).parent / p, p]
    if run_id:
        candidates.append(results.sidecar_path(Path(source), run_id))
    for c in candidates:
        if c.is_file():
            return c
    return None


def runs_of(frame: "pd.DataFrame") -> Tuple[Run, ...]:
    """The rows of a frame as :class:`Run` views (for code that walks runs one by one)."""
    cols = list(frame.columns)
    src = cols.index(results.SOURCE_COLUMN) if results.SOURCE_COLUMN in cols else None
    return tuple(Run(Path(str(t[src])) if src is not None else Path("."), dict(zip(cols, t)))
                 for t in frame.itertuples(index=False, name=None))


def _key_of(raw: Sequence[Any]) -> ScenarioKey:
    return tuple((c, cell_text(v).strip()) for c, v in zip(results.SCENARIO_COLUMNS, raw))


@dataclass(frozen=True, eq=False)
class ResultSet:
    """All rows of one side of a comparison (BASE or NEW), as a typed frame."""

    label: str
    sources: Tuple[Path, ...]
    frame: "pd.DataFrame" = field(repr=False)

    @cached_property
    def runs(self) -> Tuple[Run, ...]:
        return runs_of(self.frame)

    @cached_property
    def ok_mask(self) -> "np.ndarray":
        return (self.frame["status"] == results.STATUS_OK).to_numpy(dtype=bool)

    @cached_property
    def groups(self) -> Dict[ScenarioKey, "np.ndarray"]:
        """Row positions per scenario key (ok rows first, then failed, each in file order).

        A failed row often lacks what only a successful run learns (qemu_version,
        page_size_kib, resolved accel): it joins the one group of ok rows that agrees
        on every column it does have, so that it is counted with its scenario."""
        import numpy as np

        gb = self.frame.groupby(list(results.SCENARIO_COLUMNS), observed=True, dropna=False, sort=False)
        ok = self.ok_mask
        ok_pos: Dict[ScenarioKey, np.ndarray] = {}
        failed: List[Tuple[int, ScenarioKey, np.ndarray]] = []
        for raw, pos in gb.indices.items():
            key = _key_of(raw if isinstance(raw, tuple) else (raw,))
            pos = np.sort(pos)
            good, bad = pos[ok[pos]], pos[~ok[pos]]
            if good.size:
                ok_pos[key] = np.concatenate([ok_pos[key], good]) if key in ok_pos else good
            if bad.size:
                failed.append((int(bad[0]), key, bad))
        groups: Dict[ScenarioKey, List[np.ndarray]] = {k: [v] for k, v in ok_pos.items()}
        for _, key, bad in sorted(failed, key=lambda t: t[0]):
            if key not in groups:
                have = [(c, v) for c, v in key if v]
                matches = [k for k in groups if all(dict(k).get(c) == v for c, v in have)]
                if len(matches) == 1:
                    key = matches[0]
            groups.setdefault(key, []).append(bad)
        return {k: np.concatenate(v) for k, v in groups.items()}

    @cached_property
    def variant_codes(self) -> Tuple["np.ndarray", Tuple[Variant, ...]]:
        """Per row, the index of its variant in the tuple of distinct variants."""
        import numpy as np
        import pandas as pd

        sub = self.frame[list(results.VARIANT_COLUMNS)]
        codes, uniques = pd.MultiIndex.from_frame(sub.astype(object)).factorize()
        variants = tuple(tuple(cell_text(v).strip() for v in u) for u in uniques)
        return np.asarray(codes), variants  # type: ignore[return-value]

    def variants_at(self, positions: "np.ndarray") -> List[Variant]:
        """The distinct variants of the rows at ``positions``."""
        import numpy as np

        codes, variants = self.variant_codes
        return [variants[c] for c in np.unique(codes[positions])]

    def filter_variant(self, kernel_variant: Optional[str]) -> "ResultSet":
        if not kernel_variant:
            return self
        col = self.frame["kernel_variant"]
        keep = (col == kernel_variant).to_numpy(dtype=bool)
        if not keep.any():
            have = sorted({cell_text(v) for v in col.unique()})
            raise UserError(f"{self.label}: no rows with kernel_variant={kernel_variant!r} "
                            f"(present: {', '.join(repr(h) for h in have) or 'none'}); pick one of those")
        return ResultSet(f"{self.label} [{kernel_variant}]", self.sources,
                         self.frame[keep].reset_index(drop=True))


def load(specs: Sequence[str] | str, label: Optional[str] = None) -> ResultSet:
    """Load CSV files and/or results directories into one :class:`ResultSet`."""
    if isinstance(specs, (str, Path)):
        specs = [str(specs)]
    frame = results.load([str(s) for s in specs])
    sources = tuple(Path(s) for s in frame.attrs.get("sources", ()))
    return ResultSet(label or " ".join(str(s) for s in specs), sources, frame)


def variant_label(variants: Iterable[Variant]) -> str:
    """``kernel_variant [series hash8] host_kernel`` of each distinct variant, joined by ' + '
    (the hash8 is left out when host_kernel already carries it)."""
    labels = []
    for v in sorted(set(variants)):
        host_kernel, kernel_variant, series_id = v
        h8 = series_id[:8] if series_id and series_id[:8] not in host_kernel else ""
        parts = [p for p in (kernel_variant, h8, host_kernel) if p]
        labels.append(" ".join(parts) or "(unnamed)")
    return " + ".join(labels) or "(none)"


def key_dict(key: ScenarioKey) -> Mapping[str, str]:
    return dict(key)
