"""What a fedquant round costs in Flower itself, beside a bare Flower round of the same messages.

With the tiny model (so that Flower's own cost dominates), for N = 10, 100 and 1000 simulated
clients, one Flower simulation per N on the Ray backend (``simulation.simulate.backend_config``):

- **fedquant rounds**: the real pieces -- ``simulation.prepare.prepare`` (Shakespeare roles, one
  training sequence of 32 tokens per client, one int8 profile), ``client.app.make_app`` and a
  ServerApp whose main is ``server.app.run_server`` on the schedule scout + stats + lsq (fraction 1,
  lsq: one local step). Round times are ``wall_s`` of ``metrics.jsonl`` (the scout round's includes
  the hello that builds the roster: 2 messages per client), bytes are ``bytes_{up,down}_per_client``
  (``quant.wire.payload_nbytes``: flat arrays + JSON header, without Flower's ~130 bytes per array).
- **bare Flower rounds**, in the same simulation (same Ray actors, same nodes), before and after the
  fedquant rounds: N messages carrying exactly the stats instruction's content (the same arrays,
  dtypes and header string: it is built here, and the reply is a real one from
  ``client.app.handle`` in this process, of the most common size among 8 nodes), sent as ``train.bare`` to a ClientApp function
  that answers each with a fresh copy of that stats reply (arrays, header, metrics) and does nothing
  else; the server reads every reply's arrays. The first bare round loads the ClientApp on the
  actors (cold); the baseline is the median of the others.
- **aggregation** (no Flower): 1000 synthetic valid statistics replies and 1000 lsq replies,
  encoded with ``quant.wire``, through ``server.validate.validate_{stats,lsq}_reply`` (decode +
  checks) and then ``server.rounds.apply_round`` (sum + one calibrator run per profile / mean +
  server step), for the tiny model's real points and for SmolLM2's layout (211 activation points,
  422 points with the per-channel weight scales, 512 bins).
- **bytes vs float weight bytes**: measured per round for the tiny model; computed with
  ``quant.wire`` for SmolLM2's int8 QParams layout (134.5M float32 parameters).

Targets (the issue): stats round <= 1.5x the bare round per message; learned-range (lsq) round
bytes up + down per client <= 1% of the float weight bytes (statistics rounds are reported);
aggregation of 1000 replies < 1 s (``apply_round``; decode + validate is reported beside it).

    .venv/bin/python -m bench.flower_rounds            # N = 10, 100, 1000 -> bench/results/flower_rounds.json
    .venv/bin/python -m bench.flower_rounds --quick    # N = 10, no lsq, 20 tiny replies to aggregate (the test)
    .venv/bin/python -m bench.flower_rounds --only-aggregation   # 1000 SmolLM2-layout replies, no Flower
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics as pystats
import sys
import tempfile
import time
import traceback
from dataclasses import replace
from pathlib import Path

import numpy as np

from bench.common import RESULTS, ROOT, cache_dir, machine, quiet_env, shown_path, versions, write_json

quiet_env()

DEFAULT_OUT = RESULTS / "flower_rounds.json"
PROFILE = "int8"
BINS = 512
TARGETS = {"stats_per_message_vs_bare": 1.5, "lsq_bytes_vs_float_weights": 0.01, "aggregate_1000_s": 1.0}
SMOLLM2 = {"layers": 30, "hidden": 576, "intermediate": 1536, "kv": 192, "vocab": 49152}


def log(s: str) -> None:
    print(s, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------ configs

def sim_config(n: int, lsq: bool):
    """configs/smoke.toml's tiny Llama with ``n`` clients of one 32-token training sequence each,
    one int8 profile, and the schedule scout + stats (+ lsq), each sampling every client."""
    from simulation.config import SimulationConfig

    schedule = [{"job": "scout", "fraction": 1.0}, {"job": "stats", "fraction": 1.0}]
    if lsq:
        schedule.append({"job": "lsq", "fraction": 1.0})
    return SimulationConfig.model_validate({
        "name": f"flower-rounds-{n}", "model": "tiny-llama", "threads": 1,
        "data": {"clients": n, "seq_len": 32, "train_sequences": 1, "test_sequences": 0,
                 "eval_sequences": 8, "random_sequences": 4},
        "fleet": [{"profile": PROFILE}],
        "engine": {"num_cpus": 2, "client_cpus": 1},
        "server": {"bins": BINS, "batch_size": 4, "seed": 0, "min_available": n, "wait_s": 600,
                   "reply_timeout_s": 3600, "calibrator": {"method": "mse"},
                   "learn": {"steps": 1, "batch_size": 1}, "schedule": schedule}})


# ------------------------------------------------------------------------------ the mirror

def job_content(ins, config):
    """The content of docs/protocol.md's job message (what server.messages.instruction_message sends)."""
    from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

    from quant.wire import encode_instruction

    flat, header = encode_instruction(ins)
    cfg = {"header": json.dumps(header), "profile": PROFILE, "batch-size": int(config.batch_size)}
    return RecordDict({"arrays": ArrayRecord({dt: Array(a) for dt, a in flat.items()}),
                       "config": ConfigRecord(cfg)})


