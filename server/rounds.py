"""One round of the schedule as pure functions over the run state (design.md sections 4 and 7):
who is sampled, what each profile is sent, and what the valid replies change. No Flower, no I/O:
``server.app`` does the messaging and the files.

- scout: the clients' (min, max) give each activation point a histogram grid
  (``server.aggregate.grids_from_scouting``).
- stats: the replies are added to the running sums (exact); a point whose mass outside its grid
  exceeds ``widen_threshold`` gets a coarser grid and its sums are re-binned exactly
  (``quant.stats.widen``); then every profile's activation ranges are calibrated from the sums
  (one calibrator run per profile: the best clipping depends on the bit width) and a profile whose
  values changed gets a new QParams version. The clients whose replies were accepted are marked
  used: stats rounds sample without replacement, so each client's data is counted once.
- lsq: per profile, the deltas of ``(log s, beta)`` are aggregated by ``lsq_rule`` and applied by
  the server optimizer to the float state kept in the run state; integer zero-points are derived
  only when the QParams are made (``to_integer_qparams``), never averaged. Version + 1.
- eval: metrics only (token-weighted perplexity per profile).

A round with fewer valid replies than its ``min_replies`` changes nothing but the round counter
(lsq: per profile, since a profile's ranges are learned from its own clients only).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Mapping, Sequence

import numpy as np

from quant.qparams import QParams
from quant.stats import needs_widening, widen
from quant.wire import Instruction
from server.aggregate import (coordinate_median, fedadam_step, fedavg_step, grids_from_scouting,
                              learned_from_qparams, ranges_for_profile, sum_statistics,
                              to_integer_qparams, trimmed_mean, weighted_mean)
from server.config import RoundSpec, ServerConfig, sample_size
from server.state import RunState
from server.validate import Rejection, summarise_rejections

ACTIVATION_SUFFIXES = (":input", ":other")


@dataclass(frozen=True)
class Accepted:
    """A reply that passed validation: who sent it, the examples it claims, the decoded reply
    (ScoutReply, StatsReply, LsqReply, or the eval metrics dict)."""

    client_id: str
    num_examples: int
    reply: Any


def activation_keys(qp: QParams) -> list[str]:
    """The activation points of a profile: its QParams' keys ending in ':input' or ':other'."""
    return sorted(k for k in qp.points if k.endswith(ACTIVATION_SUFFIXES))


def learned_keys(qp: QParams, config: ServerConfig) -> list[str]:
    """The points an lsq round moves: the activations, or every point (``learn.which = 'all'``)."""
    return sorted(qp.points) if config.learn.get("which") == "all" else activation_keys(qp)


def sample_clients(roster_ids: Sequence[str], used: Sequence[str], fraction: float, min_clients: int,
                   seed: int, round: int) -> list[str]:
    """``max(ceil(fraction * |roster|), min_clients)`` client ids (as many as there are) from the
    roster minus ``used``, sorted. Deterministic in (seed, round, the roster as a set), so a
    resumed run samples what the interrupted one would have."""
    roster = sorted(set(roster_ids))
    used_set = set(used)
    eligible = [c for c in roster if c not in used_set]
    k = min(sample_size(len(roster), fraction, min_clients), len(eligible))
    rng = np.random.default_rng([int(seed), int(round)])
    return sorted(eligible[i] for i in rng.choice(len(eligible), size=k, replace=False))


def movable_qparams(qp: QParams, config: ServerConfig) -> QParams:
    """The part of a profile's QParams that a run can change: its activation points (and every point
    when the learned-range rounds learn weights too), with the smoothing, version and fingerprint.
    Clients merge it into what they hold, so weight scales -- most of the bytes: 8.5 MB of 4-bit
    group scales on SmolLM2, against 5 KB of activation scales -- never travel in a round."""
    keys = set(activation_keys(qp)) | set(learned_keys(qp, config))
    return QParams({k: p for k, p in qp.points.items() if k in keys}, qp.model, qp.version,
                   qp.smoothing, qp.meta)


