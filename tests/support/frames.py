"""Small synthetic detector frames and HDF5 files for the format tests and the DIALS cross-checks."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from libs.science.geometry import Detector, Panel


def small_multipanel_detector() -> Detector:
    """Four 64 × 32 modules, one of them tilted, so tests stay fast while covering general geometry."""
    panels = []
    for number in range(4):
        tilt = np.deg2rad(10.0) if number == 3 else 0.0
        panels.append(
            Panel(
                name=f"q{number}",
                origin=(-5.0 + 5.5 * (number % 2), 3.0 - 3.5 * (number // 2), -80.0 - number),
                fast_axis=(np.cos(tilt), 0.0, np.sin(tilt)),
                slow_axis=(0.0, -1.0, 0.0),
                pixel_size=0.075,
                size=(64, 32),
            )
        )
    return Detector(panels=panels)


def synthetic_frames(detector: Detector, count: int, seed: int = 1) -> np.ndarray:
    """Poisson background with a few bright spots, as int32."""
    rng = np.random.default_rng(seed)
    frames = rng.poisson(3.0, size=(count, *detector.frame_shape)).astype(np.int32)
    for frame in frames:
        spots = rng.integers(0, frame.size, size=40)
        frame.reshape(-1)[spots] += rng.integers(100, 5000, size=40, dtype=np.int32)
    return frames


def write_foreign_nxmx(path: Path, frames: np.ndarray, *, stacked: bool = False) -> Detector:
    """An NXmx file unlike our writer's: rotated detector, chained translations in m/um, offsets, relative depends_on,
    data as (frames, module, slow, fast), or, ``stacked``, as (frames, module·slow, fast) which dxtbx also reads.
    Returns the geometry it means, in our lab frame, computed by hand."""
    n_frames, n_modules, n_slow, n_fast = frames.shape
    angle = np.deg2rad(25.0)
    rotation = np.array([[1, 0, 0], [0, np.cos(angle), -np.sin(angle)], [0, np.sin(angle), np.cos(angle)]])
    mcstas_to_lab = np.diag([-1.0, 1.0, -1.0])
    with h5py.File(path, "w") as file:
        entry = file.create_group("entry")
        entry.attrs["NX_class"] = "NXentry"
        entry["definition"] = np.bytes_("NXmx")
        instrument = entry.create_group("instrument")
        instrument.attrs["NX_class"] = "NXinstrument"
        beam = instrument.create_group("beam")
        beam.attrs["NX_class"] = "NXbeam"
        beam.create_dataset("incident_wavelength", data=np.full(n_frames, 0.1)).attrs["units"] = "nm"
        detector = instrument.create_group("detector")
        detector.attrs["NX_class"] = "NXdetector"
        detector["sensor_material"] = "Si"
        detector.create_dataset("sensor_thickness", data=450.0).attrs["units"] = "um"
        transformations = detector.create_group("transformations")
        transformations.attrs["NX_class"] = "NXtransformations"
        two_theta = transformations.create_dataset("two_theta", data=np.full(n_frames, 25.0))
        two_theta.attrs.update(
            {"transformation_type": "rotation", "vector": [1.0, 0.0, 0.0], "units": "deg", "depends_on": "."}
        )
        distance = transformations.create_dataset("distance", data=0.12)
        distance.attrs.update(
            {"transformation_type": "translation", "vector": [0.0, 0.0, 1.0], "units": "m", "depends_on": "two_theta"}
        )
        expected_panels = []
        for number in range(n_modules):
            module = detector.create_group(f"ASIC{number}")
            module.attrs["NX_class"] = "NXdetector_module"
            if stacked:
                module["data_origin"] = np.array([number * n_slow, 0])
                module["data_size"] = np.array([n_slow, n_fast])
            else:
                module["data_origin"] = np.array([number, 0, 0])
                module["data_size"] = np.array([1, n_slow, n_fast])
            offset_um = 500.0 * (number + 1)
            module_offset = module.create_dataset("module_offset", data=offset_um)
            module_offset.attrs.update(
                {
                    "transformation_type": "translation",
                    "vector": [1.0, 0.0, 0.0],
                    "units": "um",
                    "offset": [0.0, 4.0 * number, 0.0],
                    "offset_units": "mm",
                    "depends_on": "/entry/instrument/detector/transformations/distance",
                }
            )
            for name, vector in (("fast_pixel_direction", [-1.0, 0.0, 0.0]), ("slow_pixel_direction", [0, -1.0, 0])):
                axis = module.create_dataset(name, data=172.0)
                axis.attrs.update(
                    {
                        "transformation_type": "translation",
                        "vector": vector,
                        "units": "um",
                        "offset": [0.0, 0.0, 0.0],
                        "depends_on": "module_offset",
                    }
                )
            corner = rotation @ (np.array([offset_um / 1000.0, 4.0 * number, 0.0]) + np.array([0.0, 0.0, 120.0]))
            expected_panels.append(
                Panel(
                    name=f"ASIC{number}",
                    origin=tuple(mcstas_to_lab @ corner),
                    fast_axis=tuple(mcstas_to_lab @ rotation @ np.array([-1.0, 0.0, 0.0])),
                    slow_axis=tuple(mcstas_to_lab @ rotation @ np.array([0.0, -1.0, 0.0])),
                    pixel_size=0.172,
                    size=(n_fast, n_slow),
                )
            )
        mask = np.zeros((n_modules, n_slow, n_fast), dtype=np.uint32)
        mask[1, 0, :] = 1  # gap
        if not stacked:  # dxtbx rejects any non-zero mask value; NeXus says only bits 0-15 are reasons to reject
            mask[2, 3, 4] = 1 << 31  # virtual pixel: a flag, not a reason to reject
        detector["pixel_mask"] = mask.reshape(n_modules * n_slow, n_fast) if stacked else mask
        sample = entry.create_group("sample")
        sample.attrs["NX_class"] = "NXsample"
        sample["depends_on"] = np.bytes_(".")
        data = entry.create_group("data")
        data.attrs["NX_class"] = "NXdata"
        data.attrs["signal"] = "data"
        if stacked:
            data.create_dataset("data", data=frames.reshape(n_frames, n_modules * n_slow, n_fast))
        else:
            data.create_dataset("data", data=frames, chunks=(1, 1, n_slow, n_fast))
    return Detector(panels=expected_panels)