def stats_mirror(prep, probe: int = 8) -> dict:
    """The stats round's instruction payload and a real node reply to it (client.app.handle in
    this process; a scout job on the same nodes gives the grids). Replies differ in size by the
    count dtype (the smallest holding the node's largest bin), so the reply kept is the most common
    size among the first ``probe`` nodes; all their sizes are returned too."""
    from collections import Counter

    from flwr.app import RecordDict

    from client.app import clear_caches, handle
    from quant.wire import decode_scout_reply
    from server.aggregate import grids_from_scouting
    from server.config import RoundSpec
    from server.rounds import instructions_for
    from server.state import initial_state

    cfg = prep.cfg.server
    run = {"device-dir": str(prep.device_dir.resolve())}
    pids = [c.pid for c in prep.clients[:probe]]
    state = initial_state(prep.initial, "bench")
    scout = instructions_for(state, 1, RoundSpec(job="scout"), cfg)[PROFILE]
    scouted = []
    for pid in pids:
        rep = handle("train", job_content(scout, cfg), {"partition-id": pid}, run, RecordDict())
        if "error" in rep:
            raise RuntimeError(f"scout job on node {pid} failed: {dict(rep['error'])}")
        scouted.append(decode_scout_reply({k: v.numpy() for k, v in rep["arrays"].items()},
                                          json.loads(rep["config"]["header"]), scout))
    grids = grids_from_scouting(scouted, cfg.bins, cfg.grid_margin, cfg.grid_quantile)
    ins = instructions_for(replace(state, grids=grids), 2, RoundSpec(job="stats"), cfg)[PROFILE]
    content = job_content(ins, cfg)
    replies = []
    for pid in pids:
        rep = handle("train", content, {"partition-id": pid}, run, RecordDict())
        if "error" in rep:
            raise RuntimeError(f"stats job on node {pid} failed: {dict(rep['error'])}")
        flat = {k: v.numpy() for k, v in rep["arrays"].items()}
        replies.append((sum(a.nbytes for a in flat.values()), flat, rep))
    clear_caches()
    common = Counter(n for n, _, _ in replies).most_common(1)[0][0]
    _, flat, rep = next(r for r in replies if r[0] == common)
    return {"down_flat": {k: v.numpy() for k, v in content["arrays"].items()},
            "down_config": dict(content["config"]), "up_flat": flat,
            "up_header": rep["config"]["header"], "up_metrics": dict(rep["metrics"]),
            "probe_reply_array_bytes": [n for n, _, _ in replies]}


def mirror_sizes(m: dict) -> dict:
    def side(flat, header):
        return {"arrays": len(flat), "array_bytes": int(sum(a.nbytes for a in flat.values())),
                "header_chars": len(header), "dtypes": {k: [str(a.dtype), int(a.size)] for k, a in flat.items()}}
    return {"instruction": side(m["down_flat"], m["down_config"]["header"]),
            "reply": dict(side(m["up_flat"], m["up_header"]), metrics=len(m["up_metrics"])),
            "probe_reply_array_bytes": m["probe_reply_array_bytes"]}


