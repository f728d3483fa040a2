"""Service heartbeats: every service instance says it is alive every ``settings.heartbeat_seconds``.

Each beat writes the ServiceHeartbeat to Redis (``<ns>:service:<name>:<instance>``, expiring after three periods) and
publishes it on the control exchange (``heartbeat.<service>.<instance>``). Stopping publishes a last beat with status
``stopping`` and deletes the key, so ``sfx services`` forgets a stopped instance at once and a crashed one within
three periods.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any, Literal

from libs.contracts.messages import ServiceHeartbeat
from libs.contracts.settings import Settings, get_settings
from libs.runtime.bus import Publisher, PublishError
from libs.runtime.logging import get_logger
from libs.runtime.state import LiveState

log = get_logger(__name__)


def default_instance() -> str:
    """A name unique to this process: host, pid and a short random suffix (pids repeat across containers)."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class Heartbeat:
    """A background thread that beats until :meth:`stop`; use as a context manager around a service's life.

    ``details`` is called at each beat (e.g. a consumer's metrics) and must be cheap and thread-safe. A failing
    Redis or broker is logged and tried again at the next beat: a heartbeat never stops the service.
    """

    def __init__(
        self,
        service: str,
        *,
        instance: str | None = None,
        settings: Settings | None = None,
        details: Callable[[], dict[str, Any]] | None = None,
        publish: bool = True,
    ) -> None:
        self.settings = settings or get_settings()
        self.service = service
        self.instance = instance or default_instance()
        self.details = details or dict
        self.state = LiveState(self.settings)
        self.publish = publish
        self.started_at = time.time()
        self.beats = 0
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._publisher: Publisher | None = None

    def start(self) -> Heartbeat:
        self._beat("starting")
        self._thread = threading.Thread(target=self._loop, name=f"heartbeat-{self.service}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop beating, announce ``stopping`` and delete the Redis key."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=2 * self.settings.heartbeat_seconds + 5)
        self._beat("stopping", write_state=False)
        try:
            self.state.remove_heartbeat(self.service, self.instance)
        except Exception as error:
            log.warning("could not remove heartbeat key", service=self.service, error=repr(error))
        if self._publisher is not None:
            self._publisher.close()

    def __enter__(self) -> Heartbeat:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _loop(self) -> None:
        while not self._stopping.wait(self.settings.heartbeat_seconds):
            self._beat("running")

    def _beat(self, status: Literal["starting", "running", "stopping"], write_state: bool = True) -> None:
        try:
            details = self.details()
        except Exception as error:
            details = {"details_error": repr(error)}
        heartbeat = ServiceHeartbeat(
            service=self.service,
            instance=self.instance,
            pid=os.getpid(),
            started_at=self.started_at,
            status=status,
            details=details,
        )
        if write_state:
            try:
                self.state.write_heartbeat(heartbeat)
            except Exception as error:
                log.warning("heartbeat not written to Redis", service=self.service, error=repr(error))
        if self.publish:
            try:
                if self._publisher is None:
                    # Short retry budget: a beat that cannot be published is replaced by the next one.
                    self._publisher = Publisher(
                        self.settings, role=f"heartbeat {self.service}", retry_seconds=2.0, confirm_timeout=2.0
                    )
                self._publisher.publish(heartbeat)
            except PublishError as error:
                log.warning("heartbeat not published", service=self.service, error=str(error))
        self.beats += 1
