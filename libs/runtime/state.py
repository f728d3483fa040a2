"""Live state on Redis: every key of the system is named here, with its type and lifetime.

Redis holds live state only (progress, counters, latest statistics, who is alive); what must survive lives in files
or is recomputed from messages. Every key starts with ``<namespace>:`` and every id inside a key is escaped with
:func:`libs.contracts.naming.escape_word` (so a ``:`` in a run id cannot be mistaken for a separator).

===================================  =======  ======================  ===============================================
key                                  type     TTL                     content
===================================  =======  ======================  ===============================================
``<ns>:runs``                        zset     state TTL, refreshed    run id -> time of its last update
``<ns>:run:<run>``                   string   state TTL               latest RunManifest (JSON)
``<ns>:run:<run>:trials``            set      state TTL, refreshed    trials under which the run was counted
``<ns>:run:<run>:<trial>:counters``  hash     state TTL, refreshed    frames, hits, indexed, failed, reflections
``<ns>:seen:<run>:<trial>``          bitmap   state TTL, refreshed    bit i set: frame i already counted
``<ns>:job:<job>``                   string   state TTL               latest JobState (JSON)
``<ns>:jobs``                        zset     state TTL, refreshed    job id -> time of its last state
``<ns>:merges``                      zset     state TTL, refreshed    JSON [dataset, trial] -> time of its last update
``<ns>:merge:<dataset>:<trial>``     string   state TTL               latest MergeUpdate (JSON)
``<ns>:service:<name>:<instance>``   string   3 x heartbeat period    latest ServiceHeartbeat (JSON)
``<ns>:ingest:rejected``             hash     state TTL, refreshed    file path -> latest FileRejected (JSON)
``<ns>:job:<job>:ranks``             hash     state TTL, refreshed    rank -> JSON {host, pid, frames, failed, at}
``<ns>:job:<job>:timeline``          list     state TTL, refreshed    JSON per frame: rank, frame, start, end, stages
``<ns>:job:<job>:spec``              string   state TTL               JobSpec the dispatcher queued (JSON)
``<ns>:dispatcher:slot-history``     list     state TTL, refreshed    JSON per ended attempt: job, priority, slots,
                                                                      start, end, outcome
===================================  =======  ======================  ===============================================

"State TTL" is ``settings.state_ttl_seconds``. A bitmap rather than a set marks frames seen: frame indices are dense,
so a million frames cost 125 kB instead of tens of MB, and ``SETBIT`` returns the previous bit, which makes
"count once" a single atomic script.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

import numpy as np
import redis

from libs.contracts.costs import COST_FRAMES_PER_JOB, FrameCosts, frame_costs
from libs.contracts.messages import (
    MAX_FRAMES_PER_RUN,
    FileRejected,
    FrameResult,
    JobSpec,
    JobState,
    MergeUpdate,
    Message,
    RunManifest,
    ServiceHeartbeat,
    decode_message,
)
from libs.contracts.naming import escape_word
from libs.contracts.settings import Settings, get_settings

M = TypeVar("M", bound=Message)

FRAME_COUNTER_FIELDS = ("frames", "hits", "indexed", "failed", "reflections")
"""Fields of a trial's counters hash."""


# KEYS: seen bitmap, counters hash, trials set, runs zset.
# ARGV: frame index, ttl, trial, run id, now, then field/increment pairs.
# SETBIT returns the previous bit: only the first delivery of a frame increments the counters.
_COUNT_ONCE_SCRIPT = """
local previous = redis.call('SETBIT', KEYS[1], ARGV[1], 1)
redis.call('EXPIRE', KEYS[1], ARGV[2])
if previous == 1 then
  return 0
end
for i = 6, #ARGV, 2 do
  redis.call('HINCRBY', KEYS[2], ARGV[i], ARGV[i + 1])
end
redis.call('EXPIRE', KEYS[2], ARGV[2])
redis.call('SADD', KEYS[3], ARGV[3])
redis.call('EXPIRE', KEYS[3], ARGV[2])
redis.call('ZADD', KEYS[4], ARGV[5], ARGV[4])
redis.call('EXPIRE', KEYS[4], ARGV[2])
return 1
"""