def bare_round(grid, nodes, m: dict, rnd: int, timeout: float) -> dict:
    """N messages with the stats instruction's content; every reply's arrays are read."""
    from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict

    t0 = time.perf_counter()
    msgs = [Message(RecordDict({"arrays": ArrayRecord({dt: Array(a) for dt, a in m["down_flat"].items()}),
                                "config": ConfigRecord(dict(m["down_config"]))}),
                    dst_node_id=int(n), message_type="train.bare", group_id=f"bare-{rnd}") for n in nodes]
    ok = nbytes = 0
    for r in grid.send_and_receive(msgs, timeout=timeout):
        if r.has_error() or "arrays" not in r.content:
            continue
        flat = {k: v.numpy() for k, v in r.content["arrays"].items()}
        nbytes += sum(a.nbytes for a in flat.values())
        ok += 1
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "messages": len(msgs), "replies": ok, "reply_array_bytes": nbytes}


def client_app(prep, m: dict):
    """client.app's ClientApp plus ``train.bare``: answer with a fresh copy of the stats reply."""
    from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

    from client.app import make_app

    app = make_app({"device-dir": str(prep.device_dir.resolve())})
    up_flat, up_header, up_metrics = m["up_flat"], m["up_header"], m["up_metrics"]

    @app.train("bare")
    def bare(msg, context):
        return Message(content=RecordDict({
            "arrays": ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in up_flat.items()}),
            "config": ConfigRecord({"header": up_header}), "metrics": MetricRecord(dict(up_metrics))}),
            reply_to=msg)
    return app


# ------------------------------------------------------------------------------ one simulation

def run_n(n: int, work: Path, lsq: bool, bare_before: int, bare_after: int) -> dict:
    """prepare, then one Flower simulation: bare rounds, fedquant's scout/stats(/lsq), bare rounds."""
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation

    from server.app import run_server
    from server.roster import wait_for_nodes
    from simulation.prepare import prepare
    from simulation.simulate import backend_config, quiet_flower

    t0 = time.perf_counter()
    prep = prepare(sim_config(n, lsq), work / f"n{n}", progress=log)
    if len(prep.clients) != n:
        raise RuntimeError(f"asked for {n} clients, the fleet has {len(prep.clients)}")
    m = stats_mirror(prep)
    prepare_s = time.perf_counter() - t0
    out: dict = {"bare": [], "error": None}
    timeout = prep.cfg.server.reply_timeout_s
    server_app = ServerApp()

    @server_app.main()
    def _main(grid, context) -> None:
        try:
            wait_for_nodes(grid, n, prep.cfg.server.wait_s)
            nodes = sorted(int(x) for x in grid.get_node_ids())
            for i in range(bare_before):
                out["bare"].append(dict(bare_round(grid, nodes, m, i, timeout), when="before"))
                log(f"N={n} bare round {i + 1}: {out['bare'][-1]['wall_s']:.2f} s")
            t = time.perf_counter()
            run_server(grid, prep.cfg.server, prep.initial, prep.out / "server",
                       on_round=lambda r: log(f"N={n} fedquant round {r['round']} {r['job']}: "
                                              f"{r['wall_s']:.2f} s, {r['replies']} replies"))
            out["fedquant_total_s"] = time.perf_counter() - t
            for i in range(bare_after):
                out["bare"].append(dict(bare_round(grid, nodes, m, bare_before + i, timeout), when="after"))
                log(f"N={n} bare round {bare_before + i + 1}: {out['bare'][-1]['wall_s']:.2f} s")
        except BaseException:  # noqa: BLE001 -- reported after the simulation ends
            out["error"] = traceback.format_exc()

    quiet_flower()
    t1 = time.perf_counter()
    run_simulation(server_app, client_app(prep, m), num_supernodes=n, backend_config=backend_config(prep.cfg))
    sim_s = time.perf_counter() - t1
    if out["error"]:
        raise RuntimeError(f"N={n}: the ServerApp failed:\n{out['error']}")
    rounds = [json.loads(line) for line in (prep.out / "server" / "metrics.jsonl").read_text().splitlines()]
    return summarize_n(n, rounds, out, mirror_sizes(m), prepare_s, sim_s)


