"""One analysis job: ``mpiexec -n N python -m services.analysis --job SPEC.json``.

Every rank opens the run, takes blocks of frames from a shared MPI counter (services.analysis.frame_counter), runs each
frame through services.analysis.pipeline and publishes FrameResults in small batches. A frame that cannot be read or
processed becomes a FrameResult with its error; the job goes on. For a live run a rank whose next frame is not
written yet waits for it until the run is complete. Frames already counted under the job's trial (a job resumed after
preemption) are skipped. Each rank keeps a status and its per-frame stage timings in Redis (the weatherplot data).
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import redis

from libs.contracts.messages import FrameResult, JobSpec, decode_message
from libs.contracts.parameters import AnalysisParameters, with_overrides
from libs.contracts.settings import Settings
from libs.runtime.bus import Publisher
from libs.runtime.logging import get_logger
from libs.runtime.state import LiveState
from libs.science.formats import FormatError, RunReader, open_run
from services.analysis.frame_counter import SharedFrameCounter
from services.analysis.pipeline import AnalysisContext, AnalysisError, get_context, process_frame

log = get_logger(__name__)

MAX_UNSENT_TIMINGS = 10_000  # per-frame timings a rank keeps while Redis is unreachable


class JobError(RuntimeError):
    """The job as a whole cannot run (bad spec, unreadable run, impossible parameters)."""


@dataclass
class JobConfig:
    """How a rank behaves; the defaults suit a detector writing at 10–1000 Hz."""

    block_size: int = 2
    publish_batch: int = 8
    publish_interval_seconds: float = 0.5
    poll_seconds: float = 0.2
    live_timeout_seconds: float = 600.0  # a live run that stops growing without completing for this long ends the job
    # (the service sets it from SFX_LIVE_TIMEOUT_SECONDS)


def load_spec(path: Path) -> JobSpec:
    try:
        return decode_message(path.read_bytes(), JobSpec)
    except OSError as error:
        raise JobError(f"cannot read job spec {path}: {error}") from error
    except ValueError as error:
        raise JobError(f"job spec {path} is invalid: {error}") from error


def confined_to(paths: list[str | None], roots: list[Path]) -> None:
    """Raise JobError when a path of the run lies outside every landing directory (a forged manifest must not make
    the analysis read arbitrary files); no landing directory configured: nothing to check against."""
    if not roots:
        return
    # Normalised, not resolved: a landing directory may hold links to the detector's storage; ".." may not escape it.
    normal_roots = [Path(os.path.normpath(os.path.abspath(root))) for root in roots]
    for path in paths:
        if path is None:
            continue
        normal = Path(os.path.normpath(os.path.abspath(path)))
        if not any(normal.is_relative_to(root) for root in normal_roots):
            raise JobError(f"{path} is outside the landing directories {[str(root) for root in roots]}")


def prepare(spec: JobSpec) -> tuple[AnalysisParameters, tuple[float, ...], str]:
    """Validate what the job needs before touching any frame; JobError names the defect."""
    manifest = spec.manifest
    if manifest.cell is None or manifest.space_group is None:
        raise JobError(f"run {manifest.run_id} has no known cell and space group; stills indexing needs both")
    try:
        parameters = with_overrides(AnalysisParameters(), spec.parameters)
    except ValueError as error:
        raise JobError(f"trial {spec.trial}: {error}") from error
    return parameters, tuple(manifest.cell), manifest.space_group


@dataclass
class RankProgress:
    frames: int = 0
    failed: int = 0
    skipped: int = 0
    pending: list[FrameResult] = field(default_factory=list)
    timeline: list[dict[str, Any]] = field(default_factory=list)
    last_flush: float = field(default_factory=time.monotonic)


class RankWorker:
    """The loop of one rank."""

    def __init__(self, spec: JobSpec, comm: Any, settings: Settings, config: JobConfig | None = None) -> None:
        self.spec = spec
        self.comm = comm
        self.rank = int(comm.Get_rank())
        self.settings = settings
        self.config = config or JobConfig(live_timeout_seconds=settings.live_timeout_seconds)
        self.parameters, self.cell, self.space_group = prepare(spec)
        confined_to([*spec.manifest.files, spec.manifest.geometry], list(settings.landing_dirs))
        self.state = LiveState(settings)
        self.progress = RankProgress()
        # Frames counted under this trial before the job started (a job resumed after preemption) are skipped.
        # One read at start keeps Redis off the per-frame path.
        self.done_before = self.state.seen_frames(spec.manifest.run_id, spec.trial)
        self.quarantined = spec.quarantined()
        self.host = socket.gethostname()

    def run(self) -> RankProgress:
        manifest = self.spec.manifest
        try:
            reader = open_run([Path(name) for name in manifest.files], manifest.geometry)
        except (FormatError, OSError) as error:
            raise JobError(f"run {manifest.run_id}: {error}") from error
        counter = SharedFrameCounter(self.comm, self.config.block_size)
        publisher = Publisher(self.settings, role=f"analysis {self.spec.job_id} rank {self.rank}")
        try:
            with reader:
                try:
                    context = get_context(reader.detector, reader.beam, reader.mask, self.parameters)
                except AnalysisError as error:  # the same on every rank: no frame could be analysed
                    raise JobError(f"run {manifest.run_id}, trial {self.spec.trial}: {error}") from error
                self._loop(reader, context, counter, publisher)
            self._flush(publisher, force=True)
            self._mark_inflight(None)
        finally:
            publisher.close()
            self.comm.Barrier()
            counter.free()
        return self.progress

    def _loop(self, reader: RunReader, context: AnalysisContext, counter: SharedFrameCounter, publisher: Any) -> None:
        while True:
            for index in counter.take_block():
                if not self._wait_for_frame(reader, index):
                    return
                if index < len(self.done_before) and self.done_before[index]:
                    self.progress.skipped += 1
                    continue
                if index in self.quarantined:
                    self.progress.pending.append(self._quarantined(index))
                    continue
                self._mark_inflight(index)
                self.progress.pending.append(self._process(reader, context, index))
                self._flush(publisher)

    def _wait_for_frame(self, reader: RunReader, index: int) -> bool:
        """True once frame ``index`` exists; False when the run is complete without it."""
        if index < reader.frame_count:
            return True
        waited_since = time.monotonic()
        last_count = reader.frame_count
        while True:
            count = reader.refresh()
            if index < count:
                return True
            if self._run_complete(reader):
                return index < reader.refresh()
            if count != last_count:
                waited_since, last_count = time.monotonic(), count
            elif time.monotonic() - waited_since > self.config.live_timeout_seconds:
                log.warning("live run stopped growing; ending", run_id=self.spec.manifest.run_id, frames=count)
                return False
            time.sleep(self.config.poll_seconds)

    def _run_complete(self, reader: RunReader) -> bool:
        """Complete when the file says so, or when ingest has marked the run no longer live."""
        if not self.spec.manifest.live or reader.is_complete:
            return True
        try:
            latest = self.state.run(self.spec.manifest.run_id)
        except redis.RedisError as error:  # Redis away: not known to be complete; ask again at the next poll
            log.warning("cannot read the run's state; waiting", run_id=self.spec.manifest.run_id, error=str(error))
            return False
        return latest is not None and not latest.live and latest.revision >= self.spec.manifest.revision

    def _mark_inflight(self, index: int | None) -> None:
        """One Redis write per frame: if this rank dies on the frame, the dispatcher learns which one."""
        try:
            self.state.mark_inflight(self.spec.job_id, self.rank, index)
        except redis.RedisError as error:  # without Redis a crash is not pinned on its frame; the work goes on
            log.debug("cannot mark the frame in flight", frame_index=index, error=str(error))

    def _quarantined(self, index: int) -> FrameResult:
        """The error record of a frame that crashed earlier attempts: reported, not analysed again."""
        crashes = self.spec.frame_crashes.get(index, 0)
        self.progress.failed += 1
        self.progress.frames += 1
        log.error("frame quarantined", frame_index=index, crashes=crashes)
        moment = time.time()
        return FrameResult(
            run_id=self.spec.manifest.run_id,
            trial=self.spec.trial,
            frame_index=index,
            job_id=self.spec.job_id,
            started_at=moment,
            finished_at=moment,
            rank=self.rank,
            error=f"quarantined: the analysis crashed on this frame in {crashes} attempts of job {self.spec.job_id}",
        )

    def _process(self, reader: RunReader, context: AnalysisContext, index: int) -> FrameResult:
        manifest = self.spec.manifest
        started = time.time()
        try:
            image = reader.read_frame(index)
            read_seconds = time.time() - started
            analysis = process_frame(
                image,
                reader.detector,
                reader.beam,
                reader.mask,
                self.cell,
                self.space_group,
                self.parameters,
                context=context,
            )
            result = analysis.to_frame_result(
                manifest.run_id, self.spec.trial, index, started, time.time(), job_id=self.spec.job_id, rank=self.rank
            )
            result.timings["read"] = read_seconds
        except Exception as error:  # one bad frame must not end the job: report it and go on
            self.progress.failed += 1
            log.warning("frame failed", frame_index=index, error=str(error))
            result = FrameResult(
                run_id=manifest.run_id,
                trial=self.spec.trial,
                frame_index=index,
                job_id=self.spec.job_id,
                started_at=started,
                finished_at=time.time(),
                rank=self.rank,
                error=f"{type(error).__name__}: {error}",
            )
        self.progress.frames += 1
        self.progress.timeline.append(
            {
                "rank": self.rank,
                "frame": index,
                "start": result.started_at,
                "end": result.finished_at,
                "stages": {name: round(seconds, 6) for name, seconds in result.timings.items()},
                "hit": result.hit,
                "indexed": result.indexed,
                "failed": result.error is not None,
            }
        )
        return result

    def _flush(self, publisher: Any, force: bool = False) -> None:
        progress = self.progress
        due = time.monotonic() - progress.last_flush >= self.config.publish_interval_seconds
        if not progress.pending and not force:
            return
        if not (force or due or len(progress.pending) >= self.config.publish_batch):
            return
        if progress.pending:
            publisher.publish_many(progress.pending)  # waits out a broker outage (settings.broker_outage_seconds)
            progress.pending = []
        status = {
            "host": self.host,
            "pid": os.getpid(),
            "frames": progress.frames,
            "failed": progress.failed,
            "skipped": progress.skipped,
            "at": time.time(),
        }
        progress.last_flush = time.monotonic()
        try:
            self.state.record_rank(self.spec.job_id, self.rank, status, progress.timeline)
        except redis.RedisError as error:
            # The status and timings are for the monitor and for sizing jobs, not for the results: a rank goes on
            # without Redis and sends them at a later flush (the oldest timings dropped past a bound).
            del progress.timeline[:-MAX_UNSENT_TIMINGS]
            log.warning("cannot record the rank's status; will retry", job_id=self.spec.job_id, error=str(error))
            return
        progress.timeline = []


def gather_totals(comm: Any, progress: RankProgress) -> dict[str, int]:
    """Totals over all ranks (collective)."""
    local = np.array([progress.frames, progress.failed, progress.skipped], dtype=np.int64)
    totals = np.zeros_like(local)
    from mpi4py import MPI

    comm.Allreduce(local, totals, op=MPI.SUM)
    return {"frames": int(totals[0]), "failed": int(totals[1]), "skipped": int(totals[2])}
