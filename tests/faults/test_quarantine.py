"""A frame that kills its rank on every attempt (kill -9 whenever it is in flight): after two crashes it is quarantined,
reported as one error record, and every other frame is merged."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

from libs.contracts.messages import FrameResult, decode_message
from services.merger.engine import MergingEngine
from services.merger.mtz import write_merge_outputs
from tests.faults.support import (
    CELL,
    FRAMES,
    SPACE_GROUP,
    MtzColumns,
    Pipeline,
    Reference,
    Row,
    audit,
    mtz_columns,
    mtz_difference,
    quietly,
)

POISON_FRAME = 9


def merged_without(reference: Reference, frame: int, folder: Path) -> MtzColumns:
    """What the merger's final merge gives for the reference's results without ``frame`` (same engine, same order)."""
    lines = reference.journal.read_bytes().splitlines()
    results = sorted((decode_message(line, FrameResult) for line in lines), key=lambda r: (r.run_id, r.frame_index))
    engine = MergingEngine(CELL, SPACE_GROUP)
    engine.add_frames([r for r in results if r.frame_index != frame])
    engine.rescale()
    write_merge_outputs(engine, folder / "expected.mtz", folder / "expected_unmerged.mtz")
    return mtz_columns(folder / "expected.mtz")


def test_a_frame_that_crashes_every_attempt_is_quarantined(
    tmp_path: Path, source_run: Path, reference: Reference, record_row: Callable[[Row], None]
) -> None:
    # One rank: a crash charges only the rank's own frame, never a neighbour that happened to be in flight too.
    with Pipeline(tmp_path, ranks_per_node=1) as pipeline:
        pipeline.land(source_run)
        killed: set[int] = set()
        for attempt in range(2):
            on_poison = pipeline.wait_for(
                quietly(
                    lambda: next(
                        (
                            r
                            for r in pipeline.inflight().values()
                            if r.get("frame") == POISON_FRAME and int(r["pid"]) not in killed
                        ),
                        None,
                    )
                ),
                what=f"attempt {attempt} reaching frame {POISON_FRAME}",
            )
            os.kill(int(on_poison["pid"]), signal.SIGKILL)  # as a segfault in a library would
            killed.add(int(on_poison["pid"]))
        ended = time.monotonic()
        update, seen = pipeline.final_merge()
        expected = merged_without(reference, POISON_FRAME, tmp_path)
        result = audit(
            pipeline,
            f"frame {POISON_FRAME} crashes its rank every attempt",
            reference,
            seen - ended,
            record_row,
            update,
            expected_columns=expected,
        )
        assert result.duplicates == 0 and result.lost == 0
        assert list(result.errors) == [POISON_FRAME] and "quarantined" in result.errors[POISON_FRAME], result.errors
        assert result.merged == FRAMES - 1
        assert update.mtz_path is not None
        assert mtz_difference(Path(update.mtz_path), expected) is None
