"""What the protocol's GPTQ would give a finished run's final mixed QParams, without its hessian rounds
(a federated run each; here one pass over the text serves every ``--damp`` and client count).
Rotated, the mixed profile's error is its 4-bit weights' (issue 19, goal 3; ``mixed_gap_rotated.json``).

    .venv/bin/python -m bench.gptq_gap --run runs/splits/rotated/seed-0   # SmolLM2: ~10 min a row on 2 shared cores
    .venv/bin/python -m bench.gptq_gap --run runs/plan-smoke --json g.json # a configs/plan-smoke.toml run: seconds
    .venv/bin/python -m bench.gptq_gap --table --json bench/results/gptq_gap_seed0.json

Through the protocol's own functions, so a row is what hessian rounds (``stats_rule = "sum"``) would
commit: each client's train text (``--clients K``: the first K clients', a row per K) through the
client's hessian job (``client.jobs.hessian``), the sums added, the server's ``gptq_qparams`` (weight
points and codes), the device running the codes; evaluated as the server evaluates
(``bench.ood_gap.evaluate``) on the clients' held-out text, the held-out roles and the Factbook,
beside the run's final QParams. ``--moments factbook`` (or ``both``) takes the moments of Factbook
text of the countries the evaluation does not draw from instead of (or beside) the clients': what a
fleet holding text of the evaluated domain would give, a bound and not a recipe.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from bench.common import RESULTS, command_line, machine, quiet_env, shown_run, write_json
from bench.mixed_gap import PROFILE, final_mixed


def _cell(e: dict) -> str:
    lo, hi = e["vs_float_pct_ci"]
    return f"{e['vs_float_pct']:+.2f}% [{lo:+.1f}, {hi:+.1f}], KL {e['kl']:.4f}"


def markdown_table(result: dict) -> str:
    """The README's table of one run's result."""
    return seeds_table([result])


def seeds_table(results: list[dict]) -> str:
    """One table of several runs' results (a seed column), in the order given."""
    lines = ["| seed | the mixed profile's 4-bit weights | clients' own text | held-out roles | out of domain |",
             "|---|---|---|---|---|"]
    lines += [f"| {d['seed']} | {r['name']} | {_cell(r['clients_test'])} | {_cell(r['heldout'])} | {_cell(r['ood'])} |"
              for d in results for r in d["rows"]]
    return "\n".join(lines) + "\n"


