"""``sfx reprocess RUN [RUN...] --trial NAME --set key=value ...``: ask the dispatcher to process runs again.

Publishes a ReprocessRequest on the control exchange. The dispatcher starts one job per run under the new trial;
the merger merges that trial apart from the live one, which is not disturbed.
"""

from __future__ import annotations

import argparse
import getpass
from typing import Any

from libs.contracts.messages import ReprocessRequest
from libs.contracts.parameters import AnalysisParameters, with_overrides
from libs.contracts.settings import get_settings
from libs.runtime.bus import Publisher
from sfx.errors import CommandError
from sfx.options import parse_overrides


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("reprocess", help="process runs again under a new trial with other parameters")
    parser.add_argument("runs", nargs="+", metavar="RUN", help="run ids, as `sfx status` shows them")
    parser.add_argument("--trial", required=True, help="name of the new trial (letters, digits, _ . -)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="analysis parameter for this trial, e.g. spotfinding.sigma_strong=4 (repeatable)",
    )
    parser.set_defaults(handler=run)


def run(arguments: argparse.Namespace) -> int:
    overrides = parse_overrides(arguments.overrides)
    if arguments.trial == "live":
        raise CommandError("--trial live is the trial of live processing; name the new trial")
    try:
        with_overrides(AnalysisParameters(), overrides)  # refuse a wrong parameter here, not in the dispatcher
        request = ReprocessRequest(
            run_ids=arguments.runs, trial=arguments.trial, parameters=overrides, requested_by=getpass.getuser()
        )
    except ValueError as error:
        raise CommandError(str(error)) from error
    # user_id stamped: the dispatcher records the broker-checked user in the job's reason, not requested_by
    with Publisher(get_settings(), role="sfx reprocess", retry_seconds=10.0, stamp_user_id=True) as publisher:
        publisher.publish(request)
    print(f"reprocess of {', '.join(request.run_ids)} under trial {request.trial!r} requested")
    return 0
