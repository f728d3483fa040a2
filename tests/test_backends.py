"""The contract every dispatcher backend keeps, run on each registered backend with real jobs (mpiexec, HDF5 files,
broker and Redis): start and poll to success, cancel, failure with its error, and adoption by a new instance (what
a restarted dispatcher relies on). A new backend added to ``BACKENDS`` runs this suite unchanged.

The jobs read their settings from the environment, which every backend passes on to them.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from libs.contracts.messages import JobSpec, RunManifest
from libs.contracts.settings import Settings
from libs.runtime.state import LiveState
from services.dispatcher.backends import (
    BACKENDS,
    Backend,
    BackendJobStatus,
    RunState,
    UnknownBackendError,
    make_backend,
)
from services.dispatcher.backends.local import LocalMpiBackend, process_start_time
from tests.conftest import wait_until
from tests.support.runs import Runs, write_runs

pytestmark = pytest.mark.slow  # mpiexec jobs, about a minute

REPO = Path(__file__).resolve().parents[1]
JOB_TIMEOUT = 120.0  # mpiexec, interpreter start and the analysis of two frames
CELL = (79.1, 79.1, 38.0, 90.0, 90.0, 90.0)
SPACE_GROUP = "P 43 21 2"


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Runs:
    return write_runs(tmp_path_factory.mktemp("runs"))


@pytest.fixture(params=sorted(BACKENDS))
def backend_settings(
    request: pytest.FixtureRequest, settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Settings:
    """The test's namespace with the backend under test; the environment that backends pass on to their jobs."""
    chosen = settings.model_copy(update={"backend": request.param, "work_dir": tmp_path / "work"})
    for name, value in {**chosen.to_environment(), "SFX_LOG_FORMAT": "json"}.items():
        monkeypatch.setenv(name, value)
    return chosen


@pytest.fixture
def backend(backend_settings: Settings) -> Iterator[Backend]:
    made = make_backend(backend_settings)
    yield made
    for job_id, status in made.poll().items():  # no job outlives its test
        if status.state is RunState.RUNNING:
            made.cancel(job_id)


def job_spec(job_id: str, run: Path, *, live: bool = False, known_sample: bool = True, ranks: int = 1) -> JobSpec:
    manifest = RunManifest(
        run_id=run.stem,
        files=[str(run)],
        file_format="nxmx",
        frame_count=2 if not live else 1000,
        cell=CELL if known_sample else None,
        space_group=SPACE_GROUP if known_sample else None,
        live=live,
    )
    return JobSpec(job_id=job_id, manifest=manifest, ranks=ranks)


def wait_for_state(backend: Backend, job_id: str, state: RunState) -> BackendJobStatus:
    def reached() -> BackendJobStatus | None:
        status = backend.poll().get(job_id)
        assert status is None or status.state in (RunState.RUNNING, state), status
        return status if status is not None and status.state is state else None

    return wait_until(reached, JOB_TIMEOUT, f"job {job_id} {state.value}")


def wait_until_analysing(settings: Settings, job_id: str) -> dict[int, dict[str, object]]:
    """A rank of the job has analysed a frame (the job is past its start-up, doing its work); the ranks so far."""
    state = LiveState(settings)
    return wait_until(lambda: state.rank_status(job_id), JOB_TIMEOUT, f"a rank of {job_id} reporting")


def test_a_started_job_runs_then_succeeds_and_forget_drops_it(backend: Backend, runs: Runs) -> None:
    handle = backend.start(job_spec("done.live", runs.complete))
    assert handle
    first = backend.poll()["done.live"]
    assert (first.state, first.backend_id) == (RunState.RUNNING, handle)

    ended = wait_for_state(backend, "done.live", RunState.SUCCEEDED)
    assert (ended.backend_id, ended.exit_code) == (handle, 0)

    backend.forget("done.live")
    assert "done.live" not in backend.poll()


