"""Spotfinding: the dispersion threshold against a direct per-pixel implementation, connected components, masks."""

from __future__ import annotations

import numpy as np
import pytest

from libs.contracts.parameters import (
    AnalysisParameters,
    ParameterError,
    SpotfindingParameters,
    parameters_from_dict,
    with_overrides,
)
from libs.science.geometry import Beam, jungfrau4m_detector, single_panel_detector
from services.analysis.hitfinding import classify, resolution_from_spots
from services.analysis.integration import detector_d_min
from services.analysis.pipeline import AnalysisContext, AnalysisError
from services.analysis.spotfinding import SpotFinder, SpotfindingError, covered_d_range

BEAM = Beam(wavelength=1.3)


def direct_dispersion(image: np.ndarray, mask: np.ndarray, p: SpotfindingParameters, gain: np.ndarray) -> np.ndarray:
    """The DIALS rule written pixel by pixel, the slow obvious way (the reference)."""
    n_panels, n_slow, n_fast = image.shape
    k = p.kernel_half_size
    strong = np.zeros(image.shape, dtype=bool)
    for panel in range(n_panels):
        for s in range(n_slow):
            for f in range(n_fast):
                if not mask[panel, s, f]:
                    continue
                window = (slice(max(s - k, 0), s + k + 1), slice(max(f - k, 0), f + k + 1))
                values = image[panel][window][mask[panel][window]].astype(float)
                m = values.size
                if m < p.min_local_pixels:
                    continue
                mean = values.mean()
                if mean <= 0:
                    continue
                variance = values.var(ddof=1)
                g = gain[panel, s, f]
                dispersed = variance / mean > g * (1 + p.sigma_background * np.sqrt(2 / (m - 1)))
                value = float(image[panel, s, f])
                stands_out = value - mean > p.sigma_strong * np.sqrt(g * mean)
                strong[panel, s, f] = dispersed and stands_out and value > p.global_threshold
    return strong


