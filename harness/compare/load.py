"""Load results CSVs (files or results directories) for comparison.

The column groups come from :mod:`harness.results` and nowhere else:

* scenario key  = :data:`results.SCENARIO_COLUMNS` (rows with equal values are
  repeats of one scenario; ``repeat``, ids and metrics are not part of it);
* variant       = :data:`results.VARIANT_COLUMNS` (kernel under test);
* metrics       = :data:`results.METRIC_COLUMNS` (numbers, lower is better).

Bad input is a :class:`UserError` with one line: an unreadable path, a file
that is not a migstall results CSV (no ``run_id``/``status`` header, or no
metric column), a directory without any results CSV.
"""

from __future__ import annotations

import csv
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from harness import results
from harness.errors import UserError

log = logging.getLogger(__name__)

ScenarioKey = Tuple[Tuple[str, str], ...]
Variant = Tuple[str, str, str]

_REQUIRED = ("run_id", "status")


@dataclass(frozen=True)
class Run:
    """One row of a results CSV, with the file it came from."""

    source: Path
    values: Tuple[Tuple[str, str], ...]

    def get(self, column: str) -> str:
        for k, v in self.values:
            if k == column:
                return v
        return ""

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
        raw = self.get(name).strip()
        if not raw:
            return None
        try:
            value = float(raw)
        except ValueError:
            return None
        return value if math.isfinite(value) else None

    def sidecar_file(self) -> Optional[Path]:
        """Where this run's sidecar JSON is: the ``sidecar`` column (absolute, or
        relative to the CSV's directory), else :func:`results.sidecar_path`."""
        col = self.get("sidecar").strip()
        candidates: List[Path] = []
        if col:
            p = Path(col)
            candidates += [p] if p.is_absolute() else [self.source.parent / p, p]
        if self.run_id:
            candidates.append(results.sidecar_path(self.source, self.run_id))
        for c in candidates:
            if c.is_file():
                return c
        return None


@dataclass(frozen=True)
class ResultSet:
    """All rows of one side of a comparison (BASE or NEW)."""

    label: str
    sources: Tuple[Path, ...]
    runs: Tuple[Run, ...]

    def by_scenario(self) -> Dict[ScenarioKey, List[Run]]:
        """Rows grouped by scenario key.  A failed row often lacks what only a
        successful run learns (qemu_version, page_size_kib, resolved accel): it
        joins the one group of ok rows that agrees on every column it does have,
        so that it is counted with its scenario."""
        groups: Dict[ScenarioKey, List[Run]] = {}
        failed: List[Run] = []
        for run in self.runs:
            if run.ok:
                groups.setdefault(run.scenario_key, []).append(run)
            else:
                failed.append(run)
        for run in failed:
            key = run.scenario_key
            if key not in groups:
                have = [(c, v) for c, v in key if v]
                matches = [k for k in groups if all(dict(k).get(c) == v for c, v in have)]
                if len(matches) == 1:
                    key = matches[0]
            groups.setdefault(key, []).append(run)
        return groups

    def filter_variant(self, kernel_variant: Optional[str]) -> "ResultSet":
        if not kernel_variant:
            return self
        runs = tuple(r for r in self.runs if r.get("kernel_variant") == kernel_variant)
        if not runs:
            have = sorted({r.get("kernel_variant") for r in self.runs})
            raise UserError(f"{self.label}: no rows with kernel_variant={kernel_variant!r} "
                            f"(present: {', '.join(repr(h) for h in have) or 'none'}); pick one of those")
        return ResultSet(f"{self.label} [{kernel_variant}]", self.sources, runs)


def _bad(path: Path, why: str) -> UserError:
    return UserError(f"{path}: {why}; pass a results CSV written by 'migstall run' (or a directory of them)")


def read_csv(path: Path) -> List[Run]:
    """Read one results CSV strictly (UserError on anything that is not one)."""
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.reader(fh)
            header = next(reader, None)
            if not header:
                raise _bad(path, "empty file, not a migstall results CSV")
            header = [h.strip() for h in header]
            missing = [c for c in _REQUIRED if c not in header]
            if missing:
                raise _bad(path, f"not a migstall results CSV (no {'/'.join(missing)} column)")
            if not any(c in header for c in results.METRIC_COLUMNS):
                raise _bad(path, "not a migstall results CSV (no metric column)")
            rows: List[Run] = []
            for lineno, fields in enumerate(reader, start=2):
                if not fields or not any(f.strip() for f in fields):
                    continue
                if len(fields) != len(header):
                    raise _bad(path, f"line {lineno} has {len(fields)} fields, the header {len(header)}")
                rows.append(Run(path, tuple(zip(header, fields))))
    except UserError:
        raise
    except IsADirectoryError as exc:
        raise _bad(path, "is a directory") from exc
    except FileNotFoundError as exc:
        raise UserError(f"{path}: no such file; give an existing results CSV or directory") from exc
    except PermissionError as exc:
        raise UserError(f"{path}: permission denied; make it readable or copy it somewhere readable") from exc
    except UnicodeDecodeError as exc:
        raise _bad(path, "not text (not UTF-8)") from exc
    except (OSError, csv.Error) as exc:
        raise _bad(path, f"unreadable ({getattr(exc, 'strerror', None) or exc})") from exc
    return rows


def _is_results_csv(path: Path) -> bool:
    try:
        read_csv(path)
    except UserError as exc:
        log.debug("skipping %s: %s", path, exc)
        return False
    return True


def csvs_in_dir(directory: Path) -> List[Path]:
    """Results CSVs below ``directory`` (sorted; hidden files, sidecar dirs and
    CSVs that are not results, e.g. a comparison CSV, are skipped)."""
    found = []
    for p in sorted(directory.rglob("*.csv")):
        rel = p.relative_to(directory)
        if any(part.startswith(".") or part.endswith(".sidecars") for part in rel.parts):
            continue
        if p.is_file() and _is_results_csv(p):
            found.append(p)
    return found


def load(specs: Sequence[str] | str, label: Optional[str] = None) -> ResultSet:
    """Load CSV files and/or results directories into one :class:`ResultSet`."""
    if isinstance(specs, (str, Path)):
        specs = [str(specs)]
    sources: List[Path] = []
    for spec in specs:
        path = Path(spec)
        if path.is_dir():
            try:
                found = csvs_in_dir(path)
            except PermissionError as exc:
                raise UserError(f"{path}: permission denied; make it readable") from exc
            if not found:
                raise UserError(f"{path}: directory holds no migstall results CSV; give a results CSV or a directory of them")
            sources += found
        else:
            sources.append(path)
    runs: List[Run] = []
    for src in sources:
        runs += read_csv(src)
    if not runs:
        raise UserError(f"{', '.join(str(s) for s in specs)}: no result rows; run 'migstall run' first")
    return ResultSet(label or " ".join(str(s) for s in specs), tuple(sources), tuple(runs))


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
