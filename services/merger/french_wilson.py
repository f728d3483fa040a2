"""French–Wilson (1978): posterior mean amplitude F and its sigma from a merged intensity, Wilson prior.

Priors on the true amplitude F ≥ 0 given the mean intensity Σ expected at the reflection's resolution (times its
epsilon): acentric p(F) = 2F/Σ·exp(-F²/Σ), centric p(F) ∝ exp(-F²/(2Σ)). The likelihood of the measured intensity
is Gaussian, exp(-(I - F²)²/(2σ²)). The posterior moments are integrated numerically on a grid of F per reflection
that covers where the likelihood (or, for weak reflections, the prior) has its mass.
"""

from __future__ import annotations

import numpy as np

_GRID = 256


def mean_intensity_by_resolution(inv_d2: np.ndarray, intensity: np.ndarray, epsilon: np.ndarray) -> np.ndarray:
    """Σ for each reflection: <I/ε> in resolution bins of about 200 reflections, interpolated, times ε."""
    n = inv_d2.size
    order = np.argsort(inv_d2)
    n_bins = max(1, min(40, n // 200))
    centres, means = [], []
    for chunk in np.array_split(order, n_bins):
        centres.append(float(np.mean(inv_d2[chunk])))
        means.append(float(np.mean(intensity[chunk] / epsilon[chunk])))
    means_array = np.asarray(means)
    positive = means_array[means_array > 0]
    floor = 1e-3 * float(positive.max()) if positive.size else 1.0
    means_array = np.maximum(means_array, floor)
    return np.interp(inv_d2, centres, means_array) * epsilon


def french_wilson(
    intensity: np.ndarray, sigma: np.ndarray, expected: np.ndarray, centric: np.ndarray, chunk: int = 2048
) -> tuple[np.ndarray, np.ndarray]:
    """(F, SIGF) from I, SIGI, the prior mean intensity Σ and the centric flags, vectorised over reflections."""
    n = np.asarray(intensity).size
    f, sig_f = np.empty(n), np.empty(n)
    for start in range(0, n, chunk):
        part = slice(start, start + chunk)
        f[part], sig_f[part] = _posterior(
            np.asarray(intensity)[part], np.asarray(sigma)[part], np.asarray(expected)[part], np.asarray(centric)[part]
        )
    return f, sig_f


def _posterior(
    intensity: np.ndarray, sigma: np.ndarray, expected: np.ndarray, centric: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    i = np.asarray(intensity, dtype=float)[:, None]
    s = np.maximum(np.asarray(sigma, dtype=float), 1e-12)[:, None]
    big_sigma = np.maximum(np.asarray(expected, dtype=float), 1e-12)[:, None]
    centric_flag = np.asarray(centric, dtype=bool)[:, None]
    # The grid in J = F² spans the likelihood's ±7σ (or the prior's bulk when the measurement is weak).
    j_high = np.maximum(i + 7 * s, np.minimum(7 * s * s / np.maximum(-i, s), 20 * big_sigma))
    j_high = np.maximum(j_high, 1e-6 * big_sigma)
    j_low = np.maximum(i - 7 * s, 0.0)
    fraction = np.linspace(0.0, 1.0, _GRID)[None, :]
    f_grid = np.sqrt(j_low) + (np.sqrt(j_high) - np.sqrt(j_low)) * fraction
    j = f_grid**2
    log_likelihood = -((i - j) ** 2) / (2 * s * s)
    with np.errstate(divide="ignore"):
        log_prior = np.where(centric_flag, -j / (2 * big_sigma), np.log(f_grid) - j / big_sigma)
    log_posterior = log_likelihood + log_prior
    log_posterior -= log_posterior.max(axis=1, keepdims=True)
    density = np.exp(log_posterior)
    norm = np.trapezoid(density, f_grid, axis=1)
    mean_f = np.trapezoid(density * f_grid, f_grid, axis=1) / norm
    mean_f2 = np.trapezoid(density * j, f_grid, axis=1) / norm
    sig_f = np.sqrt(np.maximum(mean_f2 - mean_f**2, 0.0))
    return mean_f, sig_f