def factbook_text(texts, n: int) -> np.ndarray:
    """``n`` windows of the Factbook's countries that the run's out-of-domain set does not draw from
    (``simulation.fleet.round_robin_sequences``, its own seed key): text of the evaluated domain
    that is not the evaluation's."""
    from simulation.factbook import load_backgrounds
    from simulation.fleet import round_robin_sequences

    used = {w["id"] for w in texts.ood_ids}
    rest = {d: v for d, v in load_backgrounds().items() if d not in used}
    ids, _ = round_robin_sequences(rest, texts.tokenizer, texts.cfg.data.seq_len, n, texts.cfg.data.seed,
                                   "gptq-moments")
    if len(ids) < n:
        raise SystemExit(f"the Factbook's countries outside the evaluation set give {len(ids)} windows, not {n}")
    return ids


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, help="a finished fedquant simulate run directory (read only)")
    ap.add_argument("--work", type=Path, default=None, help="float logits (default runs/mixed-gap/<run name>)")
    ap.add_argument("--json", type=Path, default=None,
                    help="default bench/results/gptq_gap_seed<data.seed>.json (the README's table reads them all)")
    ap.add_argument("--damp", type=float, nargs="+", default=[0.01],
                    help="GPTQ's dampening, a fraction of the mean diagonal (one row each)")
    ap.add_argument("--clients", type=int, nargs="+", default=None,
                    help="second moments of the first K clients' train text only, a row for each K (default: every "
                         "client's): how much text a fleet's moments need")
    ap.add_argument("--moments", choices=("clients", "factbook", "both"), default="clients",
                    help="whose text the moments are of: the clients' train text (the protocol's); Factbook "
                         "countries the run's out-of-domain set does not hold, as many sequences as the clients' "
                         "(a fleet of the evaluated domain: a bound, not a recipe); or both (a fleet of both domains)")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--table", action="store_true", help="only print the README table of --json (no run)")
    args = ap.parse_args(argv)
    if args.table:
        if args.json is None:
            ap.error("--table needs --json")
        res = json.loads(args.json.read_text())
        print(markdown_table(res))
        return res
    if args.run is None:
        ap.error("--run is required (or --table)")
    if args.clients and args.moments != "clients":
        ap.error("--clients takes the clients' text only (--moments clients)")
    quiet_env()
    import onnxruntime

    from bench.ood_gap import evaluate
    from client.jobs import hessian
    from quant.qparams import QParams
    from quant.wire import Instruction
    from server.rounds import gptq_qparams

    onnxruntime.set_default_logger_severity(3)
    t_start = time.perf_counter()
    texts, sets, rt, qp, _, floats = final_mixed(args.run, args.work, args.threads, args.batch_size)
    args.json = args.json or RESULTS / f"gptq_gap_seed{texts.cfg.data.seed}.json"
    weights = rt.linears.weights()      # read on access, as the server holds them (server_weights)
    # the Linears the server's GPTQ rounds in a profile of gptq = { bits = 4 } (server.rounds.gptq_paths)
    four = sorted(k.rsplit(":", 1)[0] for k, p in qp.points.items()
                  if k.endswith(":weight") and p.spec.bits == 4 and k.rsplit(":", 1)[0] in weights)
    if not four:
        raise SystemExit(f"{args.run}: no 4-bit Linear weights in its final {PROFILE} QParams")
    widths = {f"{p}:input": int(rt.linears.shape(p)[1]) for p in four}
    # a hessian round's instruction (server.rounds.instructions_for), every input in one round
    ins = Instruction(0, "hessian", QParams({}, qp.model, qp.version), keys=tuple(widths), hessian=widths)
    clients = [c.train for c in texts.clients if len(c.train)]
    counts = sorted(set(args.clients)) if args.clients else [len(clients)]
    if counts[0] < 1 or counts[-1] > len(clients):
        raise SystemExit(f"--clients: between 1 and {len(clients)} (the run's clients with train text)")
    whose = {"clients": "every client's train text"}
    if args.moments != "clients":
        other = factbook_text(texts, sum(len(c) for c in clients))
        whose = {"factbook": f"Factbook text of countries not evaluated ({len(other)} sequences)",
                 "both": f"every client's train text and Factbook text of countries not evaluated ({len(other)} "
                         "sequences)"}
        clients = [other] if args.moments == "factbook" else [*clients, other]
        counts = [len(clients)]
    result = {"format": "fedquant.gptq_gap/1", "machine": machine(onnxruntime=onnxruntime.__version__),
              "run": shown_run(args.run), "model": texts.cfg.model, "seed": texts.cfg.data.seed,
              "profile": PROFILE, "linears": len(four),
              "weights": int(sum(np.prod(rt.linears.shape(p)) for p in four)),    # codes: half a byte each
              "texts": {n: {"sequences": int(len(v))} for n, v in sets.items()}, "rows": [],
              "command": command_line("bench.gptq_gap", argv)}

    def row(name: str, new, **about) -> dict:
        r = {"name": name, **about, **evaluate(rt, new, sets, floats, args.batch_size, texts.cfg.data.seed)}
        if sorted(rt.qparams.codes) != sorted(new.codes):       # the device rounds the others itself
            raise SystemExit(f"{name}: the runtime holds codes of {len(rt.qparams.codes)} weights, the QParams "
                             f"{len(new.codes)}")
        r["codes"] = len(new.codes)     # the weights the device ran from the QParams' codes
        result["rows"].append(r)
        result["wall_s"] = round(time.perf_counter() - t_start, 1)
        write_json(args.json, result)
        print(f"{name}: " + "; ".join(f"{t} {r[t]['vs_float_pct']:+.2f}% KL {r[t]['kl']:.4f}" for t in sets)
              + f" ({r['seconds']} s)", file=sys.stderr, flush=True)
        return r

    row("round to nearest: the run's final QParams" if not qp.codes else
        f"the run's final QParams (GPTQ's codes of {len(qp.codes)} weights)", qp)
    moments: dict[str, np.ndarray] = {}
    tokens, done = 0, 0
    result["second_moments"] = []
    for k in counts:
        t0 = time.perf_counter()
        # each client's reply, summed: the server's pooled mean (server.aggregate.merge_hessians) is this
        # over the token count, a factor GPTQ ignores (its dampening is a fraction of the mean diagonal)
        for c in clients[done:k]:
            reply, _ = hessian(rt, ins, c, args.batch_size)
            for n, v in reply.sums.items():
                if n in moments:
                    moments[n] += v
                else:
                    moments[n] = v
            tokens += reply.tokens
        done = k
        result["second_moments"].append({"clients": k, "tokens": tokens, "seconds": round(time.perf_counter() - t0, 1)})
        text = (whose[args.moments] if args.clients is None
                else f"{k} of {len(clients)} clients' train text ({tokens} tokens)")
        for damp in args.damp:
            t0 = time.perf_counter()
            new, info = gptq_qparams(qp, moments, four, weights, damp, int(qp.version) + 1)
            if not info["rounded"]:
                raise SystemExit(f"GPTQ rounded none of the {len(four)} Linears at damp {damp:g}: {info['failed'][:1]}")
            # failed: Linears whose damped moment stayed singular, left at the run's point (up to 5 named)
            row(f"GPTQ, {text}, damp {damp:g}", new, damp=damp, clients=k, tokens=tokens,
                gptq_s=round(time.perf_counter() - t0, 1), rounded=info["rounded"],
                failed=len(four) - info["rounded"], **({"failures": info["failed"]} if info["failed"] else {}))
    result["wall_s"] = round(time.perf_counter() - t_start, 1)
    write_json(args.json, result)
    print(markdown_table(result))
    print(f"wrote {args.json} in {result['wall_s']} s", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
