"""The simulator: spots where the geometry puts them, truth that agrees with the pixels, blanks, determinism,
the reflection-level mode, uniform orientations, realistic photon levels, and the files and command around it."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from libs.science.crystal import reciprocal_space_operators, unit_cell
from libs.science.formats import FormatError, open_run
from libs.simulator import Experiment, FrameTruth, SimulationConfig
from libs.simulator.files import read_reflection_run, read_truth, truth_path_for
from libs.simulator.image import QuantisedPoisson
from libs.simulator.physics import BeamModel, Crystals, line_search, predict, sigma_components
from sfx.cli import main


@pytest.fixture(scope="module")
def experiment() -> Experiment:
    return Experiment(SimulationConfig(seed=7))


@pytest.fixture(scope="module")
def hit_frames(experiment: Experiment) -> list:  # type: ignore[type-arg]
    frames = []
    index = 0
    while len(frames) < 4:
        if experiment.truth(index).hit:
            frames.append(experiment.frame(index))
        index += 1
    return frames


def isolated_spots(truth: FrameTruth, mask: np.ndarray, half: int, minimum_distance: float) -> np.ndarray:
    """Spots whose box of ±half pixels is entirely on valid pixels and far from every other predicted spot."""
    _, n_slow, n_fast = mask.shape
    keep = []
    for j in range(len(truth)):
        f0, s0, panel = int(truth.fast[j]), int(truth.slow[j]), int(truth.panel[j])
        if not (half <= f0 < n_fast - half and half <= s0 < n_slow - half):
            continue
        if not mask[panel, s0 - half : s0 + half + 1, f0 - half : f0 + half + 1].all():
            continue
        same = truth.panel == panel
        distance = np.hypot(truth.fast[same] - truth.fast[j], truth.slow[same] - truth.slow[j])
        if np.sum(distance < minimum_distance) > 1:
            continue
        keep.append(j)
    return np.array(keep, dtype=int)


def box(image: np.ndarray, truth: FrameTruth, j: int, half: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(pixel values, fast centres, slow centres) of the ±half box around spot j."""
    f0, s0, panel = int(truth.fast[j]), int(truth.slow[j]), int(truth.panel[j])
    values = image[panel, s0 - half : s0 + half + 1, f0 - half : f0 + half + 1].astype(float)
    slow, fast = np.meshgrid(
        np.arange(s0 - half, s0 + half + 1) + 0.5, np.arange(f0 - half, f0 + half + 1) + 0.5, indexing="ij"
    )
    return values, fast, slow


def test_strong_spots_sit_where_the_geometry_predicts() -> None:
    # A high-dose simulation (strong crystals, same physics) so centroids are precise.
    bright = Experiment(SimulationConfig(seed=3, hit_fraction=1.0, mean_full_photons_at_2a=3000.0, saturation=10**9))
    offsets = []
    for index in range(2):
        frame = bright.frame(index)
        truth = frame.truth
        background = bright.background_expectation(index)
        for j in isolated_spots(truth, bright.mask, half=5, minimum_distance=12):
            if truth.expected_counts[j] < 3000:
                continue
            values, fast, slow = box(frame.image, truth, j, 5)
            signal = values - box(background, truth, j, 5)[0]
            total = signal.sum()
            offsets.append(
                ((signal * fast).sum() / total - truth.fast[j], (signal * slow).sum() / total - truth.slow[j])
            )
            # The spot's position is also where the ray s1 meets the detector (geometry round trip).
            lab = bright.detector.pixel_to_lab(truth.panel[j : j + 1], truth.fast[j : j + 1], truth.slow[j : j + 1])
            assert bright.detector.ray_to_pixel(lab)[0][0] == truth.panel[j]
    offsets_array = np.array(offsets)
    assert len(offsets_array) >= 20
    assert np.median(np.abs(offsets_array)) < 0.03
    assert np.max(np.abs(offsets_array)) < 0.2


