"""The results CSV and the per-run sidecar JSON.

One row per run.  Columns are grouped so that tools (``migstall compare``) can
tell scenario keys from metrics without guessing; see README "CSV schema" for
the meaning of every column.

Writes are atomic: the whole file is rewritten to a temporary file in the same
directory and moved over the old one with ``os.replace``, under an exclusive
``flock`` on a sibling lock file, so concurrent appenders and crashes never
leave a half-written CSV.
"""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional

from harness.errors import UserError
from harness.paths import file_lock

# Identify a row; never grouped on, never compared.
ID_COLUMNS = ("run_id", "started_at", "repeat", "sidecar")
# What was measured: the kernel/series under test.  compare() contrasts these.
VARIANT_COLUMNS = ("host_kernel", "kernel_variant", "series_id")
# What the run was: rows with equal values here are repeats of one scenario.
SCENARIO_COLUMNS = (
    "scenario", "host", "qemu_version", "accel", "cpu_model", "guest_mem_mib",
    "vcpus", "backing", "page_size_kib", "dirty_log_mode", "dirty_ring",
    "loops", "end_action",
)
# Measured facts that describe the run but are not figures of merit.
INFO_COLUMNS = ("touched_mib", "prefault_ms", "dirty_log_start_source", "dirty_log_stop_source", "kvm_params",
                "verify_pages", "verify_mismatch_pages")
# Figures of merit (numbers; empty when not measured).
METRIC_COLUMNS = (
    "dirty_log_start_ms", "setup_time_ms", "first_pass_ms",
    "kvm_enable_ms", "kvm_disable_ms",
    "stall_pio_max_us", "stall_pio_p99_us", "stall_pio_count",
    "stall_write_max_us", "stall_write_p99_us", "stall_write_count",
    "stall_cpu_max_us", "stall_cpu_p99_us", "stall_cpu_count",
    "baseline_stall_max_us", "total_time_ms", "downtime_ms", "dirty_log_stop_ms",
)
STATUS_COLUMNS = ("status", "error")

COLUMNS = ID_COLUMNS[:2] + ("host", "host_kernel", "kernel_variant", "series_id") + tuple(
    c for c in SCENARIO_COLUMNS if c != "host"
) + ("touched_mib", "repeat") + METRIC_COLUMNS + (
    "prefault_ms", "dirty_log_start_source", "dirty_log_stop_source", "kvm_params",
    "verify_pages", "verify_mismatch_pages", "sidecar",
) + STATUS_COLUMNS

assert sorted(COLUMNS) == sorted(
    set(ID_COLUMNS + VARIANT_COLUMNS + SCENARIO_COLUMNS + INFO_COLUMNS + METRIC_COLUMNS + STATUS_COLUMNS)
), "column groups and COLUMNS disagree"

STATUS_OK = "ok"
STATUS_FAILED = "failed"


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, float):
        return f"{value:.3f}".rstrip("0").rstrip(".") if value == value else ""
    if isinstance(value, (list, tuple)):
        return "+".join(str(v) for v in value)
    if isinstance(value, dict):
        return ";".join(f"{k}={v}" for k, v in sorted(value.items()))
    return " ".join(str(value).split())  # one line, no embedded newlines


def normalize_row(row: Mapping[str, Any]) -> Dict[str, str]:
    unknown = set(row) - set(COLUMNS)
    if unknown:
        raise ValueError(f"unknown result columns: {sorted(unknown)}")
    if row.get("status") not in (STATUS_OK, STATUS_FAILED):
        raise ValueError(f"row status must be ok or failed, got {row.get('status')!r}")
    return {c: _fmt(row.get(c)) for c in COLUMNS}


def check_output_path(path: Path, option: str = "--out") -> None:
    """Raise UserError (before any work starts) if ``path`` cannot be written."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise UserError(f"{option} {path} is a directory; give a file name such as {path}/out")
    if not parent.is_dir():
        if parent.exists():
            raise UserError(f"{option} {path}: {parent} is not a directory; choose another path")
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"{option} {path}: cannot create {parent} ({exc.strerror}); choose a writable path") from exc
    if not os.access(parent, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise UserError(f"{option} {path} is not writable; choose a path you can write to")


def check_writable(csv_path: Path) -> None:
    """check_output_path for a results CSV, which must be ours if it exists."""
    check_output_path(csv_path, "--out")
    if Path(csv_path).exists() and Path(csv_path).stat().st_size:
        read_header(csv_path)


def read_header(csv_path: Path) -> List[str]:
    with open(csv_path, newline="") as fh:
        header = next(csv.reader(fh), [])
    if "run_id" not in header or "status" not in header:
        raise UserError(f"{csv_path} exists but is not a migstall results CSV (no run_id/status header); use another --out")
    return header


def atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
    try:
        with os.fdopen(fd, "w", newline="") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(obj, indent=1, sort_keys=True, default=str) + "\n")


def append_rows(csv_path: Path, rows: Iterable[Mapping[str, Any]]) -> None:
    """Append rows to ``csv_path`` atomically (create it with a header if new).

    Existing rows are kept verbatim; a file written by an older schema keeps its
    columns and gains the new ones (empty for old rows).
    """
    csv_path = Path(csv_path)
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    new = [normalize_row(r) for r in rows]
    lock_path = csv_path.with_name(f".{csv_path.name}.lock")
    with file_lock(lock_path):
        old_rows: List[Dict[str, str]] = []
        header = list(COLUMNS)
        if csv_path.exists() and csv_path.stat().st_size:
            old_header = read_header(csv_path)
            with open(csv_path, newline="") as fh:
                old_rows = list(csv.DictReader(fh))
            header = old_header + [c for c in COLUMNS if c not in old_header]
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=header, restval="", extrasaction="raise", lineterminator="\n")
        writer.writeheader()
        writer.writerows(old_rows)
        writer.writerows(new)
        atomic_write_text(csv_path, buf.getvalue())


def sidecar_path(csv_path: Path, run_id: str) -> Path:
    """Sidecar JSON of one run: ``results/NAME.sidecars/<run_id>.json``."""
    csv_path = Path(csv_path)
    return csv_path.with_name(csv_path.stem + ".sidecars") / f"{run_id}.json"


def read_rows(csv_path: Path) -> List[Dict[str, str]]:
    read_header(csv_path)
    with open(csv_path, newline="") as fh:
        return list(csv.DictReader(fh))


def failed_row(base: Mapping[str, Any], error: BaseException | str, sidecar: Optional[str] = None) -> Dict[str, Any]:
    """A row for a run that failed: identity columns from ``base``, no metrics."""
    msg = error.one_line() if hasattr(error, "one_line") else " ".join(str(error).split())
    if not msg and isinstance(error, BaseException):
        msg = type(error).__name__
    row = {k: v for k, v in base.items() if k not in METRIC_COLUMNS}
    row.update(status=STATUS_FAILED, error=msg, sidecar=sidecar)
    return row