def instructions_for(state: RunState, round: int, spec: RoundSpec, config: ServerConfig) -> dict[str, Instruction]:
    """One instruction per profile for this round (protocol.md): the profile's global QParams and
    the points of the job (activation points; their grids in a stats round)."""
    out = {}
    for prof, full in sorted(state.qparams.items()):
        qp = movable_qparams(full, config)
        if spec.job == "scout":
            out[prof] = Instruction(round, "scout", qp, keys=tuple(activation_keys(qp)))
        elif spec.job == "stats":
            grids = {k: state.grids[k] for k in activation_keys(qp) if k in state.grids}
            out[prof] = Instruction(round, "stats", qp, grids=grids)
        elif spec.job == "lsq":
            out[prof] = Instruction(round, "lsq", qp, keys=tuple(learned_keys(qp, config)))
        else:
            out[prof] = Instruction(round, "eval", qp)
    return out


# ---------------------------------------------------------------------------------------------

def apply_round(state: RunState, round: int, spec: RoundSpec,
                replies: Mapping[str, Sequence[Accepted]], rejections: Sequence[Rejection | str],
                config: ServerConfig) -> tuple[RunState, dict]:
    """The state after ``round`` given its valid replies per profile, and the round's metrics
    (``replies``, ``rejections`` by code, ``applied``, ``versions`` per profile, and per job:
    ``widened`` points, lsq losses, eval perplexities). ``state`` is not modified."""
    if round <= state.round:
        raise ValueError(f"round {round} is already done (the state is after round {state.round})")
    unknown = sorted(set(replies) - set(state.qparams))
    if unknown:
        raise ValueError(f"replies for profiles the run does not have: {unknown[:3]}")
    n_valid = sum(len(v) for v in replies.values())
    metrics: dict[str, Any] = {"round": round, "job": spec.job, "replies": n_valid,
                               "rejections": summarise_rejections(rejections)}
    new = replace(state, round=round)
    if spec.job == "eval":
        metrics |= _eval_metrics(replies)
        metrics["applied"] = False
    elif n_valid < spec.min_replies:
        metrics["applied"] = False
    elif spec.job == "scout":
        new, m = _scout(new, replies, config)
        metrics |= m
    elif spec.job == "stats":
        new, m = _stats(new, replies, config)
        metrics |= m
    else:
        new, m = _lsq(new, replies, spec, config)
        metrics |= m
    metrics["versions"] = {p: int(qp.version) for p, qp in sorted(new.qparams.items())}
    return new, metrics


def _all(replies: Mapping[str, Sequence[Accepted]]) -> list[Accepted]:
    return [a for prof in sorted(replies) for a in replies[prof]]


def _scout(state: RunState, replies, config: ServerConfig) -> tuple[RunState, dict]:
    if state.sums:
        raise ValueError("a scout round after statistics would discard the running sums")
    grids = grids_from_scouting([a.reply for a in _all(replies)], config.bins, config.grid_margin,
                                config.grid_quantile)
    return replace(state, grids={**state.grids, **grids}), {"applied": True, "grids": len(grids)}


