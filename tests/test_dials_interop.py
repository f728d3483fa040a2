"""DIALS (the Debian packages, Debian's python3) reads our NXmx runs the way we mean them.

``dials.import`` imports a run we wrote; a small dxtbx script (run by /usr/bin/python3) dumps what DIALS understood
as JSON: panel frames, pixel size, wavelength, beam centre, number of images, pixel values and the static mask.
Each is compared with our geometry. A file laid out as other software writes NXmx (rotated detector, chained
translations in m and µm) checks that our reader follows transformation chains as dxtbx does.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import hdf5plugin
import numpy as np
import pytest

from libs.science.formats import open_run, open_run_writer
from libs.science.geometry import Beam, Detector, jungfrau4m_detector, single_panel_detector
from tests.support.frames import synthetic_frames, write_foreign_nxmx
from tests.support.tools import SYSTEM_PYTHON

# DIALS runs in subprocesses (seconds each); without it the tests fail, naming the command that installs it.
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("dials_python")]

DEBIAN_PYTHON = SYSTEM_PYTHON
PIXEL_PROBES = [(0, 0), (7, 11), (31, 63)]  # (slow, fast) positions whose values are compared

DUMP_MODELS = """
import json, sys
from dxtbx.model.experiment_list import ExperimentListFactory

experiments = ExperimentListFactory.from_json_file(sys.argv[1], check_format=True)
probes = json.loads(sys.argv[2])
imagesets = experiments.imagesets()
second = experiments[1].imageset  # stills: one imageset of one image per experiment
beam = experiments[0].beam
detector = experiments[0].detector
panels = []
raw = second.get_raw_data(0)
mask = second.get_mask(0)
for index, panel in enumerate(detector):
    values = raw[index].as_numpy_array()
    panels.append({
        "origin": list(panel.get_origin()),
        "fast": list(panel.get_fast_axis()),
        "slow": list(panel.get_slow_axis()),
        "pixel_size": list(panel.get_pixel_size()),
        "image_size": list(panel.get_image_size()),
        "distance": panel.get_distance(),
        "beam_centre_mm": list(panel.get_beam_centre(beam.get_s0())),
        "frame1_sum": int(values.sum()),
        "frame1_probes": [int(values[s, f]) for s, f in probes],
        "masked": int((~mask[index].as_numpy_array()).sum()),
    })
