"""The live data path on the real broker, Redis, HDF5 files and mpiexec: ingest → dispatcher → MPI analysis → merger.

One set of services runs for the whole module (its own namespace and folders); each test writes runs into the
landing directory, the way a detector would, and checks what comes out.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import gemmi
import h5py
import hdf5plugin  # noqa: F401 - registers the bitshuffle filter used below
import numpy as np
import pytest

from libs.contracts.datasets import dataset_id_for
from libs.contracts.messages import FrameResult, MergeUpdate, RunManifest, decode_message
from libs.simulator.files import read_truth
from tests.support.harness import Services

pytestmark = pytest.mark.slow  # every service, mpiexec jobs, minutes

REPO = Path(__file__).resolve().parents[1]
CELL_TUPLE = (79.1, 79.1, 38.0, 90.0, 90.0, 90.0)
CELL = list(CELL_TUPLE)
SPACE_GROUP = "P 43 21 2"
SFX = [sys.executable, "-m", "sfx"]


class Pipeline(Services):
    """Every service running, plus helpers to feed them runs and wait for their results."""

    def __init__(self, root: Path) -> None:
        landing = root / "landing"
        super().__init__(
            root,
            landing_dirs=[landing],
            ingest_quiet_seconds=2.0,
            merge_update_seconds=1.0,
            # Two runs at once, two ranks each (as many processes as before the reservation existed).
            reservation_nodes=2,
            ranks_per_node=2,
            job_max_ranks=2,
        )
        self.landing = landing
        self.staging = root / "staging"
        self.landing.mkdir(parents=True)
        self.staging.mkdir()

    def simulate_run(self, name: str, frames: int, seed: int, *extra: str) -> Path:
        """A run written to the staging folder (not yet seen by ingest)."""
        return self.simulate(self.staging / f"{name}.h5", frames, seed, *extra)

    def land(self, path: Path, sample: str) -> Path:
        """Describe the run's sample, then move its file into the landing directory in one rename."""
        run_id = path.stem
        description = {"sample": sample, "cell": CELL, "space_group": SPACE_GROUP}
        (self.landing / f"{run_id}.sample.json").write_text(json.dumps(description))
        target = self.landing / path.name
        os.replace(path, target)
        return target

    def describe(self, run_id: str, sample: str) -> None:
        description = {"sample": sample, "cell": CELL, "space_group": SPACE_GROUP}
        (self.landing / f"{run_id}.sample.json").write_text(json.dumps(description))

    def final_merge(self, run_ids: list[str], sample: str, trial: str = "live") -> MergeUpdate:
        manifest = RunManifest(
            run_id=run_ids[0], files=["x"], file_format="nxmx", sample=sample, cell=CELL_TUPLE, space_group=SPACE_GROUP
        )
        dataset = dataset_id_for(manifest)

        def done() -> MergeUpdate | None:
            update = self.state.merge(dataset, trial)
            ready = update is not None and update.final and set(run_ids) <= set(update.run_ids) and update.mtz_path
            return update if ready else None

        return self.wait_for(done, what=f"final merge of {run_ids}")

    def journal(self, update: MergeUpdate) -> list[FrameResult]:
        assert update.mtz_path is not None
        path = Path(update.mtz_path).parent / "results.jsonl"
        return [decode_message(line, FrameResult) for line in path.read_bytes().splitlines()]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pipeline]:
    with Pipeline(tmp_path_factory.mktemp("pipeline")) as running:
        yield running


def merged_cc_to_truth(mtz_path: Path, truth_path: Path) -> float:
    """Pearson CC between IMEAN of an MTZ and the simulator's true merged intensities (common reflections)."""
    mtz = gemmi.read_mtz_file(str(mtz_path))
    miller = np.array(mtz.make_miller_array(), dtype=np.int64)
    intensity = np.array(mtz.column_with_label("IMEAN"), dtype=float)
    truth = read_truth(truth_path)
    true_by_index = {tuple(h): i for h, i in zip(truth.merged_miller.tolist(), truth.merged_intensity, strict=True)}
    pairs = [
        (i, true_by_index[tuple(h)])
        for h, i in zip(miller.tolist(), intensity, strict=True)
        if tuple(h) in true_by_index
    ]
    observed, true = np.array(pairs).T
    return float(np.corrcoef(observed, true)[0, 1])


def pika_url(kombu_url: str) -> str:
    """kombu writes the default virtual host as a trailing ``//``; pika wants it escaped as ``/%2F``."""
    return kombu_url[:-2] + "/%2F" if kombu_url.endswith("//") else kombu_url


