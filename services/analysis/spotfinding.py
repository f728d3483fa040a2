"""Spotfinding: the DIALS dispersion threshold, then connected components of the strong pixels.

A pixel is strong when, over the valid pixels of the (2k+1)² window around it (m of them, sum S, sum of squares Q):

* the window is over-dispersed: variance/mean > gain·(1 + sigma_background·sqrt(2/(m-1))),
* the pixel stands out: I - mean > sigma_strong·sqrt(gain·mean),
* and I > global_threshold.

Window sums S and m are separable box filters in float32 over the whole frame (a running filter along fast, a few
contiguous row additions along slow); the strength condition, rearranged without division, picks the few candidate
pixels, and the sum of squares Q (needed only for the dispersion test) is gathered from their windows alone. This
gives exactly the DIALS decision at a fraction of the cost of filtering Q everywhere. Strong pixels are grouped with
8-connectivity inside one panel only (links never cross a panel edge), as a sparse graph. Pure numpy, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from scipy import ndimage
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from libs.contracts.parameters import SpotfindingParameters
from libs.science.geometry import Beam, Detector, Panel, d_spacing_of_lab_points


class SpotfindingError(ValueError):
    """Inputs that do not fit together (shapes of image, mask, gain, detector; resolution limits no pixel meets)."""


@dataclass(frozen=True)
class SpotList:
    """Spots of one frame, one row each: centroids in continuous pixel coordinates (pixel centre at i + 0.5)."""

    panel: np.ndarray  # int32 (n,)
    fast: np.ndarray  # float64 (n,)
    slow: np.ndarray  # float64 (n,)
    intensity: np.ndarray  # float64 (n,): counts summed over the spot's strong pixels
    size: np.ndarray  # int32 (n,): strong pixels
    lab: np.ndarray  # float64 (n, 3): lab position of the centroid, mm
    d_spacing: np.ndarray  # float64 (n,), Å

    def __len__(self) -> int:
        return int(self.panel.shape[0])

    def select(self, chosen: np.ndarray) -> SpotList:
        """The spots where ``chosen`` (a boolean mask or indices) selects."""
        return SpotList(
            panel=self.panel[chosen],
            fast=self.fast[chosen],
            slow=self.slow[chosen],
            intensity=self.intensity[chosen],
            size=self.size[chosen],
            lab=self.lab[chosen],
            d_spacing=self.d_spacing[chosen],
        )

    @staticmethod
    def empty() -> SpotList:
        return SpotList(
            panel=np.zeros(0, np.int32),
            fast=np.zeros(0),
            slow=np.zeros(0),
            intensity=np.zeros(0),
            size=np.zeros(0, np.int32),
            lab=np.zeros((0, 3)),
            d_spacing=np.zeros(0),
        )


@dataclass(frozen=True)
class SpotfindingResult:
    """Spots plus the strong-pixel map (integration excludes those pixels from other spots' backgrounds)."""

    spots: SpotList
    strong: np.ndarray  # int64 (k,): sorted flat indices of the strong pixels in the frame


class SpotFinder:
    """Dispersion spotfinding for one detector and mask; precomputes what is the same for every frame of a run.

    Not thread-safe: it reuses one padded work buffer across frames (one finder per worker).
    """

    def __init__(
        self,
        detector: Detector,
        beam: Beam,
        mask: np.ndarray,
        parameters: SpotfindingParameters,
        gain_map: np.ndarray | None = None,
    ) -> None:
        shape = detector.frame_shape
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != shape:
            raise SpotfindingError(f"mask has shape {mask.shape}, the detector's frames have {shape}")
        if gain_map is not None and np.shape(gain_map) != shape:
            raise SpotfindingError(f"gain map has shape {np.shape(gain_map)}, the detector's frames have {shape}")
        if gain_map is not None and not np.all(np.asarray(gain_map)[mask] > 0):
            raise SpotfindingError("gain map must be positive on every valid pixel")
        _check_resolution_limits(detector, beam, mask, parameters)
        self.detector = detector
        self.beam = beam
        self.parameters = parameters
        self.mask = mask
        self.shape = shape
        self.k = parameters.kernel_half_size
        self.window = 2 * self.k + 1
        self.gain_map = None if gain_map is None else np.asarray(gain_map, dtype=np.float32)
        n_panels, n_slow, n_fast = shape
        k, size = self.k, self.window
        padded_shape = (n_panels, n_slow + 2 * k, n_fast + 2 * k)
        # Work buffers, allocated once: fresh multi-megabyte temporaries per frame cost page faults as well as
        # memory passes. The padded buffer's zero border makes windows see nothing beyond a panel's edges.
        self._padded = np.zeros(padded_shape, dtype=np.float32)
        self._rows = np.empty(padded_shape, dtype=np.float32)
        self._levels: list[np.ndarray] = []
        width = 2
        while width <= size:
            self._levels.append(np.empty((n_panels, padded_shape[1] - width + 1, padded_shape[2]), np.float32))
            width *= 2
        self._column_sums = np.empty((n_panels, n_slow, padded_shape[2]), dtype=np.float32)
        self._excess = np.empty(shape, dtype=np.float32)
        self._bound = np.empty(shape, dtype=np.float32)
        self._over = np.empty(shape, dtype=bool)
        self._count = self._valid_count(mask.astype(np.float32))
        self._strength_factors = self._factors(self._count)
        # Every pixel's window as a view of the padded buffer: [panel, slow, fast] is the window centred there.
        self._windows = sliding_window_view(self._padded, (size, size), axis=(1, 2))

    def _valid_count(self, valid: np.ndarray) -> np.ndarray:
        k = self.k
        self._padded[:, k:-k, k:-k] = valid
        count = self._window_means() * np.float32(self.window)
        np.rint(count, out=count)
        return count

    def _factors(self, count: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """m/(2k+1) and σ_s²·gain·m/(2k+1): the strength test's per-pixel factors for window sums S/(2k+1)."""
        scaled = count / np.float32(self.window)
        gain = self.gain_map if self.gain_map is not None else np.float32(self.parameters.gain)
        return scaled, (scaled * gain * np.float32(self.parameters.sigma_strong**2)).astype(np.float32)

    def _window_means(self) -> np.ndarray:
        """Window sums divided by 2k+1 of the padded buffer's interior, per panel: a view (n_panels, n_slow, n_fast).

        Along fast a running mean over whole padded rows (contiguous); along slow, sums of shifted row blocks
        built by doubling (a strided filter along that axis is several times slower).
        """
        k, size = self.k, self.window
        ndimage.uniform_filter1d(self._padded, size, axis=2, output=self._rows, mode="constant", cval=0.0)
        _running_sum_along_slow(self._rows, size, self._levels, self._column_sums)
        return self._column_sums[:, :, k:-k]

    def strong_pixels(self, image: np.ndarray) -> np.ndarray:
        """Flat indices (sorted) of the strong pixels of ``image`` (n_panels, n_slow, n_fast)."""
        if image.shape != self.shape:
            raise SpotfindingError(f"image has shape {image.shape}, the detector's frames have {self.shape}")
        p, k, size = self.parameters, self.k, self.window
        count, (scaled_count, strength_factor) = self._count, self._strength_factors
        data = self._padded[:, k:-k, k:-k]
        if image.max() >= p.overload:
            # Saturated pixels leave every window they belong to, exactly like masked ones.
            valid = self.mask & (image < p.overload)
            count = self._valid_count(valid.astype(np.float32))
            scaled_count, strength_factor = self._factors(count)
            np.multiply(image, valid, out=data, dtype=np.float32)
        else:
            # Masked pixels of the buffer are zero from the start and never written: copy the valid ones only.
            np.copyto(data, image, casting="unsafe", where=self.mask)
        means = self._window_means()  # T = S/(2k+1)
        # Strength, I - S/m > σ_s·sqrt(gain·S/m), rearranged without division: (m·I - S)² > σ_s²·gain·S·m with
        # m·I > S; in terms of T and m' = m/(2k+1) the same test reads (m'·I - T)² > σ_s²·gain·T·m'. The square
        # form is evaluated everywhere (a few passes into preallocated buffers); the sign, S > 0 and the global
        # threshold are then checked on the candidates only.
        excess, bound = self._excess, self._bound
        np.multiply(scaled_count, data, out=excess)
        np.subtract(excess, means, out=excess)
        np.multiply(means, strength_factor, out=bound)
        np.square(excess, out=excess)
        flat = np.flatnonzero(np.greater(excess, bound, out=self._over))
        panel, slow, fast = np.unravel_index(flat, self.shape)
        data_c, means_c, m_c = data[panel, slow, fast], means[panel, slow, fast], count.ravel()[flat]
        keep = (scaled_count.ravel()[flat] * data_c > means_c) & (means_c > 0) & (data_c > p.global_threshold)
        flat, panel, slow, fast = flat[keep], panel[keep], slow[keep], fast[keep]
        if flat.size == 0:
            return flat
        # Dispersion only where the pixel is strong enough: window sums of squares gathered at the candidates.
        window_values = self._windows[panel, slow, fast]  # (n, 2k+1, 2k+1) gathered from a strided view
        sum_sq = np.einsum("ijk,ijk->i", window_values, window_values, dtype=np.float64)
        m = m_c[keep].astype(np.float64)
        s = means_c[keep].astype(np.float64) * size
        g = self.gain_map.ravel()[flat] if self.gain_map is not None else float(p.gain)
        # variance/mean > gain·(1 + σ_b·sqrt(2/(m-1))), with variance = (m·Q - S²)/(m(m-1)), mean = S/m.
        bound_dispersion = 1.0 + p.sigma_background * np.sqrt(2.0 / np.maximum(m - 1.0, 1.0))
        dispersed = (m * sum_sq - s * s) > g * s * (m - 1.0) * bound_dispersion
        enough = m >= p.min_local_pixels
        return flat[dispersed & enough]

    def _connected_components(self, flat: np.ndarray) -> tuple[np.ndarray, int]:
        """Label of each strong pixel (8-connectivity inside one panel), labels 0..n-1."""
        _, n_slow, n_fast = self.shape
        _, slow, fast = np.unravel_index(flat, self.shape)
        rows, cols = [], []
        for d_slow, d_fast in ((0, 1), (1, -1), (1, 0), (1, 1)):
            inside = (slow + d_slow < n_slow) & (fast + d_fast >= 0) & (fast + d_fast < n_fast)
            target = flat + d_slow * n_fast + d_fast
            position = np.searchsorted(flat, target)
            position = np.minimum(position, flat.size - 1)
            linked = inside & (flat[position] == target)
            rows.append(np.flatnonzero(linked))
            cols.append(position[linked])
        row, col = np.concatenate(rows), np.concatenate(cols)
        graph = coo_matrix((np.ones(row.size, dtype=np.int8), (row, col)), shape=(flat.size, flat.size))
        n_labels, labels = connected_components(graph, directed=False)
        return labels, int(n_labels)

    def find(self, image: np.ndarray) -> SpotfindingResult:
        """Strong pixels grouped into spots with centroids, intensities and resolutions."""
        flat = self.strong_pixels(image)
        p = self.parameters
        if flat.size == 0:
            return SpotfindingResult(SpotList.empty(), flat)
        label_of, n_labels = self._connected_components(flat)
        values = image.ravel()[flat].astype(np.float64)
        panel_idx, slow_idx, fast_idx = np.unravel_index(flat, self.shape)
        size = np.bincount(label_of, minlength=n_labels)
        # Weight by counts above the spot's floor so the centroid follows the peak, not the background.
        floor = np.full(n_labels, np.inf)
        np.minimum.at(floor, label_of, values)
        weights = np.maximum(values - floor[label_of] + 1.0, 1e-3)
        total_w = np.bincount(label_of, weights, minlength=n_labels)
        fast = np.bincount(label_of, weights * (fast_idx + 0.5), minlength=n_labels) / total_w
        slow = np.bincount(label_of, weights * (slow_idx + 0.5), minlength=n_labels) / total_w
        panel = np.zeros(n_labels, dtype=np.int32)
        panel[label_of] = panel_idx
        intensity = np.bincount(label_of, values, minlength=n_labels)
        keep = (size >= p.min_spot_size) & (size <= p.max_spot_size)
        panel, fast, slow, intensity, size = panel[keep], fast[keep], slow[keep], intensity[keep], size[keep]
        lab = self.detector.pixel_to_lab(panel, fast, slow) if len(panel) else np.zeros((0, 3))
        d_spacing = d_spacing_of_lab_points(lab, self.beam.wavelength)
        d_lo = p.d_min if p.d_min is not None else 0.0
        d_hi = p.d_max if p.d_max is not None else np.inf
        in_range = (d_spacing >= d_lo) & (d_spacing <= d_hi)
        spots = SpotList(
            panel=panel.astype(np.int32),
            fast=fast,
            slow=slow,
            intensity=intensity,
            size=size.astype(np.int32),
            lab=lab,
            d_spacing=d_spacing,
        ).select(in_range)
        return SpotfindingResult(spots, flat)


def _running_sum_along_slow(values: np.ndarray, size: int, levels: list[np.ndarray], out: np.ndarray) -> None:
    """``out`` row i = sum of ``values`` rows i .. i+size-1 (axis 1), by binary doubling into ``levels`` buffers."""
    n_out = out.shape[1]
    first, offset, width, level = True, 0, 1, 0
    block, remaining = values, size
    while remaining:
        if remaining & 1:
            part = block[:, offset : offset + n_out]
            if first:
                np.copyto(out, part)
                first = False
            else:
                np.add(out, part, out=out)
            offset += width
        remaining >>= 1
        if remaining:
            following = levels[level]
            np.add(block[:, :-width], block[:, width:], out=following)
            block, width, level = following, width * 2, level + 1


def _check_resolution_limits(
    detector: Detector, beam: Beam, mask: np.ndarray, parameters: SpotfindingParameters
) -> None:
    """SpotfindingError naming the limits when d_min/d_max select no unmasked pixel (every spot would be dropped)."""
    d_min, d_max = parameters.d_min, parameters.d_max
    if d_min is None and d_max is None:
        return
    lowest, highest = covered_d_range(detector, beam, mask)
    if (d_min is None or d_min <= highest) and (d_max is None or d_max >= lowest):
        return
    if d_min is not None and d_max is not None:
        chosen = f"spotfinding.d_min={d_min:g} Å and d_max={d_max:g} Å select"
    elif d_min is not None:
        chosen = f"spotfinding.d_min={d_min:g} Å selects"
    else:
        chosen = f"spotfinding.d_max={d_max:g} Å selects"
    if not np.isfinite(lowest):
        covered = "no pixel at all: every pixel is masked"
    elif np.isfinite(highest):
        covered = f"{lowest:.2f}–{highest:.2f} Å"
    else:
        covered = f"d ≥ {lowest:.2f} Å (the direct beam falls on an unmasked pixel)"
    raise SpotfindingError(f"{chosen} no pixel: this detector covers {covered}")


def covered_d_range(detector: Detector, beam: Beam, mask: np.ndarray, block: int = 32) -> tuple[float, float]:
    """Smallest and largest d-spacing (Å) over the areas of the unmasked pixels; (inf, 0) when all are masked.

    Exact, at a small cost once per run: each block × block tile of a panel with an unmasked pixel is bounded over
    its whole rectangle, and only the few tiles whose bound could hold an extreme are then resolved pixel by pixel.
    """
    mask = np.asarray(mask, dtype=bool)
    _, n_slow, n_fast = mask.shape
    slow_starts, fast_starts = np.arange(0, n_slow, block), np.arange(0, n_fast, block)
    occupied = np.logical_or.reduceat(np.logical_or.reduceat(mask, slow_starts, axis=1), fast_starts, axis=2)
    panel_of, row, col = np.nonzero(occupied)
    if panel_of.size == 0:
        return np.inf, 0.0
    s0, f0 = slow_starts[row], fast_starts[col]
    s1, f1 = np.minimum(s0 + block, n_slow), np.minimum(f0 + block, n_fast)
    tile_low, tile_high = np.empty(panel_of.size), np.empty(panel_of.size)
    for index, panel in enumerate(detector.panels):
        on = panel_of == index
        tile_low[on], tile_high[on] = _rectangle_d_ranges(panel, beam.wavelength, f0[on], f1[on], s0[on], s1[on])

    def pixels_of(tile: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact d range of each unmasked pixel in one tile."""
        slow, fast = np.nonzero(mask[panel_of[tile], s0[tile] : s1[tile], f0[tile] : f1[tile]])
        fast, slow = fast + f0[tile], slow + s0[tile]
        return _rectangle_d_ranges(detector.panels[panel_of[tile]], beam.wavelength, fast, fast + 1, slow, slow + 1)

    # Branch and bound: a tile's bound is never beyond its pixels, so tiles past the best exact value are skipped.
    lowest = np.inf
    for tile in np.argsort(tile_low, kind="stable"):
        if tile_low[tile] >= lowest:
            break
        lowest = min(lowest, float(pixels_of(tile)[0].min()))
    highest = 0.0
    for tile in np.argsort(-tile_high, kind="stable"):
        if tile_high[tile] <= highest:
            break
        highest = max(highest, float(pixels_of(tile)[1].max()))
    return lowest, highest


def _rectangle_d_ranges(
    panel: Panel, wavelength: float, f0: np.ndarray, f1: np.ndarray, s0: np.ndarray, s1: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Smallest and largest d-spacing (Å) over each rectangle [f0, f1] × [s0, s1] (pixel coordinates) of a panel.

    On a flat panel the points within a scattering angle 2θ < 90° form a cone cut by a plane, a convex set, so 2θ
    is largest at a corner of the rectangle (the smallest d) and smallest where the direct beam meets the rectangle
    (d infinite) or else on an edge. Along the line a + t·e of an edge cos 2θ = -z/|p| has one stationary point,
    t* = (a_z·(a·e) - e_z·|a|²) / (e_z·(a·e) - a_z·|e|²); the edge's extremes are among its ends and t* if inside.
    """
    f0, f1, s0, s1 = (np.asarray(v, dtype=float) for v in (f0, f1, s0, s1))
    # The four edges of every rectangle: start (fast, slow), unit pixel step along fast or slow, length in pixels.
    start_f = np.concatenate([f0, f0, f0, f1])
    start_s = np.concatenate([s0, s1, s0, s0])
    length = np.concatenate([f1 - f0, f1 - f0, s1 - s0, s1 - s0])
    fast_step, slow_step = (np.asarray(axis) * panel.pixel_size for axis in (panel.fast_axis, panel.slow_axis))
    step = np.repeat(np.stack([fast_step, slow_step]), 2 * f0.size, axis=0)
    a = panel.pixel_to_lab(start_f, start_s)
    a_e, a_a, e_e = np.einsum("ij,ij->i", a, step), np.einsum("ij,ij->i", a, a), np.einsum("ij,ij->i", step, step)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = (a[:, 2] * a_e - step[:, 2] * a_a) / (step[:, 2] * a_e - a[:, 2] * e_e)
    t = np.where(np.isfinite(t), np.clip(t, 0.0, length), 0.0)
    ends = d_spacing_of_lab_points(np.stack([a, a + step * length[:, None]]), wavelength)  # (2, 4n)
    stationary = d_spacing_of_lab_points(a + step * t[:, None], wavelength)
    low = ends.min(axis=0).reshape(4, -1).min(axis=0)
    high = np.maximum(ends.max(axis=0), stationary).reshape(4, -1).max(axis=0)
    fast, slow, hit = panel.ray_to_pixel(np.array([0.0, 0.0, -1.0]))
    if hit:
        high[(f0 <= fast) & (fast <= f1) & (s0 <= slow) & (slow <= s1)] = np.inf
    return low, high


def find_spots(
    image: np.ndarray,
    detector: Detector,
    beam: Beam,
    mask: np.ndarray,
    parameters: SpotfindingParameters,
    gain_map: np.ndarray | None = None,
) -> SpotfindingResult:
    """One-shot spotfinding (build a :class:`SpotFinder` once per run to reuse the mask-dependent work)."""
    return SpotFinder(detector, beam, mask, parameters, gain_map).find(image)
