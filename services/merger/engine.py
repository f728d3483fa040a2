"""The merging engine: per-frame reflections in, merged intensities and statistics out, while the run grows.

Streaming: each batch of frames is validated, mapped to the ASU (in every indexing mode when the lattice is
ambiguous), assigned its indexing mode and scaled against the current merge, screened for outliers and added to
running per-reflection sums; statistics are computed from those sums alone. A full re-scale (on demand, and
automatically while the data set is young, each time the number of frames doubles) redoes everything from the
stored observations: modes, scales, frame rejection, error model, outliers, sums.

Every frame is identified by (run, trial, frame index) and counted once, whatever arrives twice.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from libs.contracts.messages import FrameResult, MergeUpdate
from libs.science.crystal import check_cell_fits_space_group, space_group
from services.merger.ambiguity import (
    choose_modes,
    mode_correlations,
    references_by_mode,
    reindexing_modes,
    resolution_normalised,
    resolve_sequentially,
)
from services.merger.asu import AsuMapper
from services.merger.error_model import ErrorModel, fit_error_model
from services.merger.french_wilson import french_wilson, mean_intensity_by_resolution
from services.merger.rejection import grouped_correlation, outlier_observations
from services.merger.scaling import fit_frame_scales, scale_correction
from services.merger.statistics import MergingStatistics, ReflectionSums, merging_statistics

FrameKey = tuple[str, str, int]


class MergingParameters(BaseModel):
    """Every knob of the merge, validated."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    d_min: float = Field(1.0, gt=0, description="Highest resolution merged at all (Å); reflections beyond are dropped")
    n_shells: int = Field(10, ge=1, le=100)
    cell_length_tolerance: float = Field(0.03, gt=0, description="Largest relative deviation of a frame's a, b, c")
    cell_angle_tolerance: float = Field(2.0, gt=0, description="Largest deviation of a frame's angles (degrees)")
    partiality_correction: bool = Field(True, description="Divide intensities by the frame's estimated partiality")
    min_partiality: float = Field(
        0.3, ge=0, le=1, description="Observations less recorded than this are dropped (estimates are poor there)"
    )
    min_reflections: int = Field(5, ge=1, description="Frames with fewer usable reflections are rejected")
    scale_min_i_over_sigma: float = Field(2.0, ge=0, description="Confident reflections used for scaling")
    fit_b: bool = Field(True, description="Refine a relative B per frame as well as the scale")
    min_frame_cc: float = Field(0.05, description="Frames correlating less with the merge are rejected")
    frame_cc_sigmas: float = Field(
        2.0, ge=0, description="...and so are frames whose CC is not this many standard errors (1/√n) above zero"
    )
    min_frame_cc_pairs: int = Field(8, ge=3, description="Pairs needed before a frame's CC is judged")
    outlier_z: float = Field(6.0, gt=0, description="Observations this many sigmas from the others are rejected")
    error_model: bool = True
    error_model_fit_sdb: bool = Field(False, description="Refine SDB too (it trades off against SDFAC)")
    resolve_ambiguity: bool = Field(True, description="Resolve indexing ambiguity when the lattice allows it")
    ambiguity_margin: float = Field(0.05, ge=0, description="CC lead that counts a frame's mode as resolved")
    bootstrap_frames: int = Field(100, ge=2, description="Frames merged unscaled before the first full scaling")
    auto_rescale_until: int = Field(5000, ge=0, description="Re-scale fully each time the frame count doubles, up to")
    scale_iterations: int = Field(3, ge=1)
    half_set_seed: int = Field(0, description="Seed of the half-set assignment for CC1/2 and Rsplit")


@dataclass(frozen=True)
class FrameRejection:
    key: FrameKey
    reason: str

    def __str__(self) -> str:
        run, trial, index = self.key
        return f"frame {index} of run {run} (trial {trial}): {self.reason}"


@dataclass
class BatchReport:
    """What happened to one batch."""

    accepted: int = 0
    duplicates: int = 0
    not_indexed: int = 0
    rejected: list[FrameRejection] = field(default_factory=list)


@dataclass(frozen=True)
class MergedReflections:
    miller: np.ndarray  # ASU h, k, l
    intensity: np.ndarray
    sigma: np.ndarray
    multiplicity: np.ndarray
    d: np.ndarray
    centric: np.ndarray
    epsilon: np.ndarray


