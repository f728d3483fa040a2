"""Merging: ASU mapping, ambiguity, error model, French–Wilson, the streaming engine and bad input."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import gemmi
import numpy as np
import pytest

from libs.contracts.messages import FrameResult, ReflectionTable, decode_message
from libs.science.crystal import reciprocal_space_operators, space_group
from libs.simulator import Experiment, SimulationConfig
from services.merger.ambiguity import reindexing_modes
from services.merger.asu import AsuMapper
from services.merger.engine import MergingEngine, MergingParameters
from services.merger.error_model import fit_error_model
from services.merger.french_wilson import french_wilson
from services.merger.statistics import format_table
from sfx.cli import main
from tests.support.merging_data import frame_result, simulated_results, synthetic_run

TETRAGONAL = (79.1, 79.1, 38.0, 90.0, 90.0, 90.0)


def correlation_with_truth(engine: MergingEngine, mapper: AsuMapper, truth: np.ndarray) -> float:
    merged = engine.merged()
    index = mapper.lookup(merged.miller)
    return float(np.corrcoef(merged.intensity, truth[index])[0, 1])


@pytest.mark.parametrize(
    ("symbol", "cell"),
    [
        ("P 43 21 2", TETRAGONAL),
        ("P 61", (100.0, 100.0, 50.0, 90.0, 90.0, 120.0)),
        ("C 2", (60.0, 40.0, 50.0, 90.0, 105.0, 90.0)),
        ("R 3", (80.0, 80.0, 90.0, 90.0, 90.0, 120.0)),
    ],
)
def test_asu_mapping_agrees_with_gemmi_and_inverts(symbol: str, cell: tuple[float, ...]) -> None:
    group = space_group(symbol)
    mapper = AsuMapper(group, cell, 3.0)
    rng = np.random.default_rng(1)
    miller = rng.integers(-8, 9, size=(400, 3))
    asu_index, isym = mapper.map(miller)
    reference = gemmi.ReciprocalAsu(group)
    ops = group.operations()
    checked = 0
    for hkl, index, code in zip(miller, asu_index, isym, strict=True):
        if index < 0:
            continue
        expected_hkl, expected_isym = reference.to_asu([int(v) for v in hkl], ops)
        assert list(mapper.miller[index]) == list(expected_hkl)
        assert code == expected_isym
        checked += 1
    assert checked > 100
    mapped = asu_index >= 0
    back = mapper.original_miller(asu_index[mapped], isym[mapped])
    assert np.array_equal(back, miller[mapped])


def test_reindexing_modes_count_the_cosets_of_the_point_group_in_the_lattice() -> None:
    assert len(reindexing_modes(TETRAGONAL, space_group("P 43 21 2"))) == 1
    assert len(reindexing_modes(TETRAGONAL, space_group("P 43"))) == 2
    assert len(reindexing_modes((100.0, 100.0, 50.0, 90, 90, 120), space_group("P 61"))) == 2
    assert len(reindexing_modes((60.0, 60.0, 100.0, 90, 90, 120), space_group("P 31 2 1"))) == 2
    assert len(reindexing_modes((60.0, 60.0, 100.0, 90, 90, 120), space_group("P 3"))) == 4


def test_error_model_recovers_the_scatter_it_was_given() -> None:
    rng = np.random.default_rng(2)
    n_reflections, multiplicity = 3000, 8
    truth = rng.exponential(500.0, n_reflections)
    asu = np.repeat(np.arange(n_reflections), multiplicity)
    sigma = np.sqrt(truth[asu] + 30.0)
    true_sdfac, true_sdadd = 1.5, 0.08
    actual = true_sdfac * np.sqrt(sigma**2 + (true_sdadd * truth[asu]) ** 2)
    intensity = truth[asu] + rng.normal(size=asu.size) * actual
    model = fit_error_model(asu, intensity, sigma, n_reflections)
    assert model.sdfac == pytest.approx(true_sdfac, rel=0.1)
    assert model.sdadd == pytest.approx(true_sdadd, rel=0.25)


def test_french_wilson_limits_and_centric_prior() -> None:
    strong_i = np.array([10000.0, 2500.0])
    strong_f, strong_sigf = french_wilson(strong_i, np.array([50.0, 25.0]), np.array([3000.0, 3000.0]), np.zeros(2))
    assert strong_f == pytest.approx(np.sqrt(strong_i), rel=2e-3)
    assert strong_sigf == pytest.approx(np.array([50.0, 25.0]) / (2 * np.sqrt(strong_i)), rel=0.05)
    weak = np.array([-30.0, -30.0, 0.0, 0.0])
    f, sigf = french_wilson(weak, np.full(4, 10.0), np.full(4, 100.0), np.array([False, True, False, True]))
    assert np.all(f > 0) and np.all(sigf > 0)
    # Negative measurements pull F below the zero-intensity estimate; the centric prior favours smaller F.
    assert f[0] < f[2] and f[1] < f[3]
    assert f[1] < f[0] and f[3] < f[2]
    # Posterior mean of F for I = 0 acentric with σ → 0 and Σ = 100 tends to 0; with σ = 10 it is a few units.
    assert 1.0 < f[2] < 6.0


def test_streaming_merge_matches_truth_and_improves_with_frames() -> None:
    run = synthetic_run(600, per_frame=200, seed=3)
    engine = MergingEngine(TETRAGONAL, "P 43 21 2", MergingParameters(d_min=2.0, bootstrap_frames=50))
    history = []
    for start in range(0, 600, 100):
        report = engine.add_frames(run.frames[start : start + 100])
        assert report.accepted == 100 and not report.rejected
        history.append(correlation_with_truth(engine, run.mapper, run.true_intensity))
    assert history[-1] > history[0]
    assert history[-1] > 0.99
    statistics = engine.statistics()
    assert statistics.overall.observations == engine.observations
    assert statistics.overall.cc_half is not None and statistics.overall.cc_half > 0.95
    assert statistics.shells[-1].cc_half is not None
    assert 0.9 < statistics.overall.completeness <= 1.0
    assert "CC1/2" in format_table(statistics)
    # The scales are recovered up to one overall factor: the frames' true scales are not known here, but a
    # full re-scale from the stored observations must not change a good merge.
    before = correlation_with_truth(engine, run.mapper, run.true_intensity)
    engine.rescale()
    engine.rescale()
    assert correlation_with_truth(engine, run.mapper, run.true_intensity) == pytest.approx(before, abs=0.002)


def test_frames_reaching_past_the_diffraction_limit_are_kept() -> None:
    """Shells of pure noise (mean intensity about zero) must not make good frames look anti-correlated."""
    run = synthetic_run(300, per_frame=250, d_min=1.6, diffraction_limit=2.2, seed=8)
    engine = MergingEngine(TETRAGONAL, "P 43 21 2", MergingParameters(d_min=1.6))
    for start in range(0, 300, 100):
        engine.add_frames(run.frames[start : start + 100])
    engine.rescale()
    assert engine.frames_rejected == 0
    merged = engine.merged()
    index = run.mapper.lookup(merged.miller)
    inside = merged.d >= 2.2
    assert np.corrcoef(merged.intensity[inside], run.true_intensity[index][inside])[0, 1] > 0.99


def test_duplicates_are_counted_once() -> None:
    run = synthetic_run(120, per_frame=150, seed=4)
    engine = MergingEngine(TETRAGONAL, "P 43 21 2", MergingParameters(d_min=2.0, bootstrap_frames=50))
    engine.add_frames(run.frames[:80])
    observations = engine.observations
    report = engine.add_frames(run.frames[40:80])
    assert report.duplicates == 40 and report.accepted == 0
    assert engine.observations == observations
    assert engine.frames_merged == 80


def test_bad_frames_are_rejected_with_reasons_and_do_not_poison_the_merge() -> None:
    run = synthetic_run(300, per_frame=200, seed=5)
    good = run.frames
    clean = MergingEngine(TETRAGONAL, "P 43 21 2", MergingParameters(d_min=2.0))
    clean.add_frames(good)
    reference_cc = correlation_with_truth(clean, run.mapper, run.true_intensity)

    table = good[0].reflections
    assert table is not None
    wrong_cell = (85.0, 79.1, 38.0, 90.0, 90.0, 90.0)
    nan_intensity = np.array(table.intensity, dtype=np.float32)
    nan_intensity[3] = np.nan
    rng = np.random.default_rng(6)

    def garbage(source: ReflectionTable | None) -> ReflectionTable:
        """A frame of noise where a real one predicted reflections."""
        assert source is not None
        noise = np.asarray(rng.exponential(2000.0, source.miller.shape[0]))
        return ReflectionTable.from_columns(source.miller, noise, source.sigma, source.partiality)

    empty = ReflectionTable.from_columns(np.zeros((0, 3)), np.zeros(0), np.zeros(0), np.zeros(0))
    bad = [
        frame_result(1000, wrong_cell, table),
        frame_result(1001, TETRAGONAL, table.model_copy(update={"intensity": nan_intensity})),
        frame_result(1002, TETRAGONAL, empty),
    ] + [frame_result(2000 + i, TETRAGONAL, garbage(good[200 + i].reflections)) for i in range(20)]
    engine = MergingEngine(TETRAGONAL, "P 43 21 2", MergingParameters(d_min=2.0))
    engine.add_frames(good[:150])
    report = engine.add_frames(bad + good[150:])
    reasons = {rejection.key[2]: str(rejection) for rejection in report.rejected}
    assert "cell a = 85.00 Å" in reasons[1000]
    assert "non-finite intensity" in reasons[1001]
    assert "empty frame" in reasons[1002]
    engine.rescale()
    # The garbage frames correlate with nothing and are dropped by the frame CC test.
    assert engine.frames_rejected >= 3 + 17
    assert correlation_with_truth(engine, run.mapper, run.true_intensity) == pytest.approx(reference_cc, abs=0.003)
    assert np.isfinite(engine.merged().intensity).all()


def test_engine_refuses_a_cell_that_breaks_the_space_group() -> None:
    with pytest.raises(ValueError, match="not compatible"):
        MergingEngine((79.1, 70.0, 38.0, 90, 90, 90), "P 43 21 2")
    with pytest.raises(ValueError, match="unknown space group"):
        MergingEngine(TETRAGONAL, "P 99")


@pytest.mark.parametrize(("symbol", "cell"), [("P 43", TETRAGONAL), ("P 61", (100.0, 100.0, 50.0, 90, 90, 120))])
def test_ambiguity_is_resolved_consistently_on_synthetic_frames(symbol: str, cell: tuple[float, ...]) -> None:
    run = synthetic_run(400, symbol=symbol, cell=cell, per_frame=150, ambiguous=True, seed=7)
    engine = MergingEngine(cell, symbol, MergingParameters(d_min=2.0))
    for start in range(0, 400, 100):
        engine.add_frames(run.frames[start : start + 100])
    found = np.array([engine.frame_modes()[frame.key] for frame in run.frames])
    agreement = float(np.mean(found == run.true_modes))
    assert max(agreement, 1 - agreement) >= 0.98
    fraction = engine.ambiguity_resolved_fraction()
    assert fraction is not None and fraction > 0.9


# ------------------------------------------------------------------------------------------------------------------
# Against the simulator's ground truth (reflection-level mode)


def truth_by_asu(engine: MergingEngine, experiment: Experiment) -> np.ndarray:
    """The simulator's true merged intensity of every ASU reflection of the engine (NaN where it has none)."""
    miller, intensity = experiment.true_merged_intensities()
    truth = np.full(engine.mapper.size, np.nan)
    index = engine.mapper.lookup(miller)
    truth[index[index >= 0]] = intensity[index >= 0]
    return truth


