"""The dispatcher: queues analysis jobs, packs them into the experiment's reservation, preempts and retries them.

A manifest of a new run queues ``<run>.live`` (priority live); an operator's ReprocessRequest queues ``<run>.<trial>``
for each of its runs (priority reprocess) with the request's parameter overrides; a CancelRequest ends a job. Every
second, and whenever a request arrives, the dispatcher polls its backend once for all of its jobs, asks
:func:`services.dispatcher.scheduling.plan` which queued jobs start (with how many ranks) and which reprocessing jobs
give way, logs each decision with its reason, and records every change of a job: in its job record on disk
(services.dispatcher.records: the dispatcher's own durable account), in Redis (the live view), and as a published
JobState; a state whose publish was not confirmed is published again at the next poll.

A preempted job is stopped through the backend and queued again with its original queue time; its next attempt skips
the frames already counted under its trial, and the merger counts a frame once whoever publishes it. A failed attempt
is retried after a backoff that doubles, up to ``settings.job_retries`` times; then the job fails with the last error.
A restarted dispatcher rebuilds its queue from its job records (and puts them back into an emptied Redis) and adopts
the jobs its backend still runs: no job is forgotten or started twice. A live job that ended because its run stopped
growing is queued again when the run grows after all.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from libs.contracts.costs import COST_JOBS, FrameCosts, recent_job_ids
from libs.contracts.messages import (
    FINAL_STATUSES,
    CancelRequest,
    JobSpec,
    JobState,
    JobStatus,
    Priority,
    ReprocessRequest,
    RunManifest,
    now,
)
from libs.contracts.parameters import AnalysisParameters, with_overrides
from libs.contracts.settings import Settings
from libs.runtime import metrics
from libs.runtime.bus import Consumer, Publisher, PublishError, Topology, current_delivery
from libs.runtime.logging import get_logger
from libs.runtime.state import LiveState
from services.dispatcher.backends import Backend, BackendError, BackendJobStatus, RunState
from services.dispatcher.records import JobRecord, JobRecords
from services.dispatcher.scheduling import (
    PendingJob,
    ReservationExceededError,
    RunningJob,
    assign_slots,
    check_capacity,
    job_size,
    plan,
    reservation_from_settings,
)

log = get_logger(__name__)

FINAL = FINAL_STATUSES
WAITING = frozenset({JobStatus.QUEUED, JobStatus.PREEMPTED})
RUNNING = frozenset({JobStatus.STARTING, JobStatus.RUNNING})

PROGRESS_SECONDS = 5.0  # how often a running job's frame count is refreshed in Redis and published
COSTS_SECONDS = 60.0  # how often the measured per-frame cost is re-read while nothing ends
WANTED_SECONDS = 10.0  # how often a queued job's size is recomputed (its frames left and hit rate change slowly)


def job_id_for(run_id: str, trial: str) -> str:
    return f"{run_id}.{trial}"


@dataclass
class TrackedJob:
    """A job the dispatcher has not finished with: its spec (what to run) and its latest state."""

    spec: JobSpec
    state: JobState
    progress_at: float = 0.0
    wanted_ranks: int | None = None  # while queued: cached, re-sized every WANTED_SECONDS (two Redis reads)
    wanted_at: float = 0.0


class Dispatcher:
    """Handlers and periodic work of the dispatcher service. Thread-safe: one lock guards the queue and the backend."""

    def __init__(self, settings: Settings, backend: Backend) -> None:
        self.settings = settings
        self.backend = backend
        self.reservation = reservation_from_settings(settings)
        self.state = LiveState(settings)
        self.jobs: dict[str, TrackedJob] = {}
        self._lock = threading.RLock()
        self._publisher: Publisher | None = None
        self._recent: deque[str] = deque(maxlen=COST_JOBS)
        self._costs: FrameCosts | None = None
        self._costs_at = 0.0
        self.records = JobRecords(settings.work_dir / "dispatcher" / "jobs")
        self._unpublished: set[str] = set()  # jobs whose latest state is saved but not confirmed as published
        self._rebuild()

    # -- restart -----------------------------------------------------------------------------------------------

    def _rebuild(self) -> None:
        """Queue and running jobs from the job records (Redis only for jobs recorded before the records existed),
        checked against what the backend still runs; Redis gets back what it lost."""
        backend_view = self.backend.poll()
        records = {record.state.job_id: record for record in self.records.all()}
        for saved in self.state.jobs():
            if saved.job_id not in records:
                records[saved.job_id] = JobRecord(spec=self.state.job_spec(saved.job_id), state=saved, published=True)
                self.records.save(records[saved.job_id])
        self._restore_live_state(records.values())
        known = sorted((record.state for record in records.values()), key=lambda state: -state.updated_at)
        self._unpublished = {job_id for job_id, record in records.items() if not record.published}
        self._recent.extend(reversed(recent_job_ids(known)))
        for saved in known:
            if saved.status in FINAL:
                continue
            spec = records[saved.job_id].spec
            if spec is None:
                log.error("job has no spec; it cannot be restarted", job_id=saved.job_id)
                self._record(self._ended(saved, JobStatus.FAILED, "its JobSpec is missing"))
                continue
            tracked = TrackedJob(spec=spec, state=saved)
            seen = backend_view.get(saved.job_id)
            if saved.status in WAITING and seen is not None and seen.state is RunState.RUNNING:
                # Started just before the restart, before its new state reached Redis: adopt, do not start again.
                tracked.state = saved.model_copy(
                    update={"status": JobStatus.RUNNING, "slots": spec.ranks, "backend_id": seen.backend_id}
                )
            self.jobs[saved.job_id] = tracked
        for job_id in backend_view.keys() - self.jobs.keys():
            if backend_view[job_id].state is RunState.RUNNING:
                log.warning("backend runs a job the live state does not know; left alone", job_id=job_id)
        self._repair_slot_ids()
        running = [job.state.job_id for job in self.jobs.values() if job.state.status in RUNNING]
        queued = [job.state.job_id for job in self.jobs.values() if job.state.status in WAITING]
        log.info("dispatcher state rebuilt", running=running, queued=queued, reservation=self._describe_reservation())

    def _restore_live_state(self, records: Iterable[JobRecord]) -> None:
        """Put jobs back into Redis that it no longer holds (a restart without persistence)."""
        restored = 0
        for record in records:
            if self.state.job(record.state.job_id) is None:
                self.state.save_job(record.state)
                if record.spec is not None:
                    self.state.save_job_spec(record.spec)
                restored += 1
        if restored:
            log.warning("jobs put back into the live state from the job records", jobs=restored)

    def _repair_slot_ids(self) -> None:
        """Give adopted jobs whose slot numbers were not saved the lowest free ones."""
        held: list[int] = []
        needing: list[TrackedJob] = []
        for job in self.jobs.values():
            if job.state.status not in RUNNING:
                continue
            if len(job.state.slot_ids) == job.state.slots and not set(job.state.slot_ids) & set(held):
                held += job.state.slot_ids
            else:
                needing.append(job)
        for job in needing:
            slot_ids = assign_slots(held, job.state.slots, max(self.reservation.capacity, len(held) + job.state.slots))
            held += slot_ids
            job.state = job.state.model_copy(update={"slot_ids": slot_ids})
            self._record(job.state)

    # -- requests --------------------------------------------------------------------------------------------------

    def handle_manifest(self, manifest: RunManifest) -> None:
        job_id = job_id_for(manifest.run_id, "live")
        with self._lock:
            tracked = self.jobs.get(job_id)
            if tracked is not None:
                if tracked.state.status in WAITING:
                    # A queued job starts with what is known now (a complete run is sized by its frame count).
                    tracked.spec = tracked.spec.model_copy(update={"manifest": manifest})
                    tracked.wanted_ranks = None
                    self._save_spec(tracked)
                return  # a running job follows its growing files by itself
            previous = self.records.get(job_id)
            if previous is not None:
                covered = previous.state.frames_total
                grew = manifest.frame_count is not None and covered is not None and manifest.frame_count > covered
                if previous.state.status is JobStatus.SUCCEEDED and grew:
                    # The live job ended (the run stopped growing for the live timeout) and frames came after:
                    # process them; the analysis skips the frames already counted.
                    spec = JobSpec(job_id=job_id, manifest=manifest, trial="live", priority=Priority.LIVE)
                    self._queue(spec, f"run {manifest.run_id} grew to {manifest.frame_count} frames after its job")
                    self._schedule()
                else:
                    log.debug("run already processed", job_id=job_id)
                return
            spec = JobSpec(job_id=job_id, manifest=manifest, trial="live", priority=Priority.LIVE)
            self._queue(spec, f"new run {manifest.run_id} ({'live' if manifest.live else 'complete'})")
            self._schedule()

    def handle_reprocess(self, request: ReprocessRequest, sender: str | None = None) -> None:
        """Queue a job per run under the request's trial; the live trial is not touched.

        ``sender`` is the broker-checked user who published the request (None: not known), recorded in the reason.
        """
        try:
            with_overrides(AnalysisParameters(), request.parameters)
        except ValueError as error:
            log.error("reprocess request refused", trial=request.trial, error=str(error))
            for run_id in request.run_ids:
                self._refuse(run_id, request.trial, f"invalid parameters: {error}")
            return
        with self._lock:
            for run_id in request.run_ids:
                job_id = job_id_for(run_id, request.trial)
                manifest = self.state.run(run_id)
                if manifest is None:
                    log.error("reprocess request names an unknown run", run_id=run_id, trial=request.trial)
                    self._refuse(run_id, request.trial, f"run {run_id} is unknown (no manifest in Redis)")
                    continue
                if job_id in self.jobs:
                    log.warning("reprocess request repeats a queued or running job; ignored", job_id=job_id)
                    continue
                previous = self.records.get(job_id)
                if previous is not None and previous.state.status is JobStatus.SUCCEEDED:
                    log.error(
                        "reprocess request names a trial this run already has; ignored (name a new trial)",
                        job_id=job_id,
                    )
                    continue
                spec = JobSpec(
                    job_id=job_id,
                    manifest=manifest,
                    trial=request.trial,
                    parameters=request.parameters,
                    priority=Priority.REPROCESS,
                )
                self._queue(spec, f"reprocess requested by {_requester(sender)}")
            self._schedule()

    def handle_cancel(self, request: CancelRequest, sender: str | None = None) -> None:
        """End a queued or running job for good; ``sender`` as in :meth:`handle_reprocess`."""
        with self._lock:
            tracked = self.jobs.pop(request.job_id, None)
            if tracked is None:
                saved = self.state.job(request.job_id)
                log.warning(
                    "cancel request for a job that is neither queued nor running; ignored",
                    job_id=request.job_id,
                    status=saved.status.value if saved else "unknown",
                )
                return
            reason = f"cancelled by a cancel request, requested by {_requester(sender)}"
            if tracked.state.status in RUNNING:
                self._stop(request.job_id)
                tracked.state = self._with_progress(tracked.state)
                self._record_slot_use(tracked.state, "cancelled")
            log.info("job cancelled", job_id=request.job_id, reason=reason)
            self._record(self._ended(tracked.state, JobStatus.CANCELLED, reason))
            self._schedule()

    def handle_control(self, message: ReprocessRequest | CancelRequest) -> None:
        # The sender is the message's user_id, which the broker checked against the publisher's login; the body's
        # requested_by is whatever the publisher wrote, so it is never taken for who asked.
        delivery = current_delivery()
        sender = delivery.user_id if delivery is not None else None
        if isinstance(message, CancelRequest):
            self.handle_cancel(message, sender)
        else:
            self.handle_reprocess(message, sender)

    def _queue(self, spec: JobSpec, reason: str) -> None:
        state = JobState(
            job_id=spec.job_id,
            run_id=spec.manifest.run_id,
            trial=spec.trial,
            status=JobStatus.QUEUED,
            priority=spec.priority,
            queued_at=now(),
            reason=f"queued: {reason}",
        )
        self.state.save_job_spec(spec)
        self.jobs[spec.job_id] = TrackedJob(spec=spec, state=state)
        log.info("job queued", job_id=spec.job_id, priority=spec.priority.value, reason=reason)
        self._record(state)

    def _refuse(self, run_id: str, trial: str, reason: str) -> None:
        job_id = job_id_for(run_id, trial)
        with self._lock:
            previous = self.records.get(job_id)
            if job_id in self.jobs or (previous is not None and previous.state.status is JobStatus.SUCCEEDED):
                return  # a bad request must not overwrite a job that is under way or done
            state = JobState(job_id=job_id, run_id=run_id, trial=trial, status=JobStatus.FAILED, reason=reason)
            self._record(state.model_copy(update={"priority": Priority.REPROCESS}))

    # -- periodic work ---------------------------------------------------------------------------------------------

    def poll(self) -> None:
        """One backend poll for all jobs; record what ended; then schedule."""
        with self._lock:  # polled under the lock: a job started meanwhile would look lost
            self._publish_unpublished()
            statuses = self.backend.poll()
            for job_id, tracked in list(self.jobs.items()):
                if tracked.state.status not in RUNNING:
                    continue
                status = statuses.get(job_id)
                if status is None:
                    self._attempt_failed(tracked, "the backend no longer knows the job (lost)")
                elif status.state is RunState.RUNNING:
                    self._refresh_progress(tracked)
                elif status.state is RunState.SUCCEEDED:
                    self._succeeded(tracked)
                else:
                    self._attempt_failed(tracked, _failure_summary(status))
            self._schedule()
        self._export_metrics()

    def _running_jobs(self, current: float) -> list[RunningJob]:
        """The jobs holding slots, as scheduling sees them."""
        return [
            RunningJob(
                job_id=job.state.job_id,
                priority=job.state.priority,
                ranks=job.state.slots,
                started_at=job.state.started_at if job.state.started_at is not None else current,
            )
            for job in self.jobs.values()
            if job.state.status in RUNNING
        ]

    def _schedule(self) -> None:
        current = now()
        running = self._running_jobs(current)
        pending = [
            PendingJob(
                job_id=job.state.job_id,
                priority=job.state.priority,
                wanted_ranks=self._wanted_ranks(job),
                queued_at=job.state.queued_at if job.state.queued_at is not None else current,
            )
            for job in self.jobs.values()
            if job.state.status in WAITING and (job.state.retry_at is None or job.state.retry_at <= current)
        ]
        if not pending:
            return
        try:
            decision = plan(pending, running, self.reservation, current)
        except ReservationExceededError as error:
            log.error("scheduling refused: the jobs already running break the reservation", error=str(error))
            return
        for job_id in decision.preemptions:
            self._preempt(self.jobs[job_id], decision.reasons[job_id])
        for job_id, ranks in decision.starts:
            self._launch(self.jobs[job_id], ranks, decision.reasons[job_id])
        for job_id in decision.waiting:
            tracked = self.jobs[job_id]
            reason = decision.reasons[job_id]
            if _without_wait_time(reason) != _without_wait_time(tracked.state.reason):
                log.info("job waits", job_id=job_id, reason=reason)
                tracked.state = tracked.state.model_copy(update={"reason": reason})
                self._record(tracked.state)

    def _wanted_ranks(self, tracked: TrackedJob) -> int:
        """Ranks that finish the job in about settings.job_target_seconds, from the measured per-frame cost."""
        if tracked.wanted_ranks is not None and time.monotonic() - tracked.wanted_at < WANTED_SECONDS:
            return tracked.wanted_ranks
        manifest, trial = tracked.spec.manifest, tracked.spec.trial
        frames = None
        if not manifest.live and manifest.frame_count is not None:
            frames = max(0, manifest.frame_count - self.state.frames_seen(manifest.run_id, trial))
        costs = self._frame_costs()
        cost = None
        if costs is not None:
            live = self.state.counters(manifest.run_id, "live")
            hit_fraction = live["hits"] / live["frames"] if live["frames"] else None
            cost = costs.per_frame(hit_fraction)
        tracked.wanted_ranks = job_size(frames, cost, self.settings.job_target_seconds, self.reservation)
        tracked.wanted_at = time.monotonic()
        return tracked.wanted_ranks

    def _frame_costs(self) -> FrameCosts | None:
        if time.monotonic() - self._costs_at > COSTS_SECONDS:
            self._costs = self.state.measured_frame_costs(list(self._recent))
            self._costs_at = time.monotonic()
        return self._costs

    # -- transitions -----------------------------------------------------------------------------------------------

    def _launch(self, tracked: TrackedJob, ranks: int, reason: str) -> None:
        current = now()
        running = self._running_jobs(current)
        held = [slot for job in self.jobs.values() if job.state.status in RUNNING for slot in job.state.slot_ids]
        starting = RunningJob(
            job_id=tracked.state.job_id, priority=tracked.state.priority, ranks=ranks, started_at=current
        )
        try:
            # The guard, independent of plan()'s arithmetic: never submit beyond the reservation and its burst.
            check_capacity([*running, starting], self.reservation)
        except ReservationExceededError as error:
            log.error(
                "start refused by the capacity guard; the job stays queued",
                job_id=tracked.state.job_id,
                error=str(error),
            )
            return
        slot_ids = assign_slots(held, ranks, self.reservation.capacity)
        spec = tracked.spec.model_copy(update={"ranks": ranks, "attempt": tracked.state.attempt})
        self.state.clear_rank_status(spec.job_id)
        self.state.clear_inflight(spec.job_id)
        tracked.spec = spec
        self._save_spec(tracked)
        try:
            backend_id = self.backend.start(spec)
        except BackendError as error:
            self._attempt_failed(tracked, f"the {self.backend.name} backend could not start it: {error}", started=False)
            return
        tracked.state = tracked.state.model_copy(
            update={
                "status": JobStatus.RUNNING,
                "slots": ranks,
                "slot_ids": slot_ids,
                "started_at": now(),
                "retry_at": None,
                "backend_id": backend_id,
                "reason": reason,
            }
        )
        tracked.progress_at = time.monotonic()
        log.info("job started", job_id=spec.job_id, ranks=ranks, slots=slot_ids, attempt=spec.attempt, reason=reason)
        self._record(tracked.state)

    def _preempt(self, tracked: TrackedJob, reason: str) -> None:
        job_id = tracked.state.job_id
        self._stop(job_id)
        state = self._with_progress(tracked.state)
        self._record_slot_use(state, "preempted")
        tracked.wanted_ranks = None  # fewer frames are left now
        tracked.state = state.model_copy(
            update={"status": JobStatus.PREEMPTED, "slots": 0, "slot_ids": [], "started_at": None, "reason": reason}
        )
        log.info("job preempted", job_id=job_id, reason=reason)
        self._record(tracked.state)

    def _succeeded(self, tracked: TrackedJob) -> None:
        job_id = tracked.state.job_id
        state = self._with_progress(tracked.state)
        self._record_slot_use(state, "succeeded")
        # Frames covered = frames processed + frames skipped as already counted: every index of the run, once.
        final = self._ended(state, JobStatus.SUCCEEDED, "exit code 0").model_copy(
            update={"frames_total": state.frames_done}
        )
        self.backend.forget(job_id)
        del self.jobs[job_id]
        self._recent.append(job_id)
        self._costs_at = 0.0  # new timings: re-measure the per-frame cost at the next sizing
        log.info("job succeeded", job_id=job_id, frames=state.frames_done)
        self._record(final)

    def _attempt_failed(self, tracked: TrackedJob, why: str, started: bool = True) -> None:
        job_id = tracked.state.job_id
        state = tracked.state
        if started:
            state = self._with_progress(state)
            self._record_slot_use(state, "failed")
            self._stop(job_id)  # make sure nothing of a "lost" job runs on beside its retry
            self._count_crashed_frames(tracked)
        failures = state.attempt + 1
        attempts = self.settings.job_retries + 1
        if failures <= self.settings.job_retries:
            delay = self.settings.job_retry_backoff_seconds * 2 ** (failures - 1)
            reason = f"attempt {failures} of {attempts} failed: {why}; retry in {delay:.0f} s"
            tracked.state = state.model_copy(
                update={
                    "status": JobStatus.QUEUED,
                    "attempt": failures,
                    "retry_at": now() + delay,
                    "slots": 0,
                    "slot_ids": [],
                    "started_at": None,
                    "reason": reason,
                }
            )
            log.warning("job attempt failed; retrying later", job_id=job_id, reason=reason)
            self._record(tracked.state)
            return
        reason = f"failed {failures} of {attempts} attempts; last error: {why}"
        del self.jobs[job_id]
        log.error("job failed", job_id=job_id, reason=reason)
        self._record(self._ended(state.model_copy(update={"attempt": failures}), JobStatus.FAILED, reason))

    def _count_crashed_frames(self, tracked: TrackedJob) -> None:
        """Charge the frames a failed attempt's ranks were analysing; one that keeps crashing is quarantined."""
        inflight = self.state.inflight(tracked.state.job_id)
        if not inflight:
            return
        crashes = dict(tracked.spec.frame_crashes)
        for rank in inflight.values():
            frame = int(rank["frame"])
            crashes[frame] = crashes.get(frame, 0) + 1
        tracked.spec = tracked.spec.model_copy(update={"frame_crashes": crashes})
        self.state.clear_inflight(tracked.state.job_id)
        self._save_spec(tracked)
        log.warning(
            "frames in flight when the attempt failed",
            job_id=tracked.state.job_id,
            frames=sorted(int(rank["frame"]) for rank in inflight.values()),
            quarantined=sorted(tracked.spec.quarantined()),
        )

    def _stop(self, job_id: str) -> None:
        """Stop a job through the backend and leave it out of future polls."""
        try:
            self.backend.cancel(job_id)
        except BackendError as error:  # unkillable processes are for the operator; the slots are given back
            log.error("job could not be stopped", job_id=job_id, error=str(error))
        self.backend.forget(job_id)

    def _ended(self, state: JobState, status: JobStatus, reason: str) -> JobState:
        update = {"status": status, "slots": 0, "slot_ids": [], "retry_at": None, "reason": reason}
        return state.model_copy(update=update)

    def _refresh_progress(self, tracked: TrackedJob) -> None:
        if time.monotonic() - tracked.progress_at < PROGRESS_SECONDS:
            return
        tracked.progress_at = time.monotonic()
        state = self._with_progress(tracked.state)
        if state.frames_done != tracked.state.frames_done:
            tracked.state = state
            self._record(state)

    def _with_progress(self, state: JobState) -> JobState:
        """The state with frames_done = frames this attempt's ranks processed or skipped as already counted."""
        ranks = self.state.rank_status(state.job_id)
        covered = sum(int(rank.get("frames", 0)) + int(rank.get("skipped", 0)) for rank in ranks.values())
        return state.model_copy(update={"frames_done": covered})

    def _record_slot_use(self, state: JobState, outcome: str) -> None:
        self.state.record_slot_use(
            {
                "job_id": state.job_id,
                "priority": state.priority.value,
                "slot_ids": state.slot_ids,
                "start": state.started_at,
                "end": now(),
                "outcome": outcome,
                "frames": state.frames_done,
            }
        )

    def _record(self, state: JobState) -> None:
        """Save a job's new state (record, then Redis), then publish it; an unconfirmed publish is retried later."""
        state = state.model_copy(update={"updated_at": now()})
        tracked = self.jobs.get(state.job_id)
        spec: JobSpec | None = tracked.spec if tracked is not None else None
        if spec is None:  # ended and dropped from the queue: its spec is in its record
            previous = self.records.get(state.job_id)
            spec = previous.spec if previous is not None else None
        record = JobRecord(spec=spec, state=state, published=False)
        self.records.save(record)
        self.state.save_job(state)
        self._unpublished.add(state.job_id)
        self._publish(record)

    def _publish(self, record: JobRecord) -> None:
        try:
            self.publisher.publish(record.state)
        except PublishError as error:
            log.error("job state not published; retried at the next poll", job_id=record.state.job_id, error=str(error))
            return
        self.records.save(record.model_copy(update={"published": True}))
        self._unpublished.discard(record.state.job_id)

    def _publish_unpublished(self) -> None:
        """The outbox: publish again every saved state whose publish was not confirmed (crash or broker outage)."""
        for job_id in sorted(self._unpublished):
            record = self.records.get(job_id)
            if record is None or record.published:
                self._unpublished.discard(job_id)
                continue
            log.info("publishing a job state saved before a crash or outage", job_id=job_id)
            self._publish(record)

    def _save_spec(self, tracked: TrackedJob) -> None:
        """A job's spec changed (queued manifest, ranks and attempt at start): Redis and the record."""
        self.state.save_job_spec(tracked.spec)
        previous = self.records.get(tracked.state.job_id)
        published = previous.published if previous is not None else False
        self.records.save(JobRecord(spec=tracked.spec, state=tracked.state, published=published))

    # -- service plumbing ------------------------------------------------------------------------------------------

    @property
    def publisher(self) -> Publisher:
        if self._publisher is None:
            self._publisher = Publisher(self.settings, role="dispatcher")
        return self._publisher

    def _describe_reservation(self) -> str:
        r = self.reservation
        return f"{r.nodes} nodes × {r.ranks_per_node} ranks = {r.slots} slots + {r.burst_slots} burst"

    def details(self) -> dict[str, Any]:
        """What the heartbeat tells `sfx status`: the reservation and its occupancy."""
        with self._lock:
            running = [job.state for job in self.jobs.values() if job.state.status in RUNNING]
            waiting = [job.state for job in self.jobs.values() if job.state.status in WAITING]
        used = sum(state.slots for state in running)
        return {
            "backend": self.backend.name,
            "reserved_slots": self.reservation.slots,
            "burst_slots": self.reservation.burst_slots,
            "slots_in_use": used,
            "burst_in_use": max(0, used - self.reservation.slots),
            "running_jobs": len(running),
            "queued_jobs": len(waiting),
        }

    def _export_metrics(self) -> None:
        """Jobs by status, slots and the live lag into the service's Prometheus gauges (after each poll).

        The lag is frames written (the run's latest manifest) minus frames counted under the live trial, summed over
        the runs with a live job queued or running: one service-level number, never a label per run.
        """
        exported = metrics.current()
        with self._lock:
            statuses = [job.state.status for job in self.jobs.values()]
            live_runs = {job.spec.manifest.run_id for job in self.jobs.values() if job.spec.trial == "live"}
        for status in JobStatus:
            if status not in FINAL:  # ended jobs leave the dispatcher's queue; their count would only grow
                exported.jobs.labels(exported.service, status.value).set(statuses.count(status))
        details = self.details()
        exported.slots_in_use.labels(exported.service).set(details["slots_in_use"])
        exported.slots_reserved.labels(exported.service).set(details["reserved_slots"])
        exported.slots_burst.labels(exported.service).set(details["burst_slots"])
        exported.slots_burst_in_use.labels(exported.service).set(details["burst_in_use"])
        lag = 0
        for run_id in live_runs:
            manifest = self.state.run(run_id)
            if manifest is not None and manifest.frame_count is not None:
                lag += max(0, manifest.frame_count - self.state.frames_seen(run_id, "live"))
        exported.live_lag_frames.labels(exported.service).set(lag)

    def stop(self) -> None:
        if self._publisher is not None:
            self._publisher.close()


