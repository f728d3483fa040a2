"""Indexing-ambiguity resolution (Brehm & Diederichs 2014; the idea of CrystFEL's ambigator).

When the lattice has more symmetry than the point group (P 4₃, P 6₁, P 3₁ 2 1, ...), a still can be indexed in any
of several settings that are not symmetry-equivalent; each frame's setting ("mode") is one coset of the point group
in the lattice group. The modes are chosen so that frames agree: each frame takes the mode in which its intensities
correlate best with the merge of the others.

Bootstrap: with no trustworthy reference yet, frames are visited one at a time and each is compared with the merge
of all the others in their current modes (which is what summing the pairwise correlations of the original method
amounts to), sweeping until no frame changes. Afterwards each frame is simply assigned against the current merge.
Intensities are divided by the mean intensity at their resolution first, so that the common fall-off with
resolution, which every mode shares, does not dilute the difference between modes.
"""

from __future__ import annotations

from collections.abc import Sequence

import gemmi
import numpy as np

from libs.science.crystal import lattice_operators, reciprocal_space_operators
from services.merger.rejection import grouped_correlation


def reindexing_modes(cell: Sequence[float], group: gemmi.SpaceGroup, tolerance_degrees: float = 1.0) -> np.ndarray:
    """Integer matrices (k, 3, 3), h' = R·h, one per coset of the point group in the lattice group; identity first."""
    point_group = reciprocal_space_operators(group)
    identity = np.eye(3, dtype=int)
    modes = [identity]
    seen = {tuple(sorted(tuple((identity @ p).flatten()) for p in point_group))}
    for operator in lattice_operators(cell, tolerance_degrees):
        coset = tuple(sorted(tuple((operator @ p).flatten()) for p in point_group))
        if coset not in seen:
            seen.add(coset)
            modes.append(np.asarray(operator, dtype=int))
    return np.array(modes, dtype=int)


def resolution_normalised(values: np.ndarray, inv_d2: np.ndarray, n_bins: int = 12) -> np.ndarray:
    """Values divided by their root mean square in resolution bins (taken over the values themselves).

    The RMS, not the mean: beyond the diffraction limit the mean of noisy intensities is near zero or negative,
    and dividing by it would blow up or flip the sign of exactly the values that carry no information.
    """
    if values.size == 0:
        return values.astype(float)
    # Bins of equal width in 1/d³ hold similar numbers of reflections, without the cost of quantiles.
    cube = inv_d2**1.5
    low, high = float(cube.min()), float(cube.max())
    bins = np.minimum(((cube - low) / max(high - low, 1e-12) * n_bins).astype(np.int64), n_bins - 1)
    count = np.bincount(bins).astype(float)
    values = np.asarray(values, dtype=float)
    rms = np.sqrt(np.bincount(bins, weights=values * values) / np.maximum(count, 1))
    rms = np.where(rms > 0, rms, 1.0)
    return np.asarray(values / rms[bins], dtype=float)


def mode_correlations(
    frame: np.ndarray, n_frames: int, values: np.ndarray, references: np.ndarray, weight: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """CC (n_frames, k) of each frame's values with ``references`` (per observation and mode, NaN = unknown).

    ``weight`` is the squared partiality: a full intensity estimated from a sliver of a reflection is noisy.
    """
    k = references.shape[1]
    cc = np.full((n_frames, k), np.nan)
    pairs = np.zeros((n_frames, k), dtype=int)
    for mode in range(k):
        cc[:, mode], pairs[:, mode] = grouped_correlation(frame, values, references[:, mode], n_frames, weight)
    return cc, pairs


def references_by_mode(
    values: np.ndarray, asu_by_mode: np.ndarray, current: np.ndarray, n_reflections: int
) -> np.ndarray:
    """Mean of the other observations of each observation's reflection in every mode (leave-one-out).

    An observation contributes to the merge only in its frame's current mode, so only there is its own value
    taken out; a frame compared with a merge that contains it would always prefer the mode it already has.
    """
    n, k = asu_by_mode.shape
    rows = np.arange(n)
    own = asu_by_mode[rows, current]
    total = np.bincount(own, weights=values, minlength=n_reflections)
    count = np.bincount(own, minlength=n_reflections).astype(float)
    references = np.empty((n, k))
    for mode in range(k):
        asu = asu_by_mode[:, mode]
        is_own = current == mode
        others_total = total[asu] - np.where(is_own, values, 0.0)
        others_count = count[asu] - is_own
        with np.errstate(divide="ignore", invalid="ignore"):
            references[:, mode] = np.where(others_count > 0, others_total / others_count, np.nan)
    return references


def choose_modes(cc: np.ndarray, current: np.ndarray, margin: float) -> tuple[np.ndarray, np.ndarray]:
    """Best mode of each frame (the current one where no mode can be judged) and whether the choice is clear."""
    filled = np.where(np.isfinite(cc), cc, -np.inf)
    best = np.argmax(filled, axis=1)
    ordered = np.sort(filled, axis=1)
    clear = np.isfinite(ordered[:, -1]) & (ordered[:, -1] - ordered[:, -2] >= margin)
    judged = np.isfinite(ordered[:, -1])
    return np.where(judged, best, current), clear


def resolve_sequentially(
    starts: np.ndarray,
    stops: np.ndarray,
    values: np.ndarray,
    asu_by_mode: np.ndarray,
    n_reflections: int,
    initial_modes: np.ndarray,
    rng: np.random.Generator,
    weight: np.ndarray,
    max_sweeps: int = 30,
) -> np.ndarray:
    """Assign each frame (observations starts[i]:stops[i]) the mode agreeing best with the merge of the others."""
    modes = initial_modes.astype(int).copy()
    total = np.zeros(n_reflections)
    count = np.zeros(n_reflections)
    for f in range(starts.size):
        asu = asu_by_mode[starts[f] : stops[f], modes[f]]
        np.add.at(total, asu, values[starts[f] : stops[f]])
        np.add.at(count, asu, 1.0)
    k = asu_by_mode.shape[1]
    for _ in range(max_sweeps):
        changed = 0
        for f in rng.permutation(starts.size):
            part = slice(starts[f], stops[f])
            x = values[part]
            own = asu_by_mode[part, modes[f]]
            np.subtract.at(total, own, x)
            np.subtract.at(count, own, 1.0)
            best_mode, best_cc = modes[f], -np.inf
            for mode in range(k):
                asu = asu_by_mode[part, mode]
                n = count[asu]
                seen = n > 0
                if seen.sum() < 3:
                    continue
                y = total[asu[seen]] / n[seen]
                cc = _weighted_correlation(x[seen], y, weight[part][seen])
                if not np.isfinite(cc):
                    continue
                if cc > best_cc + 1e-12:
                    best_mode, best_cc = mode, cc
            if best_mode != modes[f]:
                changed += 1
                modes[f] = best_mode
            chosen = asu_by_mode[part, modes[f]]
            np.add.at(total, chosen, x)
            np.add.at(count, chosen, 1.0)
        if changed == 0:
            break
    return modes


def _weighted_correlation(x: np.ndarray, y: np.ndarray, w: np.ndarray) -> float:
    sw = w.sum()
    if sw <= 0:
        return float("nan")
    mx, my = (w * x).sum() / sw, (w * y).sum() / sw
    sxx, syy = (w * (x - mx) ** 2).sum(), (w * (y - my) ** 2).sum()
    if sxx <= 0 or syy <= 0:
        return float("nan")
    return float((w * (x - mx) * (y - my)).sum() / np.sqrt(sxx * syy))
