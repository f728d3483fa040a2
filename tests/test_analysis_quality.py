"""Quality of the per-frame analysis against the simulator's ground truth.

200 frames of the default simulation (lysozyme-like P 43 21 2 on a Jungfrau-4M-like detector, 40 % hits) and 60
frames on a single-panel detector go through ``process_frame``; each figure of issue 4 is one test. The figures
themselves are measured by benchmarks/bench_analysis_quality.py, which prints them (``python -m benchmarks
analysis_quality``) and defines them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from benchmarks.bench_analysis_quality import Figures, multi_panel_figures, single_panel_figures
from libs.contracts.messages import FrameResult, decode_message
from libs.contracts.parameters import AnalysisParameters
from libs.science.crystal import lattice_operators, misorientation_degrees
from libs.science.formats import open_run_writer
from libs.simulator import Experiment, SimulationConfig
from services.analysis.pipeline import AnalysisError, process_frame


@pytest.fixture(scope="module")
def multi_panel() -> Figures:
    return multi_panel_figures()


@pytest.fixture(scope="module")
def single_panel() -> Figures:
    return single_panel_figures()


@pytest.mark.slow  # the figures fixtures analyse 260 simulated frames (about a minute)
@pytest.mark.parametrize("which", ["multi_panel", "single_panel"])
def test_hit_finding_classifies_frames(which: str, request: pytest.FixtureRequest) -> None:
    figures: Figures = request.getfixturevalue(which)
    assert figures.true_hits > 0 and figures.true_hits < figures.frames
    assert figures.correct_class / figures.frames >= 0.98


@pytest.mark.slow
@pytest.mark.parametrize("which", ["multi_panel", "single_panel"])
def test_spot_recall_and_spurious_spots(which: str, request: pytest.FixtureRequest) -> None:
    figures: Figures = request.getfixturevalue(which)
    assert figures.strong_total > 1000
    assert figures.strong_found / figures.strong_total >= 0.95
    assert figures.spots_spurious / figures.spots_found <= 0.10


@pytest.mark.slow
@pytest.mark.parametrize("which", ["multi_panel", "single_panel"])
def test_indexing_rate_and_no_wrong_lattice(which: str, request: pytest.FixtureRequest) -> None:
    figures: Figures = request.getfixturevalue(which)
    assert figures.indexable >= 10
    assert figures.indexable_indexed / figures.indexable >= 0.90
    assert figures.wrong_lattice == 0
    assert figures.blank_indexed == 0


@pytest.mark.slow
@pytest.mark.parametrize("which", ["multi_panel", "single_panel"])
def test_orientation_and_cell_accuracy(which: str, request: pytest.FixtureRequest) -> None:
    figures: Figures = request.getfixturevalue(which)
    assert len(figures.misorientations) >= 10
    assert float(np.median(figures.misorientations)) <= 0.05
    assert max(figures.cell_errors) <= 0.005


@pytest.mark.slow
@pytest.mark.parametrize("which", ["multi_panel", "single_panel"])
def test_integrated_intensities_follow_truth(which: str, request: pytest.FixtureRequest) -> None:
    figures: Figures = request.getfixturevalue(which)
    assert len(figures.ours) >= 200
    assert float(np.corrcoef(figures.ours, figures.truth)[0, 1]) >= 0.9
    # Beyond correlation: little bias, and σ that describe the real scatter about the truth (with our Lorentz).
    pulls = figures.pulls()
    assert pulls is not None
    assert abs(pulls[0]) < 0.5 and 0.7 < pulls[1] < 1.5
    # Our stills Lorentz factor, from our refined width, near the simulator's.
    lorentz = figures.lorentz_ratio()
    assert lorentz is not None
    assert 0.7 < lorentz[0] < 1.3 and lorentz[1] < 0.3


@pytest.mark.slow  # five sfx process-frame commands, each importing the analysis
def test_process_frame_command_reads_an_nxmx_run(tmp_path: Path) -> None:
    """``sfx process-frame`` on a real NXmx file: the JSON carries the truth's orientation; bad input is named."""
    config = SimulationConfig(seed=5)
    experiment = Experiment(config)
    hit_index = next(i for i in range(50) if experiment.truth(i).hit)
    blank_index = next(i for i in range(50) if not experiment.truth(i).hit)
    path = tmp_path / "run_master.h5"
    with open_run_writer(path, "nxmx", detector=experiment.detector, beam=experiment.beam, mask=experiment.mask) as w:
        for index in range(max(hit_index, blank_index) + 1):
            w.append(experiment.frame(index).image)
    cell = " ".join(str(x) for x in config.cell)
    base = [
        sys.executable,
        "-m",
        "sfx",
        "process-frame",
        str(path),
        "--cell",
        cell,
        "--space-group",
        config.space_group,
    ]

    done = subprocess.run([*base, "--frame", str(hit_index), "--json"], capture_output=True, text=True, check=True)
    result = json.loads(done.stdout)
    assert {"spot_count", "hit", "indexed", "A", "cell", "n_integrated", "timings"} <= set(result)
    assert result["hit"] and result["indexed"] and result["n_integrated"] > 50
    truth = experiment.truth(hit_index)
    assert truth.A is not None
    angle, _ = misorientation_degrees(np.array(result["A"]), truth.A, lattice_operators(config.cell))
    assert angle < 0.1
    assert set(result["timings"]) >= {"spotfinding", "indexing", "refinement", "integration"}

    text = subprocess.run([*base, "--frame", str(blank_index)], capture_output=True, text=True, check=True).stdout
    assert "blank" in text and "not a hit" in text and "spotfinding" in text

    bad = subprocess.run([*base, "--frame", "999"], capture_output=True, text=True)
    assert bad.returncode == 2 and "frame 999 does not exist" in bad.stderr
    bad = subprocess.run([*base, "--frame", "0", "--set", "spotfinding.sigma_strang=4"], capture_output=True, text=True)
    assert bad.returncode == 2 and "spotfinding.sigma_strang" in bad.stderr and "sigma_strong" in bad.stderr
    wrong_cell = [*base[:-4], "--cell", "79 60 38 90 90 90", "--space-group", config.space_group, "--frame", "0"]
    bad = subprocess.run(wrong_cell, capture_output=True, text=True)
    assert bad.returncode == 2 and "not compatible" in bad.stderr


