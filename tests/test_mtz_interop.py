"""Other programs read our MTZ files as we mean them: cctbx (Debian's python3) and gemmi.

cctbx's iotbx.merging_statistics recomputes completeness, multiplicity and CC1/2 from the unmerged MTZ with the
same resolution binning (equal volumes between the data's limits); CC1/2 differs in how the half sets are drawn
(cctbx: observations at random; sfx-live: whole frames), so it agrees only statistically.
"""

from __future__ import annotations

import json
import subprocess
import textwrap
from pathlib import Path

import gemmi
import numpy as np
import pytest

from libs.simulator import Experiment, SimulationConfig
from services.merger.engine import MergingEngine, MergingParameters
from services.merger.mtz import write_merge_outputs
from services.merger.statistics import ReflectionSums, merging_statistics
from tests.support.merging_data import simulated_results

pytestmark = pytest.mark.slow  # 300 simulated frames merged, then cctbx in a subprocess

CCTBX_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import cctbx.miller
    import iotbx.merging_statistics
    from cctbx import french_wilson
    from iotbx.reflection_file_reader import any_reflection_file
    from libtbx.utils import null_out

    unmerged_path, merged_path, n_bins = sys.argv[1], sys.argv[2], int(sys.argv[3])
    unmerged = any_reflection_file(unmerged_path).as_miller_arrays(merge_equivalents=False)
    i_obs = [a for a in unmerged if a.info().labels[0] == "I"][0]
    result = iotbx.merging_statistics.dataset_statistics(
        i_obs=i_obs, n_bins=n_bins, anomalous=False, eliminate_sys_absent=False,
        assert_is_not_unique_set_under_symmetry=False, log=null_out())

    in_asu = i_obs.map_to_asu().sort(by_value="packed_indices")

    def shell(b):
        # CC1/2 of one random split, and its mean over 20 splits (the split's own noise averaged out).
        part = in_asu.resolution_filter(d_max=b.d_max, d_min=b.d_min)
        return dict(d_max=b.d_max, d_min=b.d_min, observations=b.n_obs, unique=b.n_uniq,
                    completeness=b.completeness, multiplicity=b.mean_redundancy, cc_half=b.cc_one_half,
                    cc_half_mean=cctbx.miller.compute_cc_one_half(part, n_trials=20))

    merged = any_reflection_file(merged_path).as_miller_arrays()
    imean = [a for a in merged if a.info().labels[0] == "IMEAN"][0]
    amplitudes = french_wilson.french_wilson_scale(miller_array=imean, log=null_out())
    print(json.dumps(dict(
        overall=shell(result.overall),
        shells=[shell(b) for b in result.bins],
        merged=dict(
            cell=list(imean.unit_cell().parameters()),
            space_group=imean.space_group_info().type().lookup_symbol(),
            reflections=imean.size(),
            labels=[a.info().labels for a in merged],
        ),
        french_wilson=dict(
            hkl=[list(h) for h in amplitudes.indices()],
            F=list(amplitudes.data()),
        ),
    )))
    """
)


@pytest.fixture(scope="module")
def merged_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[MergingEngine, Path, Path, int]:
    experiment = Experiment(SimulationConfig(seed=21, hit_fraction=1.0))
    config = experiment.config
    engine = MergingEngine(config.cell, config.space_group, MergingParameters(d_min=config.d_min))
    for start in range(0, 300, 100):
        results, _ = simulated_results(experiment, range(start, start + 100))
        engine.add_frames(results)
    engine.rescale()
    folder = tmp_path_factory.mktemp("mtz")
    merged_path, unmerged_path = folder / "merged.mtz", folder / "unmerged.mtz"
    count = write_merge_outputs(engine, merged_path, unmerged_path)
    return engine, merged_path, unmerged_path, count


@pytest.fixture(scope="module")
def cctbx_view(
    cctbx_python: str, merged_run: tuple[MergingEngine, Path, Path, int], tmp_path_factory: pytest.TempPathFactory
) -> dict:
    _, merged_path, unmerged_path, _ = merged_run
    script = tmp_path_factory.mktemp("cctbx") / "read.py"
    script.write_text(CCTBX_SCRIPT)
    completed = subprocess.run(
        [cctbx_python, str(script), str(unmerged_path), str(merged_path), "10"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return dict(json.loads(completed.stdout.strip().splitlines()[-1]))


def test_cctbx_merging_statistics_agree_with_ours(
    merged_run: tuple[MergingEngine, Path, Path, int], cctbx_view: dict
) -> None:
    engine = merged_run[0]
    ours = engine.statistics(n_shells=10)
    theirs = cctbx_view["overall"]
    assert theirs["observations"] == ours.overall.observations
    assert theirs["unique"] == ours.overall.unique
    assert theirs["completeness"] == pytest.approx(ours.overall.completeness, abs=1e-3)
    assert theirs["multiplicity"] == pytest.approx(ours.overall.multiplicity, abs=1e-3)
    assert ours.overall.cc_half is not None
    assert theirs["cc_half"] == pytest.approx(ours.overall.cc_half, abs=0.03)
    # Per shell, one random split against another differs by the splits' own noise (a few hundredths in the
    # weak shells of 300 frames), so the means over 20 splits on each side are compared.
    observations = engine.unmerged()
    asu_index = engine.mapper.lookup(observations.asu_miller)
    split_means = []
    for seed in range(20):
        # Our halves alternate in arrival order, so a different split needs a different order.
        order = np.random.default_rng(seed).permutation(asu_index.size)
        sums = ReflectionSums(engine.mapper.size, seed)
        sums.add(asu_index[order], observations.intensity[order], observations.sigma[order])
        split_means.append([s.cc_half for s in merging_statistics(sums, engine.mapper.inv_d2, n_shells=10).shells])
    our_means = np.mean(np.array(split_means, dtype=float), axis=0)
    differences = [mean - other["cc_half_mean"] for mean, other in zip(our_means, cctbx_view["shells"], strict=True)]
    print(
        f"CC1/2 overall: ours {ours.overall.cc_half:.4f}, cctbx {theirs['cc_half']:.4f}; per shell (ours - cctbx, "
        f"means of 20 splits): {np.round(differences, 3)}"
    )
    for mine, mean, other in zip(ours.shells, our_means, cctbx_view["shells"], strict=True):
        assert other["d_min"] == pytest.approx(mine.d_min, rel=1e-3)
        assert other["observations"] == mine.observations
        assert other["completeness"] == pytest.approx(mine.completeness, abs=1e-3)
        assert other["multiplicity"] == pytest.approx(mine.multiplicity, abs=1e-3)
        assert other["cc_half_mean"] == pytest.approx(mean, abs=0.03)


def test_cctbx_and_gemmi_read_the_merged_mtz_as_written(
    merged_run: tuple[MergingEngine, Path, Path, int], cctbx_view: dict
) -> None:
    engine, merged_path, unmerged_path, count = merged_run
    mtz = gemmi.read_mtz_file(str(merged_path))
    assert mtz.column_labels() == ["H", "K", "L", "IMEAN", "SIGIMEAN", "F", "SIGF", "N"]
    assert mtz.nreflections == count
    assert mtz.spacegroup.hm == engine.space_group.hm
    assert mtz.cell.parameters == pytest.approx(engine.cell)
    merged = cctbx_view["merged"]
    assert merged["reflections"] == count
    assert gemmi.SpaceGroup(merged["space_group"]).hm == engine.space_group.hm
    assert merged["cell"] == pytest.approx(list(engine.cell))
    assert ["F", "SIGF"] in merged["labels"]

    # The unmerged file gives back the observed indices through M/ISYM, and one batch header per frame.
    unmerged = gemmi.read_mtz_file(str(unmerged_path))
    observations = engine.unmerged()
    assert len(unmerged.batches) == len(observations.frame_keys)
    unmerged.switch_to_original_hkl()
    assert np.array_equal(np.asarray(unmerged.make_miller_array()), observations.miller)


def test_french_wilson_amplitudes_agree_with_cctbx(
    merged_run: tuple[MergingEngine, Path, Path, int], cctbx_view: dict
) -> None:
    merged_path = merged_run[1]
    mtz = gemmi.read_mtz_file(str(merged_path))
    data = np.asarray(mtz.array)
    ours = {tuple(int(v) for v in row[:3]): (row[3] / row[4], row[5]) for row in data}
    theirs = cctbx_view["french_wilson"]
    pairs = np.array(
        [(ours[tuple(h)][1], f, ours[tuple(h)][0]) for h, f in zip(theirs["hkl"], theirs["F"], strict=True)]
    )
    assert len(pairs) > 0.95 * len(ours)
    strong = pairs[:, 2] > 3
    relative = float(np.median(np.abs(pairs[strong, 0] / pairs[strong, 1] - 1)))
    correlation = float(np.corrcoef(pairs[:, 0], pairs[:, 1])[0, 1])
    print(
        f"French-Wilson vs cctbx: {len(pairs)} of {len(ours)}; median |ΔF/F| (I/σ > 3) {relative:.4f}; "
        f"CC {correlation:.4f}"
    )
    # Where the measurement dominates the prior the two must coincide; weak ones depend on each program's
    # estimate of the mean intensity per resolution bin.
    assert relative < 0.005
    assert correlation > 0.995
