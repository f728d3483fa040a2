"""Rejection of frames that correlate poorly with the merge and of outlier observations."""

from __future__ import annotations

import numpy as np


def grouped_correlation(
    group: np.ndarray, x: np.ndarray, y: np.ndarray, n_groups: int, weight: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(Weighted) Pearson correlation of x and y within each group (NaN for fewer than 3 pairs), and pair counts."""
    valid = np.isfinite(x) & np.isfinite(y)
    g, x, y = group[valid], x[valid].astype(float), y[valid].astype(float)
    w = np.ones(g.size) if weight is None else weight[valid].astype(float)
    n = np.bincount(g, minlength=n_groups)[:n_groups].astype(float)

    def total(values: np.ndarray) -> np.ndarray:
        return np.bincount(g, weights=values, minlength=n_groups)[:n_groups]

    sw, sx, sy = total(w), total(w * x), total(w * y)
    with np.errstate(divide="ignore", invalid="ignore"):
        sxx = total(w * x * x) - sx * sx / sw
        syy = total(w * y * y) - sy * sy / sw
        sxy = total(w * x * y) - sx * sy / sw
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
    max_passes: int = 5,
) -> np.ndarray:
    """True for observations more than ``z_max`` combined sigmas from the weighted mean of the others.

    The leave-one-out mean comes from the per-reflection sums minus the observation's own share, so each pass is
    a few bincounts. Passes repeat without what earlier passes rejected, because two wild observations of one
    reflection shield each other; each pass removes only the worst observation of a reflection.
    """
    sigma = sigma.astype(float)
    weight = 1.0 / np.maximum(sigma, 1e-30) ** 2
    rejected = np.zeros(asu_index.size, dtype=bool)
    for _ in range(max_passes):
        kept_weight = np.where(rejected, 0.0, weight)
        sum_w = np.bincount(asu_index, weights=kept_weight, minlength=n_reflections)
        sum_wi = np.bincount(asu_index, weights=kept_weight * intensity, minlength=n_reflections)
        count = np.bincount(asu_index, weights=(~rejected).astype(float), minlength=n_reflections)
        others_w = sum_w[asu_index] - kept_weight
        with np.errstate(divide="ignore", invalid="ignore"):
            others_mean = (sum_wi[asu_index] - kept_weight * intensity) / others_w
            z = np.abs(intensity - others_mean) / np.sqrt(sigma**2 + 1.0 / others_w)
        candidate = ~rejected & (count[asu_index] >= min_multiplicity) & (others_w > 0) & (z > z_max)
        if not candidate.any():
            break
        # Only the worst candidate of each reflection goes in this pass.
        worst = np.full(n_reflections, -np.inf)
        np.maximum.at(worst, asu_index[candidate], z[candidate])
        rejected |= candidate & (z >= worst[asu_index])
    return rejected
