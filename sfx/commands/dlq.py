"""``sfx dlq list|replay|purge``: look at, replay or delete the dead letters of the bus."""

from __future__ import annotations

import argparse
import time
from typing import Any

import kombu

from libs.contracts.settings import get_settings
from libs.runtime.bus import (
    HEADER_DEAD_LETTERED_AT,
    HEADER_ERROR,
    HEADER_ORIGINAL_EXCHANGE,
    HEADER_ORIGINAL_QUEUE,
    HEADER_ORIGINAL_ROUTING_KEY,
    HEADER_REPLAYED,
    HEADER_TYPE,
    Publisher,
    PublishError,
    Topology,
    body_bytes,
)
from sfx.broker import broker_connection
from sfx.errors import CommandError

# Headers that describe a past death; a replayed message starts a fresh life without them.
_DEATH_HEADERS = (
    "x-death",
    "x-first-death-exchange",
    "x-first-death-queue",
    "x-first-death-reason",
    "x-last-death-exchange",
    "x-last-death-queue",
    "x-last-death-reason",
    "x-delivery-count",
    HEADER_ERROR,
    HEADER_ORIGINAL_EXCHANGE,
    HEADER_ORIGINAL_QUEUE,
    HEADER_ORIGINAL_ROUTING_KEY,
    HEADER_DEAD_LETTERED_AT,
)


def register(subparsers: Any) -> None:
    dlq = subparsers.add_parser("dlq", help="list, replay or purge dead letters")
    dlq_commands = dlq.add_subparsers(dest="dlq_command", metavar="ACTION")
    dlq_commands.required = True
    listing = dlq_commands.add_parser("list", help="show dead letters with the reason each one died")
    listing.add_argument("--limit", type=int, default=100, help="show at most this many (default 100)")
    listing.set_defaults(handler=run_dlq_list)
    replay = dlq_commands.add_parser("replay", help="send dead letters back where they came from")
    replay.add_argument("--limit", type=int, default=None, help="replay at most this many (default: all)")
    replay.add_argument(
        "--via-exchange",
        action="store_true",
        help="republish to the original exchange and routing key (every subscriber gets it again) instead of only "
        "to the queue that dead-lettered it",
    )
    replay.set_defaults(handler=run_dlq_replay)
    purge = dlq_commands.add_parser("purge", help="delete every dead letter")
    purge.set_defaults(handler=run_dlq_purge)


def _dead_letter_count(connection: kombu.Connection, queue_name: str) -> tuple[Any, int]:
    """A channel and the number of dead letters; a clear error when the topology was never declared."""
    channel = connection.channel()
    try:
        _, message_count, _ = channel.queue_declare(queue_name, passive=True)
    except connection.channel_errors as error:
        raise CommandError(f"queue {queue_name} does not exist ({error}); run `sfx bus declare` first") from error
    return channel, int(message_count)


def _origin(message: Any) -> dict[str, str]:
    """Where a dead letter came from and why it died: ours say it in x-sfx-* headers, the broker's in x-death."""
    headers = message.headers or {}
    deaths = headers.get("x-death") or [{}]
    first_death = deaths[-1] if isinstance(deaths, list) and deaths else {}
    routing_keys = first_death.get("routing-keys") or [message.delivery_info.get("routing_key", "")]
    broker_reason = headers.get("x-first-death-reason") or first_death.get("reason")
    return {
        "queue": str(headers.get(HEADER_ORIGINAL_QUEUE) or headers.get("x-first-death-queue") or ""),
        "exchange": str(headers.get(HEADER_ORIGINAL_EXCHANGE) or headers.get("x-first-death-exchange") or ""),
        "routing_key": str(headers.get(HEADER_ORIGINAL_ROUTING_KEY) or routing_keys[0]),
        "reason": str(headers.get(HEADER_ERROR) or f"broker: {broker_reason or 'unknown'}"),
        "type": str(headers.get(HEADER_TYPE) or "?"),
    }


def run_dlq_list(arguments: argparse.Namespace) -> int:
    queue_name = Topology(get_settings()).dead_letter_queue.name
    with broker_connection("dlq list") as connection:
        channel, total = _dead_letter_count(connection, queue_name)
        print(f"{total} dead letter(s) in {queue_name}")
        # Messages are fetched unacknowledged and go back to the queue when the channel closes (the dead-letter queue
        # has no delivery limit, so looking never loses one).
        for index in range(min(total, arguments.limit)):
            message = channel.basic_get(queue_name, no_ack=False)
            if message is None:
                break
            origin = _origin(message)
            died = (message.headers or {}).get(HEADER_DEAD_LETTERED_AT)
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(float(died))) if died else "-"
            print(
                f"{index + 1:4d}  {when}  {origin['type']:<18} queue={origin['queue']} "
                f"exchange={origin['exchange']} key={origin['routing_key']} bytes={len(body_bytes(message))}\n"
                f"      reason: {origin['reason']}"
            )
        channel.close()
    return 0


def run_dlq_replay(arguments: argparse.Namespace) -> int:
    settings = get_settings()
    queue_name = Topology(settings).dead_letter_queue.name
    replayed = skipped = 0
    with broker_connection("dlq replay") as connection, Publisher(settings, role="dlq replay") as publisher:
        channel, total = _dead_letter_count(
            connection, queue_name
        )  # bounded: a message that dies again is not replayed twice
        for _ in range(total if arguments.limit is None else min(total, arguments.limit)):
            message = channel.basic_get(queue_name, no_ack=False)
            if message is None:
                break
            origin = _origin(message)
            if arguments.via_exchange:
                exchange, routing_key = origin["exchange"], origin["routing_key"]
            else:  # the default exchange routes by queue name: only the queue that gave up gets it again
                exchange, routing_key = "", origin["queue"]
            if not routing_key:
                print(f"skipped a {origin['type']} dead letter: its origin is unknown (reason: {origin['reason']})")
                channel.basic_reject(message.delivery_tag, requeue=True)
                skipped += 1
                continue
            headers = {k: v for k, v in (message.headers or {}).items() if k not in _DEATH_HEADERS}
            headers[HEADER_REPLAYED] = int(headers.get(HEADER_REPLAYED, 0)) + 1
            try:
                publisher.publish_raw(body_bytes(message), exchange, routing_key, headers)
            except PublishError as error:
                channel.basic_reject(message.delivery_tag, requeue=True)
                raise CommandError(f"replay stopped after {replayed} message(s): {error}") from error
            channel.basic_ack(message.delivery_tag)  # only after the broker confirmed the copy
            replayed += 1
        channel.close()
    target = "their original exchanges" if arguments.via_exchange else "their original queues"
    print(f"replayed {replayed} dead letter(s) to {target}" + (f", skipped {skipped}" if skipped else ""))
    return 0


def run_dlq_purge(arguments: argparse.Namespace) -> int:
    queue_name = Topology(get_settings()).dead_letter_queue.name
    with broker_connection("dlq purge") as connection:
        channel, _ = _dead_letter_count(connection, queue_name)
        purged = channel.queue_purge(queue_name)
    print(f"purged {purged or 0} dead letter(s) from {queue_name}")
    return 0
