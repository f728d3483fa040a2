"""Process groups: services and analysis jobs run in groups of their own, so they are signalled as a whole."""

from __future__ import annotations

import os


def signal_group(pid: int, signum: int) -> bool:
    """Send ``signum`` to the process group led by ``pid``; False when no process of it is left."""
    try:
        os.killpg(pid, signum)
    except ProcessLookupError:
        return False
    return True