def test_a_cancelled_job_ends_cancelled_with_all_its_ranks(
    backend: Backend, backend_settings: Settings, runs: Runs
) -> None:
    backend.start(job_spec("growing.live", runs.growing, live=True, ranks=2))
    ranks = wait_until_analysing(backend_settings, "growing.live")  # rank 0 has both frames; rank 1 waits
    assert backend.poll()["growing.live"].state is RunState.RUNNING  # waiting for frames that never come

    backend.cancel("growing.live")
    wait_for_state(backend, "growing.live", RunState.CANCELLED)
    for rank in ranks.values():
        if rank["host"] == os.uname().nodename:
            assert not Path(f"/proc/{rank['pid']}").exists(), f"rank {rank} outlived the cancel"

    backend.cancel("growing.live")  # cancelling an ended job is no error and changes nothing
    assert backend.poll()["growing.live"].state is RunState.CANCELLED


def test_a_failed_job_polls_as_failed_with_its_error(backend: Backend, runs: Runs) -> None:
    backend.start(job_spec("unknown.live", runs.complete, known_sample=False))

    failed = wait_for_state(backend, "unknown.live", RunState.FAILED)
    assert failed.exit_code not in (None, 0)
    assert "has no known cell and space group" in failed.detail


def test_a_new_instance_adopts_the_jobs_of_the_previous_one(
    backend: Backend, backend_settings: Settings, runs: Runs
) -> None:
    handle = backend.start(job_spec("adopted.live", runs.growing, live=True))
    backend.start(job_spec("finished.live", runs.complete))
    wait_for_state(backend, "finished.live", RunState.SUCCEEDED)

    restarted = make_backend(backend_settings)  # what a restarted dispatcher builds
    seen = restarted.poll()
    assert (seen["adopted.live"].state, seen["adopted.live"].backend_id) == (RunState.RUNNING, handle)
    assert seen["finished.live"].state is RunState.SUCCEEDED

    restarted.cancel("adopted.live")
    wait_for_state(restarted, "adopted.live", RunState.CANCELLED)
    assert backend.poll()["adopted.live"].state is RunState.CANCELLED


def test_an_unknown_backend_name_is_refused_naming_the_setting_and_the_known_ones(tmp_path: Path) -> None:
    with pytest.raises(UnknownBackendError) as refused:
        make_backend(Settings(backend="nosuch", work_dir=tmp_path))
    assert str(refused.value) == f"SFX_BACKEND='nosuch' is not a known backend (known: {', '.join(sorted(BACKENDS))})"


# -- the local backend's own view of its jobs ---------------------------------------------------------------------


@pytest.fixture
def stranger() -> Iterator[subprocess.Popen[bytes]]:
    """A process that is not a job, in a group of its own, as one that was given a dead job's pid would be."""
    process = subprocess.Popen(["sleep", "300"], start_new_session=True)
    yield process
    process.kill()
    process.wait()


def record_job(backend: LocalMpiBackend, job_id: str, pid: int, start_time: int | None) -> None:
    """The files a job started by an earlier backend leaves (an older one wrote no start time)."""
    folder = backend.job_dir(job_id)
    folder.mkdir(parents=True)
    if start_time is not None:
        (folder / "pid_start_time").write_text(str(start_time))
    (folder / "pid").write_text(str(pid))


def test_a_job_whose_pid_now_names_another_process_is_lost_and_not_signalled(
    tmp_path: Path, stranger: subprocess.Popen[bytes]
) -> None:
    backend = LocalMpiBackend(tmp_path)
    started = process_start_time(stranger.pid)
    assert started is not None
    record_job(backend, "reused.live", stranger.pid, started - 1)  # the job's process started earlier: not this one
    record_job(backend, "same.live", stranger.pid, started)
    record_job(backend, "older.live", stranger.pid, None)

    seen = backend.poll()
    assert seen["reused.live"].state is RunState.LOST
    assert seen["same.live"].state is RunState.RUNNING
    assert seen["older.live"].state is RunState.RUNNING  # nothing but the pid to go by

    backend.cancel("reused.live")
    assert stranger.poll() is None, "cancel signalled a process that is not the job's"
    assert backend.poll()["reused.live"].state is RunState.LOST


def test_a_job_whose_process_is_gone_is_lost(tmp_path: Path) -> None:
    ended = subprocess.Popen(["true"])
    ended.wait()
    backend = LocalMpiBackend(tmp_path)
    record_job(backend, "gone.live", ended.pid, None)

    assert backend.poll()["gone.live"].state is RunState.LOST
    backend.cancel("gone.live")  # nothing left to stop: no error
    assert backend.poll()["gone.live"].state is RunState.LOST
