"""Poisoning bench (issue 14, goal 3): how far well-formed, validated, malicious replies move the
held-out perplexity, per attack, per share of attackers and per aggregation rule set.

    .venv/bin/python -m bench.poisoning                         # both rule sets, every attack
    .venv/bin/python -m bench.poisoning --rules exact           # one rule set; merged into the JSON
    .venv/bin/python -m bench.poisoning --rule-set clip8:absmax_clip=8   # another rule set

Writes bench/results/poisoning.json and bench/results/poisoning.md (the table, also printed).

What runs. The server's own functions, in this process, on the prepared run of
``configs/default.toml`` (``--prepared-from runs/default``: nothing is exported or downloaded):
``server.rounds.sample_clients`` and ``instructions_for`` pick the clients and build what they get,
``server.messages.instruction_message`` makes each client's message, ``client.app.handle`` answers
it (the real ClientApp logic: decoding, the job on ONNX Runtime or torch, encoding),
``server.messages.read_reply`` validates the reply exactly as the server does, and
``server.rounds.apply_round`` aggregates and commits. A poisoned reply is the attacker's honest
reply, decoded, changed by a function of ``simulation.attacks``, encoded again and sent through
``read_reply`` like any other. The QParams are evaluated by ``simulation.evaluation.ServerEval``
(the server's held-out roles, the ONNX Runtime integer model; here on the clients' runtimes).

What it costs, and how that is kept down:

- honest replies are cached per (client, what the job reads from its instruction): the smoothing,
  keys, grids and abs-max keys for ``scout``/``stats`` (a statistics job runs on the float graph,
  so the activation scales of its instruction do not change what it computes), every QParams
  value for ``lsq``. A scenario whose instructions are those of an earlier one reuses its replies;
- each scenario starts at the stage it attacks: a scout attack runs scout + the 2 stats rounds,
  a stats attack starts from the clean run's post-scout state and runs the 2 stats rounds, an lsq
  attack starts from the clean post-statistics state and runs the 2 lsq rounds; each is compared
  with the clean run of the same rule set after the same rounds;
- evaluations are cached per QParams content;
- replies and evaluations are also kept on disk (``<out>/cache``, keyed as above and by the
  sources of ``client/`` and ``quant/``), so a run started again recomputes nothing it has.

Each row is compared with the clean run of its rule set (the goals are read from that) and with a
control: the same rounds and the same sample with the attackers honest. Forcing an attacker into a
round moves an honest client to another round and leaves the attacker's own data out; the control
shows what that alone does, so that what remains is the poison.

Worst case placement (``--placement forced``, the default): the attackers are a fixed set of
client ids (chosen across the profiles in proportion to the fleet) and are always in the sample of
the rounds they attack: an attacker takes the place of an honest client the server's sampler drew
(of its own profile where it can), so a round keeps its size; a statistics round samples without
replacement, so they all land in the first one. Rounds an attack does not touch sample as the
server does. ``--placement drawn``: the attackers take part only where the server's sampler draws
them (results under ``<rule set>@drawn``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bench.common import RESULTS, ROOT, machine, quiet_env, shown_path, versions, write_json

# ---------------------------------------------------------------------------------------------
# Configuration as data

RULE_FIELDS = ("stats_rule", "absmax_rule", "absmax_clip", "round_factor", "lsq_rule", "trim")
# "exact": the rules the federation had before issue 14 (sums, max, the weighted mean); "robust":
# every rule field at ServerConfig's default ({} = nothing overridden). configs/default.toml pins
# lsq_rule = "mean", so the robust set names every rule field explicitly (see rule_config).
RULE_SETS: dict[str, dict] = {
    "exact": {"stats_rule": "sum", "absmax_rule": "max", "lsq_rule": "mean"},
    "robust": {},
}

ATTACKS: dict[str, dict] = {
    "scout-absmax": {"stage": "scout", "fn": "scout_absmax", "params": {"value": 1e3, "factor": 1e3, "channel": 0},
                     "what": "abs-max of channel 0 of every smoothable input = max(1e3, 1000 x honest)"},
    "scout-ranges": {"stage": "scout", "fn": "scout_ranges", "params": {"factor": 1e3},
                     "what": "every point's min/max x1000 (grid poisoning)"},
    "stats-outside-100": {"stage": "stats", "fn": "stats_outside", "params": {"value": 100.0, "count": 2},
                          "what": "honest histograms + 2 values at max(100, grid hi) at every point"},
    "stats-outside-1e4": {"stage": "stats", "fn": "stats_outside", "params": {"value": 1e4, "count": 2},
                          "what": "honest histograms + 2 values at max(1e4, grid hi) at every point"},
    "stats-edge-count": {"stage": "stats", "fn": "stats_edge", "params": {"where": "top"},
                         "what": "all mass in the grid's top bin, n = 2^40 (the wire's cap) per point"},
    "stats-zero-count": {"stage": "stats", "fn": "stats_edge", "params": {"where": "zero"},
                         "what": "all mass in the bin at zero, n = 2^40 per point (collapses a range)"},
    "lsq-scale-up": {"stage": "lsq", "fn": "lsq_scale", "reads_honest": False, "params": {"direction": 1},
                     "what": "delta log s = +ln 8 (x8) everywhere, delta beta 0, claims max_examples"},
    "lsq-scale-down": {"stage": "lsq", "fn": "lsq_scale", "reads_honest": False, "params": {"direction": -1, "keep_zero_point": True},
                       "what": "delta log s = -ln 8 (/8) everywhere, zero-points kept, claims max_examples"},
}
# (label, share of the fleet; None = one client): attackers = ceil(share x clients)
FRACTIONS = (("1 client", None), ("10%", 0.1), ("30%", 0.3))
GOALS = {"1 client": 0.5, "10%": 1.0, "30%": 5.0}       # issue 14: max perplexity increase, percent
STAGE_JOBS = {"scout": ("scout", "stats"), "stats": ("stats",), "lsq": ("lsq",)}
COMPARED = {"scout": "stats", "stats": "stats", "lsq": "lsq"}   # which clean checkpoint a stage is compared with


def attackers_for(share: float | None, n: int) -> int:
    return 1 if share is None else max(1, math.ceil(share * n - 1e-9))


# ---------------------------------------------------------------------------------------------
# Rule sets

def rule_config(base, rules: dict):
    """``base`` (a ServerConfig) with the rule fields of ``rules`` and every other rule field at
    ServerConfig's default; rule fields this ServerConfig does not have are left out and returned,
    so a result says which rules really ran."""
    from server.config import ServerConfig

    have = ServerConfig.model_fields
    unknown = sorted(set(rules) - set(RULE_FIELDS))
    if unknown:
        raise ValueError(f"not rule fields: {unknown} (rule fields: {', '.join(RULE_FIELDS)})")
    values = {f: rules.get(f, have[f].default) for f in RULE_FIELDS if f in have}
    missing = sorted(f for f in RULE_FIELDS if f not in have)
    data = base.model_dump()
    data.update(values)
    return ServerConfig.model_validate(data), values, missing


def parse_rule_set(text: str) -> tuple[str, dict]:
    """``NAME:field=value,field=value`` (values as JSON, else strings)."""
    name, _, body = text.partition(":")
    rules = {}
    for item in filter(None, body.split(",")):
        k, _, v = item.partition("=")
        try:
            rules[k.strip()] = json.loads(v)
        except ValueError:
            rules[k.strip()] = v.strip()
    if not name:
        raise ValueError(f"--rule-set {text!r}: NAME:field=value,...")
    return name, rules


# ---------------------------------------------------------------------------------------------
# The prepared run

def seed_from(cfg, out: Path, source: Path) -> str:
    """Start ``out`` from the run ``source`` prepared (hard links). ``simulation.prepare.seed_run_dir``
    when the config digests match; when they differ only in the aggregation rule fields or in
    fields the source's ``run.json`` does not have (fields added to ServerConfig since), none of
    which changes a starting point, the same files without its ``run.json`` (``prepare`` then
    writes one). Returns how it was seeded."""
    from simulation.prepare import config_digest, seed_run_dir

    def compatible(run_dir: Path, why: str) -> None:
        stored = json.loads((run_dir / "run.json").read_text()).get("config", {})
        skip = {"name", "engine", "server.schedule", *(f"server.{f}" for f in RULE_FIELDS)}
        diff = _differences(stored, cfg.model_dump(mode="json"), skip=skip)
        if diff:
            raise ValueError(f"{why}; {run_dir} differs in {diff[:5]}") from None

    if (out / "run.json").is_file():        # the bench's own directory: reused, its run.json renewed
        if json.loads((out / "run.json").read_text()).get("config_digest") == config_digest(cfg):
            return "reused"
        compatible(out, "the bench directory was prepared for another config")
        (out / "run.json").unlink()
        return "reused (run.json renewed: the config changed only in rule or new fields)"
    try:
        seed_run_dir(cfg, out, source)
        return "seed_run_dir"
    except ValueError as e:
        compatible(source, str(e))
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)

    def link(src, dst):
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    for name in ("initial", "device"):
        shutil.copytree(source / name, tmp / name, copy_function=link)
    if (source / "references.json").is_file():
        shutil.copy2(source / "references.json", tmp / "references.json")
    if out.exists():
        out.rmdir()
    os.replace(tmp, out)
    return "linked (config digest differs only by fields added since)"


def _differences(stored, current, skip=(), where="") -> list[str]:
    """Paths where ``stored`` differs from ``current``, keys ``stored`` lacks ignored."""
    if where in skip:
        return []
    if isinstance(stored, dict) and isinstance(current, dict):
        return [d for k in stored for d in _differences(stored[k], current.get(k), skip, f"{where}.{k}".lstrip("."))]
    return [] if stored == current else [where]


# ---------------------------------------------------------------------------------------------
# The fleet: honest replies (cached), poisoned replies, validation, evaluation

def source_digest(*dirs: str) -> str:
    """sha256 (16 hex) of the Python sources under ``dirs``: what the stored replies were computed
    with (the client's code and the quantization core), so that a change recomputes them."""
    h = hashlib.sha256()
    for d in dirs:
        for f in sorted((ROOT / d).rglob("*.py")):
            if "__pycache__" not in f.parts:
                h.update(f.relative_to(ROOT).as_posix().encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:16]


CLIENT_CODE = source_digest("client", "quant")


def job_key(ins, config) -> str:
    """What a client's job reads from ``ins`` (see the module docstring), and the client's code,
    as a digest."""
    from quant.qparams import QParams
    from quant.wire import Instruction

    qp = ins.qparams
    if ins.job in ("scout", "stats"):
        h = hashlib.sha256(json.dumps({"job": ins.job, "keys": list(ins.keys), "model": qp.model, "code": CLIENT_CODE,
                                       "grids": {k: [g.lo, g.hi, g.bins] for k, g in ins.grids.items()},
                                       "absmax": ins.absmax, "batch": config.batch_size}, sort_keys=True).encode())
        for k in sorted(qp.smoothing):
            h.update(k.encode() + np.asarray(qp.smoothing[k], np.float32).tobytes())
        return h.hexdigest()[:20]
    bare = Instruction(0, ins.job, QParams(qp.points, qp.model, 0, qp.smoothing, {}), keys=ins.keys)
    return hashlib.sha256(f"{bare.digest}|{config.learn_json()}|{config.batch_size}|{CLIENT_CODE}".encode()
                          ).hexdigest()[:20]


def qparams_key(qparams: dict) -> str:
    h = hashlib.sha256()
    for prof in sorted(qparams):
        qp = qparams[prof]
        h.update(prof.encode())
        for k in sorted(qp.points):
            p = qp.points[k]
            h.update(k.encode() + p.spec.model_dump_json().encode() + np.asarray(p.scale).tobytes()
                     + np.asarray(p.zero_point).tobytes())
        for k in sorted(qp.smoothing):
            h.update(k.encode() + np.asarray(qp.smoothing[k], np.float32).tobytes())
    return h.hexdigest()[:20]


@dataclass
class Fleet:
    """The prepared run's clients as the bench drives them."""

    prep: object
    weights: dict | None
    evaluator: object
    profile_of: dict[str, str]
    store: Path | None = None               # the clients' raw replies and the evaluations, across runs
    honest_cache: dict = field(default_factory=dict)
    eval_cache: dict = field(default_factory=dict)
    rejected_honest: list = field(default_factory=list)
    torch_profile: str | None = None        # the profile whose lsq jobs ran last
    torch_models: dict = field(default_factory=dict)
    counts: dict = field(default_factory=lambda: {"honest_computed": 0, "honest_cached": 0, "honest_from_disk": 0,
                                                  "honest_rejected": 0, "evaluations": 0, "evaluations_cached": 0,
                                                  "honest_s": 0.0, "eval_s": 0.0})

    def __post_init__(self):
        if self.store is not None and (self.store / "evaluations.json").is_file():
            self.eval_cache = json.loads((self.store / "evaluations.json").read_text())

    @property
    def device_dir(self) -> str:
        return str(Path(self.prep.device_dir).resolve())

    def _sync(self, profile: str, ins) -> None:
        """The profile's shared device runtime holding ``ins``'s QParams: the bench revisits
        versions with other contents, which a real device never sees, so the runtime is patched
        here (at its own version, which a patch may not lower) and ``handle`` is told it holds
        the instruction's version."""
        from client.app import get_runtime
        from quant.qparams import QParams

        rt = get_runtime(self.device_dir, profile)
        qp = ins.qparams
        rt.patch(QParams(qp.points, qp.model, max(int(rt.qparams.version), int(qp.version)), qp.smoothing, qp.meta))

    def honest(self, cid: str, ins, config):
        """``(decoded reply, examples)`` of client ``cid``'s honest answer to ``ins``, or
        ``(Rejection, 0)`` when the server refuses it (recorded in ``rejected_honest``)."""
        from quant.wire import encode_instruction
        from server.validate import Rejection

        from flwr.app import ConfigRecord, Message, RecordDict

        from server.messages import instruction_message, read_reply

        key = (cid, job_key(ins, config))
        if key in self.honest_cache:
            self.counts["honest_cached"] += 1
            return self.honest_cache[key]
        prof = self.profile_of[cid]
        msg = instruction_message(int(cid) + 1, prof, ins, *encode_instruction(ins), config)
        content = self._stored(cid, key[1], ins)
        if content is not None:
            self.counts["honest_from_disk"] += 1
        else:
            from client.app import handle

            t0 = time.perf_counter()
            if ins.job in ("scout", "stats"):
                self._sync(prof, ins)
            else:
                self._torch(prof)
            state = RecordDict({"held": ConfigRecord({"version": int(ins.version)})})
            content = handle(msg.metadata.message_type, msg.content, {"partition-id": int(cid)},
                             {"device-dir": self.device_dir}, state)
            self._store(cid, key[1], content)
            self.counts["honest_computed"] += 1
            self.counts["honest_s"] += time.perf_counter() - t0
        reply, n, _ = read_reply(Message(content, reply_to=msg), ins, config)
        if isinstance(reply, Rejection):    # the server drops it as it would any other
            self.counts["honest_rejected"] += 1
            self.rejected_honest.append({"client": cid, "job": ins.job, "round": ins.round,
                                         "code": reply.code, "detail": reply.detail[:200]})
        self.honest_cache[key] = (reply, n)
        return reply, n

    def _torch(self, profile: str) -> None:
        """Keep a torch model per profile: client.app holds one per process (a simulation actor
        serves one profile at a time), and rebuilding it costs tens of seconds on SmolLM2. Both
        are put back into its cache, where a present model is used as it is."""
        import client.app as capp

        with capp._LOCK:
            self.torch_models.update(capp._TORCH)
            capp._TORCH.update(self.torch_models)
        self.torch_profile = profile

    def _path(self, cid: str, key: str) -> Path:
        return self.store / "replies" / f"{cid}-{key}.npz"

    def _store(self, cid: str, key: str, content) -> None:
        """The client's reply as it came (arrays, header, metrics; or its error), for a later run."""
        if self.store is None:
            return
        f = self._path(cid, key)
        f.parent.mkdir(parents=True, exist_ok=True)
        if "error" in content:
            data = {"error": np.array(json.dumps(dict(content["error"])))}
        else:
            data = {f"a/{k}": v.numpy() for k, v in content["arrays"].items()}
            data |= {"header": np.array(content["config"]["header"]),
                     "metrics": np.array(json.dumps(dict(content["metrics"])))}
        tmp = f.with_name(f.name + f".tmp{os.getpid()}.npz")
        np.savez(tmp, **data)
        os.replace(tmp, f)

    def _stored(self, cid: str, key: str, ins):
        """A stored reply of ``cid`` to an instruction with the same job content, as the reply to
        ``ins``: the header's round, version and request digest are ``ins``'s (the arrays are laid
        out by the keys, grids and points, which ``key`` covers). None when there is none."""
        from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

        if self.store is None or not self._path(cid, key).is_file():
            return None
        with np.load(self._path(cid, key)) as z:
            if "error" in z:
                return RecordDict({"error": ConfigRecord(json.loads(str(z["error"])))})
            header = json.loads(str(z["header"]))
            header |= {"round": ins.round, "version": ins.version, "request": ins.digest}
            return RecordDict({"arrays": ArrayRecord({k[2:]: Array(np.ascontiguousarray(z[k])) for k in z.files
                                                      if k.startswith("a/")}),
                               "config": ConfigRecord({"header": json.dumps(header)}),
                               "metrics": MetricRecord(json.loads(str(z["metrics"])))})

    def reply(self, cid: str, ins, config, attack: dict | None):
        """The reply the server gets from ``cid``: its honest one, or the attack's forgery of it,
        encoded and validated by ``server.messages.read_reply`` (``(reply or Rejection, n)``)."""
        from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

        from quant.wire import encode_instruction, encode_lsq_reply, encode_scout_reply, encode_stats_reply
        from server.messages import instruction_message, read_reply
        from server.validate import Rejection
        from simulation import attacks

        if attack is None or attack.get("fn") is None:
            return self.honest(cid, ins, config)
        # an attack that does not read the honest reply (lsq_scale) spares the client's job
        honest, n = self.honest(cid, ins, config) if attack.get("reads_honest", True) else (None, 0)
        if isinstance(honest, Rejection):       # the attack needs a reply to forge from
            return honest, 0
        forged, claim = attacks.ATTACKS[attack["fn"]](honest, ins, n, **attack["params"])
        encode = {"scout": encode_scout_reply, "stats": encode_stats_reply, "lsq": encode_lsq_reply}[ins.job]
        flat, header = encode(forged, ins)
        msg = instruction_message(int(cid) + 1, self.profile_of[cid], ins, *encode_instruction(ins), config)
        content = RecordDict({"arrays": ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in flat.items()}),
                              "config": ConfigRecord({"header": json.dumps(header)}),
                              "metrics": MetricRecord({"num-examples": int(claim)})})
        r, n2, _ = read_reply(Message(content, reply_to=msg), ins, config)
        return r, n2

    def evaluate(self, qparams: dict) -> dict[str, float]:
        """Held-out perplexity per profile (``ServerEval``), cached per QParams content."""
        key = qparams_key(qparams)
        if key in self.eval_cache:
            self.counts["evaluations_cached"] += 1
        else:
            t0 = time.perf_counter()
            self.eval_cache[key] = {p: self.evaluator(p, qp)["perplexity"] for p, qp in sorted(qparams.items())}
            self.counts["evaluations"] += 1
            self.counts["eval_s"] += time.perf_counter() - t0
            if self.store is not None:
                write_json(self.store / "evaluations.json", self.eval_cache)
        return dict(self.eval_cache[key])


