"""The bus: the whole RabbitMQ topology declared here, a confirming publisher and a validating consumer (kombu, pyamqp).

Topology, for a namespace ``ns`` (``settings.namespace``, default ``sfx``):

- topic exchanges ``ns.runs`` (run manifests), ``ns.jobs`` (job specs), ``ns.results`` (frame results, job states,
  merge updates) and ``ns.control`` (reprocess and cancel requests,
  service heartbeats);
- the dead-letter exchange ``ns.dlx`` (topic) and its queue ``ns.dead-letters`` bound with ``#``;
- durable quorum queues (see ``SERVICE_QUEUES``) with ``x-delivery-limit`` = ``settings.delivery_limit`` and
  ``x-dead-letter-exchange`` = ``ns.dlx``: the broker counts returns of a message (``x-delivery-count``) and
  dead-letters it when it is returned once more after ``delivery_limit`` redeliveries (RabbitMQ 3.10: at most
  ``delivery_limit + 1`` deliveries), so a poison message cannot loop forever.

Routing keys (every part escaped with :func:`escape_word`, so a ``.`` inside an id cannot split a word):

===============  ==============  ============================================
message          exchange        routing key
===============  ==============  ============================================
RunManifest      runs            ``manifest.<run>``
JobSpec          jobs            ``spec.<priority>.<run>.<trial>``
JobState         results         ``job.<run>.<trial>.<job>.<status>``
FrameResult      results         ``frame.<run>.<trial>``
MergeUpdate      results         ``merge.<dataset>.<trial>``
ReprocessRequest control         ``reprocess.<trial>``
CancelRequest    control         ``cancel.<job>``
ServiceHeartbeat control         ``heartbeat.<service>.<instance>``
FileRejected     control         ``rejected.<run>``
===============  ==============  ============================================

so a subscriber selects by kind, run and trial with topic patterns (``frame.r0042.*``, ``job.*.*.*.failed``, ``#``).

Publishing: :class:`Publisher` has its own connection, puts the channel in confirm mode and waits for the broker's
confirmation of every message (pipelined for batches); on a lost connection it reconnects with backoff and publishes
again whatever was not confirmed, so a publish either is confirmed or raises :class:`PublishError`. A message can
therefore arrive twice (at-least-once); every consumer must be idempotent (``libs.runtime.state`` counts once).

Consuming: :class:`Consumer` validates each delivery with :func:`libs.contracts.messages.decode_message` and runs the
handler in a worker thread while the connection's thread keeps reading the socket and sending AMQP heartbeats, so heavy
numpy work never starves the heartbeats. It acks only after the handler returned; a handler exception requeues the
message (the broker counts deliveries in ``x-delivery-count``; on the last allowed delivery the consumer dead-letters
it itself with the error); a message that fails validation is published to the dead-letter exchange with the reason in
the ``x-sfx-error`` header and acked: it never crashes the consumer and never blocks the queue. When the broker drops
the connection the consumer reconnects with backoff; unacked messages are redelivered by the broker.
"""

from __future__ import annotations

import contextlib
import os
import random
import select
import socket
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from queue import Empty, Queue
from typing import Any, ClassVar

import kombu
import structlog

from libs.contracts.messages import (
    CancelRequest,
    FileRejected,
    FrameResult,
    JobSpec,
    JobState,
    MergeUpdate,
    Message,
    MessageError,
    ReprocessRequest,
    RunManifest,
    ServiceHeartbeat,
    decode_message,
)
from libs.contracts.naming import escape_word
from libs.contracts.settings import Settings, get_settings
from libs.runtime.logging import get_logger

log = get_logger(__name__)


# ----------------------------------------------------------------------------------------------------------------
# Names and routing keys
# ----------------------------------------------------------------------------------------------------------------

EXCHANGES: tuple[str, ...] = ("runs", "jobs", "results", "control")
"""Logical names of the topic exchanges; the broker name is ``<namespace>.<logical>``."""

DEAD_LETTER_EXCHANGE = "dlx"
DEAD_LETTER_QUEUE = "dead-letters"

EXCHANGE_OF_TYPE: dict[str, str] = {
    RunManifest.type_name: "runs",
    JobSpec.type_name: "jobs",
    JobState.type_name: "results",
    FrameResult.type_name: "results",
    MergeUpdate.type_name: "results",
    ReprocessRequest.type_name: "control",
    CancelRequest.type_name: "control",
    ServiceHeartbeat.type_name: "control",
    FileRejected.type_name: "control",
}
"""Which exchange carries each message type."""

