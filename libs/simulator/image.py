"""Pixels of a simulated frame: detector mask, background with a water ring, spot profiles, counting noise.

Pure numpy (scipy for the Poisson tables), no I/O. The background of a frame is a fixed template (diffuse scatter
plus a water ring, times polarisation and pixel solid angle) quantised to steps of 0.01 photon and multiplied by the
frame's level, so that its Poisson noise is drawn exactly from per-level inverse-CDF tables in one pass over the
4 million pixels; spots add their own Poisson counts (a sum of independent Poisson variables is Poisson).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats

from libs.science.geometry import Beam, Detector, d_spacing_of_lab_points
from libs.simulator.physics import DetectorSpots, polarisation_factor

BACKGROUND_STEP = 0.01  # photons: quantum of the background template
BEAMSTOP_TRANSMISSION = 0.05
GUIDE_BITS = 10  # 1024 guide bins per Poisson table


def detector_mask(
    detector: Detector,
    lab: np.ndarray,
    beam_axis_radius: float,
    mask_edges: bool,
    asic_size: int | None,
    dead_fraction: float,
    hot_fraction: float,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(valid, dead, hot): boolean maps (n_panels, n_slow, n_fast); ``valid`` is True where a pixel can be trusted.

    ``lab``: lab coordinates of the pixel centres (``detector.pixel_centre_lab()``). Masked: module borders and
    ASIC boundaries (when ``mask_edges``; ASIC tiles of ``asic_size`` pixels), the
    beam-stop shadow within ``beam_axis_radius`` mm of the beam, and random dead and hot pixels.
    """
    shape = detector.frame_shape
    valid = np.ones(shape, dtype=bool)
    if mask_edges:
        valid[:, 0, :] = valid[:, -1, :] = False
        valid[:, :, 0] = valid[:, :, -1] = False
        if asic_size:
            for boundary in range(asic_size, shape[2], asic_size):
                valid[:, :, boundary - 1 : boundary + 1] = False
            for boundary in range(asic_size, shape[1], asic_size):
                valid[:, boundary - 1 : boundary + 1, :] = False
    if beam_axis_radius > 0:
        valid &= np.hypot(lab[..., 0], lab[..., 1]) >= beam_axis_radius
    n = valid.size
    chosen = rng.choice(n, size=round(n * (dead_fraction + hot_fraction)), replace=False)
    n_dead = round(n * dead_fraction)
    dead = np.zeros(n, dtype=bool)
    hot = np.zeros(n, dtype=bool)
    dead[chosen[:n_dead]] = True
    hot[chosen[n_dead:]] = True
    dead, hot = dead.reshape(shape), hot.reshape(shape)
    valid &= ~dead & ~hot
    return valid, dead, hot


def background_template(
    detector: Detector,
    lab: np.ndarray,
    beam: Beam,
    diffuse: float,
    water_ring_photons: float,
    water_ring_d: float,
    water_ring_width: float,
    beamstop_radius: float,
) -> np.ndarray:
    """Mean background photons per pixel of a frame of level 1 (n_panels, n_slow, n_fast), float64.

    ``lab``: lab coordinates of the pixel centres (``detector.pixel_centre_lab()``).

    Diffuse scatter falling from ``diffuse`` at low angle to about half of it at 2 Å, plus a Gaussian water ring
    in 1/d; both multiplied by the polarisation factor and the pixel's solid angle relative to a pixel on the beam
    axis at the detector distance; a beam-stop shadow transmits 5 %.
    """
    s = 1.0 / d_spacing_of_lab_points(lab, beam.wavelength)
    profile = diffuse * (0.4 + 0.6 * np.exp(-((s / 0.2) ** 2)))
    profile += water_ring_photons * np.exp(-((s - 1.0 / water_ring_d) ** 2) / (2.0 * water_ring_width**2))
    distance = np.linalg.norm(lab, axis=-1)
    normals = np.array([panel.normal for panel in detector.panels])[:, None, None, :]
    obliquity = np.abs(np.sum(lab * normals, axis=-1)) / distance
    reference = np.array([panel.distance for panel in detector.panels])[:, None, None]
    solid_angle = obliquity * (reference / distance) ** 2
    template = profile * polarisation_factor(lab, beam.polarization_fraction) * solid_angle
    if beamstop_radius > 0:
        template = np.where(
            np.hypot(lab[..., 0], lab[..., 1]) < beamstop_radius, template * BEAMSTOP_TRANSMISSION, template
        )
    return np.asarray(template)


