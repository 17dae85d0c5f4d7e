"""One round of the schedule as pure functions over the run state (design.md sections 4 and 7):
who is sampled, what each profile is sent, and what the valid replies change. No Flower, no I/O:
``server.strategy`` does the messaging and the files.

- scout: the clients' (min, max) (with ``absmax_rule = "clipped"``, each capped at a multiple of the
  clients' lower median: ``server.aggregate.clip_scouting``) give each activation point a histogram grid
  (``server.aggregate.grids_from_scouting``). With ``config.smoothing`` the round also collects
  each smoothable Linear input's per-channel abs-max: the server merges them by max, computes
  SmoothQuant factors from them and the float weights, folds them into every profile (smoothing
  factors, the weights' min-max points, the inputs' ranges) and takes the grids of the smoothed
  inputs from the same reports (``quant.smoothing.smoothed_absmax``: exact, no second scouting).
  Under secure aggregation the reports are pseudo-reports made from the private scouting round's
  sums (``private_scouting``, ``quant.private_scout``), and the same rules run on them.
- stats: the replies are added to the running sums (``stats_rule = "sum"``: exact; ``"trimmed"``:
  the round's clients are first merged by ``server.aggregate.trimmed_statistics``, so no minority
  steers them, and their min/max clamped to ``round_factor`` x the grid, so no round, however few
  its replies, stretches a range further); a point whose mass outside its grid exceeds
  ``widen_threshold`` gets a coarser grid and its sums are re-binned exactly
  (``quant.stats.widen``); then every profile's activation ranges are calibrated from the sums
  (one calibrator run per profile: the best clipping depends on the bit width) and a profile whose
  values changed gets a new QParams version. The clients whose replies were accepted are marked
  used: stats rounds sample without replacement, so each client's data is counted once.
- lsq: per profile, the deltas of ``(log s, beta)`` are aggregated by ``lsq_rule`` (a robust rule's
  step of ``log s`` bounded by ``log(round_factor)``) and applied by
  the server optimizer to the float state kept in the run state; integer zero-points are derived
  only when the QParams are made (``to_integer_qparams``), never averaged. Version + 1.
- eval: metrics only (token-weighted perplexity per profile).
- hessian (the profiles of ``config.gptq``; only evaluation rounds may follow): every sampled client sums
  ``x x^T`` of the float inputs of one part of the GPTQ profiles' Linears (``hessian_request``: the
  rounds split the inputs between them, so no reply carries them all); the server merges them by
  ``stats_rule`` (``server.aggregate.merge_hessians``) and rounds each such Linear's weight by GPTQ
  (``gptq_qparams``: ``quant.gptq`` on the input as the graph quantizes it, smoothed and rotated);
  the codes and their weight points go into the QParams, version + 1, and travel in every later
  instruction (only evaluation rounds may follow).
- plan (the profiles of ``config.plans``): each client's FIT sensitivity sums per point
  (``quant.mixed``) are added (``stats_rule = "sum"``: the pooled estimate) or, with a robust rule,
  taken as shares of each client's total and merged by the trimmed mean
  (``quant.mixed.robust_sensitivity``); ``quant.mixed.plan_mixed_precision`` spends the profile's
  budget on them; the lifted activation points get int16 QParams from their current range, the
  promoted weights int8 per-channel ones from the (smoothed) float weights, version + 1. The
  QParams' ``meta["plan"]`` lists the promoted weights, which every later instruction carries
  (``movable_qparams``): a device cannot derive a spec it was not told. Devices rebuild their
  graph for the new specs (``client.runtime.DeviceRuntime.patch``).

A round with fewer valid replies than its ``min_replies`` changes nothing but the round counter
(lsq: per profile, since a profile's ranges are learned from its own clients only).

Nothing a client sends can stop the run or be committed as garbage: a round whose arithmetic
raises, or whose result a device would refuse or a resumed run could not load
(``commit_problems``: the device's own check, ``quant.qparams.qparams_problems``), is skipped
like a round with too few replies, with the reason in ``metrics["skipped"]``.
"""

from __future__ import annotations

import fnmatch
import logging
import math
import zlib
from dataclasses import dataclass, replace
from typing import Any, Mapping, Sequence

import numpy as np

from quant import dp, private_scout
from quant.gptq import gptq_codes, linear_hessian
from quant.affine import qparams_to_range, range_to_qparams
from quant.mixed import plan_mixed_precision, robust_sensitivity
from quant.spec import activation_spec, weight_spec
from quant.qparams import PointParams, QParams, per_token_linears, qparams_problems, rotation_block
from quant.smoothing import fold_weight, smoothed_absmax, smoothed_weight_point
from quant.stats import ActivationStats, needs_widening, widen
from quant.wire import Instruction, ScoutReply, triangle_size
from server.aggregate import (bounded_extremes, bounded_step, capped_weights, clip_scouting, coordinate_median,
                              fedadam_step, fedavg_step, grids_from_scouting, learned_from_qparams, max_absmax,
                              ranges_for_profile, smoothquant_factors, sum_statistics, to_integer_qparams,
                              merge_hessians, merge_importance, trimmed_mean, trimmed_statistics, weighted_mean)
from server.config import RoundSpec, ServerConfig, sample_size
from server.state import RunState
from server.validate import Rejection, summarise_rejections

