"""Server-side evaluation and the reference rows of a run's table (design.md section 8).

The server evaluates each profile's QParams on held-out roles with the ONNX Runtime integer model
(``ServerEval``); the references beside the federated result are the float model, the starting
random-token calibration, and ``centralized_qparams``: what a data-collecting server would get with
the same recipe on the pooled training data.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from quant.qparams import QParams, atomic_write_bytes
from simulation.prepare import Prepared, say, server_weights


# One batch's logits at most (256 MB of float32): with a 262k vocabulary a batch of 8 x 128 rows
# would be 1 GB, and the float reference runs beside it (issue 19, goal 6).
LOGITS_ELEMENTS = 1 << 26
BOOTSTRAP_RESAMPLES = 1000


TOP_K = 256          # float tokens per position of the cached reference that was measured, not chosen


def bounded_batches(logits, ids: np.ndarray, batch_size: int):
    """(start row, ids batch, its logits) over ``ids``, at most ``batch_size`` rows and at most
    ``LOGITS_ELEMENTS`` logits a batch (the first batch is one row: it tells the vocabulary)."""
    ids = np.asarray(ids, dtype=np.int64)
    if ids.ndim != 2 or len(ids) == 0:
        raise ValueError(f"evaluation ids must be a non-empty [N, T] array, got shape {ids.shape}")
    i, rows = 0, 1
    while i < len(ids):
        batch = ids[i:i + rows]
        out = logits(batch)
        yield i, batch, out
        i += len(batch)
        rows = max(1, min(batch_size, LOGITS_ELEMENTS // (ids.shape[1] * out.shape[-1])))


def float_reference(float_logits, ids: np.ndarray, batch_size: int, k: int = TOP_K) -> dict:
    """What the float model says of one evaluation set, computed once and kept compactly: per
    sequence its NLL, per position its ``k`` most likely tokens and their log-probabilities
    (``quant.metrics.float_top_k``): 64 sequences of 128 tokens take 17 MB whatever the vocabulary,
    where the logits would take 1.6 GB (49k) to 8.6 GB (262k). Measured against the exact KL by
    ``bench.evaluate_run`` and not chosen for ``ServerEval``: on SmolLM2 its top-256 KL came out
    12% below the exact one (README, "Fidelity")."""
    from quant.metrics import float_top_k, sequence_nll

    n, t = np.asarray(ids).shape
    ref = {"nll": np.zeros(n), "top_ids": np.zeros((n, t - 1, 0), np.int32), "top_logp": None}
    tops, logps = [], []
    for i, batch, f in bounded_batches(float_logits, ids, batch_size):
        ref["nll"][i:i + len(batch)] = sequence_nll(f, batch)
        a, b = float_top_k(f, k)
        tops.append(a)
        logps.append(b)
    ref["top_ids"], ref["top_logp"] = np.concatenate(tops), np.concatenate(logps)
    return ref


def fidelity_columns(quant_logits, ids: np.ndarray, batch_size: int, float_logits=None,
                     reference: dict | None = None) -> np.ndarray:
    """float64 [N, 5] per sequence: quantized NLL, float NLL, KL(float || quantized), top-1
    agreements, predicted tokens. Against the float model either exactly, running
    ``float_logits`` in lockstep a batch at a time (``quant.metrics.next_token_fidelity``), or
    against a cached ``float_reference`` (``quant.metrics.top_k_fidelity``: the quantized model
    alone runs; the KL is the top-k coarsened one, a lower bound that README measures against the
    exact). Only one batch of logits per model is ever held. ``quant_logits`` and ``float_logits``
    map ids [b, T] to logits [b, T, V]. ``ServerEval`` uses the exact way."""
    from quant.metrics import next_token_fidelity, sequence_nll, top_k_fidelity

    if (float_logits is None) == (reference is None):
        raise ValueError("fidelity_columns: give either float_logits (exact) or a float reference")
    out = np.zeros((len(ids), 5))
    for i, batch, q in bounded_batches(quant_logits, ids, batch_size):
        rows = slice(i, i + len(batch))
        if reference is not None:
            fl = reference["nll"][rows]
            kl, agree = top_k_fidelity(q, reference["top_ids"][rows], reference["top_logp"][rows])
        else:
            f = float_logits(batch)
            fl = sequence_nll(f, batch)
            kl, agree = next_token_fidelity(f, q)
            del f
        out[rows] = np.stack([sequence_nll(q, batch), fl, kl, agree, np.full(len(batch), batch.shape[1] - 1)], axis=1)
    return out


def fidelity_summary(cols: np.ndarray, seed: int = 0, resamples: int = BOOTSTRAP_RESAMPLES) -> dict:
    """The figures of one evaluation set from ``fidelity_columns``: perplexity (the old fields:
    perplexity, nll_sum, tokens), the float model's, the change vs float in percent, KL(float ||
    quantized) in nats per token, top-1 agreement (a fraction), and a seeded bootstrap 95%
    interval over sequences for the last three (``quant.metrics.bootstrap_interval``)."""
    from quant.metrics import bootstrap_interval

    nll, fl, kl, agree, tokens = cols.sum(axis=0)

    def change(s):
        return 100.0 * np.expm1((s[:, 0] - s[:, 1]) / s[:, 4])

    def ci(stat):
        return list(bootstrap_interval(cols, stat, resamples=resamples, seed=seed))
    return {"perplexity": float(np.exp(nll / tokens)), "nll_sum": float(nll), "tokens": int(tokens),
            "sequences": int(len(cols)), "float_perplexity": float(np.exp(fl / tokens)),
            "vs_float_pct": float(100.0 * np.expm1((nll - fl) / tokens)),
            "vs_float_pct_ci": ci(change),
            "kl": float(kl / tokens), "kl_ci": ci(lambda s: s[:, 2] / s[:, 4]),
            "top1": float(agree / tokens), "top1_ci": ci(lambda s: s[:, 3] / s[:, 4])}


class ServerEval:
    """Server-side evaluation with each profile's ONNX Runtime integer model (a
    ``client.runtime.DeviceRuntime`` of the device directory, patched to the QParams), beside
    the float graph the device directory names: perplexity, fidelity to float and intervals
    (``fidelity_summary``) on the held-out roles, and on the out-of-domain text under ``"ood"``
    when ``ood`` ids are given. The float graph runs in lockstep with the quantized model, a batch
    at a time (exact KL; a cached top-k reference was 12% low on SmolLM2, README "Fidelity"); its
    session lives for one call, so the server does not hold a second model between evaluations.
    Memory (issue 19): one profile's runtime at a time (another profile's evaluation loads its own
    from the device directory), and no integer session between calls."""

    def __init__(self, device_dir: Path, evals: np.ndarray, threads: int, batch_size: int = 8,
                 ood: np.ndarray | None = None, seed: int = 0):
        self.device_dir, self.evals, self.threads, self.batch_size = device_dir, evals, threads, batch_size
        self.ood, self.seed = ood, seed
        self.runtimes: dict = {}
        self._float, self.float_onnx = None, None

    def runtime(self, profile: str):
        from client.runtime import DeviceRuntime, release_memory

        if profile not in self.runtimes:
            if self.runtimes:
                self.runtimes.clear()
                release_memory()
            self.runtimes[profile] = DeviceRuntime(self.device_dir / profile / "model.onnx", threads=self.threads)
            self.float_onnx = self.float_onnx or self.runtimes[profile].float_onnx
        return self.runtimes[profile]

    def float_logits(self, ids: np.ndarray) -> np.ndarray:
        from client.runtime import ort_session

        if self._float is None:
            path = self.float_onnx or next((rt.float_onnx for rt in self.runtimes.values()), None)
            if path is None:
                raise RuntimeError("ServerEval.float_logits before any profile's runtime named the float graph")
            self._float = ort_session(path, threads=self.threads)
        return self._float.run(["logits"], {"input_ids": np.asarray(ids, dtype=np.int64)})[0]

    def sets(self) -> dict[str, np.ndarray]:
        return {"heldout": self.evals, **({"ood": self.ood} if self.ood is not None and len(self.ood) else {})}

    def __call__(self, profile: str, qparams: QParams) -> dict:
        from client.runtime import release_memory

        rt = self.runtime(profile)
        if int(qparams.version) < int(rt.qparams.version):   # a reference evaluated after the run
            qparams = QParams(qparams.points, qparams.model, rt.qparams.version, qparams.smoothing, qparams.meta,
                              qparams.importance, qparams.codes)
        rt.patch(qparams)
        out: dict = {}
        try:
            for name, ids in self.sets().items():
                cols = fidelity_columns(rt.logits, ids, self.batch_size, float_logits=self.float_logits)
                res = fidelity_summary(cols, self.seed)
                if name == "heldout":
                    out.update(res)
                else:
                    out[name] = res
        finally:
            self._float = None                     # the float session lives for one evaluation
            rt.release(session=True)               # and the integer one too
            release_memory()
        return out


def float_perplexity(float_onnx: Path, evals: np.ndarray, threads: int, batch_size: int = 8) -> float:
    from client.runtime import ort_session
    from quant.metrics import nll_sum_and_count

    sess = ort_session(float_onnx, threads=threads)
    total, count = 0.0, 0
    for i in range(0, len(evals), batch_size):
        ids = evals[i:i + batch_size]
        s, c = nll_sum_and_count(sess.run(["logits"], {"input_ids": ids})[0], ids)
        total, count = total + s, count + c
    return float(np.exp(total / count))


def client_statistics(prep: Prepared, scouting_view=None, clients=None, own_group_only: bool = False,
                      profiles=None):
    """The centralized recipe's statistics, client by client: per smoothing group, yields
    ``(profiles, initial, per_client)`` where ``initial`` is each profile's starting QParams (its
    smoothing factors applied, from every client's scouting report of ``prep.clients``) and
    ``per_client`` is one dict of ActivationStats per client of ``clients`` (default
    ``prep.clients``; objects with ``.train`` ids and ``.profile``). A smoothed input's statistics
    come only from the clients holding its factors (the federation cannot have others'); every
    other point's from every client, as in the federation. Each client runs its own job function
    (``client.jobs``). ``scouting_view`` (list of ScoutReply -> list of ScoutReply), when given,
    replaces the scouting reports before they are used: what a server that cannot see them one by
    one would have instead (bench/private_absmax.py). ``own_group_only``: a group's statistics
    only from the clients of its profiles (the others get an empty dict; half the work for two
    groups). ``profiles``: only the groups holding one of these."""
    from client.jobs import scout, statistics
    from client.runtime import DeviceRuntime
    from quant.wire import Instruction
    from server.aggregate import grids_from_scouting
    from server.aggregate import merge_importance
    from quant.qparams import rotated_linears
    from quant.rotation import rotation_of
    from server.rounds import (absmax_request, importance_qparams, importance_request, scout_instruction,
                               smoothable_paths, smoothed_qparams, smoothed_scouting, smoothing_from_scouting,
                               smoothing_groups, stat_key)

    scfg, bs = prep.cfg.server, prep.cfg.server.batch_size
    clients = prep.clients if clients is None else clients
    weights = server_weights(prep) if scfg.smoothing is not None or scfg.weight_ranges else {}
    groups = smoothing_groups(prep.initial, scfg)
    plain = [p for p in sorted(prep.initial) if not any(p in g for g in groups.values())]
    first = next(iter(sorted(prep.initial)))
    rt = DeviceRuntime(prep.device_dir / first / "model.onnx", threads=prep.cfg.threads)
    held = prep.initial[first]
    ins = scout_instruction(0, held, absmax_request(prep.initial, scfg, weights),
                            importance_request(prep.initial, scfg, weights))
    scouting = [scout(rt, ins, c.train, batch_size=bs)[0] for c in prep.clients]
    if scouting_view is not None:
        scouting = scouting_view(scouting)
    importance = merge_importance(scouting) if ins.sqsum else {}     # pooled: the exact rule

    def ranked(prof: str, qp: QParams) -> QParams:
        """``qp`` with its weights ranged by the pooled importance when its profile asks for it."""
        if scfg.weight_ranges.get(prof) != "importance":
            return qp
        return importance_qparams(qp, importance, weights, qp.version)

    def group(profiles, initial, replies):
        rt = DeviceRuntime(prep.device_dir / profiles[0] / "model.onnx", threads=prep.cfg.threads)
        rt.patch(initial[profiles[0]])
        grids = grids_from_scouting(replies, scfg.bins, scfg.grid_margin, scfg.grid_quantile)
        qp0 = initial[profiles[0]]
        points_of = {p: set(prep.initial[p].points) for p in prep.initial}    # a client reports its own points
        keys = tuple(k for k in sorted(grids) if k in rt.capture.tensors and any(k in points_of[p] for p in profiles))
        sins = Instruction(round=0, job="stats", qparams=qp0, keys=keys, grids={k: grids[k] for k in keys})
        # a client's statistics of a point count where the federation adds them: under the same
        # stat key (a smoothed input's with its group's factors, a rotated one's rotated alike)
        mine = {k: stat_key(profiles[0], prep.initial[profiles[0]], k, scfg) for k in keys}
        same = {p: {k for k in keys if k in points_of[p] and stat_key(p, prep.initial[p], k, scfg) == mine[k]}
                for p in prep.initial}
        # no keys (the group's profiles quantize every input per token): nothing to run the float graph for
        per_client = [{} if not keys or not same[c.profile] or (own_group_only and c.profile not in profiles) else
                      {k: v for k, v in statistics(rt, sins, c.train, batch_size=bs)[0].stats.items()
                       if k in same[c.profile]} for c in clients]
        return profiles, initial, per_client

    def by_rotation(members):
        """``members`` split by the inputs they rotate: each part's statistics are its own."""
        parts = {}
        for p in members:
            parts.setdefault((tuple(rotated_linears(prep.initial[p])), rotation_of(prep.initial[p].meta)), []).append(p)
        return list(parts.values())

    wanted = set(prep.initial if profiles is None else profiles)
    for part in by_rotation(plain):
        if wanted & set(part):
            yield group(part, {p: ranked(p, qp) for p, qp in prep.initial.items()}, scouting)
    for alpha, members in groups.items():
        if not wanted & set(members):
            continue
        grouped = {p: prep.initial[p] for p in members}
        factors = smoothing_from_scouting(scouting, smoothable_paths(grouped, scfg, weights), weights, alpha, scfg)
        smoothed = [smoothed_scouting(r, factors) for r in scouting]
        for part in by_rotation(members):
            if wanted & set(part):
                yield group(part, {p: ranked(p, smoothed_qparams(qp, factors, weights, smoothed))
                                   for p, qp in grouped.items() if p in part}, smoothed)


def centralized_qparams(prep: Prepared, scouting_view=None) -> dict[str, QParams]:
    """What a data-collecting server would get: the same recipe (scouting, smoothing if the config
    has it, grids, statistics, calibrator) on the pooled training data of every client
    (``client_statistics``). Merges are exact, so this equals one pass over the pooled data, and a
    federation whose rounds reach every client gives the same bits."""
    from server.aggregate import ranges_for_profile, sum_statistics
    from server.rounds import activation_keys

    out = {}
    for profiles, initial, per_client in client_statistics(prep, scouting_view):
        merged = sum_statistics(per_client)
        for p in profiles:
            qp = initial[p]
            specs = {k: qp.points[k].spec for k in activation_keys(qp) if k in merged and merged[k].n > 0}
            points = ranges_for_profile(merged, specs, prep.cfg.server.calibrator_for(p))
            out[p] = QParams({**qp.points, **points}, qp.model, qp.version, qp.smoothing,
                             {**qp.meta, "recipe": "centralized calibration, pooled training data"}, qp.importance)
            if p in prep.cfg.server.plans:
                out[p] = centralized_plan(prep, p, out[p], merged)
    return out


def centralized_plan(prep: Prepared, profile: str, qp: QParams, merged) -> QParams:
    """The centralized recipe of a planned profile (``server.plans``): every client of the profile
    runs the plan job (``client.plan``) on its training text at ``qp`` (the pooled calibration),
    the sums are added (the pooled estimate), ``server.rounds.planned_qparams`` plans under the
    profile's budget, and the activations are calibrated again on the pooled statistics at their
    new specs. The plan is in the QParams' ``meta["plan"]``."""
    from client.app import get_torch_model
    from client.device import load_quant_config
    from client.plan import plan_sensitivity
    from quant.wire import Instruction
    from server.aggregate import ranges_for_profile
    from server.rounds import activation_keys, plan_keys, planned_qparams

    model = get_torch_model(str(prep.device_dir), profile)
    qc = load_quant_config(prep.device_dir, profile)
    ins = Instruction(round=0, job="plan", qparams=qp, keys=tuple(plan_keys(qp)))
    sens = dict.fromkeys(ins.keys, 0.0)
    for c in prep.clients:
        if c.profile == profile and len(c.train):
            r, _ = plan_sensitivity(model, qp, ins, c.train, qc.activation, qc.weight)
            sens = {k: sens[k] + r.sens[k] for k in sens}
    planned, _ = planned_qparams(qp, sens, prep.cfg.server.plans[profile], server_weights(prep))
    specs = {k: planned.points[k].spec for k in activation_keys(planned) if k in merged and merged[k].n > 0}
    points = ranges_for_profile(merged, specs, prep.cfg.server.calibrator_for(profile))
    return planned.with_points(points)


def references(prep: Prepared, ev: ServerEval, progress) -> dict[str, dict]:
    """Float and random-token-calibration perplexity per profile (with the random calibration's
    fidelity to float under ``random_calib``), cached in the run directory."""
    f = prep.out / "references.json"
    if f.is_file():
        return json.loads(f.read_text())
    say(progress, "references: float and random-token calibration perplexity")
    refs = {}
    for p, qp in prep.initial.items():
        r = ev(p, qp)
        refs[p] = {"float_ppl": r["float_perplexity"], "random_calib_ppl": r["perplexity"], "random_calib": r}
    atomic_write_bytes(f, json.dumps(refs, indent=1).encode())
    return refs
