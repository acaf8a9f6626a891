"""Progress reporting that stages use without knowing about the console."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress as _RichProgress, SpinnerColumn, TextColumn, TimeElapsedColumn


class Progress:
    """Stages call ``with progress.task("quantize layers", total=n) as advance: advance()``."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console

    @contextmanager
    def task(self, description: str, total: int | None = None) -> Iterator[Callable[[int], None]]:
        if self.console is None or self.console.quiet:
            yield lambda n=1: None
            return
        if not self.console.is_terminal:  # logs: one line per task, no live bar
            self.console.print(f"… {description}", highlight=False, markup=False)
            yield lambda n=1: None
            return
        columns = [SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
        with _RichProgress(*columns, console=self.console, transient=True) as bar:
            tid = bar.add_task(description, total=total)
            yield lambda n=1: bar.advance(tid, n)

    def log(self, message: str) -> None:
        if self.console is not None:
            self.console.print(message)


SILENT = Progress(None)
