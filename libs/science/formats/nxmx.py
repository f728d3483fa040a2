"""NXmx (NeXus) HDF5 runs: a writer in the layout detector software uses and a reader that follows the standard.

Geometry in NeXus is in the McStas frame (+z along the beam, +y up); our lab frame (DIALS) has the beam along -z.
Every vector and position crosses between them with ``MCSTAS_TO_LAB`` (diag(-1, 1, -1)), as dxtbx does, so DIALS
sees the geometry we mean. A panel is an NXdetector_module: its origin (the outer corner of pixel (0, 0)) is where the
transformation chain of ``fast_pixel_direction``'s ``depends_on`` puts the point (0, 0, 0); its fast and slow axes are
the pixel-direction vectors turned by the rotations of their chains; its pixels are the hyperslab ``data_origin`` +
``data_size`` (slow, fast order) of each frame of ``/entry/data/data``.
"""

from __future__ import annotations

import datetime
import re
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from pydantic import ValidationError

from libs.science.formats.base import (
    MCSTAS_TO_LAB,
    RUN_COMPLETE_NAME,
    Compression,
    FrameStack,
    PanelSource,
    RunWriter,
    Segment,
    SlabRunReader,
    angle_scale_rad,
    as_text,
    checked_image,
    common_size_check,
    create_hdf5,
    dataset_at,
    describe,
    length_scale_mm,
    open_hdf5,
    relative_name,
    resolve_link_path,
    unit_vector,
)
from libs.science.formats.errors import FormatError
from libs.science.geometry import Beam, Detector, GeometryError, Panel

_DETECTOR = "/entry/instrument/detector"
_DATA_FILE_LINK = re.compile(r"^data_(\d{6})$")
_MAX_CHAIN = 64


def _nx(group: h5py.Group, nx_class: str) -> None:
    group.attrs["NX_class"] = nx_class


def _scalar(group: h5py.Group, name: str, value: Any, **attrs: Any) -> h5py.Dataset:
    dataset = group.create_dataset(name, data=value)
    for key, item in attrs.items():
        dataset.attrs[key] = item
    return dataset


def _transformation(
    group: h5py.Group,
    name: str,
    value: float,
    *,
    kind: str,
    vector: np.ndarray,
    depends_on: str,
    units: str,
) -> None:
    _scalar(
        group,
        name,
        float(value),
        transformation_type=kind,
        vector=np.asarray(vector, dtype=float),
        offset=np.zeros(3),
        offset_units="mm",
        units=units,
        depends_on=depends_on,
    )


