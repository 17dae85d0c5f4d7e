"""Poisoned replies for the poisoning bench (issue 14, goal 3: bench/poisoning.py).

Each attack is a pure function of an honest client's decoded reply, the instruction it answers
and the example count it would claim: it returns ``(malicious reply, claimed example count)``.
Every attack stays well formed and within what ``server.validate`` accepts (finite values within
``MAX_ABS_VALUE``, counts that add up to ``n <= 2^40``, lsq steps within ``max_log_scale_step``,
zero-points in range, example counts within ``max_examples``): a reply the server refuses is no
poisoning. What they aim at:

- scout ``scout_absmax``: one huge per-channel abs-max on every smoothable input, so the fleet's
  max -- SmoothQuant's statistic -- gives that channel a huge factor ``m_j``: the weight column
  ``j`` is multiplied by it and dominates every output row's weight scale (factor poisoning).
- scout ``scout_ranges``: every point's min/max stretched, so the histogram grids the statistics
  rounds collect on are far too coarse (grid poisoning; a smoothed input's grid comes from the
  per-channel abs-max instead, so this hits the other points).
- stats ``stats_outside``: honest histograms plus a few values far above the grid (a calibrator
  that weighs the clipping error of every value, MSE, stretches the range to reach them).
- stats ``stats_edge``: the whole reply's mass in one bin -- the grid's top bin, both edge bins,
  or the bin at zero -- with ``n`` at the wire's cap (``quant.wire.MAX_COUNT``), so that it
  outweighs every honest client in a sum; ``"zero"`` collapses a range to one bin.
- lsq ``lsq_scale``: every ``log s`` moved by the largest step validation accepts (x8 or /8),
  claiming the largest example count, so a weighted mean follows it.
"""

from __future__ import annotations

import math

import numpy as np

from quant.stats import ActivationStats
from quant.wire import MAX_COUNT, Instruction, LsqReply, ScoutReply, StatsReply


def largest_step(limit: float) -> np.float32:
    """The largest float32 at or below ``limit``: a reply carries float32 deltas and validation
    compares them in float64 (float32(ln 8) rounds up, and is refused)."""
    x = np.float32(limit)
    return x if float(x) <= limit else np.nextafter(x, np.float32(0))


# ---------------------------------------------------------------------------------------------
# Scouting

def scout_absmax(reply: ScoutReply, ins: Instruction, examples: int, value: float = 1e3, factor: float = 1e3,
                 channel: int = 0) -> tuple[ScoutReply, int]:
    """Channel ``channel`` of every abs-max the server asked for set to ``max(value, factor x
    honest)``; everything else honest."""
    absmax = {}
    for k, a in reply.channel_absmax.items():
        a = np.array(a, dtype=np.float32)
        j = channel % a.size
        a[j] = np.float32(max(value, factor * float(a[j])))
        absmax[k] = a
    return ScoutReply(dict(reply.ranges), dict(reply.n), absmax), examples


def scout_ranges(reply: ScoutReply, ins: Instruction, examples: int, factor: float = 1e3) -> tuple[ScoutReply, int]:
    """Every point's min and max multiplied by ``factor`` (a non-negative min stays as it is, so a
    one-sided point stays one-sided); the per-channel abs-max honest."""
    ranges = {}
    for k, (lo, hi) in reply.ranges.items():
        if reply.n[k] > 0:
            lo, hi = (lo * factor if lo < 0 else lo), (hi * factor if hi > 0 else hi)
        ranges[k] = (lo, hi)
    return ScoutReply(ranges, dict(reply.n), dict(reply.channel_absmax)), examples


# ---------------------------------------------------------------------------------------------
# Statistics