def summarize_n(n: int, rounds: list[dict], out: dict, sizes: dict, prepare_s: float, sim_s: float) -> dict:
    bare = out["bare"]
    warm = [b["wall_s"] for b in bare[1:]] or [b["wall_s"] for b in bare]
    bare_med = pystats.median(warm)
    bare_msg = bare_med / n
    jobs = {}
    for r in rounds:
        per_msg = r["wall_s"] / r["sampled"] if r["sampled"] else None
        jobs[r["job"]] = {
            "round": r["round"], "wall_s": r["wall_s"], "sampled": r["sampled"], "replies": r["replies"],
            "rejections": r["rejections"], "roster_joined": r.get("roster_joined", 0),
            "per_message_s": per_msg, "replies_per_s": r["replies"] / r["wall_s"],
            "vs_bare_per_message": per_msg / bare_msg if per_msg else None,
            "bytes_down_per_client": r["bytes_down_per_client"], "bytes_up_per_client": r["bytes_up_per_client"]}
    return {"clients": n, "prepare_s": prepare_s, "simulation_s": sim_s,
            "fedquant_total_s": out.get("fedquant_total_s"),
            "bare_rounds": bare, "bare_median_s": bare_med, "bare_per_message_s": bare_msg,
            "bare_replies_per_s": n / bare_med, "bare_payload": sizes, "jobs": jobs}


# ------------------------------------------------------------------------------ SmolLM2 layout

def smollm2_qparams():
    """SmolLM2-135M's int8 QParams layout (what quant.instrument gives it: an input and a
    per-channel weight point per Linear, lm_head included; 211 + 211 points)."""
    from quant.qparams import PointParams, QParams
    from quant.spec import activation_spec, weight_spec

    a, w = activation_spec(8), weight_spec(8)
    s = SMOLLM2
    outs = {"self_attn.q_proj": s["hidden"], "self_attn.k_proj": s["kv"], "self_attn.v_proj": s["kv"],
            "self_attn.o_proj": s["hidden"], "mlp.gate_proj": s["intermediate"],
            "mlp.up_proj": s["intermediate"], "mlp.down_proj": s["hidden"]}
    linears = {f"model.layers.{i}.{k}": c for i in range(s["layers"]) for k, c in outs.items()}
    linears["lm_head"] = s["vocab"]
    points = {}
    for path, c in linears.items():
        points[f"{path}:input"] = PointParams(a, np.float32(0.05), np.uint8(128))
        points[f"{path}:weight"] = PointParams(w, np.full(c, 0.01, np.float32), np.zeros(c, np.int8))
    return QParams(points, model="smollm2-layout")


def layout_check(qp) -> dict | None:
    """Compare the layout with the SmolLM2 int8 QParams bench/client_jobs.py caches, if present."""
    from quant.qparams import load_qparams
    from simulation.models import smollm2_cache_dir

    f = cache_dir() / smollm2_cache_dir().name / "int8" / "model.qdq.qparams.safetensors"
    if not f.is_file():
        return None
    ref = load_qparams(f)
    same = set(ref.points) == set(qp.points) and all(
        ref.points[k].scale.shape == qp.points[k].scale.shape and ref.points[k].spec == qp.points[k].spec
        for k in qp.points)
    return {"file": shown_path(f), "same_keys_shapes_specs": bool(same)}


# ------------------------------------------------------------------------------ pure aggregation

def grids_for(keys, bins: int) -> dict:
    from quant.stats import grid_from_absmax

    return {k: grid_from_absmax([4.0], bins) for k in keys}


def synthetic_stats(ins, rng, values: int):
    from quant.stats import ActivationStats
    from quant.wire import StatsReply

    return StatsReply({k: ActivationStats.from_values(rng.normal(0, 1, values).astype(np.float32), g.lo, g.hi, g.bins)
                       for k, g in ins.grids.items()})


