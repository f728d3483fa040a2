"""Merging statistics from running per-reflection sums: a refresh never touches individual observations.

CC1/2 and Rsplit compare two half data sets drawn per reflection (see ReflectionSums).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from libs.contracts.messages import ShellStatistics


class ReflectionSums:
    """Running sums per ASU reflection: count, Σw and Σw·I in total and for each half set (w = 1/σ²).

    Half sets are balanced per reflection, as cctbx draws them: a reflection's observations alternate between
    the halves in the order they arrive, starting from a random half (fixed seed), so that n observations split
    as evenly as n allows. Unbalanced splits would make CC1/2 depend on luck at low multiplicity.
    """

    def __init__(self, size: int, seed: int = 0) -> None:
        self.size = size
        self.count = np.zeros(size, dtype=np.int64)
        self.half_w = np.zeros((2, size))
        self.half_wi = np.zeros((2, size))
        self._first_half = np.random.default_rng(seed).integers(0, 2, size)

    def halves(self, asu_index: np.ndarray) -> np.ndarray:
        """Half set (0 or 1) of observations about to be added, in their order."""
        order = np.argsort(asu_index, kind="stable")
        ordered = asu_index[order]
        starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
        group_start = np.repeat(starts, np.diff(np.r_[starts, ordered.size]))
        rank = np.arange(ordered.size) - group_start
        half = np.empty(asu_index.size, dtype=np.int64)
        half[order] = (self.count[ordered] + rank + self._first_half[ordered]) % 2
        return half

    def add(self, asu_index: np.ndarray, intensity: np.ndarray, sigma: np.ndarray, halves: bool = True) -> None:
        """Add observations (scaled intensity and its sigma); ``halves=False`` puts all in half 0 (cheaper, for
        sums whose half sets will never be looked at)."""
        weight = 1.0 / sigma.astype(float) ** 2
        self.count += np.bincount(asu_index, minlength=self.size)
        if not halves:
            self.half_w[0] += np.bincount(asu_index, weights=weight, minlength=self.size)
            self.half_wi[0] += np.bincount(asu_index, weights=weight * intensity, minlength=self.size)
            return
        half = self.halves(asu_index)
        for h in (0, 1):
            chosen = half == h
            self.half_w[h] += np.bincount(asu_index[chosen], weights=weight[chosen], minlength=self.size)
            self.half_wi[h] += np.bincount(
                asu_index[chosen], weights=weight[chosen] * intensity[chosen], minlength=self.size
            )

    @property
    def sum_w(self) -> np.ndarray:
        return np.asarray(self.half_w[0] + self.half_w[1])

    def merged(self) -> tuple[np.ndarray, np.ndarray]:
        """Weighted mean intensity and its sigma per reflection (NaN where unobserved)."""
        sum_w = self.sum_w
        with np.errstate(divide="ignore", invalid="ignore"):
            mean = (self.half_wi[0] + self.half_wi[1]) / sum_w
            sigma = 1.0 / np.sqrt(sum_w)
        observed = (self.count > 0) & (sum_w > 0)
        return np.where(observed, mean, np.nan), np.where(observed, sigma, np.nan)

    def half_means(self) -> tuple[np.ndarray, np.ndarray]:
        with np.errstate(divide="ignore", invalid="ignore"):
            return self.half_wi[0] / self.half_w[0], self.half_wi[1] / self.half_w[1]


@dataclass(frozen=True)
class MergingStatistics:
    overall: ShellStatistics
    shells: list[ShellStatistics]
    suggested_d_min: float | None


def cc_star(cc_half: float) -> float:
    """Karplus–Diederichs CC* = sqrt(2·CC1/2 / (1 + CC1/2)) (0 for CC1/2 ≤ 0)."""
    return float(np.sqrt(2 * cc_half / (1 + cc_half))) if cc_half > 0 else 0.0


def shell_edges(d_max: float, d_min: float, n_shells: int) -> np.ndarray:
    """Shell limits in 1/d², equal volumes of reciprocal space (steps of d*³), low to high resolution."""
    cube = np.linspace(d_max**-3, d_min**-3, n_shells + 1)
    return np.asarray(cube ** (2.0 / 3.0))


def pearson(x: np.ndarray, y: np.ndarray) -> float | None:
    if x.size < 3 or np.std(x) == 0 or np.std(y) == 0:
        return None
    return float(np.corrcoef(x, y)[0, 1])


def _shell(
    select: np.ndarray,
    possible: int,
    d_max: float,
    d_min: float,
    sums: ReflectionSums,
    mean: np.ndarray,
    sigma: np.ndarray,
    half: tuple[np.ndarray, np.ndarray],
) -> ShellStatistics:
    observed = select & (sums.count > 0) & np.isfinite(mean)
    unique = int(observed.sum())
    observations = int(sums.count[observed].sum())
    both = observed & (sums.half_w[0] > 0) & (sums.half_w[1] > 0)
    first, second = half[0][both], half[1][both]
    cc = pearson(first, second)
    denominator = 0.5 * np.abs(first + second).sum()
    r_split = float(np.abs(first - second).sum() / denominator / np.sqrt(2)) if denominator > 0 else None
    return ShellStatistics(
        d_max=d_max,
        d_min=d_min,
        observations=observations,
        unique=unique,
        possible=possible,
        completeness=unique / possible if possible else 0.0,
        multiplicity=observations / unique if unique else 0.0,
        mean_i_over_sigma=float(np.mean(mean[observed] / sigma[observed])) if unique else 0.0,
        cc_half=cc,
        cc_star=cc_star(cc) if cc is not None else None,
        r_split=r_split,
    )


def merging_statistics(
    sums: ReflectionSums,
    inv_d2: np.ndarray,
    *,
    n_shells: int = 10,
    d_min: float | None = None,
    d_max: float | None = None,
    cc_half_cutoff: float = 0.3,
) -> MergingStatistics:
    """Statistics overall and per shell; ``inv_d2`` is 1/d² of every possible ASU reflection (the sums' order).

    The range defaults to the observed data's; possible reflections are those of the ASU list within it.
    """
    observed = sums.count > 0
    if not observed.any():
        raise ValueError("no reflections have been merged yet")
    low = float(inv_d2[observed].min()) if d_max is None else d_max**-2
    high = float(inv_d2[observed].max()) if d_min is None else d_min**-2
    d_max_value, d_min_value = float(low**-0.5), float(high**-0.5)
    edges = shell_edges(d_max_value, d_min_value, n_shells)
    edges[0], edges[-1] = low * (1 - 1e-9), high * (1 + 1e-9)
    mean, sigma = sums.merged()
    half = sums.half_means()
    in_range = (inv_d2 >= edges[0]) & (inv_d2 <= edges[-1])
    overall = _shell(in_range, int(in_range.sum()), d_max_value, d_min_value, sums, mean, sigma, half)
    shells = []
    shell_of = np.clip(np.searchsorted(edges, inv_d2, side="right") - 1, 0, n_shells - 1)
    for s in range(n_shells):
        select = in_range & (shell_of == s)
        shells.append(
            _shell(
                select, int(select.sum()), float(edges[s] ** -0.5), float(edges[s + 1] ** -0.5), sums, mean, sigma, half
            )
        )
    suggested = None
    for shell in shells:
        if shell.cc_half is None or shell.cc_half < cc_half_cutoff:
            break
        suggested = shell.d_min
    return MergingStatistics(overall=overall, shells=shells, suggested_d_min=suggested)


def format_table(statistics: MergingStatistics) -> str:
    """The per-shell table as text, one line per shell and one for all data."""
    header = (
        f"{'d_max':>7} {'d_min':>6} {'#obs':>9} {'#uniq':>7} {'compl':>6} {'mult':>6} {'<I/σ>':>7} "
        f"{'CC1/2':>6} {'CC*':>6} {'Rsplit':>7}"
    )

    def fmt(value: float | None, width: int, digits: int) -> str:
        return f"{value:>{width}.{digits}f}" if value is not None else f"{'-':>{width}}"

    def line(shell: ShellStatistics) -> str:
        return (
            f"{shell.d_max:7.2f} {shell.d_min:6.2f} {shell.observations:9d} {shell.unique:7d} "
            f"{100 * shell.completeness:6.1f} {shell.multiplicity:6.1f} {shell.mean_i_over_sigma:7.2f} "
            f"{fmt(shell.cc_half, 6, 3)} {fmt(shell.cc_star, 6, 3)} {fmt(shell.r_split, 7, 3)}"
        )

    lines = [header, *(line(s) for s in statistics.shells), "-" * len(header), line(statistics.overall)]
    if statistics.suggested_d_min is not None:
        lines.append(f"suggested resolution cut-off (CC1/2 ≥ 0.3): {statistics.suggested_d_min:.2f} Å")
    return "\n".join(lines)
