"""``sfx up`` / ``sfx down``: start every service as its own process, and stop them again.

The work itself is in ``sfx.services_control`` (also used by ``sfx demo``, the tests and the benchmarks).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from libs.contracts.settings import get_settings
from sfx.services_control import SERVICES, start_services, stop_services


def register(subparsers: Any) -> None:
    up = subparsers.add_parser("up", help="start every service as its own process")
    up.add_argument("--work-dir", type=Path, help="outputs, logs and pid files (default: SFX_WORK_DIR)")
    up.add_argument("--only", nargs="+", choices=SERVICES, help="start only these services")
    up.set_defaults(handler=run_up)
    down = subparsers.add_parser("down", help="stop the services started by `sfx up`")
    down.add_argument("--work-dir", type=Path, help="as given to `sfx up`")
    down.set_defaults(handler=run_down)


def run_up(arguments: argparse.Namespace) -> int:
    work_dir = arguments.work_dir or get_settings().work_dir
    start_services(work_dir, tuple(arguments.only or SERVICES))
    return 0


def run_down(arguments: argparse.Namespace) -> int:
    work_dir = arguments.work_dir or get_settings().work_dir
    stop_services(work_dir)
    return 0
