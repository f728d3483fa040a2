"""Progress of a long command: a live bar on a terminal, plain periodic lines in a log or a pipe.

A log that is not a terminal must not get ``\\r`` redraws (they pile up as one endless line), so there the progress
is one line at every 10 % step and at least every 10 s.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterator
from typing import TextIO

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

PLAIN_STEP_FRACTION = 0.1
PLAIN_INTERVAL_SECONDS = 10.0


class PlainProgress:
    """Writes ``<what>: done/total (p %), r/s`` when a 10 % step is crossed or 10 s have passed, and at the end."""

    def __init__(
        self,
        total: int,
        what: str,
        stream: TextIO,
        step_fraction: float = PLAIN_STEP_FRACTION,
        interval_seconds: float = PLAIN_INTERVAL_SECONDS,
    ) -> None:
        self.total = total
        self.what = what
        self.stream = stream
        self.step_fraction = step_fraction
        self.interval_seconds = interval_seconds
        self.started = time.monotonic()
        self._last_step = 0
        self._last_line_at = self.started

    def update(self, done: int) -> None:
        now = time.monotonic()
        step = int(done / self.total / self.step_fraction) if self.total else 0
        if done < self.total and step <= self._last_step and now - self._last_line_at < self.interval_seconds:
            return
        self._last_step, self._last_line_at = step, now
        rate = done / max(now - self.started, 1e-9)
        percent = 100 * done / self.total if self.total else 100.0
        print(f"{self.what}: {done}/{self.total} ({percent:.0f} %), {rate:.1f}/s", file=self.stream, flush=True)


@contextlib.contextmanager
def progress(total: int, what: str, stream: TextIO | None = None) -> Iterator[Callable[[int], None]]:
    """A function ``update(done)`` that shows how far a job of ``total`` items is, on ``stream`` (stderr).

    A bar when ``stream`` is a terminal; ``PlainProgress`` lines otherwise.
    """
    stream = stream if stream is not None else sys.stderr
    if not stream.isatty():
        yield PlainProgress(total, what, stream).update
        return
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),  # items per second since the start (rich's speed is a short window)
        TimeElapsedColumn(),
        TextColumn("left"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=Console(file=stream)) as bar:
        task = bar.add_task(what, total=total, rate="")
        started = time.monotonic()

        def update(done: int) -> None:
            rate = done / max(time.monotonic() - started, 1e-9)
            bar.update(task, completed=done, rate=f"{rate:.1f}/s")

        yield update
