"""Crystal models and symmetry: cells, B and A = UB matrices, orientations, space-group operators (gemmi).

Conventions (DIALS): a reciprocal-lattice point is r = A·h with A = U·B in the lab frame (1/Å); B is the transpose
of the fractionalisation matrix, so its columns are a*, b*, c* in a frame with a along x.
"""

from __future__ import annotations

from collections.abc import Sequence

import gemmi
import numpy as np


class SymmetryError(ValueError):
    """An unknown space group or a cell that does not fit it."""


def unit_cell(parameters: Sequence[float]) -> gemmi.UnitCell:
    """gemmi cell from (a, b, c, alpha, beta, gamma); raises ValueError on impossible values."""
    if len(parameters) != 6:
        raise ValueError(f"a cell has six parameters, got {len(parameters)}")
    a, b, c, alpha, beta, gamma = (float(v) for v in parameters)
    if min(a, b, c) <= 0 or not all(0 < x < 180 for x in (alpha, beta, gamma)):
        raise ValueError(f"impossible cell {tuple(parameters)}")
    cell = gemmi.UnitCell(a, b, c, alpha, beta, gamma)
    if not cell.volume > 0 or not np.isfinite(cell.volume):
        raise ValueError(f"cell {tuple(parameters)} has no volume")
    return cell


def space_group(symbol: str) -> gemmi.SpaceGroup:
    """gemmi space group from a Hermann–Mauguin symbol or number; SymmetryError names an unknown one."""
    try:
        group = gemmi.SpaceGroup(symbol)
    except (ValueError, RuntimeError) as error:
        raise SymmetryError(f"unknown space group {symbol!r}") from error
    return group


def check_cell_fits_space_group(parameters: Sequence[float], group: gemmi.SpaceGroup) -> None:
    """Raise SymmetryError when the cell's metric breaks the space group's symmetry."""
    cell = unit_cell(parameters)
    if not cell.is_compatible_with_spacegroup(group, 1e-3):
        raise SymmetryError(f"cell {tuple(parameters)} is not compatible with space group {group.hm}")


def b_matrix(parameters: Sequence[float]) -> np.ndarray:
    """B (1/Å): columns a*, b*, c* in the Cartesian frame with a along x (PDB orthogonalisation)."""
    cell = unit_cell(parameters)
    return np.array(cell.frac.mat.tolist()).T


def real_space_basis(A: np.ndarray) -> np.ndarray:
    """Rows a, b, c (Å) of the direct lattice for a reciprocal basis A (columns a*, b*, c*)."""
    return np.linalg.inv(np.asarray(A, dtype=float))


def cell_from_a_matrix(A: np.ndarray) -> tuple[float, float, float, float, float, float]:
    """Cell parameters (Å, degrees) of the lattice whose reciprocal basis is the columns of A."""
    basis = real_space_basis(A)
    lengths = np.linalg.norm(basis, axis=1)

    def angle(i: int, j: int) -> float:
        cosine = float(basis[i] @ basis[j] / (lengths[i] * lengths[j]))
        return float(np.degrees(np.arccos(np.clip(cosine, -1.0, 1.0))))

    return (
        float(lengths[0]),
        float(lengths[1]),
        float(lengths[2]),
        angle(1, 2),
        angle(0, 2),
        angle(0, 1),
    )


def random_rotations(count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` rotation matrices drawn uniformly from SO(3) (normalised Gaussian quaternions)."""
    quaternions = rng.normal(size=(count, 4))
    quaternions /= np.linalg.norm(quaternions, axis=1, keepdims=True)
    return quaternion_to_matrix(quaternions)


def quaternion_to_matrix(quaternions: np.ndarray) -> np.ndarray:
    """Rotation matrices (..., 3, 3) from unit quaternions (..., 4) given as (w, x, y, z)."""
    w, x, y, z = np.moveaxis(np.asarray(quaternions, dtype=float), -1, 0)
    return np.stack(
        [
            np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)], axis=-1),
            np.stack([2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)], axis=-1),
            np.stack([2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)], axis=-1),
        ],
        axis=-2,
    )


def axis_angle_matrix(axis: np.ndarray, angle: float) -> np.ndarray:
    """Rotation by ``angle`` radians about ``axis`` (Rodrigues)."""
    unit = np.asarray(axis, dtype=float) / np.linalg.norm(axis)
    cross = np.array([[0, -unit[2], unit[1]], [unit[2], 0, -unit[0]], [-unit[1], unit[0], 0]])
    return np.eye(3) + np.sin(angle) * cross + (1 - np.cos(angle)) * cross @ cross


def rotation_angle(rotation: np.ndarray) -> float:
    """Angle (radians) of a rotation matrix."""
    return float(np.arccos(np.clip((np.trace(rotation) - 1.0) / 2.0, -1.0, 1.0)))


def nearest_rotation(matrix: np.ndarray) -> np.ndarray:
    """The proper rotation closest to ``matrix`` (polar decomposition by SVD)."""
    u, _, vt = np.linalg.svd(matrix)
    d = np.sign(np.linalg.det(u @ vt))
    return u @ np.diag([1.0, 1.0, d]) @ vt


def reciprocal_space_operators(group: gemmi.SpaceGroup) -> np.ndarray:
    """Integer matrices R (n, 3, 3) of the point group acting on Miller indices: h' = R·h.

    gemmi's operators act on fractional coordinates x' = W·x; Miller indices transform with Wᵀ.
    """
    ops = group.operations()
    rotations = [np.array(op.rot, dtype=int) // gemmi.Op.DEN for op in ops.sym_ops]
    unique = {tuple(r.T.flatten()) for r in rotations}
    return np.array(sorted(unique), dtype=int).reshape(-1, 3, 3)


def lattice_operators(parameters: Sequence[float], tolerance_degrees: float = 1.0) -> np.ndarray:
    """Integer reindexing matrices (h' = R·h) that map the lattice onto itself within a metric tolerance.

    Searches matrices with entries in {-1, 0, 1}; enough for the cells of primitive protein crystals.
    """
    B = b_matrix(parameters)
    metric = B.T @ B
    entries = np.array(np.meshgrid(*([[-1, 0, 1]] * 9), indexing="ij")).reshape(9, -1).T
    candidates = entries.reshape(-1, 3, 3)
    candidates = candidates[np.abs(np.round(np.linalg.det(candidates))) == 1]
    transformed = np.einsum("nji,jk,nkl->nil", candidates, metric, candidates)
    scale = np.sqrt(np.outer(np.diag(metric), np.diag(metric)))
    tolerance = np.radians(tolerance_degrees)
    close = np.all(np.abs(transformed - metric) <= tolerance * scale, axis=(1, 2))
    chosen = candidates[close]
    return chosen[np.linalg.det(chosen) > 0]


def misorientation_degrees(A_found: np.ndarray, A_true: np.ndarray, operators: np.ndarray) -> tuple[float, np.ndarray]:
    """Smallest rotation (degrees) between two orientations over reindexing ``operators``.

    Returns the angle and the operator R that makes A_found·R closest to A_true.
    """
    best_angle, best_operator = np.inf, np.eye(3, dtype=int)
    for operator in operators:
        rotation = nearest_rotation(np.asarray(A_true) @ np.linalg.inv(np.asarray(A_found) @ operator))
        angle = np.degrees(rotation_angle(rotation))
        if angle < best_angle:
            best_angle, best_operator = angle, operator
    return float(best_angle), best_operator