@dataclass(frozen=True)
class UnmergedObservations:
    miller: np.ndarray  # in the consistent indexing mode, before ASU mapping
    asu_miller: np.ndarray
    isym: np.ndarray
    batch: np.ndarray  # 1-based frame number inside the merge
    intensity: np.ndarray
    sigma: np.ndarray
    frame_keys: list[FrameKey]  # key of batch b at position b - 1


class InputError(ValueError):
    """A frame that cannot enter the merge; the message names the frame and the defect."""


class _Observations:
    """Column store of accepted observations, appended in chunks, consolidated when read."""

    names = ("frame", "miller", "asu", "intensity", "sigma", "partiality", "outlier")

    def __init__(self, n_modes: int) -> None:
        self.n_modes = n_modes
        self._chunks: list[dict[str, np.ndarray]] = []
        self._columns: dict[str, np.ndarray] | None = None
        self.size = 0

    def append(self, columns: dict[str, np.ndarray]) -> None:
        self._chunks.append(columns)
        self._columns = None
        self.size += int(columns["frame"].size)

    def columns(self) -> dict[str, np.ndarray]:
        if self._columns is None:
            if not self._chunks:
                empty: dict[str, np.ndarray] = {
                    "frame": np.zeros(0, np.int32),
                    "miller": np.zeros((0, 3), np.int16),
                    "asu": np.zeros((0, self.n_modes), np.int32),
                    "intensity": np.zeros(0, np.float32),
                    "sigma": np.zeros(0, np.float32),
                    "partiality": np.zeros(0, np.float32),
                    "outlier": np.zeros(0, bool),
                }
                return empty
            self._columns = {name: np.concatenate([c[name] for c in self._chunks]) for name in self.names}
            self._chunks = [self._columns]
        return self._columns


