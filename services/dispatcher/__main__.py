"""``python -m services.dispatcher``: the dispatcher service (see services.dispatcher.service)."""

from __future__ import annotations

import sys

from libs.runtime.bus import STANDARD_MIDDLEWARE
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
    return run_service(
        "dispatcher",
        make_consumers(dispatcher, settings),
        [PeriodicTask("poll-backend", 1.0, dispatcher.poll)],
        middleware=STANDARD_MIDDLEWARE,  # add a middleware here to give it to every consumer of the service
        settings=settings,
        details=dispatcher.details,
        on_stop=dispatcher.stop,
    )


if __name__ == "__main__":
    sys.exit(main())