def _failure_summary(status: BackendJobStatus) -> str:
    """The exit and the line of the job's log that says what went wrong (its last error line, else its last line)."""
    lines = [line.strip() for line in status.detail.splitlines() if line.strip()]
    errors = [line for line in lines if "failed" in line.lower() or "error" in line.lower()]
    said = (errors or lines or ["no output"])[-1]
    return f"{status.state.value} (exit code {status.exit_code}): {said[:400]}"


def _requester(sender: str | None) -> str:
    """Who asked, for a job's reason: the broker user, or a warning that nobody vouches for the request."""
    return sender if sender else "an unverified user"


def _without_wait_time(reason: str) -> str:
    """A waiting reason without its "(queued N s)" suffix, so only a new reason is logged again."""
    return reason.rsplit(" (queued ", 1)[0]


def make_consumers(dispatcher: Dispatcher, settings: Settings) -> list[Consumer]:
    topology = Topology(settings)
    return [
        Consumer(
            topology.queue("dispatcher.runs"),
            RunManifest,
            dispatcher.handle_manifest,
            settings=settings,
            name="dispatcher-runs",
        ),
        Consumer(
            topology.queue("dispatcher.control"),
            (ReprocessRequest, CancelRequest),
            dispatcher.handle_control,
            settings=settings,
            name="dispatcher-control",
        ),
    ]
