"""A rich progress bar with a rate column and a running loss (stderr; stdout stays clean)."""

from __future__ import annotations

from contextlib import contextmanager

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)

from replab._progress import RateColumn


class _LossBar:
    def __init__(self, progress: Progress | None, task):
        self._progress, self._task = progress, task

    def advance(self, n: float = 1, loss: float | None = None) -> None:
        if self._progress is None:
            return
        if loss is not None:
            self._progress.update(self._task, loss=f"loss {loss:.4f}")
        self._progress.advance(self._task, n)


@contextmanager
def loss_bar(total: float, description: str, unit: str = "it", enabled: bool = True):
    """Context manager yielding ``bar`` with ``bar.advance(n, loss=None)``; no-op when disabled."""
    if not enabled:
        yield _LossBar(None, None)
        return
    progress = Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        RateColumn(unit), TextColumn("[magenta]{task.fields[loss]}"), TimeElapsedColumn(),
        TimeRemainingColumn(), console=Console(stderr=True), transient=False,
    )
    with progress:
        task = progress.add_task(description, total=total, loss="")
        yield _LossBar(progress, task)
