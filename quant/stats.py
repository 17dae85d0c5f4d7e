"""Mergeable activation statistics: what a client sends for one activation point (design.md s. 4).

A histogram on a grid the server fixed, the counts outside it, min, max and n. Every field merges
by a sum, a min or a max, so merging is exact, associative and commutative, and the merged
statistics of any partition of the data equal the statistics of the pooled data.

**The grid.** ``Grid(lo, hi, bins)`` has uniform half-open bins ``[lo + k w, lo + (k+1) w)``,
``w = (hi - lo) / bins``. To make binning an exact function of the value (the same bin on every
device, and a widened grid that coarsens the old one exactly), a grid must be *aligned*: ``w`` is a
float64 whose mantissa has at most 20 significant bits and ``lo = a w`` for an integer ``a``
(``|a| + bins <= 2**31``). ``Grid.snap(lo, hi, bins)`` returns the smallest aligned grid around a
range. Values are taken as float32 (what activations are on device); for float32 ``x`` the float64
quotient ``x / w`` is then never rounded across an integer, so ``bin(x) = floor(x / w) - a`` is the
bin of the real-number definition, with no rounding ambiguity at the edges.

**Outside the grid.** ``below`` counts ``x < lo``, ``above`` counts ``x >= hi`` (half-open, like the
bins: a value equal to ``hi`` is above). ``-inf``/``+inf`` count as below/above and update min/max;
NaN is rejected.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

_MANTISSA_BITS = 20          # significant bits a grid width may have (see module docstring)
_MAX_INDEX = 2**31           # bound on |a| + bins, so x / w stays exact enough in float64
_SNAP_BITS = 8               # Grid.snap rounds the width up to 8 significant bits (<0.4% wider)
_CHUNK = 1 << 20             # values per chunk when binning (bounds the float64 temporaries)
_MERGE_CHUNK = 256           # statistics stacked at once by merge_all (bounds the temporary)


def _to_float32(x) -> np.ndarray:
    """Flatten a numpy array or torch tensor to float32 without importing torch here."""
    if hasattr(x, "detach"):                       # torch.Tensor (bf16/fp16 widen exactly)
        x = x.detach().cpu().float().numpy()
    return np.asarray(x, dtype=np.float32).reshape(-1)


def _is_aligned_width(w: float) -> bool:
    m, _ = math.frexp(w)
    return math.isfinite(w) and w > 0 and (m * 2**_MANTISSA_BITS).is_integer()


@dataclass(frozen=True)
class Grid:
    """Uniform histogram edges ``lo + k (hi - lo) / bins``, aligned (see module docstring)."""

    lo: float
    hi: float
    bins: int

    def __post_init__(self):
        lo, hi, bins = float(self.lo), float(self.hi), int(self.bins)
        object.__setattr__(self, "lo", lo)
        object.__setattr__(self, "hi", hi)
        object.__setattr__(self, "bins", bins)
        if bins < 2:
            raise ValueError(f"grid bins must be >= 2, got {bins}")
        if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
            raise ValueError(f"grid needs finite lo < hi, got lo={lo}, hi={hi}")
        w = (hi - lo) / bins
        a = round(lo / w)
        if not (_is_aligned_width(w) and a * w == lo and (a + bins) * w == hi
                and abs(a) + bins <= _MAX_INDEX):
            raise ValueError(
                f"grid lo={lo!r}, hi={hi!r}, bins={bins} is not aligned (width must have at most "
                f"{_MANTISSA_BITS} significant bits and lo must be a multiple of it); "
                f"use Grid.snap(lo, hi, bins)")

    @property
    def width(self) -> float:
        return (self.hi - self.lo) / self.bins

    @property
    def start(self) -> int:
        """``a`` with ``lo = a * width``."""
        return round(self.lo / self.width)

    def edges(self) -> np.ndarray:
        return (self.start + np.arange(self.bins + 1, dtype=np.float64)) * self.width

    @classmethod
    def snap(cls, lo: float, hi: float, bins: int) -> "Grid":
        """The aligned grid of ``bins`` bins with the smallest width that contains ``[lo, hi]``."""
        lo, hi = float(lo), float(hi)
        if not (math.isfinite(lo) and math.isfinite(hi) and lo <= hi):
            raise ValueError(f"snap needs finite lo <= hi, got {lo}, {hi}")
        w = max((hi - lo) / bins, 2.0**-60, abs(lo) * 2.0**-30, abs(hi) * 2.0**-30)
        while True:
            w = _round_width_up(w)
            a = math.floor(lo / w)
            if (a + bins) * w >= hi and a * w <= lo:
                return cls(a * w, (a + bins) * w, bins)
            w = math.nextafter(w, math.inf)

    def coarsen(self, factor: int, cover: tuple[float, float] | None = None) -> "Grid":
        """A grid of the same bin count, width ``f * width`` for the smallest power of two
        ``f >= factor`` such that it contains this grid and ``cover``; its edges are a subset of
        this grid's edges, so each old bin falls entirely in one new bin."""
        if factor < 2 or factor & (factor - 1):
            raise ValueError(f"widen factor must be a power of two >= 2, got {factor}")
        lo, hi = self.lo, self.hi
        if cover is not None:
            c_lo, c_hi = float(cover[0]), float(cover[1])
            if not (math.isfinite(c_lo) and math.isfinite(c_hi)):
                raise ValueError(f"cover must be finite, got {cover}")
            lo, hi = min(lo, c_lo), max(hi, c_hi)
        w = self.width * factor                      # power-of-two multiples: still aligned
        while True:
            if not math.isfinite(w * self.bins):
                raise ValueError(f"no finite grid of {self.bins} bins covers [{lo}, {hi}]")
            a_min, a_max = math.ceil(hi / w) - self.bins, math.floor(lo / w)
            if a_min <= a_max:
                a = min(max(round((lo + hi) / (2 * w) - self.bins / 2), a_min), a_max)
                return Grid(a * w, (a + self.bins) * w, self.bins)
            w *= 2


