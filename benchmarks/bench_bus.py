"""Bus figures: encoded size of a 500-reflection FrameResult and publish→consume throughput on the real broker.

The publisher runs in this process and the consumer in another, as the services do (in one process the publisher,
connection and handler threads would share one interpreter lock).

Run: ``python -m benchmarks bus`` (RabbitMQ and Redis must answer; settings from SFX_* variables).
"""

from __future__ import annotations

import json
import multiprocessing
import threading
import time
import uuid
from typing import Any

from libs.contracts.messages import FrameResult
from libs.contracts.settings import Settings, get_settings
from libs.runtime.bus import Consumer, Publisher, Topology, connect, running
from libs.simulator.results import make_frame_result, random_reflections


def frame_result(frame_index: int, reflections: int) -> FrameResult:
    """A hit; indexed, with ``reflections`` integrated, unless ``reflections`` is 0."""
    table = random_reflections(reflections, seed=frame_index) if reflections else None
    return make_frame_result(
        frame_index,
        started_at=1000.0,
        finished_at=1000.2,
        rank=3,
        spot_count=120,
        hit=True,
        A=((0.0126, 0.0003, -0.0001), (-0.0002, 0.0127, 0.0004), (0.0001, -0.0005, 0.0262)) if table else None,
        cell=(79.1, 79.1, 38.0, 90.0, 90.0, 90.0) if table else None,
        timings={"spotfind": 0.05, "index": 0.1, "integrate": 0.04},
        reflections=table,
    )


def encoded_sizes() -> None:
    result = frame_result(0, 500)
    encoded = result.encode()
    assert result.reflections is not None
    as_lists = result.model_dump(mode="python")
    table = result.reflections
    as_lists["reflections"] = {
        "miller": table.miller.tolist(),
        "intensity": [float(v) for v in table.intensity],
        "sigma": [float(v) for v in table.sigma],
        "partiality": [float(v) for v in table.partiality],
    }
    raw_bytes = table.miller.nbytes + table.intensity.nbytes + table.sigma.nbytes + table.partiality.nbytes
    print(f"FrameResult, 500 reflections: {len(encoded)} bytes encoded ({len(encoded) / 500:.1f} bytes/reflection)")
    print(f"  raw column bytes {raw_bytes}; the same message with JSON number lists: {len(json.dumps(as_lists))} bytes")
    print(f"FrameResult without reflections: {len(frame_result(0, 0).encode())} bytes")


def consume_in_process(settings_json: str, count: int, events: Any) -> None:
    """The consumer side, in its own process as in a deployment: reports when it consumes and when all arrived."""
    settings = Settings.model_validate_json(settings_json)
    done = threading.Event()
    received = [0]

    def handler(result: FrameResult) -> None:
        received[0] += 1
        if received[0] == count:
            done.set()

    consumer = Consumer(Topology(settings).queue("merger.frames"), FrameResult, handler, settings=settings)
    with running(consumer):
        events.put(("consuming", time.time()))
        arrived = done.wait(300)
        events.put(("done" if arrived else "timeout", time.time()))


def throughput(settings: Settings, label: str, messages: list[FrameResult], batch: int) -> None:
    """Publish ``messages`` in confirmed batches while a consumer process takes them; first publish → last ack."""
    context = multiprocessing.get_context("spawn")
    events = context.Queue()
    consumer = context.Process(target=consume_in_process, args=(settings.model_dump_json(), len(messages), events))
    consumer.start()
    try:
        kind, _ = events.get(timeout=60)
        if kind != "consuming":
            raise RuntimeError(f"the consumer process did not start: {kind}")
        with Publisher(settings, role="bench") as publisher:
            started = time.time()
            for start in range(0, len(messages), batch):
                publisher.publish_many(messages[start : start + batch])
            published = time.time()
        kind, consumed = events.get(timeout=300)
        if kind != "done":
            raise RuntimeError(f"not every message arrived ({kind})")
    finally:
        consumer.join(30)
    count = len(messages)
    print(
        f"{label}: {count} messages, batches of {batch}: publish (confirmed) {count / (published - started):,.0f}/s, "
        f"publish→consume {count / (consumed - started):,.0f} messages/s ({consumed - started:.2f} s)"
    )


def single_publish_rate(settings: Settings, count: int) -> None:
    """One message per publish call: a confirm round trip each (the rate of code that cannot batch)."""
    with Publisher(settings, role="bench") as publisher:
        started = time.perf_counter()
        for index in range(count):
            publisher.publish(frame_result(index, 0))
        elapsed = time.perf_counter() - started
    print(f"publish one at a time (confirm each): {count / elapsed:,.0f} messages/s")


def main() -> None:
    encoded_sizes()
    settings = get_settings().model_copy(update={"namespace": f"bench-{uuid.uuid4().hex[:8]}"})
    with connect(settings, role="bench") as connection:
        Topology(settings).declare(connection)
    try:
        small = [frame_result(i, 0) for i in range(20_000)]
        throughput(settings, "small FrameResult", small, batch=500)
        large = [frame_result(i, 500) for i in range(2_000)]
        throughput(settings, "500-reflection FrameResult", large, batch=100)
        single_publish_rate(settings, 2_000)
    finally:
        with connect(settings, role="bench") as connection:
            Topology(settings).delete(connection)


if __name__ == "__main__":
    main()
