"""``sfx plan --rate HZ --hit-fraction F --frames N``: ranks that keep up with a detector, and how long a run takes.

The per-frame costs are measured ones: the timings the analysis ranks of recent jobs wrote to Redis (blanks and
hits apart, since a blank stops after hit finding). The reservation is the one the settings describe.
"""

from __future__ import annotations

import argparse
import math
from typing import Any

from libs.contracts.costs import FrameCosts, recent_job_ids
from libs.contracts.settings import get_settings
from libs.runtime.state import LiveState
from services.dispatcher.scheduling import ranks_to_keep_up, reservation_from_settings, run_duration
from sfx.errors import CommandError


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("plan", help="ranks to keep up with a detector rate; time to process a run")
    parser.add_argument("--rate", type=float, required=True, metavar="HZ", help="detector frame rate")
    parser.add_argument("--hit-fraction", type=float, required=True, metavar="F", help="fraction of hits, 0 to 1")
    parser.add_argument("--frames", type=int, required=True, metavar="N", help="frames in a run")
    parser.add_argument(
        "--costs",
        type=float,
        nargs=2,
        metavar=("BLANK_S", "HIT_S"),
        help="seconds per blank and per hit on one rank, instead of the measured ones",
    )
    parser.set_defaults(handler=run)


def run(arguments: argparse.Namespace) -> int:
    if arguments.rate <= 0 or not math.isfinite(arguments.rate):
        raise CommandError(f"--rate must be a positive number of frames per second, got {arguments.rate}")
    if not 0 <= arguments.hit_fraction <= 1:
        raise CommandError(f"--hit-fraction must lie between 0 and 1, got {arguments.hit_fraction}")
    if arguments.frames < 1:
        raise CommandError(f"--frames must be at least 1, got {arguments.frames}")
    settings = get_settings()
    try:
        reservation = reservation_from_settings(settings)
    except ValueError as error:
        raise CommandError(str(error)) from error
    if arguments.costs is not None:
        blank, hit = arguments.costs
        if blank < 0 or hit < 0:
            raise CommandError("--costs must be two non-negative numbers of seconds")
        costs = FrameCosts(blank_seconds=blank, hit_seconds=hit, hit_fraction=arguments.hit_fraction, frames=0)
        source = "as given"
    else:
        state = LiveState(settings)
        job_ids = recent_job_ids(state.jobs())
        measured = state.measured_frame_costs(job_ids)
        if measured is None:
            raise CommandError(
                "no per-frame costs are measured yet (no finished job has timings in Redis); "
                "process a run first, or give --costs BLANK_S HIT_S"
            )
        costs = measured
        source = f"measured on {costs.frames} frames of {len(job_ids)} recent jobs"
    per_frame = costs.per_frame(arguments.hit_fraction)
    keep_up = ranks_to_keep_up(arguments.rate, arguments.hit_fraction, costs.blank_seconds, costs.hit_seconds)
    nodes = math.ceil(keep_up / reservation.ranks_per_node)
    job_ranks = reservation.job_max_ranks
    duration = run_duration(arguments.frames, arguments.hit_fraction, costs.blank_seconds, costs.hit_seconds, job_ranks)
    acquisition = arguments.frames / arguments.rate
    print(
        f"per-frame cost on one rank ({source}): blank {costs.blank_seconds * 1e3:.1f} ms, "
        f"hit {costs.hit_seconds * 1e3:.1f} ms; {per_frame * 1e3:.1f} ms at {arguments.hit_fraction:.0%} hits"
    )
    print(
        f"reservation: {reservation.nodes} nodes × {reservation.ranks_per_node} ranks = {reservation.slots} slots "
        f"+ {reservation.burst_slots} burst; one job gets {reservation.min_ranks}–{job_ranks} ranks"
    )
    verdict = "keeps up" if keep_up <= job_ranks else f"does NOT keep up: one job gets at most {job_ranks} ranks"
    print(
        f"keeping up with {arguments.rate:g} Hz needs {keep_up} ranks ({nodes} nodes of {reservation.ranks_per_node}); "
        f"a live job on this reservation {verdict}"
    )
    print(
        f"a run of {arguments.frames} frames ({acquisition:.0f} s of acquisition) takes {duration:.0f} s to process "
        f"on {job_ranks} ranks ({duration / acquisition:.2f}× real time)"
    )
    return 0
