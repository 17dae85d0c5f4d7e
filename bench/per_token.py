"""Per-token inputs on finished runs' models: what quantizing chosen Linears' inputs per token at
run time, instead of at their static per-tensor ranges, does to fidelity and speed (issue 19, goal 3).

    .venv/bin/python -m bench.per_token        # runs/splits/static/seed-{0,1,2} (configs/quality/static.toml
                                               # through bench.splits): about 4 min a run
    .venv/bin/python -m bench.per_token --runs runs/smoke --out per_token.json   # any run with the profile
    .venv/bin/python -m bench.per_token --runs runs/splits/default-rt/seed-{0,1,2} \
        --linears '*.q_proj' '*.k_proj' '*.v_proj' '*.gate_proj' '*.up_proj' \
        --out bench/results/per_token_all.json    # the last static inputs of the int8 default before

For each run directory: the profile's final federated QParams in the run's own ONNX Runtime integer
model (``static``), and the same model with the Linears ``--linears`` (default ``*.down_proj``)
that still have a static input (a run may quantize some per token already: those stay as they are)
rewritten by ``quant.qdq.per_token_inputs`` (``per_token``: same QParams for every other point, the
same weights, the input of those Linears quantized per token into MatMulInteger). Both are evaluated
as the server evaluates a run (``simulation.evaluation``: perplexity vs float, KL(float || quantized),
top-1 agreement, bootstrap 95% intervals over sequences) on the run's held-out roles and on the
out-of-domain text. The static row must equal the server's own evaluation (checked), so the
difference of the two rows is the per-token inputs alone, on QParams learned without them: the
default config now learns with them (``per_token`` of its int8 fleet entry), which ``bench.splits``
measures. Latency: one batch through each session, alternated, median of ``--reps``; the ratio is
the figure (one machine, one run), with the CPU recorded. Writes ``bench/results/per_token.json``.
"""

from __future__ import annotations

import argparse
import fnmatch
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from bench.common import RESULTS, ROOT, command_line, finished_run, machine, quiet_env, shown_run, write_json

DEFAULT_RUNS = [ROOT / "runs" / "splits" / "static" / f"seed-{s}" for s in (0, 1, 2)]
KEEP = ("perplexity", "float_perplexity", "vs_float_pct", "vs_float_pct_ci", "kl", "kl_ci", "top1", "top1_ci")


def _latency(sessions: dict, ids: np.ndarray, reps: int) -> dict:
    """Median seconds of one forward of ``ids`` per session, the sessions alternated rep by rep
    (one warm-up each first) so that the machine's load falls on both alike."""
    feeds = {"input_ids": np.asarray(ids, np.int64)}
    for s in sessions.values():
        s.run(["logits"], feeds)
    times = {k: [] for k in sessions}
    for _ in range(reps):
        for k, s in sessions.items():
            t0 = time.perf_counter()
            s.run(["logits"], feeds)
            times[k].append(time.perf_counter() - t0)
    return {k: round(statistics.median(v), 4) for k, v in times.items()}