ACTIVATION_SUFFIXES = (":input", ":other")
log = logging.getLogger(__name__)


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
    return sorted(qp.points) if config.learn.which == "all" else activation_keys(qp)


def sample_clients(roster_ids: Sequence[str], used: Sequence[str], fraction: float, min_clients: int,
                   seed: int, round: int, stream: str = "") -> list[str]:
    """``max(ceil(fraction * |roster|), min_clients)`` client ids (as many as there are) from the
    roster minus ``used``, sorted. Deterministic in (seed, round, stream, the roster as a set), so
    a resumed run samples what the interrupted one would have; ``stream`` names an independent
    draw (a profile's, in ``sample_by_profile``)."""
    roster = sorted(set(roster_ids))
    used_set = set(used)
    eligible = [c for c in roster if c not in used_set]
    k = min(sample_size(len(roster), fraction, min_clients), len(eligible))
    key = [int(seed), int(round)] + ([zlib.crc32(stream.encode())] if stream else [])
    rng = np.random.default_rng(key)
    return sorted(eligible[i] for i in rng.choice(len(eligible), size=k, replace=False))


def sample_by_profile(profile_of: Mapping[str, str], used: Sequence[str], fraction: float, min_clients: int,
                      seed: int, round: int) -> list[str]:
    """Stratified sampling: ``sample_clients`` within each profile's part of the roster
    (``profile_of``: client id -> profile), so every profile gets its fraction of every round.
    Uniform sampling over a mixed roster can draw no client of a small profile in a round, and
    that profile's learned ranges then skip the round (issue 5: 8 of 24 clients, a third of them
    mixed; one of the two lsq rounds sampled no mixed client)."""
    by: dict[str, list[str]] = {}
    for c, prof in profile_of.items():
        by.setdefault(prof, []).append(c)
    return sorted(c for prof in sorted(by)
                  for c in sample_clients(by[prof], used, fraction, min_clients, seed, round, stream=prof))


def movable_qparams(qp: QParams, config: ServerConfig) -> QParams:
    """The part of a profile's QParams that a run can change: its activation points (and every point
    when the learned-range rounds learn weights too), with the smoothing, version and fingerprint.
    Clients merge it into what they hold, so weight scales -- most of the bytes: 8.5 MB of 4-bit
    group scales on SmolLM2, against 5 KB of activation scales -- never travel in a round, except
    those of the weights GPTQ rounded (a device cannot derive them), with their codes."""
    keys = set(activation_keys(qp)) | set(learned_keys(qp, config)) | set(planned_weights(qp)) | set(qp.codes)
    return QParams({k: p for k, p in qp.points.items() if k in keys}, qp.model, qp.version,
                   qp.smoothing, qp.meta, qp.importance, qp.codes)


def planned_weights(qp: QParams) -> list[str]:
    """The weight points a plan round promoted (``meta["plan"]``, JSON): sent in every instruction."""
    import json

    raw = qp.meta.get("plan")
    return sorted(k for k in json.loads(raw).get("weights8", []) if k in qp.points) if raw else []


def plan_keys(qp: QParams) -> list[str]:
    """The points a plan round measures: every activation point and every Linear weight."""
    return sorted(k for k in qp.points if k.endswith(ACTIVATION_SUFFIXES) or k.endswith(":weight"))


def smoothing_groups(profiles, config: ServerConfig) -> dict[float, list[str]]:
    """Smoothed profiles by migration strength (``smoothing.alpha_for``): the profiles of one group
    get the same factors, so they share the statistics of their smoothed inputs."""
    out: dict[float, list[str]] = {}
    if config.smoothing is not None:
        for prof in sorted(profiles):
            a = config.smoothing.alpha_for(prof)
            if a is not None:
                out.setdefault(a, []).append(prof)
    return out


def smoothable_paths(qparams: Mapping[str, QParams], config: ServerConfig, weights: Mapping[str, np.ndarray]
                     ) -> list[str]:
    """The Linears a group of profiles smooths: those with a float weight whose input every
    smoothed profile of ``qparams`` quantizes, at a point or per token (``QuantConfig.per_token``:
    per-token scales follow each token, the factors still even out the channels within one), and
    none of them leaves unsmoothed (``smoothing.skip``)."""
    sc = config.smoothing
    smoothed = {prof: qp for prof, qp in qparams.items() if sc is not None and sc.alpha_for(prof) is not None}
    paths = None
    for prof, qp in smoothed.items():
        for pat in sc.skip.get(prof, ()) if weights else ():
            if not any(fnmatch.fnmatchcase(p, pat) for p in weights):
                raise ValueError(f"smoothing.skip.{prof}: {pat!r} matches no Linear of the model")
        ok = {k.rsplit(":", 1)[0] for k in qp.points if k.endswith(":input")} | set(per_token_linears(qp))
        ok = {p for p in ok if not sc.skips(prof, p)}
        paths = ok if paths is None else paths & ok
    return sorted(p for p in (paths or ()) if p in weights)


def absmax_request(qparams: Mapping[str, QParams], config: ServerConfig, weights: Mapping[str, np.ndarray]
                   ) -> dict[str, int]:
    """What a scouting round asks every client for: the per-channel abs-max (channel count) of the
    inputs any smoothing group smooths. Every client can answer for every Linear (the float
    activations are the same graph's), so each group gets its own paths, not only the shared ones."""
    paths = sorted({p for profs in smoothing_groups(qparams, config).values()
                    for p in smoothable_paths({q: qparams[q] for q in profs}, config, weights)})
    return {f"{p}:input": int(np.shape(weights[p])[1]) for p in paths}