def test_spot_positions_obey_bragg_geometry(experiment: Experiment) -> None:
    truth = next(t for t in (experiment.truth(i) for i in range(20)) if t.hit)
    lab = experiment.detector.pixel_to_lab(truth.panel, truth.fast, truth.slow)
    direction = lab / np.linalg.norm(lab, axis=1, keepdims=True)
    # The scattering vector of the spot for the wavelength that records it, r* = k*·u − s0(k*), is the lattice
    # point r = A·h moved along the Ewald sphere's normal by less than its excitation error.
    k_star = 1 / truth.wavelength
    r_spot = k_star[:, None] * direction
    r_spot[:, 2] += k_star
    r = truth.miller @ np.asarray(truth.A).T
    centred = r - np.array([0.0, 0.0, 1 / experiment.beam.wavelength])
    normal = centred / np.linalg.norm(centred, axis=1, keepdims=True)
    moved = r_spot - r
    assert np.abs(np.cross(moved, normal)).max() < 1e-7
    assert np.all(np.abs(np.einsum("ij,ij->i", moved, normal)) <= np.abs(truth.excitation_error) + 1e-9)
    # And r = A·h is the reciprocal-lattice vector of that d-spacing in the crystal's cell.
    assert np.allclose(1 / np.linalg.norm(r, axis=1), truth.d_spacing)
    cell = unit_cell(truth.cell)  # type: ignore[arg-type]
    assert np.allclose(cell.calculate_d_array(truth.miller.astype(np.int32)), truth.d_spacing, rtol=1e-9)


def test_truth_agrees_with_the_image(experiment: Experiment, hit_frames: list) -> None:  # type: ignore[type-arg]
    measured, expected, variance = [], [], []
    for frame in hit_frames:
        truth = frame.truth
        background = experiment.background_expectation(frame.index)
        for j in isolated_spots(truth, experiment.mask, half=5, minimum_distance=12):
            if truth.fraction_valid[j] < 0.999 or truth.overloaded[j]:
                continue
            values = box(frame.image, truth, j, 5)[0]
            bg = box(background, truth, j, 5)[0]
            measured.append(values.sum() - bg.sum())
            expected.append(truth.expected_counts[j])
            variance.append(values.sum())
            # The truth's background under the spot is the background map at its pixel.
            assert truth.background_per_pixel[j] == pytest.approx(bg[5, 5], rel=1e-6)
    measured_array, expected_array = np.array(measured), np.array(expected)
    assert len(measured_array) > 300
    assert measured_array.sum() / expected_array.sum() == pytest.approx(1.0, abs=0.01)
    pulls = (measured_array - expected_array) / np.sqrt(np.maximum(variance, 1.0))
    assert abs(np.mean(pulls)) < 0.1
    assert 0.85 < np.std(pulls) < 1.15  # Poisson counting noise, nothing more


def test_blank_frames_have_no_crystal(experiment: Experiment) -> None:
    truths = experiment.truths(range(60))
    blanks = [t for t in truths if not t.hit]
    assert len(blanks) > 20
    for truth in blanks[:2]:
        assert truth.A is None and truth.U is None and len(truth) == 0
        frame = experiment.frame(truth.index)
        background = experiment.background_expectation(truth.index)
        valid = experiment.mask
        excess = frame.image[valid].sum() - background[valid].sum()
        assert abs(excess) < 5 * np.sqrt(background[valid].sum())
        # Background alone: nothing far above its Poisson spread.
        z = (frame.image[valid] - background[valid]) / np.sqrt(background[valid] + 1)
        assert z.max() < 10
        assert experiment.reflections(truth.index)[1] is None


def test_frames_are_deterministic_in_seed_and_index() -> None:
    config = SimulationConfig(seed=11, hit_fraction=1.0)
    first, second = Experiment(config), Experiment(config)
    frame_a = first.frame(5)
    first.frame(2)
    frame_b = second.frame(5)
    assert np.array_equal(frame_a.image, frame_b.image)
    assert np.array_equal(frame_a.truth.miller, frame_b.truth.miller)
    assert np.array_equal(frame_a.truth.A, frame_b.truth.A)  # type: ignore[arg-type]
    assert not np.array_equal(frame_a.image, first.frame(6).image)
    other_seed = Experiment(SimulationConfig(seed=12, hit_fraction=1.0)).frame(5)
    assert not np.allclose(other_seed.truth.A, frame_a.truth.A)  # type: ignore[arg-type]
    # A batch gives exactly what frames one by one give.
    batch = first.reflection_batch(range(3, 8))
    truth, table = batch.frame(2)
    single_truth, single_table = first.reflections(5)
    assert table is not None and single_table is not None
    assert np.array_equal(table.intensity, single_table.intensity)
    assert np.array_equal(truth.expected_counts, single_truth.expected_counts)


