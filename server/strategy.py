"""FedQuant: federated calibration of quantization parameters as a Flower Strategy.

Each round of the config's schedule is one job: ``scout``, ``stats`` and ``lsq`` are Flower
*train* rounds, ``eval`` an *evaluate* round (docs/protocol.md). The four hooks do what Flower's
own strategies do, per device profile:

- ``configure_train`` / ``configure_evaluate``: refresh the roster (a hello to new nodes), sample
  client ids (``server.rounds.sample_clients``, or per profile), and send each sampled node its
  profile's instruction;
- ``aggregate_train`` / ``aggregate_evaluate``: validate every reply (a missing, failed, refused or
  garbage reply is dropped with a code, never fails the round) and apply the round
  (``server.rounds.apply_round``: statistics sums, calibration per profile, learned-range steps;
  the arithmetic is in ``server.aggregate``).

``start`` is overridden only where the schedule, checkpoint and resume need it: a round is one job
(not Flower's train-then-evaluate pair), the run state is checkpointed atomically after every round
and a started-again run resumes from it, ``metrics.jsonl`` gets one line per round (written just
before the checkpoint that commits the round), one ServerApp at a time runs on a run directory
(``run_lock``), and server-side evaluation runs on eval rounds. Flower 1.42 has no resume of its own.

Statistics: federated histograms merged by a coordinate-wise trimmed mean of the clients'
distributions (Yin et al., ICML 2018; the default, so no minority steers a range) or summed
exactly (federated = centralized calibration on the pooled data), calibrated by min-max /
percentile / MSE search (PyTorch HistogramObserver, AIMET tf_enhanced) / entropy (TensorRT).
Learned ranges: LSQ (Esser et al., ICLR 2020) and LSQ+ (Bhalgat et al., CVPR-W 2020) deltas merged
by a coordinate-wise median (default) or trimmed mean, or averaged, stepped with FedAvg (McMahan et
al., 2017) or FedAdam (Reddi et al., ICLR 2021). Smoothing: SmoothQuant (Xiao et al., ICML 2023)
from the scouting abs-max, each client's capped at a multiple of the clients' median. The rules
are server/aggregate.py's; README "A hostile fleet" measures what they cost.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy

from quant.qparams import QParams, atomic_write_bytes
from quant import dp, private_scout
from quant.wire import StatsReply, dp_length, encode_instruction, payload_nbytes, secure_vector_to_stats
from server.config import RoundSpec, ServerConfig
from server.messages import instruction_message, read_reply
from server.roster import Roster, first_reply_by_node, refresh_roster, wait_for_nodes
from server.rounds import (Accepted, apply_round, instructions_for, private_scouting, sample_by_profile,
                           sample_clients)
from server.privacy import secure_noise_share
from server.secure import secure_sum, secure_tolerance
from server.state import (RunState, append_metrics, initial_state, load_checkpoint, run_digest, save_checkpoint,
                          trim_metrics)
from server.validate import Rejection, summarise_rejections

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.safetensors"
METRICS = "metrics.jsonl"
PLAN = "plan.json"

EvaluateFn = Callable[[str, QParams], Mapping[str, Any]]


class FedQuant(Strategy):
    """The schedule of ``config`` from the initial QParams of each device profile.

    ``weights`` (Linear path -> float weight (out, in)) are needed when ``config.smoothing``,
    ``weight_ranges`` or ``gptq`` is set; ``evaluate_fn(profile, qparams) -> metrics`` is server-side evaluation on eval rounds;
    ``on_round(metrics)`` is called after each round's checkpoint and metrics line."""

    def __init__(self, config: ServerConfig, initial: Mapping[str, QParams], out_dir, *,
                 weights: Mapping[str, Any] | None = None, evaluate_fn: EvaluateFn | None = None,
                 on_round: Callable[[dict], None] | None = None):
        if config.smoothing is not None and weights is None:
            raise ValueError("config.smoothing is set: the strategy needs the float weights (weights=...)")
        if config.weight_ranges and weights is None:
            raise ValueError("config.weight_ranges is set: the strategy needs the float weights (weights=...)")
        if config.gptq and weights is None:     # else every hessian round would ask no client for anything
            raise ValueError("config.gptq is set: the strategy needs the float weights (weights=...)")
        if set(config.weight_ranges) - set(initial):
            raise ValueError(f"weight_ranges: no profile named {sorted(set(config.weight_ranges) - set(initial))} "
                             f"(the run's: {sorted(initial)})")
        for i, spec in enumerate(config.schedule):
            if spec.profiles is not None and set(spec.profiles) - set(initial):
                raise ValueError(f"schedule[{i}].profiles: no profile named {sorted(set(spec.profiles) - set(initial))} "
                                 f"(the run's: {sorted(initial)})")
        self.config, self.initial, self.out = config, dict(initial), Path(out_dir)
        self.weights, self.evaluate_fn, self.on_round = weights, evaluate_fn, on_round
        self.state: RunState | None = None
        self.roster = Roster()
        self.round: dict = {}           # what configure_* sent and aggregate_* needs

    # ------------------------------------------------------------------ Flower's hooks

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """Instructions of a scout, stats or lsq round, one per sampled client."""
        return self._configure(server_round, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate the replies and apply the round. The global parameters are per profile and
        live in the run state (``self.state.qparams``), so no single ArrayRecord is returned."""
        return None, self._aggregate(server_round, replies)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """Instructions of an eval round (each profile's QParams, evaluated on the held-out split)."""
        return self._configure(server_round, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Token-weighted perplexity per profile of the valid eval replies."""
        return self._aggregate(server_round, replies)

    def summary(self) -> None:
        c = self.config
        log.info("FedQuant: profiles %s, %d rounds (%s), calibrator %s, rules: stats %s, abs-max %s, lsq %s, "
                 "server opt %s", sorted(self.initial), sum(e.repeat for e in c.schedule),
                 ", ".join(f"{e.job}x{e.repeat}" for e in c.schedule), c.calibrator.method, c.stats_rule,
                 c.absmax_rule, c.lsq_rule, c.server_opt)

    # ------------------------------------------------------------------ the schedule

    def start(self, grid: Grid, timeout: float | None = None) -> Result:  # type: ignore[override]
        """Run (or resume) the schedule on ``grid``; the final QParams per profile are
        ``self.state.qparams`` (and ``self.final()``). ``timeout`` defaults to
        ``config.reply_timeout_s``."""
        timeout = self.config.reply_timeout_s if timeout is None else timeout
        self.out.mkdir(parents=True, exist_ok=True)
        with run_lock(self.out):
            return self._run(grid, timeout)

    def _run(self, grid: Grid, timeout: float) -> Result:
        self.state = self._resume_or_start()
        trim_metrics(self.out / METRICS, self.state.round)
        result = Result()
        schedule = [(r, spec) for r, spec in self.config.rounds() if r > self.state.round]
        if not schedule:
            return result
        self.summary()
        wait_for_nodes(grid, self.config.min_available, self.config.wait_s)
        for rnd, spec in schedule:
            t0 = time.perf_counter()
            evaluate = spec.job == "eval"
            configure = self.configure_evaluate if evaluate else self.configure_train
            messages = list(configure(rnd, ArrayRecord(), ConfigRecord(), grid))
            if spec.job == "stats" and self.config.secure is not None:
                result.train_metrics_clientapp[rnd] = self._secure_stats(rnd, grid, messages, timeout)
            elif spec.job == "scout" and self.config.secure is not None and self.config.secure.scout:
                result.train_metrics_clientapp[rnd] = self._secure_scout(rnd, grid, messages, timeout)
            else:
                replies = grid.send_and_receive(messages, timeout=timeout) if messages else []
                if evaluate:
                    result.evaluate_metrics_clientapp[rnd] = self.aggregate_evaluate(rnd, replies)
                else:
                    result.train_metrics_clientapp[rnd] = self.aggregate_train(rnd, replies)[1]
            metrics = self.round["metrics"]
            if evaluate and self.evaluate_fn is not None:
                metrics["server_eval"] = {p: dict(self.evaluate_fn(p, qp))
                                          for p, qp in sorted(self.state.qparams.items())}
                result.evaluate_metrics_serverapp[rnd] = MetricRecord(
                    {f"{p}.perplexity": float(e["perplexity"]) for p, e in metrics["server_eval"].items()})
            metrics["wall_s"] = time.perf_counter() - t0
            metrics = {k: metrics[k] for k in _metric_order(metrics)}
            # the line first, then the checkpoint (the commit): a run killed between the two
            # resumes from the previous checkpoint and trims the line, where the other order
            # would resume after the round and lose its line for good
            append_metrics(self.out / METRICS, metrics)
            if metrics.get("plan"):     # the fleet's mixed-precision plan, readable (also in the QParams' meta)
                atomic_write_bytes(self.out / PLAN, json.dumps({"round": rnd, **metrics["plan"]}, indent=1).encode())
            save_checkpoint(self.state, self.out / CHECKPOINT)
            log.info("round %d (%s): %d sampled, %d valid, rejections %s, versions %s", rnd, spec.job,
                     metrics["sampled"], metrics["replies"], metrics["rejections"], metrics["versions"])
            if self.on_round is not None:
                self.on_round(metrics)
        return result

    def final(self) -> dict[str, QParams]:
        """The global QParams per profile after the rounds done so far."""
        return dict((self.state or self._resume_or_start()).qparams)

    def _resume_or_start(self) -> RunState:
        ckpt = self.out / CHECKPOINT
        digest = run_digest(self.config.digest(), self.initial)
        if not ckpt.exists():
            return initial_state(self.initial, digest)
        state = load_checkpoint(ckpt, expect_digest=digest)
        if set(state.qparams) != set(self.initial):
            raise ValueError(f"{ckpt}: profiles {sorted(state.qparams)} differ from {sorted(self.initial)}")
        log.info("resuming after round %d from %s", state.round, ckpt)
        return state

    # ------------------------------------------------------------------ one round

    def _configure(self, rnd: int, grid: Grid) -> list[Message]:
        spec: RoundSpec = dict(self.config.rounds())[rnd]
        if self.state is None:              # hooks driven without start (as Flower's own start would)
            self.state = self._resume_or_start()
        state, roster, config = self.state, self.roster, self.config
        joined = refresh_roster(grid, roster, state.qparams, config.reply_timeout_s)
        online = roster.online(grid.get_node_ids())
        # a client is asked only for what it can do: evaluation needs held-out text, the rest training text
        need = "test_examples" if spec.job == "eval" else "train_examples"
        online = [c for c in online if getattr(roster.members[c], need) > 0]
        if spec.profiles is not None:       # and of the round's profiles: its fraction is of their clients
            online = [c for c in online if roster.members[c].profile in spec.profiles]
        used = state.used if spec.job == "stats" else ()
        sampled = sample_by_profile({c: roster.members[c].profile for c in online}, used, spec.fraction,
                                    spec.min_clients, config.seed, rnd) if spec.by_profile else \
            sample_clients(online, used, spec.fraction, spec.min_clients, config.seed, rnd)
        inss = instructions_for(state, rnd, spec, config, self.weights)
        sampled = [c for c in sampled if roster.members[c].profile in inss]     # the round's profiles only
        profile = {c: roster.members[c].profile for c in sampled}
        encoded = {p: encode_instruction(inss[p]) for p in sorted(set(profile.values()))}
        shares = {}                 # a secure DP round: each client's noise share, per profile
        if spec.job == "stats" and config.dp is not None and config.secure is not None:
            shares = {p: secure_noise_share(config, rnd, sum(1 for c in sampled if profile[c] == p))
                      for p in encoded}
        messages = [instruction_message(roster.members[c].node_id, profile[c], inss[profile[c]],
                                        *encoded[profile[c]], config,
                                        dp_noise_share=shares[profile[c]][0] if shares else None)
                    for c in sampled]
        self.round = {"spec": spec, "sampled": sampled, "profile": profile, "instructions": inss, "encoded": encoded,
                      "down": {p: payload_nbytes(*e) for p, e in encoded.items()}, "roster": len(online),
                      "joined": joined, "dp_shares": shares}
        return messages

    def _aggregate(self, rnd: int, replies: Iterable[Message]) -> MetricRecord:
        r = self.round
        sampled, profile, inss = r["sampled"], r["profile"], r["instructions"]
        profiles = sorted(set(profile.values()))
        by_node = first_reply_by_node(replies, [self.roster.members[c].node_id for c in sampled])
        accepted: dict[str, list[Accepted]] = {p: [] for p in profiles}
        rejections, up, rejected_by_profile, rejected_clients = [], {p: [] for p in profiles}, {}, {}
        for c in sampled:
            m = self.roster.members[c]
            reply, n, nbytes = read_reply(by_node.get(m.node_id), inss[m.profile], self.config)
            if nbytes:
                up[m.profile].append(nbytes)
            if isinstance(reply, Rejection):
                rejections.append(reply)
                rejected_by_profile.setdefault(m.profile, []).append(reply)
                rejected_clients[c] = reply.code
                log.info("round %d: reply of %s rejected: %s %s", rnd, c, reply.code, reply.detail[:200])
            else:
                accepted[m.profile].append(Accepted(c, n, reply))

        return self._apply(rnd, accepted, rejections, rejected_by_profile, rejected_clients, up)

    def _secure_stats(self, rnd: int, grid: Grid, messages: list[Message], timeout: float) -> MetricRecord:
        """A statistics round through SecAgg+ (server/secure.py), one protocol per profile: the server
        gets each profile's sum, never a client's statistics. The sum stands for the clients that sent
        a masked vector (the first carries it, the others empty statistics, so each is counted as used);
        the others are rejected as ``secure_dropout``, a whole profile as ``secure_failed``."""
        r = self.round
        sampled, profile, inss = r["sampled"], r["profile"], r["instructions"]
        secure = self.config.secure
        node_of = {c: self.roster.members[c].node_id for c in sampled}
        message_of = {int(m.metadata.dst_node_id): m for m in messages}
        accepted: dict[str, list[Accepted]] = {p: [] for p in sorted(set(profile.values()))}
        rejections, rejected_by_profile, rejected_clients = [], {}, {}
        up: dict[str, list[int]] = {p: [] for p in accepted}
        down: dict[str, list[int]] = {p: [] for p in accepted}
        report = {}
        for p in accepted:
            clients = [c for c in sampled if profile[c] == p]
            res = secure_sum(grid, [message_of[node_of[c]] for c in clients], rnd, secure, timeout)
            stats, reason = None, res.reason
            if res.total is not None and self.config.dp is not None:
                stats, reason = self._secure_dp_sum(rnd, p, res, inss[p])
            elif res.total is not None:
                try:
                    stats = secure_vector_to_stats(res.total, inss[p], secure.cap, len(res.contributors),
                                                   tolerance=secure_tolerance(secure, len(res.contributors)))
                except ValueError as e:
                    reason = f"the secure sum does not decode: {e}"
            sent = {node_of[c]: c for c in clients}
            contributors = [sent[n] for n in res.contributors if n in sent] if stats is not None else []
            for i, c in enumerate(contributors):
                if self.config.dp is not None:   # the noisy sum stands for all, the others add nothing to it
                    accepted[p].append(Accepted(c, 1, stats if i == 0 else np.zeros_like(stats)))
                else:
                    accepted[p].append(Accepted(c, 1, StatsReply(stats if i == 0 else {})))
            up[p] = [res.bytes_up.get(node_of[c], 0) for c in clients]
            down[p] = [res.bytes_down.get(node_of[c], 0) for c in clients]
            for c in clients:
                if c not in contributors:
                    rej = Rejection("secure_failed", reason) if stats is None else \
                        Rejection("secure_dropout", "sent no masked vector")
                    rejections.append(rej)
                    rejected_by_profile.setdefault(p, []).append(rej)
                    rejected_clients[c] = rej.code
            report[p] = {"clients": len(clients), "summed": len(contributors), "step_s": res.step_s,
                         "protocol_s": res.protocol_s} | ({"reason": reason[:300]} if stats is None else {})
            if stats is None:
                log.warning("round %d: secure aggregation of profile %s failed: %s", rnd, p, reason[:300])
        record = self._apply(rnd, accepted, rejections, rejected_by_profile, rejected_clients, up)
        # every step of the protocol, both ways: keys, shares, the instruction, the masked vector
        r["metrics"]["secure"] = report | {"bytes": {p: {"down_per_client": float(np.mean(down[p])) if down[p] else 0.0,
                                                         "up_per_client": float(np.mean(up[p])) if up[p] else 0.0}
                                                     for p in sorted(down)}}
        return record

    def _secure_scout(self, rnd: int, grid: Grid, messages: list[Message], timeout: float) -> MetricRecord:
        """A private scouting round (``quant.private_scout``, docs/privacy.md): two SecAgg+ passes,
        each one protocol per profile, both inside this one round (the checkpoint after it commits
        both or neither: a resumed run redoes the pair). Pass 1 sums the points' log2 abs-max
        histograms and the channels' log abs-max moments, which give the grids and each channel's
        bound ``B``; pass 2, sent to pass 1's contributors with the bounds (only when the round
        asks for per-channel abs-max: smoothing), sums the power terms whose power mean estimates
        the max over clients. The sums become pseudo-reports (``server.rounds.private_scouting``)
        and ``_scout`` runs on them as on the clients' own. Clients that sent no pass-1 vector are
        rejected as ``secure_dropout`` (a whole profile ``secure_failed``); pass 2's are counted
        in ``metrics["secure"]`` (the grids hold their pass 1)."""
        r = self.round
        sampled, profile, inss, encoded = r["sampled"], r["profile"], r["instructions"], r["encoded"]
        secure = self.config.secure
        node_of = {c: self.roster.members[c].node_id for c in sampled}
        message_of = {int(m.metadata.dst_node_id): m for m in messages}
        profiles = sorted(set(profile.values()))
        tol = lambda k: secure_tolerance(secure, k)      # noqa: E731
        up = {p: {c: 0 for c in sampled if profile[c] == p} for p in profiles}
        down = {p: {c: 0 for c in sampled if profile[c] == p} for p in profiles}

        def run(p, clients, msgs):
            res = secure_sum(grid, msgs, rnd, secure, timeout)
            for c in clients:
                up[p][c] += res.bytes_up.get(node_of[c], 0)
                down[p][c] += res.bytes_down.get(node_of[c], 0)
            sent = {node_of[c]: c for c in clients}
            return res, [sent[n] for n in res.contributors if n in sent]

        firsts, summed, report, reasons = {}, {}, {}, {}
        for p in profiles:
            clients = [c for c in sampled if profile[c] == p]
            res, got = run(p, clients, [message_of[node_of[c]] for c in clients])
            reason = res.reason
            if res.total is not None:
                try:
                    firsts[p] = private_scout.decode_first_pass(res.total, inss[p], len(got), tol(len(got)))
                    summed[p] = got
                except ValueError as e:
                    reason = f"the secure sum does not decode: {e}"
            if p not in firsts:
                reasons[p] = reason
                log.warning("round %d: private scouting pass 1 of profile %s failed: %s", rnd, p, reason[:300])
            report[p] = {"clients": len(clients), "summed": len(summed.get(p, [])), "step_s": res.step_s,
                         "protocol_s": res.protocol_s} | ({"reason": reason[:300]} if p not in firsts else {})
        estimate, second = None, {}
        first = private_scout.merge_first_passes([firsts[p] for p in sorted(firsts)]) if firsts else None
        if first is not None and any(inss[p].absmax for p in firsts):
            bound = private_scout.bounds(first, tol(first.clients))
            sums, k2 = {}, 0
            for p in sorted(firsts):
                ins, clients = inss[p], summed[p]
                flat_b = np.concatenate([bound[k] for k in ins.absmax])
                msgs = [instruction_message(node_of[c], p, ins, *encoded[p], self.config, scout_bounds=flat_b)
                        for c in clients]
                res, got = run(p, clients, msgs)
                reason, ok = res.reason, False
                if res.total is not None:
                    try:
                        part = private_scout.decode_second_pass(res.total, ins, len(got), tol(len(got)))
                        sums = {k: sums[k] + v if k in sums else v for k, v in part.items()}
                        k2, ok = k2 + len(got), True
                    except ValueError as e:
                        reason = f"the secure sum does not decode: {e}"
                if not ok:
                    log.warning("round %d: private scouting pass 2 of profile %s failed: %s", rnd, p, reason[:300])
                second[p] = {"clients": len(clients), "summed": len(got) if ok else 0, "step_s": res.step_s,
                             "protocol_s": res.protocol_s} | ({} if ok else {"reason": reason[:300]})
            if sums:
                estimate = private_scout.absmax_estimate(sums, bound, tol(k2))
            else:                   # the smoothing factors need pass 2: the round cannot be applied
                reasons = {p: "pass 2 (the per-channel abs-max) failed in every profile" for p in profiles}
                first, firsts = None, {}
        reports = private_scouting(first, estimate, self.config) if first is not None else []
        contributors = [c for p in sorted(firsts) for c in summed[p]]
        accepted: dict[str, list[Accepted]] = {p: [] for p in profiles}
        for c, rep in zip(contributors, reports):    # the i-th pseudo-report stands for the i-th contributor
            accepted[profile[c]].append(Accepted(c, 1, rep))
        rejections, rejected_by_profile, rejected_clients, counted = [], {}, {}, set(contributors)
        for c in sampled:
            if c in counted:
                continue
            p = profile[c]
            rej = Rejection("secure_failed", reasons[p]) if p in reasons else \
                Rejection("secure_dropout", "sent no masked vector")
            rejections.append(rej)
            rejected_by_profile.setdefault(p, []).append(rej)
            rejected_clients[c] = rej.code
        record = self._apply(rnd, accepted, rejections, rejected_by_profile, rejected_clients,
                             {p: [v for v in up[p].values() if v] for p in profiles})
        r["metrics"]["secure"] = report | {
            "second_pass": second,
            "bytes": {p: {"down_per_client": float(np.mean(list(down[p].values()))) if down[p] else 0.0,
                          "up_per_client": float(np.mean(list(up[p].values()))) if up[p] else 0.0}
                      for p in profiles}}
        return record

    def _secure_dp_sum(self, rnd: int, profile: str, res, ins) -> tuple[np.ndarray | None, str]:
        """A secure DP round's sum back in the vectors' units (``quant.dp.secure_bound`` times the
        fixed-point sum): the clipped vectors plus every contributor's noise share. Refused when
        fewer than the ``t`` the shares were sized for sent one (their noise would fall short)."""
        share, t = self.round["dp_shares"][profile]
        if len(res.contributors) < t:
            return None, (f"{len(res.contributors)} noised vectors, the shares were sized for at least {t}: "
                          f"the sum's noise would fall short of the epsilon")
        total = np.asarray(res.total, dtype=np.float64) * dp.secure_bound(self.config.dp_clip(rnd), share)
        if total.shape != (dp_length(ins),) or not np.all(np.isfinite(total)):
            return None, f"the secure sum has {total.size} numbers, the DP vector {dp_length(ins)}"
        return total, ""

    def _apply(self, rnd: int, accepted, rejections, rejected_by_profile, rejected_clients, up) -> MetricRecord:
        r = self.round
        spec, sampled, profile = r["spec"], r["sampled"], r["profile"]
        self.state, metrics = apply_round(self.state, rnd, spec, accepted, rejections, self.config, self.weights)
        metrics |= round_traffic(sampled, profile, r["down"], up)
        metrics |= {"sampled": len(sampled), "roster": r["roster"],
                    **{f"roster_{k}": v for k, v in r["joined"].items()},
                    "rejections_by_profile": {p: summarise_rejections(x)
                                              for p, x in sorted(rejected_by_profile.items())}}
        if rejected_clients:            # who failed, with the code: only when someone did (as "alert")
            metrics["rejected_clients"] = dict(sorted(rejected_clients.items()))
        alert = most_failed(len(sampled), rejections)
        if alert:                       # workers killed for memory, a SuperLink losing nodes, an attack
            metrics["alert"] = alert
            log.warning("round %d (%s): %s", rnd, spec.job, alert)
        r["metrics"] = metrics
        return MetricRecord({"replies": int(metrics["replies"]), "rejected": len(rejections),
                             "applied": int(bool(metrics.get("applied")))})


def most_failed(sampled: int, rejections: list[Rejection]) -> str | None:
    """A loud line when more than half of a round's sampled clients gave no usable reply (with the
    causes, most frequent first), else None: such a round looks like any other in the perplexities,
    but its result rests on few devices, or the fleet (or its host) is failing."""
    if not sampled or 2 * len(rejections) <= sampled:
        return None
    causes = summarise_rejections(rejections)
    top = sorted(causes.items(), key=lambda kv: (-kv[1], kv[0]))
    return f"{len(rejections)} of {sampled} replies failed: " + ", ".join(f"{c} {n}" for c, n in top[:4])


def round_traffic(sampled: list[str], profile: Mapping[str, str], down: Mapping[str, int],
                  up: Mapping[str, list[int]]) -> dict:
    """Bytes per client and in total, down (instructions) and up (valid-shaped replies), per
    profile and overall: the wire budget of design.md section 6."""
    profiles = sorted(down)
    n_down = {p: [down[p] for c in sampled if profile[c] == p] for p in profiles}
    all_down, all_up = sum(n_down.values(), []), sum(up.values(), [])
    return {"bytes_down_per_client": sum(all_down) / len(all_down) if all_down else 0,
            "bytes_up_per_client": sum(all_up) / len(all_up) if all_up else 0,
            "bytes_down_total": sum(all_down), "bytes_up_total": sum(all_up),
            "bytes": {p: {"down_per_client": sum(n_down[p]) / len(n_down[p]) if n_down[p] else 0,
                          "up_per_client": sum(up[p]) / len(up[p]) if up[p] else 0} for p in profiles}}


def _metric_order(metrics: dict) -> list[str]:
    """The key order of a metrics line as it has always been written (apply_round's keys, then
    server_eval, then the round's roster and traffic, then wall_s)."""
    head = [k for k in metrics if k not in _TAIL]
    return head + [k for k in _TAIL if k in metrics]


_TAIL = ("sampled", "roster", "roster_online", "roster_joined", "roster_hello_failed",
         "bytes_down_per_client", "bytes_up_per_client", "bytes_down_total", "bytes_up_total",
         "rejections_by_profile", "rejected_clients", "bytes", "wall_s")


LOCK = "run.lock"


@contextlib.contextmanager
def run_lock(out: Path):
    """Hold an exclusive lock on the run directory ``out`` while a ServerApp runs its rounds: a run
    submitted again while the first one still runs (an operator resuming a run that only looked
    dead) fails at once, instead of two ServerApps interleaving their checkpoints and metrics lines.
    The lock is ``flock`` on ``out/run.lock``: the kernel drops it when its process dies, even by
    SIGKILL, so a killed run never blocks its resumption. The file names the holder's PID."""
    f = open(out / LOCK, "a+", encoding="utf-8")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise RuntimeError(f"{out} is in use by another run of the ServerApp ({holder}): wait for it to "
                           f"end, or stop it (`flwr stop`, or kill that process) before resuming") from None
    try:
        f.truncate(0)
        f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        f.flush()
        yield
    finally:
        fcntl.flock(f, fcntl.LOCK_UN)
        f.close()
