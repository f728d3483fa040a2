"""The dispatcher on the real broker, Redis, HDF5 files and mpiexec: a small reservation (4 slots + 2 burst), packing,
live-before-reprocess priority, preemption and resumption, retries of a failing job, and a dispatcher restart.

One dispatcher and one merger run for the whole module; the test stands in for ingest (it saves each run's manifest
in Redis and publishes it) so it controls when runs arrive.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from libs.contracts.costs import recent_job_ids
from libs.contracts.messages import (
    FrameResult,
    JobState,
    JobStatus,
    Priority,
    ReprocessRequest,
    RunManifest,
    decode_message,
)
from services.dispatcher.backends import BACKENDS
from services.dispatcher.scheduling import ranks_to_keep_up, reservation_from_settings, utilisation
from sfx.commands.status import slot_timeline
from tests.support.harness import SERVICE_TIMEOUT, Services

pytestmark = pytest.mark.slow  # services, mpiexec jobs, minutes

CELL = (79.1, 79.1, 38.0, 90.0, 90.0, 90.0)
SPACE_GROUP = "P 43 21 2"
FRAMES = 80
RUNS = ("sched_a", "sched_b", "sched_c", "sched_d")
SERVICES = ("dispatcher", "merger")


class Cluster(Services):
    """A dispatcher and a merger on a 4-slot reservation with 2 burst slots, plus a recorder of every JobState."""

    def __init__(self, root: Path, backend: str) -> None:
        super().__init__(
            root,
            SERVICES,
            backend=backend,
            merge_update_seconds=1.0,
            reservation_nodes=1,
            ranks_per_node=4,
            burst_slots=2,
            job_min_ranks=1,
            job_max_ranks=2,
            job_target_seconds=1.0,
            job_retries=2,
            job_retry_backoff_seconds=1.0,
        )
        self.files: dict[str, Path] = {}
        self.job_states = self.subscribe("test.job-states", JobState, "results", ["job.#"])

    def published(self, job_id: str) -> list[JobState]:
        return self.job_states.messages(lambda job: job.job_id == job_id)

    def states_of(self, job_id: str) -> list[JobStatus]:
        """The job's changes of status (progress updates within a status collapsed)."""
        changes: list[JobStatus] = []
        for job in self.published(job_id):
            if not changes or changes[-1] is not job.status:
                changes.append(job.status)
        return changes

    def starts(self, job_id: str) -> list[float]:
        """Distinct start times of the job's attempts."""
        return sorted({job.started_at for job in self.published(job_id) if job.started_at is not None})

    def manifest(self, run_id: str) -> RunManifest:
        return RunManifest(
            run_id=run_id,
            files=[str(self.files[run_id])],
            file_format="nxmx",
            frame_count=FRAMES,
            sample="lyso-scheduling",
            cell=CELL,
            space_group=SPACE_GROUP,
            live=False,
        )

    def announce(self, *run_ids: str) -> None:
        """What ingest does when a run lands: its manifest goes to Redis and onto the bus."""
        manifests = [self.manifest(run_id) for run_id in run_ids]
        for manifest in manifests:
            self.state.save_run(manifest)
        self.publish(*manifests)

    def know(self, *run_ids: str) -> None:
        """Runs that landed earlier: their manifests are in Redis (reprocessing needs them), no new live job."""
        for run_id in run_ids:
            self.state.save_run(self.manifest(run_id))

    def two_running_one_queued(self, trial: str, run_ids: list[str]) -> list[str]:
        """Reprocess three runs: two jobs fill the 4 reserved slots (and publish frames), the third waits."""
        self.know(*run_ids)
        jobs = [f"{run_id}.{trial}" for run_id in run_ids]
        self.publish(ReprocessRequest(run_ids=run_ids, trial=trial))
        self.wait_for(
            lambda: (
                all(self.frames_published(job) >= 2 for job in jobs[:2])
                and (job := self.job(jobs[2])) is not None
                and job.status is JobStatus.QUEUED
            ),
            what="two jobs running and publishing, one queued",
        )
        return jobs

    def job(self, job_id: str) -> JobState | None:
        return self.state.job(job_id)

    def wait_status(self, job_id: str, *statuses: JobStatus, timeout: float = SERVICE_TIMEOUT) -> JobState:
        """Wait until the job's state in Redis is one of ``statuses`` and the recorder has received that state too
        (the dispatcher saves a state before it publishes it)."""

        def reached() -> bool:
            job = self.job(job_id)
            return job is not None and job.status in statuses and job.status in self.states_of(job_id)

        self.wait_for(reached, timeout, what=f"{job_id} in {[s.value for s in statuses]}")
        job = self.job(job_id)
        assert job is not None
        return job

    def frames_published(self, job_id: str) -> int:
        return sum(int(rank.get("frames", 0)) for rank in self.state.rank_status(job_id).values())

    def counted(self, run_id: str, trial: str) -> tuple[int, int]:
        """(frames in the counters, frames marked in the count-once bitmap)."""
        return self.state.counters(run_id, trial)["frames"], int(self.state.seen_frames(run_id, trial).sum())


