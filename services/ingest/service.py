"""The ingest service: polls landing directories, recognises runs, publishes their RunManifests.

Polling, not inotify: detector data lands on Lustre or NFS where inotify sees nothing. Each poll lists the
directories, groups files into runs (services.ingest.discovery) and opens each run that is not finished yet:

- a run is published once (revision 0) as soon as it has a readable frame; while it grows (live), its manifest is
  published again at most every ``manifest_interval`` seconds with the new frame count (revision + 1); when it is
  complete — the file says so, or its files stopped changing for ``ingest_quiet_seconds`` — a last revision with
  ``live = false`` goes out. Redis keeps the latest manifest, so a restarted ingest (or a second sighting) never
  publishes a finished run again, unless its files change: a run that grows after it was taken as complete (a writer
  that paused longer than the quiet period) gets a new revision with the new frame count. Save, then publish: the
  manifest is saved together with an outbox entry, which
  only a confirmed publish removes; every poll first publishes what the outbox holds, so a crash or a broker outage
  between the two steps delays a manifest but never loses it. Each confirmed manifest is also recorded under
  ``<work_dir>/ingest/published/``: after Redis was emptied the ingest puts those back into Redis instead of
  publishing finished runs again.
- a file that cannot be read once it has stopped changing is rejected: its reason goes to the log, to Redis
  (``<ns>:ingest:rejected``) and out as a FileRejected message; it is set aside (not opened again) until it changes.

Sample information (sample name, cell, space group) comes from ``<run>.sample.json`` or ``sample.json`` in the run's
directory, else from the settings' defaults. A description that names an unknown space group, a cell that is not
finite, larger than ``MAX_CELL_EDGE`` or does not fit its space group, rejects the run with the reason; fixing the
file (or the run's file changing) lets the run in again.

Run ids come from file names (:func:`services.ingest.discovery.run_id_for`). Two runs never share one: a name that
had to be altered gets a suffix from the original name, and a name already taken by a run in an earlier landing
directory gets a suffix from its directory; the collision is logged.
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from libs.contracts.messages import CellParameters, FileRejected, RunManifest, decode_message, validate_cell
from libs.contracts.naming import escape_word
from libs.contracts.settings import Settings
from libs.runtime.bus import Publisher
from libs.runtime.durable import write_atomically
from libs.runtime.logging import get_logger
from libs.runtime.state import LiveState
from libs.science.crystal import check_cell_fits_space_group, space_group
from libs.science.formats import FormatError, open_run
from services.ingest.discovery import FileObservation, RunCandidate, StabilityTracker, recognise_runs

log = get_logger(__name__)

MAX_CELL_EDGE = 500.0  # Å: past most SFX targets; a typo (791 for 79.1) would build a Miller grid that fills memory


class SampleInfo(BaseModel):
    """What the experiment knows about the crystals of a run (``sample.json``)."""

    model_config = ConfigDict(extra="forbid")

    sample: str = ""
    experiment: str = ""
    cell: CellParameters | None = None
    space_group: str | None = None


def check_sample(info: SampleInfo) -> None:
    """Raise ValueError naming what is wrong with a sample description the analysis could not use."""
    if info.cell is not None:
        if not all(math.isfinite(value) for value in info.cell):
            raise ValueError(f"cell {info.cell} has a value that is not a finite number")
        validate_cell(info.cell)
        if max(info.cell[:3]) > MAX_CELL_EDGE:
            raise ValueError(f"cell edge {max(info.cell[:3])} Å exceeds {MAX_CELL_EDGE:.0f} Å (a typo?)")
    if info.space_group is not None:
        group = space_group(info.space_group)  # SymmetryError (a ValueError) names an unknown symbol
        if info.cell is not None:
            check_cell_fits_space_group(info.cell, group)
    if (info.cell is None) != (info.space_group is None):
        raise ValueError("give both the cell and the space group, or neither")


@dataclass
class RunTrack:
    """What ingest last published for a run."""

    manifest: RunManifest
    published_at: float


class Ingest:
    """The polling loop's state and logic."""

    def __init__(self, settings: Settings, manifest_interval: float = 2.0) -> None:
        if not settings.landing_dirs:
            raise ValueError("no landing directory to watch: set SFX_LANDING_DIRS to a JSON list of paths")
        self.settings = settings
        self.landing_dirs = [Path(d) for d in settings.landing_dirs]
        self.state = LiveState(settings)
        self.stability = StabilityTracker(settings.ingest_quiet_seconds)
        self.manifest_interval = manifest_interval
        self.tracks: dict[str, RunTrack] = {}
        # Runs published as complete, with the size and mtime of their files then: looked at again only if they change.
        self.finished: dict[str, tuple[tuple[int, float], ...]] = {}
        self.rejected: dict[Path, tuple[object, ...]] = {}
        self.collisions: set[Path] = set()
        # What was published, kept where it outlives an emptied Redis (Redis is a live view, not the record).
        self.records = settings.work_dir / "ingest" / "published"
        self.records.mkdir(parents=True, exist_ok=True)
        self._publisher: Publisher | None = None

    @property
    def publisher(self) -> Publisher:
        if self._publisher is None:
            self._publisher = Publisher(self.settings, role="ingest")
        return self._publisher

    # -- one poll --------------------------------------------------------------------------------------------------

    def scan(self) -> None:
        self.publish_outbox()
        now = time.time()
        observations: dict[Path, FileObservation] = {}
        candidates: list[RunCandidate] = []
        directory_of_run: dict[str, Path] = {}
        for directory in self.landing_dirs:
            try:
                entries = list(os.scandir(directory))
            except FileNotFoundError:
                log.warning("landing directory does not exist", directory=str(directory))
                continue
            found: dict[Path, FileObservation] = {}
            for entry in entries:
                if entry.is_file():
                    info = entry.stat()
                    found[Path(entry.path)] = FileObservation(Path(entry.path), info.st_size, info.st_mtime)
            observations.update(found)
            for candidate in recognise_runs(found):
                candidates.append(self._unique(candidate, directory, directory_of_run))
        for candidate in candidates:
            if self.finished.get(candidate.run_id) == self._files_signature(candidate, observations):
                continue
            self.finished.pop(candidate.run_id, None)  # a complete run whose files changed: it may have grown
            try:
                self._consider(candidate, observations, now)
            except (OSError, RuntimeError, ValueError) as error:
                # One unreadable run must never stop the others from being seen.
                log.error("run could not be examined", run_id=candidate.run_id, error=repr(error)[:500])

    @staticmethod
    def _files_signature(
        candidate: RunCandidate, observations: dict[Path, FileObservation]
    ) -> tuple[tuple[int, float], ...]:
        return tuple(
            (observations[path].size, observations[path].mtime) for path in candidate.all_files if path in observations
        )

    def _unique(self, candidate: RunCandidate, directory: Path, directory_of_run: dict[str, Path]) -> RunCandidate:
        """The candidate with a run id no run of an earlier landing directory holds (order of SFX_LANDING_DIRS)."""
        owner = directory_of_run.setdefault(candidate.run_id, directory)
        if owner == directory:
            return candidate
        suffix = hashlib.sha1(str(directory).encode()).hexdigest()[:6]
        unique = replace(candidate, run_id=f"{candidate.run_id}-{suffix}")
        if candidate.main_file not in self.collisions:
            self.collisions.add(candidate.main_file)
            log.warning(
                "run id collision: the run is renamed",
                run_id=candidate.run_id,
                taken_by=str(owner),
                path=str(candidate.main_file),
                renamed_to=unique.run_id,
            )
        directory_of_run[unique.run_id] = directory
        return unique

    def publish_outbox(self) -> None:
        """Publish every manifest that was saved but whose publish was not confirmed (a crash or broker outage)."""
        for run_id in self.state.unpublished_runs():
            manifest = self.state.run(run_id)
            if manifest is not None:
                self._publish_manifest(manifest)
                log.info("run manifest published from the outbox", run_id=run_id, revision=manifest.revision)
            else:
                self.state.mark_run_published(run_id)

    def _publish_manifest(self, manifest: RunManifest) -> None:
        """Publish, then record it as published on disk (which outlives Redis), then clear its outbox entry."""
        self.publisher.publish(manifest)
        write_atomically(self._record_path(manifest.run_id), manifest.encode())
        self.state.mark_run_published(manifest.run_id)

    def _record_path(self, run_id: str) -> Path:
        return self.records / f"{escape_word(run_id)}.json"

    def _published_record(self, run_id: str) -> RunManifest | None:
        """The last manifest of a run whose publish was confirmed, as recorded on disk."""
        try:
            return decode_message(self._record_path(run_id).read_bytes(), RunManifest)
        except FileNotFoundError:
            return None
        except ValueError as error:
            log.error("published-run record unreadable; the run is treated as new", run_id=run_id, error=str(error))
            return None

    def _consider(self, candidate: RunCandidate, observations: dict[Path, FileObservation], now: float) -> None:
        files = [f for f in candidate.all_files if f in observations]
        stable = all([self.stability.observe(observations[f], now) for f in files])
        if self._set_aside(candidate, observations):
            return
        known = self.tracks.get(candidate.run_id)
        if known is None:
            latest = self.state.run(candidate.run_id)
            if latest is None:
                latest = self._published_record(candidate.run_id)
                if latest is not None:  # Redis was emptied: put back what was published, without publishing it again
                    self.state.save_run(latest)
            if latest is not None:  # published before (a restart, or a second sighting): go on from that revision
                known = self.tracks[candidate.run_id] = RunTrack(latest, 0.0)
        try:
            with open_run(list(candidate.all_files), candidate.geometry) as reader:
                frame_count, says_complete = reader.frame_count, reader.is_complete
        except FormatError as error:
            if stable:
                self._reject(candidate, str(error), observations)
            return
        complete = says_complete is True or (says_complete is None and stable)
        if frame_count == 0 and not complete:
            return
        if known is not None:
            unchanged = known.manifest.frame_count == frame_count and known.manifest.live == (not complete)
            too_soon = not complete and now - known.published_at < self.manifest_interval
            if unchanged and complete:
                self.finished[candidate.run_id] = self._files_signature(candidate, observations)
            if unchanged or too_soon:
                return
        try:
            sample = self._sample_info(candidate)
        except ValueError as error:
            self._reject(candidate, str(error), observations)
            return
        manifest = RunManifest(
            run_id=candidate.run_id,
            experiment=sample.experiment,
            files=[str(f) for f in candidate.all_files],
            file_format="cxi" if candidate.file_format == "cxi" else "nxmx",
            frame_count=frame_count,
            geometry=str(candidate.geometry) if candidate.geometry else None,
            sample=sample.sample,
            cell=sample.cell,
            space_group=sample.space_group,
            live=not complete,
            revision=0 if known is None else known.manifest.revision + 1,
        )
        # Save before publishing (a consumer that looks the run up in Redis must find this revision), with an outbox
        # entry that only the confirmed publish removes.
        self.state.save_run_to_publish(manifest)
        self.tracks[candidate.run_id] = RunTrack(manifest, now)
        if complete:
            self.finished[candidate.run_id] = self._files_signature(candidate, observations)
        self._publish_manifest(manifest)
        log.info(
            "run manifest published",
            run_id=manifest.run_id,
            frames=frame_count,
            live=manifest.live,
            revision=manifest.revision,
        )

    @staticmethod
    def _sample_files(candidate: RunCandidate) -> tuple[Path, Path]:
        folder = candidate.main_file.parent
        return folder / f"{candidate.run_id}.sample.json", folder / "sample.json"

    def _sample_info(self, candidate: RunCandidate) -> SampleInfo:
        for path in self._sample_files(candidate):
            if path.exists():
                try:
                    info = SampleInfo.model_validate_json(path.read_bytes())
                    check_sample(info)
                except (ValidationError, ValueError) as error:
                    raise ValueError(f"{path}: invalid sample description: {error}") from error
                return info
        defaults = self.settings
        return SampleInfo(
            cell=defaults.default_cell,
            space_group=defaults.default_space_group,
        )

    # -- bad files -------------------------------------------------------------------------------------------------

    def _signature(self, candidate: RunCandidate, observations: dict[Path, FileObservation]) -> tuple[object, ...]:
        """What must change for a rejected run to be looked at again: its main file or its sample descriptions."""
        current = observations[candidate.main_file]
        samples: list[tuple[int, int] | None] = []
        for path in self._sample_files(candidate):
            try:
                info = path.stat()
                samples.append((info.st_size, info.st_mtime_ns))
            except FileNotFoundError:
                samples.append(None)
        return (current.size, current.mtime, *samples)

    def _set_aside(self, candidate: RunCandidate, observations: dict[Path, FileObservation]) -> bool:
        """True while the run is rejected and neither its main file nor its sample description changed since."""
        signature = self.rejected.get(candidate.main_file)
        if signature is None:
            return False
        if signature == self._signature(candidate, observations):
            return True
        del self.rejected[candidate.main_file]
        return False

    def _reject(self, candidate: RunCandidate, reason: str, observations: dict[Path, FileObservation]) -> None:
        self.rejected[candidate.main_file] = self._signature(candidate, observations)
        event = FileRejected(run_id=candidate.run_id, path=str(candidate.main_file), reason=reason)
        log.error("file rejected", run_id=candidate.run_id, path=str(candidate.main_file), reason=reason)
        self.state.save_rejection(event)
        self.publisher.publish(event)

    def details(self) -> dict[str, Any]:
        return {
            "landing_dirs": [str(d) for d in self.landing_dirs],
            "runs_live": len([t for t in self.tracks.values() if t.manifest.live]),
            "runs_finished": len(self.finished),
            "files_rejected": len(self.rejected),
        }

    def stop(self) -> None:
        if self._publisher is not None:
            self._publisher.close()
