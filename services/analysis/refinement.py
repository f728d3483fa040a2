"""Refinement of a still's orientation and cell against spot positions and Δψ, and its excitation-error width.

Model (stills, as in DIALS' stills refinement): a reciprocal-lattice point r = U·B·h is brought onto the Ewald
sphere by the rotation Δψ about s0 × r; the reflection is then predicted along s1 = s0 + r'. Residuals per indexed
spot: the position error (mm, perpendicular to the observed ray, at the spot's distance) over position_sigma_mm, and
Δψ over delta_psi_sigma. The cell is parameterised by its lattice system (tetragonal: a, c; cubic: a; ...), so the
refined cell keeps the space group's metric symmetry. Outliers beyond ``outlier_sigmas`` robust sigmas are removed
and the model refitted. The spread of the indexed spots' distance from the Ewald sphere then gives the width
(domain size and mosaicity) that prediction and the partiality estimate use. Pure numpy/scipy, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import least_squares

from libs.contracts.parameters import RefinementParameters
from libs.science.crystal import axis_angle_matrix, b_matrix, cell_from_a_matrix, space_group

# Which cell parameters are free in each lattice system; the rest follow from them.
_FREE_CELL = {
    "triclinic": (0, 1, 2, 3, 4, 5),
    "monoclinic": (0, 1, 2, 4),
    "orthorhombic": (0, 1, 2),
    "tetragonal": (0, 2),
    "trigonal": (0, 2),
    "hexagonal": (0, 2),
    "cubic": (0,),
}


@dataclass(frozen=True)
class ExcitationWidth:
    """Half-width σ(r) = sqrt(width_0² + (mosaic·|r|)²) of the distance from the Ewald sphere, 1/Å."""

    width_0: float  # 1/Å: from the finite domain size (≈ 1/D) and the beam
    mosaic: float  # radians: angular spread of the mosaic blocks

    def sigma(self, r_length: np.ndarray) -> np.ndarray:
        return np.sqrt(self.width_0**2 + (self.mosaic * np.asarray(r_length)) ** 2)

    @property
    def domain_size(self) -> float:
        """Mosaic-block size (Å) that would alone give width_0."""
        return float(1.0 / self.width_0) if self.width_0 > 0 else float("inf")


@dataclass(frozen=True)
class RefinementResult:
    A: np.ndarray
    cell: tuple[float, float, float, float, float, float]
    used: np.ndarray  # bool (n,): spots kept after outlier rejection
    rmsd_mm: float
    rmsd_delta_psi_degrees: float
    width: ExcitationWidth


def ewald_projection(r: np.ndarray, s0: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """r rotated about s0 × r onto the Ewald sphere, and the signed angle Δψ of that rotation (radians)."""
    wavenumber = float(np.linalg.norm(s0))
    beam = s0 / wavenumber
    length = np.linalg.norm(r, axis=-1)
    along = r @ beam
    perpendicular = r - along[..., None] * beam
    perp_unit = perpendicular / np.maximum(np.linalg.norm(perpendicular, axis=-1, keepdims=True), 1e-12)
    # On the sphere |s0 + r'| = |s0|: cos(angle(s0, r')) = -|r| / (2|s0|).
    cos_target = np.clip(-length / (2 * wavenumber), -1.0, 1.0)
    sin_target = np.sqrt(1.0 - cos_target**2)
    projected = length[..., None] * (cos_target[..., None] * beam + sin_target[..., None] * perp_unit)
    delta_psi = np.arccos(cos_target) - np.arctan2(np.linalg.norm(perpendicular, axis=-1), along)
    return projected, delta_psi


def excitation_error(r: np.ndarray, s0: np.ndarray) -> np.ndarray:
    """Signed distance of reciprocal-lattice points from the Ewald sphere, 1/Å (positive outside)."""
    return np.linalg.norm(r + s0, axis=-1) - np.linalg.norm(s0)


def lattice_system(symbol: str) -> str:
    return str(space_group(symbol).crystal_system_str())


def _cell_from_free(base: tuple[float, ...], free: tuple[int, ...], values: np.ndarray, system: str) -> list[float]:
    cell = list(base)
    for index, value in zip(free, values, strict=True):
        cell[index] = float(value)
    if system in ("tetragonal", "trigonal", "hexagonal"):
        cell[1] = cell[0]
    elif system == "cubic":
        cell[1] = cell[2] = cell[0]
    return cell


def refine(
    A: np.ndarray,
    miller: np.ndarray,
    lab: np.ndarray,
    s0: np.ndarray,
    symbol: str,
    parameters: RefinementParameters,
) -> RefinementResult:
    """Refine orientation (and cell) to indexed spots: Miller indices (n, 3) and observed lab positions (n, 3, mm)."""
    miller = np.asarray(miller, dtype=float)
    lab = np.asarray(lab, dtype=float)
    distance = np.linalg.norm(lab, axis=1)
    observed_direction = lab / distance[:, None]
    start_cell = cell_from_a_matrix(A)
    system = lattice_system(symbol)
    free = _FREE_CELL.get(system, _FREE_CELL["triclinic"]) if parameters.refine_cell else ()
    U0 = A @ np.linalg.inv(b_matrix(start_cell))
    psi_sigma = np.radians(parameters.delta_psi_sigma_degrees)
    wavelength = 1.0 / float(np.linalg.norm(s0))
    start = np.array([start_cell[i] for i in free], dtype=float)

    def model_matrix(x: np.ndarray) -> np.ndarray:
        rotation = axis_angle_matrix(x[:3], float(np.linalg.norm(x[:3]))) if np.any(x[:3]) else np.eye(3)
        cell = _cell_from_free(start_cell, free, x[3:], system) if free else list(start_cell)
        return rotation @ U0 @ b_matrix(cell)

    width = ExcitationWidth(width_0=5e-4, mosaic=psi_sigma)

    def residuals(x: np.ndarray, chosen: np.ndarray) -> np.ndarray:
        r = miller[chosen] @ model_matrix(x).T
        projected, delta_psi = ewald_projection(r, s0)
        predicted = (projected + s0) * wavelength
        observed = observed_direction[chosen]
        offset = predicted - np.sum(predicted * observed, axis=1, keepdims=True) * observed
        position = offset * distance[chosen, None] / parameters.position_sigma_mm
        # Δψ·|r| is the spot's distance from the sphere along it; its spread is the crystal's width σ(|r|).
        length = np.linalg.norm(r, axis=1)
        return np.concatenate([position.ravel(), delta_psi * length / width.sigma(length)])

    used = np.ones(len(miller), dtype=bool)
    x = np.concatenate([np.zeros(3), start])
    scale = np.concatenate([np.full(3, 1e-3), np.maximum(np.abs(start) * 1e-3, 1e-3)])
    for _ in range(parameters.max_cycles):
        if used.sum() < 4:
            break
        fit = least_squares(residuals, x, args=(used,), x_scale=scale, method="lm", max_nfev=200)
        x = fit.x
        width = estimate_width(miller[used] @ model_matrix(x).T, s0)
        all_res = residuals(x, np.ones(len(miller), dtype=bool))
        n = len(miller)
        per_spot = np.sqrt(np.sum(all_res[: 3 * n].reshape(n, 3) ** 2, axis=1) + all_res[3 * n :] ** 2)
        spread = 1.4826 * float(np.median(per_spot[used])) + 1e-9
        keep = per_spot <= parameters.outlier_sigmas * max(spread, 1.0)
        if np.array_equal(keep, used):
            break
        used = keep
    A_refined = model_matrix(x)
    r = miller @ A_refined.T
    projected, delta_psi = ewald_projection(r[used], s0)
    predicted = (projected + s0) * wavelength
    observed = observed_direction[used]
    offset = predicted - np.sum(predicted * observed, axis=1, keepdims=True) * observed
    rmsd_mm = float(np.sqrt(np.mean(np.sum((offset * distance[used, None]) ** 2, axis=1)))) if used.any() else np.inf
    rmsd_psi = float(np.degrees(np.sqrt(np.mean(delta_psi**2)))) if used.any() else np.inf
    width = estimate_width(r[used], s0)
    return RefinementResult(
        A=A_refined,
        cell=cell_from_a_matrix(A_refined),
        used=used,
        rmsd_mm=rmsd_mm,
        rmsd_delta_psi_degrees=rmsd_psi,
        width=width,
    )


def estimate_width(r: np.ndarray, s0: np.ndarray) -> ExcitationWidth:
    """Fit ε² ≈ width_0² + (mosaic·|r|)² to the indexed spots' distances ε from the Ewald sphere.

    Observed spots are those in diffraction, so their RMS ε measures the reflecting range of this crystal.
    """
    epsilon = excitation_error(r, s0)
    length = np.linalg.norm(r, axis=1)
    floor = 2e-4  # 1/Å: never narrower than a 5000 Å domain; protects prediction on few spots
    if len(epsilon) < 8:
        rms = float(np.sqrt(np.mean(epsilon**2))) if len(epsilon) else floor
        return ExcitationWidth(width_0=max(rms, floor), mosaic=0.0)
    design = np.column_stack([np.ones_like(length), length**2])
    coefficients, *_ = np.linalg.lstsq(design, epsilon**2, rcond=None)
    width_sq, mosaic_sq = float(coefficients[0]), float(coefficients[1])
    if width_sq <= 0 or mosaic_sq < 0:
        # Degenerate fit: one term explains everything; fall back to a constant width.
        return ExcitationWidth(width_0=max(float(np.sqrt(np.mean(epsilon**2))), floor), mosaic=0.0)
    return ExcitationWidth(width_0=max(float(np.sqrt(width_sq)), floor), mosaic=float(np.sqrt(mosaic_sq)))