def stats_outside(reply: StatsReply, ins: Instruction, examples: int, value: float = 1e4,
                  count: int = 2) -> tuple[StatsReply, int]:
    """The honest histograms plus ``count`` values at ``max(value, grid hi)`` (above the grid) at
    every point that saw values."""
    stats = {}
    for k, s in reply.stats.items():
        if s.n > 0:
            v = max(float(value), s.grid.hi)
            s = ActivationStats(s.grid, s.counts, s.below, s.above + count, s.min, max(s.max, v), s.n + count)
        stats[k] = s
    return StatsReply(stats, dict(reply.absmax)), examples


def edge_bins(grid, where: str) -> list[int]:
    """The bins ``stats_edge`` fills: ``top`` the last, ``both`` the first and the last, ``zero``
    the bin that starts at zero (a one-sided grid's first bin; else the bin holding zero)."""
    if where == "top":
        return [grid.bins - 1]
    if where == "both":
        return [0, grid.bins - 1]
    if where == "zero":
        edges = grid.edges()
        return [int(min(max(np.searchsorted(edges, 0.0, side="right") - 1, 0), grid.bins - 1))]
    raise ValueError(f"where must be 'top', 'both' or 'zero', got {where!r}")


def stats_edge(reply: StatsReply, ins: Instruction, examples: int, where: str = "top",
               n: int = MAX_COUNT) -> tuple[StatsReply, int]:
    """Every point's histogram replaced by ``n`` values in the ``edge_bins`` (split evenly), with
    min and max at the lower edges of the first and the last of them (consistent with the bins)."""
    stats = {}
    for k, s in reply.stats.items():
        bins = edge_bins(s.grid, where)
        counts = np.zeros(s.grid.bins, dtype=np.int64)
        share, rest = divmod(int(n), len(bins))
        for i, b in enumerate(bins):
            counts[b] += share + (rest if i == len(bins) - 1 else 0)
        edges = s.grid.edges()
        stats[k] = ActivationStats(s.grid, counts, 0, 0, float(edges[bins[0]]), float(edges[bins[-1]]), int(n))
    return StatsReply(stats, dict(reply.absmax)), examples


# ---------------------------------------------------------------------------------------------
# Learned ranges

def lsq_scale(reply: LsqReply | None, ins: Instruction, examples: int, direction: int = 1,
              step: float = math.log(8), claim: int = 1_000_000, keep_zero_point: bool = False
              ) -> tuple[LsqReply, int]:
    """``delta log s = direction x step`` (rounded down to a float32 validation accepts) at every
    learned point, claiming ``claim`` examples. ``delta beta`` is 0, which keeps ``beta = -z s``
    (an asymmetric zero-point becomes ``z / 8`` for x8, in range); with ``keep_zero_point`` it
    keeps ``z`` instead (``/8`` needs it: ``8 z`` would leave the integer range). Only the honest
    reply's losses are kept (``reply`` None: losses 0, nothing of the client's job is needed)."""
    d = largest_step(step) * np.float32(1 if direction >= 0 else -1)
    d_log_s, d_beta = {}, {}
    for k in ins.keys:
        p = ins.qparams.points[k]
        d_log_s[k] = np.full(p.scale.shape, d, dtype=np.float32)
        if keep_zero_point and not p.spec.symmetric:
            s0 = p.scale.astype(np.float64)
            d_beta[k] = (-p.zero_point.astype(np.float64) * (s0 * math.exp(float(d)) - s0)).astype(np.float32)
        else:
            d_beta[k] = np.zeros(p.scale.shape, dtype=np.float32)
    loss = (reply.loss_before, reply.loss_after) if reply is not None else (0.0, 0.0)
    return LsqReply(d_log_s, d_beta, *loss), int(claim)


ATTACKS = {"scout_absmax": scout_absmax, "scout_ranges": scout_ranges, "stats_outside": stats_outside,
           "stats_edge": stats_edge, "lsq_scale": lsq_scale}
JOB_OF = {"scout_absmax": "scout", "scout_ranges": "scout", "stats_outside": "stats", "stats_edge": "stats",
          "lsq_scale": "lsq"}
