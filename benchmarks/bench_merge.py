"""Merging speed: streaming throughput, statistics refresh at 10,000 and 100,000 frames, full re-scale of 10,000.

Frames are synthetic (P 43 21 2, 79.1 79.1 38.0 Å to 1.8 Å: Wilson intensities, per-frame scale and B, partiality,
Poisson-like noise), made before the clock starts, so only the merge is timed.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import numpy as np

from libs.contracts.messages import FrameResult, ReflectionTable
from libs.science.crystal import reciprocal_space_operators
from libs.simulator.results import make_frame_result
from services.merger.engine import MergingEngine, MergingParameters

CELL = (79.1, 79.1, 38.0, 90.0, 90.0, 90.0)
SYMBOL = "P 43 21 2"
D_MIN = 1.8
BATCH = 100


def frame_batches(
    engine: MergingEngine, n_frames: int, per_frame: int, seed: int, run_id: str
) -> Iterator[list[FrameResult]]:
    rng = np.random.default_rng(seed)
    mapper = engine.mapper
    truth = 300.0 * rng.exponential(1.0, mapper.size) * np.exp(-10.0 * mapper.inv_d2)
    operators = reciprocal_space_operators(engine.space_group)
    for start in range(0, n_frames, BATCH):
        batch = []
        for index in range(start, min(start + BATCH, n_frames)):
            chosen = rng.integers(0, mapper.size, per_frame)
            symmetry = operators[rng.integers(len(operators), size=per_frame)]
            miller = np.einsum("nij,nj->ni", symmetry, mapper.miller[chosen])
            # An ambiguous lattice: each frame indexed in a random one of its settings.
            setting = engine.modes[rng.integers(len(engine.modes))]
            miller = miller @ np.round(np.linalg.inv(setting)).astype(np.int64).T
            partiality = rng.uniform(0.15, 1.0, per_frame)
            expected = np.exp(rng.normal(0, 0.4)) * partiality * truth[chosen]
            sigma = np.sqrt(expected + 20.0)
            intensity = expected + rng.normal(size=per_frame) * sigma
            table = ReflectionTable.from_columns(miller, intensity, sigma, partiality)
            batch.append(make_frame_result(index, run_id=run_id, trial="bench", cell=CELL, reflections=table))
        yield batch


def stream(engine: MergingEngine, n_frames: int, per_frame: int, seed: int) -> tuple[float, int]:
    """Seconds spent inside add_frames and observations merged, for batches of 100 frames."""
    spent = 0.0
    before = engine.observations
    for batch in frame_batches(engine, n_frames, per_frame, seed, run_id=f"bench{seed}"):
        started = time.perf_counter()
        engine.add_frames(batch)
        spent += time.perf_counter() - started
    return spent, engine.observations - before


def refresh_seconds(engine: MergingEngine, repeats: int = 5) -> float:
    timings = []
    for _ in range(repeats):
        started = time.perf_counter()
        engine.statistics()
        timings.append(time.perf_counter() - started)
    return float(np.median(timings))


def main() -> None:
    parameters = MergingParameters(d_min=D_MIN, auto_rescale_until=0)
    engine = MergingEngine(CELL, SYMBOL, parameters)
    print(f"ASU reflections to {D_MIN} Å: {engine.mapper.size}")
    spent, merged = stream(engine, 10_000, 300, seed=1)
    print(
        f"streaming 10,000 frames × 300 reflections in batches of {BATCH}: {spent:.2f} s in add_frames, "
        f"{merged / spent:,.0f} merged reflections/s ({10_000 / spent:,.0f} frames/s)"
    )
    print(f"statistics refresh at 10,000 frames: {refresh_seconds(engine) * 1e3:.1f} ms")
    started = time.perf_counter()
    engine.rescale()
    print(
        f"full re-scale of 10,000 frames ({engine.observations:,} observations): {time.perf_counter() - started:.2f} s"
    )

    del engine

    ambiguous = MergingEngine(CELL, "P 43", parameters)
    spent, merged = stream(ambiguous, 10_000, 300, seed=3)
    print(
        f"streaming 10,000 frames in P 43 (two indexing modes resolved as they arrive): {spent:.2f} s, "
        f"{merged / spent:,.0f} merged reflections/s; {100 * (ambiguous.ambiguity_resolved_fraction() or 0):.1f}% "
        "resolved clearly"
    )
    started = time.perf_counter()
    ambiguous.rescale()
    print(f"full re-scale with mode re-assignment of those 10,000 frames: {time.perf_counter() - started:.2f} s")
    del ambiguous
    # 100,000 frames with fewer reflections each keeps the stored observations within a shared machine's memory;
    # the refresh reads only the per-reflection sums, whose size does not grow with the frames.
    large = MergingEngine(CELL, SYMBOL, parameters)
    spent, merged = stream(large, 100_000, 60, seed=2)
    print(
        f"streaming 100,000 frames × 60 reflections: {spent:.2f} s in add_frames, {merged / spent:,.0f} merged "
        f"reflections/s"
    )
    print(f"statistics refresh at 100,000 frames: {refresh_seconds(large) * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