class Keys:
    """Builders of every Redis key of one namespace (the only place key strings are spelled)."""

    def __init__(self, namespace: str) -> None:
        self.namespace = namespace

    def runs(self) -> str:
        return f"{self.namespace}:runs"

    def jobs(self) -> str:
        return f"{self.namespace}:jobs"

    def merges(self) -> str:
        return f"{self.namespace}:merges"

    def run(self, run_id: str) -> str:
        return f"{self.namespace}:run:{escape_word(run_id)}"

    def trials(self, run_id: str) -> str:
        return f"{self.run(run_id)}:trials"

    def counters(self, run_id: str, trial: str) -> str:
        return f"{self.run(run_id)}:{escape_word(trial)}:counters"

    def seen(self, run_id: str, trial: str) -> str:
        return f"{self.namespace}:seen:{escape_word(run_id)}:{escape_word(trial)}"

    def job(self, job_id: str) -> str:
        return f"{self.namespace}:job:{escape_word(job_id)}"

    def merge(self, dataset_id: str, trial: str) -> str:
        return f"{self.namespace}:merge:{escape_word(dataset_id)}:{escape_word(trial)}"

    def rejected_files(self) -> str:
        return f"{self.namespace}:ingest:rejected"

    def unpublished_runs(self) -> str:
        return f"{self.namespace}:ingest:unpublished"

    def seeded(self, owner: str) -> str:
        return f"{self.namespace}:seeded:{escape_word(owner)}"

    def job_ranks(self, job_id: str) -> str:
        return f"{self.job(job_id)}:ranks"

    def job_timeline(self, job_id: str) -> str:
        return f"{self.job(job_id)}:timeline"

    def job_spec(self, job_id: str) -> str:
        return f"{self.job(job_id)}:spec"

    def job_inflight(self, job_id: str) -> str:
        return f"{self.job(job_id)}:inflight"

    def slot_history(self) -> str:
        return f"{self.namespace}:dispatcher:slot-history"

    def service(self, service: str, instance: str) -> str:
        return f"{self.namespace}:service:{escape_word(service)}:{escape_word(instance)}"

    def service_pattern(self) -> str:
        """SCAN pattern matching every service heartbeat key."""
        return f"{self.namespace}:service:*"

    def everything_pattern(self) -> str:
        """SCAN pattern matching every key of the namespace."""
        return f"{self.namespace}:*"


