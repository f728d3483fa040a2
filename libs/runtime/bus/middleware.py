"""Cross-cutting behaviour around message handlers: a middleware wraps the call of the handler.

A consumer builds its chain from a list of middleware, the first one outermost: with ``[a, b]`` a delivery runs
``a(b(handler))``. Which middleware a service's consumers get is chosen where the service is assembled
(``run_service(..., middleware=...)`` in ``services/<name>/__main__.py``); :data:`STANDARD_MIDDLEWARE` is the default.

A handler receives only the message; one that needs to know how it arrived (who sent it, for instance) calls
:func:`current_delivery`, which :func:`delivery_context_middleware` (part of the standard list) keeps up to date.
"""

from __future__ import annotations

import threading
import time
import traceback
from collections.abc import Callable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import structlog

from libs.contracts.messages import Message
from libs.runtime.logging import get_logger

if TYPE_CHECKING:
    from libs.runtime.metrics import ServiceMetrics

log = get_logger("libs.runtime.bus")  # one logger name for the whole bus, as when it was one module


class ConsumerMetrics:
    """Counters of one consumer (Prometheus-style names); thread-safe.

    They feed the service's heartbeat. :meth:`export_to` also forwards the outcomes the consumer decides after the
    handler (retried, dead-lettered, invalid) to the service's Prometheus metrics, where
    :func:`prometheus_middleware` counts the rest.
    """

    NAMES: ClassVar[tuple[str, ...]] = (
        "messages_handled_total",
        "messages_failed_total",
        "messages_invalid_total",
        "messages_dead_lettered_total",
        "messages_redelivered_total",
        "messages_retried_total",
        "handler_seconds_total",
    )

    # The counters the consumer itself adds, and the outcome label each one is exported as.
    EXPORTED_OUTCOMES: ClassVar[dict[str, str]] = {
        "messages_retried_total": "retried",
        "messages_dead_lettered_total": "dead_lettered",
        "messages_invalid_total": "invalid",
    }

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values = dict.fromkeys(self.NAMES, 0.0)
        self.exporter: ServiceMetrics | None = None
        self.queue_label = ""

    def export_to(self, exporter: ServiceMetrics, queue_label: str) -> None:
        """Count into ``exporter`` too, as queue ``queue_label`` (run_service does this for each consumer)."""
        self.exporter = exporter
        self.queue_label = queue_label

    def add(self, name: str, amount: float = 1.0) -> None:
        with self._lock:
            self._values[name] += amount
        outcome = self.EXPORTED_OUTCOMES.get(name)
        if outcome is not None and self.exporter is not None:
            self.exporter.count_message(self.queue_label, outcome)

    def snapshot(self) -> dict[str, float]:
        with self._lock:
            return dict(self._values)


@dataclass(frozen=True)
class Delivery:
    """How a message arrived: handed to middleware next to the decoded message."""

    queue: str
    exchange: str
    routing_key: str
    redelivered: bool
    delivery_count: int  # earlier deliveries of this message that were not acked (quorum queues' x-delivery-count)
    headers: Mapping[str, Any]
    # The counters of the consumer that received the message: one middleware list serves every consumer of a service,
    # so a counting middleware finds the consumer's own counters here.
    metrics: ConsumerMetrics
    # The AMQP user_id property. RabbitMQ refuses a message whose user_id is not the login of the connection that
    # published it, so it names the broker user who sent it; None when the publisher did not set it.
    user_id: str | None = None


HandlerCall = Callable[[Message, Delivery], None]
Middleware = Callable[[HandlerCall], HandlerCall]
"""A middleware takes the next call in the chain and returns a call that wraps it."""


_current_delivery: ContextVar[Delivery | None] = ContextVar("sfx_current_delivery", default=None)


def current_delivery() -> Delivery | None:
    """The delivery whose handler is running in this thread; None outside a handler (or without the middleware)."""
    return _current_delivery.get()


def delivery_context_middleware(call: HandlerCall) -> HandlerCall:
    """Make the delivery available to the handler through :func:`current_delivery` while it runs."""

    def with_context(message: Message, delivery: Delivery) -> None:
        token = _current_delivery.set(delivery)
        try:
            call(message, delivery)
        finally:
            _current_delivery.reset(token)

    return with_context


def logging_middleware(call: HandlerCall) -> HandlerCall:
    """Bind the queue, message type and message ids to every log line of the handler; log a failure once."""

    def logged(message: Message, delivery: Delivery) -> None:
        context: dict[str, Any] = {
            "queue": delivery.queue,
            "message_type": message.type_name,
            "delivery_count": delivery.delivery_count,
        }
        for attribute in ("run_id", "trial", "frame_index", "job_id", "dataset_id"):
            if hasattr(message, attribute):
                context[attribute] = getattr(message, attribute)
        if delivery.user_id is not None:
            context["user_id"] = delivery.user_id  # the broker-checked sender, for the audit trail
        with structlog.contextvars.bound_contextvars(**context):
            try:
                call(message, delivery)
            except Exception as error:
                log.warning("handler failed", error=repr(error), traceback=traceback.format_exc(limit=8))
                raise

    return logged


def metrics_middleware(call: HandlerCall) -> HandlerCall:
    """Count handled, failed and redelivered messages and the time spent in the handler (``delivery.metrics``)."""

    def measured(message: Message, delivery: Delivery) -> None:
        metrics = delivery.metrics
        if delivery.redelivered:
            metrics.add("messages_redelivered_total")
        started = time.perf_counter()
        try:
            call(message, delivery)
        except Exception:
            metrics.add("messages_failed_total")
            raise
        else:
            metrics.add("messages_handled_total")
        finally:
            metrics.add("handler_seconds_total", time.perf_counter() - started)

    return measured


def prometheus_middleware(call: HandlerCall) -> HandlerCall:
    """Count consumed and acked messages and observe the handler time in the service's Prometheus metrics.

    The metrics are the ones the consumer exports to (``delivery.metrics.exporter``, set by run_service); a consumer
    run outside a service has none, and this middleware then only calls through. A handler that raises is counted
    by the consumer once it has decided what to do with the message (retried, dead-lettered or invalid).
    """

    def exported(message: Message, delivery: Delivery) -> None:
        exporter = delivery.metrics.exporter
        if exporter is None:
            call(message, delivery)
            return
        queue = delivery.metrics.queue_label
        exporter.messages_consumed.labels(exporter.service, queue).inc()
        started = time.perf_counter()
        try:
            call(message, delivery)
        finally:
            exporter.handler_seconds.labels(exporter.service, queue).observe(time.perf_counter() - started)
        exporter.count_message(queue, "acked")

    return exported


STANDARD_MIDDLEWARE: tuple[Middleware, ...] = (delivery_context_middleware, logging_middleware, metrics_middleware)
"""The middleware of a consumer unless it is given others: the delivery context and the log context outermost, then
the counters."""
