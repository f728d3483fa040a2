"""What a frame costs: the rule the dispatcher sizes jobs by and `sfx plan` plans with.

The analysis ranks record each frame's wall time in the live state; the cost of a run is the mean over recently
ended jobs, blanks and hits apart (blanks stop after hit finding, hits go on to integration).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from libs.contracts.messages import FINAL_STATUSES, JobState

COST_JOBS = 5  # the per-frame cost comes from the timings of this many recently ended jobs
COST_FRAMES_PER_JOB = 2_000


def mean_cost_per_frame(hit_fraction: float, blank_seconds: float, hit_seconds: float) -> float:
    """Seconds one rank spends on an average frame: blanks are rejected early, hits are indexed and integrated."""
    if not 0 <= hit_fraction <= 1:
        raise ValueError(f"hit_fraction must be within [0, 1], got {hit_fraction}")
    if blank_seconds < 0 or hit_seconds < 0:
        raise ValueError(f"per-frame costs must be ≥ 0, got blank_seconds={blank_seconds}, hit_seconds={hit_seconds}")
    return (1 - hit_fraction) * blank_seconds + hit_fraction * hit_seconds


class FrameCosts(BaseModel):
    """Measured seconds one rank spends per frame: blanks stop after hit finding, hits go on to integration."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    blank_seconds: float = Field(ge=0)
    hit_seconds: float = Field(ge=0)
    hit_fraction: float = Field(ge=0, le=1, description="Fraction of hits among the measured frames")
    frames: int = Field(ge=0, description="Frames the figures come from")

    def per_frame(self, hit_fraction: float | None = None) -> float:
        """Mean cost of a frame at ``hit_fraction`` (default: the measured one)."""
        fraction = self.hit_fraction if hit_fraction is None else hit_fraction
        return mean_cost_per_frame(fraction, self.blank_seconds, self.hit_seconds)


def frame_costs(timeline: Iterable[Mapping[str, Any]]) -> FrameCosts | None:
    """Mean wall seconds per blank and per hit from per-frame timings (``start``, ``end``, ``hit``, ``failed``).

    Failed frames are left out (their cost says nothing about analysis); with no hit (or no blank) measured, the
    other kind's mean stands in, so a cost is known as soon as any frame is. None when nothing was measured.
    """
    blank_total = hit_total = 0.0
    blanks = hits = 0
    for entry in timeline:
        if entry.get("failed"):
            continue
        seconds = max(0.0, float(entry["end"]) - float(entry["start"]))
        if entry.get("hit"):
            hit_total, hits = hit_total + seconds, hits + 1
        else:
            blank_total, blanks = blank_total + seconds, blanks + 1
    if hits + blanks == 0:
        return None
    blank_seconds = blank_total / blanks if blanks else hit_total / hits
    hit_seconds = hit_total / hits if hits else blank_seconds
    return FrameCosts(
        blank_seconds=blank_seconds, hit_seconds=hit_seconds, hit_fraction=hits / (hits + blanks), frames=hits + blanks
    )


def recent_job_ids(jobs: Sequence[JobState], count: int = COST_JOBS) -> list[str]:
    """Ids of the most recently ended jobs that processed frames (``jobs`` most recent first, as Redis lists them)."""
    ended = [job.job_id for job in jobs if job.status in FINAL_STATUSES and job.frames_done > 0]
    return ended[:count]
