"""Synthetic per-frame reflections with known truth, for the merging tests (no image simulation involved).

True intensities follow Wilson statistics with a fall-off; each frame sees a random subset of reflections under
random symmetry operators (and, for ambiguous lattices, in a random indexing mode), with its own scale, relative B,
partialities (reported with an error) and Poisson-like noise on top of a background.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from libs.contracts.messages import FrameResult, ReflectionTable
from libs.science.crystal import reciprocal_space_operators, space_group
from libs.simulator import Experiment, FrameTruth
from libs.simulator.results import make_frame_result
from services.merger.ambiguity import reindexing_modes
from services.merger.asu import AsuMapper


@dataclass
class SyntheticRun:
    mapper: AsuMapper
    true_intensity: np.ndarray  # per ASU reflection of mapper
    frames: list[FrameResult]
    true_modes: np.ndarray
    modes: np.ndarray


def frame_result(
    index: int, cell: Sequence[float], table: ReflectionTable | None, run_id: str = "synthetic"
) -> FrameResult:
    """A frame of trial t1 indexed in the reference orientation of ``cell`` (A = B)."""
    return make_frame_result(index, run_id=run_id, trial="t1", cell=cell, reflections=table)


def synthetic_run(
    n_frames: int,
    *,
    symbol: str = "P 43 21 2",
    cell: Sequence[float] = (79.1, 79.1, 38.0, 90.0, 90.0, 90.0),
    per_frame: int = 200,
    d_min: float = 2.0,
    ambiguous: bool = False,
    seed: int = 0,
    photons: float = 300.0,
    diffraction_limit: float | None = None,
) -> SyntheticRun:
    """``diffraction_limit``: no intensity at all beyond it (pure noise there, as past a crystal's limit)."""
    rng = np.random.default_rng(seed)
    group = space_group(symbol)
    mapper = AsuMapper(group, cell, d_min)
    wilson = rng.exponential(1.0, mapper.size)
    true = photons * wilson * np.exp(-0.5 * 20.0 * mapper.inv_d2)
    if diffraction_limit is not None:
        true[mapper.inv_d2 > diffraction_limit**-2] = 0.0
    operators = reciprocal_space_operators(group)
    modes = reindexing_modes(cell, group)
    frames, true_modes = [], []
    for index in range(n_frames):
        chosen = rng.choice(mapper.size, per_frame, replace=False)
        symmetry = operators[rng.integers(len(operators), size=per_frame)]
        friedel = rng.choice([-1, 1], size=(per_frame, 1))
        miller = np.einsum("nij,nj->ni", symmetry, mapper.miller[chosen]) * friedel
        mode = int(rng.integers(len(modes))) if ambiguous else 0
        true_modes.append(mode)
        # Indexed in the alternative setting: h_indexed = R⁻¹·h_true, so that R·h_indexed recovers the truth.
        miller = miller @ np.round(np.linalg.inv(modes[mode])).astype(int).T
        scale = np.exp(rng.normal(0.0, 0.5))
        b_factor = rng.normal(0.0, 3.0)
        partiality = rng.uniform(0.15, 1.0, per_frame)
        expected = scale * np.exp(-0.5 * b_factor * mapper.inv_d2[chosen]) * partiality * true[chosen]
        sigma = np.sqrt(expected + 20.0)
        intensity = expected + rng.normal(0.0, 1.0, per_frame) * sigma
        reported = np.clip(partiality * np.exp(rng.normal(0.0, 0.1, per_frame)), 0.0, 1.0)
        table = ReflectionTable.from_columns(miller, intensity, sigma, reported)
        frames.append(frame_result(index, cell, table))
    return SyntheticRun(mapper, true, frames, np.array(true_modes), modes)


def simulated_results(
    experiment: Experiment, indices: Sequence[int], *, true_setting: bool = False, run_id: str = "sim"
) -> tuple[list[FrameResult], list[FrameTruth]]:
    """The simulator's reflection-level frames as FrameResults (blank frames: not indexed).

    ``true_setting``: reindex each frame from the indexer's arbitrary setting back to the true one, which is what
    a perfect ambiguity resolution would do.
    """
    batch = experiment.reflection_batch(list(indices))
    results, truths = [], []
    for j, index in enumerate(indices):
        truth, table = batch.frame(j)
        truths.append(truth)
        if table is None or truth.cell is None or truth.indexed_A is None:
            results.append(make_frame_result(index, run_id=run_id, trial="t1"))
            continue
        if true_setting:
            back = np.round(np.linalg.inv(truth.indexing_operator)).astype(np.int64)
            miller = np.asarray(table.miller, dtype=np.int64) @ back.T
            table = ReflectionTable.from_columns(miller, table.intensity, table.sigma, table.partiality)
        results.append(
            make_frame_result(index, run_id=run_id, trial="t1", cell=truth.cell, A=truth.indexed_A, reflections=table)
        )
    return results, truths