# Headers this module writes. The x-sfx-* dead-letter headers are read back by ``sfx dlq``.
HEADER_TYPE = "x-sfx-type"
HEADER_SCHEMA_VERSION = "x-sfx-schema-version"
HEADER_ERROR = "x-sfx-error"
HEADER_ORIGINAL_EXCHANGE = "x-sfx-original-exchange"
HEADER_ORIGINAL_ROUTING_KEY = "x-sfx-original-routing-key"
HEADER_ORIGINAL_QUEUE = "x-sfx-original-queue"
HEADER_DEAD_LETTERED_AT = "x-sfx-dead-lettered-at"
HEADER_REPLAYED = "x-sfx-replayed"

_MAX_ROUTING_KEY_BYTES = 255


class BusError(RuntimeError):
    """A broker problem that retrying will not fix (wrong topology, unknown exchange, key too long)."""


class PublishError(BusError):
    """A message was not confirmed by the broker within the retry budget."""


def _join(kind: str, *words: str | int) -> str:
    key = ".".join([kind, *(escape_word(word) for word in words)])
    if len(key.encode()) > _MAX_ROUTING_KEY_BYTES:
        raise BusError(f"routing key {key[:60]}... is {len(key.encode())} bytes; AMQP allows 255")
    return key


def manifest_key(run_id: str) -> str:
    """``manifest.<run>`` on the runs exchange."""
    return _join("manifest", run_id)


def job_spec_key(priority: str, run_id: str, trial: str) -> str:
    """``spec.<priority>.<run>.<trial>`` on the jobs exchange."""
    return _join("spec", priority, run_id, trial)


def job_state_key(run_id: str, trial: str, job_id: str, status: str) -> str:
    """``job.<run>.<trial>.<job>.<status>`` on the results exchange."""
    return _join("job", run_id, trial, job_id, status)


def frame_key(run_id: str, trial: str) -> str:
    """``frame.<run>.<trial>`` on the results exchange."""
    return _join("frame", run_id, trial)


def merge_key(dataset_id: str, trial: str) -> str:
    """``merge.<dataset>.<trial>`` on the results exchange."""
    return _join("merge", dataset_id, trial)


def reprocess_key(trial: str) -> str:
    """``reprocess.<trial>`` on the control exchange."""
    return _join("reprocess", trial)


def cancel_key(job_id: str) -> str:
    """``cancel.<job>`` on the control exchange."""
    return _join("cancel", job_id)


def heartbeat_key(service: str, instance: str) -> str:
    """``heartbeat.<service>.<instance>`` on the control exchange."""
    return _join("heartbeat", service, instance)


def rejected_file_key(run_id: str) -> str:
    """Routing key of a FileRejected: ``rejected.<run>``."""
    return _join("rejected", run_id)


def routing_key_for(message: Message) -> str:
    """The routing key of a message under the scheme of this module."""
    if isinstance(message, RunManifest):
        return manifest_key(message.run_id)
    if isinstance(message, JobSpec):
        return job_spec_key(message.priority.value, message.manifest.run_id, message.trial)
    if isinstance(message, JobState):
        return job_state_key(message.run_id, message.trial, message.job_id, message.status.value)
    if isinstance(message, FrameResult):
        return frame_key(message.run_id, message.trial)
    if isinstance(message, MergeUpdate):
        return merge_key(message.dataset_id, message.trial)
    if isinstance(message, ReprocessRequest):
        return reprocess_key(message.trial)
    if isinstance(message, CancelRequest):
        return cancel_key(message.job_id)
    if isinstance(message, ServiceHeartbeat):
        return heartbeat_key(message.service, message.instance)
    if isinstance(message, FileRejected):
        return rejected_file_key(message.run_id)
    raise BusError(f"no routing key is defined for message type {type(message).__name__}")


# ----------------------------------------------------------------------------------------------------------------
# Topology
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QueueSpec:
    """A durable work queue: ``<namespace>.<name>``, bound to one exchange with topic patterns."""

    name: str
    exchange: str
    binding_keys: tuple[str, ...]
    description: str


SERVICE_QUEUES: tuple[QueueSpec, ...] = (
    QueueSpec("dispatcher.runs", "runs", ("manifest.#",), "run manifests, for the dispatcher"),
    QueueSpec(
        "dispatcher.control",
        "control",
        ("reprocess.#", "cancel.#"),
        "operators' reprocess and cancel requests, for the dispatcher",
    ),
    QueueSpec("merger.frames", "results", ("frame.#", "job.#"), "frame results and job states, for the merger"),
)
"""Every durable queue of the system. A new consumer service adds its queue here, nowhere else."""


