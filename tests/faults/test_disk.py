"""The merger's disk fills up mid-run: a small tmpfs mounted at its folder runs out of space while the journal grows,
then it is grown (the outage ends) and the run must finish as if nothing happened."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.faults.support import Pipeline, Reference, Row, assert_clean, audit, disturbed_run

# Pages for the manifest, the dataset header and runs.json, and about a third of the run's journal (82 kB).
FULL_SIZE = "48k"


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    folder = tmp_path / "services" / "merger"
    folder.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={FULL_SIZE}", "tmpfs", str(folder)], check=True)
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def test_merger_disk_full_mid_run(
    small_disk: Path, tmp_path: Path, source_run: Path, reference: Reference, record_row: Callable[[Row], None]
) -> None:
    with Pipeline(tmp_path) as pipeline:
        log = pipeline.work_dir / "logs" / "merger.log"

        def fill_then_grow() -> float:
            pipeline.wait_for(
                lambda: "No space left on device" in log.read_text(errors="replace"), what="the merger's disk full"
            )
            time.sleep(5)  # a real outage: results keep failing and wait in the retry queues
            subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
            return time.monotonic()

        update, recovery = disturbed_run(pipeline, source_run, fill_then_grow, start_at=1)
        result = audit(pipeline, "merger disk full (tmpfs), then grown", reference, recovery, record_row, update)
        assert_clean(result, update, reference)