def _stats(state: RunState, replies, config: ServerConfig) -> tuple[RunState, dict]:
    accepted = _all(replies)
    sums = sum_statistics([dict(state.sums), *[a.reply.stats for a in accepted]])
    grids = dict(state.grids)
    widened = []
    for k in sorted(sums):
        s = sums[k]
        outside = not (s.grid.lo <= s.min and s.max < s.grid.hi)
        if outside and needs_widening(s, config.widen_threshold):
            sums[k] = widen(s, 2, cover=(s.min, s.max))
            grids[k] = sums[k].grid
            widened.append(k)
    qparams, learned, moments = dict(state.qparams), dict(state.learned), dict(state.moments)
    changed = []
    for prof, qp in sorted(state.qparams.items()):
        specs = {k: qp.points[k].spec for k in activation_keys(qp) if k in sums and sums[k].n > 0}
        if not specs:
            continue
        pts = ranges_for_profile(sums, specs, config.calibrator)
        if any(not _same_point(qp.points[k], p) for k, p in pts.items()):
            qparams[prof] = qp.with_points(pts, version=qp.version + 1)
            learned.pop(prof, None)             # lsq restarts from the new ranges
            moments.pop(prof, None)
            changed.append(prof)
    used = (*state.used, *(a.client_id for a in accepted))
    new = replace(state, qparams=qparams, grids=grids, sums=sums, learned=learned, moments=moments, used=used)
    return new, {"applied": True, "widened": widened, "changed": changed}


def _same_point(a, b) -> bool:
    return (a.spec == b.spec and a.scale.shape == b.scale.shape and np.array_equal(a.scale, b.scale)
            and a.zero_point.dtype == b.zero_point.dtype and np.array_equal(a.zero_point, b.zero_point))


def _lsq(state: RunState, replies, spec: RoundSpec, config: ServerConfig) -> tuple[RunState, dict]:
    qparams, learned, moments = dict(state.qparams), dict(state.learned), dict(state.moments)
    losses, skipped = {}, []
    for prof in sorted(replies):
        accepted = replies[prof]
        if len(accepted) < spec.min_replies:
            if accepted:
                skipped.append(prof)
            continue
        qp = state.qparams[prof]
        keys = learned_keys(qp, config)
        if not keys:
            continue
        x = learned.get(prof)
        if x is None:
            log_s, beta = learned_from_qparams({k: qp.points[k] for k in keys})
            x = {**{f"log_s/{k}": v for k, v in log_s.items()}, **{f"beta/{k}": v for k, v in beta.items()}}
        deltas = [{**{f"log_s/{k}": a.reply.delta_log_s[k] for k in keys},
                   **{f"beta/{k}": a.reply.delta_beta[k] for k in keys}} for a in accepted]
        if config.lsq_rule == "mean":
            d = weighted_mean(deltas, [a.num_examples for a in accepted])
        elif config.lsq_rule == "median":
            d = coordinate_median(deltas)
        else:
            d = trimmed_mean(deltas, config.trim)
        if config.server_opt == "fedavg":
            x = fedavg_step(x, d, config.server_lr)
        else:
            x, moments[prof] = fedadam_step(x, d, moments.get(prof, {}), config.server_lr,
                                            config.adam_b1, config.adam_b2, config.adam_eps)
        learned[prof] = x
        pts = to_integer_qparams({k: x[f"log_s/{k}"] for k in keys}, {k: x[f"beta/{k}"] for k in keys},
                                 {k: qp.points[k].spec for k in keys})
        qparams[prof] = qp.with_points(pts, version=qp.version + 1)
        losses[prof] = {"loss_before": float(np.mean([a.reply.loss_before for a in accepted])),
                        "loss_after": float(np.mean([a.reply.loss_after for a in accepted]))}
    new = replace(state, qparams=qparams, learned=learned, moments=moments)
    return new, {"applied": bool(losses), "lsq": losses, "below_min_replies": skipped}


def _eval_metrics(replies) -> dict:
    out, nll, tok = {}, 0.0, 0
    for prof in sorted(replies):
        acc = replies[prof]
        if not acc:
            continue
        p_nll = math.fsum(a.reply["nll_sum"] for a in acc)
        p_tok = sum(a.reply["tokens"] for a in acc)
        out[prof] = {"perplexity": _exp(p_nll / p_tok), "tokens": p_tok, "replies": len(acc)}
        nll, tok = nll + p_nll, tok + p_tok
    return {"eval": out, "eval_all": {"perplexity": _exp(nll / tok), "tokens": tok} if tok else {}}


def _exp(x: float) -> float:
    return math.exp(x) if x < 709 else math.inf
