"""Where analysis jobs run (the backends); every name is re-exported from ``local.py`` for now."""

from services.dispatcher.backends.local import (
    CANCEL_GRACE_SECONDS,
    Backend,
    BackendError,
    BackendJobStatus,
    LocalMpiBackend,
    RunState,
)

__all__ = ["CANCEL_GRACE_SECONDS", "Backend", "BackendError", "BackendJobStatus", "LocalMpiBackend", "RunState"]
