"""Parameters of the per-frame analysis: one validated pydantic model with one nested model per stage.

A trial (a named parameter set) travels in messages as a dictionary of dotted overrides of these defaults
(``JobSpec.parameters``, ``ReprocessRequest.parameters``); :func:`with_overrides` applies and validates them, and
names any key it does not know.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ParameterError(ValueError):
    """An unknown parameter name or an invalid value; the text names the parameter at fault."""


class _Stage(BaseModel):
    # Every number bounded and finite: an override from the bus (sfx reprocess --set) cannot ask for unbounded work.
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True, allow_inf_nan=False)


class SpotfindingParameters(_Stage):
    """The DIALS dispersion threshold followed by connected components."""

    kernel_half_size: int = Field(3, ge=1, le=10, description="k of the (2k+1)² local window (3: 7 × 7 pixels)")
    sigma_background: float = Field(
        6.0,
        gt=0,
        le=100,
        description="A pixel's window must have variance/mean > gain·(1 + sigma_background·sqrt(2/(m-1)))",
    )
    sigma_strong: float = Field(
        3.0, gt=0, le=100, description="A strong pixel has I - mean > sigma_strong·sqrt(gain·mean)"
    )
    global_threshold: float = Field(
        0.0, ge=0, le=1e9, description="A strong pixel also has I > global_threshold (counts)"
    )
    gain: float = Field(
        1.0, gt=0, le=1e6, description="Detector gain (counts per photon); a per-pixel map may be passed"
    )
    min_local_pixels: int = Field(
        2, ge=2, le=441, description="Windows with fewer valid pixels than this never yield a strong pixel"
    )
    min_spot_size: int = Field(
        2, ge=1, le=10_000, description="Connected strong regions with fewer pixels are discarded"
    )
    max_spot_size: int = Field(
        500, ge=1, le=100_000, description="Connected strong regions with more pixels are discarded"
    )
    overload: float = Field(
        1.0e9, gt=0, le=1e12, description="Counts at or above this are saturated: treated as masked for thresholding"
    )
    d_min: float | None = Field(None, gt=0, le=1000, description="Ignore spots at higher resolution than this (Å)")
    d_max: float | None = Field(None, gt=0, le=10_000, description="Ignore spots at lower resolution than this (Å)")

    @model_validator(mode="after")
    def _check(self) -> SpotfindingParameters:
        if self.min_spot_size > self.max_spot_size:
            raise ValueError(f"min_spot_size {self.min_spot_size} exceeds max_spot_size {self.max_spot_size}")
        if self.d_min is not None and self.d_max is not None and self.d_min >= self.d_max:
            raise ValueError(f"d_min {self.d_min} must be smaller than d_max {self.d_max}")
        return self


class HitfindingParameters(_Stage):
    """A frame is a hit when it has enough spots."""

    min_spots: int = Field(15, ge=1, le=10_000, description="Spots a frame needs to count as a hit")
    resolution_quantile: float = Field(
        0.95, gt=0, le=1, description="Resolution estimate: this quantile of the spots' 1/d, reported as d (Å)"
    )


class IndexingParameters(_Stage):
    """Stills indexing with a known cell: orientations from pairs of low-resolution spots, scored on all spots."""

    seed_spots: int = Field(10, ge=2, le=40, description="Lowest-resolution spots whose pairs propose orientations")
    max_seed_pairs: int = Field(30, ge=1, le=1000, description="Spot pairs tried before giving up")
    length_tolerance: float = Field(
        0.012, gt=0, lt=0.2, description="Relative tolerance matching a spot's |r| to a lattice vector's length"
    )
    angle_tolerance: float = Field(1.5, gt=0, lt=20, description="Degrees: tolerance matching an inter-spot angle")
    max_pair_matches: int = Field(
        20_000, ge=1, le=1_000_000, description="Skip a seed pair whose spots match more lattice-vector pairs than this"
    )
    max_candidates: int = Field(3_000, ge=1, le=100_000, description="Orientations scored before giving up on a frame")
    hkl_tolerance: float = Field(
        0.2, gt=0, lt=0.5, description="A spot is indexed when every fractional Miller index is this close to integer"
    )
    min_indexed: int = Field(12, ge=3, le=10_000, description="Spots an accepted orientation must index")
    min_indexed_fraction: float = Field(0.4, gt=0, le=1, description="Fraction of the spots it must index")
    max_rmsd_pixels: float = Field(1.5, gt=0, le=100, description="Positional RMSD above which a solution is rejected")
    max_spots: int = Field(
        300, ge=10, le=10_000, description="Only the strongest spots are used (keeps the cost bounded)"
    )


class RefinementParameters(_Stage):
    """Least squares on spot positions and Δψ."""

    refine_cell: bool = Field(True, description="Refine the cell, constrained to the space group's lattice system")
    delta_psi_sigma_degrees: float = Field(
        0.1,
        gt=0,
        le=10,
        description="Initial mosaic spread (degrees) weighting Δψ, until the frame's own width is estimated",
    )
    position_sigma_mm: float = Field(
        0.05, gt=0, le=10, description="Weight of the position residual: expected error (mm)"
    )
    outlier_sigmas: float = Field(4.0, gt=1, le=100, description="Reject spots whose normalised residual exceeds this")
    max_cycles: int = Field(3, ge=1, le=10, description="Rounds of refinement and outlier rejection")


class IntegrationParameters(_Stage):
    """Prediction near the Ewald sphere and summation integration with a background plane."""

    d_min: float | None = Field(None, gt=0, le=1000, description="Predict no reflection beyond this resolution (Å)")
    excitation_width_factor: float = Field(
        2.5, gt=0, le=20, description="Predict reflections within this many estimated widths of the Ewald sphere"
    )
    foreground_radius: float = Field(3.0, gt=0.5, le=50, description="Pixels within this radius of the prediction (px)")
    background_radius: float = Field(7.0, gt=1, le=100, description="Outer radius of the background ring (px)")
    min_background_pixels: int = Field(
        20, ge=4, le=10_000, description="Fewer valid background pixels: reflection flagged"
    )
    adaptive_radius: bool = Field(
        True,
        description="Widen both radii for broad spots: foreground radius at least 3 σ of the spots' median "
        "major-axis width measured on the frame (at most 10 px), the ring kept as wide as configured",
    )
    overload: float = Field(1.0e9, gt=0, le=1e12, description="Counts at or above this make a reflection overloaded")
    min_partiality: float = Field(0.05, ge=0, lt=1, description="Reflections predicted less recorded are skipped")

    @model_validator(mode="after")
    def _check(self) -> IntegrationParameters:
        if self.background_radius <= self.foreground_radius + 1:
            raise ValueError(
                f"background_radius {self.background_radius} must exceed foreground_radius + 1 "
                f"({self.foreground_radius + 1})"
            )
        return self


class AnalysisParameters(_Stage):
    """Everything the per-frame analysis can be told; the defaults suit typical SFX data."""

    spotfinding: SpotfindingParameters = Field(default_factory=SpotfindingParameters)
    hitfinding: HitfindingParameters = Field(default_factory=HitfindingParameters)
    indexing: IndexingParameters = Field(default_factory=IndexingParameters)
    refinement: RefinementParameters = Field(default_factory=RefinementParameters)
    integration: IntegrationParameters = Field(default_factory=IntegrationParameters)


def _describe(error: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(part) for part in item['loc']) or '(parameters)'}: {item['msg']}"
        for item in error.errors(include_url=False)
    )


def parameters_from_dict(values: Mapping[str, Any]) -> AnalysisParameters:
    """Validate a nested dictionary (as from JSON); ParameterError names the fields at fault."""
    try:
        return AnalysisParameters.model_validate(dict(values))
    except ValidationError as error:
        raise ParameterError(f"invalid analysis parameters: {_describe(error)}") from error


def with_overrides(parameters: AnalysisParameters, overrides: Mapping[str, Any]) -> AnalysisParameters:
    """A copy of ``parameters`` with dotted keys (``"spotfinding.sigma_strong": 4.0``) replaced and validated.

    A nested form (``{"spotfinding": {"sigma_strong": 4.0}}``) is accepted too. Unknown names raise
    ParameterError listing the names that exist.
    """
    tree = parameters.model_dump()
    for key, value in overrides.items():
        if isinstance(value, Mapping) and "." not in key and key in tree and isinstance(tree[key], dict):
            items = [(f"{key}.{inner}", inner_value) for inner, inner_value in value.items()]
        else:
            items = [(key, value)]
        for dotted, leaf in items:
            parts = dotted.split(".")
            node: Any = tree
            for depth, part in enumerate(parts):
                if not isinstance(node, dict) or part not in node:
                    where = ".".join(parts[:depth]) or "the analysis parameters"
                    known = ", ".join(sorted(node)) if isinstance(node, dict) else "(none: not a section)"
                    raise ParameterError(f"unknown parameter {dotted!r}: {where} has {known}")
                if depth == len(parts) - 1:
                    if isinstance(node[part], dict):
                        raise ParameterError(f"parameter {dotted!r} is a section; set one of its fields")
                    node[part] = leaf
                else:
                    node = node[part]
    return parameters_from_dict(tree)
