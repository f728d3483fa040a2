"""Where messages go: the exchanges and queues of a namespace, the routing key of every message, and the headers.

The table of exchanges, queues and routing keys is in the docstring of :mod:`libs.runtime.bus`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import kombu

from libs.contracts.messages import (
    CancelRequest,
    FileRejected,
    FrameResult,
    JobSpec,
    JobState,
    MergeUpdate,
    Message,
    ReprocessRequest,
    RunManifest,
    ServiceHeartbeat,
)
from libs.contracts.naming import escape_word
from libs.contracts.settings import Settings, get_settings
from libs.runtime.bus.errors import BusError

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

# Headers the bus writes (publisher and consumer). The x-sfx-* dead-letter headers are read back by ``sfx dlq``.
HEADER_TYPE = "x-sfx-type"
HEADER_SCHEMA_VERSION = "x-sfx-schema-version"
HEADER_ERROR = "x-sfx-error"
HEADER_ORIGINAL_EXCHANGE = "x-sfx-original-exchange"
HEADER_ORIGINAL_ROUTING_KEY = "x-sfx-original-routing-key"
HEADER_ORIGINAL_QUEUE = "x-sfx-original-queue"
HEADER_DEAD_LETTERED_AT = "x-sfx-dead-lettered-at"
HEADER_REPLAYED = "x-sfx-replayed"
HEADER_RETRIES = "x-sfx-retries"

RETRY_GROWTH = 4.0
MAX_RETRY_DELAY_SECONDS = 300.0

_MAX_ROUTING_KEY_BYTES = 255


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

    def retry_delays(self) -> list[float]:
        """Seconds a message waits before its n-th redelivery after a handler failure (n = 1 … delivery_limit)."""
        first = self.settings.retry_delay_seconds
        return [
            min(first * RETRY_GROWTH**level, MAX_RETRY_DELAY_SECONDS) for level in range(self.settings.delivery_limit)
        ]

    def retry_exchange(self, level: int) -> kombu.Exchange:
        """Where a message waits out its ``level``-th retry delay (0-based); it is published with its queue's name as
        routing key. Named by the delay, so deployments and tests with other delays never clash."""
        milliseconds = max(1, round(self.retry_delays()[level] * 1000))
        return kombu.Exchange(self.name(f"retry.{milliseconds}ms"), type="fanout", durable=True)

    def retry_queues(self) -> list[kombu.Queue]:
        """One waiting queue per retry delay: no consumer; when a message's time is up the broker dead-letters it
        to the default exchange with its routing key, the name of the queue it failed in, which puts it back there.
        (One queue per delay, because a broker expires only the message at the head of a queue.)"""
        queues = []
        for level in range(len(self.retry_delays())):
            exchange = self.retry_exchange(level)
            ttl = int(exchange.name.rsplit(".", 1)[1].removesuffix("ms"))
            arguments = {"x-queue-type": "quorum", "x-message-ttl": ttl, "x-dead-letter-exchange": ""}
            queues.append(
                kombu.Queue(
                    exchange.name, exchange=exchange, durable=True, auto_delete=False, queue_arguments=arguments
                )
            )
        return queues

    def exchange_for(self, message: Message) -> str:
        """The broker name of the exchange that carries ``message``."""
        return self.name(EXCHANGE_OF_TYPE[message.type_name])

    def work_queue_arguments(self) -> dict[str, Any]:
        return {
            "x-queue-type": "quorum",
            "x-delivery-limit": self.settings.delivery_limit,
            "x-dead-letter-exchange": self.dead_letter_exchange.name,
            # A full queue refuses new messages (the publisher gets a nack, waits and retries) instead of growing
            # without bound while a consumer is slow or down: back-pressure, never a dropped message.
            "x-max-length": self.settings.queue_max_messages,
            "x-overflow": "reject-publish",
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
        return [self.queue(name) for name in self.queue_specs] + [self.dead_letter_queue, *self.retry_queues()]

    def all_exchanges(self) -> list[kombu.Exchange]:
        retries = [self.retry_exchange(level) for level in range(len(self.retry_delays()))]
        return [*self.exchanges.values(), self.dead_letter_exchange, *retries]

    def declare(self, connection: kombu.Connection) -> list[str]:
        """Declare every exchange, queue and binding; returns the names declared. Safe to repeat.

        A queue that exists with other arguments (e.g. another delivery limit) makes the broker refuse with
        PRECONDITION_FAILED; this is raised as BusError naming the queue.
        """
        declared: list[str] = []
        channel = connection.channel()
        try:
            for exchange in self.all_exchanges():
                exchange.bind(channel).declare()
                declared.append(exchange.name)
            for kombu_queue in self.all_queues():
                try:
                    kombu_queue.bind(channel).declare()
                except connection.channel_errors as error:
                    # PRECONDITION_FAILED: it exists with other arguments; ACCESS_REFUSED: this user may not declare it.
                    raise BusError(
                        f"cannot declare queue {kombu_queue.name} ({error}): if it exists with other arguments, delete "
                        "it or use those of libs/runtime/bus/topology.py; if access was refused, check the user's "
                        "permissions (scripts/broker-roles.sh)"
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
            for exchange in self.all_exchanges():
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
