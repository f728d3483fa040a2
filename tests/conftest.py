"""Shared fixtures: every test gets its own namespace on the real RabbitMQ and Redis, removed afterwards."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from urllib.parse import urlsplit

import kombu
import pytest

from libs.contracts.settings import Settings, get_settings
from libs.runtime.bus import Topology, connect
from libs.runtime.state import LiveState
from tests.support.namespace import AMQP_URL, cleanup, declare, make_settings, rabbitmqctl, settings_environment
from tests.support.tools import require_program, require_system_modules
from tests.support.waiting import wait_for

# Older spellings some test modules import from here; the implementations live in tests/support.
wait_until = wait_for
__all__ = ["cleanup", "make_settings", "rabbitmqctl", "settings_environment", "wait_for", "wait_until"]


@pytest.fixture
def settings() -> Iterator[Settings]:
    """A fresh namespace (declared on the broker) for one test; everything in it is deleted afterwards."""
    test_settings = make_settings()
    declare(test_settings)
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


@pytest.fixture(scope="session")
def dials_python() -> str:
    """Debian's python with dxtbx, and dials.import on PATH; the test fails (never skips) without them."""
    require_program("dials.import")
    return require_system_modules("dxtbx")


@pytest.fixture(scope="session")
def cctbx_python() -> str:
    """Debian's python with cctbx and iotbx; the test fails (never skips) without them."""
    return require_system_modules("cctbx", "iotbx")


@pytest.fixture
def live_state(settings: Settings) -> LiveState:
    return LiveState(settings)


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
