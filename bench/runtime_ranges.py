"""Quality of the runtime learned-range job (issue 17, ``client.learn_runtime``) on SmolLM2, from the
default run's post-statistics QParams, without a Flower run.

For each profile of configs/default.toml: start from the run's statistics-round QParams
(``qparams/<profile>.centralized.safetensors``: the default run's federated post-statistics
QParams have the same perplexity to 14 digits, summary.json), then ``--rounds`` learned-range rounds
in which *every* client of the profile runs ``learn_ranges_runtime`` on its own training sequences
(the job a device runs, on the run's device bundles) and the server's functions aggregate the
replies as configs/default.toml does (coordinate median of the deltas, each log-s step bounded by
log(round_factor), FedAvg step, integer zero-points at the end). Beside it, the *pooled* reference:
every client's weighted histograms summed and searched once (what a server holding all the data
would pick with the same objective). Each QParams set is evaluated with the ONNX Runtime integer
model on the run's 64 held-out sequences (``simulation.evaluation.ServerEval``: perplexity, KL to
float, bootstrap intervals), beside the default run's own numbers for the torch LSQ job.

    .venv/bin/python -m bench.runtime_ranges --run runs/default          # ~30 min on 2 cores
    .venv/bin/python -m bench.runtime_ranges --run runs/default --objective input  # plain MSE

The run directory is only read (its device directory, the nodes' training data, its QParams).
The evaluation set is the current configs/default.toml's (64 sequences across the held-out roles),
so the torch job's final QParams of the run are evaluated here too, on the same sequences.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np

from bench.common import RESULTS, ROOT, machine, quiet_env, write_json

quiet_env()


def _aggregate(x: dict, replies: list, keys: list[str], round_factor: float) -> dict:
    """server.rounds._lsq's median rule with FedAvg (server_lr 1): the new global (log s, beta)."""
    from server.aggregate import bounded_step, coordinate_median, fedavg_step

    deltas = [{**{f"log_s/{k}": r.delta_log_s[k] for k in keys}, **{f"beta/{k}": r.delta_beta[k] for k in keys}}
              for r in replies]
    d = coordinate_median(deltas)
    d = {k: bounded_step(v, math.log(round_factor)) if k.startswith("log_s/") else v for k, v in d.items()}
    return fedavg_step(x, d, 1.0)


def _with_learned(qp, x: dict, keys: list[str]):
    from server.aggregate import to_integer_qparams

    pts = to_integer_qparams({k: x[f"log_s/{k}"] for k in keys}, {k: x[f"beta/{k}"] for k in keys},
                             {k: qp.points[k].spec for k in keys})
    return qp.with_points(pts, version=qp.version + 1)


def load_run(run_dir: Path, log=print):
    """What the harness needs of a finished run, read only: its device directory, each node's
    profile and training sequences (the ones the run's clients used), and the evaluation set of
    the *current* configs/default.toml (64 sequences across the held-out roles; the data config
    is otherwise the run's, so the held-out roles are the same)."""
    from simulation.fleet import build_fleet
    from simulation.models import load_smollm2
    from simulation.prepare import load_simulation_config

    cfg = load_simulation_config(ROOT / "configs" / "default.toml")
    held = json.loads((run_dir / "run.json").read_text())["config"]["data"]
    for k in ("source", "clients", "seq_len", "train_sequences", "heldout_fraction", "seed"):
        if held.get(k) != getattr(cfg.data, k):
            raise ValueError(f"{run_dir}: data.{k} = {held.get(k)!r}, configs/default.toml has {getattr(cfg.data, k)!r}")
    fleet = json.loads((run_dir / "device" / "fleet.json").read_text())["nodes"]
    nodes = []
    for pid in sorted(fleet, key=int):
        with np.load(run_dir / "device" / fleet[pid]["data"], allow_pickle=False) as z:
            nodes.append({"pid": int(pid), "profile": fleet[pid]["profile"], "train": z["train"].astype(np.int64)})
    model, tok = load_smollm2()
    del model
    _, evals, _ = build_fleet(cfg.data, tok, [(e.load().name, e.share) for e in cfg.fleet])
    log(f"{len(nodes)} nodes, {len(evals)} evaluation sequences")
    return cfg, nodes, evals


