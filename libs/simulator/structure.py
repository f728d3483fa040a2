"""A random protein-like model in a chosen cell and space group, and its structure factors (gemmi).

The model is a compact random chain of carbon, nitrogen, oxygen and sulphur atoms (bonds of 1.5 Å at tetrahedral
angles) filling a globule of the protein's volume in the asymmetric unit, so that interatomic distances, the Wilson
fall-off and the intensity statistics (acentric and centric) look like a protein's. Bulk solvent lowers the
low-resolution intensities (Babinet's principle). Pure computation: no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import gemmi
import numpy as np

from libs.science.crystal import reciprocal_space_operators, unit_cell

PROTEIN_VOLUME_PER_ATOM = 17.8  # Å³ per non-hydrogen atom in a protein (1.35 g/cm³)
ELEMENTS = ("C", "N", "O", "S")
ELEMENT_FRACTIONS = (0.63, 0.17, 0.19, 0.01)
BOND_LENGTH = 1.52
BOND_ANGLE = np.radians(111.0)
SOLVENT_K = 0.8  # Babinet: solvent contrast relative to protein
SOLVENT_B = 200.0  # Å², how fast the solvent's contribution fades with resolution


@dataclass(frozen=True)
class IntensityTable:
    """True merged intensities (in the gemmi reciprocal ASU) and a lookup from any Miller index to them."""

    asu_miller: np.ndarray  # (n, 3) int
    asu_intensity: np.ndarray  # (n,) float64, photons of a full reflection for a crystal of scale 1
    index_ranges: tuple[int, int, int]  # |h|, |k|, |l| limits of the lookup keys
    _p1_keys: np.ndarray  # sorted int64 keys of every symmetry-equivalent (and Friedel) index
    _p1_asu_index: np.ndarray  # index into asu_* of each key

    def keys(self, miller: np.ndarray) -> np.ndarray:
        """Integer keys of Miller indices (..., 3); indices outside the ranges get -1."""
        miller = np.asarray(miller, dtype=np.int64)
        h_max, k_max, l_max = self.index_ranges
        inside = (
            (np.abs(miller[..., 0]) <= h_max) & (np.abs(miller[..., 1]) <= k_max) & (np.abs(miller[..., 2]) <= l_max)
        )
        keys = ((miller[..., 0] + h_max) * (2 * k_max + 1) + (miller[..., 1] + k_max)) * (2 * l_max + 1) + (
            miller[..., 2] + l_max
        )
        return np.where(inside, keys, -1)

    def asu_index(self, miller: np.ndarray) -> np.ndarray:
        """Index into ``asu_miller`` of each Miller index (n, 3); -1 when absent, beyond d_min or 0 0 0."""
        keys = self.keys(miller)
        position = np.searchsorted(self._p1_keys, keys)
        position = np.minimum(position, len(self._p1_keys) - 1)
        found = (self._p1_keys[position] == keys) & (keys >= 0)
        return np.where(found, self._p1_asu_index[position], -1)

    def intensity(self, miller: np.ndarray) -> np.ndarray:
        """True merged intensity of each Miller index; 0 for systematic absences and beyond d_min."""
        index = self.asu_index(miller)
        return np.where(index >= 0, self.asu_intensity[np.maximum(index, 0)], 0.0)


def random_protein_model(
    cell: tuple[float, ...], group: gemmi.SpaceGroup, solvent_fraction: float, b_factor: float, seed: int
) -> gemmi.Structure:
    """A globular random chain filling (1 - solvent_fraction) of the asymmetric unit."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x5EED]))
    gcell = unit_cell(cell)
    n_ops = len(group.operations().sym_ops) * len(group.operations().cen_ops)
    protein_volume = gcell.volume / n_ops * (1.0 - solvent_fraction)
    n_atoms = max(50, round(protein_volume / PROTEIN_VOLUME_PER_ATOM))
    radius = (3.0 * protein_volume / (4.0 * np.pi)) ** (1.0 / 3.0)
    centre = _centre_far_from_symmetry_mates(gcell, group, rng)
    positions = _confined_chain(n_atoms, radius, rng) + centre

    structure = gemmi.Structure()
    structure.cell = gcell
    structure.spacegroup_hm = group.xhm()
    model = gemmi.Model(1)
    chain = gemmi.Chain("A")
    elements = rng.choice(len(ELEMENTS), size=n_atoms, p=ELEMENT_FRACTIONS)
    b_values = b_factor * rng.uniform(0.7, 1.3, size=n_atoms)
    residue = gemmi.Residue()
    for number, (position, element, b_value) in enumerate(zip(positions, elements, b_values, strict=True)):
        if number % 8 == 0:
            if number:
                chain.add_residue(residue)
            residue = gemmi.Residue()
            residue.name = "UNK"
            residue.seqid = gemmi.SeqId(number // 8 + 1, " ")
        atom = gemmi.Atom()
        atom.name = ELEMENTS[element]
        atom.element = gemmi.Element(ELEMENTS[element])
        atom.pos = gemmi.Position(*position)
        atom.b_iso = float(b_value)
        atom.occ = 1.0
        residue.add_atom(atom)
    chain.add_residue(residue)
    model.add_chain(chain)
    structure.add_model(model)
    structure.setup_entities()
    return structure


def _centre_far_from_symmetry_mates(
    cell: gemmi.UnitCell, group: gemmi.SpaceGroup, rng: np.random.Generator
) -> np.ndarray:
    """Cartesian point whose nearest symmetry mate (any lattice translation) is as far as possible."""
    orthogonalisation = np.array(cell.orth.mat.tolist())
    ops = list(group.operations())[1:]
    best, best_distance = np.zeros(3), -1.0
    for _ in range(200):
        fractional = rng.random(3)
        nearest = np.inf
        for op in ops:
            difference = np.array(op.apply_to_xyz(list(fractional))) - fractional
            difference -= np.round(difference)
            nearest = min(nearest, float(np.linalg.norm(orthogonalisation @ difference)))
        if nearest > best_distance:
            best_distance, best = nearest, orthogonalisation @ fractional
    return best


def _confined_chain(n_atoms: int, radius: float, rng: np.random.Generator) -> np.ndarray:
    """Positions (n, 3) of a chain with protein bond lengths and angles, kept inside a sphere of ``radius``."""
    positions = np.zeros((n_atoms, 3))
    positions[1] = positions[0] + np.array([BOND_LENGTH, 0.0, 0.0])
    for i in range(2, n_atoms):
        previous = positions[i - 1] - positions[i - 2]
        previous /= np.linalg.norm(previous)
        helper = np.array([0.0, 0.0, 1.0]) if abs(previous[2]) < 0.9 else np.array([1.0, 0.0, 0.0])
        side = np.cross(previous, helper)
        side /= np.linalg.norm(side)
        other = np.cross(previous, side)
        best_position, best_norm = positions[i - 1], np.inf
        for _ in range(12):
            torsion = rng.uniform(0, 2 * np.pi)
            direction = np.cos(np.pi - BOND_ANGLE) * previous + np.sin(np.pi - BOND_ANGLE) * (
                np.cos(torsion) * side + np.sin(torsion) * other
            )
            candidate = positions[i - 1] + BOND_LENGTH * direction
            norm = float(np.linalg.norm(candidate))
            if norm < radius:
                best_position = candidate
                break
            if norm < best_norm:
                best_position, best_norm = candidate, norm
        positions[i] = best_position
    return positions - positions.mean(axis=0)


def structure_factor_intensities(structure: gemmi.Structure, d_min: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(miller (n, 3), |F|² with bulk solvent (n,), d-spacing (n,)) of the ASU to ``d_min``, by FFT (gemmi)."""
    calculator = gemmi.DensityCalculatorX()
    calculator.d_min = d_min
    calculator.rate = 1.5
    calculator.set_refmac_compatible_blur(structure[0])
    calculator.set_grid_cell_and_spacegroup(structure)
    calculator.put_model_density_on_grid(structure[0])
    grid = gemmi.transform_map_to_f_phi(calculator.grid)
    asu = grid.prepare_asu_data(dmin=d_min, with_000=False, with_sys_abs=False)
    miller = np.array(asu.miller_array, dtype=np.int64)
    inv_d2 = structure.cell.calculate_1_d2_array(miller.astype(np.int32))
    # Undo the blur that made the density smooth enough for the grid (gemmi's documented correction).
    amplitude = np.abs(np.asarray(asu.value_array)) * np.exp(calculator.blur * inv_d2 / 4.0)
    amplitude *= 1.0 - SOLVENT_K * np.exp(-SOLVENT_B * inv_d2 / 4.0)
    keep = inv_d2 <= 1.0 / d_min**2
    return miller[keep], amplitude[keep] ** 2, 1.0 / np.sqrt(inv_d2[keep])


def _lookup(
    cell: tuple[float, ...], group: gemmi.SpaceGroup, asu_miller: np.ndarray, asu_intensity: np.ndarray, d_min: float
) -> IntensityTable:
    operators = reciprocal_space_operators(group)
    expanded = np.einsum("rij,nj->rni", operators, asu_miller).reshape(-1, 3)
    index = np.tile(np.arange(len(asu_miller)), len(operators))
    expanded = np.concatenate([expanded, -expanded])
    index = np.concatenate([index, index])
    gcell = unit_cell(cell)
    ranges = (
        int(np.floor(gcell.a / d_min)) + 1,
        int(np.floor(gcell.b / d_min)) + 1,
        int(np.floor(gcell.c / d_min)) + 1,
    )
    table = IntensityTable(asu_miller, asu_intensity, ranges, np.empty(0, np.int64), np.empty(0, np.int64))
    keys = table.keys(expanded)
    keys, first = np.unique(keys, return_index=True)
    return IntensityTable(asu_miller, asu_intensity, ranges, keys, index[first])


@lru_cache(maxsize=8)
def true_intensities(
    cell: tuple[float, ...],
    space_group_symbol: str,
    d_min: float,
    wilson_b: float,
    solvent_fraction: float,
    mean_full_photons_at_2a: float,
    structure_seed: int,
) -> IntensityTable:
    """The data set's true merged intensities, in photons of a full reflection of a scale-1 crystal.

    Normalised so that reflections with 1.95 Å < d < 2.05 Å (or the highest-resolution tenth when the data stop
    before 2 Å) have the mean ``mean_full_photons_at_2a``, extrapolated with the model's Wilson fall-off.
    """
    group = gemmi.SpaceGroup(space_group_symbol)
    structure = random_protein_model(cell, group, solvent_fraction, wilson_b, structure_seed)
    miller, intensity, d_spacing = structure_factor_intensities(structure, d_min)
    shell = (d_spacing > 1.95) & (d_spacing < 2.05)
    if shell.sum() >= 20:
        reference = float(intensity[shell].mean())
    else:
        # Data stop before 2 Å: extrapolate from the outermost tenth with a Wilson B of the model.
        outer = d_spacing <= np.quantile(d_spacing, 0.1)
        d_outer = float(np.mean(d_spacing[outer]))
        reference = float(intensity[outer].mean()) * np.exp(-2.0 * wilson_b * (1 / 16 - 1 / (4 * d_outer**2)))
    intensity = intensity * (mean_full_photons_at_2a / reference)
    return _lookup(cell, group, miller, intensity, d_min)
