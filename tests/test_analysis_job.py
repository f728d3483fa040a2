"""The MPI analysis job on its own: real mpiexec, broker, Redis and HDF5 file."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import kombu
import pytest

from libs.contracts.messages import FrameResult, JobSpec, RunManifest, decode_message
from libs.contracts.settings import Settings
from libs.runtime.bus import Topology, connect
from libs.runtime.state import LiveState
from tests.conftest import settings_environment

pytestmark = pytest.mark.slow  # mpiexec jobs

REPO = Path(__file__).resolve().parents[1]


def run_job(
    settings: Settings, folder: Path, run: Path, parameters: dict[str, object] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the analysis of ``run`` (run id = file stem, trial live) as the dispatcher would: mpiexec -n 2."""
    manifest = RunManifest(
        run_id=run.stem,
        files=[str(run)],
        file_format="nxmx",
        cell=(79.1, 79.1, 38.0, 90.0, 90.0, 90.0),
        space_group="P 43 21 2",
    )
    spec = folder / "spec.json"
    spec.write_bytes(
        JobSpec(job_id=f"{run.stem}.live", manifest=manifest, ranks=2, parameters=parameters or {}).encode()
    )
    mpiexec = str(Path(sys.executable).with_name("mpiexec"))
    return subprocess.run(
        [mpiexec, "-n", "2", sys.executable, "-m", "services.analysis", "--job", str(spec)],
        capture_output=True,
        text=True,
        env=settings_environment(settings),
        cwd=REPO,
        timeout=300,
    )


def test_ranks_share_the_frames_and_skip_those_already_counted(
    settings: Settings, live_state: LiveState, tmp_path: Path
) -> None:
    frames, already_counted = 10, {0, 1, 5}
    run = tmp_path / "run_j.h5"
    subprocess.run(
        [sys.executable, "-m", "sfx", "simulate", "--out", str(run), "--frames", str(frames), "--seed", "31"],
        check=True,
        capture_output=True,
        cwd=REPO,
    )
    for index in already_counted:  # as if a preempted job had published these before
        live_state.count_frame_once("run_j", "live", index)
    assert list(live_state.seen_frames("run_j", "live").nonzero()[0]) == sorted(already_counted)

    finished = run_job(settings, tmp_path, run)
    assert finished.returncode == 0, finished.stderr

    ranks = live_state.rank_status("run_j.live")
    assert sorted(ranks) == [0, 1]
    assert sum(r["skipped"] for r in ranks.values()) == len(already_counted)
    timeline = live_state.timeline("run_j.live")
    processed = sorted(entry["frame"] for entry in timeline)
    assert processed == sorted(set(range(frames)) - already_counted)  # each remaining frame once, by some rank
    assert {entry["rank"] for entry in timeline} == {0, 1}

    published: list[FrameResult] = []
    with connect(settings, role="test") as connection:
        queue = Topology(settings).queue("merger.frames")(connection.default_channel)
        while (message := queue.get(no_ack=True)) is not None:
            assert isinstance(message, kombu.Message)
            published.append(decode_message(message.body, FrameResult))
    assert sorted(r.frame_index for r in published) == processed
    assert all(r.error is None and r.job_id == "run_j.live" for r in published)


def test_resolution_limits_that_select_no_pixel_fail_the_job_on_every_rank(settings: Settings, tmp_path: Path) -> None:
    run = tmp_path / "run_r.h5"
    subprocess.run(  # at 50 mm the detector covers about 1.2–26.5 Å (the beam stop hides the lower resolutions)
        [sys.executable, "-m", "sfx", "simulate", "--out", str(run), "--frames", "1", "--distance", "50"],
        check=True,
        capture_output=True,
        cwd=REPO,
    )
    finished = run_job(settings, tmp_path, run, {"spotfinding.d_min": 40.0, "spotfinding.d_max": 50.0})
    assert finished.returncode == 3, finished.stderr
    assert "analysis job failed: run run_r, trial live: spotfinding.d_min=40 Å and d_max=50 Å select no pixel" in (
        finished.stderr
    )
    assert "this detector covers 1." in finished.stderr
