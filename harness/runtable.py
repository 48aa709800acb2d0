"""The table ``migstall run`` and ``migstall demo`` print: one line per run.

Library code: it returns rich renderables and strings, the command prints them.
Units are in the headers; durations are shown in milliseconds (the CSV's
``_us`` stall columns are converted) with :func:`fmt_ms`'s precision; failed
rows are red, and their errors follow the table.  ``plain=True`` gives the
same table without colour or box lines (for a pipe, a file or CI logs).  The
CSV is not affected: it keeps every column at full precision.

Under TCG every vCPU is a host thread, so a TCG row's stall columns measure
how the host scheduled those threads, not KVM (issue 12 saw baselines of
2.5-7.7 s in a `make demo` on this 2-core host).  Those cells carry :data:`NOISE_MARK` and
the table is followed by :data:`NOISE_NOTE`.  And every stall of a second or
more, TCG or KVM, gets a line saying what the source QEMU's vCPU threads did
meanwhile (:func:`long_stall_lines`, from the row's ``*_vcpu_wait_ms`` and
``*_vcpu_blocked_ms``): waited for a host CPU, were blocked, or ran.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, List, Mapping, Optional, Sequence

from harness import results

if TYPE_CHECKING:
    from rich.console import Console, Group
    from rich.table import Table
    from rich.text import Text

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Column:
    key: str               # CSV column
    header: str            # with its unit
    kind: str = "text"     # text | int | ms | us (shown in ms)


COLUMNS = (
    Column("scenario", "scenario"), Column("repeat", "rep", "int"), Column("accel", "accel"),
    Column("guest_mem_mib", "mem\nMiB", "int"), Column("backing", "backing"),
    Column("page_size_kib", "page\nKiB", "int"), Column("touched_mib", "touched\nMiB", "int"),
    Column("dirty_log_mode", "dirty log"),
    Column("dirty_log_start_ms", "dirty-log\nstart ms", "ms"), Column("setup_time_ms", "setup\nms", "ms"),
    Column("first_pass_ms", "pass 1\nms", "ms"), Column("kvm_enable_ms", "KVM\nenable ms", "ms"),
    Column("stall_pio_max_us", "pio stall\nmax ms", "us"), Column("stall_write_max_us", "write stall\nmax ms", "us"),
    Column("baseline_stall_max_us", "baseline\nstall ms", "us"), Column("total_time_ms", "total\nms", "ms"),
    Column("downtime_ms", "downtime\nms", "ms"), Column("dirty_log_stop_ms", "dirty-log\nstop ms", "ms"),
    Column("status", "status"),
)


#: suffix of a TCG row's stall cells, explained by :data:`NOISE_NOTE` under the table
NOISE_MARK = "~"
NOISE_NOTE = (f"{NOISE_MARK} TCG row: every vCPU is a host thread, so its stall columns are host scheduling "
              "noise (seconds on a busy or small host), not KVM's behaviour; TCG rows test the plumbing only.")


def number(value: Any) -> Optional[float]:
    """A cell as a finite float (rows from the runner hold numbers, rows from a CSV text)."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, str):
        value = value.strip()
        if not value:
            return None
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def fmt_ms(ms: Optional[float]) -> str:
    """Milliseconds with sensible precision: ``256``, ``31.0``, ``1.3``, ``0.42``, ``0``; ``-`` if none."""
    if ms is None:
        return "-"
    a = abs(ms)
    if a == 0:
        return "0"
    if a >= 100:
        return f"{ms:.0f}"
    if a >= 1:
        return f"{ms:.1f}"
    return f"{ms:.2f}"


def _noise(row: Mapping[str, Any], col: Column) -> bool:
    """A TCG row's stall cell: host scheduling noise (module docstring)."""
    return "stall" in col.key and results._fmt(row.get("accel")) == "tcg"


def cell(row: Mapping[str, Any], col: Column) -> str:
    value = row.get(col.key)
    if col.kind == "ms":
        return fmt_ms(number(value))
    if col.kind == "us":
        v = number(value)
        if v is None:
            return "-"
        return fmt_ms(v / 1000.0) + (NOISE_MARK if _noise(row, col) else "")
    if col.kind == "int":
        v = number(value)
        if v is None:
            return "-"
        return f"{v:.0f}" if v.is_integer() else f"{v:g}"
    text = results._fmt(value)
    return text if text else "-"


def _failed(row: Mapping[str, Any]) -> bool:
    return row.get("status") != results.STATUS_OK


def error_lines(rows: Sequence[Mapping[str, Any]]) -> List[str]:
    """``run_id: error`` for every failed row."""
    return [f"{r.get('run_id') or '?'}: {results._fmt(r.get('error')) or 'failed'}" for r in rows if _failed(r)]


