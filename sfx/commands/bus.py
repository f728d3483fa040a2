"""``sfx bus declare``: declare the broker topology."""

from __future__ import annotations

import argparse
from typing import Any

from libs.contracts.settings import get_settings
from libs.runtime.bus import BusError, Topology
from sfx.broker import broker_connection
from sfx.errors import CommandError


def register(subparsers: Any) -> None:
    bus = subparsers.add_parser("bus", help="the broker topology")
    bus_commands = bus.add_subparsers(dest="bus_command", metavar="ACTION")
    bus_commands.required = True
    declare = bus_commands.add_parser("declare", help="declare every exchange, queue and binding (idempotent)")
    declare.set_defaults(handler=run_declare)


def run_declare(arguments: argparse.Namespace) -> int:
    with broker_connection("declare") as connection:
        try:
            declared = Topology(get_settings()).declare(connection)
        except BusError as error:
            raise CommandError(str(error)) from error
    for name in declared:
        print(name)
    return 0
