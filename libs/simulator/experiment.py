"""A simulated SFX experiment: frame i of a configuration, as an image with exact ground truth, or as the
reflection list a perfect analysis would integrate from it.

Every frame draws from its own random streams seeded by (seed, i), so frames can be made in any order, on any
process, and the same i always gives the same frame.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from functools import lru_cache

import gemmi
import numpy as np

from libs.contracts.messages import ReflectionTable
from libs.science.crystal import b_matrix, lattice_operators, quaternion_to_matrix, space_group
from libs.science.geometry import Beam, Detector, jungfrau4m_detector, single_panel_detector
from libs.simulator.config import SimulationConfig
from libs.simulator.image import QuantisedPoisson, background_template, detector_mask, render_spots
from libs.simulator.physics import (
    BeamModel,
    Crystals,
    DetectorSpots,
    line_search,
    panel_inverses,
    polarisation_factor,
    predict,
    project_spots,
)
from libs.simulator.structure import IntensityTable, true_intensities

CRYSTAL_STREAM, IMAGE_STREAM, REFLECTION_STREAM, SECOND_LATTICE_STREAM = 0, 1, 2, 3
JUNGFRAU_ASIC = 256
SINGLE_PANEL_PIXELS = 2048
HOT_PIXEL_FRACTIONS = (0.2, 1.0)  # hot pixels read between these fractions of saturation
FLICKER_PROBABILITY, FLICKER_COUNTS = 0.05, (20, 400)  # an unmasked bad pixel fires in 5 % of frames


@dataclass
class FrameTruth:
    """What really happened on one frame. Reflection arrays hold every reflection whose spot centre is on a panel.

    Convention (DIALS): r = A·h in the lab frame (1/Å), A = U·B with B from ``cell``. Photon counts of a spot:
    expected_counts = scale · exp(−b_factor / 2d²) · partiality · lorentz · polarisation · intensity_true.
    """

    index: int
    hit: bool
    A: np.ndarray | None = None
    U: np.ndarray | None = None
    cell: tuple[float, float, float, float, float, float] | None = None
    scale: float = 0.0
    b_factor: float = 0.0  # relative B of this crystal, Å²
    domain_size: float = float("nan")  # Å
    mosaicity_deg: float = float("nan")  # full mosaic spread (FWHM), degrees
    background_level: float = 1.0  # multiplies the background template
    indexing_operator: np.ndarray = field(default_factory=lambda: np.eye(3, dtype=np.int64))
    miller: np.ndarray = field(default_factory=lambda: np.zeros((0, 3), dtype=np.int64))
    intensity_true: np.ndarray = field(default_factory=lambda: np.zeros(0))
    partiality: np.ndarray = field(default_factory=lambda: np.zeros(0))
    lorentz: np.ndarray = field(default_factory=lambda: np.zeros(0))
    polarisation: np.ndarray = field(default_factory=lambda: np.zeros(0))
    excitation_error: np.ndarray = field(default_factory=lambda: np.zeros(0))
    d_spacing: np.ndarray = field(default_factory=lambda: np.zeros(0))
    wavelength: np.ndarray = field(default_factory=lambda: np.zeros(0))
    panel: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    fast: np.ndarray = field(default_factory=lambda: np.zeros(0))
    slow: np.ndarray = field(default_factory=lambda: np.zeros(0))
    profile_covariance: np.ndarray = field(default_factory=lambda: np.zeros((0, 2, 2)))
    expected_counts: np.ndarray = field(default_factory=lambda: np.zeros(0))
    fraction_valid: np.ndarray = field(default_factory=lambda: np.zeros(0))
    background_per_pixel: np.ndarray = field(default_factory=lambda: np.zeros(0))
    overloaded: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))
    other_lattices: list[np.ndarray] = field(default_factory=list)  # A of further crystals on the frame (images)

    REFLECTION_FIELDS = (
        "miller",
        "intensity_true",
        "partiality",
        "lorentz",
        "polarisation",
        "excitation_error",
        "d_spacing",
        "wavelength",
        "panel",
        "fast",
        "slow",
        "profile_covariance",
        "expected_counts",
        "fraction_valid",
        "background_per_pixel",
        "overloaded",
    )

    def __len__(self) -> int:
        return int(self.miller.shape[0])

    @property
    def indexed_A(self) -> np.ndarray | None:  # noqa: N802 (A is the crystallographic name)
        """The A a perfect indexer reports for the Miller indices of :meth:`Experiment.reflections`: A·R⁻¹."""
        if self.A is None:
            return None
        return np.asarray(self.A @ np.linalg.inv(self.indexing_operator))

    def select(self, keep: np.ndarray) -> FrameTruth:
        """A copy with only the reflections ``keep``."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        for name in self.REFLECTION_FIELDS:
            values[name] = values[name][keep]
        return FrameTruth(**values)