class Topology:
    """The broker objects of one namespace, as kombu entities; :meth:`declare` applies them (idempotent)."""

    def __init__(self, settings: Settings | None = None, queues: Sequence[QueueSpec] = SERVICE_QUEUES) -> None:
        self.settings = settings or get_settings()
        self.namespace = self.settings.namespace
        self.queue_specs: dict[str, QueueSpec] = {spec.name: spec for spec in queues}
        self.exchanges: dict[str, kombu.Exchange] = {
            name: kombu.Exchange(self.name(name), type="topic", durable=True) for name in EXCHANGES
        }
        self.dead_letter_exchange = kombu.Exchange(self.name(DEAD_LETTER_EXCHANGE), type="topic", durable=True)
        # The dead-letter queue has no delivery limit: listing it (get, then return) must never drop a message.
        self.dead_letter_queue = kombu.Queue(
            self.name(DEAD_LETTER_QUEUE),
            exchange=self.dead_letter_exchange,
            routing_key="#",
            durable=True,
            queue_arguments={"x-queue-type": "quorum"},
        )

    def name(self, logical: str) -> str:
        """The broker name of an exchange or queue: ``<namespace>.<logical>``."""
        return f"{self.namespace}.{logical}"

    def exchange_for(self, message: Message) -> str:
        """The broker name of the exchange that carries ``message``."""
        return self.name(EXCHANGE_OF_TYPE[message.type_name])

    def work_queue_arguments(self) -> dict[str, Any]:
        return {
            "x-queue-type": "quorum",
            "x-delivery-limit": self.settings.delivery_limit,
            "x-dead-letter-exchange": self.dead_letter_exchange.name,
        }

    def queue(self, name: str) -> kombu.Queue:
        """The kombu queue of a service queue from :data:`SERVICE_QUEUES` (by its logical name)."""
        try:
            spec = self.queue_specs[name]
        except KeyError:
            raise BusError(f"queue {name!r} is not declared; known queues: {sorted(self.queue_specs)}") from None
        return self.work_queue(spec.name, spec.exchange, spec.binding_keys)

    def work_queue(self, name: str, exchange: str, binding_keys: Iterable[str]) -> kombu.Queue:
        """A durable quorum queue ``<namespace>.<name>`` with this namespace's delivery limit and dead-lettering."""
        if exchange not in self.exchanges:
            raise BusError(f"exchange {exchange!r} is not one of {list(self.exchanges)}")
        bindings = [kombu.binding(self.exchanges[exchange], routing_key=key) for key in binding_keys]
        return kombu.Queue(
            self.name(name),
            bindings=bindings,
            durable=True,
            auto_delete=False,
            queue_arguments=self.work_queue_arguments(),
        )

    def all_queues(self) -> list[kombu.Queue]:
        return [self.queue(name) for name in self.queue_specs] + [self.dead_letter_queue]

    def declare(self, connection: kombu.Connection) -> list[str]:
        """Declare every exchange, queue and binding; returns the names declared. Safe to repeat.

        A queue that exists with other arguments (e.g. another delivery limit) makes the broker refuse with
        PRECONDITION_FAILED; this is raised as BusError naming the queue.
        """
        declared: list[str] = []
        channel = connection.channel()
        try:
            for exchange in [*self.exchanges.values(), self.dead_letter_exchange]:
                exchange.bind(channel).declare()
                declared.append(exchange.name)
            for kombu_queue in self.all_queues():
                try:
                    kombu_queue.bind(channel).declare()
                except connection.channel_errors as error:
                    raise BusError(
                        f"queue {kombu_queue.name} exists with different arguments ({error}); delete it or use the "
                        "arguments of libs/runtime/bus.py"
                    ) from error
                declared.append(kombu_queue.name)
        finally:
            with contextlib.suppress(Exception):
                channel.close()
        return declared

    def delete(self, connection: kombu.Connection) -> None:
        """Delete every queue and exchange of this namespace (tests and teardown only)."""
        channel = connection.channel()
        try:
            for kombu_queue in self.all_queues():
                channel.queue_delete(kombu_queue.name)
            for exchange in [*self.exchanges.values(), self.dead_letter_exchange]:
                channel.exchange_delete(exchange.name)
        finally:
            with contextlib.suppress(Exception):
                channel.close()


