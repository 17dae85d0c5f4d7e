"""Checks on every reply before anything is aggregated (design.md section 7).

Each validator takes the payload as it arrived (flat arrays and header, any garbage), the
instruction the server sent, the example count the client claims and a config, and returns either
the decoded, typed reply or a :class:`Rejection` with a short stable ``code`` for the round's
metrics. They never raise on what a client sends. Codes:

``malformed`` ``too_large`` ``dtype`` ``shape`` ``missing_key`` ``unknown_key`` (structure);
``wrong_format`` ``wrong_kind`` ``stale_round`` ``wrong_version`` ``wrong_request`` (what it answers);
``nan`` (NaN or infinite) ``value_range`` (finite but beyond ``MAX_ABS_VALUE``) ``negative_count``
``count_mismatch`` ``negative`` (a plan reply's sensitivity or a second moment's diagonal below 0) ``inconsistent`` ``absmax_range`` ``sqsum_range`` ``scale_range`` ``zero_point_range`` ``examples``
(content).

Validation bounds what one reply can be; a robust aggregation rule (server.aggregate) bounds the
harm of valid-looking but poisoned ones.
"""

from __future__ import annotations

import math
import weakref
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, TypeVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from quant.spec import SCALE_FLOOR
from quant.wire import (HessianReply, Limits, Instruction, LsqReply, PlanReply, ScoutReply, StatsReply, WireError,
                        decode_dp_reply, decode_hessian_reply, decode_lsq_arrays, decode_plan_reply,
                        decode_scout_reply, decode_stats_reply, lsq_reply_from_arrays)

T = TypeVar("T")


@dataclass(frozen=True)
class Rejection:
    """Why a reply was dropped: ``code`` for metrics, ``detail`` for the log."""

    code: str
    detail: str = ""