@dataclass
class SimulatedFrame:
    """One frame: pixels (n_panels, n_slow, n_fast) int32 in detector counts, and its ground truth."""

    index: int
    image: np.ndarray
    truth: FrameTruth


@dataclass
class _Batch:
    """Crystals of a batch of frames and the truth columns of their reflections, concatenated frame by frame."""

    indices: list[int]
    crystals: _Crystals
    offsets: np.ndarray  # (F + 1,) rows of frame j are offsets[j]:offsets[j + 1]
    columns: dict[str, np.ndarray]


@dataclass
class ReflectionBatch:
    """Integrated reflections of a batch of frames, concatenated (rows of frame j: offsets[j]:offsets[j + 1])."""

    batch: _Batch
    miller: np.ndarray  # (n, 3) int16, as indexed (R·h)
    intensity: np.ndarray  # (n,) float32, Lorentz-polarisation corrected
    sigma: np.ndarray  # (n,) float32
    partiality: np.ndarray  # (n,) float32
    experiment: Experiment

    @property
    def offsets(self) -> np.ndarray:
        return self.batch.offsets

    @property
    def indices(self) -> list[int]:
        return self.batch.indices

    def frame(self, j: int) -> tuple[FrameTruth, ReflectionTable | None]:
        """Truth (of the integrated reflections only) and table of the batch's j-th frame; None for a blank."""
        truth = self.experiment._truth_of(self.batch, j)
        if not truth.hit:
            return truth, None
        rows = slice(int(self.offsets[j]), int(self.offsets[j + 1]))
        table = ReflectionTable(
            miller=self.miller[rows],
            intensity=self.intensity[rows],
            sigma=self.sigma[rows],
            partiality=self.partiality[rows],
        )
        return truth, table


@dataclass(frozen=True)
class _Crystals:
    """Per-frame crystal parameters of a batch of frames (arrays over the batch; blanks keep their draws)."""

    hit: np.ndarray  # (F,) bool
    U: np.ndarray  # (F, 3, 3)
    A: np.ndarray  # (F, 3, 3) = U·B(cell)
    cell: np.ndarray  # (F, 6)
    scale: np.ndarray
    b_factor: np.ndarray
    domain_size: np.ndarray  # Å
    mosaicity: np.ndarray  # radians FWHM
    background_level: np.ndarray
    indexing_operator: np.ndarray  # (F, 3, 3) int


def _empty_columns() -> dict[str, np.ndarray]:
    empty = FrameTruth(index=0, hit=False)
    return {name: getattr(empty, name) for name in FrameTruth.REFLECTION_FIELDS}


