"""Rejection of frames that correlate poorly with the merge and of outlier observations."""

from __future__ import annotations

import numpy as np


def grouped_correlation(
    group: np.ndarray, x: np.ndarray, y: np.ndarray, n_groups: int
) -> tuple[np.ndarray, np.ndarray]:
    """Pearson correlation of x and y within each group (NaN for fewer than 3 pairs), and the pair counts."""
    valid = np.isfinite(x) & np.isfinite(y)
    g, x, y = group[valid], x[valid].astype(float), y[valid].astype(float)
    n = np.bincount(g, minlength=n_groups)[:n_groups].astype(float)

    def total(values: np.ndarray) -> np.ndarray:
        return np.bincount(g, weights=values, minlength=n_groups)[:n_groups]

    sx, sy = total(x), total(y)
    with np.errstate(divide="ignore", invalid="ignore"):
        sxx = total(x * x) - sx * sx / n
        syy = total(y * y) - sy * sy / n
        sxy = total(x * y) - sx * sy / n
        cc = sxy / np.sqrt(sxx * syy)
    cc = np.where((n >= 3) & (sxx > 0) & (syy > 0), cc, np.nan)
    return cc, n.astype(int)


def outlier_observations(
    asu_index: np.ndarray,
    intensity: np.ndarray,
    sigma: np.ndarray,
    n_reflections: int,
    *,
    z_max: float = 6.0,
    min_multiplicity: int = 3,
) -> np.ndarray:
    """True for observations more than ``z_max`` combined sigmas from the weighted mean of the others.

    The leave-one-out mean comes from the per-reflection sums minus the observation's own share, so the whole
    test is two bincounts.
    """
    weight = 1.0 / np.maximum(sigma.astype(float), 1e-30) ** 2
    sum_w = np.bincount(asu_index, weights=weight, minlength=n_reflections)
    sum_wi = np.bincount(asu_index, weights=weight * intensity, minlength=n_reflections)
    count = np.bincount(asu_index, minlength=n_reflections)
    others_w = sum_w[asu_index] - weight
    with np.errstate(divide="ignore", invalid="ignore"):
        others_mean = (sum_wi[asu_index] - weight * intensity) / others_w
        z = (intensity - others_mean) / np.sqrt(sigma.astype(float) ** 2 + 1.0 / others_w)
    return (count[asu_index] >= min_multiplicity) & (others_w > 0) & (np.abs(z) > z_max)
