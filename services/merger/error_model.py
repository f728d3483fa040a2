"""Error model: inflate the sigmas so that they match the scatter of symmetry-equivalent observations.

σ'² = SDFAC² · (σ² + SDB²·<I> + SDADD²·<I>²), with <I> the mean of the reflection (as aimless uses it).
The fit compares, in bins of <I>, the mean squared deviation of observations from their reflection's mean
(corrected by n/(n-1) for the mean's own use of them) with the model; the model is linear in SDFAC², SDFAC²·SDB²
and SDFAC²·SDADD², so a non-negative least squares solves it in one step.
"""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from scipy.optimize import nnls


class ErrorModel(BaseModel):
    """Parameters of σ'² = SDFAC²(σ² + SDB²·I + SDADD²·I²)."""

    model_config = ConfigDict(frozen=True)

    sdfac: float = Field(1.0, gt=0)
    sdb: float = Field(0.0, ge=0)
    sdadd: float = Field(0.0, ge=0)

    def inflate(self, sigma: np.ndarray, mean_intensity: np.ndarray) -> np.ndarray:
        """σ' for observations with sigma ``sigma`` of reflections with mean ``mean_intensity``."""
        positive = np.maximum(mean_intensity, 0.0)
        variance = sigma.astype(float) ** 2 + self.sdb**2 * positive + (self.sdadd * positive) ** 2
        return self.sdfac * np.sqrt(variance)


def fit_error_model(
    asu_index: np.ndarray,
    intensity: np.ndarray,
    sigma: np.ndarray,
    n_reflections: int,
    *,
    min_multiplicity: int = 3,
    n_bins: int = 20,
    clip_deviation: float = 8.0,
    fit_sdb: bool = False,
    min_observations: int = 2000,
    max_sdadd: float = 0.5,
    max_sample: int = 300_000,
) -> ErrorModel:
    """Fit the model to scaled observations (``asu_index`` per observation); identity when data are too few.

    Fewer than ``min_observations`` observations of reflections measured ``min_multiplicity`` times leave the
    model at identity: a young data set's scatter says little. SDB stays 0 unless ``fit_sdb``: with counting
    statistics σ² is itself nearly proportional to I, so SDFAC and SDB trade off and are poorly determined.
    """
    count = np.bincount(asu_index, minlength=n_reflections).astype(float)
    total = np.bincount(asu_index, weights=intensity, minlength=n_reflections)
    with np.errstate(divide="ignore", invalid="ignore"):
        mean = total / count
    n = count[asu_index]
    use = (n >= min_multiplicity) & (sigma > 0)
    if use.sum() < min_observations:
        return ErrorModel()
    chosen = np.flatnonzero(use)
    if chosen.size > max_sample:
        # Evenly spaced observations describe the scatter as well as all of them, for a fraction of the work.
        chosen = chosen[np.linspace(0, chosen.size - 1, max_sample).astype(np.int64)]
    n_chosen = n[chosen]
    deviation2 = (intensity[chosen] - mean[asu_index[chosen]]) ** 2 * n_chosen / (n_chosen - 1)
    mean_i = np.maximum(mean[asu_index[chosen]], 0.0)
    sigma2 = sigma[chosen].astype(float) ** 2
    # A single wild observation must not set the scale of a whole bin.
    ceiling = clip_deviation**2 * (sigma2 + (0.3 * mean_i) ** 2 + np.median(sigma2))
    deviation2 = np.minimum(deviation2, ceiling)
    # Equal-count bins, split finer among the strongest reflections, where the SDADD term lives.
    levels = np.concatenate([np.linspace(0.0, 0.9, n_bins // 2 + 1), 1.0 - 0.1 * 0.5 ** np.arange(1, n_bins // 2)])
    edges = np.unique(np.quantile(mean_i, np.append(np.sort(levels), 1.0)))
    bins = np.clip(np.searchsorted(edges, mean_i, side="right") - 1, 0, max(edges.size - 2, 0))
    n_groups = max(edges.size - 1, 1)
    size = np.bincount(bins, minlength=n_groups).astype(float)
    valid = size >= 10
    observed = np.bincount(bins, weights=deviation2, minlength=n_groups)[valid] / size[valid]
    design = np.stack(
        [
            np.bincount(bins, weights=sigma2, minlength=n_groups)[valid] / size[valid],
            np.bincount(bins, weights=mean_i, minlength=n_groups)[valid] / size[valid],
            np.bincount(bins, weights=mean_i**2, minlength=n_groups)[valid] / size[valid],
        ],
        axis=1,
    )
    if observed.size < 3 or not np.all(observed > 0):
        return ErrorModel()
    # Relative residuals: each bin counts the same whatever its intensity.
    columns = [0, 1, 2] if fit_sdb else [0, 2]
    solution, _ = nnls(design[:, columns] / observed[:, None], np.ones_like(observed))
    a, c, d = (solution[0], solution[1], solution[2]) if fit_sdb else (solution[0], 0.0, solution[1])
    if a <= 0:
        return ErrorModel()
    return ErrorModel(sdfac=float(np.sqrt(a)), sdb=float(np.sqrt(c / a)), sdadd=float(min(np.sqrt(d / a), max_sdadd)))
