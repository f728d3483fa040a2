"""``sfx demo``: a simulated run written live into a landing directory, processed live by every service.

Starts the services (ingest, dispatcher, merger; the dispatcher starts the MPI analysis job), writes a simulated run
frame by frame as a detector would, shows progress while it is processed, and ends with the merging table and the
path of the MTZ file. The services it started are stopped at the end, whatever happens.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from libs.contracts.datasets import dataset_id_for
from libs.contracts.messages import MergeUpdate, RunManifest
from libs.contracts.settings import Settings
from libs.runtime.bus import Topology, connect
from libs.runtime.state import LiveState
from services.merger.statistics import MergingStatistics, format_table
from sfx.errors import CommandError
from sfx.services_control import start_services, stop_services

CELL = (79.1, 79.1, 38.0, 90.0, 90.0, 90.0)
SPACE_GROUP = "P 43 21 2"


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("demo", help="simulate a run and process it live, end to end")
    parser.add_argument("--frames", type=int, default=300, help="frames in the simulated run (300)")
    parser.add_argument("--rate", type=float, default=10.0, help="frames written per second (10)")
    parser.add_argument("--ranks", type=int, default=2, help="MPI ranks of the analysis job (2)")
    parser.add_argument("--work-dir", type=Path, default=Path("demo-output"), help="everything goes here")
    parser.add_argument("--timeout", type=float, default=900.0, help="give up after this many seconds (900)")
    parser.set_defaults(handler=run)


def run(arguments: argparse.Namespace) -> int:
    if arguments.frames < 1 or arguments.rate <= 0:
        raise CommandError("--frames must be at least 1 and --rate positive")
    work_dir: Path = arguments.work_dir.resolve()
    if work_dir.exists():
        shutil.rmtree(work_dir)
    landing = work_dir / "landing"
    landing.mkdir(parents=True)
    sample = {"sample": "lysozyme-demo", "cell": list(CELL), "space_group": SPACE_GROUP}
    (landing / "sample.json").write_text(json.dumps(sample))
    settings = Settings(
        namespace="sfxdemo",
        work_dir=work_dir / "services",
        landing_dirs=[landing],
        ranks_per_node=arguments.ranks,
        ingest_quiet_seconds=3.0,
        log_format="json",
    )
    environment = settings.to_environment()
    _reset_namespace(settings)
    services_dir = settings.work_dir
    print(f"sfx demo: services in {services_dir} (logs in {services_dir / 'logs'})")
    start_services(services_dir, env=environment)
    simulator: subprocess.Popen[bytes] | None = None
    try:
        run_file = landing / "run_0001.h5"
        print(f"writing {arguments.frames} frames at {arguments.rate:g} Hz into {run_file}")
        simulator = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "sfx",
                "simulate",
                "--out",
                str(run_file),
                "--frames",
                str(arguments.frames),
                "--live-rate",
                str(arguments.rate),
                "--seed",
                "2026",
            ],
            stdout=subprocess.DEVNULL,
            stderr=open(work_dir / "simulate.log", "wb"),  # noqa: SIM115 - lives as long as the process
            env={**os.environ, **environment},
        )
        update = _follow(settings, "run_0001", arguments.frames, simulator, arguments.timeout)
    finally:
        if simulator is not None and simulator.poll() is None:
            simulator.terminate()
        stop_services(services_dir)
    print()
    print(format_table(MergingStatistics(update.overall, update.shells, update.suggested_resolution)))  # type: ignore[arg-type]
    print(f"\nframes merged: {update.frames_merged}   MTZ: {update.mtz_path}")
    return 0


def _reset_namespace(settings: Settings) -> None:
    """A demo starts from nothing: its queues and live state from an earlier demo are deleted."""
    LiveState(settings).delete_namespace()
    with connect(settings, role="demo") as connection:
        Topology(settings).delete(connection)


def _follow(
    settings: Settings, run_id: str, frames: int, simulator: subprocess.Popen[bytes], timeout: float
) -> MergeUpdate:
    """Show progress until the final merge of the run exists; returns it."""
    state = LiveState(settings)
    started = time.monotonic()
    last_line = 0.0
    dataset_id: str | None = None
    while time.monotonic() - started < timeout:
        manifest: RunManifest | None = state.run(run_id)
        counters = state.counters(run_id, "live")
        update = state.merge(dataset_id, "live") if dataset_id else None
        if manifest is not None and dataset_id is None:
            dataset_id = dataset_id_for(manifest)
        written = manifest.frame_count or 0 if manifest else 0
        # On a terminal one line is redrawn twice a second; in a log, a new line every five seconds.
        if sys.stdout.isatty() or time.monotonic() - last_line >= 5.0:
            _show(written, frames, counters, update, time.monotonic() - started)
            last_line = time.monotonic()
        if update is not None and update.final and update.mtz_path:
            return update
        if simulator.poll() not in (None, 0):
            raise CommandError(f"the simulator failed (exit {simulator.returncode}); see its log")
        time.sleep(0.5)
    raise CommandError(f"no final merge after {timeout:.0f} s; see the service logs")


def _show(written: int, frames: int, counters: dict[str, int], update: MergeUpdate | None, elapsed: float) -> None:
    processed = counters["frames"]
    width = 30
    done = int(width * processed / frames)
    bar = "█" * done + "·" * (width - done)
    hits, indexed = counters["hits"], counters["indexed"]
    hit_rate = 100 * hits / processed if processed else 0.0
    index_rate = 100 * indexed / hits if hits else 0.0
    cc_half = update.overall.cc_half if update is not None and update.overall is not None else None
    cc_text = f"{cc_half:.3f}" if cc_half is not None else "  -  "
    merged = update.frames_merged if update is not None else 0
    line = (
        f"\r[{bar}] {processed:5d}/{frames} processed ({written} written) | hits {hit_rate:5.1f}% | "
        f"indexed {index_rate:5.1f}% of hits | merged {merged:4d} | CC1/2 {cc_text} | {elapsed:5.0f} s"
    )
    print(line if sys.stdout.isatty() else line.lstrip("\r") + "\n", end="", flush=True)