def connect(settings: Settings | None = None, *, role: str = "client", heartbeat: float = 0) -> kombu.Connection:
    """An open kombu connection to the broker, named ``sfx <role>`` in the management tools."""
    settings = settings or get_settings()
    connection = kombu.Connection(
        settings.amqp_url,
        heartbeat=heartbeat,
        connect_timeout=5,
        transport_options={"client_properties": {"connection_name": f"{settings.namespace} {role} pid={os.getpid()}"}},
    )
    connection.connect()
    return connection


def declare_topology(settings: Settings | None = None) -> list[str]:
    """Declare the whole topology of ``settings.namespace`` (what ``sfx bus declare`` runs)."""
    settings = settings or get_settings()
    with connect(settings, role="declare") as connection:
        return Topology(settings).declare(connection)


def message_headers(message: Message) -> dict[str, Any]:
    """AMQP headers of a message: its type and schema version, readable without parsing the body."""
    return {HEADER_TYPE: message.type_name, HEADER_SCHEMA_VERSION: message.schema_version}


def body_bytes(raw: Any) -> bytes:
    """The body of a received message as bytes (py-amqp decodes bodies that declare a content encoding)."""
    body = raw.body
    if isinstance(body, bytes | bytearray | memoryview):
        return bytes(body)
    return str(body).encode(getattr(raw, "content_encoding", None) or "utf-8")


class Backoff:
    """Exponential backoff with jitter: 0.1 s, 0.2 s, ... up to ``maximum``."""

    def __init__(self, start: float = 0.1, maximum: float = 5.0) -> None:
        self.start = start
        self.maximum = maximum
        self.attempt = 0

    def next_delay(self) -> float:
        delay = min(self.maximum, self.start * 2**self.attempt)
        self.attempt += 1
        return delay * random.uniform(0.75, 1.25)

    def reset(self) -> None:
        self.attempt = 0


# ----------------------------------------------------------------------------------------------------------------
# Publisher
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class Outgoing:
    """One message on its way to the broker."""

    body: bytes
    exchange: str
    routing_key: str
    headers: dict[str, Any] = field(default_factory=dict)


