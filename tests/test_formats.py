"""NXmx and CXI(+.geom) runs: written, read back, grown live, and refused with a named reason when broken."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from libs.science.formats import FormatError, open_run, open_run_writer
from libs.science.formats.crystfel_geom import (
    bad_region_mask,
    geom_text,
    parse_geom,
    to_detector,
    wavelength_angstrom,
)
from libs.science.geometry import Beam, Detector, jungfrau4m_detector, single_panel_detector
from tests.support.frames import small_multipanel_detector, synthetic_frames, write_foreign_nxmx

ROOT = Path(__file__).resolve().parents[1]
BEAM = Beam(wavelength=1.3, bandwidth=0.004, divergence=2e-4, polarization_fraction=0.95)


def write_run(path: Path, file_format: str, detector: Detector, frames: np.ndarray, **options: object) -> Path:
    with open_run_writer(path, file_format, detector=detector, beam=BEAM, **options) as writer:  # type: ignore[arg-type]
        for frame in frames:
            writer.append(frame)
    return path


def assert_same_geometry(found: Detector, expected: Detector, tolerance_mm: float = 1e-6) -> None:
    assert len(found.panels) == len(expected.panels)
    for got, want in zip(found.panels, expected.panels, strict=True):
        assert got.name == want.name
        assert got.size == want.size
        assert abs(got.pixel_size - want.pixel_size) < tolerance_mm
        np.testing.assert_allclose(got.origin, want.origin, rtol=0, atol=tolerance_mm)
        np.testing.assert_allclose(got.fast_axis, want.fast_axis, rtol=0, atol=1e-9)
        np.testing.assert_allclose(got.slow_axis, want.slow_axis, rtol=0, atol=1e-9)


@pytest.mark.parametrize("detector_name", ["jungfrau4m", "single", "tilted"])
def test_nxmx_and_cxi_give_identical_frames_geometry_and_mask(tmp_path: Path, detector_name: str) -> None:
    detector = {
        "jungfrau4m": jungfrau4m_detector,
        "single": lambda: single_panel_detector(n_fast=300, n_slow=260, beam_centre=(151.3, 120.8)),
        "tilted": small_multipanel_detector,
    }[detector_name]()
    frames = synthetic_frames(detector, 3)
    mask = np.ones(detector.frame_shape, dtype=bool)
    mask[0, 5:9, 10:30] = False
    mask[-1, :, -3:] = False
    nxmx = write_run(tmp_path / "run.h5", "nxmx", detector, frames, mask=mask)
    cxi = write_run(tmp_path / "run.cxi", "cxi", detector, frames, mask=mask)
    assert (tmp_path / "run.geom").exists()
    with open_run(nxmx) as from_nxmx, open_run(cxi) as from_cxi:
        for reader, name in ((from_nxmx, "nxmx"), (from_cxi, "cxi")):
            assert reader.file_format == name
            assert reader.frame_count == 3
            assert reader.is_complete is True
            assert_same_geometry(reader.detector, detector)
            assert abs(reader.beam.wavelength - BEAM.wavelength) < 1e-9
            assert abs(reader.beam.bandwidth - BEAM.bandwidth) < 1e-9
            np.testing.assert_array_equal(reader.mask, mask)
            np.testing.assert_array_equal(reader.read_frames(0, 3), frames)
            np.testing.assert_array_equal(reader.read_frame(2), frames[2])
            assert reader.read_frame(1).shape == detector.frame_shape
        assert_same_geometry(from_nxmx.detector, from_cxi.detector)
        np.testing.assert_array_equal(from_nxmx.read_frames(1, 3), from_cxi.read_frames(1, 3))
        with pytest.raises(IndexError):
            from_nxmx.read_frame(3)


def test_nxmx_data_in_external_linked_files(tmp_path: Path) -> None:
    detector = small_multipanel_detector()
    frames = synthetic_frames(detector, 5)
    run = tmp_path / "collect" / "series_master.h5"
    write_run(run, "nxmx", detector, frames, frames_per_data_file=2)
    data_files = sorted(run.parent.glob("series_master_data_*.h5"))
    assert [f.name for f in data_files] == [f"series_master_data_00000{n}.h5" for n in (1, 2, 3)]
    with h5py.File(run) as master:
        assert isinstance(master["/entry/data"].get("data_000002", getlink=True), h5py.ExternalLink)
        assert master["/entry/data/data"].is_virtual
    # The run folder can be moved and read from anywhere: links are relative to the master.
    moved = tmp_path / "moved"
    run.parent.rename(moved)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    previous = Path.cwd()
    os.chdir(elsewhere)
    try:
        master_path = moved / "series_master.h5"
        with open_run(master_path) as reader:
            assert reader.frame_count == 5
            assert len(reader.paths) == 3
            np.testing.assert_array_equal(reader.read_frames(0, 5), frames)
            np.testing.assert_array_equal(reader.read_frames(1, 4), frames[1:4])  # crosses file boundaries
        with open_run([master_path, *sorted(moved.glob("*_data_*.h5"))]) as reader:
            assert reader.frame_count == 5
    finally:
        os.chdir(previous)
    empty = write_run(tmp_path / "empty.h5", "nxmx", detector, frames[:0], frames_per_data_file=2)
    with open_run(empty) as reader:
        assert reader.frame_count == 0 and reader.is_complete
        assert reader.read_frames(0, 0).shape == (0, *detector.frame_shape)
    (moved / "series_master_data_000003.h5").unlink()
    with pytest.raises(FormatError, match=r"series_master_data_000003\.h5.*does not exist"):
        open_run(moved / "series_master.h5")
    with pytest.raises(FormatError, match="neither an NXmx master nor a data file linked"):
        write_run(tmp_path / "other.h5", "nxmx", detector, frames[:1], frames_per_data_file=1)
        open_run([moved / "series_master.h5", tmp_path / "other_data_000001.h5"])


@pytest.mark.parametrize("file_format", ["nxmx", "cxi"])
def test_a_run_spread_over_several_files_reads_in_order(tmp_path: Path, file_format: str) -> None:
    detector = small_multipanel_detector()
    frames = synthetic_frames(detector, 5)
    paths = [
        write_run(tmp_path / f"r0042-c0{n}.{file_format}", file_format, detector, part)
        for n, part in enumerate((frames[:2], frames[2:3], frames[3:]))
    ]
    geometry = tmp_path / "r0042-c00.geom" if file_format == "cxi" else None
    listed = [*paths, geometry] if geometry is not None else paths  # a .geom may also come in the list
    with open_run(listed) as reader:
        assert reader.frame_count == 5 and reader.paths == paths and reader.is_complete
        np.testing.assert_array_equal(reader.read_frames(0, 5), frames)
        np.testing.assert_array_equal(reader.read_frame(3), frames[3])
        buffer = np.full((4, *detector.frame_shape), -1, dtype=np.int32)
        assert reader.read_frames(1, 5, out=buffer) is buffer  # across the three files, into the caller's buffer
        np.testing.assert_array_equal(buffer, frames[1:])
        with pytest.raises(ValueError, match="out must be a C-contiguous array of shape"):
            reader.read_frames(0, 2, out=buffer)
    if file_format == "nxmx":
        with pytest.raises(FormatError, match=r"x\.geom: a geometry file applies to CXI runs only"):
            open_run(paths, geometry=tmp_path / "x.geom")
        other = write_run(
            tmp_path / "other.h5", "nxmx", jungfrau4m_detector(), synthetic_frames(jungfrau4m_detector(), 1)
        )
        with pytest.raises(FormatError, match=r"other\.h5: /entry/instrument/detector: geometry differs"):
            open_run([*paths, other])


def test_nxmx_data_as_virtual_dataset_or_single_external_link(tmp_path: Path) -> None:
    detector = small_multipanel_detector()
    frames = synthetic_frames(detector, 4)
    master = write_run(tmp_path / "vds.h5", "nxmx", detector, frames, frames_per_data_file=3)
    with h5py.File(master, "r+") as file:  # as DLS-style writers leave it: only the virtual dataset
        del file["/entry/data/data_000001"], file["/entry/data/data_000002"]
    with open_run(master) as reader:
        assert reader.paths == [master]
        np.testing.assert_array_equal(reader.read_frames(0, 4), frames)
    single = write_run(tmp_path / "one.h5", "nxmx", detector, frames, frames_per_data_file=4)
    with h5py.File(single, "r+") as file:  # the NXdata signal itself an external link
        del file["/entry/data/data"], file["/entry/data/data_000001"]
        file["/entry/data/data"] = h5py.ExternalLink("one_data_000001.h5", "/entry/data/data")
    with open_run(single) as reader:
        assert reader.paths == [tmp_path / "one_data_000001.h5"]
        np.testing.assert_array_equal(reader.read_frames(0, 4), frames)
    (tmp_path / "vds_data_000002.h5").unlink()
    with pytest.raises(FormatError, match=r"vds\.h5: /entry/data/data: virtual dataset source file vds_data_000002"):
        open_run(master)


@pytest.mark.parametrize("file_format", ["nxmx", "cxi"])
def test_bitshuffle_lz4_compressed_runs(tmp_path: Path, file_format: str) -> None:
    detector = jungfrau4m_detector()
    frames = synthetic_frames(detector, 2)
    path = write_run(tmp_path / f"run.{file_format}", file_format, detector, frames, compression="bitshuffle-lz4")
    with h5py.File(path) as file:
        data = file["/entry/data/data" if file_format == "nxmx" else "/entry_1/data_1/data"]
        assert "32008" in data._filters  # the bitshuffle filter id
        assert data.id.get_storage_size() < frames.nbytes / 3
    with open_run(path) as reader:
        np.testing.assert_array_equal(reader.read_frames(0, 2), frames)


_LIVE_WRITER = textwrap.dedent(
    """
    import sys, time
    import numpy as np
    sys.path.insert(0, {root!r})
    from libs.science.formats import open_run_writer
    from libs.science.geometry import Beam
    from tests.support.frames import small_multipanel_detector, synthetic_frames
    detector = small_multipanel_detector()
    frames = synthetic_frames(detector, {count})
    with open_run_writer({path!r}, {file_format!r}, detector=detector, beam=Beam(wavelength=1.3), live=True,
                         compression="bitshuffle-lz4") as writer:
        print("open", flush=True)
        for frame in frames:
            time.sleep(0.25)
            writer.append(frame)
        time.sleep(0.25)
    print("closed", flush=True)
    """
)


@pytest.mark.parametrize("file_format", ["nxmx", "cxi"])
def test_growing_swmr_file_is_read_while_another_process_writes_it(tmp_path: Path, file_format: str) -> None:
    count = 6
    path = tmp_path / f"live.{file_format}"
    script = _LIVE_WRITER.format(root=str(ROOT), count=count, path=str(path), file_format=file_format)
    writer = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert writer.stdout is not None and writer.stdout.readline().strip() == "open"
        expected = synthetic_frames(small_multipanel_detector(), count)
        seen_counts = []
        with open_run(path) as reader:
            assert reader.is_complete is False
            deadline = time.monotonic() + 30
            while not reader.is_complete:
                assert time.monotonic() < deadline, "writer did not finish"
                available = reader.refresh()
                seen_counts.append(available)
                if available:
                    np.testing.assert_array_equal(reader.read_frame(available - 1), expected[available - 1])
                time.sleep(0.05)
            assert reader.refresh() == count
            np.testing.assert_array_equal(reader.read_frames(0, count), expected)
        growing = sorted(set(seen_counts))
        assert len([n for n in growing if 0 < n < count]) >= 2, f"never saw the file grow: {growing}"
        assert seen_counts == sorted(seen_counts)
    finally:
        writer.wait(timeout=30)
    assert writer.returncode == 0


# ---------------------------------------------------------------------------------------------------------------------
# NXmx as other programs write it: general transformation chains, units, a 4-D data layout


def test_nxmx_written_by_other_software_follows_transformation_chains(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    frames = rng.integers(0, 1000, size=(4, 3, 20, 30)).astype(np.uint16)
    expected = write_foreign_nxmx(tmp_path / "foreign.nxs", frames)
    with open_run(tmp_path / "foreign.nxs") as reader:
        assert_same_geometry(reader.detector, expected)
        assert reader.detector.panels[0].distance == pytest.approx(120.0 + 0.0, abs=5.0)
        assert reader.beam.wavelength == pytest.approx(1.0)
        assert reader.frame_count == 4
        assert reader.is_complete is None  # the file does not say
        np.testing.assert_array_equal(reader.read_frames(0, 4), frames)
        assert reader.mask.shape == (3, 20, 30)
        assert not reader.mask[1, 0].any() and reader.mask[1, 1:].all()
        assert reader.mask[2, 3, 4]  # bit 31 alone does not reject a pixel


# ---------------------------------------------------------------------------------------------------------------------
# CrystFEL geometry files as people write them


REAL_WORLD_GEOM = """
; a hand-written geometry in the style of the facilities' files
photon_energy = 9.5 keV
bandwidth = 1.0e-3
clen = /LCLS/detector_1/EncoderValue mm
adu_per_eV = 0.0003
res = 13333.3333333333
data = /data/JF/data
dim0 = %
dim1 = ss
dim2 = fs
mask0_data = /data/JF/mask
mask0_goodbits = 0x1
mask0_badbits = 0x6

