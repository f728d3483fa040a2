"""Map Miller indices to the reciprocal asymmetric unit (ASU) of a space group, vectorised, with gemmi's choice.

gemmi's ``ReciprocalAsu.to_asu`` works on one reflection at a time; here the same rule runs on whole arrays: for each
symmetry operator W in gemmi's order, h·W (ISYM = 2i+1) and then -h·W (ISYM = 2i+2) are tried and the first one that
lies in the ASU wins. Membership is looked up in the sorted list of every ASU reflection to the merge's resolution
limit, so a reflection beyond the limit, a systematic absence or (0, 0, 0) maps to -1.
"""

from __future__ import annotations

from collections.abc import Sequence

import gemmi
import numpy as np

from libs.science.crystal import b_matrix, unit_cell

_OFFSET = 1024
_SPAN = 2048
_MAX_TABLE = 4_000_000  # entries of the direct look-up table (6 bytes each)


def miller_keys(miller: np.ndarray) -> np.ndarray:
    """One int64 per (h, k, l) (|index| < 1024), for sorting and searching."""
    hkl = np.asarray(miller, dtype=np.int64) + _OFFSET
    return (hkl[..., 0] * _SPAN + hkl[..., 1]) * _SPAN + hkl[..., 2]


def inverse_d_squared(miller: np.ndarray, cell: Sequence[float]) -> np.ndarray:
    """1/d² (1/Å²) of each reflection for the cell: |B·h|²."""
    B = b_matrix(cell)
    r = np.asarray(miller, dtype=float) @ B.T
    return np.einsum("ij,ij->i", r, r)


class AsuMapper:
    """The ASU reflections of a space group and cell to ``d_min``, and the mapping of any h, k, l onto them.

    ``miller`` lists every possible (not systematically absent) ASU reflection with d ≥ d_min, sorted from low to
    high resolution; a reflection's position in that list is its ``asu_index`` throughout the merger.
    """

    def __init__(self, space_group: gemmi.SpaceGroup, cell: Sequence[float], d_min: float) -> None:
        if not d_min > 0:
            raise ValueError(f"d_min must be positive, got {d_min}")
        self.space_group = space_group
        self.cell = tuple(float(v) for v in cell)
        self.d_min = float(d_min)
        self.group_ops = space_group.operations()
        gemmi_cell = unit_cell(self.cell)
        miller = np.asarray(gemmi.make_miller_array(gemmi_cell, space_group, self.d_min, 0.0, True), dtype=np.int32)
        inv_d2 = inverse_d_squared(miller, self.cell)
        keep = inv_d2 <= 1.0 / self.d_min**2 * (1 + 1e-9)
        miller, inv_d2 = miller[keep], inv_d2[keep]
        order = np.lexsort((miller[:, 2], miller[:, 1], miller[:, 0], np.round(inv_d2, 12)))
        self.miller: np.ndarray = miller[order]
        self.inv_d2: np.ndarray = inv_d2[order]
        self.centric: np.ndarray = np.asarray(self.group_ops.centric_flag_array(self.miller), dtype=bool)
        self.epsilon: np.ndarray = np.asarray(self.group_ops.epsilon_factor_array(self.miller), dtype=float)
        keys = miller_keys(self.miller)
        self._key_order = np.argsort(keys)
        self._sorted_keys = keys[self._key_order]
        # gemmi's W acts on fractional coordinates; Miller indices transform as row vectors: h' = h·W.
        self._operators = np.array([np.array(op.rot) // gemmi.Op.DEN for op in self.group_ops.sym_ops], dtype=np.int64)
        self._table: tuple[np.ndarray, np.ndarray] | None = None
        self._table_refused = False
        self._half_box = np.zeros(3, dtype=np.int64)

    @property
    def size(self) -> int:
        return int(self.miller.shape[0])

    def d_spacing(self) -> np.ndarray:
        return 1.0 / np.sqrt(self.inv_d2)

    def lookup(self, miller: np.ndarray) -> np.ndarray:
        """asu_index of reflections that are already in the ASU, -1 for others."""
        keys = miller_keys(miller)
        position = np.searchsorted(self._sorted_keys, keys)
        position = np.minimum(position, self._sorted_keys.size - 1)
        found = self._sorted_keys[position] == keys
        return np.where(found, self._key_order[position], -1).astype(np.int32)

    def map(self, miller: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(asu_index, ISYM) of each h, k, l; asu_index -1 (ISYM 0) when it has no place in the merge.

        Within the box of indices the resolution limit allows, one look-up in a table made on first use;
        outside it (or when the box would be too large) the operator search.
        """
        hkl = np.asarray(miller, dtype=np.int64).reshape(-1, 3)
        if self._table is None and not self._table_refused:
            self._build_table()
        if self._table is not None:
            asu_table, isym_table = self._table
            inside = np.all(np.abs(hkl) <= self._half_box, axis=1)
            flat = np.ravel_multi_index(
                tuple((np.where(inside[:, None], hkl, 0) + self._half_box).T), tuple(2 * self._half_box + 1)
            )
            asu_index = np.where(inside, asu_table[flat], -1).astype(np.int32)
            isym = np.where(inside, isym_table[flat], 0).astype(np.int16)
            return asu_index, isym
        return self._search(hkl)

    def _build_table(self) -> None:
        """Map every index of the box |h| ≤ a/d_min (and so on) once; refused when the box is too large."""
        half_box = np.floor(np.array(self.cell[:3]) / self.d_min).astype(np.int64) + 1
        shape = tuple(int(v) for v in 2 * half_box + 1)
        if int(np.prod(shape)) > _MAX_TABLE:
            self._table_refused = True
            return
        grid = np.stack(np.meshgrid(*(np.arange(-h, h + 1) for h in half_box), indexing="ij"), axis=-1)
        asu_index, isym = self._search(grid.reshape(-1, 3))
        self._half_box = half_box
        self._table = (asu_index, isym)

    def _search(self, hkl: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n = hkl.shape[0]
        asu_index = np.full(n, -1, dtype=np.int32)
        isym = np.zeros(n, dtype=np.int16)
        if n == 0 or self.size == 0:
            return asu_index, isym
        if np.abs(hkl).max() >= _OFFSET:
            raise ValueError(f"Miller indices beyond ±{_OFFSET - 1} cannot be merged")
        pending = np.arange(n)
        for i, operator in enumerate(self._operators):
            if pending.size == 0:
                break
            transformed = hkl[pending] @ operator
            for sign, code in ((1, 2 * i + 1), (-1, 2 * i + 2)):
                if pending.size == 0:
                    break
                found = self.lookup(sign * transformed)
                hit = found >= 0
                asu_index[pending[hit]] = found[hit]
                isym[pending[hit]] = code
                pending, transformed = pending[~hit], transformed[~hit]
        return asu_index, isym

    def original_miller(self, asu_index: np.ndarray, isym: np.ndarray) -> np.ndarray:
        """Invert :meth:`map`: the h, k, l that ISYM turned into the ASU reflection."""
        asu_hkl = self.miller[asu_index].astype(np.int64)
        op_index = (np.asarray(isym, dtype=np.int64) - 1) // 2
        sign = np.where(np.asarray(isym) % 2 == 1, 1, -1)[:, None]
        inverse = np.round(np.linalg.inv(self._operators.astype(float))).astype(np.int64)
        return np.einsum("ni,nij->nj", sign * asu_hkl, inverse[op_index])