def columns_for(rows: Sequence[Mapping[str, Any]]) -> List[Column]:
    """Every column, minus the duration columns no row has a value in (``kvm_enable_ms`` under
    TCG, ``dirty_log_stop_ms`` without ``cancel``): they would only be dashes."""
    keep = []
    for c in COLUMNS:
        if c.kind in ("ms", "us") and rows and all(number(r.get(c.key)) is None for r in rows):
            continue
        keep.append(c)
    return keep


def table(rows: Sequence[Mapping[str, Any]], *, title: Optional[str] = None, plain: bool = False) -> "Table":
    """The runs as a rich Table (failed rows red unless ``plain``)."""
    from rich import box
    from rich.table import Table

    cols = columns_for(rows)
    t = Table(title=title, title_justify="left", box=None if plain else box.SIMPLE_HEAD,
              header_style="" if plain else "bold", pad_edge=False, show_edge=False,
              padding=(0, 2, 0, 0) if plain else (0, 0, 0, 1))       # columns 2 apart: 17 fit in 160
    for c in cols:
        t.add_column(c.header, justify="left" if c.kind == "text" else "right", no_wrap=c.kind != "text",
                     overflow="fold")
    for r in rows:
        t.add_row(*(cell(r, c) for c in cols), style="red" if _failed(r) and not plain else None)
    return t


def errors(rows: Sequence[Mapping[str, Any]], *, plain: bool = False) -> List["Text"]:
    """One rich Text per failed run, red unless ``plain``.  Print them with ``soft_wrap=True``:
    they hold log paths to copy, and must not be folded or cropped."""
    from rich.text import Text

    return [Text(line, style="" if plain else "red") for line in error_lines(rows)]


#: the stall columns the table shows, and the span of the row's thread statistics each lies in
_STALL_SPANS = (("baseline_stall_max_us", "baseline", "before"), ("stall_pio_max_us", "pio", "window"),
                ("stall_write_max_us", "write", "window"))


def long_stall_lines(rows: Sequence[Mapping[str, Any]]) -> List[str]:
    """For each stall of at least :data:`threads.LONG_STALL_MS` a row shows, what
    the source QEMU's vCPU threads did meanwhile (:func:`threads.why`)."""
    from harness.measure import threads

    out = []
    for r in rows:
        for key, label, span in _STALL_SPANS:
            us = number(r.get(key))
            if us is None or us / 1000 < threads.LONG_STALL_MS:
                continue
            where = "READY to migrate" if span == "before" else "the stall window"
            cause = threads.why(us / 1000, number(r.get(f"{span}_vcpu_wait_ms")),
                                number(r.get(f"{span}_vcpu_blocked_ms")))
            out.append(f"{r.get('scenario')} r{r.get('repeat')}: {label} stall of {us / 1e6:.2f} s; "
                       f"from {where}, {cause}.")
    return out


def notes(rows: Sequence[Mapping[str, Any]], *, plain: bool = False) -> List["Text"]:
    """What the table's marks mean: :data:`NOISE_NOTE` when a TCG row shows a
    stall; then what the vCPU threads did during each stall of a second or more."""
    from rich.text import Text

    out = []
    if any(_noise(r, c) and number(r.get(c.key)) is not None for r in rows for c in columns_for(rows)):
        out.append(Text(NOISE_NOTE, style="" if plain else "dim"))
    out += [Text(line, style="" if plain else "dim") for line in long_stall_lines(rows)]
    return out


def render(rows: Sequence[Mapping[str, Any]], *, title: Optional[str] = None, plain: bool = False) -> "Group":
    """The table, its notes, then one line per failed run with its error (red unless ``plain``)."""
    from rich.console import Group

    return Group(table(rows, title=title, plain=plain), *notes(rows, plain=plain), *errors(rows, plain=plain))


def print_to(console: "Console", rows: Sequence[Mapping[str, Any]], *, title: Optional[str] = None,
             plain: bool = False) -> None:
    """Print the table and the errors on ``console`` (the command layer's console)."""
    if title:
        console.print(title, style="" if plain else "bold", soft_wrap=True, highlight=False, markup=False)
    console.print(table(rows, plain=plain))
    for text in notes(rows, plain=plain):
        console.print(text)
    for text in errors(rows, plain=plain):
        console.print(text, soft_wrap=True)


def to_text(rows: Sequence[Mapping[str, Any]], *, title: Optional[str] = None, width: int = 240) -> str:
    """The table and errors as plain text (no colour), for logs and tests."""
    import io

    from rich.console import Console

    buf = io.StringIO()
    print_to(Console(file=buf, width=width, color_system=None, force_terminal=False, highlight=False), rows,
             title=title, plain=True)
    return "\n".join(line.rstrip() for line in buf.getvalue().splitlines()) + "\n"
