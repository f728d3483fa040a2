"""Prometheus metrics of a service: the metric objects, in a registry of the service's own.

Conventions: base units (seconds), counters end in ``_total``, histograms of durations in ``_seconds``, and labels
of low cardinality only (service, queue, outcome, role, status, trial kind): never a run, frame or job id, which
would make a new time series per run. Rates (frames/s, messages/s) are ``rate()`` of the counters in PromQL.

:func:`libs.runtime.service.run_service` makes one :class:`ServiceMetrics` per service and installs it as the
process's :func:`current` one, so that code without a reference to the service (the bus's reconnect counters, the
gauges a service sets) reaches it. Before any is installed, :func:`current` is a detached instance: counting into it
is harmless (unit tests build a Dispatcher or a Publisher without a service around it). Each instance has its own
``CollectorRegistry`` (never prometheus_client's global one), so tests may make several in one process.

The runtime owns this module; algorithms never import it (``make lint``'s import contracts).
"""

from __future__ import annotations

import threading

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import generate_latest

MESSAGE_OUTCOMES = ("acked", "retried", "dead_lettered", "invalid")
"""Outcomes of a consumed message: ``dead_lettered`` counts every message sent to the dead-letter exchange,
``invalid`` the ones among them refused because the message itself is wrong (so invalid ⊂ dead_lettered)."""

TRIAL_KINDS = ("live", "reprocess")

# Handler times range from a Redis increment (~0.1 ms) to a frame result with reflections journalled (~100 ms).
HANDLER_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# A merge update is milliseconds to seconds; a final merge (full re-scaling, MTZ files) may take minutes.
MERGE_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)


def trial_kind(trial: str) -> str:
    """``live`` for the live trial, ``reprocess`` for every other (trial names are free text: not a label)."""
    return "live" if trial == "live" else "reprocess"


class ServiceMetrics:
    """Every metric of one service instance, registered in its own registry."""

    def __init__(self, service: str) -> None:
        self.service = service
        self.registry = CollectorRegistry(auto_describe=True)
        registry = self.registry

        # -- consumers (prometheus_middleware and the consumer's own counters) --
        self.messages_consumed = Counter(
            "sfx_messages_consumed",
            "Valid messages handed to a handler",
            ["service", "queue"],
            registry=registry,
        )
        self.message_outcomes = Counter(
            "sfx_message_outcomes",
            "What became of consumed messages: acked after the handler, retried later, dead-lettered, invalid",
            ["service", "queue", "outcome"],
            registry=registry,
        )
        self.handler_seconds = Histogram(
            "sfx_handler_seconds",
            "Time in the message handler (middleware included)",
            ["service", "queue"],
            buckets=HANDLER_BUCKETS,
            registry=registry,
        )
        self.publisher_reconnects = Counter(
            "sfx_publisher_reconnects",
            "Publishes that lost or could not open their broker connection and tried again",
            ["service", "role"],
            registry=registry,
        )
        self.consumer_reconnects = Counter(
            "sfx_consumer_reconnects",
            "Consumer connections lost and opened again",
            ["service", "role"],
            registry=registry,
        )

        # -- frames (exported by the merger from the FrameResults it consumes) --
        frame_labels = ["service", "trial_kind"]
        self.frames_analysed = Counter(
            "sfx_frames_analysed", "Frames whose result reached the merger (once each)", frame_labels, registry=registry
        )
        self.frames_hit = Counter("sfx_frames_hit", "Frames found to be hits", frame_labels, registry=registry)
        self.frames_indexed = Counter("sfx_frames_indexed", "Frames indexed", frame_labels, registry=registry)
        self.frames_failed = Counter(
            "sfx_frames_failed", "Frames the analysis could not process", frame_labels, registry=registry
        )
        self.live_lag_frames = Gauge(
            "sfx_live_lag_frames",
            "Frames written but not yet analysed, summed over the live runs the dispatcher has a live job for",
            ["service"],
            registry=registry,
        )

        # -- merging --
        self.merge_update_seconds = Histogram(
            "sfx_merge_update_seconds",
            "Time to merge one dataset's new frames into an update (incremental) or to finalise it (final)",
            ["service", "kind"],
            buckets=MERGE_BUCKETS,
            registry=registry,
        )
        self.merge_datasets = Gauge("sfx_merge_datasets", "Datasets the merger holds", ["service"], registry=registry)

        # -- broker and dispatcher --
        self.queue_depth = Gauge(
            "sfx_queue_depth_messages",
            "Messages ready in a queue, not yet delivered (passive declare every few seconds)",
            ["service", "queue"],
            registry=registry,
        )
        self.jobs = Gauge(
            "sfx_jobs",
            "Jobs the dispatcher tracks (not yet ended), by status",
            ["service", "status"],
            registry=registry,
        )
        self.slots_in_use = Gauge("sfx_slots_in_use", "Slots (MPI ranks) held by jobs", ["service"], registry=registry)
        self.slots_reserved = Gauge(
            "sfx_slots_reserved", "Slots of the experiment's reservation", ["service"], registry=registry
        )
        self.slots_burst = Gauge(
            "sfx_slots_burst", "Slots live runs may use beyond the reservation", ["service"], registry=registry
        )
        self.slots_burst_in_use = Gauge(
            "sfx_slots_burst_in_use", "Slots in use beyond the reservation", ["service"], registry=registry
        )

    # -- helpers that keep the service label in one place --------------------------------------------------------

    def count_message(self, queue: str, outcome: str) -> None:
        self.message_outcomes.labels(self.service, queue, outcome).inc()

    def count_frame(self, trial: str, *, hit: bool, indexed: bool, failed: bool) -> None:
        kind = trial_kind(trial)
        self.frames_analysed.labels(self.service, kind).inc()
        if hit:
            self.frames_hit.labels(self.service, kind).inc()
        if indexed:
            self.frames_indexed.labels(self.service, kind).inc()
        if failed:
            self.frames_failed.labels(self.service, kind).inc()

    def exposition(self) -> bytes:
        """The registry in Prometheus's text format."""
        return generate_latest(self.registry)


_lock = threading.Lock()
_installed: list[ServiceMetrics] = []  # a stack: a service started inside another (tests) and stopped restores it
_detached: ServiceMetrics | None = None


def install(metrics: ServiceMetrics) -> None:
    """Make ``metrics`` the process's current service metrics (run_service does, for the service it runs)."""
    with _lock:
        _installed.append(metrics)


def uninstall(metrics: ServiceMetrics) -> None:
    with _lock:
        if metrics in _installed:
            _installed.remove(metrics)


def current() -> ServiceMetrics:
    """The metrics of the service running in this process (the latest started when several are); detached if none.

    A process runs one service in production; tests that run several in one process share the reconnect counters
    and service gauges with the latest one started.
    """
    global _detached
    with _lock:
        if _installed:
            return _installed[-1]
        if _detached is None:
            _detached = ServiceMetrics("none")
        return _detached


def count_publisher_reconnect(role: str) -> None:
    """Called by :class:`libs.runtime.bus.Publisher` on every reconnect."""
    metrics = current()
    metrics.publisher_reconnects.labels(metrics.service, role).inc()


def count_consumer_reconnect(role: str) -> None:
    """Called by :class:`libs.runtime.bus.Consumer` on every reconnect."""
    metrics = current()
    metrics.consumer_reconnects.labels(metrics.service, role).inc()