def open_fleet(config_path: Path, prepared_from: Path, out: Path):
    """``(SimulationConfig, Fleet, how out was seeded)`` for the run ``prepared_from`` prepared."""
    from flwr.supercore.task_identity import TaskIdentity

    from client.app import get_runtime
    from simulation.evaluation import ServerEval
    from simulation.prepare import load_simulation_config, prepare, server_weights

    # Flower builds a message's metadata from the task identity a ServerApp run sets.
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    cfg = load_simulation_config(config_path)
    seeded = seed_from(cfg, out, prepared_from)
    prep = prepare(cfg, out, progress=lambda m: print(m, file=sys.stderr, flush=True))
    # ServerEval on the clients' own runtimes (one per profile in this process, as in a simulation
    # actor): a second pair costs about 3 GB on SmolLM2 and, on 2 busy cores, is no faster.
    ev = ServerEval(prep.device_dir, prep.evals, 1, cfg.server.batch_size)
    device_dir = str(Path(prep.device_dir).resolve())
    ev.runtimes = {p: get_runtime(device_dir, p) for p in sorted(prep.initial)}
    fleet = Fleet(prep, server_weights(prep) if cfg.server.needs_weights else None, ev,
                  {str(c.pid): c.profile for c in prep.clients if len(c.train)}, store=out / "cache")
    return cfg, fleet, seeded


