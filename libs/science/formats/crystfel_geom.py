"""CrystFEL geometry (.geom) files: parse them, turn them into our Detector, and write them for a Detector.

CrystFEL's laboratory frame has +z along the beam (away from the source), +y up and x completing a right-handed set;
ours (DIALS') has the beam along -z with +y up, so positions and directions cross with diag(-1, 1, -1). A panel's
``corner_x``/``corner_y`` (in pixel widths of that panel) and ``clen`` + ``coffset`` (metres) give the very corner of
its first pixel, which is exactly our Panel.origin; ``fs``/``ss`` are its axes; ``res`` is pixels per metre.
Ranges ``min_fs..max_fs``, ``min_ss..max_ss`` are inclusive. Parameters written before any panel-specific line
are defaults for every panel first mentioned after them (CrystFEL's rule).

Pure text and numpy: no file I/O except ``read_geom``; values given as data-file locations (``clen = /path mm``)
are resolved by a callback the caller supplies.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydantic import ValidationError

from libs.science.formats.base import MCSTAS_TO_LAB, PLANCK_EV_ANGSTROM, common_size_check, describe, unit_vector
from libs.science.formats.errors import FormatError
from libs.science.geometry import Beam, Detector, GeometryError, Panel

# CrystFEL's bandwidth is the standard deviation of a Gaussian spectrum; ours is its FWHM.
_FWHM_PER_SIGMA = 2.0 * np.sqrt(2.0 * np.log(2.0))

_PANEL_KEYS = {
    "min_fs",
    "max_fs",
    "min_ss",
    "max_ss",
    "fs",
    "ss",
    "corner_x",
    "corner_y",
    "res",
    "coffset",
    "clen",
    "data",
    "no_index",
    "adu_per_eV",
    "adu_per_photon",
    "max_adu",
    "mask_edge_pixels",
    "flag_lessthan",
    "flag_morethan",
    "flag_equal",
    "saturation_map",
    "saturation_map_file",
    "photon_energy",
    "wavelength",
    "bandwidth",
}
_UNSUPPORTED = {"detector_shift_x", "detector_shift_y", "electron_voltage"}
_MASK_KEY = re.compile(r"^mask(\d)?_?(data|file|goodbits|badbits)$")
_OLD_MASK_KEYS = {"mask": "data", "mask_file": "file", "mask_good": "goodbits", "mask_bad": "badbits"}
_VECTOR_TERM = re.compile(r"([+-]?)\s*(\d*\.?\d*(?:[eE][+-]?\d+)?)\s*([xyz])")

ValueResolver = Callable[[str], float]
"""Reads a numeric value stored in the data files at an HDF5 location (e.g. ``/LCLS/photon_energy_eV``)."""


@dataclass
class GeomPanel:
    """One panel as the .geom file states it (CrystFEL frame and units)."""

    name: str
    min_fs: int = -1
    max_fs: int = -1
    min_ss: int = -1
    max_ss: int = -1
    fs: tuple[float, float, float] | None = None
    ss: tuple[float, float, float] | None = None
    corner_x: float | None = None
    corner_y: float | None = None
    res: float | None = None
    coffset: float = 0.0
    clen: str | None = None
    data: str | None = None
    dims: dict[int, str] = field(default_factory=dict)
    no_index: bool = False
    mask_edge_pixels: int = 0

    @property
    def size(self) -> tuple[int, int]:
        """(n_fast, n_slow)."""
        return (self.max_fs - self.min_fs + 1, self.max_ss - self.min_ss + 1)


@dataclass
class BadRegion:
    """Pixels to ignore: an fs/ss box of one panel (inclusive) or an x/y box in lab pixel units."""

    name: str
    panel: str | None = None
    min_fs: int | None = None
    max_fs: int | None = None
    min_ss: int | None = None
    max_ss: int | None = None
    min_x: float | None = None
    max_x: float | None = None
    min_y: float | None = None
    max_y: float | None = None


@dataclass
class MaskSpec:
    """A bad-pixel mask in the data (or a separate) file: bad unless all goodbits set, bad if any badbits set."""

    data: str | None = None
    file: str | None = None
    goodbits: int = 0
    badbits: int = 0


@dataclass
class CrystfelGeometry:
    """A parsed .geom file."""

    source: str
    panels: list[GeomPanel]
    wavelength: str | None = None
    photon_energy: str | None = None
    bandwidth: float | None = None
    clen: str | None = None
    bad_regions: list[BadRegion] = field(default_factory=list)
    masks: dict[int, MaskSpec] = field(default_factory=dict)
    groups: dict[str, list[str]] = field(default_factory=dict)
    other: dict[str, str] = field(default_factory=dict)

    def panel_dims(self, panel: GeomPanel, data_rank: int) -> list[str]:
        """The dimN list of a panel (explicit, or inferred from the data's rank: (%, ss, fs) or (ss, fs))."""
        if panel.dims:
            highest = max(panel.dims)
            missing = [n for n in range(highest + 1) if n not in panel.dims]
            if missing:
                raise FormatError(self.source, f"dim{missing[0]} is not given", field=f"{panel.name}/dim{missing[0]}")
            return [panel.dims[n] for n in range(highest + 1)]
        return ["%", "ss", "fs"] if data_rank >= 3 else ["ss", "fs"]


def _parse_vector(text: str, source: str, key: str) -> tuple[float, float, float]:
    compact = text.replace(" ", "")
    components = {"x": 0.0, "y": 0.0, "z": 0.0}
    position = 0
    for match in _VECTOR_TERM.finditer(compact):
        if match.start() != position:
            break
        sign, number, axis = match.groups()
        value = float(number) if number not in ("", ".") else 1.0
        components[axis] += -value if sign == "-" else value
        position = match.end()
    if position != len(compact) or position == 0:
        raise FormatError(source, f"cannot read the vector {text!r} (expected e.g. '+1.0x -0.0y')", field=key)
    return (components["x"], components["y"], components["z"])


def _parse_int(text: str, source: str, key: str) -> int:
    try:
        return int(text, 0)
    except ValueError as error:
        raise FormatError(source, f"must be an integer, got {text!r}", field=key) from error


def _parse_float(text: str, source: str, key: str) -> float:
    try:
        return float(text)
    except ValueError as error:
        raise FormatError(source, f"must be a number, got {text!r}", field=key) from error


def _parse_bool(text: str) -> bool:
    return text.strip().lower() in ("1", "true", "yes")


def _set_panel_value(panel: GeomPanel, key: str, value: str, source: str) -> None:
    label = f"{panel.name}/{key}"
    if key in ("min_fs", "max_fs", "min_ss", "max_ss", "mask_edge_pixels"):
        setattr(panel, key, _parse_int(value, source, label))
    elif key in ("fs", "ss"):
        setattr(panel, key, _parse_vector(value, source, label))
    elif key in ("corner_x", "corner_y", "res", "coffset"):
        setattr(panel, key, _parse_float(value, source, label))
    elif key == "clen":
        panel.clen = value
    elif key == "data":
        panel.data = value
    elif key == "no_index":
        panel.no_index = _parse_bool(value)
    elif key.startswith("dim"):
        panel.dims[int(key[3:])] = value.strip()
    # adu_per_eV, max_adu, flag_*, saturation_map...: detector response, not geometry; accepted and not used.


def parse_geom(text: str, source: str | Path = "<geom>") -> CrystfelGeometry:
    """Parse the text of a CrystFEL .geom file. FormatError names the file and the line's key when it is wrong."""
    name = str(source)
    geometry = CrystfelGeometry(source=name, panels=[])
    defaults: dict[str, str] = {}
    panels: dict[str, GeomPanel] = {}
    bad: dict[str, BadRegion] = {}
    for number, raw_line in enumerate(text.splitlines(), start=1):
        line = raw_line.split(";", 1)[0].strip()
        if not line:
            continue
        if "=" not in line:
            raise FormatError(name, f"line {number} is not 'key = value': {raw_line.strip()!r}")
        key, value = (part.strip() for part in line.split("=", 1))
        if key.startswith("group_") or key.startswith("rigid_group"):
            geometry.groups[key] = [item.strip() for item in value.split(",") if item.strip()]
            continue
        if "/" in key:
            owner, parameter = key.split("/", 1)
            if owner.startswith("bad"):
                region = bad.setdefault(owner, BadRegion(name=owner))
                if parameter == "panel":
                    region.panel = value
                elif parameter in ("min_fs", "max_fs", "min_ss", "max_ss"):
                    setattr(region, parameter, _parse_int(value, name, key))
                elif parameter in ("min_x", "max_x", "min_y", "max_y"):
                    setattr(region, parameter, _parse_float(value, name, key))
                else:
                    raise FormatError(name, f"unknown bad-region parameter {parameter!r}", field=key)
                continue
            if owner not in panels:
                panels[owner] = GeomPanel(name=owner)
                for default_key, default_value in defaults.items():
                    _set_panel_value(panels[owner], default_key, default_value, name)
            if parameter not in _PANEL_KEYS and not parameter.startswith("dim"):
                raise FormatError(name, f"unknown panel parameter {parameter!r}", field=key)
            _set_panel_value(panels[owner], parameter, value, name)
            continue
        if key in _UNSUPPORTED:
            raise FormatError(name, "is not supported (the detector would move from frame to frame)", field=key)
        mask_match = _MASK_KEY.match(key)
        if key in _OLD_MASK_KEYS or mask_match:
            if key in _OLD_MASK_KEYS:
                index, part = 0, _OLD_MASK_KEYS[key]
            else:
                assert mask_match is not None
                index, part = int(mask_match[1] or 0), mask_match[2]
            spec = geometry.masks.setdefault(index, MaskSpec())
            if part in ("goodbits", "badbits"):
                setattr(spec, part, _parse_int(value, name, key))
            else:
                setattr(spec, part, value)
            continue
        if key == "wavelength":
            geometry.wavelength = value
        elif key == "photon_energy":
            geometry.photon_energy = value
        elif key == "bandwidth":
            geometry.bandwidth = _parse_float(value, name, key)
        elif key == "clen":
            geometry.clen = value
        if key in _PANEL_KEYS or key.startswith("dim"):
            defaults[key] = value
        elif key not in ("wavelength", "photon_energy", "bandwidth", "clen"):
            geometry.other[key] = value
    geometry.panels = list(panels.values())
    geometry.bad_regions = list(bad.values())
    if not geometry.panels:
        raise FormatError(name, "defines no panels (no 'panel/min_fs = ...' lines)")
    for panel in geometry.panels:
        for required in ("min_fs", "max_fs", "min_ss", "max_ss"):
            if getattr(panel, required) < 0:
                raise FormatError(name, "is missing", field=f"{panel.name}/{required}")
        for required in ("fs", "ss", "corner_x", "corner_y", "res"):
            if getattr(panel, required) is None:
                raise FormatError(name, "is missing", field=f"{panel.name}/{required}")
        if panel.max_fs < panel.min_fs or panel.max_ss < panel.min_ss:
            raise FormatError(name, "max below min", field=f"{panel.name}/max_fs")
    for region in geometry.bad_regions:
        if region.panel is not None and region.panel not in panels:
            raise FormatError(name, f"names unknown panel {region.panel!r}", field=f"{region.name}/panel")
    return geometry


def read_geom(path: str | Path) -> CrystfelGeometry:
    """Parse a .geom file from disk."""
    file = Path(path)
    try:
        text = file.read_text()
    except OSError as error:
        raise FormatError(file, f"cannot be read: {error}") from error
    return parse_geom(text, file)


def _no_locations(location: str) -> float:
    raise ValueError(f"value stored at {location} in the data files, and no data file to read it from")


def _length_m(text: str, source: str, key: str, resolve: ValueResolver) -> float:
    """A length with optional units ('0.1', '100 mm', '/path/to/value mm'): metres."""
    parts = text.split()
    if not parts:
        raise FormatError(source, "is empty", field=key)
    units = parts[1].lower() if len(parts) > 1 else None
    if parts[0].startswith("/"):
        value = _resolved(parts[0], source, key, resolve)
        units = units or "mm"  # CrystFEL's historical default for locations
    else:
        value = _parse_float(parts[0], source, key)
        units = units or "m"
    if units not in ("m", "mm"):
        raise FormatError(source, f"units must be m or mm, got {units!r}", field=key)
    return value / 1000.0 if units == "mm" else value


def _resolved(location: str, source: str, key: str, resolve: ValueResolver) -> float:
    try:
        return float(resolve(location))
    except (KeyError, OSError, ValueError, TypeError) as error:
        raise FormatError(source, f"cannot read the value at {location}: {error}", field=key) from error


def wavelength_angstrom(geometry: CrystfelGeometry, resolve: ValueResolver = _no_locations) -> float | None:
    """The wavelength the file states (wavelength or photon_energy), in Å; None if it states neither."""
    source = geometry.source
    if geometry.wavelength is not None:
        match = re.fullmatch(r"(\S+?)\s*(m|A|Å)?", geometry.wavelength.strip())
        if match is None:
            raise FormatError(source, f"cannot read {geometry.wavelength!r}", field="wavelength")
        text, units = match.groups()
        value = (
            _resolved(text, source, "wavelength", resolve)
            if text.startswith("/")
            else _parse_float(text, source, "wavelength")
        )
        if units is None:
            units = "m"
        return value * 1e10 if units == "m" else value
    if geometry.photon_energy is not None:
        parts = geometry.photon_energy.split()
        text, units = parts[0], (parts[1] if len(parts) > 1 else "eV")
        value = (
            _resolved(text, source, "photon_energy", resolve)
            if text.startswith("/")
            else _parse_float(text, source, "photon_energy")
        )
        if units.lower() == "kev":
            value *= 1000.0
        elif units.lower() != "ev":
            raise FormatError(source, f"units must be eV or keV, got {units!r}", field="photon_energy")
        if value <= 0:
            raise FormatError(source, f"must be positive, got {value}", field="photon_energy")
        return PLANCK_EV_ANGSTROM / value
    return None


def to_detector(geometry: CrystfelGeometry, resolve: ValueResolver = _no_locations) -> Detector:
    """Our Detector (DIALS lab frame, mm) from a parsed .geom file."""
    source = geometry.source
    panels = []
    for panel in geometry.panels:
        clen_text = panel.clen or geometry.clen
        if clen_text is None:
            raise FormatError(source, "is missing (no clen for this panel or the detector)", field=f"{panel.name}/clen")
        clen = _length_m(clen_text, source, f"{panel.name}/clen", resolve)
        assert panel.res is not None and panel.fs is not None and panel.ss is not None
        assert panel.corner_x is not None and panel.corner_y is not None
        if panel.res <= 0:
            raise FormatError(source, f"must be positive, got {panel.res}", field=f"{panel.name}/res")
        pixel_m = 1.0 / panel.res
        fast = unit_vector(panel.fs, source, f"{panel.name}/fs")
        slow = unit_vector(panel.ss, source, f"{panel.name}/ss")
        corner = np.array([panel.corner_x * pixel_m, panel.corner_y * pixel_m, clen + panel.coffset]) * 1000.0
        try:
            panels.append(
                Panel(
                    name=panel.name,
                    origin=tuple(MCSTAS_TO_LAB @ corner),
                    fast_axis=tuple(MCSTAS_TO_LAB @ fast),
                    slow_axis=tuple(MCSTAS_TO_LAB @ slow),
                    pixel_size=pixel_m * 1000.0,
                    size=panel.size,
                )
            )
        except (GeometryError, ValidationError) as error:
            raise FormatError(source, f"inconsistent panel geometry: {describe(error)}", field=panel.name) from error
    common_size_check(
        [panel.size for panel in geometry.panels],
        [panel.name for panel in geometry.panels],
        source,
        [f"{panel.name}/max_fs" for panel in geometry.panels],
    )
    try:
        return Detector(panels=panels)
    except (GeometryError, ValidationError) as error:
        raise FormatError(source, f"inconsistent detector: {describe(error)}") from error


def bad_region_mask(geometry: CrystfelGeometry, detector: Detector) -> np.ndarray:
    """True = valid, for every pixel (n_panels, n_slow, n_fast), after bad regions, no_index and edge masking."""
    valid = np.ones(detector.frame_shape, dtype=bool)
    _, n_slow, n_fast = detector.frame_shape
    names = [panel.name for panel in geometry.panels]
    for number, panel in enumerate(geometry.panels):
        if panel.no_index:
            valid[number] = False
        edge = panel.mask_edge_pixels
        if edge > 0:
            valid[number, :edge] = valid[number, -edge:] = False
            valid[number, :, :edge] = valid[number, :, -edge:] = False
    for region in geometry.bad_regions:
        if region.min_x is not None or region.max_x is not None:
            if None in (region.min_x, region.max_x, region.min_y, region.max_y):
                raise FormatError(geometry.source, "needs min_x, max_x, min_y and max_y", field=region.name)
            slow_index, fast_index = np.meshgrid(np.arange(n_slow) + 0.5, np.arange(n_fast) + 0.5, indexing="ij")
            for number, panel in enumerate(geometry.panels):
                assert panel.fs is not None and panel.ss is not None
                assert panel.corner_x is not None and panel.corner_y is not None
                x = panel.corner_x + fast_index * panel.fs[0] + slow_index * panel.ss[0]
                y = panel.corner_y + fast_index * panel.fs[1] + slow_index * panel.ss[1]
                inside = (x >= region.min_x) & (x <= region.max_x) & (y >= region.min_y) & (y <= region.max_y)
                valid[number] &= ~inside
            continue
        if region.panel is None:
            raise FormatError(geometry.source, "an fs/ss bad region needs a panel", field=f"{region.name}/panel")
        number = names.index(region.panel)
        panel = geometry.panels[number]
        box = (region.min_fs, region.max_fs, region.min_ss, region.max_ss)
        if None in box:
            raise FormatError(geometry.source, "needs min_fs, max_fs, min_ss and max_ss", field=region.name)
        min_fs, max_fs, min_ss, max_ss = (int(v) for v in box)  # type: ignore[arg-type]
        # Ranges are in the data block's coordinates: shift them into the panel's own pixels.
        fs0, ss0 = max(min_fs - panel.min_fs, 0), max(min_ss - panel.min_ss, 0)
        fs1, ss1 = min(max_fs - panel.min_fs, n_fast - 1), min(max_ss - panel.min_ss, n_slow - 1)
        if fs0 <= fs1 and ss0 <= ss1:
            valid[number, ss0 : ss1 + 1, fs0 : fs1 + 1] = False
    return valid


def _vector_text(vector: np.ndarray) -> str:
    return " ".join(f"{value:+.17g}{axis}" for value, axis in zip(vector, "xyz", strict=True))


def geom_text(
    detector: Detector,
    beam: Beam,
    *,
    data_path: str = "/entry_1/data_1/data",
    mask_path: str | None = "/entry_1/data_1/mask",
    panel_rows: list[tuple[int, int]] | None = None,
    note: str = "",
) -> str:
    """A .geom describing ``detector`` and ``beam`` for data stacked as (frames, n_panels·n_slow, n_fast).

    ``panel_rows``: (min_ss, min_fs) of each panel in the slab; default: panels one under the other.
    """
    _, n_slow, n_fast = detector.frame_shape
    rows = panel_rows or [(number * n_slow, 0) for number in range(len(detector.panels))]
    corners_z = [float((MCSTAS_TO_LAB @ np.asarray(panel.origin))[2]) for panel in detector.panels]
    clen_mm = corners_z[0]
    lines = [
        "; CrystFEL geometry written by sfx-live" + (f" for {note}" if note else ""),
        "; CrystFEL lab frame: +z along the beam, +y up (x and z are those of the DIALS frame negated)",
        f"photon_energy = {PLANCK_EV_ANGSTROM / beam.wavelength:.17g} eV",
        f"bandwidth = {beam.bandwidth / _FWHM_PER_SIGMA:.17g}",
        f"clen = {clen_mm / 1000.0:.17g} m",
        "adu_per_photon = 1",
        "",
        f"data = {data_path}",
        "dim0 = %",
        "dim1 = ss",
        "dim2 = fs",
    ]
    if mask_path is not None:
        lines += [f"mask = {mask_path}", "mask_good = 0x0", "mask_bad = 0xffff"]
    lines.append("")
    for panel, (min_ss, min_fs), corner_z in zip(detector.panels, rows, corners_z, strict=True):
        name = panel.name
        if not re.fullmatch(r"[A-Za-z0-9_]+", name) or name.startswith(("bad", "group", "rigid_group")):
            raise ValueError(f"panel name {name!r} cannot be written to a CrystFEL geometry file")
        pixel_m = panel.pixel_size / 1000.0
        corner = MCSTAS_TO_LAB @ np.asarray(panel.origin) / 1000.0  # metres, CrystFEL frame
        lines += [
            f"{name}/min_fs = {min_fs}",
            f"{name}/max_fs = {min_fs + n_fast - 1}",
            f"{name}/min_ss = {min_ss}",
            f"{name}/max_ss = {min_ss + n_slow - 1}",
            f"{name}/res = {1.0 / pixel_m:.17g}",
            f"{name}/fs = {_vector_text(MCSTAS_TO_LAB @ np.asarray(panel.fast_axis))}",
            f"{name}/ss = {_vector_text(MCSTAS_TO_LAB @ np.asarray(panel.slow_axis))}",
            f"{name}/corner_x = {corner[0] / pixel_m:.17g}",
            f"{name}/corner_y = {corner[1] / pixel_m:.17g}",
            f"{name}/coffset = {(corner_z - clen_mm) / 1000.0:.17g}",
            "",
        ]
    lines.append(f"group_all = {','.join(panel.name for panel in detector.panels)}")
    return "\n".join(lines) + "\n"


def beam_from_geom(geometry: CrystfelGeometry, wavelength: float) -> Beam:
    """Our Beam for a wavelength (Å) with the bandwidth the .geom states (its σ converted to our FWHM)."""
    arguments: dict[str, float] = {"wavelength": wavelength}
    if geometry.bandwidth is not None:
        arguments["bandwidth"] = geometry.bandwidth * _FWHM_PER_SIGMA
    try:
        return Beam(**arguments)
    except ValidationError as error:
        raise FormatError(geometry.source, f"beam parameters out of range: {describe(error)}") from error
