"""Weight ranges by rounding error instead of min-max, on finished runs' final QParams (issue 19,
goal 3): how much of a profile's error is its weights' ranges, and what the fleet's own statistic
would buy.

    .venv/bin/python -m bench.weight_ranges --runs runs/default      # SmolLM2: about 8 min a run
    .venv/bin/python -m bench.weight_ranges --runs runs/smoke --out weight_ranges.json   # any run

For each run directory and profile: the final federated QParams as the run left them (weights at
their min-max range per channel or group, ``min-max``), then the same QParams with every weight
point replaced by ``quant.weight_ranges.weight_point``: ``mse`` (the clipping ratio of each
channel or group with the least squared rounding error: needs no data) and ``importance`` (that
error weighted per input column by ``E[x_j^2]``, the mean square of the Linear's input -- divided by
its SmoothQuant factors where it has them -- over every client's training text, from the float
graph as a client job reads it: what a fleet could sum in its scouting round). Activation points,
smoothing and the graph are the run's. Each variant is evaluated as the server evaluates a run
(``simulation.evaluation``: perplexity vs float, KL(float || quantized), top-1, bootstrap 95%
intervals) on the run's held-out roles and the out-of-domain text; the ``min-max`` row must equal
the server's own evaluation of the final QParams (checked). The activation ranges were learned with
min-max weights, so the other rows are a lower bound of what learning with them would give.
Writes ``bench/results/weight_ranges.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from bench.common import RESULTS, ROOT, command_line, finished_run, machine, quiet_env, shown_run, write_json

KEEP = ("perplexity", "float_perplexity", "vs_float_pct", "vs_float_pct_ci", "kl", "kl_ci", "top1", "top1_ci")
VARIANTS = ("min-max", "mse", "importance")


def input_importance(rt, smoothing, seqs: np.ndarray, paths: list[str], batch_size: int) -> dict[str, np.ndarray]:
    """Per Linear: the mean over tokens of ``(x_j / m_j)^2`` per input channel on ``seqs`` (float
    graph; ``m`` the Linear's smoothing factors, 1 without)."""
    keys = [f"{p}:input" for p in paths]
    sums = {k: 0.0 for k in keys}
    count = 0
    for i in range(0, len(seqs), batch_size):
        acts = rt.capture.run(seqs[i:i + batch_size], keys, smoothing)
        for k, x in acts.items():
            x = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
            sums[k] = sums[k] + (x * x).sum(axis=0)
        count += int(np.prod(seqs[i:i + batch_size].shape))
    return {k.rsplit(":", 1)[0]: v / count for k, v in sums.items()}


def evaluate_run(run: Path, eval_sequences: int, ood_sequences: int, batch_size: int, threads: int,
                 profiles: list[str] | None = None) -> dict:
    from quant.qparams import load_qparams, rotation_block
    from quant.smoothing import fold_weight
    from quant.weight_ranges import weight_point
    from simulation.evaluation import ServerEval

    texts = finished_run(run, eval_sequences, ood_sequences)
    cfg, clients, evals, ood, run_texts = texts.cfg, texts.clients, texts.evals, texts.ood, texts.own
    train = np.concatenate([c.train for c in clients if len(c.train)])
    ev = ServerEval(run / "device", evals, threads, batch_size, ood=ood, seed=cfg.data.seed)
    out = {"run": shown_run(run), "config": cfg.name, "seed": cfg.data.seed, "train_sequences": int(len(train)),
           "profiles": {}}
    for profile in sorted(p.name for p in (run / "device").iterdir() if (p / "model.onnx").is_file()):
        final = run / "qparams" / f"{profile}.safetensors"
        if not final.is_file() or (profiles is not None and profile not in profiles):
            continue
        t0 = time.perf_counter()
        qp = load_qparams(final)
        rt = ev.runtime(profile)
        paths = sorted(k.rsplit(":", 1)[0] for k in qp.points if k.endswith(":weight"))
        if any(p not in rt.linears for p in paths):
            raise SystemExit(f"{final}: weight points of Linears the {profile} model lacks")
        importance = input_importance(rt, qp.smoothing, train, paths, batch_size)
        variants = {"min-max": qp}
        for name, h in (("mse", None), ("importance", importance)):
            pts = {}
            for p in paths:
                m = qp.smoothing.get(p)
                w0 = rt.linears[p][0]
                r = rotation_block(qp, p)       # a rotated per-token Linear quantizes (W * m) R
                w = fold_weight(w0, m, r)
                # E[x_j^2] is of the unrotated channels: a rotated Linear's columns get none
                pts[f"{p}:weight"] = weight_point(w, qp.points[f"{p}:weight"].spec,
                                                  None if h is None or r else h[p])
            variants[name] = qp.with_points(pts)
        row = {"weight_points": len(paths), "variants": {}}
        for name, v in variants.items():
            res = ev(profile, v)
            row["variants"][name] = {"heldout": {k: res.get(k) for k in KEEP},
                                     "ood": {k: res["ood"].get(k) for k in KEEP}}
            print(f"{run.name} {profile} {name}: held-out {res['vs_float_pct']:+.2f}% KL {res['kl']:.4f}; "
                  f"out of domain {res['ood']['vs_float_pct']:+.2f}% KL {res['ood']['kl']:.4f}", file=sys.stderr)
        summary = run / "summary.json"
        evals_done = json.loads(summary.read_text())["profiles"][profile].get("federated_eval") \
            if summary.is_file() and (eval_sequences, ood_sequences) == run_texts else None
        if evals_done:          # the run's last evaluation round saw these QParams
            assert row["variants"]["min-max"]["heldout"]["perplexity"] == evals_done[-1]["perplexity"], \
                f"{run.name} {profile}: min-max row != the server's last evaluation of the final QParams"
        row["checked_against_server"] = bool(evals_done)
        row["seconds"] = round(time.perf_counter() - t0, 1)
        out["profiles"][profile] = row
        rt.release(session=True)
    return out


def markdown_table(d: dict) -> str:
    """Per profile and variant, across runs: change vs float, mean (min, max), and KL, on both texts."""
    def cell(vals):
        p, k = [v["vs_float_pct"] for v in vals], [v["kl"] for v in vals]
        spread = f" ({min(p):+.2f}, {max(p):+.2f})" if len(p) > 1 else ""
        return f"{statistics.fmean(p):+.2f}%{spread}; KL {statistics.fmean(k):.3f}"
    what = {"min-max": "min-max (the run's)", "mse": "least squared rounding error (no data)",
            "importance": "least rounding error weighted by the clients' E[x^2] per input channel"}
    lines = ["| profile | weight ranges | held-out roles vs float; KL | out of domain |", "|---|---|---|---|"]
    profiles = sorted({p for r in d["runs"] for p in r["profiles"]})
    for prof in profiles:
        rows = [r["profiles"][prof] for r in d["runs"] if prof in r["profiles"]]
        for v in VARIANTS:
            lines.append(f"| {prof} | {what[v]} | {cell([r['variants'][v]['heldout'] for r in rows])} | "
                         f"{cell([r['variants'][v]['ood'] for r in rows])} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=Path, nargs="+", default=[ROOT / "runs" / "default"],
                    help="fedquant simulate run directories (read only)")
    ap.add_argument("--eval-sequences", type=int, default=64)
    ap.add_argument("--ood-sequences", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--profiles", nargs="+", default=None, help="only these profiles (default: every one)")
    ap.add_argument("--out", type=Path, default=RESULTS / "weight_ranges.json")
    args = ap.parse_args(argv)
    quiet_env()
    import onnxruntime

    onnxruntime.set_default_logger_severity(3)
    t0 = time.perf_counter()
    rows = [evaluate_run(r, args.eval_sequences, args.ood_sequences, args.batch_size, args.threads, args.profiles)
            for r in args.runs]
    result = {"format": "fedquant.weight_ranges/1", "machine": machine(onnxruntime=onnxruntime.__version__),
              "threads": args.threads, "runs": rows, "wall_s": round(time.perf_counter() - t0, 1),
              "command": command_line("bench.weight_ranges", argv)}
    write_json(args.out, result)
    print(markdown_table(result))
    print(f"wrote {args.out} in {result['wall_s']} s", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
