"""``sfx status`` and ``sfx jobs``: what the beamline wants at a glance, from the live state in Redis."""

from __future__ import annotations

import argparse
import json
import string
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from libs.contracts.messages import JobState, JobStatus, MergeUpdate, RunManifest
from libs.contracts.settings import get_settings
from libs.runtime.state import LiveState
from services.dispatcher.scheduling import reservation_from_settings, utilisation
from sfx.errors import CommandError

JOB_SYMBOLS = string.ascii_uppercase + string.ascii_lowercase + string.digits


def register(subparsers: Any) -> None:
    status = subparsers.add_parser("status", help="runs, trials, jobs, slots and the latest merging statistics")
    status.add_argument("--runs", type=int, default=10, help="show the N most recently updated runs (10)")
    status.add_argument("--json", action="store_true", help="print the same information as one JSON object")
    status.set_defaults(handler=run_status)
    jobs = subparsers.add_parser("jobs", help="analysis jobs with state, slots and progress")
    jobs.add_argument(
        "--timeline",
        type=float,
        metavar="SECONDS",
        help="also draw which job held which slot over the last SECONDS, and the reservation's utilisation",
    )
    jobs.add_argument("--json", action="store_true", help="print the same information as one JSON object")
    jobs.set_defaults(handler=run_jobs)


def percent(part: int, whole: int) -> str:
    return f"{100 * part / whole:5.1f}%" if whole else "    -"


def slot_ranges(slot_ids: Sequence[int]) -> str:
    """``[0, 1, 2, 5]`` → ``0-2,5``."""
    parts: list[str] = []
    for slot in sorted(slot_ids):
        if parts and parts[-1].split("-")[-1] == str(slot - 1):
            parts[-1] = f"{parts[-1].split('-')[0]}-{slot}"
        else:
            parts.append(str(slot))
    return ",".join(parts)


def jobs_table(jobs: list[JobState]) -> list[str]:
    lines = [
        f"{'job':<28} {'status':<10} {'priority':<9} {'try':>3} {'slots':>5} {'held':<7} {'frames':>9} "
        f"{'updated':>8}  reason"
    ]
    now = time.time()
    for job in jobs:
        frames = f"{job.frames_done}" + (f"/{job.frames_total}" if job.frames_total is not None else "")
        lines.append(
            f"{job.job_id:<28} {job.status.value:<10} {job.priority.value:<9} {job.attempt + 1:>3} {job.slots:>5} "
            f"{slot_ranges(job.slot_ids):<7} {frames:>9} {now - job.updated_at:>7.0f}s  "
            f"{job.reason.splitlines()[0][:90] if job.reason else ''}"
        )
    return lines


def slot_timeline(
    uses: Sequence[Mapping[str, Any]], reserved: int, burst: int, start: float, end: float, width: int = 72
) -> list[str]:
    """One row per slot, one column per (end - start)/width seconds: which job held the slot (a symbol per job).

    ``uses`` are slot-history entries (job_id, priority, slot_ids, start, end); burst slots are drawn below a rule.
    """
    if end <= start:
        raise ValueError(f"timeline needs end > start, got {start} and {end}")
    symbols: dict[str, str] = {}
    for use in sorted(uses, key=lambda use: use["start"]):
        if use["job_id"] not in symbols:
            symbols[use["job_id"]] = JOB_SYMBOLS[len(symbols) % len(JOB_SYMBOLS)]
    step = (end - start) / width
    slots = max([reserved + burst - 1, *(slot for use in uses for slot in use["slot_ids"])]) + 1
    rows = [["."] * width for _ in range(slots)]
    for use in uses:
        first = max(0, int((use["start"] - start) / step + 0.5))
        last = min(width, int((use["end"] - start) / step + 0.5))
        for slot in use["slot_ids"]:
            for column in range(first, last):
                rows[slot][column] = symbols[use["job_id"]]
    lines = [f"time →  0 s {'':>{width - 14}}{end - start:.0f} s"]
    for slot, row in enumerate(rows):
        if slot == reserved:
            lines.append(f"{'':8}{'-' * width}  burst")
        lines.append(f"slot {slot:>2} {''.join(row)}")
    priorities = {use["job_id"]: use["priority"] for use in uses}
    outcomes: dict[str, list[str]] = {}
    for use in sorted(uses, key=lambda use: use["start"]):
        outcomes.setdefault(use["job_id"], []).append(use.get("outcome", "running"))
    lines.append("")
    lines += [
        f"  {symbol} {job_id} ({priorities[job_id]}: {' → '.join(outcomes[job_id])})"
        for job_id, symbol in symbols.items()
    ]
    return lines