# ---------------------------------------------------------------------------------------------
# Rounds

def pick_attackers(profile_of: dict[str, str], k: int) -> list[str]:
    """``k`` client ids across the profiles in proportion to the fleet (largest remainder), the
    lowest partition ids of each profile."""
    by: dict[str, list[str]] = {}
    for c in sorted(profile_of, key=int):
        by.setdefault(profile_of[c], []).append(c)
    n = len(profile_of)
    exact = {p: k * len(cs) / n for p, cs in by.items()}
    quota = {p: math.floor(x) for p, x in exact.items()}
    for p in sorted(by, key=lambda p: (-(exact[p] - quota[p]), -len(by[p]), p))[:k - sum(quota.values())]:
        quota[p] += 1
    return sorted((c for p, cs in by.items() for c in cs[:quota[p]]), key=int)


def place(sampled: list[str], attackers: list[str], eligible: set[str], profile_of: dict[str, str]) -> list[str]:
    """``sampled`` with every eligible attacker in it, same size (worst case): an attacker takes
    the place of an honest client of its own profile where the sample has one, else of another
    honest client; when there are more attackers than places, the sample is all attackers."""
    want = [a for a in attackers if a in eligible]
    if len(want) >= len(sampled):
        return sorted(want[:len(sampled)])
    out = list(sampled)
    for a in want:
        if a in out:
            continue
        honest = [c for c in out if c not in attackers]
        same = [c for c in honest if profile_of[c] == profile_of[a]]
        out.remove((same or honest)[-1])
        out.append(a)
    return sorted(out)


