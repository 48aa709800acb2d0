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
import logging
import math
from typing import TYPE_CHECKING, Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

from harness.errors import UserError
from harness.paths import file_lock

if TYPE_CHECKING:  # pandas is imported where frames are made: ``migstall run`` never pays for it
    import pandas as pd

log = logging.getLogger(__name__)

# Identify a row; never grouped on, never compared.
ID_COLUMNS = ("run_id", "started_at", "repeat", "sidecar")
# What was measured: the kernel/series under test.  compare() contrasts these.
VARIANT_COLUMNS = ("host_kernel", "kernel_variant", "series_id")
# What the run was: rows with equal values here are repeats of one scenario.
SCENARIO_COLUMNS = (
    "scenario", "host", "qemu_version", "accel", "cpu_model", "guest_mem_mib", "alias_mib",
    "vcpus", "backing", "page_size_kib", "dirty_log_mode", "dirty_ring",
    "loops", "end_action",
)
# Measured facts that describe the run but are not figures of merit.
INFO_COLUMNS = ("touched_mib", "prefault_ms", "dirty_log_start_source", "dirty_log_stop_source", "kvm_params",
                "verify_pages", "verify_mismatch_pages", "fault_window_ms", "kvm_mapped_mib",
                "before_vcpu_wait_ms", "before_vcpu_blocked_ms", "window_vcpu_wait_ms", "window_vcpu_blocked_ms")
# Figures of merit (numbers; empty when not measured).
METRIC_COLUMNS = (
    "dirty_log_start_ms", "setup_time_ms", "first_pass_ms",
    "kvm_enable_ms", "kvm_ioctl_ms", "kvm_disable_ms",
    "stall_pio_max_us", "stall_pio_p99_us", "stall_pio_count",
    "stall_write_max_us", "stall_write_p99_us", "stall_write_count",
    "stall_cpu_max_us", "stall_cpu_p99_us", "stall_cpu_count",
    "baseline_stall_max_us", "total_time_ms", "downtime_ms", "dirty_log_stop_ms",
    "stall_write_sum_ms", "baseline_stall_write_sum_ms", "kvm_pf", "baseline_kvm_pf",
    "stall_pio_precopy_ms_per_s", "stall_write_precopy_ms_per_s", "stall_cpu_precopy_ms_per_s",
    "baseline_stall_pio_ms_per_s", "baseline_stall_write_ms_per_s", "baseline_stall_cpu_ms_per_s",
)
STATUS_COLUMNS = ("status", "error")

COLUMNS = ID_COLUMNS[:2] + ("host", "host_kernel", "kernel_variant", "series_id") + tuple(
    c for c in SCENARIO_COLUMNS if c != "host"
) + ("touched_mib", "repeat") + METRIC_COLUMNS + (
    "prefault_ms", "dirty_log_start_source", "dirty_log_stop_source", "kvm_params",
    "verify_pages", "verify_mismatch_pages", "fault_window_ms", "kvm_mapped_mib",
    "before_vcpu_wait_ms", "before_vcpu_blocked_ms", "window_vcpu_wait_ms", "window_vcpu_blocked_ms", "sidecar",
) + STATUS_COLUMNS

assert sorted(COLUMNS) == sorted(
    set(ID_COLUMNS + VARIANT_COLUMNS + SCENARIO_COLUMNS + INFO_COLUMNS + METRIC_COLUMNS + STATUS_COLUMNS)
), "column groups and COLUMNS disagree"

# Columns that hold numbers: floats in :func:`load`'s frame, NaN where the CSV is empty.
NUMERIC_COLUMNS = METRIC_COLUMNS + ("repeat", "touched_mib", "prefault_ms", "verify_pages", "verify_mismatch_pages",
                                    "fault_window_ms", "kvm_mapped_mib", "before_vcpu_wait_ms",
                                    "before_vcpu_blocked_ms", "window_vcpu_wait_ms", "window_vcpu_blocked_ms")
