"""Simulator-owned files: the ground truth beside a run (``<stem>.truth.h5``) and reflection-level runs.

Both are HDF5 with ragged per-frame data stored as concatenated rows plus an ``offsets`` array (rows of frame i are
offsets[i]:offsets[i+1]). The layouts are documented in docs/simulator.md; ``read_truth`` and
``read_reflection_run`` load them back with one call.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from libs.contracts.messages import ReflectionTable
from libs.simulator.config import SimulationConfig
from libs.simulator.experiment import Experiment, FrameTruth, ReflectionBatch

TRUTH_FORMAT = "sfx-live simulation truth"
REFLECTIONS_FORMAT = "sfx-live simulated reflections"
FORMAT_VERSION = 1

FRAME_FIELDS = ("hit", "A", "U", "cell", "scale", "b_factor", "domain_size", "mosaicity_deg", "background_level")
# Columns kept for the reflections of a reflection-level run when only a light truth is asked for.
LIGHT_REFLECTION_FIELDS = ("miller", "intensity_true", "partiality", "expected_counts", "d_spacing")


class TruthFileError(ValueError):
    """A truth or reflections file that cannot be read; the text names the file and the dataset."""


def truth_path_for(run_path: str | Path) -> Path:
    """``<stem>.truth.h5`` beside a run file (``run.nxs`` → ``run.truth.h5``)."""
    path = Path(run_path)
    return path.with_name(f"{path.stem}.truth.h5")


class TruthWriter:
    """Collects per-frame truth in memory and writes the truth file on ``close``.

    ``reflection_fields``: the per-reflection columns to keep (all by default; ``()`` keeps per-frame truth only).
    """

    def __init__(self, path: str | Path, experiment: Experiment, reflection_fields: tuple[str, ...] | None = None):
        self.path = Path(path)
        self.experiment = experiment
        self.reflection_fields = reflection_fields if reflection_fields is not None else FrameTruth.REFLECTION_FIELDS
        self._frame_chunks: list[dict[str, np.ndarray]] = []
        self._reflection_chunks: list[dict[str, np.ndarray]] = []

    def add(self, truth: FrameTruth) -> None:
        """One frame's truth."""
        nan3 = np.full((3, 3), np.nan)
        self._frame_chunks.append(
            {
                "index": np.array([truth.index], dtype=np.int64),
                "hit": np.array([truth.hit]),
                "A": (truth.A if truth.A is not None else nan3)[None],
                "U": (truth.U if truth.U is not None else nan3)[None],
                "cell": np.array([truth.cell or (np.nan,) * 6], dtype=float),
                "scale": np.array([truth.scale]),
                "b_factor": np.array([truth.b_factor]),
                "domain_size": np.array([truth.domain_size]),
                "mosaicity_deg": np.array([truth.mosaicity_deg]),
                "background_level": np.array([truth.background_level]),
                "indexing_operator": truth.indexing_operator[None].astype(np.int8),
                "reflection_count": np.array([len(truth)], dtype=np.int64),
                "second_A": (truth.other_lattices[0] if truth.other_lattices else nan3)[None],
            }
        )
        self._reflection_chunks.append({name: getattr(truth, name) for name in self.reflection_fields})

    def add_batch(self, batch: ReflectionBatch) -> None:
        """Every frame of a reflection batch (its truth columns are those of the integrated reflections)."""
        crystals = batch.batch.crystals
        hit = crystals.hit
        blank = ~hit

        def blanked(values: np.ndarray, fill: float) -> np.ndarray:
            values = np.array(values, dtype=float)
            values[blank] = fill
            return values

        self._frame_chunks.append(
            {
                "index": np.asarray(batch.indices, dtype=np.int64),
                "hit": hit,
                "A": blanked(crystals.A, np.nan),
                "U": blanked(crystals.U, np.nan),
                "cell": blanked(crystals.cell, np.nan),
                "scale": blanked(crystals.scale, 0.0),
                "b_factor": blanked(crystals.b_factor, 0.0),
                "domain_size": blanked(crystals.domain_size, np.nan),
                "mosaicity_deg": blanked(np.degrees(crystals.mosaicity), np.nan),
                "background_level": crystals.background_level,
                "indexing_operator": crystals.indexing_operator.astype(np.int8),
                "reflection_count": np.diff(batch.offsets),
                "second_A": np.full((len(hit), 3, 3), np.nan),
            }
        )
        self._reflection_chunks.append({name: batch.batch.columns[name] for name in self.reflection_fields})

    def close(self) -> None:
        write_truth_arrays(self.path, self.experiment, self._frame_chunks, self._reflection_chunks)

    def __enter__(self) -> TruthWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def write_truth(
    path: str | Path,
    experiment: Experiment,
    frames: list[FrameTruth],
    reflection_fields: tuple[str, ...] = FrameTruth.REFLECTION_FIELDS,
) -> None:
    """Write the ground truth of ``frames`` (in frame order) with the data set's true merged intensities."""
    writer = TruthWriter(path, experiment, reflection_fields)
    for truth in frames:
        writer.add(truth)
    writer.close()


