"""``sfx merge``: merge saved per-frame results (JSON lines of FrameResult) into MTZ files and a merging table."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from sfx.offline_merge import finish, make_engine, merge_results, read_results
from sfx.options import add_merge_arguments


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "merge",
        help="merge saved per-frame results into merged and unmerged MTZ files",
        description="Scale and merge the reflections of per-frame results (JSON lines, one FrameResult per line, as "
        "`sfx process` writes them) and write merged.mtz, unmerged.mtz and summary.json into --out.",
    )
    parser.add_argument("results", type=Path, nargs="+", help="JSON-lines files of per-frame results")
    add_merge_arguments(parser)
    parser.set_defaults(handler=run)


def run(arguments: argparse.Namespace) -> int:
    engine = make_engine(arguments)
    counts = merge_results(engine, read_results(arguments.results))
    finish(engine, arguments.out, counts, dataset_id=arguments.results[0].stem)
    return 0