def small_detector_frame(seed: int, gain: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    image = rng.poisson(1.5, (2, 40, 48)).astype(np.int32)
    for _ in range(12):
        panel, s, f = (int(v) for v in (rng.integers(0, 2), rng.integers(0, 40), rng.integers(0, 48)))
        block = image[panel, max(s - 1, 0) : s + 2, max(f - 1, 0) : f + 2]
        block += rng.poisson(25, block.shape).astype(np.int32)
    image = np.rint(image * gain).astype(np.int32)
    mask = rng.random(image.shape) > 0.03
    mask[:, :, 20] = False  # a dead column
    return image, mask


def two_panel_detector() -> object:
    from libs.science.geometry import Detector, Panel

    panels = [
        Panel(
            name=f"p{i}",
            origin=(-2.0 + 3.7 * i, 1.5, -100.0),
            fast_axis=(1.0, 0.0, 0.0),
            slow_axis=(0.0, -1.0, 0.0),
            pixel_size=0.075,
            size=(48, 40),
        )
        for i in range(2)
    ]
    return Detector(panels=panels)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_strong_pixels_equal_the_direct_dispersion_rule(seed: int) -> None:
    image, mask = small_detector_frame(seed)
    detector = two_panel_detector()
    parameters = SpotfindingParameters()
    finder = SpotFinder(detector, BEAM, mask, parameters)  # type: ignore[arg-type]
    ours = np.zeros(image.shape, dtype=bool).ravel()
    ours[finder.strong_pixels(image)] = True
    reference = direct_dispersion(image, mask, parameters, np.ones(image.shape))
    assert reference.sum() > 20
    assert np.array_equal(ours.reshape(image.shape), reference)


def test_saturated_pixels_leave_the_windows_and_the_finder_recovers_after() -> None:
    detector = two_panel_detector()
    parameters = SpotfindingParameters(overload=30.0)
    saturated, mask = small_detector_frame(7)
    clean, _ = small_detector_frame(8)
    clean = np.minimum(clean, 29)
    assert (saturated >= 30).sum() > 5
    finder = SpotFinder(detector, BEAM, mask, parameters)  # type: ignore[arg-type]
    for image in (clean, saturated, clean, saturated):
        ours = np.zeros(image.size, dtype=bool)
        ours[finder.strong_pixels(image)] = True
        reference = direct_dispersion(image, mask & (image < 30), parameters, np.ones(image.shape))
        assert reference.sum() > 3
        assert np.array_equal(ours.reshape(image.shape), reference)


def test_gain_map_and_global_threshold_follow_the_rule() -> None:
    image, mask = small_detector_frame(4, gain=2.0)
    detector = two_panel_detector()
    gain = np.full(image.shape, 2.0)
    gain[1] = 2.5
    parameters = SpotfindingParameters(global_threshold=12.0, sigma_strong=2.5)
    finder = SpotFinder(detector, BEAM, mask, parameters, gain_map=gain)  # type: ignore[arg-type]
    ours = np.zeros(image.size, dtype=bool)
    ours[finder.strong_pixels(image)] = True
    reference = direct_dispersion(image, mask, parameters, gain)
    assert reference.sum() > 10
    assert np.array_equal(ours.reshape(image.shape), reference)


def test_spots_never_merge_across_panels_and_centroids_are_exact() -> None:
    detector = jungfrau4m_detector()
    mask = np.ones(detector.frame_shape, dtype=bool)
    image = np.random.default_rng(5).poisson(0.3, detector.frame_shape).astype(np.int32)
    # One bright blob cut by the boundary between panels 0 and 1 along fast (same rows): two spots.
    image[0, 100:103, 1021:1024] = 200
    image[1, 100:103, 0:3] = 200
    # A symmetric spot whose centroid is known exactly.
    image[3, 300:303, 500:503] = 50
    image[3, 301, 501] = 400
    finder = SpotFinder(detector, BEAM, mask, SpotfindingParameters())
    spots = finder.find(image).spots
    by_panel = {int(p): int(np.sum(spots.panel == p)) for p in (0, 1, 3)}
    assert by_panel == {0: 1, 1: 1, 3: 1}
    centre = np.flatnonzero(spots.panel == 3)[0]
    assert spots.fast[centre] == pytest.approx(501.5, abs=1e-6)
    assert spots.slow[centre] == pytest.approx(301.5, abs=1e-6)
    assert spots.size[centre] == 9
    expected_d = detector.resolution_map(BEAM)[3, 301, 501]
    assert spots.d_spacing[centre] == pytest.approx(expected_d, rel=1e-3)


def test_spot_size_limits_and_masked_pixels() -> None:
    detector = single_panel_detector(n_fast=256, n_slow=256)
    image = np.zeros(detector.frame_shape, dtype=np.int32)
    image[0, 50, 50] = 100  # a single hot pixel: below min_spot_size 2
    image[0, 100:130, 100:130] = 300  # a large flat blob: 900 pixels above max_spot_size
    image[0, 200:202, 200:202] = 80  # a real small spot
    mask = np.ones(detector.frame_shape, dtype=bool)
    finder = SpotFinder(detector, BEAM, mask, SpotfindingParameters(max_spot_size=100))
    spots = finder.find(image).spots
    assert len(spots) == 1 and spots.fast[0] == pytest.approx(201.0)
    mask[0, 200:202, 200:202] = False
    assert len(SpotFinder(detector, BEAM, mask, SpotfindingParameters(max_spot_size=100)).find(image).spots) == 0


def test_bad_inputs_name_what_is_wrong() -> None:
    detector = single_panel_detector(n_fast=64, n_slow=64)
    with pytest.raises(SpotfindingError, match="mask has shape"):
        SpotFinder(detector, BEAM, np.ones((1, 10, 10), bool), SpotfindingParameters())
    finder = SpotFinder(detector, BEAM, np.ones((1, 64, 64), bool), SpotfindingParameters())
    with pytest.raises(SpotfindingError, match="image has shape"):
        finder.find(np.zeros((1, 64, 65), np.int32))


def test_resolution_limits_that_select_no_pixel_are_refused_naming_the_values() -> None:
    detector = single_panel_detector(n_fast=256, n_slow=256, beam_centre=(-30.0, 100.0))  # the beam misses it
    mask = np.ones(detector.frame_shape, dtype=bool)
    centres = detector.resolution_map(BEAM)
    lowest, highest = covered_d_range(detector, BEAM, mask)
    # Over the pixel areas: at the panel's outer corner, just beyond the pixel centres' extremes.
    assert lowest == pytest.approx(detector_d_min(detector, BEAM), rel=1e-12) and lowest <= centres.min()
    assert highest >= centres.max() and highest == pytest.approx(centres.max(), rel=0.03)
    covers = f"this detector covers {lowest:.2f}–{highest:.2f} Å"

    def finder(**limits: float) -> SpotFinder:
        return SpotFinder(detector, BEAM, mask, SpotfindingParameters(**limits))

    with pytest.raises(SpotfindingError) as refused:
        finder(d_min=80.0, d_max=90.0)
    assert str(refused.value) == f"spotfinding.d_min=80 Å and d_max=90 Å select no pixel: {covers}"
    with pytest.raises(SpotfindingError, match=r"^spotfinding\.d_max=4\.5 Å selects no pixel: this detector covers"):
        finder(d_max=4.5)
    with pytest.raises(SpotfindingError, match=r"^spotfinding\.d_min=70 Å selects no pixel"):
        finder(d_min=70.0)
    for limits in ({"d_min": 6.0, "d_max": 30.0}, {"d_min": 1.0, "d_max": 5.5}, {"d_min": 50.0}, {"d_max": 5.5}):
        finder(**limits)  # any overlap, however small, is allowed
    # The analysis context (built once per run) refuses them as an AnalysisError with the same text.
    parameters = with_overrides(AnalysisParameters(), {"spotfinding.d_min": 80.0, "spotfinding.d_max": 90.0})
    with pytest.raises(AnalysisError) as failed:
        AnalysisContext(detector, BEAM, mask, parameters)
    assert str(failed.value) == str(refused.value)

    # Masked pixels cover nothing: masking all beyond 20 Å makes d_min=25 select no pixel.
    mask = centres < 20.0
    lowest, highest = covered_d_range(detector, BEAM, mask)
    assert highest == pytest.approx(20.0, rel=0.01) and lowest == pytest.approx(detector_d_min(detector, BEAM))
    with pytest.raises(SpotfindingError, match=r"d_min=25 Å selects no pixel: this detector covers 5\.\d\d–20\.\d\d Å"):
        finder(d_min=25.0)
    # A direct beam on an unmasked pixel: every resolution below the corners' is covered.
    centred = single_panel_detector(n_fast=64, n_slow=64)
    with pytest.raises(SpotfindingError, match=r"covers d ≥ \d+\.\d\d Å \(the direct beam falls on an unmasked"):
        SpotFinder(centred, BEAM, np.ones(centred.frame_shape, bool), SpotfindingParameters(d_max=10.0))
    SpotFinder(centred, BEAM, np.ones(centred.frame_shape, bool), SpotfindingParameters(d_min=1000.0))


def test_hit_decision_and_resolution_estimate() -> None:
    parameters = AnalysisParameters().hitfinding
    d = 1.0 / np.linspace(0.05, 0.5, 101)  # 1/d uniform: its 95th percentile is 0.4775
    decision = classify(d, parameters)
    assert decision.hit and decision.spot_count == 101
    assert decision.resolution_estimate == pytest.approx(resolution_from_spots(d, 0.95))
    assert decision.resolution_estimate == pytest.approx(1 / 0.4775)
    blank = classify(d[:3], parameters)
    assert not blank.hit and blank.spot_count == 3
    assert classify(np.zeros(0), parameters).resolution_estimate is None


def test_parameter_overrides_are_validated_and_unknown_names_are_named() -> None:
    base = AnalysisParameters()
    changed = with_overrides(base, {"spotfinding.sigma_strong": 4.0, "hitfinding": {"min_spots": 30}})
    assert changed.spotfinding.sigma_strong == 4.0 and changed.hitfinding.min_spots == 30
    assert base.spotfinding.sigma_strong == 3.0
    with pytest.raises(ParameterError, match=r"spotfinding\.sigma_strongest.*sigma_strong"):
        with_overrides(base, {"spotfinding.sigma_strongest": 4.0})
    with pytest.raises(ParameterError, match="unknown parameter 'spotfinder"):
        with_overrides(base, {"spotfinder.gain": 2})
    with pytest.raises(ParameterError, match=r"spotfinding\.gain"):
        with_overrides(base, {"spotfinding.gain": -1})
    with pytest.raises(ParameterError, match="min_spot_size"):
        with_overrides(base, {"spotfinding.min_spot_size": 50, "spotfinding.max_spot_size": 10})
    with pytest.raises(ParameterError, match="is a section"):
        with_overrides(base, {"indexing": 3})
    assert parameters_from_dict(changed.model_dump()) == changed
