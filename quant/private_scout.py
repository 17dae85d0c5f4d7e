"""The scouting round as sums (docs/privacy.md, "Private scouting"): what secure aggregation adds up
in place of each client's per-point min/max and per-channel abs-max, and how the server turns the
sums back into the reports ``server.rounds._scout`` reads. No Flower here: vectors in, sums out.

A maximum does not go through a sum, so the round runs in two SecAgg+ passes:

1. Per point, a one-hot histogram of the client's ``log2 max|x|`` (``CELLS_PER_OCTAVE`` cells an
   octave over ``[-LOG2_BOUND, LOG2_BOUND)``, the ends absorbing what lies beyond), a cell for an
   abs-max of 0, whether the point saw values and whether its min was negative. The plaintext
   rules read nothing else of a point's range (``server.aggregate.grids_from_scouting`` takes a
   quantile of the clients' abs-max, one-sided when no client saw a negative value;
   ``clip_scouting`` a lower median), and a quantile of a summed histogram is a quantile over the
   clients. Per smoothable channel, ``u = log2(a) / LOG2_BOUND`` (clamped to [-1, 1]) and ``u^2``:
   the mean and spread of the clients' log abs-max.
2. Per channel, ``(min(a, B) / B)^POWER`` for a bound ``B`` the server sends from pass 1: the
   power sum ``S``, whose ``B S^(1/p)`` is never below the max over clients of ``min(a, B)`` and at
   most ``K^(1/p)`` above the max (the power mean: a p-norm bounds the max-norm).

The bound ``B = 2^min(mu + sqrt(K-1) sigma, 1 + mu + 2 sigma)`` (log2 units): the first term is
Samuelson's inequality (no value of K lies more than ``sqrt(K-1)`` population standard deviations
above their mean), so with few clients ``B`` is never below the max; the second is the measured
heuristic ``2 exp(mean + 2 std)`` (bench/private_absmax.py), which keeps ``B`` near the max so the
fixed point holds ``(a/B)^16`` (SecAgg+'s 2^29 levels over [0, 1] resolve it down to
``a/B = 2^-1.8``). Where the max exceeds ``B`` the estimate is ``B`` to ``B K^(1/p)``: low.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

from quant.wire import Instruction, ScoutReply

LOG2_BOUND = 24             # octaves each side of 1 that the histograms and log moments resolve
CELLS_PER_OCTAVE = 8        # histogram cells per octave of abs-max: a cell's upper edge is <= 9% above
CELLS = 2 * LOG2_BOUND * CELLS_PER_OCTAVE
POWER = 16                  # the power mean's p: never below the max, at most K^(1/16) above it
POINT_HEAD = 3              # per point, before its cells: seen, negative, zero


def first_pass_length(ins: Instruction) -> int:
    """Numbers of a pass-1 vector: per point ``[seen, negative, zero, cells...]``, then per
    abs-max point its channels' ``u`` and then their ``u^2``."""
    return len(ins.keys) * (POINT_HEAD + CELLS) + 2 * sum(ins.absmax.values())


def second_pass_length(ins: Instruction) -> int:
    """Numbers of a pass-2 vector: one power term per channel of the abs-max points."""
    return sum(ins.absmax.values())


def log2_cell(absmax: float) -> int:
    """The histogram cell of an abs-max > 0 (the end cells absorb what lies beyond the range)."""
    i = math.floor((math.log2(absmax) + LOG2_BOUND) * CELLS_PER_OCTAVE)
    return min(max(i, 0), CELLS - 1)


def cell_top(i: int) -> float:
    """The upper edge of cell ``i``: what the server takes for an abs-max in it (never below it,
    unless it lies beyond the range's top, at most ``2^(1/CELLS_PER_OCTAVE)`` above it)."""
    return 2.0 ** ((i + 1) / CELLS_PER_OCTAVE - LOG2_BOUND)


