"""Prediction and summation integration on frames drawn from known intensities (Gaussian spots, sloped background).

The known intensities are Lorentz-polarisation corrected (as the simulator's reflection-level truth): a spot holds
I·L·P counts, and the corrected integrated intensity I/(L·P) is compared with I.
"""

from __future__ import annotations

import numpy as np
import pytest

from libs.contracts.parameters import IntegrationParameters
from libs.science.crystal import b_matrix, random_rotations
from libs.science.geometry import Beam, single_panel_detector
from services.analysis.integration import (
    LORENTZ_REFERENCE_WIDTH,
    Flag,
    Predictions,
    integrate,
    predict,
    spot_profile_sigma,
)
from services.analysis.refinement import ExcitationWidth, excitation_error

CELL = (79.1, 79.1, 38.0, 90.0, 90.0, 90.0)
BEAM = Beam(wavelength=1.3)
DETECTOR = single_panel_detector(n_fast=1024, n_slow=1024)
WIDTH = ExcitationWidth(width_0=5e-4, mosaic=1e-3)


def draw_frame(
    predictions: Predictions, intensities: np.ndarray, rng: np.random.Generator, sigma: float = 0.8
) -> np.ndarray:
    """Poisson counts of Gaussian spots (pixel-integrated) on a background plane."""
    shape = DETECTOR.frame_shape
    slow, fast = np.mgrid[0 : shape[1], 0 : shape[2]]
    expected = (2.0 + 1.5 * fast / shape[2] + 1.0 * slow / shape[1])[None].astype(float)
    offsets = np.arange(-6, 7)
    for k in range(len(predictions)):
        cf, cs = int(np.floor(predictions.fast[k])), int(np.floor(predictions.slow[k]))
        fs = np.clip(cf + offsets, 0, shape[2] - 1)
        ss = np.clip(cs + offsets, 0, shape[1] - 1)
        gx = np.exp(-0.5 * ((fs + 0.5 - predictions.fast[k]) / sigma) ** 2)
        gy = np.exp(-0.5 * ((ss + 0.5 - predictions.slow[k]) / sigma) ** 2)
        profile = np.outer(gy, gx)
        expected[0][np.ix_(ss, fs)] += intensities[k] * profile / profile.sum()
    return rng.poisson(expected).astype(np.int32)


