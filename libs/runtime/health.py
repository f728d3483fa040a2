"""The HTTP endpoint of a long-running service: ``/metrics``, ``/healthz`` and ``/readyz``; and the broker probes.

One port per service (``settings.metrics_port`` plus the service's offset in :data:`PORT_OFFSETS`, so ``sfx up``
fits the three services on one host; 0 disables it), served by the standard library's ``ThreadingHTTPServer`` in a
daemon thread: a slow scrape or probe never touches the service's own threads.

- ``/metrics``: the service's registry (:class:`libs.runtime.metrics.ServiceMetrics`) in Prometheus's text format.
- ``/healthz`` (liveness): 200 while the service's threads make progress, i.e. its main loop and heartbeat beat,
  every periodic task finished a round within ``STALE_PERIODS`` periods (at least ``STALE_MIN_SECONDS``), and no
  consumer stopped on an error; 503 with the reasons otherwise. A task that is late while the broker or Redis was
  away within that time is waiting out the outage (a publish waits up to SFX_BROKER_OUTAGE_SECONDS), not hung: that
  is what ``/readyz`` reports, and restarting the service would not help.
- ``/readyz`` (readiness): 200 when the broker and Redis accept a login right now, 503 naming the one that does not.
  Each check gives up after ``PROBE_TIMEOUT_SECONDS``; both run at once.

Both health answers are JSON: ``{"status": "ok" | "unhealthy" | "unready", "problems": [...], ...}``.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import kombu
import redis
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from libs.contracts.settings import Settings, redacted_url
from libs.runtime.bus import DEAD_LETTER_QUEUE, SERVICE_QUEUES, Topology
from libs.runtime.logging import get_logger
from libs.runtime.metrics import ServiceMetrics

log = get_logger(__name__)

PORT_OFFSETS = {"ingest": 0, "dispatcher": 1, "merger": 2}
"""Added to SFX_METRICS_PORT per service; any other service name (tests, new services) gets offset 0."""

PROBE_TIMEOUT_SECONDS = 1.5
STALE_PERIODS = 10
STALE_MIN_SECONDS = 30.0  # a merger tick that finalises a large dataset takes a while; so does a backend poll


def metrics_port(service: str, settings: Settings) -> int | None:
    """The port of ``service``'s endpoint; None when SFX_METRICS_PORT is 0 (disabled)."""
    if settings.metrics_port == 0:
        return None
    return settings.metrics_port + PORT_OFFSETS.get(service, 0)


# -- readiness -------------------------------------------------------------------------------------------------------


def _check_broker(settings: Settings) -> None:
    connection = kombu.Connection(settings.amqp_url, connect_timeout=PROBE_TIMEOUT_SECONDS, heartbeat=0)
    try:
        connection.ensure_connection(max_retries=0)  # one attempt: kombu's connect() would retry after 2 s
    finally:
        with contextlib.suppress(Exception):
            connection.release()


def _check_redis(settings: Settings) -> None:
    client = redis.Redis.from_url(
        settings.redis_url, socket_timeout=PROBE_TIMEOUT_SECONDS, socket_connect_timeout=PROBE_TIMEOUT_SECONDS
    )
    try:
        client.ping()
    finally:
        client.close()


def dependency_problems(settings: Settings) -> list[str]:
    """Why the broker or Redis is not usable right now (empty when both are); at most about 2 s, probes in parallel."""
    checks: dict[str, tuple[Callable[[Settings], None], str]] = {
        "broker": (_check_broker, settings.amqp_url),
        "redis": (_check_redis, settings.redis_url),
    }
    errors: dict[str, str] = {}

    def run(name: str, check: Callable[[Settings], None]) -> None:
        try:
            check(settings)
        except Exception as error:
            errors[name] = repr(error)[:300]

    threads = {
        name: threading.Thread(target=run, args=(name, check), name=f"readiness-{name}", daemon=True)
        for name, (check, _) in checks.items()
    }
    for thread in threads.values():
        thread.start()
    deadline = time.monotonic() + PROBE_TIMEOUT_SECONDS + 0.5
    problems = []
    for name, thread in threads.items():
        thread.join(max(0.0, deadline - time.monotonic()))
        url = redacted_url(checks[name][1])
        if thread.is_alive():  # a server that accepted but does not answer: left to time out on its own
            problems.append(f"{name} not reachable at {url}: no answer within {PROBE_TIMEOUT_SECONDS} s")
        elif name in errors:
            problems.append(f"{name} not reachable at {url}: {errors[name]}")
    return problems


# -- liveness --------------------------------------------------------------------------------------------------------


@dataclass
class _Beat:
    period_seconds: float
    last_seen: float