def evaluate_run(run: Path, profile: str, patterns: list[str], eval_sequences: int, ood_sequences: int,
                 batch_size: int, threads: int, reps: int) -> dict:
    import onnx

    from client.runtime import ort_session
    from quant.export import linear_paths
    from quant.qdq import count_matmuls, per_token_inputs
    from quant.qparams import QParams, load_qparams, per_token_linears
    from simulation.evaluation import ServerEval, fidelity_columns, fidelity_summary

    texts = finished_run(run, eval_sequences, ood_sequences)
    cfg, evals, ood = texts.cfg, texts.evals, texts.ood
    final = run / "qparams" / f"{profile}.safetensors"
    if not final.is_file():
        raise SystemExit(f"{run}: no final QParams of profile {profile!r} ({final.name})")
    sets = {"heldout": evals, "ood": ood}
    ev = ServerEval(run / "device", evals, threads, batch_size, ood=ood, seed=cfg.data.seed)
    rt = ev.runtime(profile)
    qp = load_qparams(final)
    already = set(per_token_linears(qp))        # rewritten by the run's own graph: left as they are
    if int(qp.version) < int(rt.qparams.version):
        qp = QParams(qp.points, qp.model, rt.qparams.version, qp.smoothing, qp.meta)
    server_view = ev(profile, qp)           # what the run's server computes for these QParams
    rt.patch(qp)
    paths = sorted(p for p in linear_paths(rt.model) if any(fnmatch.fnmatchcase(p, pat) for pat in patterns)
                   and p not in already)
    if not paths:
        raise SystemExit(f"{run}: --linears {patterns} match no Linear of the {profile} model with a static input "
                         f"({len(already)} already per token)")
    rewritten = onnx.ModelProto()
    rewritten.CopyFrom(rt.model)
    per_token_inputs(rewritten, paths)
    sessions, kernels = {}, {}
    for name, model in (("static", rt.model), ("per_token", rewritten)):
        opt = run.parent / f".per_token.{run.name}.{name}.opt.onnx"
        try:
            sessions[name] = ort_session(model, threads=threads, optimized_path=opt, weight_storage=None)
            kernels[name] = count_matmuls(onnx.load(opt, load_external_data=False))
        finally:
            for f in run.parent.glob(f".per_token.{run.name}.{name}.opt.onnx*"):
                f.unlink()
    out = {"run": shown_run(run), "config": cfg.name, "seed": cfg.data.seed, "profile": profile,
           "linears": len(paths), "already_per_token": len(already), "weight_storage": rt.weight_storage,
           "kernels": kernels, "variants": {}}
    float_logits = ev.float_logits
    for name, sess in sessions.items():
        row = {}
        for text, ids in sets.items():
            def logits(batch, s=sess):
                return s.run(["logits"], {"input_ids": np.asarray(batch, np.int64)})[0]
            res = fidelity_summary(fidelity_columns(logits, ids, batch_size, float_logits=float_logits), cfg.data.seed)
            row[text] = {k: res.get(k) for k in KEEP}
        out["variants"][name] = row
        print(f"{run.name} {name}: held-out {row['heldout']['vs_float_pct']:+.2f}% KL {row['heldout']['kl']:.4f}; "
              f"out of domain {row['ood']['vs_float_pct']:+.2f}% KL {row['ood']['kl']:.4f}", file=sys.stderr)
    ev._float = None
    static = out["variants"]["static"]
    assert static["heldout"]["perplexity"] == server_view["perplexity"], "static row != the server's evaluation"
    assert static["ood"]["perplexity"] == server_view["ood"]["perplexity"], "static row != the server's evaluation"
    lat = _latency(sessions, evals[:batch_size], reps)
    out["latency_s"] = {"batch": [int(min(batch_size, len(evals))), int(evals.shape[1])], "reps": reps, **lat,
                        "per_token_over_static": round(lat["per_token"] / lat["static"], 3)}
    rt.release(session=True)
    return out


def summary(rows: list[dict]) -> dict:
    """Across runs, per variant and text: mean, min and max of the change vs float and of KL."""
    out = {}
    for v in rows[0]["variants"]:
        out[v] = {}
        for text in ("heldout", "ood"):
            pct = [r["variants"][v][text]["vs_float_pct"] for r in rows]
            kl = [r["variants"][v][text]["kl"] for r in rows]
            out[v][text] = {"vs_float_pct": {"mean": statistics.fmean(pct), "min": min(pct), "max": max(pct)},
                            "kl": {"mean": statistics.fmean(kl), "min": min(kl), "max": max(kl)}}
    return out


def markdown_table(d: dict) -> str:
    def cell(s):
        p, k = s["vs_float_pct"], s["kl"]
        return f"{p['mean']:+.2f}% ({p['min']:+.2f}, {p['max']:+.2f}); KL {k['mean']:.3f}"
    lines = [f"| {d['profile']} model, final QParams | held-out roles vs float: mean (min, max); KL | "
             "out of domain | latency vs static |", "|---|---|---|---|"]
    ratios = [r["latency_s"]["per_token_over_static"] for r in d["runs"]]
    for v, what in (("static", "static per-tensor inputs (as the runs learned them)"),
                    ("per_token", f"{', '.join(d['linears'])} inputs per token")):
        s = d["summary"][v]
        lat = "1.00x" if v == "static" else f"{statistics.median(ratios):.2f}x (median of {len(ratios)} runs)"
        lines.append(f"| {what} | {cell(s['heldout'])} | {cell(s['ood'])} | {lat} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=Path, nargs="+", default=DEFAULT_RUNS, help="fedquant simulate run directories")
    ap.add_argument("--profile", default="int8")
    ap.add_argument("--linears", nargs="+", default=["*.down_proj"], help="fnmatch patterns over Linear paths")
    ap.add_argument("--eval-sequences", type=int, default=64)
    ap.add_argument("--ood-sequences", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5, help="latency repetitions per session")
    ap.add_argument("--out", type=Path, default=RESULTS / "per_token.json")
    args = ap.parse_args(argv)
    quiet_env()
    import onnxruntime

    onnxruntime.set_default_logger_severity(3)
    t0 = time.perf_counter()
    rows = [evaluate_run(r, args.profile, args.linears, args.eval_sequences, args.ood_sequences, args.batch_size,
                         args.threads, args.reps) for r in args.runs]
    result = {"format": "fedquant.per_token/1", "machine": machine(onnxruntime=onnxruntime.__version__),
              "profile": args.profile, "linears": args.linears, "threads": args.threads,
              "runs": rows, "summary": summary(rows), "wall_s": round(time.perf_counter() - t0, 1),
              "command": command_line("bench.per_token", argv)}
    write_json(args.out, result)
    print(markdown_table(result))
    print(f"wrote {args.out} in {result['wall_s']} s", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
