"""Experimental geometry in the DIALS laboratory frame.

The beam travels along -z, so s0 = (0, 0, -1/λ). A detector is one or more flat panels; a panel is an origin (the
lab position, in mm, of the outer corner of its first pixel), unit fast and slow axes, a pixel size and a size in
pixels. Pixel coordinates are continuous: pixel (i, j) covers fast ∈ [i, i+1), slow ∈ [j, j+1), so its centre is at
(i + 0.5, j + 0.5). A frame is an array of shape (n_panels, n_slow, n_fast).

Every function here is pure numpy: no I/O.
"""

from __future__ import annotations

from functools import cached_property

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

Vector3 = tuple[float, float, float]


class GeometryError(ValueError):
    """Geometry that cannot describe a real experiment; the text names the defect."""


class Beam(BaseModel):
    """A monochromatic-ish X-ray beam along -z."""

    model_config = ConfigDict(frozen=True)

    wavelength: float = Field(gt=0.1, lt=20.0, description="Å")
    bandwidth: float = Field(0.0025, ge=0, lt=0.2, description="Relative spectral width (FWHM of Δλ/λ)")
    divergence: float = Field(1e-4, ge=0, lt=0.1, description="Beam divergence (FWHM), radians")
    polarization_fraction: float = Field(
        0.99, ge=0, le=1, description="Fraction of the beam polarised along the lab x axis"
    )

    @property
    def s0(self) -> np.ndarray:
        """Incident wave vector, 1/Å."""
        return np.array([0.0, 0.0, -1.0 / self.wavelength])