# Every registered backend runs the same suite: a new backend is tested by registering it.
@pytest.fixture(scope="module", params=sorted(BACKENDS))
def cluster(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with Cluster(tmp_path_factory.mktemp(f"dispatcher-{request.param}"), backend=request.param) as cluster:
        data = cluster.root / "data"
        data.mkdir()

        def simulate(seed_and_run: tuple[int, str]) -> None:
            seed, run_id = seed_and_run
            cluster.files[run_id] = cluster.simulate(data / f"{run_id}.h5", FRAMES, seed, "--truth", "frames")

        with ThreadPoolExecutor(2) as pool:
            list(pool.map(simulate, enumerate(RUNS, start=40)))
        yield cluster


def test_small_reservation_packs_runs_serves_live_first_and_preempts_reprocessing(cluster: Cluster) -> None:
    reservation = reservation_from_settings(cluster.settings)
    began = time.time()
    a, b, c, d = RUNS
    # Two complete runs arrive: both run at once, two ranks each, filling the 4 reserved slots.
    cluster.announce(a, b)
    cluster.wait_for(lambda: all(cluster.states_of(f"{r}.live") for r in (a, b)), what="both live jobs running")
    # An operator asks to reprocess both while they run: reprocessing waits for reserved slots, although the
    # 2 burst slots are free (the burst is for live data only).
    cluster.publish(ReprocessRequest(run_ids=[a, b], trial="strict", parameters={"spotfinding.sigma_strong": 4.0}))
    # Once both reprocessing jobs are under way, two more live runs arrive: one gets the burst slots, the
    # other the slots of the youngest reprocessing job, which is preempted.
    cluster.wait_for(
        lambda: min(cluster.frames_published(f"{r}.strict") for r in (a, b)) >= 8,
        what="both reprocessing jobs publishing frames",
    )
    cluster.announce(c, d)
    for job_id in (f"{c}.live", f"{d}.live", f"{a}.strict", f"{b}.strict"):
        cluster.wait_status(job_id, JobStatus.SUCCEEDED, JobStatus.FAILED)
    ended = time.time()

    statuses = {job_id: cluster.states_of(job_id) for job_id in (f"{a}.strict", f"{b}.strict")}
    preempted = [job_id for job_id, seen in statuses.items() if JobStatus.PREEMPTED in seen]
    assert preempted == [f"{b}.strict"], statuses  # the youngest reprocessing job, and only it
    assert statuses[f"{b}.strict"][-3:] == [JobStatus.PREEMPTED, JobStatus.RUNNING, JobStatus.SUCCEEDED]
    for job_id in (f"{a}.live", f"{b}.live", f"{c}.live", f"{d}.live", f"{a}.strict", f"{b}.strict"):
        final = cluster.job(job_id)
        assert final is not None and final.status is JobStatus.SUCCEEDED, (job_id, final)
        assert final.frames_total == FRAMES and final.attempt == 0

    # The merger counts frames as it consumes them: wait for its final merges, then every frame was counted once.
    for trial, runs in (("strict", {a, b}), ("live", set(RUNS))):
        cluster.wait_for(
            lambda trial=trial, runs=runs: any(  # type: ignore[misc]
                u.trial == trial and u.final and runs <= set(u.run_ids) for u in cluster.state.merges()
            ),
            what=f"the final merge of the {trial} trial",
        )
    merged = [u for u in cluster.state.merges() if u.trial == "strict"]
    assert merged[0].mtz_path is not None
    journal = Path(merged[0].mtz_path).parent / "results.jsonl"
    keys = [decode_message(line, FrameResult).key for line in journal.read_bytes().splitlines()]
    assert len(keys) == len(set(keys)) == 2 * FRAMES

    # The resumed attempt skipped what its first attempt had published; together they covered each frame once.
    ranks = cluster.state.rank_status(f"{b}.strict").values()
    skipped = sum(int(rank["skipped"]) for rank in ranks)
    assert 0 < skipped < FRAMES and sum(int(rank["frames"]) for rank in ranks) + skipped == FRAMES
    for run_id in RUNS:
        assert cluster.counted(run_id, "live") == (FRAMES, FRAMES)
    for run_id in (a, b):
        assert cluster.counted(run_id, "strict") == (FRAMES, FRAMES)

    # The slot history: never beyond 4 reserved + 2 burst, reprocessing never beyond the 4 reserved slots,
    # several jobs at once, and the live runs started before the preempted job resumed.
    history = [use for use in cluster.state.slot_history() if use["start"] >= began - 1]
    moments = sorted({use["start"] for use in history} | {use["end"] for use in history})
    most_jobs = 0
    for moment in moments:
        holding = [use for use in history if use["start"] <= moment < use["end"]]
        slots = [slot for use in holding for slot in use["slot_ids"]]
        assert len(slots) == len(set(slots)) <= reservation.capacity, holding
        assert sum(len(use["slot_ids"]) for use in holding if use["priority"] == Priority.REPROCESS) <= 4
        most_jobs = max(most_jobs, len(holding))
    assert most_jobs >= 3
    first_strict_start = min(use["start"] for use in history if use["job_id"].endswith(".strict"))
    assert first_strict_start >= min(use["end"] for use in history if use["job_id"] in (f"{a}.live", f"{b}.live"))
    resumed = max(use["start"] for use in history if use["job_id"] == f"{b}.strict")
    assert resumed >= max(use["start"] for use in history if use["job_id"] in (f"{c}.live", f"{d}.live"))
    burst_used = any(slot >= reservation.slots for use in history for slot in use["slot_ids"])
    assert burst_used

    # While the live jobs held the reserved slots the reprocessing jobs waited, with the burst slots free.
    waits = [job.reason for job in cluster.published(f"{a}.strict") if job.status is JobStatus.QUEUED]
    assert any("never uses the burst" in reason for reason in waits), waits

    timeline = [(u["job_id"], len(u["slot_ids"]), u["start"], u["end"]) for u in history]
    print()
    print("\n".join(slot_timeline(history, reservation.slots, reservation.burst_slots, began, ended)))
    used = utilisation(timeline, reservation.slots, began, ended)
    print(f"utilisation of the {reservation.slots} reserved slots over {ended - began:.0f} s: {used:.1%}")


def test_a_failing_job_is_retried_with_backoff_then_reported_failed(cluster: Cluster) -> None:
    run_id = RUNS[0]
    job_id = f"{run_id}.nopixels"
    # Valid parameters, but a resolution range no pixel of this detector covers (the beam stop hides d > 53 Å):
    # the analysis exits with an error.
    request = ReprocessRequest(
        run_ids=[run_id], trial="nopixels", parameters={"spotfinding.d_min": 60.0, "spotfinding.d_max": 90.0}
    )
    cluster.know(run_id)
    cluster.publish(request)
    final = cluster.wait_status(job_id, JobStatus.FAILED, timeout=120)
    attempts = cluster.settings.job_retries + 1
    assert final.attempt == attempts
    assert f"failed {attempts} of {attempts} attempts" in final.reason
    assert "spotfinding.d_min" in final.reason and "exit code 3" in final.reason
    seen = cluster.published(job_id)
    starts = list({job.started_at: job for job in seen if job.status is JobStatus.RUNNING}.values())
    retries = [job for job in seen if job.status is JobStatus.QUEUED and job.retry_at is not None]
    assert len(starts) == attempts and len(retries) == attempts - 1
    # Each retry waited for its backoff (1 s, then 2 s) before it started again.
    for retry, start in zip(retries, starts[1:], strict=True):
        assert start.started_at is not None and retry.retry_at is not None
        assert start.started_at >= retry.retry_at
        assert "retry in" in retry.reason and "spotfinding.d_min" in retry.reason
    assert retries[1].retry_at - retries[1].updated_at > retries[0].retry_at - retries[0].updated_at  # type: ignore[operator]
    assert cluster.counted(run_id, "nopixels") == (0, 0)


def test_restarting_the_dispatcher_neither_loses_nor_repeats_a_job(cluster: Cluster) -> None:
    a, b, c, _ = RUNS
    jobs = cluster.two_running_one_queued("restart", [b, c, a])
    # The dispatcher dies hard (SIGKILL: no chance to save anything) and comes back.
    cluster.kill("dispatcher")
    cluster.start("dispatcher")
    for job_id in jobs:
        final = cluster.wait_status(job_id, JobStatus.SUCCEEDED, JobStatus.FAILED)
        assert final.status is JobStatus.SUCCEEDED and final.frames_total == FRAMES, final
    for job_id in jobs:
        # Started exactly once: the running jobs were adopted, the queued one started by the new dispatcher.
        assert len(cluster.starts(job_id)) == 1, cluster.published(job_id)
        log = (cluster.settings.work_dir / "jobs" / job_id / "job.log").read_text()
        assert log.count('"job finished"') == 1
    for run_id in (a, b, c):  # the merger counts as it consumes: wait for it to catch up
        cluster.wait_for(
            lambda run_id=run_id: cluster.counted(run_id, "restart")[0] >= FRAMES,  # type: ignore[misc]
            what=f"{run_id} counted",
        )
        assert cluster.counted(run_id, "restart") == (FRAMES, FRAMES)


def test_sfx_cancel_stops_a_running_and_a_queued_job_for_good(cluster: Cluster) -> None:
    a, b, c, d = RUNS
    running_job, other, queued_job = cluster.two_running_one_queued("cancel", [a, b, c])
    # The queued job first: cancelling the running one first would free slots the queued one would then take.
    result = cluster.sfx("cancel", queued_job, running_job)
    assert result.returncode == 0, result.stderr
    for job_id in (running_job, queued_job):
        final = cluster.wait_status(job_id, JobStatus.CANCELLED, JobStatus.FAILED, JobStatus.SUCCEEDED)
        assert final.status is JobStatus.CANCELLED and "cancelled by" in final.reason, final
    assert cluster.wait_status(other, JobStatus.SUCCEEDED, JobStatus.FAILED).status is JobStatus.SUCCEEDED
    # A retry or a late start would show by the time a job requested after the cancellations has run: queued
    # reprocessing jobs start oldest first, so the cancelled queued job, were it still startable, would start before
    # it, and a retry of the cancelled running job would fall due (backoff 1 s) while it ran beside free slots.
    cancelled_at = max(job.updated_at for job in cluster.published(running_job) + cluster.published(queued_job))
    cluster.know(d)
    cluster.publish(ReprocessRequest(run_ids=[d], trial="after-cancel"))
    marker = cluster.wait_status(f"{d}.after-cancel", JobStatus.SUCCEEDED, JobStatus.FAILED)
    assert marker.updated_at >= cancelled_at + cluster.settings.job_retry_backoff_seconds, "the marker was too quick"
    assert cluster.states_of(running_job)[-2:] == [JobStatus.RUNNING, JobStatus.CANCELLED]
    assert JobStatus.RUNNING not in cluster.states_of(queued_job)
    assert cluster.counted(c, "cancel") == (0, 0)
    assert cluster.counted(a, "cancel")[0] < FRAMES
    # Nothing of the cancelled job is left running.
    assert not (cluster.settings.work_dir / "jobs" / running_job / "pid").exists()

    ended = cluster.sfx("cancel", running_job)
    assert ended.returncode == 2 and f"job {running_job} has already ended (cancelled)" in ended.stderr
    unknown = cluster.sfx("cancel", "no_such_run.live")
    assert unknown.returncode == 2 and "job no_such_run.live is unknown" in unknown.stderr


def test_sfx_plan_uses_the_measured_per_frame_costs(cluster: Cluster) -> None:
    cluster.know(RUNS[3])
    if not any(job.status is JobStatus.SUCCEEDED and job.frames_done for job in cluster.state.jobs()):
        cluster.announce(RUNS[3])
        cluster.wait_status(f"{RUNS[3]}.live", JobStatus.SUCCEEDED)
    costs = cluster.state.measured_frame_costs(recent_job_ids(cluster.state.jobs()))
    assert costs is not None and 0 < costs.blank_seconds < costs.hit_seconds < 10

    result = cluster.sfx("plan", "--rate", "120", "--hit-fraction", "0.3", "--frames", "12000")
    assert result.returncode == 0, result.stderr
    expected = ranks_to_keep_up(120, 0.3, costs.blank_seconds, costs.hit_seconds)
    assert f"keeping up with 120 Hz needs {expected} ranks" in result.stdout, result.stdout
    assert "4 slots + 2 burst; one job gets 1–2 ranks" in result.stdout
    seconds = 12000 * costs.per_frame(0.3) / 2
    assert f"takes {seconds:.0f} s to process on 2 ranks" in result.stdout, result.stdout

    given = cluster.sfx("plan", "--rate", "100", "--hit-fraction", "0.5", "--frames", "1000", "--costs", "0.02", "0.1")
    assert "keeping up with 100 Hz needs 6 ranks (2 nodes of 4)" in given.stdout, given.stdout
    assert "does NOT keep up: one job gets at most 2 ranks" in given.stdout
    assert "takes 30 s to process on 2 ranks" in given.stdout
    wrong = cluster.sfx("plan", "--rate", "100", "--hit-fraction", "1.5", "--frames", "1000")
    assert wrong.returncode == 2 and "--hit-fraction must lie between 0 and 1, got 1.5" in wrong.stderr
