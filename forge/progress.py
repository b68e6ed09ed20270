"""Rich progress bars for long stages, on stderr so `--json` output on stdout stays clean."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.progress import Progress as RichProgress

Advance = Callable[[int, int], None]  # (done, total)


class Progress:
    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.console = Console(stderr=True)

    @contextmanager
    def task(self, description: str, total: int | None) -> Iterator[Advance]:
        """Yield `advance(done, total)`; the bar shows a spinner until a total is known."""
        if not self.enabled:
            yield lambda done, total: None
            return
        columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn())  # fmt: skip
        with RichProgress(*columns, console=self.console, transient=False) as bar:
            task_id = bar.add_task(description, total=total)

            def advance(done: int, total: int) -> None:
                bar.update(task_id, completed=done, total=total)

            yield advance
