"""Layer-wise range reconstruction: the learned-range job a mobile runtime can compute itself
(design.md sections 4 and 5, issue 17). Numpy only: no torch, no ONNX Runtime.

Each activation point is the input ``x`` of one Linear ``y = x W^T`` (``W`` with the point's
smoothing folded in: ``W m``, since the QDQ graph quantizes ``x / m``). Its range ``(lo, hi)`` is
chosen to minimise the error it causes in that Linear's output,

    E(lo, hi) = sum_t || (x_t - Q(x_t; lo, hi)) W^T ||^2
             ~= sum_t sum_j d_j (x_tj - Q(x_tj))^2,   d_j = ||W[:, j]||^2,

the diagonal of ``W^T W`` (the cross terms pair the rounding errors of different channels, which
are close to uncorrelated; the full form costs a matmul per candidate range). A *weighted
histogram* holds what that sum needs for every candidate range at once: per bin of a fixed grid
the summed weight ``d_j`` of the values falling in it, and the values outside the grid kept
exactly with their weights. It is additive (sums of batches, of clients) and one pass over the
data fills it, one batch's activations at a time, like the statistics job's histograms. The search
over ranges is the MSE calibrator's (``quant.calibrate``: the exact integral of the rounding error
of the spec's own ``(s, z)`` over uniform bins, a geometric sweep then finer linear ones,
coordinate descent on ``lo`` and ``hi``), on these weights instead of counts. The device runs the
local form of it (``local_range``: about 45 candidate ranges around the current one) for all its
points at once (``reconstruct_points``: one numpy evaluation per sweep, the same picks as
``reconstruct_point`` one point at a time).

The grid of a point is placed around the range it is asked to improve (the instruction's QParams):
``margin`` widths of that range on each side, ``bins`` bins. Values outside it are rare (the range
came from a percentile of the fleet's data) and are kept as exact point masses, at most
``tail_cap`` per side; past that the ones nearest the grid are merged into one point at the grid
edge (their clipping cost is then under-estimated by at most their distance to the edge).

Federated use: the histograms are too large for the learned-range budget (about 2 KB per client
per round, two numbers per point), so each client searches its own and sends the move of
``(log s, beta)`` as the torch LSQ job does (``quant.wire.LsqReply``, same bytes); the server
aggregates those deltas with its lsq rule. That is *not* the pooled optimum (the mean or median of
the clients' optima is not the optimum of their summed errors); ``best_range`` on ``merge``d
histograms is that centralized reference, and bench/runtime_ranges.py reports both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from quant.affine import qparams_to_range, range_to_qparams
from quant.calibrate import _sq_error_fn, search_range
from quant.spec import QuantSpec
from quant.stats import Grid

DEFAULT_BINS = 512
DEFAULT_GROUPS = 16
DEFAULT_MARGIN = 1.0
DEFAULT_TAIL_CAP = 4096
_CHUNK = 1 << 20
_HIST_VALUES = 1 << 16   # values binned at a time by observe_grouped (~800 KB of temporaries)


@dataclass(frozen=True, eq=False)
class WeightedHist:
    """Summed channel weights per bin of ``grid``, the values outside it (``tail_x``, sorted) with
    their weights (``tail_w``), min, max, the number of values ``n`` and the weighted energy
    ``sum d x^2`` (the scale relative errors are measured against)."""

    grid: Grid
    mass: np.ndarray
    tail_x: np.ndarray
    tail_w: np.ndarray
    min: float = math.inf
    max: float = -math.inf
    n: int = 0
    energy: float = 0.0

    @classmethod
    def empty(cls, grid: Grid) -> "WeightedHist":
        e = np.zeros(0, np.float64)
        return cls(grid, np.zeros(grid.bins, np.float64), e, e)


def output_weights(weight, smoothing=None) -> np.ndarray:
    """``d_j = m_j^2 * sum_i W_ij^2`` (float64) for a Linear weight ``W`` (out, in) whose input is
    quantized after division by the smoothing factors ``m`` (None: no smoothing)."""
    w = np.asarray(weight, dtype=np.float32)
    if w.ndim != 2:
        raise ValueError(f"a Linear weight is (out, in), got shape {w.shape}")
    d = np.einsum("ij,ij->j", w, w, dtype=np.float64)
    return d if smoothing is None else d * np.asarray(smoothing, np.float64) ** 2


def channel_groups(d, n_groups: int = DEFAULT_GROUPS) -> tuple[np.ndarray, np.ndarray]:
    """``(group of each channel, weight of each group)``: the channels binned by ``log d`` into at
    most ``n_groups`` equal-width classes, each weighted by the mean ``d`` of its channels, so that
    the total weight is exact and a channel's weight is off by at most the class's spread (a factor
    ``(max d / min d)^(1 / n_groups)``). What makes a weighted histogram cost about what the
    statistics job's histogram costs: an integer bincount over (group, bin) instead of a
    float-weighted one per value (measured 4x faster on SmolLM2's shapes)."""
    d = np.asarray(d, dtype=np.float64)
    pos = d > 0
    g = np.zeros(d.shape[0], np.int32)
    if pos.any():
        ld = np.log(d[pos])
        lo, hi = ld.min(), ld.max()
        k = n_groups - 1                        # group 0 holds the zero weights
        g[pos] = 1 + np.minimum(((ld - lo) / max(hi - lo, 1e-12) * k).astype(np.int32), k - 1)
    n = np.bincount(g, minlength=n_groups)
    w = np.bincount(g, weights=d, minlength=n_groups) / np.maximum(n, 1)
    return g, w


def grid_for(scale, zero_point, spec: QuantSpec, bins: int = DEFAULT_BINS,
             margin: float = DEFAULT_MARGIN) -> Grid:
    """The histogram grid of a point whose current parameters are ``(scale, zero_point)``: its
    range (with 0) widened by ``margin`` times its width on each side."""
    if spec.granularity != "per_tensor":
        raise ValueError(f"layer-wise reconstruction learns per-tensor activation ranges, got {spec.short()}")
    lo, hi = (float(np.ravel(v)[0]) for v in qparams_to_range(scale, zero_point, spec))
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    w = hi - lo
    if not (math.isfinite(w) and w > 0):
        raise ValueError(f"the point's range [{lo}, {hi}] is empty or not finite")
    return Grid.snap(lo - margin * w, hi + margin * w, int(bins))


def _cap_tail(x: np.ndarray, w: np.ndarray, edge: float, cap: int) -> tuple[np.ndarray, np.ndarray]:
    """At most ``cap`` points: the ones nearest ``edge`` merged into one point at ``edge``."""
    if x.size <= cap:
        return x, w
    far = np.argsort(-np.abs(x - edge), kind="stable")
    keep, fold = far[:cap - 1], far[cap - 1:]
    x2 = np.concatenate([x[keep], [edge]])
    w2 = np.concatenate([w[keep], [w[fold].sum()]])
    o = np.argsort(x2, kind="stable")
    return x2[o], w2[o]


def observe_grouped(x, groups: tuple[np.ndarray, np.ndarray], grid: Grid,
                    tail_cap: int = DEFAULT_TAIL_CAP) -> WeightedHist:
    """``observe_weighted`` with the channel weights of ``channel_groups`` (each channel weighted
    by its class's mean): one integer bincount over (class, bin), bin indices in float32. The
    tail values keep their class's weight; the energy uses the class weights too."""
    g, gw = groups
    x = np.asarray(x, dtype=np.float32)
    c = g.shape[0]
    if x.ndim == 0 or x.shape[-1] != c:
        raise ValueError(f"channel groups of {c} channels do not fit activations of shape {x.shape}")
    x2 = x.reshape(-1, c)
    if x2.size == 0:
        return WeightedHist.empty(grid)
    mn, mx = float(x2.min()), float(x2.max())
    if math.isnan(mn) or math.isnan(mx):
        raise ValueError("activation has NaN values")
    k, bins = gw.shape[0], grid.bins
    energy = float(np.einsum("ij,ij->j", x2, x2).astype(np.float64) @ gw[g])
    tails = mn < grid.lo or mx >= grid.hi
    tails_x, tails_w = [np.zeros(0, np.float64)], [np.zeros(0, np.float64)]
    # bin indices in float32 (exact integers below 2^24), class offsets added before one cast;
    # a few rows at a time, so that the temporaries stay in the CPU's cache (measured 1.1-1.2x
    # faster than all at once on SmolLM2's shapes; the counts, hence the result, are the same)
    offsets = (g * bins).astype(np.float32)[None, :]
    lo, per_bin = np.float32(grid.lo), np.float32(bins / (grid.hi - grid.lo))
    rows = max(1, _HIST_VALUES // c)
    buf = np.empty((min(rows, x2.shape[0]), c), np.float32)
    counts = np.zeros(k * bins + 1, np.intp)
    for i in range(0, x2.shape[0], rows):
        xb = x2[i:i + rows]
        t = np.subtract(xb, lo, out=buf[:xb.shape[0]])
        t *= per_bin
        np.clip(t, 0, bins - 1, out=t)          # (float32 rounding at the edges; tails below)
        np.floor(t, out=t)
        t += offsets
        if tails:
            out = (xb < grid.lo) | (xb >= grid.hi)
            r, ch = np.nonzero(out)
            tails_x.append(xb[r, ch].astype(np.float64))
            tails_w.append(gw[g[ch]])
            t[out] = k * bins                   # one extra bin, dropped
        counts += np.bincount(t.astype(np.intp).reshape(-1), minlength=k * bins + 1)
    mass = gw @ counts[:k * bins].reshape(k, bins)
    tails_x, tails_w = np.concatenate(tails_x), np.concatenate(tails_w)
    h = WeightedHist(grid, mass, *_sorted(tails_x, tails_w), mn, mx, int(x2.size), energy)
    return _capped(h, tail_cap)


def observe_weighted(x, d, grid: Grid, tail_cap: int = DEFAULT_TAIL_CAP) -> WeightedHist:
    """The weighted histogram of ``x`` (any shape, channels on the last axis) with channel
    weights ``d`` (last-axis length) on ``grid`` (float64 weights per value: the reference of
    ``observe_grouped``)."""
    x = np.asarray(x, dtype=np.float32)
    d = np.asarray(d, dtype=np.float64)
    if x.ndim == 0 or x.shape[-1] != d.shape[0] or d.ndim != 1:
        raise ValueError(f"weights of shape {d.shape} do not fit activations of shape {x.shape}")
    if not np.all(np.isfinite(d)) or np.any(d < 0):
        raise ValueError("channel weights must be finite and non-negative")
    x2 = x.reshape(-1, d.shape[0])
    if x2.size == 0:
        return WeightedHist.empty(grid)
    mn, mx = float(x2.min()), float(x2.max())
    if math.isnan(mn) or math.isnan(mx):
        raise ValueError("activation has NaN values")
    mass = np.zeros(grid.bins, np.float64)
    tails_x, tails_w = [], []
    energy = 0.0
    rows = max(1, _CHUNK // d.shape[0])
    wdt, a = grid.width, grid.start
    for i in range(0, x2.shape[0], rows):
        v = x2[i:i + rows].astype(np.float64)
        wt = np.broadcast_to(d, v.shape)
        energy += float(np.einsum("ij,ij,j->", v, v, d))
        v, wt = v.reshape(-1), wt.reshape(-1)
        out = (v < grid.lo) | (v >= grid.hi)
        if out.any():
            tails_x.append(v[out])
            tails_w.append(wt[out])
            v, wt = v[~out], wt[~out]
        idx = np.floor(v / wdt).astype(np.int64) - a
        mass += np.bincount(idx, weights=wt, minlength=grid.bins)
    tx = np.concatenate(tails_x) if tails_x else np.zeros(0, np.float64)
    tw = np.concatenate(tails_w) if tails_w else np.zeros(0, np.float64)
    h = WeightedHist(grid, mass, *_sorted(tx, tw), mn, mx, int(x2.size), energy)
    return _capped(h, tail_cap)


def _sorted(x, w):
    o = np.argsort(x, kind="stable")
    return x[o], w[o]


def _capped(h: WeightedHist, cap: int) -> WeightedHist:
    below = h.tail_x < h.grid.lo
    bx, bw = _cap_tail(h.tail_x[below], h.tail_w[below], h.grid.lo, cap)
    ax, aw = _cap_tail(h.tail_x[~below], h.tail_w[~below], h.grid.hi, cap)
    return WeightedHist(h.grid, h.mass, np.concatenate([bx, ax]), np.concatenate([bw, aw]),
                        h.min, h.max, h.n, h.energy)


def merge_weighted(a: WeightedHist, b: WeightedHist, tail_cap: int = DEFAULT_TAIL_CAP) -> WeightedHist:
    """Sum of two weighted histograms on the same grid (exact below ``tail_cap``)."""
    if a.grid != b.grid:
        raise ValueError(f"cannot merge weighted histograms on different grids: {a.grid} != {b.grid}")
    tx, tw = _sorted(np.concatenate([a.tail_x, b.tail_x]), np.concatenate([a.tail_w, b.tail_w]))
    return _capped(WeightedHist(a.grid, a.mass + b.mass, tx, tw, min(a.min, b.min), max(a.max, b.max),
                                a.n + b.n, a.energy + b.energy), tail_cap)


def _cells(h: WeightedHist) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cells ``[a, b]`` with weight ``m`` as ``quant.calibrate`` models them: each bin's weight
    uniform over its part inside ``[min, max]``, the tail values as points (a == b)."""
    e = h.grid.edges()
    mn, mx = h.min, h.max
    below = h.tail_x < h.grid.lo
    a = np.concatenate([h.tail_x[below], np.clip(e[:-1], mn, mx), h.tail_x[~below]])
    b = np.concatenate([h.tail_x[below], np.clip(e[1:], mn, mx), h.tail_x[~below]])
    m = np.concatenate([h.tail_w[below], h.mass, h.tail_w[~below]])
    keep = m > 0
    return a[keep], b[keep], m[keep]


def range_cost(h: WeightedHist, spec: QuantSpec):
    """``cost(lo, hi)`` (arrays of candidates) of the weighted squared error; ranges are widened
    to contain 0 as ``range_to_qparams`` does."""
    if h.n == 0:
        raise ValueError("no values observed")
    sq = _sq_error_fn(*_cells(h), spec)

    def cost(lo, hi):
        lo, hi = np.broadcast_arrays(np.minimum(np.atleast_1d(lo), 0.0), np.maximum(np.atleast_1d(hi), 0.0))
        return sq(lo.astype(np.float64), hi.astype(np.float64))

    return cost


def best_range(h: WeightedHist, spec: QuantSpec, steps: int = 96) -> tuple[float, float]:
    """The range minimising the weighted error (``quant.calibrate.mse_range``'s search)."""
    return search_range(range_cost(h, spec), h.min, h.max, spec, steps)


def _sweep(cost1, current: float, top: float, span: tuple[float, float], n: int) -> float:
    """Minimise ``cost1(c)`` (c > 0, vectorized) over ``current`` times a geometric sweep of
    ``span``, capped at ``top``, then a linear sweep of one step around the best. ``current`` is
    the first candidate and argmin keeps the first of equal costs: never worse than ``current``."""
    lo_f, hi_f = span
    cand = np.concatenate([[current], current * np.geomspace(lo_f, hi_f, n)])
    cand = np.minimum(cand, max(top, current))
    best = float(cand[np.argmin(cost1(cand))])
    r = (hi_f / lo_f) ** (1.0 / (n - 1))
    fine = np.concatenate([[best], np.minimum(best * np.linspace(1 / r, r, 9), max(top, current))])
    return float(fine[np.argmin(cost1(fine))])


def local_range(h: WeightedHist, spec: QuantSpec, lo0: float, hi0: float, span=(0.25, 2.0), n: int = 12,
                iters: int = 1) -> tuple[float, float]:
    """The range near ``[lo0, hi0]`` (each end scaled within ``span``, never past the observed
    extreme) minimising the weighted error: coordinate descent, ``iters`` rounds of a sweep of
    ``hi`` then of ``lo``. A learned-range round moves a range by a bounded factor (the server
    clips each step of log s to log(round_factor)), so a local search is what it needs, at about
    a hundred candidate ranges per point: what keeps the job within its time on a phone."""
    cost = range_cost(h, spec)
    lo, hi = min(float(lo0), 0.0), max(float(hi0), 0.0)
    if spec.symmetric:
        t0 = max(-lo, hi)
        if t0 <= 0:
            return lo, hi
        t = _sweep(lambda c: cost(-c, c), t0, max(-h.min, h.max), span, n)
        return -t, t
    for _ in range(iters):
        prev = (lo, hi)
        if hi > 0:
            hi = _sweep(lambda c: cost(np.full(c.shape, lo), c), hi, h.max, span, n)
        if lo < 0:
            lo = -_sweep(lambda c: cost(-c, np.full(c.shape, hi)), -lo, -h.min, span, n)
        if (lo, hi) == prev:
            break
    return lo, hi


def learned_of(scale, zero_point) -> tuple[np.ndarray, np.ndarray]:
    """``(log s, beta = -z s)`` in float64, bit for bit ``server.aggregate.learned_from_qparams``
    and ``quant.lsq.init_from_qparams`` (numpy here: the device imports no torch)."""
    ls = np.log(np.asarray(scale, dtype=np.float32).astype(np.float64))
    return ls, -np.asarray(zero_point).astype(np.float64) * np.exp(ls)


def reconstruct_point(h: WeightedHist, scale, zero_point, spec: QuantSpec, search: str = "local") -> dict:
    """The point's new ``(log s, beta)`` and its delta from ``(scale, zero_point)``, with the
    relative output errors before and after (weighted error / weighted energy). ``search``:
    ``"local"`` (``local_range`` from the current range) or ``"global"`` (``best_range``, the MSE
    calibrator's full search: about 50x the candidates). The new range is kept only if it costs
    less than the current one on this data (else the delta is zero)."""
    scale = np.asarray(scale, np.float32)
    zero_point = np.asarray(zero_point)
    ls0, b0 = learned_of(scale, zero_point)
    cost = range_cost(h, spec)
    c_lo, c_hi = qparams_to_range(scale, zero_point, spec)
    before = float(cost(np.ravel(c_lo), np.ravel(c_hi))[0])
    if search == "global":
        lo, hi = best_range(h, spec)
    else:
        lo, hi = local_range(h, spec, float(np.ravel(c_lo)[0]), float(np.ravel(c_hi)[0]))
    after = float(cost(np.array([lo]), np.array([hi]))[0])
    if not after < before:
        ls1, b1, after = ls0, b0, before
    else:
        s, z = range_to_qparams(np.full(scale.shape, lo), np.full(scale.shape, hi), spec)
        ls1, b1 = learned_of(s, z)
    energy = max(h.energy, 1e-300)
    return {"log_s": ls1, "beta": b1, "delta_log_s": (ls1 - ls0).astype(np.float32),
            "delta_beta": (b1 - b0).astype(np.float32), "rel_before": before / energy,
            "rel_after": after / energy, "range": (float(lo), float(hi))}


# ---------------------------------------------------------------------------------------------
# The same local search for many points at once (what the device runs)

_BLOCK_ELEMENTS = 1 << 16   # points x candidates x cells per step of the batched search: 0.5 MB a temporary


@dataclass(frozen=True)
class _Cells:
    """The cells of several points (``_cells``'s model) padded to one shape: per point the bins
    that hold mass as a chain of edges ``e`` (P, K+1) with ``mass / width`` per cell ``mw`` (P, K),
    and the point masses (tails, or a bin squeezed to zero width) at ``pa`` with weight ``pm``
    (P, T). Padding cells have zero width or zero weight: they add exactly 0."""

    e: np.ndarray
    mw: np.ndarray
    pa: np.ndarray
    pm: np.ndarray


def _padded_cells(hists: list[WeightedHist]) -> _Cells:
    chains, points = [], []
    for h in hists:
        nz = np.flatnonzero(h.mass > 0)
        if nz.size:
            e = np.clip(h.grid.edges()[nz[0]:nz[-1] + 2], h.min, h.max)
            m = h.mass[nz[0]:nz[-1] + 1]
        else:
            e, m = np.zeros(1), np.zeros(0)
        w = np.diff(e)
        squeezed = (w <= 0) & (m > 0)           # every value in one bin at min == max: a point
        chains.append((e, np.where(w > 0, m / np.where(w > 0, w, 1), 0.0)))
        points.append((np.concatenate([h.tail_x, e[:-1][squeezed]]), np.concatenate([h.tail_w, m[squeezed]])))
    k = max(mw.size for _, mw in chains)
    t = max(x.size for x, _ in points)
    e = np.stack([np.pad(e, (0, k + 1 - e.size), mode="edge") for e, _ in chains])
    mw = np.stack([np.pad(mw, (0, k - mw.size)) for _, mw in chains])
    pa = np.stack([np.pad(x, (0, t - x.size)) for x, _ in points])
    pm = np.stack([np.pad(w, (0, t - w.size)) for _, w in points])
    return _Cells(e, mw, pa, pm)


def _cells_cost(c: _Cells, spec: QuantSpec, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """(P, n) costs of n candidate ranges per point: ``_sq_error``'s integral, written per edge as
    ``F(x) = saw(clip(x)) + (max(x - c_hi, 0)^3 - max(c_lo - x, 0)^3) / 3`` so that a cell ``[a, b]``
    costs ``m / w (F(b) - F(a))`` (its rounding, below and above terms) and each edge is evaluated
    once for its two cells."""
    s, z = range_to_qparams(np.minimum(lo, 0.0), np.maximum(hi, 0.0), spec)
    c_lo, c_hi = qparams_to_range(s, z, spec)
    s, c_lo, c_hi = (np.asarray(v, np.float64)[..., None] for v in (s, c_lo, c_hi))
    x = c.e[:, None, :]
    v = np.clip(x, c_lo, c_hi)
    v /= s
    v += 0.5
    fl = np.floor(v)
    v -= fl
    v -= 0.5
    f = v * v
    f *= v
    f += 0.125
    f /= 3
    fl /= 12
    f += fl
    f *= s**3                                   # saw(clip(x)), as in quant.calibrate
    t = np.maximum(x - c_hi, 0.0)
    g = t * t
    g *= t
    np.maximum(c_lo - x, 0.0, out=t)
    u = t * t
    u *= t
    g -= u
    g /= 3
    f += g
    cost = np.einsum("pnk,pk->pn", f[..., 1:] - f[..., :-1], c.mw)
    if c.pa.shape[1]:
        a = c.pa[:, None, :]
        x_hat = np.clip(s * np.round(a / s), c_lo, c_hi)
        cost += np.einsum("pnt,pt->pn", (a - x_hat) ** 2, c.pm)
    return cost


def _sweeps(cost1, current: np.ndarray, top: np.ndarray, span, n: int) -> np.ndarray:
    """``_sweep`` for every point at once: ``cost1`` maps (P, m) candidates to (P, m) costs."""
    lo_f, hi_f = span
    rows = np.arange(current.size)
    cap = np.maximum(top, current)[:, None]
    cand = np.concatenate([current[:, None], current[:, None] * np.geomspace(lo_f, hi_f, n)[None, :]], axis=1)
    cand = np.minimum(cand, cap)
    best = cand[rows, np.argmin(cost1(cand), axis=1)]
    r = (hi_f / lo_f) ** (1.0 / (n - 1))
    fine = np.concatenate([best[:, None], np.minimum(best[:, None] * np.linspace(1 / r, r, 9)[None, :], cap)], axis=1)
    return fine[rows, np.argmin(cost1(fine), axis=1)]


def _local_ranges(c: _Cells, spec: QuantSpec, lo0, hi0, mn, mx, span=(0.25, 2.0), n: int = 12,
                  iters: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """``local_range`` of P points with one spec (arrays of P): the same candidates, each sweep
    of all points in one evaluation. A point whose end is 0 keeps it (all its candidates are 0)."""
    lo, hi = np.minimum(lo0, 0.0), np.maximum(hi0, 0.0)
    if spec.symmetric:
        t = _sweeps(lambda k: _cells_cost(c, spec, -k, k), np.maximum(-lo, hi), np.maximum(-mn, mx), span, n)
        return -t, t
    for _ in range(iters):
        hi = _sweeps(lambda k: _cells_cost(c, spec, np.broadcast_to(lo[:, None], k.shape), k), hi, mx, span, n)
        lo = -_sweeps(lambda k: _cells_cost(c, spec, -k, np.broadcast_to(hi[:, None], k.shape)), -lo, -mn, span, n)
    return lo, hi


def reconstruct_points(hists: dict[str, WeightedHist], points: dict) -> dict[str, dict]:
    """``reconstruct_point`` (local search) of every key of ``hists`` (``points``: key ->
    ``PointParams``), the points of one spec searched together in blocks of a bounded size: the
    same candidates and rule, the costs evaluated in one numpy expression per sweep instead of
    four calls per point (tests/test_learn_runtime.py checks the ranges against
    ``reconstruct_point``'s)."""
    out: dict[str, dict] = {}
    by_spec: dict = {}
    for k in hists:
        if hists[k].n == 0:
            raise ValueError(f"{k}: no values observed")
        by_spec.setdefault(points[k].spec, []).append(k)
    for spec, keys in by_spec.items():
        # largest first: a block's first point sizes it (<= 14 candidates a sweep); similar sizes pad little
        keys.sort(key=lambda k: -_cell_count(hists[k]))
        i = 0
        while i < len(keys):
            per = max(1, _BLOCK_ELEMENTS // (14 * (_cell_count(hists[keys[i]]) + 1)))
            block = keys[i:i + per]
            i += len(block)
            out.update(_reconstruct_block(block, [hists[k] for k in block], [points[k] for k in block], spec))
    return out


def _cell_count(h: WeightedHist) -> int:
    nz = np.flatnonzero(h.mass > 0)
    return (int(nz[-1] - nz[0]) + 1 if nz.size else 0) + h.tail_x.size


def _reconstruct_block(keys, hists, pts, spec) -> dict[str, dict]:
    c = _padded_cells(hists)
    scale = [np.asarray(p.scale, np.float32) for p in pts]
    zp = [np.asarray(p.zero_point) for p in pts]
    c_lo, c_hi = (np.array([float(np.ravel(v)[0]) for v in r])
                  for r in zip(*(qparams_to_range(s, z, spec) for s, z in zip(scale, zp))))
    mn, mx = np.array([h.min for h in hists]), np.array([h.max for h in hists])
    lo, hi = _local_ranges(c, spec, c_lo, c_hi, mn, mx)
    costs = _cells_cost(c, spec, np.stack([c_lo, lo], 1), np.stack([c_hi, hi], 1))
    out = {}
    for i, k in enumerate(keys):
        ls0, b0 = learned_of(scale[i], zp[i])
        before, after = float(costs[i, 0]), float(costs[i, 1])
        if not after < before:
            ls1, b1, after = ls0, b0, before
        else:
            s, z = range_to_qparams(np.full(scale[i].shape, lo[i]), np.full(scale[i].shape, hi[i]), spec)
            ls1, b1 = learned_of(s, z)
        energy = max(hists[i].energy, 1e-300)
        out[k] = {"log_s": ls1, "beta": b1, "delta_log_s": (ls1 - ls0).astype(np.float32),
                  "delta_beta": (b1 - b0).astype(np.float32), "rel_before": before / energy,
                  "rel_after": after / energy, "range": (float(lo[i]), float(hi[i]))}
    return out


__all__ = ["WeightedHist", "output_weights", "channel_groups", "grid_for", "observe_grouped", "observe_weighted",
           "merge_weighted", "range_cost", "best_range", "local_range", "learned_of", "reconstruct_point",
           "reconstruct_points"]