class Panel(BaseModel):
    """One flat detector module."""

    model_config = ConfigDict(frozen=True)

    name: str
    origin: Vector3 = Field(description="Lab position of the corner of pixel (0, 0), mm")
    fast_axis: Vector3
    slow_axis: Vector3
    pixel_size: float = Field(gt=0, lt=10, description="mm")
    size: tuple[int, int] = Field(description="(n_fast, n_slow) pixels")

    @model_validator(mode="after")
    def _check_axes(self) -> Panel:
        fast, slow = np.asarray(self.fast_axis), np.asarray(self.slow_axis)
        for label, axis in (("fast_axis", fast), ("slow_axis", slow)):
            if not np.isclose(np.linalg.norm(axis), 1.0, atol=1e-4):
                raise GeometryError(f"panel {self.name}: {label} {tuple(axis)} is not a unit vector")
        if abs(float(fast @ slow)) > 1e-4:
            raise GeometryError(f"panel {self.name}: fast and slow axes are not perpendicular")
        if min(self.size) <= 0:
            raise GeometryError(f"panel {self.name}: size {self.size} must be positive")
        normal = np.cross(fast, slow)
        if abs(float(normal @ np.asarray(self.origin))) < 1e-6:
            raise GeometryError(f"panel {self.name}: the panel plane passes through the sample")
        return self

    @cached_property
    def _matrix(self) -> np.ndarray:
        """Columns: fast step, slow step (mm per pixel) and origin (mm): lab = M · (f, s, 1)."""
        return np.column_stack(
            [
                np.asarray(self.fast_axis) * self.pixel_size,
                np.asarray(self.slow_axis) * self.pixel_size,
                np.asarray(self.origin),
            ]
        )

    @cached_property
    def _inverse(self) -> np.ndarray:
        return np.linalg.inv(self._matrix)

    @property
    def normal(self) -> np.ndarray:
        """Unit normal, oriented towards the sample side opposite to the beam's travel."""
        return np.cross(np.asarray(self.fast_axis), np.asarray(self.slow_axis))

    @property
    def shape(self) -> tuple[int, int]:
        """Array shape of this panel's data: (n_slow, n_fast)."""
        return (self.size[1], self.size[0])

    @property
    def distance(self) -> float:
        """Perpendicular distance from the sample to the panel plane, mm."""
        return abs(float(self.normal @ np.asarray(self.origin)))

    def pixel_to_lab(self, fast: np.ndarray, slow: np.ndarray) -> np.ndarray:
        """Lab coordinates (mm, shape (..., 3)) of continuous pixel positions."""
        f, s = np.broadcast_arrays(np.asarray(fast, dtype=float), np.asarray(slow, dtype=float))
        return f[..., None] * self._matrix[:, 0] + s[..., None] * self._matrix[:, 1] + self._matrix[:, 2]

    def ray_to_pixel(self, directions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Where rays from the sample along ``directions`` (..., 3) hit this panel's plane.

        Returns (fast, slow, on_panel): continuous pixel coordinates and whether the ray hits the panel
        (in front of the sample and inside its pixels).
        """
        projected = np.asarray(directions, dtype=float) @ self._inverse.T
        scale = projected[..., 2]
        with np.errstate(divide="ignore", invalid="ignore"):
            fast = projected[..., 0] / scale
            slow = projected[..., 1] / scale
        on_panel = (scale > 0) & (fast >= 0) & (fast < self.size[0]) & (slow >= 0) & (slow < self.size[1])
        return fast, slow, on_panel


class Detector(BaseModel):
    """A set of panels of equal pixel dimensions (frames are stacked (n_panels, n_slow, n_fast))."""

    model_config = ConfigDict(frozen=True)

    panels: list[Panel] = Field(min_length=1)

    @model_validator(mode="after")
    def _same_shapes(self) -> Detector:
        shapes = {panel.size for panel in self.panels}
        if len(shapes) != 1:
            raise GeometryError(f"all panels must have the same size in pixels, got {sorted(shapes)}")
        names = [panel.name for panel in self.panels]
        if len(set(names)) != len(names):
            raise GeometryError("panel names must be unique")
        return self

    @property
    def frame_shape(self) -> tuple[int, int, int]:
        """Shape of one frame's array: (n_panels, n_slow, n_fast)."""
        n_fast, n_slow = self.panels[0].size
        return (len(self.panels), n_slow, n_fast)

    def pixel_to_lab(self, panel: np.ndarray, fast: np.ndarray, slow: np.ndarray) -> np.ndarray:
        """Lab coordinates (mm) of pixel positions on the given panels."""
        panel_index = np.asarray(panel, dtype=int)
        result = np.empty((*np.shape(panel_index), 3))
        fast_b, slow_b = np.broadcast_to(fast, panel_index.shape), np.broadcast_to(slow, panel_index.shape)
        for index, p in enumerate(self.panels):
            chosen = panel_index == index
            result[chosen] = p.pixel_to_lab(fast_b[chosen], slow_b[chosen])
        return result

    def ray_to_pixel(self, directions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(panel, fast, slow) where rays along ``directions`` (n, 3) hit; panel is -1 for a miss."""
        directions = np.asarray(directions, dtype=float).reshape(-1, 3)
        panel = np.full(len(directions), -1, dtype=np.int32)
        fast = np.full(len(directions), np.nan)
        slow = np.full(len(directions), np.nan)
        for index, p in enumerate(self.panels):
            f, s, hit = p.ray_to_pixel(directions)
            take = hit & (panel < 0)
            panel[take], fast[take], slow[take] = index, f[take], s[take]
        return panel, fast, slow

    def pixel_centre_lab(self) -> np.ndarray:
        """Lab coordinates (mm) of every pixel centre, shape (n_panels, n_slow, n_fast, 3)."""
        _, n_slow, n_fast = self.frame_shape
        slow, fast = np.meshgrid(np.arange(n_slow) + 0.5, np.arange(n_fast) + 0.5, indexing="ij")
        return np.stack([p.pixel_to_lab(fast, slow) for p in self.panels])

    def resolution_map(self, beam: Beam) -> np.ndarray:
        """d-spacing (Å) at every pixel centre, shape (n_panels, n_slow, n_fast)."""
        return d_spacing_of_lab_points(self.pixel_centre_lab(), beam.wavelength)


def scattering_vectors(lab_points: np.ndarray, wavelength: float) -> np.ndarray:
    """r = s1 - s0 (1/Å) for lab points (mm) on the detector."""
    points = np.asarray(lab_points, dtype=float)
    s1 = points / (np.linalg.norm(points, axis=-1, keepdims=True) * wavelength)
    return s1 - np.array([0.0, 0.0, -1.0 / wavelength])


def d_spacing_of_lab_points(lab_points: np.ndarray, wavelength: float) -> np.ndarray:
    """Bragg d-spacing (Å) of the scattering towards lab points (mm): d = λ / (2 sin θ)."""
    points = np.asarray(lab_points, dtype=float)
    cos_two_theta = -points[..., 2] / np.linalg.norm(points, axis=-1)
    sin_theta = np.sqrt(np.clip((1.0 - cos_two_theta) / 2.0, 0.0, 1.0))
    with np.errstate(divide="ignore"):
        return wavelength / (2.0 * sin_theta)


def bragg_angle(d_spacing: float | np.ndarray, wavelength: float) -> np.ndarray:
    """Bragg angle θ (radians) of a d-spacing (Å)."""
    ratio = wavelength / (2.0 * np.asarray(d_spacing, dtype=float))
    if np.any(ratio > 1.0):
        raise GeometryError(f"d-spacing below λ/2 = {wavelength / 2:.3f} Å cannot diffract")
    return np.arcsin(ratio)


def single_panel_detector(
    distance: float = 100.0,
    n_fast: int = 2048,
    n_slow: int = 2048,
    pixel_size: float = 0.075,
    beam_centre: tuple[float, float] | None = None,
) -> Detector:
    """One square-pixel panel normal to the beam; ``beam_centre`` in pixels (fast, slow), default the middle."""
    centre_fast, centre_slow = beam_centre if beam_centre is not None else (n_fast / 2, n_slow / 2)
    panel = Panel(
        name="panel0",
        origin=(-centre_fast * pixel_size, centre_slow * pixel_size, -distance),
        fast_axis=(1.0, 0.0, 0.0),
        slow_axis=(0.0, -1.0, 0.0),
        pixel_size=pixel_size,
        size=(n_fast, n_slow),
    )
    return Detector(panels=[panel])


def jungfrau4m_detector(
    distance: float = 100.0,
    pixel_size: float = 0.075,
    gap_fast: int = 36,
    gap_slow: int = 36,
    beam_offset: tuple[float, float] = (0.6, -0.4),
) -> Detector:
    """A Jungfrau-4M-like detector: 8 modules of 1024 × 512 pixels in 2 columns × 4 rows, with gaps.

    The beam passes near the centre of the central cross of gaps (offset by ``beam_offset`` mm, as a real
    installation is never perfectly centred).
    """
    n_fast, n_slow = 1024, 512
    width = (2 * n_fast + gap_fast) * pixel_size
    height = (4 * n_slow + 3 * gap_slow) * pixel_size
    panels = []
    for row in range(4):
        for column in range(2):
            x0 = -width / 2 + column * (n_fast + gap_fast) * pixel_size - beam_offset[0]
            y0 = height / 2 - row * (n_slow + gap_slow) * pixel_size - beam_offset[1]
            panels.append(
                Panel(
                    name=f"m{row * 2 + column}",
                    origin=(x0, y0, -distance),
                    fast_axis=(1.0, 0.0, 0.0),
                    slow_axis=(0.0, -1.0, 0.0),
                    pixel_size=pixel_size,
                    size=(n_fast, n_slow),
                )
            )
    return Detector(panels=panels)
