"""The dispatcher's scheduling: which queued jobs start now, with how many ranks, and which jobs give way.

Pure arithmetic on a snapshot (no bus, no Redis, no backend), so the service can log every decision with its
reason and tests can replay whole days of arrivals in milliseconds.

The model: an experiment holds a reservation of ``nodes × ranks_per_node`` slots plus a capped burst allowance
(the facility's "realtime" quality of service). Live runs come first and may use the burst; reprocessing only ever
uses reserved slots, and gives its slots back (is preempted, youngest first) when a live run cannot otherwise get
its minimum. Within a priority the oldest request is served first, and a job may start smaller than it asked for,
down to the reservation's ``min_ranks``, so several runs share the slots at once.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from libs.contracts.costs import mean_cost_per_frame
from libs.contracts.messages import Priority
from libs.contracts.settings import Settings


class ReservationExceededError(RuntimeError):
    """A set of jobs would hold more slots than the reservation and its burst allow (always a bug)."""


class Reservation(BaseModel):
    """The slots an experiment holds, its burst cap and the size limits of one job."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    nodes: int = Field(ge=1, description="Reserved nodes")
    ranks_per_node: int = Field(ge=1, description="MPI ranks one node runs")
    burst_slots: int = Field(0, ge=0, description="Extra slots live runs may use beyond the reservation (cap)")
    min_ranks: int = Field(1, ge=1, description="Fewest ranks a job is started with")
    max_ranks: int | None = Field(None, ge=1, description="Most ranks one job gets; None: all reserved slots")

    @property
    def slots(self) -> int:
        return self.nodes * self.ranks_per_node

    @property
    def capacity(self) -> int:
        """Slots live runs may fill: the reservation plus the burst allowance."""
        return self.slots + self.burst_slots

    @property
    def job_max_ranks(self) -> int:
        return self.slots if self.max_ranks is None else self.max_ranks

    @model_validator(mode="after")
    def _possible(self) -> Reservation:
        if self.min_ranks > self.job_max_ranks:
            raise ValueError(f"min_ranks ({self.min_ranks}) exceeds max_ranks ({self.job_max_ranks})")
        if self.min_ranks > self.capacity:
            raise ValueError(
                f"min_ranks ({self.min_ranks}) exceeds slots + burst_slots ({self.slots} + {self.burst_slots}): "
                "no job could ever start"
            )
        if self.min_ranks > self.slots:
            raise ValueError(
                f"min_ranks ({self.min_ranks}) exceeds the {self.slots} reserved slots "
                f"({self.nodes} nodes × {self.ranks_per_node} ranks): reprocessing, which uses only reserved "
                "slots, could never start"
            )
        if self.job_max_ranks > self.capacity:
            raise ValueError(
                f"max_ranks ({self.job_max_ranks}) exceeds slots + burst_slots ({self.slots} + {self.burst_slots})"
            )
        return self

    def clamp(self, ranks: int) -> int:
        return max(self.min_ranks, min(self.job_max_ranks, ranks))


def reservation_from_settings(settings: Settings) -> Reservation:
    """The reservation the settings describe; ValueError names the impossible combination."""
    try:
        return Reservation(
            nodes=settings.reservation_nodes,
            ranks_per_node=settings.ranks_per_node,
            burst_slots=settings.burst_slots,
            min_ranks=settings.job_min_ranks,
            max_ranks=settings.job_max_ranks,
        )
    except ValidationError as error:
        problems = "; ".join(str(item["msg"]).removeprefix("Value error, ") for item in error.errors())
        raise ValueError(
            f"the reservation settings are impossible (SFX_RESERVATION_NODES={settings.reservation_nodes}, "
            f"SFX_RANKS_PER_NODE={settings.ranks_per_node}, SFX_BURST_SLOTS={settings.burst_slots}, "
            f"SFX_JOB_MIN_RANKS={settings.job_min_ranks}, SFX_JOB_MAX_RANKS={settings.job_max_ranks}): {problems}"
        ) from error


def assign_slots(held: Iterable[int], ranks: int, capacity: int) -> list[int]:
    """The ``ranks`` lowest free slot numbers below ``capacity`` (reserved slots come first, then the burst)."""
    taken = set(held)
    free = [slot for slot in range(capacity) if slot not in taken]
    if ranks > len(free):
        raise ReservationExceededError(f"{ranks} slots wanted but only {len(free)} of {capacity} are free")
    return free[:ranks]


