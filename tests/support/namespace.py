"""A namespace of its own on the real RabbitMQ and Redis for each test (or test module), and its removal."""

from __future__ import annotations

import contextlib
import os
import subprocess
import uuid
from collections.abc import Iterator

import kombu
import kombu.simple

from libs.contracts.settings import Settings
from libs.runtime.bus import Topology, connect
from libs.runtime.state import LiveState

AMQP_URL = os.environ.get("SFX_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")
REDIS_URL = os.environ.get("SFX_REDIS_URL", "redis://127.0.0.1:6379/0")


def make_settings(**overrides: object) -> Settings:
    """Settings on the real servers with a namespace no other test (or deployment) uses."""
    values: dict[str, object] = {
        "amqp_url": AMQP_URL,
        "redis_url": REDIS_URL,
        "namespace": f"test-{uuid.uuid4().hex[:10]}",
        "heartbeat_seconds": 0.5,
        "state_ttl_seconds": 3600,
        "metrics_port": 0,  # tests that scrape choose a free port; the others must not fight over 9100-9102
    }
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


def settings_environment(settings: Settings) -> dict[str, str]:
    """The environment that gives a subprocess (a service, the ``sfx`` command) the same settings."""
    return {**os.environ, **settings.to_environment(), "SFX_LOG_FORMAT": "json"}


def declare(settings: Settings) -> None:
    """Declare the namespace's exchanges and queues (idempotent)."""
    with connect(settings, role="test-setup") as connection:
        Topology(settings).declare(connection)


def cleanup(settings: Settings) -> None:
    """Delete the namespace's queues, exchanges and Redis keys."""
    try:
        with connect(settings, role="test-cleanup") as connection:
            Topology(settings).delete(connection)
    finally:
        LiveState(settings).delete_namespace()


def rabbitmqctl(*arguments: str) -> str:
    """Run rabbitmqctl (the broker's own admin tool) and return its output; raise with its message on failure."""
    result = subprocess.run(["rabbitmqctl", *arguments], capture_output=True, text=True, timeout=60, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"rabbitmqctl {' '.join(arguments)} failed: {result.stderr.strip() or result.stdout}")
    return result.stdout


@contextlib.contextmanager
def listening(settings: Settings, exchange: str, routing_key: str, name: str) -> Iterator[kombu.simple.SimpleQueue]:
    """A queue of the test's own (``<ns>.test-<name>``, deleted when unused) bound to one of the namespace's
    exchanges, declared before the test acts, so it sees everything published from then on."""
    bound_to = kombu.Exchange(Topology(settings).name(exchange), type="topic", durable=True)
    queue = kombu.Queue(f"{settings.namespace}.test-{name}", bound_to, routing_key=routing_key, auto_delete=True)
    with connect(settings, role=f"test-{name}") as connection:
        simple = connection.SimpleQueue(queue)
        try:
            yield simple
        finally:
            simple.close()
