"""A live writer that pauses for longer than the analysis's live timeout, then writes the rest of its run: the job ends
on the timeout, and the frames written after the pause are still processed (the dispatcher queues the run again)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

from libs.contracts.messages import JobStatus
from tests.faults.support import FRAMES, RUN_ID, Pipeline, Reference, Row, assert_clean, audit, quietly

LIVE_TIMEOUT_SECONDS = 4.0
PAUSE_AFTER = 12
PAUSE_SECONDS = 15.0


def test_frames_written_after_a_pause_longer_than_the_live_timeout_are_processed(
    tmp_path: Path, source_run: Path, reference: Reference, record_row: Callable[[Row], None]
) -> None:
    with Pipeline(tmp_path, live_timeout_seconds=LIVE_TIMEOUT_SECONDS) as pipeline:
        writer = pipeline.write_live(source_run, rate=4.0, pause_after=PAUSE_AFTER, pause_seconds=PAUSE_SECONDS)
        try:
            ended = pipeline.wait_for(
                quietly(
                    lambda: (
                        (job := pipeline.state.job(pipeline.job_id)) is not None
                        and job.status is JobStatus.SUCCEEDED
                        and job
                    )
                ),
                timeout=PAUSE_SECONDS + 60,
                what="the live job ending on its timeout during the pause",
            )
            assert ended.frames_total is not None and ended.frames_total <= PAUSE_AFTER, ended
            resumed = pipeline.wait_for(
                quietly(lambda: (m := pipeline.state.run(RUN_ID)) is not None and (m.frame_count or 0) > PAUSE_AFTER),
                what="a manifest with frames written after the pause",
            )
            assert resumed
            fault_end = time.monotonic()
            assert writer.wait(timeout=120) == 0
        finally:
            if writer.poll() is None:
                writer.kill()
        runs_file = pipeline.folder() / "runs.json"

        def whole_run_final() -> bool:
            try:
                content = json.loads(runs_file.read_bytes())
            except (OSError, ValueError):
                return False
            return content["done"].get(RUN_ID) == FRAMES and RUN_ID in content["final"]

        pipeline.wait_for(whole_run_final, what="the whole run (after the pause) written as final")
        update, seen = pipeline.final_merge()
        result = audit(
            pipeline,
            f"live writer paused {PAUSE_SECONDS:.0f} s > live timeout {LIVE_TIMEOUT_SECONDS:.0f} s",
            reference,
            seen - fault_end,
            record_row,
            update,
        )
        assert_clean(result, update, reference)
