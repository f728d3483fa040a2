"""The ingest service on the real broker, Redis and HDF5 files: outbox, sample validation, unique run ids."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import kombu
import pytest

from libs.contracts.messages import RunManifest, decode_message
from libs.contracts.settings import Settings
from libs.runtime.bus import Publisher
from libs.runtime.state import LiveState
from libs.science.formats.nxmx import NxmxRunWriter
from libs.science.geometry import Beam
from services.ingest.service import Ingest
from tests.support.frames import small_multipanel_detector, synthetic_frames
from tests.support.namespace import listening

LYSOZYME = {"sample": "lyso", "cell": [79.1, 79.1, 38.0, 90, 90, 90], "space_group": "P 43 21 2"}


def write_run(path: Path, frames: int = 2) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    detector = small_multipanel_detector()
    with NxmxRunWriter(path, detector, Beam(wavelength=1.0)) as writer:
        for image in synthetic_frames(detector, frames):
            writer.append(image)
    return path


def write_sample(folder: Path, description: dict[str, object]) -> None:
    (folder / "sample.json").write_text(json.dumps(description))


@pytest.fixture
def manifests(settings: Settings) -> Iterator[kombu.simple.SimpleQueue]:
    """Every RunManifest published in the test's namespace."""
    with listening(settings, "runs", "#", "manifests") as queue:
        yield queue


def received(queue: kombu.simple.SimpleQueue, count: int) -> list[RunManifest]:
    found = []
    for _ in range(count):
        message = queue.get(timeout=10)
        message.ack()
        found.append(decode_message(message.body, RunManifest))
    return found


def ingest_for(settings: Settings, *landing: Path) -> Ingest:
    """An ingest watching ``landing`` (quiet period 0: a file is complete when seen), its work dir beside them."""
    work_dir = landing[0].parent / "work"
    update = {"landing_dirs": [str(d) for d in landing], "ingest_quiet_seconds": 0.0, "work_dir": work_dir}
    return Ingest(settings.model_copy(update=update))


def test_a_manifest_whose_publish_failed_is_published_from_the_outbox(
    settings: Settings, tmp_path: Path, manifests: kombu.simple.SimpleQueue
) -> None:
    landing = tmp_path / "landing"
    write_run(landing / "r1.h5")
    write_sample(landing, LYSOZYME)
    # A broker that cannot be reached: the publish fails after its retries (kept short here).
    unreachable = settings.model_copy(update={"amqp_url": "amqp://guest:guest@127.0.0.1:1//"})
    broken = ingest_for(unreachable, landing)
    broken._publisher = Publisher(unreachable, role="ingest", retry_seconds=0.5)
    broken.scan()  # logs the failed publish and goes on
    assert LiveState(settings).unpublished_runs() == ["r1"]
    saved = LiveState(settings).run("r1")
    assert saved is not None and not saved.live
    # A restarted ingest publishes it first thing, although Redis already holds the finished run.
    restarted = ingest_for(settings, landing)
    restarted.scan()
    (manifest,) = received(manifests, 1)
    assert manifest.run_id == "r1" and not manifest.live and manifest.frame_count == 2
    assert LiveState(settings).unpublished_runs() == []
    restarted.scan()
    assert restarted.publisher.published_total == 1, "the finished run was published again"
    restarted.stop()


@pytest.mark.parametrize(
    ("description", "named"),
    [
        ({"cell": [float("nan"), 79.1, 38.0, 90, 90, 90], "space_group": "P 43 21 2"}, "not a finite number"),
        ({"cell": [79.1, 79.1, 38.0, 90, 90, 90], "space_group": "P 99 99"}, "unknown space group"),
        ({"cell": [791.0, 79.1, 38.0, 90, 90, 90], "space_group": "P 1"}, "exceeds 500 Å"),
        ({"cell": [79.1, 70.0, 38.0, 90, 90, 90], "space_group": "P 43 21 2"}, "not compatible"),
        ({"cell": [79.1, 79.1, 38.0, 90, 90, 90]}, "both the cell and the space group"),
    ],
)
def test_a_bad_sample_description_rejects_the_run_until_it_is_fixed(
    settings: Settings,
    tmp_path: Path,
    manifests: kombu.simple.SimpleQueue,
    description: dict[str, object],
    named: str,
) -> None:
    landing = tmp_path / "landing"
    write_run(landing / "r1.h5")
    write_sample(landing, description)
    ingest = ingest_for(settings, landing)
    ingest.scan()
    (rejection,) = LiveState(settings).rejections()
    assert named in rejection.reason and "sample.json" in rejection.reason
    assert LiveState(settings).run("r1") is None
    ingest.scan()  # unchanged: still set aside, not rejected twice
    assert len(LiveState(settings).rejections()) == 1
    write_sample(landing, LYSOZYME)  # fixed: the run comes in without touching its data
    ingest.scan()
    (manifest,) = received(manifests, 1)
    assert manifest.run_id == "r1" and manifest.space_group == "P 43 21 2"
    ingest.stop()


def test_runs_whose_names_collide_get_distinct_ids(
    settings: Settings, tmp_path: Path, manifests: kombu.simple.SimpleQueue
) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    for landing in (first, second):
        write_run(landing / "run 1.h5")
        write_run(landing / "run?1.h5")
        write_sample(landing, LYSOZYME)
    ingest = ingest_for(settings, first, second)
    ingest.scan()
    published = received(manifests, 4)
    ids = {manifest.run_id for manifest in published}
    assert len(ids) == 4, ids
    files = {manifest.files[0] for manifest in published}
    assert files == {str(folder / name) for folder in (first, second) for name in ("run 1.h5", "run?1.h5")}
    ingest.stop()


def test_after_redis_was_emptied_finished_runs_are_not_published_again(
    settings: Settings, tmp_path: Path, manifests: kombu.simple.SimpleQueue
) -> None:
    landing = tmp_path / "landing"
    write_run(landing / "r1.h5")
    write_sample(landing, LYSOZYME)
    first = ingest_for(settings, landing)
    first.scan()
    (published,) = received(manifests, 1)
    first.stop()
    LiveState(settings).delete_namespace()  # Redis restarted without persistence
    restarted = ingest_for(settings, landing)
    restarted.scan()
    restored = LiveState(settings).run("r1")
    assert restored is not None and restored.revision == published.revision and not restored.live
    assert restarted.publisher.published_total == 0, "a finished run was published again at live priority"
    write_run(landing / "r2.h5")  # a new run is still seen and published
    restarted.scan()
    (new,) = received(manifests, 1)
    assert new.run_id == "r2"
    restarted.stop()
