"""Progress bars on stderr for long work (scores of large models, table building).

Library functions take `progress: bool = False`: nothing is shown unless a caller (the `modelmap`
command) asks. A bar appears only once the work has run for `delay` seconds, so quick calls print
nothing, and it is removed when the work ends.
"""

from __future__ import annotations

import threading
import time

__all__ = ["ProgressBar", "progress_bar"]


class ProgressBar:
    """A rich progress bar on stderr that shows itself after `delay` seconds of work.

    Use it as a context manager; `advance` ticks it, `describe` says what runs now, `expand` adds
    work to the total. A disabled bar does nothing.

    **Arguments:**

    - `label`: what the whole task is ("score", "shell table").
    - `total`: units of work.
    - `enabled`: `False` gives a bar that does nothing.
    - `delay`: seconds before the bar is drawn.
    """

    def __init__(self, label: str, total: int, *, enabled: bool = True, delay: float = 1.0):
        self.label, self.total, self.enabled, self.delay = label, int(total), bool(enabled), float(delay)
        self._done, self._what = 0, ""
        self._bar = self._task = self._timer = None
        self._lock = threading.Lock()

    def __enter__(self) -> "ProgressBar":
        if self.enabled:
            self._timer = threading.Timer(self.delay, self._show)
            self._timer.daemon = True
            self._timer.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _show(self) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        with self._lock:
            if not self.enabled or self._bar is not None:
                return
            self._bar = Progress(TextColumn(self.label), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                                 TextColumn("{task.fields[what]}"), console=Console(stderr=True), transient=True)
            self._task = self._bar.add_task(self.label, total=self.total, completed=self._done, what=self._what)
            self._bar.start()

    def _refresh(self) -> None:
        with self._lock:
            if self._bar is not None:
                self._bar.update(self._task, total=self.total, completed=self._done, what=self._what)

    def describe(self, what: str) -> None:
        """Say what runs now (shown beside the bar)."""
        self._what = what
        self._refresh()

    def advance(self, n: int = 1) -> None:
        """Count `n` units of work as done."""
        self._done += n
        self._refresh()

    def expand(self, n: int) -> None:
        """Add `n` units of work to the total."""
        self.total += n
        self._refresh()

    def close(self) -> None:
        """Stop the timer and remove the bar."""
        with self._lock:
            self.enabled = False
            if self._timer is not None:
                self._timer.cancel()
            if self._bar is not None:
                self._bar.stop()
                self._bar = None


class _Borrowed:
    """A caller's bar lent to a sub-task: it ticks the caller's bar and never closes it."""

    def __init__(self, parent: ProgressBar):
        self.parent = parent

    def __enter__(self) -> ProgressBar:
        return self.parent

    def __exit__(self, *exc) -> None:
        pass


def progress_bar(progress: "bool | ProgressBar", label: str, total: int):
    """The bar a function taking `progress` uses: a new one for `True`, the caller's own bar
    (ticked, not closed) for a `ProgressBar`, a silent one for `False`. Use it in a `with`."""
    if isinstance(progress, ProgressBar):
        progress.expand(total)
        return _Borrowed(progress)
    return ProgressBar(label, total, enabled=bool(progress))
