"""``python -m services.ingest``: the ingest service (see services.ingest.service)."""

from __future__ import annotations

import sys

from libs.runtime.bus import STANDARD_MIDDLEWARE
from libs.runtime.bus.middleware import prometheus_middleware
from libs.runtime.service import PeriodicTask, run_service, start_logging
from services.ingest.service import Ingest


def main() -> int:
    settings = start_logging("ingest")
    ingest = Ingest(settings)
    return run_service(
        "ingest",
        [],
        [PeriodicTask("scan-landing-dirs", settings.ingest_poll_seconds, ingest.scan)],
        middleware=[*STANDARD_MIDDLEWARE, prometheus_middleware],  # none consumes yet; the same list as the others
        settings=settings,
        details=ingest.details,
        on_stop=ingest.stop,
    )


if __name__ == "__main__":
    sys.exit(main())
