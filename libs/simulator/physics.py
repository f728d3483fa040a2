"""Which reflections a still crystal records, how much of each, and where: pure numpy, no I/O.

Model (see docs/simulator.md): a reciprocal-lattice point r = A·h is a Gaussian blob whose width along the Ewald
sphere's normal comes from the mosaic-domain size, the mosaic spread and the beam divergence (σ_R); the spectrum
(bandwidth) spreads the sphere itself (σ_E = G·σ_k with G = |r|²λ²/2). With ε = |r + s0| − 1/λ the distance of the
point from the sphere, the recorded fraction is

    partiality = exp(−ε² / 2σ²),   σ² = σ_R² + σ_E²,   Lorentz factor = σ_ref / σ,

and the spot is where the most probable (wavelength, point in the blob) pair sends it: the Gaussian-weighted solution
of the Bragg condition, which moves the spot off the naive s1 ∝ r + s0 when the bandwidth dominates.
"""

from __future__ import annotations

from dataclasses import dataclass

import numexpr
import numpy as np

from libs.science.crystal import b_matrix
from libs.science.geometry import Detector

FWHM_TO_SIGMA = 1.0 / (2.0 * np.sqrt(2.0 * np.log(2.0)))
DOMAIN_SIGMA_FACTOR = 0.376  # σ (1/Å) of a Gaussian with the FWHM of a cube's shape transform is 0.376 / D
CUTOFF_SIGMAS = 3.0  # reflections further than this many σ from the sphere (partiality < 1.1 %) are not recorded


def domain_sigma(domain_size: float | np.ndarray) -> np.ndarray:
    """Width σ (1/Å) of a reciprocal-lattice point of a mosaic domain of ``domain_size`` Å."""
    return np.asarray(DOMAIN_SIGMA_FACTOR / np.asarray(domain_size, dtype=float))


@dataclass(frozen=True)
class LineSearch:
    """Lines of the reciprocal lattice used to find the points near the Ewald sphere quickly.

    Two indices (``pair_axes``) are enumerated, the third (``solve_axis``, the longest real axis) is solved for:
    each (index, index) pair is a line of lattice points that crosses the sphere at most twice.
    """

    solve_axis: int
    pair_axes: tuple[int, int]
    pairs: np.ndarray  # (m, 2) int: indices along pair_axes whose line passes within the resolution sphere
    solve_limit: int  # |index| bound along solve_axis


def line_search(cell: tuple[float, ...], d_min: float, margin: float = 1.03) -> LineSearch:
    """Precompute the lattice lines for a cell (with ``margin`` for per-crystal cell changes)."""
    lengths = np.array(cell[:3], dtype=float)
    solve_axis = int(np.argmax(lengths))
    pair_axes = tuple(int(a) for a in range(3) if a != solve_axis)
    limits = np.floor(lengths * margin / d_min).astype(int) + 1
    B = b_matrix(cell)
    first, second = np.meshgrid(
        np.arange(-limits[pair_axes[0]], limits[pair_axes[0]] + 1),
        np.arange(-limits[pair_axes[1]], limits[pair_axes[1]] + 1),
        indexing="ij",
    )
    pairs = np.stack([first.ravel(), second.ravel()], axis=1)
    origins = pairs @ B[:, list(pair_axes)].T
    direction = B[:, solve_axis] / np.linalg.norm(B[:, solve_axis])
    perpendicular = origins - np.outer(origins @ direction, direction)
    near = np.linalg.norm(perpendicular, axis=1) <= margin / d_min
    return LineSearch(solve_axis, (pair_axes[0], pair_axes[1]), pairs[near], int(limits[solve_axis]))


@dataclass(frozen=True)
class Crystals:
    """Crystals of a batch of frames: orientation and cell (A = UB), mosaic-domain size and spread."""

    A: np.ndarray  # (F, 3, 3)
    domain_size: np.ndarray  # (F,) Å
    mosaicity: np.ndarray  # (F,) full spread (FWHM), radians


@dataclass(frozen=True)
class BeamModel:
    """The spectral and angular spread of the beam that matter for prediction."""

    wavelength: float
    bandwidth: float  # Δλ/λ FWHM
    divergence: float  # FWHM, radians
    polarization_fraction: float