def test_reflection_mode_matches_image_truth_and_counting_statistics(experiment: Experiment) -> None:
    batch = experiment.reflection_batch(range(300))
    pulls, residuals, variances, operators_seen = [], [], [], set()
    for j, index in enumerate(batch.indices):
        truth, table = batch.frame(j)
        if table is None:
            continue
        operators_seen.add(tuple(truth.indexing_operator.ravel()))
        correction = truth.lorentz * truth.polarisation
        residual = table.intensity * correction - truth.expected_counts
        residuals.append(residual)
        variances.append((table.sigma * correction) ** 2)
        pulls.append(residual / (table.sigma * correction))
        # Same physics as the images: its reflections are a subset of the image truth of the frame.
        if j < 3:
            full = experiment.truth(index)
            keys = {tuple(h) for h in full.miller}
            assert all(tuple(h) in keys for h in truth.miller)
            lookup = {tuple(h): e for h, e in zip(full.miller, full.expected_counts, strict=True)}
            assert np.allclose([lookup[tuple(h)] for h in truth.miller], truth.expected_counts)
        # Miller indices as an indexer in setting R reports them, with its A·R⁻¹: the same lattice vectors.
        indexed_A = truth.indexed_A
        assert indexed_A is not None
        assert np.allclose(table.miller @ indexed_A.T, truth.miller @ np.asarray(truth.A).T, atol=1e-9)
        assert np.array_equal(table.partiality, truth.partiality.astype(np.float32))
    all_pulls = np.concatenate(pulls)
    assert len(all_pulls) > 10_000
    # Unbiased: the mean residual is within 4 standard errors of 0 (σ from the observed counts, as an integrator's).
    all_residuals, all_variances = np.concatenate(residuals), np.concatenate(variances)
    assert abs(all_residuals.mean()) < 4 * np.sqrt(all_variances.sum()) / len(all_residuals)
    assert 0.95 < np.std(all_pulls) < 1.05
    # P 43 21 2 has no indexing ambiguity, but the indexer's choice among the 8 equivalent settings is random.
    assert len(operators_seen) > 4


def test_ambiguous_space_group_gets_random_indexing_modes() -> None:
    experiment = Experiment(SimulationConfig(space_group="P 43", seed=2))
    crystals = experiment._crystals(range(400))
    point_group = {tuple(op.ravel()) for op in reciprocal_space_operators(experiment.space_group)}
    # The lattice (4/mmm) has twice the symmetry of the point group (4): a perfect indexer picks either indexing
    # mode at random, so about half the frames come in the other setting and merging has to resolve it.
    in_point_group = [tuple(op.ravel()) in point_group for op in crystals.indexing_operator]
    assert 0.4 < np.mean(in_point_group) < 0.6


def test_orientations_are_uniform_and_hit_fraction_holds(experiment: Experiment) -> None:
    crystals = experiment._crystals(range(4000))
    assert crystals.hit.mean() == pytest.approx(0.4, abs=0.03)
    beam_in_crystal = np.einsum("fji,j->fi", crystals.U, np.array([0.0, 0.0, 1.0]))
    for component in range(3):  # Archimedes: each coordinate of a uniform unit vector is uniform on [-1, 1]
        assert stats.kstest(beam_in_crystal[:, component], "uniform", args=(-1, 2)).pvalue > 1e-3
    assert np.abs(crystals.U.mean(axis=0)).max() < 0.05
    assert np.allclose(np.linalg.det(crystals.U), 1.0)


def test_intensities_look_like_real_data(experiment: Experiment) -> None:
    truths = [t for t in experiment.truths(range(150)) if t.hit]
    strongest = np.array([t.expected_counts.max() for t in truths])
    assert 1000 < np.median(strongest) < 20000  # a few thousand photons in the strongest low-resolution spots
    d = np.concatenate([t.d_spacing for t in truths])
    counts = np.concatenate([t.expected_counts for t in truths])
    near_2a = (d > 1.9) & (d < 2.1)
    assert np.median(counts[near_2a]) < 10 and np.percentile(counts[near_2a], 90) < 100
    partiality = np.concatenate([t.partiality for t in truths])
    assert partiality.std() > 0.25 and partiality.min() < 0.05 and partiality.max() > 0.95
    # Wilson statistics of the true intensities: <I²>/<I>² ≈ 2 for acentric reflections.
    miller, intensity = experiment.true_merged_intensities()
    centric = np.array(experiment.space_group.operations().centric_flag_array(miller.astype(np.int32)), dtype=bool)
    cell = unit_cell(experiment.cell)
    d_all = cell.calculate_d_array(miller.astype(np.int32))
    # Normalise by ε times the mean in thin shells of 1/d² (E² values), then <E⁴>: 2 acentric, 3 centric.
    inv_d2 = 1 / d_all**2
    shells = np.minimum((inv_d2 / inv_d2.max() * 30).astype(int), 29)
    epsilon = np.array(experiment.space_group.operations().epsilon_factor_array(miller.astype(np.int32)), dtype=float)
    shell_mean = np.bincount(shells, intensity / epsilon) / np.bincount(shells)
    e2 = intensity / (epsilon * shell_mean[shells])
    assert np.mean(e2[~centric] ** 2) == pytest.approx(2.0, abs=0.25)
    assert np.mean(e2[centric] ** 2) == pytest.approx(3.0, abs=0.6)
    assert np.mean(intensity[(d_all > 4) & (d_all < 6)]) > 10 * np.mean(intensity[(d_all > 1.8) & (d_all < 2.0)])


