"""The bus: the whole RabbitMQ topology, a confirming publisher and a validating consumer (kombu, pyamqp).

The package is split by concern; import the names from here:

- :mod:`~libs.runtime.bus.topology`: exchange and queue names, :class:`QueueSpec`, :class:`Topology`, the routing
  keys and :func:`routing_key_for`, the ``x-sfx-*`` header names, :func:`connect`, :func:`declare_topology`;
- :mod:`~libs.runtime.bus.publisher`: :class:`Publisher` (with :class:`Outgoing` and :func:`message_headers`);
- :mod:`~libs.runtime.bus.consumer`: :class:`Consumer`, :func:`running`, :func:`body_bytes`;
- :mod:`~libs.runtime.bus.middleware`: :class:`Delivery`, the ``HandlerCall`` and ``Middleware`` types,
  :func:`logging_middleware`, :func:`metrics_middleware`, :data:`STANDARD_MIDDLEWARE`, :class:`ConsumerMetrics`;
- :mod:`~libs.runtime.bus.errors` (:class:`BusError`, :class:`PublishError`) and :mod:`~libs.runtime.bus.retry`
  (:class:`Backoff`), shared by the others.

Topology, for a namespace ``ns`` (``settings.namespace``, default ``sfx``):

- topic exchanges ``ns.runs`` (run manifests), ``ns.jobs`` (job specs), ``ns.results`` (frame results, job states,
  merge updates) and ``ns.control`` (reprocess and cancel requests,
  service heartbeats);
- the dead-letter exchange ``ns.dlx`` (topic) and its queue ``ns.dead-letters`` bound with ``#``;
- durable quorum queues (see ``SERVICE_QUEUES``) of at most ``settings.queue_max_messages`` messages
  (``x-overflow`` ``reject-publish``: publishers are refused, wait and retry), with ``x-delivery-limit`` =
  ``settings.delivery_limit`` and ``x-dead-letter-exchange`` = ``ns.dlx``: the broker counts returns of a message
  (``x-delivery-count``) and dead-letters it when it is returned once more after ``delivery_limit`` redeliveries
  (RabbitMQ 3.10: at most ``delivery_limit + 1`` deliveries), so a message that kills its consumer cannot loop
  forever;
- retry waiting rooms: for each of the ``delivery_limit`` retries a fanout exchange and quorum queue
  ``ns.retry.<delay>ms`` whose ``x-message-ttl`` is the n-th delay (``settings.retry_delay_seconds`` × 4ⁿ, at most
  300 s) and whose dead-letter exchange is the default one: an expired message goes back to the queue named by its
  routing key.

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
numpy work never starves the heartbeats. It acks only after the handler returned. A handler exception parks the
message in the retry queue of its attempt (header ``x-sfx-retries`` counts them) and acks it; the broker returns it
after the delay, so a failure of seconds (Redis paused, a full disk) is outlived, and after ``delivery_limit`` retries
the consumer dead-letters it with the error. A message that fails validation is published to the dead-letter
exchange with the reason in the ``x-sfx-error`` header on its first delivery and acked: it never crashes the
consumer, never blocks the queue and is never retried. When the broker drops
the connection the consumer reconnects with backoff; unacked messages are redelivered by the broker.

Middleware: cross-cutting behaviour (log context, counters; later exporters and health checks) wraps the handler call
as a chain of :data:`Middleware`. A consumer takes its list in the constructor (default :data:`STANDARD_MIDDLEWARE`);
:func:`libs.runtime.service.run_service` takes one list for all the consumers of a service and gives it to each, so
the service's ``__main__`` decides.
"""

from libs.contracts.naming import escape_word
from libs.runtime.bus.consumer import Consumer, Outcome, body_bytes, running
from libs.runtime.bus.errors import BusError, PublishError
from libs.runtime.bus.middleware import (
    STANDARD_MIDDLEWARE,
    ConsumerMetrics,
    Delivery,
    HandlerCall,
    Middleware,
    current_delivery,
    logging_middleware,
    metrics_middleware,
)
from libs.runtime.bus.publisher import Outgoing, Publisher, message_headers
from libs.runtime.bus.retry import Backoff
from libs.runtime.bus.topology import (
    DEAD_LETTER_EXCHANGE,
    DEAD_LETTER_QUEUE,
    EXCHANGE_OF_TYPE,
    EXCHANGES,
    HEADER_DEAD_LETTERED_AT,
    HEADER_ERROR,
    HEADER_ORIGINAL_EXCHANGE,
    HEADER_ORIGINAL_QUEUE,
    HEADER_ORIGINAL_ROUTING_KEY,
    HEADER_REPLAYED,
    HEADER_SCHEMA_VERSION,
    HEADER_TYPE,
    SERVICE_QUEUES,
    QueueSpec,
    Topology,
    cancel_key,
    connect,
    declare_topology,
    frame_key,
    heartbeat_key,
    job_spec_key,
    job_state_key,
    manifest_key,
    merge_key,
    rejected_file_key,
    reprocess_key,
    routing_key_for,
)

__all__ = [
    "DEAD_LETTER_EXCHANGE",
    "DEAD_LETTER_QUEUE",
    "EXCHANGES",
    "EXCHANGE_OF_TYPE",
    "HEADER_DEAD_LETTERED_AT",
    "HEADER_ERROR",
    "HEADER_ORIGINAL_EXCHANGE",
    "HEADER_ORIGINAL_QUEUE",
    "HEADER_ORIGINAL_ROUTING_KEY",
    "HEADER_REPLAYED",
    "HEADER_SCHEMA_VERSION",
    "HEADER_TYPE",
    "SERVICE_QUEUES",
    "STANDARD_MIDDLEWARE",
    "Backoff",
    "BusError",
    "Consumer",
    "ConsumerMetrics",
    "Delivery",
    "HandlerCall",
    "Middleware",
    "Outcome",
    "Outgoing",
    "PublishError",
    "Publisher",
    "QueueSpec",
    "Topology",
    "body_bytes",
    "cancel_key",
    "connect",
    "current_delivery",
    "declare_topology",
    "escape_word",
    "frame_key",
    "heartbeat_key",
    "job_spec_key",
    "job_state_key",
    "logging_middleware",
    "manifest_key",
    "merge_key",
    "message_headers",
    "metrics_middleware",
    "rejected_file_key",
    "reprocess_key",
    "routing_key_for",
    "running",
]