class _ScheduledJob(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    job_id: str = Field(min_length=1)
    priority: Priority


class PendingJob(_ScheduledJob):
    """A queued request for slots."""

    wanted_ranks: int = Field(ge=1)
    queued_at: float


class RunningJob(_ScheduledJob):
    """A job holding slots."""

    ranks: int = Field(ge=1)
    started_at: float


class Decision(BaseModel):
    """What to do now: jobs to start with their ranks, jobs to stop, and why (one reason per job considered)."""

    model_config = ConfigDict(extra="forbid")

    starts: list[tuple[str, int]] = Field(default_factory=list)
    preemptions: list[str] = Field(default_factory=list)
    waiting: list[str] = Field(default_factory=list, description="Queued jobs left queued")
    reasons: dict[str, str] = Field(default_factory=dict, description="job_id → why it starts, stops or waits")


def job_size(
    frames: int | None, cost_seconds_per_frame: float | None, target_seconds: float, reservation: Reservation
) -> int:
    """Ranks for a job so it ends in about ``target_seconds``, within the reservation's min and max ranks.

    A live run (frame count unknown) or a run whose per-frame cost has not been measured yet gets max_ranks.
    """
    if target_seconds <= 0 or not math.isfinite(target_seconds):
        raise ValueError(f"target_seconds must be a positive number, got {target_seconds}")
    if frames is not None and frames < 0:
        raise ValueError(f"frames must be ≥ 0 or None (unknown), got {frames}")
    if cost_seconds_per_frame is not None and (cost_seconds_per_frame < 0 or not math.isfinite(cost_seconds_per_frame)):
        raise ValueError(f"cost_seconds_per_frame must be ≥ 0 or None (not measured), got {cost_seconds_per_frame}")
    if frames is None or cost_seconds_per_frame is None:
        return reservation.job_max_ranks
    return reservation.clamp(_ceil(frames * cost_seconds_per_frame / target_seconds))


def check_capacity(jobs: Iterable[RunningJob], reservation: Reservation) -> None:
    """Raise ReservationExceededError when ``jobs`` would hold more than the reservation allows.

    All jobs together stay within slots + burst, and reprocessing alone within the reserved slots.
    """
    jobs = list(jobs)
    total = sum(job.ranks for job in jobs)
    reprocess = sum(job.ranks for job in jobs if job.priority is Priority.REPROCESS)
    if total > reservation.capacity:
        held = ", ".join(f"{job.job_id}={job.ranks}" for job in jobs)
        raise ReservationExceededError(
            f"jobs would hold {total} slots, more than the {reservation.slots} reserved + "
            f"{reservation.burst_slots} burst allow ({held})"
        )
    if reprocess > reservation.slots:
        raise ReservationExceededError(
            f"reprocessing jobs would hold {reprocess} slots, more than the {reservation.slots} reserved slots"
        )


def plan(
    pending: Sequence[PendingJob], running: Sequence[RunningJob], reservation: Reservation, now: float
) -> Decision:
    """Decide which queued jobs start (and with how many ranks) and which reprocessing jobs are preempted.

    Raises ReservationExceededError if ``running`` already breaks the reservation or the decision ever would.
    """
    _check_unique(pending, running)
    check_capacity(running, reservation)
    decision = Decision()
    held = {job.job_id: job for job in running}
    used = sum(job.ranks for job in running)
    # Preemption victims: reprocessing jobs, youngest first.
    victims = sorted(
        (job for job in running if job.priority is Priority.REPROCESS),
        key=lambda job: (-job.started_at, job.job_id),
    )
    blocked: dict[Priority, str] = {}
    order = {Priority.LIVE: 0, Priority.REPROCESS: 1}
    for job in sorted(pending, key=lambda job: (order[job.priority], job.queued_at, job.job_id)):
        wanted = reservation.clamp(job.wanted_ranks)
        waited = f"queued {now - job.queued_at:.0f} s"
        if job.priority in blocked:
            decision.waiting.append(job.job_id)
            decision.reasons[job.job_id] = f"{job.priority.value} job waits behind older {blocked[job.priority]}"
            continue
        if job.priority is Priority.LIVE:
            free = reservation.capacity - used
            preempted: list[RunningJob] = []
            if free < reservation.min_ranks:
                reclaimable = sum(victim.ranks for victim in victims)
                if free + reclaimable >= reservation.min_ranks:
                    while free < reservation.min_ranks:
                        victim = victims.pop(0)
                        preempted.append(victim)
                        free += victim.ranks
                        used -= victim.ranks
                        del held[victim.job_id]
                        decision.preemptions.append(victim.job_id)
                        decision.reasons[victim.job_id] = (
                            f"preempted (youngest reprocessing job, started {now - victim.started_at:.0f} s ago, "
                            f"{victim.ranks} ranks) so live {job.job_id} gets its minimum of "
                            f"{reservation.min_ranks} ranks"
                        )
            if free < reservation.min_ranks:
                blocked[job.priority] = job.job_id
                decision.waiting.append(job.job_id)
                decision.reasons[job.job_id] = (
                    f"live job waits: {free} slots free of {reservation.slots} reserved + {reservation.burst_slots} "
                    f"burst, fewer than the minimum {reservation.min_ranks}, and live jobs hold the rest ({waited})"
                )
                continue
            ranks = min(wanted, free)
            after = f"{reservation.capacity - used - ranks} of {reservation.slots}+{reservation.burst_slots} left"
            burst = max(0, used + ranks - reservation.slots)
            because = f"after preempting {', '.join(v.job_id for v in preempted)}" if preempted else "from free slots"
            reason = (
                f"live job starts with {ranks} of {wanted} wanted ranks {because}"
                f"{f' ({burst} on burst)' if burst else ''}; {after} ({waited})"
            )
        else:
            free = reservation.slots - used
            if free < reservation.min_ranks:
                blocked[job.priority] = job.job_id
                decision.waiting.append(job.job_id)
                decision.reasons[job.job_id] = (
                    f"reprocessing waits: {max(free, 0)} reserved slots free, fewer than the minimum "
                    f"{reservation.min_ranks} (reprocessing never uses the burst allowance) ({waited})"
                )
                continue
            ranks = min(wanted, free)
            reason = (
                f"reprocessing starts with {ranks} of {wanted} wanted ranks on reserved slots; "
                f"{free - ranks} reserved slots left ({waited})"
            )
        used += ranks
        held[job.job_id] = RunningJob(job_id=job.job_id, priority=job.priority, ranks=ranks, started_at=now)
        decision.starts.append((job.job_id, ranks))
        decision.reasons[job.job_id] = reason
    # The guard: whatever the arithmetic above did, the outcome must fit the reservation.
    check_capacity(held.values(), reservation)
    return decision


def utilisation(
    timeline: Iterable[tuple[str, int, float, float]], reserved_slots: int, start: float, end: float
) -> float:
    """Fraction of the reserved slot-seconds in [start, end] that jobs used.

    Burst use does not count beyond the reservation: at each instant at most ``reserved_slots`` count as used.
    """
    if reserved_slots < 1:
        raise ValueError(f"reserved_slots must be ≥ 1, got {reserved_slots}")
    if end <= start:
        raise ValueError(f"utilisation window must have end > start, got start={start}, end={end}")
    changes: list[tuple[float, int]] = []
    for job_id, ranks, begin, finish in timeline:
        if ranks < 0 or finish < begin:
            raise ValueError(f"timeline entry of {job_id} is invalid: ranks={ranks}, start={begin}, end={finish}")
        begin, finish = max(begin, start), min(finish, end)
        if finish > begin:
            changes += [(begin, ranks), (finish, -ranks)]
    changes.sort()
    used_slot_seconds = 0.0
    held, previous = 0, start
    for time, change in changes:
        used_slot_seconds += min(held, reserved_slots) * (time - previous)
        held, previous = held + change, time
    return used_slot_seconds / (reserved_slots * (end - start))


def ranks_to_keep_up(rate_hz: float, hit_fraction: float, blank_seconds: float, hit_seconds: float) -> int:
    """Fewest ranks whose combined throughput matches a detector running at ``rate_hz`` (at least 1)."""
    if rate_hz < 0 or not math.isfinite(rate_hz):
        raise ValueError(f"rate_hz must be ≥ 0, got {rate_hz}")
    return max(1, _ceil(rate_hz * mean_cost_per_frame(hit_fraction, blank_seconds, hit_seconds)))


def run_duration(frames: int, hit_fraction: float, blank_seconds: float, hit_seconds: float, ranks: int) -> float:
    """Seconds ``ranks`` ranks need for a run of ``frames`` frames (perfect sharing of frames among ranks)."""
    if frames < 0:
        raise ValueError(f"frames must be ≥ 0, got {frames}")
    if ranks < 1:
        raise ValueError(f"ranks must be ≥ 1, got {ranks}")
    return frames * mean_cost_per_frame(hit_fraction, blank_seconds, hit_seconds) / ranks


def _ceil(value: float) -> int:
    # Products like 100 × 0.059 land a hair above an integer; that should not cost one more rank.
    return math.ceil(value - 1e-9)


def _check_unique(pending: Sequence[PendingJob], running: Sequence[RunningJob]) -> None:
    seen: set[str] = set()
    for job_id in [job.job_id for job in running] + [job.job_id for job in pending]:
        if job_id in seen:
            raise ValueError(f"job {job_id} appears twice among the pending and running jobs")
        seen.add(job_id)
