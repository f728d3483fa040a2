"""The message contracts: every arrow of the data flow is one of these pydantic models.

Each model has a stable ``type`` name and a ``schema_version``; :func:`decode_message` turns bytes from the bus
back into the right model or raises :class:`MessageError` naming what is wrong.
"""

from __future__ import annotations

import json
import socket
import time
from enum import StrEnum
from typing import Annotated, Any, ClassVar, Literal, TypeVar, overload

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from libs.contracts.arrays import PackedArray

SCHEMA_VERSION = 1

MAX_MESSAGE_BYTES = 16 * 1024 * 1024
"""Larger bodies are refused before parsing (a frame's reflections take a few hundred kB)."""

MAX_FRAMES_PER_RUN = 10_000_000
"""Frame indices stay below this (about a day at 120 Hz): a forged index cannot make Redis allocate a huge bitmap."""

QUARANTINE_AFTER_CRASHES = 2
"""A frame in flight when this many attempts of its job crashed is quarantined: reported as an error, not retried."""

RunId = Annotated[
    str,
    Field(
        min_length=1,
        max_length=200,
        pattern=r"^[A-Za-z0-9_\-][A-Za-z0-9_.:\-]*$",
        description="Letters, digits and _ - . : (not first): never a path that leaves its folder",
    ),
]
JobId = Annotated[
    str,
    Field(
        min_length=1,
        max_length=400,
        pattern=r"^[A-Za-z0-9_\-][A-Za-z0-9_.:\-]*$",
        description="<run>.<trial>: names the job's folder, so never a path that leaves it",
    ),
]
TrialName = Annotated[
    str,
    Field(
        min_length=1,
        max_length=100,
        pattern=r"^[A-Za-z0-9_\-][A-Za-z0-9_.\-]*$",
        description="Letters, digits and _ - . (not first): a trial names a folder of the merger's output",
    ),
]

CellParameters = Annotated[
    tuple[float, float, float, float, float, float],
    Field(description="Unit cell a, b, c (Å) and alpha, beta, gamma (degrees)"),
]


class MessageError(ValueError):
    """A message that cannot be decoded or validated; the text names the defect."""


def now() -> float:
    """Seconds since the epoch (every timestamp in the contracts uses this)."""
    return time.time()


def validate_cell(cell: tuple[float, ...] | None) -> tuple[float, ...] | None:
    """A cell must have positive edges and angles strictly between 0 and 180 degrees."""
    if cell is None:
        return None
    a, b, c, alpha, beta, gamma = cell
    if min(a, b, c) <= 0:
        raise ValueError(f"cell edges must be positive, got {a}, {b}, {c}")
    if not all(0 < angle < 180 for angle in (alpha, beta, gamma)):
        raise ValueError(f"cell angles must lie between 0 and 180 degrees, got {alpha}, {beta}, {gamma}")
    return cell


