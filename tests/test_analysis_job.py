"""The MPI analysis job on its own: real mpiexec, broker, Redis and HDF5 file."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import kombu

from libs.common.bus import Topology, connect
from libs.common.messages import FrameResult, JobSpec, RunManifest, decode_message
from libs.common.settings import Settings
from libs.common.state import LiveState
from tests.conftest import settings_environment

REPO = Path(__file__).resolve().parents[1]


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

    manifest = RunManifest(
        run_id="run_j",
        files=[str(run)],
        file_format="nxmx",
        cell=(79.1, 79.1, 38.0, 90.0, 90.0, 90.0),
        space_group="P 43 21 2",
    )
    spec = tmp_path / "spec.json"
    spec.write_bytes(JobSpec(job_id="run_j.live", manifest=manifest, ranks=2).encode())
    mpiexec = str(Path(sys.executable).with_name("mpiexec"))
    subprocess.run(
        [mpiexec, "-n", "2", sys.executable, "-m", "services.analysis", "--job", str(spec)],
        check=True,
        capture_output=True,
        env=settings_environment(settings),
        cwd=REPO,
        timeout=300,
    )

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
