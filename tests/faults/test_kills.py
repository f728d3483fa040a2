"""``kill -9`` of each moving part mid-run (an analysis rank, a whole job, the merger twice, the dispatcher, the ingest
while a live run is written), and SIGTERM of every service; the killed service is started again by the harness."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

from libs.contracts.messages import FrameResult, decode_message
from libs.runtime.bus import Topology, connect
from tests.faults.support import (
    RUN_ID,
    Pipeline,
    Reference,
    Row,
    assert_clean,
    audit,
    disturbed_run,
    quietly,
    wait_for_rank_busy_beyond,
)

MID_RUN_FRAME = 8


def run_with(
    scenario: str,
    inject: Callable[[Pipeline], float],
    tmp_path: Path,
    source_run: Path,
    reference: Reference,
    record_row: Callable[[Row], None],
    start_at: int = 4,
) -> None:
    with Pipeline(tmp_path) as pipeline:
        update, recovery = disturbed_run(pipeline, source_run, lambda: inject(pipeline), start_at=start_at)
        result = audit(pipeline, scenario, reference, recovery, record_row, update)
        assert_clean(result, update, reference)


def kill_a_rank_mid_frame(pipeline: Pipeline) -> float:
    busy = wait_for_rank_busy_beyond(pipeline, MID_RUN_FRAME)
    os.kill(int(busy["pid"]), signal.SIGKILL)
    return time.monotonic()


def kill_the_job(pipeline: Pipeline) -> float:
    wait_for_rank_busy_beyond(pipeline, MID_RUN_FRAME)
    pid = pipeline.wait_for(pipeline.job_pid, what="the job's process")
    os.killpg(pid, signal.SIGKILL)
    return time.monotonic()


def restart_after_kill(name: str) -> Callable[[Pipeline], float]:
    def inject(pipeline: Pipeline) -> float:
        pipeline.kill(name)
        pipeline.start(name)
        return time.monotonic()

    return inject


def test_kill_an_analysis_rank_mid_frame(
    tmp_path: Path, source_run: Path, reference: Reference, record_row: Callable[[Row], None]
) -> None:
    run_with("kill -9 analysis rank mid-frame", kill_a_rank_mid_frame, tmp_path, source_run, reference, record_row, 0)


def test_kill_a_whole_job(
    tmp_path: Path, source_run: Path, reference: Reference, record_row: Callable[[Row], None]
) -> None:
    run_with("kill -9 whole job (process group)", kill_the_job, tmp_path, source_run, reference, record_row, 0)


def test_kill_the_merger_mid_run(
    tmp_path: Path, source_run: Path, reference: Reference, record_row: Callable[[Row], None]
) -> None:
    run_with("kill -9 merger mid-run", restart_after_kill("merger"), tmp_path, source_run, reference, record_row)


def test_kill_the_dispatcher_mid_run(
    tmp_path: Path, source_run: Path, reference: Reference, record_row: Callable[[Row], None]
) -> None:
    inject = restart_after_kill("dispatcher")
    run_with("kill -9 dispatcher mid-run", inject, tmp_path, source_run, reference, record_row)


def test_kill_the_merger_right_after_it_saved_the_run_as_done(
    tmp_path: Path, source_run: Path, reference: Reference, record_row: Callable[[Row], None]
) -> None:
    with Pipeline(tmp_path) as pipeline:
        pipeline.land(source_run)
        runs_file = pipeline.folder() / "runs.json"
        mtz = pipeline.folder() / f"{pipeline.folder().parent.name}_live.mtz"

        def done_saved() -> bool:
            try:
                return RUN_ID in json.loads(runs_file.read_bytes())["done"]
            except (OSError, ValueError, KeyError):
                return False

        # Polled tightly: the merger writes the MTZ at its next tick (1 s) after saving the run as done.
        deadline = time.monotonic() + 240
        while not done_saved():
            assert time.monotonic() < deadline, "the merger never saved the run as done\n" + pipeline.service_logs()
            time.sleep(0.005)
        pipeline.kill("merger")
        before_mtz = not mtz.exists()
        pipeline.start("merger")
        ended = time.monotonic()
        update, seen = pipeline.final_merge()
        when = "before the MTZ" if before_mtz else "after the MTZ (missed the window)"
        result = audit(
            pipeline, f"kill -9 merger after run saved done, {when}", reference, seen - ended, record_row, update
        )
        assert_clean(result, update, reference)


def test_kill_the_ingest_while_a_live_run_is_written(
    tmp_path: Path, source_run: Path, reference: Reference, record_row: Callable[[Row], None]
) -> None:
    with Pipeline(tmp_path) as pipeline:
        writer = pipeline.write_live(source_run, rate=3.0)
        try:
            pipeline.wait_for(
                quietly(lambda: (m := pipeline.state.run(RUN_ID)) is not None and m.live and (m.frame_count or 0) >= 4),
                what="a live manifest of the run",
            )
            pipeline.kill("ingest")
            time.sleep(2)
            pipeline.start("ingest")
            ended = time.monotonic()
            assert writer.wait(timeout=120) == 0
        finally:
            if writer.poll() is None:
                writer.kill()
        update, seen = pipeline.final_merge()
        result = audit(pipeline, "kill -9 ingest during a live write", reference, seen - ended, record_row, update)
        assert_clean(result, update, reference)


def results_waiting_in(pipeline: Pipeline, logical_queue: str) -> list[FrameResult]:
    """The FrameResults ready on a queue (taken and returned unacknowledged: they are delivered again later)."""
    found = []
    with connect(pipeline.settings, role="test-peek") as connection:
        channel = connection.channel()
        name = Topology(pipeline.settings).name(logical_queue)
        while (raw := channel.basic_get(name, no_ack=False)) is not None:
            body = raw.body if isinstance(raw.body, bytes) else bytes(raw.body, "utf-8")
            message = decode_message(body)
            if isinstance(message, FrameResult):
                found.append(message)
        channel.close()  # every message taken is returned to the queue
    return found


def test_sigterm_every_service_mid_run(
    tmp_path: Path, source_run: Path, reference: Reference, record_row: Callable[[Row], None]
) -> None:
    with Pipeline(tmp_path) as pipeline:

        def stop_everything() -> float:
            pipeline.stop()  # SIGTERM to ingest, dispatcher and merger; the analysis job runs on
            lines = pipeline.journal().read_bytes().splitlines()
            journalled = {decode_message(line, FrameResult).key for line in lines}
            waiting = results_waiting_in(pipeline, "merger.frames")
            redelivered = [r.key for r in waiting if r.key in journalled]
            # Work finished at the stop was acked: nothing the journal holds is still waiting for the merger.
            assert not redelivered, f"results journalled but not acked at SIGTERM: {redelivered}"
            pipeline.start()
            return time.monotonic()

        update, recovery = disturbed_run(pipeline, source_run, stop_everything, start_at=8)
        result = audit(pipeline, "SIGTERM every service mid-run", reference, recovery, record_row, update)
        assert_clean(result, update, reference)