class Message(BaseModel):
    """Base of every contract."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)
    type_name: ClassVar[str]

    schema_version: int = Field(SCHEMA_VERSION, description="Version of this message's schema")

    @field_validator("schema_version")
    @classmethod
    def _known_version(cls, version: int) -> int:
        if version != SCHEMA_VERSION:
            raise ValueError(f"schema_version {version} is not supported (this build speaks {SCHEMA_VERSION})")
        return version

    def encode(self) -> bytes:
        """The JSON bytes that travel on the bus."""
        return self.model_dump_json().encode("utf-8")


class RunManifest(Message):
    """A run found by ingest: which files hold its frames and what is known about the sample."""

    type_name: ClassVar[str] = "run_manifest"
    type: Literal["run_manifest"] = "run_manifest"
    run_id: RunId
    experiment: str = Field("", max_length=200)
    files: list[str] = Field(min_length=1, description="Absolute paths of the run's data files, in order")
    file_format: Literal["nxmx", "cxi"]
    frame_count: int | None = Field(None, ge=0, le=MAX_FRAMES_PER_RUN, description="Frames written so far, if known")
    geometry: str | None = Field(None, description="Path of a CrystFEL .geom file; None: geometry in the files")
    sample: str = Field("", max_length=200)
    cell: CellParameters | None = None
    space_group: str | None = None
    live: bool = Field(False, description="True while the run is still being written")
    revision: int = Field(0, ge=0, description="Increases each time ingest updates the manifest of this run")
    created_at: float = Field(default_factory=now)

    _check_cell = field_validator("cell")(validate_cell)


class Priority(StrEnum):
    """Live data is always served before reprocessing."""

    LIVE = "live"
    REPROCESS = "reprocess"


class JobSpec(Message):
    """A request to analyse (part of) one run under one trial."""

    type_name: ClassVar[str] = "job_spec"
    type: Literal["job_spec"] = "job_spec"
    job_id: JobId
    manifest: RunManifest
    trial: TrialName = "live"
    parameters: dict[str, Any] = Field(default_factory=dict, description="Overrides of the analysis defaults")
    priority: Priority = Priority.LIVE
    ranks: int = Field(1, ge=1, le=100_000)
    attempt: int = Field(0, ge=0)
    frame_crashes: dict[int, int] = Field(
        default_factory=dict,
        max_length=10_000,
        description="Frames that were being analysed when an earlier attempt crashed, with how many times; "
        f"a frame at {QUARANTINE_AFTER_CRASHES} or more is not analysed again but reported as an error",
    )
    created_at: float = Field(default_factory=now)

    def quarantined(self) -> frozenset[int]:
        """Frames this attempt reports as errors instead of analysing (they crashed earlier attempts)."""
        return frozenset(frame for frame, crashes in self.frame_crashes.items() if crashes >= QUARANTINE_AFTER_CRASHES)


class JobStatus(StrEnum):
    """Life of a job; the last three are final."""

    QUEUED = "queued"
    STARTING = "starting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


FINAL_STATUSES = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED})
"""A job in one of these states is over: it is never started, polled or retried again."""


class JobState(Message):
    """Where a job is, published on every change."""

    type_name: ClassVar[str] = "job_state"
    type: Literal["job_state"] = "job_state"
    job_id: JobId
    run_id: RunId
    trial: TrialName
    status: JobStatus
    priority: Priority = Priority.LIVE
    slots: int = Field(0, ge=0, description="Ranks the job holds now (0 unless running)")
    slot_ids: list[int] = Field(
        default_factory=list, description="Which slots of the reservation it holds (reserved first, then burst)"
    )
    frames_done: int = Field(0, ge=0)
    frames_total: int | None = Field(None, ge=0, le=MAX_FRAMES_PER_RUN)
    attempt: int = Field(0, ge=0, description="Starts after a failure so far (0: the first attempt)")
    queued_at: float | None = Field(None, description="When the job was first queued (kept across preemptions)")
    started_at: float | None = Field(None, description="When its current attempt started")
    retry_at: float | None = Field(None, description="A failed job waiting to retry starts no earlier than this")
    backend_id: str | None = Field(None, description="The backend's own handle (pid, Slurm job id, pod name)")
    reason: str = Field("", description="Why the job is in this state (the scheduler's last decision about it)")
    updated_at: float = Field(default_factory=now)


class ReflectionTable(BaseModel):
    """Integrated reflections of one frame as compact columns (one row per reflection)."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    miller: PackedArray = Field(description="int16 (n, 3): h, k, l as indexed (not yet mapped to the ASU)")
    intensity: PackedArray = Field(
        description="float32 (n,): summed intensity, background subtracted, Lorentz-polarisation corrected: "
        "I/(L·P) with L = σ_ref/σ(|r|) the stills Lorentz factor and P the polarisation factor (beam polarised "
        "along lab x), so E[intensity] = scale · exp(−B/2d²) · partiality · I_full (not divided by partiality)"
    )
    sigma: PackedArray = Field(description="float32 (n,): standard deviation of the intensity, also divided by L·P")
    partiality: PackedArray = Field(description="float32 (n,): estimated fraction of the reflection recorded")

    @model_validator(mode="after")
    def _consistent(self) -> ReflectionTable:
        n = self.miller.shape[0] if self.miller.ndim == 2 else -1
        if self.miller.ndim != 2 or self.miller.shape[1] != 3 or self.miller.dtype.kind not in "iu":
            raise ValueError(f"miller must be an integer array of shape (n, 3), got {self.miller.shape}")
        for name in ("intensity", "sigma", "partiality"):
            column = getattr(self, name)
            if column.shape != (n,):
                raise ValueError(f"{name} has shape {column.shape}, expected ({n},) to match miller")
            if column.dtype.kind != "f":
                raise ValueError(f"{name} must be floating point, got {column.dtype}")
        return self

    @classmethod
    def from_columns(
        cls, miller: np.ndarray, intensity: np.ndarray, sigma: np.ndarray, partiality: np.ndarray
    ) -> ReflectionTable:
        """Build a table with the wire dtypes (int16 Miller indices, float32 values)."""
        return cls(
            miller=np.asarray(miller, dtype=np.int16).reshape(-1, 3),
            intensity=np.asarray(intensity, dtype=np.float32),
            sigma=np.asarray(sigma, dtype=np.float32),
            partiality=np.asarray(partiality, dtype=np.float32),
        )

    def __len__(self) -> int:
        return int(self.miller.shape[0])