def importance_request(qparams: Mapping[str, QParams], config: ServerConfig, weights: Mapping[str, np.ndarray]
                       ) -> dict[str, int]:
    """What a scouting round also asks every client for when a profile ranges its weights by
    importance (``weight_ranges``): the per-channel sum of squares (channel count) of the input of
    each of its Linears with a weight point and a float weight, rotated ones aside (their columns
    mix the channels: ``quant.smoothing.smoothed_weight_point``). Every client answers (the float
    graph is every profile's), as for the abs-max."""
    keys = {}
    for prof, rule in sorted(config.weight_ranges.items()):
        qp = qparams.get(prof)
        if rule != "importance" or qp is None:
            continue
        for path in sorted(k.rsplit(":", 1)[0] for k in qp.points if k.endswith(":weight")):
            if path in weights and not rotation_block(qp, path):
                keys[f"{path}:input"] = int(np.shape(weights[path])[1])
    return keys


def gptq_paths(qparams: Mapping[str, QParams], config: ServerConfig, weights: Mapping[str, np.ndarray]
               ) -> dict[str, list[str]]:
    """Per profile of ``config.gptq``, the Linears GPTQ rounds: those with a float weight and a weight
    point of the configured width."""
    out = {}
    for prof, g in sorted(config.gptq.items()):
        qp = qparams.get(prof)
        if qp is not None:
            out[prof] = sorted(k.rsplit(":", 1)[0] for k, p in qp.points.items()
                               if k.endswith(":weight") and p.spec.bits == g.bits and k.rsplit(":", 1)[0] in weights)
    return out


def hessian_parts(widths: Mapping[str, int], parts: int) -> list[dict[str, int]]:
    """``widths`` (key -> channels, in key order) cut into ``parts`` runs of neighbouring keys with about
    the same number of second-moment entries each (the upper triangles a reply carries)."""
    keys = sorted(widths)
    sizes = np.array([triangle_size(widths[k]) for k in keys], dtype=np.float64)
    ends = np.cumsum(sizes)
    cut = np.searchsorted(ends, ends[-1] * np.arange(1, parts) / parts, side="left") + 1 if keys else []
    bounds = [0, *[int(c) for c in cut], len(keys)]
    return [{k: widths[k] for k in keys[a:b]} for a, b in zip(bounds[:-1], bounds[1:])]


def hessian_request(qparams: Mapping[str, QParams], round: int, config: ServerConfig,
                    weights: Mapping[str, np.ndarray]) -> dict[str, int]:
    """The inputs (key -> channels) whose second moments hessian round ``round`` asks for: its part of
    the inputs of every Linear GPTQ rounds (``gptq_paths``), the schedule's hessian rounds taking
    one part each in turn. ValueError when a part's reply would pass the validation's size limit (the
    schedule needs more hessian rounds)."""
    widths = {f"{p}:input": int(np.shape(weights[p])[1]) for paths in gptq_paths(qparams, config, weights).values()
              for p in paths}
    rounds = [r for r, s in config.rounds() if s.job == "hessian"]
    part = hessian_parts(widths, len(rounds))[rounds.index(round)]
    nbytes = 4 * sum(triangle_size(c) for c in part.values())
    if nbytes > config.validation.limits.max_bytes:
        raise ValueError(f"hessian round {round}: its {len(part)} second moments take {nbytes / 2**20:.1f} MiB a "
                         f"reply, beyond validation.limits.max_bytes ({config.validation.limits.max_bytes / 2**20:.0f} "
                         f"MiB): give the hessian rounds a larger repeat (they split the inputs between them)")
    return part


def gptq_qparams(qp: QParams, hessians: Mapping[str, np.ndarray], paths: Sequence[str],
                 weights: Mapping[str, np.ndarray], damp: float, version: int) -> tuple[QParams, dict]:
    """``qp`` with GPTQ's weight point and codes for each Linear of ``paths`` whose input has a second
    moment in ``hessians`` (the float input's: ``quant.gptq.linear_hessian`` makes it the smoothed and
    rotated input's the graph quantizes), at ``version``; and what happened (``rounded``, and
    ``failed``: Linears whose moment damping left singular keep the nearest rounding)."""
    points, codes, failed = {}, {}, []
    for path in paths:
        h = hessians.get(f"{path}:input")
        if h is None:
            continue
        m, block = qp.smoothing.get(path), rotation_block(qp, path)
        try:
            codes[f"{path}:weight"], points[f"{path}:weight"] = gptq_codes(
                fold_weight(weights[path], m, block), linear_hessian(h, m, block), qp.points[f"{path}:weight"].spec,
                damp)
        except ValueError as e:
            failed.append(f"{path}: {e}")
    return qp.with_points(points, version, codes), {"rounded": len(points), "failed": failed[:5]}


def scout_instruction(round: int, qp: QParams, absmax: Mapping[str, int],
                      sqsum: Mapping[str, int] | None = None) -> Instruction:
    """A scouting instruction: the profile's activation points, and the inputs of ``absmax`` and
    ``sqsum`` too (a per-token input has no point; its statistics are still the float graph's)."""
    sqsum = dict(sqsum or {})
    return Instruction(round, "scout", qp, keys=tuple(sorted({*activation_keys(qp), *absmax, *sqsum})),
                       absmax=absmax, sqsum=sqsum)


