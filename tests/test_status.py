"""``sfx status`` and ``sfx jobs`` read the live state that the services write."""

from __future__ import annotations

import subprocess
import sys

from libs.common.messages import FrameResult, JobState, JobStatus, MergeUpdate, RunManifest, ShellStatistics
from libs.common.settings import Settings
from libs.common.state import LiveState
from tests.conftest import settings_environment


def test_status_shows_runs_rates_jobs_and_merges(settings: Settings, live_state: LiveState) -> None:
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
        JobState(job_id="r0007.live", run_id="r0007", trial="live", status=JobStatus.RUNNING, slots=2, frames_done=10)
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

    environment = settings_environment(settings)
    status = subprocess.run(
        [sys.executable, "-m", "sfx", "status"], capture_output=True, text=True, env=environment, check=True
    ).stdout
    run_line = next(line for line in status.splitlines() if line.startswith("r0007 "))
    assert run_line.split() == ["r0007", "40", "yes", "live", "10", "40.0%", "0.0%", "0"]
    assert "r0007.live" in status and "running" in status
    merge_line = next(line for line in status.splitlines() if line.startswith("lyso "))
    assert merge_line.split()[:6] == ["lyso", "live", "4", "80.0", "2.2", "0.912"]

    jobs = subprocess.run(
        [sys.executable, "-m", "sfx", "jobs"], capture_output=True, text=True, env=environment, check=True
    ).stdout
    assert jobs.splitlines()[1].split()[:4] == ["r0007.live", "running", "2", "10"]