class ValidationConfig(BaseModel):
    """Bounds on what a reply may contain."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    limits: Limits = Limits()
    max_examples: int = Field(1_000_000, gt=0, description="a larger claim would dominate a weighted mean")
    max_log_scale_step: float = Field(math.log(8), gt=0, description="|delta log s| per round")
    min_scale: float = Field(SCALE_FLOOR, gt=0)
    max_scale: float = Field(1e6, gt=0)


DEFAULT = ValidationConfig()
# |min|, |max|, per-channel abs-max and |delta beta| a reply may carry: far above any working
# model's float32 activations, and low enough that no grid, range or scale built from them
# overflows (a range of 1e100 gave an infinite scale, 1.7e308 an infinite grid). A constant, not a
# ValidationConfig field: the config's digest, and so every run's checkpoint, stays what it was.
MAX_ABS_VALUE = 2.0**60

ValuesPerExample = Mapping[str, tuple[int, int]] | tuple[int, int] | None


def _guard(fn: Callable[[], T]) -> T | Rejection:
    try:
        return fn()
    except WireError as e:
        return Rejection(e.code, str(e)[:300])
    except Exception as e:      # never let client garbage raise into the round
        return Rejection("malformed", f"unexpected {type(e).__name__}: {str(e)[:300]}")


def _check_examples(num_examples, config: ValidationConfig) -> None:
    if not (isinstance(num_examples, (int, np.integer)) and not isinstance(num_examples, (bool, np.bool_))
            and 1 <= num_examples <= config.max_examples):
        raise WireError("examples", f"example count {str(num_examples)[:40]} not an integer in "
                                    f"[1, {config.max_examples}]")


def _check_n(n: Mapping[str, int], num_examples: int, values_per_example: ValuesPerExample) -> None:
    """n per point against the example count: within ``[lo, hi] * examples`` when the caller
    knows the values per example (per point, or one pair for all), else at least 1."""
    per_point = isinstance(values_per_example, Mapping)
    for k, nk in n.items():
        v = values_per_example.get(k) if per_point else values_per_example
        lo, hi = (1, None) if v is None else (int(v[0]) * num_examples, int(v[1]) * num_examples)
        if nk < lo or (hi is not None and nk > hi):
            raise WireError("count_mismatch", f"{k}: {nk} values from {num_examples} examples, "
                                              f"expected {lo} to {hi}")


def validate_scout_reply(flat, header, ins: Instruction, num_examples,
                         config: ValidationConfig = DEFAULT,
                         values_per_example: ValuesPerExample = None) -> ScoutReply | Rejection:
    """A scouting reply: structure, what it answers, finite min/max, n consistent with the
    example count (a point with values needs finite extremes: the grid is built from them)."""
    def run():
        _check_examples(num_examples, config)
        r = decode_scout_reply(flat, header, ins, config.limits)
        _check_n(r.n, int(num_examples), values_per_example)
        _check_extremes({k: r.ranges[k] for k in ins.keys if r.n[k] > 0})
        _check_absmax(r.channel_absmax)
        return r
    return _guard(run)


def validate_stats_reply(flat, header, ins: Instruction, num_examples,
                         config: ValidationConfig = DEFAULT,
                         values_per_example: ValuesPerExample = None) -> StatsReply | Rejection:
    """A statistics reply: keys, shapes and dtypes for the round's grids, non-negative counts that
    add up to n, n consistent with the example count, finite non-negative abs-max."""
    def run():
        _check_examples(num_examples, config)
        r = decode_stats_reply(flat, header, ins, config.limits)
        _check_n({k: s.n for k, s in r.stats.items()}, int(num_examples), values_per_example)
        _check_extremes({k: (s.min, s.max) for k, s in r.stats.items() if s.n > 0})
        _check_absmax(r.absmax)
        return r
    return _guard(run)


def validate_dp_reply(flat, header, ins: Instruction, num_examples, clip: float,
                      config: ValidationConfig = DEFAULT) -> np.ndarray | Rejection:
    """A DP statistics reply (``quant.dp``): one finite vector for the instruction's keys whose L2
    norm is within the round's ``clip`` (``dp_clip``: more would break the noise's calibration,
    whatever the client meant), and a valid example count (it is not used as a weight)."""
    def run():
        _check_examples(num_examples, config)
        v = decode_dp_reply(flat, header, ins, config.limits)
        norm = float(np.linalg.norm(v))
        if norm > clip * (1 + 1e-9):
            raise WireError("dp_clip", f"vector of L2 norm {norm:.6g} beyond this round's clip {clip:.6g}")
        return v
    return _guard(run)


def validate_plan_reply(flat, header, ins: Instruction, num_examples,
                        config: ValidationConfig = DEFAULT) -> PlanReply | Rejection:
    """A plan reply (``quant.mixed``'s FIT sums): one finite (``nan``), non-negative (``negative``)
    sum per key within ``MAX_ABS_VALUE`` (``value_range``), its sequence count the example count it
    claims and at least one token per sequence (``count_mismatch``)."""
    def run():
        _check_examples(num_examples, config)
        r = decode_plan_reply(flat, header, ins, config.limits)
        if r.sequences != int(num_examples):
            raise WireError("count_mismatch", f"{r.sequences} sequences summed, {num_examples} examples claimed")
        if r.tokens < r.sequences:
            raise WireError("count_mismatch", f"{r.tokens} tokens from {r.sequences} sequences")
        big = [k for k, v in r.sens.items() if v > MAX_ABS_VALUE]
        if big:
            raise WireError("value_range", f"sens of {big[0]}: beyond {MAX_ABS_VALUE:.3g}")
        return r
    return _guard(run)


def validate_hessian_reply(flat, header, ins: Instruction, num_examples,
                           config: ValidationConfig = DEFAULT) -> HessianReply | Rejection:
    """A Hessian reply (GPTQ's second moments, ``quant.wire.decode_hessian_reply``'s checks: ``nan``,
    ``negative``, ``inconsistent``), with at least one token per example it claims
    (``count_mismatch``) and every mean square ``H_jj / tokens`` within ``MAX_ABS_VALUE`` squared
    (``value_range``)."""
    def run():
        _check_examples(num_examples, config)
        r = decode_hessian_reply(flat, header, ins, config.limits)
        if r.tokens < int(num_examples):
            raise WireError("count_mismatch", f"{r.tokens} tokens from {num_examples} examples")
        big = [k for k, h in r.sums.items() if np.diag(h).max(initial=0.0) > r.tokens * MAX_ABS_VALUE ** 2]
        if big:
            raise WireError("value_range", f"second moment of {big[0]}: a mean square beyond {MAX_ABS_VALUE:.3g}^2")
        return r
    return _guard(run)


def _check_extremes(ranges: Mapping[str, tuple[float, float]]) -> None:
    """min/max of the points that saw values: finite (``nan``), and within ``MAX_ABS_VALUE``
    (``value_range``). The statistics format admits infinite extremes counted below/above, but
    a grid, a range or a scale built from one overflows, so no reply may carry one."""
    for k, (lo, hi) in ranges.items():
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise WireError("nan", f"{k}: min/max not finite")
        if max(-lo, hi) > MAX_ABS_VALUE:
            raise WireError("value_range", f"{k}: min/max {lo:.3g}, {hi:.3g} beyond "
                                           f"+-{MAX_ABS_VALUE:.3g}")


def _check_absmax(absmax: Mapping[str, np.ndarray]) -> None:
    """Per-channel abs-max (already finite and non-negative) within ``MAX_ABS_VALUE``."""
    for k, v in absmax.items():
        if v.size and float(v.max()) > MAX_ABS_VALUE:
            raise WireError("value_range", f"absmax/{k}: up to {float(v.max()):.3g}, beyond "
                                           f"{MAX_ABS_VALUE:.3g}")


def validate_lsq_reply(flat, header, ins: Instruction, num_examples,
                       config: ValidationConfig = DEFAULT) -> LsqReply | Rejection:
    """A learned-range reply, relative to the QParams the instruction sent (what the client
    started from): finite deltas and loss; ``|delta log s| <= max_log_scale_step`` and the new
    scale within ``[min_scale, max_scale]``; for asymmetric specs the new offset's zero-point
    ``-beta / s`` within the integer range (half a step of slack). Symmetric specs ignore beta.
    All points are checked at once on the flat arrays; a refused reply names its first bad point
    with the words of :func:`_check_lsq_point`."""
    def run():
        _check_examples(num_examples, config)
        a = decode_lsq_arrays(flat, header, ins, config.limits)
        big = np.abs(a["delta_beta"].astype(np.float64)) > MAX_ABS_VALUE
        if big.any():               # symmetric points ignore beta, but the server keeps it
            k = ins.keys[int(_lsq_table(ins)["point"][np.argmax(big)])]
            raise WireError("value_range", f"delta_beta of {k}: beyond {MAX_ABS_VALUE:.3g}")
        bad = _lsq_bad_points(a["delta_log_s"], a["delta_beta"], ins, config)
        r = lsq_reply_from_arrays(a, ins)
        for j in np.flatnonzero(bad).tolist():      # raises at the first (the loop is a guard)
            k = ins.keys[j]
            _check_lsq_point(k, ins.qparams.points[k], r.delta_log_s[k], r.delta_beta[k], config)
        return r
    return _guard(run)


def _check_lsq_point(k: str, p, d_log_s: np.ndarray, d_beta: np.ndarray, config: ValidationConfig) -> None:
    """One point of an lsq reply, as the checks read (the reference of :func:`_lsq_bad_points`)."""
    lo_s, hi_s = math.log(config.min_scale), math.log(config.max_scale)
    d_ls = d_log_s.astype(np.float64)
    if np.any(np.abs(d_ls) > config.max_log_scale_step):
        raise WireError("scale_range", f"{k}: |delta log s| up to {np.abs(d_ls).max():.3g} "
                                       f"> {config.max_log_scale_step:.3g}")
    s0 = p.scale.astype(np.float64)
    log_s = np.log(s0) + d_ls
    if np.any(log_s < lo_s) or np.any(log_s > hi_s):
        raise WireError("scale_range", f"{k}: new scale outside [{config.min_scale:.3g}, "
                                       f"{config.max_scale:.3g}]")
    if not p.spec.symmetric:
        beta = -p.zero_point.astype(np.float64) * s0 + d_beta.astype(np.float64)
        z = -beta / np.exp(log_s)
        if np.any(z < p.spec.qmin - 0.5) or np.any(z > p.spec.qmax + 0.5):
            raise WireError("zero_point_range", f"{k}: zero-point {np.ravel(z)[0]:.4g} "
                                                f"outside [{p.spec.qmin}, {p.spec.qmax}]")


_LSQ_TABLES: "weakref.WeakKeyDictionary[Instruction, dict]" = weakref.WeakKeyDictionary()


def _lsq_table(ins: Instruction) -> dict[str, np.ndarray]:
    """Per element of the flat lsq arrays (``ins.keys`` order): the terms of
    :func:`_check_lsq_point` that depend only on the instruction, computed per point exactly as
    there; cached per instruction (an Instruction is immutable and hashed by identity)."""
    t = _LSQ_TABLES.get(ins)
    if t is None:
        pts = [ins.qparams.points[k] for k in ins.keys]
        s0 = [p.scale.astype(np.float64).reshape(-1) for p in pts]
        sizes = [x.size for x in s0]

        def cat(parts, dtype=np.float64):
            return np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype)

        t = {"log_s0": cat([np.log(x) for x in s0]),
             "neg_z_s0": cat([-p.zero_point.astype(np.float64).reshape(-1) * x for p, x in zip(pts, s0)]),
             "asym": cat([np.full(n, not p.spec.symmetric) for p, n in zip(pts, sizes)], bool),
             "z_lo": cat([np.full(n, p.spec.qmin - 0.5) for p, n in zip(pts, sizes)]),
             "z_hi": cat([np.full(n, p.spec.qmax + 0.5) for p, n in zip(pts, sizes)]),
             "point": np.repeat(np.arange(len(pts)), sizes), "points": len(pts)}
        _LSQ_TABLES[ins] = t
    return t


def _lsq_bad_points(d_log_s: np.ndarray, d_beta: np.ndarray, ins: Instruction,
                    config: ValidationConfig) -> np.ndarray:
    """Per point, whether :func:`_check_lsq_point` refuses it: the same elementwise operations on
    the flat arrays of all points at once."""
    t = _lsq_table(ins)
    d_ls = d_log_s.astype(np.float64)
    bad = np.abs(d_ls) > config.max_log_scale_step
    log_s = t["log_s0"] + d_ls
    bad |= (log_s < math.log(config.min_scale)) | (log_s > math.log(config.max_scale))
    asym = t["asym"]
    with np.errstate(over="ignore", divide="ignore"):   # an extreme log s is refused above
        z = -(t["neg_z_s0"][asym] + d_beta[asym].astype(np.float64)) / np.exp(log_s[asym])
    bad[asym] |= (z < t["z_lo"][asym]) | (z > t["z_hi"][asym])
    return np.bincount(t["point"][bad], minlength=t["points"]) > 0


def validate_eval_metrics(metrics: Mapping[str, Any], ins: Instruction,
                          config: ValidationConfig) -> dict | Rejection:
    """An eval reply (metrics only): integer example and token counts in bounds, a finite
    non-negative ``nll_sum``, and the parameter version the instruction sent. Never raises."""
    try:
        ex, tokens, nll, version = (metrics.get(k) for k in ("num-examples", "tokens", "nll_sum", "version"))

        def is_int(v):
            return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))

        if not (is_int(ex) and 1 <= ex <= config.max_examples):
            return Rejection("examples", f"num-examples {str(ex)[:40]} not in [1, {config.max_examples}]")
        if not (is_int(tokens) and 1 <= tokens <= config.max_examples * 1_000_000):
            return Rejection("count_mismatch", f"tokens {str(tokens)[:40]} not a positive integer in bounds")
        if isinstance(nll, bool) or not isinstance(nll, (int, float, np.floating, np.integer)) \
                or not math.isfinite(float(nll)) or nll < 0:
            return Rejection("nan", f"nll_sum {str(nll)[:40]} not finite and non-negative")
        if not is_int(version) or int(version) != ins.version:
            return Rejection("wrong_version", f"evaluated version {str(version)[:40]}, sent {ins.version}")
        return {"num-examples": int(ex), "tokens": int(tokens), "nll_sum": float(nll)}
    except Exception as e:          # never let client garbage raise into the round
        return Rejection("malformed", f"unexpected {type(e).__name__}: {str(e)[:200]}")


def summarise_rejections(reasons: Iterable[Rejection | str]) -> dict[str, int]:
    """Count per rejection code, for the round's metrics (sorted by code)."""
    c = Counter(r.code if isinstance(r, Rejection) else str(r) for r in reasons)
    return dict(sorted(c.items()))
