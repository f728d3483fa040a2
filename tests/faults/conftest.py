"""The fault suite's shared pieces: the source run, the undisturbed reference run, and the table printed at the end.

Run with ``make test-faults``; the default ``pytest`` (``make test``) does not collect this folder.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.faults.support import FRAMES, REPO, SEED, TABLE_CAPTION, Pipeline, Reference, Row, mtz_columns, table

ROWS: list[Row] = []
"""Rows of the fault table, in the order the scenarios ran."""


@pytest.fixture(scope="session")
def source_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The simulated run every scenario processes (the same data, so the MTZ can be compared)."""
    out = tmp_path_factory.mktemp("source") / "source.h5"
    command = [sys.executable, "-m", "sfx", "simulate", "--out", str(out), "--frames", str(FRAMES), "--seed", str(SEED)]
    subprocess.run(command, check=True, capture_output=True, cwd=REPO)
    return out


@pytest.fixture(scope="session")
def reference(source_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Reference:
    """The same run processed by the same services, undisturbed (once per session)."""
    root = tmp_path_factory.mktemp("reference")
    with Pipeline(root) as pipeline:
        started = time.monotonic()
        pipeline.land(source_run)
        update, seen = pipeline.final_merge()
        assert update.mtz_path is not None
        kept = root / "kept"
        kept.mkdir()
        mtz = Path(shutil.copy(update.mtz_path, kept / "reference.mtz"))
        journal = Path(shutil.copy(pipeline.journal(), kept / "results.jsonl"))
    return Reference(columns=mtz_columns(mtz), mtz=mtz, journal=journal, seconds=seen - started)


@pytest.fixture
def record_row() -> Callable[[Row], None]:
    return ROWS.append


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not ROWS:
        return
    terminalreporter.section("fault table")
    terminalreporter.write_line(table(ROWS))
    terminalreporter.write_line("")
    terminalreporter.write_line(TABLE_CAPTION)