def stat_key(profile: str, qp: QParams, key: str, config: ServerConfig) -> str:
    """Where a profile's point keeps its grid and statistics sums: the point's key, shared by every
    profile (design.md s. 4) -- except a smoothed input, whose histogram of ``x / m`` depends on
    the factors: ``<key>@<alpha>``, shared by the profiles smoothed with the same strength; a
    rotated input's (``quant.qparams.rotated_linears``) ends in ``@r<block>``."""
    a = config.smoothing.alpha_for(profile) if config.smoothing is not None else None
    path = key.rsplit(":", 1)[0]
    block = rotation_block(qp, path) if key.endswith(":input") else 0
    rotated = f"@r{block}" if block else ""     # a rotated input's histogram is of (x / m) R
    if a is None or not key.endswith(":input") or path not in qp.smoothing:
        return key + rotated
    return f"{key}@{a:g}{rotated}"


def instructions_for(state: RunState, round: int, spec: RoundSpec, config: ServerConfig,
                     weights: Mapping[str, np.ndarray] | None = None) -> dict[str, Instruction]:
    """One instruction per profile for this round (docs/protocol.md): the profile's global QParams and
    the points of the job (activation points; their grids in a stats round; with smoothing, the
    scouting round asks for the smoothable inputs' per-channel abs-max). Only the profiles of
    ``spec.profiles`` (default all), in a plan round only the planned ones, and in a statistics or
    learned-range round only those with a point to move (a profile quantizing every input per token
    has none: its clients sit those rounds out)."""
    absmax = absmax_request(state.qparams, config, weights or {}) if spec.job == "scout" else {}
    sqsum = importance_request(state.qparams, config, weights or {}) if spec.job == "scout" else {}
    hessian = hessian_request(state.qparams, round, config, weights or {}) if spec.job == "hessian" else {}
    out = {}
    for prof, full in sorted(state.qparams.items()):
        if spec.profiles is not None and prof not in spec.profiles:
            continue                    # sits the round out
        qp = movable_qparams(full, config)
        if spec.job == "scout":
            out[prof] = scout_instruction(round, qp, absmax, sqsum)
        elif spec.job in ("stats", "lsq") and not (activation_keys(qp) if spec.job == "stats" else
                                                   learned_keys(qp, config)):
            continue                    # nothing to calibrate (every input per token): sits the round out
        elif spec.job == "stats":
            sk = {k: stat_key(prof, full, k, config) for k in activation_keys(qp)}
            grids = {k: state.grids[sk[k]] for k in sk if sk[k] in state.grids}
            out[prof] = Instruction(round, "stats", qp, grids=grids)
        elif spec.job == "lsq":
            out[prof] = Instruction(round, "lsq", qp, keys=tuple(learned_keys(qp, config)))
        elif spec.job == "plan":
            if prof in config.plans:        # the other profiles sit the round out
                out[prof] = Instruction(round, "plan", qp, keys=tuple(plan_keys(full)))
        elif spec.job == "hessian":
            if hessian:                     # every profile's float graph is the same: any client answers
                # the job reads the float graph only: no points or codes (they were 34 MB a mixed phone
                # in SmolLM2's last hessian round), the model's fingerprint and version to say which graph
                out[prof] = Instruction(round, "hessian", QParams({}, full.model, full.version),
                                        keys=tuple(hessian), hessian=hessian)
        else:
            out[prof] = Instruction(round, "eval", qp)
    return out


# ---------------------------------------------------------------------------------------------

def apply_round(state: RunState, round: int, spec: RoundSpec,
                replies: Mapping[str, Sequence[Accepted]], rejections: Sequence[Rejection | str],
                config: ServerConfig, weights: Mapping[str, np.ndarray] | None = None
                ) -> tuple[RunState, dict]:
    """The state after ``round`` given its valid replies per profile, and the round's metrics
    (``replies``, ``rejections`` by code, ``applied``, ``versions`` per profile, and per job:
    ``widened`` points, lsq losses, eval perplexities). ``state`` is not modified. ``weights``
    (Linear path -> float weight (out, in)) are needed by a scouting round with smoothing."""
    if round <= state.round:
        raise ValueError(f"round {round} is already done (the state is after round {state.round})")
    unknown = sorted(set(replies) - set(state.qparams))
    if unknown:
        raise ValueError(f"replies for profiles the run does not have: {unknown[:3]}")
    n_valid = sum(len(v) for v in replies.values())
    metrics: dict[str, Any] = {"round": round, "job": spec.job, "replies": n_valid,
                               "rejections": summarise_rejections(rejections)}
    if spec.job == "scout" and n_valid >= spec.min_replies:     # the caller's mistakes, not a client's
        if state.sums:
            raise ValueError("a scout round after statistics would discard the running sums")
        if smoothing_groups(state.qparams, config) and weights is None:
            raise ValueError("a scouting round with smoothing needs the Linears' float weights")
    new = replace(state, round=round)
    if spec.job == "eval":
        metrics |= _eval_metrics(replies)
        metrics["applied"] = False
    elif n_valid < spec.min_replies:
        metrics["applied"] = False
    else:
        try:
            done, m = (_scout(new, replies, config, weights) if spec.job == "scout" else
                       _stats(new, replies, config) if spec.job == "stats" else
                       _plan(new, replies, spec, config, weights) if spec.job == "plan" else
                       _hessian(new, replies, config, weights) if spec.job == "hessian" else
                       _lsq(new, replies, spec, config))
            problems = commit_problems(state, done, weights, respec=spec.job == "plan")
        except Exception as e:      # valid-looking replies must not stop the run: skip the round
            log.warning("round %d (%s) raised: skipped", round, spec.job, exc_info=True)
            problems = [f"{type(e).__name__}: {e}"]
        if problems:
            reason = "; ".join(problems)
            metrics |= {"applied": False, "skipped": reason[:2000]}
            log.warning("round %d (%s) skipped: %s", round, spec.job, reason[:500])
        else:
            new = done
            metrics |= m
    metrics["versions"] = {p: int(qp.version) for p, qp in sorted(new.qparams.items())}
    return new, metrics