class Experiment:
    """Detector, beam, crystal and protein of a simulated run; makes any frame on demand."""

    def __init__(self, config: SimulationConfig) -> None:
        self.config = config
        self.space_group: gemmi.SpaceGroup = space_group(config.space_group)
        self.cell = tuple(float(v) for v in config.cell)
        self.beam = Beam(
            wavelength=config.wavelength,
            bandwidth=config.bandwidth,
            divergence=config.divergence,
            polarization_fraction=config.polarization_fraction,
        )
        self.detector: Detector = _make_detector(config)
        asic = JUNGFRAU_ASIC if config.detector == "jungfrau4m" else None
        maps = _detector_maps(config, asic)
        self.mask = maps.valid.copy()
        self._hot_index, self._dead_index = maps.hot_index, maps.dead_index
        flicker_rng = np.random.default_rng(np.random.SeedSequence([config.structure_seed, 0xF11C]))
        valid_index = np.flatnonzero(self.mask)
        self._flickering_index = flicker_rng.choice(
            valid_index, size=round(valid_index.size * config.flickering_pixel_fraction), replace=False
        )
        self._background = maps.background
        self._background_template = maps.background_template
        self.intensities: IntensityTable = true_intensities(
            self.cell,
            self.space_group.xhm(),
            config.d_min,
            config.wilson_b,
            config.solvent_fraction,
            config.mean_full_photons_at_2a,
            config.structure_seed,
        )
        self._lines = line_search(self.cell, config.d_min, margin=1.0 + 8 * config.cell_sigma_fraction + 0.01)
        self._inverses = panel_inverses(self.detector)
        self._beam_model = BeamModel(
            config.wavelength, config.bandwidth, config.divergence, config.polarization_fraction
        )
        self._indexing_operators = lattice_operators(self.cell)
        self._tied_edges = _tied_cell_edges(self.space_group)
        self._b_matrix = b_matrix(self.cell)

    # ----------------------------------------------------------------- crystal of a frame
    def _rng(self, index: int, stream: int) -> np.random.Generator:
        if index < 0:
            raise IndexError(f"frame index {index} is negative")
        return np.random.default_rng(np.random.SeedSequence([self.config.seed, index, stream]))

    def _crystals(self, indices: Sequence[int]) -> _Crystals:
        c = self.config
        draws = np.empty((len(indices), 14))
        for j, index in enumerate(indices):
            rng = self._rng(index, CRYSTAL_STREAM)
            draws[j, 0] = rng.random()
            draws[j, 1] = rng.integers(len(self._indexing_operators))
            draws[j, 2:] = rng.normal(size=12)
        # Uniform rotations exactly as libs.science.crystal.random_rotations draws them (normalised Gaussian
        # quaternions), converted for the whole batch at once.
        quaternions = draws[:, 2:6] / np.linalg.norm(draws[:, 2:6], axis=1, keepdims=True)
        U = quaternion_to_matrix(quaternions)
        stretch = 1.0 + c.cell_sigma_fraction * draws[:, 6:9][:, self._tied_edges]
        cell = np.tile(np.array(self.cell), (len(indices), 1))
        cell[:, :3] *= stretch
        # Same angles, longer edges: the reciprocal axes shrink by the same factors (B = B0·diag(1/stretch)).
        A = U @ (self._b_matrix[None] / stretch[:, None, :])
        return _Crystals(
            hit=draws[:, 0] < c.hit_fraction,
            U=U,
            A=A,
            cell=cell,
            scale=np.exp(c.scale_log_sigma * draws[:, 9]),
            b_factor=c.b_factor_sigma * draws[:, 10],
            domain_size=c.domain_size * np.exp(c.domain_size_log_sigma * draws[:, 11]),
            mosaicity=np.radians(c.mosaicity_deg) * np.exp(c.mosaicity_log_sigma * draws[:, 12]),
            background_level=np.exp(c.background_log_sigma * draws[:, 13]),
            indexing_operator=self._indexing_operators[draws[:, 1].astype(np.int64)],
        )

    def _predict_batch(self, indices: Sequence[int]) -> _Batch:
        """Crystals of ``indices`` and the truth columns of every reflection whose spot centre is on a panel."""
        crystals = self._crystals(indices)
        hit_index = np.flatnonzero(crystals.hit)
        offsets = np.zeros(len(indices) + 1, dtype=np.int64)
        if not len(hit_index):
            return _Batch(list(indices), crystals, offsets, _empty_columns())
        row_crystal, columns = self._spot_columns(
            crystals.A[hit_index],
            crystals.domain_size[hit_index],
            crystals.mosaicity[hit_index],
            crystals.scale[hit_index],
            crystals.b_factor[hit_index],
            crystals.background_level[hit_index],
        )
        offsets[1:] = np.cumsum(np.bincount(hit_index[row_crystal], minlength=len(indices)))
        return _Batch(list(indices), crystals, offsets, columns)

    def _spot_columns(
        self,
        A: np.ndarray,
        domain_size: np.ndarray,
        mosaicity: np.ndarray,
        scale: np.ndarray,
        b_factor: np.ndarray,
        background_level: np.ndarray,
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """(crystal of each row, truth columns) of the spots on the detector of crystals given as arrays (F, ...)."""
        model = Crystals(A=A, domain_size=domain_size, mosaicity=mosaicity)
        predicted = predict(model, self._beam_model, self._lines, self.config.d_min, self.config.domain_size)
        intensity = self.intensities.intensity(predicted.miller)
        present = np.flatnonzero(intensity > 0)
        predicted, intensity = predicted.select(present), intensity[present]
        spots = project_spots(
            predicted, self.detector, self._inverses, self.config.spot_sigma_pixels, self.config.divergence
        )
        on = predicted.select(spots.index)
        intensity = intensity[spots.index]
        crystal = on.frame
        polarisation = polarisation_factor(on.s1, self.config.polarization_fraction)
        expected = (
            scale[crystal]
            * np.exp(-b_factor[crystal] / (2.0 * on.d_spacing**2))
            * on.partiality
            * on.lorentz
            * polarisation
            * intensity
        )
        slow_pixel = np.clip(spots.slow.astype(np.int64), 0, self.mask.shape[1] - 1)
        fast_pixel = np.clip(spots.fast.astype(np.int64), 0, self.mask.shape[2] - 1)
        background = self._background_template[spots.panel, slow_pixel, fast_pixel] * background_level[crystal]
        columns = {
            "miller": on.miller,
            "intensity_true": intensity,
            "partiality": on.partiality,
            "lorentz": on.lorentz,
            "polarisation": polarisation,
            "excitation_error": on.excitation_error,
            "d_spacing": on.d_spacing,
            "wavelength": on.wavelength,
            "panel": spots.panel.astype(np.int64),
            "fast": spots.fast,
            "slow": spots.slow,
            "profile_covariance": spots.covariance,
            "expected_counts": expected,
            "fraction_valid": np.ones(len(expected)),
            "background_per_pixel": background,
            "overloaded": np.zeros(len(expected), dtype=bool),
        }
        return crystal, columns

    def _second_lattice(self, index: int, truth: FrameTruth) -> dict[str, np.ndarray] | None:
        """Spots of a second, weaker crystal on hit ``index`` (only when ``second_lattice_fraction`` > 0)."""
        c = self.config
        if not truth.hit or c.second_lattice_fraction <= 0:
            return None
        rng = self._rng(index, SECOND_LATTICE_STREAM)
        if rng.random() >= c.second_lattice_fraction:
            return None
        quaternion = rng.normal(size=4)
        U = quaternion_to_matrix(quaternion / np.linalg.norm(quaternion))
        stretch = 1.0 + c.cell_sigma_fraction * rng.normal(size=3)[self._tied_edges]
        A = U @ (self._b_matrix / stretch[None, :])
        scale = truth.scale * c.second_lattice_scale * np.exp(0.3 * rng.normal())
        truth.other_lattices = [A]
        _, columns = self._spot_columns(
            A[None],
            np.array([truth.domain_size]),
            np.array([np.radians(truth.mosaicity_deg)]),
            np.array([scale]),
            np.array([truth.b_factor]),
            np.array([truth.background_level]),
        )
        return columns

    def _truth_of(self, batch: _Batch, j: int) -> FrameTruth:
        crystals = batch.crystals
        index = batch.indices[j]
        if not crystals.hit[j]:
            return FrameTruth(index=index, hit=False, background_level=float(crystals.background_level[j]))
        rows = slice(int(batch.offsets[j]), int(batch.offsets[j + 1]))
        return FrameTruth(
            index=index,
            hit=True,
            A=crystals.A[j],
            U=crystals.U[j],
            cell=tuple(float(v) for v in crystals.cell[j]),  # type: ignore[arg-type]
            scale=float(crystals.scale[j]),
            b_factor=float(crystals.b_factor[j]),
            domain_size=float(crystals.domain_size[j]),
            mosaicity_deg=float(np.degrees(crystals.mosaicity[j])),
            background_level=float(crystals.background_level[j]),
            indexing_operator=np.asarray(crystals.indexing_operator[j], dtype=np.int64),
            **{name: column[rows] for name, column in batch.columns.items()},  # type: ignore[arg-type]
        )

    # ----------------------------------------------------------------- public API
    def truth(self, index: int) -> FrameTruth:
        """Ground truth of frame ``index`` without drawing its pixels (fraction_valid and overloaded not computed)."""
        return self._truth_of(self._predict_batch([index]), 0)

    def truths(self, indices: Sequence[int]) -> list[FrameTruth]:
        """Ground truth of many frames at once (faster than one by one)."""
        batch = self._predict_batch(indices)
        return [self._truth_of(batch, j) for j in range(len(indices))]

    def background_expectation(self, index: int) -> np.ndarray:
        """Mean background photons per pixel of frame ``index`` (n_panels, n_slow, n_fast)."""
        return self._background.mean(float(self._crystals([index]).background_level[0]))

    def frame(self, index: int) -> SimulatedFrame:
        """Frame ``index`` as detector counts with its ground truth."""
        c = self.config
        truth = self.truth(index)
        rng = self._rng(index, IMAGE_STREAM)
        counts = self._background.sample(truth.background_level, rng)
        flat = counts.reshape(-1)
        rendered = None
        if truth.hit and len(truth):
            spots = DetectorSpots(
                index=np.arange(len(truth)),
                panel=truth.panel,
                fast=truth.fast,
                slow=truth.slow,
                covariance=truth.profile_covariance,
            )
            rendered = render_spots(spots, truth.expected_counts, self.mask)
            truth.fraction_valid = rendered.fraction_valid
            np.add.at(flat, rendered.flat_index, rng.poisson(rendered.expected).astype(np.int32))
            second = self._second_lattice(index, truth)
            if second is not None and len(second["panel"]):
                other = DetectorSpots(
                    index=np.arange(len(second["panel"])),
                    panel=second["panel"],
                    fast=second["fast"],
                    slow=second["slow"],
                    covariance=second["profile_covariance"],
                )
                extra = render_spots(other, second["expected_counts"], self.mask)
                np.add.at(flat, extra.flat_index, rng.poisson(extra.expected).astype(np.int32))
        if c.gain != 1.0 or c.readout_noise > 0:
            values = flat * c.gain
            if c.readout_noise > 0:
                values = values + rng.normal(0.0, c.readout_noise, size=flat.size)
            flat[:] = np.rint(np.maximum(values, 0.0)).astype(np.int32)
        saturated = flat >= c.saturation
        if saturated.any():
            flat[saturated] = c.saturation
            if rendered is not None:
                hits = saturated[rendered.flat_index] & (rendered.expected > 1e-2)
                truth.overloaded = np.bincount(rendered.owner[hits], minlength=len(truth)) > 0
        flat[self._dead_index] = 0
        low, high = (round(c.saturation * f) for f in HOT_PIXEL_FRACTIONS)
        flat[self._hot_index] = rng.integers(low, high + 1, size=self._hot_index.size, dtype=np.int32)
        if self._flickering_index.size:
            firing = self._flickering_index[rng.random(self._flickering_index.size) < FLICKER_PROBABILITY]
            flat[firing] += rng.integers(*FLICKER_COUNTS, size=firing.size, dtype=np.int32)
        return SimulatedFrame(index=index, image=counts, truth=truth)

    def reflection_batch(self, indices: Sequence[int]) -> ReflectionBatch:
        """What a perfect per-frame analysis integrates on each of ``indices`` (no image is drawn).

        Summation integration of every reflection whose spot lies on valid pixels and is not overloaded: the spot's
        counts S ~ Poisson(expected + n·b) over n foreground pixels (the 3σ ellipse of the profile) and a background
        estimate from 3n + 20 pixels around it; intensity = (S − n·b̂) / (Lorentz · polarisation), σ from counting
        statistics, partiality the true one, Miller indices in the indexer's arbitrary setting R (R·h).
        """
        batch = self._predict_batch(indices)
        columns = batch.columns
        frame = np.repeat(np.arange(len(indices)), np.diff(batch.offsets))
        keep = self._integrable(columns)
        columns = {name: column[keep] for name, column in columns.items()}
        frame = frame[keep]
        offsets = np.zeros(len(indices) + 1, dtype=np.int64)
        offsets[1:] = np.cumsum(np.bincount(frame, minlength=len(indices)))
        covariance = columns["profile_covariance"] + np.eye(2)[None] / 12.0
        foreground = np.maximum(4.0, np.round(np.pi * 9.0 * np.sqrt(_determinant(covariance))))
        n_background = 3.0 * foreground + 20.0
        b = columns["background_per_pixel"]
        signal_mean = columns["expected_counts"] + foreground * b
        background_mean = n_background * b
        signal = np.empty(len(b))
        background_counts = np.empty(len(b))
        for j, index in enumerate(batch.indices):
            rows = slice(int(offsets[j]), int(offsets[j + 1]))
            if rows.stop > rows.start:
                rng = self._rng(index, REFLECTION_STREAM)
                signal[rows] = rng.poisson(signal_mean[rows])
                background_counts[rows] = rng.poisson(background_mean[rows])
        intensity = signal - foreground * background_counts / n_background
        variance = np.maximum(signal + foreground**2 * background_counts / n_background**2, 1.0)
        correction = columns["lorentz"] * columns["polarisation"]
        miller = _apply(batch.crystals.indexing_operator, frame, columns["miller"])
        return ReflectionBatch(
            batch=_Batch(batch.indices, batch.crystals, offsets, columns),
            miller=miller.astype(np.int16),
            intensity=(intensity / correction).astype(np.float32),
            sigma=(np.sqrt(variance) / correction).astype(np.float32),
            partiality=columns["partiality"].astype(np.float32),
            experiment=self,
        )

    def reflections(self, index: int) -> tuple[FrameTruth, ReflectionTable | None]:
        """What a perfect analysis integrates on frame ``index`` (see :meth:`reflection_batch`); None for a blank."""
        return self.reflection_batch([index]).frame(0)

    def _integrable(self, columns: dict[str, np.ndarray]) -> np.ndarray:
        """Reflections a careful integrator keeps: centre and ±2 px valid, peak pixel below saturation."""
        _, n_slow, n_fast = self.mask.shape
        panel = columns["panel"]
        keep = np.ones(len(panel), dtype=bool)
        for d_fast, d_slow in ((0, 0), (2, 0), (-2, 0), (0, 2), (0, -2)):
            fast = np.floor(columns["fast"]).astype(np.int64) + d_fast
            slow = np.floor(columns["slow"]).astype(np.int64) + d_slow
            inside = (fast >= 0) & (fast < n_fast) & (slow >= 0) & (slow < n_slow)
            keep &= inside & self.mask[panel, np.clip(slow, 0, n_slow - 1), np.clip(fast, 0, n_fast - 1)]
        covariance = columns["profile_covariance"] + np.eye(2)[None] / 12.0
        peak = columns["expected_counts"] / (2.0 * np.pi * np.sqrt(_determinant(covariance)))
        keep &= (peak + columns["background_per_pixel"]) * self.config.gain < self.config.saturation
        return keep

    def true_merged_intensities(self) -> tuple[np.ndarray, np.ndarray]:
        """(miller (n, 3) int in the gemmi reciprocal ASU, intensity (n,)) of the whole data set."""
        return self.intensities.asu_miller.copy(), self.intensities.asu_intensity.copy()


@dataclass(frozen=True)
class _DetectorMaps:
    valid: np.ndarray
    hot_index: np.ndarray
    dead_index: np.ndarray
    background: QuantisedPoisson
    background_template: np.ndarray


def _detector_maps(config: SimulationConfig, asic: int | None) -> _DetectorMaps:
    """Mask, bad pixels and background model of a configuration (cached: they cost seconds for 4 Mpixels)."""
    key = config.model_dump_json(
        include={
            "detector",
            "distance",
            "pixel_size",
            "wavelength",
            "polarization_fraction",
            "structure_seed",
            "beamstop_radius",
            "mask_module_edges",
            "dead_pixel_fraction",
            "hot_pixel_fraction",
            "diffuse_background",
            "water_ring_photons",
            "water_ring_d",
            "water_ring_width",
        }
    )
    return _detector_maps_cached(key, asic)


@lru_cache(maxsize=2)
def _detector_maps_cached(key: str, asic: int | None) -> _DetectorMaps:
    config = SimulationConfig.model_validate_json(key)
    experiment_detector = _make_detector(config)
    beam = Beam(wavelength=config.wavelength, polarization_fraction=config.polarization_fraction)
    lab = experiment_detector.pixel_centre_lab()
    rng = np.random.default_rng(np.random.SeedSequence([config.structure_seed, 0xDE7EC7]))
    valid, dead, hot = detector_mask(
        experiment_detector,
        lab,
        config.beamstop_radius,
        config.mask_module_edges,
        asic,
        config.dead_pixel_fraction,
        config.hot_pixel_fraction,
        rng,
    )
    background = QuantisedPoisson(
        background_template(
            experiment_detector,
            lab,
            beam,
            config.diffuse_background,
            config.water_ring_photons,
            config.water_ring_d,
            config.water_ring_width,
            config.beamstop_radius,
        )
    )
    valid.setflags(write=False)
    template = background.template()
    template.setflags(write=False)
    return _DetectorMaps(valid, np.flatnonzero(hot), np.flatnonzero(dead), background, template)


def _make_detector(config: SimulationConfig) -> Detector:
    if config.detector == "jungfrau4m":
        return jungfrau4m_detector(distance=config.distance, pixel_size=config.pixel_size)
    return single_panel_detector(
        distance=config.distance,
        n_fast=SINGLE_PANEL_PIXELS,
        n_slow=SINGLE_PANEL_PIXELS,
        pixel_size=config.pixel_size,
        beam_centre=(SINGLE_PANEL_PIXELS / 2 + 7.3, SINGLE_PANEL_PIXELS / 2 - 4.6),
    )


def _determinant(matrices: np.ndarray) -> np.ndarray:
    """Determinants of (n, 2, 2) matrices."""
    return np.asarray(matrices[:, 0, 0] * matrices[:, 1, 1] - matrices[:, 0, 1] * matrices[:, 1, 0])


def _apply(matrices: np.ndarray, which: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """matrices[which[i]] · vectors[i] for every row i, without gathering a 3×3 matrix per row."""
    gathered = matrices.reshape(len(matrices), 9)[which]
    return np.stack([np.einsum("nj,nj->n", gathered[:, 3 * row : 3 * row + 3], vectors) for row in range(3)], axis=1)


def _tied_cell_edges(group: gemmi.SpaceGroup) -> np.ndarray:
    """Which random cell-edge change each of a, b, c takes, so the metric keeps the lattice's symmetry."""
    system = group.crystal_system_str()
    if system == "cubic":
        return np.array([0, 0, 0])
    if system in ("tetragonal", "hexagonal", "trigonal"):
        if system == "trigonal" and group.hm.startswith("R") and group.ext == "R":
            return np.array([0, 0, 0])
        return np.array([0, 0, 2])
    return np.array([0, 1, 2])
