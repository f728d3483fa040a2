"""Live state on the real Redis: count once, exact totals under concurrent writers, heartbeats that expire."""

from __future__ import annotations

import multiprocessing
import threading
from typing import Any

import kombu
import pytest

from libs.contracts.messages import FrameResult, JobState, JobStatus, RunManifest, ServiceHeartbeat
from libs.contracts.settings import Settings
from libs.runtime.bus import Consumer, Topology, running
from libs.runtime.heartbeat import Heartbeat
from libs.runtime.state import Keys, LiveState
from libs.simulator.results import make_frame_result
from sfx.cli import main as sfx_main
from tests.support.waiting import wait_for as wait_until


def result(frame_index: int, *, hit: bool = True, error: str | None = None) -> FrameResult:
    # A colon inside an id must not be taken for a key separator.
    return make_frame_result(frame_index, run_id="r:1", finished_at=1.0, hit=hit, error=error)


def test_keys_are_namespaced_and_escape_separators() -> None:
    keys = Keys("sfx")
    assert keys.counters("r0042", "live") == "sfx:run:r0042:live:counters"
    assert keys.seen("r:1", "live") == "sfx:seen:r%3A1:live"
    assert keys.service("merger", "host-1") == "sfx:service:merger:host-1"


def test_a_redelivered_frame_is_counted_once(live_state: LiveState, settings: Settings) -> None:
    assert live_state.count_frame_result(result(7)) is True
    assert live_state.count_frame_result(result(7)) is False  # the redelivery
    assert live_state.count_frame_result(result(8, hit=False, error="unreadable frame")) is True
    assert live_state.counters("r:1", "live") == {"frames": 2, "hits": 1, "indexed": 0, "failed": 1, "reflections": 0}
    assert live_state.frames_seen("r:1", "live") == 2
    assert live_state.was_seen("r:1", "live", 7) and not live_state.was_seen("r:1", "live", 9)
    assert live_state.trials("r:1") == ["live"]
    assert live_state.runs() == ["r:1"]
    ttl = live_state.redis.ttl(live_state.keys.counters("r:1", "live"))
    assert 0 < ttl <= settings.state_ttl_seconds  # type: ignore[operator]
    with pytest.raises(ValueError, match="frame_index -1 of run r:1"):
        live_state.count_frame_once("r:1", "live", -1)


def test_latest_messages_are_stored_and_read_back(live_state: LiveState) -> None:
    manifest = RunManifest(run_id="r2", files=["/data/r2.h5"], file_format="nxmx", frame_count=100)
    live_state.save_run(manifest)
    live_state.save_job(JobState(job_id="j1", run_id="r2", trial="live", status=JobStatus.RUNNING))
    assert live_state.run("r2") == manifest
    job = live_state.job("j1")
    assert job is not None and job.status is JobStatus.RUNNING
    assert live_state.run("absent") is None


def count_frames_in_process(settings_json: str, frames: int, increments: int, queue: Any) -> None:
    """One writer process: counts every frame once (racing the others) and bumps a plain counter."""
    state = LiveState(Settings.model_validate_json(settings_json))
    new = sum(state.count_frame_once("race", "live", i, {"frames": 1, "hits": i % 2}) for i in range(frames))
    for _ in range(increments):
        state.increment("race", "live", "bytes", 3)
    queue.put(new)


@pytest.mark.slow  # processes writing at once, ~6 s
def test_concurrent_writers_give_exact_totals(live_state: LiveState, settings: Settings) -> None:
    writers, frames, increments = 3, 1500, 500
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    processes = [
        context.Process(target=count_frames_in_process, args=(settings.model_dump_json(), frames, increments, results))
        for _ in range(writers)
    ]
    # threads of this process race the processes on the same frames
    thread_new: list[int] = []

    def count_in_thread() -> None:
        thread_new.append(
            sum(live_state.count_frame_once("race", "live", i, {"frames": 1, "hits": i % 2}) for i in range(frames))
        )

    threads = [threading.Thread(target=count_in_thread) for _ in range(2)]
    for worker in [*processes, *threads]:
        worker.start()
    for thread in threads:
        thread.join(60)
    for process in processes:
        process.join(60)
        assert process.exitcode == 0
    process_new = [results.get(timeout=5) for _ in processes]

    counters = live_state.counters("race", "live")
    assert counters["frames"] == frames  # each frame counted by exactly one writer
    assert counters["hits"] == frames // 2
    assert sum(process_new) + sum(thread_new) == frames
    assert live_state.frames_seen("race", "live") == frames
    assert counters["bytes"] == writers * increments * 3


def test_heartbeat_lists_a_live_service_and_forgets_it_when_it_stops(
    cli_environment: Settings, scratch_queues: list[kombu.Queue], capsys: Any
) -> None:
    settings = cli_environment
    state = LiveState(settings)
    beats = Topology(settings).work_queue("beats", "control", ["heartbeat.#"])
    scratch_queues.append(beats)
    received: list[ServiceHeartbeat] = []
    subscriber = Consumer(beats, ServiceHeartbeat, received.append, settings=settings)
    with running(subscriber):
        with Heartbeat("merger", instance="m-1", settings=settings, details=lambda: {"frames": 3}):
            wait_until(lambda: sum(b.status == "running" for b in received) >= 2, 10, "two beats on the bus")
            (alive,) = state.live_services()
            assert (alive.service, alive.instance, alive.details) == ("merger", "m-1", {"frames": 3})
            ttl = state.redis.ttl(state.keys.service("merger", "m-1"))
            assert 0 < ttl <= 2  # type: ignore[operator]  # three periods of 0.5 s
            assert sfx_main(["services"]) == 0
            assert "merger" in capsys.readouterr().out
        assert state.live_services() == []  # gone as soon as it stopped
        wait_until(lambda: received[-1].status == "stopping", 5, "the last beat")
    statuses = [b.status for b in received]
    assert statuses[0] == "starting" and statuses.count("running") >= 2 and statuses[-1] == "stopping"
