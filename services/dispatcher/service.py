"""The dispatcher, first form: one analysis job per run and trial, started through a backend, tracked in Redis.

A manifest for a run without a job starts one (``<run>.live``); an operator's ReprocessRequest starts one per run
under its own trial (``<run>.<trial>``) with the request's parameter overrides, merged apart by the merger. Later
revisions of the manifest of a live run need nothing, because the running job follows the growing files. The backend
is polled once per period for all of its jobs; every change of a job's status is saved in Redis and published as a
JobState. When a job succeeds its ``frames_total`` is the number of frame indices its ranks covered, which tells the
merger when the run is complete. On start the dispatcher adopts the jobs its backend still knows, so a restart
neither forgets nor repeats a job.
"""

from __future__ import annotations

import threading
from typing import Any

from libs.common.bus import Consumer, Publisher, Topology
from libs.common.logging import get_logger
from libs.common.messages import JobSpec, JobState, JobStatus, Priority, ReprocessRequest, RunManifest, now
from libs.common.parameters import AnalysisParameters, with_overrides
from libs.common.settings import Settings
from libs.common.state import LiveState
from services.dispatcher.backends import Backend, BackendJobStatus, RunState

log = get_logger(__name__)

FINAL = {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED}


def job_id_for(run_id: str, trial: str) -> str:
    return f"{run_id}.{trial}"


class Dispatcher:
    """Handlers and periodic work of the dispatcher service."""

    def __init__(self, settings: Settings, backend: Backend) -> None:
        self.settings = settings
        self.backend = backend
        self.state = LiveState(settings)
        self.active: dict[str, JobState] = {}
        self._lock = threading.Lock()
        self._publisher: Publisher | None = None
        self._adopt()

    def _adopt(self) -> None:
        """Take over the jobs the backend still knows (started before a restart)."""
        for job_id in self.backend.poll():
            known = self.state.job(job_id)
            if known is not None and known.status not in FINAL:
                self.active[job_id] = known
                log.info("adopted job", job_id=job_id, status=known.status.value)

    def handle_manifest(self, manifest: RunManifest) -> None:
        reason = f"new run {manifest.run_id} ({'live' if manifest.live else 'complete'})"
        self._start(manifest, "live", {}, Priority.LIVE, reason)

    def handle_reprocess(self, request: ReprocessRequest) -> None:
        """Start a job per run under the request's trial; the live trial is not touched."""
        try:
            with_overrides(AnalysisParameters(), request.parameters)
        except ValueError as error:
            log.error("reprocess request refused", trial=request.trial, error=str(error))
            for run_id in request.run_ids:
                self._record(self._refused(run_id, request.trial, f"invalid parameters: {error}"))
            return
        for run_id in request.run_ids:
            manifest = self.state.run(run_id)
            if manifest is None:
                log.error("reprocess request names an unknown run", run_id=run_id, trial=request.trial)
                self._record(self._refused(run_id, request.trial, f"run {run_id} is unknown (no manifest in Redis)"))
                continue
            reason = f"reprocess requested by {request.requested_by or 'an operator'}"
            self._start(manifest, request.trial, request.parameters, Priority.REPROCESS, reason)

    def _refused(self, run_id: str, trial: str, reason: str) -> JobState:
        return JobState(
            job_id=job_id_for(run_id, trial), run_id=run_id, trial=trial, status=JobStatus.FAILED, reason=reason
        )

    def _start(
        self, manifest: RunManifest, trial: str, parameters: dict[str, Any], priority: Priority, reason: str
    ) -> None:
        job_id = job_id_for(manifest.run_id, trial)
        with self._lock:
            existing = self.active.get(job_id) or self.state.job(job_id)
            if existing is not None and existing.status is not JobStatus.FAILED:
                log.debug("no new job needed", job_id=job_id, status=existing.status.value)
                return
            spec = JobSpec(
                job_id=job_id,
                manifest=manifest,
                trial=trial,
                parameters=parameters,
                priority=priority,
                ranks=self.settings.analysis_ranks,
            )
            backend_id = self.backend.start(spec)
            state = JobState(
                job_id=job_id,
                run_id=manifest.run_id,
                trial=trial,
                status=JobStatus.RUNNING,
                slots=spec.ranks,
                frames_total=None,
                backend_id=backend_id,
                reason=reason,
            )
            self.active[job_id] = state
        log.info("job started", job_id=job_id, ranks=spec.ranks, backend_id=backend_id, reason=reason)
        self._record(state)

    def poll(self) -> None:
        """One backend poll for all jobs; record every change."""
        statuses = self.backend.poll()
        changes: list[JobState] = []
        with self._lock:
            for job_id, current in list(self.active.items()):
                status = statuses.get(job_id)
                if status is None or status.state is RunState.RUNNING:
                    continue
                changes.append(self._finished(current, status))
                del self.active[job_id]
                self.backend.forget(job_id)
        for state in changes:
            log.info("job ended", job_id=state.job_id, status=state.status.value, reason=state.reason[-300:])
            self._record(state)

    def _finished(self, current: JobState, status: BackendJobStatus) -> JobState:
        ranks = self.state.rank_status(current.job_id)
        covered = sum(int(r.get("frames", 0)) + int(r.get("skipped", 0)) for r in ranks.values())
        succeeded = status.state is RunState.SUCCEEDED
        return current.model_copy(
            update={
                "status": JobStatus.SUCCEEDED if succeeded else JobStatus.FAILED,
                "frames_done": covered,
                "frames_total": covered if succeeded else None,
                "reason": "exit code 0"
                if succeeded
                else f"{status.state.value} (exit code {status.exit_code}): {status.detail}",
                "slots": 0,
            }
        )

    def _record(self, state: JobState) -> None:
        state = state.model_copy(update={"updated_at": now()})
        self.state.save_job(state)
        self.publisher.publish(state)

    @property
    def publisher(self) -> Publisher:
        if self._publisher is None:
            self._publisher = Publisher(self.settings, role="dispatcher")
        return self._publisher

    def details(self) -> dict[str, Any]:
        return {"active_jobs": len(self.active)}

    def stop(self) -> None:
        if self._publisher is not None:
            self._publisher.close()


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
            ReprocessRequest,
            dispatcher.handle_reprocess,
            settings=settings,
            name="dispatcher-control",
        ),
    ]
