"""The bus against the real RabbitMQ: round trips, redelivery, dead letters, dropped connections, DLQ tools."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import kombu
import numpy as np
import pytest

from libs.contracts.messages import (
    FrameResult,
    JobSpec,
    JobState,
    JobStatus,
    MergeUpdate,
    Message,
    MessageError,
    ReflectionTable,
    ReprocessRequest,
    RunManifest,
    ServiceHeartbeat,
    ShellStatistics,
)
from libs.contracts.settings import Settings
from libs.runtime.bus import (
    HEADER_ERROR,
    HEADER_TYPE,
    STANDARD_MIDDLEWARE,
    BusError,
    Consumer,
    Delivery,
    HandlerCall,
    Middleware,
    Publisher,
    PublishError,
    Topology,
    connect,
    escape_word,
    frame_key,
    routing_key_for,
    running,
)
from libs.runtime.service import run_service
from libs.runtime.state import LiveState
from sfx.cli import main as sfx_main
from tests.conftest import rabbitmqctl, settings_environment, wait_until
from tests.support.faults import relay_for


def frame_result(frame_index: int, run_id: str = "r0001", trial: str = "live", reflections: int = 0) -> FrameResult:
    rng = np.random.default_rng(frame_index)
    table = (
        ReflectionTable.from_columns(
            miller=rng.integers(-40, 40, size=(reflections, 3)),
            intensity=rng.gamma(1.0, 100.0, size=reflections),
            sigma=rng.uniform(1, 10, size=reflections),
            partiality=rng.uniform(0, 1, size=reflections),
        )
        if reflections
        else None
    )
    return FrameResult(
        run_id=run_id,
        trial=trial,
        frame_index=frame_index,
        started_at=1000.0,
        finished_at=1000.5,
        spot_count=40,
        hit=True,
        indexed=table is not None,
        A=((0.012, 0.0, 0.0), (0.0, 0.012, 0.0), (0.0, 0.0, 0.026)) if table is not None else None,
        cell=(79.1, 79.1, 38.0, 90.0, 90.0, 90.0) if table is not None else None,
        reflections=table,
    )


def one_of_each_type() -> list[Message]:
    manifest = RunManifest(
        run_id="r0007.a",  # a dot inside an id must not split the routing key
        files=["/data/r0007.h5"],
        file_format="nxmx",
        cell=(79.1, 79.1, 38.0, 90, 90, 90),
        space_group="P 43 21 2",
        live=True,
    )
    shell = ShellStatistics(
        d_max=50,
        d_min=2,
        observations=1000,
        unique=100,
        possible=120,
        completeness=0.83,
        multiplicity=10,
        mean_i_over_sigma=5.5,
        cc_half=0.9,
    )
    return [
        manifest,
        JobSpec(job_id="j1", manifest=manifest, trial="live"),
        JobState(job_id="j1", run_id="r0007.a", trial="live", status=JobStatus.RUNNING, slots=2),
        frame_result(3, run_id="r0007.a", reflections=50),
        ReprocessRequest(run_ids=["r0007.a"], trial="t2", parameters={"sigma_strong": 4}),
        MergeUpdate(dataset_id="lyso", trial="live", run_ids=["r0007.a"], overall=shell, shells=[shell]),
        ServiceHeartbeat(service="merger", instance="m1", pid=1, started_at=1.0),
    ]


def capture_deliveries(store: list[tuple[Message, Delivery]]) -> Middleware:
    """Test middleware: remember each message with how it arrived."""

    def middleware(call: HandlerCall) -> HandlerCall:
        def capturing(message: Message, delivery: Delivery) -> None:
            store.append((message, delivery))
            call(message, delivery)

        return capturing

    return middleware


def dead_letters(settings: Settings) -> list[Any]:
    """Take every message off the dead-letter queue (acking them)."""
    messages = []
    with connect(settings) as connection:
        channel = connection.channel()
        while (message := channel.basic_get(Topology(settings).dead_letter_queue.name, no_ack=True)) is not None:
            messages.append(message)
    return messages


def test_routing_words_are_escaped_and_reversible() -> None:
    assert escape_word("r0042") == "r0042"
    assert escape_word("r1.a:b") == "r1%2Ea%3Ab"
    assert escape_word("50%") == "50%25"
    assert frame_key("run.1", "live") == "frame.run%2E1.live"
    with pytest.raises(ValueError, match="empty"):
        escape_word("")


def test_every_message_type_round_trips_through_the_broker(
    settings: Settings, scratch_queues: list[kombu.Queue]
) -> None:
    topology = Topology(settings)
    every_exchange = kombu.Queue(
        topology.name("everything"),
        bindings=[kombu.binding(exchange, routing_key="#") for exchange in topology.exchanges.values()],
        durable=True,
        queue_arguments=topology.work_queue_arguments(),
    )
    scratch_queues.append(every_exchange)
    sent = one_of_each_type()
    received: list[tuple[Message, Delivery]] = []
    consumer = Consumer(
        every_exchange,
        tuple(type(message) for message in sent),
        lambda message: None,
        settings=settings,
        middleware=[*STANDARD_MIDDLEWARE, capture_deliveries(received)],
    )
    with running(consumer), Publisher(settings) as publisher:
        for message in sent:
            publisher.publish(message)
        wait_until(lambda: len(received) == len(sent), 10, "every message type")

    by_type = {message.type_name: (message, delivery) for message, delivery in received}
    assert sorted(by_type) == sorted(message.type_name for message in sent)
    for original in sent:
        message, delivery = by_type[original.type_name]
        assert type(message) is type(original)
        assert message.encode() == original.encode()  # every field survives, arrays bit for bit
        assert delivery.exchange == topology.exchange_for(original)
        assert delivery.routing_key == routing_key_for(original)
        assert delivery.headers[HEADER_TYPE] == original.type_name
    assert by_type["frame_result"][1].routing_key == "frame.r0007%2Ea.live"
    assert consumer.metrics.snapshot()["messages_handled_total"] == len(sent)


def test_subscriber_selects_results_by_run_and_trial(settings: Settings, scratch_queues: list[kombu.Queue]) -> None:
    topology = Topology(settings)
    selected = topology.work_queue("select-r1", "results", [f"frame.{escape_word('r1')}.*"])
    scratch_queues.append(selected)
    received: list[FrameResult] = []
    consumer = Consumer(selected, FrameResult, received.append, settings=settings)
    with running(consumer), Publisher(settings) as publisher:
        publisher.publish_many(
            [
                frame_result(0, run_id="r1", trial="live"),
                frame_result(1, run_id="r1", trial="t2"),
                frame_result(2, run_id="r1.x", trial="live"),  # not run r1, although it starts like it
                frame_result(3, run_id="r2", trial="live"),
            ]
        )
        wait_until(lambda: len(received) >= 2, 10, "the results of run r1")
        time.sleep(0.3)  # anything wrongly routed would arrive by now
    assert sorted((r.run_id, r.trial) for r in received) == [("r1", "live"), ("r1", "t2")]


DOOMED_CONSUMER = """
import time
from libs.runtime.bus import Consumer, Topology
from libs.contracts.messages import FrameResult
from libs.runtime.logging import configure_logging
from libs.contracts.settings import get_settings
from libs.runtime.state import LiveState