def run(run_dir: Path, rounds: int, objective: str, profiles=None, log=print) -> dict:
    from client.learn_runtime import learn_ranges_runtime, local_histograms
    from client.runtime import DeviceRuntime
    from quant import reconstruct as rc
    from quant.learn_config import LearnConfig
    from quant.qparams import load_qparams
    from quant.wire import Instruction, encode_lsq_reply
    from server.aggregate import learned_from_qparams, to_integer_qparams
    from simulation.evaluation import ServerEval

    cfg, nodes, evals = load_run(run_dir, log)
    scfg = cfg.server
    ev = ServerEval(run_dir / "device", evals, cfg.threads, scfg.batch_size)
    learn = LearnConfig(method="runtime", objective=objective)
    summary = json.loads((run_dir / "summary.json").read_text())
    out: dict = {}
    for prof in profiles or sorted(summary["profiles"]):
        start = load_qparams(run_dir / "qparams" / f"{prof}.centralized.safetensors")
        torch_final = load_qparams(run_dir / "qparams" / f"{prof}.safetensors")
        keys = sorted(k for k in start.points if not k.endswith(":weight"))
        clients = [n for n in nodes if n["profile"] == prof]
        rt = DeviceRuntime(run_dir / "device" / prof / "model.onnx", threads=cfg.threads)
        rt.patch(start)
        ref = summary["profiles"][prof]
        lsq_rounds = [r["round"] for r in ref["bytes_up_per_client_round"] if r["job"] == "lsq"]
        res = {"clients": len(clients), "points": len(keys),
               "run_own_eval": {"sequences": summary["data"].get("eval_sequences"), "float_ppl": ref["float_ppl"],
                                "federated_ppl": ref["federated_ppl"]},
               "torch_job_rounds_with_this_profile": lsq_rounds}

        def evaluate(name, qp):
            t0 = time.perf_counter()
            r = ev(prof, qp)
            row = {k: r[k] for k in ("perplexity", "vs_float_pct", "vs_float_pct_ci", "kl", "kl_ci", "top1")}
            row["eval_s"] = round(time.perf_counter() - t0, 1)
            res["evaluated_on"] = len(evals)
            log(f"{prof} {name}: ppl {row['perplexity']:.3f} ({row['vs_float_pct']:+.2f}% vs float), KL {row['kl']:.4f}")
            res[name] = row

        evaluate("start", start)
        evaluate("torch_job_final", torch_final)
        qp = start
        log_s, beta = learned_from_qparams({k: start.points[k] for k in keys})
        x = {**{f"log_s/{k}": v for k, v in log_s.items()}, **{f"beta/{k}": v for k, v in beta.items()}}
        jobs = []
        for r in range(1, rounds + 1):
            rt.patch(qp.with_points({}, version=max(qp.version, rt.qparams.version)))
            ins = Instruction(round=10 + r, job="lsq", qparams=qp, keys=tuple(keys))
            replies = []
            for c in clients:
                reply, m = learn_ranges_runtime(rt, ins, c["train"], learn, batch_size=scfg.batch_size)
                flat, _ = encode_lsq_reply(reply, ins)
                m["reply_bytes"] = int(sum(np.asarray(a).nbytes for a in flat.values()))
                replies.append(reply)
                jobs.append({"round": r, "pid": c["pid"], "wall_s": m["wall_s"],
                             "numpy_peak_mb": m.get("numpy_peak_mb"), "reply_bytes": m["reply_bytes"],
                             "loss_before": m["loss_before"],
                             "loss_after": m["loss_after"]})
            x = _aggregate(x, replies, keys, scfg.round_factor)
            qp = _with_learned(qp, x, keys)
            log(f"{prof} round {r}: {len(replies)} replies, mean job {np.mean([j['wall_s'] for j in jobs[-len(clients):]]):.1f} s")
            evaluate(f"federated_round_{r}", qp)
        res["jobs"] = jobs
        # the pooled reference: every client's histograms summed, searched once (from the start)
        rt.patch(start.with_points({}, version=rt.qparams.version + 1))   # the start's ranges, a newer version
        ins = Instruction(round=10, job="lsq", qparams=start, keys=tuple(keys))
        pooled = None
        for c in clients:
            h = local_histograms(rt, ins, c["train"], learn, batch_size=scfg.batch_size)
            pooled = h if pooled is None else {k: rc.merge_weighted(pooled[k], h[k]) for k in keys}
        found = rc.reconstruct_points(pooled, {k: start.points[k] for k in keys})   # the device's own search
        pooled_ls = {k: found[k]["log_s"] for k in keys}
        pooled_b = {k: found[k]["beta"] for k in keys}
        pts = to_integer_qparams(pooled_ls, pooled_b, {k: start.points[k].spec for k in keys})
        evaluate("pooled", start.with_points(pts, version=start.version + 1))
        out[prof] = res
    return out


def _pct(row: dict) -> str:
    lo, hi = row["vs_float_pct_ci"]
    return f"{row['vs_float_pct']:+.2f}% [{lo:+.2f}, {hi:+.2f}]"


