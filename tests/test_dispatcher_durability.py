"""The dispatcher's own records: it survives an emptied Redis, a broker outage between save and publish, and a live
run that grows after its job ended. Real mpiexec jobs, real broker, Redis and files; the dispatcher runs in-process
so a test can drop it (as a crash would) and build a new one."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import kombu
import pytest

from libs.contracts.messages import FrameResult, JobSpec, JobState, JobStatus, RunManifest, decode_message
from libs.contracts.settings import Settings
from libs.runtime.state import LiveState
from services.dispatcher.backends import make_backend
from services.dispatcher.records import JobRecord
from services.dispatcher.service import Dispatcher
from tests.conftest import wait_until
from tests.support.faults import relay_for
from tests.support.namespace import listening
from tests.support.runs import Runs, write_runs

pytestmark = pytest.mark.slow  # mpiexec jobs

CELL = (79.1, 79.1, 38.0, 90.0, 90.0, 90.0)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Runs:
    return write_runs(tmp_path_factory.mktemp("runs"))


@pytest.fixture
def dispatcher_settings(settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    chosen = settings.model_copy(update={"work_dir": tmp_path / "work", "job_retry_backoff_seconds": 3600})
    for name, value in {**chosen.to_environment(), "SFX_LOG_FORMAT": "json"}.items():
        monkeypatch.setenv(name, value)  # the jobs read their settings from the environment
    return chosen


@pytest.fixture
def job_states(dispatcher_settings: Settings) -> Iterator[kombu.simple.SimpleQueue]:
    with listening(dispatcher_settings, "results", "job.#", "jobs") as queue:
        yield queue


def manifest(run: Path, run_id: str, *, frames: int = 2, live: bool = True) -> RunManifest:
    return RunManifest(
        run_id=run_id,
        files=[str(run)],
        file_format="nxmx",
        frame_count=frames,
        cell=CELL,
        space_group="P 43 21 2",
        live=live,
    )


def published_state(queue: kombu.simple.SimpleQueue, job_id: str, status: JobStatus, attempt: int = 0) -> JobState:
    """The first published state of ``job_id`` with ``status`` at ``attempt`` (other states are skipped)."""
    while True:
        message = queue.get(timeout=30)
        message.ack()
        state = decode_message(message.body, JobState)
        if (state.job_id, state.status, state.attempt) == (job_id, status, attempt):
            return state


def polled(dispatcher: Dispatcher) -> Dispatcher:
    """The dispatcher after one cycle of its periodic work (the service runs one every second)."""
    dispatcher.poll()
    return dispatcher


def cancel_all(dispatcher: Dispatcher) -> None:
    for job_id in list(dispatcher.jobs):
        dispatcher._stop(job_id)


def test_after_redis_was_emptied_the_dispatcher_keeps_its_queue_and_counts_running_jobs(
    dispatcher_settings: Settings, runs: Runs
) -> None:
    first = Dispatcher(dispatcher_settings, make_backend(dispatcher_settings))
    first.handle_manifest(manifest(runs.growing, "growing"))  # starts with every slot, waits for frames
    first.handle_manifest(manifest(runs.complete, "waiting", live=False))  # no slot left: queued
    assert first.details()["slots_in_use"] == 2 and first.details()["queued_jobs"] == 1
    first.stop()
    LiveState(dispatcher_settings).delete_namespace()  # Redis restarted without persistence
    restarted = Dispatcher(dispatcher_settings, make_backend(dispatcher_settings))
    try:
        details = restarted.details()
        assert details["slots_in_use"] == 2, "a running job is no longer counted against the reservation"
        assert details["queued_jobs"] == 1, "the queue was forgotten"
        assert restarted.jobs["growing.live"].state.status is JobStatus.RUNNING
        state = LiveState(dispatcher_settings)
        saved = state.job("waiting.live")
        assert saved is not None and saved.status is JobStatus.QUEUED, "Redis did not get its jobs back"
        assert state.job_spec("growing.live") is not None
    finally:
        cancel_all(restarted)
        restarted.stop()


def test_a_state_saved_during_a_broker_outage_is_published_when_the_broker_is_back(
    dispatcher_settings: Settings, runs: Runs, job_states: kombu.simple.SimpleQueue
) -> None:
    with relay_for(dispatcher_settings.amqp_url) as relay:
        through = dispatcher_settings.model_copy(
            update={"amqp_url": relay.url(dispatcher_settings.amqp_url), "broker_outage_seconds": 0.5}
        )
        dispatcher = Dispatcher(through, make_backend(through))
        try:
            dispatcher.handle_manifest(manifest(runs.growing, "outage"))
            relay.cut()
            job = dispatcher.jobs["outage.live"]
            dispatcher._stop("outage.live")
            dispatcher._attempt_failed(job, "stopped by the test", started=False)  # saved, its publish fails
            record = dispatcher.records.get("outage.live")
            assert record is not None and not record.published and record.state.attempt == 1
            relay.restore()
            dispatcher.poll()  # the outbox is flushed first
            record = dispatcher.records.get("outage.live")
            assert record is not None and record.published
            assert "stopped by the test" in published_state(job_states, "outage.live", JobStatus.QUEUED, 1).reason
        finally:
            cancel_all(dispatcher)
            dispatcher.stop()


def test_a_live_run_that_grows_after_its_job_ended_is_processed_again(
    dispatcher_settings: Settings, runs: Runs, job_states: kombu.simple.SimpleQueue
) -> None:
    dispatcher = Dispatcher(dispatcher_settings, make_backend(dispatcher_settings))
    try:
        first = manifest(runs.complete, "paused", frames=2)
        spec = JobSpec(job_id="paused.live", manifest=first)
        ended = JobState(
            job_id="paused.live", run_id="paused", trial="live", status=JobStatus.SUCCEEDED, frames_total=2
        )
        dispatcher.records.save(JobRecord(spec=spec, state=ended, published=True))  # its job ended on a timeout
        dispatcher.handle_manifest(first)
        assert "paused.live" not in dispatcher.jobs, "a finished run was processed again"
        dispatcher.handle_manifest(manifest(runs.complete, "paused", frames=5))
        assert "paused.live" in dispatcher.jobs, "frames written after the job ended were never processed"
        assert "grew to 5 frames" in published_state(job_states, "paused.live", JobStatus.QUEUED).reason
    finally:
        cancel_all(dispatcher)
        dispatcher.stop()


def test_a_frame_that_kills_its_rank_on_every_attempt_is_quarantined_and_the_run_goes_on(
    dispatcher_settings: Settings, tmp_path: Path
) -> None:
    run = tmp_path / "crashy.h5"
    subprocess.run(
        [sys.executable, "-m", "sfx", "simulate", "--out", str(run), "--frames", "6", "--seed", "9"],
        check=True,
        capture_output=True,
    )
    settings = dispatcher_settings.model_copy(update={"job_max_ranks": 1, "job_retry_backoff_seconds": 0.2})
    state = LiveState(settings)
    dispatcher = Dispatcher(settings, make_backend(settings))
    poison = 3
    with listening(settings, "results", "frame.#", "frames") as frames:
        try:
            dispatcher.handle_manifest(manifest(run, "crashy", frames=6, live=False))
            for attempt in range(2):  # the frame kills its rank (as a segfault in a library would) on both attempts
                on_poison = wait_until(
                    lambda: (
                        polled(dispatcher)
                        and next((r for r in state.inflight("crashy.live").values() if r["frame"] == poison), None)
                    ),
                    120,
                    f"attempt {attempt} to reach frame {poison}",
                )
                os.kill(int(on_poison["pid"]), signal.SIGKILL)
                wait_until(
                    lambda attempt=attempt: (
                        dispatcher.poll() is None and dispatcher.jobs["crashy.live"].state.attempt == attempt + 1
                    ),
                    60,
                    f"attempt {attempt} to fail",
                )
            wait_until(
                lambda: dispatcher.poll() is None and "crashy.live" not in dispatcher.jobs, 120, "the job to end"
            )
            record = dispatcher.records.get("crashy.live")
            assert record is not None and record.state.status is JobStatus.SUCCEEDED, record
            assert record.spec is not None and record.spec.quarantined() == {poison}
            published: dict[int, list[FrameResult]] = {}
            while len(published) < 6 or poison not in published:
                message = frames.get(timeout=30)
                message.ack()
                result = decode_message(message.body, FrameResult)
                published.setdefault(result.frame_index, []).append(result)
            assert sorted(published) == list(range(6)), "a frame of the run was lost"
            (error,) = [r.error for r in published[poison] if r.error]
            assert error is not None and "quarantined" in error and "2 attempts" in error
        finally:
            cancel_all(dispatcher)
            dispatcher.stop()