configure_logging("doomed", "json")  # logs to stderr; stdout carries the test's signal
settings = get_settings()
state = LiveState(settings)

def handler(result):
    counted = state.count_frame_result(result)
    print(f"handled {result.frame_index} counted={counted}", flush=True)
    time.sleep(600)  # killed here, after the side effect and before the ack

Consumer(Topology(settings).queue("merger.frames"), FrameResult, handler, settings=settings, name="doomed").run()
"""


def test_consumer_killed_before_ack_is_redelivered_and_counted_once(settings: Settings) -> None:
    state = LiveState(settings)
    with Publisher(settings) as publisher:
        publisher.publish_many([frame_result(i) for i in range(3)])
    environment = {**settings_environment(settings), "SFX_PREFETCH": "1"}
    doomed = subprocess.Popen(
        [sys.executable, "-c", DOOMED_CONSUMER], env=environment, stdout=subprocess.PIPE, text=True
    )
    try:
        assert doomed.stdout is not None
        first_line = doomed.stdout.readline()
        assert first_line.strip() == "handled 0 counted=True"
    finally:
        doomed.kill()
        doomed.wait(10)

    received: list[tuple[Message, Delivery]] = []
    counted: dict[int, bool] = {}

    def handler(result: FrameResult) -> None:
        counted[result.frame_index] = state.count_frame_result(result)

    survivor = Consumer(
        Topology(settings).queue("merger.frames"),
        FrameResult,
        handler,
        settings=settings,
        middleware=[*STANDARD_MIDDLEWARE, capture_deliveries(received)],
    )
    with running(survivor):
        wait_until(lambda: len(counted) == 3, 15, "the three frames at the surviving consumer")
    redelivered = {
        message.frame_index: delivery.redelivered for message, delivery in received if isinstance(message, FrameResult)
    }
    assert redelivered[0] is True  # the frame the killed consumer held came back
    assert counted == {0: False, 1: True, 2: True}  # ... and was not counted again
    assert state.counters("r0001", "live")["frames"] == 3
    assert state.frames_seen("r0001", "live") == 3


def test_malformed_messages_are_dead_lettered_and_good_ones_still_handled(settings: Settings) -> None:
    topology = Topology(settings)
    handled: list[str] = []
    consumer = Consumer(
        topology.queue("dispatcher.runs"), RunManifest, lambda m: handled.append(m.run_id), settings=settings
    )
    good = [RunManifest(run_id=f"r{i}", files=[f"/data/r{i}.h5"], file_format="cxi") for i in range(2)]
    bad_cell = good[0].model_dump(mode="json") | {"run_id": "bad", "cell": [79.1, 79.1, -38.0, 90, 90, 90]}
    runs_exchange = topology.name("runs")
    with running(consumer), Publisher(settings) as publisher:
        publisher.publish(good[0])
        publisher.publish_raw(b"\x00 not json", runs_exchange, "manifest.garbage", {})
        publisher.publish_raw(good[1].encode().replace(b'"cxi"', b'"tiff"'), runs_exchange, "manifest.format", {})
        publisher.publish_raw(json.dumps(bad_cell).encode(), runs_exchange, "manifest.cell", {})
        publisher.publish_raw(frame_result(1).encode(), runs_exchange, "manifest.wrong-type", {})
        publisher.publish(good[1])
        wait_until(
            lambda: len(handled) == 2 and consumer.metrics.snapshot()["messages_dead_lettered_total"] == 4,
            10,
            "two good messages and four dead letters",
        )
    assert handled == ["r0", "r1"]
    reasons = {m.delivery_info["routing_key"]: m.headers[HEADER_ERROR] for m in dead_letters(settings)}
    assert set(reasons) == {"manifest.garbage", "manifest.format", "manifest.cell", "manifest.wrong-type"}
    assert "not JSON" in reasons["manifest.garbage"]
    assert "file_format" in reasons["manifest.format"]
    assert "cell" in reasons["manifest.cell"] and "-38" in reasons["manifest.cell"]
    assert "takes run_manifest messages, got frame_result" in reasons["manifest.wrong-type"]
    assert consumer.error is None


def test_failing_handler_is_retried_then_dead_lettered_with_its_error(
    settings: Settings, scratch_queues: list[kombu.Queue]
) -> None:
    settings = settings.model_copy(update={"delivery_limit": 2, "retry_delay_seconds": 0.05})
    topology = Topology(settings)
    limited = topology.work_queue("limited", "runs", ["manifest.#"])
    scratch_queues.extend([limited, *topology.retry_queues()])
    attempts: list[int] = []

    def always_fails(manifest: RunManifest) -> None:
        attempts.append(1)
        raise RuntimeError(f"cannot open {manifest.files[0]}")

    consumer = Consumer(limited, RunManifest, always_fails, settings=settings)
    with running(consumer), Publisher(settings) as publisher:
        publisher.publish(RunManifest(run_id="r9", files=["/data/missing.h5"], file_format="nxmx"))
        wait_until(lambda: consumer.metrics.snapshot()["messages_dead_lettered_total"] == 1, 10, "a dead letter")
    assert len(attempts) == 3  # first delivery plus delivery_limit redeliveries, then it stops
    assert consumer.metrics.snapshot()["messages_retried_total"] == 2
    (letter,) = dead_letters(settings)
    assert "handler failed on all 3 deliveries" in letter.headers[HEADER_ERROR]
    assert "/data/missing.h5" in letter.headers[HEADER_ERROR]


def test_a_failed_message_waits_growing_delays_and_outlives_a_short_outage(
    settings: Settings, scratch_queues: list[kombu.Queue]
) -> None:
    """A handler that fails for about a second (Redis paused, a disk full) must not burn the deliveries at once."""
    settings = settings.model_copy(update={"retry_delay_seconds": 0.2})  # delays 0.2, 0.8, 3.2 s, …
    topology = Topology(settings)
    queue = topology.work_queue("outage", "runs", ["manifest.#"])
    scratch_queues.extend([queue, *topology.retry_queues()])
    outage_ends = time.monotonic() + 0.9
    deliveries: list[float] = []

    def fails_during_the_outage(manifest: RunManifest) -> None:
        deliveries.append(time.monotonic())
        if deliveries[-1] < outage_ends:
            raise ConnectionError("Redis is paused")

    consumer = Consumer(queue, RunManifest, fails_during_the_outage, settings=settings)
    with running(consumer), Publisher(settings) as publisher:
        publisher.publish(RunManifest(run_id="r7", files=["/data/r7.h5"], file_format="nxmx"))
        wait_until(lambda: consumer.metrics.snapshot()["messages_handled_total"] >= 1, 15, "the handled message")
    gaps = np.diff(deliveries)
    assert len(deliveries) == 3, deliveries  # failed, failed, handled: the outage was outlived
    assert gaps[0] >= 0.2 and gaps[1] >= 0.8 and gaps[1] > 2 * gaps[0], gaps
    assert consumer.metrics.snapshot()["messages_dead_lettered_total"] == 0
    assert dead_letters(settings) == []


def test_dlq_list_replay_and_purge(cli_environment: Settings, scratch_queues: list[kombu.Queue], capsys: Any) -> None:
    settings = cli_environment.model_copy(update={"delivery_limit": 1, "retry_delay_seconds": 0.05})
    topology = Topology(settings)
    replayable = topology.work_queue("replayable", "runs", ["manifest.#"])
    scratch_queues.extend([replayable, *topology.retry_queues()])
    broken = threading.Event()
    broken.set()
    handled: list[str] = []

    def handler(manifest: RunManifest) -> None:
        if broken.is_set():
            raise RuntimeError("database down")
        handled.append(manifest.run_id)

    consumer = Consumer(replayable, RunManifest, handler, settings=settings)
    with running(consumer), Publisher(settings) as publisher:
        publisher.publish(RunManifest(run_id="r5", files=["/data/r5.h5"], file_format="nxmx"))
        publisher.publish_raw(b"garbage", topology.name("runs"), "manifest.garbage", {})
        wait_until(lambda: consumer.metrics.snapshot()["messages_dead_lettered_total"] == 2, 10, "dead letters")
        capsys.readouterr()
        assert sfx_main(["dlq", "list"]) == 0
        listing = capsys.readouterr().out
        assert "database down" in listing and "not JSON" in listing
        assert listing.count(f"queue={replayable.name} ") == 2
        broken.clear()  # the operator fixed the cause; replay puts the messages back on their queue
        assert sfx_main(["dlq", "replay"]) == 0
        wait_until(lambda: handled == ["r5"], 10, "the replayed message to be handled")
        wait_until(lambda: consumer.metrics.snapshot()["messages_dead_lettered_total"] == 3, 10, "garbage again")
    assert sfx_main(["dlq", "purge"]) == 0
    assert "purged 1" in capsys.readouterr().out
    assert dead_letters(settings) == []


@pytest.mark.slow  # a handler that works for seconds
def test_a_long_handler_does_not_starve_the_connection_heartbeat(settings: Settings) -> None:
    """With a 1 s AMQP heartbeat the broker drops a silent connection after about 2 s; the handler takes 4 s."""
    handled: list[int] = []

    def slow(result: FrameResult) -> None:
        time.sleep(4)  # stands in for heavy numpy work: the connection thread must keep beating meanwhile
        handled.append(result.frame_index)

    consumer = Consumer(Topology(settings).queue("merger.frames"), FrameResult, slow, settings=settings, heartbeat=1.0)
    with running(consumer), Publisher(settings) as publisher:
        publisher.publish(frame_result(0))
        wait_until(lambda: handled == [0], 15, "the slow handler")
        wait_until(lambda: queue_depth(settings, "merger.frames") == (0, 0), 5, "the ack")
    assert consumer.reconnects == 0
    assert consumer.metrics.snapshot()["messages_redelivered_total"] == 0


def queue_depth(settings: Settings, name: str) -> tuple[int, int]:
    """(ready, unacknowledged) messages of a queue, read from the broker."""
    output = rabbitmqctl(
        "list_queues",
        "-p",
        kombu.Connection(settings.amqp_url).virtual_host or "/",
        "name",
        "messages_ready",
        "messages_unacknowledged",
        "--no-table-headers",
        "--quiet",
    )
    for line in output.splitlines():
        parts = line.split()
        if parts and parts[0] == Topology(settings).name(name):
            return int(parts[1]), int(parts[2])
    raise AssertionError(f"queue {name} not found on the broker")


def test_a_publish_is_confirmed_or_raises(settings: Settings) -> None:
    unreachable = settings.model_copy(update={"amqp_url": "amqp://guest:guest@127.0.0.1:1//"})
    started = time.monotonic()
    with pytest.raises(PublishError, match="not confirmed"), Publisher(unreachable, retry_seconds=1.0) as publisher:
        publisher.publish(frame_result(0))
    assert time.monotonic() - started < 10  # gave up after its retry budget, with backoff in between
    with pytest.raises(PublishError, match="NOT_FOUND"), Publisher(settings) as publisher:
        publisher.publish_raw(b"{}", "no-such-exchange", "x", {})  # not retried: waiting would not help


def test_threads_may_share_a_publisher(settings: Settings) -> None:
    received: list[int] = []
    consumer = Consumer(
        Topology(settings).queue("merger.frames"),
        FrameResult,
        lambda result: received.append(result.frame_index),
        settings=settings,
    )
    with running(consumer), Publisher(settings) as shared:
        threads = [
            threading.Thread(target=lambda t=t: [shared.publish(frame_result(t * 100 + i)) for i in range(100)])
            for t in range(4)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        wait_until(lambda: len(received) >= 400, 15, "400 results")
    assert sorted(received) == list(range(400))
    assert shared.published_total == 400


def test_bus_declare_is_idempotent_and_refuses_conflicting_queues(cli_environment: Settings, capsys: Any) -> None:
    settings = cli_environment
    assert sfx_main(["bus", "declare"]) == 0
    assert sfx_main(["bus", "declare"]) == 0
    declared = capsys.readouterr().out.split()
    for name in ("runs", "jobs", "results", "control", "dlx", "dead-letters", "merger.frames", "dispatcher.runs"):
        assert declared.count(f"{settings.namespace}.{name}") == 2
    conflicting = Topology(settings.model_copy(update={"delivery_limit": settings.delivery_limit + 1}))
    with (
        connect(settings) as connection,
        pytest.raises(BusError, match=r"cannot declare queue \S*dispatcher\.runs .*PRECONDITION_FAILED"),
    ):
        conflicting.declare(connection)


@pytest.mark.slow  # a broker outage and reconnections, ~50 s
def test_broker_drops_every_connection_mid_stream(vhost_settings: Settings) -> None:
    """10,000 results; the broker closes every connection half-way with handlers in flight: all arrive, once."""
    settings = vhost_settings
    state = LiveState(settings)
    topology = Topology(settings)
    total, half, pause_after = 10_000, 5_000, 500
    vhost = settings.amqp_url.rsplit("/", 1)[1]

    lock = threading.Lock()
    handled = [0, 0]
    duplicates = [0]
    paused = [threading.Event(), threading.Event()]
    release = threading.Event()

    def make_handler(index: int) -> Callable[[FrameResult], None]:
        def handler(result: FrameResult) -> None:
            new = state.count_frame_result(result)
            with lock:
                handled[index] += 1
                duplicates[0] += not new
                count = handled[index]
            if count == pause_after:  # hold this delivery (and the prefetched ones behind it) unacked
                paused[index].set()
                release.wait(60)

        return handler

    first_half_published, connections_closed = threading.Event(), threading.Event()
    publisher_errors: list[BaseException] = []
    publisher = Publisher(settings, role="stream")

    def publish_stream() -> None:
        try:
            for start in range(0, total, 250):
                if start == half:
                    first_half_published.set()
                    connections_closed.wait(60)
                publisher.publish_many([frame_result(i) for i in range(start, start + 250)])
        except BaseException as error:
            publisher_errors.append(error)
        finally:
            publisher.close()

    consumers = [
        Consumer(topology.queue("merger.frames"), FrameResult, make_handler(i), settings=settings, name=f"c{i}")
        for i in range(2)
    ]
    with running(consumers[0]), running(consumers[1]):
        stream = threading.Thread(target=publish_stream)
        stream.start()
        for event in (paused[0], paused[1], first_half_published):
            assert event.wait(60)
        output = rabbitmqctl("close_all_connections", "-p", vhost, "test: the broker drops every connection")
        connections_closed.set()
        release.set()
        stream.join(120)
        wait_until(lambda: state.counters("r0001", "live")["frames"] == total, 90, "every frame to be counted")
        time.sleep(0.3)  # late duplicates, if any, would be counted now

    assert "Closed" in output
    assert not publisher_errors
    assert publisher.reconnects >= 1  # its connection was dropped between the halves
    assert all(consumer.reconnects >= 1 for consumer in consumers)
    assert all(consumer.error is None for consumer in consumers)
    assert state.counters("r0001", "live")["frames"] == total  # none twice in effect
    assert state.frames_seen("r0001", "live") == total  # every message arrived
    assert sum(handled) == total + duplicates[0]
    assert duplicates[0] >= 1  # the held deliveries were redelivered and recognised as already counted
    with connect(settings) as connection:
        _, remaining, _ = connection.channel().queue_declare(topology.name("merger.frames"), passive=True)
    assert remaining == 0


def test_run_service_wraps_the_handler_of_every_consumer_in_its_middleware(settings: Settings) -> None:
    """The middleware given to run_service, not what the consumers were built with, wraps each handler."""
    events: list[tuple[str, str]] = []  # (what happened, message type), in order
    lock = threading.Lock()

    def recording(call: HandlerCall) -> HandlerCall:
        def recorded(message: Message, delivery: Delivery) -> None:
            with lock:
                events.append(("entered", message.type_name))
            call(message, delivery)
            with lock:
                events.append(("left", message.type_name))

        return recorded

    def handler(message: Message) -> None:
        with lock:
            events.append(("handled", message.type_name))

    topology = Topology(settings)
    consumers = [
        Consumer(topology.queue("dispatcher.runs"), RunManifest, handler, settings=settings, name="runs"),
        Consumer(
            topology.queue("merger.frames"), FrameResult, handler, settings=settings, name="frames", middleware=()
        ),
    ]
    stopping = threading.Event()
    exit_status: list[int] = []
    service = threading.Thread(
        target=lambda: exit_status.append(
            run_service(
                "middleware-test",
                consumers,
                middleware=[*STANDARD_MIDDLEWARE, recording],
                settings=settings,
                stopping=stopping,
            )
        )
    )
    service.start()
    try:
        wait_until(lambda: all(consumer.consuming.is_set() for consumer in consumers), 10, "both consumers")
        with pytest.raises(BusError, match="already running"):
            consumers[0].use_middleware([])  # the chain is fixed once a consumer runs
        with Publisher(settings) as publisher:
            publisher.publish(RunManifest(run_id="r3", files=["/data/r3.h5"], file_format="nxmx"))
            publisher.publish(frame_result(0))
        wait_until(lambda: len(events) == 6, 10, "both messages through the middleware and the handler")
    finally:
        stopping.set()
        service.join(30)

    for type_name in ("run_manifest", "frame_result"):
        assert [what for what, kind in events if kind == type_name] == ["entered", "handled", "left"]
    for consumer in consumers:  # the standard pair came with run_service's list too
        assert consumer.metrics.snapshot()["messages_handled_total"] == 1
    assert exit_status == [0]


@pytest.mark.slow  # outages of seconds, ~7 s
def test_a_publisher_waits_out_a_broker_outage_as_long_as_its_setting_allows(settings: Settings) -> None:
    """Analysis ranks and services publish through a broker that goes away: they wait, bounded by a setting."""
    with relay_for(settings.amqp_url) as relay:
        through = settings.model_copy(update={"amqp_url": relay.url(settings.amqp_url), "broker_outage_seconds": 30})
        with Publisher(through) as publisher:
            publisher.publish(frame_result(0))
            relay.cut()
            threading.Timer(3.0, relay.restore).start()
            started = time.monotonic()
            publisher.publish(frame_result(1))  # blocks until the broker is back, then is confirmed
            assert time.monotonic() - started >= 2.5
            assert publisher.reconnects >= 1
        impatient = through.model_copy(update={"broker_outage_seconds": 1.0})
        relay.cut()
        with pytest.raises(PublishError, match=r"within 1\.0 s"), Publisher(impatient) as publisher:
            publisher.publish(frame_result(2))
    wait_until(lambda: queue_depth(settings, "merger.frames")[0] == 2, 10, "both confirmed results queued")


def test_a_message_its_handler_refuses_as_invalid_is_dead_lettered_on_first_delivery(
    settings: Settings, scratch_queues: list[kombu.Queue]
) -> None:
    queue = Topology(settings).work_queue("refusing", "runs", ["manifest.#"])
    scratch_queues.append(queue)
    calls: list[str] = []

    def refuses(manifest: RunManifest) -> None:
        calls.append(manifest.run_id)
        raise MessageError(f"run {manifest.run_id} names a frame beyond its end")

    consumer = Consumer(queue, RunManifest, refuses, settings=settings)
    with running(consumer), Publisher(settings) as publisher:
        publisher.publish(RunManifest(run_id="r3", files=["/data/r3.h5"], file_format="nxmx"))
        wait_until(lambda: consumer.metrics.snapshot()["messages_dead_lettered_total"] == 1, 10, "a dead letter")
    assert calls == ["r3"], "retried although the message itself is at fault"
    (letter,) = dead_letters(settings)
    assert "beyond its end" in letter.headers[HEADER_ERROR]


@pytest.mark.slow  # publishers held back by a full queue, ~7 s
def test_a_full_queue_slows_its_publishers_and_drops_nothing(settings: Settings) -> None:
    """More results than the queue may hold, published while nobody consumes: the publisher waits, then all arrive."""
    settings = settings.model_copy(update={"queue_max_messages": 100})
    topology = Topology(settings)
    with connect(settings) as connection:
        topology.delete(connection)  # declared by the fixture with the default bound; this namespace gets 100
        topology.declare(connection)
    handled: list[int] = []
    publishing_done = threading.Event()
    consumer = Consumer(
        topology.queue("merger.frames"), FrameResult, lambda r: handled.append(r.frame_index), settings=settings
    )

    def publish_all() -> None:
        with Publisher(settings) as publisher:
            for start in range(0, 300, 50):
                publisher.publish_many([frame_result(i) for i in range(start, start + 50)])
        publishing_done.set()

    publishing = threading.Thread(target=publish_all)
    publishing.start()
    wait_until(lambda: queue_depth(settings, "merger.frames")[0] >= 100, 30, "the queue to fill")
    assert not publishing_done.is_set(), "the publisher did not wait for room"
    # Bounded: a quorum queue checks its limit against committed messages, so a pipelined batch of 50 that was in
    # flight when it filled may overshoot it, never more.
    assert 100 <= queue_depth(settings, "merger.frames")[0] <= 100 + 50
    with running(consumer):
        wait_until(publishing_done.is_set, 60, "every publish confirmed once there was room")
        wait_until(lambda: len(set(handled)) == 300, 30, "every result handled")
    publishing.join()
    assert sorted(set(handled)) == list(range(300))