def synthetic_lsq(ins, rng):
    from quant.wire import LsqReply

    pts = ins.qparams.points
    return LsqReply({k: (rng.normal(0, 0.01, pts[k].scale.shape)).astype(np.float32) for k in ins.keys},
                    {k: (rng.normal(0, 1e-4, pts[k].scale.shape)).astype(np.float32) for k in ins.keys},
                    1.0, 0.9)


def aggregation(qp, replies: int, values: int, seed: int = 0, distinct: int = 16) -> dict:
    """``replies`` valid stats and lsq replies (``distinct`` different ones, cycled) through
    validate (decode + checks) and then apply_round; the stats split into sum and calibration."""
    from server.aggregate import ranges_for_profile, sum_statistics
    from server.config import RoundSpec, ServerConfig
    from server.rounds import Accepted, activation_keys, apply_round
    from server.state import initial_state
    from server.validate import Rejection, validate_lsq_reply, validate_stats_reply
    from quant.wire import Instruction, encode_lsq_reply, encode_stats_reply

    rng = np.random.default_rng(seed)
    keys = activation_keys(qp)
    config = ServerConfig(schedule=[{"job": "scout"}, {"job": "stats"}, {"job": "lsq"}], bins=BINS)
    state = replace(initial_state({PROFILE: qp}, "bench"), round=1, grids=grids_for(keys, BINS))
    out = {"points": len(keys), "all_points": len(qp.points), "bins": BINS, "replies": replies,
           "values_per_point_per_reply": values, "distinct_replies": min(distinct, replies)}

    ins = Instruction(2, "stats", qp, grids=state.grids)
    enc = []
    for _ in range(min(distinct, replies)):
        flat, header = encode_stats_reply(synthetic_stats(ins, rng, values), ins)
        enc.append((flat, json.dumps(header)))
    out["stats_reply_bytes"] = int(sum(a.nbytes for a in enc[0][0].values()) + len(enc[0][1]))
    t = time.perf_counter()
    decoded = [validate_stats_reply(*enc[i % len(enc)], ins, 1, config.validation) for i in range(replies)]
    out["stats_validate_s"] = time.perf_counter() - t
    bad = [r for r in decoded if isinstance(r, Rejection)]
    if bad:
        raise RuntimeError(f"synthetic stats reply rejected: {bad[0]}")
    acc = {PROFILE: [Accepted(f"c{i}", 1, r) for i, r in enumerate(decoded)]}
    t = time.perf_counter()
    new, metrics = apply_round(state, 2, RoundSpec(job="stats"), acc, [], config)
    out["stats_aggregate_s"] = time.perf_counter() - t
    if not metrics["applied"] or new.qparams[PROFILE].version != qp.version + 1:
        raise RuntimeError(f"the stats round did not apply: {metrics}")
    t = time.perf_counter()
    merged = sum_statistics([r.stats for r in decoded])
    out["stats_sum_s"] = time.perf_counter() - t
    t = time.perf_counter()
    ranges_for_profile(merged, {k: qp.points[k].spec for k in keys}, config.calibrator)
    out["stats_calibrate_s"] = time.perf_counter() - t
    out["widened"] = len(metrics.get("widened", []))

    ins = Instruction(3, "lsq", qp, keys=tuple(keys))
    enc = []
    for _ in range(min(distinct, replies)):
        flat, header = encode_lsq_reply(synthetic_lsq(ins, rng), ins)
        enc.append((flat, json.dumps(header)))
    out["lsq_reply_bytes"] = int(sum(a.nbytes for a in enc[0][0].values()) + len(enc[0][1]))
    t = time.perf_counter()
    decoded = [validate_lsq_reply(*enc[i % len(enc)], ins, 1, config.validation) for i in range(replies)]
    out["lsq_validate_s"] = time.perf_counter() - t
    bad = [r for r in decoded if isinstance(r, Rejection)]
    if bad:
        raise RuntimeError(f"synthetic lsq reply rejected: {bad[0]}")
    acc = {PROFILE: [Accepted(f"c{i}", 1, r) for i, r in enumerate(decoded)]}
    t = time.perf_counter()
    _, metrics = apply_round(replace(state, round=2), 3, RoundSpec(job="lsq"), acc, [], config)
    out["lsq_aggregate_s"] = time.perf_counter() - t
    if not metrics["applied"]:
        raise RuntimeError(f"the lsq round did not apply: {metrics}")
    for job in ("stats", "lsq"):
        out[f"{job}_total_s"] = out[f"{job}_validate_s"] + out[f"{job}_aggregate_s"]
    return out