def write_truth_arrays(
    path: str | Path,
    experiment: Experiment,
    frame_chunks: list[dict[str, np.ndarray]],
    reflection_chunks: list[dict[str, np.ndarray]],
) -> None:
    """Write per-frame and per-reflection truth given as chunks of arrays (see TruthWriter)."""
    path = Path(path)
    temporary = path.with_name(path.name + ".part")
    empty = FrameTruth(index=0, hit=False)
    with h5py.File(temporary, "w") as file:
        file.attrs["format"] = TRUTH_FORMAT
        file.attrs["format_version"] = FORMAT_VERSION
        file.attrs["config"] = experiment.config.model_dump_json()
        file.attrs["space_group"] = experiment.space_group.xhm()
        file.attrs["cell"] = np.array(experiment.cell)
        group = file.create_group("frames")
        counts = np.zeros(0, dtype=np.int64)
        if frame_chunks:
            for name in frame_chunks[0]:
                column = np.concatenate([chunk[name] for chunk in frame_chunks])
                if name == "reflection_count":
                    counts = column
                else:
                    group[name] = column
        file.attrs["n_frames"] = len(counts)
        offsets = np.zeros(len(counts) + 1, dtype=np.int64)
        offsets[1:] = np.cumsum(counts)
        group["reflection_offsets"] = offsets
        reflections = file.create_group("reflections")
        names = list(reflection_chunks[0]) if reflection_chunks else []
        for name in names:
            parts = [chunk[name] for chunk in reflection_chunks]
            column = np.concatenate(parts) if parts else getattr(empty, name)
            reflections.create_dataset(name, data=_storage(name, column), chunks=True if len(column) else None)
        merged = file.create_group("merged")
        miller, intensity = experiment.true_merged_intensities()
        merged["miller"] = miller.astype(np.int32)
        merged["intensity"] = intensity
    temporary.replace(path)


def _storage(name: str, column: np.ndarray) -> np.ndarray:
    """On-disk dtype: positions and excitation errors in float64, other reals in float32, small ints compact."""
    if name in ("miller",):
        return column.astype(np.int32)
    if name == "panel":
        return column.astype(np.int16)
    if column.dtype == bool:
        return column
    if name in ("fast", "slow", "excitation_error"):
        return column.astype(np.float64)
    return column.astype(np.float32)


