"""Aggregation rules (design.md section 4): pure functions over validated, decoded replies.

Additive statistics are summed (exact: the federated result equals calibration on the pooled data,
and a sum is what secure aggregation computes); per-channel abs-max is merged by max (exact). On a
hostile fleet the exact rules let one client set a range (two values far outside a grid) or a
SmoothQuant factor (one huge abs-max): the bounded-influence rules (``trimmed_statistics``,
``clip_scouting``, ``capped_weights``, the median and trimmed mean of deltas) keep every parameter
within what the honest clients' data gives while they are the majority; they are the defaults
(server.config).
Learned-range updates are deltas of ``(log s, beta)`` (LSQ+ offset ``beta = -z s``): aggregated by a
weighted mean or a robust rule, applied to the global ``(log s, beta)`` by a server optimizer, and
the integer zero-point is derived only at the end: z means something only together with its s, so
it is never averaged.

The delta rules work on any ``dict[name, array]`` (e.g. ``LsqReply.delta_log_s`` and
``.delta_beta``, separately or under prefixed names); every client must send the same names and
shapes (server.validate makes sure of it).
"""

from __future__ import annotations

import math
from functools import reduce
from typing import Mapping, Sequence

import numpy as np

from quant.calibrate import CalibratorConfig
from quant.lsq import to_qparams
from quant.ptq import activation_qparams
from quant.qparams import PointParams
from quant.spec import QuantSpec
from quant.smoothing import smoothing_factors
from quant.stats import ActivationStats, Grid, grid_from_absmax, merge_absmax, merge_all
from quant.wire import HessianReply, ScoutReply

Arrays = Mapping[str, np.ndarray]


# ---------------------------------------------------------------------------------------------
# Exact rules: statistics and abs-max

def sum_statistics(replies: Sequence[Mapping[str, ActivationStats]]) -> dict[str, ActivationStats]:
    """Per point, the merge (sum of counts, min of mins, max of maxes, sum of n) of every reply
    that has it: exact and independent of order and partition (design.md s. 4)."""
    per_key: dict[str, list[ActivationStats]] = {}
    for r in replies:                       # in reply order, so each merge_all sees that order
        for k, s in r.items():
            per_key.setdefault(k, []).append(s)
    return {k: merge_all(v) for k, v in per_key.items()}


def max_absmax(replies: Sequence[Arrays]) -> dict[str, np.ndarray]:
    """Per point, the elementwise max of the per-channel abs-max vectors: exact, what SmoothQuant
    (Xiao et al., ICML 2023) needs from the fleet."""
    keys = list(dict.fromkeys(k for r in replies for k in r))
    return {k: reduce(merge_absmax, [r[k] for r in replies if k in r]) for k in keys}


def smoothquant_factors(act_absmax: Arrays, weights: Mapping[str, np.ndarray], alpha: float = 0.5,
                        bounds: tuple[float, float] = (1e-5, 1e5)) -> dict[str, np.ndarray]:
    """Per Linear, SmoothQuant's per-input-channel factors (``quant.smoothing.smoothing_factors``,
    Xiao et al., ICML 2023, eq. 4) from the fleet's merged activation abs-max (``max_absmax``,
    keyed by Linear path) and the Linear's float weight ``(out, in)``. The device divides the input
    by ``m`` and multiplies the weight's columns by ``m`` (``QParams.smoothing``), which leaves the
    float product unchanged."""
    out = {}
    for path, x in act_absmax.items():
        if path not in weights:
            raise ValueError(f"no weight for {path!r}: smoothing needs the Linear's float weight")
        try:
            out[path] = smoothing_factors(x, weights[path], alpha, bounds)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
    return out


def grids_from_scouting(replies: Sequence[ScoutReply], bins: int, margin: float = 1.25,
                        quantile: float = 0.9) -> dict[str, Grid]:
    """A histogram grid per point from the clients' scouting reports: a robust upper value of
    their abs-max (``quant.stats.grid_from_absmax``), one-sided ``[0, A]`` when no client saw a
    negative value. Points no client saw are left out."""
    out = {}
    for k in dict.fromkeys(k for r in replies for k in r.ranges):
        seen = [r for r in replies if r.n.get(k, 0) > 0]
        if seen:
            nonneg = all(r.ranges[k][0] >= 0 for r in seen)
            out[k] = grid_from_absmax([r.absmax[k] for r in seen], bins, margin, quantile, nonneg)
    return out