# ------------------------------------------------------------------------------ bytes

def smollm2_bytes(qp, count_dtypes=("uint16", "uint32")) -> dict:
    """Instruction and reply payload bytes per job for SmolLM2's layout, with quant.wire (computed,
    not measured): stats replies with each count dtype (the smallest that holds a client's largest
    bin count: uint16 up to 65535 values in a bin, uint32 beyond)."""
    from quant.wire import (Instruction, ScoutReply, encode_instruction, encode_lsq_reply,
                            encode_scout_reply, encode_stats_reply, payload_nbytes)
    from server.rounds import activation_keys

    rng = np.random.default_rng(0)
    keys = activation_keys(qp)
    grids = grids_for(keys, BINS)
    ins = {"scout": Instruction(1, "scout", qp, keys=tuple(keys)),
           "stats": Instruction(2, "stats", qp, grids=grids),
           "lsq": Instruction(3, "lsq", qp, keys=tuple(keys))}
    down = {j: payload_nbytes(*encode_instruction(i)) for j, i in ins.items()}
    up = {"scout": payload_nbytes(*encode_scout_reply(ScoutReply({k: (-1.0, 1.0) for k in keys},
                                                                 {k: 1000 for k in keys}), ins["scout"])),
          "lsq": payload_nbytes(*encode_lsq_reply(synthetic_lsq(ins["lsq"], rng), ins["lsq"]))}
    st = synthetic_stats(ins["stats"], rng, 64)
    for dt in count_dtypes:
        up[f"stats_{dt}"] = payload_nbytes(*encode_stats_reply(st, ins["stats"], count_dtype=dt))
    return {"down": down, "up": up}


def float_weight_bytes_tiny() -> int:
    from simulation.models import load_model

    model, _ = load_model("tiny-llama")
    return int(sum(p.numel() * p.element_size() for p in model.parameters()))


# ------------------------------------------------------------------------------ main

def _machine() -> dict:
    return machine(versions=versions(("flwr", "ray", "onnxruntime", "numpy", "torch")))


