"""Progress for long steps (kernel build, prefault, migration).

Library code reports progress through a :class:`Progress` object it is given;
it never prints.  The CLI picks :func:`for_terminal`, which shows a live rich
progress bar on an interactive terminal and is silent when stderr is not a TTY
or ``CI`` is set.
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Iterator, Optional


class Task:
    def update(self, completed: Optional[float] = None, *, advance: float = 0.0,
               description: Optional[str] = None) -> None:
        """Report progress; ``completed`` is absolute, ``advance`` relative."""


class Progress:
    """The silent default."""

    @contextlib.contextmanager
    def task(self, description: str, total: Optional[float] = None) -> Iterator[Task]:
        yield Task()


class _RichTask(Task):
    def __init__(self, bar, task_id) -> None:
        self._bar, self._id = bar, task_id

    def update(self, completed=None, *, advance=0.0, description=None) -> None:
        kwargs = {}
        if completed is not None:
            kwargs["completed"] = completed
        if advance:
            kwargs["advance"] = advance
        if description is not None:
            kwargs["description"] = description
        self._bar.update(self._id, **kwargs)


class RichProgress(Progress):
    @contextlib.contextmanager
    def task(self, description: str, total: Optional[float] = None) -> Iterator[Task]:
        from rich.console import Console
        from rich.progress import BarColumn, Progress as Bar, SpinnerColumn, TextColumn, TimeElapsedColumn

        with Bar(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                 TextColumn("{task.percentage:>3.0f}%" if total else ""), TimeElapsedColumn(),
                 console=Console(stderr=True), transient=True) as bar:
            yield _RichTask(bar, bar.add_task(description, total=total))


def for_terminal() -> Progress:
    if os.environ.get("CI") or not sys.stderr.isatty():
        return Progress()
    return RichProgress()
