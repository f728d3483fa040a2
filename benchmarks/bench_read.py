"""Reading and writing speed of runs of 4-Mpixel frames: NXmx uncompressed and bitshuffle-LZ4, and CXI.

Writes 50 Jungfrau-4M-like int32 frames (Poisson background of ~0.2 photons, a few hundred spots) into
/tmp/sfx-bench-read, then reads them back one frame at a time and in chunks of 10 (fresh arrays, or ``out=`` one
reused buffer). The files were just written, so reads come from the page cache: the figures are the decode and
assembly cost, not the disk's. Each read figure is the best of 5 passes, the modes taking turns (the machine is
shared); the figure in brackets counts this process's CPU time instead of wall time.

Run: ``python -m benchmarks read`` (optionally SFX_BENCH_READ_FRAMES=N).
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import numpy as np

from libs.science.formats import open_run, open_run_writer
from libs.science.geometry import Beam, Detector, jungfrau4m_detector

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


def _write(
    path: Path, file_format: str, compression: str, detector: Detector, frames: np.ndarray
) -> tuple[float, float]:
    """(frames per wall second, frames per CPU second) of writing the run."""
    wall, cpu = time.perf_counter(), time.process_time()
    with open_run_writer(
        path,
        file_format,  # type: ignore[arg-type]
        detector=detector,
        beam=Beam(wavelength=1.3),
        compression=compression,  # type: ignore[arg-type]
    ) as writer:
        for frame in frames:
            writer.append(frame)
    return len(frames) / (time.perf_counter() - wall), len(frames) / (time.process_time() - cpu)


def _read_pass(path: Path, frames: np.ndarray, chunk: int, reuse: bool) -> tuple[float, float]:
    """Wall and CPU seconds of one pass over the run, ``chunk`` frames per read."""
    wall, cpu = time.perf_counter(), time.process_time()
    buffer: np.ndarray | None = None
    with open_run(path) as reader:
        for first in range(0, reader.frame_count, chunk):
            stop = min(first + chunk, reader.frame_count)
            if reuse and (buffer is None or len(buffer) != stop - first):
                buffer = np.empty((stop - first, *reader.detector.frame_shape), dtype=np.int32)
            block = reader.read_frames(first, stop, out=buffer)
            if first == 0 and not np.array_equal(block[0], frames[0]):
                raise AssertionError(f"{path}: frame 0 read back differs from what was written")
    return time.perf_counter() - wall, time.process_time() - cpu


READ_MODES = {"one at a time": (1, False), "chunks of 10": (10, False), "chunks of 10, reused buffer": (10, True)}


def _read(path: Path, frames: np.ndarray, passes: int = 5) -> dict[str, tuple[float, float]]:
    """Per read mode: (frames per wall second, best pass; frames per CPU second, best pass). Modes take turns."""
    best = {mode: (float("inf"), float("inf")) for mode in READ_MODES}
    for _ in range(passes):
        for mode, (chunk, reuse) in READ_MODES.items():
            wall, cpu = _read_pass(path, frames, chunk, reuse)
            best[mode] = (min(best[mode][0], wall), min(best[mode][1], cpu))
    return {mode: (len(frames) / wall, len(frames) / cpu) for mode, (wall, cpu) in best.items()}


def main() -> None:
    count = int(os.environ.get("SFX_BENCH_READ_FRAMES", "50"))
    detector = jungfrau4m_detector()
    megapixels = np.prod(detector.frame_shape) / 1e6
    print(f"generating {count} frames of {megapixels:.1f} Mpixel int32 ...", flush=True)
    frames = realistic_frames(detector, count)
    print("figures: frames per wall second (frames per CPU second of this process), best of 5 passes", flush=True)
    WORK.mkdir(parents=True, exist_ok=True)
    try:
        for file_format, compression, name in (
            ("nxmx", "none", "nxmx_uncompressed.h5"),
            ("nxmx", "bitshuffle-lz4", "nxmx_bslz4.h5"),
            ("cxi", "none", "cxi_uncompressed.cxi"),
        ):
            path = WORK / name
            write_wall, write_cpu = _write(path, file_format, compression, detector, frames)
            size_mb = path.stat().st_size / 1e6
            reads = _read(path, frames)
            read_text = " | ".join(f"read {mode} {wall:6.1f} ({cpu:6.1f})" for mode, (wall, cpu) in reads.items())
            print(
                f"{file_format:4s} {compression:14s} write {write_wall:5.1f} ({write_cpu:5.1f}) | {read_text} | "
                f"{size_mb:5.0f} MB, {frames.nbytes / 1e6 / size_mb:4.1f}× smaller than raw",
                flush=True,
            )
    finally:
        shutil.rmtree(WORK, ignore_errors=True)


if __name__ == "__main__":
    main()
