"""CXI runs (the Cheetah/CrystFEL layout) with their CrystFEL .geom geometry.

Written: ``/entry_1/data_1/data`` (frames, n_panels·n_slow, n_fast), the panels one under the other (a "slab"),
``/entry_1/data_1/mask`` (the slab's pixels; 0 = good, non-zero = bad, as Cheetah writes it), the photon energy and
pixel size under ``/entry_1/instrument_1`` and ``/entry_1/run_complete``; beside it ``<stem>.geom`` places every
panel's rectangle of the slab in the lab. Read: any files whose panels a .geom describes (``data``, ``dimN``,
``min_fs``..``max_ss``, masks, bad regions), many files per run, in the order given.
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from libs.science.formats.base import (
    PLANCK_EV_ANGSTROM,
    RUN_COMPLETE_NAME,
    Compression,
    FrameStack,
    PanelSource,
    RunWriter,
    Segment,
    SlabRunReader,
    checked_image,
    create_hdf5,
    dataset_at,
    open_hdf5,
)
from libs.science.formats.crystfel_geom import (
    CrystfelGeometry,
    bad_region_mask,
    beam_from_geom,
    geom_text,
    read_geom,
    to_detector,
    wavelength_angstrom,
)
from libs.science.formats.errors import FormatError
from libs.science.geometry import Beam, Detector

_DATA = "/entry_1/data_1/data"
_MASK = "/entry_1/data_1/mask"
_ELECTRONVOLT_J = 1.602176634e-19


class CxiRunWriter(RunWriter):
    """Writes a CXI file and its CrystFEL geometry (``<stem>.geom``) beside it."""

    def __init__(
        self,
        path: Path,
        detector: Detector,
        beam: Beam,
        *,
        mask: np.ndarray | None = None,
        compression: Compression = "none",
        live: bool = False,
        dtype: np.dtype[Any] | str = "int32",
    ) -> None:
        self.path = Path(path)
        self.geometry_path = self.path.with_suffix(".geom")
        self.frame_shape = detector.frame_shape
        self.dtype = np.dtype(dtype)
        self.live = live
        self._closed = False
        n_panels, n_slow, n_fast = self.frame_shape
        bad = np.zeros((n_panels * n_slow, n_fast), dtype=np.uint16)
        if mask is not None:
            valid = np.asarray(mask)
            if valid.shape != self.frame_shape or valid.dtype != bool:
                raise ValueError(f"mask must be a bool array of shape {self.frame_shape} (True = valid pixel)")
            bad[~valid.reshape(n_panels * n_slow, n_fast)] = 1
        text = geom_text(detector, beam, data_path=_DATA, mask_path=_MASK, note=self.path.name)
        self.geometry_path.parent.mkdir(parents=True, exist_ok=True)
        self.geometry_path.write_text(text)
        self._file = create_hdf5(self.path, live=live)
        try:
            file = self._file
            file.create_dataset("cxi_version", data=150)
            entry = file.create_group("entry_1")
            entry.create_dataset(RUN_COMPLETE_NAME, data=np.int8(0)).attrs["description"] = (
                "0 while frames are still being appended, 1 once the writer closed the run"
            )
            data = entry.create_group("data_1")
            self._stack = FrameStack(data, "data", self.frame_shape, self.dtype, compression, live=live)
            data.create_dataset("mask", data=bad, compression="gzip", compression_opts=4)
            instrument = entry.create_group("instrument_1")
            instrument.create_dataset("name", data="sfx-live simulated XFEL instrument")
            source = instrument.create_group("source_1")
            energy_ev = PLANCK_EV_ANGSTROM / beam.wavelength
            source.create_dataset("energy", data=energy_ev * _ELECTRONVOLT_J).attrs["units"] = "J"
            source.create_dataset("wavelength", data=beam.wavelength * 1e-10).attrs["units"] = "m"
            detector_group = instrument.create_group("detector_1")
            detector_group.create_dataset("description", data=f"{n_panels} panels stacked along the slow axis")
            pixel_m = detector.panels[0].pixel_size / 1000.0
            detector_group.create_dataset("x_pixel_size", data=pixel_m).attrs["units"] = "m"
            detector_group.create_dataset("y_pixel_size", data=pixel_m).attrs["units"] = "m"
            detector_group.create_dataset("distance", data=detector.panels[0].distance / 1000.0).attrs["units"] = "m"
            detector_group["data"] = h5py.SoftLink(_DATA)
            detector_group["mask"] = h5py.SoftLink(_MASK)
            entry.create_dataset("geometry_file", data=self.geometry_path.name)
            if live:
                file.swmr_mode = True
        except BaseException:
            self._file.close()
            raise

    @property
    def frame_count(self) -> int:
        return self._stack.count

    def append(self, image: np.ndarray) -> None:
        if self._closed:
            raise ValueError(f"{self.path}: writer is closed")
        self._stack.append(checked_image(image, self.frame_shape, self.dtype, self._stack.count))

    def close(self) -> None:
        """Mark the run complete (run_complete = 1) and close the file."""
        if self._closed:
            return
        self._closed = True
        try:
            flag = self._file[f"/entry_1/{RUN_COMPLETE_NAME}"]
            flag[()] = np.int8(1)
            if self.live:
                flag.flush()
        finally:
            self._file.close()


def find_geometry(first: Path) -> Path:
    """The .geom of a CXI run: ``<stem>.geom`` beside its first file, else the only .geom in that folder."""
    beside = first.with_suffix(".geom")
    if beside.exists():
        return beside
    candidates = sorted(first.parent.glob("*.geom"))
    if len(candidates) == 1:
        return candidates[0]
    found = ", ".join(c.name for c in candidates) or "none"
    raise FormatError(first, f"no CrystFEL geometry given and none unambiguous beside the file (found: {found})")


def _value_reader(file: h5py.File, path: Path) -> Any:
    def resolve(location: str) -> float:
        dataset = dataset_at(file, location, path)
        values = np.asarray(dataset[()], dtype=float).reshape(-1)
        if values.size == 0:
            raise ValueError(f"{location} is empty")
        return float(np.mean(values))

    return resolve


def _panel_sources(geometry: CrystfelGeometry, file: h5py.File, path: Path) -> tuple[list[PanelSource], bool]:
    sources = []
    frame_axes = set()
    for panel in geometry.panels:
        location = panel.data or "/data/data"
        dataset = dataset_at(file, location, path, purpose=f"data of panel {panel.name}")
        dims = geometry.panel_dims(panel, dataset.ndim)
        if len(dims) != dataset.ndim:
            raise FormatError(
                path,
                f"the geometry gives {len(dims)} dimensions ({dims}) but the data has {dataset.ndim} "
                f"(shape {dataset.shape})",
                field=location,
            )
        if "%" in dims[1:]:
            raise FormatError(geometry.source, "the frame placeholder % must be dim0", field=f"{panel.name}/dim")
        if dims.count("ss") != 1 or dims.count("fs") != 1 or dims.index("ss") > dims.index("fs"):
            raise FormatError(geometry.source, f"dims {dims} need one ss before one fs", field=f"{panel.name}/dim")
        index: list[int | slice] = []
        for dim in dims:
            if dim == "%":
                continue
            if dim == "ss":
                index.append(slice(panel.min_ss, panel.max_ss + 1, 1))
            elif dim == "fs":
                index.append(slice(panel.min_fs, panel.max_fs + 1, 1))
            else:
                try:
                    index.append(int(dim))
                except ValueError as error:
                    raise FormatError(geometry.source, f"unknown dim value {dim!r}", field=panel.name) from error
        frame_axes.add(dims[0] == "%")
        sources.append(PanelSource(location, tuple(index)))
    if len(frame_axes) != 1:
        raise FormatError(geometry.source, "some panels have a frame axis (%) and others do not")
    return sources, frame_axes.pop()


def _geometry_mask(
    geometry: CrystfelGeometry,
    sources: list[PanelSource],
    file: h5py.File,
    path: Path,
    detector: Detector,
    has_frame_axis: bool,
) -> np.ndarray:
    valid = bad_region_mask(geometry, detector)
    for number, spec in sorted(geometry.masks.items()):
        if spec.data is None:
            raise FormatError(
                geometry.source, "mask has a file or bits but no data location", field=f"mask{number}_data"
            )
        mask_path = Path(spec.file) if spec.file else path
        if spec.file and not mask_path.is_absolute():
            mask_path = Path(geometry.source).parent / mask_path
        with open_hdf5(mask_path) if spec.file else nullcontext(file) as mask_file:
            data = dataset_at(mask_file, spec.data.replace("%", ""), mask_path, purpose="bad-pixel mask")
            bits = np.asarray(data[0] if has_frame_axis and data.ndim == 3 else data[()])
        for panel, source in enumerate(sources):
            try:
                values = bits[source.index].astype(np.int64)
            except IndexError as error:
                raise FormatError(
                    mask_path, f"shape {bits.shape} does not cover the panels", field=spec.data
                ) from error
            if values.shape != detector.frame_shape[1:]:
                raise FormatError(mask_path, f"shape {bits.shape} does not cover the panels", field=spec.data)
            bad = (values & spec.goodbits) != spec.goodbits
            bad |= (values & spec.badbits) != 0
            valid[panel] &= ~bad
    return valid


def open_cxi_run(paths: list[Path], geometry_path: Path | None = None) -> SlabRunReader:
    """Read a run from CXI files (in order) with a CrystFEL geometry file."""
    geom_path = geometry_path or find_geometry(paths[0])
    geometry = read_geom(geom_path)
    segments: list[Segment] = []
    completion = []
    try:
        sources: list[PanelSource] | None = None
        has_frame_axis = True
        for path in paths:
            file = open_hdf5(path)
            segment = Segment(path=path, file=file, datasets={})
            segments.append(segment)
            file_sources, file_frame_axis = _panel_sources(geometry, file, path)
            if sources is None:
                sources, has_frame_axis = file_sources, file_frame_axis
            segment.has_frame_axis = has_frame_axis
            for source in file_sources:
                segment.datasets[source.dataset] = dataset_at(file, source.dataset, path)
            flag = file.get(f"/entry_1/{RUN_COMPLETE_NAME}")
            if isinstance(flag, h5py.Dataset):
                completion.append((path, flag))
        assert sources is not None
        first = segments[0]
        resolve = _value_reader(first.file, first.path)
        detector = to_detector(geometry, resolve)
        wavelength = wavelength_angstrom(geometry, resolve)
        if wavelength is None:
            energy = first.file.get("/entry_1/instrument_1/source_1/energy")
            if not isinstance(energy, h5py.Dataset):
                raise FormatError(
                    geom_path,
                    "states no wavelength or photon_energy, and the data has no /entry_1/instrument_1/source_1/energy",
                )
            wavelength = PLANCK_EV_ANGSTROM / (float(np.mean(energy[()])) / _ELECTRONVOLT_J)
        beam = beam_from_geom(geometry, wavelength)
        reader = SlabRunReader(  # checks every panel's place in the data before the mask is cut from it
            file_format="cxi",
            detector=detector,
            beam=beam,
            mask=np.ones(detector.frame_shape, dtype=bool),
            panel_sources=sources,
            segments=segments,
            completion=completion,
        )
        reader.mask = _geometry_mask(geometry, sources, first.file, first.path, detector, has_frame_axis)
        return reader
    except BaseException:
        for segment in segments:
            segment.file.close()
        raise
