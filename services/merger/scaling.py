"""Per-frame scale factor and relative B against a reference, for every frame at once.

Model, with x = 1/d²: I_obs = G · exp(-B·x/2) · p · I_ref, the usual exp(-2B·(sinθ/λ)²) with sinθ/λ = 1/(2d).
The fit is log-linear, ln(I_obs / (p·I_ref)) = ln G - (B/2)·x, by weighted least squares on confident reflections
only (both intensities well above their sigmas), iterated with the residuals of the previous pass down-weighted;
G is then refined linearly with B fixed, because the logarithm of noisy intensities is biased. All frames are
fitted together with grouped sums (np.bincount), never a Python loop.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class FrameScales:
    """Scale results per frame (index = frame number in the arrays given)."""

    scale: np.ndarray  # G
    b_factor: np.ndarray  # relative B (Å²)
    reflections_used: np.ndarray  # confident reflections in the fit


def grouped_sum(group: np.ndarray, values: np.ndarray, n_groups: int) -> np.ndarray:
    return np.bincount(group, weights=values, minlength=n_groups)[:n_groups]


def scale_correction(inv_d2: np.ndarray, scale: np.ndarray, b_factor: np.ndarray) -> np.ndarray:
    """G·exp(-B·x/2) of each observation (scale and b_factor already gathered per observation)."""
    return scale * np.exp(-0.5 * b_factor * inv_d2)


def fit_frame_scales(
    frame: np.ndarray,
    n_frames: int,
    intensity: np.ndarray,
    sigma: np.ndarray,
    partiality: np.ndarray,
    inv_d2: np.ndarray,
    reference: np.ndarray,
    reference_sigma: np.ndarray,
    *,
    min_i_over_sigma: float = 2.0,
    fit_b: bool = True,
    min_reflections_for_b: int = 20,
    iterations: int = 3,
    b_limit: float = 60.0,
) -> FrameScales:
    """Fit G and B of each frame against ``reference`` (the merged intensity of each observation's reflection).

    ``reference`` and ``reference_sigma`` are gathered per observation (NaN where the reflection is not yet
    merged). Frames with fewer than two confident reflections get scale NaN: the caller rejects them.
    """
    with np.errstate(invalid="ignore"):
        confident = (
            (reference > 0)
            & (partiality > 0)
            & (reference > min_i_over_sigma * reference_sigma)
            & (intensity > min_i_over_sigma * sigma)
            & (sigma > 0)
        )
    # Only the confident subset is promoted to float64.
    index = np.flatnonzero(confident)
    f, x = frame[index], inv_d2[index].astype(float)
    intensity_c, sigma_c = intensity[index].astype(float), sigma[index].astype(float)
    reference_c = reference[index].astype(float)
    expected_c = partiality[index].astype(float) * reference_c
    y = np.log(intensity_c / expected_c)
    relative_variance = (sigma_c / intensity_c) ** 2 + (reference_sigma[index].astype(float) / reference_c) ** 2
    base_weight = 1.0 / np.maximum(relative_variance, 1e-4)
    weight = base_weight.copy()
    used = np.bincount(f, minlength=n_frames)[:n_frames].astype(int)
    use_b = (used >= min_reflections_for_b) & fit_b
    log_scale = np.zeros(n_frames)
    b_factor = np.zeros(n_frames)
    for _ in range(iterations):
        sw = grouped_sum(f, weight, n_frames)
        swx = grouped_sum(f, weight * x, n_frames)
        swxx = grouped_sum(f, weight * x * x, n_frames)
        swy = grouped_sum(f, weight * y, n_frames)
        swxy = grouped_sum(f, weight * x * y, n_frames)
        with np.errstate(divide="ignore", invalid="ignore"):
            determinant = sw * swxx - swx * swx
            slope = np.where(use_b & (determinant > 1e-12 * sw * sw), (sw * swxy - swx * swy) / determinant, 0.0)
            slope = np.clip(slope, -b_limit / 2, b_limit / 2)
            intercept = (swy - slope * swx) / sw
        log_scale, b_factor = intercept, -2.0 * slope
        residual = y - (log_scale[f] + slope[f] * x)
        # Down-weight reflections that disagree by more than three of their own standard deviations (Cauchy-like).
        z2 = residual**2 * base_weight
        weight = base_weight / (1.0 + z2 / 9.0)
    scale = np.exp(log_scale)
    # Linear refinement of G with B fixed: G = Σ w I·m / Σ w m² with m = p·I_ref·exp(-B·x/2), w = 1/σ².
    model = expected_c * np.exp(-0.5 * b_factor[f] * x)
    w_lin = 1.0 / sigma_c**2
    numerator = grouped_sum(f, w_lin * intensity_c * model, n_frames)
    denominator = grouped_sum(f, w_lin * model * model, n_frames)
    with np.errstate(divide="ignore", invalid="ignore"):
        linear = numerator / denominator
    good = np.isfinite(linear) & (linear > 0)
    scale = np.where(good, linear, scale)
    scale = np.where(used >= 2, scale, np.nan)
    return FrameScales(scale=scale, b_factor=np.where(used >= 2, b_factor, 0.0), reflections_used=used)