# Text columns with few distinct values: categoricals in :func:`load`'s frame.  The scenario
# keys are ordered categoricals (numbers by value: 512 < 1024); a key column whose values
# are all numbers has numeric categories (``df.guest_mem_mib == 512``).
CATEGORY_COLUMNS = VARIANT_COLUMNS + SCENARIO_COLUMNS + (
    "dirty_log_start_source", "dirty_log_stop_source", "kvm_params", "status")
# Not a CSV column: the file each row of :func:`load`'s frame came from.
SOURCE_COLUMN = "source"

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
            raise UserError(f"{option} {path}: cannot create {parent} ({exc.strerror}); "
                            "choose a writable path") from exc
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
        raise UserError(f"{csv_path} exists but is not a migstall results CSV (no run_id/status header); "
                        "use another --out")
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


# --- results as a pandas DataFrame -------------------------------------------------

_REQUIRED = ("run_id", "status")
#: scenario keys that are numbers; their categories are numbers when every value is one
NUMERIC_KEY_COLUMNS = ("guest_mem_mib", "alias_mib", "vcpus", "page_size_kib", "dirty_ring")
PathSpec = Union[str, "os.PathLike[str]"]


def _bad(path: Path, why: str) -> UserError:
    return UserError(f"{path}: {why}; pass a results CSV written by 'migstall run' (or a directory of them)")


def _scan(path: Path) -> Tuple[List[str], bool]:
    """Check that ``path`` is a results CSV: its header, and the field count of every record.

    The CSV records its schema in its header line: a file written by an older schema
    has fewer columns (``append_rows`` extends it), a newer one may have more; columns
    are matched by name.  Returns the header and whether a record of blank fields was
    seen (such records are skipped, as they always were)."""
    with open(path, "rb") as fh:
        text = fh.read().decode("utf-8")
    first = text.split("\n", 1)[0]
    simple = not any(ch in text for ch in ('"', "\r", "\x00"))   # then a record is a line
    header = next(csv.reader([first]), None) if simple else next(csv.reader(io.StringIO(text, newline="")), None)
    if not header:
        raise _bad(path, "empty file, not a migstall results CSV")
    header = [h.strip() for h in header]
    missing = [c for c in _REQUIRED if c not in header]
    if missing:
        raise _bad(path, f"not a migstall results CSV (no {'/'.join(missing)} column)")
    if not any(c in header for c in METRIC_COLUMNS):
        raise _bad(path, "not a migstall results CSV (no metric column)")
    n, blank = len(header), False
    if simple:            # no quoting: count commas (the csv module takes 5x as long on 12,000 rows)
        for lineno, line in enumerate(text.split("\n")[1:], start=2):
            commas = line.count(",")
            if commas == n - 1 and line[:1] not in (",", " ", "\t", ""):
                continue
            if not line.replace(",", "").strip():
                blank = blank or bool(line)     # an empty line is skipped by pandas too
                continue
            if commas != n - 1:
                raise _bad(path, f"line {lineno} has {commas + 1} fields, the header {n}")
        return header, blank
    reader = csv.reader(io.StringIO(text, newline=""))
    next(reader)
    for lineno, fields in enumerate(reader, start=2):
        if len(fields) == n and fields[0].strip():
            continue
        if not fields or not any(f.strip() for f in fields):
            blank = blank or bool(fields)
            continue
        if len(fields) != n:
            raise _bad(path, f"line {lineno} has {len(fields)} fields, the header {n}")
    return header, blank