class QuantisedPoisson:
    """Exact Poisson draws for λ = level · template_q over a whole frame, fast.

    The template is quantised to multiples of BACKGROUND_STEP (the quantised template *is* the model). For a frame
    level c every pixel's λ is one of a few hundred values c·step·q, so its counts come from an inverse-CDF table of
    that value: a 1024-bin guide table answers 99 % of pixels with one lookup and the rest by binary search.
    """

    def __init__(self, template: np.ndarray) -> None:
        self.shape = template.shape
        self.levels = np.round(template / BACKGROUND_STEP).astype(np.int32).ravel()
        self.n_levels = int(self.levels.max()) + 1
        self._guide_base = self.levels * (1 << GUIDE_BITS)

    def template(self) -> np.ndarray:
        """The quantised template (photons per pixel at level 1)."""
        return (self.levels * BACKGROUND_STEP).reshape(self.shape)

    def mean(self, level: float) -> np.ndarray:
        """Expected counts per pixel at this frame level."""
        return (self.levels * (BACKGROUND_STEP * level)).reshape(self.shape)

    def sample(self, level: float, rng: np.random.Generator) -> np.ndarray:
        """Poisson counts (int32, template shape) with mean ``level`` · template_q."""
        rates = level * BACKGROUND_STEP * np.arange(self.n_levels)
        top = float(rates[-1])
        k_max = int(np.ceil(top + 12.0 * np.sqrt(top) + 15.0))
        cdf = stats.poisson.cdf(np.arange(k_max + 1)[None, :], rates[:, None])
        n_bins = 1 << GUIDE_BITS
        # Count k answers every u in [cdf[k-1], cdf[k]): the guide bins wholly inside that interval get k, the
        # bins that straddle a boundary get -1 (resolved by search below).
        lower = np.concatenate([np.zeros((self.n_levels, 1)), cdf[:, :-1]], axis=1)
        first_bin = np.ceil(lower * n_bins).astype(np.int64)
        end_bin = np.floor(cdf * n_bins).astype(np.int64)
        width = np.maximum(end_bin - first_bin, 0).ravel()
        guide = np.full(self.n_levels * n_bins, -1, dtype=np.int16)
        starts = (first_bin + np.arange(self.n_levels)[:, None] * n_bins).ravel()
        total = int(width.sum())
        position = np.repeat(starts - np.cumsum(width) + width, width) + np.arange(total)
        guide[position] = np.repeat(np.tile(np.arange(k_max + 1, dtype=np.int16), self.n_levels), width)
        uniform = rng.integers(0, 1 << 32, size=self.levels.size, dtype=np.uint32)
        counts = guide.ravel()[self._guide_base + (uniform >> (32 - GUIDE_BITS)).astype(np.int32)]
        unresolved = np.flatnonzero(counts < 0)
        if unresolved.size:
            # Rows of the CDF laid end to end (row r occupies [2r, 2r + 1]) so one sorted search serves all levels.
            keys = (2.0 * np.arange(self.n_levels)[:, None] + cdf).ravel()
            levels = self.levels[unresolved]
            u = uniform[unresolved] * (1.0 / (1 << 32))
            position = np.searchsorted(keys, 2.0 * levels + u, side="right")
            counts[unresolved] = np.minimum(position - levels * (k_max + 1), k_max)
        return counts.astype(np.int32).reshape(self.shape)


@dataclass
class RenderedSpots:
    """Pixels of every spot's box: expected photons, and the profile's share on valid pixels."""

    flat_index: np.ndarray  # (m,) index into the flattened frame of each on-panel box pixel
    owner: np.ndarray  # (m,) which spot the pixel belongs to
    expected: np.ndarray  # (m,) expected photons from that spot in that pixel
    fraction_valid: np.ndarray  # (n,) share of each spot's profile on valid pixels
    fraction_on_panel: np.ndarray  # (n,) share on the panel at all
    box_half_width: int


def render_spots(spots: DetectorSpots, expected_counts: np.ndarray, valid: np.ndarray) -> RenderedSpots:
    """Gaussian spot profiles integrated over pixels (approximated by adding the pixel's 1/12 px² variance).

    Each spot is drawn in a square box of ±4σ (2 to 8 pixels) around its centre and normalised over that box,
    so ``expected_counts`` photons are spread over it exactly.
    """
    _, n_slow, n_fast = valid.shape
    n = len(spots.panel)
    if n == 0:
        empty = np.zeros(0)
        return RenderedSpots(empty.astype(np.int64), empty.astype(np.int64), empty, empty, empty, 0)
    covariance = spots.covariance + np.eye(2)[None] / 12.0
    largest = np.sqrt(np.linalg.eigvalsh(covariance)[:, 1].max())
    half = int(np.clip(np.ceil(4.0 * largest), 2, 8))
    offsets = np.arange(-half, half + 1)
    fast_pixel = np.floor(spots.fast).astype(np.int64)[:, None, None] + offsets[None, None, :]
    slow_pixel = np.floor(spots.slow).astype(np.int64)[:, None, None] + offsets[None, :, None]
    d_fast = fast_pixel + 0.5 - spots.fast[:, None, None]
    d_slow = slow_pixel + 0.5 - spots.slow[:, None, None]
    inverse = np.linalg.inv(covariance)
    quadratic = (
        inverse[:, 0, 0, None, None] * d_fast**2
        + 2.0 * inverse[:, 0, 1, None, None] * d_fast * d_slow
        + inverse[:, 1, 1, None, None] * d_slow**2
    )
    profile = np.exp(-0.5 * quadratic)
    profile /= profile.sum(axis=(1, 2), keepdims=True)
    on_panel = (fast_pixel >= 0) & (fast_pixel < n_fast) & (slow_pixel >= 0) & (slow_pixel < n_slow)
    panel = np.broadcast_to(spots.panel[:, None, None], profile.shape)
    fast_b = np.broadcast_to(fast_pixel, profile.shape)
    slow_b = np.broadcast_to(slow_pixel, profile.shape)
    flat = (panel * n_slow + np.clip(slow_b, 0, n_slow - 1)) * n_fast + np.clip(fast_b, 0, n_fast - 1)
    is_valid = on_panel & valid.ravel()[flat]
    fraction_valid = np.sum(profile * is_valid, axis=(1, 2))
    fraction_on_panel = np.sum(profile * on_panel, axis=(1, 2))
    owner = np.broadcast_to(np.arange(n)[:, None, None], profile.shape)
    expected = profile * expected_counts[:, None, None]
    keep = on_panel & (expected > 1e-4)
    return RenderedSpots(flat[keep], owner[keep], expected[keep], fraction_valid, fraction_on_panel, half)
