"""Prometheus metrics and health endpoints of the services, on the real broker and Redis.

The merger runs in this process through run_service (as its ``__main__`` assembles it) and is scraped over HTTP
while messages flow; a service behind a TCP relay to the broker reports not ready while the relay is cut; the
dispatcher and merger processes started as ``sfx up`` starts them serve their own ports.
"""

from __future__ import annotations

import json
import random
import socket
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from libs.contracts.messages import CancelRequest, RunManifest
from libs.contracts.settings import Settings
from libs.runtime.bus import STANDARD_MIDDLEWARE, Consumer, Publisher, Topology
from libs.runtime.bus.middleware import prometheus_middleware
from libs.runtime.health import PORT_OFFSETS, metrics_port
from libs.runtime.service import PeriodicTask, run_service
from libs.runtime.state import LiveState
from services.merger.service import Merger, make_consumer
from tests.support.faults import relay_for
from tests.support.harness import Services
from tests.support.merging_data import synthetic_run
from tests.support.waiting import wait_for

FRAMES = 12
CELL = (79.1, 79.1, 38.0, 90.0, 90.0, 90.0)


def free_port_base(span: int = 3) -> int:
    """A port p with p … p+span-1 free on this host now (each service adds its offset to the base)."""
    for _ in range(200):
        base = random.randint(20_000, 60_000)
        sockets = []
        try:
            for port in range(base, base + span):
                listener = socket.socket()
                sockets.append(listener)
                listener.bind(("", port))
            return base
        except OSError:
            continue
        finally:
            for listener in sockets:
                listener.close()
    raise RuntimeError("no free ports")


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def scrape(port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of /metrics as (name, labels) -> value."""
    status, text = get(port, "/metrics")
    assert status == 200
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    """The sample ``name`` with exactly ``labels``; 0 when it has not been counted yet."""
    return samples.get((name, frozenset(labels.items())), 0.0)


@contextmanager
def running_service(
    name: str, consumers: list[Consumer], tasks: list[PeriodicTask], settings: Settings
) -> Iterator[int]:
    """run_service in a thread, with the Prometheus middleware; yields the port of its endpoint."""
    stopping = threading.Event()
    exit_status: list[int] = []
    service = threading.Thread(
        target=lambda: exit_status.append(
            run_service(
                name,
                consumers,
                tasks,
                middleware=[*STANDARD_MIDDLEWARE, prometheus_middleware],
                settings=settings,
                stopping=stopping,
            )
        ),
        daemon=True,
    )
    service.start()
    port = metrics_port(name, settings)
    assert port is not None
    try:
        wait_for(lambda: all(c.consuming.is_set() for c in consumers), 20, "the consumers")
        wait_for(lambda: _answers(port), 10, "the health endpoint")
        yield port
    finally:
        stopping.set()
        service.join(30)
    assert exit_status == [0]


def _answers(port: int) -> bool:
    try:
        return get(port, "/healthz")[0] == 200
    except OSError:
        return False


def announce(state: LiveState, run_id: str) -> None:
    state.save_run(
        RunManifest(
            run_id=run_id,
            files=[f"/data/{run_id}.h5"],
            file_format="nxmx",
            frame_count=FRAMES,
            cell=CELL,
            space_group="P 43 21 2",
        )
    )


def test_each_service_has_its_own_port_and_zero_disables_them(settings: Settings) -> None:
    base = settings.model_copy(update={"metrics_port": 9100})
    assert [metrics_port(name, base) for name in ("ingest", "dispatcher", "merger")] == [9100, 9101, 9102]
    assert len(set(PORT_OFFSETS.values())) == len(PORT_OFFSETS)
    assert metrics_port("merger", settings.model_copy(update={"metrics_port": 0})) is None


def test_merger_counts_messages_frames_and_poison_while_messages_flow(settings: Settings, tmp_path: Path) -> None:
    settings = settings.model_copy(update={"work_dir": tmp_path, "metrics_port": free_port_base()})
    state = LiveState(settings)
    announce(state, "r1")
    merger = Merger(settings)
    results = [
        frame.model_copy(update={"run_id": "r1", "trial": "live"})
        for frame in synthetic_run(FRAMES, seed=1, per_frame=100).frames
    ]
    forged = json.loads(results[0].encode())
    forged["frame_index"] = 2**32 - 1  # beyond any run: refused at the boundary, invalid
    tasks = [PeriodicTask("merge-updates", 0.2, merger.tick)]
    with running_service("merger", [make_consumer(merger, settings)], tasks, settings) as port:
        before = scrape(port)
        assert value(before, "sfx_messages_consumed_total", service="merger", queue="merger.frames") == 0
        with Publisher(settings) as publisher:
            publisher.publish_many(results)
            topology = Topology(settings)
            publisher.publish_raw(json.dumps(forged).encode(), topology.exchanges["results"].name, "frame.r1.live", {})
            publisher.publish_raw(b"{not json", topology.exchanges["results"].name, "frame.r1.live", {})

        def settled() -> dict[Any, float] | None:
            samples = scrape(port)
            outcomes = sum(
                value(samples, "sfx_message_outcomes_total", service="merger", queue="merger.frames", outcome=o)
                for o in ("acked", "dead_lettered")  # counted once the dead letter is confirmed, after "invalid"
            )
            return samples if outcomes == FRAMES + 2 else None

        samples = wait_for(settled, 30, "every message acked or refused")
        queue = {"service": "merger", "queue": "merger.frames"}
        assert value(samples, "sfx_messages_consumed_total", **queue) == FRAMES  # the two refused never decoded
        assert value(samples, "sfx_message_outcomes_total", **queue, outcome="acked") == FRAMES
        assert value(samples, "sfx_message_outcomes_total", **queue, outcome="invalid") == 2
        assert value(samples, "sfx_message_outcomes_total", **queue, outcome="dead_lettered") == 2
        assert value(samples, "sfx_message_outcomes_total", **queue, outcome="retried") == 0
        assert value(samples, "sfx_handler_seconds_count", **queue) == FRAMES

        live = {"service": "merger", "trial_kind": "live"}
        assert value(samples, "sfx_frames_analysed_total", **live) == FRAMES
        assert value(samples, "sfx_frames_hit_total", **live) == sum(r.hit for r in results)
        assert value(samples, "sfx_frames_indexed_total", **live) == sum(r.indexed for r in results)
        assert value(samples, "sfx_frames_failed_total", **live) == sum(r.error is not None for r in results)

        # A redelivered result is not counted again (the merger's journal already holds it).
        with Publisher(settings) as publisher:
            publisher.publish(results[0])
        wait_for(
            lambda: value(scrape(port), "sfx_message_outcomes_total", **queue, outcome="acked") == FRAMES + 1,
            30,
            "the repeated result acked",
        )

        def merged() -> dict[Any, float] | None:
            samples = scrape(port)
            updates = value(samples, "sfx_merge_update_seconds_count", service="merger", kind="incremental")
            return samples if updates >= 1 else None

        later = wait_for(merged, 30, "a merge update")
        assert value(later, "sfx_frames_analysed_total", **live) == FRAMES
        assert value(later, "sfx_merge_datasets", service="merger") == 1

        status, body = get(port, "/healthz")
        assert (status, json.loads(body)["status"]) == (200, "ok")
        status, body = get(port, "/readyz")
        assert (status, json.loads(body)["status"]) == (200, "ok")
        assert get(port, "/nothing")[0] == 404


def test_readyz_names_the_broker_while_it_is_cut_and_recovers(settings: Settings) -> None:
    with relay_for(settings.amqp_url) as relay:
        relayed = settings.model_copy(
            update={"amqp_url": relay.url(settings.amqp_url), "metrics_port": free_port_base(1)}
        )
        consumer = Consumer(
            Topology(relayed).queue("dispatcher.control"), CancelRequest, lambda _: None, settings=relayed, name="c"
        )
        with running_service("relay-test", [consumer], [], relayed) as port:
            assert get(port, "/readyz")[0] == 200
            relay.cut()
            status, body = get(port, "/readyz")
            answer = json.loads(body)
            assert status == 503 and answer["status"] == "unready"
            assert [problem.split()[0] for problem in answer["problems"]] == ["broker"]  # Redis is fine
            assert get(port, "/healthz")[0] == 200  # the service itself is alive, waiting for the broker
            wait_for(
                lambda: value(scrape(port), "sfx_consumer_reconnects_total", service="relay-test", role="c") >= 1,
                20,
                "the consumer's reconnect counted",
            )
            relay.restore()
            wait_for(lambda: get(port, "/readyz")[0] == 200, 20, "ready again after the restore")
            wait_for(consumer.consuming.is_set, 30, "the consumer back")


@pytest.mark.slow
def test_dispatcher_and_merger_processes_serve_metrics_and_health(tmp_path: Path) -> None:
    base = free_port_base()
    with Services(tmp_path, ("dispatcher", "merger"), metrics_port=base, job_retry_backoff_seconds=600) as services:
        dispatcher_port = base + PORT_OFFSETS["dispatcher"]
        merger_port = base + PORT_OFFSETS["merger"]
        services.wait_for(lambda: _answers(dispatcher_port) and _answers(merger_port), 60, what="both endpoints")
        assert json.loads(get(merger_port, "/readyz")[1])["service"] == "merger"

        # A live run of 40 frames written, none analysed: the dispatcher queues its job and reports the lag.
        manifest = RunManifest(
            run_id="lagging",
            files=[str(tmp_path / "nowhere.h5")],
            file_format="nxmx",
            frame_count=40,
            live=True,
            cell=CELL,
            space_group="P 43 21 2",
        )
        services.state.save_run(manifest)
        services.publish(manifest, CancelRequest(job_id="unknown.job"))

        def dispatcher_samples() -> dict[Any, float] | None:
            samples = scrape(dispatcher_port)
            handled = sum(
                value(samples, "sfx_message_outcomes_total", service="dispatcher", queue=queue, outcome="acked")
                for queue in ("dispatcher.runs", "dispatcher.control")
            )
            ready = ("sfx_queue_depth_messages", frozenset({("service", "dispatcher"), ("queue", "merger.frames")}))
            lagging = value(samples, "sfx_live_lag_frames", service="dispatcher") == 40
            return samples if handled == 2 and ready in samples and lagging else None

        samples = services.wait_for(dispatcher_samples, 60, what="the dispatcher's metrics")
        assert value(samples, "sfx_slots_reserved", service="dispatcher") == services.settings.reservation_nodes * (
            services.settings.ranks_per_node
        )
        tracked = sum(value(samples, "sfx_jobs", service="dispatcher", status=s) for s in ("queued", "running"))
        assert tracked == 1
        assert get(dispatcher_port, "/healthz")[0] == 200
        assert get(merger_port, "/healthz")[0] == 200