def commit_problems(old: RunState, new: RunState, weights: Mapping[str, np.ndarray] | None = None,
                    respec: bool = False) -> list[str]:
    """Why ``new`` must not be committed (empty when it may): a profile's QParams that a device
    holding the old ones would refuse (``quant.qparams.qparams_problems``, the device's own check,
    with the smoothed Linears' input counts when ``weights`` are given); learned ranges or optimizer
    moments that are not finite; running sums a resumed run could not load (``state.load_checkpoint``
    rebuilds them with ``ActivationStats.from_arrays``). Only what changed is checked; ``respec``
    (a plan round) lets points change their spec."""
    problems = []
    in_features = {p: int(np.shape(w)[1]) for p, w in (weights or {}).items() if np.ndim(w) == 2}
    for prof, qp in sorted(new.qparams.items()):
        held = old.qparams.get(prof)
        if qp is not held:
            problems += [f"{prof}: {e}" for e in qparams_problems(qp, held, in_features, respec)]
    for what, d in (("learned", new.learned), ("moments", new.moments)):
        for prof, arrays in sorted(d.items()):
            if arrays is getattr(old, what).get(prof):
                continue
            bad = sorted(k for k, v in arrays.items() if not np.all(np.isfinite(v)))
            if bad:
                problems.append(f"{prof}: {what} {bad[:3]} not finite")
    for k, st in sorted(new.sums.items()):
        if st is not old.sums.get(k):
            try:
                ActivationStats.from_arrays(st.to_arrays())
            except ValueError as e:
                problems.append(f"sums {k}: {e}")
    return problems


def _all(replies: Mapping[str, Sequence[Accepted]]) -> list[Accepted]:
    return [a for prof in sorted(replies) for a in replies[prof]]


def _scout(state: RunState, replies, config: ServerConfig, weights) -> tuple[RunState, dict]:
    if state.sums:
        raise ValueError("a scout round after statistics would discard the running sums")
    scouting = [a.reply for a in _all(replies)]
    if config.absmax_rule == "clipped":
        scouting = clip_scouting(scouting, config.absmax_clip)
    qparams, learned, moments, metrics = dict(state.qparams), dict(state.learned), dict(state.moments), {}
    grids = grids_from_scouting(scouting, config.bins, config.grid_margin, config.grid_quantile)
    groups = smoothing_groups(state.qparams, config)
    if groups and weights is None:
        raise ValueError("a scouting round with smoothing needs the Linears' float weights")
    own = {}    # profile -> the grids of its (smoothed) inputs
    for alpha, profs in groups.items():
        group = {p: state.qparams[p] for p in profs}
        factors = smoothing_from_scouting(scouting, smoothable_paths(group, config, weights), weights,
                                          alpha, config)
        smoothed = [smoothed_scouting(r, factors) for r in scouting]
        g = grids_from_scouting(smoothed, config.bins, config.grid_margin, config.grid_quantile)
        for prof in profs:
            qparams[prof] = smoothed_qparams(state.qparams[prof], factors, weights, smoothed)
            learned.pop(prof, None)
            moments.pop(prof, None)
            own[prof] = g
        metrics.setdefault("smoothed", {}).update({p: len(factors) for p in profs})
    for prof, qp in sorted(qparams.items()):
        # a smoothed input's grid spans the smoothed abs-max; a rotated one's the same (unrotated)
        # extent: the rotation spreads a channel's outlier over its block, so the rotated values
        # mostly fill less of it (the bound sum_j a_j / sqrt(b) over a block would be far looser),
        # and a round widens a grid they pass
        g = own.get(prof, grids)
        for k in activation_keys(qp):
            sk = stat_key(prof, qp, k, config)
            if sk != k and k in g:
                grids[sk] = g[k]
    ranked = sorted(p for p, r in config.weight_ranges.items() if r == "importance" and p in qparams)
    if ranked:
        importance = merge_importance(scouting, config.stats_rule, config.trim)
        for prof in ranked:
            qparams[prof] = importance_qparams(qparams[prof], importance, weights,
                                               max(qparams[prof].version, state.qparams[prof].version + 1))
            learned.pop(prof, None)
            moments.pop(prof, None)
        metrics["importance"] = {p: len(qparams[p].importance) for p in ranked}
    new = replace(state, qparams=qparams, learned=learned, moments=moments, grids={**state.grids, **grids})
    return new, {"applied": True, "grids": len(grids), **metrics}


