"""Indexing stills with a known cell and space group: orientations proposed by pairs of spots, scored on all spots.

The method is vector-pair matching (in the spirit of TakeTwo): a pair of low-resolution spots, whose reciprocal
vectors r_i, r_j are least disturbed by the Ewald-sphere offset of a still, is matched to pairs of lattice vectors
B·h1, B·h2 of the known cell with the same lengths and the same angle between them. Each match fixes a rotation U
(two vectors define a frame). h1 is restricted to one member of each set of symmetry equivalents, because equivalent
choices give symmetry-equivalent orientations. Every proposed U is scored by the number of spots whose fractional
Miller indices A⁻¹·r are all close to integers; the best few are improved by re-indexing and fitting the rotation to
the indexed spots (Kabsch), which brings in higher-resolution spots, and the best is kept. Spurious spots (ice,
noise, a second lattice) only lower the fraction indexed: a pair involving one proposes nothing that scores.

Only the rotation is fitted here (3 parameters), so random spot patterns cannot be bent into a lattice; acceptance
needs enough indexed spots and fraction indexed, and refinement then checks the positional RMSD.
Pure numpy, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from libs.contracts.parameters import IndexingParameters
from libs.science.crystal import b_matrix, reciprocal_space_operators, space_group


@dataclass(frozen=True)
class IndexingSolution:
    """An orientation and the spots it indexes."""

    A: np.ndarray  # (3, 3) U·B, r = A·h, 1/Å
    miller: np.ndarray  # int (n_spots, 3): nearest integer indices of every spot
    indexed: np.ndarray  # bool (n_spots,): within the tolerance
    count: int
    rms_fractional: float  # RMS of the fractional deviation of the indexed spots


@lru_cache(maxsize=16)
def _reference_lattice(cell: tuple[float, ...], symbol: str, r_max: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Lattice vectors B·h with 0 < |B·h| ≤ r_max: (h, B·h, canonical) where canonical marks one per equivalents."""
    B = b_matrix(cell)
    real = np.linalg.inv(B)  # rows a, b, c
    limits = [int(np.ceil(r_max * np.linalg.norm(axis))) + 1 for axis in real]
    grids = np.meshgrid(*[np.arange(-n, n + 1) for n in limits], indexing="ij")
    h = np.stack([g.ravel() for g in grids], axis=1)
    vectors = h @ B.T
    lengths = np.linalg.norm(vectors, axis=1)
    keep = (lengths > 0) & (lengths <= r_max)
    h, vectors = h[keep], vectors[keep]
    operators = reciprocal_space_operators(space_group(symbol))
    # Canonical member of each set of equivalents: the lexicographically largest image under the point group.
    images = np.einsum("oij,nj->noi", operators, h)
    keys = images @ np.array([1_000_000, 1_000, 1]).astype(np.int64)
    canonical = keys.max(axis=1) == h.astype(np.int64) @ np.array([1_000_000, 1_000, 1])
    return h, vectors, canonical