@dataclass
class Predicted:
    """Reflections recorded by a batch of crystals, before they meet the detector (arrays of length n)."""

    frame: np.ndarray  # (n,) which crystal of the batch, ascending
    miller: np.ndarray  # (n, 3) int
    excitation_error: np.ndarray  # ε = |r + s0| − 1/λ, 1/Å
    sigma: np.ndarray  # σ of the partiality Gaussian, 1/Å
    partiality: np.ndarray
    lorentz: np.ndarray
    s1: np.ndarray  # (n, 3) unit direction of the diffracted ray
    wavelength: np.ndarray  # wavelength that records the spot most strongly, Å
    d_spacing: np.ndarray
    radial_sigma: np.ndarray  # angular σ of the spot along 2θ (bandwidth streak), radians
    tangential_sigma: np.ndarray  # angular σ of the spot around the beam (mosaic spread), radians

    def select(self, keep: np.ndarray) -> Predicted:
        """The subset ``keep`` (boolean or index array)."""
        return Predicted(**{name: value[keep] for name, value in vars(self).items()})


def _candidates(A: np.ndarray, k: float, lines: LineSearch, epsilon_max: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(frame (n,), miller (n, 3)): indices whose point lies within ``epsilon_max[frame]`` of |r + s0| = k."""
    n_pairs = len(lines.pairs)
    v = A[:, :, lines.solve_axis]
    pair_vectors = A[:, :, list(lines.pair_axes)]  # (F, 3, 2)
    # |c0|² and c0·v of each line's origin c0 = r0 + s0, from per-frame 2×2 metrics (cheaper than 3-vectors).
    metric = np.einsum("fip,fiq->fpq", pair_vectors, pair_vectors)
    along = np.einsum("fip,fi->fp", pair_vectors, v)
    p0, p1 = lines.pairs[:, 0].astype(float), lines.pairs[:, 1].astype(float)
    m00, m01, m11 = metric[:, 0, 0, None], metric[:, 0, 1, None], metric[:, 1, 1, None]
    z0, z1 = pair_vectors[:, 2, 0, None], pair_vectors[:, 2, 1, None]
    w0, w1, vz = along[:, 0, None], along[:, 1, None], v[:, 2, None]
    a = np.einsum("fi,fi->f", v, v)[:, None]
    e_max = epsilon_max[:, None]
    variables = {"p0": p0, "p1": p1, "m00": m00, "m01": m01, "m11": m11, "z0": z0, "z1": z1, "k": k}
    variables |= {"w0": w0, "w1": w1, "vz": vz, "a": a, "e": e_max}
    c = numexpr.evaluate(
        "m00 * p0 * p0 + 2.0 * m01 * p0 * p1 + m11 * p1 * p1 - 2.0 * k * (z0 * p0 + z1 * p1) + k * k", variables
    )
    b = numexpr.evaluate("w0 * p0 + w1 * p1 - k * vz", variables)
    variables |= {"b": b, "c": c}
    outer = numexpr.evaluate("b * b - a * (c - (k + e) ** 2)", variables).ravel()
    inner = numexpr.evaluate("b * b - a * (c - (k - e) ** 2)", variables).ravel()
    a, b = np.broadcast_to(a, b.shape).ravel(), b.ravel()
    crosses = np.flatnonzero(outer >= 0)
    a, b, outer, inner = a[crosses], b[crosses], np.sqrt(outer[crosses]), inner[crosses]
    t_low, t_high = (-b - outer) / a, (-b + outer) / a
    has_inner = inner > 0
    root_inner = np.sqrt(np.where(has_inner, inner, 0.0))
    u_low = np.where(has_inner, (-b - root_inner) / a, t_high)
    u_high = np.where(has_inner, (-b + root_inner) / a, t_high)
    # Two intervals of t per line: [t_low, u_low] and [u_high, t_high] (the second is empty without an inner root).
    starts = np.concatenate([np.ceil(t_low), np.ceil(u_high)])
    stops = np.concatenate([np.floor(u_low), np.where(has_inner, np.floor(t_high), np.ceil(u_high) - 1)])
    starts = np.maximum(starts, -lines.solve_limit)
    stops = np.minimum(stops, lines.solve_limit)
    counts = np.maximum(stops - starts + 1, 0).astype(np.int64)
    line = np.concatenate([crosses, crosses])
    # Keep the output ordered by frame: interleave the two intervals of each line.
    order = np.argsort(line, kind="stable")
    line, starts, counts = line[order], starts[order], counts[order]
    total = int(counts.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64), np.zeros((0, 3), dtype=np.int64)
    repeated = np.repeat(np.arange(len(counts)), counts)
    within = np.arange(total) - np.repeat(np.cumsum(counts) - counts, counts)
    solved = starts[repeated].astype(np.int64) + within
    flat_line = line[repeated]
    frame = flat_line // n_pairs
    chosen = lines.pairs[flat_line % n_pairs]
    miller = np.empty((total, 3), dtype=np.int64)
    miller[:, lines.pair_axes[0]] = chosen[:, 0]
    miller[:, lines.pair_axes[1]] = chosen[:, 1]
    miller[:, lines.solve_axis] = solved
    return frame, miller


def sigma_components(
    r_length: np.ndarray, domain_size: np.ndarray, mosaicity: np.ndarray, beam: BeamModel
) -> tuple[np.ndarray, np.ndarray, float]:
    """(σ_R², G, σ_k): blob variance, sphere shift per unit wavenumber, spectral σ of the wavenumber."""
    k = 1.0 / beam.wavelength
    angular = (mosaicity**2 + beam.divergence**2) * FWHM_TO_SIGMA**2
    sigma_r2 = domain_sigma(domain_size) ** 2 + r_length**2 * angular
    gradient = r_length**2 * beam.wavelength**2 / 2.0
    sigma_k = k * beam.bandwidth * FWHM_TO_SIGMA
    return sigma_r2, gradient, sigma_k


def predict(
    crystals: Crystals, beam: BeamModel, lines: LineSearch, d_min: float, reference_domain_size: float
) -> Predicted:
    """Every reflection within d_min recorded with partiality above exp(−CUTOFF²/2) by each crystal."""
    k = 1.0 / beam.wavelength
    r_max = 1.0 / d_min
    sigma_r2_max, gradient_max, sigma_k = sigma_components(
        np.full(len(crystals.A), r_max), crystals.domain_size, crystals.mosaicity, beam
    )
    epsilon_max = CUTOFF_SIGMAS * np.sqrt(sigma_r2_max + (gradient_max * sigma_k) ** 2)
    frame, miller = _candidates(crystals.A, k, lines, epsilon_max)
    r = np.empty((len(frame), 3))
    for row in range(3):
        r[:, row] = np.einsum("nj,nj->n", crystals.A[:, row, :][frame], miller)
    r_length = np.linalg.norm(r, axis=1)
    centred = r.copy()
    centred[:, 2] -= k
    centred_length = np.linalg.norm(centred, axis=1)
    epsilon = centred_length - k
    sigma_r2, gradient, _ = sigma_components(r_length, crystals.domain_size[frame], crystals.mosaicity[frame], beam)
    sigma2 = sigma_r2 + (gradient * sigma_k) ** 2
    keep = (r_length <= r_max) & (r_length > 0) & (np.abs(epsilon) <= CUTOFF_SIGMAS * np.sqrt(sigma2))
    frame, miller, r, r_length = frame[keep], miller[keep], r[keep], r_length[keep]
    centred, centred_length = centred[keep], centred_length[keep]
    epsilon, sigma_r2, gradient, sigma2 = epsilon[keep], sigma_r2[keep], gradient[keep], sigma2[keep]

    sigma = np.sqrt(sigma2)
    partiality = np.exp(-(epsilon**2) / (2.0 * sigma2))
    lorentz = domain_sigma(reference_domain_size) / sigma
    # Most probable wavenumber shift and point inside the blob that satisfy Bragg's law together.
    delta_k = epsilon * gradient * sigma_k**2 / sigma2
    shift = -epsilon * sigma_r2 / sigma2
    k_star = k + delta_k
    normal = centred / centred_length[:, None]
    s1 = r + shift[:, None] * normal
    s1[:, 2] -= k_star
    s1 /= np.linalg.norm(s1, axis=1, keepdims=True)

    theta = np.arcsin(np.clip(r_length * beam.wavelength / 2.0, 0.0, 1.0))
    posterior_sigma_k = sigma_k * np.sqrt(sigma_r2 / sigma2)
    radial_sigma = 2.0 * np.tan(theta) * posterior_sigma_k / k_star
    tangential_sigma = crystals.mosaicity[frame] * FWHM_TO_SIGMA * np.sin(2.0 * theta)
    return Predicted(
        frame=frame,
        miller=miller,
        excitation_error=epsilon,
        sigma=sigma,
        partiality=partiality,
        lorentz=lorentz,
        s1=s1,
        wavelength=1.0 / k_star,
        d_spacing=1.0 / r_length,
        radial_sigma=radial_sigma,
        tangential_sigma=tangential_sigma,
    )


def polarisation_factor(s1: np.ndarray, polarization_fraction: float) -> np.ndarray:
    """Fraction of scattered intensity kept by the polarisation of a beam polarised along lab x with this fraction."""
    unit = s1 / np.linalg.norm(s1, axis=-1, keepdims=True)
    return polarization_fraction * (1.0 - unit[..., 0] ** 2) + (1.0 - polarization_fraction) * (1.0 - unit[..., 1] ** 2)


@dataclass
class DetectorSpots:
    """Where predicted reflections land on the detector: only those hitting a panel."""

    index: np.ndarray  # index into the Predicted arrays
    panel: np.ndarray
    fast: np.ndarray
    slow: np.ndarray
    covariance: np.ndarray  # (n, 2, 2) spot profile covariance in pixels² (fast, slow), without pixelation


def panel_inverses(detector: Detector) -> np.ndarray:
    """(n_panels, 3, 3) inverse of each panel's [fast step, slow step, origin] matrix: (f·w, s·w, w) = M⁻¹·ray."""
    matrices = []
    for panel in detector.panels:
        matrix = np.column_stack(
            [
                np.asarray(panel.fast_axis) * panel.pixel_size,
                np.asarray(panel.slow_axis) * panel.pixel_size,
                np.asarray(panel.origin),
            ]
        )
        matrices.append(np.linalg.inv(matrix))
    return np.array(matrices)


def project_spots(
    predicted: Predicted,
    detector: Detector,
    inverses: np.ndarray,
    spot_sigma_pixels: float,
    divergence: float,
) -> DetectorSpots:
    """Panel, continuous pixel position and pixel covariance of every predicted spot that hits a panel."""
    panel, fast, slow = detector.ray_to_pixel(predicted.s1)
    hit = np.flatnonzero(panel >= 0)
    panel, fast, slow = panel[hit], fast[hit], slow[hit]
    u = predicted.s1[hit]
    # Unit vectors of the ray's small angular moves: radial (2θ grows) and tangential (around the beam).
    beam_axis = np.array([0.0, 0.0, -1.0])
    tangential = np.cross(beam_axis, u)
    norm = np.linalg.norm(tangential, axis=1, keepdims=True)
    tangential = np.where(norm > 1e-12, tangential / np.maximum(norm, 1e-12), np.array([1.0, 0.0, 0.0]))
    radial = np.cross(u, tangential)
    projected, moved_r, moved_t = (np.empty_like(u) for _ in range(3))
    for index in range(len(inverses)):
        on = panel == index
        projected[on] = u[on] @ inverses[index].T
        moved_r[on] = radial[on] @ inverses[index].T
        moved_t[on] = tangential[on] @ inverses[index].T
    w = projected[:, 2]

    def jacobian(moved: np.ndarray) -> np.ndarray:
        return (moved[:, :2] * w[:, None] - projected[:, :2] * moved[:, 2:3]) / (w * w)[:, None]

    jr, jt = jacobian(moved_r), jacobian(moved_t)
    divergence_sigma2 = (divergence * FWHM_TO_SIGMA) ** 2
    radial_var = predicted.radial_sigma[hit] ** 2 + divergence_sigma2
    tangential_var = predicted.tangential_sigma[hit] ** 2 + divergence_sigma2
    covariance = (
        spot_sigma_pixels**2 * np.eye(2)[None]
        + radial_var[:, None, None] * np.einsum("ni,nj->nij", jr, jr)
        + tangential_var[:, None, None] * np.einsum("ni,nj->nij", jt, jt)
    )
    return DetectorSpots(hit, panel, fast, slow, covariance)