p0/min_fs = 0
p0/max_fs = 63
p0/min_ss = 0
p0/max_ss = 31
p0/fs = -0.0010058292x +0.9999994942y
p0/ss = -0.9999994942x -0.0010058292y
p0/corner_x = 575.475
p0/corner_y = -221.866
p0/coffset = 0.01

p1/min_fs = 0
p1/max_fs = 63
p1/min_ss = 32
p1/max_ss = 63
p1/fs = +x
p1/ss = -y
p1/corner_x = -100
p1/corner_y = 50.5
p1/no_index = 0

badA/min_fs = 10
badA/max_fs = 12
badA/min_ss = 40
badA/max_ss = 40
badA/panel = p1

badB/min_x = -100.0
badB/max_x = -98.0
badB/min_y = 48.0
badB/max_y = 50.5

group_all = p0,p1
"""


def test_crystfel_geometry_as_people_write_it(tmp_path: Path) -> None:
    geometry = parse_geom(REAL_WORLD_GEOM, "facility.geom")
    clen_mm = 123.4
    detector = to_detector(geometry, lambda location: clen_mm)
    p0, p1 = detector.panels
    pixel = 1000.0 / 13333.3333333333
    assert p0.pixel_size == pytest.approx(pixel, abs=1e-9)
    # CrystFEL (x, y, z) → ours (-x, y, -z)
    np.testing.assert_allclose(p0.origin, (-575.475 * pixel, -221.866 * pixel, -(clen_mm + 10.0)), atol=1e-9)
    np.testing.assert_allclose(p0.fast_axis, (0.0010058292, 0.9999994942, 0.0), atol=1e-9)
    np.testing.assert_allclose(p1.origin, (100 * pixel, 50.5 * pixel, -clen_mm), atol=1e-9)
    np.testing.assert_allclose(p1.fast_axis, (-1.0, 0.0, 0.0))
    assert wavelength_angstrom(geometry) == pytest.approx(12398.419843320026 / 9500.0)
    valid = bad_region_mask(geometry, detector)
    assert not valid[1, 8, 10:13].any() and valid[1, 8, 13]  # fs/ss box in data coordinates (row 40 → panel row 8)
    assert not valid[1, 0, 0] and not valid[1, 1, 1] and valid[1, 5, 5]  # x/y box around p1's corner

    # A CXI file laid out the way this geometry says, read through open_run with the geometry given.
    frames = np.arange(2 * 64 * 64, dtype=np.float32).reshape(2, 64, 64)
    bits = np.ones((64, 64), dtype=np.uint16)
    bits[0, 0] = 0  # lacks the good bit
    bits[0, 1] = 0x3  # has a bad bit
    path = tmp_path / "r0042-c00.cxi"
    with h5py.File(path, "w") as file:
        file.create_dataset("entry_1/data_1/placeholder", data=0)
        file["data/JF/data"] = frames
        file["data/JF/mask"] = bits
        file["LCLS/detector_1/EncoderValue"] = np.full(2, clen_mm)
    geom_path = tmp_path / "facility.geom"
    geom_path.write_text(REAL_WORLD_GEOM)
    with open_run(path, geometry=geom_path) as reader:
        assert_same_geometry(reader.detector, detector)
        np.testing.assert_array_equal(reader.read_frame(1), frames[1].reshape(2, 32, 64))
        assert not reader.mask[0, 0, 0] and not reader.mask[0, 0, 1] and reader.mask[0, 0, 2]
        assert reader.beam.bandwidth == pytest.approx(1.0e-3 * 2.3548200450309493)


def test_geom_text_round_trips_every_panel(tmp_path: Path) -> None:
    detector = small_multipanel_detector()
    text = geom_text(detector, BEAM)
    parsed = parse_geom(text)
    assert_same_geometry(to_detector(parsed), detector, tolerance_mm=1e-9)
    assert wavelength_angstrom(parsed) == pytest.approx(BEAM.wavelength, abs=1e-12)


# ---------------------------------------------------------------------------------------------------------------------
# Bad input: every defect is refused with the file, frame and field named


@pytest.fixture
def small_nxmx(tmp_path: Path) -> Path:
    return write_run(
        tmp_path / "small.h5", "nxmx", small_multipanel_detector(), synthetic_frames(small_multipanel_detector(), 3)
    )


def test_truncated_file_is_refused(tmp_path: Path) -> None:
    path = write_run(tmp_path / "big.h5", "nxmx", jungfrau4m_detector(), synthetic_frames(jungfrau4m_detector(), 2))
    with open(path, "r+b") as handle:
        handle.truncate(path.stat().st_size // 2)
    with pytest.raises(FormatError, match=r"big\.h5.*truncated"), open_run(path) as reader:
        reader.read_frames(0, reader.frame_count)


def test_not_hdf5_and_missing_file_are_refused(tmp_path: Path) -> None:
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"not an hdf5 file at all" * 100)
    with pytest.raises(FormatError, match=r"junk\.h5"):
        open_run(junk)
    with pytest.raises(FormatError, match=r"absent\.h5: file does not exist"):
        open_run(tmp_path / "absent.h5")


def _replace(file: h5py.File, name: str, data: np.ndarray) -> None:
    del file[name]
    file[name] = data


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda f: f.__delitem__("/entry/data/data"), r"/entry/data/data: dataset is missing"),
        (
            lambda f: f.__delitem__("/entry/instrument/detector/module_01/data_size"),
            r"/entry/instrument/detector/module_01/data_size: is missing",
        ),
        (
            lambda f: f.__delitem__("/entry/instrument/beam/incident_wavelength"),
            r"/entry/instrument/beam/incident_wavelength: is missing",
        ),
        (
            lambda f: f["/entry/instrument/detector/module_02/data_origin"].__setitem__(..., [110, 0]),
            r"small\.h5: /entry/data/data: panel q2: pixels 110\.\.142 on axis 0 do not fit the data's 128",
        ),
        (
            lambda f: f["/entry/instrument/detector/module_00/data_size"].__setitem__(..., [32, 60]),
            r"module_00/data_size: panel q0 is 60 × 32 pixels \(fast × slow\) but the others are 64 × 32",
        ),
        (
            lambda f: f["/entry/instrument/detector/module_00/fast_pixel_direction"].attrs.__setitem__(
                "vector", [2.0, 0.0, 0.0]
            ),
            r"module_00/fast_pixel_direction@vector: is not a unit vector \(length 2\)",
        ),
        (
            lambda f: f["/entry/instrument/detector/module_00/slow_pixel_direction"].attrs.__setitem__(
                "vector", [1.0, 0.0, 0.0]
            ),
            r"module_00: inconsistent module geometry.*perpendicular",
        ),
        (
            lambda f: f["/entry/instrument/detector/transformations/detector_z"].attrs.__setitem__("units", "furlong"),
            r"detector_z@units: unknown length units 'furlong'",
        ),
        (
            lambda f: f["/entry/instrument/detector/module_03/module_offset"].attrs.__setitem__(
                "depends_on", "/entry/instrument/detector/transformations/nowhere"
            ),
            r"module_offset@depends_on: depends_on names '/entry/instrument/detector/transformations/nowhere'",
        ),
        (
            lambda f: f["/entry/instrument/detector/transformations/detector_z"].attrs.__setitem__(
                "depends_on", "/entry/instrument/detector/module_00/module_offset"
            ),
            r"depends_on chain loops",
        ),
        (
            lambda f: _replace(f, "/entry/instrument/detector/pixel_mask", np.zeros((10, 64), dtype=np.uint32)),
            r"pixel_mask: shape \(10, 64\) differs from a frame",
        ),
    ],
    ids=[
        "no-data",
        "no-data-size",
        "no-wavelength",
        "module-outside-data",
        "module-size-mismatch",
        "non-unit-axis",
        "parallel-axes",
        "unknown-units",
        "dangling-depends-on",
        "depends-on-loop",
        "mask-shape",
    ],
)
def test_damaged_nxmx_is_refused_naming_the_field(small_nxmx: Path, damage: object, message: str) -> None:
    with h5py.File(small_nxmx, "r+") as file:
        damage(file)  # type: ignore[operator]
    with pytest.raises(FormatError, match=message) as error:
        open_run(small_nxmx)
    assert "small.h5" in str(error.value)


def test_wrong_frame_count_in_a_data_file_is_refused(tmp_path: Path) -> None:
    detector = small_multipanel_detector()
    master = write_run(tmp_path / "run.h5", "nxmx", detector, synthetic_frames(detector, 4), frames_per_data_file=2)
    with h5py.File(tmp_path / "run_data_000002.h5", "r+") as file:
        file["/entry/data/data"].attrs["image_nr_high"] = 5
    with pytest.raises(
        FormatError, match=r"run_data_000002\.h5: /entry/data/data: declares images 3\.\.5 but holds 2 frames"
    ):
        open_run(master)


def test_panel_datasets_with_different_frame_counts_are_refused(tmp_path: Path) -> None:
    text = geom_text(small_multipanel_detector(), BEAM, data_path="/a", mask_path=None).replace(
        "q3/min_fs", "q3/data = /b\nq3/min_fs"
    )
    path = tmp_path / "split.cxi"
    with h5py.File(path, "w") as file:
        file.create_group("entry_1")
        file["a"] = np.zeros((3, 128, 64), dtype=np.int32)
        file["b"] = np.zeros((2, 128, 64), dtype=np.int32)
    (tmp_path / "split.geom").write_text(text)
    with pytest.raises(FormatError, match=r"split\.cxi: /a, /b: panel datasets hold different frame counts"):
        open_run(path)


@pytest.mark.parametrize("file_format", ["nxmx", "cxi"])
def test_corrupt_compressed_chunk_names_the_frame(tmp_path: Path, file_format: str) -> None:
    detector = small_multipanel_detector()
    frames = synthetic_frames(detector, 4)
    path = write_run(tmp_path / f"run.{file_format}", file_format, detector, frames, compression="bitshuffle-lz4")
    name = "/entry/data/data" if file_format == "nxmx" else "/entry_1/data_1/data"
    with h5py.File(path) as file:
        chunk = file[name].id.get_chunk_info_by_coord((2, 64, 0))  # frame 2, third panel
        offset, size = chunk.byte_offset, chunk.size
    with open(path, "r+b") as handle:
        handle.seek(offset)
        handle.write(b"\xff" * size)
    with open_run(path) as reader:
        np.testing.assert_array_equal(reader.read_frame(1), frames[1])
        with pytest.raises(FormatError, match=rf"run\.{file_format}: frame 2: .*cannot be read or decoded"):
            reader.read_frames(0, 4)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda t: t.replace("q1/min_fs = 0", "q1/min_fs = 40").replace("q1/max_fs = 63", "q1/max_fs = 103"),
            r"run\.cxi: /entry_1/data_1/data: panel q1: pixels 40\.\.104 on axis 1 do not fit the data's 64",
        ),
        (lambda t: t.replace("q1/max_fs = 63", "q1/max_fs = 62"), r"q1/max_fs: panel q1 is 63 × 32 pixels"),
        (lambda t: t.replace("q0/fs = ", "q0/fs = 2*"), r"q0/fs: cannot read the vector"),
        (lambda t: t.replace("q2/ss = +0x -1y +0z", "q2/ss = +0x -3y +0z"), r"q2/ss: is not a unit vector"),
        (lambda t: "\n".join(line for line in t.splitlines() if "q1/corner_x" not in line), r"q1/corner_x: is missing"),
        (lambda t: t.replace("data = /entry_1/data_1/data", "data = /entry_1/data_1/nothing"), r"nothing: dataset"),
        (lambda t: t.replace("dim2 = fs", "dim2 = fs\ndim3 = 4"), r"the geometry gives 4 dimensions"),
        (lambda t: t + "q9/min_fs = 0\n", r"q9/max_fs: is missing"),
        (lambda t: t + "detector_shift_x = 0.1 mm\n", r"detector_shift_x: is not supported"),
        (lambda t: t.replace("photon_energy =", "photon_energy = -"), r"photon_energy: must be a number"),
    ],
    ids=[
        "panel-outside-data",
        "panel-size",
        "bad-vector",
        "non-unit-vector",
        "no-corner",
        "no-data",
        "dims",
        "partial",
        "shift",
        "energy",
    ],
)
def test_bad_geometry_files_are_refused(tmp_path: Path, edit: object, message: str) -> None:
    detector = small_multipanel_detector()
    path = write_run(tmp_path / "run.cxi", "cxi", detector, synthetic_frames(detector, 1))
    geom = tmp_path / "run.geom"
    geom.write_text(edit(geom.read_text()))  # type: ignore[operator]
    with pytest.raises(FormatError, match=message):
        open_run(path)


def test_writer_refuses_wrong_frames(tmp_path: Path) -> None:
    detector = small_multipanel_detector()
    with open_run_writer(tmp_path / "w.h5", "nxmx", detector=detector, beam=BEAM) as writer:
        with pytest.raises(ValueError, match=r"frame 0: shape \(4, 32, 64\) differs|frame 0: shape"):
            writer.append(np.zeros((3, 32, 64), dtype=np.int32))
        with pytest.raises(ValueError, match="float64 cannot be stored as int32"):
            writer.append(np.zeros(detector.frame_shape))
        writer.append(np.zeros(detector.frame_shape, dtype=np.uint16))
    with open_run(tmp_path / "w.h5") as reader:
        assert reader.frame_count == 1 and reader.is_complete


def test_run_left_open_by_a_crashed_writer_says_incomplete(tmp_path: Path) -> None:
    detector = small_multipanel_detector()
    writer = open_run_writer(tmp_path / "crash.cxi", "cxi", detector=detector, beam=BEAM)
    writer.append(synthetic_frames(detector, 1)[0])
    writer._file.flush()  # type: ignore[attr-defined]  # what is on disk when the process dies now
    os.system(
        f"cp {tmp_path / 'crash.cxi'} {tmp_path / 'copy.cxi'} && cp {tmp_path / 'crash.geom'} {tmp_path / 'copy.geom'}"
    )
    writer.close()
    with open_run(tmp_path / "copy.cxi") as reader:
        assert reader.is_complete is False
        assert reader.frame_count == 1


def test_file_held_by_a_writer_without_swmr_is_reported_as_locked(tmp_path: Path) -> None:
    detector = small_multipanel_detector()
    path = tmp_path / "busy.h5"
    with open_run_writer(path, "nxmx", detector=detector, beam=BEAM) as writer:
        writer.append(synthetic_frames(detector, 1)[0])
        probe = (
            f"import sys; sys.path.insert(0, {str(ROOT)!r})\n"
            "from libs.science.formats import FormatError, open_run\n"
            f"try:\n    open_run({str(path)!r})\nexcept FormatError as error:\n    print(error)\n"
        )
        seen = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert "busy.h5: is locked by a writer that did not enable SWMR" in seen.stdout, seen.stdout + seen.stderr
