"""Live-pipeline figures: sustained frames/s of the whole service chain against the analysis alone, and the
end-of-run latency (last frame written → final MTZ).

Both use a fresh namespace on the real RabbitMQ and Redis, the real services (``sfx up`` style processes) and a
2-rank MPI analysis job. "Analysis alone" runs the same per-frame function in 2 worker processes on the same frames,
with no bus, no Redis and no merging: the difference is what the services cost.

Run: ``python -m benchmarks pipeline``.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from libs.contracts.parameters import AnalysisParameters
from libs.contracts.settings import Settings
from libs.runtime.bus import Topology, connect
from libs.runtime.state import LiveState
from libs.science.formats import open_run
from services.analysis.pipeline import process_frame
from sfx.services_control import start_services, stop_services

CELL = (79.1, 79.1, 38.0, 90.0, 90.0, 90.0)
SPACE_GROUP = "P 43 21 2"
THROUGHPUT_FRAMES = int(os.environ.get("SFX_BENCH_FRAMES", "80"))
LATENCY_FRAMES = 40
LATENCY_RATE_HZ = 4.0
RANKS = 2


def _analyse_range(arguments: tuple[str, int, int]) -> tuple[int, float, float]:
    """Analyse frames start..stop-1; returns the count and the wall-clock span of the work (not process start)."""
    path, start, stop = arguments
    parameters = AnalysisParameters()
    with open_run(path) as reader:
        began = time.time()
        for index in range(start, stop):
            process_frame(
                reader.read_frame(index), reader.detector, reader.beam, reader.mask, CELL, SPACE_GROUP, parameters
            )
    return stop - start, began, time.time()


def analysis_alone(path: Path, frames: int) -> float:
    """Frames/s of process_frame in RANKS worker processes on the same blocks of 2 frames the MPI job hands out.

    Measured like the pipeline: from the first frame started to the last finished, so process start-up is left out
    of both.
    """
    blocks = [(str(path), start, min(start + 2, frames)) for start in range(0, frames, 2)]
    with multiprocessing.get_context("spawn").Pool(RANKS) as pool:
        spans = pool.map(_analyse_range, blocks, chunksize=1)
    done = sum(count for count, _, _ in spans)
    return done / (max(end for _, _, end in spans) - min(begin for _, begin, _ in spans))


class Services:
    def __init__(self, root: Path) -> None:
        self.landing = root / "landing"
        self.landing.mkdir(parents=True)
        (self.landing / "sample.json").write_text(
            json.dumps({"sample": "bench", "cell": list(CELL), "space_group": SPACE_GROUP})
        )
        self.settings = Settings(
            namespace=f"bench-{os.getpid()}",
            work_dir=root / "services",
            landing_dirs=[self.landing],
            ingest_quiet_seconds=1.0,
            ingest_poll_seconds=0.25,
            merge_update_seconds=0.5,
            ranks_per_node=RANKS,
            log_format="json",
        )
        self.env = self.settings.to_environment()
        self.state = LiveState(self.settings)

    def __enter__(self) -> Services:
        with connect(self.settings, role="bench") as connection:
            Topology(self.settings).declare(connection)
        start_services(self.settings.work_dir, env=self.env)
        return self

    def __exit__(self, *exc_info: object) -> None:
        stop_services(self.settings.work_dir)
        with connect(self.settings, role="bench") as connection:
            Topology(self.settings).delete(connection)
        self.state.delete_namespace()

    def wait_final(self, run_id: str, timeout: float = 600) -> float:
        """Wall time at which the final MergeUpdate of ``run_id`` was published."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for update in self.state.merges():
                if update.final and run_id in update.run_ids:
                    return update.published_at
            time.sleep(0.1)
        raise TimeoutError(f"no final merge of {run_id} after {timeout} s")


def simulate(out: Path, frames: int, seed: int, *extra: str) -> None:
    command = [sys.executable, "-m", "sfx", "simulate", "--out", str(out), "--frames", str(frames)]
    subprocess.run([*command, "--seed", str(seed), *extra], check=True, capture_output=True)


def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="sfx-bench-pipeline-"))
    try:
        staged = root / "throughput.h5"
        simulate(staged, THROUGHPUT_FRAMES, seed=21)
        alone = analysis_alone(staged, THROUGHPUT_FRAMES)

        with Services(root / "a") as services:
            landed = services.landing / staged.name
            os.replace(staged, landed)
            started = time.time()
            services.wait_final("throughput")
            timeline = services.state.timeline("throughput.live")
            first = min(entry["start"] for entry in timeline)
            last = max(entry["end"] for entry in timeline)
            counted = services.state.counters("throughput", "live")["frames"]
            pipeline_rate = counted / (last - first)
            landing_to_first = first - started

        print(f"sustained throughput, {THROUGHPUT_FRAMES} Jungfrau-4M frames, {RANKS} ranks:")
        print(f"  analysis alone ({RANKS} processes, no bus):      {alone:6.2f} frames/s")
        print(f"  whole pipeline (ingest → MPI job → merger):   {pipeline_rate:6.2f} frames/s")
        print(f"  services cost:                                {100 * (1 - pipeline_rate / alone):6.1f} % of it")
        print(f"  file landed → first frame analysed:           {landing_to_first:6.2f} s")

        with Services(root / "b") as services:
            live = ["--live-rate", str(LATENCY_RATE_HZ)]
            simulate(services.landing / "latency.h5", LATENCY_FRAMES, 22, *live)
            last_written = time.time()
            final = services.wait_final("latency")
        print(f"end-of-run latency, live run of {LATENCY_FRAMES} frames at {LATENCY_RATE_HZ:g} Hz:")
        print(f"  last frame written → final MTZ:               {final - last_written:6.2f} s")
    except BaseException:
        print(f"benchmark failed; its files and service logs are kept in {root}")
        raise
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
