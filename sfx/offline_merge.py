"""Offline merging of per-frame results into MTZ files, a summary and a table (``sfx merge`` and ``sfx process``)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from libs.contracts.messages import FrameResult, MessageError, decode_message
from libs.science.crystal import SymmetryError
from services.merger.engine import MergingEngine, MergingParameters
from services.merger.mtz import write_merge_outputs
from services.merger.statistics import format_table
from sfx.errors import CommandError
from sfx.options import parse_cell

MERGED_MTZ = "merged.mtz"
UNMERGED_MTZ = "unmerged.mtz"
SUMMARY_JSON = "summary.json"
BATCH_FRAMES = 500


def make_engine(arguments: argparse.Namespace) -> MergingEngine:
    """The merging engine the options of ``add_merge_arguments`` describe."""
    cell = parse_cell(arguments.cell)
    settings: dict[str, Any] = {"n_shells": arguments.shells}
    if arguments.d_min is not None:
        settings["d_min"] = arguments.d_min
    if arguments.no_partiality_correction:
        settings["partiality_correction"] = False
    try:
        return MergingEngine(cell, arguments.space_group, MergingParameters(**settings))
    except (SymmetryError, ValueError) as error:
        raise CommandError(str(error)) from error


def read_results(paths: Iterable[Path]) -> Iterator[FrameResult]:
    """Every FrameResult of the files, in order; a bad line stops with its file and line number."""
    for path in paths:
        if not path.is_file():
            raise CommandError(f"{path}: no such file")
        with path.open() as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    yield decode_message(line, FrameResult)
                except MessageError as error:
                    raise CommandError(f"{path}:{number}: {error}") from error


def merge_results(engine: MergingEngine, results: Iterable[FrameResult]) -> dict[str, Any]:
    """Feed results to the engine in batches; returns counts and the rejection reasons."""
    counts = {"frames": 0, "hits": 0, "indexed": 0, "duplicates": 0, "errors": 0}
    rejected: list[str] = []
    batch: list[FrameResult] = []

    def flush() -> None:
        report = engine.add_frames(batch)
        counts["duplicates"] += report.duplicates
        rejected.extend(str(rejection) for rejection in report.rejected)
        batch.clear()

    for result in results:
        counts["frames"] += 1
        counts["hits"] += int(result.hit)
        counts["indexed"] += int(result.indexed)
        counts["errors"] += int(result.error is not None)
        batch.append(result)
        if len(batch) >= BATCH_FRAMES:
            flush()
    if batch:
        flush()
    return {**counts, "rejected": rejected}


def finish(engine: MergingEngine, out: Path, counts: dict[str, Any], dataset_id: str) -> dict[str, Any]:
    """Full re-scale, MTZ files, summary JSON and the printed table."""
    if engine.frames_merged == 0:
        reasons = "; ".join(counts["rejected"][:3])
        raise CommandError(
            f"no frame could be merged ({counts['frames']} frames, {counts['indexed']} indexed)"
            + (f": {reasons}" if reasons else "")
        )
    engine.rescale()
    out.mkdir(parents=True, exist_ok=True)
    merged_path, unmerged_path = out / MERGED_MTZ, out / UNMERGED_MTZ
    reflections = write_merge_outputs(engine, merged_path, unmerged_path)
    statistics = engine.statistics()
    update = engine.merge_update(dataset_id, "offline", mtz_path=str(merged_path.resolve()), final=True)
    summary = {
        "merge": json.loads(update.model_dump_json()),
        "frames": {key: value for key, value in counts.items() if key != "rejected"},
        "frames_merged": engine.frames_merged,
        "rejections": counts["rejected"],
        "merged_reflections": reflections,
        "error_model": engine.error_model.model_dump(),
        "unmerged_mtz": str(unmerged_path.resolve()),
        "merged_mtz": str(merged_path.resolve()),
    }
    (out / SUMMARY_JSON).write_text(json.dumps(summary, indent=2) + "\n")
    print(format_table(statistics))
    fraction = engine.ambiguity_resolved_fraction()
    if fraction is not None:
        print(f"indexing ambiguity: {100 * fraction:.1f}% of frames resolved clearly")
    print(
        f"frames: {counts['frames']} read, {counts['indexed']} indexed, {engine.frames_merged} merged, "
        f"{engine.frames_rejected} rejected; error model SDFAC {engine.error_model.sdfac:.2f} "
        f"SDADD {engine.error_model.sdadd:.3f}"
    )
    print(f"wrote {merged_path}, {unmerged_path}, {out / SUMMARY_JSON}")
    return summary