def current_uses(state: LiveState, since: float, until: float) -> list[dict[str, Any]]:
    """Slot history since ``since`` plus the jobs holding slots now (drawn up to ``until``)."""
    uses = [use for use in state.slot_history() if use["end"] >= since and use["start"] is not None]
    for job in state.jobs():
        if job.status is JobStatus.RUNNING and job.started_at is not None and job.slot_ids:
            uses.append(
                {
                    "job_id": job.job_id,
                    "priority": job.priority.value,
                    "slot_ids": job.slot_ids,
                    "start": job.started_at,
                    "end": until,
                    "outcome": "running",
                }
            )
    return uses


def reservation_view(state: LiveState) -> dict[str, Any]:
    """The dispatcher's own account of the reservation (its heartbeat), else the one these settings describe."""
    for heartbeat in state.live_services():
        if heartbeat.service == "dispatcher" and "reserved_slots" in heartbeat.details:
            return heartbeat.details
    reservation = reservation_from_settings(state.settings)
    return {"reserved_slots": reservation.slots, "burst_slots": reservation.burst_slots}


@dataclass
class TrialCounts:
    trial: str
    frames: int
    hits: int
    indexed: int
    failed: int


@dataclass
class RunView:
    run_id: str
    manifest: RunManifest | None
    trials: list[TrialCounts]


@dataclass
class StatusView:
    """Everything ``sfx status`` shows, read once; the text and the JSON form are both drawn from it."""

    runs: list[RunView]
    jobs: list[JobState]
    reserved_slots: int
    burst_slots: int
    merges: list[MergeUpdate]

    @property
    def slots_in_use(self) -> int:
        return sum(job.slots for job in self.jobs if job.status is JobStatus.RUNNING)

    @property
    def jobs_queued(self) -> int:
        return sum(job.status in (JobStatus.QUEUED, JobStatus.PREEMPTED) for job in self.jobs)


def read_status(state: LiveState, max_runs: int) -> StatusView:
    runs = []
    for run_id in state.runs()[:max_runs]:
        trials = [
            TrialCounts(trial=trial, **_counter_fields(state.counters(run_id, trial))) for trial in state.trials(run_id)
        ]
        runs.append(RunView(run_id=run_id, manifest=state.run(run_id), trials=trials))
    view = reservation_view(state)
    return StatusView(
        runs=runs,
        jobs=state.jobs(),
        reserved_slots=int(view["reserved_slots"]),
        burst_slots=int(view["burst_slots"]),
        merges=state.merges(),
    )


def _counter_fields(counters: Mapping[str, int]) -> dict[str, int]:
    return {name: int(counters.get(name, 0)) for name in ("frames", "hits", "indexed", "failed")}


def status_json(view: StatusView) -> dict[str, Any]:
    """The JSON of ``sfx status --json``: the records the table shows, whole (models as ``model_dump(mode="json")``)."""
    reserved, in_use = view.reserved_slots, view.slots_in_use
    return {
        "runs": [
            {
                "run_id": run.run_id,
                "manifest": run.manifest.model_dump(mode="json") if run.manifest else None,
                "trials": [asdict(trial) for trial in run.trials],
            }
            for run in view.runs
        ],
        "slots": {
            "reserved": reserved,
            "reserved_in_use": min(in_use, reserved),
            "burst": view.burst_slots,
            "burst_in_use": max(0, in_use - reserved),
            "jobs_queued": view.jobs_queued,
        },
        "jobs": [job.model_dump(mode="json") for job in view.jobs],
        "merges": [update.model_dump(mode="json") for update in view.merges],
    }


