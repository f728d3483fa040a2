"""A poison corpus published straight onto the queues: each message is dead-lettered on its first delivery with its
reason, Redis grows by under 1 MB, and a run landed afterwards is processed as if nothing had happened."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import kombu

from libs.contracts.messages import MAX_MESSAGE_BYTES, ReprocessRequest
from libs.runtime.bus import Topology, connect
from libs.simulator.results import make_frame_result, random_reflections
from tests.faults.support import CELL, RUN_ID, Pipeline, Reference, Row, assert_clean, audit, private_redis

REDIS_GROWTH_LIMIT = 1_000_000


def frame_result(**changes: Any) -> dict[str, Any]:
    """A valid FrameResult of the run as a JSON object, with ``changes`` applied."""
    result = make_frame_result(3, run_id=RUN_ID, cell=CELL, reflections=random_reflections(4, seed=1))
    payload: dict[str, Any] = json.loads(result.encode())
    payload.update(changes)
    return payload


def huge_array() -> dict[str, Any]:
    payload = frame_result()
    payload["reflections"]["miller"]["shape"] = [2**70, 3]  # a shape whose size overflows every integer type
    return payload


def corpus() -> list[tuple[str, str, str, bytes]]:
    """(what, exchange, routing key, body) of every poison message."""
    valid_request = json.loads(ReprocessRequest(run_ids=["r1"], trial="t").encode())
    many_runs = {**valid_request, "run_ids": [f"r{i}" for i in range(1001)]}
    return [
        ("malformed JSON", "results", "frame.x.live", b'{"type": "frame_result", "run_id": '),
        ("JSON nested 100k deep", "results", "frame.x.live", b"[" * 100_000 + b"]" * 100_000),
        ("packed array of shape [2**70, 3]", "results", "frame.x.live", json.dumps(huge_array()).encode()),
        ("frame_index 2**32-1", "results", "frame.x.live", json.dumps(frame_result(frame_index=2**32 - 1)).encode()),
        ("trial ../../x", "results", "frame.x.live", json.dumps(frame_result(trial="../../x")).encode()),
        ("run id ../r", "results", "frame.x.live", json.dumps(frame_result(run_id="../r")).encode()),
        (
            "oversized body",
            "results",
            "frame.x.live",
            b'{"type": "frame_result", "padding": "' + b"x" * MAX_MESSAGE_BYTES + b'"}',
        ),
        ("reprocess request with 1001 runs", "control", "reprocess.t", json.dumps(many_runs).encode()),
        ("unknown message type", "runs", "manifest.x", b'{"schema_version": 1, "type": "no_such_message"}'),
    ]


def publish_raw(pipeline: Pipeline, messages: list[tuple[str, str, str, bytes]]) -> None:
    topology = Topology(pipeline.settings)
    with connect(pipeline.settings, role="test-poison") as connection:
        producer = kombu.Producer(connection.channel())
        for _, exchange, routing_key, body in messages:
            producer.publish(
                body,
                exchange=topology.exchanges[exchange],
                routing_key=routing_key,
                content_type="application/json",
                content_encoding="binary",
                delivery_mode=2,
            )


def dead_letters(pipeline: Pipeline) -> list[dict[str, Any]]:
    """The headers of every dead letter (taken off the queue)."""
    name = Topology(pipeline.settings).name("dead-letters")
    found = []
    with connect(pipeline.settings, role="test-dlq") as connection:
        channel = connection.channel()
        while (raw := channel.basic_get(name, no_ack=True)) is not None:
            found.append(dict(raw.headers or {}))
    return found


def dead_letter_count(pipeline: Pipeline) -> int:
    name = Topology(pipeline.settings).name("dead-letters")
    with connect(pipeline.settings, role="test-dlq-probe") as connection:
        _, ready, _ = connection.channel().queue_declare(name, passive=True)
    return int(ready)


def test_poison_corpus_is_dead_lettered_on_first_delivery(
    tmp_path: Path, source_run: Path, reference: Reference, record_row: Callable[[Row], None]
) -> None:
    with private_redis(tmp_path) as server, Pipeline(tmp_path / "pipeline", redis_url=server.url) as pipeline:
        # The services have settled (each has a heartbeat, the merger has seeded Redis) before the memory is measured.
        pipeline.wait_for(
            lambda: len(pipeline.state.live_services()) >= len(pipeline.names) and pipeline.state.is_seeded("merger"),
            what="every service running",
        )
        memory_before = server.used_memory()
        poison = corpus()
        publish_raw(pipeline, poison)
        pipeline.wait_for(lambda: dead_letter_count(pipeline) >= len(poison), what="every poison message dead-lettered")
        memory_growth = server.used_memory() - memory_before
        letters = dead_letters(pipeline)
        reasons = [str(headers.get("x-sfx-error", "")) for headers in letters]
        print("poison reasons:", *(f"  {reason[:160]}" for reason in reasons), sep="\n")
        print(f"Redis used_memory grew by {memory_growth} bytes")
        assert len(letters) == len(poison), reasons
        assert all(reasons), "a dead letter without its reason"
        first_delivery = [int(h.get("x-delivery-count") or 0) == 0 and not h.get("x-sfx-retries") for h in letters]
        assert all(first_delivery), letters
        assert memory_growth < REDIS_GROWTH_LIMIT

        pipeline.land(source_run)
        ended = time.monotonic()
        update, seen = pipeline.final_merge()
        result = audit(
            pipeline,
            f"poison corpus ({len(poison)} messages), then the run",
            reference,
            seen - ended,
            record_row,
            update,
        )
        assert_clean(result, update, reference)
