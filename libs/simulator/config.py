"""Parameters of a simulated SFX experiment: one validated pydantic model whose defaults look like a real run.

Defaults: a lysozyme-like crystal (P 43 21 2, 79.1 79.1 38.0 Å) diffracting to 1.8 Å, 1.3 Å X-rays with an XFEL's
0.25 % bandwidth, a Jungfrau-4M-like detector at 100 mm, 40 % hits, crystal sizes varying log-normally.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from libs.science.crystal import SymmetryError, check_cell_fits_space_group, space_group, unit_cell


class SimulationConfig(BaseModel):
    """Everything that determines a simulated run; frame i of a config is always the same frame."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    seed: int = Field(1, ge=0, description="Seed of the per-frame random streams (crystal, noise)")
    structure_seed: int = Field(
        0, ge=0, description="Seed of the random protein model; runs with different seeds share the same protein"
    )
    hit_fraction: float = Field(0.4, ge=0, le=1, description="Fraction of frames with a crystal in the beam")

    # Crystal
    cell: tuple[float, float, float, float, float, float] = (79.1, 79.1, 38.0, 90.0, 90.0, 90.0)
    space_group: str = "P 43 21 2"
    d_min: float = Field(1.8, gt=0.5, lt=20, description="Diffraction limit of the crystal (no intensity beyond), Å")
    wilson_b: float = Field(25.0, ge=0, le=200, description="Mean atomic B factor of the model, Å²")
    solvent_fraction: float = Field(0.4, ge=0.1, le=0.9, description="Fraction of the cell that is bulk solvent")
    mean_full_photons_at_2a: float = Field(
        25.0,
        gt=0,
        description="Mean full intensity (photons) of the reflections near 2 Å for a crystal of scale 1, "
        "partiality 1 and Lorentz-polarisation 1; fixes the photon scale of every intensity",
    )
    scale_log_sigma: float = Field(0.6, ge=0, le=3, description="σ of ln(crystal scale) between frames")
    b_factor_sigma: float = Field(3.0, ge=0, le=50, description="σ of the per-frame relative B factor, Å²")
    cell_sigma_fraction: float = Field(0.002, ge=0, le=0.05, description="Relative σ of the per-crystal cell edges")
    domain_size: float = Field(2000.0, gt=10, description="Median mosaic-domain size, Å")
    domain_size_log_sigma: float = Field(0.3, ge=0, le=2)
    mosaicity_deg: float = Field(0.05, ge=0, lt=5, description="Median full mosaic spread (FWHM), degrees")
    mosaicity_log_sigma: float = Field(0.3, ge=0, le=2)
    second_lattice_fraction: float = Field(
        0.0,
        ge=0,
        le=1,
        description="Fraction of hit images with a second, randomly oriented crystal (its A is in the truth's "
        "other_lattices; its spots are not in the reflection arrays, and the reflection-level mode ignores it)",
    )
    second_lattice_scale: float = Field(
        0.3, gt=0, le=1, description="Median scale of a second crystal relative to the first"
    )

    # Beam
    wavelength: float = Field(1.3, gt=0.3, lt=5.0, description="Å")
    bandwidth: float = Field(0.0025, ge=0, lt=0.1, description="Relative spectral width Δλ/λ (FWHM)")
    divergence: float = Field(1e-4, ge=0, lt=0.01, description="Beam divergence (FWHM), radians")
    polarization_fraction: float = Field(0.99, ge=0, le=1, description="Fraction polarised along the lab x axis")

    # Detector
    detector: Literal["jungfrau4m", "single"] = "jungfrau4m"
    distance: float = Field(100.0, gt=10, lt=2000, description="Sample to detector distance, mm")
    pixel_size: float = Field(0.075, gt=0.005, lt=1, description="mm")
    gain: float = Field(1.0, gt=0, le=1000, description="Detector counts (ADU) per photon")
    readout_noise: float = Field(0.0, ge=0, le=100, description="Gaussian read noise σ, ADU")
    saturation: int = Field(10_000, gt=0, description="Largest value a pixel records, ADU (overloads are clipped)")
    dead_pixel_fraction: float = Field(2e-4, ge=0, le=0.1, description="Pixels reading 0, masked")
    hot_pixel_fraction: float = Field(5e-5, ge=0, le=0.1, description="Pixels reading garbage, masked")
    flickering_pixel_fraction: float = Field(
        0.0,
        ge=0,
        le=0.01,
        description="Pixels the mask misses that now and then (1 frame in 20) read tens to hundreds of counts",
    )
    mask_module_edges: bool = Field(True, description="Mask module borders and Jungfrau ASIC boundaries")
    beamstop_radius: float = Field(2.5, ge=0, lt=50, description="Radius of the masked beam-stop shadow, mm")
    spot_sigma_pixels: float = Field(0.6, gt=0.1, lt=10, description="σ of the spot profile without beam effects")

    # Background
    diffuse_background: float = Field(3.5, ge=0, description="Diffuse scatter at low angle, photons per pixel")
    water_ring_photons: float = Field(5.0, ge=0, description="Height of the water ring, photons per pixel")
    water_ring_d: float = Field(3.25, gt=1, lt=10, description="d-spacing of the water ring's maximum, Å")
    water_ring_width: float = Field(0.03, gt=0, lt=1, description="σ of the water ring in 1/d, 1/Å")
    background_log_sigma: float = Field(0.25, ge=0, le=2, description="σ of ln(background level) between frames")

    @field_validator("cell")
    @classmethod
    def _possible_cell(cls, cell: tuple[float, ...]) -> tuple[float, ...]:
        try:
            unit_cell(cell)
        except ValueError as error:
            raise ValueError(f"cell: {error}") from error
        return cell

    @model_validator(mode="after")
    def _cell_fits_group(self) -> SimulationConfig:
        try:
            group = space_group(self.space_group)
            check_cell_fits_space_group(self.cell, group)
        except SymmetryError as error:
            raise ValueError(f"space_group: {error}") from error
        if self.d_min < self.wavelength / 2:
            raise ValueError(f"d_min {self.d_min} Å is below λ/2 = {self.wavelength / 2} Å and cannot diffract")
        return self
