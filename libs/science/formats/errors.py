"""The one error type of every reader and writer of detector files."""

from __future__ import annotations

from pathlib import Path


class FormatError(ValueError):
    """A detector file that cannot be read as a run, or cannot be trusted.

    The message names the file, the frame (when one is at fault) and the dataset or field, e.g.
    ``run.h5: frame 12: /entry/data/data: cannot be decoded (...)``.
    """

    def __init__(self, path: str | Path, problem: str, *, frame: int | None = None, field: str | None = None) -> None:
        self.path = str(path)
        self.frame = frame
        self.field = field
        self.problem = problem
        parts = [self.path]
        if frame is not None:
            parts.append(f"frame {frame}")
        if field is not None:
            parts.append(field)
        parts.append(problem)
        super().__init__(": ".join(parts))
