"""The one way tests wait: poll a condition until it holds, or fail saying what never happened."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_for(
    condition: Callable[[], T],
    timeout: float,
    what: str,
    *,
    interval: float = 0.02,
    explain: Callable[[], str] | None = None,
) -> T:
    """Poll ``condition`` until it returns something truthy, and return that.

    After ``timeout`` seconds fail naming ``what``, followed by ``explain()`` (e.g. the services' last log lines),
    which is only computed then.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            details = f"\n{explain()}" if explain is not None else ""
            raise AssertionError(f"timed out after {timeout} s waiting for {what}{details}")
        time.sleep(interval)
