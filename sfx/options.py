"""Command-line options that several ``sfx`` sub-commands share, and their parsing."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from sfx.errors import CommandError


def add_merge_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of an offline merge (``sfx merge`` and ``sfx process``); ``make_engine`` reads them."""
    parser.add_argument("--cell", required=True, help='unit cell "a b c alpha beta gamma" (Å, degrees)')
    parser.add_argument("--space-group", required=True, help="space group symbol or number, e.g. 'P 43 21 2'")
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--d-min", type=float, default=None, help="high-resolution limit of the merge (Å)")
    parser.add_argument("--shells", type=int, default=10, help="resolution shells in the table (10)")
    parser.add_argument(
        "--no-partiality-correction", action="store_true", help="merge intensities without dividing by partiality"
    )


def parse_cell(text: str) -> tuple[float, float, float, float, float, float]:
    """``--cell "a b c alpha beta gamma"`` (spaces or commas) as six floats."""
    parts = text.replace(",", " ").split()
    try:
        values = [float(part) for part in parts]
    except ValueError as error:
        raise CommandError(f"--cell {text!r}: not six numbers") from error
    if len(values) != 6:
        raise CommandError(f"--cell {text!r}: expected six numbers (a b c alpha beta gamma), got {len(values)}")
    return (values[0], values[1], values[2], values[3], values[4], values[5])


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``--set KEY=VALUE`` items as a dict of dotted overrides; values are JSON when they parse, else strings."""
    overrides: dict[str, Any] = {}
    for item in items:
        key, separator, value = item.partition("=")
        if not separator or not key:
            raise CommandError(f"--set {item!r}: expected KEY=VALUE")
        try:
            overrides[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key.strip()] = value
    return overrides