def private_scouting(first: private_scout.FirstPass, estimate: Mapping[str, np.ndarray] | None,
                     config: ServerConfig) -> list[ScoutReply]:
    """A private scouting round's sums (``quant.private_scout``) as the reports ``_scout`` reads:
    ``first.clients`` pseudo-reports, per point the clients' abs-max in order (each rounded up to its
    histogram cell's edge), every one carrying the fleet's per-channel abs-max ``estimate``.

    The estimate is floored at the clients' geometric mean per channel (``2^mean(log2 a)``, which
    the max over clients is never below): SecAgg+'s clipping range lets a lying client send -1 and
    cancel an honest client's power term, and the floor bounds how far that deflates a channel (one
    client moves the mean by at most ``2 LOG2_BOUND / K`` octaves). Under ``absmax_rule =
    "clipped"`` the estimate is also capped at ``absmax_clip`` x that geometric mean, the summable
    stand-in for the lower median the plaintext rule caps at; the points' ranges are capped by
    ``clip_scouting`` on the pseudo-reports as on the clients' own (the lower median of a histogram
    is an order statistic)."""
    est = dict(estimate or {})
    if est:
        centre = private_scout.geometric_mean(first)
        est = {k: np.maximum(v, centre[k].astype(np.float32)) for k, v in est.items()}
        if config.absmax_rule == "clipped":
            est = {k: np.minimum(v, (config.absmax_clip * centre[k]).astype(np.float32)) for k, v in est.items()}
    return private_scout.pseudo_reports(first, est)


def smoothing_from_scouting(scouting: Sequence[ScoutReply], paths: Sequence[str],
                            weights: Mapping[str, np.ndarray], alpha: float, config: ServerConfig
                            ) -> dict[str, np.ndarray]:
    """SmoothQuant factors of ``paths`` at strength ``alpha`` from the clients' per-channel
    abs-max, merged by max (exact: the pooled data's abs-max); a Linear no client reported on
    keeps no factors."""
    merged = max_absmax([r.channel_absmax for r in scouting])
    sc = config.smoothing
    return smoothquant_factors({p: merged[f"{p}:input"] for p in paths if f"{p}:input" in merged},
                               weights, alpha, (sc.min_factor, sc.max_factor))


def smoothed_scouting(reply: ScoutReply, factors: Mapping[str, np.ndarray]) -> ScoutReply:
    """A client's scouting report as the smoothed model would have given it: the abs-max of
    ``x / m`` is exact from the per-channel abs-max, and the sign of ``x`` does not change."""
    ranges = dict(reply.ranges)
    for path, m in factors.items():
        k = f"{path}:input"
        if reply.n.get(k, 0) > 0 and k in reply.channel_absmax:
            a = smoothed_absmax(reply.channel_absmax[k], m)
            ranges[k] = (0.0 if ranges[k][0] >= 0 else -a, a)
    return ScoutReply(ranges, dict(reply.n), reply.channel_absmax, reply.channel_sqsum)


def smoothed_qparams(qp: QParams, factors: Mapping[str, np.ndarray], weights: Mapping[str, np.ndarray],
                     scouting: Sequence[ScoutReply]) -> QParams:
    """``qp`` with the factors folded in (version + 1): the smoothing, each smoothed weight's
    min-max point (what a device derives from its own weights) and, until statistics come, each
    smoothed input's min-max range over the (smoothed) scouting reports."""
    points = {}
    for path, m in factors.items():
        wk, xk = f"{path}:weight", f"{path}:input"
        if wk in qp.points:
            points[wk] = smoothed_weight_point(weights[path], m, qp.points[wk].spec, rotation_block(qp, path))
        seen = [r.ranges[xk] for r in scouting if r.n.get(xk, 0) > 0]
        if xk in qp.points and seen:
            spec = qp.points[xk].spec
            s, z = range_to_qparams(min(lo for lo, _ in seen), max(hi for _, hi in seen), spec)
            points[xk] = PointParams(spec, s, z)
    return QParams({**qp.points, **points}, qp.model, qp.version + 1,
                   {**qp.smoothing, **{p: np.asarray(m, np.float32) for p, m in factors.items()}}, qp.meta,
                   dict(qp.importance))


def importance_qparams(qp: QParams, importance: Mapping[str, np.ndarray], weights: Mapping[str, np.ndarray],
                       version: int) -> QParams:
    """``qp`` with the fleet's ``importance`` of its Linears (those with a weight point and a float
    weight) and each of their weight points ranged by it (``quant.smoothing.smoothed_weight_point``:
    what every device derives from its own weights). A rotated Linear's columns see the rotated
    input, whose channels the fleet did not measure (they depend on the factors this same round
    sets): it gets ones, plain MSE (the rotation evens its channels out)."""
    imp = {p: np.asarray(h, np.float32) for p, h in importance.items()
           if f"{p}:weight" in qp.points and p in weights and not rotation_block(qp, p)
           and np.shape(h) == (np.shape(weights[p])[1],)}
    imp |= {p: np.ones(np.shape(weights[p])[1], np.float32) for p in
            (k.rsplit(":", 1)[0] for k in qp.points if k.endswith(":weight")) if p in weights and rotation_block(qp, p)}
    points = {f"{p}:weight": smoothed_weight_point(weights[p], qp.smoothing.get(p), qp.points[f"{p}:weight"].spec,
                                                   rotation_block(qp, p), h) for p, h in sorted(imp.items())}
    return QParams({**qp.points, **points}, qp.model, version, dict(qp.smoothing), dict(qp.meta),
                   {**qp.importance, **imp})


