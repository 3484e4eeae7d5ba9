"""Rich progress bars with a rate column, written to stderr (stdout stays clean for --json)."""

from __future__ import annotations

from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text


class RateColumn(ProgressColumn):
    """Items per second, e.g. ``512 tok/s``."""

    def __init__(self, unit: str):
        super().__init__()
        self.unit = unit

    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        if speed is None:
            return Text("?", style="cyan")
        if speed < 10:      # slow steps (a training step, a patch batch): keep the digits
            return Text(f"{speed:.2g} {self.unit}/s" if speed >= 0.1 else f"{60 * speed:.2g} {self.unit}/min",
                        style="cyan")
        return Text(f"{speed:,.0f} {self.unit}/s", style="cyan")


class _Bar:
    def __init__(self, progress: Progress | None, task):
        self._progress, self._task = progress, task

    def advance(self, n: float = 1, loss: float | None = None) -> None:
        if self._progress is None:
            return
        if loss is not None:
            self._progress.update(self._task, loss=f"loss {loss:.4f}")
        self._progress.advance(self._task, n)


@contextmanager
def progress_bar(total: float, description: str, unit: str = "it", enabled: bool = True,
                 show_loss: bool = False):
    """Context manager yielding ``bar`` with ``bar.advance(n, loss=None)``; a no-op when disabled.

    ``show_loss`` adds a column with the last ``loss`` passed to ``advance``.
    """
    if not enabled:
        yield _Bar(None, None)
        return
    progress = Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        RateColumn(unit), *([TextColumn("[magenta]{task.fields[loss]}")] if show_loss else []),
        TimeElapsedColumn(), TimeRemainingColumn(), console=Console(stderr=True), transient=False,
    )
    with progress:
        task = progress.add_task(description, total=total, loss="")
        yield _Bar(progress, task)