def ranges_for_profile(merged: Mapping[str, ActivationStats], specs_by_key: Mapping[str, QuantSpec],
                       config: CalibratorConfig) -> dict[str, PointParams]:
    """The activation (s, z) of one device profile from the merged statistics: the calibrator runs
    once per profile because the best clipping depends on the bit width (design.md s. 4); the
    same merged statistics serve every profile."""
    missing = [k for k in specs_by_key if k not in merged]
    if missing:
        raise ValueError(f"no merged statistics for {missing[:3]} ({len(missing)} points)")
    return activation_qparams({k: merged[k] for k in specs_by_key}, dict(specs_by_key), config)


# ---------------------------------------------------------------------------------------------
# Bounded influence: rules no minority of clients can steer (issue 14; README "Bounded influence")

def trimmed_statistics(stats: Sequence[ActivationStats], trim: float) -> ActivationStats:
    """One round's statistics of one point merged so that no minority can move them far: the
    coordinate-wise trimmed mean (Yin et al., ICML 2018) of the clients' empirical CDFs on the
    grid's edges, outside-grid cells included, scaled to ``k x`` the median client's ``n``.

    With at most ``b = floor(trim k)`` bad clients, the merged share of values below any edge lies
    within the honest clients' shares there, so every quantile a calibrator reads lies within the
    honest clients' quantiles; min and max are the ``b``-th order statistics of the clients' own
    (a cell is occupied only where more than ``b`` clients have mass, so they stay consistent
    with the histogram); and a client counts as the median client's ``n``, whatever it claims.
    On an honest fleet of equal clients the total is exact and the shape is the pooled one with
    the ``b`` most extreme clients' mass left out at each edge (its cost: README). Empty
    statistics (``n = 0``) take no part."""
    if not 0 <= trim < 0.5:
        raise ValueError(f"trim must be in [0, 0.5), got {trim}")
    seen = [s for s in stats if s.n > 0]
    if not seen:
        return merge_all(stats)
    grid = seen[0].grid
    k, b = len(seen), math.floor(trim * len(seen))
    cells = np.stack([np.concatenate([[s.below], s.counts, [s.above]]) for s in seen]).astype(np.float64)
    ns = np.array([s.n for s in seen], dtype=np.float64)
    cdf = np.cumsum(cells, axis=1)[:, :-1] / ns[:, None]          # share at or below each cell
    cdf = np.sort(cdf, axis=0)[b:k - b].mean(axis=0)
    total = k * int(sorted(s.n for s in seen)[(k - 1) // 2])      # the (lower) median client's n, k times
    cum = np.minimum(np.maximum.accumulate(np.rint(cdf * total)), total).astype(np.int64)
    merged = np.diff(np.concatenate([[0], cum, [total]]))
    below, counts, above = int(merged[0]), merged[1:-1], int(merged[-1])
    mn = sorted(s.min for s in seen)[b]
    mx = sorted((s.max for s in seen), reverse=True)[b]
    if below == 0:                       # rounding left no mass below: min must not claim some
        mn = max(mn, grid.lo)
    if above == 0:
        mx = min(mx, math.nextafter(grid.hi, -math.inf))
    return ActivationStats(grid, counts, below, above, mn, mx, total)


def clip_scouting(replies: Sequence[ScoutReply], multiple: float) -> list[ScoutReply]:
    """The scouting reports with each client's range and per-channel abs-max capped at
    ``multiple x`` the clients' lower median (per point; per channel): while fewer than half the
    clients are bad, it is within the honest values (the lower one of two, so that with two
    replies an inflated one does not raise it), so no report moves a grid or a SmoothQuant
    factor beyond ``multiple x`` the honest clients' largest. Honest clients whose values exceed
    the cap lose only the excess: the statistics rounds still see their values (outside a grid,
    which widens when they are many)."""
    if multiple < 1:
        raise ValueError(f"the clip multiple must be >= 1, got {multiple}")
    caps: dict[str, float] = {}
    for k in dict.fromkeys(k for r in replies for k in r.ranges):
        seen = sorted(r.absmax[k] for r in replies if r.n.get(k, 0) > 0)
        if seen:
            caps[k] = multiple * seen[(len(seen) - 1) // 2]
    channel_caps = {}
    for k in dict.fromkeys(k for r in replies for k in r.channel_absmax):
        got = [np.asarray(r.channel_absmax[k], dtype=np.float32) for r in replies if k in r.channel_absmax]
        if len({a.shape for a in got}) == 1:     # shapes differ only in replies validation refused
            low = np.sort(np.stack(got), axis=0)[(len(got) - 1) // 2]
            channel_caps[k] = (multiple * low.astype(np.float64)).astype(np.float32)
    out = []
    for r in replies:
        ranges = {k: (max(lo, -caps[k]), min(hi, caps[k])) if k in caps and r.n.get(k, 0) > 0 else (lo, hi)
                  for k, (lo, hi) in r.ranges.items()}
        absmax = {k: np.minimum(np.asarray(a, dtype=np.float32), channel_caps[k]) if k in channel_caps else a
                  for k, a in r.channel_absmax.items()}
        out.append(ScoutReply(ranges, dict(r.n), absmax, r.channel_sqsum))
    return out


def bounded_extremes(stats: ActivationStats, limit: float) -> ActivationStats:
    """``stats`` with min and max clamped to ``[-limit, limit]`` (``limit >= `` the grid's extent):
    the values beyond it are taken to sit at it. A round's statistics then cannot stretch a range,
    or make the server widen a grid, past ``limit``, however few replies it had (with one or two,
    nothing can be trimmed)."""
    if not limit >= max(-stats.lo, stats.hi):
        raise ValueError(f"limit {limit} lies inside the grid [{stats.lo}, {stats.hi}]")
    if stats.n == 0 or (-limit <= stats.min and stats.max <= limit):
        return stats
    # both extremes into [-limit, limit]: values all beyond it on one side sit at it (min = max = limit)
    return ActivationStats(stats.grid, stats.counts, stats.below, stats.above, min(max(stats.min, -limit), limit),
                           max(min(stats.max, limit), -limit), stats.n)


def bounded_step(delta: np.ndarray, bound: float) -> np.ndarray:
    """``delta`` clipped elementwise to ``[-bound, bound]``: an aggregated step of ``log s`` bounded
    by ``log(factor)`` moves no scale by more than ``factor`` in a round, whoever sent it."""
    return np.clip(np.asarray(delta, dtype=np.float64), -bound, bound)


def capped_weights(claimed: Sequence[float]) -> list[float]:
    """Example counts as weights, each capped at the (lower) median claim: a client that claims
    more examples than the median client weighs as the median client does."""
    if not claimed:
        return []
    cap = sorted(claimed)[(len(claimed) - 1) // 2]
    return [min(float(c), float(cap)) for c in claimed]


# ---------------------------------------------------------------------------------------------
# Learned-range deltas

def _stack(deltas: Sequence[Arrays]) -> dict[str, np.ndarray]:
    """Per name, the clients' arrays stacked on a new first axis (float64)."""
    if not deltas:
        raise ValueError("no deltas to aggregate")
    keys = set(deltas[0])
    for i, d in enumerate(deltas):
        if set(d) != keys:
            raise ValueError(f"delta {i} has names {sorted(set(d) ^ keys)[:3]} that others lack")
    out = {}
    for k in deltas[0]:
        shapes = {np.shape(d[k]) for d in deltas}
        if len(shapes) != 1:
            raise ValueError(f"{k}: deltas of different shapes {sorted(shapes)}")
        out[k] = np.stack([np.asarray(d[k], dtype=np.float64) for d in deltas])
    return out


def weighted_mean(deltas: Sequence[Arrays], weights: Sequence[float]) -> dict[str, np.ndarray]:
    """FedAvg's rule (McMahan et al., AISTATS 2017): the mean weighted by example counts. Not
    robust: one client moves it without bound (cap the example count it may claim)."""
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (len(deltas),) or not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise ValueError("weights must be one finite non-negative number per delta, not all zero")
    w = w / w.sum()
    return {k: np.tensordot(w, v, axes=1) for k, v in _stack(deltas).items()}


def coordinate_median(deltas: Sequence[Arrays]) -> dict[str, np.ndarray]:
    """Coordinate-wise median (Yin et al., ICML 2018, "Byzantine-Robust Distributed Learning"):
    while fewer than half the clients are bad, each coordinate stays within the range of the good
    clients' values. Unweighted: weighting by a claimed example count would reopen the attack."""
    return {k: np.median(v, axis=0) for k, v in _stack(deltas).items()}


def trimmed_mean(deltas: Sequence[Arrays], trim_fraction: float) -> dict[str, np.ndarray]:
    """Coordinate-wise trimmed mean (Yin et al., ICML 2018): per coordinate, drop the
    ``floor(trim_fraction * n)`` largest and smallest values and average the rest. With at most
    that many bad clients each coordinate stays within the range of the good clients' values."""
    if not 0 <= trim_fraction < 0.5:
        raise ValueError(f"trim_fraction must be in [0, 0.5), got {trim_fraction}")
    n = len(deltas)
    b = math.floor(trim_fraction * n)
    return {k: np.sort(v, axis=0)[b:n - b].mean(axis=0) for k, v in _stack(deltas).items()}


def merge_importance(scouting: Sequence[ScoutReply], rule: str = "sum", trim_fraction: float = 0.25
                     ) -> dict[str, np.ndarray]:
    """Per Linear path, the mean square of each input channel (float32) from the scouting reports'
    sums of squares: a weight column's importance (``quant.weight_ranges``; the diagonal of GPTQ's
    Hessian, llama.cpp's imatrix). ``rule = "sum"``: the pooled mean, every client's sums added
    (sorted per channel first, so the order of the replies changes no bit: federated equals
    centralized). Else each client's mean square as shares of its own total, merged by a
    coordinate-wise ``trimmed_mean``: no client's volume counts, and while fewer than
    ``trim_fraction`` of them lie every channel stays within the honest clients' shares. Only the
    ratios between columns matter to the weight ranges (a common factor changes no choice)."""
    out = {}
    for key in sorted({k for r in scouting for k in r.channel_sqsum}):
        got = [(np.asarray(r.channel_sqsum[key], np.float64), r.n[key] // np.size(r.channel_sqsum[key]))
               for r in scouting if key in r.channel_sqsum and r.n.get(key, 0) > 0]
        if not got or len({g.shape for g, _ in got}) != 1:  # shapes differ only in replies validation refused
            continue
        if rule == "sum":
            h = np.sort(np.stack([g for g, _ in got]), axis=0).sum(axis=0) / sum(t for _, t in got)
        else:
            shares = []
            for g, t in got:
                m = g / t
                shares.append(m / m.sum() if m.sum() > 0 else np.full_like(m, 1.0 / m.size))
            h = trimmed_mean([{"h": v} for v in shares], trim_fraction)["h"]
        out[key.rsplit(":", 1)[0]] = h.astype(np.float32)
    return out


def merge_hessians(replies: Sequence[HessianReply], rule: str = "sum", trim_fraction: float = 0.25
                   ) -> dict[str, np.ndarray]:
    """Per point, the fleet's second moment of the float input (float64, (c, c)) from the clients'
    sums ``sum_t x_t x_t^T``: GPTQ's ``H`` (``quant.gptq``), which is additive, so a fleet's is its
    clients' (federated equals centralized). ``rule = "sum"``: the pooled mean (sorted per entry
    first: the order of the replies changes no bit). Else whole clients are trimmed: each client's
    per-token mean ``H_c / n_c``, the ``floor(trim_fraction * n)`` farthest (Frobenius) from their
    coordinate-wise median dropped, the rest averaged (each client once, whatever tokens it claims).
    While fewer than ``trim_fraction`` of them lie, a kept liar is no farther from the median than an
    honest client, and the result stays a mean of second moments: positive semi-definite, its
    channels' correlations intact. (An entry-wise trimmed mean is neither: each entry keeps other
    clients, so the result need not be any client's moment nor semi-definite.) GPTQ (Frantar et al.,
    ICLR 2023) needs ``H`` only up to a common factor (its dampening is a fraction of the mean
    diagonal)."""
    if not 0 <= trim_fraction < 0.5:
        raise ValueError(f"trim_fraction must be in [0, 0.5), got {trim_fraction}")
    out = {}
    for key in sorted({k for r in replies for k in r.sums}):
        got = [(np.asarray(r.sums[key], np.float64), r.tokens) for r in replies if key in r.sums]
        if len({g.shape for g, _ in got}) != 1:     # shapes differ only in replies validation refused
            continue
        if rule == "sum":
            out[key] = np.sort(np.stack([g for g, _ in got]), axis=0).sum(axis=0) / sum(t for _, t in got)
            continue
        means = np.stack([g / t for g, t in got])
        far = np.linalg.norm((means - np.median(means, axis=0)).reshape(len(got), -1), axis=1)
        keep = np.sort(np.argsort(far, kind="stable")[:len(got) - math.floor(trim_fraction * len(got))])
        out[key] = means[keep].mean(axis=0)
    return out


# ---------------------------------------------------------------------------------------------
# Server optimizers on the global (log s, beta)

def fedavg_step(global_: Arrays, delta: Arrays, lr: float = 1.0) -> dict[str, np.ndarray]:
    """``x + lr * delta``: FedAvg with a server learning rate (lr = 1 is plain FedAvg; Reddi et
    al., ICLR 2021, call the aggregated delta a pseudo-gradient)."""
    _same(global_, delta)
    return {k: np.asarray(global_[k], dtype=np.float64) + lr * np.asarray(delta[k], dtype=np.float64)
            for k in global_}


def fedadam_step(global_: Arrays, delta: Arrays, state: Mapping[str, np.ndarray], lr: float = 1e-2,
                 b1: float = 0.9, b2: float = 0.99, tau: float = 1e-3
                 ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """FedAdam, Algorithm 2 of Reddi et al., "Adaptive Federated Optimization" (ICLR 2021):
    ``m = b1 m + (1 - b1) d``, ``v = b2 v + (1 - b2) d^2``, ``x = x + lr m / (sqrt(v) + tau)``, with
    ``m`` starting at 0 and ``v`` at ``tau^2`` (the paper's ``v_{-1} >= tau^2``) and no bias
    correction, as in the paper (Flower's FedAdam adds one). ``state`` is a plain dict of arrays
    (``m/<name>``, ``v/<name>``; empty at the start) so a checkpoint can hold it; the function
    returns the new parameters and the new state and changes neither input."""
    _same(global_, delta)
    x_new, s_new = {}, {}
    for k in global_:
        x = np.asarray(global_[k], dtype=np.float64)
        d = np.asarray(delta[k], dtype=np.float64)
        m = np.asarray(state.get(f"m/{k}", np.zeros_like(x)), dtype=np.float64)
        v = np.asarray(state.get(f"v/{k}", np.full_like(x, tau * tau)), dtype=np.float64)
        if m.shape != x.shape or v.shape != x.shape:
            raise ValueError(f"{k}: optimizer state has shape {m.shape}/{v.shape}, parameter {x.shape}")
        m = b1 * m + (1 - b1) * d
        v = b2 * v + (1 - b2) * d * d
        x_new[k] = x + lr * m / (np.sqrt(v) + tau)
        s_new[f"m/{k}"], s_new[f"v/{k}"] = m, v
    return x_new, s_new


def _same(a: Arrays, b: Arrays) -> None:
    if set(a) != set(b):
        raise ValueError(f"parameters and delta name different points: {sorted(set(a) ^ set(b))[:3]}")
    for k in a:
        if np.shape(a[k]) != np.shape(b[k]):
            raise ValueError(f"{k}: parameter shape {np.shape(a[k])} != delta shape {np.shape(b[k])}")


# ---------------------------------------------------------------------------------------------
# Between (s, z) and (log s, beta)

def learned_from_qparams(points: Mapping[str, PointParams]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """``(log_s, beta)`` in float64 of each point, ``beta = -z s``: what ``quant.lsq.
    init_from_qparams`` gives a client starting from these QParams, so a client's delta and the
    server's global refer to the same point."""
    log_s, beta = {}, {}
    for k, p in points.items():
        ls = np.log(p.scale.astype(np.float64))
        log_s[k], beta[k] = ls, -p.zero_point.astype(np.float64) * np.exp(ls)
    return log_s, beta


def to_integer_qparams(log_s: Arrays, beta: Arrays, specs: Mapping[str, QuantSpec]) -> dict[str, PointParams]:
    """Integer (s, z) from the aggregated ``(log s, beta)``: ``z = round(-beta / s)`` clamped
    (``quant.lsq.to_qparams``). Derived here, at the end, never by averaging zero-points: the mean
    of z_i pairs with none of the s_i (design.md s. 4)."""
    _same(log_s, beta)
    missing = sorted(set(specs) - set(log_s))
    if missing:
        raise ValueError(f"no (log s, beta) for {missing[:3]}")
    out = {}
    for k, spec in specs.items():
        s, z = to_qparams(np.asarray(log_s[k], dtype=np.float64), np.asarray(beta[k], dtype=np.float64), spec)
        out[k] = PointParams(spec, s, z)
    return out