def _stats(state: RunState, replies, config: ServerConfig) -> tuple[RunState, dict]:
    if config.dp is not None:
        return _dp_stats(state, replies, config)
    accepted = _all(replies)
    per_client = [{stat_key(prof, state.qparams[prof], k, config): st for k, st in a.reply.stats.items()}
                  for prof in sorted(replies) for a in replies[prof]]
    if config.stats_rule == "trimmed":        # this round's clients merged robustly, then added to the sums
        keys = dict.fromkeys(k for r in per_client for k in r)
        merged = {k: trimmed_statistics([r[k] for r in per_client if k in r], config.trim) for k in keys}
        per_client = [{k: bounded_extremes(st, config.round_factor * max(-st.lo, st.hi))
                       for k, st in merged.items()}]
    sums = sum_statistics([dict(state.sums), *per_client])
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
        sk = {k: stat_key(prof, qp, k, config) for k in activation_keys(qp)}
        specs = {k: qp.points[k].spec for k in sk if sk[k] in sums and sums[sk[k]].n > 0}
        if not specs:
            continue
        pts = ranges_for_profile({k: sums[sk[k]] for k in specs}, specs, config.calibrator_for(prof))
        if any(not _same_point(qp.points[k], p) for k, p in pts.items()):
            qparams[prof] = qp.with_points(pts, version=qp.version + 1)
            learned.pop(prof, None)             # lsq restarts from the new ranges
            moments.pop(prof, None)
            changed.append(prof)
    used = (*state.used, *(a.client_id for a in accepted))
    new = replace(state, qparams=qparams, grids=grids, sums=sums, learned=learned, moments=moments, used=used)
    return new, {"applied": True, "widened": widened, "changed": changed}


def _dp_stats(state: RunState, replies, config: ServerConfig) -> tuple[RunState, dict]:
    """A statistics round under differential privacy (``quant.dp``; docs/privacy.md): per profile,
    the clients' clipped range vectors summed, Gaussian noise of ``z 2 clip`` added (drawn from the
    run's seed, the round and the profile, so a resumed run draws the same), the round's
    starting ranges moved by the noisy mean (``quant.dp.release``). Nothing per client is kept. Under secure
    aggregation the clients added the noise (``server.strategy``'s secure round hands over the
    noisy sum as one reply and zeros for the other contributors)."""
    clip, z = config.dp_clip(state.round), config.dp.noise_multiplier()
    # under SecAgg+ the clients added the noise in shares (one reply carries the noisy sum)
    std = 0.0 if config.secure is not None else dp.noise_std(z, clip)
    qparams, learned, moments = dict(state.qparams), dict(state.learned), dict(state.moments)
    changed, report = [], {}
    for prof in sorted(replies):
        got = replies[prof]
        if not got:
            continue
        qp = state.qparams[prof]
        keys = [k for k in activation_keys(movable_qparams(qp, config))      # the instruction's keys
                if stat_key(prof, qp, k, config) in state.grids]
        centres = {k: tuple(float(v) for v in qparams_to_range(qp.points[k].scale, qp.points[k].zero_point,
                                                               qp.points[k].spec)) for k in keys}
        rng = np.random.default_rng([int(config.seed), int(state.round), zlib.crc32(prof.encode()), 0xD9])
        total = dp.noisy_sum([a.reply for a in got], std, rng)
        ranges = dp.release(total, len(got), centres)
        pts = {}
        for k, (lo, hi) in ranges.items():
            sc, zp = range_to_qparams(lo, hi, qp.points[k].spec)
            pts[k] = PointParams(qp.points[k].spec, sc, zp)
        if any(not _same_point(qp.points[k], pt) for k, pt in pts.items()):
            qparams[prof] = qp.with_points(pts, version=qp.version + 1)
            learned.pop(prof, None)
            moments.pop(prof, None)
            changed.append(prof)
        report[prof] = {"clients": len(got), "clip": clip} | (
            {"noise": "the clients' shares"} if config.secure is not None else
            {"noise_std": std, "at_clip": int(sum(np.linalg.norm(a.reply) >= clip * (1 - 1e-6) for a in got))})
    used = (*state.used, *(a.client_id for a in _all(replies)))
    new = replace(state, qparams=qparams, learned=learned, moments=moments, used=used)
    return new, {"applied": True, "changed": changed, "dp": report}


def _plan(state: RunState, replies, spec: RoundSpec, config: ServerConfig, weights) -> tuple[RunState, dict]:
    """The plan round (module docstring): per planned profile with at least ``min_replies``
    replies, the fleet's sensitivity, the plan under the profile's budget, the new QParams."""
    if weights is None:
        raise ValueError("a plan round needs the Linears' float weights (numels, int8 weight points)")
    qparams, learned, moments, report = dict(state.qparams), dict(state.learned), dict(state.moments), {}
    for prof in sorted(replies):
        got = replies[prof]
        if prof not in config.plans or len(got) < spec.min_replies:
            continue
        qp = state.qparams[prof]
        keys = plan_keys(qp)
        per_client = [a.reply.sens for a in got]
        if config.stats_rule == "sum":
            sens = {k: math.fsum(r[k] for r in per_client) for k in keys}
        else:
            sens = robust_sensitivity(per_client, config.trim)
        qparams[prof], plan = planned_qparams(qp, sens, config.plans[prof], weights)
        plan |= {"clients": len(got),
                 "rule": "sum" if config.stats_rule == "sum" else f"shares, trimmed mean {config.trim:g}"}
        learned.pop(prof, None)
        moments.pop(prof, None)
        report[prof] = plan
    new_state = replace(state, qparams=qparams, learned=learned, moments=moments)
    return new_state, {"applied": bool(report), "plan": report}


