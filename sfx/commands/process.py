"""``sfx process``: the whole chain on one machine, without broker or Redis: frames → per-frame analysis in worker
processes → merging → MTZ files, per-frame results and a merging table."""

from __future__ import annotations

import argparse
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

from libs.contracts.messages import FrameResult
from libs.contracts.parameters import AnalysisParameters, ParameterError, with_overrides
from libs.science.formats import FormatError, open_run
from sfx.errors import CommandError
from sfx.offline_merge import finish, make_engine, merge_results
from sfx.options import add_merge_arguments, parse_cell, parse_overrides
from sfx.progress import progress

FRAMES_JSONL = "frames.jsonl"
CHUNK_FRAMES = 8


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "process",
        help="analyse every frame of a run and merge them: MTZ files, per-frame results, merging table",
        description="Run spotfinding, indexing, refinement and integration on every frame of FILES in worker "
        "processes, then scale and merge. Writes frames.jsonl (one FrameResult per line, re-mergeable with "
        "`sfx merge`), merged.mtz, unmerged.mtz and summary.json into --out and prints the per-shell table.",
    )
    parser.add_argument("files", type=Path, nargs="+", help="NXmx master or CXI files of the run")
    add_merge_arguments(parser)
    parser.add_argument("--nproc", type=int, default=1, help="worker processes for the per-frame analysis (1)")
    parser.add_argument("--geometry", type=Path, default=None, help="CrystFEL .geom for CXI files")
    parser.add_argument("--frames", type=int, default=None, help="analyse only the first N frames")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override an analysis parameter (repeatable)"
    )
    parser.set_defaults(handler=run)


class _Worker:
    """Per-process state: the open run and the analysis set-up, made once per process."""

    reader: Any = None
    cell: tuple[float, ...] = ()
    space_group: str = ""
    parameters: AnalysisParameters | None = None
    run_id: str = ""


def _start_worker(
    files: list[Path], geometry: Path | None, cell: tuple[float, ...], space_group: str, overrides: dict[str, Any]
) -> None:
    _Worker.reader = open_run(files, geometry=geometry)
    _Worker.cell = cell
    _Worker.space_group = space_group
    _Worker.parameters = with_overrides(AnalysisParameters(), overrides)
    _Worker.run_id = files[0].stem


def _analyse(indices: list[int]) -> list[str]:
    """FrameResult JSON of each frame; an analysis failure becomes the frame's ``error``, never a crash."""
    from services.analysis.pipeline import process_frame

    reader = _Worker.reader
    assert reader is not None and _Worker.parameters is not None
    lines = []
    for index in indices:
        started = time.time()
        try:
            image = reader.read_frame(index)
            analysis = process_frame(
                image, reader.detector, reader.beam, reader.mask, _Worker.cell, _Worker.space_group, _Worker.parameters
            )
            result = analysis.to_frame_result(_Worker.run_id, "offline", index, started, time.time())
        except Exception as error:  # one bad frame must not stop the run; its reason is kept
            result = FrameResult(
                run_id=_Worker.run_id,
                trial="offline",
                frame_index=index,
                started_at=started,
                finished_at=time.time(),
                error=f"{type(error).__name__}: {error}",
            )
        lines.append(result.model_dump_json())
    return lines


def run(arguments: argparse.Namespace) -> int:
    cell = parse_cell(arguments.cell)
    engine = make_engine(arguments)
    if arguments.nproc < 1:
        raise CommandError(f"--nproc {arguments.nproc}: must be at least 1")
    overrides = parse_overrides(arguments.set)
    try:
        with_overrides(AnalysisParameters(), overrides)
    except ParameterError as error:
        raise CommandError(str(error)) from error
    for path in arguments.files:
        if not path.exists():
            raise CommandError(f"{path}: no such file")
    try:
        with open_run(arguments.files, geometry=arguments.geometry) as reader:
            total = reader.frame_count
    except (FormatError, ValueError) as error:
        raise CommandError(str(error)) from error
    if arguments.frames is not None:
        total = min(total, arguments.frames)
    if total == 0:
        raise CommandError(f"{arguments.files[0]}: the run holds no frames")
    chunks = [list(range(start, min(start + CHUNK_FRAMES, total))) for start in range(0, total, CHUNK_FRAMES)]
    setup = (list(arguments.files), arguments.geometry, cell, arguments.space_group, overrides)
    lines_by_frame: dict[int, str] = {}
    started = time.perf_counter()
    with progress(total, "frames analysed") as show_progress:
        if arguments.nproc == 1:
            _start_worker(*setup)
            for chunk in chunks:
                lines_by_frame.update(zip(chunk, _analyse(chunk), strict=True))
                show_progress(len(lines_by_frame))
            _Worker.reader.close()
        else:
            context = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(
                arguments.nproc, mp_context=context, initializer=_start_worker, initargs=setup
            ) as pool:
                futures = {pool.submit(_analyse, chunk): chunk for chunk in chunks}
                for future in as_completed(futures):
                    lines_by_frame.update(zip(futures[future], future.result(), strict=True))
                    show_progress(len(lines_by_frame))
    elapsed = time.perf_counter() - started
    out: Path = arguments.out
    out.mkdir(parents=True, exist_ok=True)
    ordered = [lines_by_frame[index] for index in range(total)]
    (out / FRAMES_JSONL).write_text("\n".join(ordered) + "\n")
    results = [FrameResult.model_validate_json(line) for line in ordered]
    print(f"analysed {total} frames in {elapsed:.1f} s with {arguments.nproc} process(es)")
    counts = merge_results(engine, results)
    finish(engine, out, counts, dataset_id=arguments.files[0].stem)
    print(f"per-frame results: {out / FRAMES_JSONL}")
    return 0