@pytest.mark.slow  # an sfx simulate command (a fresh interpreter importing the simulator), ~6 s
def test_simulate_command_writes_frames_and_truth(tmp_path: Path) -> None:
    out = tmp_path / "run.nxs"
    command = [sys.executable, "-m", "sfx", "simulate", "--out", str(out), "--frames", "3", "--seed", "5"]
    result = subprocess.run([*command, "--hit-fraction", "0.7"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    truth = read_truth(truth_path_for(out))
    experiment = Experiment(truth.config)
    assert truth.n_frames == 3 and truth.config.seed == 5 and truth.config.hit_fraction == 0.7
    reader = open_run(out)
    assert reader.frame_count == 3
    images = reader.read_frames(0, 3)
    for i in range(3):
        frame = experiment.frame(i)
        assert np.array_equal(images[i], frame.image)
        stored = truth.frame(i)
        assert stored.hit == frame.truth.hit
        assert np.array_equal(stored.miller, frame.truth.miller)
        assert np.allclose(stored.fast, frame.truth.fast) and np.allclose(
            stored.expected_counts, frame.truth.expected_counts, rtol=1e-6
        )
    assert np.array_equal(reader.mask, experiment.mask)
    miller, intensity = experiment.true_merged_intensities()
    assert np.array_equal(truth.merged_miller, miller) and np.allclose(truth.merged_intensity, intensity)


def test_simulate_reflections_only(tmp_path: Path) -> None:
    out = tmp_path / "reflections.h5"
    status = main(["simulate", "--out", str(out), "--frames", "600", "--reflections-only", "--seed", "4"])
    assert status == 0
    run = read_reflection_run(out)
    truth = read_truth(truth_path_for(out))
    experiment = Experiment(run.config)
    assert run.n_frames == 600 and truth.n_frames == 600
    assert np.array_equal(run.hit, truth.hit)
    for i in (0, 1, 2, 3, 599):
        frame_truth, table = experiment.reflections(i)
        stored = run.table(i)
        assert (stored is None) == (table is None)
        if table is not None and stored is not None:
            assert np.array_equal(stored.miller, table.miller) and np.array_equal(stored.intensity, table.intensity)
            assert truth.frame(i).scale == pytest.approx(frame_truth.scale)
            assert np.allclose(run.A[i], frame_truth.indexed_A)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--cell", "79 79 38 90 90"], "--cell needs six numbers"),
        (["--cell", "79 79 38 90 90 120", "--space-group", "P 43 21 2"], "space_group"),
        (["--space-group", "P 99 nonsense"], "unknown space group"),
        (["--frames", "0"], "--frames must be at least 1"),
        (["--hit-fraction", "1.5"], "hit_fraction"),
        (["--out", "/nonexistent-dir/x.nxs"], "does not exist"),
        (["--reflections-only", "--format", "cxi"], "apply to image frames"),
        (["--live-rate", "-3"], "--live-rate must be positive"),
    ],
)
def test_simulate_rejects_bad_input(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], arguments: list[str], message: str
) -> None:
    status = main(["simulate", "--out", str(tmp_path / "x.nxs"), "--frames", "2", *arguments])
    assert status == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x.nxs").exists()


