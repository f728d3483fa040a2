"""The merger loses nothing when its disk, its process or Redis fails: journal first, durable finalisation, renames.

Each test drives the merger's handlers in this process against the real Redis, broker and files, breaks one thing
the way it breaks in production, and checks what a restarted merger does.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from libs.contracts.datasets import dataset_id_for
from libs.contracts.messages import (
    FrameResult,
    JobState,
    JobStatus,
    MergeUpdate,
    RunManifest,
    decode_message,
)
from libs.contracts.settings import Settings
from libs.runtime.durable import Journal
from libs.runtime.state import LiveState
from services.merger.service import Merger, MergerError
from tests.support.faults import relay_for
from tests.support.merging_data import synthetic_run
from tests.support.namespace import listening

CELL = (79.1, 79.1, 38.0, 90.0, 90.0, 90.0)
FRAMES = 12


@pytest.fixture
def merger_settings(settings: Settings, tmp_path: Path) -> Settings:
    return settings.model_copy(update={"work_dir": tmp_path})


def announce(state: LiveState, run_id: str, sample: str = "lyso") -> RunManifest:
    manifest = RunManifest(
        run_id=run_id,
        files=[f"/data/{run_id}.h5"],
        file_format="nxmx",
        frame_count=FRAMES,
        sample=sample,
        cell=CELL,
        space_group="P 43 21 2",
    )
    state.save_run(manifest)
    return manifest


def results_of(run_id: str, seed: int = 0) -> list[FrameResult]:
    frames = synthetic_run(FRAMES, seed=seed, per_frame=150).frames
    return [frame.model_copy(update={"run_id": run_id, "trial": "live"}) for frame in frames]


def succeeded(run_id: str) -> JobState:
    return JobState(
        job_id=f"{run_id}.live", run_id=run_id, trial="live", status=JobStatus.SUCCEEDED, frames_total=FRAMES
    )


def dataset_folder(settings: Settings, manifest: RunManifest) -> Path:
    return settings.work_dir / "merger" / dataset_id_for(manifest) / "live"


def test_a_frame_whose_journal_write_fails_is_not_counted(merger_settings: Settings) -> None:
    state = LiveState(merger_settings)
    manifest = announce(state, "r1")
    merger = Merger(merger_settings)
    first, second = results_of("r1")[:2]
    merger.handle_result(first)
    # The journal's place taken by a folder: every append fails, as on a full or read-only disk.
    journal = dataset_folder(merger_settings, manifest) / "results.jsonl"
    journal.unlink()
    journal.mkdir()
    with pytest.raises(OSError):
        merger.handle_result(second)
    assert state.was_seen("r1", "live", first.frame_index)
    assert not state.was_seen("r1", "live", second.frame_index), "counted although never journalled"
    journal.rmdir()
    merger.handle_result(second)  # the redelivery, once the disk is back
    assert state.frames_seen("r1", "live") == 2


def test_a_redelivered_result_already_journalled_is_counted_once(merger_settings: Settings) -> None:
    state = LiveState(merger_settings)
    announce(state, "r1")
    merger = Merger(merger_settings)
    result = results_of("r1")[0]
    merger.handle_result(result)
    state.delete_namespace()  # Redis lost the count after the journal kept the frame
    announce(state, "r1")
    merger.handle_result(result)
    merger.handle_result(result)
    assert state.counters("r1", "live")["frames"] == 1


def test_a_torn_journal_line_is_cut_and_the_next_line_stays_whole(merger_settings: Settings) -> None:
    state = LiveState(merger_settings)
    manifest = announce(state, "r1")
    results = results_of("r1")
    merger = Merger(merger_settings)
    merger.handle_result(results[0])
    journal = dataset_folder(merger_settings, manifest) / "results.jsonl"
    torn = results[1].encode()[:100]
    with journal.open("ab") as tail:
        tail.write(torn)  # a crash mid-write: never acked, so results[1] is redelivered
    restarted = Merger(merger_settings)
    restarted.handle_result(results[1])
    restarted.handle_result(results[2])
    lines = [line for _, line in Journal(journal).lines()]
    assert len(lines) == 3
    assert [FrameResult.model_validate_json(line).frame_index for line in lines] == [
        results[0].frame_index,
        results[1].frame_index,
        results[2].frame_index,
    ]
    assert len(Merger(merger_settings).datasets[(dataset_id_for(manifest), "live")].keys) == 3


@pytest.mark.slow
def test_a_merger_killed_after_acking_the_final_state_still_writes_the_mtz(merger_settings: Settings) -> None:
    state = LiveState(merger_settings)
    manifest = announce(state, "r1")
    merger = Merger(merger_settings)
    for result in results_of("r1"):
        merger.handle_result(result)
    merger.handle_job_state(succeeded("r1"))  # acked after this returns; killed before its next tick
    del merger
    restarted = Merger(merger_settings)
    restarted.tick()
    folder = dataset_folder(merger_settings, manifest)
    mtz = folder / f"{dataset_id_for(manifest)}_live.mtz"
    assert mtz.stat().st_size > 0
    assert json.loads((folder / "runs.json").read_bytes()) == {"done": {"r1": FRAMES}, "final": ["r1"]}
    assert not list(folder.glob(".*.tmp")), "a temporary file was left behind"
    update = state.merge(dataset_id_for(manifest), "live")
    assert update is not None and update.final and update.frames_merged > 0


def test_an_empty_dataset_header_does_not_stop_the_merger(merger_settings: Settings) -> None:
    state = LiveState(merger_settings)
    manifest = announce(state, "r1")
    merger = Merger(merger_settings)
    for result in results_of("r1")[:5]:
        merger.handle_result(result)
    (dataset_folder(merger_settings, manifest) / "dataset.json").write_bytes(b"")  # a full disk, the old way
    restarted = Merger(merger_settings)
    assert len(restarted.datasets[(dataset_id_for(manifest), "live")].keys) == 5


def test_after_redis_was_emptied_the_merger_recounts_its_journal_and_places_known_runs(
    merger_settings: Settings,
) -> None:
    state = LiveState(merger_settings)
    manifest = announce(state, "r1")
    results = results_of("r1")
    merger = Merger(merger_settings)
    for result in results[:4]:
        merger.handle_result(result)
    expected = state.counters("r1", "live")
    state.delete_namespace()
    restarted = Merger(merger_settings)
    assert state.counters("r1", "live") == expected, "the counts were not re-seeded from the journal"
    assert state.was_seen("r1", "live", results[3].frame_index)  # so the analysis does not redo it
    restarted.handle_result(results[4])  # its manifest is gone from Redis: the merger's own copy places it
    assert len(restarted.datasets[(dataset_id_for(manifest), "live")].keys) == 5
    assert state.frames_seen("r1", "live") == 5


@pytest.mark.slow
def test_one_dataset_that_cannot_be_written_does_not_stall_the_others(merger_settings: Settings) -> None:
    state = LiveState(merger_settings)
    broken = announce(state, "r1", sample="broken")
    healthy = announce(state, "r2", sample="healthy")
    merger = Merger(merger_settings)
    for result in results_of("r1"):
        merger.handle_result(result)
    for result in results_of("r2", seed=1):
        merger.handle_result(result)
    # The broken dataset's MTZ path is taken by a folder, so its final write fails.
    (dataset_folder(merger_settings, broken) / f"{dataset_id_for(broken)}_live.mtz").mkdir()
    merger.handle_job_state(succeeded("r1"))
    merger.handle_job_state(succeeded("r2"))
    merger.tick()
    merger.stop()
    healthy_update = state.merge(dataset_id_for(healthy), "live")
    assert healthy_update is not None and healthy_update.final
    broken_dataset = merger.datasets[(dataset_id_for(broken), "live")]
    assert "r1" not in broken_dataset.runs_final, "a failed write was recorded as written"


def test_a_running_merger_recounts_its_journal_when_redis_restarts_empty(merger_settings: Settings) -> None:
    state = LiveState(merger_settings)
    announce(state, "r1")
    merger = Merger(merger_settings)
    for result in results_of("r1")[:3]:
        merger.handle_result(result)
    expected = state.counters("r1", "live")
    state.delete_namespace()
    merger.tick()
    assert state.counters("r1", "live") == expected


def test_a_result_beyond_the_announced_frames_waits_for_a_newer_manifest(merger_settings: Settings) -> None:
    state = LiveState(merger_settings)
    manifest = announce(state, "r1")
    merger = Merger(merger_settings)
    late = results_of("r1")[0].model_copy(update={"frame_index": FRAMES})
    with pytest.raises(MergerError, match=f"frame_index {FRAMES} is beyond run r1, which has {FRAMES} frames"):
        merger.handle_result(late)  # retried later by the consumer, not merged, not counted
    assert state.frames_seen("r1", "live") == 0
    # The run grew after it was announced complete; the ingest publishes a new revision with the new count.
    state.save_run(manifest.model_copy(update={"frame_count": FRAMES + 1, "revision": 1}))
    merger.handle_result(late)
    assert state.was_seen("r1", "live", FRAMES)


@pytest.mark.slow
def test_a_final_merge_update_published_during_a_broker_outage_goes_out_when_it_is_back(
    merger_settings: Settings,
) -> None:
    state = LiveState(merger_settings)
    manifest = announce(state, "r1")
    with (
        relay_for(merger_settings.amqp_url) as relay,
        listening(merger_settings, "results", "merge.#", "merges") as updates,
    ):
        through = merger_settings.model_copy(
            update={"amqp_url": relay.url(merger_settings.amqp_url), "broker_outage_seconds": 0.5}
        )
        merger = Merger(through)
        for result in results_of("r1"):
            merger.handle_result(result)
        merger.handle_job_state(succeeded("r1"))
        relay.cut()
        merger.tick()  # the MTZ is written; its final update cannot be published
        relay.restore()
        merger.tick()
        received = decode_message(updates.get(timeout=30).body, MergeUpdate)
        while not received.final:
            received = decode_message(updates.get(timeout=30).body, MergeUpdate)
        assert received.dataset_id == dataset_id_for(manifest) and received.mtz_path is not None
        merger.stop()
