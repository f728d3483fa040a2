"""The end-to-end harness: the sfx services of one namespace, started as ``sfx up`` starts them, and what tests need
around them (the live state, publishing, subscribing, the ``sfx`` command, waiting with the services' logs).

    with Services(tmp_path, ("dispatcher", "merger"), job_retries=2) as services:
        states = services.subscribe("test.job-states", JobState, "results", ["job.#"])
        services.publish(ReprocessRequest(run_ids=["r1"], trial="strict"))
        job = services.wait_for(lambda: services.state.job("r1.strict"), what="the job of r1")
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Generic, TypeVar

from libs.contracts.messages import FINAL_STATUSES, Message
from libs.contracts.settings import Settings
from libs.runtime.bus import Consumer, Publisher, Topology, connect, running
from libs.runtime.state import LiveState
from sfx.services_control import SERVICES, running_pid, start_services, stop_services
from tests.support.namespace import cleanup, declare, make_settings, settings_environment
from tests.support.waiting import wait_for

REPO = Path(__file__).resolve().parents[2]
SERVICE_TIMEOUT = 240.0
"""Seconds a service-level condition may take: generous, as mpiexec jobs share two cores with everything else."""

M = TypeVar("M", bound=Message)
T = TypeVar("T")


class Recorder(Generic[M]):
    """Every message a test queue received, in arrival order (filled by a consumer thread)."""

    def __init__(self) -> None:
        self._messages: list[M] = []
        self._lock = threading.Lock()

    def record(self, message: M) -> None:
        with self._lock:
            self._messages.append(message)

    def messages(self, where: Callable[[M], bool] = lambda _: True) -> list[M]:
        """A snapshot of the messages received so far that satisfy ``where``."""
        with self._lock:
            return [message for message in self._messages if where(message)]


class Services:
    """The services ``names`` of a fresh namespace whose folders live under ``root``; ``settings`` overrides the
    test defaults (see :func:`make_settings`). Use as a context manager: everything is stopped and deleted after."""

    def __init__(self, root: Path, names: Sequence[str] = SERVICES, **settings: Any) -> None:
        self.root = root
        self.names = tuple(names)
        self.settings: Settings = make_settings(work_dir=root / "services", **settings)
        self.env = settings_environment(self.settings)
        self.state = LiveState(self.settings)
        self._subscriptions = contextlib.ExitStack()
        self._test_queues: list[str] = []

    @property
    def work_dir(self) -> Path:
        return self.settings.work_dir

    # --- lifecycle -------------------------------------------------------------------------------------------------

    def __enter__(self) -> Services:
        try:
            self.start()
        except BaseException:
            self.close()  # what did start (and any subscription) must not outlive a failed start
            raise
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()

    def start(self, *names: str) -> None:
        """Start the named services (all of this harness's by default) unless they run already."""
        declare(self.settings)
        start_services(self.work_dir, names or self.names, env=self.env)

    def stop(self, *names: str) -> None:
        """Stop the named services (all by default) the way ``sfx down`` does: SIGTERM, then SIGKILL."""
        stop_services(self.work_dir, names or self.names)

    def kill(self, name: str) -> None:
        """Kill a service hard (SIGKILL to its process group: no chance to save anything) and reap it."""
        pid = running_pid(self.work_dir, name)
        assert pid is not None, f"{name} is not running"
        os.killpg(pid, signal.SIGKILL)
        os.waitpid(pid, 0)  # our child (start_services started it): reap it

    def close(self) -> None:
        """Stop everything this harness started (services, subscriptions, left-over analysis jobs), delete the
        namespace."""
        try:
            self._subscriptions.close()
            self.stop()
            self._kill_left_over_jobs()
            with connect(self.settings, role="test-cleanup") as connection:
                channel = connection.channel()
                for queue in self._test_queues:
                    channel.queue_delete(queue)
        finally:
            cleanup(self.settings)

    def _kill_left_over_jobs(self) -> None:
        """An analysis job the dispatcher started and never saw end (its folder has a pid, no exit code)."""
        for folder in (self.work_dir / "jobs").glob("*"):
            if (folder / "pid").exists() and not (folder / "exit_code").exists():
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(int((folder / "pid").read_text()), signal.SIGKILL)

    # --- the bus ---------------------------------------------------------------------------------------------------

    def publish(self, *messages: Message) -> None:
        with Publisher(self.settings, role="test") as publisher:
            for message in messages:
                publisher.publish(message)

    def subscribe(
        self, queue_name: str, message_type: type[M], exchange: str, binding_keys: Iterable[str]
    ) -> Recorder[M]:
        """Record every ``message_type`` routed to a test queue ``queue_name`` until the harness closes."""
        declare(self.settings)  # the exchange must exist before the queue is bound to it
        queue = Topology(self.settings).work_queue(queue_name, exchange, list(binding_keys))
        self._test_queues.append(queue.name)
        recorder: Recorder[M] = Recorder()
        consumer = Consumer(queue, message_type, recorder.record, settings=self.settings, name=queue_name)
        self._subscriptions.enter_context(running(consumer))
        return recorder

    def queue_depth(self, logical_name: str) -> int:
        """Messages ready on a service queue (e.g. ``merger.frames``) and not yet delivered to a consumer."""
        with connect(self.settings, role="test-probe") as connection:
            _, ready, _ = connection.channel().queue_declare(Topology(self.settings).name(logical_name), passive=True)
        return int(ready)

    # --- the live state --------------------------------------------------------------------------------------------

    def job_ended(self, job_id: str) -> bool:
        """The job is over (succeeded, failed or cancelled): it publishes nothing more."""
        job = self.state.job(job_id)
        return job is not None and job.status in FINAL_STATUSES

    # --- waiting and the command line ------------------------------------------------------------------------------

    def wait_for(self, condition: Callable[[], T], timeout: float = SERVICE_TIMEOUT, what: str = "a condition") -> T:
        """:func:`tests.support.waiting.wait_for`, showing the services' last log lines if it times out."""
        return wait_for(condition, timeout, what, interval=0.1, explain=self.service_logs)

    def service_logs(self, lines: int = 12) -> str:
        """The last ``lines`` of each service's log, for a failure message."""
        sections = []
        for log in sorted((self.work_dir / "logs").glob("*.log")):
            tail = log.read_text(errors="replace").splitlines()[-lines:]
            sections.append(f"--- {log.name}\n" + "\n".join(line[:300] for line in tail))
        return "\n".join(sections)

    def sfx(self, *arguments: str, check: bool = False) -> subprocess.CompletedProcess[str]:
        """Run the ``sfx`` command in this namespace (as an operator's shell with its SFX_* variables would)."""
        return subprocess.run(
            [sys.executable, "-m", "sfx", *arguments],
            capture_output=True,
            text=True,
            env=self.env,
            cwd=REPO,
            check=check,
        )

    def simulate(self, out: Path, frames: int, seed: int, *extra: str) -> Path:
        """``sfx simulate`` a run of ``frames`` frames into ``out``."""
        self.sfx("simulate", "--out", str(out), "--frames", str(frames), "--seed", str(seed), *extra, check=True)
        return out