def merged_vs_truth(engine: MergingEngine, truth: np.ndarray, d_low: float = 1e9, d_high: float = 0.0) -> float:
    merged = engine.merged()
    index = engine.mapper.lookup(merged.miller)
    select = (merged.d <= d_low) & (merged.d > d_high) & np.isfinite(truth[index])
    return float(np.corrcoef(merged.intensity[select], truth[index][select])[0, 1])


def best_setting_cc(engine: MergingEngine, truth: np.ndarray) -> float:
    """CC with the truth in whichever indexing mode the whole merge settled (any mode is a consistent answer)."""
    merged = engine.merged()
    best = -1.0
    for operator in engine.modes:
        index, _ = engine.mapper.map(merged.miller.astype(np.int64) @ operator.T)
        select = (index >= 0) & np.isfinite(truth[np.maximum(index, 0)])
        cc = float(np.corrcoef(merged.intensity[select], truth[index[select]])[0, 1])
        best = max(best, cc)
    return best


@pytest.mark.slow  # 2000 simulated frames, ~15 s
def test_two_thousand_simulated_frames_merge_to_the_true_intensities() -> None:
    experiment = Experiment(SimulationConfig(seed=11, hit_fraction=1.0))
    config = experiment.config
    engine = MergingEngine(config.cell, config.space_group, MergingParameters(d_min=config.d_min))
    truth = truth_by_asu(engine, experiment)
    history = []
    for start in range(0, 2000, 250):
        results, _ = simulated_results(experiment, range(start, start + 250))
        report = engine.add_frames(results)
        assert not report.rejected
        history.append(merged_vs_truth(engine, truth))
    engine.rescale()
    statistics = engine.statistics(d_min=config.d_min)
    top = statistics.shells[-1]
    overall_cc = merged_vs_truth(engine, truth)
    top_cc = merged_vs_truth(engine, truth, d_low=top.d_max, d_high=top.d_min * (1 - 1e-6))
    print(
        f"CC to truth while streaming: {np.round(history, 4)}; after re-scale {overall_cc:.4f}, {top_cc:.3f} "
        f"in {top.d_max:.2f}-{top.d_min:.2f} Å"
    )
    assert engine.frames_merged >= 1990
    assert overall_cc >= 0.95
    assert top_cc >= 0.8
    assert history[-1] > history[0]
    assert all(later >= earlier - 0.002 for earlier, later in itertools.pairwise(history))
    assert statistics.overall.completeness > 0.99
    assert top.cc_half is not None and top.cc_half > 0.3