def target(value, bound, what) -> dict:
    ok = value is not None and math.isfinite(value) and value <= bound
    return {"value": value, "at_most": bound, "met": bool(ok), "what": what}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="N = 10, no lsq round, one bare round before and after, 20 tiny replies to aggregate")
    ap.add_argument("--clients", type=int, nargs="*", default=None, help="N values (default 10 100 1000)")
    ap.add_argument("--lsq-max", type=int, default=None, help="run the lsq round only for N <= this "
                    "(default 1000; quick 0: loading torch on the actors takes ~20 s)")
    ap.add_argument("--bare-before", type=int, default=None, help="bare rounds before fedquant's (default 2; quick 1)")
    ap.add_argument("--bare-after", type=int, default=None, help="bare rounds after (default 2; quick 1)")
    ap.add_argument("--agg-models", nargs="*", default=None, choices=("tiny-llama", "smollm2-layout"),
                    help="aggregation layouts (default both; quick tiny-llama: SmolLM2's calibration takes ~30 s)")
    ap.add_argument("--agg-replies", type=int, default=None, help="replies to aggregate (default 1000; quick 20)")
    ap.add_argument("--only-aggregation", action="store_true",
                    help="only the aggregation part, SmolLM2 layout (no Flower, no tiny model): prints its JSON "
                         "and writes it to --out only if given")
    ap.add_argument("--work", default=None, help="keep the run directories here (default: a temp dir)")
    ap.add_argument("--out", default=None, help=f"JSON path (default {DEFAULT_OUT.relative_to(ROOT)})")
    args = ap.parse_args(argv)

    t_start = time.perf_counter()
    if args.only_aggregation:
        n_agg = args.agg_replies or 1000
        log(f"aggregation only: {n_agg} replies, SmolLM2 layout")
        res = {"aggregation": {"smollm2-layout": aggregation(smollm2_qparams(), n_agg, values=4096)},
               "machine": dict(_machine(), load_avg_1_5_15=os.getloadavg())}
        res["wall_s"] = round(time.perf_counter() - t_start, 1)
        print(json.dumps(res, indent=1))
        if args.out:
            write_json(Path(args.out), res)
        return res
    ns = args.clients or ([10] if args.quick else [10, 100, 1000])
    agg_n = args.agg_replies or (20 if args.quick else 1000)
    lsq_max = args.lsq_max if args.lsq_max is not None else (0 if args.quick else 1000)
    before = args.bare_before if args.bare_before is not None else (1 if args.quick else 2)
    after = args.bare_after if args.bare_after is not None else (1 if args.quick else 2)
    agg_models = args.agg_models or (["tiny-llama"] if args.quick else ["tiny-llama", "smollm2-layout"])
    out = Path(args.out) if args.out else DEFAULT_OUT
    tmp = tempfile.TemporaryDirectory(prefix="flower-rounds-") if args.work is None else None
    work = Path(args.work or tmp.name)
    load = [os.getloadavg()]

    runs = {}
    for n in ns:
        log(f"--- N = {n}")
        runs[str(n)] = run_n(n, work, n <= lsq_max, before, after)
        load.append(os.getloadavg())

    from simulation.models import SMOLLM2_PARAMS
    from quant.qparams import load_qparams

    tiny_qp = load_qparams(work / f"n{ns[0]}" / "initial" / f"{PROFILE}.safetensors")
    smol_qp = smollm2_qparams()
    log(f"aggregation: {agg_n} replies, tiny ({len(tiny_qp.points)} points) and SmolLM2 layout")
    layouts = {"tiny-llama": (tiny_qp, 32 * 64), "smollm2-layout": (smol_qp, 4096)}
    agg = {m: aggregation(layouts[m][0], agg_n, values=layouts[m][1]) for m in agg_models}
    load.append(os.getloadavg())

    tiny_float = float_weight_bytes_tiny()
    smol_float = SMOLLM2_PARAMS * 4
    smol = smollm2_bytes(smol_qp)
    bytes_ = {
        "tiny-llama": {"source": "measured (metrics.jsonl: payload_nbytes = flat arrays + JSON header)",
                       "float_weight_bytes": tiny_float, "per_job": {}},
        "smollm2": {"source": "computed with quant.wire for SmolLM2's int8 QParams layout (211 activation + "
                              "211 per-channel weight points, 512 bins); not run",
                    "float_weight_bytes": smol_float, "layout_check": layout_check(smol_qp), "per_job": {}}}
    for job, j in runs[str(ns[0])]["jobs"].items():
        d, u = j["bytes_down_per_client"], j["bytes_up_per_client"]
        bytes_["tiny-llama"]["per_job"][job] = {"down": d, "up": u, "down_vs_float": d / tiny_float,
                                                "up_vs_float": u / tiny_float, "total_vs_float": (d + u) / tiny_float}
    for job in ("scout", "stats", "lsq"):
        d = smol["down"][job]
        u = smol["up"][job] if job != "stats" else smol["up"]["stats_uint32"]
        bytes_["smollm2"]["per_job"][job] = {"down": d, "up": u, "down_vs_float": d / smol_float,
                                             "up_vs_float": u / smol_float, "total_vs_float": (d + u) / smol_float}
    bytes_["smollm2"]["stats_up_by_count_dtype"] = {k: v for k, v in smol["up"].items() if k.startswith("stats_")}
    bytes_["smollm2"]["stats_note"] = "stats up uses uint32 counts (a bin over 65535 values); uint16 is listed too"

    # ratios and targets
    ratios, targets = {}, {}
    for n, r in runs.items():
        for job, j in r["jobs"].items():
            ratios[f"{job}_per_message_vs_bare_N{n}"] = j["vs_bare_per_message"]
        targets[f"stats_per_message_vs_bare_N{n}"] = target(
            r["jobs"]["stats"]["vs_bare_per_message"], TARGETS["stats_per_message_vs_bare"],
            "stats round wall / sampled clients over the median warm bare round / N, same simulation")
    for model, b in bytes_.items():
        if "lsq" in b["per_job"]:
            targets[f"lsq_bytes_vs_float_weights_{model}"] = target(
                b["per_job"]["lsq"]["total_vs_float"], TARGETS["lsq_bytes_vs_float_weights"],
                f"lsq round bytes down + up per client / float weight bytes ({b['source'].split(' ')[0]})")
    for model, a in agg.items():
        targets[f"aggregate_{model}"] = target(
            max(a["stats_aggregate_s"], a["lsq_aggregate_s"]), TARGETS["aggregate_1000_s"],
            f"apply_round of {a['replies']} replies, the slower of stats and lsq (target: 1000 replies)")
        targets[f"validate_plus_aggregate_{model}"] = target(
            max(a["stats_total_s"], a["lsq_total_s"]), TARGETS["aggregate_1000_s"],
            f"decode + validate + apply_round of {a['replies']} replies, the slower of stats and lsq "
            f"(reported beside)")

    result = {
        "quick": args.quick, "model": "tiny-llama", "profile": PROFILE, "bins": BINS,
        "machine": dict(_machine(), load_avg_1_5_15=load),
        "engine": {"backend": "ray", "num_cpus": 2, "client_cpus": 1},
        "data": {"seq_len": 32, "train_sequences": 1, "test_sequences": 0},
        "learn": {"steps": 1, "batch_size": 1},
        "lsq_run_for": [n for n in ns if n <= lsq_max], "aggregation_replies": agg_n,
        "definitions": {
            "per_message_s": "round wall_s / sampled clients (fedquant) or bare round wall / N",
            "fedquant_round": "metrics.jsonl wall_s: roster refresh, sampling, encoding, send_and_receive, "
                              "validation, apply_round, checkpoint (the scout round also holds the hello to "
                              "every node: 2 messages per client)",
            "bare_round": "N train.bare messages with the stats instruction's arrays and config, each "
                          "answered with a fresh copy of a real stats reply (the most common size of 8 "
                          "nodes); the first bare round (actors load the ClientApp) is left out of the median",
            "bytes": "quant.wire payload_nbytes (flat arrays + JSON header); Flower adds ~130 bytes per "
                     "array and its message metadata"},
        "runs": runs, "aggregation": agg, "bytes": bytes_, "ratios": ratios, "targets": targets,
    }
    result["wall_s"] = round(time.perf_counter() - t_start, 1)
    write_json(out, result)
    print(table(result))
    log(f"wrote {out} in {result['wall_s']} s")
    if tmp is not None:
        tmp.cleanup()
    return result


def table(res: dict) -> str:
    lines = ["| N | round | wall s | replies/s | ms/message | bare ms/message | x bare | down B | up B |",
             "|---|---|---|---|---|---|---|---|---|"]
    for n, r in res["runs"].items():
        for job, j in r["jobs"].items():
            lines.append(f"| {n} | {job} | {j['wall_s']:.2f} | {j['replies_per_s']:.1f} | "
                         f"{j['per_message_s'] * 1e3:.1f} | {r['bare_per_message_s'] * 1e3:.1f} | "
                         f"{j['vs_bare_per_message']:.2f} | {j['bytes_down_per_client']:.0f} | "
                         f"{j['bytes_up_per_client']:.0f} |")
    lines += ["", "| target | value | bound | met |", "|---|---|---|---|"]
    for k, t in res["targets"].items():
        lines.append(f"| {k} | {t['value']:.4g} | {t['at_most']} | {t['met']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