@dataclass
class RunTruth:
    """The ground truth of a simulated run, loaded from its truth file."""

    path: Path
    config: SimulationConfig
    frames: dict[str, np.ndarray]  # per-frame arrays (n_frames, ...), see FRAME_FIELDS plus index/offsets
    reflections: dict[str, np.ndarray]  # concatenated per-reflection columns
    merged_miller: np.ndarray
    merged_intensity: np.ndarray

    @property
    def n_frames(self) -> int:
        return len(self.frames["hit"])

    @property
    def hit(self) -> np.ndarray:
        return self.frames["hit"]

    def frame(self, i: int) -> FrameTruth:
        """Truth of the i-th frame of the run (in file order; ``frames['index'][i]`` is its simulator index)."""
        if not 0 <= i < self.n_frames:
            raise IndexError(f"{self.path}: frame {i} out of range (run has {self.n_frames} frames)")
        offsets = self.frames["reflection_offsets"]
        rows = slice(int(offsets[i]), int(offsets[i + 1]))
        hit = bool(self.frames["hit"][i])
        values: dict[str, Any] = {
            "index": int(self.frames["index"][i]),
            "hit": hit,
            "scale": float(self.frames["scale"][i]),
            "b_factor": float(self.frames["b_factor"][i]),
            "domain_size": float(self.frames["domain_size"][i]),
            "mosaicity_deg": float(self.frames["mosaicity_deg"][i]),
            "background_level": float(self.frames["background_level"][i]),
            "indexing_operator": self.frames["indexing_operator"][i].astype(np.int64),
        }
        if hit:
            values |= {
                "A": self.frames["A"][i],
                "U": self.frames["U"][i],
                "cell": tuple(float(v) for v in self.frames["cell"][i]),
            }
        second = self.frames.get("second_A")
        if second is not None and np.isfinite(second[i]).all():
            values["other_lattices"] = [second[i]]
        for name, column in self.reflections.items():
            values[name] = column[rows].astype(np.int64) if name in ("miller", "panel") else column[rows]
        return FrameTruth(**values)


def _open_simulator_file(path: Path, expected_format: str) -> h5py.File:
    """Open a file written by the simulator, checking its ``format`` attribute; TruthFileError names the defect."""
    try:
        file = h5py.File(path, "r")
    except OSError as error:
        raise TruthFileError(f"{path}: cannot open as HDF5 ({error})") from error
    if file.attrs.get("format") != expected_format:
        file.close()
        raise TruthFileError(f"{path}: attribute 'format' is not {expected_format!r}; not written by sfx simulate")
    return file


def read_truth(path: str | Path) -> RunTruth:
    """Load a truth file written by ``sfx simulate`` (``<stem>.truth.h5``)."""
    path = Path(path)
    with _open_simulator_file(path, TRUTH_FORMAT) as file:
        try:
            config = SimulationConfig.model_validate_json(file.attrs["config"])
            frames = {name: file["frames"][name][()] for name in file["frames"]}
            if "hit" not in frames:
                frames |= {name: np.zeros(0) for name in ("index", "hit", *FRAME_FIELDS, "indexing_operator")}
            reflections = {name: file["reflections"][name][()] for name in file["reflections"]}
            merged_miller = file["merged/miller"][()].astype(np.int64)
            merged_intensity = file["merged/intensity"][()]
        except KeyError as error:
            raise TruthFileError(f"{path}: missing dataset or attribute ({error})") from error
    return RunTruth(path, config, frames, reflections, merged_miller, merged_intensity)


# --------------------------------------------------------------------------- reflection-level runs