def _log_u(a: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.clip(np.log2(np.asarray(a, dtype=np.float64)) / LOG2_BOUND, -1.0, 1.0)


def first_pass_vector(reply: ScoutReply, ins: Instruction) -> np.ndarray:
    """A client's scouting report as pass-1 numbers, each in [-1, 1] (SecAgg+'s clipping range)."""
    parts = []
    for k in ins.keys:
        head, cells = np.zeros(POINT_HEAD), np.zeros(CELLS)
        if reply.n.get(k, 0) > 0:
            lo, hi = reply.ranges[k]
            a = max(-lo, hi)
            if not math.isfinite(a):
                raise ValueError(f"{k}: abs-max {a} is not finite")
            head[0], head[1] = 1.0, float(lo < 0)
            if a > 0:
                cells[log2_cell(a)] = 1.0
            else:
                head[2] = 1.0
        parts += [head, cells]
    us = [_log_u(reply.channel_absmax[k]) for k in ins.absmax]
    for k, u in zip(ins.absmax, us):
        if u.shape != (ins.absmax[k],):
            raise ValueError(f"{k}: {u.size} channels, the instruction asks for {ins.absmax[k]}")
    return np.concatenate([*parts, *us, *(u * u for u in us)]) if parts or us else np.zeros(0)


def second_pass_vector(reply: ScoutReply, ins: Instruction, bounds: np.ndarray) -> np.ndarray:
    """Pass-2 numbers in [0, 1]: ``(min(a, B) / B)^POWER`` per channel, ``bounds`` the server's ``B``
    concatenated in the order of ``ins.absmax``."""
    bounds = np.asarray(bounds, dtype=np.float64)
    n = second_pass_length(ins)
    if bounds.shape != (n,) or not (np.all(np.isfinite(bounds)) and np.all(bounds > 0)):
        raise ValueError(f"the bounds must be {n} finite positive numbers, got shape {bounds.shape}")
    a = np.concatenate([np.asarray(reply.channel_absmax[k], np.float64).reshape(-1) for k in ins.absmax]) \
        if ins.absmax else np.zeros(0)
    if a.shape != (n,):
        raise ValueError(f"{a.size} channels, the instruction asks for {n}")
    return (np.minimum(a, bounds) / bounds) ** POWER


@dataclass
class FirstPass:
    """What pass 1's sums say, per point and per channel (all sums over ``clients``)."""

    clients: int
    seen: dict[str, int] = field(default_factory=dict)
    negative: dict[str, int] = field(default_factory=dict)
    zero: dict[str, int] = field(default_factory=dict)
    cells: dict[str, np.ndarray] = field(default_factory=dict)       # int64 (CELLS,)
    u: dict[str, np.ndarray] = field(default_factory=dict)           # sum of u per channel
    u2: dict[str, np.ndarray] = field(default_factory=dict)          # sum of u^2 per channel


def _check_range(total: np.ndarray, lo: float, hi: float, what: str, tolerance: float) -> None:
    if total.size and not (total.min() >= lo - tolerance and total.max() <= hi + tolerance):
        raise ValueError(f"{what}: numbers in [{total.min():.6g}, {total.max():.6g}], honest clients give "
                         f"[{lo:g}, {hi:g}]")


def decode_first_pass(total: np.ndarray, ins: Instruction, clients: int, tolerance: float) -> FirstPass:
    """The sum of ``clients``' pass-1 vectors as counts and channel sums. ``tolerance``: how far the
    fixed point may move a number. Raises ValueError for a sum no honest clients give: the wrong
    length, not finite, a count outside [0, clients], more negative than seen, cells that do not
    add up to the points seen, channel sums outside their range or a negative spread."""
    total = np.asarray(total, dtype=np.float64)
    if total.shape != (first_pass_length(ins),):
        raise ValueError(f"private scouting pass 1: {total.size} numbers, the instruction's points need "
                         f"{first_pass_length(ins)}")
    if not np.isfinite(total).all():
        raise ValueError("private scouting pass 1: the sum is not finite")
    out, at, width = FirstPass(clients), 0, POINT_HEAD + CELLS
    for k in ins.keys:
        part = total[at:at + width]
        at += width
        _check_range(part, 0, clients, f"private scouting pass 1: {k}", tolerance)
        counts = np.maximum(np.rint(part), 0).astype(np.int64)
        seen, neg, zero, cells = int(counts[0]), int(counts[1]), int(counts[2]), counts[3:]
        if abs(part[2:].sum() - part[0]) > (CELLS + 2) * tolerance or zero + int(cells.sum()) != seen:
            raise ValueError(f"private scouting pass 1: {k}: the cells count {part[2:].sum():.6g} clients, "
                             f"{part[0]:.6g} saw values")
        if neg > seen:
            raise ValueError(f"private scouting pass 1: {k}: {neg} clients saw a negative value, {seen} saw values")
        out.seen[k], out.negative[k], out.zero[k], out.cells[k] = seen, neg, zero, cells
    channels = sum(ins.absmax.values())
    u_all, u2_all = total[at:at + channels], total[at + channels:]
    _check_range(u_all, -clients, clients, "private scouting pass 1: log abs-max", tolerance)
    _check_range(u2_all, 0, clients, "private scouting pass 1: squared log abs-max", tolerance)
    spread = u2_all * clients - u_all ** 2        # K^2 var(u) >= 0 (Cauchy-Schwarz)
    if spread.size and spread.min() < -4 * clients * clients * tolerance:
        raise ValueError("private scouting pass 1: the squared logs sum below the square of the logs' mean")
    at = 0
    for k, c in ins.absmax.items():
        out.u[k], out.u2[k] = u_all[at:at + c], u2_all[at:at + c]
        at += c
    return out


def merge_first_passes(passes: Sequence[FirstPass]) -> FirstPass:
    """Several profiles' pass-1 sums as one (their points may differ; the channels are the same)."""
    out = FirstPass(sum(p.clients for p in passes))
    for p in passes:
        for d in ("seen", "negative", "zero", "cells", "u", "u2"):
            mine, theirs = getattr(out, d), getattr(p, d)
            for k, v in theirs.items():
                mine[k] = mine[k] + v if k in mine else v
    return out


def bounds(first: FirstPass, tolerance: float) -> dict[str, np.ndarray]:
    """Per abs-max point, the per-channel bound ``B`` of pass 2 (float32, what the clients get):
    ``2^min(mu + sqrt(K-1) sigma, 1 + mu + 2 sigma)`` of the clients' log2 abs-max, raised by what
    the fixed point may have moved mu and sigma (module docstring)."""
    k = max(first.clients, 1)
    d_mu = tolerance / k                       # in units of LOG2_BOUND
    d_sigma = math.sqrt(3 * tolerance / k)     # var = E[u^2] - E[u]^2, each off by d_mu (and 2 d_mu)
    out = {}
    for key, s in first.u.items():
        mu = s / k
        sigma = np.sqrt(np.maximum(first.u2[key] / k - mu * mu, 0.0))
        z = math.sqrt(k - 1)
        top = np.minimum((mu + d_mu) + z * (sigma + d_sigma),
                         (1.0 / LOG2_BOUND) + (mu + d_mu) + 2 * (sigma + d_sigma))
        out[key] = np.exp2(np.clip(top, -1.0, 1.0 + 1.0 / LOG2_BOUND) * LOG2_BOUND).astype(np.float32)
    return out


def geometric_mean(first: FirstPass) -> dict[str, np.ndarray]:
    """Per channel, the geometric mean of the clients' abs-max (from the clamped log sums): the
    summable stand-in for the lower median that ``absmax_rule = 'clipped'`` caps at a multiple of."""
    k = max(first.clients, 1)
    return {key: np.exp2(s / k * LOG2_BOUND) for key, s in first.u.items()}


def decode_second_pass(total: np.ndarray, ins: Instruction, clients: int, tolerance: float) -> dict[str, np.ndarray]:
    """Per abs-max point, the power sums of ``clients``' pass-2 vectors; ValueError for a sum no
    honest clients give (the wrong length, not finite, outside [0, clients])."""
    total = np.asarray(total, dtype=np.float64)
    if total.shape != (second_pass_length(ins),):
        raise ValueError(f"private scouting pass 2: {total.size} numbers, the instruction's channels need "
                         f"{second_pass_length(ins)}")
    if not np.isfinite(total).all():
        raise ValueError("private scouting pass 2: the sum is not finite")
    _check_range(total, 0, clients, "private scouting pass 2", tolerance)
    out, at = {}, 0
    for k, c in ins.absmax.items():
        out[k] = total[at:at + c]
        at += c
    return out


def absmax_estimate(power_sums: Mapping[str, np.ndarray], bound: Mapping[str, np.ndarray],
                    tolerance: float) -> dict[str, np.ndarray]:
    """Per channel, ``B (S + tolerance)^(1/POWER)``: the fixed point moves ``S`` by at most
    ``tolerance``, so this is never below the max over the clients of ``min(a, B)``, and at most
    ``(K + tolerance)^(1/POWER)`` times it (or ``B tolerance^(1/POWER)`` when every client's term
    lies below the fixed point's resolution)."""
    return {k: (np.asarray(bound[k], np.float64) * np.maximum(s + tolerance, 0.0) ** (1.0 / POWER)).astype(np.float32)
            for k, s in power_sums.items()}


def pseudo_reports(first: FirstPass, absmax: Mapping[str, np.ndarray]) -> list[ScoutReply]:
    """The sums as ``first.clients`` scouting reports that the plaintext rules read as they would the
    clients' own: per point, report ``i`` carries the ``i``-th smallest abs-max (its cell's upper
    edge, or 0), the last ``negative`` of the seen ones a negative min (a client whose min was
    negative has an abs-max above 0), those past ``seen`` no values; every
    report carries the fleet's per-channel estimate ``absmax``. The rules use only the multiset of
    abs-max per point, whether any min was negative, and the max over clients per channel, so
    ``grids_from_scouting`` and ``clip_scouting`` give what they give on the clients' reports with
    each abs-max rounded up to its cell's edge."""
    k = first.clients
    keys = list(first.seen)
    values = {}
    for key in keys:
        tops = [0.0] * first.zero[key] + [cell_top(i) for i in np.flatnonzero(first.cells[key])
                                         for _ in range(int(first.cells[key][i]))]
        values[key] = tops
    out = []
    for i in range(k):
        ranges, n = {}, {}
        for key in keys:
            if i < first.seen[key]:
                a = values[key][i]
                ranges[key] = (-a if i >= first.seen[key] - first.negative[key] else 0.0, a)
                n[key] = 1
            else:
                ranges[key], n[key] = (0.0, 0.0), 0
        out.append(ScoutReply(ranges, n, dict(absmax)))
    return out