def run_rounds(fleet: Fleet, state, rounds, config, attack: dict | None = None, attackers=(), on_round=None,
               placement: str = "forced"):
    """The rounds ``(round, spec)`` from ``state``; the attack (if any) in the rounds of its job
    (``placement``: see the module docstring). Returns the state and one record per round."""
    from server.rounds import Accepted, apply_round, instructions_for, sample_by_profile, sample_clients
    from server.validate import Rejection

    roster = sorted(fleet.profile_of)
    records = []
    for rnd, spec in rounds:
        t0 = time.perf_counter()
        used = state.used if spec.job == "stats" else ()
        sampled = sample_by_profile(fleet.profile_of, used, spec.fraction, spec.min_clients, config.seed, rnd) \
            if spec.by_profile else sample_clients(roster, used, spec.fraction, spec.min_clients, config.seed, rnd)
        hit = attack is not None and attack["job"] == spec.job
        if hit and placement == "forced":
            sampled = place(sampled, list(attackers), set(roster) - set(used), fleet.profile_of)
        inss = instructions_for(state, rnd, spec, config, fleet.weights)
        accepted = {p: [] for p in sorted({fleet.profile_of[c] for c in sampled})}
        rejections, bad = [], []
        # grouped by profile, the profile of the torch model in memory first: one runtime patch per
        # profile and round, and one torch model rebuild (tens of seconds on SmolLM2) per lsq round
        for c in sorted(sampled, key=lambda c: (fleet.profile_of[c] != fleet.torch_profile, fleet.profile_of[c], int(c))):
            prof = fleet.profile_of[c]
            poisoned = hit and c in attackers
            r, n = fleet.reply(c, inss[prof], config, attack if poisoned else None)
            if isinstance(r, Rejection):
                rejections.append(r)
                bad.append({"client": c, "attacker": poisoned, "code": r.code, "detail": r.detail[:200]})
            else:
                accepted[prof].append(Accepted(c, n, r))
        state, m = apply_round(state, rnd, spec, accepted, rejections, config, fleet.weights)
        rec = {"round": rnd, "job": spec.job, "attacked": hit, "sampled": len(sampled),
               "attackers_in_sample": sum(c in attackers for c in sampled) if hit else 0,
               "by_profile": {p: {"replies": len(a), "attackers": sum(x.client_id in attackers for x in a) if hit else 0}
                              for p, a in accepted.items()},
               "rejections": m.get("rejections", {}), "rejected": bad, "applied": m.get("applied"),
               "skipped": m.get("skipped"), "widened": len(m.get("widened", [])), "changed": m.get("changed"),
               "versions": m.get("versions"), "wall_s": round(time.perf_counter() - t0, 2)}
        records.append(rec)
        if on_round is not None:
            on_round(rec)
    return state, records


