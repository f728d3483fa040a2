"""The errors of the bus, in their own module so that every part of the package can raise them without a cycle."""

from __future__ import annotations


class BusError(RuntimeError):
    """A broker problem that retrying will not fix (wrong topology, unknown exchange, key too long)."""


class PublishError(BusError):
    """A message was not confirmed by the broker within the retry budget."""