def _hessian(state: RunState, replies, config: ServerConfig, weights) -> tuple[RunState, dict]:
    """A hessian round (module docstring): the fleet's second moments of this round's inputs, and
    GPTQ's codes for the Linears they feed in every profile of ``config.gptq``."""
    if weights is None:
        raise ValueError("a hessian round needs the Linears' float weights (GPTQ rounds them)")
    hessians = merge_hessians([a.reply for a in _all(replies)], config.stats_rule, config.trim)
    qparams, report = dict(state.qparams), {}
    for prof, paths in gptq_paths(state.qparams, config, weights).items():
        qp, done = gptq_qparams(state.qparams[prof], hessians, paths, weights, config.gptq[prof].damp,
                                state.qparams[prof].version + 1)
        if done["rounded"]:     # the activation ranges and any learned state stay as they are
            qparams[prof] = qp
        report[prof] = done
    new = replace(state, qparams=qparams)
    return new, {"applied": any(d["rounded"] for d in report.values()), "hessians": len(hessians),
                 "tokens": int(sum(a.reply.tokens for a in _all(replies))), "gptq": report}


def planned_qparams(qp: QParams, sens: Mapping[str, float], budget, weights: Mapping[str, np.ndarray]
                    ) -> tuple[QParams, dict]:
    """``qp`` after the plan ``quant.mixed.plan_mixed_precision`` makes of ``sens`` (point ->
    sensitivity) under ``budget``: the lifted activations at int16 from their current range, the
    promoted weights int8 per channel from the (smoothed) float ``weights``, version + 1, the plan in
    ``meta["plan"]``; and a readable report of it. The federation's plan round and the simulation's
    centralized reference both plan here."""
    import json

    keys = plan_keys(qp)
    wkeys = [k for k in keys if k.endswith(":weight") and k.rsplit(":", 1)[0] in weights]
    akeys = [k for k in keys if k.endswith(ACTIVATION_SUFFIXES)]
    numels = {k: int(np.size(weights[k.rsplit(":", 1)[0]])) for k in wkeys}
    chosen = plan_mixed_precision({k: float(sens.get(k, 0.0)) for k in wkeys},
                                  {k: float(sens.get(k, 0.0)) for k in akeys}, numels, budget)
    w8 = sorted(k for k in wkeys if chosen[k].bits == 8 and qp.points[k].spec.bits != 8)
    a16 = sorted(k for k in akeys if chosen[k].bits == 16 and qp.points[k].spec.bits != 16)
    pts = {}
    for k in w8:
        path = k.rsplit(":", 1)[0]
        m = qp.smoothing.get(path)
        m = np.ones(np.shape(weights[path])[1], np.float32) if m is None else m
        pts[k] = smoothed_weight_point(weights[path], m, weight_spec(8), rotation_block(qp, path),
                                       qp.importance.get(path))
    s16 = activation_spec(16)
    for k in a16:
        p = qp.points[k]
        lo, hi = qparams_to_range(p.scale, p.zero_point, p.spec)
        sc, zp = range_to_qparams(float(lo), float(hi), s16)
        pts[k] = PointParams(s16, sc, zp)
    bits = sum((8 if k in w8 else qp.points[k].spec.bits) * numels[k] for k in wkeys) / max(sum(numels.values()), 1)
    new = qp.with_points(pts, version=qp.version + 1)
    new.meta = {**new.meta, "plan": json.dumps({"weights8": w8, "act16": a16}, sort_keys=True)}
    report = {"weights8": w8, "act16": a16, "avg_weight_bits": bits, "act16_share": len(a16) / max(len(akeys), 1),
              "budget": budget.model_dump(mode="json"),
              "sensitivity": dict(sorted(((k, float(sens.get(k, 0.0))) for k in keys), key=lambda kv: -kv[1]))}
    return new, report


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
            d = weighted_mean(deltas, capped_weights([a.num_examples for a in accepted]))
        elif config.lsq_rule == "median":
            d = coordinate_median(deltas)
        else:
            d = trimmed_mean(deltas, config.trim)
        if config.lsq_rule != "mean":         # the robust rules: no round moves a scale more than round_factor
            d = {k: bounded_step(v, math.log(config.round_factor) / config.server_lr) if k.startswith("log_s/") else v
                 for k, v in d.items()}
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
        try:
            p_nll = math.fsum(a.reply["nll_sum"] for a in acc)
        except OverflowError:       # finite nll sums whose total is not (validation makes each finite)
            p_nll = math.inf
        p_tok = sum(a.reply["tokens"] for a in acc)
        out[prof] = {"perplexity": _exp(p_nll / p_tok), "tokens": p_tok, "replies": len(acc)}
        nll, tok = nll + p_nll, tok + p_tok
    return {"eval": out, "eval_all": {"perplexity": _exp(nll / tok), "tokens": tok} if tok else {}}


def _exp(x: float) -> float:
    return math.exp(x) if x < 709 else math.inf
