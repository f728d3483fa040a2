"""The broker connection of the operators' commands (``sfx bus``, ``sfx dlq``), with a clear error when it is down."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import kombu

from libs.contracts.settings import get_settings, redacted_url
from libs.runtime.bus import connect
from sfx.errors import CommandError


@contextlib.contextmanager
def broker_connection(role: str) -> Iterator[kombu.Connection]:
    """A connection to the broker of SFX_AMQP_URL; CommandError (without the password) when it cannot be reached."""
    settings = get_settings()
    try:
        connection = connect(settings, role=role)
    except (OSError, *kombu.Connection(settings.amqp_url).connection_errors) as error:
        raise CommandError(
            f"cannot reach the broker at {redacted_url(settings.amqp_url)} (SFX_AMQP_URL): {error}"
        ) from error
    with connection:
        yield connection
