"""Files that survive a crash or a full disk: whole-file replacement by rename, and an append-only journal.

Both follow one rule: a reader sees either the old content or the new, never a mixture. A file is written under a
temporary name in the same folder, flushed and fsynced, then renamed over the old one (rename is atomic on POSIX).
A journal line is appended, flushed and fsynced before the caller acknowledges what it records; a line cut short by a
crash or by ENOSPC is cut off again, so the next line never glues onto it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from libs.runtime.logging import get_logger

log = get_logger(__name__)


def _fsync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable (the folder's entry, not only the file's data, must reach the disk)."""
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


@contextlib.contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block ends without error, it replaces ``path`` atomically.

    On error the temporary file is removed and ``path`` keeps its old content.
    """
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield temporary
        with temporary.open("rb+") as written:
            os.fsync(written.fileno())
        os.replace(temporary, path)
        _fsync_folder(path.parent)
    finally:
        temporary.unlink(missing_ok=True)


def write_atomically(path: Path, content: bytes) -> None:
    """Replace ``path`` with ``content`` so that a crash leaves either the old or the new file, never a partial one."""
    with replacing(path) as temporary:
        temporary.write_bytes(content)


class Journal:
    """An append-only file of lines, each durable before :meth:`append` returns.

    Opening it cuts off a last line without its newline (a write cut short by a crash: never acknowledged, so its
    message is redelivered); a failed append (a full disk) truncates the file back to where the line began.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._cut_torn_tail()

    def _cut_torn_tail(self) -> None:
        if not self.path.exists():
            return
        with self.path.open("rb+") as journal:
            size = journal.seek(0, os.SEEK_END)
            if size == 0:
                return
            # Walk back to the last newline: everything after it is a torn line.
            position = size
            while position > 0:
                step = min(65536, position)
                journal.seek(position - step)
                chunk = journal.read(step)
                newline = chunk.rfind(b"\n")
                if newline >= 0:
                    end = position - step + newline + 1
                    break
                position -= step
            else:
                end = 0
            if end < size:
                log.warning("journal: torn last line cut off", journal=str(self.path), bytes=size - end)
                journal.truncate(end)
                os.fsync(journal.fileno())

    def append(self, line: bytes) -> None:
        """Append one line (without its newline) and make it durable; on failure the file is as it was."""
        if b"\n" in line:
            raise ValueError("a journal line cannot contain a newline")
        data = memoryview(line + b"\n")
        # Raw descriptor writes: a buffered file would retry its buffer at close, after the truncation below.
        descriptor = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            start = os.lseek(descriptor, 0, os.SEEK_END)
            try:
                while data:
                    data = data[os.write(descriptor, data) :]
                os.fsync(descriptor)
            except OSError:
                with contextlib.suppress(OSError):
                    os.ftruncate(descriptor, start)
                raise
        finally:
            os.close(descriptor)

    def lines(self) -> Iterator[tuple[int, bytes]]:
        """Every line with its 1-based number (without the newline)."""
        if not self.path.exists():
            return
        with self.path.open("rb") as journal:
            for number, line in enumerate(journal, 1):
                yield number, line.rstrip(b"\n")
