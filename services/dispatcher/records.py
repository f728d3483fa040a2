"""The dispatcher's record of every job, on disk: what survives a restart, a broker outage and an emptied Redis.

One file per job, ``<work_dir>/dispatcher/jobs/<job>.json``: its JobSpec, its latest JobState and whether that state
was confirmed as published. Written by rename, so a crash leaves the old record or the new one. Redis holds a copy
for `sfx status` and the monitor; the record is what the dispatcher rebuilds its queue from, and what it puts back
into Redis when Redis lost it. A state saved but not yet published stays marked until the publish is confirmed, and
the dispatcher publishes such states again at every poll (the outbox), so "save, then publish" survives a crash or
a broker outage between the two.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError

from libs.contracts.messages import JobSpec, JobState
from libs.contracts.naming import escape_word
from libs.runtime.durable import write_atomically
from libs.runtime.logging import get_logger

log = get_logger(__name__)


class JobRecord(BaseModel):
    """What the dispatcher knows of one job."""

    model_config = ConfigDict(extra="forbid")

    spec: JobSpec | None  # None for a request refused before it became a job
    state: JobState
    published: bool = False


class JobRecords:
    """The folder of job records."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)

    def _path(self, job_id: str) -> Path:
        return self.folder / f"{escape_word(job_id)}.json"

    def save(self, record: JobRecord) -> None:
        write_atomically(self._path(record.state.job_id), record.model_dump_json().encode())

    def get(self, job_id: str) -> JobRecord | None:
        path = self._path(job_id)
        try:
            return JobRecord.model_validate_json(path.read_bytes())
        except FileNotFoundError:
            return None
        except (ValidationError, ValueError, OSError) as error:
            log.error("job record unreadable; the job is treated as unknown", path=str(path), error=str(error))
            return None

    def all(self) -> list[JobRecord]:
        """Every readable record, oldest state first."""
        records = []
        for path in sorted(self.folder.glob("*.json")):
            try:
                records.append(JobRecord.model_validate_json(path.read_bytes()))
            except (ValidationError, ValueError, OSError) as error:
                log.error("job record unreadable; skipped", path=str(path), error=str(error))
        return sorted(records, key=lambda record: record.state.updated_at)