def test_a_frame_of_random_spots_is_a_hit_but_never_indexed() -> None:
    """Spots that are not a lattice (here 80 random bright Gaussian blobs on a real blank frame) index nothing."""
    config = SimulationConfig(seed=7)
    experiment = Experiment(config)
    blank = next(i for i in range(50) if not experiment.truth(i).hit)
    image = experiment.frame(blank).image.copy()
    rng = np.random.default_rng(4)
    n_panels, n_slow, n_fast = image.shape
    offsets = np.arange(-2, 3)
    profile = np.exp(-0.5 * (offsets[:, None] ** 2 + offsets[None, :] ** 2) / 0.7**2)
    for _ in range(80):
        panel, slow, fast = rng.integers(n_panels), rng.integers(5, n_slow - 5), rng.integers(5, n_fast - 5)
        image[panel, slow - 2 : slow + 3, fast - 2 : fast + 3] += rng.poisson(rng.uniform(50, 400) * profile / 3.0)
    analysis = process_frame(
        image,
        experiment.detector,
        experiment.beam,
        experiment.mask,
        config.cell,
        config.space_group,
        AnalysisParameters(),
    )
    assert analysis.hit and analysis.spot_count >= 60
    assert not analysis.indexed and analysis.A is None and analysis.reflections is None
    result = analysis.to_frame_result("r1", "live", blank, started_at=1.0, finished_at=2.0)
    assert result.hit and not result.indexed and result.spot_count == analysis.spot_count


def test_an_indexed_frame_becomes_a_valid_frame_result_message() -> None:
    config = SimulationConfig(seed=7)
    experiment = Experiment(config)
    hit = next(i for i in range(50) if experiment.truth(i).hit)
    frame = experiment.frame(hit)
    analysis = process_frame(
        frame.image,
        experiment.detector,
        experiment.beam,
        experiment.mask,
        config.cell,
        config.space_group,
        AnalysisParameters(),
    )
    assert analysis.indexed and analysis.reflections is not None and analysis.A is not None
    message = analysis.to_frame_result("run-7", "live", hit, started_at=10.0, finished_at=10.1, job_id="j", rank=2)
    decoded = decode_message(message.encode(), FrameResult)
    assert decoded.key == ("run-7", "live", hit) and decoded.indexed and decoded.rank == 2
    assert np.allclose(np.array(decoded.A), analysis.A)
    assert decoded.reflections is not None and len(decoded.reflections) == analysis.n_integrated
    assert np.array_equal(decoded.reflections.miller, analysis.reflections.miller)
    assert set(decoded.timings) == {"spotfinding", "hitfinding", "indexing", "refinement", "integration"}


def test_bad_inputs_are_named() -> None:
    config = SimulationConfig(seed=7, detector="single")
    experiment = Experiment(config)
    image = experiment.frame(0).image
    parameters = AnalysisParameters()
    with pytest.raises(AnalysisError, match="image has shape"):
        process_frame(
            image[:, :-1], experiment.detector, experiment.beam, experiment.mask, config.cell, "P 43 21 2", parameters
        )
    with pytest.raises(AnalysisError, match="unknown space group 'P 43 21 9'"):
        process_frame(
            image, experiment.detector, experiment.beam, experiment.mask, config.cell, "P 43 21 9", parameters
        )
    with pytest.raises(AnalysisError, match="not compatible with space group"):
        process_frame(
            image,
            experiment.detector,
            experiment.beam,
            experiment.mask,
            (79, 60, 38, 90, 90, 90),
            "P 43 21 2",
            parameters,
        )
