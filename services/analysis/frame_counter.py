"""Dynamic hand-out of frames to MPI ranks.

Rank 0 exposes one 64-bit counter in an MPI window; every rank takes the next block of frames with an atomic
fetch-and-add. No rank waits for another and no coordinator rank is spent on bookkeeping, so a slow rank (a hard
frame, a busy node) never holds up the run: it simply takes fewer blocks.
"""

from __future__ import annotations

from typing import Any

import numpy as np


class SharedFrameCounter:
    """An atomic counter shared by all ranks of ``comm`` (collective to create and to free)."""

    def __init__(self, comm: Any, block_size: int = 1) -> None:
        from mpi4py import MPI

        if block_size < 1:
            raise ValueError(f"block_size must be at least 1, got {block_size}")
        self._mpi = MPI
        self.comm = comm
        self.block_size = block_size
        self._storage = np.zeros(1, dtype=np.int64)
        self._window = MPI.Win.Create(self._storage if comm.Get_rank() == 0 else None, comm=comm)
        self._increment = np.array([block_size], dtype=np.int64)
        self._result = np.zeros(1, dtype=np.int64)

    def take_block(self) -> range:
        """The next block of frame indices (never given to any other rank)."""
        self._window.Lock(0)
        self._window.Fetch_and_op(self._increment, self._result, 0, 0, self._mpi.SUM)
        self._window.Unlock(0)
        start = int(self._result[0])
        return range(start, start + self.block_size)

    def free(self) -> None:
        self._window.Free()