def _read_raw(path: Path) -> "pd.DataFrame":
    """One results CSV, strictly (UserError on anything that is not one), as text and floats."""
    import pandas as pd

    path = Path(path)
    try:
        header, blank = _scan(path)
        text = {c: str for c in header if c not in NUMERIC_COLUMNS}
        opts = dict(header=0, names=header, encoding="utf-8", keep_default_na=False, na_values=[""],
                    skip_blank_lines=True)
        if blank:      # records of blank fields: build from the csv module's parse, which skips them
            with open(path, newline="", encoding="utf-8") as fh:
                rows = [f for f in list(csv.reader(fh))[1:] if f and any(x.strip() for x in f)]
            df = pd.DataFrame(rows, columns=header, dtype=object).replace("", math.nan)
        else:
            try:
                df = pd.read_csv(path, dtype={**text, **{c: "float64" for c in header if c in NUMERIC_COLUMNS}},
                                 **opts)
            except ValueError:          # a number column holds text: read it as text, coerced below
                df = pd.read_csv(path, dtype=str, **opts)
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
    except (OSError, csv.Error, ValueError) as exc:   # pandas' ParserError is a ValueError
        raise _bad(path, f"unreadable ({getattr(exc, 'strerror', None) or exc})") from exc
    absent = [c for c in COLUMNS if c not in df.columns]
    if absent:
        log.debug("%s: written by an older schema, without %s", path, ", ".join(absent))
    df[SOURCE_COLUMN] = str(path)
    return df


def _looks_like_results(path: Path) -> bool:
    """Whether ``path``'s first line is a results CSV header (it names ``run_id``
    and ``status``): other CSVs in a results directory are skipped, a broken
    results CSV is an error."""
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            first = next(csv.reader(fh), [])
    except (OSError, UnicodeDecodeError, csv.Error):
        return False
    return "run_id" in first and "status" in first


def results_csvs(directory: Path) -> List[Path]:
    """Candidate CSVs below ``directory``, sorted; hidden files and sidecar dirs skipped."""
    found = []
    for p in sorted(Path(directory).rglob("*.csv")):
        rel = p.relative_to(directory)
        if any(part.startswith(".") or part.endswith(".sidecars") for part in rel.parts):
            continue
        if p.is_file():
            found.append(p)
    return found


def _natural_key(v: Any) -> Tuple[int, float, str]:
    try:
        return (0, float(v), "")
    except (TypeError, ValueError):
        return (1, 0.0, str(v))


def key_text(value: Any) -> str:
    """A scenario-key value of the frame as the CSV writes it (``512``, ``legacy``, ``""`` when empty)."""
    if value is None:
        return ""
    if isinstance(value, float):
        if math.isnan(value):
            return ""
        return str(int(value)) if value.is_integer() else repr(value)
    if hasattr(value, "item") and not isinstance(value, str):     # numpy scalars
        return key_text(value.item())
    return str(value)


def _categorical(values: "pd.Series", *, numeric: bool, ordered: bool) -> "pd.Series":
    import pandas as pd

    cat = values.astype("category")
    raw = list(cat.cat.categories)
    stripped = [str(c).strip() for c in raw]
    if stripped != [str(c) for c in raw] or "" in stripped:       # " x" and "x" are one value; "" is empty
        cat = values.astype(object).map(dict(zip(raw, stripped))).replace("", None).astype("category")
    cats = list(cat.cat.categories)
    if numeric and cats:
        nums = pd.to_numeric(pd.Series(cats, dtype=object), errors="coerce")
        if nums.notna().all() and nums.nunique() == len(cats):
            if all(float(x).is_integer() for x in nums):
                nums = nums.astype("int64")
            cat = cat.cat.rename_categories(list(nums))
            cats = list(cat.cat.categories)
    if ordered:
        cat = cat.cat.reorder_categories(sorted(cats, key=_natural_key), ordered=True)
    return cat


