"""The one error type every ``sfx`` sub-command raises for a user-facing failure."""

from __future__ import annotations


class CommandError(Exception):
    """A user-facing failure: printed as one line, exit status 2."""
