"""``sfx cancel JOB [JOB...]``: stop queued or running analysis jobs (they end as cancelled and are not retried)."""

from __future__ import annotations

import argparse
import getpass
from typing import Any

from libs.contracts.messages import CancelRequest, JobStatus
from libs.contracts.settings import get_settings
from libs.runtime.bus import Publisher
from libs.runtime.state import LiveState
from sfx.errors import CommandError

ACTIVE = (JobStatus.QUEUED, JobStatus.STARTING, JobStatus.RUNNING, JobStatus.PREEMPTED)


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("cancel", help="stop queued or running analysis jobs")
    parser.add_argument("jobs", nargs="+", metavar="JOB", help="job ids, as `sfx jobs` shows them (e.g. r0042.strict)")
    parser.set_defaults(handler=run)


def run(arguments: argparse.Namespace) -> int:
    settings = get_settings()
    state = LiveState(settings)
    for job_id in arguments.jobs:
        job = state.job(job_id)
        if job is None:
            raise CommandError(f"job {job_id} is unknown (see `sfx jobs`)")
        if job.status not in ACTIVE:
            raise CommandError(f"job {job_id} has already ended ({job.status.value})")
    # user_id stamped: the dispatcher records the broker-checked user in the job's reason, not requested_by
    with Publisher(settings, role="sfx cancel", retry_seconds=10.0, stamp_user_id=True) as publisher:
        for job_id in arguments.jobs:
            publisher.publish(CancelRequest(job_id=job_id, requested_by=getpass.getuser()))
            print(f"cancel of {job_id} requested")
    return 0