class NxmxRunWriter(RunWriter):
    """Writes a run as an NXmx master file, with the frames inside it or in linked data files.

    ``frames_per_data_file``: frames go to ``<stem>_data_000001.h5``, ... (``/entry/data/data`` in each), linked from
    the master as ``/entry/data/data_000001``, ...; at close the master also gets ``/entry/data/data``, a virtual
    dataset over all of them (what dxtbx reads). ``live``: SWMR, each frame flushed as it is appended.
    """

    def __init__(
        self,
        path: Path,
        detector: Detector,
        beam: Beam,
        *,
        mask: np.ndarray | None = None,
        compression: Compression = "none",
        live: bool = False,
        frames_per_data_file: int | None = None,
        dtype: np.dtype[Any] | str = "int32",
    ) -> None:
        if frames_per_data_file is not None and frames_per_data_file < 1:
            raise ValueError(f"frames_per_data_file must be at least 1, got {frames_per_data_file}")
        if live and frames_per_data_file is not None:
            raise ValueError("live=True needs the frames in the master file: SWMR cannot add data-file links")
        self.path = Path(path)
        self.detector = detector
        self.frame_shape = detector.frame_shape
        self.dtype = np.dtype(dtype)
        self.compression: Compression = compression
        self.live = live
        self.frames_per_data_file = frames_per_data_file
        self._count = 0
        self._closed = False
        self._data_files: list[tuple[Path, h5py.File, FrameStack]] = []
        self._file = create_hdf5(self.path, live=live)
        try:
            self._write_metadata(detector, beam, mask)
            self._stack: FrameStack | None = None
            if frames_per_data_file is None:
                self._stack = FrameStack(
                    self._file["/entry/data"], "data", self.frame_shape, self.dtype, compression, live=live
                )
            if live:
                self._file.swmr_mode = True
        except BaseException:
            self._file.close()
            raise

    @property
    def frame_count(self) -> int:
        return self._count

    def _write_metadata(self, detector: Detector, beam: Beam, mask: np.ndarray | None) -> None:
        n_panels, n_slow, n_fast = self.frame_shape
        root = self._file
        root.attrs["default"] = "entry"
        entry = root.create_group("entry")
        _nx(entry, "NXentry")
        entry.attrs["default"] = "data"
        _scalar(entry, "definition", "NXmx")
        _scalar(entry, "start_time", datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"))
        _scalar(
            entry,
            RUN_COMPLETE_NAME,
            np.int8(0),
            description="0 while frames are still being appended, 1 once the writer closed the run",
        )

        instrument = entry.create_group("instrument")
        _nx(instrument, "NXinstrument")
        _scalar(instrument, "name", "sfx-live simulated XFEL instrument", short_name="sfx-live")

        beam_group = instrument.create_group("beam")
        _nx(beam_group, "NXbeam")
        _scalar(beam_group, "incident_wavelength", beam.wavelength, units="angstrom")
        _scalar(beam_group, "incident_wavelength_spread", beam.bandwidth * beam.wavelength, units="angstrom")
        _scalar(beam_group, "incident_beam_divergence", beam.divergence, units="rad")
        # Stokes (I, Q, U, V): a fraction f polarised along the horizontal x has Q = 2f - 1.
        _scalar(beam_group, "incident_polarization_stokes", [1.0, 2 * beam.polarization_fraction - 1, 0.0, 0.0])

        group = instrument.create_group("detector")
        _nx(group, "NXdetector")
        _scalar(group, "description", f"{n_panels}-module pixel array detector" if n_panels > 1 else "pixel array")
        _scalar(group, "type", "PIXEL")
        _scalar(group, "sensor_material", "Si")
        _scalar(group, "sensor_thickness", 0.32, units="mm")
        _scalar(group, "depends_on", f"{_DETECTOR}/transformations/detector_z")
        pixel_mask = np.zeros((n_panels * n_slow, n_fast), dtype=np.uint32)
        if mask is not None:
            valid = np.asarray(mask)
            if valid.shape != self.frame_shape or valid.dtype != bool:
                raise ValueError(f"mask must be a bool array of shape {self.frame_shape} (True = valid pixel)")
            pixel_mask[~valid.reshape(n_panels * n_slow, n_fast)] = 1 << 1  # NeXus bit 1: dead pixel
        group.create_dataset("pixel_mask", data=pixel_mask, compression="gzip", compression_opts=4)
        _scalar(group, "pixel_mask_applied", False)

        transformations = group.create_group("transformations")
        _nx(transformations, "NXtransformations")
        origins = np.array([MCSTAS_TO_LAB @ np.asarray(panel.origin) for panel in detector.panels])
        distance = float(np.mean(origins[:, 2]))
        _transformation(
            transformations,
            "detector_z",
            distance,
            kind="translation",
            vector=np.array([0.0, 0.0, 1.0]),
            depends_on=".",
            units="mm",
        )
        for number, panel in enumerate(detector.panels):
            module = group.create_group(f"module_{number:02d}")
            _nx(module, "NXdetector_module")
            module.create_dataset("data_origin", data=np.array([number * n_slow, 0], dtype=np.int32))
            module.create_dataset("data_size", data=np.array([n_slow, n_fast], dtype=np.int32))
            module.create_dataset("data_stride", data=np.array([1, 1], dtype=np.int32))
            _scalar(module, "panel_name", panel.name)
            shift = origins[number] - np.array([0.0, 0.0, distance])
            length = float(np.linalg.norm(shift))
            direction = shift / length if length > 0 else np.array([1.0, 0.0, 0.0])
            _transformation(
                module,
                "module_offset",
                length,
                kind="translation",
                vector=direction,
                depends_on=f"{_DETECTOR}/transformations/detector_z",
                units="mm",
            )
            for axis_name, axis in (
                ("fast_pixel_direction", panel.fast_axis),
                ("slow_pixel_direction", panel.slow_axis),
            ):
                _transformation(
                    module,
                    axis_name,
                    panel.pixel_size,
                    kind="translation",
                    vector=MCSTAS_TO_LAB @ np.asarray(axis),
                    depends_on=f"{_DETECTOR}/{module.name.rsplit('/', 1)[-1]}/module_offset",
                    units="mm",
                )

        sample = entry.create_group("sample")
        _nx(sample, "NXsample")
        _scalar(sample, "name", "microcrystals (serial)")
        _scalar(sample, "depends_on", ".")  # still shots: no goniometer

        data = entry.create_group("data")
        _nx(data, "NXdata")
        data.attrs["signal"] = "data"

    def append(self, image: np.ndarray) -> None:
        if self._closed:
            raise ValueError(f"{self.path}: writer is closed")
        frame = checked_image(image, self.frame_shape, self.dtype, self._count)
        if self._stack is not None:
            self._stack.append(frame)
        else:
            per_file = self.frames_per_data_file or 1
            if self._count % per_file == 0:
                self._start_data_file()
            self._data_files[-1][2].append(frame)
        self._count += 1

    def _start_data_file(self) -> None:
        self._finish_data_file()
        number = len(self._data_files) + 1
        data_path = self.path.with_name(f"{self.path.stem}_data_{number:06d}.h5")
        file = create_hdf5(data_path, live=False)
        entry = file.create_group("entry")
        _nx(entry, "NXentry")
        group = entry.create_group("data")
        _nx(group, "NXdata")
        group.attrs["signal"] = "data"
        stack = FrameStack(group, "data", self.frame_shape, self.dtype, self.compression, live=False)
        self._data_files.append((data_path, file, stack))
        self._file["/entry/data"][f"data_{number:06d}"] = h5py.ExternalLink(
            relative_name(data_path, self.path), "/entry/data/data"
        )

    def _finish_data_file(self) -> None:
        """Close the current data file, recording which images of the run it holds (1-based, as Eiger does)."""
        if not self._data_files or not self._data_files[-1][1]:
            return
        _, file, stack = self._data_files[-1]
        if not file.id.valid:
            return
        first = sum(s.count for _, _, s in self._data_files[:-1]) + 1
        stack.dataset.attrs["image_nr_low"] = np.int32(first)
        stack.dataset.attrs["image_nr_high"] = np.int32(first + stack.count - 1)
        file.close()

    def _write_virtual_dataset(self) -> None:
        n_panels, n_slow, n_fast = self.frame_shape
        layout = h5py.VirtualLayout(shape=(self._count, n_panels * n_slow, n_fast), dtype=self.dtype)
        start = 0
        for data_path, _, stack in self._data_files:
            source = h5py.VirtualSource(
                relative_name(data_path, self.path), "/entry/data/data", shape=(stack.count, n_panels * n_slow, n_fast)
            )
            layout[start : start + stack.count] = source
            start += stack.count
        self._file["/entry/data"].create_virtual_dataset("data", layout, fillvalue=0)

    def close(self) -> None:
        """Finish the run: flush, mark it complete (run_complete = 1) and close every file."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._data_files:
                self._finish_data_file()
                self._write_virtual_dataset()
            elif self._stack is None:  # data files were asked for but no frame came: an empty run, not a broken one
                FrameStack(self._file["/entry/data"], "data", self.frame_shape, self.dtype, "none", live=False)
            flag = self._file[f"/entry/{RUN_COMPLETE_NAME}"]
            flag[()] = np.int8(1)
            if self.live:
                flag.flush()
        finally:
            self._file.close()


# ---------------------------------------------------------------------------------------------------------------------
# Reading


def _nx_class(node: h5py.HLObject) -> str:
    return as_text(node.attrs.get("NX_class", ""))


def _children_of_class(group: h5py.Group, nx_class: str) -> list[h5py.Group]:
    found = []
    for name in sorted(group, key=_natural_key):
        link = group.get(name, getlink=True)
        if isinstance(link, h5py.ExternalLink):
            continue  # data files: never opened just to look for classes
        node = group.get(name)
        if isinstance(node, h5py.Group) and _nx_class(node) == nx_class:
            found.append(node)
    return found


def _natural_key(name: str) -> list[Any]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _nxmx_entry(file: h5py.File) -> h5py.Group | None:
    for entry in _children_of_class(file, "NXentry"):
        if "definition" in entry and as_text(entry["definition"][()]) == "NXmx":
            return entry
    return None


def is_nxmx_master(path: Path) -> bool:
    """Whether ``path`` is an HDF5 file with an NXentry whose definition is NXmx."""
    with open_hdf5(path) as file:
        return _nxmx_entry(file) is not None


def _first_value(dataset: h5py.Dataset, path: Path) -> float:
    """The value of a transformation: a scalar, or a per-frame array that must not vary (moving panels)."""
    values = np.asarray(dataset[()], dtype=float).reshape(-1)
    if values.size == 0:
        raise FormatError(path, "is empty", field=dataset.name)
    if not np.allclose(values, values[0], rtol=0, atol=1e-9):
        raise FormatError(
            path, "varies from frame to frame; moving detector parts are not supported", field=dataset.name
        )
    if not np.isfinite(values[0]):
        raise FormatError(path, f"is not finite ({values[0]})", field=dataset.name)
    return float(values[0])


def _transformation_matrix(dataset: h5py.Dataset, path: Path) -> np.ndarray:
    """The 4×4 matrix of one NXtransformations axis: [R | o] (rotation) or [I | o + value·vector] (translation)."""
    field = dataset.name
    kind = as_text(dataset.attrs.get("transformation_type", "")).lower()
    if kind not in ("translation", "rotation"):
        raise FormatError(path, f"transformation_type must be translation or rotation, got {kind!r}", field=field)
    if "vector" not in dataset.attrs:
        raise FormatError(path, "has no vector attribute", field=field)
    vector = unit_vector(dataset.attrs["vector"], path, f"{field}@vector")
    value = _first_value(dataset, path)
    units = as_text(dataset.attrs["units"]) if "units" in dataset.attrs else None
    matrix = np.identity(4)
    if kind == "translation":
        matrix[:3, 3] = value * length_scale_mm(units, path, f"{field}@units") * vector
    else:
        angle = value * angle_scale_rad(units, path, f"{field}@units")
        matrix[:3, :3] = _rotation(vector, angle)
    if "offset" in dataset.attrs:
        offset = np.asarray(dataset.attrs["offset"], dtype=float).reshape(-1)
        if offset.shape != (3,):
            raise FormatError(path, f"offset must be 3 numbers, got {offset.tolist()}", field=f"{field}@offset")
        if np.any(offset):
            offset_units: str | None
            if "offset_units" in dataset.attrs:
                offset_units = as_text(dataset.attrs["offset_units"])
            elif kind == "translation":
                offset_units = units  # some writers give offsets in the axis units (dxtbx accepts this too)
            else:
                raise FormatError(path, "a rotation's offset needs offset_units", field=f"{field}@offset_units")
            matrix[:3, 3] += offset * length_scale_mm(offset_units, path, f"{field}@offset_units")
    return matrix


def _rotation(axis: np.ndarray, angle: float) -> np.ndarray:
    """Right-handed rotation by ``angle`` radians about the unit ``axis`` (Rodrigues)."""
    x, y, z = axis
    cross = np.array([[0.0, -z, y], [z, 0.0, -x], [-y, x, 0.0]])
    return np.identity(3) + np.sin(angle) * cross + (1 - np.cos(angle)) * (cross @ cross)


def _resolve_depends_on(holder: h5py.HLObject, target: str, path: Path, field: str) -> h5py.Dataset | None:
    """The dataset a depends_on names (absolute, or relative to the group holding the attribute); None for '.'."""
    if target in ("", "."):
        return None
    base = holder.parent if isinstance(holder, h5py.Dataset) else holder
    try:
        node = holder.file[target] if target.startswith("/") else base[target]
    except KeyError as error:
        raise FormatError(path, f"depends_on names {target!r}, which does not exist", field=field) from error
    if not isinstance(node, h5py.Dataset):
        raise FormatError(path, f"depends_on names {target!r}, which is not a dataset", field=field)
    return node


def _chain_matrix(first: h5py.Dataset | None, path: Path, field: str) -> np.ndarray:
    """Cumulative transformation of a depends_on chain starting at ``first``: A_n ··· A_2 · A_1."""
    matrix = np.identity(4)
    node = first
    visited: list[str] = []
    while node is not None:
        if node.name in visited or len(visited) > _MAX_CHAIN:
            raise FormatError(path, f"depends_on chain loops: {' -> '.join([*visited, node.name])}", field=field)
        visited.append(node.name)
        matrix = _transformation_matrix(node, path) @ matrix
        next_name = as_text(node.attrs.get("depends_on", "."))
        node = _resolve_depends_on(node, next_name, path, f"{node.name}@depends_on")
    return matrix


def _module_panel(module: h5py.Group, path: Path) -> tuple[Panel, tuple[int | slice, ...]]:
    """A Panel (our lab frame) and its hyperslab in one frame of the data array, from an NXdetector_module."""
    name = module.name
    for required in ("data_origin", "data_size", "fast_pixel_direction", "slow_pixel_direction"):
        if required not in module:
            raise FormatError(path, "is missing (required in NXdetector_module)", field=f"{name}/{required}")
    origin_index = np.asarray(module["data_origin"][()]).reshape(-1)
    size = np.asarray(module["data_size"][()]).reshape(-1)
    stride = np.asarray(module["data_stride"][()]).reshape(-1) if "data_stride" in module else np.ones_like(size)
    if not (origin_index.shape == size.shape == stride.shape) or size.size not in (2, 3):
        raise FormatError(
            path,
            f"data_origin {origin_index.tolist()}, data_size {size.tolist()} and data_stride {stride.tolist()} "
            "must be 2 or 3 numbers each",
            field=f"{name}/data_size",
        )
    if np.any(size < 1) or np.any(origin_index < 0) or np.any(stride < 1):
        raise FormatError(
            path, f"data_size {size.tolist()} / data_origin {origin_index.tolist()} invalid", field=f"{name}/data_size"
        )
    pixel_axes = [axis for axis in range(size.size) if size[axis] > 1 or axis >= size.size - 2]
    pixel_axes = pixel_axes[-2:]
    if np.prod(size) != size[pixel_axes[0]] * size[pixel_axes[1]]:
        raise FormatError(path, f"data_size {size.tolist()} spans more than two dimensions", field=f"{name}/data_size")
    index: list[int | slice] = []
    for axis in range(size.size):
        start, count, step = int(origin_index[axis]), int(size[axis]), int(stride[axis])
        index.append(slice(start, start + count * step, step) if axis in pixel_axes else start)
    n_slow, n_fast = int(size[pixel_axes[0]]), int(size[pixel_axes[1]])

    fast = module["fast_pixel_direction"]
    slow = module["slow_pixel_direction"]
    pixel_sizes = []
    axes = []
    origins = []
    for dataset in (fast, slow):
        if not isinstance(dataset, h5py.Dataset):
            raise FormatError(path, "must be a dataset", field=dataset.name)
        units = as_text(dataset.attrs["units"]) if "units" in dataset.attrs else None
        pixel_sizes.append(_first_value(dataset, path) * length_scale_mm(units, path, f"{dataset.name}@units"))
        if "vector" not in dataset.attrs:
            raise FormatError(path, "has no vector attribute", field=dataset.name)
        direction = unit_vector(dataset.attrs["vector"], path, f"{dataset.name}@vector")
        if "depends_on" not in dataset.attrs:
            raise FormatError(path, "has no depends_on attribute", field=dataset.name)
        parent = _resolve_depends_on(dataset, as_text(dataset.attrs["depends_on"]), path, f"{dataset.name}@depends_on")
        chain = _chain_matrix(parent, path, f"{dataset.name}@depends_on")
        axes.append(chain[:3, :3] @ direction)
        origins.append(chain[:3, 3])
    if not np.allclose(origins[0], origins[1], atol=1e-6):
        raise FormatError(
            path,
            f"the fast and slow pixel directions place the module at different origins {origins[0]} and {origins[1]}",
            field=f"{name}/slow_pixel_direction@depends_on",
        )
    if not np.isclose(pixel_sizes[0], pixel_sizes[1], rtol=1e-6):
        raise FormatError(
            path,
            f"pixels are not square ({pixel_sizes[0]} × {pixel_sizes[1]} mm), which is not supported",
            field=f"{name}/slow_pixel_direction",
        )
    if pixel_sizes[0] <= 0:
        raise FormatError(path, f"pixel size {pixel_sizes[0]} mm must be positive", field=fast.name)
    panel_name = as_text(module["panel_name"][()]) if "panel_name" in module else name.rsplit("/", 1)[-1]
    try:
        panel = Panel(
            name=panel_name,
            origin=tuple(MCSTAS_TO_LAB @ origins[0]),
            fast_axis=tuple(MCSTAS_TO_LAB @ axes[0]),
            slow_axis=tuple(MCSTAS_TO_LAB @ axes[1]),
            pixel_size=pixel_sizes[0],
            size=(n_fast, n_slow),
        )
    except (GeometryError, ValidationError) as error:
        raise FormatError(path, f"inconsistent module geometry: {describe(error)}", field=name) from error
    return panel, tuple(index)


def _read_beam(entry: h5py.Group, instrument: h5py.Group, path: Path) -> Beam:
    candidates = _children_of_class(instrument, "NXbeam")
    for sample in _children_of_class(entry, "NXsample"):
        candidates += _children_of_class(sample, "NXbeam")
    if not candidates:
        raise FormatError(path, "no NXbeam group in the NXinstrument or NXsample", field=instrument.name)
    group = candidates[0]
    field = f"{group.name}/incident_wavelength"
    if "incident_wavelength" not in group:
        raise FormatError(path, "is missing", field=field)
    wavelength_data = group["incident_wavelength"]
    units = as_text(wavelength_data.attrs["units"]) if "units" in wavelength_data.attrs else "angstrom"
    to_angstrom = length_scale_mm(units, path, f"{field}@units") / 1e-7
    values = np.asarray(wavelength_data[()], dtype=float).reshape(-1)
    if values.size == 0 or not np.all(np.isfinite(values)):
        raise FormatError(path, f"must hold finite numbers, got {values[:5].tolist()}", field=field)
    wavelength = float(np.mean(values)) * to_angstrom
    arguments: dict[str, float] = {"wavelength": wavelength}
    if "incident_wavelength_spread" in group:
        spread = group["incident_wavelength_spread"]
        spread_units = as_text(spread.attrs["units"]) if "units" in spread.attrs else units
        scale = length_scale_mm(spread_units, path, f"{spread.name}@units") / 1e-7
        arguments["bandwidth"] = float(np.mean(spread[()])) * scale / wavelength
    if "incident_beam_divergence" in group:
        divergence = group["incident_beam_divergence"]
        divergence_units = as_text(divergence.attrs["units"]) if "units" in divergence.attrs else "rad"
        arguments["divergence"] = float(np.mean(divergence[()])) * angle_scale_rad(
            divergence_units, path, f"{divergence.name}@units"
        )
    if "incident_polarization_stokes" in group:
        stokes = np.asarray(group["incident_polarization_stokes"][()], dtype=float).reshape(-1, 4)[0]
        if stokes[0] > 0:
            arguments["polarization_fraction"] = float(np.clip((1 + stokes[1] / stokes[0]) / 2, 0, 1))
    try:
        return Beam(**arguments)
    except ValidationError as error:
        raise FormatError(path, f"beam parameters out of range: {describe(error)}", field=group.name) from error


def _read_mask(
    detector_group: h5py.Group,
    sources: list[PanelSource],
    frame_data_shape: tuple[int, ...],
    path: Path,
    frame_shape: tuple[int, int, int],
) -> np.ndarray:
    """Valid-pixel mask (True = good) from pixel_mask and pixel_mask_N: NeXus bits 0-15 set mean 'do not use'."""
    combined: np.ndarray | None = None
    for name in sorted(detector_group, key=_natural_key):
        if name != "pixel_mask" and not re.fullmatch(r"pixel_mask_\d+", name):
            continue
        bits = np.asarray(detector_group[name][()])
        if bits.ndim == len(frame_data_shape) + 1:
            bits = np.bitwise_or.reduce(bits, axis=0)  # per-frame masks: a pixel bad in any frame is bad
        if bits.shape != frame_data_shape:
            raise FormatError(
                path,
                f"shape {bits.shape} differs from a frame of the data {frame_data_shape}",
                field=f"{detector_group.name}/{name}",
            )
        combined = bits if combined is None else combined | bits
    if combined is None:
        return np.ones(frame_shape, dtype=bool)
    good = (combined.astype(np.uint64) & 0xFFFF) == 0
    panels = [good[source.index] for source in sources]
    if any(panel.shape != frame_shape[1:] for panel in panels):
        # A module outside the data: the reader's own check names it, with the module and the data's shape.
        return np.ones(frame_shape, dtype=bool)
    return np.stack(panels)


def _open_external(master_path: Path, link: h5py.ExternalLink, name: str) -> tuple[Path, h5py.File, h5py.Dataset]:
    target = resolve_link_path(master_path, link.filename)
    if not target.exists():
        raise FormatError(master_path, f"links to data file {link.filename}, which does not exist", field=name)
    file = open_hdf5(target)
    return target, file, dataset_at(file, link.path, target, purpose="linked from the master")


def _open_virtual(master_path: Path, file: h5py.File, name: str) -> h5py.Dataset:
    """Open a virtual dataset with its sources resolved beside the master, and check that every source exists."""
    access = h5py.h5p.create(h5py.h5p.DATASET_ACCESS)
    access.set_virtual_prefix(str(master_path.parent.resolve()).encode() + b"/")
    dataset = h5py.Dataset(h5py.h5d.open(file.id, name.encode(), dapl=access))
    for source in dataset.virtual_sources():
        if source.file_name == ".":
            continue
        if not resolve_link_path(master_path, source.file_name).exists():
            raise FormatError(master_path, f"virtual dataset source file {source.file_name} does not exist", field=name)
    return dataset


def _data_segments(master_path: Path, file: h5py.File, entry: h5py.Group) -> list[Segment]:
    groups = _children_of_class(entry, "NXdata")
    if not groups:
        raise FormatError(master_path, "no NXdata group in the NXentry", field=entry.name)
    group = groups[0]
    signal = as_text(group.attrs.get("signal", "data"))
    linked = sorted(name for name in group if _DATA_FILE_LINK.match(name))
    segments: list[Segment] = []
    if linked:
        for name in linked:
            link = group.get(name, getlink=True)
            if isinstance(link, h5py.ExternalLink):
                target, data_file, dataset = _open_external(master_path, link, f"{group.name}/{name}")
            else:
                target, data_file, dataset = master_path, file, dataset_at(file, f"{group.name}/{name}", master_path)
            segments.append(_segment(target, data_file, dataset))
        return segments
    name = f"{group.name}/{signal}"
    link = group.get(signal, getlink=True)
    if link is None:
        raise FormatError(master_path, "dataset is missing (the NXdata signal)", field=name)
    if isinstance(link, h5py.ExternalLink):
        target, data_file, dataset = _open_external(master_path, link, name)
        return [_segment(target, data_file, dataset)]
    dataset = dataset_at(file, name, master_path)
    if dataset.is_virtual:
        dataset = _open_virtual(master_path, file, name)
    return [_segment(master_path, file, dataset)]


def _segment(path: Path, file: h5py.File, dataset: h5py.Dataset) -> Segment:
    numbers = None
    if "image_nr_low" in dataset.attrs and "image_nr_high" in dataset.attrs:
        numbers = (int(dataset.attrs["image_nr_low"]), int(dataset.attrs["image_nr_high"]))
    if dataset.ndim < 3:
        raise FormatError(path, f"data must be (frames, slow, fast), got shape {dataset.shape}", field=dataset.name)
    return Segment(path=path, file=file, datasets={"data": dataset}, image_numbers=numbers)


def _read_master(
    path: Path,
) -> tuple[h5py.File, Detector, Beam, np.ndarray, list[PanelSource], list[Segment], h5py.Dataset | None]:
    file = open_hdf5(path)
    try:
        entry = _nxmx_entry(file)
        if entry is None:
            raise FormatError(path, "no NXentry with definition NXmx", field="/")
        instruments = _children_of_class(entry, "NXinstrument")
        if not instruments:
            raise FormatError(path, "no NXinstrument group", field=entry.name)
        instrument = instruments[0]
        detectors = [
            group
            for group in _children_of_class(instrument, "NXdetector")
            if _children_of_class(group, "NXdetector_module")
        ]
        if not detectors:
            raise FormatError(path, "no NXdetector with NXdetector_module groups", field=instrument.name)
        detector_group = detectors[0]
        panels = []
        sources = []
        modules = _children_of_class(detector_group, "NXdetector_module")
        for module in modules:
            panel, index = _module_panel(module, path)
            panels.append(panel)
            sources.append(PanelSource("data", index))
        common_size_check(
            [panel.size for panel in panels],
            [panel.name for panel in panels],
            path,
            [f"{module.name}/data_size" for module in modules],
        )
        try:
            detector = Detector(panels=panels)
        except (GeometryError, ValidationError) as error:
            raise FormatError(path, f"inconsistent detector: {describe(error)}", field=detector_group.name) from error
        beam = _read_beam(entry, instrument, path)
        segments = _data_segments(path, file, entry)
        frame_data_shape = tuple(segments[0].datasets["data"].shape[1:])
        mask = _read_mask(detector_group, sources, frame_data_shape, path, detector.frame_shape)
        flag = entry.get(RUN_COMPLETE_NAME)
        return file, detector, beam, mask, sources, segments, flag if isinstance(flag, h5py.Dataset) else None
    except BaseException:
        file.close()
        raise


def _external_files(path: Path) -> set[Path]:
    """Data files a master refers to (external links and virtual-dataset sources), resolved."""
    referenced: set[Path] = set()
    with open_hdf5(path) as file:

        def visit(name: str, link: h5py.Link) -> None:
            if isinstance(link, h5py.ExternalLink):
                referenced.add(resolve_link_path(path, link.filename).resolve())

        file.visititems_links(visit)
        data = file.get("/entry/data/data")
        if isinstance(data, h5py.Dataset) and data.is_virtual:
            for source in data.virtual_sources():
                if source.file_name != ".":
                    referenced.add(resolve_link_path(path, source.file_name).resolve())
    return referenced


def open_nxmx_run(paths: list[Path]) -> SlabRunReader:
    """Read a run from NXmx master files (in order) plus, optionally, the data files they link to."""
    masters = [path for path in paths if is_nxmx_master(path)]
    if not masters:
        raise FormatError(paths[0], "no NXentry with definition NXmx in any of the given files", field="/")
    referenced: set[Path] = set()
    for master in masters:
        referenced |= _external_files(master)
    for path in paths:
        if path not in masters and path.resolve() not in referenced:
            raise FormatError(path, "is neither an NXmx master nor a data file linked from one")
    files: list[h5py.File] = []
    segments: list[Segment] = []
    completion = []
    detector = beam = mask = sources = None
    try:
        for master in masters:
            file, this_detector, this_beam, this_mask, this_sources, this_segments, flag = _read_master(master)
            files.append(file)
            if detector is None:
                detector, beam, mask, sources = this_detector, this_beam, this_mask, this_sources
            elif this_detector != detector or this_sources != sources:
                raise FormatError(master, f"geometry differs from {masters[0]}'s", field=_DETECTOR)
            segments += this_segments
            if flag is not None:
                completion.append((master, flag))
        assert detector is not None and beam is not None and mask is not None and sources is not None
        return SlabRunReader(
            file_format="nxmx",
            detector=detector,
            beam=beam,
            mask=mask,
            panel_sources=sources,
            segments=segments,
            completion=completion,
            extra_files=files,
        )
    except BaseException:
        for file in files:
            file.close()
        for segment in segments:
            segment.file.close()
        raise