def subscriber_program(folder: Path) -> Path:
    """The pika subscriber exactly as docs/subscribing.md shows it."""
    text = (REPO / "docs" / "subscribing.md").read_text()
    code = re.search(r"```python\n(.*?)```", text, re.S)
    assert code is not None, "docs/subscribing.md has no python block"
    program = folder / "subscriber.py"
    program.write_text(code.group(1))
    return program


def test_two_runs_one_live_are_processed_and_merged_exactly_once(pipeline: Pipeline, tmp_path: Path) -> None:
    frames = 30
    complete_run = pipeline.simulate_run("run_a", frames, seed=11)
    complete_truth = complete_run.with_name("run_a.truth.h5")

    subscriber = subprocess.Popen(
        [
            sys.executable,
            str(subscriber_program(tmp_path)),
            "--url",
            pika_url(pipeline.settings.amqp_url),
            "--namespace",
            pipeline.settings.namespace,
            "--run",
            "run_b",
            "--seconds",
            "60",
            "--count",
            str(frames),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert subscriber.stdout is not None
    assert subscriber.stdout.readline().strip() == "subscribed"

    pipeline.land(complete_run, sample="lyso-e2e")
    pipeline.describe("run_b", sample="lyso-e2e")
    live_writer = subprocess.Popen(
        [
            *SFX,
            "simulate",
            "--out",
            str(pipeline.landing / "run_b.h5"),
            "--frames",
            str(frames),
            "--seed",
            "12",
            "--live-rate",
            "8",
        ],
        env=pipeline.env,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
    )
    # The live run is announced while it is still being written.
    pipeline.wait_for(
        lambda: (m := pipeline.state.run("run_b")) is not None and m.live, what="a live manifest of run_b"
    )
    assert live_writer.wait(timeout=120) == 0

    update = pipeline.final_merge(["run_a", "run_b"], sample="lyso-e2e")

    # Every frame written is accounted for exactly once.
    for run_id in ("run_a", "run_b"):
        counters = pipeline.state.counters(run_id, "live")
        assert counters["frames"] == frames, (run_id, counters)
        assert counters["failed"] == 0, (run_id, counters)
    journal = pipeline.journal(update)
    keys = [result.key for result in journal]
    assert len(keys) == len(set(keys)) == 2 * frames
    assert {key[2] for key in keys if key[0] == "run_b"} == set(range(frames))

    # The external subscriber saw exactly run_b's frames.
    output, errors = subscriber.communicate(timeout=120)
    received = [json.loads(line) for line in output.splitlines() if line.strip()]
    assert {r["run"] for r in received} == {"run_b"}, errors
    assert sorted(r["frame"] for r in received) == list(range(frames))

    # The merged intensities are as good as the offline chain on the same frames.
    assert update.mtz_path is not None and Path(update.mtz_path).exists()
    offline = tmp_path / "offline"
    pipeline.sfx(
        "process",
        str(pipeline.landing / "run_a.h5"),
        str(pipeline.landing / "run_b.h5"),
        "--cell",
        " ".join(map(str, CELL)),
        "--space-group",
        SPACE_GROUP,
        "--out",
        str(offline),
        "--nproc",
        "2",
        check=True,
    )
    live_cc = merged_cc_to_truth(Path(update.mtz_path), complete_truth)
    offline_cc = merged_cc_to_truth(offline / "merged.mtz", complete_truth)
    print(f"merged CC to truth: live pipeline {live_cc:.4f}, offline sfx process {offline_cc:.4f}")
    assert live_cc >= offline_cc - 0.01
    assert live_cc > 0.5


def test_corrupt_frame_and_corrupt_file_are_reported_and_the_rest_processed(pipeline: Pipeline) -> None:
    frames, bad_frame = 12, 4
    run = pipeline.simulate_run("run_c", frames, 13, "--compression", "bitshuffle-lz4")
    with h5py.File(run, "r") as file:
        chunk = file["/entry/data/data"].id.get_chunk_info_by_coord((bad_frame, 0, 0))
    with open(run, "r+b") as raw:
        raw.seek(chunk.byte_offset + 12)
        raw.write(b"\xff" * 4096)  # the bitshuffle-LZ4 stream of this frame no longer decodes
    broken = pipeline.staging / "broken_master.h5"
    broken.write_bytes(b"\x89HDF\r\n\x1a\n" + os.urandom(50_000))

    pipeline.land(run, sample="lyso-corrupt")
    pipeline.land(broken, sample="lyso-corrupt")

    update = pipeline.final_merge(["run_c"], sample="lyso-corrupt")
    counters = pipeline.state.counters("run_c", "live")
    assert counters["frames"] == frames and counters["failed"] == 1
    failed = [r for r in pipeline.journal(update) if r.error is not None]
    assert [r.frame_index for r in failed] == [bad_frame]
    assert "frame 4" in failed[0].error and "/entry/data/data" in failed[0].error  # type: ignore[operator]

    rejected = pipeline.wait_for(
        lambda: [r for r in pipeline.state.rejections() if "broken" in r.path], what="the rejection of broken_master.h5"
    )
    assert "broken_master.h5" in rejected[0].reason


def test_restarting_the_merger_mid_run_gives_the_same_mtz(pipeline: Pipeline) -> None:
    frames = 30
    source = pipeline.simulate_run("source", frames, seed=14)
    reference = pipeline.staging / "run_ref.h5"
    restarted = pipeline.staging / "run_restart.h5"
    os.link(source, reference)
    os.link(source, restarted)

    pipeline.land(reference, sample="lyso-reference")
    reference_update = pipeline.final_merge(["run_ref"], sample="lyso-reference")

    pipeline.land(restarted, sample="lyso-restart")
    pipeline.wait_for(
        lambda: pipeline.state.counters("run_restart", "live")["frames"] >= 10, what="a third of run_restart merged"
    )
    pipeline.stop("merger")
    # Frames keep arriving on the durable queue while the merger is down: wait until some are there (or the job has
    # ended, so that all it publishes is published) before it comes back.
    pipeline.wait_for(
        lambda: pipeline.queue_depth("merger.frames") > 0 or pipeline.job_ended("run_restart.live"),
        what="frames waiting for the stopped merger",
    )
    pipeline.start("merger")
    restarted_update = pipeline.final_merge(["run_restart"], sample="lyso-restart")

    assert restarted_update.frames_merged == reference_update.frames_merged
    counters = pipeline.state.counters("run_restart", "live")
    assert counters["frames"] == frames
    assert len(pipeline.journal(restarted_update)) == frames

    def columns(update: MergeUpdate) -> dict[tuple[int, int, int], tuple[float, float]]:
        assert update.mtz_path is not None
        mtz = gemmi.read_mtz_file(update.mtz_path)
        miller = mtz.make_miller_array().tolist()
        values = zip(mtz.column_with_label("IMEAN"), mtz.column_with_label("SIGIMEAN"), strict=True)
        return {tuple(h): (float(i), float(s)) for h, (i, s) in zip(miller, values, strict=True)}

    reference_columns, restarted_columns = columns(reference_update), columns(restarted_update)
    assert reference_columns.keys() == restarted_columns.keys()
    reference_values = np.array([reference_columns[h] for h in sorted(reference_columns)])
    restarted_values = np.array([restarted_columns[h] for h in sorted(reference_columns)])
    np.testing.assert_allclose(restarted_values, reference_values, rtol=1e-5, atol=1e-6)


def test_reprocess_runs_a_second_trial_merged_apart_from_live(pipeline: Pipeline) -> None:
    frames = 12
    pipeline.land(pipeline.simulate_run("run_r", frames, seed=15), sample="lyso-reprocess")
    live = pipeline.final_merge(["run_r"], sample="lyso-reprocess")

    refused = pipeline.sfx("reprocess", "run_r", "--trial", "strict", "--set", "spotfinding.no_such_thing=1")
    assert refused.returncode == 2 and "no_such_thing" in refused.stderr

    pipeline.sfx("reprocess", "run_r", "--trial", "strict", "--set", "spotfinding.sigma_strong=6", check=True)
    strict = pipeline.final_merge(["run_r"], sample="lyso-reprocess", trial="strict")

    assert pipeline.state.counters("run_r", "strict")["frames"] == frames
    assert pipeline.state.counters("run_r", "live")["frames"] == frames  # the live trial is not disturbed
    assert pipeline.state.merge(live.dataset_id, "live") == live
    assert strict.mtz_path != live.mtz_path and strict.mtz_path is not None and Path(strict.mtz_path).exists()
    live_spots = sum(r.spot_count for r in pipeline.journal(live))
    strict_spots = sum(r.spot_count for r in pipeline.journal(strict))
    assert {r.trial for r in pipeline.journal(strict)} == {"strict"}
    assert strict_spots < live_spots  # a stricter threshold finds fewer spots: the trial's parameters were used
