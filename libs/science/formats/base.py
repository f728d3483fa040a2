"""What every run reader and writer shares: the reader interface, lazy slab reading, frame appending, units.

A run is one or more HDF5 files holding frames. A reader knows, for every panel, which hyperslab of a per-frame
data array holds it (``PanelSource``); a frame is assembled as (n_panels, n_slow, n_fast). Files are opened in
SWMR-read mode, so a file that another process is still appending to (written with ``live=True``) can be read while
it grows: ``refresh()`` picks up the new frames.

Completion: SWMR forbids creating objects after writing starts, so our writers create a scalar ``run_complete``
dataset (0) at the start and set it to 1 at ``close()``. A file without it says nothing: ``is_complete`` is None.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self

import h5py
import hdf5plugin
import numpy as np

from libs.science.formats.errors import FormatError
from libs.science.geometry import Beam, Detector

FileFormat = Literal["nxmx", "cxi"]
Compression = Literal["none", "bitshuffle-lz4"]

# NeXus (McStas) and CrystFEL both put +z along the beam, +y up; the DIALS lab frame has the beam along -z with +y
# up. The two are related by a 180° rotation about y (the same matrix both ways), exactly as dxtbx maps NXmx files.
MCSTAS_TO_LAB = np.diag([-1.0, 1.0, -1.0])

PLANCK_EV_ANGSTROM = 12398.419843320026  # h·c in eV·Å: E(eV) = hc / λ(Å)
RUN_COMPLETE_NAME = "run_complete"

_LENGTH_IN_MM = {
    "m": 1000.0,
    "metre": 1000.0,
    "meter": 1000.0,
    "cm": 10.0,
    "mm": 1.0,
    "millimetre": 1.0,
    "millimeter": 1.0,
    "um": 1e-3,
    "µm": 1e-3,
    "μm": 1e-3,
    "micron": 1e-3,
    "microns": 1e-3,
    "micrometre": 1e-3,
    "micrometer": 1e-3,
    "nm": 1e-6,
    "angstrom": 1e-7,
    "a": 1e-7,
    "å": 1e-7,
}
_ANGLE_IN_RAD = {"rad": 1.0, "radian": 1.0, "radians": 1.0, "deg": np.pi / 180, "degree": np.pi / 180}
_ANGLE_IN_RAD["degrees"] = _ANGLE_IN_RAD["deg"]


def _unit_scale(units: str | None, table: dict[str, float], kind: str, path: str | Path, field: str) -> float:
    """Factor of a ``units`` string from ``table``; FormatError naming the field if unknown or missing."""
    if units is None:
        raise FormatError(path, "has no units attribute", field=field)
    key = units.strip().lower()
    if key not in table:
        raise FormatError(path, f"unknown {kind} units {units!r}", field=field)
    return float(table[key])


def length_scale_mm(units: str | None, path: str | Path, field: str) -> float:
    """Millimetres per unit of a length ``units`` string."""
    return _unit_scale(units, _LENGTH_IN_MM, "length", path, field)


def angle_scale_rad(units: str | None, path: str | Path, field: str) -> float:
    """Radians per unit of an angle ``units`` string."""
    return _unit_scale(units, _ANGLE_IN_RAD, "angle", path, field)


def as_text(value: Any) -> str:
    """An HDF5 string attribute or dataset value (bytes, numpy bytes, str, 1-element array) as str."""
    if isinstance(value, np.ndarray):
        value = value.reshape(-1)[0] if value.size == 1 else value.tolist()
    if isinstance(value, bytes | np.bytes_):
        return bytes(value).decode("utf-8", errors="replace")
    return str(value)


def open_hdf5(path: Path, *, swmr: bool = True) -> h5py.File:
    """Open an HDF5 file for reading (SWMR-read so a growing file works), turning failures into FormatError."""
    if not path.exists():
        raise FormatError(path, "file does not exist")
    try:
        return h5py.File(path, "r", swmr=swmr)
    except (OSError, RuntimeError) as error:  # h5py raises RuntimeError for some damaged superblocks
        if swmr and "swmr" in str(error).lower():
            return open_hdf5(path, swmr=False)
        if "lock" in str(error).lower():
            raise FormatError(path, f"is locked by a writer that did not enable SWMR: {error}") from error
        raise FormatError(path, f"cannot be opened as HDF5 (truncated or not HDF5?): {error}") from error


def dataset_at(file: h5py.File, name: str, path: Path, *, purpose: str = "") -> h5py.Dataset:
    """The dataset ``name`` of ``file`` or a FormatError naming it as missing (or broken, for a dangling link)."""
    try:
        node = file[name]
    except KeyError as error:
        what = f" ({purpose})" if purpose else ""
        raise FormatError(path, f"dataset is missing{what}", field=name) from error
    except OSError as error:
        raise FormatError(path, f"cannot be opened (external file missing or broken?): {error}", field=name) from error
    if not isinstance(node, h5py.Dataset):
        raise FormatError(path, "is a group, expected a dataset", field=name)
    return node


def describe(error: Exception) -> str:
    """A short message for a validation error (pydantic's own text is long)."""
    errors = getattr(error, "errors", None)
    if callable(errors):
        return "; ".join(str(item.get("msg", item)).removeprefix("Value error, ") for item in errors())
    return str(error)


def common_size_check(sizes: list[tuple[int, int]], names: list[str], path: str | Path, fields: list[str]) -> None:
    """All panels must have the same (n_fast, n_slow): name the first that differs from the most common size."""
    values, counts = np.unique(np.array(sizes), axis=0, return_counts=True)
    usual = tuple(int(v) for v in values[int(np.argmax(counts))])
    for size, name, field_name in zip(sizes, names, fields, strict=True):
        if tuple(size) != usual:
            raise FormatError(
                path,
                f"panel {name} is {size[0]} × {size[1]} pixels (fast × slow) but the others are "
                f"{usual[0]} × {usual[1]}: all panels must be the same size",
                field=field_name,
            )


def unit_vector(vector: Any, path: str | Path, field: str, tolerance: float = 1e-3) -> np.ndarray:
    """A 3-vector checked to be of unit length (within ``tolerance``) and then normalised exactly."""
    try:
        array = np.asarray(vector, dtype=float).reshape(-1)
    except (TypeError, ValueError) as error:
        raise FormatError(path, f"is not a vector: {vector!r}", field=field) from error
    if array.shape != (3,) or not np.all(np.isfinite(array)):
        raise FormatError(path, f"must be 3 finite numbers, got {array.tolist()}", field=field)
    norm = float(np.linalg.norm(array))
    if abs(norm - 1.0) > tolerance:
        raise FormatError(path, f"is not a unit vector (length {norm:.6g}): {array.tolist()}", field=field)
    return array / norm


@dataclass(frozen=True)
class PanelSource:
    """Where a panel's pixels are in a file: the dataset path and the index into one frame's array of it."""

    dataset: str
    index: tuple[int | slice, ...]


@dataclass
class Segment:
    """One file's share of a run: its open datasets (by path) and how many frames it contributes."""

    path: Path
    file: h5py.File
    datasets: dict[str, h5py.Dataset]
    has_frame_axis: bool = True
    first_frame: int = 0
    frame_count: int = 0
    image_numbers: tuple[int, int] | None = field(default=None)  # declared (first, last), 1-based, if the file says


class RunReader(ABC):
    """Frames and geometry of a run, read lazily from one or many files.

    ``detector``/``beam``/``mask`` describe the run (mask: bool, True = valid pixel, shape of a frame);
    ``frame_count`` is the number of frames readable now; ``refresh()`` re-reads it for a growing file.
    """

    detector: Detector
    beam: Beam
    mask: np.ndarray
    paths: list[Path]
    file_format: FileFormat

    @property
    @abstractmethod
    def frame_count(self) -> int: ...

    @property
    @abstractmethod
    def is_complete(self) -> bool | None:
        """True once the writer closed the run, False while it writes, None if the files do not say."""

    @abstractmethod
    def read_frames(self, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        """Frames start..stop-1 as an array (stop - start, n_panels, n_slow, n_fast).

        ``out``: a C-contiguous array of that shape to read into (reusing one buffer saves the page faults of a
        fresh large allocation per chunk); it is returned.
        """

    @abstractmethod
    def refresh(self) -> int:
        """Re-read the extent of growing files; returns the new frame count."""

    @abstractmethod
    def close(self) -> None: ...

    def read_frame(self, index: int) -> np.ndarray:
        """One frame (n_panels, n_slow, n_fast)."""
        return self.read_frames(index, index + 1)[0]

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.close()


class SlabRunReader(RunReader):
    """A run whose panels are hyperslabs of per-frame arrays, in one or more files (segments) read in order."""

    def __init__(
        self,
        *,
        file_format: FileFormat,
        detector: Detector,
        beam: Beam,
        mask: np.ndarray,
        panel_sources: list[PanelSource],
        segments: list[Segment],
        completion: list[tuple[Path, h5py.Dataset]],
        extra_files: list[h5py.File] | None = None,
    ) -> None:
        self.file_format = file_format
        self.detector = detector
        self.beam = beam
        self.mask = mask
        self.paths = [segment.path for segment in segments]
        self._panel_sources = panel_sources
        self._segments = segments
        self._completion = completion
        self._extra_files = extra_files or []
        self._closed = False
        self._check_panel_sources()
        self._count_frames(refresh=False)
        self._stacked = self._stacked_layout()

    # -- geometry of the data ------------------------------------------------------------------------------------

    def _check_panel_sources(self) -> None:
        """Each panel's hyperslab must lie inside its dataset's per-frame array and have the panel's shape."""
        panel_shape = self.detector.frame_shape[1:]
        for segment in self._segments:
            for panel, source in zip(self.detector.panels, self._panel_sources, strict=True):
                dataset = segment.datasets[source.dataset]
                frame_shape = dataset.shape[1:] if segment.has_frame_axis else dataset.shape
                if len(source.index) != len(frame_shape):
                    raise FormatError(
                        segment.path,
                        f"panel {panel.name} addresses {len(source.index)} dimensions but a frame of this "
                        f"dataset has {len(frame_shape)} (shape {dataset.shape})",
                        field=dataset.name,
                    )
                extent = []
                for axis, (item, size) in enumerate(zip(source.index, frame_shape, strict=True)):
                    if isinstance(item, int):
                        if not 0 <= item < size:
                            raise FormatError(
                                segment.path,
                                f"panel {panel.name}: index {item} on axis {axis} outside the data ({size})",
                                field=dataset.name,
                            )
                        continue
                    start, stop, step = item.indices(size)
                    if item.start is not None and (item.start < 0 or item.stop is None or item.stop > size):
                        raise FormatError(
                            segment.path,
                            f"panel {panel.name}: pixels {item.start}..{item.stop} on axis {axis} do not fit the "
                            f"data's {size} (shape {dataset.shape})",
                            field=dataset.name,
                        )
                    extent.append(len(range(start, stop, step)))
                if tuple(extent) != panel_shape:
                    raise FormatError(
                        segment.path,
                        f"panel {panel.name}: hyperslab of shape {tuple(extent)} does not match the panel's "
                        f"(n_slow, n_fast) = {panel_shape}",
                        field=dataset.name,
                    )

    def _stacked_layout(self) -> bool:
        """True when the panels are consecutive blocks of one (n_panels·n_slow, n_fast) array: reshape, no copy."""
        n_panels, n_slow, n_fast = self.detector.frame_shape
        names = {source.dataset for source in self._panel_sources}
        if len(names) != 1:
            return False
        for number, source in enumerate(self._panel_sources):
            expected = (slice(number * n_slow, (number + 1) * n_slow, 1), slice(0, n_fast, 1))
            if source.index != expected:
                return False
        for segment in self._segments:
            dataset = segment.datasets[self._panel_sources[0].dataset]
            frame_shape = dataset.shape[1:] if segment.has_frame_axis else dataset.shape
            if frame_shape != (n_panels * n_slow, n_fast):
                return False
        return True

    # -- frame counting -------------------------------------------------------------------------------------------

    def _count_frames(self, *, refresh: bool) -> None:
        complete = self.is_complete is not False
        first = 0
        for segment in self._segments:
            counts = {}
            for name, dataset in segment.datasets.items():
                if refresh and dataset.file.swmr_mode:
                    try:
                        dataset.refresh()
                    except (OSError, ValueError, RuntimeError) as error:
                        raise FormatError(segment.path, f"cannot refresh: {error}", field=name) from error
                counts[name] = dataset.shape[0] if segment.has_frame_axis else 1
            if len(set(counts.values())) > 1 and complete:
                raise FormatError(
                    segment.path,
                    f"panel datasets hold different frame counts: {counts}",
                    field=", ".join(dataset.name for dataset in segment.datasets.values()),
                )
            segment.first_frame = first
            segment.frame_count = min(counts.values())
            if segment.image_numbers is not None and complete:
                low, high = segment.image_numbers
                if high - low + 1 != segment.frame_count or low != first + 1:
                    raise FormatError(
                        segment.path,
                        f"declares images {low}..{high} but holds {segment.frame_count} frames "
                        f"starting at image {first + 1} of the run (wrong frame count)",
                        field=next(iter(segment.datasets.values())).name,
                    )
            first += segment.frame_count
        self._frame_count = first

    @property
    def frame_count(self) -> int:
        return self._frame_count

    @property
    def is_complete(self) -> bool | None:
        if not self._completion:
            return None
        for path, flag in self._completion:
            try:
                if flag.file.swmr_mode:
                    flag.refresh()
                if int(flag[()]) != 1:
                    return False
            except (OSError, ValueError, RuntimeError) as error:
                raise FormatError(path, f"cannot be read: {error}", field=flag.name) from error
        return True

    def refresh(self) -> int:
        self._count_frames(refresh=True)
        return self._frame_count

    # -- reading --------------------------------------------------------------------------------------------------

    def read_frames(self, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        if self._closed:
            raise ValueError("reader is closed")
        if not 0 <= start <= stop <= self._frame_count:
            raise IndexError(f"frames {start}..{stop} outside the run's {self._frame_count} readable frames")
        shape = (stop - start, *self.detector.frame_shape)
        if out is None:
            out = np.empty(shape, dtype=self._dtype())
        elif out.shape != shape or not out.flags.c_contiguous:
            raise ValueError(f"out must be a C-contiguous array of shape {shape}, got {out.shape}")
        for segment in self._segments:
            low = max(start, segment.first_frame)
            high = min(stop, segment.first_frame + segment.frame_count)
            if low < high:
                self._read_segment(
                    segment, low - segment.first_frame, high - segment.first_frame, out[low - start : high - start]
                )
        return out

    def _dtype(self) -> np.dtype[Any]:
        segment = self._segments[0]
        return segment.datasets[self._panel_sources[0].dataset].dtype

    def _read_block(
        self, segment: Segment, name: str, start: int, stop: int, into: np.ndarray | None = None
    ) -> np.ndarray:
        """Frames start..stop-1 of one dataset of a segment (into ``into`` when given, shaped like the data)."""
        dataset = segment.datasets[name]
        try:
            if not segment.has_frame_axis:
                return np.asarray(dataset[()])[None]
            if into is not None:
                dataset.read_direct(into, np.s_[start:stop])
                return into
            return np.asarray(dataset[start:stop])
        except (OSError, ValueError, RuntimeError, KeyError, TypeError) as error:
            if stop - start > 1:  # find the first frame that fails, so the message names it
                for frame in range(start, stop):
                    self._read_block(segment, name, frame, frame + 1)
            raise FormatError(
                segment.path,
                f"cannot be read or decoded ({error})",
                frame=segment.first_frame + start,
                field=dataset.name,
            ) from error

    def _read_segment(self, segment: Segment, start: int, stop: int, out: np.ndarray) -> None:
        count = stop - start
        if self._stacked and segment.has_frame_axis:
            n_panels, n_slow, n_fast = self.detector.frame_shape
            self._read_block(
                segment, self._panel_sources[0].dataset, start, stop, out.reshape(count, n_panels * n_slow, n_fast)
            )
            return
        blocks: dict[str, np.ndarray] = {}
        for number, source in enumerate(self._panel_sources):
            if source.dataset not in blocks:
                blocks[source.dataset] = self._read_block(segment, source.dataset, start, stop)
            out[:, number] = blocks[source.dataset][(slice(None), *source.index)]

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        seen: set[int] = set()
        for file in [segment.file for segment in self._segments] + self._extra_files:
            if id(file) not in seen:
                seen.add(id(file))
                file.close()


# ---------------------------------------------------------------------------------------------------------------------
# Writing


class RunWriter(ABC):
    """Appends frames (n_panels, n_slow, n_fast) to a run; ``close()`` marks the run complete."""

    path: Path

    @abstractmethod
    def append(self, image: np.ndarray) -> None: ...

    @abstractmethod
    def close(self) -> None: ...

    @property
    @abstractmethod
    def frame_count(self) -> int: ...

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.close()


def compression_options(compression: Compression) -> dict[str, Any]:
    """h5py create_dataset keywords for a compression choice."""
    if compression == "none":
        return {}
    if compression == "bitshuffle-lz4":
        return dict(hdf5plugin.Bitshuffle(nelems=0, cname="lz4"))
    raise ValueError(f"compression must be 'none' or 'bitshuffle-lz4', got {compression!r}")


def create_hdf5(path: Path, *, live: bool) -> h5py.File:
    """A new HDF5 file whose format HDF5 1.10 (Debian's, used by DIALS) still reads; SWMR-capable when live."""
    path.parent.mkdir(parents=True, exist_ok=True)
    libver = ("v110", "v110") if live else ("earliest", "v110")
    return h5py.File(path, "w", libver=libver)


class FrameStack:
    """A growing (frames, n_panels·n_slow, n_fast) dataset, one chunk per panel per frame."""

    def __init__(
        self,
        group: h5py.Group,
        name: str,
        frame_shape: tuple[int, int, int],
        dtype: np.dtype[Any],
        compression: Compression,
        *,
        live: bool,
    ) -> None:
        n_panels, n_slow, n_fast = frame_shape
        self.frame_shape = frame_shape
        self.dtype = dtype
        self.live = live
        self._count = 0
        self.dataset = group.create_dataset(
            name,
            shape=(0, n_panels * n_slow, n_fast),
            maxshape=(None, n_panels * n_slow, n_fast),
            chunks=(1, n_slow, n_fast),
            dtype=dtype,
            **compression_options(compression),
        )

    @property
    def count(self) -> int:
        return self._count

    def append(self, image: np.ndarray) -> None:
        """Add one frame; in live mode flush it so SWMR readers see it at once."""
        n_panels, n_slow, n_fast = self.frame_shape
        count = self._count
        self.dataset.resize(count + 1, axis=0)
        self.dataset[count] = image.reshape(n_panels * n_slow, n_fast)
        self._count = count + 1
        if self.live:
            self.dataset.flush()


def checked_image(
    image: np.ndarray, frame_shape: tuple[int, int, int], dtype: np.dtype[Any], number: int
) -> np.ndarray:
    """The image as ``dtype``, or ValueError if its shape is wrong or the cast would lose its kind of values."""
    array = np.asarray(image)
    if array.shape != frame_shape:
        raise ValueError(f"frame {number}: shape {array.shape} differs from the detector's {frame_shape}")
    if not np.can_cast(array.dtype, dtype, casting="same_kind"):
        raise ValueError(f"frame {number}: dtype {array.dtype} cannot be stored as {dtype} without changing kind")
    return array.astype(dtype, copy=False)


def resolve_link_path(master: Path, filename: str) -> Path:
    """An external file named in ``master`` (relative names are relative to the master's folder)."""
    candidate = Path(filename)
    return candidate if candidate.is_absolute() else master.parent / candidate


def relative_name(target: Path, master: Path) -> str:
    """How ``master`` should name ``target``: relative when beside it (so a run folder can be moved)."""
    try:
        return os.path.relpath(target, master.parent)
    except ValueError:
        return str(target.resolve())
