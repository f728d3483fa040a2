"""``sfx status`` and ``sfx jobs``: what the beamline wants at a glance, from the live state in Redis."""

from __future__ import annotations

import argparse
import time
from typing import Any

from libs.common.messages import JobState
from libs.common.settings import get_settings
from libs.common.state import LiveState


def register(subparsers: Any) -> None:
    status = subparsers.add_parser("status", help="runs, trials, jobs and the latest merging statistics")
    status.add_argument("--runs", type=int, default=10, help="show the N most recently updated runs (10)")
    status.set_defaults(handler=run_status)
    jobs = subparsers.add_parser("jobs", help="analysis jobs with state, slots and progress")
    jobs.set_defaults(handler=run_jobs)


def percent(part: int, whole: int) -> str:
    return f"{100 * part / whole:5.1f}%" if whole else "    -"


def jobs_table(jobs: list[JobState]) -> list[str]:
    lines = [f"{'job':<32} {'status':<10} {'slots':>5} {'frames':>8} {'updated':>9}  reason"]
    now = time.time()
    for job in jobs:
        frames = f"{job.frames_done}" + (f"/{job.frames_total}" if job.frames_total is not None else "")
        lines.append(
            f"{job.job_id:<32} {job.status.value:<10} {job.slots:>5} {frames:>8} {now - job.updated_at:>8.0f}s  "
            f"{job.reason.splitlines()[0][:60] if job.reason else ''}"
        )
    return lines


def run_status(arguments: argparse.Namespace) -> int:
    state = LiveState(get_settings())
    header = f"{'run':<24} {'written':>8} {'live':>5} {'trial':<12} {'processed':>9} {'hits':>7} {'indexed':>8}"
    print(f"{header} {'failed':>6}")
    for run_id in state.runs()[: arguments.runs]:
        manifest = state.run(run_id)
        written = str(manifest.frame_count) if manifest and manifest.frame_count is not None else "?"
        live = "yes" if manifest and manifest.live else "no"
        for trial in state.trials(run_id) or ["-"]:
            counters = state.counters(run_id, trial)
            frames, hits = counters["frames"], counters["hits"]
            print(
                f"{run_id:<24} {written:>8} {live:>5} {trial:<12} {frames:>9} {percent(hits, frames):>7} "
                f"{percent(counters['indexed'], hits):>8} {counters['failed']:>6}"
            )
    print()
    print("\n".join(jobs_table(state.jobs())))
    print()
    print(f"{'dataset':<48} {'trial':<10} {'frames':>6} {'compl':>6} {'mult':>5} {'CC1/2':>6} {'d_min':>6}  MTZ")
    for update in state.merges():
        overall = update.overall
        cc = f"{overall.cc_half:.3f}" if overall and overall.cc_half is not None else "-"
        completeness = f"{100 * overall.completeness:.1f}" if overall else "-"
        multiplicity = f"{overall.multiplicity:.1f}" if overall else "-"
        d_min = f"{update.suggested_resolution:.2f}" if update.suggested_resolution else "-"
        print(
            f"{update.dataset_id[:48]:<48} {update.trial:<10} {update.frames_merged:>6} {completeness:>6} "
            f"{multiplicity:>5} {cc:>6} {d_min:>6}  {update.mtz_path or ''}"
        )
    return 0


def run_jobs(arguments: argparse.Namespace) -> int:
    print("\n".join(jobs_table(LiveState(get_settings()).jobs())))
    return 0
