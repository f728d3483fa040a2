"""The dispatcher's scheduling arithmetic: packing, priorities, preemption, the capacity guard, sizing, planning."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from pydantic import ValidationError

from libs.contracts.costs import FrameCosts, frame_costs
from libs.contracts.messages import Priority
from libs.contracts.settings import Settings
from services.dispatcher.scheduling import (
    PendingJob,
    Reservation,
    ReservationExceededError,
    RunningJob,
    assign_slots,
    check_capacity,
    job_size,
    plan,
    ranks_to_keep_up,
    reservation_from_settings,
    run_duration,
    utilisation,
)

LIVE, REPROCESS = Priority.LIVE, Priority.REPROCESS
# 4 reserved slots (2 nodes × 2 ranks) and 2 burst slots.
SMALL = Reservation(nodes=2, ranks_per_node=2, burst_slots=2, min_ranks=1, max_ranks=4)


def pending(job_id: str, priority: Priority, wanted: int, queued_at: float) -> PendingJob:
    return PendingJob(job_id=job_id, priority=priority, wanted_ranks=wanted, queued_at=queued_at)


def running(job_id: str, priority: Priority, ranks: int, started_at: float) -> RunningJob:
    return RunningJob(job_id=job_id, priority=priority, ranks=ranks, started_at=started_at)


def test_reservation_counts_slots_and_rejects_impossible_limits() -> None:
    assert SMALL.slots == 4 and SMALL.capacity == 6
    with pytest.raises(ValidationError, match=r"min_ranks \(3\) exceeds max_ranks \(2\)"):
        Reservation(nodes=2, ranks_per_node=2, min_ranks=3, max_ranks=2)
    with pytest.raises(ValidationError, match=r"min_ranks \(7\) exceeds slots \+ burst_slots \(4 \+ 2\)"):
        Reservation(nodes=2, ranks_per_node=2, burst_slots=2, min_ranks=7, max_ranks=7)
    with pytest.raises(ValidationError, match=r"min_ranks \(5\) exceeds the 4 reserved slots"):
        Reservation(nodes=2, ranks_per_node=2, burst_slots=2, min_ranks=5, max_ranks=6)
    with pytest.raises(ValidationError, match=r"max_ranks \(9\) exceeds slots \+ burst_slots"):
        Reservation(nodes=2, ranks_per_node=2, burst_slots=2, max_ranks=9)
    with pytest.raises(ValidationError, match="burst_slots"):
        Reservation(nodes=2, ranks_per_node=2, burst_slots=-1)


def test_several_jobs_are_packed_into_the_free_slots() -> None:
    queue = [
        pending("run1.live", LIVE, 3, queued_at=0),
        pending("run2.live", LIVE, 2, queued_at=1),
        pending("run3.live", LIVE, 4, queued_at=2),
        pending("run4.live", LIVE, 1, queued_at=3),
    ]
    decision = plan(queue, [], SMALL, now=10)
    # 3 + 2 fill 5 of 6 slots; the third gets the last slot, smaller than it asked; the fourth waits.
    assert decision.starts == [("run1.live", 3), ("run2.live", 2), ("run3.live", 1)]
    assert decision.waiting == ["run4.live"]
    assert decision.preemptions == []
    assert set(decision.reasons) == {"run1.live", "run2.live", "run3.live", "run4.live"}
    assert "1 of 4 wanted" in decision.reasons["run3.live"] and "burst" in decision.reasons["run3.live"]


def test_live_jobs_start_before_older_reprocessing() -> None:
    queue = [
        pending("run1.trialA", REPROCESS, 4, queued_at=0),
        pending("run9.live", LIVE, 4, queued_at=50),
    ]
    decision = plan(queue, [], SMALL, now=60)
    # The live job takes 4 reserved slots; reprocessing may not use the 2 burst slots left, so it waits.
    assert decision.starts == [("run9.live", 4)]
    assert decision.waiting == ["run1.trialA"]
    assert "never uses the burst" in decision.reasons["run1.trialA"]


def test_oldest_first_within_a_priority() -> None:
    queue = [
        pending("run3.trialB", REPROCESS, 3, queued_at=30),
        pending("run1.trialB", REPROCESS, 3, queued_at=10),
        pending("run2.trialB", REPROCESS, 3, queued_at=20),
    ]
    decision = plan(queue, [running("run0.live", LIVE, 1, started_at=0)], SMALL, now=40)
    assert decision.starts == [("run1.trialB", 3)]
    assert decision.waiting == ["run2.trialB", "run3.trialB"]
    assert "behind older run2.trialB" in decision.reasons["run3.trialB"]


def test_reprocessing_never_uses_the_burst_allowance() -> None:
    decision = plan([pending("r.t", REPROCESS, 4, queued_at=0)], [running("l.live", LIVE, 2, 0)], SMALL, now=1)
    assert decision.starts == [("r.t", 2)]  # 2 reserved slots free; the 2 burst slots stay unused
    # With the reserved slots full of live work, reprocessing waits even though burst slots are free.
    decision = plan([pending("r.t", REPROCESS, 1, queued_at=0)], [running("l.live", LIVE, 4, 0)], SMALL, now=1)
    assert decision.starts == [] and decision.waiting == ["r.t"]


def test_live_job_preempts_the_youngest_reprocessing_job() -> None:
    reservation = Reservation(nodes=2, ranks_per_node=2, burst_slots=2, min_ranks=2, max_ranks=4)
    held = [
        running("old.trialA", REPROCESS, 2, started_at=0),
        running("young.trialA", REPROCESS, 2, started_at=5),
        running("run1.live", LIVE, 2, started_at=8),
    ]
    decision = plan([pending("run2.live", LIVE, 4, queued_at=9)], held, reservation, now=10)
    assert decision.preemptions == ["young.trialA"]
    assert decision.starts == [("run2.live", 2)]
    assert "youngest" in decision.reasons["young.trialA"]
    assert "after preempting young.trialA" in decision.reasons["run2.live"]


def test_no_preemption_when_it_would_not_let_the_live_job_start() -> None:
    reservation = Reservation(nodes=2, ranks_per_node=2, burst_slots=0, min_ranks=2, max_ranks=4)
    held = [running("run1.live", LIVE, 3, started_at=0), running("r.t", REPROCESS, 1, started_at=1)]
    decision = plan([pending("run2.live", LIVE, 2, queued_at=2)], held, reservation, now=3)
    # Stopping the 1-rank reprocessing job frees only 1 slot: pointless, so nothing is stopped.
    assert decision.preemptions == [] and decision.starts == [] and decision.waiting == ["run2.live"]


def test_the_guard_refuses_anything_beyond_reservation_and_burst() -> None:
    check_capacity([running("a", LIVE, 4, 0), running("b", LIVE, 2, 0)], SMALL)
    with pytest.raises(ReservationExceededError, match="7 slots, more than the 4 reserved \\+ 2 burst"):
        check_capacity([running("a", LIVE, 4, 0), running("b", LIVE, 3, 0)], SMALL)
    with pytest.raises(ReservationExceededError, match="reprocessing jobs would hold 5 slots"):
        check_capacity([running("a", REPROCESS, 4, 0), running("b", REPROCESS, 1, 0)], SMALL)
    # plan() refuses to work from a state that already breaks the reservation.
    with pytest.raises(ReservationExceededError):
        plan([pending("c", LIVE, 1, 0)], [running("a", LIVE, 4, 0), running("b", LIVE, 3, 0)], SMALL, now=1)
    with pytest.raises(ValueError, match="job a appears twice"):
        plan([pending("a", LIVE, 1, 0)], [running("a", LIVE, 1, 0)], SMALL, now=1)


def test_job_size_from_frames_and_cost_within_limits() -> None:
    reservation = Reservation(nodes=4, ranks_per_node=4, burst_slots=4, min_ranks=2, max_ranks=12)
    # 1000 frames × 0.5 s in 100 s: 5 ranks.
    assert job_size(1000, 0.5, 100, reservation) == 5
    assert job_size(1001, 0.5, 100, reservation) == 6
    assert job_size(10, 0.5, 100, reservation) == 2  # clamped up to min_ranks
    assert job_size(0, 0.5, 100, reservation) == 2
    assert job_size(100_000, 0.5, 100, reservation) == 12  # clamped down to max_ranks
    assert job_size(None, 0.5, 100, reservation) == 12  # live run: frame count unknown
    assert job_size(1000, None, 100, reservation) == 12  # cost not measured yet
    assert job_size(1000, 0.5, 100, SMALL) == 4  # max_ranks of the small reservation
    with pytest.raises(ValueError, match="target_seconds"):
        job_size(1000, 0.5, 0, reservation)
    with pytest.raises(ValueError, match="cost_seconds_per_frame"):
        job_size(1000, -0.5, 100, reservation)
    with pytest.raises(ValueError, match="frames"):
        job_size(-1, 0.5, 100, reservation)


def test_utilisation_of_a_known_timeline() -> None:
    timeline = [
        ("a", 2, 0.0, 10.0),  # 20 slot-seconds
        ("b", 2, 5.0, 15.0),  # 10 inside the window (5..10 overlaps a; 10..15 alone)
        ("c", 4, 10.0, 30.0),  # from 10 to 15 b + c hold 6: only 4 count; c ends outside the window
    ]
    # Window 0..20 of 4 slots = 80 slot-seconds. Used: 0..5: 2, 5..10: 4, 10..15: 4 (capped), 15..20: 4.
    assert utilisation(timeline, SMALL.slots, 0, 20) == pytest.approx((2 * 5 + 4 * 5 + 4 * 5 + 4 * 5) / 80)
    assert utilisation([], SMALL.slots, 0, 20) == 0
    with pytest.raises(ValueError, match="end > start"):
        utilisation(timeline, SMALL.slots, 5, 5)
    with pytest.raises(ValueError, match="timeline entry of a"):
        utilisation([("a", 2, 10.0, 5.0)], SMALL.slots, 0, 20)


def test_ranks_to_keep_up_and_run_duration() -> None:
    # 10 % hits at 0.5 s, blanks at 0.01 s: 0.059 s per frame on average.
    assert ranks_to_keep_up(100, 0.1, 0.01, 0.5) == 6  # 5.9 rank-seconds per second
    assert ranks_to_keep_up(100, 0.0, 0.01, 0.5) == 1  # exactly 1.0: not rounded up to 2
    assert ranks_to_keep_up(0, 0.1, 0.01, 0.5) == 1
    assert run_duration(10_000, 0.1, 0.01, 0.5, ranks=6) == pytest.approx(590 / 6)
    assert run_duration(10_000, 1.0, 0.01, 0.5, ranks=1) == pytest.approx(5000)
    with pytest.raises(ValueError, match="hit_fraction"):
        ranks_to_keep_up(100, 1.5, 0.01, 0.5)
    with pytest.raises(ValueError, match="ranks"):
        run_duration(100, 0.1, 0.01, 0.5, ranks=0)


@dataclass
class SimulatedJob:
    job_id: str
    priority: Priority
    frames: int
    arrives: float
    done: int = 0  # frames processed (a preempted job resumes after them, never repeats them)
    queued_at: float = 0.0


def test_event_loop_preempts_and_every_job_finishes_within_the_cap() -> None:
    """Arrivals into a 4 + 2 slot reservation; each rank processes one frame per second."""
    reservation = Reservation(nodes=2, ranks_per_node=2, burst_slots=2, min_ranks=2, max_ranks=4)
    jobs = {
        job.job_id: job
        for job in [
            SimulatedJob("run1.trialA", REPROCESS, frames=40, arrives=0),
            SimulatedJob("run2.trialA", REPROCESS, frames=20, arrives=1),
            SimulatedJob("run3.live", LIVE, frames=12, arrives=2),
            SimulatedJob("run4.live", LIVE, frames=16, arrives=3),
            SimulatedJob("run5.trialB", REPROCESS, frames=8, arrives=4),
        ]
    }
    queue: dict[str, SimulatedJob] = {}
    held: dict[str, RunningJob] = {}
    timeline: list[tuple[str, int, float, float]] = []
    preempted: dict[str, float] = {}
    finished: dict[str, float] = {}
    starts: dict[str, list[float]] = {job_id: [] for job_id in jobs}
    for second in range(200):
        now = float(second)
        for arriving in jobs.values():
            if arriving.arrives == now:
                arriving.queued_at = now
                queue[arriving.job_id] = arriving
        decision = plan(
            [
                pending(queued.job_id, queued.priority, 4 if queued.priority is LIVE else 2, queued.queued_at)
                for queued in queue.values()
            ],
            list(held.values()),
            reservation,
            now,
        )
        for job_id in decision.preemptions:
            stopped = held.pop(job_id)
            timeline.append((job_id, stopped.ranks, stopped.started_at, now))
            preempted[job_id] = now
            queue[job_id] = jobs[job_id]  # requeued with its original queue time: it keeps its place
        for job_id, ranks in decision.starts:
            queue.pop(job_id)
            held[job_id] = RunningJob(job_id=job_id, priority=jobs[job_id].priority, ranks=ranks, started_at=now)
            starts[job_id].append(now)
        assert sum(job.ranks for job in held.values()) <= reservation.capacity
        assert sum(job.ranks for job in held.values() if job.priority is REPROCESS) <= reservation.slots
        for job_id, job in list(held.items()):
            simulated = jobs[job_id]
            simulated.done += min(job.ranks, simulated.frames - simulated.done)
            if simulated.done == simulated.frames:
                finished[job_id] = now + 1
                timeline.append((job_id, job.ranks, job.started_at, now + 1))
                del held[job_id]
        if len(finished) == len(jobs):
            break
    assert set(finished) == set(jobs), f"unfinished: {set(jobs) - set(finished)}"
    assert all(job.done == job.frames for job in jobs.values())  # every frame once, none twice
    # run4.live arrives into a full reservation (run1, run2 reprocessing + run3 live on burst): the youngest
    # reprocessing job (run2.trialA) gives way, then starts again later and finishes.
    assert list(preempted) == ["run2.trialA"] and preempted["run2.trialA"] == 3
    assert len(starts["run2.trialA"]) == 2 and starts["run2.trialA"][1] > preempted["run2.trialA"]
    assert finished["run2.trialA"] > starts["run2.trialA"][1]
    # Live runs never wait behind reprocessing: both start the second they arrive.
    assert starts["run3.live"] == [2.0] and starts["run4.live"] == [3.0]
    # The preempted job, older in the queue, resumes before the later request run5.trialB.
    assert starts["run2.trialA"][1] <= starts["run5.trialB"][0]
    end = max(finished.values())
    # Timeline: run1.trialA 2 ranks 0..20; run2.trialA 2 ranks 1..3 and 11..19; run3.live 2 ranks 2..8 (burst);
    # run4.live 2 ranks 3..11; run5.trialB 2 ranks 19..23. Reserved slots held: 84 of 4 × 23 slot-seconds.
    assert end == 23
    assert utilisation(timeline, reservation.slots, 0, end) == pytest.approx(84 / 92)


def test_reservation_from_settings_names_the_settings_that_cannot_work() -> None:
    reservation = reservation_from_settings(Settings(reservation_nodes=3, ranks_per_node=4, burst_slots=2))
    assert (reservation.slots, reservation.capacity, reservation.job_max_ranks) == (12, 14, 12)
    with pytest.raises(ValueError, match=r"SFX_JOB_MIN_RANKS=5.*min_ranks \(5\) exceeds max_ranks \(4\)"):
        reservation_from_settings(Settings(reservation_nodes=2, ranks_per_node=4, job_min_ranks=5, job_max_ranks=4))


def test_frame_costs_separate_blanks_from_hits_and_ignore_failed_frames() -> None:
    timeline = [{"start": 0.0, "end": 0.04, "hit": False}] * 6 + [{"start": 1.0, "end": 1.1, "hit": True}] * 4
    timeline += [{"start": 0.0, "end": 9.0, "hit": False, "failed": True}]
    costs = frame_costs(timeline)
    assert costs is not None
    assert costs.blank_seconds == pytest.approx(0.04) and costs.hit_seconds == pytest.approx(0.1)
    assert costs.hit_fraction == pytest.approx(0.4) and costs.frames == 10
    assert costs.per_frame() == pytest.approx(0.6 * 0.04 + 0.4 * 0.1)
    assert costs.per_frame(hit_fraction=1.0) == pytest.approx(0.1)
    only_blanks = frame_costs([{"start": 0.0, "end": 0.05, "hit": False}])
    assert only_blanks == FrameCosts(blank_seconds=0.05, hit_seconds=0.05, hit_fraction=0.0, frames=1)
    assert frame_costs([]) is None


def test_slots_are_assigned_lowest_first_and_never_twice() -> None:
    assert assign_slots([], 2, 6) == [0, 1]
    assert assign_slots([0, 1, 3], 2, 6) == [2, 4]  # reserved slots before burst ones
    with pytest.raises(ReservationExceededError, match="3 slots wanted but only 2 of 6 are free"):
        assign_slots([0, 1, 2, 3], 3, 6)