@pytest.mark.slow  # simulated frames of an ambiguous lattice, ~20 s
def test_ambiguous_space_group_frames_get_consistent_modes() -> None:
    experiment = Experiment(SimulationConfig(seed=12, hit_fraction=1.0, space_group="P 43"))
    config = experiment.config
    frames = range(2000)
    results, truths = simulated_results(experiment, frames)
    engine = MergingEngine(config.cell, config.space_group, MergingParameters(d_min=config.d_min))
    assert len(engine.modes) == 2
    for start in range(0, 2000, 250):
        engine.add_frames(results[start : start + 250])
    engine.rescale()
    # A frame is consistent when its chosen mode composed with the indexer's operator lands in one coset for all.
    point_group = reciprocal_space_operators(engine.space_group)
    modes = engine.frame_modes()

    def coset(matrix: np.ndarray) -> int:
        for number, mode in enumerate(engine.modes):
            if any(np.array_equal(matrix, mode @ p) for p in point_group):
                return number
        raise AssertionError(f"{matrix.tolist()} is not a lattice symmetry")

    cosets = np.array(
        [coset(engine.modes[modes[r.key]] @ t.indexing_operator) for r, t in zip(results, truths, strict=True)]
    )
    consistent = float(np.max(np.bincount(cosets)) / cosets.size)
    truth = truth_by_asu(engine, experiment)
    cc = best_setting_cc(engine, truth)

    reference_results, _ = simulated_results(experiment, frames, true_setting=True)
    reference = MergingEngine(
        config.cell, config.space_group, MergingParameters(d_min=config.d_min, resolve_ambiguity=False)
    )
    reference.add_frames(reference_results)
    reference.rescale()
    reference_cc = merged_vs_truth(reference, truth)
    fraction = engine.ambiguity_resolved_fraction()
    print(f"consistent modes {consistent:.4f}, resolved fraction {fraction}, CC {cc:.4f} vs {reference_cc:.4f}")
    assert consistent >= 0.98
    assert fraction is not None and fraction >= 0.9
    assert cc >= reference_cc - 0.02


