"""``sfx services``: the live service instances, from their heartbeats in Redis."""

from __future__ import annotations

import argparse
import time
from typing import Any

import redis

from libs.contracts.settings import get_settings, redacted_url
from libs.runtime.state import LiveState
from sfx.errors import CommandError


def register(subparsers: Any) -> None:
    services = subparsers.add_parser("services", help="list the live service instances (from their heartbeats)")
    services.set_defaults(handler=run_services)


def run_services(arguments: argparse.Namespace) -> int:
    settings = get_settings()
    try:
        services = LiveState(settings).live_services()
    except redis.RedisError as error:
        where = redacted_url(settings.redis_url)  # the URL may hold Redis's password; never print it
        raise CommandError(f"cannot read Redis at {where} (SFX_REDIS_URL): {error}") from error
    if not services:
        print("no live service instances")
        return 0
    now = time.time()
    print(f"{'service':<12} {'instance':<36} {'host':<20} {'pid':>7} {'status':<9} {'up':>8} {'last beat':>9}")
    for heartbeat in services:
        print(
            f"{heartbeat.service:<12} {heartbeat.instance:<36} {heartbeat.host:<20} {heartbeat.pid:>7} "
            f"{heartbeat.status:<9} {now - heartbeat.started_at:>7.0f}s {now - heartbeat.sent_at:>8.1f}s"
        )
    return 0