def _typed(df: "pd.DataFrame") -> "pd.DataFrame":
    import numpy as np
    import pandas as pd

    for c in NUMERIC_COLUMNS:
        if df[c].dtype != np.float64:
            df[c] = pd.to_numeric(df[c].astype(object).map(lambda v: v.strip() if isinstance(v, str) else v),
                                  errors="coerce").astype("float64")
    for c in CATEGORY_COLUMNS:
        df[c] = _categorical(df[c], numeric=c in NUMERIC_KEY_COLUMNS, ordered=c in SCENARIO_COLUMNS)
    df[SOURCE_COLUMN] = df[SOURCE_COLUMN].astype("category")
    try:
        df["started_at"] = pd.to_datetime(df["started_at"], format="ISO8601", utc=True, errors="coerce")
    except (TypeError, ValueError):       # pandas < 2 has no format="ISO8601"
        df["started_at"] = pd.to_datetime(df["started_at"], utc=True, errors="coerce")
    text = "str" if int(pd.__version__.split(".")[0]) >= 3 else object    # both keep NaN for empty
    for c in df.columns:
        if c not in NUMERIC_COLUMNS and c not in CATEGORY_COLUMNS and c not in (SOURCE_COLUMN, "started_at"):
            df[c] = df[c].astype(text)
    return df


def load(paths: Union[PathSpec, Sequence[PathSpec]]) -> "pd.DataFrame":
    """Results CSVs and/or results directories -> one typed ``pandas.DataFrame``.

    One row per run, in file order; every column of :data:`COLUMNS` (a file written by
    an older schema gets the columns it lacks, empty), then any other column the files
    have, then ``source`` (the CSV each row came from).  Types: :data:`NUMERIC_COLUMNS`
    are float64 with NaN for empty; the scenario keys are ordered categoricals (numbers
    by value; ``guest_mem_mib``, ``vcpus``, ``page_size_kib`` and ``dirty_ring`` have
    numeric categories); the variant, source and status columns are categoricals;
    ``started_at`` is a UTC datetime; the rest is text; empty is missing everywhere.
    ``df.attrs["sources"]`` lists the files read.

    A directory is searched recursively for results CSVs (other CSVs there, e.g. a
    comparison CSV, are skipped).  Bad input is a one-line :class:`UserError`: a
    missing or unreadable path, a file that is not a results CSV, a directory
    without any, no rows at all.
    """
    specs = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    frames, sources = [], []
    for spec in specs:
        path = Path(spec)
        if path.is_dir():
            try:
                candidates = results_csvs(path)
            except PermissionError as exc:
                raise UserError(f"{path}: permission denied; make it readable") from exc
            found = 0
            for p in candidates:
                try:
                    frames.append(_read_raw(p))
                except UserError as exc:
                    if _looks_like_results(p):     # a results CSV that is broken: say so
                        raise
                    log.debug("skipping %s: %s", p, exc)
                    continue
                sources.append(p)
                found += 1
            if not found:
                raise UserError(f"{path}: directory holds no migstall results CSV; "
                                "give a results CSV or a directory of them")
        else:
            frames.append(_read_raw(path))
            sources.append(path)
    if not frames or not sum(len(f) for f in frames):
        raise UserError(f"{', '.join(str(s) for s in specs)}: no result rows; run 'migstall run' first")
    df = _combine([f for f in frames if len(f)])
    df.attrs["sources"] = [str(s) for s in sources]
    return df


def read(path: PathSpec) -> "pd.DataFrame":
    """One results CSV as :func:`load` types it (no rows is not an error here)."""
    df = _combine([_read_raw(Path(path))])
    df.attrs["sources"] = [str(path)]
    return df


def _combine(frames: List["pd.DataFrame"]) -> "pd.DataFrame":
    """Raw frames -> one frame with every column of :data:`COLUMNS` (older schemas gain
    the columns they lack, empty), then other columns, then ``source``; typed."""
    import pandas as pd

    extra: List[str] = []
    for f in frames:
        extra += [c for c in f.columns if c not in COLUMNS and c != SOURCE_COLUMN and c not in extra]
    order = list(COLUMNS) + extra + [SOURCE_COLUMN]
    df = pd.concat([f.reindex(columns=order) for f in frames], ignore_index=True)
    return _typed(df)
