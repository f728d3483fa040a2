"""Quality of the per-frame analysis against the simulator's ground truth: the figures tests/test_analysis_quality.py
asserts, printed.

Run: ``python -m benchmarks analysis_quality``. 200 frames of the default simulation (lysozyme-like P 43 21 2 on a
Jungfrau-4M-like detector, 40 % hits) and 60 frames on a single-panel detector go through ``process_frame``.

Definitions:
* true I/σ of a reflection = E / sqrt(E + n·b), E its expected counts, b the background per pixel under it and n the
  pixels of the 3σ ellipse of its profile (the simulator's own integration area);
* a found spot matches a reflection when its centroid is within 2 pixels of the reflection's true centre on the same
  panel; spot recall counts reflections with true I/σ ≥ 5 whose centre and ±2 px are valid pixels;
* spurious spots are found spots matching no reflection at all (whatever its strength);
* orientation error: :func:`misorientation_degrees` over the lattice's own symmetry operators;
* intensities: reflections integrated by us and by the truth's Miller index (mapped through the misorientation
  operator), not overloaded, with valid foreground pixels, partiality ≥ 0.5 and true I/σ ≥ 5 ("fully recorded
  strong"). Ours are Lorentz-polarisation corrected, I/(L·P) as the FrameResult carries them; they are compared by
  Pearson correlation with the truth's LP-corrected intensity E/(L·P) = scale · exp(−B/2d²) · partiality · I_true
  (E = expected counts). Our Lorentz factor comes from our own refined width, which is not the simulator's σ (an
  error of ~15 % per reflection that no σ can know of), so the pulls (I − T)/σ, which test the integration and the
  polarisation, use T = E/(L_ours·P_true); our L over the truth's is a figure of its own.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from libs.contracts.parameters import AnalysisParameters
from libs.science.crystal import lattice_operators, misorientation_degrees
from libs.simulator import Experiment, SimulationConfig
from services.analysis.pipeline import process_frame

MATCH_PIXELS = 2.0


@dataclass
class Figures:
    frames: int = 0
    true_hits: int = 0
    correct_class: int = 0
    strong_total: int = 0
    strong_found: int = 0
    spots_found: int = 0
    spots_spurious: int = 0
    indexable: int = 0
    indexable_indexed: int = 0
    indexed_total: int = 0
    wrong_lattice: int = 0
    blank_indexed: int = 0
    misorientations: list[float] = field(default_factory=list)
    cell_errors: list[float] = field(default_factory=list)
    ours: list[float] = field(default_factory=list)
    truth: list[float] = field(default_factory=list)
    sigmas: list[float] = field(default_factory=list)
    truth_with_our_lorentz: list[float] = field(default_factory=list)
    lorentz_ratios: list[float] = field(default_factory=list)

    def pulls(self) -> tuple[float, float] | None:
        """Median and robust spread of (I - T)/σ: how biased and how honest the integrated intensities are."""
        return _pull_summary(self.ours, self.truth_with_our_lorentz, self.sigmas)

    def lorentz_ratio(self) -> tuple[float, float] | None:
        """Median of our Lorentz factor over the truth's, and the spread of its logarithm."""
        if not self.lorentz_ratios:
            return None
        ratios = np.array(self.lorentz_ratios)
        return round(float(np.median(ratios)), 3), round(float(np.std(np.log(ratios))), 3)

    def summary(self, label: str) -> dict[str, Any]:
        return {
            "set": label,
            "frames": self.frames,
            "true hits": self.true_hits,
            "hit/blank correct": round(self.correct_class / self.frames, 4),
            "spot recall (I/σ≥5)": round(self.strong_found / max(self.strong_total, 1), 4),
            "spurious fraction": round(self.spots_spurious / max(self.spots_found, 1), 4),
            "indexing rate (hits with ≥15 strong)": round(self.indexable_indexed / max(self.indexable, 1), 4),
            "indexed of all true hits": f"{len(self.misorientations)}/{self.true_hits}",
            "wrong lattices": self.wrong_lattice,
            "blanks indexed": self.blank_indexed,
            "median orientation error (deg)": round(float(np.median(self.misorientations)), 4)
            if self.misorientations
            else None,
            "max cell error (%)": round(100 * max(self.cell_errors), 3) if self.cell_errors else None,
            "intensity correlation": round(float(np.corrcoef(self.ours, self.truth)[0, 1]), 4)
            if len(self.ours) > 2
            else None,
            "reflections compared": len(self.ours),
            "(I - T)/σ median, spread": self.pulls(),
            "our L / true L median, log spread": self.lorentz_ratio(),
        }


def _pull_summary(ours: list[float], truth: list[float], sigmas: list[float]) -> tuple[float, float] | None:
    if len(ours) < 3:
        return None
    pulls = (np.array(ours) - np.array(truth)) / np.array(sigmas)
    spread = 1.4826 * float(np.median(np.abs(pulls - np.median(pulls))))
    return round(float(np.median(pulls)), 3), round(spread, 3)


def true_i_over_sigma(truth: Any) -> np.ndarray:
    determinant = np.linalg.det(truth.profile_covariance + np.eye(2)[None] / 12.0)
    area = np.maximum(4.0, np.round(np.pi * 9.0 * np.sqrt(determinant)))
    expected = truth.expected_counts
    return expected / np.sqrt(expected + area * truth.background_per_pixel)  # type: ignore[no-any-return,unused-ignore]


