"""Reading and writing speed of runs of 4-Mpixel frames: NXmx uncompressed and bitshuffle-LZ4, and CXI.

Writes 50 Jungfrau-4M-like int32 frames (Poisson background of ~0.2 photons, a few hundred spots) into
/tmp/sfx-bench-read, then reads them back one frame at a time and in chunks of 10 (fresh arrays, or ``out=`` one
reused buffer). The files were just written, so reads come from the page cache: the figures are the decode and
assembly cost, not the disk's. Each read figure is the best of 3 passes (the machine is shared).

Run: ``python -m benchmarks read`` (optionally SFX_BENCH_READ_FRAMES=N).
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import numpy as np

from libs.common.formats import open_run, open_run_writer
from libs.common.geometry import Beam, Detector, jungfrau4m_detector

WORK = Path("/tmp/sfx-bench-read")


def realistic_frames(detector: Detector, count: int, seed: int = 7) -> np.ndarray:
    """Sparse Bragg-like spots on a low Poisson background, as int32 photon counts."""
    rng = np.random.default_rng(seed)
    n_panels, n_slow, n_fast = detector.frame_shape
    frames = rng.poisson(0.2, size=(count, n_panels, n_slow, n_fast)).astype(np.int32)
    offsets = np.arange(-2, 3)
    profile = np.exp(-(offsets[:, None] ** 2 + offsets[None, :] ** 2) / 2.0)
    profile /= profile.sum()
    for frame in frames:
        spots = int(rng.integers(50, 400))
        panel = rng.integers(0, n_panels, spots)
        slow = rng.integers(2, n_slow - 2, spots)
        fast = rng.integers(2, n_fast - 2, spots)
        intensity = rng.gamma(1.2, 800.0, spots)
        for p, s, f, total in zip(panel, slow, fast, intensity, strict=True):
            frame[p, s - 2 : s + 3, f - 2 : f + 3] += rng.poisson(total * profile).astype(np.int32)
    return frames


def _write(path: Path, file_format: str, compression: str, detector: Detector, frames: np.ndarray) -> float:
    start = time.perf_counter()
    with open_run_writer(
        path,
        file_format,  # type: ignore[arg-type]
        detector=detector,
        beam=Beam(wavelength=1.3),
        compression=compression,  # type: ignore[arg-type]
    ) as writer:
        for frame in frames:
            writer.append(frame)
    return len(frames) / (time.perf_counter() - start)


def _read(path: Path, frames: np.ndarray, chunk: int, *, reuse: bool = False, repeats: int = 3) -> float:
    """Best of ``repeats`` passes over the run (the machine is shared: the best pass is the least disturbed)."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        buffer: np.ndarray | None = None
        with open_run(path) as reader:
            for first in range(0, reader.frame_count, chunk):
                stop = min(first + chunk, reader.frame_count)
                if reuse and (buffer is None or len(buffer) != stop - first):
                    buffer = np.empty((stop - first, *reader.detector.frame_shape), dtype=np.int32)
                block = reader.read_frames(first, stop, out=buffer)
                if first == 0 and not np.array_equal(block[0], frames[0]):
                    raise AssertionError(f"{path}: frame 0 read back differs from what was written")
        best = min(best, time.perf_counter() - start)
    return len(frames) / best


def main() -> None:
    count = int(os.environ.get("SFX_BENCH_READ_FRAMES", "50"))
    detector = jungfrau4m_detector()
    megapixels = np.prod(detector.frame_shape) / 1e6
    print(f"generating {count} frames of {megapixels:.1f} Mpixel int32 ...", flush=True)
    frames = realistic_frames(detector, count)
    WORK.mkdir(parents=True, exist_ok=True)
    try:
        for file_format, compression, name in (
            ("nxmx", "none", "nxmx_uncompressed.h5"),
            ("nxmx", "bitshuffle-lz4", "nxmx_bslz4.h5"),
            ("cxi", "none", "cxi_uncompressed.cxi"),
        ):
            path = WORK / name
            write_rate = _write(path, file_format, compression, detector, frames)
            size_mb = path.stat().st_size / 1e6
            one = _read(path, frames, 1)
            ten = _read(path, frames, 10)
            ten_reused = _read(path, frames, 10, reuse=True)
            print(
                f"{file_format:4s} {compression:15s} write {write_rate:7.1f} frames/s | "
                f"read one at a time {one:7.1f} frames/s ({one * megapixels:6.0f} Mpixel/s) | "
                f"chunks of 10 {ten:7.1f} frames/s, into one reused buffer {ten_reused:7.1f} | file {size_mb:6.1f} MB "
                f"({frames.nbytes / 1e6 / size_mb:4.1f}× smaller than raw)",
                flush=True,
            )
    finally:
        shutil.rmtree(WORK, ignore_errors=True)


if __name__ == "__main__":
    main()