def setup(seed: int) -> tuple[Predictions, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    A = random_rotations(1, rng)[0] @ b_matrix(CELL)
    predictions = predict(A, CELL, DETECTOR, BEAM, WIDTH, IntegrationParameters())
    intensities = rng.exponential(300.0, len(predictions))
    counts = intensities * predictions.lorentz * predictions.polarisation
    return predictions, intensities, draw_frame(predictions, counts, rng)


def test_predictions_lie_near_the_ewald_sphere_with_gaussian_partiality() -> None:
    rng = np.random.default_rng(1)
    A = random_rotations(1, rng)[0] @ b_matrix(CELL)
    parameters = IntegrationParameters()
    predictions = predict(A, CELL, DETECTOR, BEAM, WIDTH, parameters)
    assert len(predictions) > 50
    r = predictions.miller @ A.T
    epsilon = excitation_error(r, BEAM.s0)
    sigma = WIDTH.sigma(np.linalg.norm(r, axis=1))
    assert np.allclose(epsilon, predictions.excitation_error)
    assert np.all(np.abs(epsilon) <= parameters.excitation_width_factor * sigma + 1e-12)
    assert np.allclose(predictions.partiality, np.exp(-0.5 * (epsilon / sigma) ** 2))
    assert np.all((predictions.fast >= 0) & (predictions.fast < 1024))
    # The direction of each prediction is the Ewald-projected s1: its d-spacing is that of h.
    lab = DETECTOR.pixel_to_lab(predictions.panel, predictions.fast, predictions.slow)
    from libs.science.geometry import d_spacing_of_lab_points

    assert np.allclose(d_spacing_of_lab_points(lab, BEAM.wavelength), predictions.d_spacing, rtol=1e-6)


def test_lorentz_and_polarisation_factors_follow_their_definitions() -> None:
    rng = np.random.default_rng(7)
    A = random_rotations(1, rng)[0] @ b_matrix(CELL)
    beam = Beam(wavelength=1.3, polarization_fraction=0.9)
    predictions = predict(A, CELL, DETECTOR, beam, WIDTH, IntegrationParameters())
    r_length = np.linalg.norm(predictions.miller @ A.T, axis=1)
    assert np.allclose(predictions.lorentz, LORENTZ_REFERENCE_WIDTH / WIDTH.sigma(r_length))
    # Polarisation from the direction of the predicted pixel (sample at the origin).
    lab = DETECTOR.pixel_to_lab(predictions.panel, predictions.fast, predictions.slow)
    u = lab / np.linalg.norm(lab, axis=1, keepdims=True)
    expected = 0.9 * (1 - u[:, 0] ** 2) + 0.1 * (1 - u[:, 1] ** 2)
    assert np.allclose(predictions.polarisation, expected, atol=1e-6)
    # Rays in the polarisation plane (along x) lose more than rays perpendicular to it (along y).
    along_x = np.abs(u[:, 0]) > 2 * np.abs(u[:, 1])
    along_y = np.abs(u[:, 1]) > 2 * np.abs(u[:, 0])
    assert predictions.polarisation[along_x].mean() < predictions.polarisation[along_y].mean()
    assert predictions.polarisation.min() < 0.95 and predictions.polarisation.max() <= 1.0


@pytest.mark.parametrize("seed", [2, 3])
def test_summation_recovers_intensities_with_honest_sigmas(seed: int) -> None:
    predictions, intensities, image = setup(seed)
    mask = np.ones(image.shape, dtype=bool)
    result = integrate(image, mask, np.zeros(0, dtype=np.int64), predictions, IntegrationParameters())
    ok = result.integrated
    assert ok.sum() > 0.8 * len(predictions)
    # Spots close to each other share pixels; compare isolated ones only.
    xy = np.column_stack([predictions.fast, predictions.slow])
    separation = np.linalg.norm(xy[:, None] - xy[None], axis=2) + np.eye(len(xy)) * 1e9
    isolated = ok & (separation.min(axis=1) > 16)
    assert isolated.sum() > 30
    corrected = result.corrected_intensity[isolated]
    sigma = result.corrected_sigma[isolated]
    correction = predictions.lorentz[isolated] * predictions.polarisation[isolated]
    assert np.allclose(corrected * correction, result.intensity[isolated])
    assert np.allclose(sigma * correction, np.sqrt(result.variance[isolated]))
    pulls = (corrected - intensities[isolated]) / sigma
    # Almost all of a σ = 0.8 px Gaussian lies within the 3 px foreground: small bias, unit-width pulls.
    assert abs(float(np.median(pulls))) < 0.5
    assert 0.7 < float(np.std(pulls)) < 1.4
    assert np.corrcoef(corrected, intensities[isolated])[0, 1] > 0.98


def test_masked_overloaded_and_edge_reflections_are_flagged_not_reported() -> None:
    predictions, _, image = setup(4)
    mask = np.ones(image.shape, dtype=bool)
    inside = np.flatnonzero(
        (predictions.fast > 20) & (predictions.fast < 1000) & (predictions.slow > 20) & (predictions.slow < 1000)
    )
    masked, overloaded = inside[0], inside[1]
    mask[0, int(predictions.slow[masked]), int(predictions.fast[masked])] = False
    image[0, int(predictions.slow[overloaded]), int(predictions.fast[overloaded])] = 70_000
    parameters = IntegrationParameters(overload=65_000)
    result = integrate(image, mask, np.zeros(0, dtype=np.int64), predictions, parameters)
    assert result.flags[masked] & Flag.MASKED
    assert result.flags[overloaded] & Flag.OVERLOADED
    assert not result.integrated[masked] and not result.integrated[overloaded]
    edge = (predictions.fast < 7) | (predictions.fast > 1024 - 8) | (predictions.slow < 7) | (predictions.slow > 1016)
    assert np.all(result.flags[edge] & Flag.OFF_PANEL)


def test_strong_pixels_of_a_neighbour_stay_out_of_the_background() -> None:
    predictions, _, image = setup(5)
    k = int(np.flatnonzero((predictions.fast > 30) & (predictions.fast < 990) & (predictions.slow > 30))[0])
    one = Predictions(
        miller=predictions.miller[k : k + 1],
        panel=predictions.panel[k : k + 1],
        fast=predictions.fast[k : k + 1],
        slow=predictions.slow[k : k + 1],
        partiality=predictions.partiality[k : k + 1],
        d_spacing=predictions.d_spacing[k : k + 1],
        excitation_error=predictions.excitation_error[k : k + 1],
        lorentz=predictions.lorentz[k : k + 1],
        polarisation=predictions.polarisation[k : k + 1],
    )
    mask = np.ones(image.shape, dtype=bool)
    clean = integrate(image, mask, np.zeros(0, dtype=np.int64), one, IntegrationParameters())
    # A bright neighbour in the background ring, marked strong as spotfinding would.
    row, column = int(one.slow[0]) + 5, int(one.fast[0]) + 2
    image[0, row : row + 2, column : column + 2] += 500
    flat = np.sort(np.ravel_multi_index(([0] * 4, [row, row, row + 1, row + 1], [column, column + 1] * 2), image.shape))
    marked = integrate(image, mask, flat, one, IntegrationParameters())
    assert marked.intensity[0] == pytest.approx(clean.intensity[0], abs=3 * np.sqrt(clean.variance[0]))
    assert marked.background[0] == pytest.approx(clean.background[0], abs=0.5)


@pytest.mark.parametrize("sigma", [0.8, 1.6])
def test_spot_width_is_measured_from_the_image(sigma: float) -> None:
    rng = np.random.default_rng(6)
    A = random_rotations(1, rng)[0] @ b_matrix(CELL)
    predictions = predict(A, CELL, DETECTOR, BEAM, WIDTH, IntegrationParameters())
    image = draw_frame(predictions, np.full(len(predictions), 2000.0), rng, sigma=sigma)
    mask = np.ones(image.shape, dtype=bool)
    measured = spot_profile_sigma(image, mask, predictions.panel, predictions.fast, predictions.slow)
    assert measured is not None
    # Pixel integration adds 1/12 px² to a Gaussian's variance.
    assert measured == pytest.approx(np.sqrt(sigma**2 + 1 / 12), rel=0.15)
