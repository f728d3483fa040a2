"""``python -m services.merger``: the merger service (see services.merger.service)."""

from __future__ import annotations

import sys

from libs.runtime.bus import STANDARD_MIDDLEWARE
from libs.runtime.bus.middleware import prometheus_middleware
from libs.runtime.service import PeriodicTask, run_service, start_logging
from services.merger.service import Merger, make_consumer


def main() -> int:
    settings = start_logging("merger")
    merger = Merger(settings)
    return run_service(
        "merger",
        [make_consumer(merger, settings)],
        [PeriodicTask("merge-updates", settings.merge_update_seconds, merger.tick)],
        middleware=[*STANDARD_MIDDLEWARE, prometheus_middleware],  # add a middleware here for every consumer
        settings=settings,
        details=merger.details,
        on_stop=merger.stop,
    )


if __name__ == "__main__":
    sys.exit(main())