class Liveness:
    """What ``/healthz`` judges: named beats (the main loop, the heartbeat, each periodic task) and extra checks.

    A beat is stale after ``STALE_PERIODS`` of its periods without :meth:`beat` (at least ``STALE_MIN_SECONDS``).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._beats: dict[str, _Beat] = {}
        self._checks: list[Callable[[], str | None]] = []
        self._outage_seen_at = 0.0

    def expect(self, name: str, period_seconds: float) -> None:
        """``name`` should beat every ``period_seconds`` from now on."""
        with self._lock:
            self._beats[name] = _Beat(period_seconds, time.monotonic())

    def beat(self, name: str) -> None:
        with self._lock:
            self._beats[name].last_seen = time.monotonic()

    def add_check(self, check: Callable[[], str | None]) -> None:
        """A check that returns a problem (text) or None; called at each ``/healthz``, so it must be cheap."""
        self._checks.append(check)

    def outage_seen(self) -> None:
        """The broker or Redis was found unreachable: late beats within the stale limit are an outage's doing."""
        with self._lock:
            self._outage_seen_at = time.monotonic()

    def stale(self) -> list[tuple[str, float, float]]:
        """(name, seconds since its last beat, limit) of every stale beat."""
        current = time.monotonic()
        with self._lock:
            late = []
            for name, beat in self._beats.items():
                limit = max(STALE_PERIODS * beat.period_seconds, STALE_MIN_SECONDS)
                if current - beat.last_seen > limit:
                    late.append((name, current - beat.last_seen, limit))
            return late

    def problems(self, settings: Settings) -> list[str]:
        problems = [problem for check in self._checks if (problem := check()) is not None]
        late = self.stale()
        if late:
            outage = dependency_problems(settings)  # only probed when something is late: /healthz stays cheap
            if outage:
                self.outage_seen()
            with self._lock:
                recent_outage = time.monotonic() - self._outage_seen_at
            for name, seconds, limit in late:
                if recent_outage > limit:
                    problems.append(f"{name} has not run for {seconds:.0f} s (limit {limit:.0f} s)")
        return problems


# -- the server ------------------------------------------------------------------------------------------------------


class HealthServer:
    """Serves ``/metrics``, ``/healthz`` and ``/readyz`` of one service on ``port`` (0: any free port)."""

    def __init__(self, port: int, metrics: ServiceMetrics, liveness: Liveness, settings: Settings) -> None:
        self.metrics = metrics
        self.liveness = liveness
        self.settings = settings
        self._server = ThreadingHTTPServer(("", port), self._handler_class())
        self._server.daemon_threads = True
        self.port = int(self._server.server_address[1])
        self._thread: threading.Thread | None = None

    def start(self) -> HealthServer:
        self._thread = threading.Thread(target=self._server.serve_forever, name="health-http", daemon=True)
        self._thread.start()
        log.info("metrics and health endpoint listening", port=self.port, service=self.metrics.service)
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def health(self) -> tuple[int, dict[str, Any]]:
        problems = self.liveness.problems(self.settings)
        return (503, {"status": "unhealthy", "problems": problems}) if problems else (200, {"status": "ok"})

    def readiness(self) -> tuple[int, dict[str, Any]]:
        problems = dependency_problems(self.settings)
        if problems:
            self.liveness.outage_seen()
            return 503, {"status": "unready", "problems": problems}
        return 200, {"status": "ok"}

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # the name http.server calls
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._send(200, server.metrics.exposition(), CONTENT_TYPE_LATEST)
                elif path in ("/healthz", "/readyz"):
                    status, body = server.health() if path == "/healthz" else server.readiness()
                    body["service"] = server.metrics.service
                    self._send(status, json.dumps(body).encode(), "application/json")
                else:
                    self._send(404, b"not found: try /metrics, /healthz or /readyz\n", "text/plain")

            def _send(self, status: int, body: bytes, content_type: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # one line per scrape would drown the service's own log

        return Handler


def start_health_server(
    service: str, metrics: ServiceMetrics, liveness: Liveness, settings: Settings
) -> HealthServer | None:
    """Start the endpoint of ``service`` on its port; None when disabled or the port is taken (logged: observability
    must never stop a service that processes data)."""
    port = metrics_port(service, settings)
    if port is None:
        return None
    try:
        return HealthServer(port, metrics, liveness, settings).start()
    except OSError as error:
        log.error("metrics and health endpoint not started", port=port, service=service, error=repr(error))
        return None


# -- queue depths ----------------------------------------------------------------------------------------------------


def work_queues(settings: Settings) -> list[tuple[str, str]]:
    """(label, broker name) of every service queue and of the dead-letter queue; the label drops the namespace."""
    topology = Topology(settings)
    return [(spec.name, topology.name(spec.name)) for spec in SERVICE_QUEUES] + [
        (DEAD_LETTER_QUEUE, topology.name(DEAD_LETTER_QUEUE))
    ]


class QueueDepthProbe:
    """Reads the ready messages of queues with a passive declare, into ``sfx_queue_depth_messages``.

    ``queues`` are (label, broker name) pairs. One connection, opened on first use and again after an error; a queue
    that does not exist (yet) is skipped. Meant for a periodic task of a few seconds.
    """

    def __init__(self, settings: Settings, queues: Sequence[tuple[str, str]], metrics: ServiceMetrics) -> None:
        self.settings = settings
        self.queues = list(queues)
        self.metrics = metrics
        self._connection: kombu.Connection | None = None

    def sample(self) -> None:
        for label, name in self.queues:
            try:
                if self._connection is None:
                    self._connection = kombu.Connection(
                        self.settings.amqp_url, connect_timeout=PROBE_TIMEOUT_SECONDS, heartbeat=0
                    )
                    self._connection.ensure_connection(max_retries=0)
                _, ready, _ = self._connection.default_channel.queue_declare(name, passive=True)
            except Exception as error:  # a probe: whatever went wrong, the depth is read again next time
                self.close()  # a missing queue closes the channel; a lost broker the connection: start afresh
                log.debug("queue depth not read", queue=name, error=repr(error))
                continue
            self.metrics.queue_depth.labels(self.metrics.service, label).set(int(ready))

    def close(self) -> None:
        if self._connection is not None:
            with contextlib.suppress(Exception):
                self._connection.release()
        self._connection = None