class LiveState:
    """Reads and writes the live state of one namespace. Thread-safe (redis-py pools connections)."""

    def __init__(self, settings: Settings | None = None, client: redis.Redis | None = None) -> None:
        self.settings = settings or get_settings()
        self.redis: redis.Redis = client or redis.Redis.from_url(self.settings.redis_url, socket_timeout=10)
        self.keys = Keys(self.settings.namespace)
        self.ttl = self.settings.state_ttl_seconds
        self.service_ttl = max(1, math.ceil(3 * self.settings.heartbeat_seconds))
        self._count_once = self.redis.register_script(_COUNT_ONCE_SCRIPT)

    # -- frames: count once ----------------------------------------------------------------------------------------

    def count_frame_once(
        self, run_id: str, trial: str, frame_index: int, increments: Mapping[str, int] | None = None
    ) -> bool:
        """Mark (run, trial, frame) seen and add ``increments`` to its counters, atomically, only the first time.

        Returns True when the frame was new (counted now), False when it had been counted before (a redelivery).
        """
        keys, args = self._count_arguments(run_id, trial, frame_index, increments)
        return bool(self._count_once(keys=keys, args=args))

    def _count_arguments(
        self, run_id: str, trial: str, frame_index: int, increments: Mapping[str, int] | None
    ) -> tuple[list[str], list[Any]]:
        if not 0 <= frame_index < MAX_FRAMES_PER_RUN:
            raise ValueError(f"frame_index {frame_index} of run {run_id} is outside 0..{MAX_FRAMES_PER_RUN - 1}")
        increments = {"frames": 1} if increments is None else increments
        pairs: list[str | int] = []
        for field_name, amount in increments.items():
            pairs += [field_name, int(amount)]
        keys = [self.keys.seen(run_id, trial), self.keys.counters(run_id, trial), self.keys.trials(run_id)]
        return [*keys, self.keys.runs()], [frame_index, self.ttl, trial, run_id, time.time(), *pairs]

    @staticmethod
    def _result_increments(result: FrameResult) -> dict[str, int]:
        return {
            "frames": 1,
            "hits": int(result.hit),
            "indexed": int(result.indexed),
            "failed": int(result.error is not None),
            "reflections": len(result.reflections) if result.reflections is not None else 0,
        }

    def count_frame_result(self, result: FrameResult) -> bool:
        """Count a FrameResult once: frames, hits, indexed, failed and reflections of its run and trial."""
        increments = self._result_increments(result)
        return self.count_frame_once(result.run_id, result.trial, result.frame_index, increments)

    def count_frame_results(self, results: Sequence[FrameResult], batch: int = 1000) -> int:
        """Count many results once each, in pipelined batches (a merger re-seeding an emptied Redis from its
        journals); returns how many were new."""
        new = 0
        for start in range(0, len(results), batch):
            pipeline = self.redis.pipeline(transaction=False)
            for result in results[start : start + batch]:
                keys, args = self._count_arguments(
                    result.run_id, result.trial, result.frame_index, self._result_increments(result)
                )
                self._count_once(keys=keys, args=args, client=pipeline)
            new += sum(int(counted) for counted in pipeline.execute())
        return new

    def counters(self, run_id: str, trial: str) -> dict[str, int]:
        """The counters of a run under a trial (every field of FRAME_COUNTER_FIELDS, 0 when absent)."""
        raw: dict[bytes, bytes] = self.redis.hgetall(self.keys.counters(run_id, trial))  # type: ignore[assignment]
        values = {key.decode(): int(value) for key, value in raw.items()}
        return {**dict.fromkeys(FRAME_COUNTER_FIELDS, 0), **values}

    def frames_seen(self, run_id: str, trial: str) -> int:
        """How many distinct frames of a run were counted under a trial."""
        return int(self.redis.bitcount(self.keys.seen(run_id, trial)))

    def seen_frames(self, run_id: str, trial: str) -> np.ndarray:
        """Bool array: element i is True when frame i was counted (one read of the bitmap, for a whole job)."""
        raw: bytes | None = self.redis.get(self.keys.seen(run_id, trial))  # type: ignore[assignment]
        # Redis numbers bits from the most significant bit of the first byte, as unpackbits does by default.
        return np.unpackbits(np.frombuffer(raw or b"", dtype=np.uint8)).astype(bool)

    def was_seen(self, run_id: str, trial: str, frame_index: int) -> bool:
        return bool(self.redis.getbit(self.keys.seen(run_id, trial), frame_index))

    def increment(self, run_id: str, trial: str, field_name: str, amount: int = 1) -> int:
        """Add to one counter unconditionally (for quantities that are not per-frame); returns the new value."""
        key = self.keys.counters(run_id, trial)
        pipeline = self.redis.pipeline(transaction=True)
        pipeline.hincrby(key, field_name, amount)
        pipeline.expire(key, self.ttl)
        new_value, _ = pipeline.execute()
        return int(new_value)

    def trials(self, run_id: str) -> list[str]:
        members: set[bytes] = self.redis.smembers(self.keys.trials(run_id))  # type: ignore[assignment]
        return sorted(member.decode() for member in members)

    def runs(self) -> list[str]:
        """Run ids, most recently updated first."""
        members: list[bytes] = self.redis.zrevrange(self.keys.runs(), 0, -1)  # type: ignore[assignment]
        return [member.decode() for member in members]

    # -- latest messages -------------------------------------------------------------------------------------------

    def save_run(self, manifest: RunManifest) -> None:
        pipeline = self.redis.pipeline(transaction=True)
        pipeline.set(self.keys.run(manifest.run_id), manifest.encode(), ex=self.ttl)
        pipeline.zadd(self.keys.runs(), {manifest.run_id: time.time()})
        pipeline.expire(self.keys.runs(), self.ttl)
        pipeline.execute()

    def run(self, run_id: str) -> RunManifest | None:
        return self._load(self.keys.run(run_id), RunManifest)

    def save_run_to_publish(self, manifest: RunManifest) -> None:
        """Save a manifest with an outbox entry, in one transaction; the entry stays until the publish is confirmed."""
        pipeline = self.redis.pipeline(transaction=True)
        pipeline.sadd(self.keys.unpublished_runs(), manifest.run_id)
        pipeline.set(self.keys.run(manifest.run_id), manifest.encode(), ex=self.ttl)
        pipeline.zadd(self.keys.runs(), {manifest.run_id: time.time()})
        pipeline.expire(self.keys.runs(), self.ttl)
        pipeline.execute()

    def unpublished_runs(self) -> list[str]:
        """Runs whose latest manifest was saved but whose publish was not confirmed (the ingest's outbox)."""
        members: set[bytes] = self.redis.smembers(self.keys.unpublished_runs())  # type: ignore[assignment]
        return sorted(member.decode() for member in members)

    def is_seeded(self, owner: str) -> bool:
        """False when Redis lost what ``owner`` put back from its own records (a restart without persistence)."""
        return bool(self.redis.exists(self.keys.seeded(owner)))

    def mark_seeded(self, owner: str) -> None:
        self.redis.set(self.keys.seeded(owner), str(time.time()))

    def mark_run_published(self, run_id: str) -> None:
        self.redis.srem(self.keys.unpublished_runs(), run_id)

    def save_job(self, job_state: JobState) -> None:
        pipeline = self.redis.pipeline(transaction=True)
        pipeline.set(self.keys.job(job_state.job_id), job_state.encode(), ex=self.ttl)
        pipeline.zadd(self.keys.jobs(), {job_state.job_id: job_state.updated_at})
        pipeline.expire(self.keys.jobs(), self.ttl)
        pipeline.execute()

    def jobs(self) -> list[JobState]:
        """Latest state of every job, most recently updated first."""
        ids: list[bytes] = self.redis.zrevrange(self.keys.jobs(), 0, -1)  # type: ignore[assignment]
        states = [self.job(job_id.decode()) for job_id in ids]
        return [state for state in states if state is not None]

    def job(self, job_id: str) -> JobState | None:
        return self._load(self.keys.job(job_id), JobState)

    def save_job_spec(self, spec: JobSpec) -> None:
        """The spec of a queued job, so a restarted dispatcher can start it with the same parameters."""
        self.redis.set(self.keys.job_spec(spec.job_id), spec.encode(), ex=self.ttl)

    def job_spec(self, job_id: str) -> JobSpec | None:
        return self._load(self.keys.job_spec(job_id), JobSpec)

    def record_slot_use(self, use: Mapping[str, Any]) -> None:
        """Append one ended attempt of a job (which slots it held, from when to when, how it ended)."""
        pipeline = self.redis.pipeline(transaction=False)
        pipeline.rpush(self.keys.slot_history(), json.dumps(dict(use)))
        pipeline.expire(self.keys.slot_history(), self.ttl)
        pipeline.execute()

    def slot_history(self) -> list[dict[str, Any]]:
        raw: list[bytes] = self.redis.lrange(self.keys.slot_history(), 0, -1)  # type: ignore[assignment]
        return [json.loads(entry) for entry in raw]

    def save_merge(self, update: MergeUpdate) -> None:
        pipeline = self.redis.pipeline(transaction=True)
        pipeline.set(self.keys.merge(update.dataset_id, update.trial), update.encode(), ex=self.ttl)
        pipeline.zadd(self.keys.merges(), {json.dumps([update.dataset_id, update.trial]): update.published_at})
        pipeline.expire(self.keys.merges(), self.ttl)
        pipeline.execute()

    def merges(self) -> list[MergeUpdate]:
        """Latest MergeUpdate of every dataset and trial, most recently updated first."""
        members: list[bytes] = self.redis.zrevrange(self.keys.merges(), 0, -1)  # type: ignore[assignment]
        updates = [self.merge(*json.loads(member)) for member in members]
        return [update for update in updates if update is not None]

    def merge(self, dataset_id: str, trial: str) -> MergeUpdate | None:
        return self._load(self.keys.merge(dataset_id, trial), MergeUpdate)

    # -- ingest -----------------------------------------------------------------------------------------------------

    def save_rejection(self, event: FileRejected) -> None:
        pipeline = self.redis.pipeline(transaction=True)
        pipeline.hset(self.keys.rejected_files(), event.path, event.encode())
        pipeline.expire(self.keys.rejected_files(), self.ttl)
        pipeline.execute()

    def rejections(self) -> list[FileRejected]:
        raw: dict[bytes, bytes] = self.redis.hgetall(self.keys.rejected_files())  # type: ignore[assignment]
        return [decode_message(value, FileRejected) for value in raw.values()]

    # -- analysis ranks: heartbeats and per-frame timings (the data of weatherplots) -------------------------------

    def record_rank(
        self, job_id: str, rank: int, status: Mapping[str, Any], timeline: Sequence[Mapping[str, Any]]
    ) -> None:
        """Store a rank's latest status and append its per-frame timings, in one round trip."""
        pipeline = self.redis.pipeline(transaction=False)
        pipeline.hset(self.keys.job_ranks(job_id), str(rank), json.dumps(dict(status)))
        pipeline.expire(self.keys.job_ranks(job_id), self.ttl)
        if timeline:
            pipeline.rpush(self.keys.job_timeline(job_id), *(json.dumps(dict(entry)) for entry in timeline))
            pipeline.expire(self.keys.job_timeline(job_id), self.ttl)
        pipeline.execute()

    def clear_rank_status(self, job_id: str) -> None:
        """Forget the ranks of an earlier attempt, so the next attempt's totals are its own."""
        self.redis.delete(self.keys.job_ranks(job_id))

    def mark_inflight(self, job_id: str, rank: int, frame_index: int | None) -> None:
        """Which frame a rank is analysing now (None: none), so a crash can be pinned on its frame."""
        key = self.keys.job_inflight(job_id)
        if frame_index is None:
            self.redis.hdel(key, str(rank))
            return
        pipeline = self.redis.pipeline(transaction=False)
        pipeline.hset(key, str(rank), json.dumps({"frame": frame_index, "pid": os.getpid()}))
        pipeline.expire(key, self.ttl)
        pipeline.execute()

    def inflight(self, job_id: str) -> dict[int, dict[str, int]]:
        """Rank → {"frame", "pid"} of the frames the job's ranks were analysing (left behind by a crash)."""
        raw: dict[bytes, bytes] = self.redis.hgetall(self.keys.job_inflight(job_id))  # type: ignore[assignment]
        return {int(rank): json.loads(value) for rank, value in raw.items()}

    def clear_inflight(self, job_id: str) -> None:
        self.redis.delete(self.keys.job_inflight(job_id))

    def rank_status(self, job_id: str) -> dict[int, dict[str, Any]]:
        raw: dict[bytes, bytes] = self.redis.hgetall(self.keys.job_ranks(job_id))  # type: ignore[assignment]
        return {int(rank): json.loads(value) for rank, value in raw.items()}

    def timeline(self, job_id: str, last: int | None = None) -> list[dict[str, Any]]:
        """Per-frame timings of a job (its ``last`` frames, or all): rank, frame, start, end and seconds per stage."""
        start = 0 if last is None else -last
        raw: list[bytes] = self.redis.lrange(self.keys.job_timeline(job_id), start, -1)  # type: ignore[assignment]
        return [json.loads(entry) for entry in raw]

    def measured_frame_costs(self, job_ids: Sequence[str]) -> FrameCosts | None:
        """Per-frame costs from the timings the analysis ranks of these jobs recorded (their latest frames)."""
        entries: list[dict[str, Any]] = []
        for job_id in job_ids:
            entries += self.timeline(job_id, last=COST_FRAMES_PER_JOB)
        return frame_costs(entries)

    # -- services --------------------------------------------------------------------------------------------------

    def write_heartbeat(self, heartbeat: ServiceHeartbeat) -> None:
        """Store a heartbeat; the key expires after three periods without a new one."""
        key = self.keys.service(heartbeat.service, heartbeat.instance)
        self.redis.set(key, heartbeat.encode(), ex=self.service_ttl)

    def remove_heartbeat(self, service: str, instance: str) -> None:
        self.redis.delete(self.keys.service(service, instance))

    def live_services(self) -> list[ServiceHeartbeat]:
        """Every service instance whose heartbeat has not expired, sorted by service and instance."""
        keys = list(self.redis.scan_iter(match=self.keys.service_pattern(), count=500))
        if not keys:
            return []
        values: list[bytes | None] = self.redis.mget(keys)  # type: ignore[assignment]
        services = [decode_message(value, ServiceHeartbeat) for value in values if value is not None]
        return sorted(services, key=lambda heartbeat: (heartbeat.service, heartbeat.instance))

    # -- housekeeping ----------------------------------------------------------------------------------------------

    def delete_namespace(self) -> int:
        """Delete every key of this namespace (tests and teardown); returns how many were deleted."""
        deleted = 0
        batch: list[Any] = []
        for key in self.redis.scan_iter(match=self.keys.everything_pattern(), count=1000):
            batch.append(key)
            if len(batch) >= 1000:
                deleted += int(self.redis.unlink(*batch))
                batch = []
        if batch:
            deleted += int(self.redis.unlink(*batch))
        return deleted

    def _load(self, key: str, model: type[M]) -> M | None:
        value: bytes | None = self.redis.get(key)  # type: ignore[assignment]
        return None if value is None else decode_message(value, model)
