"""Per-frame analysis speed: ms per frame for each stage, blank and hit frames of the default 4-Mpixel detector.

Run: ``python -m benchmarks analysis`` (one process, one thread: BLAS and numexpr pools are set to one thread
before numpy loads when this module is imported first). Frames come from the default simulation; the analysis
context (mask precomputation) is built once, as a worker does for a run, and is not timed. Goals (issue 4):
spotfinding ≤ 50 ms, blank ≤ 60 ms end to end, hit ≤ 150 ms end to end.
"""

from __future__ import annotations

import os

for _variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ.setdefault(_variable, "1")

import statistics  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from libs.contracts.parameters import AnalysisParameters  # noqa: E402
from libs.simulator import Experiment, SimulationConfig  # noqa: E402
from services.analysis.pipeline import STAGES, AnalysisContext, process_frame  # noqa: E402

FRAMES_PER_KIND = 12
REPEATS = 3


def collect_frames(experiment: Experiment, count: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """``count`` blank and ``count`` hit frames, in frame order."""
    blanks: list[np.ndarray] = []
    hits: list[np.ndarray] = []
    index = 0
    while len(blanks) < count or len(hits) < count:
        truth = experiment.truth(index)
        wanted = hits if truth.hit else blanks
        if len(wanted) < count:
            wanted.append(experiment.frame(index).image)
        index += 1
    return blanks, hits


def measure(
    frames: list[np.ndarray], experiment: Experiment, context: AnalysisContext, parameters: AnalysisParameters
) -> tuple[dict[str, float], float, float, int]:
    """Median ms per stage (over frames, best of REPEATS each), median and 90th-percentile total, frames indexed."""
    config = experiment.config
    per_stage: dict[str, list[float]] = {stage: [] for stage in STAGES}
    totals: list[float] = []
    indexed = 0
    for image in frames:
        best_total, best_timings = np.inf, {}
        for _ in range(REPEATS):
            start = time.process_time()
            analysis = process_frame(
                image,
                experiment.detector,
                experiment.beam,
                experiment.mask,
                config.cell,
                config.space_group,
                parameters,
                context=context,
            )
            total = time.process_time() - start
            if total < best_total:
                best_total, best_timings = total, analysis.timings
        indexed += int(analysis.indexed)
        totals.append(best_total * 1e3)
        for stage in STAGES:
            per_stage[stage].append(best_timings.get(stage, 0.0) * 1e3)
    medians = {stage: statistics.median(values) for stage, values in per_stage.items()}
    return medians, statistics.median(totals), float(np.percentile(totals, 90)), indexed


def main() -> None:
    config = SimulationConfig(seed=3)
    experiment = Experiment(config)
    parameters = AnalysisParameters()
    context = AnalysisContext(experiment.detector, experiment.beam, experiment.mask, parameters)
    blanks, hits = collect_frames(experiment, FRAMES_PER_KIND)
    n_pixels = int(np.prod(experiment.detector.frame_shape))
    print(
        f"per-frame analysis, {n_pixels / 1e6:.2f} Mpixel ({config.detector}), one core, ms per frame "
        f"(median over {FRAMES_PER_KIND} frames, best of {REPEATS}; stages: elapsed, total: CPU)"
    )
    header = f"{'frames':<8}" + "".join(f"{stage:>13}" for stage in STAGES) + f"{'total':>10}{'p90':>8}{'indexed':>9}"
    print(header)
    for label, frames in (("blank", blanks), ("hit", hits)):
        medians, total, p90, indexed = measure(frames, experiment, context, parameters)
        row = f"{label:<8}" + "".join(f"{medians[stage]:>13.1f}" for stage in STAGES)
        print(row + f"{total:>10.1f}{p90:>8.1f}{indexed:>6}/{len(frames)}")
    print("goals: spotfinding ≤ 50 ms, blank ≤ 60 ms, hit ≤ 150 ms")


if __name__ == "__main__":
    main()
