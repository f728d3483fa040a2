"""FrameResults made up from known values, for tests and benchmarks: one factory instead of one per module.

A made-up result has to satisfy the same rules as a real one (an indexed frame carries its A matrix and cell,
reflections only on indexed frames); :func:`make_frame_result` fills in what follows from what is given.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from libs.contracts.messages import FrameResult, ReflectionTable
from libs.science.crystal import b_matrix

Matrix = Sequence[Sequence[float]] | np.ndarray


def random_reflections(
    count: int,
    seed: int,
    *,
    miller_limit: int = 60,
    intensity_scale: float = 200.0,
    sigma_range: tuple[float, float] = (5.0, 30.0),
) -> ReflectionTable:
    """``count`` reflections with random indices in [-miller_limit, miller_limit), exponential intensities of mean
    ``intensity_scale``, uniform σ and partialities; the same ``seed`` gives the same table."""
    rng = np.random.default_rng(seed)
    return ReflectionTable.from_columns(
        miller=rng.integers(-miller_limit, miller_limit, size=(count, 3)),
        intensity=rng.gamma(1.0, intensity_scale, size=count),
        sigma=rng.uniform(*sigma_range, size=count),
        partiality=rng.uniform(0, 1, size=count),
    )


def make_frame_result(
    frame_index: int,
    *,
    run_id: str = "r0001",
    trial: str = "live",
    started_at: float = 0.0,
    finished_at: float | None = None,
    cell: Sequence[float] | None = None,
    A: Matrix | None = None,
    reflections: ReflectionTable | None = None,
    hit: bool | None = None,
    spot_count: int = 0,
    rank: int = 0,
    timings: dict[str, float] | None = None,
    error: str | None = None,
) -> FrameResult:
    """A frame's result; indexed exactly when ``cell`` is given.

    ``A`` defaults to the cell's B matrix (the crystal in its reference orientation), ``hit`` to whether the frame is
    indexed and ``finished_at`` to ``started_at``.
    """
    indexed = cell is not None
    matrix = _matrix3(b_matrix(cell) if A is None else A) if cell is not None else None
    return FrameResult(
        run_id=run_id,
        trial=trial,
        frame_index=frame_index,
        started_at=started_at,
        finished_at=started_at if finished_at is None else finished_at,
        rank=rank,
        spot_count=spot_count,
        hit=indexed if hit is None else hit,
        indexed=indexed,
        A=matrix,
        cell=tuple(float(v) for v in cell) if cell is not None else None,
        timings=timings or {},
        reflections=reflections,
        error=error,
    )


Row = tuple[float, float, float]


def _matrix3(matrix: Matrix) -> tuple[Row, Row, Row]:
    """A 3 × 3 matrix as the message carries it: a tuple of rows of Python floats."""
    rows = np.asarray(matrix, dtype=float)
    if rows.shape != (3, 3):
        raise ValueError(f"an A matrix is 3 × 3, got shape {rows.shape}")
    first, second, third = ((float(x), float(y), float(z)) for x, y, z in rows.tolist())
    return first, second, third
