"""Consuming one queue: validate each delivery, run the middleware chain and the handler, ack after success.

See the docstring of :mod:`libs.runtime.bus` for the threads, the retries and the dead-lettering.
"""

from __future__ import annotations

import contextlib
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from enum import Enum
from queue import Empty, Queue
from typing import Any

import kombu

from libs.contracts.messages import Message, MessageError, decode_message
from libs.contracts.settings import Settings, get_settings
from libs.runtime.bus.errors import BusError, PublishError
from libs.runtime.bus.middleware import STANDARD_MIDDLEWARE, ConsumerMetrics, Delivery, HandlerCall, Middleware
from libs.runtime.bus.publisher import Publisher
from libs.runtime.bus.retry import Backoff
from libs.runtime.bus.topology import (
    HEADER_DEAD_LETTERED_AT,
    HEADER_ERROR,
    HEADER_ORIGINAL_EXCHANGE,
    HEADER_ORIGINAL_QUEUE,
    HEADER_ORIGINAL_ROUTING_KEY,
    HEADER_RETRIES,
    Topology,
    connect,
)
from libs.runtime.logging import get_logger
from libs.runtime.metrics import count_consumer_reconnect

log = get_logger("libs.runtime.bus")  # one logger name for the whole bus, as when it was one module


def body_bytes(raw: Any) -> bytes:
    """The body of a received message as bytes (py-amqp decodes bodies that declare a content encoding)."""
    body = raw.body
    if isinstance(body, bytes | bytearray | memoryview):
        return bytes(body)
    return str(body).encode(getattr(raw, "content_encoding", None) or "utf-8")


def _header_count(headers: dict[str, Any], name: str) -> int:
    """A non-negative count from a message header; anything else (a forged value) counts as 0."""
    value = headers.get(name, 0)
    return value if isinstance(value, int) and value >= 0 else 0


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

    ``middleware`` wraps the handler, the first one outermost (see :mod:`libs.runtime.bus.middleware`);
    :func:`libs.runtime.service.run_service` replaces it with the service's choice through :meth:`use_middleware`.
    """

    def __init__(
        self,
        queue: kombu.Queue,
        expects: type[Message] | tuple[type[Message], ...],
        handler: Callable[[Any], None],
        *,
        settings: Settings | None = None,
        name: str = "consumer",
        middleware: Sequence[Middleware] = STANDARD_MIDDLEWARE,
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
        self._handler = handler
        self._started = False
        self._chain = self._build_chain(middleware)
        self._stopping = threading.Event()
        self._generation = 0  # increases with every connection; work from an older one is never acked
        self._work: Queue[tuple[int, Any] | None] = Queue()
        self._done: Queue[tuple[int, Any, Outcome]] = Queue()
        self._wake_reader, self._wake_writer = socket.socketpair()
        self._wake_reader.setblocking(False)
        self._wake_pending = False
        self._dead_letter_publisher: Publisher | None = None
        self._thread: threading.Thread | None = None

    # -- middleware ------------------------------------------------------------------------------------------------

    def use_middleware(self, middleware: Sequence[Middleware]) -> None:
        """Wrap the handler in ``middleware`` instead of what the constructor was given; only before it starts."""
        if self._started:
            raise BusError(f"consumer {self.name} is already running; choose its middleware before it starts")
        self._chain = self._build_chain(middleware)

    def _build_chain(self, middleware: Sequence[Middleware]) -> HandlerCall:
        handler = self._handler

        def call_handler(message: Message, delivery: Delivery) -> None:
            handler(message)

        chain: HandlerCall = call_handler
        for wrap in reversed(middleware):
            chain = wrap(chain)
        return chain

    # -- life cycle ------------------------------------------------------------------------------------------------

    def start(self) -> threading.Thread:
        """Run in a background thread; returns it."""
        self._started = True  # here as well as in run(): the middleware must not change between now and then
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
        self._started = True
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
                    count_consumer_reconnect(self.name)
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
                for retry_queue in self.topology.retry_queues():  # where its failed messages wait (idempotent)
                    retry_queue.bind(channel).declare()
            except connection.channel_errors as error:
                raise BusError(f"cannot declare queue {self.queue.name} or its retry queues: {error}") from error
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
        retries = _header_count(headers, HEADER_RETRIES)
        delivery = Delivery(
            queue=self.queue.name,
            exchange=str(info.get("exchange", "")),
            routing_key=str(info.get("routing_key", "")),
            redelivered=bool(info.get("redelivered", False)) or retries > 0,
            delivery_count=_header_count(headers, "x-delivery-count") + retries,
            headers=headers,
            metrics=self.metrics,
            user_id=(raw.properties or {}).get("user_id") or None,
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
        except MessageError as error:
            # A handler that finds the message itself at fault (an index beyond its run, say): retrying cannot help.
            self.metrics.add("messages_invalid_total")
            log.warning("message refused by its handler; dead-lettered", queue=self.queue.name, error=str(error))
            return self._dead_letter(raw, delivery, str(error))
        except Exception as error:
            if retries >= self.settings.delivery_limit:
                reason = f"handler failed on all {retries + 1} deliveries; last error: {error!r}"
                return self._dead_letter(raw, delivery, reason)
            return self._retry_later(raw, delivery, retries, error)
        return Outcome.ACK

    def _retry_later(self, raw: Any, delivery: Delivery, retries: int, error: Exception) -> Outcome:
        """Park a failed message in the retry queue of its attempt; the broker puts it back here when its wait ends.

        A failure that lasts seconds (Redis paused, a full disk) is then outlived instead of burning every delivery
        within milliseconds. Published first, acked after: a crash in between delivers it twice (consumers are
        idempotent), never zero times.
        """
        delay = self.topology.retry_delays()[retries]
        headers = {**delivery.headers, HEADER_RETRIES: retries + 1}
        headers.pop("x-delivery-count", None)
        try:
            self._side_publisher().publish_raw(
                body_bytes(raw), self.topology.retry_exchange(retries).name, self.queue.name, headers
            )
        except PublishError as publish_error:
            log.error("could not park a failed message; requeueing it", queue=self.queue.name, error=str(publish_error))
            return Outcome.REQUEUE
        self.metrics.add("messages_retried_total")
        log.warning(
            "handler failed; message retried later",
            consumer=self.name,
            queue=self.queue.name,
            retry=retries + 1,
            of=self.settings.delivery_limit,
            in_seconds=delay,
            error=repr(error)[:500],
        )
        return Outcome.ACK

    def _side_publisher(self) -> Publisher:
        """The publisher for dead letters and retries (its own connection, made on first use)."""
        if self._dead_letter_publisher is None:
            self._dead_letter_publisher = Publisher(self.settings, role=f"retries {self.name}", retry_seconds=10)
        return self._dead_letter_publisher

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
        headers.pop(HEADER_RETRIES, None)  # a replayed dead letter starts its retries afresh
        try:
            self._side_publisher().publish_raw(
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
