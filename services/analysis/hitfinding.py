"""Hit finding: a frame is a hit when it has enough spots; its resolution limit is estimated from the spots."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from libs.contracts.parameters import HitfindingParameters


@dataclass(frozen=True)
class HitDecision:
    hit: bool
    spot_count: int
    resolution_estimate: float | None  # Å, None without spots


def resolution_from_spots(d_spacing: np.ndarray, quantile: float) -> float | None:
    """The d-spacing (Å) below which only a fraction 1 - quantile of the spots lie (quantile of 1/d)."""
    d = np.asarray(d_spacing, dtype=float)
    d = d[np.isfinite(d) & (d > 0)]
    if d.size == 0:
        return None
    return float(1.0 / np.quantile(1.0 / d, quantile))


def classify(d_spacing: np.ndarray, parameters: HitfindingParameters) -> HitDecision:
    """Hit or blank from the spots' resolutions (one entry per spot)."""
    count = int(np.size(d_spacing))
    return HitDecision(
        hit=count >= parameters.min_spots,
        spot_count=count,
        resolution_estimate=resolution_from_spots(d_spacing, parameters.resolution_quantile),
    )
