"""Simulation speed on one core: image frames of the 4-Mpixel Jungfrau-like detector (and the single panel),
reflection-level frames, and the parts of an image frame (prediction, background noise, spots)."""

from __future__ import annotations

import time

import numpy as np

from libs.simulator import Experiment, SimulationConfig
from libs.simulator.image import render_spots
from libs.simulator.physics import DetectorSpots


def _image_rate(experiment: Experiment, count: int) -> tuple[float, float, float]:
    """(frames per wall second, frames per CPU second, hit fraction) of image frames."""
    experiment.frame(0)  # warm caches
    started, cpu = time.perf_counter(), time.process_time()
    hits = 0
    for index in range(1, count + 1):
        hits += experiment.frame(index).truth.hit
    return count / (time.perf_counter() - started), count / (time.process_time() - cpu), hits / count


def main() -> None:
    started = time.perf_counter()
    experiment = Experiment(SimulationConfig())
    print(f"experiment set-up (structure factors, detector maps): {time.perf_counter() - started:.2f} s")

    print("(frames/s per wall second and per CPU second; they differ when other work shares the machine)")
    rate, cpu_rate, hit_fraction = _image_rate(experiment, 40)
    print(
        f"image frames, jungfrau4m (8 × 1024 × 512 px), hit fraction {hit_fraction:.2f}: "
        f"{rate:.1f} frames/s wall, {cpu_rate:.1f} frames/s CPU"
    )
    single = Experiment(SimulationConfig(detector="single"))
    rate_single, cpu_single, _ = _image_rate(single, 20)
    print(f"image frames, single panel (2048 × 2048 px): {rate_single:.1f} frames/s wall, {cpu_single:.1f} CPU")

    # Parts of a hit frame.
    hits = [i for i in range(100) if experiment.truth(i).hit][:10]
    t0 = time.perf_counter()
    truths = [experiment.truth(i) for i in hits]
    t1 = time.perf_counter()
    rng = np.random.default_rng(0)
    for _ in hits:
        experiment._background.sample(1.0, rng)
    t2 = time.perf_counter()
    for truth in truths:
        spots = DetectorSpots(np.arange(len(truth)), truth.panel, truth.fast, truth.slow, truth.profile_covariance)
        rendered = render_spots(spots, truth.expected_counts, experiment.mask)
        rng.poisson(rendered.expected)
    t3 = time.perf_counter()
    n = len(hits)
    print(
        f"per hit frame: prediction {1e3 * (t1 - t0) / n:.1f} ms, background Poisson (4.2 Mpx) "
        f"{1e3 * (t2 - t1) / n:.1f} ms, spot rendering {1e3 * (t3 - t2) / n:.1f} ms "
        f"({np.mean([len(t) for t in truths]):.0f} spots)"
    )

    experiment.reflection_batch(range(256))
    count = 20_000
    started, cpu = time.perf_counter(), time.process_time()
    reflections = 0
    for start in range(0, count, 256):
        batch = experiment.reflection_batch(range(start, min(start + 256, count)))
        reflections += len(batch.miller)
    elapsed, cpu_elapsed = time.perf_counter() - started, time.process_time() - cpu
    print(
        f"reflection-level frames: {count / elapsed:.0f} frames/s wall, {count / cpu_elapsed:.0f} frames/s CPU "
        f"({reflections / count:.0f} reflections per frame; 100,000 frames in {100_000 * elapsed / count:.0f} s)"
    )


if __name__ == "__main__":
    main()
