"""Entry point of the ``sfx`` command."""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import pkgutil
import sys
from collections.abc import Sequence

import sfx.commands
from sfx.errors import CommandError

DISTRIBUTION = "sfx-live"


def version_text() -> str:
    """``sfx-live <version>`` of the installed distribution (what ``pip`` installed, not a copy in the code)."""
    try:
        return f"{DISTRIBUTION} {importlib.metadata.version(DISTRIBUTION)}"
    except importlib.metadata.PackageNotFoundError:
        return f"{DISTRIBUTION} (not installed: run `pip install -e .`)"


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every sub-command found in ``sfx.commands``."""
    parser = argparse.ArgumentParser(
        prog="sfx",
        description="sfx-live: real-time analysis of serial femtosecond crystallography.",
    )
    parser.add_argument("--version", action="version", version=version_text())
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for module_info in sorted(pkgutil.iter_modules(sfx.commands.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"sfx.commands.{module_info.name}")
        register = getattr(module, "register", None)
        if register is not None:
            register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``sfx``; every sub-command sets ``handler`` returning an exit status."""
    parser = build_parser()
    arguments = parser.parse_args(argv)
    try:
        status: int = arguments.handler(arguments)
    except CommandError as error:
        print(f"sfx {arguments.command}: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return status


if __name__ == "__main__":
    sys.exit(main())
