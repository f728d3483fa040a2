"""One frame through every stage: spotfinding → hit finding → indexing → refinement → integration.

:func:`process_frame` is what the analysis ranks and the offline ``sfx process`` call for each frame. Work that is
the same for every frame of a run (the mask's window counts, the work buffers) is kept in an
:class:`AnalysisContext`, made on first use and reused while detector, mask, beam and parameters stay the same.
A context holds work buffers: use one per process or thread (the MPI ranks are processes). Pure computation: no
I/O, no bus.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from libs.contracts.messages import FrameResult, ReflectionTable
from libs.contracts.parameters import AnalysisParameters, IntegrationParameters
from libs.science.crystal import check_cell_fits_space_group, space_group
from libs.science.geometry import Beam, Detector, scattering_vectors
from services.analysis.hitfinding import classify
from services.analysis.indexing import index_known_cell, index_with
from services.analysis.integration import IntegratedReflections, integrate, predict, spot_profile_sigma
from services.analysis.refinement import RefinementResult, refine
from services.analysis.spotfinding import SpotFinder, SpotfindingError, SpotList

STAGES = ("spotfinding", "hitfinding", "indexing", "refinement", "integration")


class AnalysisError(ValueError):
    """Inputs the analysis cannot work with (shapes, cell, space group, resolution limits); the text names them."""


@dataclass
class FrameAnalysis:
    """What the analysis found on one frame."""

    spot_count: int
    hit: bool
    indexed: bool
    A: np.ndarray | None
    cell: tuple[float, float, float, float, float, float] | None
    resolution_estimate: float | None
    timings: dict[str, float]
    spots: SpotList
    reflections: ReflectionTable | None = None
    indexed_spots: int = 0
    rmsd_mm: float | None = None
    rmsd_delta_psi_degrees: float | None = None
    domain_size: float | None = None
    mosaicity_degrees: float | None = None
    integration: IntegratedReflections | None = None
    flag_counts: dict[str, int] = field(default_factory=dict)

    @property
    def n_integrated(self) -> int:
        return 0 if self.reflections is None else len(self.reflections)

    def to_frame_result(
        self,
        run_id: str,
        trial: str,
        frame_index: int,
        started_at: float,
        finished_at: float,
        job_id: str = "",
        rank: int = 0,
    ) -> FrameResult:
        """The message the analysis publishes for this frame."""
        matrix = None
        if self.A is not None:
            matrix = tuple(tuple(float(v) for v in row) for row in self.A)
        return FrameResult(
            run_id=run_id,
            trial=trial,
            frame_index=frame_index,
            job_id=job_id,
            started_at=started_at,
            finished_at=finished_at,
            rank=rank,
            spot_count=self.spot_count,
            hit=self.hit,
            indexed=self.indexed,
            A=matrix,
            cell=self.cell,
            resolution_estimate=self.resolution_estimate,
            timings=dict(self.timings),
            reflections=self.reflections,
        )


class AnalysisContext:
    """Per-run state reused across frames: the spot finder with its mask-dependent precomputation."""

    def __init__(self, detector: Detector, beam: Beam, mask: np.ndarray, parameters: AnalysisParameters) -> None:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != detector.frame_shape:
            raise AnalysisError(f"mask has shape {mask.shape}, the detector's frames have {detector.frame_shape}")
        self.detector = detector
        self.beam = beam
        self.mask = mask
        self.parameters = parameters
        try:
            self.spot_finder = SpotFinder(detector, beam, mask, parameters.spotfinding)
        except SpotfindingError as error:  # e.g. resolution limits that no pixel of this detector meets
            raise AnalysisError(str(error)) from error
        self.key = context_key(detector, beam, mask, parameters)


def context_key(detector: Detector, beam: Beam, mask: np.ndarray, parameters: AnalysisParameters) -> tuple[object, ...]:
    """Identity of what an AnalysisContext depends on (the mask by a checksum of its bits)."""
    mask_sum = zlib.crc32(np.packbits(np.asarray(mask, dtype=bool)).tobytes())
    return (detector.model_dump_json(), beam.model_dump_json(), mask.shape, mask_sum, parameters.model_dump_json())


_contexts: dict[tuple[object, ...], AnalysisContext] = {}


def get_context(detector: Detector, beam: Beam, mask: np.ndarray, parameters: AnalysisParameters) -> AnalysisContext:
    """The cached context for these inputs (a few are kept: one per run and trial in flight)."""
    key = context_key(detector, beam, mask, parameters)
    context = _contexts.get(key)
    if context is None:
        if len(_contexts) >= 4:
            _contexts.pop(next(iter(_contexts)))
        context = AnalysisContext(detector, beam, mask, parameters)
        _contexts[key] = context
    return context


def _check_inputs(image: np.ndarray, detector: Detector, cell: Sequence[float], symbol: str) -> None:
    if image.shape != detector.frame_shape:
        raise AnalysisError(f"image has shape {image.shape}, the detector's frames have {detector.frame_shape}")
    try:
        check_cell_fits_space_group(cell, space_group(symbol))
    except ValueError as error:
        raise AnalysisError(f"cell/space group: {error}") from error


def process_frame(
    image: np.ndarray,
    detector: Detector,
    beam: Beam,
    mask: np.ndarray,
    cell: Sequence[float],
    space_group: str,
    parameters: AnalysisParameters,
    context: AnalysisContext | None = None,
) -> FrameAnalysis:
    """Analyse one frame (n_panels, n_slow, n_fast) with a known cell and space group."""
    image = np.asarray(image)
    known_cell = tuple(float(x) for x in cell)
    _check_inputs(image, detector, known_cell, space_group)
    if context is None:
        context = get_context(detector, beam, mask, parameters)
    timings: dict[str, float] = {}

    start = time.perf_counter()
    found = context.spot_finder.find(image)
    spots = found.spots
    timings["spotfinding"] = time.perf_counter() - start

    start = time.perf_counter()
    decision = classify(spots.d_spacing, parameters.hitfinding)
    timings["hitfinding"] = time.perf_counter() - start
    analysis = FrameAnalysis(
        spot_count=decision.spot_count,
        hit=decision.hit,
        indexed=False,
        A=None,
        cell=None,
        resolution_estimate=decision.resolution_estimate,
        timings=timings,
        spots=spots,
    )
    if not decision.hit:
        return analysis

    start = time.perf_counter()
    order = np.argsort(-spots.intensity, kind="stable")[: parameters.indexing.max_spots]
    r = scattering_vectors(spots.lab[order], beam.wavelength)
    solution = index_known_cell(r, known_cell, space_group, parameters.indexing)
    timings["indexing"] = time.perf_counter() - start
    if solution is None:
        return analysis

    start = time.perf_counter()
    pixel_size = detector.panels[0].pixel_size
    refined = _refine_and_reindex(solution.A, r, spots.lab[order], beam, space_group, parameters, pixel_size)
    timings["refinement"] = time.perf_counter() - start
    if refined is None:
        return analysis
    result, n_indexed = refined
    analysis.indexed = True
    analysis.A = result.A
    analysis.cell = result.cell
    analysis.indexed_spots = n_indexed
    analysis.rmsd_mm = result.rmsd_mm
    analysis.rmsd_delta_psi_degrees = result.rmsd_delta_psi_degrees
    analysis.domain_size = result.width.domain_size
    analysis.mosaicity_degrees = float(np.degrees(result.width.mosaic))

    start = time.perf_counter()
    integration = _integration_parameters(parameters, image, context.mask, spots)
    predictions = predict(result.A, known_cell, detector, beam, result.width, integration)
    integrated = integrate(
        image, context.mask, found.strong, predictions, integration, gain=parameters.spotfinding.gain
    )
    ok = integrated.integrated
    analysis.integration = integrated
    analysis.reflections = ReflectionTable.from_columns(
        miller=predictions.miller[ok],
        intensity=integrated.corrected_intensity[ok],
        sigma=integrated.corrected_sigma[ok],
        partiality=predictions.partiality[ok],
    )
    analysis.flag_counts = {
        "predicted": len(predictions),
        "integrated": int(ok.sum()),
        "off_panel": int(np.count_nonzero(integrated.flags & 1)),
        "masked": int(np.count_nonzero(integrated.flags & 2)),
        "overloaded": int(np.count_nonzero(integrated.flags & 4)),
        "no_background": int(np.count_nonzero(integrated.flags & 8)),
    }
    timings["integration"] = time.perf_counter() - start
    return analysis


def _integration_parameters(
    parameters: AnalysisParameters, image: np.ndarray, mask: np.ndarray, spots: SpotList
) -> IntegrationParameters:
    """The integration parameters for this frame: radii widened when its spots are broad (adaptive_radius)."""
    integration = parameters.integration
    if not integration.adaptive_radius or len(spots) == 0:
        return integration
    sigma = spot_profile_sigma(image, mask, spots.panel, spots.fast, spots.slow)
    if sigma is None:
        return integration
    # Three σ of the major axis hold ~99 % of a Gaussian spot; never shrink below the configured radius.
    radius = min(3.0 * sigma, 10.0)
    if radius <= integration.foreground_radius:
        return integration
    ring = integration.background_radius - integration.foreground_radius
    return integration.model_copy(update={"foreground_radius": radius, "background_radius": radius + ring})


def _refine_and_reindex(
    A: np.ndarray,
    r: np.ndarray,
    lab: np.ndarray,
    beam: Beam,
    symbol: str,
    parameters: AnalysisParameters,
    pixel_size: float,
) -> tuple[RefinementResult, int] | None:
    """Refine on the indexed spots, re-index every spot with the better model, refine again; None if rejected."""
    tolerance = parameters.indexing.hkl_tolerance
    result: RefinementResult | None = None
    previous: tuple[np.ndarray, np.ndarray] | None = None
    for _ in range(2):
        miller, indexed, _ = index_with(A, r, tolerance)
        if indexed.sum() < parameters.indexing.min_indexed:
            return None
        if previous is not None and np.array_equal(previous[0], indexed) and np.array_equal(previous[1], miller):
            break  # the refined model indexes the same spots the same way: refining again changes nothing
        result = refine(A, miller[indexed], lab[indexed], beam.s0, symbol, parameters.refinement)
        A, previous = result.A, (indexed, miller)
    assert result is not None
    n_indexed = int(result.used.sum())
    if n_indexed < parameters.indexing.min_indexed or n_indexed < parameters.indexing.min_indexed_fraction * len(r):
        return None
    if result.rmsd_mm > parameters.indexing.max_rmsd_pixels * pixel_size:
        return None
    return result, n_indexed
