"""What every fault scenario shares: the pipeline on one small run, a private Redis, the loss audit and its table row.

A scenario lands (or writes live) the session's source run as ``RUN_ID`` into its own namespace and folders, injects
its fault, lets the run finish and audits the merger's journal and MTZ against an undisturbed run of the same data.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import gemmi
import numpy as np
import redis

from libs.contracts.datasets import dataset_id_for
from libs.contracts.messages import FrameResult, MergeUpdate, RunManifest, decode_message
from tests.support.harness import REPO, Services

RUN_ID = "run_f"
SAMPLE = "lyso-faults"
CELL = (79.1, 79.1, 38.0, 90.0, 90.0, 90.0)
SPACE_GROUP = "P 43 21 2"
FRAMES = 40
SEED = 21
MTZ_COLUMNS = ("IMEAN", "SIGIMEAN", "F", "SIGF")
DATASET_ID = dataset_id_for(
    RunManifest(run_id=RUN_ID, files=["x"], file_format="nxmx", sample=SAMPLE, cell=CELL, space_group=SPACE_GROUP)
)

T = TypeVar("T")


def quietly(condition: Callable[[], T]) -> Callable[[], T | None]:
    """``condition`` that answers None instead of raising while Redis is away (a wait must outlast the fault)."""

    def guarded() -> T | None:
        try:
            return condition()
        except (redis.RedisError, OSError):
            return None

    return guarded


class Pipeline(Services):
    """Every service of a fresh namespace on one landing directory, with the calls a fault scenario needs."""

    def __init__(self, root: Path, names: tuple[str, ...] = ("ingest", "dispatcher", "merger"), **settings: Any):
        landing = root / "landing"
        landing.mkdir(parents=True)
        defaults: dict[str, Any] = {
            "landing_dirs": [landing],
            "ingest_quiet_seconds": 2.0,
            "merge_update_seconds": 1.0,
            "reservation_nodes": 1,
            "ranks_per_node": 2,
            "job_retry_backoff_seconds": 1.0,
            "metrics_port": 0,  # several pipelines (and other engineers' tests) share this host
        }
        super().__init__(root, names, **{**defaults, **settings})
        self.landing = landing
        self.job_id = f"{RUN_ID}.live"

    # --- feeding the run -------------------------------------------------------------------------------------------

    def describe(self) -> None:
        description = {"sample": SAMPLE, "cell": list(CELL), "space_group": SPACE_GROUP}
        (self.landing / f"{RUN_ID}.sample.json").write_text(json.dumps(description))

    def land(self, source: Path) -> None:
        """The complete run appears in the landing directory in one rename."""
        self.describe()
        staged = self.root / f"{RUN_ID}.h5"
        shutil.copyfile(source, staged)
        os.replace(staged, self.landing / f"{RUN_ID}.h5")

    def write_live(
        self, source: Path, rate: float, pause_after: int | None = None, pause_seconds: float = 0.0
    ) -> subprocess.Popen[bytes]:
        """A detector writing the run frame by frame (tests/faults/replay.py)."""
        self.describe()
        command = [sys.executable, "-m", "tests.faults.replay", str(source), str(self.landing / f"{RUN_ID}.h5")]
        command += ["--rate", str(rate)]
        if pause_after is not None:
            command += ["--pause-after", str(pause_after), "--pause-seconds", str(pause_seconds)]
        return subprocess.Popen(command, cwd=REPO, env=self.env)

    # --- watching it -----------------------------------------------------------------------------------------------

    def counted(self) -> int:
        return int(self.state.counters(RUN_ID, "live").get("frames", 0))

    def wait_counted(self, frames: int, timeout: float = 240.0) -> int:
        return (
            self.wait_for(
                quietly(lambda: (n := self.counted()) >= frames and n + 1), timeout, what=f"{frames} frames counted"
            )
            - 1
        )

    def folder(self) -> Path:
        return self.work_dir / "merger" / DATASET_ID / "live"

    def journal(self) -> Path:
        return self.folder() / "results.jsonl"

    def final_merge(self, timeout: float = 300.0) -> tuple[MergeUpdate, float]:
        """The final MergeUpdate of the run (with its MTZ), and the monotonic time it was first seen."""

        def final() -> MergeUpdate | None:
            update = self.state.merge(DATASET_ID, "live")
            ready = update is not None and update.final and RUN_ID in update.run_ids and update.mtz_path
            return update if ready else None

        update = self.wait_for(quietly(final), timeout, what="the final merge of the run")
        return update, time.monotonic()

    def inflight(self) -> dict[int, dict[str, int]]:
        return self.state.inflight(self.job_id)

    def job_pid(self) -> int | None:
        pid_file = self.work_dir / "jobs" / self.job_id / "pid"
        exit_code = self.work_dir / "jobs" / self.job_id / "exit_code"
        if not pid_file.exists() or exit_code.exists():
            return None
        return int(pid_file.read_text())


# --- the audit ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    """One line of the fault table."""

    scenario: str
    frames_written: int
    merged: int
    error_records: int
    duplicates: int
    lost: int
    mtz_identical: str
    recovery_seconds: float | None

    def cells(self) -> list[str]:
        recovery = "—" if self.recovery_seconds is None else f"{self.recovery_seconds:.1f} s"
        numbers = [self.frames_written, self.merged, self.error_records, self.duplicates, self.lost]
        return [self.scenario, *map(str, numbers), self.mtz_identical, recovery]


TABLE_HEADER = (
    "| scenario | frames written | merged | error records | duplicates | lost | MTZ identical | recovery time |\n"
    "| --- | --- | --- | --- | --- | --- | --- | --- |"
)
TABLE_CAPTION = (
    "recovery time: seconds from the end of the fault (server back, killed service restarted, disk grown, "
    "writer resumed; the kill itself when the system heals without a restart) to the first sight of the final "
    "MergeUpdate with its MTZ; for the back-pressure row, from the last publish to the last result counted."
)


def table(rows: list[Row]) -> str:
    lines = [TABLE_HEADER, *("| " + " | ".join(row.cells()) + " |" for row in rows)]
    return "\n".join(lines)


@dataclass(frozen=True)
class JournalAudit:
    merged: int
    error_records: int
    duplicates: int
    lost: int
    errors: dict[int, str]


def audit_journal(journal: Path, frames_written: int, run_id: str = RUN_ID) -> JournalAudit:
    """Each written frame must be exactly one journal entry: a result, or a FrameResult with ``error``."""
    results = [decode_message(line, FrameResult) for line in journal.read_bytes().splitlines() if line.strip()]
    keys = Counter(result.key for result in results if result.run_id == run_id)
    errors = {r.frame_index: r.error for r in results if r.run_id == run_id and r.error is not None}
    frames = {key[2] for key in keys}
    return JournalAudit(
        merged=len(frames) - len(errors),
        error_records=len(errors),
        duplicates=sum(count - 1 for count in keys.values()),
        lost=len(set(range(frames_written)) - frames),
        errors=errors,
    )


MtzColumns = dict[tuple[int, int, int], tuple[float, ...]]


def mtz_columns(path: Path) -> MtzColumns:
    mtz = gemmi.read_mtz_file(str(path))
    miller = mtz.make_miller_array().tolist()
    columns = [np.array(mtz.column_with_label(label), dtype=float) for label in MTZ_COLUMNS]
    return {tuple(h): tuple(float(c[i]) for c in columns) for i, h in enumerate(miller)}  # type: ignore[misc]


def mtz_difference(path: Path, reference: MtzColumns) -> str | None:
    """None when the MTZ has the reference's Miller indices and equal columns (1e-5 relative), else what differs."""
    columns = mtz_columns(path)
    if columns.keys() != reference.keys():
        return f"Miller indices differ: {len(columns.keys() ^ reference.keys())} of {len(reference)} not shared"
    order = sorted(reference)
    got = np.array([columns[h] for h in order])
    expected = np.array([reference[h] for h in order])
    if np.allclose(got, expected, rtol=1e-5, atol=1e-8, equal_nan=True):
        return None
    worst = np.nanmax(np.abs(got - expected) / np.maximum(np.abs(expected), 1e-8))
    return f"columns differ (worst relative difference {worst:.3g})"


