"""``python -m services.dispatcher``: the dispatcher service (see services.dispatcher.service)."""

from __future__ import annotations

import sys

from libs.runtime.bus import STANDARD_MIDDLEWARE
from libs.runtime.bus.middleware import prometheus_middleware
from libs.runtime.health import QueueDepthProbe, work_queues
from libs.runtime.metrics import ServiceMetrics
from libs.runtime.service import PeriodicTask, run_service, start_logging
from services.dispatcher.backends import make_backend
from services.dispatcher.service import Dispatcher, make_consumers


def main() -> int:
    settings = start_logging("dispatcher")
    try:
        dispatcher = Dispatcher(settings, make_backend(settings))
    except ValueError as error:  # an unknown SFX_BACKEND or impossible reservation settings: name them and stop
        print(f"dispatcher: {error}", file=sys.stderr)
        return 2
    metrics = ServiceMetrics("dispatcher")
    queue_depths = QueueDepthProbe(settings, work_queues(settings), metrics)  # one reader of every queue's depth
    return run_service(
        "dispatcher",
        make_consumers(dispatcher, settings),
        [PeriodicTask("poll-backend", 1.0, dispatcher.poll), PeriodicTask("queue-depths", 5.0, queue_depths.sample)],
        middleware=[*STANDARD_MIDDLEWARE, prometheus_middleware],  # add a middleware here for every consumer
        settings=settings,
        metrics=metrics,
        details=dispatcher.details,
        on_stop=dispatcher.stop,
    )


if __name__ == "__main__":
    sys.exit(main())
