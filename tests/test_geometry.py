"""Geometry: pixel ↔ lab round trips on both detectors, and known values (resolution of a pixel, Bragg angle)."""

from __future__ import annotations

import numpy as np
import pytest

from libs.science.geometry import (
    Beam,
    GeometryError,
    bragg_angle,
    d_spacing_of_lab_points,
    jungfrau4m_detector,
    scattering_vectors,
    single_panel_detector,
)


@pytest.mark.parametrize("make_detector", [jungfrau4m_detector, single_panel_detector])
def test_pixel_to_lab_to_pixel_round_trip(make_detector) -> None:  # type: ignore[no-untyped-def]
    detector = make_detector()
    rng = np.random.default_rng(3)
    n_panels, n_slow, n_fast = detector.frame_shape
    panel = rng.integers(0, n_panels, size=2000)
    fast = rng.uniform(0, n_fast, size=2000)
    slow = rng.uniform(0, n_slow, size=2000)
    lab = detector.pixel_to_lab(panel, fast, slow)
    # Any point along the ray from the sample lands on the same pixel.
    found_panel, found_fast, found_slow = detector.ray_to_pixel(lab * rng.uniform(0.1, 3.0, size=(2000, 1)))
    assert np.array_equal(found_panel, panel)
    assert np.allclose(found_fast, fast, atol=1e-9)
    assert np.allclose(found_slow, slow, atol=1e-9)


def test_single_panel_beam_centre_and_distance() -> None:
    detector = single_panel_detector(distance=120.0, n_fast=1000, n_slow=800, pixel_size=0.1, beam_centre=(400, 300))
    centre = detector.pixel_to_lab(np.array([0]), np.array([400.0]), np.array([300.0]))[0]
    assert np.allclose(centre, [0.0, 0.0, -120.0])
    assert detector.panels[0].distance == pytest.approx(120.0)
    panel, fast, slow = detector.ray_to_pixel(np.array([[0.0, 0.0, -1.0]]))
    assert (panel[0], fast[0], slow[0]) == (0, pytest.approx(400.0), pytest.approx(300.0))


def test_resolution_of_a_pixel() -> None:
    wavelength, distance, pixel = 1.3, 100.0, 0.075
    detector = single_panel_detector(distance=distance, n_fast=2048, n_slow=2048, pixel_size=pixel)
    beam = Beam(wavelength=wavelength)
    # A pixel 1000 pixels to the side of the beam centre (along the fast axis): 75 mm off axis.
    lab = detector.pixel_to_lab(np.array([0]), np.array([1024.0 + 1000.0]), np.array([1024.0]))
    two_theta = np.arctan(1000 * pixel / distance)
    expected = wavelength / (2 * np.sin(two_theta / 2))
    assert d_spacing_of_lab_points(lab, wavelength)[0] == pytest.approx(expected, rel=1e-12)
    assert expected == pytest.approx(2.0555, abs=1e-4)  # known value: 2θ = atan(0.75) = 36.87° at 1.3 Å
    resolution = detector.resolution_map(beam)
    assert resolution[0, 1024, 1024 + 999] == pytest.approx(expected, rel=1e-3)  # centre of the pixel 999.5 px out
    # |r| = |s1 - s0| = 1/d for every point on the detector.
    r = scattering_vectors(lab, wavelength)
    assert np.linalg.norm(r[0]) == pytest.approx(1 / expected, rel=1e-12)


def test_jungfrau_layout_and_corner_resolution() -> None:
    detector = jungfrau4m_detector()
    assert detector.frame_shape == (8, 512, 1024)
    # The direct beam falls in the gap between the modules.
    panel, _, _ = detector.ray_to_pixel(np.array([[0.0, 0.0, -1.0]]))
    assert panel[0] == -1
    corners = detector.pixel_to_lab(
        np.array([0, 1, 6, 7]), np.array([0.0, 1024.0, 0.0, 1024.0]), np.array([0.0, 0.0, 512.0, 512.0])
    )
    d = d_spacing_of_lab_points(corners, 1.3)
    assert np.all((d > 1.5) & (d < 1.7))  # the corners of a 4M at 100 mm reach about 1.6 Å at 1.3 Å


def test_bragg_angle_known_values() -> None:
    assert np.degrees(bragg_angle(1.3, 1.3)) == pytest.approx(30.0)
    assert np.degrees(bragg_angle(2.0, 1.0)) == pytest.approx(np.degrees(np.arcsin(0.25)))
    with pytest.raises(GeometryError, match="cannot diffract"):
        bragg_angle(0.6, 1.3)
