"""The order of a night's runs, and which runs are already done (resume).

* :func:`plan` with ``interleave``: for each repeat index r, every variant in
  turn runs the scenarios of repeat r (A B A B ...), so slow drift of the host
  lands on both variants alike; one boot per switch.  Without it, each variant
  runs its whole matrix after one boot (A A B B).
* :func:`run_key` identifies a run in a results CSV: host, kernel_variant and
  the scenario's own fields as the runner writes them, plus the repeat index.
  :func:`done_keys` collects the keys of ``status=ok`` rows; a re-run skips
  those (failed rows are run again; the old failed row stays, counted as failed).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Sequence, Set, Tuple

from harness import results

KEY_COLUMNS = ("host", "kernel_variant", "scenario", "guest_mem_mib", "vcpus", "backing",
               "dirty_log_mode", "dirty_ring", "loops", "end_action", "repeat")

RunKey = Tuple[str, ...]


@dataclass(frozen=True)
class Step:
    variant: str
    scenarios: Tuple[Any, ...]          # harness.scenario.Scenario


def plan(variants: Sequence[str], scenarios: Sequence[Any], interleave: bool) -> List[Step]:
    if not interleave:
        return [Step(v, tuple(scenarios)) for v in variants]
    repeats = sorted({s.repeat for s in scenarios})
    steps = []
    for r in repeats:
        batch = tuple(s for s in scenarios if s.repeat == r)
        steps += [Step(v, batch) for v in variants]
    return steps


def scenario_row(host: str, variant: str, sc: Any) -> Dict[str, Any]:
    """The identity columns the runner writes for ``sc`` (harness.runner.base_row)."""
    return {
        "host": host, "kernel_variant": variant, "scenario": sc.name, "guest_mem_mib": sc.mem_mib,
        "vcpus": sc.vcpus, "backing": sc.backing, "dirty_log_mode": sc.dirty_log_mode,
        "dirty_ring": sc.dirty_ring or None, "loops": list(sc.loop_list), "end_action": sc.end_action,
        "repeat": sc.repeat,
    }


def run_key(host: str, variant: str, sc: Any) -> RunKey:
    row = results.normalize_row({**scenario_row(host, variant, sc), "status": results.STATUS_OK})
    return tuple(row[c] for c in KEY_COLUMNS)


def row_key(row: Mapping[str, str]) -> RunKey:
    return tuple((row.get(c) or "").strip() for c in KEY_COLUMNS)


def done_keys(csv_paths: Iterable[Path]) -> Set[RunKey]:
    done: Set[RunKey] = set()
    for p in csv_paths:
        p = Path(p)
        if p.is_file() and p.stat().st_size:
            for row in results.read_rows(p):
                if row.get("status") == results.STATUS_OK:
                    done.add(row_key(row))
    return done