@dataclass(frozen=True)
class Reference:
    """The undisturbed run: its MTZ columns, journal keys and how long it took."""

    columns: MtzColumns
    mtz: Path
    journal: Path
    seconds: float


def audit(
    pipeline: Pipeline,
    scenario: str,
    reference: Reference,
    recovery_seconds: float | None,
    record: Callable[[Row], None],
    update: MergeUpdate,
    frames_written: int = FRAMES,
    expected_columns: MtzColumns | None = None,
) -> JournalAudit:
    """Record the scenario's row; the caller asserts on the returned audit and the row's MTZ verdict."""
    result = audit_journal(pipeline.journal(), frames_written)
    assert update.mtz_path is not None
    difference = mtz_difference(Path(update.mtz_path), expected_columns or reference.columns)
    identical = "yes" if difference is None else f"no: {difference}"
    record(
        Row(
            scenario,
            frames_written,
            result.merged,
            result.error_records,
            result.duplicates,
            result.lost,
            identical,
            recovery_seconds,
        )
    )
    return result


def assert_clean(result: JournalAudit, update: MergeUpdate, reference: Reference, error_records: int = 0) -> None:
    assert result.duplicates == 0, f"{result.duplicates} duplicated frames in the journal"
    assert result.lost == 0, f"{result.lost} frames lost"
    assert result.error_records == error_records, f"error records: {result.errors}"
    assert update.mtz_path is not None
    difference = mtz_difference(Path(update.mtz_path), reference.columns)
    assert difference is None, f"the MTZ differs from the undisturbed run's: {difference}"


