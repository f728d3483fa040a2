"""Run recognition and file stability in a landing directory."""

from __future__ import annotations

from pathlib import Path

from services.ingest.discovery import FileObservation, StabilityTracker, recognise_runs, run_id_for


def test_master_and_data_files_form_one_run_and_cxi_finds_its_geometry(tmp_path: Path) -> None:
    names = [
        "lyso_001_master.h5",
        "lyso_001_data_000001.h5",
        "lyso_001_data_000002.h5",
        "other run.nxs",
        "r0042.cxi",
        "r0042.geom",
        "lyso_001.truth.h5",
        "notes.txt",
    ]
    runs = {run.run_id: run for run in recognise_runs(tmp_path / n for n in names)}
    assert {"lyso_001", "r0042"} < set(runs) and len(runs) == 3
    assert [run_id for run_id in runs if run_id.startswith("other_run-")] == [run_id_for(tmp_path / "other run.nxs")]
    assert [p.name for p in runs["lyso_001"].data_files] == ["lyso_001_data_000001.h5", "lyso_001_data_000002.h5"]
    assert runs["lyso_001"].file_format == "nxmx"
    assert runs["r0042"].file_format == "cxi"
    assert runs["r0042"].geometry == tmp_path / "r0042.geom"


def test_run_id_is_safe_and_altered_names_stay_apart() -> None:
    altered = run_id_for(Path("/x/a b$c_master.h5"))
    assert altered.startswith("a_b_c-") and set(altered) <= set("abcdef0123456789_-")
    assert run_id_for(Path("/x/run 1.h5")) != run_id_for(Path("/x/run?1.h5"))
    assert run_id_for(Path("/x/run_1.h5")) == "run_1"  # a safe name is kept as it is
    assert not run_id_for(Path("/x/..h5")).startswith(".")


def test_stability_needs_a_quiet_period() -> None:
    tracker = StabilityTracker(quiet_seconds=2.0)
    path = Path("/data/r.h5")
    assert not tracker.observe(FileObservation(path, 100, 1.0), now=10.0)
    assert not tracker.observe(FileObservation(path, 100, 1.0), now=11.0)
    assert tracker.observe(FileObservation(path, 100, 1.0), now=12.5)
    # it grows again: the clock restarts
    assert not tracker.observe(FileObservation(path, 200, 13.0), now=13.0)
    assert not tracker.observe(FileObservation(path, 200, 13.0), now=14.0)
    assert tracker.observe(FileObservation(path, 200, 13.0), now=15.0)
