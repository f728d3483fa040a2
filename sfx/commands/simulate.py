"""``sfx simulate``: write a simulated SFX run (NXmx or CXI) with its exact ground truth beside it."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import ValidationError

from sfx.errors import CommandError

DESCRIPTION = """\
Simulate a serial femtosecond crystallography run: still frames of randomly oriented microcrystals (a fraction of
them blank) with Bragg spots from a protein-like structure, partiality from bandwidth, divergence and mosaicity,
Lorentz and polarisation factors, a water ring, Poisson noise, masked pixels and panel gaps.
The ground truth (per frame: hit, A matrix, scale, and every reflection's index, true intensity, partiality and
position; plus the true merged intensities and the configuration) goes beside the output as <stem>.truth.h5.
See docs/simulator.md for the physics, the defaults and the file layouts."""

BATCH_FRAMES = 256


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "simulate",
        help="write a simulated SFX run with exact ground truth",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", type=Path, required=True, help="output file (e.g. run.nxs, run.cxi, refl.h5)")
    parser.add_argument("--frames", type=int, required=True, help="number of frames to simulate")
    parser.add_argument("--seed", type=int, default=1, help="random seed; frame i of a seed is always the same (1)")
    parser.add_argument(
        "--hit-fraction", type=float, default=0.4, help="fraction of frames with a crystal (0.4); the rest are blank"
    )
    parser.add_argument(
        "--cell",
        default="79.1 79.1 38.0 90 90 90",
        help='unit cell "a b c alpha beta gamma" in Å and degrees ("79.1 79.1 38.0 90 90 90", lysozyme-like)',
    )
    parser.add_argument("--space-group", default="P 43 21 2", help='space group symbol or number ("P 43 21 2")')
    parser.add_argument(
        "--detector",
        choices=["jungfrau4m", "single"],
        default="jungfrau4m",
        help="jungfrau4m: 8 modules of 1024×512 pixels with gaps; single: one 2048×2048 panel (jungfrau4m)",
    )
    parser.add_argument("--format", choices=["nxmx", "cxi"], default=None, help="file format of the frames (nxmx)")
    parser.add_argument(
        "--compression",
        choices=["none", "bitshuffle-lz4"],
        default=None,
        help="compression of the pixel data (none)",
    )
    parser.add_argument(
        "--live-rate",
        type=float,
        default=None,
        metavar="HZ",
        help="append frames to an SWMR file at this rate, flushing each, as a detector writes a run in progress",
    )
    parser.add_argument(
        "--reflections-only",
        action="store_true",
        help="skip the images: write the per-frame integrated reflections a perfect analysis would produce "
        "(HDF5, see docs/simulator.md); 100,000 frames take about a minute",
    )
    parser.add_argument(
        "--truth",
        choices=["auto", "full", "frames"],
        default="auto",
        help="ground truth per reflection (full) or per frame only (frames); auto: full for images, frames for "
        "--reflections-only (whose file already holds every reflection)",
    )
    parser.add_argument("--wavelength", type=float, default=1.3, help="X-ray wavelength in Å (1.3)")
    parser.add_argument("--distance", type=float, default=100.0, help="sample to detector distance in mm (100)")
    parser.add_argument("--d-min", type=float, default=1.8, help="diffraction limit of the crystals in Å (1.8)")
    parser.set_defaults(handler=run)


def _config(arguments: argparse.Namespace) -> Any:
    from libs.simulator import SimulationConfig

    try:
        cell = tuple(float(value) for value in arguments.cell.replace(",", " ").split())
    except ValueError as error:
        raise CommandError(f"--cell {arguments.cell!r}: {error}") from error
    if len(cell) != 6:
        raise CommandError(f"--cell needs six numbers (a b c alpha beta gamma), got {len(cell)}")
    try:
        return SimulationConfig(
            seed=arguments.seed,
            hit_fraction=arguments.hit_fraction,
            cell=cell,
            space_group=arguments.space_group,
            detector=arguments.detector,
            wavelength=arguments.wavelength,
            distance=arguments.distance,
            d_min=arguments.d_min,
        )
    except ValidationError as error:
        details = "; ".join(
            f"{'.'.join(str(part) for part in item['loc']) or 'configuration'}: {item['msg']}"
            for item in error.errors(include_url=False)
        )
        raise CommandError(f"invalid simulation parameters: {details}") from error


def run(arguments: argparse.Namespace) -> int:
    if arguments.frames < 1:
        raise CommandError(f"--frames must be at least 1, got {arguments.frames}")
    if arguments.live_rate is not None and not arguments.live_rate > 0:
        raise CommandError(f"--live-rate must be positive, got {arguments.live_rate}")
    if arguments.live_rate is not None and arguments.reflections_only:
        raise CommandError("--live-rate writes image frames; it cannot be combined with --reflections-only")
    if arguments.reflections_only and (arguments.format or arguments.compression):
        raise CommandError("--format and --compression apply to image frames, not to --reflections-only")
    file_format: Literal["nxmx", "cxi"] = arguments.format or "nxmx"
    compression: Literal["none", "bitshuffle-lz4"] = arguments.compression or "none"
    out: Path = arguments.out
    if not out.parent.is_dir():
        raise CommandError(f"--out {out}: directory {out.parent} does not exist")
    config = _config(arguments)

    from libs.simulator import Experiment
    from libs.simulator.files import ReflectionRunWriter, TruthWriter, truth_path_for

    experiment = Experiment(config)
    full_truth = arguments.truth == "full" or (arguments.truth == "auto" and not arguments.reflections_only)
    truth_path = truth_path_for(out)
    truth = TruthWriter(truth_path, experiment, None if full_truth else ())
    started = time.perf_counter()
    hits = 0
    if arguments.reflections_only:
        writer = ReflectionRunWriter(out, experiment)
        try:
            for start in range(0, arguments.frames, BATCH_FRAMES):
                batch = experiment.reflection_batch(range(start, min(start + BATCH_FRAMES, arguments.frames)))
                writer.append(batch)
                truth.add_batch(batch)
                hits += int(batch.batch.crystals.hit.sum())
        finally:
            writer.close()
            truth.close()
    else:
        from libs.science.formats import open_run_writer

        live = arguments.live_rate is not None
        run_writer = open_run_writer(
            out,
            file_format,
            detector=experiment.detector,
            beam=experiment.beam,
            mask=experiment.mask,
            compression=compression,
            live=live,
        )
        try:
            for i in range(arguments.frames):
                frame = experiment.frame(i)
                if live:
                    delay = started + i / arguments.live_rate - time.perf_counter()
                    if delay > 0:
                        time.sleep(delay)
                run_writer.append(frame.image)
                truth.add(frame.truth)
                hits += frame.truth.hit
        finally:
            run_writer.close()
            truth.close()
    elapsed = time.perf_counter() - started
    kind = "reflection lists" if arguments.reflections_only else f"{file_format} frames"
    print(
        f"wrote {arguments.frames} {kind} ({hits} hits) to {out} in {elapsed:.1f} s "
        f"({arguments.frames / elapsed:.1f} frames/s); truth: {truth_path}",
        file=sys.stdout,
    )
    return 0
