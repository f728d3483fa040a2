"""Detector files: NXmx (NeXus) and CXI (+ CrystFEL .geom) runs, written and read behind one interface.

``open_run_writer(path, "nxmx" | "cxi", detector, beam, ...)`` appends frames (n_panels, n_slow, n_fast);
``open_run(paths)`` detects the format and reads frames lazily, with the geometry in our (DIALS) lab frame.
Every problem with a file raises ``FormatError`` naming the file, the frame and the dataset or field.
See docs/formats.md for the layouts written and accepted.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from libs.science.formats.base import Compression, FileFormat, RunReader, RunWriter
from libs.science.formats.errors import FormatError
from libs.science.geometry import Beam, Detector

__all__ = ["FormatError", "RunReader", "RunWriter", "detect_format", "open_run", "open_run_writer"]


def open_run_writer(
    path: str | Path,
    file_format: FileFormat = "nxmx",
    *,
    detector: Detector,
    beam: Beam,
    mask: np.ndarray | None = None,
    compression: Compression = "none",
    live: bool = False,
    frames_per_data_file: int | None = None,
    dtype: np.dtype[Any] | str = "int32",
) -> RunWriter:
    """A writer of a new run at ``path`` (overwritten if it exists).

    ``mask``: bool (n_panels, n_slow, n_fast), True = valid pixel. ``live``: SWMR, readable while written, every
    frame flushed. ``frames_per_data_file`` (NXmx only): frames in linked data files beside the master.
    ``dtype``: how pixels are stored (images are cast to it; a cast that changes the kind of value is refused).
    CXI also writes ``<path stem>.geom`` (CrystFEL geometry) beside the file.
    """
    if file_format == "nxmx":
        from libs.science.formats.nxmx import NxmxRunWriter

        return NxmxRunWriter(
            Path(path),
            detector,
            beam,
            mask=mask,
            compression=compression,
            live=live,
            frames_per_data_file=frames_per_data_file,
            dtype=dtype,
        )
    if file_format == "cxi":
        if frames_per_data_file is not None:
            raise ValueError("frames_per_data_file applies to NXmx only; CXI runs are one file per writer")
        from libs.science.formats.cxi import CxiRunWriter

        return CxiRunWriter(Path(path), detector, beam, mask=mask, compression=compression, live=live, dtype=dtype)
    raise ValueError(f"file_format must be 'nxmx' or 'cxi', got {file_format!r}")


def detect_format(path: Path) -> FileFormat:
    """'cxi' for a file with /entry_1 (Cheetah/CrystFEL layout), 'nxmx' for an NXmx master or data file."""
    from libs.science.formats.base import open_hdf5

    with open_hdf5(path) as file:
        if "entry_1" in file:
            return "cxi"
        if "entry" in file:
            return "nxmx"
    raise FormatError(path, "neither NXmx (/entry) nor CXI (/entry_1)", field="/")


def open_run(paths: str | Path | list[str | Path] | list[Path], geometry: str | Path | None = None) -> RunReader:
    """Open a run from one file or many (in order); ``geometry``: a CrystFEL .geom for CXI files.

    A ``.geom`` among ``paths`` is taken as the geometry. Without one, a CXI run uses ``<stem>.geom`` beside its
    first file, or the only .geom in that folder.
    """
    items = [paths] if isinstance(paths, str | Path) else list(paths)
    if not items:
        raise ValueError("open_run needs at least one file")
    files = [Path(item) for item in items]
    geometry_files = [path for path in files if path.suffix == ".geom"]
    if geometry_files:  # a .geom listed with the data files is the geometry of a CXI run
        if geometry is not None or len(geometry_files) > 1:
            raise FormatError(geometry_files[0], "more than one CrystFEL geometry given for one run")
        geometry = geometry_files[0]
        files = [path for path in files if path.suffix != ".geom"]
        if not files:
            raise FormatError(geometry, "a geometry file alone is not a run: give the CXI files too")
    formats = {path: detect_format(path) for path in files}
    if len(set(formats.values())) > 1:
        raise FormatError(files[0], f"a run mixes formats: { ({str(k): v for k, v in formats.items()}) }")
    if formats[files[0]] == "cxi":
        from libs.science.formats.cxi import open_cxi_run

        return open_cxi_run(files, Path(geometry) if geometry is not None else None)
    if geometry is not None:
        raise FormatError(geometry, "a geometry file applies to CXI runs only; NXmx files carry their geometry")
    from libs.science.formats.nxmx import open_nxmx_run

    return open_nxmx_run(files)
