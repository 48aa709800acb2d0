"""Where each side's numbers come from, for the report's provenance table.

Per side (BASE, NEW), from the result rows (every row of the side, ok or failed)
and, where they exist, the sidecars' ``doctor`` reports:

* kernel    the :data:`results.VARIANT_COLUMNS` (``host_kernel``, ``kernel_variant``,
            ``series_id``);
* QEMU      ``qemu_version``;
* host      ``host`` (local / ssh://... / virtual), ``accel``, ``kvm_params`` and, from a
            few sidecars, the host CPU and memory the doctor saw;
* scenario  the other :data:`results.SCENARIO_COLUMNS` (mem, vCPUs, backing, mode, ...);
* runs      row counts (ok / failed), scenarios, ``started_at`` range, files.

Each item lists the distinct values of its side.  An item *differs* when the sets of
values differ between the sides; the run counts, dates and files are not compared
(they always differ).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

from harness import results
from harness.compare.load import ResultSet, cell_text, sidecar_file

log = logging.getLogger(__name__)

KERNEL_COLUMNS = results.VARIANT_COLUMNS
QEMU_COLUMNS = ("qemu_version",)
HOST_COLUMNS = ("host", "accel", "kvm_params")
SCENARIO_PARAMS = tuple(c for c in results.SCENARIO_COLUMNS if c not in QEMU_COLUMNS + HOST_COLUMNS)
GROUPS: Tuple[Tuple[str, Tuple[str, ...]], ...] = (
    ("kernel", KERNEL_COLUMNS), ("QEMU", QEMU_COLUMNS), ("host", HOST_COLUMNS), ("scenario", SCENARIO_PARAMS))
assert all(c in results.COLUMNS for _, cols in GROUPS for c in cols), "provenance names a column results lacks"
#: sidecars read per side for the doctor's view of the host (one per file, host and kernel)
MAX_SIDECARS = 16
#: distinct values shown per item before "... (N values)"
MAX_VALUES = 6


@dataclass(frozen=True)
class Item:
    group: str
    name: str                      # a column name, or a description ("rows", ...)
    base: Tuple[str, ...]          # distinct values, in natural order
    new: Tuple[str, ...]
    base_text: str
    new_text: str
    compared: bool = True

    @property
    def differs(self) -> bool:
        return self.compared and set(self.base) != set(self.new)


def _natural(v: str) -> Tuple[int, float, str]:
    try:
        return (0, float(v), "")
    except ValueError:
        return (1, 0.0, v)


def _distinct(frame: Any, column: str) -> Dict[str, int]:
    """Non-empty values of ``column`` with their row counts, in natural order."""
    if column not in frame.columns:
        return {}
    counts: Dict[str, int] = {}
    for value, n in frame[column].value_counts(dropna=True, sort=False).items():
        text = cell_text(value).strip()
        if text and n:
            counts[text] = counts.get(text, 0) + int(n)
    return {k: counts[k] for k in sorted(counts, key=_natural)}


def _text(counts: Dict[str, int]) -> str:
    if not counts:
        return ""
    if len(counts) == 1:
        return next(iter(counts))
    shown = [f"{v} ({n})" for v, n in list(counts.items())[:MAX_VALUES]]
    if len(counts) > MAX_VALUES:
        shown.append(f"... ({len(counts)} values)")
    return ", ".join(shown)


def _doctor_hosts(rs: ResultSet) -> Dict[str, int]:
    """The host as the sidecars' ``doctor`` saw it (CPU, CPUs, memory, THP mode), from the
    first ok row with a readable sidecar of each (file, host, kernel); counts are sidecars."""
    frame = rs.frame
    cols = [results.SOURCE_COLUMN, "host", "host_kernel"]
    if any(c not in frame.columns for c in cols + ["sidecar", "run_id"]):
        return {}
    ok = frame[rs.ok_mask]
    seen: Dict[str, int] = {}
    for _, row in ok.drop_duplicates(subset=cols).head(MAX_SIDECARS).iterrows():
        path = sidecar_file(Path(cell_text(row[results.SOURCE_COLUMN])), cell_text(row["sidecar"]).strip(),
                            cell_text(row["run_id"]))
        if path is None:
            continue
        try:
            doctor = json.loads(path.read_text()).get("doctor")
        except (OSError, ValueError, AttributeError) as exc:
            log.debug("sidecar %s: no doctor report (%s)", path, exc)
            continue
        if not isinstance(doctor, dict) or not doctor.get("cpu_model"):
            continue
        parts = [str(doctor["cpu_model"])]
        if doctor.get("online_cpus"):
            parts.append(f"{doctor['online_cpus']} CPUs")
        if doctor.get("mem_total_mib"):
            parts.append(f"{doctor['mem_total_mib']} MiB")
        if doctor.get("thp_mode"):
            parts.append(f"THP {doctor['thp_mode']}")
        text = ", ".join(parts)
        seen[text] = seen.get(text, 0) + 1
    return seen


def _started(rs: ResultSet) -> str:
    col = rs.frame.get("started_at")
    if col is None or not col.notna().any():
        return ""
    lo, hi = col.min(), col.max()
    fmt = "%Y-%m-%d %H:%M:%S"
    return f"{lo.strftime(fmt)} .. {hi.strftime(fmt)} UTC" if lo != hi else f"{lo.strftime(fmt)} UTC"


def _item(group: str, name: str, b: Dict[str, int], n: Dict[str, int], compared: bool = True) -> Item:
    return Item(group, name, tuple(b), tuple(n), _text(b), _text(n), compared)


def _fixed(group: str, name: str, b: str, n: str) -> Item:
    return Item(group, name, (b,), (n,), b, n, compared=False)


def provenance(base: ResultSet, new: ResultSet, compared_scenarios: int = 0) -> List[Item]:
    """The provenance items of both sides; items empty on both sides are left out."""
    items: List[Item] = []
    for group, cols in GROUPS:
        for c in cols:
            items.append(_item(group, c, _distinct(base.frame, c), _distinct(new.frame, c)))
        if group == "host":
            items.append(_item(group, "host CPU (sidecar doctor)", _doctor_hosts(base), _doctor_hosts(new)))

    def rows(rs: ResultSet) -> str:
        ok = int(rs.ok_mask.sum())
        return f"{len(rs.frame)} ({ok} ok, {len(rs.frame) - ok} failed)"

    def scen(rs: ResultSet) -> str:
        return f"{len(rs.groups)} ({compared_scenarios} compared)"

    items += [_fixed("runs", "rows", rows(base), rows(new)),
              _fixed("runs", "scenarios", scen(base), scen(new)),
              _fixed("runs", "started_at", _started(base), _started(new)),
              _fixed("runs", "files", _files(base.sources), _files(new.sources))]
    return [i for i in items if i.base_text or i.new_text]


def _files(sources: Sequence[Path]) -> str:
    names = [str(s) for s in sources]
    return ", ".join(names[:MAX_VALUES]) + (f", ... ({len(names)} files)" if len(names) > MAX_VALUES else "")
