"""Prediction of the reflections in diffraction on a still, and summation integration with a background plane.

Prediction: every lattice point r = A·h within the resolution limit whose distance ε from the Ewald sphere is within
``excitation_width_factor`` widths σ(|r|) (from refinement) is predicted where s1 = s0 + r' meets the detector, r'
being r rotated onto the sphere. Its partiality estimate is the Gaussian exp(-ε²/2σ²) of that offset.

Lorentz-polarisation correction (the simulator's reflection-level convention): a still records a fraction of a
reflection proportional to 1/σ, so the stills Lorentz factor is L = σ_ref/σ(|r|) with σ(|r|) the refined width and
σ_ref = 0.376/2000 Å⁻¹ a fixed reference (the width of a 2000 Å domain: L ≈ 1 for typical crystals; any constant
would do, the merger's per-frame scale absorbs it). The polarisation factor of a beam polarised along lab x with
fraction f is P = f·(1 − u_x²) + (1 − f)·(1 − u_y²), u the unit diffracted ray. The corrected intensity and σ are
I/(L·P) and σ/(L·P), so E[I/(L·P)] = scale · exp(−B/2d²) · partiality · I_full.

Integration, all reflections at once on (n, 2R+1, 2R+1) pixel patches: foreground = valid pixels within
``foreground_radius`` of the prediction; background = a ring out to ``background_radius`` of valid pixels that are
not strong (so neighbouring spots never enter it), fitted by a plane a + b·dx + c·dy (least squares, then once more
without pixels far above the plane). I = Σ_fg (pixel - plane); var(I) = gain·Σ_fg pixel + n_fg²·σ²_bg/n_bg (counting
statistics of the foreground plus the error of the background level). A reflection with a masked pixel in its
foreground, an overloaded pixel, too little background, or a shoebox off its panel is flagged and not reported.
Pure numpy, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntFlag
from functools import lru_cache

import numpy as np

from libs.contracts.parameters import IntegrationParameters
from libs.science.crystal import b_matrix
from libs.science.geometry import Beam, Detector
from services.analysis.refinement import ExcitationWidth, ewald_projection, excitation_error

# σ_ref of the stills Lorentz factor L = σ_ref/σ: the width (1/Å) of a 2000 Å mosaic domain (0.376/D), the same
# reference the simulator uses, so that corrected intensities of the two are on one scale.
LORENTZ_REFERENCE_WIDTH = 0.376 / 2000.0


class Flag(IntFlag):
    """Why a predicted reflection was not integrated (0: integrated)."""

    OFF_PANEL = 1  # its shoebox leaves the panel
    MASKED = 2  # a masked pixel in the foreground
    OVERLOADED = 4  # a saturated pixel in the foreground
    NO_BACKGROUND = 8  # too few background pixels for the plane


@dataclass(frozen=True)
class Predictions:
    miller: np.ndarray  # int (n, 3)
    panel: np.ndarray  # int (n,)
    fast: np.ndarray  # float (n,) continuous pixel coordinates
    slow: np.ndarray
    partiality: np.ndarray  # float (n,)
    d_spacing: np.ndarray  # float (n,) Å
    excitation_error: np.ndarray  # float (n,) 1/Å
    lorentz: np.ndarray  # float (n,): stills Lorentz factor σ_ref/σ(|r|)
    polarisation: np.ndarray  # float (n,): polarisation factor of the diffracted ray

    def __len__(self) -> int:
        return int(self.miller.shape[0])


@dataclass(frozen=True)
class IntegratedReflections:
    predictions: Predictions
    intensity: np.ndarray  # float (n,): background-subtracted sum, counts
    variance: np.ndarray  # float (n,)
    background: np.ndarray  # float (n,): background level per pixel at the centre
    flags: np.ndarray  # int (n,): Flag bits, 0 when integrated

    @property
    def integrated(self) -> np.ndarray:
        return self.flags == 0

    @property
    def corrected_intensity(self) -> np.ndarray:
        """I/(L·P): the Lorentz-polarisation corrected intensity (what the FrameResult carries)."""
        return self.intensity / (self.predictions.lorentz * self.predictions.polarisation)

    @property
    def corrected_sigma(self) -> np.ndarray:
        """σ(I)/(L·P), σ(I) = sqrt(variance) (negative variances count as 0)."""
        return np.sqrt(np.maximum(self.variance, 0.0)) / (self.predictions.lorentz * self.predictions.polarisation)


@lru_cache(maxsize=8)
def _miller_grid(cell: tuple[float, ...], d_min: float) -> tuple[np.ndarray, np.ndarray]:
    """All Miller indices h ≠ 0 with d(h) ≥ d_min (as floats) and their |B·h|², which no rotation changes.

    Cells vary little within a run, so the grid is cached by (rounded) cell.
    """
    B = b_matrix(cell)
    real = np.linalg.inv(B)
    limits = [int(np.ceil(np.linalg.norm(axis) / d_min)) for axis in real]
    grids = np.meshgrid(*[np.arange(-n, n + 1, dtype=np.float64) for n in limits], indexing="ij")
    h = np.stack([g.ravel() for g in grids], axis=1)
    length_sq = np.einsum("ij,ij->i", h @ B.T, h @ B.T)
    keep = (length_sq > 0) & (length_sq <= 1.0 / d_min**2)
    return h[keep], length_sq[keep]


def polarisation_factor(s1: np.ndarray, polarization_fraction: float) -> np.ndarray:
    """Fraction of the scattered intensity along the rays s1 (n, 3) kept by a beam polarised along lab x."""
    unit = s1 / np.linalg.norm(s1, axis=-1, keepdims=True)
    along_x = polarization_fraction * (1.0 - unit[..., 0] ** 2)
    return np.asarray(along_x + (1.0 - polarization_fraction) * (1.0 - unit[..., 1] ** 2))


def detector_d_min(detector: Detector, beam: Beam) -> float:
    """Highest resolution (Å) any pixel of the detector records (at a panel corner)."""
    corners = []
    for panel in detector.panels:
        n_fast, n_slow = panel.size
        corners.append(panel.pixel_to_lab(np.array([0, n_fast, 0, n_fast]), np.array([0, 0, n_slow, n_slow])))
    points = np.concatenate(corners)
    cos_two_theta = -points[:, 2] / np.linalg.norm(points, axis=1)
    sin_theta = np.sqrt((1 - cos_two_theta) / 2)
    return float(beam.wavelength / (2 * sin_theta.max()))


def predict(
    A: np.ndarray,
    cell_for_grid: tuple[float, ...],
    detector: Detector,
    beam: Beam,
    width: ExcitationWidth,
    parameters: IntegrationParameters,
) -> Predictions:
    """Reflections of the lattice A near the Ewald sphere that land on the detector."""
    d_min = max(parameters.d_min or 0.0, detector_d_min(detector, beam))
    # The grid comes from a rounded cell so that frames of one run share it; pad it slightly for cell variation.
    h_all, length_sq_grid = _miller_grid(tuple(round(x, 1) for x in cell_for_grid), round(d_min * 0.98, 2))
    A = np.asarray(A)
    s0 = beam.s0
    wavenumber = float(np.linalg.norm(s0))
    # Cheap screen with one dot product per h: |r + s0|² - |s0|² = |r|² + 2 r·s0 ≈ 2|s0|·ε near the sphere, with
    # |r|² taken from the grid's cell (a generous margin covers the refined cell's small difference).
    along_beam = h_all @ (A.T @ s0)
    approximate = (length_sq_grid + 2.0 * along_beam) / (2.0 * wavenumber)
    widest = parameters.excitation_width_factor * float(width.sigma(np.array(1.0 / d_min)))
    # |r|² of the true cell differs from the grid's by 2·(relative cell difference)·|r|²: allow 1.5 %.
    h = h_all[np.abs(approximate) <= widest + 0.015 * length_sq_grid / wavenumber]
    r = h @ A.T
    epsilon = excitation_error(r, s0)
    length = np.linalg.norm(r, axis=1)
    sigma = width.sigma(length)
    near = (np.abs(epsilon) <= parameters.excitation_width_factor * sigma) & (length <= 1.0 / d_min)
    h, r, epsilon, length, sigma = h[near], r[near], epsilon[near], length[near], sigma[near]
    partiality = np.exp(-0.5 * (epsilon / sigma) ** 2)
    enough = partiality >= parameters.min_partiality
    h, r, epsilon, length, sigma = h[enough], r[enough], epsilon[enough], length[enough], sigma[enough]
    partiality = partiality[enough]
    projected, _ = ewald_projection(r, s0)
    s1 = projected + s0
    panel, fast, slow = detector.ray_to_pixel(s1)
    on = panel >= 0
    return Predictions(
        miller=np.rint(h[on]).astype(int),
        panel=panel[on],
        fast=fast[on],
        slow=slow[on],
        partiality=partiality[on],
        d_spacing=1.0 / length[on],
        excitation_error=epsilon[on],
        lorentz=LORENTZ_REFERENCE_WIDTH / sigma[on],
        polarisation=polarisation_factor(s1[on], beam.polarization_fraction),
    )


def integrate(
    image: np.ndarray,
    mask: np.ndarray,
    strong_flat: np.ndarray,
    predictions: Predictions,
    parameters: IntegrationParameters,
    gain: float = 1.0,
) -> IntegratedReflections:
    """Summation integration of every prediction; ``strong_flat`` are the sorted flat indices of strong pixels."""
    n = len(predictions)
    _, n_slow, n_fast = image.shape
    radius = int(np.ceil(parameters.background_radius))
    size = 2 * radius + 1
    centre_fast = np.floor(predictions.fast).astype(int)
    centre_slow = np.floor(predictions.slow).astype(int)
    flags = np.zeros(n, dtype=np.int32)
    inside = (
        (centre_fast - radius >= 0)
        & (centre_fast + radius < n_fast)
        & (centre_slow - radius >= 0)
        & (centre_slow + radius < n_slow)
    )
    flags[~inside] |= Flag.OFF_PANEL
    intensity = np.zeros(n)
    variance = np.zeros(n)
    background = np.zeros(n)
    chosen = np.flatnonzero(inside)
    if chosen.size:
        offsets = np.arange(-radius, radius + 1)
        base = (predictions.panel[chosen] * n_slow + centre_slow[chosen]) * n_fast + centre_fast[chosen]
        flat = base[:, None, None] + offsets[None, :, None] * n_fast + offsets[None, None, :]
        pixels = image.ravel()[flat].astype(np.float64)
        valid = mask.ravel()[flat]
        if strong_flat.size:
            position = np.minimum(np.searchsorted(strong_flat, flat), strong_flat.size - 1)
            strong = strong_flat[position] == flat
        else:
            strong = np.zeros(flat.shape, dtype=bool)
        # Offsets of each pixel centre from the predicted position (pixels).
        dx = (centre_fast[chosen] + 0.5 - predictions.fast[chosen])[:, None, None] + offsets[None, None, :]
        dy = (centre_slow[chosen] + 0.5 - predictions.slow[chosen])[:, None, None] + offsets[None, :, None]
        dx = np.broadcast_to(dx, (chosen.size, size, size))
        dy = np.broadcast_to(dy, (chosen.size, size, size))
        distance_sq = dx * dx + dy * dy
        foreground = distance_sq <= parameters.foreground_radius**2
        ring = (distance_sq >= (parameters.foreground_radius + 1) ** 2) & (
            distance_sq <= parameters.background_radius**2
        )
        in_background = ring & valid & ~strong
        plane, residual_var, n_background = _fit_planes(pixels, dx, dy, in_background, gain)
        model = plane[:, 0, None, None] + plane[:, 1, None, None] * dx + plane[:, 2, None, None] * dy
        net = np.where(foreground, pixels - model, 0.0)
        n_foreground = foreground.sum(axis=(1, 2))
        sub_flags = np.zeros(chosen.size, dtype=np.int32)
        sub_flags[np.any(foreground & ~valid, axis=(1, 2))] |= Flag.MASKED
        sub_flags[np.any(foreground & (pixels >= parameters.overload), axis=(1, 2))] |= Flag.OVERLOADED
        sub_flags[n_background < parameters.min_background_pixels] |= Flag.NO_BACKGROUND
        counts = np.where(foreground & valid, np.maximum(pixels, 0.0), 0.0).sum(axis=(1, 2))
        intensity[chosen] = net.sum(axis=(1, 2))
        variance[chosen] = gain * counts + n_foreground**2 * residual_var / np.maximum(n_background, 1)
        background[chosen] = plane[:, 0]
        flags[chosen] |= sub_flags
    return IntegratedReflections(
        predictions=predictions, intensity=intensity, variance=variance, background=background, flags=flags
    )


def spot_profile_sigma(
    image: np.ndarray, mask: np.ndarray, panel: np.ndarray, fast: np.ndarray, slow: np.ndarray, half_size: int = 5
) -> float | None:
    """Median σ (pixels) along the major axis of the spots at (panel, fast, slow), from background-subtracted
    second moments in (2·half_size+1)² patches; None when no spot gives a usable estimate."""
    _, n_slow, n_fast = image.shape
    cf, cs = np.floor(fast).astype(int), np.floor(slow).astype(int)
    inside = (cf >= half_size) & (cf < n_fast - half_size) & (cs >= half_size) & (cs < n_slow - half_size)
    if not inside.any():
        return None
    offsets = np.arange(-half_size, half_size + 1)
    base = (panel[inside] * n_slow + cs[inside]) * n_fast + cf[inside]
    flat = base[:, None, None] + offsets[None, :, None] * n_fast + offsets[None, None, :]
    pixels = image.ravel()[flat].astype(np.float64)
    valid = mask.ravel()[flat]
    border = np.ones((2 * half_size + 1,) * 2, dtype=bool)
    border[1:-1, 1:-1] = False
    # Background: the median of each patch's valid border pixels; only the excess above it carries the profile.
    border_values = np.where(valid & border, pixels, np.nan)
    level = np.nanmedian(border_values.reshape(len(pixels), -1), axis=1)
    # Signed excess: clipping at zero would turn background noise into spurious width.
    weight = np.where(valid, pixels - np.nan_to_num(level)[:, None, None], 0.0)
    total = weight.sum(axis=(1, 2))
    usable = np.all(valid, axis=(1, 2)) & (total > 0) & np.isfinite(level)
    if not usable.any():
        return None
    weight, total = weight[usable], total[usable]
    dx = (np.arange(-half_size, half_size + 1) + 0.5)[None, None, :] - (fast[inside][usable] - cf[inside][usable])[
        :, None, None
    ]
    dy = (np.arange(-half_size, half_size + 1) + 0.5)[None, :, None] - (slow[inside][usable] - cs[inside][usable])[
        :, None, None
    ]
    xx = (weight * dx * dx).sum(axis=(1, 2)) / total
    yy = (weight * dy * dy).sum(axis=(1, 2)) / total
    xy = (weight * dx * dy).sum(axis=(1, 2)) / total
    # Largest eigenvalue of [[xx, xy], [xy, yy]].
    major = 0.5 * (xx + yy) + np.sqrt(0.25 * (xx - yy) ** 2 + xy**2)
    return float(np.sqrt(max(float(np.median(major)), 0.0)))


def _fit_planes(
    pixels: np.ndarray, dx: np.ndarray, dy: np.ndarray, use: np.ndarray, gain: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Least-squares planes a + b·dx + c·dy over the ``use`` pixels of each patch, with one rejection pass.

    Returns the coefficients (n, 3), the residual variance per pixel (n,) and the pixels used (n,).
    """
    weight = use.astype(np.float64)
    for _ in range(2):
        plane = _solve_planes(pixels, dx, dy, weight)
        model = plane[:, 0, None, None] + plane[:, 1, None, None] * dx + plane[:, 2, None, None] * dy
        # Reject pixels far above the plane (an unresolved neighbour, a zinger): Poisson-scaled 4σ.
        limit = model + 4.0 * np.sqrt(gain * np.maximum(model, 1.0))
        weight = (use & (pixels <= limit)).astype(np.float64)
    plane = _solve_planes(pixels, dx, dy, weight)
    model = plane[:, 0, None, None] + plane[:, 1, None, None] * dx + plane[:, 2, None, None] * dy
    n_used = weight.sum(axis=(1, 2))
    residual_var = (weight * (pixels - model) ** 2).sum(axis=(1, 2)) / np.maximum(n_used - 3, 1)
    return plane, residual_var, n_used


def _solve_planes(pixels: np.ndarray, dx: np.ndarray, dy: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """Weighted least-squares plane coefficients (n, 3) from the normal equations' moments."""
    wx, wy = weight * dx, weight * dy
    moments = [weight, wx, wy, wx * dx, wx * dy, wy * dy, weight * pixels, wx * pixels, wy * pixels]
    w, x, y, xx, xy, yy, p, px, py = (m.sum(axis=(1, 2)) for m in moments)
    normal = np.stack([np.stack([w, x, y], -1), np.stack([x, xx, xy], -1), np.stack([y, xy, yy], -1)], -2)
    # A tiny ridge keeps patches with a degenerate background solvable; they are flagged NO_BACKGROUND anyway.
    normal += np.eye(3) * 1e-6
    return np.linalg.solve(normal, np.stack([p, px, py], -1)[..., None])[..., 0]
