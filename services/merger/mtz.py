"""MTZ files with gemmi: the merged data (I, F) and the scaled unmerged observations (one BATCH per frame).

The unmerged layout is the one CCP4 programs and cctbx read: H K L in the ASU, M/ISYM saying which symmetry
operator (and whether the Friedel mate) takes the observed index there, BATCH the frame, I and SIGI.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import gemmi
import numpy as np

from libs.science.crystal import unit_cell
from services.merger.engine import MergingEngine


def _new_mtz(cell: Sequence[float], group: gemmi.SpaceGroup, title: str) -> gemmi.Mtz:
    mtz = gemmi.Mtz(with_base=True)
    mtz.title = title
    mtz.spacegroup = group
    mtz.set_cell_for_all(unit_cell(cell))
    mtz.add_dataset("sfx")
    mtz.datasets[1].project_name = "sfx-live"
    mtz.datasets[1].crystal_name = "crystal"
    mtz.datasets[1].wavelength = 0.0
    mtz.set_cell_for_all(unit_cell(cell))
    return mtz


def write_merged_mtz(
    path: Path,
    cell: Sequence[float],
    group: gemmi.SpaceGroup,
    miller: np.ndarray,
    intensity: np.ndarray,
    sigma: np.ndarray,
    amplitude: np.ndarray,
    amplitude_sigma: np.ndarray,
    multiplicity: np.ndarray,
) -> None:
    """H K L IMEAN SIGIMEAN F SIGF N, with the cell and space group."""
    mtz = _new_mtz(cell, group, "sfx-live merged intensities and French-Wilson amplitudes")
    for label, kind in (("IMEAN", "J"), ("SIGIMEAN", "Q"), ("F", "F"), ("SIGF", "Q"), ("N", "I")):
        mtz.add_column(label, kind)
    data = np.column_stack(
        [np.asarray(miller, dtype=float), intensity, sigma, amplitude, amplitude_sigma, multiplicity]
    ).astype(np.float32)
    mtz.set_data(data)
    mtz.update_reso()
    mtz.write_to_file(str(path))


def write_unmerged_mtz(
    path: Path,
    cell: Sequence[float],
    group: gemmi.SpaceGroup,
    asu_miller: np.ndarray,
    isym: np.ndarray,
    batch: np.ndarray,
    intensity: np.ndarray,
    sigma: np.ndarray,
    n_batches: int,
) -> None:
    """H K L (ASU) M/ISYM BATCH I SIGI, one batch header per frame (1 … n_batches)."""
    mtz = _new_mtz(cell, group, "sfx-live scaled unmerged observations")
    for label, kind in (("M/ISYM", "Y"), ("BATCH", "B"), ("I", "J"), ("SIGI", "Q")):
        mtz.add_column(label, kind)
    gemmi_cell = unit_cell(cell)
    for number in range(1, n_batches + 1):
        header = gemmi.Mtz.Batch()
        header.number = number
        header.title = f"frame {number}"
        header.dataset_id = 1
        header.cell = gemmi_cell
        mtz.batches.append(header)
    data = np.column_stack([np.asarray(asu_miller, dtype=float), isym, batch, intensity, sigma]).astype(np.float32)
    mtz.set_data(data)
    mtz.update_reso()
    mtz.write_to_file(str(path))


def write_merge_outputs(engine: MergingEngine, merged_path: Path, unmerged_path: Path) -> int:
    """Write the merged and the unmerged MTZ of an engine's current state; returns the merged reflection count."""
    merged = engine.merged()
    amplitude, amplitude_sigma = engine.amplitudes(merged)
    write_merged_mtz(
        merged_path,
        engine.cell,
        engine.space_group,
        merged.miller,
        merged.intensity,
        merged.sigma,
        amplitude,
        amplitude_sigma,
        merged.multiplicity,
    )
    unmerged = engine.unmerged()
    write_unmerged_mtz(
        unmerged_path,
        engine.cell,
        engine.space_group,
        unmerged.asu_miller,
        unmerged.isym,
        unmerged.batch,
        unmerged.intensity,
        unmerged.sigma,
        len(unmerged.frame_keys),
    )
    return int(merged.miller.shape[0])