Matrix3 = Annotated[
    tuple[tuple[float, float, float], tuple[float, float, float], tuple[float, float, float]],
    Field(description="3x3 matrix, row by row"),
]


class FrameResult(Message):
    """What the analysis found on one frame (never pixels)."""

    type_name: ClassVar[str] = "frame_result"
    type: Literal["frame_result"] = "frame_result"
    run_id: RunId
    trial: TrialName
    frame_index: int = Field(ge=0, lt=MAX_FRAMES_PER_RUN)
    job_id: str = Field("", max_length=400)
    started_at: float
    finished_at: float
    rank: int = Field(0, ge=0)
    host: str = Field(default_factory=socket.gethostname)
    spot_count: int = Field(0, ge=0)
    hit: bool = False
    indexed: bool = False
    A: Matrix3 | None = Field(
        None, description="A = UB, r = A·h in the lab frame (DIALS convention, beam along -z), 1/Å"
    )
    cell: CellParameters | None = None
    resolution_estimate: float | None = Field(None, gt=0, description="Resolution limit from the spots, Å")
    timings: dict[str, float] = Field(default_factory=dict, description="Seconds spent in each stage")
    reflections: ReflectionTable | None = None
    error: str | None = Field(None, description="Why the frame could not be processed; None when it was")

    _check_cell = field_validator("cell")(validate_cell)

    @model_validator(mode="after")
    def _consistent(self) -> FrameResult:
        if self.finished_at < self.started_at:
            raise ValueError("finished_at precedes started_at")
        if self.indexed and (self.A is None or self.cell is None):
            raise ValueError("an indexed frame must carry its A matrix and cell")
        if self.reflections is not None and not self.indexed:
            raise ValueError("reflections were integrated on a frame that is not indexed")
        return self

    @property
    def key(self) -> tuple[str, str, int]:
        """Identity of a result: a (run, trial, frame) is counted once however often it is delivered."""
        return (self.run_id, self.trial, self.frame_index)


class ReprocessRequest(Message):
    """An operator's request to process runs again under a named trial."""

    type_name: ClassVar[str] = "reprocess_request"
    type: Literal["reprocess_request"] = "reprocess_request"
    run_ids: list[RunId] = Field(min_length=1, max_length=1000)
    trial: TrialName
    parameters: dict[str, Any] = Field(default_factory=dict)
    requested_by: str = ""
    requested_at: float = Field(default_factory=now)


class CancelRequest(Message):
    """An operator's request to stop a job (queued or running); it ends as cancelled and is not retried."""

    type_name: ClassVar[str] = "cancel_request"
    type: Literal["cancel_request"] = "cancel_request"
    job_id: JobId
    requested_by: str = ""
    requested_at: float = Field(default_factory=now)