def moved(state, ref) -> dict:
    """Per profile, how far the activation scales and smoothing factors of ``state`` are from
    ``ref``'s: the largest and smallest ratio."""
    out = {}
    for prof, qp in sorted(state.qparams.items()):
        rq = ref.qparams[prof]
        acts = [k for k in qp.points if k.endswith((":input", ":other"))]
        r = np.concatenate([np.ravel(qp.points[k].scale.astype(np.float64) / rq.points[k].scale.astype(np.float64))
                            for k in acts]) if acts else np.ones(1)
        f = np.concatenate([np.ravel(np.asarray(qp.smoothing[k], np.float64) / np.asarray(rq.smoothing[k], np.float64))
                            for k in qp.smoothing if k in rq.smoothing]) if qp.smoothing else np.ones(1)
        out[prof] = {"scale_ratio_max": float(r.max()), "scale_ratio_min": float(r.min()),
                     "factor_ratio_max": float(f.max()), "factor_ratio_min": float(f.min())}
    return out


def change(ppl: dict, ref: dict) -> dict:
    return {p: 100.0 * (ppl[p] / ref[p] - 1.0) for p in ppl}


# ---------------------------------------------------------------------------------------------
# A rule set

def run_rule_set(fleet: Fleet, base, name: str, rules: dict, attacks: list[str], fractions, log, bar=None,
                 placement: str = "forced") -> dict:
    """The clean run and every (attack, share) scenario under one rule set."""
    from server.state import initial_state

    t_set = time.perf_counter()
    config, values, missing = rule_config(base, rules)
    rounds = [(r, s) for r, s in config.rounds() if s.job != "eval"]
    stage_rounds = {st: [(r, s) for r, s in rounds if s.job in jobs] for st, jobs in STAGE_JOBS.items()}
    n = len(fleet.profile_of)

    def say(rec, label):
        log(f"  [{name}] {label}: round {rec['round']} {rec['job']}{' (attacked)' if rec['attacked'] else ''}: "
            f"{sum(v['replies'] for v in rec['by_profile'].values())} replies, rejections {rec['rejections']}, "
            f"{rec['wall_s']:.1f} s (honest jobs so far: {fleet.counts['honest_computed']} computed, "
            f"{fleet.counts['honest_cached']} cached)")

    s0 = initial_state(fleet.prep.initial, "bench-poisoning")
    t0 = time.perf_counter()
    only = {j: [x for x in rounds if x[1].job == j] for j in ("scout", "stats")}
    s1, r1 = run_rounds(fleet, s0, only["scout"], config, on_round=lambda r: say(r, "clean"))
    s3, r3 = run_rounds(fleet, s1, only["stats"], config, on_round=lambda r: say(r, "clean"))
    e_stats = fleet.evaluate(s3.qparams)
    s6, r6 = run_rounds(fleet, s3, stage_rounds["lsq"], config, on_round=lambda r: say(r, "clean"))
    e_lsq = fleet.evaluate(s6.qparams)
    clean = {"ppl": {"stats": e_stats, "lsq": e_lsq}, "rounds": r1 + r3 + r6, "wall_s": round(time.perf_counter() - t0, 1),
             "ran": {"stats": ran_label(only["scout"] + only["stats"], None), "lsq": ran_label(rounds, None)}}
    log(f"[{name}] clean: after statistics {fmt_ppl(e_stats)}; after learned ranges {fmt_ppl(e_lsq)}")
    if bar is not None:
        bar.update(1)
    start = {"scout": s0, "stats": s1, "lsq": s3}
    ref_state = {"stats": s3, "lsq": s6}
    controls: dict = {}

    def control(stage: str, who: list[str]) -> dict:
        """The same rounds with the same sample, the attackers honest: what the placement alone
        (an attacker in a round the server's draw did not give it, its honest data left out of
        another) does, which the comparison with the clean run includes."""
        key = (stage, tuple(who))
        if key not in controls:
            honest = {"stage": stage, "job": stage, "fn": None}
            st, _ = run_rounds(fleet, start[stage], stage_rounds[stage], config, honest, who,
                               on_round=lambda r: say(r, f"control x{len(who)}"), placement=placement)
            controls[key] = fleet.evaluate(st.qparams)
        return controls[key]

    rows = []
    for aname in attacks:
        a = ATTACKS[aname]
        attack = {**a, "job": a["stage"]}
        for label, share in fractions:
            k = attackers_for(share, n)
            who = pick_attackers(fleet.profile_of, k)
            t0 = time.perf_counter()
            st, recs = run_rounds(fleet, start[a["stage"]], stage_rounds[a["stage"]], config, attack, who,
                                  on_round=lambda r: say(r, f"{aname} x{k}"), placement=placement)
            ppl = fleet.evaluate(st.qparams)
            cmp = COMPARED[a["stage"]]
            ref = clean["ppl"][cmp]
            d = change(ppl, ref)
            worst = max(d.values())
            ctl = control(a["stage"], who)
            row = {"attack": aname, "stage": a["stage"], "share": label, "attackers": k,
                   "attacker_ids": who, "attacker_profiles": {p: sum(fleet.profile_of[c] == p for c in who)
                                                              for p in sorted(set(fleet.profile_of.values()))},
                   "ran": ran_label(stage_rounds[a["stage"]], a["stage"]), "compared_with": f"clean after {cmp}",
                   "ppl": ppl, "clean_ppl": ref, "change_pct": d, "worst_change_pct": worst,
                   "goal_pct": GOALS.get(label), "holds": None if label not in GOALS else bool(worst <= GOALS[label]),
                   "control_ppl": ctl, "change_vs_control_pct": change(ppl, ctl),
                   "holds_vs_control": None if label not in GOALS else bool(max(change(ppl, ctl).values()) <= GOALS[label]),
                   "attacker_replies_rejected": sum(1 for rec in recs for b in rec["rejected"] if b["attacker"]),
                   "attacker_share_of_replies": [f"{sum(v['attackers'] for v in rec['by_profile'].values())}/"
                                                 f"{sum(v['replies'] for v in rec['by_profile'].values())}"
                                                 for rec in recs if rec["attacked"]],
                   "moved": moved(st, ref_state[cmp]), "rounds": recs, "wall_s": round(time.perf_counter() - t0, 1)}
            rows.append(row)
            log(f"[{name}] {aname}, {label} ({k}): {fmt_ppl(ppl)}, change "
                + ", ".join(f"{p} {v:+.2f}%" for p, v in d.items())
                + f" -> goal {GOALS.get(label)}%: {'holds' if row['holds'] else 'FAILS'}; vs the same sample honest "
                + ", ".join(f"{p} {v:+.2f}%" for p, v in row["change_vs_control_pct"].items()))
            if bar is not None:
                bar.update(1)
    return {"rules": values, "missing_fields": missing, "placement": placement, "clean": clean, "rows": rows,
            "wall_s": round(time.perf_counter() - t_set, 1)}


