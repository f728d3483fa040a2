"""The shell every long-running service shares: logging, heartbeat, consumers, periodic work, clean stop.

A service is consumers (bus queues with handlers) plus periodic tasks; :func:`run_service` starts them, beats, and
stops them in order on SIGTERM or SIGINT (acks of finished work are sent, unfinished deliveries go back to the
broker), so that a service can be restarted at any moment without losing or double-counting anything.

Cross-cutting behaviour around the handlers is chosen here too: ``run_service(..., middleware=[...])`` gives one
middleware list to every consumer of the service (default :data:`~libs.runtime.bus.STANDARD_MIDDLEWARE`, logging
and counters), so a service's ``__main__`` adds, say, an exporter by adding it to that list.

Wrong credentials stop a service at once (:func:`check_credentials`), with a message that names the user and the
server but never the password, instead of a service that retries a login forever.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

import amqp
import kombu
import redis

from libs.contracts.settings import Settings, get_settings, redacted_url
from libs.runtime import metrics as service_metrics
from libs.runtime.bus import STANDARD_MIDDLEWARE, Consumer, Middleware, connect, declare_topology
from libs.runtime.health import Liveness, start_health_server
from libs.runtime.heartbeat import Heartbeat
from libs.runtime.logging import configure_logging, get_logger
from libs.runtime.metrics import ServiceMetrics

log = get_logger(__name__)


@dataclass
class PeriodicTask:
    """``action`` every ``period_seconds`` in its own thread; an exception is logged and the task goes on."""

    name: str
    period_seconds: float
    action: Callable[[], None]


def _run_periodic(task: PeriodicTask, stopping: threading.Event, liveness: Liveness) -> None:
    while not stopping.wait(task.period_seconds):
        try:
            task.action()
        except Exception as error:
            log.exception("periodic task failed", task=task.name, error=repr(error))
        finally:
            liveness.beat(task.name)  # a round that failed still shows the task's thread is not stuck


class CredentialsError(RuntimeError):
    """RabbitMQ or Redis refused the login of the settings: retrying cannot help, the configuration must change."""


def check_credentials(settings: Settings) -> None:
    """Log in to RabbitMQ and Redis once; :class:`CredentialsError` naming the user and server when one refuses.

    Only a refused login is an error here: a server that does not answer yet is the business of the reconnecting
    clients (services wait out outages).
    """
    amqp_url = settings.amqp_url
    try:
        with connect(settings, role="credentials check"):
            pass
    except amqp.exceptions.AccessRefused as error:
        user = kombu.Connection(amqp_url).info()["userid"]
        raise CredentialsError(
            f"RabbitMQ refused the login of user {user} at {redacted_url(amqp_url)} (SFX_AMQP_URL): {error.reply_text}"
        ) from None  # the chained error would repeat nothing useful; the URL above is already redacted
    except amqp.exceptions.NotAllowed as error:  # the login is fine but the user may not use this virtual host
        user = kombu.Connection(amqp_url).info()["userid"]
        raise CredentialsError(
            f"RabbitMQ refused user {user} its virtual host at {redacted_url(amqp_url)} (SFX_AMQP_URL): "
            f"{error.reply_text}"
        ) from None
    except (OSError, *kombu.Connection(amqp_url).connection_errors):
        log.warning("broker not reachable at start; going on", url=redacted_url(amqp_url))
    redis_url = settings.redis_url
    client = redis.Redis.from_url(redis_url, socket_timeout=5)
    try:
        client.ping()
    except (redis.AuthenticationError, redis.exceptions.NoPermissionError) as error:
        user = unquote(urlsplit(redis_url).username or "") or "default"  # no user in the URL: Redis's default user
        raise CredentialsError(
            f"Redis refused the credentials of user {user} at {redacted_url(redis_url)} (SFX_REDIS_URL): {error}"
        ) from None
    except redis.ConnectionError:
        log.warning("Redis not reachable at start; going on", url=redacted_url(redis_url))
    finally:
        client.close()


def run_service(
    name: str,
    consumers: Sequence[Consumer] = (),
    tasks: Sequence[PeriodicTask] = (),
    *,
    middleware: Sequence[Middleware] = STANDARD_MIDDLEWARE,
    settings: Settings | None = None,
    details: Callable[[], dict[str, Any]] | None = None,
    on_stop: Callable[[], None] | None = None,
    stopping: threading.Event | None = None,
    metrics: ServiceMetrics | None = None,
) -> int:
    """Run until SIGTERM/SIGINT (or ``stopping`` is set); returns the exit status.

    Every consumer's handler is wrapped in ``middleware`` (first outermost), replacing what the consumer was built
    with: the service's assembly point decides, not the module that built the consumer.

    ``metrics`` (made here unless given) becomes the process's current service metrics, fed by every consumer, and
    is served with the health checks on the service's port (:mod:`libs.runtime.health`) while the service runs.
    """
    settings = settings or get_settings()
    try:
        check_credentials(settings)
    except CredentialsError as error:
        log.error("credentials refused; not starting", service=name, error=str(error))
        return 2
    metrics = metrics or ServiceMetrics(name)
    for consumer in consumers:
        consumer.use_middleware(middleware)
        consumer.metrics.export_to(metrics, consumer.queue.name.removeprefix(f"{settings.namespace}."))
    stopping = stopping or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: stopping.set())
    declare_topology(settings)
    liveness = _liveness(consumers, tasks, settings)
    threads = [
        threading.Thread(target=_run_periodic, args=(task, stopping, liveness), name=task.name, daemon=True)
        for task in tasks
    ]
    service_metrics.install(metrics)
    health_server = start_health_server(name, metrics, liveness, settings)
    try:
        with Heartbeat(name, settings=settings, details=details) as heartbeat:
            for consumer in consumers:
                consumer.start()
            for thread in threads:
                thread.start()
            log.info("service running", consumers=[c.name for c in consumers], tasks=[t.name for t in tasks])
            beats_seen = heartbeat.beats
            while not stopping.wait(0.5):
                liveness.beat(MAIN_LOOP)
                if heartbeat.beats != beats_seen:
                    beats_seen = heartbeat.beats
                    liveness.beat(HEARTBEAT)
                failed = [c for c in consumers if c.error is not None]
                if failed:
                    log.error("consumer failed; stopping", consumer=failed[0].name, error=repr(failed[0].error))
                    stopping.set()
            log.info("service stopping")
            for consumer in consumers:
                consumer.stop()
            for thread in threads:
                thread.join(timeout=10)
            if on_stop is not None:
                on_stop()
    finally:
        if health_server is not None:
            health_server.stop()
        service_metrics.uninstall(metrics)
    return 0 if not any(c.error for c in consumers) else 1


MAIN_LOOP = "main loop"
HEARTBEAT = "heartbeat"


def _liveness(consumers: Sequence[Consumer], tasks: Sequence[PeriodicTask], settings: Settings) -> Liveness:
    """What /healthz watches: the main loop (every 0.5 s), the heartbeat, each periodic task, the consumers."""
    liveness = Liveness()
    liveness.expect(MAIN_LOOP, 0.5)
    liveness.expect(HEARTBEAT, settings.heartbeat_seconds)
    for task in tasks:
        liveness.expect(task.name, task.period_seconds)

    def consumers_running() -> str | None:
        failed = [f"{c.name}: {c.error!r}" for c in consumers if c.error is not None]
        return f"consumer stopped on an error ({'; '.join(failed)})" if failed else None

    liveness.add_check(consumers_running)
    return liveness


def start_logging(name: str, settings: Settings | None = None) -> Settings:
    """Configure logging for a service process and check its credentials; returns its settings.

    The check is here as well as in :func:`run_service` because a service's ``__main__`` builds its objects, which
    read Redis, before it runs: wrong credentials must stop it with the clear message, not a traceback.
    """
    settings = settings or get_settings()
    configure_logging(name, settings.log_format, settings.log_level)
    try:
        check_credentials(settings)
    except CredentialsError as error:
        log.error("credentials refused; not starting", service=name, error=str(error))
        raise SystemExit(2) from None
    return settings
