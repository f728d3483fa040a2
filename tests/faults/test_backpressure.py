"""Results published much faster than the merger consumes them: the queue stays at its bound (reject-publish), the
publisher is slowed instead of the broker growing, and every result is counted exactly once."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from libs.contracts.messages import RunManifest
from libs.runtime.bus import Publisher, Topology
from libs.simulator.results import make_frame_result
from tests.faults.support import CELL, SPACE_GROUP, Row, audit_journal, private_redis
from tests.support.harness import Services
from tests.support.namespace import rabbitmqctl

# 100,000 would take about 5 minutes on this 2-core machine (the merger journals and fsyncs each result: measured
# 350 results/s); 50,000 keeps the scenario under 3 minutes. FAULTS_RESULTS overrides the count.
RESULTS = int(os.environ.get("FAULTS_RESULTS", "50000"))
PUBLISH_BATCH = 500
QUEUE_BOUND = 1000
BROKER_QUEUE_MEMORY_LIMIT = 64 * 1024 * 1024
RUN = "run_flood"


class QueueWatch:
    """Samples the merger queue's length (often) and the broker's memory for it (rabbitmqctl, every few seconds)."""

    def __init__(self, services: Services) -> None:
        self.services = services
        self.name = Topology(services.settings).name("merger.frames")
        self.most_ready = 0  # messages waiting for a consumer (what x-max-length bounds)
        self.most_messages = 0  # ready + delivered but not yet acked (at most the merger's prefetch more)
        self.most_memory = 0
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._depth, daemon=True), threading.Thread(target=self._memory)]

    def __enter__(self) -> QueueWatch:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()

    def _depth(self) -> None:
        while not self._stop.wait(0.2):
            self.most_ready = max(self.most_ready, self.services.queue_depth("merger.frames"))

    def _memory(self) -> None:
        while not self._stop.wait(2.0):
            for line in rabbitmqctl(
                "list_queues", "-q", "--no-table-headers", "name", "messages", "memory"
            ).splitlines():
                fields = line.split()
                if fields and fields[0] == self.name:
                    self.most_messages = max(self.most_messages, int(fields[1]))
                    self.most_memory = max(self.most_memory, int(fields[2]))


def test_a_flood_of_results_is_bounded_and_counted_once(tmp_path: Path, record_row: Callable[[Row], None]) -> None:
    with (
        private_redis(tmp_path) as server,
        Services(
            tmp_path / "pipeline", ("merger",), redis_url=server.url, queue_max_messages=QUEUE_BOUND, metrics_port=0
        ) as services,
    ):
        manifest = RunManifest(
            run_id=RUN,
            files=["flood.h5"],
            file_format="nxmx",
            frame_count=RESULTS,
            sample="flood",
            cell=CELL,
            space_group=SPACE_GROUP,
            live=False,
        )
        services.state.save_run(manifest)
        started = time.monotonic()
        with QueueWatch(services) as watch, Publisher(services.settings, role="test-flood") as publisher:
            for start in range(0, RESULTS, PUBLISH_BATCH):
                batch = [make_frame_result(i, run_id=RUN) for i in range(start, min(start + PUBLISH_BATCH, RESULTS))]
                publisher.publish_many(batch)
            published = time.monotonic()
            counted = services.wait_for(
                lambda: int(services.state.counters(RUN, "live").get("frames", 0)) >= RESULTS,
                timeout=600,
                what=f"all {RESULTS} results counted",
            )
            done = time.monotonic()
        assert counted
        journals = list((services.work_dir / "merger").glob("*/live/results.jsonl"))
        assert len(journals) == 1, journals
        result = audit_journal(journals[0], RESULTS, run_id=RUN)
        print(
            f"{RESULTS} results: published in {published - started:.1f} s, all counted after {done - started:.1f} s "
            f"({RESULTS / (done - started):.0f}/s); queue at most {watch.most_ready} ready, {watch.most_messages} "
            f"with unacked (bound {QUEUE_BOUND}), broker memory for it at most {watch.most_memory / 1e6:.1f} MB"
        )
        record_row(
            Row(
                f"{RESULTS} results flood the merger (queue bound {QUEUE_BOUND}: at most {watch.most_ready} ready, "
                f"{watch.most_messages} with unacked, broker {watch.most_memory / 1e6:.1f} MB)",
                RESULTS,
                result.merged,
                result.error_records,
                result.duplicates,
                result.lost,
                "n/a (no MTZ)",
                done - published,
            )
        )
        # A quorum queue applies its bound as the leader sees each enqueue: a batch already on its way may land past
        # it (measured: under 10 %), never more than one publish batch.
        assert watch.most_ready <= QUEUE_BOUND + PUBLISH_BATCH
        assert watch.most_messages <= QUEUE_BOUND + PUBLISH_BATCH + services.settings.prefetch
        assert watch.most_memory < BROKER_QUEUE_MEMORY_LIMIT
        assert published - started > 0.5 * (done - started), "the publisher was not slowed to the merger's pace"
        assert (result.duplicates, result.lost) == (0, 0)
        assert services.state.counters(RUN, "live")["frames"] == RESULTS
