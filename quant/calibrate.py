"""From merged activation statistics to a range ``(lo, hi)`` per QuantSpec (design.md section 4).

The server runs one calibrator per activation point and device profile on the merged histogram;
``range_to_qparams(lo, hi, spec)`` then gives ``(s, z)``. Every calibrator sees the data through
one model of the histogram: each bin's mass is spread uniformly over the part of the bin inside
``[min, max]``, and the mass outside the grid (``below``/``above``) sits at ``min``/``max`` (the
pessimistic place: it is where clipping costs most). An infinite min/max carries no location; it
is replaced by the grid edge (or by the other, finite extreme when that lies further out).
Numpy only; every function is pure.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from quant.affine import qparams_to_range, range_to_qparams
from quant.spec import QuantSpec
from quant.stats import ActivationStats


class CalibratorConfig(BaseModel):
    """Which calibrator turns a merged histogram into a range, and its knobs."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    method: Literal["minmax", "percentile", "mse", "entropy"] = "mse"
    percentile: float = Field(99.999, gt=0, le=100,
                              description="two-sided: (100 - p) / 2 percent is cut on each side")
    mse_steps: int = Field(96, ge=8, le=4096, description="candidates per coarse search sweep")


def calibrate(stats: ActivationStats, spec: QuantSpec, config: CalibratorConfig) -> tuple[float, float]:
    """The range of one activation point for ``spec``, by ``config.method``."""
    if spec.granularity != "per_tensor":
        raise ValueError(f"activation statistics calibrate per-tensor specs, got {spec.short()}")
    if stats.n == 0:
        raise ValueError("cannot calibrate from empty statistics (n = 0)")
    if config.method == "minmax":
        return minmax_range(stats, spec)
    if config.method == "percentile":
        return percentile_range(stats, spec, config.percentile)
    if config.method == "mse":
        return mse_range(stats, spec, config.mse_steps)
    return entropy_range(stats, spec)


# ---------------------------------------------------------------------------------------------
# The histogram model shared by every calibrator

def _extremes(stats: ActivationStats) -> tuple[float, float]:
    """min and max, with infinities replaced by the grid edge or the finite extreme beyond it."""
    finite = [v for v in (stats.min, stats.max) if math.isfinite(v)]
    low, high = min([stats.lo, *finite]), max([stats.hi, *finite])
    mn = stats.min if math.isfinite(stats.min) else (low if stats.min < 0 else high)
    mx = stats.max if math.isfinite(stats.max) else (high if stats.max > 0 else low)
    return mn, mx