class ShellStatistics(BaseModel):
    """Merging statistics of one resolution shell (or of all data)."""

    model_config = ConfigDict(extra="forbid")

    d_max: float = Field(gt=0)
    d_min: float = Field(gt=0)
    observations: int = Field(ge=0)
    unique: int = Field(ge=0)
    possible: int = Field(ge=0)
    completeness: float = Field(ge=0)
    multiplicity: float = Field(ge=0)
    mean_i_over_sigma: float
    cc_half: float | None = None
    cc_star: float | None = None
    r_split: float | None = None


class MergeUpdate(Message):
    """The state of one dataset's merge, published every few seconds while it grows."""

    type_name: ClassVar[str] = "merge_update"
    type: Literal["merge_update"] = "merge_update"
    dataset_id: str = Field(min_length=1, max_length=400)
    trial: TrialName
    run_ids: list[RunId] = Field(default_factory=list)
    frames_merged: int = Field(0, ge=0)
    frames_rejected: int = Field(0, ge=0)
    overall: ShellStatistics | None = None
    shells: list[ShellStatistics] = Field(default_factory=list)
    suggested_resolution: float | None = None
    ambiguity_resolved_fraction: float | None = None
    mtz_path: str | None = None
    final: bool = False
    published_at: float = Field(default_factory=now)


class ServiceHeartbeat(Message):
    """Every service instance says it is alive every few seconds."""

    type_name: ClassVar[str] = "service_heartbeat"
    type: Literal["service_heartbeat"] = "service_heartbeat"
    service: str = Field(min_length=1)
    instance: str = Field(min_length=1)
    host: str = Field(default_factory=socket.gethostname)
    pid: int = Field(ge=0)
    started_at: float
    sent_at: float = Field(default_factory=now)
    status: Literal["starting", "running", "stopping"] = "running"
    details: dict[str, Any] = Field(default_factory=dict)


M = TypeVar("M", bound=Message)


class FileRejected(Message):
    """Ingest could not read a file of a run; the file is set aside until it changes."""

    type_name: ClassVar[str] = "file_rejected"
    type: Literal["file_rejected"] = "file_rejected"
    run_id: RunId
    path: str = Field(min_length=1)
    reason: str = Field(min_length=1)
    rejected_at: float = Field(default_factory=now)


MESSAGE_TYPES: dict[str, type[Message]] = {
    model.type_name: model
    for model in (
        RunManifest,
        JobSpec,
        JobState,
        FrameResult,
        ReprocessRequest,
        CancelRequest,
        MergeUpdate,
        ServiceHeartbeat,
        FileRejected,
    )
}


@overload
def decode_message(body: bytes | str) -> Message: ...
@overload
def decode_message(body: bytes | str, expected: type[M]) -> M: ...
def decode_message(body: bytes | str, expected: type[Message] | None = None) -> Message:
    """Decode bytes from the bus into the model its ``type`` names (or ``expected``).

    Raises MessageError with the field and the defect when the bytes are not a valid message.
    """
    if len(body) > MAX_MESSAGE_BYTES:
        raise MessageError(f"message body of {len(body)} bytes exceeds the limit of {MAX_MESSAGE_BYTES}")
    try:
        payload = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise MessageError(f"message body is not JSON: {error}") from error
    except RecursionError as error:
        raise MessageError("message body is JSON nested too deeply") from error
    if not isinstance(payload, dict):
        raise MessageError(f"message body must be a JSON object, got {type(payload).__name__}")
    type_name = payload.get("type")
    model = MESSAGE_TYPES.get(type_name) if isinstance(type_name, str) else None
    if model is None:
        raise MessageError(f"message type {type_name!r} is unknown; expected one of {sorted(MESSAGE_TYPES)}")
    if expected is not None and model is not expected:
        raise MessageError(f"expected a {expected.type_name} message, got {type_name}")
    try:
        return model.model_validate(payload)
    except ValidationError as error:
        details = "; ".join(
            f"{'.'.join(str(part) for part in item['loc']) or '(message)'}: {item['msg']}"
            for item in error.errors(include_url=False)
        )
        raise MessageError(f"invalid {type_name} message: {details}") from error