def ran_label(rounds, attacked_stage) -> str:
    """e.g. ``scout* + stats x2``: the rounds a scenario ran, ``*`` on the attacked ones."""
    jobs = [s.job for _, s in rounds]
    parts = []
    for j in dict.fromkeys(jobs):
        c = jobs.count(j)
        star = "*" if attacked_stage is not None and STAGE_JOBS[attacked_stage][0] == j else ""
        parts.append(f"{j}{star}" + (f" x{c}" if c > 1 else ""))
    return " + ".join(parts)


def fmt_ppl(ppl: dict) -> str:
    return ", ".join(f"{p} {v:.2f}" for p, v in sorted(ppl.items()))


# ---------------------------------------------------------------------------------------------
# Table

def _pct(v: float) -> str:
    return f"{v:+,.0f}%" if abs(v) >= 100 else f"{v:+.2f}%"


def readme_table(res: dict) -> str:
    """The README's compact table: one row per attack and share, the rule sets side by side (the
    int8 and mixed change against the clean run of the same rule set, and whether the goal holds)."""
    profiles, sets = res["profiles"], res["rule_sets"]
    head = ["attack", "attackers"]
    for name in sets:
        head += [f"{name}: {p}" for p in profiles] + [name]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    by_key = {name: {(r["attack"], r["share"]): r for r in rs["rows"]} for name, rs in sets.items()}
    first = next(iter(sets.values()))["rows"]
    for r0 in first:
        key = (r0["attack"], r0["share"])
        cells = [r0["attack"], f"{r0['share']} ({r0['attackers']})"]
        for name in sets:
            r = by_key[name].get(key)
            if r is None:
                cells += ["not run"] * len(profiles) + [""]
                continue
            cells += [_pct(r["change_pct"][p]) for p in profiles]
            cells.append("holds" if r["holds"] else "**fails**")
        lines.append("| " + " | ".join(cells) + " |")
    clean = "; ".join(f"{name} " + ", ".join(f"{st}: " + " / ".join(f"{rs['clean']['ppl'][st][p]:.2f}" for p in profiles)
                                             for st in ("stats", "lsq"))
                      for name, rs in sets.items())
    return (f"`.venv/bin/python -m bench.poisoning` ({res['model']}, {res['clients']} clients of `{res['config']}`, "
            f"perplexity ({' / '.join(profiles)}) on the server's {res['eval_sequences']} held-out sequences in the "
            f"ONNX Runtime integer model; {res['machine']['cpu_model']} "
            f"({' '.join(res['machine'].get('simd', []))}), {res['machine']['cores']} cores, "
            f"{res['wall_s']:.0f} s over its invocations). Clean runs after statistics and after learned ranges: "
            f"{clean}. Change against the clean run of the same rule set; goal +0.5% at one client, +1% at 10%, "
            f"+5% at 30%. Source: `bench/results/poisoning.json` (per-row controls, reply counts: `.md` beside it).\n\n"
            + "\n".join(lines) + "\n")