def test_background_poisson_sampler_is_exact() -> None:
    # Three flat regions of different means, one frame level: counts must follow Poisson(λ) exactly.
    template = np.concatenate([np.full(200_000, 0.37), np.full(200_000, 2.5), np.full(200_000, 7.91)])
    sampler = QuantisedPoisson(template.reshape(1, 600, 1000))
    counts = sampler.sample(1.3, np.random.default_rng(5)).ravel()
    for region, mean in enumerate((0.37 * 1.3, 2.5 * 1.3, 7.91 * 1.3)):
        values = counts[region * 200_000 : (region + 1) * 200_000]
        k_max = int(mean + 6 * np.sqrt(mean) + 3)
        observed = np.bincount(np.minimum(values, k_max), minlength=k_max + 1)
        probability = stats.poisson.pmf(np.arange(k_max + 1), mean)
        probability[-1] = stats.poisson.sf(k_max - 1, mean)
        expected = probability * len(values)
        enough = expected > 5
        chi2 = np.sum((observed[enough] - expected[enough]) ** 2 / expected[enough])
        assert stats.chi2.sf(chi2, enough.sum() - 1) > 1e-3, (region, chi2)


def test_prediction_finds_every_reflection_near_the_ewald_sphere(experiment: Experiment) -> None:
    crystals = experiment._crystals(range(30))
    hit = np.flatnonzero(crystals.hit)[:5]
    model = Crystals(A=crystals.A[hit], domain_size=crystals.domain_size[hit], mosaicity=crystals.mosaicity[hit])
    beam = BeamModel(1.3, 0.0025, 1e-4, 0.99)
    predicted = predict(model, beam, line_search(experiment.cell, 1.8), 1.8, 2000.0)
    indices = np.stack(np.meshgrid(np.arange(-45, 46), np.arange(-45, 46), np.arange(-22, 23), indexing="ij"), -1)
    indices = indices.reshape(-1, 3)
    for j in range(len(hit)):
        r = indices @ model.A[j].T
        length = np.linalg.norm(r, axis=1)
        epsilon = np.linalg.norm(r - np.array([0, 0, 1 / 1.3]), axis=1) - 1 / 1.3
        sigma_r2, gradient, sigma_k = sigma_components(length, model.domain_size[j], model.mosaicity[j], beam)
        sigma = np.sqrt(sigma_r2 + (gradient * sigma_k) ** 2)
        near = (length > 0) & (length <= 1 / 1.8) & (np.abs(epsilon) <= 3 * sigma)
        brute = {tuple(h) for h in indices[near]}
        found = {tuple(h) for h in predicted.miller[predicted.frame == j]}
        assert found == brute


def test_optional_second_lattice_adds_its_spots_only_to_the_image() -> None:
    one = Experiment(SimulationConfig(seed=9, hit_fraction=1.0))
    two = Experiment(SimulationConfig(seed=9, hit_fraction=1.0, second_lattice_fraction=1.0))
    single, double = one.frame(4), two.frame(4)
    assert single.truth.other_lattices == [] and len(double.truth.other_lattices) == 1
    second_A = double.truth.other_lattices[0]
    assert abs(np.linalg.det(second_A)) == pytest.approx(abs(np.linalg.det(np.asarray(double.truth.A))), rel=0.02)
    assert np.array_equal(single.truth.miller, double.truth.miller)  # the reflection truth is the first crystal's
    columns = two._second_lattice(4, two.truth(4))
    assert columns is not None
    valid = two.mask & (double.image < two.config.saturation) & (single.image < one.config.saturation)
    excess = double.image[valid].astype(float).sum() - single.image[valid].astype(float).sum()
    expected = columns["expected_counts"].sum()
    assert excess == pytest.approx(expected, rel=0.1, abs=5 * np.sqrt(expected))


@pytest.mark.slow  # writes at a live rate, ~7 s
def test_live_rate_grows_a_readable_run(tmp_path: Path) -> None:
    out = tmp_path / "live.nxs"
    command = [sys.executable, "-m", "sfx", "simulate", "--out", str(out), "--frames", "12", "--live-rate", "4"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        seen: list[tuple[int, bool | None]] = []
        deadline = time.monotonic() + 60
        reader = None
        while process.poll() is None and time.monotonic() < deadline:
            if reader is None and out.exists():
                try:
                    reader = open_run(out)
                except (FormatError, OSError):  # the writer may not have created the datasets yet
                    reader = None
            if reader is not None:
                seen.append((reader.refresh(), reader.is_complete))
            time.sleep(0.2)
        assert process.wait(timeout=60) == 0, process.stderr.read() if process.stderr else ""
    finally:
        if process.poll() is None:
            process.kill()
    # While the command ran, the run was readable, incomplete, and growing frame by frame.
    growing = [count for count, complete in seen if complete is False]
    assert len(set(growing)) >= 3 and growing == sorted(growing) and max(growing) < 12
    final = open_run(out)
    assert final.frame_count == 12 and final.is_complete is True
