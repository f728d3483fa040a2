"""The broker goes away: cut for 10 s and for 90 s (a relay in front of the shared broker), and every connection of
the pipeline's virtual host closed by the broker itself."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.faults.support import Pipeline, Reference, Row, assert_clean, audit, disturbed_run
from tests.support.faults import relay_for
from tests.support.namespace import AMQP_URL, rabbitmqctl


@pytest.mark.parametrize("outage_seconds", [10, 90])
def test_broker_away_mid_run(
    outage_seconds: int,
    tmp_path: Path,
    source_run: Path,
    reference: Reference,
    record_row: Callable[[Row], None],
) -> None:
    # Every service, and the analysis ranks that inherit their environment, reach the broker only through the relay.
    with relay_for(AMQP_URL) as relay, Pipeline(tmp_path, amqp_url=relay.url(AMQP_URL)) as pipeline:

        def outage() -> float:
            relay.cut()
            try:
                time.sleep(outage_seconds)
            finally:
                relay.restore()
            return time.monotonic()

        update, recovery = disturbed_run(pipeline, source_run, outage)
        result = audit(pipeline, f"RabbitMQ away {outage_seconds} s", reference, recovery, record_row, update)
        assert_clean(result, update, reference)


@pytest.fixture
def own_vhost() -> Iterator[str]:
    vhost = f"sfx-faults-{uuid.uuid4().hex[:8]}"
    rabbitmqctl("add_vhost", vhost)
    try:
        rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
        yield vhost
    finally:
        rabbitmqctl("delete_vhost", vhost)


def test_broker_closes_every_connection_of_the_vhost(
    own_vhost: str, tmp_path: Path, source_run: Path, reference: Reference, record_row: Callable[[Row], None]
) -> None:
    url = urlsplit(AMQP_URL)._replace(path=f"/{own_vhost}").geturl()
    with Pipeline(tmp_path, amqp_url=url) as pipeline:

        def close_connections() -> float:
            rabbitmqctl("close_all_connections", "--vhost", own_vhost, "fault")
            return time.monotonic()

        update, recovery = disturbed_run(pipeline, source_run, close_connections)
        result = audit(pipeline, "vhost connections closed", reference, recovery, record_row, update)
        assert_clean(result, update, reference)