# ------------------------------------------------------------------------------------------------------------------
# The whole chain: simulated images → real per-frame analysis → merge (sfx process), then sfx merge again


@pytest.mark.slow  # sfx process over MPI, ~15 s
def test_sfx_process_merges_what_the_per_frame_analysis_found(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_file = tmp_path / "run.nxs"
    simulate = [
        "simulate", "--out", str(run_file), "--frames", "24", "--hit-fraction", "1.0", "--seed", "31",
        "--compression", "bitshuffle-lz4",
    ]  # fmt: skip
    assert main(simulate) == 0
    out = tmp_path / "processed"
    cell = "79.1 79.1 38.0 90 90 90"
    status = main(
        ["process", str(run_file), "--cell", cell, "--space-group", "P 43 21 2", "--out", str(out), "--nproc", "2"]
    )
    printed = capsys.readouterr().out
    assert status == 0
    assert "CC1/2" in printed and "suggested resolution" in printed

    lines = (out / "frames.jsonl").read_text().splitlines()
    results = [decode_message(line, FrameResult) for line in lines]
    assert [r.frame_index for r in results] == list(range(24))
    indexed = [r for r in results if r.indexed]
    assert len(indexed) >= 20
    assert all(r.A is not None and r.cell is not None and r.timings and r.reflections is not None for r in indexed)

    summary = json.loads((out / "summary.json").read_text())
    assert summary["frames"]["frames"] == 24
    assert len(summary["merge"]["shells"]) == 10
    assert summary["frames_merged"] >= 18

    # The merged intensities follow the simulator's truth.
    experiment = Experiment(SimulationConfig(seed=31, hit_fraction=1.0))
    true_miller, true_intensity = experiment.true_merged_intensities()
    truth = {tuple(int(v) for v in h): i for h, i in zip(true_miller, true_intensity, strict=True)}
    mtz = gemmi.read_mtz_file(str(out / "merged.mtz"))
    data = np.asarray(mtz.array)
    pairs = np.array([(row[3], truth[key]) for row in data if (key := tuple(int(v) for v in row[:3])) in truth])
    cc = float(np.corrcoef(pairs[:, 0], pairs[:, 1])[0, 1])
    with capsys.disabled():
        print(f"real analysis of 24 frames: CC of merged to true intensities {cc:.3f} over {len(pairs)} reflections")
    assert cc > 0.6

    # sfx merge re-merges the saved results into the same reflections.
    again = tmp_path / "again"
    assert (
        main(["merge", str(out / "frames.jsonl"), "--cell", cell, "--space-group", "P 43 21 2", "--out", str(again)])
        == 0
    )
    assert gemmi.read_mtz_file(str(again / "merged.mtz")).nreflections == mtz.nreflections

    # A damaged results file is refused with its file and line.
    damaged = tmp_path / "damaged.jsonl"
    damaged.write_text(lines[0] + "\n" + lines[1].replace('"frame_index":1', '"frame_index":-1') + "\n")
    capsys.readouterr()
    assert main(["merge", str(damaged), "--cell", cell, "--space-group", "P 43 21 2", "--out", str(again)]) == 2
    assert f"{damaged}:2" in capsys.readouterr().err
