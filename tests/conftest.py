"""Shared fixtures: every test gets its own namespace on the real RabbitMQ and Redis, removed afterwards."""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from urllib.parse import urlsplit

import kombu
import pytest

from libs.contracts.settings import Settings, get_settings
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
    }
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


def settings_environment(settings: Settings) -> dict[str, str]:
    """The environment that gives a subprocess (a service, the ``sfx`` command) the same settings."""
    return {**os.environ, **settings.to_environment(), "SFX_LOG_FORMAT": "json"}


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``condition`` until it holds; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


def cleanup(settings: Settings) -> None:
    """Delete the namespace's queues, exchanges and Redis keys."""
    try:
        with connect(settings, role="test-cleanup") as connection:
            Topology(settings).delete(connection)
    finally:
        LiveState(settings).delete_namespace()


@pytest.fixture
def settings() -> Iterator[Settings]:
    """A fresh namespace (declared on the broker) for one test; everything in it is deleted afterwards."""
    test_settings = make_settings()
    with connect(test_settings, role="test-setup") as connection:
        Topology(test_settings).declare(connection)
    yield test_settings
    cleanup(test_settings)


@pytest.fixture
def scratch_queues(settings: Settings) -> Iterator[list[kombu.Queue]]:
    """Queues a test declares beyond the topology (append them): deleted after the test."""
    queues: list[kombu.Queue] = []
    yield queues
    with connect(settings, role="test-cleanup") as connection:
        channel = connection.channel()
        for queue in queues:
            channel.queue_delete(queue.name)


@pytest.fixture
def cli_environment(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Iterator[Settings]:
    """SFX_* variables of the test's namespace, so in-process ``sfx`` commands (``get_settings()``) use it."""
    for name, value in settings_environment(settings).items():
        monkeypatch.setenv(name, value)
    get_settings.cache_clear()
    yield settings
    get_settings.cache_clear()


@pytest.fixture
def live_state(settings: Settings) -> LiveState:
    return LiveState(settings)


def rabbitmqctl(*arguments: str) -> str:
    """Run rabbitmqctl (the broker's own admin tool) and return its output; raise with its message on failure."""
    result = subprocess.run(["rabbitmqctl", *arguments], capture_output=True, text=True, timeout=60, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"rabbitmqctl {' '.join(arguments)} failed: {result.stderr.strip() or result.stdout}")
    return result.stdout


@pytest.fixture
def vhost_settings() -> Iterator[Settings]:
    """A namespace in a virtual host of its own, so a test may drop every connection of it without touching others."""
    vhost = f"sfx-test-{uuid.uuid4().hex[:8]}"
    rabbitmqctl("add_vhost", vhost)
    try:
        rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
        test_settings = make_settings(amqp_url=urlsplit(AMQP_URL)._replace(path=f"/{vhost}").geturl())
        with connect(test_settings, role="test-setup") as connection:
            Topology(test_settings).declare(connection)
        yield test_settings
        LiveState(test_settings).delete_namespace()
    finally:
        rabbitmqctl("delete_vhost", vhost)