def table(res: dict) -> str:
    """The markdown table of ``res`` (poisoning.json)."""
    profiles = res["profiles"]
    lines = [f"`.venv/bin/python -m bench.poisoning` ({res['model']}, {res['clients']} clients of "
             f"`{res['config']}`, profiles {', '.join(profiles)}; perplexity on the server's "
             f"{res['eval_sequences']} held-out sequences, ONNX Runtime integer model; attackers always "
             f"in the sample of the rounds they attack (a rule set marked @drawn: only where the server's "
             f"sampler draws them); {res['machine']['cpu_model']}, "
             f"{res['machine']['cores']} cores, {res['wall_s']:.0f} s). Source: `bench/results/poisoning.json`.",
             "", "Rule sets: " + "; ".join(f"**{n}** = " + ", ".join(f"{k} {v}" for k, v in rs["rules"].items())
                                            + (f" (missing: {', '.join(rs['missing_fields'])})" if rs["missing_fields"] else "")
                                            for n, rs in res["rule_sets"].items()) + ".", ""]
    head = ["rules", "attack", "attackers", "ran", "attackers / replies (attacked rounds)"] + \
        [f"{p} ppl" for p in profiles] + [f"{p} vs clean" for p in profiles] + ["goal", "holds"] + \
        [f"{p} vs same sample, honest" for p in profiles] + ["holds vs same sample"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, rs in res["rule_sets"].items():
        c = rs["clean"]
        for stage in ("stats", "lsq"):
            cells = [name, f"clean (after {stage})", "0", c["ran"][stage], "-"]
            cells += [f"{c['ppl'][stage][p]:.2f}" for p in profiles] + ["-"] * len(profiles) + ["-", "-"]
            cells += ["-"] * len(profiles) + ["-"]
            lines.append("| " + " | ".join(cells) + " |")
        for r in rs["rows"]:
            att = f"{r['attackers']} ({r['share']}: " + ", ".join(f"{p} {v}" for p, v in r["attacker_profiles"].items() if v) + ")"
            cells = [name, r["attack"], att, r["ran"], ", ".join(r["attacker_share_of_replies"])]
            cells += [f"{r['ppl'][p]:.2f}" for p in profiles]
            cells += [f"{r['change_pct'][p]:+.2f}%" for p in profiles]
            cells += [f"<= +{r['goal_pct']}%", "yes" if r["holds"] else "**no**"]
            vc = r.get("change_vs_control_pct")
            cells += [f"{vc[p]:+.2f}%" if vc else "-" for p in profiles]
            cells += ["-" if not vc else "yes" if max(vc.values()) <= r["goal_pct"] else "**no**"]
            lines.append("| " + " | ".join(cells) + " |")
    sets = list(res["rule_sets"].items())
    if len(sets) > 1:
        (n0, r0), rest = sets[0], sets[1:]
        lines += ["", "Clean runs against the clean **" + n0 + "** run (what a rule set costs on an honest fleet): "
                  + "; ".join(f"{n} after {st}: " + ", ".join(
                      f"{p} {100 * (rs['clean']['ppl'][st][p] / r0['clean']['ppl'][st][p] - 1):+.2f}%" for p in profiles)
                      for n, rs in rest for st in ("stats", "lsq")) + "."]
    lines += ["", "Each row ran only the rounds named in `ran` (`*`: attacked), from the clean run's state "
              "before them (same rule set), and is compared with the clean run after the same rounds: "
              "scout and stats attacks with the clean run after statistics, lsq attacks with the clean run "
              "after the learned ranges. `holds`: the largest increase over the profiles is within the goal "
              "for the share of attackers (1 client +0.5%, 10% +1%, 30% +5%). `vs same sample, honest`: "
              "against the same rounds with the same sample in which the attackers send their honest replies "
              "(forcing an attacker into a round moves an honest client to another and leaves the "
              "attacker's own data out: that alone moves perplexity a little, and the clean comparison "
              "includes it)."]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# Main

def git_state() -> dict:
    def run(*a):
        try:
            return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""
    return {"commit": run("rev-parse", "HEAD"), "changed_files": run("status", "--porcelain", "--", "server", "quant",
                                                                         "client", "simulation").splitlines(),
            "sources": {d: source_digest(d) for d in ("server", "client", "quant", "simulation")}}


def main(argv=None) -> dict:
    quiet_env()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "default.toml")
    ap.add_argument("--prepared-from", type=Path, default=ROOT / "runs" / "default",
                    help="a run directory prepared for this config (its starting QParams and device directory)")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-poisoning", help="the bench's run directory")
    ap.add_argument("--rules", nargs="+", default=None, help=f"rule sets to run (default: all of {list(RULE_SETS)})")
    ap.add_argument("--rule-set", action="append", default=[], metavar="NAME:field=value,...",
                    help=f"define a rule set (fields: {', '.join(RULE_FIELDS)}); it runs too")
    ap.add_argument("--attacks", nargs="+", default=list(ATTACKS), choices=list(ATTACKS))
    ap.add_argument("--shares", nargs="+", default=[f for f, _ in FRACTIONS], choices=[f for f, _ in FRACTIONS])
    ap.add_argument("--json", type=Path, default=RESULTS / "poisoning.json")
    ap.add_argument("--md", type=Path, default=RESULTS / "poisoning.md")
    ap.add_argument("--placement", choices=("forced", "drawn"), default="forced",
                    help="forced: attackers always in the rounds they attack (worst case); drawn: where sampled")
    ap.add_argument("--fresh", action="store_true", help="do not merge into an existing JSON's other rule sets")
    args = ap.parse_args(argv)

    from tqdm import tqdm

    rule_sets = dict(RULE_SETS)
    for text in args.rule_set:
        n, r = parse_rule_set(text)
        rule_sets[n] = r
    chosen = args.rules or ([n for n in RULE_SETS] + [parse_rule_set(t)[0] for t in args.rule_set])
    for n in chosen:
        if n not in rule_sets:
            ap.error(f"unknown rule set {n!r} (known: {', '.join(rule_sets)})")
    fractions = [(f, s) for f, s in FRACTIONS if f in args.shares]

    t_all = time.perf_counter()
    # the server's code is imported now and its sources recorded with it: others may edit the files
    # while a run of an hour goes on, and what ran is what was imported
    import importlib

    for mod in ("server.aggregate", "server.config", "server.messages", "server.rounds", "server.validate",
                "client.app", "client.jobs", "client.learn"):
        importlib.import_module(mod)
    code = git_state()
    if source_digest("client", "quant") != CLIENT_CODE:
        raise RuntimeError("client/ or quant/ changed since this module was imported: start again")
    cfg, fleet, seeded = open_fleet(args.config, args.prepared_from, args.out)
    old = json.loads(args.json.read_text()) if args.json.is_file() and not args.fresh else {}
    # rule sets of earlier invocations on the same config and model are kept (one rule set at a time)
    sets = dict(old.get("rule_sets", {})) if (old.get("config"), old.get("model")) == \
        (shown_path(_rel(args.config)), cfg.model) else {}
    total = len(chosen) * (1 + len(args.attacks) * len(fractions))
    res = None
    with tqdm(total=total, desc="scenarios", file=sys.stderr, dynamic_ncols=True) as bar:
        for n in chosen:
            key = n if args.placement == "forced" else f"{n}@{args.placement}"
            sets[key] = run_rule_set(fleet, cfg.server, n, rule_sets[n], args.attacks, fractions, tqdm.write, bar,
                                     args.placement)
            sets[key] |= {"run_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "code": code}
            res = write_results(args, cfg, fleet, seeded, sets, time.perf_counter() - t_all)
    print(table(res))
    return res


def write_results(args, cfg, fleet: Fleet, seeded: str, sets: dict, wall: float) -> dict:
    """The JSON (``sets``: every rule set's results) and its table, written after each rule set."""
    prep = fleet.prep
    res = {"bench": "poisoning", "config": shown_path(_rel(args.config)), "model": cfg.model,
           "clients": len(fleet.profile_of), "profiles": sorted(prep.initial),
           "eval_sequences": int(len(prep.evals)), "prepared_from": shown_path(_rel(args.prepared_from)),
           "seeded": seeded, "attacks": ATTACKS,
           "shares": {f: attackers_for(s, len(fleet.profile_of)) for f, s in FRACTIONS}, "goals_pct": GOALS,
           "placement": {"forced": "attackers always in the sample of the rounds they attack (worst case); they "
                                   "take honest clients' places, of their own profile where the server's draw has one",
                         "drawn": "attackers attack only in the rounds the server's sampler draws them for"},
           "machine": machine(lscpu_flags=_lscpu_flags()), "versions": versions(["onnxruntime", "torch", "flwr", "numpy"]),
           "counts": dict(fleet.counts), "honest_replies_rejected": list(fleet.rejected_honest)}
    order = [k for k in RULE_SETS if k in sets] + [k for k in sets if k not in RULE_SETS]
    res["rule_sets"] = {k: sets[k] for k in order}
    res["wall_s"] = round(sum(rs["wall_s"] for rs in sets.values()), 1)     # the rule sets' own times
    res["this_invocation_wall_s"] = round(wall, 1)
    write_json(args.json, _json_safe(res))
    args.md.parent.mkdir(parents=True, exist_ok=True)
    args.md.write_text(table(res))
    return res


def _rel(p: Path) -> Path:
    p = p.resolve()
    return p.relative_to(ROOT) if p.is_relative_to(ROOT) else p


def _lscpu_flags() -> list[str]:
    """Every CPU flag lscpu lists (bench.common.simd_flags keeps the SIMD ones)."""
    from bench.common import cpu_fields

    return sorted(cpu_fields().get("flags", "").split())


def _json_safe(x):
    from server.state import json_safe

    return json_safe(x)


if __name__ == "__main__":
    main()
