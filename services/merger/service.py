"""The merger service: FrameResults in, MergeUpdates and MTZ files out.

Runs are grouped into datasets by sample, space group, cell and trial. Durability: every accepted FrameResult is
appended to its dataset's journal (``<work_dir>/merger/<dataset>/<trial>/results.jsonl``, fsynced) before it is
counted in Redis and before the message is acked; on start the journals are replayed, so a restart neither loses
nor double-counts a frame (a redelivered result whose key is in the journal is counted again, which Redis ignores,
and dropped). Which runs have ended, and which of them are written, is kept beside the journal (``runs.json``),
so a merger killed after acking a run's final state still writes its MTZ when it comes back. Every manifest the
merger used is kept in ``<work_dir>/merger/manifests/`` so it places results of known runs after Redis was
emptied, and the counts of every journalled frame are put back into Redis when a dataset is restored. The engine is
fed in batches by the periodic task, which also publishes a MergeUpdate every few seconds.
When a job reports that a run is done and every frame of it has arrived, the dataset is finalised: the engine is
rebuilt from the journal in (run, frame) order and fully re-scaled, so the final MTZ depends only on which frames
were merged, never on their arrival order or on restarts. MTZ files and every state file are written under a
temporary name and renamed, so a full disk never leaves a partial one.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from libs.contracts.datasets import dataset_id_for
from libs.contracts.messages import (
    FrameResult,
    JobState,
    JobStatus,
    MergeUpdate,
    RunManifest,
    decode_message,
)
from libs.contracts.naming import escape_word
from libs.contracts.settings import Settings
from libs.runtime import metrics
from libs.runtime.bus import Consumer, Publisher, PublishError, Topology
from libs.runtime.durable import Journal, replacing, write_atomically
from libs.runtime.logging import get_logger
from libs.runtime.state import LiveState
from services.merger.engine import MergingEngine
from services.merger.mtz import write_merge_outputs

log = get_logger(__name__)

FrameKey = tuple[str, str, int]


class MergerError(RuntimeError):
    """A result the merger cannot place (e.g. its run was never announced)."""


@dataclass
class Dataset:
    """One dataset under one trial: its journal, its engine and what is still waiting to be merged."""

    dataset_id: str
    trial: str
    cell: tuple[float, ...]
    space_group: str
    folder: Path
    engine: MergingEngine
    journal: Journal
    keys: set[FrameKey] = field(default_factory=set)
    pending: list[FrameResult] = field(default_factory=list)
    frames_by_run: dict[str, int] = field(default_factory=dict)
    runs_done: dict[str, int] = field(default_factory=dict)  # run -> frames the finished job covered
    runs_final: set[str] = field(default_factory=set)
    changed: bool = True
    mtz_path: Path | None = None

    @property
    def runs_file(self) -> Path:
        return self.folder / "runs.json"

    def save_runs(self) -> None:
        """Persist which runs have ended (with their frame totals) and which of them are written."""
        content = {"done": self.runs_done, "final": sorted(self.runs_final)}
        write_atomically(self.runs_file, json.dumps(content, sort_keys=True).encode())

    def load_runs(self) -> None:
        if not self.runs_file.exists():
            return
        try:
            content = json.loads(self.runs_file.read_bytes())
            self.runs_done = {str(run): int(total) for run, total in content["done"].items()}
            self.runs_final = {str(run) for run in content["final"]}
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            # Written by rename, so only a foreign hand damages it; the runs then end again when their jobs do.
            log.error("runs file unreadable; ended runs forgotten", path=str(self.runs_file), error=str(error))


class Merger:
    """Handlers and periodic work of the merger service (thread-safe: one lock guards all datasets)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.state = LiveState(settings)
        self.root = settings.work_dir / "merger"
        (self.root / "manifests").mkdir(parents=True, exist_ok=True)
        self.datasets: dict[tuple[str, str], Dataset] = {}
        self.run_dataset: dict[tuple[str, str], tuple[str, str]] = {}
        self._manifests: dict[str, RunManifest] = {}
        self._lock = threading.Lock()
        self._publisher: Publisher | None = None
        self._unpublished: dict[tuple[str, str], MergeUpdate] = {}
        self.restore()

    # -- restart ---------------------------------------------------------------------------------------------------

    def restore(self) -> None:
        """Rebuild every dataset from its header, journal and runs file."""
        for journal in sorted(self.root.glob("*/*/results.jsonl")):
            manifest = self._header_manifest(journal)
            if manifest is None:
                continue
            dataset = self._dataset_for(manifest, journal.parent.name)
            log.info("dataset restored", dataset=dataset.dataset_id, trial=dataset.trial, frames=len(dataset.keys))
        self.state.mark_seeded("merger")

    def _reseed_if_redis_was_emptied(self) -> None:
        """Put the counts of every journalled frame back when Redis restarted empty while the merger ran."""
        if self.state.is_seeded("merger"):
            return
        log.warning("the live state was emptied; counting the journalled frames again", datasets=len(self.datasets))
        for dataset in self.datasets.values():
            self.state.count_frame_results(self._read_journal(dataset.journal))
        self.state.mark_seeded("merger")

    def _header_manifest(self, journal: Path) -> RunManifest | None:
        """The manifest a dataset folder was made for; from a run of its journal when the header is damaged."""
        header = journal.parent / "dataset.json"
        try:
            return decode_message(header.read_bytes(), RunManifest)
        except (OSError, ValueError) as error:
            log.error("dataset header unreadable", path=str(header), error=str(error))
        for _, line in Journal(journal).lines():
            try:
                run_id = decode_message(line, FrameResult).run_id
            except ValueError:
                continue
            manifest = self._stored_manifest(run_id)
            if manifest is not None:
                write_atomically(header, manifest.encode())
                return manifest
        log.error("dataset not restored: no manifest of its runs is known", folder=str(journal.parent))
        return None

    @staticmethod
    def _read_journal(journal: Journal) -> list[FrameResult]:
        results = []
        for number, line in journal.lines():
            try:
                results.append(decode_message(line, FrameResult))
            except ValueError as error:
                # Torn tails are cut when the journal opens; a bad line in the middle is worth a loud warning.
                log.warning("journal line skipped", journal=str(journal.path), line=number, error=str(error))
        return results

    # -- consuming -------------------------------------------------------------------------------------------------

    def handle(self, message: FrameResult | JobState) -> None:
        if isinstance(message, FrameResult):
            self.handle_result(message)
        else:
            self.handle_job_state(message)

    def handle_result(self, result: FrameResult) -> None:
        manifest = self._manifest(result.run_id)
        if not manifest.live and manifest.frame_count is not None and result.frame_index >= manifest.frame_count:
            manifest = self._newer_manifest(result.run_id)
            if not manifest.live and manifest.frame_count is not None and result.frame_index >= manifest.frame_count:
                # Retried with growing delays, not refused at once: a run that grew after it was announced as
                # complete gets a new manifest within seconds; a forged index ends in the dead letters.
                beyond = f"frame_index {result.frame_index} is beyond run {result.run_id}"
                raise MergerError(f"{beyond}, which has {manifest.frame_count} frames as far as the ingest knows")
        with self._lock:
            dataset = self._dataset_for(manifest, result.trial)
            self.run_dataset[(result.run_id, result.trial)] = (dataset.dataset_id, dataset.trial)
            if result.key not in dataset.keys:
                # Journal first: the analysis skips counted frames, so a frame counted but not journalled is lost.
                dataset.journal.append(result.encode())
                self._remember(dataset, result)
                dataset.pending.append(result)
                # The frame counters of the whole system: the merger sees every result once (the ranks are too
                # short-lived to be scraped); a redelivery is not counted again.
                metrics.current().count_frame(
                    result.trial, hit=result.hit, indexed=result.indexed, failed=result.error is not None
                )
        # Counted after it is durable; a redelivery counts again, which the live state ignores (counts once).
        self.state.count_frame_result(result)

    def handle_job_state(self, job: JobState) -> None:
        if job.status is not JobStatus.SUCCEEDED or job.frames_total is None:
            return
        manifest = self._manifest(job.run_id)
        with self._lock:
            dataset = self._dataset_for(manifest, job.trial)
            if dataset.runs_done.get(job.run_id) == job.frames_total and job.run_id not in dataset.runs_final:
                return  # a redelivery of what is already saved
            dataset.runs_done[job.run_id] = job.frames_total
            dataset.runs_final.discard(job.run_id)
            dataset.save_runs()  # before the ack: a merger killed now still finalises the run when it restarts

    def _remember(self, dataset: Dataset, result: FrameResult) -> None:
        dataset.keys.add(result.key)
        dataset.frames_by_run[result.run_id] = dataset.frames_by_run.get(result.run_id, 0) + 1
        dataset.changed = True

    def _manifest(self, run_id: str) -> RunManifest:
        manifest = self._manifests.get(run_id)
        if manifest is None:
            manifest = self.state.run(run_id)
            if manifest is not None:
                if manifest.cell is None or manifest.space_group is None:
                    raise MergerError(f"run {run_id} has no cell and space group; cannot merge it")
                write_atomically(self._manifest_file(run_id), manifest.encode())
            else:
                manifest = self._stored_manifest(run_id)
                if manifest is None:
                    raise MergerError(f"run {run_id} has no manifest in the live state; cannot tell its dataset")
            self._manifests[run_id] = manifest
        return manifest

    def _newer_manifest(self, run_id: str) -> RunManifest:
        """The run's manifest as Redis holds it now (the cached one may be an older revision)."""
        latest = self.state.run(run_id)
        if latest is not None and latest.cell is not None and latest.space_group is not None:
            self._manifests[run_id] = latest
            write_atomically(self._manifest_file(run_id), latest.encode())
            return latest
        return self._manifests[run_id]

    def _manifest_file(self, run_id: str) -> Path:
        return self.root / "manifests" / f"{escape_word(run_id)}.json"

    def _stored_manifest(self, run_id: str) -> RunManifest | None:
        """The manifest kept when the run was first merged (Redis may have been emptied since)."""
        path = self._manifest_file(run_id)
        try:
            return decode_message(path.read_bytes(), RunManifest)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as error:
            log.error("stored manifest unreadable", path=str(path), error=str(error))
            return None

    def _dataset_for(self, manifest: RunManifest, trial: str) -> Dataset:
        """The dataset of a run under a trial; made (and its journal replayed) the first time it is asked for."""
        dataset_id = dataset_id_for(manifest)
        dataset = self.datasets.get((dataset_id, trial))
        if dataset is None:
            assert manifest.cell is not None and manifest.space_group is not None
            folder = self.root / dataset_id / trial
            folder.mkdir(parents=True, exist_ok=True)
            header = folder / "dataset.json"
            if not header.exists():
                write_atomically(header, manifest.encode())
            dataset = Dataset(
                dataset_id=dataset_id,
                trial=trial,
                cell=tuple(manifest.cell),
                space_group=manifest.space_group,
                folder=folder,
                engine=MergingEngine(manifest.cell, manifest.space_group),
                journal=Journal(folder / "results.jsonl"),
            )
            results = self._read_journal(dataset.journal)
            for result in results:
                self._remember(dataset, result)
            dataset.pending.extend(results)
            # The journal is the record; Redis only a view of it. Counting again is a no-op for frames Redis still
            # knows and re-seeds an emptied Redis, so the analysis does not redo merged frames.
            self.state.count_frame_results(results)
            dataset.load_runs()
            self.datasets[(dataset_id, trial)] = dataset
        return dataset

    # -- periodic work ---------------------------------------------------------------------------------------------

    def tick(self) -> None:
        """Merge what arrived, publish updates, finalise datasets whose runs are complete."""
        updates: list[MergeUpdate] = []
        with self._lock:
            self._reseed_if_redis_was_emptied()
            exported = metrics.current()
            exported.merge_datasets.labels(exported.service).set(len(self.datasets))
            for dataset in self.datasets.values():
                try:
                    started = time.perf_counter()
                    update = self._tick_dataset(dataset)
                    if update is not None:
                        kind = "final" if update.mtz_path is not None else "incremental"
                        exported.merge_update_seconds.labels(exported.service, kind).observe(
                            time.perf_counter() - started
                        )
                except Exception as error:
                    # One dataset that cannot be merged or written (a full disk, a bad frame) must not stall the rest.
                    log.exception(
                        "dataset tick failed", dataset=dataset.dataset_id, trial=dataset.trial, error=str(error)
                    )
                    continue
                if update is not None:
                    updates.append(update)
        for update in updates:
            self.state.save_merge(update)
            self._unpublished[(update.dataset_id, update.trial)] = update  # a newer update replaces an older one
        for key, update in list(self._unpublished.items()):
            try:
                self.publisher.publish(update)
            except PublishError as error:  # the broker is away: the latest update goes out at a later tick
                log.error("merge update not published; retried", dataset=update.dataset_id, error=str(error))
                break
            del self._unpublished[key]

    def _tick_dataset(self, dataset: Dataset) -> MergeUpdate | None:
        if dataset.pending:
            dataset.engine.add_frames(dataset.pending)
            dataset.pending = []
        complete = [
            run
            for run, total in dataset.runs_done.items()
            if run not in dataset.runs_final and dataset.frames_by_run.get(run, 0) >= total
        ]
        update = None
        if complete:
            update = self._finalise(dataset, complete)
        elif dataset.changed:
            update = dataset.engine.merge_update(dataset.dataset_id, dataset.trial)
        dataset.changed = False
        return update

    def _finalise(self, dataset: Dataset, runs: list[str]) -> MergeUpdate:
        """Rebuild the dataset's merge from its journal in a fixed order, fully re-scale, write the MTZ files."""
        started = time.monotonic()
        results = sorted(self._read_journal(dataset.journal), key=lambda r: (r.run_id, r.frame_index))
        engine = MergingEngine(dataset.cell, dataset.space_group)
        engine.add_frames(results)
        engine.rescale()
        dataset.engine = engine
        merged = dataset.folder / f"{dataset.dataset_id}_{dataset.trial}.mtz"
        unmerged = dataset.folder / f"{dataset.dataset_id}_{dataset.trial}_unmerged.mtz"
        with replacing(merged) as merged_temporary, replacing(unmerged) as unmerged_temporary:
            count = write_merge_outputs(engine, merged_temporary, unmerged_temporary)
        dataset.runs_final.update(runs)
        dataset.save_runs()
        dataset.mtz_path = merged
        final = all(run in dataset.runs_final for run in dataset.frames_by_run)
        log.info(
            "dataset written",
            dataset=dataset.dataset_id,
            trial=dataset.trial,
            runs=runs,
            frames=engine.frames_merged,
            reflections=count,
            mtz=str(merged),
            seconds=round(time.monotonic() - started, 2),
        )
        return engine.merge_update(dataset.dataset_id, dataset.trial, mtz_path=str(merged), final=final)

    @property
    def publisher(self) -> Publisher:
        if self._publisher is None:
            self._publisher = Publisher(self.settings, role="merger updates")
        return self._publisher

    def details(self) -> dict[str, Any]:
        return {
            "datasets": len(self.datasets),
            "frames": sum(len(d.keys) for d in self.datasets.values()),
        }

    def stop(self) -> None:
        """Merge and publish what arrived before the stop, then close the publisher."""
        self.tick()
        if self._publisher is not None:
            self._publisher.close()


def make_consumer(merger: Merger, settings: Settings) -> Consumer:
    topology = Topology(settings)
    return Consumer(
        topology.queue("merger.frames"),
        (FrameResult, JobState),
        merger.handle,
        settings=settings,
        name="merger",
    )