def _frame(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Orthonormal frames (..., 3, 3) whose columns are û, (û×v)^, û×(û×v)^ ."""
    e1 = u / np.linalg.norm(u, axis=-1, keepdims=True)
    e2 = np.cross(e1, v)
    e2 /= np.linalg.norm(e2, axis=-1, keepdims=True)
    e3 = np.cross(e1, e2)
    return np.stack([e1, e2, e3], axis=-1)


def kabsch_rotation(model: np.ndarray, observed: np.ndarray) -> np.ndarray:
    """The rotation U minimising Σ |U·model_i - observed_i|² (rows are vectors)."""
    covariance = observed.T @ model
    u, _, vt = np.linalg.svd(covariance)
    d = np.sign(np.linalg.det(u @ vt))
    return u @ np.diag([1.0, 1.0, d]) @ vt


def index_with(A: np.ndarray, r: np.ndarray, tolerance: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Nearest Miller indices of vectors ``r`` under ``A``, the indexed flags and the fractional deviations."""
    fractional = r @ np.linalg.inv(A).T
    miller = np.rint(fractional)
    deviation = fractional - miller
    indexed = np.all(np.abs(deviation) <= tolerance, axis=1) & np.any(miller != 0, axis=1)
    return miller.astype(int), indexed, deviation


def _scores(rotations: np.ndarray, B: np.ndarray, r: np.ndarray, tolerance: float) -> np.ndarray:
    """Number of vectors ``r`` indexed by each candidate A = U·B."""
    inverse_B = np.linalg.inv(B)
    # h = B⁻¹·Uᵀ·r for every candidate.
    fractional = np.einsum("ij,kjl,nl->kni", inverse_B, np.transpose(rotations, (0, 2, 1)), r)
    deviation = np.abs(fractional - np.rint(fractional))
    return np.count_nonzero(np.all(deviation <= tolerance, axis=2), axis=1)


def _improve(U: np.ndarray, B: np.ndarray, r: np.ndarray, tolerance: float, rounds: int = 4) -> IndexingSolution:
    """Re-index and refit the rotation until the indexed set stops growing."""
    previous = -1
    for _ in range(rounds):
        miller, indexed, deviation = index_with(U @ B, r, tolerance)
        count = int(indexed.sum())
        if count < 3 or count <= previous:
            break
        previous = count
        U = kabsch_rotation(miller[indexed] @ B.T, r[indexed])
    A = U @ B
    miller, indexed, deviation = index_with(A, r, tolerance)
    count = int(indexed.sum())
    rms = float(np.sqrt(np.mean(deviation[indexed] ** 2))) if count else np.inf
    return IndexingSolution(A=A, miller=miller, indexed=indexed, count=count, rms_fractional=rms)


def index_known_cell(
    r: np.ndarray, cell: tuple[float, ...], symbol: str, parameters: IndexingParameters
) -> IndexingSolution | None:
    """Best orientation of the known cell for reciprocal vectors ``r`` (n, 3) of a still, or None.

    ``r`` should be ordered by decreasing reliability (e.g. spot intensity); at most ``max_spots`` are used for
    scoring. None means no orientation met ``min_indexed`` and ``min_indexed_fraction``.
    """
    r = np.asarray(r, dtype=float).reshape(-1, 3)
    if len(r) < max(parameters.min_indexed, 3):
        return None
    r = r[: parameters.max_spots]
    B = b_matrix(cell)
    lengths = np.linalg.norm(r, axis=1)
    seeds = np.argsort(lengths)[: parameters.seed_spots]
    tolerance = parameters.length_tolerance
    # Rounded up to a coarse step so that frames of a run share the cached reference lattice.
    r_max = np.ceil(float(lengths[seeds].max()) * (1 + 2 * tolerance) / 0.02) * 0.02
    _, vectors, canonical = _reference_lattice(tuple(float(x) for x in cell), symbol, float(r_max))
    ref_lengths = np.linalg.norm(vectors, axis=1)
    cos_tolerance = np.radians(parameters.angle_tolerance)

    rotations: list[np.ndarray] = []
    pairs = [(i, j) for a, i in enumerate(seeds) for j in seeds[a + 1 :]]
    # Pairs of widely separated directions define the orientation best; try those first.
    pairs.sort(key=lambda ij: -abs(np.sin(_angle(r[ij[0]], r[ij[1]]))))
    best: IndexingSolution | None = None
    tried = 0
    for i, j in pairs[: parameters.max_seed_pairs]:
        first = np.flatnonzero(canonical & (np.abs(ref_lengths - lengths[i]) <= tolerance * lengths[i]))
        second = np.flatnonzero(np.abs(ref_lengths - lengths[j]) <= tolerance * lengths[j])
        # High-resolution seeds match too many lattice vectors to be informative (and cost quadratically).
        if first.size == 0 or second.size == 0 or first.size * second.size > parameters.max_pair_matches:
            continue
        angle = _angle(r[i], r[j])
        if np.sin(angle) < 0.1:
            continue
        u1 = vectors[first] / ref_lengths[first, None]
        u2 = vectors[second] / ref_lengths[second, None]
        angles = np.arccos(np.clip(u1 @ u2.T, -1.0, 1.0))
        a_idx, b_idx = np.nonzero(np.abs(angles - angle) <= cos_tolerance)
        if a_idx.size == 0:
            continue
        model = _frame(vectors[first[a_idx]], vectors[second[b_idx]])
        observed = _frame(r[i], r[j])
        candidates = observed[None] @ np.transpose(model, (0, 2, 1))
        rotations.append(candidates)
        tried += len(candidates)
        if tried > parameters.max_candidates:
            break
        if sum(len(c) for c in rotations) >= 64:
            found = _best_of(np.concatenate(rotations), B, r, parameters)
            rotations = []
            if found is not None and (best is None or found.count > best.count):
                best = found
            if best is not None and best.count >= max(parameters.min_indexed, 0.7 * len(r)):
                break
    if rotations:
        found = _best_of(np.concatenate(rotations), B, r, parameters)
        if found is not None and (best is None or found.count > best.count):
            best = found
    if best is None:
        return None
    if best.count < parameters.min_indexed or best.count < parameters.min_indexed_fraction * len(r):
        return None
    return best


def _angle(u: np.ndarray, v: np.ndarray) -> float:
    return float(np.arccos(np.clip(u @ v / (np.linalg.norm(u) * np.linalg.norm(v)), -1.0, 1.0)))


def _best_of(
    rotations: np.ndarray, B: np.ndarray, r: np.ndarray, parameters: IndexingParameters
) -> IndexingSolution | None:
    """Score candidates coarsely, then improve the few best and keep the one indexing most spots."""
    # A rotation from a seed pair is only good to about a degree; score with a looser tolerance first.
    coarse = _scores(rotations, B, r, min(0.35, 1.75 * parameters.hkl_tolerance))
    best: IndexingSolution | None = None
    for k in np.argsort(-coarse)[:4]:
        if coarse[k] < 3:
            break
        solution = _improve(rotations[k], B, r, parameters.hkl_tolerance)
        if best is None or (solution.count, -solution.rms_fractional) > (best.count, -best.rms_fractional):
            best = solution
    return best