def centre_valid(mask: np.ndarray, truth: Any) -> np.ndarray:
    _, n_slow, n_fast = mask.shape
    keep = np.ones(len(truth.miller), dtype=bool)
    for d_fast, d_slow in ((0, 0), (2, 0), (-2, 0), (0, 2), (0, -2)):
        fast = np.floor(truth.fast).astype(int) + d_fast
        slow = np.floor(truth.slow).astype(int) + d_slow
        inside = (fast >= 0) & (fast < n_fast) & (slow >= 0) & (slow < n_slow)
        keep &= inside & mask[truth.panel, np.clip(slow, 0, n_slow - 1), np.clip(fast, 0, n_fast - 1)]
    return keep


def evaluate(config: SimulationConfig, n_frames: int, parameters: AnalysisParameters | None = None) -> Figures:
    experiment = Experiment(config)
    parameters = parameters or AnalysisParameters()
    operators = lattice_operators(config.cell)
    figures = Figures()
    for index in range(n_frames):
        frame = experiment.frame(index)
        truth = frame.truth
        analysis = process_frame(
            frame.image,
            experiment.detector,
            experiment.beam,
            experiment.mask,
            config.cell,
            config.space_group,
            parameters,
        )
        figures.frames += 1
        figures.correct_class += int(analysis.hit == truth.hit)
        figures.true_hits += int(truth.hit)
        spots = analysis.spots
        i_over_sigma = np.zeros(len(truth.miller))
        figures.spots_found += len(spots)
        matched_reflection = np.zeros(len(truth.miller), dtype=bool)
        if len(spots):
            spurious = np.ones(len(spots), dtype=bool)
            for k in range(len(spots)):
                same_panel = truth.panel == spots.panel[k]
                distance = np.hypot(truth.fast - spots.fast[k], truth.slow - spots.slow[k])
                close = same_panel & (distance <= MATCH_PIXELS)
                if close.any():
                    spurious[k] = False
                    matched_reflection |= close
            figures.spots_spurious += int(spurious.sum())
        if truth.hit and len(truth.miller):
            i_over_sigma = true_i_over_sigma(truth)
            strong = (i_over_sigma >= 5) & centre_valid(experiment.mask, truth)
            figures.strong_total += int(strong.sum())
            figures.strong_found += int((strong & matched_reflection).sum())
            if strong.sum() >= 15:
                figures.indexable += 1
                figures.indexable_indexed += int(analysis.indexed)
        if analysis.indexed and analysis.A is not None and analysis.cell is not None:
            figures.indexed_total += 1
            if not truth.hit or truth.A is None:
                figures.blank_indexed += 1
                continue
            angle, operator = misorientation_degrees(analysis.A, truth.A, operators)
            if angle > 1.0:
                figures.wrong_lattice += 1
                continue
            figures.misorientations.append(angle)
            assert truth.cell is not None
            true_cell = np.array(truth.cell[:3])
            figures.cell_errors.append(float(np.max(np.abs(np.array(analysis.cell[:3]) / true_cell - 1))))
            _collect_intensities(analysis, truth, operator, i_over_sigma, experiment.mask, figures)
    return figures


def _collect_intensities(
    analysis: Any, truth: Any, operator: np.ndarray, i_over_sigma: np.ndarray, mask: np.ndarray, figures: Figures
) -> None:
    """Pair our integrated reflections with the truth's by Miller index (ours mapped into the truth's setting)."""
    integrated = analysis.integration
    ok = integrated.integrated
    # A_found·R ≈ A_true, so the truth's index of our h is R⁻¹·h.
    ours_h = np.rint(integrated.predictions.miller[ok] @ np.linalg.inv(operator).T).astype(int)
    ours_i = integrated.corrected_intensity[ok]
    ours_sigma = integrated.corrected_sigma[ok]
    ours_lorentz = integrated.predictions.lorentz[ok]
    lookup = {tuple(h): k for k, h in enumerate(ours_h)}
    good = (
        (i_over_sigma >= 5)
        & (truth.partiality >= 0.5)
        & ~truth.overloaded
        & (truth.fraction_valid >= 0.999)
        & centre_valid(mask, truth)
    )
    for k in np.flatnonzero(good):
        position = lookup.get(tuple(int(x) for x in truth.miller[k]))
        if position is not None:
            figures.ours.append(float(ours_i[position]))
            figures.sigmas.append(float(ours_sigma[position]))
            expected = float(truth.expected_counts[k])
            figures.truth.append(expected / float(truth.lorentz[k] * truth.polarisation[k]))
            figures.truth_with_our_lorentz.append(expected / float(ours_lorentz[position] * truth.polarisation[k]))
            figures.lorentz_ratios.append(float(ours_lorentz[position] / truth.lorentz[k]))


def multi_panel_figures() -> Figures:
    """200 frames of the default simulation (Jungfrau-4M-like detector)."""
    return evaluate(SimulationConfig(seed=7), 200)


def single_panel_figures() -> Figures:
    """60 frames on a single-panel detector."""
    return evaluate(SimulationConfig(seed=11, detector="single"), 60)


def main() -> None:
    for label, measure in (("multi_panel", multi_panel_figures), ("single_panel", single_panel_figures)):
        print(f"[analysis quality] {json.dumps(measure().summary(label), ensure_ascii=False)}", flush=True)