class Publisher:
    """Publishes with confirms on its own connection; reconnects and republishes what was not confirmed.

    Threads may share a publisher: calls are serialised by a lock (one connection carries one publish at a time;
    give a busy thread its own publisher for throughput). kombu's ``confirm_publish`` transport option would wait one
    round trip per message; this class selects confirm mode itself and waits once per window of messages, which
    gives the same guarantee at a fraction of the latency for batches.
    """

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        role: str = "publisher",
        retry_seconds: float = 60.0,
        confirm_timeout: float = 10.0,
        window: int = 1000,
    ) -> None:
        self.settings = settings or get_settings()
        self.topology = Topology(self.settings)
        self.role = role
        self.retry_seconds = retry_seconds
        self.confirm_timeout = confirm_timeout
        self.window = window
        self.reconnects = 0
        self.published_total = 0
        self._lock = threading.RLock()
        self._connection: kombu.Connection | None = None
        self._producer: kombu.Producer | None = None
        self._next_tag = 1
        self._unconfirmed: dict[int, Outgoing] = {}  # delivery tag -> message, until the broker confirms it
        self._confirmed: set[int] = set()  # ids of the messages of the current call that the broker confirmed

    # -- public API ----------------------------------------------------------------------------------------------

    def publish(self, message: Message, routing_key: str | None = None) -> None:
        """Publish one message on its exchange (key from :func:`routing_key_for` unless given); wait for confirm."""
        self.publish_many([(message, routing_key)])

    def publish_many(self, messages: Iterable[Message | tuple[Message, str | None]]) -> None:
        """Publish several messages, pipelining confirms; returns when the broker confirmed every one."""
        outgoing: list[Outgoing] = []
        for item in messages:
            message, key = item if isinstance(item, tuple) else (item, None)
            outgoing.append(
                Outgoing(
                    body=message.encode(),
                    exchange=self.topology.exchange_for(message),
                    routing_key=key if key is not None else routing_key_for(message),
                    headers=message_headers(message),
                )
            )
        self.publish_outgoing(outgoing)

    def publish_raw(self, body: bytes, exchange: str, routing_key: str, headers: Mapping[str, Any]) -> None:
        """Publish bytes as they are (dead-letter and replay tools, tests of malformed input)."""
        self.publish_outgoing([Outgoing(body, exchange, routing_key, dict(headers))])

    def publish_outgoing(self, outgoing: Sequence[Outgoing]) -> None:
        """Publish prepared messages; returns when every one is confirmed, raises PublishError when out of time."""
        with self._lock:
            self._publish_locked(outgoing)

    def _publish_locked(self, outgoing: Sequence[Outgoing]) -> None:
        pending = list(outgoing)
        self._confirmed = set()
        deadline = time.monotonic() + self.retry_seconds
        backoff = Backoff()
        retryable: tuple[type[BaseException], ...] = (_RetryableError, *self._connection_errors())
        while pending:
            try:
                self._ensure_connected()
                self._send_and_confirm(pending)
                pending = [item for item in pending if id(item) not in self._confirmed]
                if pending:  # the broker nacked some: try those again after a pause
                    raise _RetryableError(f"broker refused {len(pending)} message(s)")
            except retryable as error:
                # Keep every message not positively confirmed; a confirmed one is never sent again.
                pending = [item for item in pending if id(item) not in self._confirmed]
                self._drop_connection()
                self.reconnects += 1
                if time.monotonic() >= deadline:
                    raise PublishError(
                        f"{len(pending)} message(s) not confirmed by {self._safe_url()} within {self.retry_seconds} s: "
                        f"{error!r}"
                    ) from error
                delay = backoff.next_delay()
                log.warning("publish failed; reconnecting", role=self.role, error=repr(error), retry_in=round(delay, 2))
                time.sleep(delay)
            except Exception as error:
                self._drop_connection()
                raise PublishError(f"publishing failed: {error}") from error
        self.published_total += len(outgoing)

    def close(self) -> None:
        with self._lock:
            self._drop_connection()

    def __enter__(self) -> Publisher:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- internals -----------------------------------------------------------------------------------------------

    def _connection_errors(self) -> tuple[type[BaseException], ...]:
        base: tuple[type[BaseException], ...] = (OSError, TimeoutError)
        if self._connection is not None:
            return (*base, *self._connection.connection_errors)
        return (*base, *kombu.Connection(self.settings.amqp_url).connection_errors)

    def _safe_url(self) -> str:
        return kombu.Connection(self.settings.amqp_url).as_uri()

    def _ensure_connected(self) -> None:
        if self._connection is not None and self._connection.connected:
            return
        self._drop_connection()
        connection = connect(self.settings, role=self.role)
        channel = connection.channel()
        channel.confirm_select()
        channel.events["basic_ack"].add(self._on_ack)
        channel.events["basic_nack"].add(self._on_nack)
        self._connection = connection
        self._producer = kombu.Producer(channel)
        self._next_tag = 1
        self._unconfirmed = {}

    def _drop_connection(self) -> None:
        if self._connection is not None:
            with contextlib.suppress(Exception):
                self._connection.release()
        self._connection = None
        self._producer = None

    def _send_and_confirm(self, pending: list[Outgoing]) -> None:
        assert self._connection is not None and self._producer is not None
        for item in pending:
            while len(self._unconfirmed) >= self.window:
                self._wait_for_confirms(leave=self.window // 2)
            self._unconfirmed[self._next_tag] = item
            self._next_tag += 1
            self._producer.publish(
                item.body,
                exchange=item.exchange,
                routing_key=item.routing_key,
                headers=item.headers,
                content_type="application/json",
                content_encoding="utf-8",
                delivery_mode=2,
                timeout=self.confirm_timeout,  # a broker that stops reading (resource alarm) cannot block us forever
            )
        self._wait_for_confirms(leave=0)

    def _wait_for_confirms(self, leave: int) -> None:
        assert self._connection is not None
        deadline = time.monotonic() + self.confirm_timeout
        while len(self._unconfirmed) > leave:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise _RetryableError(f"{len(self._unconfirmed)} message(s) unconfirmed after {self.confirm_timeout} s")
            with contextlib.suppress(TimeoutError):
                self._connection.drain_events(timeout=min(remaining, 1.0))

    def _on_ack(self, delivery_tag: int, multiple: bool) -> None:
        for tag in self._settled_tags(delivery_tag, multiple):
            self._confirmed.add(id(self._unconfirmed.pop(tag)))

    def _on_nack(self, delivery_tag: int, multiple: bool, *rest: Any) -> None:
        for tag in self._settled_tags(delivery_tag, multiple):
            self._unconfirmed.pop(tag)

    def _settled_tags(self, delivery_tag: int, multiple: bool) -> list[int]:
        if not multiple:
            return [delivery_tag] if delivery_tag in self._unconfirmed else []
        tags = []
        for tag in self._unconfirmed:  # insertion order is tag order
            if tag > delivery_tag:
                break
            tags.append(tag)
        return tags


class _RetryableError(Exception):
    """Internal: a condition worth a reconnect and another try."""


# ----------------------------------------------------------------------------------------------------------------
# Consumer
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Delivery:
    """How a message arrived: handed to middleware next to the decoded message."""

    queue: str
    exchange: str
    routing_key: str
    redelivered: bool
    delivery_count: int  # earlier deliveries of this message that were not acked (quorum queues' x-delivery-count)
    headers: Mapping[str, Any]


HandlerCall = Callable[[Message, Delivery], None]
Middleware = Callable[[HandlerCall], HandlerCall]
"""A middleware takes the next call in the chain and returns a call that wraps it."""


class ConsumerMetrics:
    """Counters of one consumer (Prometheus-style names); thread-safe."""

    NAMES: ClassVar[tuple[str, ...]] = (
        "messages_handled_total",
        "messages_failed_total",
        "messages_invalid_total",
        "messages_dead_lettered_total",
        "messages_redelivered_total",
        "handler_seconds_total",
    )

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values = dict.fromkeys(self.NAMES, 0.0)

    def add(self, name: str, amount: float = 1.0) -> None:
        with self._lock:
            self._values[name] += amount

    def snapshot(self) -> dict[str, float]:
        with self._lock:
            return dict(self._values)


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
        with structlog.contextvars.bound_contextvars(**context):
            try:
                call(message, delivery)
            except Exception as error:
                log.warning("handler failed", error=repr(error), traceback=traceback.format_exc(limit=8))
                raise

    return logged


def metrics_middleware(metrics: ConsumerMetrics) -> Middleware:
    """Count handled, failed and redelivered messages and the time spent in the handler."""

    def middleware(call: HandlerCall) -> HandlerCall:
        def measured(message: Message, delivery: Delivery) -> None:
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

    return middleware


class Outcome(Enum):
    """What the connection thread does with a delivery once the worker is done with it."""

    ACK = "ack"
    REQUEUE = "requeue"


class Consumer:
    """Consumes one queue: validate, handle in a worker thread, ack after success; reconnects with backoff.

    ``handler(message)`` receives a validated instance of one of ``expects``. Threads: the thread that calls
    :meth:`run` owns the connection (select on its socket, heartbeats, acks); one worker thread runs the middleware
    chain and the handler in delivery order. The connection heartbeat (``heartbeat`` seconds) is therefore honoured
    whatever the handler does; acks are sent within a millisecond of the handler's return (the worker wakes the
    connection thread through a socket pair).
    """

    def __init__(
        self,
        queue: kombu.Queue,
        expects: type[Message] | tuple[type[Message], ...],
        handler: Callable[[Any], None],
        *,
        settings: Settings | None = None,
        name: str = "consumer",
        middleware: Sequence[Middleware] = (),
        heartbeat: float = 20.0,
    ) -> None:
        self.settings = settings or get_settings()
        self.topology = Topology(self.settings)
        self.queue = queue
        self.expects = expects if isinstance(expects, tuple) else (expects,)
        self.name = name
        self.heartbeat = heartbeat
        self.metrics = ConsumerMetrics()
        self.reconnects = 0
        self.consuming = threading.Event()
        self.error: BaseException | None = None

        def call_handler(message: Message, delivery: Delivery) -> None:
            handler(message)

        chain: HandlerCall = call_handler
        for wrap in reversed([logging_middleware, metrics_middleware(self.metrics), *middleware]):
            chain = wrap(chain)
        self._chain = chain
        self._stopping = threading.Event()
        self._generation = 0  # increases with every connection; work from an older one is never acked
        self._work: Queue[tuple[int, Any] | None] = Queue()
        self._done: Queue[tuple[int, Any, Outcome]] = Queue()
        self._wake_reader, self._wake_writer = socket.socketpair()
        self._wake_reader.setblocking(False)
        self._wake_pending = False
        self._dead_letter_publisher: Publisher | None = None
        self._thread: threading.Thread | None = None

    # -- life cycle ------------------------------------------------------------------------------------------------

    def start(self) -> threading.Thread:
        """Run in a background thread; returns it."""
        self._thread = threading.Thread(target=self._run_catching, name=f"consumer-{self.name}", daemon=True)
        self._thread.start()
        return self._thread

    def stop(self, timeout: float = 10.0) -> None:
        """Stop consuming; the handler in progress finishes and is acked, unstarted messages go back to the queue."""
        self._stopping.set()
        self._wake()
        if self._thread is not None:
            self._thread.join(timeout)

    def run(self) -> None:
        """Consume until :meth:`stop`; reconnect with backoff whenever the broker connection is lost."""
        worker = threading.Thread(target=self._work_loop, name=f"handler-{self.name}", daemon=True)
        worker.start()
        backoff = Backoff()
        # Connection loss, a consumer cancelled by the broker, or a channel error: a new connection and channel
        # recover from all of them (a queue that cannot be declared raises BusError instead, and stops the consumer).
        errors_of = kombu.Connection(self.settings.amqp_url)
        recoverable = (OSError, *errors_of.connection_errors, *errors_of.channel_errors)
        try:
            while not self._stopping.is_set():
                try:
                    self._consume(backoff)
                except recoverable as error:
                    if self._stopping.is_set():
                        break
                    self.reconnects += 1
                    delay = backoff.next_delay()
                    log.warning(
                        "consumer lost its connection; reconnecting",
                        consumer=self.name,
                        queue=self.queue.name,
                        error=repr(error),
                        retry_in=round(delay, 2),
                    )
                    self._stopping.wait(delay)
        finally:
            self._work.put(None)
            worker.join(timeout=30)

    def _run_catching(self) -> None:
        try:
            self.run()
        except BaseException as error:
            self.error = error
            log.error("consumer stopped on an error", consumer=self.name, error=repr(error))

    # -- connection thread -------------------------------------------------------------------------------------------

    def _consume(self, backoff: Backoff) -> None:
        connection = connect(self.settings, role=f"consumer {self.name}", heartbeat=self.heartbeat)
        try:
            channel = connection.channel()
            bound_queue = self.queue.bind(channel)
            try:
                bound_queue.declare()
            except connection.channel_errors as error:
                raise BusError(f"cannot declare queue {self.queue.name}: {error}") from error
            self._generation += 1
            generation = self._generation
            consumer = kombu.Consumer(
                channel,
                queues=[bound_queue],
                on_message=lambda message: self._work.put((generation, message)),
                prefetch_count=self.settings.prefetch,
                no_ack=False,
            )
            consumer.consume()
            self.consuming.set()
            backoff.reset()
            log.info("consuming", consumer=self.name, queue=self.queue.name, prefetch=self.settings.prefetch)
            amqp_socket = connection.connection.sock
            while not self._stopping.is_set():
                readable, _, _ = select.select([amqp_socket, self._wake_reader], [], [], 1.0)
                if self._wake_reader in readable:
                    with contextlib.suppress(BlockingIOError):
                        self._wake_reader.recv(65536)
                if amqp_socket in readable:
                    self._drain(connection, amqp_socket)
                self._settle(generation)
                connection.heartbeat_check()
            with contextlib.suppress(Exception):
                consumer.cancel()
            self._finish_in_flight(generation)
        finally:
            self.consuming.clear()
            with contextlib.suppress(Exception):
                connection.release()

    @staticmethod
    def _drain(connection: kombu.Connection, amqp_socket: socket.socket) -> None:
        # Read the frames already on the socket, and stop as soon as it is empty instead of waiting for a timeout.
        # (py-amqp reads exact frame sizes and keeps a partial frame buffered, so select() sees what is left.)
        for _ in range(256):
            try:
                connection.drain_events(timeout=0.001)
            except TimeoutError:
                return
            if not select.select([amqp_socket], [], [], 0)[0]:
                return

    def _settle(self, generation: int) -> None:
        # Outcomes arrive in delivery order (one worker), so a run of acks is sent as one ack with multiple=True.
        self._wake_pending = False
        last_ack: Any = None
        while True:
            try:
                done_generation, message, outcome = self._done.get_nowait()
            except Empty:
                break
            if done_generation != generation:
                continue  # its connection is gone, so the broker has already put it back for redelivery
            if outcome is Outcome.ACK:
                last_ack = message
            else:
                if last_ack is not None:
                    last_ack.ack(multiple=True)
                    last_ack = None
                message.requeue()
        if last_ack is not None:
            last_ack.ack(multiple=True)

    def _finish_in_flight(self, generation: int, timeout: float = 10.0) -> None:
        # Unstarted deliveries are dropped by the worker (stale generation) and requeued by the broker on close.
        self._generation += 1
        deadline = time.monotonic() + timeout
        self._work.put((self._generation, None))  # a marker: when the worker reaches it, older work is settled
        while time.monotonic() < deadline:
            try:
                done_generation, message, outcome = self._done.get(timeout=0.1)
            except Empty:
                continue
            if message is None:
                return
            if done_generation == generation:
                with contextlib.suppress(Exception):
                    message.ack() if outcome is Outcome.ACK else message.requeue()

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            self._wake_writer.send(b"!")

    # -- worker thread ---------------------------------------------------------------------------------------------

    def _work_loop(self) -> None:
        try:
            while True:
                item = self._work.get()
                if item is None:
                    return
                generation, message = item
                if message is None:  # the stop marker of _finish_in_flight
                    self._done.put((generation, None, Outcome.ACK))
                    continue
                if generation != self._generation:
                    continue  # delivered on a connection that has gone (or is closing): the broker redelivers it
                try:
                    outcome = self._process(message)
                except Exception as error:  # a bug here must not kill the worker: the message goes back instead
                    log.error("consumer could not process a delivery", consumer=self.name, error=repr(error))
                    outcome = Outcome.REQUEUE
                self._done.put((generation, message, outcome))
                if not self._wake_pending:  # one wake-up per batch of outcomes, not one per message
                    self._wake_pending = True
                    self._wake()
        finally:
            if self._dead_letter_publisher is not None:
                self._dead_letter_publisher.close()

    def _process(self, raw: Any) -> Outcome:
        headers = dict(raw.headers or {})
        info = raw.delivery_info
        delivery = Delivery(
            queue=self.queue.name,
            exchange=str(info.get("exchange", "")),
            routing_key=str(info.get("routing_key", "")),
            redelivered=bool(info.get("redelivered", False)),
            delivery_count=int(headers.get("x-delivery-count", 0) or 0),
            headers=headers,
        )
        try:
            message = decode_message(body_bytes(raw))
            if not isinstance(message, self.expects):
                expected = ", ".join(model.type_name for model in self.expects)
                raise MessageError(f"queue {self.queue.name} takes {expected} messages, got {message.type_name}")
        except MessageError as error:
            self.metrics.add("messages_invalid_total")
            log.warning("invalid message dead-lettered", queue=self.queue.name, error=str(error))
            return self._dead_letter(raw, delivery, str(error))
        try:
            self._chain(message, delivery)
        except Exception as error:
            if delivery.delivery_count >= self.settings.delivery_limit:
                # The broker allows delivery_limit redeliveries and dead-letters on the next return, without saying
                # why; on this last delivery the consumer dead-letters it itself, with the reason.
                reason = f"handler failed on all {delivery.delivery_count + 1} deliveries; last error: {error!r}"
                return self._dead_letter(raw, delivery, reason)
            return Outcome.REQUEUE
        return Outcome.ACK

    def _dead_letter(self, raw: Any, delivery: Delivery, reason: str) -> Outcome:
        headers = {
            **delivery.headers,
            HEADER_ERROR: reason[:4000],
            HEADER_ORIGINAL_EXCHANGE: delivery.exchange,
            HEADER_ORIGINAL_ROUTING_KEY: delivery.routing_key,
            HEADER_ORIGINAL_QUEUE: delivery.queue,
            HEADER_DEAD_LETTERED_AT: time.time(),
        }
        headers.pop("x-delivery-count", None)
        if self._dead_letter_publisher is None:
            self._dead_letter_publisher = Publisher(self.settings, role=f"dead-letters {self.name}", retry_seconds=10)
        try:
            self._dead_letter_publisher.publish_raw(
                body_bytes(raw), self.topology.dead_letter_exchange.name, delivery.routing_key, headers
            )
        except PublishError as error:
            log.error("could not dead-letter a message; requeueing it", queue=self.queue.name, error=str(error))
            return Outcome.REQUEUE
        self.metrics.add("messages_dead_lettered_total")
        return Outcome.ACK


@contextlib.contextmanager
def running(consumer: Consumer, timeout: float = 10.0) -> Iterator[Consumer]:
    """Run a consumer in a background thread for the duration of a ``with`` block (waits until it consumes)."""
    consumer.start()
    if not consumer.consuming.wait(timeout):
        consumer.stop()
        raise BusError(f"consumer {consumer.name} did not start consuming within {timeout} s: {consumer.error!r}")
    try:
        yield consumer
    finally:
        consumer.stop()
