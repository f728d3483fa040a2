"""Known-cell stills indexing and refinement on spot lists made from a known orientation (no image needed)."""

from __future__ import annotations

import numpy as np
import pytest

from libs.contracts.parameters import IndexingParameters, RefinementParameters
from libs.science.crystal import (
    axis_angle_matrix,
    b_matrix,
    lattice_operators,
    misorientation_degrees,
    random_rotations,
)
from libs.science.geometry import Beam, jungfrau4m_detector, scattering_vectors
from services.analysis.indexing import index_known_cell
from services.analysis.refinement import ewald_projection, excitation_error, refine

CELL = (79.1, 79.1, 38.0, 90.0, 90.0, 90.0)
SYMBOL = "P 43 21 2"
BEAM = Beam(wavelength=1.3)
DETECTOR = jungfrau4m_detector()


def observed_spots(A: np.ndarray, rng: np.random.Generator, width: float = 6e-4) -> tuple[np.ndarray, np.ndarray]:
    """Lab positions (mm) and Miller indices of the reflections of A within ``width`` of the Ewald sphere."""
    grid = np.stack(np.meshgrid(*[np.arange(-45, 46)] * 2, np.arange(-22, 23), indexing="ij"), -1).reshape(-1, 3)
    r = grid @ A.T
    length = np.linalg.norm(r, axis=1)
    near = (np.abs(excitation_error(r, BEAM.s0)) < width * rng.uniform(0.3, 1.0, len(r))) & (length > 1 / 40)
    near &= length < 1 / 2.0
    projected, _ = ewald_projection(r[near], BEAM.s0)
    panel, fast, slow = DETECTOR.ray_to_pixel(projected + BEAM.s0)
    on = panel >= 0
    # Centroid noise of a tenth of a pixel.
    fast = fast[on] + rng.normal(0, 0.1, on.sum())
    slow = slow[on] + rng.normal(0, 0.1, on.sum())
    return DETECTOR.pixel_to_lab(panel[on], fast, slow), grid[near][on]


def random_spots(count: int, rng: np.random.Generator) -> np.ndarray:
    """Lab positions of spots scattered uniformly over the detector."""
    shape = DETECTOR.frame_shape
    panel = rng.integers(0, shape[0], count)
    return DETECTOR.pixel_to_lab(panel, rng.uniform(0, shape[2], count), rng.uniform(0, shape[1], count))