def _round_width_up(w: float) -> float:
    m, e = math.frexp(w)                              # w = m 2^e, 0.5 <= m < 1
    return math.ceil(m * 2**_SNAP_BITS) * 2.0 ** (e - _SNAP_BITS)


@dataclass(frozen=True, eq=False)
class ActivationStats:
    """Histogram on ``grid`` plus the counts outside it, min, max and the number of values.

    ``counts`` is int64 and read-only. An empty stats has ``min = +inf``, ``max = -inf``, n = 0.
    After :func:`widen`, ``below``/``above`` may also hold values inside the new grid that could
    not be placed in a bin (they lie below/above the old grid); ``n`` stays exact.
    """

    grid: Grid
    counts: np.ndarray
    below: int = 0
    above: int = 0
    min: float = math.inf
    max: float = -math.inf
    n: int = 0

    def __post_init__(self):
        c = np.array(self.counts, dtype=np.int64, copy=True)
        if c.shape != (self.grid.bins,):
            raise ValueError(f"counts has shape {c.shape}, grid needs ({self.grid.bins},)")
        c.setflags(write=False)
        object.__setattr__(self, "counts", c)
        for name in ("below", "above", "n"):
            object.__setattr__(self, name, int(getattr(self, name)))
        object.__setattr__(self, "min", float(self.min))
        object.__setattr__(self, "max", float(self.max))

    lo = property(lambda self: self.grid.lo)
    hi = property(lambda self: self.grid.hi)
    bins = property(lambda self: self.grid.bins)

    @property
    def total(self) -> int:
        return int(self.counts.sum()) + self.below + self.above

    @classmethod
    def empty(cls, lo: float, hi: float, bins: int) -> "ActivationStats":
        return _empty(Grid(lo, hi, bins))

    @classmethod
    def from_values(cls, x, lo: float, hi: float, bins: int) -> "ActivationStats":
        return observe(x, Grid(lo, hi, bins))

    def __eq__(self, other) -> bool:
        if not isinstance(other, ActivationStats):
            return NotImplemented
        return (self.grid == other.grid and np.array_equal(self.counts, other.counts)
                and (self.below, self.above, self.n) == (other.below, other.above, other.n)
                and (self.min, self.max) == (other.min, other.max))

    __hash__ = None

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Plain numpy arrays for the wire: lo_hi float64 (2,), counts int64 (bins,),
        below_above int64 (2,), min_max float64 (2,), n int64 ()."""
        return {"lo_hi": np.array([self.lo, self.hi], dtype=np.float64),
                "counts": self.counts.copy(),
                "below_above": np.array([self.below, self.above], dtype=np.int64),
                "min_max": np.array([self.min, self.max], dtype=np.float64),
                "n": np.array(self.n, dtype=np.int64)}

    @classmethod
    def unchecked(cls, grid: Grid, counts: np.ndarray, below: int, above: int, mn: float, mx: float,
                  n: int) -> "ActivationStats":
        """Fast constructor for decoders that have already checked, for many points at
        once, everything :meth:`from_arrays` checks (quant.wire.decode_stats_reply). No copy and no
        check: ``counts`` must be an int64 array of shape ``(grid.bins,)`` that nobody writes to
        (it is made read-only here, and may be a view of a larger read-only array), ``below``,
        ``above``, ``n`` Python ints and ``mn``, ``mx`` Python floats. The result equals what the
        checked constructor gives (tests/test_fast_paths.py)."""
        c = counts.view()
        c.setflags(write=False)
        obj = object.__new__(cls)
        obj.__dict__.update(grid=grid, counts=c, below=below, above=above, min=mn, max=mx, n=n)
        return obj

    @classmethod
    def from_arrays(cls, d: dict[str, np.ndarray]) -> "ActivationStats":
        """Inverse of :meth:`to_arrays`; validates keys, dtypes, shapes and consistency. Counts may
        come in any integer dtype (the wire may send the smallest exact one)."""
        want = {"lo_hi", "counts", "below_above", "min_max", "n"}
        if set(d) != want:
            raise ValueError(f"stats arrays: missing {sorted(want - set(d))}, "
                             f"unexpected {sorted(set(d) - want)}")
        arrs = {k: np.asarray(v) for k, v in d.items()}
        for k, shape in (("lo_hi", (2,)), ("below_above", (2,)), ("min_max", (2,)), ("n", ())):
            if arrs[k].shape != shape:
                raise ValueError(f"stats arrays: {k} has shape {arrs[k].shape}, expected {shape}")
        if arrs["counts"].ndim != 1:
            raise ValueError(f"stats arrays: counts must be 1-D, got shape {arrs['counts'].shape}")
        for k in ("counts", "below_above", "n"):
            if not np.issubdtype(arrs[k].dtype, np.integer):
                raise ValueError(f"stats arrays: {k} must be an integer array, got {arrs[k].dtype}")
            if np.any(arrs[k] < 0):
                raise ValueError(f"stats arrays: {k} has negative entries")
        for k in ("lo_hi", "min_max"):
            if not np.issubdtype(arrs[k].dtype, np.floating):
                raise ValueError(f"stats arrays: {k} must be a float array, got {arrs[k].dtype}")
        lo, hi = (float(v) for v in arrs["lo_hi"])
        mn, mx = (float(v) for v in arrs["min_max"])
        grid = Grid(lo, hi, arrs["counts"].shape[0])
        below, above = (int(v) for v in arrs["below_above"])
        n = int(arrs["n"])
        total = int(arrs["counts"].astype(np.int64).sum()) + below + above
        if total != n:
            raise ValueError(f"stats arrays: counts sum to {total} but n is {n}")
        if math.isnan(mn) or math.isnan(mx):
            raise ValueError("stats arrays: min/max is NaN")
        if n == 0 and (mn, mx) != (math.inf, -math.inf):
            raise ValueError("stats arrays: n = 0 needs min = +inf and max = -inf")
        if n > 0 and not mn <= mx:
            raise ValueError(f"stats arrays: min {mn} > max {mx}")
        # Cheap consistency of min/max with the occupied bins (values outside a grid always lie
        # below its hi / at or above its lo, widened or not).
        if (mn < lo and not below) or (mx >= hi and not above):
            raise ValueError("stats arrays: min/max lie outside the grid but below/above is 0")
        nz = np.flatnonzero(arrs["counts"])
        edges = grid.edges()
        if (nz.size and not mn < edges[nz[0] + 1]) or (below and not mn < hi):
            raise ValueError(f"stats arrays: min {mn} is above values the histogram holds")
        if (nz.size and not mx >= edges[nz[-1]]) or (above and not mx >= lo):
            raise ValueError(f"stats arrays: max {mx} is below values the histogram holds")
        return cls(grid, arrs["counts"], below, above, mn, mx, n)


def _empty(grid: Grid) -> ActivationStats:
    return ActivationStats(grid, np.zeros(grid.bins, dtype=np.int64))


def observe(x, grid: Grid) -> ActivationStats:
    """Statistics of the values of ``x`` (numpy array or torch tensor, any shape) on ``grid``."""
    x = _to_float32(x)
    if x.size == 0:
        return _empty(grid)
    mn, mx = float(x.min()), float(x.max())         # NaN propagates through min/max
    if math.isnan(mn) or math.isnan(mx):
        raise ValueError(f"activation has {int(np.isnan(x).sum())} NaN values of {x.size}")
    w, a = grid.width, grid.start
    inside = grid.lo <= mn and mx < grid.hi          # exact: Python floats, float32 values
    counts = np.zeros(grid.bins, dtype=np.int64)
    below = above = 0
    for i in range(0, x.size, _CHUNK):
        v = x[i:i + _CHUNK].astype(np.float64)
        if not inside:
            lo_mask, hi_mask = v < grid.lo, v >= grid.hi
            below += int(np.count_nonzero(lo_mask))
            above += int(np.count_nonzero(hi_mask))
            v = v[~(lo_mask | hi_mask)]
        np.divide(v, w, out=v)
        np.floor(v, out=v)
        idx = v.astype(np.int64)
        idx -= a
        counts += np.bincount(idx, minlength=grid.bins)
    return ActivationStats(grid, counts, below, above, mn, mx, x.size)


def _check_same_grid(a: ActivationStats, b: ActivationStats) -> None:
    for name in ("lo", "hi", "bins"):
        if getattr(a.grid, name) != getattr(b.grid, name):
            raise ValueError(f"cannot merge statistics on different grids: {name} "
                             f"{getattr(a.grid, name)!r} != {getattr(b.grid, name)!r}")


def merge(a: ActivationStats, b: ActivationStats) -> ActivationStats:
    """Sum of counts, min of mins, max of maxes, sum of n: exact, associative, commutative."""
    _check_same_grid(a, b)
    return ActivationStats(a.grid, a.counts + b.counts, a.below + b.below, a.above + b.above,
                           min(a.min, b.min), max(a.max, b.max), a.n + b.n)


def merge_all(stats: Iterable[ActivationStats]) -> ActivationStats:
    """Merge any number (at least one) of statistics on the same grid.

    The same result as folding :func:`merge` from the first: the counts are summed with one numpy
    reduction over stacked chunks (int64 addition is exact and associative, also modulo 2^64),
    below/above/n as Python ints, and min/max by the builtins, which keep the first of equal
    values as the pairwise fold does."""
    stats = list(stats)
    if not stats:
        raise ValueError("merge_all needs at least one statistics object")
    first = stats[0]
    for s in stats:
        if s.grid is not first.grid:
            _check_same_grid(first, s)
    counts = first.counts.copy()
    for i in range(1, len(stats), _MERGE_CHUNK):
        chunk = [s.counts for s in stats[i:i + _MERGE_CHUNK]]
        counts += np.concatenate(chunk).reshape(len(chunk), -1).sum(axis=0, dtype=np.int64)
    return ActivationStats(first.grid, counts, sum(s.below for s in stats), sum(s.above for s in stats),
                           min(s.min for s in stats), max(s.max for s in stats), sum(s.n for s in stats))


def widen(stats: ActivationStats, factor: int = 2,
          cover: tuple[float, float] | None = None) -> ActivationStats:
    """Re-bin ``stats`` exactly onto ``stats.grid.coarsen(factor, cover)``.

    The new width is a power-of-two multiple of the old and the new edges are old edges, so every
    old bin lands whole in one new bin: for the values inside the old grid, the result equals the
    statistics computed directly on the new grid. Values outside the old grid have unknown
    positions, so they stay in ``below``/``above`` (calibrators model them as sitting at min/max);
    min, max and ``n`` are unchanged. ``cover=(stats.min, stats.max)`` widens until the observed
    range fits, which is what the server does before the next round collects on the new grid.
    """
    old, new = stats.grid, stats.grid.coarsen(factor, cover)
    # old bin k starts at edges[k]; dividing by the power-of-two multiple of its width is exact
    idx = (np.floor(old.edges()[:-1] / new.width) - new.start).astype(np.int64)
    counts = np.zeros(new.bins, dtype=np.int64)
    np.add.at(counts, idx, stats.counts)
    return ActivationStats(new, counts, stats.below, stats.above, stats.min, stats.max, stats.n)


def needs_widening(stats: ActivationStats, threshold: float) -> bool:
    """True when the share of values left outside the histogram exceeds ``threshold``."""
    return stats.n > 0 and (stats.below + stats.above) > threshold * stats.n


def grid_from_absmax(absmaxes: Sequence[float], bins: int, margin: float = 1.25,
                     quantile: float = 0.9, nonnegative: bool = False) -> Grid:
    """The grid for an activation point from the clients' scouting reports of ``max |x|``.

    Robust upper value: the ``quantile`` of the reports (one client with a freak value, or a
    poisoned report, cannot stretch the grid), times ``margin``. The grid is symmetric
    ``[-A, A]`` (zero is an edge when ``bins`` is even), or ``[0, A]`` for ``nonnegative``
    activations; snapped to an aligned grid. Mass that still falls outside is kept in
    below/above with exact min/max, and the grid is widened when it exceeds a threshold.
    """
    r = np.asarray(absmaxes, dtype=np.float64).reshape(-1)
    if r.size == 0:
        raise ValueError("grid_from_absmax needs at least one report")
    if not np.all(np.isfinite(r)) or np.any(r < 0):
        raise ValueError("abs-max reports must be finite and non-negative")
    if margin < 1 or not 0 < quantile <= 1:
        raise ValueError(f"need margin >= 1 and 0 < quantile <= 1, got {margin}, {quantile}")
    # inverted_cdf picks a reported value, never one interpolated towards a freak report
    top = max(float(np.quantile(r, quantile, method="inverted_cdf")) * margin, 2.0**-40)
    if nonnegative:
        return Grid.snap(0.0, top, bins)
    half = bins // 2
    w = _round_width_up(top / half)
    return Grid(-half * w, (bins - half) * w, bins)


def channel_sqsum(x) -> np.ndarray:
    """Per-channel (last axis) ``sum x^2`` over every other axis, in float64: the mean square a
    fleet sums (divided by the token count) is each weight column's importance
    (``quant.weight_ranges``); a sum, so a fleet's is the sum of its clients'."""
    x = np.asarray(x, dtype=np.float32)
    x = x.reshape(-1, x.shape[-1]).astype(np.float64)
    out = np.einsum("tc,tc->c", x, x)
    if not np.all(np.isfinite(out)):
        raise ValueError("activation has non-finite values")
    return out


def channel_absmax(x, axis: int = -1) -> np.ndarray:
    """Per-channel ``max |x|`` over every axis but ``axis`` (float32): SmoothQuant's statistic."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().float().numpy()
    x = np.asarray(x, dtype=np.float32)
    axis = axis % x.ndim
    x = np.moveaxis(x, axis, -1).reshape(-1, x.shape[axis])
    if x.shape[0] == 0:
        return np.zeros(x.shape[1], dtype=np.float32)
    out = np.abs(x).max(axis=0)
    if np.isnan(out).any():
        raise ValueError(f"activation has NaN values in {int(np.isnan(out).sum())} channels")
    return out.astype(np.float32)


def merge_absmax(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Elementwise max of two per-channel abs-max vectors (exact, associative, commutative)."""
    a, b = np.asarray(a, dtype=np.float32), np.asarray(b, dtype=np.float32)
    if a.shape != b.shape:
        raise ValueError(f"per-channel abs-max shapes differ: {a.shape} vs {b.shape}")
    return np.maximum(a, b)
