"""Where analysis jobs run. A backend starts, polls and cancels jobs; one poll covers all of its jobs.

Backends are plug-ins: each is a module of this package, and ``BACKENDS`` names them; the setting ``SFX_BACKEND``
chooses one and ``make_backend(settings)`` builds it. A new backend is its module plus one entry in ``BACKENDS``, and
``tests/test_backends.py`` runs the same contract tests on it unchanged.

Every backend must keep its own record of its jobs (files, a scheduler's queue), so that a new instance, in a
restarted dispatcher, polls the jobs the previous one started: no job is forgotten or started twice.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import StrEnum
from typing import Protocol

from pydantic import BaseModel

from libs.contracts.messages import JobSpec
from libs.contracts.settings import Settings


class BackendError(RuntimeError):
    """A job could not be started or controlled; the text says which and why."""


class UnknownBackendError(ValueError):
    """``SFX_BACKEND`` names no registered backend."""


class RunState(StrEnum):
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"  # ended because of cancel()
    LOST = "lost"  # ended without saying how (killed from outside, machine restarted)


class BackendJobStatus(BaseModel):
    """What the backend knows of one job."""

    job_id: str
    backend_id: str
    state: RunState
    exit_code: int | None = None
    detail: str = ""  # for an ended job: the end of its log, where the error is


class Backend(Protocol):
    """The interface every backend (local mpiexec today; Slurm, Kubernetes later) implements."""

    name: str

    def start(self, spec: JobSpec) -> str:
        """Start the job; returns the backend's handle for it."""
        ...

    def poll(self) -> dict[str, BackendJobStatus]:
        """The state of every job this backend knows, in one call, including jobs a previous instance started."""
        ...

    def cancel(self, job_id: str) -> None:
        """Stop a job (no error when it already ended); it then polls as cancelled."""
        ...

    def forget(self, job_id: str) -> None:
        """Leave an ended job out of future polls."""
        ...


BackendFactory = Callable[[Settings], Backend]


def _local_backend(settings: Settings) -> Backend:
    # Backend modules are imported only when chosen, so one backend's dependencies (a Slurm client, say) are not
    # needed where another runs, and the modules may import the shared types above without an import cycle.
    from services.dispatcher.backends.local import LocalMpiBackend

    return LocalMpiBackend.from_settings(settings)


BACKENDS: dict[str, BackendFactory] = {
    "local": _local_backend,
}


def make_backend(settings: Settings) -> Backend:
    """The backend ``settings.backend`` (``SFX_BACKEND``) names.

    The name is checked here, against ``BACKENDS``, rather than in Settings: the settings module may not import
    services, a second list of names there would have to be kept in step with this one, and the other services,
    which never run jobs, should not refuse to start over a setting only the dispatcher reads.
    """
    factory = BACKENDS.get(settings.backend)
    if factory is None:
        known = ", ".join(sorted(BACKENDS))
        raise UnknownBackendError(f"SFX_BACKEND={settings.backend!r} is not a known backend (known: {known})")
    return factory(settings)


__all__ = [
    "BACKENDS",
    "Backend",
    "BackendError",
    "BackendFactory",
    "BackendJobStatus",
    "RunState",
    "UnknownBackendError",
    "make_backend",
]