def readme_block(quality: dict, cost: dict | None, torch_cost: dict | None) -> str:
    """The README's tables (``bench.readme_tables``): cost of the jobs on one client's batch,
    quality after the learned-range rounds beside the torch job."""
    lines = []
    if cost is not None:
        med, r, m = cost["medians"], cost["ratios"], cost["machine"]
        b = cost["batch"]
        lines += [f"`.venv/bin/python -m bench.client_jobs --kinds learn_runtime --out "
                  f"bench/results/client_jobs_runtime.json` ({cost['model']}, profile {cost['profile']}, "
                  f"{b['sequences']} sequences of {b['seq_len']} tokens of one client, 1 ORT thread, medians of "
                  f"{cost['reps']} fresh processes; {m.get('cpu_model') or m['cpu']}, load average "
                  f"{cost['machine']['load_avg_1_5_15'][0][0]:.1f} at the start). Time: warm; memory: peak RSS over "
                  f"what was in use after loading, cold run.", "",
                  "| job | time s | peak MB | time / integer pass | memory / integer pass | target |",
                  "|---|---|---|---|---|---|",
                  f"| plain integer pass | {med['int']['warm_wall_s']:.2f} | {med['int']['cold_peak_mb']:.0f} | 1 | 1 | |",
                  f"| plain float pass | {med['float']['warm_wall_s']:.2f} | {med['float']['cold_peak_mb']:.0f} | "
                  f"{med['float']['warm_wall_s'] / med['int']['warm_wall_s']:.2f} | "
                  f"{med['float']['cold_peak_mb'] / med['int']['cold_peak_mb']:.2f} | |"]
        t = cost["targets"]
        lines.append(f"| learned ranges on the runtime (this job) | {med['learn_runtime']['warm_wall_s']:.2f} | "
                     f"{med['learn_runtime']['cold_peak_mb']:.0f} | {r['learn_runtime_time_vs_int']:.2f} | "
                     f"{r['learn_runtime_memory_vs_int']:.2f} | time <= 4: "
                     f"{'met' if t['learn_runtime_time_vs_int']['met'] else 'NOT met'}; memory <= 1.5: "
                     f"{'met' if t['learn_runtime_memory_vs_int']['met'] else 'NOT met'} |")
        if torch_cost is not None:
            tr = torch_cost["ratios"]
            lines.append(f"| learned ranges with torch (LSQ+, 2 steps; `client_jobs.json`, another run) | "
                         f"{torch_cost['medians']['learn']['warm_wall_s']:.1f} | "
                         f"{torch_cost['medians']['learn']['cold_peak_mb']:.0f} | {tr['learn_time_vs_int']:.1f} | "
                         f"{tr['learn_memory_vs_int']:.1f} | |")
        lines.append("")
    lines += [f"`.venv/bin/python -m bench.runtime_ranges --run runs/default` (objective "
              f"`{quality['objective']}`, every client of a profile in each of {quality['rounds']} rounds, "
              f"the default's rules; perplexity on the {next(iter(quality['profiles'].values()))['evaluated_on']} "
              f"held-out sequences of configs/default.toml with bootstrap 95% intervals; {quality['wall_s']:.0f} s). "
              "Source: `bench/results/runtime_ranges_output.json`.", "",
              "| profile | QParams | perplexity | vs float | KL to float | reply arrays per client per round |",
              "|---|---|---|---|---|---|"]
    for prof, res in quality["profiles"].items():
        bytes_ = sorted({j["reply_bytes"] for j in res["jobs"]})
        torch_rounds = len(res.get("torch_job_rounds_with_this_profile", []))
        rows = [("after statistics (start)", "start", "-"),
                (f"torch LSQ+ job, the run's final ({torch_rounds} round{'s' if torch_rounds != 1 else ''} with this profile)",
                 "torch_job_final", f"{bytes_[0]:,} B (the same reply encoding)")]
        rows += [(f"runtime job, round {r}", f"federated_round_{r}", f"{bytes_[0]:,} B")
                 for r in range(1, quality["rounds"] + 1)]
        rows += [("runtime objective on the pooled histograms (reference)", "pooled", "-")]
        for name, key, up in rows:
            if key in res:
                row = res[key]
                lines.append(f"| {prof} | {name} | {row['perplexity']:.2f} | {_pct(row)} | {row['kl']:.4f} | {up} |")
    return "\n".join(lines) + "\n"


def _shown(path: Path) -> str:
    """The run directory as results name it: relative to the repository when inside it, else
    its name alone (no developer's absolute path in a tracked file)."""
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return path.name


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", type=Path, default=ROOT / "runs" / "default", help="a finished default run (read only)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--objective", choices=("output", "input"), default="output")
    ap.add_argument("--profiles", nargs="*", default=None)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    res = {"bench": "runtime_ranges", "objective": args.objective, "rounds": args.rounds,
           "run": _shown(args.run), "profiles": run(args.run.resolve(), args.rounds, args.objective, args.profiles,
                                                  log=lambda m: print(m, flush=True)),
           "machine": machine()}
    res["wall_s"] = round(time.perf_counter() - t0, 1)
    out = args.out or RESULTS / f"runtime_ranges_{args.objective}.json"
    write_json(out, res)
    print(f"wrote {out} in {res['wall_s']} s")
    return res


if __name__ == "__main__":
    main()
