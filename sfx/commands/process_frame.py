"""``sfx process-frame``: run the per-frame analysis on one frame of a run and show what it found."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from libs.contracts.parameters import AnalysisParameters, ParameterError, with_overrides
from libs.science.formats import FormatError, open_run
from services.analysis.pipeline import STAGES, AnalysisError, FrameAnalysis, process_frame
from sfx.errors import CommandError
from sfx.options import parse_cell, parse_overrides


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "process-frame",
        help="analyse one frame: spots, hit, indexing with a known cell, refinement, integration",
        description="Run spotfinding, hit finding, known-cell indexing, refinement and integration on one frame.",
    )
    parser.add_argument("file", type=Path, help="NXmx master or CXI file of the run")
    parser.add_argument("--frame", type=int, default=0, help="frame index (from 0)")
    parser.add_argument("--cell", required=True, help='unit cell "a b c alpha beta gamma" (Å, degrees)')
    parser.add_argument("--space-group", required=True, help="space group symbol or number, e.g. 'P 43 21 2'")
    parser.add_argument("--geometry", type=Path, default=None, help="CrystFEL .geom for a CXI file")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a summary")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override an analysis parameter, e.g. spotfinding.sigma_strong=4 (repeatable)",
    )
    parser.set_defaults(handler=run)


def run(arguments: argparse.Namespace) -> int:
    cell = parse_cell(arguments.cell)
    try:
        parameters = with_overrides(AnalysisParameters(), parse_overrides(arguments.set))
    except ParameterError as error:
        raise CommandError(str(error)) from error
    if not arguments.file.exists():
        raise CommandError(f"{arguments.file}: no such file")
    try:
        with open_run(arguments.file, geometry=arguments.geometry) as reader:
            if not 0 <= arguments.frame < reader.frame_count:
                raise CommandError(
                    f"{arguments.file}: frame {arguments.frame} does not exist (the run has {reader.frame_count})"
                )
            image = reader.read_frame(arguments.frame)
            detector, beam, mask = reader.detector, reader.beam, reader.mask
    except (FormatError, ValueError) as error:
        if isinstance(error, CommandError):
            raise
        raise CommandError(str(error)) from error
    started = time.perf_counter()
    try:
        analysis = process_frame(image, detector, beam, mask, cell, arguments.space_group, parameters)
    except AnalysisError as error:
        raise CommandError(f"{arguments.file} frame {arguments.frame}: {error}") from error
    total = time.perf_counter() - started
    if arguments.json:
        print(json.dumps(as_json(analysis, total)))
    else:
        print(summary(analysis, arguments.file, arguments.frame, total))
    return 0


def as_json(analysis: FrameAnalysis, total_seconds: float) -> dict[str, Any]:
    """The JSON object of ``--json`` (A row by row, DIALS convention r = A·h, 1/Å)."""
    return {
        "spot_count": analysis.spot_count,
        "hit": analysis.hit,
        "indexed": analysis.indexed,
        "A": None if analysis.A is None else [[float(v) for v in row] for row in analysis.A],
        "cell": None if analysis.cell is None else [float(v) for v in analysis.cell],
        "resolution_estimate": analysis.resolution_estimate,
        "indexed_spots": analysis.indexed_spots,
        "rmsd_mm": analysis.rmsd_mm,
        "n_integrated": analysis.n_integrated,
        "integration_flags": analysis.flag_counts,
        "timings": {**analysis.timings, "total": total_seconds},
    }


def summary(analysis: FrameAnalysis, path: Path, frame: int, total_seconds: float) -> str:
    """A few lines a scientist reads at a glance."""
    lines = [f"{path} frame {frame}"]
    resolution = f"{analysis.resolution_estimate:.2f} Å" if analysis.resolution_estimate else "-"
    lines.append(
        f"  spots          {analysis.spot_count}  ({'hit' if analysis.hit else 'blank'}; resolution from spots "
        f"{resolution})"
    )
    if not analysis.hit:
        lines.append("  indexed        no (not a hit)")
    elif not analysis.indexed or analysis.A is None or analysis.cell is None:
        lines.append("  indexed        no")
    else:
        a, b, c, alpha, beta, gamma = analysis.cell
        lines.append(f"  indexed        yes: {analysis.indexed_spots} of {analysis.spot_count} spots")
        lines.append(f"  cell           {a:.2f} {b:.2f} {c:.2f} Å  {alpha:.2f} {beta:.2f} {gamma:.2f}°")
        lines.append(
            f"  refinement     RMSD {analysis.rmsd_mm or 0:.3f} mm, Δψ {analysis.rmsd_delta_psi_degrees or 0:.3f}°, "
            f"domain ≈ {analysis.domain_size or 0:.0f} Å, mosaicity ≈ {analysis.mosaicity_degrees or 0:.3f}°"
        )
        for label, row in zip(("A (1/Å)", "", ""), np.asarray(analysis.A), strict=True):
            lines.append(f"  {label:<14} " + "  ".join(f"{v:+.6f}" for v in row))
        flags = analysis.flag_counts
        lines.append(
            f"  integrated     {analysis.n_integrated} of {flags.get('predicted', 0)} predicted "
            f"(off panel {flags.get('off_panel', 0)}, masked {flags.get('masked', 0)}, "
            f"overloaded {flags.get('overloaded', 0)}, no background {flags.get('no_background', 0)})"
        )
    stages = "  ".join(f"{stage} {analysis.timings[stage] * 1e3:.1f}" for stage in STAGES if stage in analysis.timings)
    lines.append(f"  time (ms)      {stages}  total {total_seconds * 1e3:.1f}")
    return "\n".join(lines)
