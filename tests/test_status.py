"""``sfx status`` and ``sfx jobs`` read the live state that the services write."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from libs.contracts.messages import FrameResult, JobState, JobStatus, MergeUpdate, RunManifest, ShellStatistics
from libs.contracts.settings import Settings
from libs.runtime.state import LiveState
from sfx.commands.status import slot_timeline
from tests.conftest import settings_environment


def seed_state(live_state: LiveState) -> None:
    """A live run with 10 frames analysed (4 hits), its running job started 30 s ago on slots 0-1, and a merge."""
    live_state.save_run(
        RunManifest(run_id="r0007", files=["/d/r0007.h5"], file_format="nxmx", frame_count=40, live=True)
    )
    for index in range(10):
        hit = index < 4
        live_state.count_frame_result(
            FrameResult(run_id="r0007", trial="live", frame_index=index, started_at=0, finished_at=1, hit=hit)
        )
    live_state.count_frame_result(  # a redelivery is not counted again
        FrameResult(run_id="r0007", trial="live", frame_index=3, started_at=0, finished_at=1, hit=True)
    )
    live_state.save_job(
        JobState(
            job_id="r0007.live",
            run_id="r0007",
            trial="live",
            status=JobStatus.RUNNING,
            slots=2,
            slot_ids=[0, 1],
            frames_done=10,
            started_at=time.time() - 30,
        )
    )
    overall = ShellStatistics(
        d_max=40,
        d_min=2,
        observations=900,
        unique=400,
        possible=500,
        completeness=0.8,
        multiplicity=2.25,
        mean_i_over_sigma=3.1,
        cc_half=0.912,
    )
    live_state.save_merge(MergeUpdate(dataset_id="lyso", trial="live", frames_merged=4, overall=overall))


def sfx(settings: Settings, *arguments: str) -> str:
    """Standard output of ``python -m sfx ARGUMENTS`` in the test's namespace."""
    return subprocess.run(
        [sys.executable, "-m", "sfx", *arguments],
        capture_output=True,
        text=True,
        env=settings_environment(settings),
        check=True,
    ).stdout


@pytest.mark.slow  # several sfx subprocesses (about 10 s)
def test_status_shows_runs_rates_jobs_and_merges(settings: Settings, live_state: LiveState) -> None:
    seed_state(live_state)
    # The timeline first: it is drawn relative to now, and each `sfx` start-up moves now on by a second or two.
    timeline = sfx(settings, "jobs", "--timeline", "60")
    rows = {line.split()[1]: line.split()[2] for line in timeline.splitlines() if line.startswith("slot ")}
    # The job started 30 s ago holds slots 0 and 1 for the second half of the 60 s window.
    assert set(rows) == {"0", "1"}
    assert all(row[:30].count(".") >= 29 and row[-30:].count("A") >= 29 for row in rows.values()), rows
    assert "A r0007.live (live: running)" in timeline
    assert "utilisation of the 2 reserved slots: 5" in timeline  # ~50 %

    status = sfx(settings, "status")
    run_line = next(line for line in status.splitlines() if line.startswith("r0007 "))
    assert run_line.split() == ["r0007", "40", "yes", "live", "10", "40.0%", "0.0%", "0"]
    assert "r0007.live" in status and "running" in status
    merge_line = next(line for line in status.splitlines() if line.startswith("lyso "))
    assert merge_line.split()[:6] == ["lyso", "live", "4", "80.0", "2.2", "0.912"]
    # No dispatcher runs: the reservation shown is the one the settings describe (1 node × 2 ranks).
    assert "slots: 2/2 reserved and 0/0 burst in use; 0 jobs queued" in status

    jobs = sfx(settings, "jobs")
    assert jobs.splitlines()[1].split()[:7] == ["r0007.live", "running", "live", "1", "2", "0-1", "10"]


@pytest.mark.slow  # several sfx subprocesses (about 10 s)
def test_status_and_jobs_json_hold_what_the_tables_show(settings: Settings, live_state: LiveState) -> None:
    seed_state(live_state)

    status = json.loads(sfx(settings, "status", "--json"))
    assert set(status) == {"runs", "slots", "jobs", "merges"}
    (run,) = status["runs"]
    assert run["run_id"] == "r0007"
    assert run["manifest"]["frame_count"] == 40 and run["manifest"]["live"] is True
    assert run["trials"] == [{"trial": "live", "frames": 10, "hits": 4, "indexed": 0, "failed": 0}]
    assert status["slots"] == {"reserved": 2, "reserved_in_use": 2, "burst": 0, "burst_in_use": 0, "jobs_queued": 0}
    (job,) = status["jobs"]
    assert JobState.model_validate(job) == live_state.job("r0007.live")
    (merge,) = status["merges"]
    assert merge["dataset_id"] == "lyso" and merge["overall"]["cc_half"] == 0.912

    jobs = json.loads(sfx(settings, "jobs", "--json"))
    assert set(jobs) == {"jobs"}
    assert [JobState.model_validate(job) for job in jobs["jobs"]] == live_state.jobs()

    with_timeline = json.loads(sfx(settings, "jobs", "--json", "--timeline", "60"))
    timeline = with_timeline["timeline"]
    assert timeline["reserved_slots"] == 2 and timeline["burst_slots"] == 0
    assert [(use["job_id"], use["slot_ids"]) for use in timeline["slot_uses"]] == [("r0007.live", [0, 1])]
    assert 0.3 < timeline["reserved_utilisation"] < 0.7  # held for the last ~30 s of 60


def test_slot_timeline_draws_each_job_on_its_slots_with_burst_apart() -> None:
    uses = [
        {
            "job_id": "r1.live",
            "priority": "live",
            "slot_ids": [0, 1],
            "start": 0.0,
            "end": 10.0,
            "outcome": "succeeded",
        },
        {"job_id": "r2.re", "priority": "reprocess", "slot_ids": [2], "start": 0.0, "end": 5.0, "outcome": "preempted"},
        {
            "job_id": "r3.live",
            "priority": "live",
            "slot_ids": [2, 3],
            "start": 5.0,
            "end": 10.0,
            "outcome": "succeeded",
        },
        {
            "job_id": "r2.re",
            "priority": "reprocess",
            "slot_ids": [0],
            "start": 10.0,
            "end": 20.0,
            "outcome": "succeeded",
        },
    ]
    lines = slot_timeline(uses, reserved=3, burst=1, start=0.0, end=20.0, width=20)
    rows = [line.split()[2] for line in lines if line.startswith("slot ")]
    assert rows == [
        "A" * 10 + "B" * 10,
        "A" * 10 + "." * 10,
        "B" * 5 + "C" * 5 + "." * 10,
        "." * 5 + "C" * 5 + "." * 10,
    ]
    assert any(line.strip().startswith("-") and line.endswith("burst") for line in lines)
    assert "  B r2.re (reprocess: preempted → succeeded)" in lines