@pytest.mark.parametrize("seed", range(6))
def test_indexes_with_a_third_of_spots_spurious(seed: int) -> None:
    rng = np.random.default_rng(seed)
    A_true = random_rotations(1, rng)[0] @ b_matrix(CELL)
    lab, _ = observed_spots(A_true, rng)
    spurious = random_spots(len(lab) // 2, rng)  # a third of all spots
    everything = np.concatenate([lab, spurious])
    order = rng.permutation(len(everything))
    r = scattering_vectors(everything[order], BEAM.wavelength)
    solution = index_known_cell(r, CELL, SYMBOL, IndexingParameters())
    assert solution is not None
    angle, _ = misorientation_degrees(solution.A, A_true, lattice_operators(CELL))
    assert angle < 0.2
    is_real = order < len(lab)
    assert solution.indexed[is_real].mean() > 0.9
    assert solution.indexed[~is_real].mean() < 0.2


@pytest.mark.parametrize("seed", range(20))
def test_random_spots_are_never_indexed(seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    r = scattering_vectors(random_spots(int(rng.integers(15, 120)), rng), BEAM.wavelength)
    assert index_known_cell(r, CELL, SYMBOL, IndexingParameters()) is None


def test_too_few_spots_give_no_solution() -> None:
    rng = np.random.default_rng(3)
    A_true = random_rotations(1, rng)[0] @ b_matrix(CELL)
    lab, _ = observed_spots(A_true, rng)
    r = scattering_vectors(lab[:8], BEAM.wavelength)
    assert index_known_cell(r, CELL, SYMBOL, IndexingParameters()) is None


def test_refinement_recovers_orientation_and_cell_and_rejects_outliers() -> None:
    rng = np.random.default_rng(9)
    true_cell = (79.4, 79.4, 37.9, 90.0, 90.0, 90.0)
    A_true = random_rotations(1, rng)[0] @ b_matrix(true_cell)
    lab, miller = observed_spots(A_true, rng, width=4e-4)
    lab[:5] += rng.normal(0, 1.5, (5, 3)) * np.array([1, 1, 0])  # five badly misplaced spots
    # Start from the known (slightly wrong) cell, rotated by a quarter of a degree.
    U_true = A_true @ np.linalg.inv(b_matrix(true_cell))
    A_start = axis_angle_matrix(np.array([0.3, -0.5, 0.8]), np.radians(0.25)) @ U_true @ b_matrix(CELL)
    result = refine(A_start, miller, lab, BEAM.s0, SYMBOL, RefinementParameters())
    angle, _ = misorientation_degrees(result.A, A_true, lattice_operators(CELL))
    assert angle < 0.02
    assert result.cell[0] == pytest.approx(79.4, rel=1e-3)
    assert result.cell[1] == pytest.approx(result.cell[0], rel=1e-12)  # tetragonal constraint kept
    assert result.cell[2] == pytest.approx(37.9, rel=1e-3)
    assert result.cell[3:] == pytest.approx((90.0, 90.0, 90.0))
    assert not result.used[:5].any() and result.used[5:].mean() > 0.95
    assert result.rmsd_mm < 0.03
    # The spots were drawn within 4e-4 1/Å of the sphere: the estimated width must be of that order.
    sigma = float(result.width.sigma(np.array([0.3]))[0])
    assert 5e-5 < sigma < 1e-3


def test_a_second_weaker_lattice_does_not_confuse_the_first() -> None:
    rng = np.random.default_rng(21)
    A_first = random_rotations(1, rng)[0] @ b_matrix(CELL)
    A_second = random_rotations(1, rng)[0] @ b_matrix(CELL)
    first, _ = observed_spots(A_first, rng)
    second, _ = observed_spots(A_second, rng)
    second = second[: len(first) // 2]  # a third of all spots from another crystal
    spots = np.concatenate([first, second])
    solution = index_known_cell(scattering_vectors(spots, BEAM.wavelength), CELL, SYMBOL, IndexingParameters())
    assert solution is not None
    operators = lattice_operators(CELL)
    assert misorientation_degrees(solution.A, A_first, operators)[0] < 0.2
    assert solution.indexed[: len(first)].mean() > 0.9


@pytest.mark.parametrize(
    ("cell", "symbol", "true_cell"),
    [
        ((52.0, 64.0, 71.0, 90.0, 90.0, 90.0), "P 21 21 21", (52.2, 63.8, 71.3, 90.0, 90.0, 90.0)),
        ((60.0, 45.0, 50.0, 90.0, 104.0, 90.0), "C 1 2 1", (60.3, 45.1, 49.8, 90.0, 104.4, 90.0)),
        ((100.0, 100.0, 60.0, 90.0, 90.0, 120.0), "P 61", (100.4, 100.4, 59.8, 90.0, 90.0, 120.0)),
    ],
)
def test_other_lattice_systems_index_and_refine_within_their_constraints(
    cell: tuple[float, ...], symbol: str, true_cell: tuple[float, ...]
) -> None:
    rng = np.random.default_rng(31)
    A_true = random_rotations(1, rng)[0] @ b_matrix(true_cell)
    grid = np.stack(np.meshgrid(*[np.arange(-60, 61)] * 3, indexing="ij"), -1).reshape(-1, 3)
    if symbol.startswith("C"):
        grid = grid[(grid[:, 0] + grid[:, 1]) % 2 == 0]  # C-centring: h + k even
    r = grid @ A_true.T
    length = np.linalg.norm(r, axis=1)
    near = (np.abs(excitation_error(r, BEAM.s0)) < 5e-4) & (length > 1 / 40) & (length < 1 / 2.2)
    projected, _ = ewald_projection(r[near], BEAM.s0)
    panel, fast, slow = DETECTOR.ray_to_pixel(projected + BEAM.s0)
    on = panel >= 0
    lab = DETECTOR.pixel_to_lab(panel[on], fast[on], slow[on])
    observed = scattering_vectors(lab, BEAM.wavelength)
    solution = index_known_cell(observed, cell, symbol, IndexingParameters())
    assert solution is not None and solution.indexed.mean() > 0.9
    used = lab[: len(solution.indexed)][solution.indexed]  # the indexer looks at the first max_spots spots
    result = refine(solution.A, solution.miller[solution.indexed], used, BEAM.s0, symbol, RefinementParameters())
    assert misorientation_degrees(result.A, A_true, lattice_operators(true_cell))[0] < 0.05
    assert result.cell == pytest.approx(true_cell, rel=2e-3)
