"""Checks on every reply before anything is aggregated (design.md section 7).

Each validator takes the payload as it arrived (flat arrays and header, any garbage), the
instruction the server sent, the example count the client claims and a config, and returns either
the decoded, typed reply or a :class:`Rejection` with a short stable ``code`` for the round's
metrics. They never raise on what a client sends. Codes:

``malformed`` ``too_large`` ``dtype`` ``shape`` ``missing_key`` ``unknown_key`` (structure);
``wrong_format`` ``wrong_kind`` ``stale_round`` ``wrong_version`` ``wrong_request`` (what it answers);
``nan`` (NaN or infinite) ``negative_count`` ``count_mismatch`` ``inconsistent`` ``absmax_range``
``scale_range`` ``zero_point_range`` ``examples`` (content).

Validation bounds what one reply can be; a robust aggregation rule (server.aggregate) bounds the
harm of valid-looking but poisoned ones.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, TypeVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from quant.spec import SCALE_FLOOR
from quant.wire import (Limits, Instruction, LsqReply, ScoutReply, StatsReply, WireError,
                        decode_lsq_reply, decode_scout_reply, decode_stats_reply)

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
    for k, nk in n.items():
        v = values_per_example.get(k) if isinstance(values_per_example, Mapping) else values_per_example
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
        for k, (lo, hi) in r.ranges.items():
            if r.n[k] > 0 and not (math.isfinite(lo) and math.isfinite(hi)):
                raise WireError("nan", f"{k}: min/max not finite")
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
        return r
    return _guard(run)


def validate_lsq_reply(flat, header, ins: Instruction, num_examples,
                       config: ValidationConfig = DEFAULT) -> LsqReply | Rejection:
    """A learned-range reply, relative to the QParams the instruction sent (what the client
    started from): finite deltas and loss; ``|delta log s| <= max_log_scale_step`` and the new
    scale within ``[min_scale, max_scale]``; for asymmetric specs the new offset's zero-point
    ``-beta / s`` within the integer range (half a step of slack). Symmetric specs ignore beta."""
    def run():
        _check_examples(num_examples, config)
        r = decode_lsq_reply(flat, header, ins, config.limits)
        lo_s, hi_s = math.log(config.min_scale), math.log(config.max_scale)
        for k in ins.keys:
            p = ins.qparams.points[k]
            d_ls = r.delta_log_s[k].astype(np.float64)
            if np.any(np.abs(d_ls) > config.max_log_scale_step):
                raise WireError("scale_range", f"{k}: |delta log s| up to {np.abs(d_ls).max():.3g} "
                                               f"> {config.max_log_scale_step:.3g}")
            s0 = p.scale.astype(np.float64)
            log_s = np.log(s0) + d_ls
            if np.any(log_s < lo_s) or np.any(log_s > hi_s):
                raise WireError("scale_range", f"{k}: new scale outside [{config.min_scale:.3g}, "
                                               f"{config.max_scale:.3g}]")
            if not p.spec.symmetric:
                beta = -p.zero_point.astype(np.float64) * s0 + r.delta_beta[k].astype(np.float64)
                z = -beta / np.exp(log_s)
                if np.any(z < p.spec.qmin - 0.5) or np.any(z > p.spec.qmax + 0.5):
                    raise WireError("zero_point_range", f"{k}: zero-point {np.ravel(z)[0]:.4g} "
                                                        f"outside [{p.spec.qmin}, {p.spec.qmax}]")
        return r
    return _guard(run)


def summarise_rejections(reasons: Iterable[Rejection | str]) -> dict[str, int]:
    """Count per rejection code, for the round's metrics (sorted by code)."""
    c = Counter(r.code if isinstance(r, Rejection) else str(r) for r in reasons)
    return dict(sorted(c.items()))