def _cells(stats: ActivationStats) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Non-empty cells ``[a, b]`` with mass ``m``: the bins cut to [min, max], plus the outside
    mass as points (a == b) at min and max."""
    mn, mx = _extremes(stats)
    e = stats.grid.edges()
    a = np.concatenate([[mn], np.clip(e[:-1], mn, mx), [mx]])
    b = np.concatenate([[mn], np.clip(e[1:], mn, mx), [mx]])
    m = np.concatenate([[stats.below], stats.counts, [stats.above]]).astype(np.float64)
    keep = m > 0
    return a[keep], b[keep], m[keep]


def _mass_at_most(a, b, m, t: np.ndarray) -> np.ndarray:
    """Mass of the cells at or below each value of ``t`` (the model's CDF)."""
    t = np.asarray(t, dtype=np.float64)[:, None]
    width = b - a
    frac = np.where(width > 0, np.clip((t - a) / np.where(width > 0, width, 1), 0, 1), t >= a)
    return frac @ m


def minmax_range(stats: ActivationStats, spec: QuantSpec | None = None) -> tuple[float, float]:
    """The observed min and max (no clipping): right when every value matters, as for the massive
    outliers of LLM activations."""
    return _extremes(stats)


def percentile_range(stats: ActivationStats, spec: QuantSpec | None = None,
                     percentile: float = 99.999) -> tuple[float, float]:
    """Two-sided percentile: cut ``(100 - p) / 2`` percent of the mass on each side, interpolating
    inside a bin. This is PyTorch-style / ORT's asymmetric mode; ORT's symmetric mode and NVIDIA's
    pytorch-quantization take the percentile of ``|x|`` instead. Within one bin width of the data's
    percentile when it falls inside the grid."""
    if not 0 < percentile <= 100:
        raise ValueError(f"percentile must be in (0, 100], got {percentile}")
    a, b, m = _cells(stats)
    cut = m.sum() * (100.0 - percentile) / 200.0
    return _quantile(a, b, m, cut), _quantile(a, b, m, m.sum() - cut)


def _quantile(a, b, m, mass: float) -> float:
    """The value below which ``mass`` of the cells lies (cells are sorted and disjoint)."""
    cum = np.cumsum(m)
    i = min(int(np.searchsorted(cum, mass, side="left")), m.size - 1)
    before = cum[i] - m[i]
    frac = 0.0 if m[i] == 0 else min(max((mass - before) / m[i], 0.0), 1.0)
    return float(a[i] + frac * (b[i] - a[i]))


# ---------------------------------------------------------------------------------------------
# MSE search

def _sq_error(a, b, m, lo: np.ndarray, hi: np.ndarray, spec: QuantSpec) -> np.ndarray:
    """Expected sum of squared fake-quant errors over the cells, for each candidate range.

    Uses the spec's own ``(s, z)`` (range_to_qparams: zero included, z rounded, symmetric or not),
    so the representable values are the multiples of ``s`` in ``[c_lo, c_hi]``. Inside, the
    integral of the rounding error has a closed form (the sawtooth integrates to ``s^3 / 12`` per
    step); outside, the clipping error is ``(x - c)^2``. Unlike PyTorch's HistogramObserver, which
    assumes the rounding error of a bin is that of a uniform destination bin, this is exact for
    the model, so a coarse histogram and a fine step are handled alike."""
    s, z = range_to_qparams(lo, hi, spec)
    c_lo, c_hi = qparams_to_range(s, z, spec)
    s, c_lo, c_hi = (np.asarray(v, dtype=np.float64)[:, None] for v in (s, c_lo, c_hi))
    a, b, m = a[None, :], b[None, :], m[None, :]

    def saw(x):                    # an antiderivative of the rounding error (x - s round(x/s))^2
        v = x / s + 0.5
        f = v - np.floor(v)
        return s**3 * (np.floor(v) / 12 + ((f - 0.5) ** 3 + 0.125) / 3)

    l, r = np.clip(a, c_lo, c_hi), np.clip(b, c_lo, c_hi)
    inside = saw(r) - saw(l)
    below = (np.maximum(c_lo - a, 0) ** 3 - np.maximum(c_lo - b, 0) ** 3) / 3
    above = (np.maximum(b - c_hi, 0) ** 3 - np.maximum(a - c_hi, 0) ** 3) / 3
    width = b - a
    spread = m * (inside + below + above) / np.where(width > 0, width, 1)
    x_hat = np.clip(s * np.round(a / s), c_lo, c_hi)
    point = m * (a - x_hat) ** 2
    return np.where(width > 0, spread, point).sum(axis=1)


def _sq_error_fn(a, b, m, spec: QuantSpec):
    """``lambda lo, hi: _sq_error(a, b, m, lo, hi, spec)``, equal bit for bit, for the many calls of
    one search on one histogram (``_sq_error`` stays the reference: expected_mse uses it).

    ``_sq_error`` costs six ``pow`` calls per (candidate, cell) (``x ** 3`` is ~25 ns, the other
    operations ~1 ns), most of them on bases it then discards or that are zero. The same
    elementwise expressions are evaluated here, on the same values, but each cube once per
    (candidate, edge) and as a ``pow`` only where its base can be non-zero:

    - cells are chained on a list of edges (a cell's ``a`` is the previous cell's ``b`` when they
      are the same float, as for adjacent bins), so ``saw``, ``max(c_lo - x, 0) ** 3`` and
      ``max(x - c_hi, 0) ** 3`` are computed once per edge and differenced between neighbours;
    - ``max(c_lo - x, 0) ** 3`` is a ``pow`` only for ``x < c_lo`` (elsewhere its base is a zero and
      ``t * t * t`` equals ``pow(t, 3)``, sign included); likewise above ``c_hi``;
    - ``saw(clip(x, c_lo, c_hi))`` is the row's ``saw(c_lo)`` or ``saw(c_hi)`` for a clipped edge
      (clip returns the bound itself), and ``saw`` proper only for the edges in between;
    - the point formula only for the point cells (``np.where`` keeps nothing else of it).

    The per-cell values are then summed over a C-ordered (candidates, cells) array, as in
    ``_sq_error``, so the row sums are the same pairwise sums. Costs are memoized by
    ``(s, c_lo, c_hi)`` (a row's cost depends on nothing else): coordinate descent and the
    sweeps revisit candidates. tests/test_fast_paths.py checks equality on random histograms."""
    width = b - a
    wdiv = np.where(width > 0, width, 1)
    pcols = np.flatnonzero(~(width > 0))
    a_pt, m_pt = a[pcols][None, :], m[pcols][None, :]
    k = a.size
    new_a = np.ones(k, dtype=bool)                 # a_k is not the previous cell's b (bit for bit)
    new_a[1:] = a[1:].view(np.int64) != b[:-1].view(np.int64)
    ib = np.arange(k) + np.cumsum(new_a)           # where b_k sits in the edge list; a_k just before
    ia = ib - 1
    edges = np.empty(k + int(new_a.sum()), dtype=np.float64)
    edges[ib] = b
    edges[ia[new_a]] = a[new_a]
    edges = edges[None, :]
    gather = None if np.array_equal(ia, np.arange(edges.size - 1)) else ia
    memo: dict[tuple, float] = {}

    def saw(x, s, s3):             # _sq_error's saw (same operations, in place), with s**3 given
        v = x / s
        v += 0.5
        fl = np.floor(v)
        f = np.subtract(v, fl, out=v)
        f -= 0.5
        np.power(f, 3, out=f)
        f += 0.125
        f /= 3
        fl /= 12
        fl += f
        fl *= s3
        return fl

    def cube(t, where):            # t ** 3 elementwise, where t is +-0 outside `where`
        out = t * t
        out *= t
        out[where] = t[where] ** 3
        return out

    def rows(s, c_lo, c_hi):       # (n, 1) each: the costs of n new candidates
        bm, am = edges < c_lo, edges > c_hi
        im = ~(bm | am)
        s3 = s**3
        t = c_lo - edges
        g = cube(np.maximum(t, 0, out=t), bm)
        t = edges - c_hi
        h = cube(np.maximum(t, 0, out=t), am)
        sw = np.where(bm, saw(c_lo, s, s3), saw(c_hi, s, s3))
        xc = np.clip(edges, c_lo, c_hi)
        sw[im] = saw(xc[im], np.broadcast_to(s, im.shape)[im], np.broadcast_to(s3, im.shape)[im])
        # per pair of neighbouring edges: (inside + below) + above of the cell between them
        inside = sw[:, 1:] - sw[:, :-1]
        below = g[:, :-1] - g[:, 1:]
        below /= 3
        above = h[:, 1:] - h[:, :-1]
        above /= 3
        inside += below
        inside += above
        if gather is not None:
            inside = inside[:, gather]
        spread = np.ascontiguousarray(m * inside / wdiv)   # C order, like np.where in _sq_error
        if pcols.size:
            x_hat = np.clip(s * np.round(a_pt / s), c_lo, c_hi)
            spread[:, pcols] = m_pt * (a_pt - x_hat) ** 2
        return spread.sum(axis=1)

    def cost(lo, hi) -> np.ndarray:
        s, z = range_to_qparams(lo, hi, spec)
        c_lo, c_hi = qparams_to_range(s, z, spec)
        s, c_lo, c_hi = (np.asarray(v, dtype=np.float64).reshape(-1) for v in (s, c_lo, c_hi))
        keys = list(map(tuple, np.stack([s, c_lo, c_hi], axis=1).view(np.int64).tolist()))
        todo = {}
        for i, key in enumerate(keys):
            if key not in memo and key not in todo:
                todo[key] = i
        if todo:
            j = np.fromiter(todo.values(), dtype=np.int64, count=len(todo))
            for key, v in zip(todo, rows(s[j, None], c_lo[j, None], c_hi[j, None]).tolist()):
                memo[key] = v
        return np.array([memo[key] for key in keys], dtype=np.float64)

    return cost


def expected_mse(stats: ActivationStats, lo: float, hi: float, spec: QuantSpec) -> float:
    """Histogram estimate of the mean squared fake-quant error of the range ``[lo, hi]``."""
    a, b, m = _cells(stats)
    return float(_sq_error(a, b, m, np.array([lo]), np.array([hi]), spec)[0] / m.sum())


def _search(cost, current: float, top: float, bottom: float, steps: int) -> float:
    """Minimize ``cost`` over ``[bottom, top]``: a geometric sweep down to ``top * 2^-20``
    (outliers can be 1000x the bulk), then two finer linear sweeps around the best. ``current`` is
    the first candidate and argmin keeps the first of equal costs, so the result never costs more
    than ``current``."""
    ratio = 2.0 ** (20 / (steps - 1))
    cand = np.concatenate([[current, top], top * np.geomspace(2.0**-20, 1.0, steps)])
    best = current
    for _ in range(3):
        cand = np.clip(cand, bottom, top)
        best = float(cand[np.argmin(cost(cand))])
        cand = np.concatenate([[best], np.linspace(best / ratio, best * ratio, 33)])
        ratio = 1 + (ratio - 1) / 8
    return best


def mse_range(stats: ActivationStats, spec: QuantSpec, steps: int = 96) -> tuple[float, float]:
    """The range minimizing the histogram-estimated quantization MSE at the spec's bit width and
    symmetry (the goal of PyTorch's HistogramObserver ``_non_linear_param_search`` and AIMET's
    tf_enhanced). Symmetric specs search one threshold; asymmetric ones search lo and hi by
    coordinate descent from min-max. Never worse than min-max in the estimated MSE."""
    mn, mx = _extremes(stats)
    sq_error = _sq_error_fn(*_cells(stats), spec)

    def cost(lo, hi):        # range_to_qparams widens to 0 anyway; keep lo <= 0 <= hi for it
        lo, hi = np.broadcast_arrays(np.minimum(lo, 0.0), np.maximum(hi, 0.0))
        return sq_error(lo, hi)

    return search_range(cost, mn, mx, spec, steps)


def search_range(cost, mn: float, mx: float, spec: QuantSpec, steps: int = 96) -> tuple[float, float]:
    """The range in ``[mn, mx]`` minimising ``cost(lo, hi)`` (vectorized over candidates): one
    threshold for a symmetric spec, lo and hi by coordinate descent from min-max otherwise. Shared
    by the MSE calibrator and ``quant.reconstruct``'s output-error search."""
    if spec.symmetric:
        top = max(-mn, mx)
        bottom = 0.0 if mn <= 0 <= mx else min(abs(mn), abs(mx))
        if top <= 0:
            return mn, mx
        t = _search(lambda c: cost(-c, c), top, top, bottom, steps)
        return _clamped(-t, t, mn, mx)
    lo, hi = mn, mx
    for _ in range(8):
        prev = (lo, hi)
        if mx > 0:
            hi = _search(lambda c: cost(lo, c), hi, mx, max(mn, 0.0), steps)
        if mn < 0:
            lo = -_search(lambda c: cost(-c, hi), -lo, -mn, max(-mx, 0.0), steps)
        if (lo, hi) == prev:
            break
    return lo, hi


def _clamped(lo: float, hi: float, mn: float, mx: float) -> tuple[float, float]:
    """``[lo, hi]`` cut to the data's ``[min, max]``; min-max if that leaves nothing."""
    lo, hi = max(lo, mn), min(hi, mx)
    return (lo, hi) if lo <= hi else (mn, mx)


# ---------------------------------------------------------------------------------------------
# KL-divergence (entropy) search

def entropy_range(stats: ActivationStats, spec: QuantSpec) -> tuple[float, float]:
    """TensorRT's entropy calibration (as in NVIDIA pytorch-quantization ``_compute_amax_entropy``
    and ONNX Runtime's ``get_entropy_threshold``): on the histogram of ``|x|``, pick the threshold
    ``t`` whose clipped distribution ``p`` (outliers folded into the last bin) is closest in KL
    divergence to ``q``, ``p`` merged into the spec's levels and expanded back over the non-empty
    bins. The range is ``[max(-t, min), min(t, max)]`` (ORT clamps its thresholds the same way).

    Levels on [0, t]: ``2^(bits-1)`` (TensorRT signed), or ``2^bits`` for an asymmetric spec on
    one-sided data (TensorRT unsigned). The |x| histogram has at least 8 bins per level (finer than
    the grid if need be, using the uniform-within-bin model) and spans ``[0, min(max|x|, grid)]``:
    mass beyond the grid is always an outlier, so widen the grid when it holds much mass.
    At 16 bits the levels outnumber any useful histogram (and clipping rarely pays); the result
    is min-max.
    TensorRT's ``bins[0] = bins[1]`` tweak (for ReLU spikes at zero) is not applied."""
    mn, mx = _extremes(stats)
    one_sided = mn >= 0 or mx <= 0
    levels = 2 ** spec.bits if (one_sided and not spec.symmetric) else 2 ** (spec.bits - 1)
    top = min(max(-mn, mx), max(-stats.lo, stats.hi))
    if levels > 2048 or top <= 0:
        return mn, mx
    nb = max(math.ceil(top / stats.grid.width), 8 * levels)
    edges = np.linspace(0.0, top, nb + 1)
    a, b, m = _cells(stats)
    inner = _mass_at_most(a, b, m, edges) - _mass_at_most(a, b, m, -edges) \
        + _point_mass_at(a, b, m, -edges)          # mass in [-t, t]
    inner[0] = 0.0                                  # so that the first bin holds the mass at 0
    hist = np.maximum(np.diff(inner), 0.0)
    outliers = max(m.sum() - inner[-1], 0.0)
    tail = np.concatenate([np.cumsum(hist[::-1])[::-1], [0.0]]) + outliers  # mass at or beyond bin i
    best_i, best_kl = nb, math.inf
    for i in range(levels, nb + 1):
        p = hist[:i].copy()
        p[-1] += tail[i]
        nonzero = hist[:i] > 0
        bucket = (np.arange(i) * levels) // i
        sums = np.bincount(bucket, weights=hist[:i], minlength=levels)
        nz = np.bincount(bucket, weights=nonzero, minlength=levels)
        q = np.where(nonzero, sums[bucket] / np.maximum(nz[bucket], 1), 0.0)
        kl = _kl(p, q)
        if kl <= best_kl:                         # ties go to the larger threshold (TensorRT)
            best_i, best_kl = i, kl
    t = float(edges[best_i])
    return _clamped(-t, t, mn, mx)


def _point_mass_at(a, b, m, t: np.ndarray) -> np.ndarray:
    """Mass of point cells sitting exactly at each ``t`` (so ``[-t, t]`` is closed on the left)."""
    point = (b - a) == 0
    return (np.asarray(t)[:, None] == a[None, :]) @ np.where(point, m, 0.0)


def _kl(p: np.ndarray, q: np.ndarray) -> float:
    if p.sum() <= 0 or q.sum() <= 0:
        return math.inf
    p, q = p / p.sum(), q / q.sum()
    mask = p > 0
    if np.any(q[mask] == 0):
        return math.inf
    return float(np.sum(p[mask] * np.log(p[mask] / q[mask])))