def status_text(view: StatusView) -> list[str]:
    header = f"{'run':<24} {'written':>8} {'live':>5} {'trial':<12} {'processed':>9} {'hits':>7} {'indexed':>8}"
    lines = [f"{header} {'failed':>6}"]
    for run in view.runs:
        manifest = run.manifest
        written = str(manifest.frame_count) if manifest and manifest.frame_count is not None else "?"
        live = "yes" if manifest and manifest.live else "no"
        for counts in run.trials or [TrialCounts("-", 0, 0, 0, 0)]:
            lines.append(
                f"{run.run_id:<24} {written:>8} {live:>5} {counts.trial:<12} {counts.frames:>9} "
                f"{percent(counts.hits, counts.frames):>7} {percent(counts.indexed, counts.hits):>8} {counts.failed:>6}"
            )
    lines.append("")
    reserved, in_use = view.reserved_slots, view.slots_in_use
    lines.append(
        f"slots: {min(in_use, reserved)}/{reserved} reserved and {max(0, in_use - reserved)}/{view.burst_slots} burst "
        f"in use; {view.jobs_queued} jobs queued"
    )
    lines += jobs_table(view.jobs)
    lines.append("")
    lines.append(f"{'dataset':<48} {'trial':<10} {'frames':>6} {'compl':>6} {'mult':>5} {'CC1/2':>6} {'d_min':>6}  MTZ")
    for update in view.merges:
        overall = update.overall
        cc = f"{overall.cc_half:.3f}" if overall and overall.cc_half is not None else "-"
        completeness = f"{100 * overall.completeness:.1f}" if overall else "-"
        multiplicity = f"{overall.multiplicity:.1f}" if overall else "-"
        d_min = f"{update.suggested_resolution:.2f}" if update.suggested_resolution else "-"
        lines.append(
            f"{update.dataset_id[:48]:<48} {update.trial:<10} {update.frames_merged:>6} {completeness:>6} "
            f"{multiplicity:>5} {cc:>6} {d_min:>6}  {update.mtz_path or ''}"
        )
    return lines


def run_status(arguments: argparse.Namespace) -> int:
    view = read_status(LiveState(get_settings()), arguments.runs)
    if arguments.json:
        print(json.dumps(status_json(view), indent=2))
    else:
        print("\n".join(status_text(view)))
    return 0


def run_jobs(arguments: argparse.Namespace) -> int:
    state = LiveState(get_settings())
    jobs = state.jobs()
    if arguments.timeline is not None and arguments.timeline <= 0:
        raise CommandError("--timeline needs a positive number of seconds")
    document: dict[str, Any] = {"jobs": [job.model_dump(mode="json") for job in jobs]}
    if not arguments.json:
        print("\n".join(jobs_table(jobs)))
    if arguments.timeline is not None:
        until = time.time()
        since = until - arguments.timeline
        uses = current_uses(state, since, until)
        view = reservation_view(state)
        reserved, burst = int(view["reserved_slots"]), int(view["burst_slots"])
        spans = [(use["job_id"], len(use["slot_ids"]), use["start"], use["end"]) for use in uses]
        reserved_utilisation = utilisation(spans, reserved, since, until)
        document["timeline"] = {
            "since": since,
            "until": until,
            "reserved_slots": reserved,
            "burst_slots": burst,
            "slot_uses": uses,
            "reserved_utilisation": reserved_utilisation,
        }
        if not arguments.json:
            print()
            print("\n".join(slot_timeline(uses, reserved, burst, since, until)))
            print(f"\nutilisation of the {reserved} reserved slots: {reserved_utilisation:.1%}")
    if arguments.json:
        print(json.dumps(document, indent=2))
    return 0