class MergingEngine:
    """Streaming merge of one data set (one cell and space group)."""

    def __init__(
        self, cell: Sequence[float], space_group_symbol: str, parameters: MergingParameters | None = None
    ) -> None:
        self.parameters = parameters or MergingParameters()
        self.cell = tuple(float(v) for v in cell)
        self.space_group = space_group(space_group_symbol)
        check_cell_fits_space_group(self.cell, self.space_group)
        self.mapper = AsuMapper(self.space_group, self.cell, self.parameters.d_min)
        modes = reindexing_modes(self.cell, self.space_group)
        self.modes = modes if self.parameters.resolve_ambiguity else modes[:1]
        self.error_model = ErrorModel()
        self.sums = ReflectionSums(self.mapper.size, self.parameters.half_set_seed)
        self._observations = _Observations(len(self.modes))
        self._index_of: dict[FrameKey, int] = {}
        self._keys: list[FrameKey] = []
        self._seen: set[FrameKey] = set()
        self._frame_arrays: dict[str, np.ndarray] = {
            "start": np.zeros(0, np.int64),
            "stop": np.zeros(0, np.int64),
            "scale": np.zeros(0),
            "b": np.zeros(0),
            "mode": np.zeros(0, np.int8),
            "cc": np.zeros(0),
            "active": np.zeros(0, bool),
            "resolved": np.zeros(0, bool),
        }
        self.rejections: list[FrameRejection] = []
        self._scaled_once = False
        self._frames_at_last_rescale = 0
        self.run_ids: list[str] = []

    # ----------------------------------------------------------------------------------------------------------
    # input

    @property
    def frames_merged(self) -> int:
        return int(self._frame_arrays["active"].sum())

    @property
    def frames_rejected(self) -> int:
        return len(self.rejections) + int((~self._frame_arrays["active"]).sum())

    @property
    def observations(self) -> int:
        return int(self.sums.count.sum())

    def add_frames(self, frames: Iterable[FrameResult]) -> BatchReport:
        """Add a batch of per-frame results; frames already seen are ignored, bad ones are rejected with a reason."""
        report = BatchReport()
        prepared: list[tuple[FrameKey, dict[str, np.ndarray]]] = []
        for result in frames:
            key = result.key
            if key in self._seen:
                report.duplicates += 1
                continue
            self._seen.add(key)
            if result.error is not None or not result.indexed:
                report.not_indexed += 1
                continue
            try:
                prepared.append((key, self._prepare(result)))
            except InputError as error:
                rejection = FrameRejection(key, str(error))
                report.rejected.append(rejection)
                self.rejections.append(rejection)
            if result.run_id not in self.run_ids:
                self.run_ids.append(result.run_id)
        if prepared:
            report.accepted = len(prepared)
            self._append(prepared)
        return report

    def _prepare(self, result: FrameResult) -> dict[str, np.ndarray]:
        """Validate one frame and map its reflections; raises InputError naming the defect."""
        p = self.parameters
        table = result.reflections
        if table is None or table.miller.shape[0] == 0:
            raise InputError("no integrated reflections (empty frame)")
        if result.cell is None:
            raise InputError("indexed frame without a cell")
        for i, name in enumerate("abc"):
            if abs(result.cell[i] - self.cell[i]) > p.cell_length_tolerance * self.cell[i]:
                raise InputError(
                    f"cell {name} = {result.cell[i]:.2f} Å differs from the merge cell's {self.cell[i]:.2f} Å by more"
                    f" than {100 * p.cell_length_tolerance:.0f}%"
                )
        for i, name in enumerate(("alpha", "beta", "gamma")):
            if abs(result.cell[3 + i] - self.cell[3 + i]) > p.cell_angle_tolerance:
                raise InputError(
                    f"cell {name} = {result.cell[3 + i]:.2f}° differs from the merge cell's {self.cell[3 + i]:.2f}°"
                )
        intensity = np.asarray(table.intensity, dtype=np.float32)
        sigma = np.asarray(table.sigma, dtype=np.float32)
        partiality = np.asarray(table.partiality, dtype=np.float32)
        for name, column in (("intensity", intensity), ("sigma", sigma), ("partiality", partiality)):
            bad = int((~np.isfinite(column)).sum())
            if bad:
                raise InputError(f"{bad} of {column.size} reflections have a non-finite {name} (NaN or inf)")
        if (sigma <= 0).any():
            raise InputError(f"{int((sigma <= 0).sum())} reflections have sigma ≤ 0")
        if (partiality < 0).any() or (partiality > 1.5).any():
            raise InputError("partiality outside [0, 1.5]")
        miller = np.asarray(table.miller).astype(np.int64)
        keep = np.ones(miller.shape[0], dtype=bool)
        if p.partiality_correction:
            keep &= partiality >= max(p.min_partiality, 1e-6)
        else:
            partiality = np.ones_like(partiality)
        asu = np.full((miller.shape[0], len(self.modes)), -1, dtype=np.int32)
        for m, operator in enumerate(self.modes):
            asu[:, m], _ = self.mapper.map(miller @ operator.T)
        keep &= (asu >= 0).all(axis=1)
        if keep.sum() < p.min_reflections:
            raise InputError(
                f"only {int(keep.sum())} of {miller.shape[0]} reflections are usable (within {p.d_min} Å, not"
                f" systematically absent, partiality ≥ {p.min_partiality}); at least {p.min_reflections} are needed"
            )
        return {
            "miller": miller[keep].astype(np.int16),
            "asu": asu[keep],
            "intensity": intensity[keep],
            "sigma": sigma[keep],
            "partiality": partiality[keep],
        }

    def _append(self, prepared: list[tuple[FrameKey, dict[str, np.ndarray]]]) -> None:
        first_frame = len(self._keys)
        first_observation = self._observations.size
        sizes = np.array([len(columns["intensity"]) for _, columns in prepared], dtype=np.int64)
        starts = first_observation + np.concatenate([[0], np.cumsum(sizes)[:-1]])
        frame_numbers = np.repeat(np.arange(first_frame, first_frame + len(prepared), dtype=np.int32), sizes)
        batch = {
            name: np.concatenate([columns[name] for _, columns in prepared])
            for name in ("miller", "asu", "intensity", "sigma", "partiality")
        }
        batch["frame"] = frame_numbers
        batch["outlier"] = np.zeros(frame_numbers.size, dtype=bool)
        for offset, (key, _) in enumerate(prepared):
            self._index_of[key] = first_frame + offset
            self._keys.append(key)
        n = len(prepared)
        new = {
            "start": starts,
            "stop": starts + sizes,
            "scale": np.ones(n),
            "b": np.zeros(n),
            "mode": np.zeros(n, np.int8),
            "cc": np.full(n, np.nan),
            "active": np.ones(n, bool),
            "resolved": np.zeros(n, bool),
        }
        self._frame_arrays = {name: np.concatenate([self._frame_arrays[name], new[name]]) for name in new}
        self._observations.append(batch)
        n_frames = len(self._keys)
        if not self._scaled_once:
            if n_frames >= self.parameters.bootstrap_frames:
                self.rescale()
            else:
                self._add_unscaled(batch)
            return
        self._stream(batch, first_frame, n_frames)
        if n_frames <= self.parameters.auto_rescale_until and n_frames >= 2 * self._frames_at_last_rescale:
            self.rescale()

    def _add_unscaled(self, batch: dict[str, np.ndarray]) -> None:
        intensity = batch["intensity"] / batch["partiality"]
        sigma = batch["sigma"] / batch["partiality"]
        self.sums.add(batch["asu"][:, 0], intensity, sigma)

    def _stream(self, batch: dict[str, np.ndarray], first_frame: int, n_frames: int) -> None:
        """Mode, scale, rejection and sums for newly arrived frames, against the current merge."""
        p = self.parameters
        frames = self._frame_arrays
        local = batch["frame"] - first_frame
        n_new = n_frames - first_frame
        reference, reference_sigma = self.sums.merged()
        if len(self.modes) > 1:
            values = self._normalised_values(batch["intensity"] / batch["partiality"], batch["asu"][:, 0])
            reference_values = self._normalised_reference(reference)
            references = np.where(batch["asu"] >= 0, reference_values[np.maximum(batch["asu"], 0)], np.nan)
            cc, _ = mode_correlations(local, n_new, values, references, batch["partiality"].astype(float) ** 2)
            modes, clear = choose_modes(cc, np.zeros(n_new, dtype=int), p.ambiguity_margin)
            frames["mode"][first_frame:] = modes
            frames["resolved"][first_frame:] = clear
        asu = batch["asu"][np.arange(local.size), frames["mode"][batch["frame"]]]
        inv_d2 = self.mapper.inv_d2[asu]
        fit = fit_frame_scales(
            local,
            n_new,
            batch["intensity"],
            batch["sigma"],
            batch["partiality"],
            inv_d2,
            reference[asu],
            reference_sigma[asu],
            min_i_over_sigma=p.scale_min_i_over_sigma,
            fit_b=p.fit_b,
        )
        frames["scale"][first_frame:] = fit.scale
        frames["b"][first_frame:] = fit.b_factor
        correction = scale_correction(inv_d2, fit.scale[local], fit.b_factor[local]) * batch["partiality"]
        intensity = batch["intensity"] / correction
        # The error model needs the reflection's mean; a reflection seen for the first time offers only this one.
        known_mean = np.where(np.isfinite(reference[asu]), reference[asu], intensity)
        sigma = self.error_model.inflate(batch["sigma"] / correction, known_mean)
        cc, pairs = self._frame_correlations(
            local, n_new, batch["intensity"] / batch["partiality"], reference[asu], batch["partiality"] ** 2
        )
        frames["cc"][first_frame:] = cc
        bad = ~np.isfinite(fit.scale) | self._poorly_correlated(cc, pairs)
        frames["active"][first_frame:] = ~bad
        # Outliers against the merge so far: only reflections already measured three times can be judged.
        count = self.sums.count[asu]
        with np.errstate(divide="ignore", invalid="ignore"):
            z = (intensity - reference[asu]) / np.sqrt(sigma**2 + reference_sigma[asu] ** 2)
        outlier = (count >= 3) & (np.abs(z) > p.outlier_z)
        batch["outlier"][:] = outlier
        use = ~bad[local] & ~outlier & np.isfinite(intensity) & np.isfinite(sigma) & (sigma > 0)
        self.sums.add(asu[use], intensity[use], sigma[use])

    def _poorly_correlated(self, cc: np.ndarray, pairs: np.ndarray) -> np.ndarray:
        """Frames that can be judged and correlate too little, or not significantly, with the merge."""
        p = self.parameters
        with np.errstate(divide="ignore", invalid="ignore"):
            threshold = np.maximum(p.min_frame_cc, p.frame_cc_sigmas / np.sqrt(np.maximum(pairs, 1)))
        return np.asarray((pairs >= p.min_frame_cc_pairs) & ~(cc >= threshold))

    @staticmethod
    def _frame_correlations(
        frame: np.ndarray,
        n_frames: int,
        values: np.ndarray,
        reference: np.ndarray,
        weight: np.ndarray,
    ) -> tuple[np.ndarray, np.ndarray]:
        """CC of each frame's unscaled intensities (I/p) with the merge, pairs weighted by partiality².

        Unscaled, because a fitted B can lend a frame of pure noise the merge's fall-off and with it a
        respectable correlation; not normalised by resolution, because shells of pure noise beyond the
        diffraction limit would then weigh as much as the shells that carry the signal.
        """
        return grouped_correlation(frame, values, reference, n_frames, weight)

    def _normalised_values(self, values: np.ndarray, asu: np.ndarray) -> np.ndarray:
        return resolution_normalised(values, self.mapper.inv_d2[asu])

    def _normalised_reference(self, reference: np.ndarray) -> np.ndarray:
        known = np.isfinite(reference)
        normalised = np.full(reference.size, np.nan)
        normalised[known] = resolution_normalised(reference[known], self.mapper.inv_d2[known])
        return normalised

    # ----------------------------------------------------------------------------------------------------------
    # full re-scale

    def rescale(self) -> None:
        """Redo modes, scales, frame rejection, error model and outliers from every stored observation."""
        p = self.parameters
        columns = self._observations.columns()
        frames = self._frame_arrays
        n_frames = len(self._keys)
        if n_frames == 0:
            return
        # Per-observation work arrays stay float32 (and int32): a re-scale holds a dozen of them at once.
        frame = columns["frame"]
        intensity = columns["intensity"]
        raw_sigma = columns["sigma"]
        partiality = columns["partiality"]
        if len(self.modes) > 1:
            self._resolve_all(columns)
        asu = self._current_asu(columns)
        inv_d2 = self.mapper.inv_d2.astype(np.float32)[asu]
        active = np.ones(n_frames, dtype=bool)
        scale, b_factor = np.ones(n_frames), np.zeros(n_frames)
        if self._scaled_once:
            scale, b_factor = frames["scale"].copy(), frames["b"].copy()
            scale = np.where(np.isfinite(scale), scale, 1.0)
        error_model = ErrorModel()
        outlier = np.zeros(frame.size, dtype=bool)
        for iteration in range(p.scale_iterations + 1):
            correction = self._correction(inv_d2, scale, b_factor, frame, partiality)
            scaled = intensity / correction
            use = active[frame] & ~outlier
            mean_now = self._mean_by_reflection(asu[use], scaled[use])
            sigma = error_model.inflate(raw_sigma / correction, mean_now[asu]).astype(np.float32)
            if iteration == p.scale_iterations:
                sums = ReflectionSums(self.mapper.size, self.parameters.half_set_seed)
                sums.add(asu[use], scaled[use], sigma[use])
                break
            # Between passes only the weighted means matter; the half sets are drawn once, at the end.
            sums = ReflectionSums(self.mapper.size, self.parameters.half_set_seed)
            sums.add(asu[use], scaled[use], sigma[use], halves=False)
            reference, reference_sigma = sums.merged()
            scaled_before = scaled
            fit = fit_frame_scales(
                frame,
                n_frames,
                intensity,
                raw_sigma,
                partiality,
                inv_d2,
                reference.astype(np.float32)[asu],
                reference_sigma.astype(np.float32)[asu],
                min_i_over_sigma=p.scale_min_i_over_sigma,
                fit_b=p.fit_b,
            )
            scale = np.where(np.isfinite(fit.scale), fit.scale, 1.0)
            b_factor = fit.b_factor
            # Scale and B are relative: without pinning their averages the merge would drift a little in overall
            # scale and fall-off at every re-scale.
            fitted = np.isfinite(fit.scale)
            if fitted.any():
                scale = scale / np.exp(np.mean(np.log(scale[fitted])))
                b_factor = b_factor - np.mean(b_factor[fitted])
            correction = self._correction(inv_d2, scale, b_factor, frame, partiality)
            scaled = intensity / correction
            # Leave-one-out: the merge without the observation itself, or a frame would correlate with its own share.
            # In float64 and judged by counts: the difference of two nearly equal sums is all rounding otherwise.
            weight = np.where(use, 1.0 / sigma.astype(float) ** 2, 0.0)
            sum_w = sums.sum_w[asu]
            others_w = sum_w - weight
            has_others = (sums.count[asu] - use) > 0
            with np.errstate(divide="ignore", invalid="ignore"):
                others = np.where(
                    has_others, (sum_w * reference[asu] - weight * scaled_before) / others_w, np.nan
                ).astype(np.float32)
            del weight, sum_w, others_w, has_others
            cc, pairs = self._frame_correlations(frame, n_frames, intensity / partiality, others, partiality**2)
            active = np.isfinite(fit.scale) & ~self._poorly_correlated(cc, pairs)
            frames["cc"] = cc
            if iteration >= 1:
                # Outliers with the current error model first, then the model from what is left (twice), so
                # that neither a few wild observations inflate the model nor an inflated model hides them.
                use = active[frame]
                base_sigma = raw_sigma / correction
                for _ in range(2):
                    mean_now = self._mean_by_reflection(asu[use & ~outlier], scaled[use & ~outlier])
                    inflated = error_model.inflate(base_sigma, mean_now[asu]).astype(np.float32)
                    outlier = np.zeros(frame.size, dtype=bool)
                    outlier[use] = outlier_observations(
                        asu[use], scaled[use], inflated[use], self.mapper.size, z_max=p.outlier_z
                    )
                    if p.error_model:
                        kept = use & ~outlier
                        error_model = fit_error_model(
                            asu[kept], scaled[kept], base_sigma[kept], self.mapper.size, fit_sdb=p.error_model_fit_sdb
                        )
        frames["scale"], frames["b"], frames["active"] = scale, b_factor, active
        columns["outlier"][:] = outlier
        self.error_model = error_model
        self.sums = sums
        self._scaled_once = True
        self._frames_at_last_rescale = n_frames

    @staticmethod
    def _correction(
        inv_d2: np.ndarray, scale: np.ndarray, b_factor: np.ndarray, frame: np.ndarray, partiality: np.ndarray
    ) -> np.ndarray:
        """G·exp(-B/(2d²))·p per observation, in float32."""
        gathered_scale = scale.astype(np.float32)[frame]
        gathered_b = b_factor.astype(np.float32)[frame]
        return np.asarray(scale_correction(inv_d2, gathered_scale, gathered_b) * partiality, dtype=np.float32)

    def _current_asu(self, columns: dict[str, np.ndarray]) -> np.ndarray:
        """asu_index of every stored observation in its frame's current mode."""
        if len(self.modes) == 1:
            return columns["asu"][:, 0]
        return np.take_along_axis(columns["asu"], self._frame_arrays["mode"][columns["frame"]][:, None], axis=1)[:, 0]

    @staticmethod
    def _mean_by_reflection_static(asu: np.ndarray, values: np.ndarray, size: int) -> np.ndarray:
        count = np.bincount(asu, minlength=size)
        total = np.bincount(asu, weights=values, minlength=size)
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(count > 0, total / count, 0.0).astype(np.float32)

    def _mean_by_reflection(self, asu: np.ndarray, values: np.ndarray) -> np.ndarray:
        return self._mean_by_reflection_static(asu, values, self.mapper.size)

    def _resolve_all(self, columns: dict[str, np.ndarray]) -> None:
        """Assign every frame's indexing mode: a sequential bootstrap once, then rounds against the whole merge."""
        p = self.parameters
        frames = self._frame_arrays
        n_frames = len(self._keys)
        frame = columns["frame"].astype(np.int64)
        scale = frames["scale"] if self._scaled_once else np.ones(n_frames)
        scale = np.where(np.isfinite(scale), scale, 1.0)
        raw = columns["intensity"] / columns["partiality"] / scale[frame]
        values = self._normalised_values(raw, columns["asu"][:, 0])
        weight = columns["partiality"].astype(float) ** 2
        if not self._scaled_once:
            count = min(n_frames, max(p.bootstrap_frames, 200))
            stop = int(frames["stop"][count - 1])
            rng = np.random.default_rng(p.half_set_seed)
            frames["mode"][:count] = resolve_sequentially(
                frames["start"][:count],
                frames["stop"][:count],
                values[:stop],
                columns["asu"][:stop],
                self.mapper.size,
                frames["mode"][:count],
                rng,
                weight[:stop],
            )
        for _ in range(3):
            references = references_by_mode(values, columns["asu"], frames["mode"][frame], self.mapper.size)
            cc, _ = mode_correlations(frame, n_frames, values, references, weight)
            modes, clear = choose_modes(cc, frames["mode"].astype(int), p.ambiguity_margin)
            changed = int((modes != frames["mode"]).sum())
            frames["mode"] = modes.astype(np.int8)
            frames["resolved"] = clear
            if changed == 0:
                break

    # ----------------------------------------------------------------------------------------------------------
    # output

    def ambiguity_resolved_fraction(self) -> float | None:
        """Fraction of merged frames whose indexing mode was clear; None when the lattice is not ambiguous."""
        if len(self.modes) < 2:
            return None
        active = self._frame_arrays["active"]
        if not active.any():
            return 0.0
        return float(self._frame_arrays["resolved"][active].mean())

    def frame_modes(self) -> dict[FrameKey, int]:
        return {key: int(self._frame_arrays["mode"][i]) for i, key in enumerate(self._keys)}

    def frame_scales(self) -> dict[FrameKey, tuple[float, float]]:
        f = self._frame_arrays
        return {key: (float(f["scale"][i]), float(f["b"][i])) for i, key in enumerate(self._keys)}

    def statistics(
        self, n_shells: int | None = None, d_min: float | None = None, d_max: float | None = None
    ) -> MergingStatistics:
        """Overall and per-shell statistics from the running sums (cheap: no observation is read)."""
        return merging_statistics(
            self.sums, self.mapper.inv_d2, n_shells=n_shells or self.parameters.n_shells, d_min=d_min, d_max=d_max
        )

    def merged(self) -> MergedReflections:
        """The merged intensity of every observed ASU reflection."""
        mean, sigma = self.sums.merged()
        observed = np.isfinite(mean)
        return MergedReflections(
            miller=self.mapper.miller[observed],
            intensity=mean[observed],
            sigma=sigma[observed],
            multiplicity=self.sums.count[observed],
            d=self.mapper.d_spacing()[observed],
            centric=self.mapper.centric[observed],
            epsilon=self.mapper.epsilon[observed],
        )

    def amplitudes(self, merged: MergedReflections | None = None) -> tuple[np.ndarray, np.ndarray]:
        """French–Wilson F and SIGF of the merged reflections."""
        merged = merged or self.merged()
        inv_d2 = merged.d**-2.0
        expected = mean_intensity_by_resolution(inv_d2, merged.intensity, merged.epsilon)
        return french_wilson(merged.intensity, merged.sigma, expected, merged.centric)

    def unmerged(self) -> UnmergedObservations:
        """The observations that entered the merge, scaled, in the consistent indexing mode."""
        columns = self._observations.columns()
        frames = self._frame_arrays
        frame = columns["frame"].astype(np.int64)
        mode = frames["mode"][frame]
        use = frames["active"][frame] & ~columns["outlier"]
        frame, mode = frame[use], mode[use]
        miller = columns["miller"][use].astype(np.int64)
        reindexed = np.einsum("nij,nj->ni", self.modes[mode], miller)
        asu_index, isym = self.mapper.map(reindexed)
        inv_d2 = self.mapper.inv_d2[asu_index]
        correction = scale_correction(inv_d2, frames["scale"][frame], frames["b"][frame]) * columns["partiality"][use]
        intensity = columns["intensity"][use] / correction
        mean, _ = self.sums.merged()
        sigma = self.error_model.inflate(columns["sigma"][use] / correction, np.nan_to_num(mean[asu_index]))
        return UnmergedObservations(
            miller=reindexed,
            asu_miller=self.mapper.miller[asu_index],
            isym=isym,
            batch=(frame + 1).astype(np.int32),
            intensity=intensity,
            sigma=sigma,
            frame_keys=list(self._keys),
        )

    def merge_update(
        self, dataset_id: str, trial: str, mtz_path: str | None = None, final: bool = False
    ) -> MergeUpdate:
        """The MergeUpdate message of the current state."""
        statistics = self.statistics() if self.sums.count.any() else None
        return MergeUpdate(
            dataset_id=dataset_id,
            trial=trial,
            run_ids=list(self.run_ids),
            frames_merged=self.frames_merged,
            frames_rejected=self.frames_rejected,
            overall=statistics.overall if statistics else None,
            shells=statistics.shells if statistics else [],
            suggested_resolution=statistics.suggested_d_min if statistics else None,
            ambiguity_resolved_fraction=self.ambiguity_resolved_fraction(),
            mtz_path=mtz_path,
            final=final,
        )