print(json.dumps({
    "experiments": len(experiments),
    "images": sum(len(imageset) for imageset in imagesets),
    "second_index": list(second.indices()),
    "wavelength": beam.get_wavelength(),
    "sample_to_source": list(beam.get_sample_to_source_direction()),
    "format": second.get_format_class().__name__,
    "panels": panels,
}))
"""


def dials_view(run: Path, workdir: Path) -> dict[str, Any]:
    """Import ``run`` with dials.import and dump the resulting models with dxtbx.

    Debian's HDF5 has no bitshuffle filter; hdf5plugin's filter libraries load into it through HDF5_PLUGIN_PATH,
    as they would at a beamline.
    """
    expt = workdir / f"{run.stem}.expt"
    environment = {**os.environ, "HDF5_PLUGIN_PATH": hdf5plugin.PLUGIN_PATH}
    imported = subprocess.run(
        ["dials.import", str(run), f"output.experiments={expt}", f"output.log={workdir / 'import.log'}"],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=120,
        env=environment,
    )
    assert imported.returncode == 0, imported.stdout + imported.stderr
    dumped = subprocess.run(
        [DEBIAN_PYTHON, "-c", DUMP_MODELS, str(expt), json.dumps(PIXEL_PROBES)],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=120,
        env=environment,
    )
    assert dumped.returncode == 0, dumped.stderr
    view: dict[str, Any] = json.loads(dumped.stdout.strip().splitlines()[-1])
    return view


def assert_dials_agrees(
    view: dict[str, Any], detector: Detector, beam: Beam, frames: np.ndarray, mask: np.ndarray
) -> None:
    assert view["format"] == "FormatNXmx"
    assert view["images"] == len(frames)
    assert view["second_index"] == [1]
    assert view["wavelength"] == pytest.approx(beam.wavelength, abs=1e-9)
    np.testing.assert_allclose(view["sample_to_source"], [0.0, 0.0, 1.0], atol=1e-12)  # beam along -z
    assert len(view["panels"]) == len(detector.panels)
    beam_direction = np.array([[0.0, 0.0, -1.0]])
    for number, (seen, panel) in enumerate(zip(view["panels"], detector.panels, strict=True)):
        np.testing.assert_allclose(seen["origin"], panel.origin, rtol=0, atol=1e-6)
        np.testing.assert_allclose(seen["fast"], panel.fast_axis, rtol=0, atol=1e-9)
        np.testing.assert_allclose(seen["slow"], panel.slow_axis, rtol=0, atol=1e-9)
        np.testing.assert_allclose(seen["pixel_size"], [panel.pixel_size] * 2, rtol=0, atol=1e-9)
        assert tuple(seen["image_size"]) == panel.size
        assert seen["distance"] == pytest.approx(panel.distance, abs=1e-6)
        fast, slow, _ = panel.ray_to_pixel(beam_direction)
        expected_centre = [float(fast[0]) * panel.pixel_size, float(slow[0]) * panel.pixel_size]
        np.testing.assert_allclose(seen["beam_centre_mm"], expected_centre, rtol=0, atol=1e-6)
        assert seen["frame1_sum"] == int(frames[1, number].sum())
        assert seen["frame1_probes"] == [int(frames[1, number, s, f]) for s, f in PIXEL_PROBES]
        assert seen["masked"] == int((~mask[number]).sum())


@pytest.mark.parametrize("layout", ["jungfrau4m", "single-panel", "external-data-files-bitshuffle-lz4"])
def test_dials_imports_our_nxmx_runs_with_our_geometry(tmp_path: Path, layout: str) -> None:
    if layout == "single-panel":
        detector = single_panel_detector(distance=150.0, n_fast=1030, n_slow=1065, beam_centre=(512.3, 540.9))
    else:
        detector = jungfrau4m_detector(distance=95.0)
    beam = Beam(wavelength=1.27)
    frames = synthetic_frames(detector, 3, seed=11)
    mask = np.ones(detector.frame_shape, dtype=bool)
    mask[0, 100:110, 200:230] = False
    mask[-1, 0, :] = False
    run = tmp_path / "run_master.h5"
    external = layout.startswith("external")
    with open_run_writer(
        run,
        "nxmx",
        detector=detector,
        beam=beam,
        mask=mask,
        frames_per_data_file=2 if external else None,
        compression="bitshuffle-lz4" if external else "none",
    ) as writer:
        for frame in frames:
            writer.append(frame)
    view = dials_view(run, tmp_path)
    assert view["experiments"] == len(frames)  # stills: one experiment per frame
    assert_dials_agrees(view, detector, beam, frames, mask)
    with open_run(run) as reader:  # and our reader agrees with what we meant
        np.testing.assert_allclose([p.origin for p in reader.detector.panels], [p.origin for p in detector.panels])


def test_dials_and_our_reader_follow_foreign_transformation_chains_alike(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    frames = rng.integers(0, 60000, size=(3, 3, 40, 64)).astype(np.int32)
    run = tmp_path / "foreign.nxs"
    meant = write_foreign_nxmx(run, frames, stacked=True)
    with open_run(run) as reader:
        ours = reader.detector
        mask = reader.mask
        np.testing.assert_allclose([p.origin for p in ours.panels], [p.origin for p in meant.panels], atol=1e-9)
    view = dials_view(run, tmp_path)
    assert_dials_agrees(view, ours, Beam(wavelength=1.0), frames, mask)
    assert abs(view["panels"][0]["slow"][2]) > 0.4  # the 25° rotation about x really tilts the panels