# --- a Redis of the test's own -----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class PrivateRedis:
    """A real redis-server without persistence on a free port: this test may kill, restart or pause it."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, socket_timeout=5)

    def start(self) -> None:
        command = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        log = open(self.folder / f"redis-{self.port}.log", "ab")  # noqa: SIM115 - the server holds it until it ends
        self.process = subprocess.Popen(command, cwd=self.folder, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(redis.RedisError):
                if self.client().ping():
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis-server on port {self.port} did not answer")
            time.sleep(0.05)

    def kill(self) -> None:
        if self.process is not None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()
            self.process = None

    def used_memory(self) -> int:
        return int(self.client().info("memory")["used_memory"])


@contextlib.contextmanager
def private_redis(folder: Path) -> Iterator[PrivateRedis]:
    server = PrivateRedis(folder)
    try:
        yield server
    finally:
        server.kill()


def disturbed_run(
    pipeline: Pipeline, source: Path, inject: Callable[[], float], start_at: int = 4
) -> tuple[MergeUpdate, float]:
    """Land the run, inject the fault once ``start_at`` frames are counted (``inject`` returns when the fault ended),
    and wait for the final merge; returns it with the recovery time."""
    pipeline.land(source)
    pipeline.wait_counted(start_at)
    ended = inject()
    update, seen = pipeline.final_merge()
    return update, seen - ended


def wait_for_rank_busy_beyond(pipeline: Pipeline, frame: int) -> dict[str, int]:
    """The in-flight record ({frame, pid}) of a rank analysing a frame past ``frame`` (mid-run)."""

    def busy() -> dict[str, int] | None:
        return next((r for r in pipeline.inflight().values() if r.get("frame", -1) >= frame), None)

    return pipeline.wait_for(quietly(busy), what=f"a rank analysing a frame past {frame}")