class ReflectionRunWriter:
    """Writes the integrated reflections of a reflection-level run, batch by batch, into one HDF5 file."""

    def __init__(self, path: str | Path, experiment: Experiment) -> None:
        self.path = Path(path)
        self._temporary = self.path.with_name(self.path.name + ".part")
        self._file = h5py.File(self._temporary, "w")
        self._file.attrs["format"] = REFLECTIONS_FORMAT
        self._file.attrs["format_version"] = FORMAT_VERSION
        self._file.attrs["config"] = experiment.config.model_dump_json()
        self._file.attrs["space_group"] = experiment.space_group.xhm()
        self._file.attrs["cell"] = np.array(experiment.cell)
        self._file.attrs["wavelength"] = experiment.beam.wavelength
        frames = self._file.create_group("frames")
        reflections = self._file.create_group("reflections")
        self._datasets = {
            "frames/index": frames.create_dataset("index", (0,), np.int64, maxshape=(None,), chunks=(4096,)),
            "frames/hit": frames.create_dataset("hit", (0,), bool, maxshape=(None,), chunks=(4096,)),
            "frames/A": frames.create_dataset("A", (0, 3, 3), np.float64, maxshape=(None, 3, 3), chunks=(4096, 3, 3)),
            "frames/reflection_count": frames.create_dataset(
                "reflection_count", (0,), np.int64, maxshape=(None,), chunks=(4096,)
            ),
            "reflections/miller": reflections.create_dataset(
                "miller", (0, 3), np.int16, maxshape=(None, 3), chunks=(65536, 3)
            ),
        }
        for name in ("intensity", "sigma", "partiality"):
            self._datasets[f"reflections/{name}"] = reflections.create_dataset(
                name, (0,), np.float32, maxshape=(None,), chunks=(65536,)
            )

    def _append(self, name: str, values: np.ndarray) -> None:
        dataset = self._datasets[name]
        start = dataset.shape[0]
        dataset.resize(start + len(values), axis=0)
        dataset[start:] = values

    def append(self, batch: ReflectionBatch) -> None:
        hit = batch.batch.crystals.hit
        # The A a perfect indexer reports in its arbitrary setting R: r = A·h = (A·R⁻¹)·(R·h).
        indexed_A = batch.batch.crystals.A @ np.linalg.inv(batch.batch.crystals.indexing_operator)
        indexed_A[~hit] = np.nan
        self._append("frames/index", np.asarray(batch.indices, dtype=np.int64))
        self._append("frames/hit", hit)
        self._append("frames/A", indexed_A)
        self._append("frames/reflection_count", np.diff(batch.offsets))
        self._append("reflections/miller", batch.miller)
        self._append("reflections/intensity", batch.intensity)
        self._append("reflections/sigma", batch.sigma)
        self._append("reflections/partiality", batch.partiality)

    def close(self) -> None:
        counts = self._datasets["frames/reflection_count"][()]
        offsets = np.zeros(len(counts) + 1, dtype=np.int64)
        offsets[1:] = np.cumsum(counts)
        self._file["frames"].create_dataset("reflection_offsets", data=offsets)
        self._file.close()
        self._temporary.replace(self.path)


@dataclass
class ReflectionRun:
    """A reflection-level run in memory: concatenated columns and per-frame offsets."""

    path: Path
    config: SimulationConfig
    index: np.ndarray  # (n_frames,) simulator frame index
    hit: np.ndarray  # (n_frames,) bool
    A: np.ndarray  # (n_frames, 3, 3) as indexed; NaN for blanks
    offsets: np.ndarray  # (n_frames + 1,)
    miller: np.ndarray  # (n, 3) int16, as indexed
    intensity: np.ndarray  # (n,) float32, Lorentz-polarisation corrected
    sigma: np.ndarray
    partiality: np.ndarray

    @property
    def n_frames(self) -> int:
        return len(self.hit)

    def table(self, i: int) -> ReflectionTable | None:
        """The reflection table of the i-th frame in the file; None for a blank."""
        if not self.hit[i]:
            return None
        rows = slice(int(self.offsets[i]), int(self.offsets[i + 1]))
        return ReflectionTable(
            miller=self.miller[rows],
            intensity=self.intensity[rows],
            sigma=self.sigma[rows],
            partiality=self.partiality[rows],
        )

    def tables(self) -> Iterator[tuple[int, ReflectionTable | None]]:
        """(simulator frame index, table or None) for every frame, in file order."""
        for i in range(self.n_frames):
            yield int(self.index[i]), self.table(i)


def read_reflection_run(path: str | Path) -> ReflectionRun:
    """Load a reflection-level run written by ``sfx simulate --reflections-only``."""
    path = Path(path)
    with _open_simulator_file(path, REFLECTIONS_FORMAT) as file:
        try:
            return ReflectionRun(
                path=path,
                config=SimulationConfig.model_validate_json(file.attrs["config"]),
                index=file["frames/index"][()],
                hit=file["frames/hit"][()],
                A=file["frames/A"][()],
                offsets=file["frames/reflection_offsets"][()],
                miller=file["reflections/miller"][()],
                intensity=file["reflections/intensity"][()],
                sigma=file["reflections/sigma"][()],
                partiality=file["reflections/partiality"][()],
            )
        except KeyError as error:
            raise TruthFileError(f"{path}: missing dataset or attribute ({error})") from error


def config_json(config: SimulationConfig) -> str:
    """The configuration as indented JSON (for logs and documentation)."""
    return json.dumps(config.model_dump(), indent=2)
